"""getcertd.keyjobs and getcertd.helpers: the enrollment work that needs the CA or RA key, in helper processes.

The jobs are checked against the codec they wrap (the same certificate, byte for byte; a CertRep that `openssl
cms` verifies and decrypts), their results across the process boundary (typed errors keep their meaning, a
malformed result is KeyJobFailed), and real helper processes: jobs spread over them, a killed helper fails only
its own jobs and is replaced, stopping ends them all, the keys are in no argument list or environment.
"""
import datetime
import ipaddress
import os
import signal
import subprocess
import time

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, task

from appliance import children, running
from getcertd import keyjobs, scep
from getcertd.ca import CertificateAuthority, make_ca_certificate
from getcertd.errors import FailInfo, KeyJobFailed, MalformedRequest, ScepFailure
from getcertd import helpers as helpers_module
from getcertd.helpers import KeyHelpers
from getcertd.keyhelper import NICENESS
from getcertd.policy import Decision
from getcertd.stats import Stats

NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


@pytest.fixture(scope="module")
def material():
    ca_key, ra_key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    ca = CertificateAuthority(ca_key, make_ca_certificate(ca_key, "CN=keyjobs test CA", NOW,
                                                          datetime.timedelta(days=30)))
    return keyjobs.KeyMaterial(ca, ra_key, ca.issue_ra(ra_key, NOW, datetime.timedelta(days=10)))


@pytest.fixture(scope="module")
def requester():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(NOW - datetime.timedelta(hours=1))
            .not_valid_after(NOW + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return key, cert, csr


def _pkcs_req(material, requester, message_type=scep.MessageType.PKCSReq, inner=None, tid="TID-1"):
    key, cert, csr = requester
    return scep.build_request(message_type, inner if inner is not None else csr.public_bytes(
        serialization.Encoding.DER), recipient_cert=material.signer_cert, signer_key=key, signer_cert=cert,
        transaction_id=tid, sender_nonce=b"n" * 16)


def _decision(**changes):
    fields = dict(profile="default", subject=x509.Name([
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]),
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "VPN")])]),
        san=(x509.RFC822Name("alice@example.org"), x509.DNSName("alice.vpn.example.org"),
             x509.UniformResourceIdentifier("urn:user:alice"), x509.IPAddress(ipaddress.ip_address("192.0.2.7"))),
        not_before=NOW - datetime.timedelta(minutes=2), not_after=NOW + datetime.timedelta(hours=8),
        eku=("ipsecIKE", "clientAuth", "1.3.6.1.5.5.8.2.2"), key_type="rsa2048")
    fields.update(changes)
    return Decision(**fields)


# --- the jobs, in-process -------------------------------------------------------------------------------------

def test_open_gives_the_verified_message_its_plaintext_and_csr(material, requester):
    body = _pkcs_req(material, requester)
    opened = keyjobs.open_message(material, body)
    same = scep.parse_signed(body)
    assert opened.message == same
    assert opened.plaintext == requester[2].public_bytes(serialization.Encoding.DER)
    assert opened.cipher == "aes256"
    assert opened.csr() == requester[2]


def test_the_certificate_job_signs_what_the_ca_would(material, requester):
    """Byte for byte the certificate the CA's own builder makes from the same decision (PKCS#1 v1.5 signatures
    are deterministic), for every kind of subjectAltName the policy can ask for, and openssl reads it."""
    decision, public_key = _decision(), requester[0].public_key()
    der = keyjobs.certificate(material, keyjobs.certificate_job(public_key, decision, 0x1234, "http://x/crl"))
    direct = material.ca.sign(material.ca.end_entity(public_key, decision.subject, decision.san,
                                                     decision.not_before, decision.not_after, 0x1234,
                                                     decision.eku, "http://x/crl"))
    assert der == direct.public_bytes(serialization.Encoding.DER)
    text = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-text"], input=der, capture_output=True,
                          check=True).stdout.decode()
    assert "alice.vpn.example.org" in text and "192.0.2.7" in text and "Serial Number: 4660" in text


def test_a_subject_keeps_its_string_types(material, requester):
    subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "bob", _type=x509.name._ASN1Type.PrintableString)])
    decision = _decision(subject=subject, san=())
    der = keyjobs.certificate(material, keyjobs.certificate_job(requester[0].public_key(), decision, 5, None))
    assert x509.load_der_x509_certificate(der).subject.public_bytes() == subject.public_bytes()


def test_the_cert_rep_job_builds_a_certrep_openssl_accepts(material, requester, tmp_path):
    opened = keyjobs.open_message(material, _pkcs_req(material, requester))
    cert = keyjobs.certificate(material, keyjobs.certificate_job(requester[0].public_key(), _decision(), 9, None))
    rep = keyjobs.cert_rep(material, keyjobs.cert_rep_job(opened.message, scep.PkiStatus.SUCCESS,
                                                          scep.certs_only([cert]), "aes128"))
    parsed = scep.parse_signed(rep)
    assert (parsed.message_type, parsed.pki_status, parsed.transaction_id, parsed.recipient_nonce) == (
        scep.MessageType.CertRep, scep.PkiStatus.SUCCESS, "TID-1", b"n" * 16)
    assert parsed.signer_cert == material.signer_cert
    (tmp_path / "rep.der").write_bytes(rep)
    (tmp_path / "ra.pem").write_bytes(material.signer_cert.public_bytes(serialization.Encoding.PEM))
    subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", tmp_path / "rep.der", "-noverify",
                    "-certfile", tmp_path / "ra.pem", "-out", tmp_path / "env.der", "-outform", "DER"],
                   check=True, capture_output=True)
    (tmp_path / "key.pem").write_bytes(requester[0].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    inner = subprocess.run(["openssl", "cms", "-decrypt", "-inform", "DER", "-in", tmp_path / "env.der",
                            "-inkey", tmp_path / "key.pem", "-binary"], check=True, capture_output=True).stdout
    assert scep.parse_degenerate(inner)[0][0].public_bytes(serialization.Encoding.DER) == cert


def test_a_failure_certrep_carries_its_fail_info(material, requester):
    opened = keyjobs.open_message(material, _pkcs_req(material, requester))
    rep = scep.parse_signed(keyjobs.cert_rep(material, keyjobs.cert_rep_job(
        opened.message, scep.PkiStatus.FAILURE, fail_info=FailInfo.badRequest, fail_info_text="no, because")))
    assert (rep.pki_status, rep.fail_info, rep.fail_info_text) == (scep.PkiStatus.FAILURE, FailInfo.badRequest,
                                                                   "no, because")


# --- results across the boundary ------------------------------------------------------------------------------

def _through_the_wire(material, op, arg):
    try:
        data = keyjobs.encode_result(op, keyjobs.OPS[op](material, arg))
    except Exception as e:  # noqa: BLE001 - as the helper does
        data = keyjobs.encode_error(e)
    return keyjobs.decode_result(op, data)


def test_an_opened_message_survives_the_wire(material, requester):
    body = _pkcs_req(material, requester)
    back, direct = _through_the_wire(material, "open", body), keyjobs.open_message(material, body)
    assert back.message == scep.SignedMessage(**{**direct.message.__dict__, "content": None,
                                                  "signer_certs": (direct.message.signer_cert,)})
    assert (back.plaintext, back.cipher, back.csr_der) == (direct.plaintext, direct.cipher, direct.csr_der)


def test_typed_errors_survive_the_wire(material, requester):
    with pytest.raises(MalformedRequest, match="."):
        _through_the_wire(material, "open", b"\x30\x03\x02\x01\x00")
    # Read, but its content is not a CSR: the FAILURE CertRep needs the message, and gets it; the client is told
    # what it would be told for a failed decryption, the log gets why.
    with pytest.raises(ScepFailure) as unreadable:
        _through_the_wire(material, "open", _pkcs_req(material, requester, inner=b"not a csr"))
    assert (unreadable.value.fail_info, unreadable.value.text) == (FailInfo.badMessageCheck, scep.UNDECRYPTABLE)
    assert unreadable.value.detail.startswith("CSR: ") and unreadable.value.request.transaction_id == "TID-1"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec signer")])
    ec_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ec_key.public_key())
               .serial_number(3).not_valid_before(NOW - datetime.timedelta(hours=1))
               .not_valid_after(NOW + datetime.timedelta(days=1)).sign(ec_key, hashes.SHA256()))
    with pytest.raises(ScepFailure) as refused:
        _through_the_wire(material, "open", _pkcs_req(material, (ec_key, ec_cert, requester[2])))
    assert refused.value.fail_info == FailInfo.badAlg and "RSA key" in refused.value.text
    assert refused.value.request.transaction_id == "TID-1" and refused.value.request.signer_cert == ec_cert


def test_a_bug_in_a_job_is_key_job_failed(material):
    with pytest.raises(KeyJobFailed, match="ValueError: not enough values"):
        _through_the_wire(material, "certificate", ("not", "a", "job"))


@pytest.mark.parametrize("data", [b"", b"0", b"0\x00\x00\x00\x09abc", b"9\x00\x00\x00\x01x", b"1\x00\x00\x00\x01x",
                                  b"0\xff\xff\xff\xff\xff"])
def test_a_malformed_result_is_key_job_failed(data):
    with pytest.raises(KeyJobFailed):
        keyjobs.decode_result("certificate", data)


def test_frames_come_out_whole_and_the_buffer_keeps_the_rest():
    stream = keyjobs.frame(b"one") + keyjobs.frame(b"tw", b"o") + keyjobs.frame(b"three")
    buf, got = bytearray(), []
    for i in range(0, len(stream), 5):  # as a pipe may cut it
        buf += stream[i:i + 5]
        got += keyjobs.take_frames(buf)
    assert got == [b"one", b"two", b"three"] and buf == b""
    buf = bytearray(stream)
    for first in keyjobs.take_frames(buf):  # a caller that stops after one took only that one
        break
    assert first == b"one" and bytes(buf) == stream[len(keyjobs.frame(b"one")):]
    buf, got = bytearray(keyjobs.frame(b"ok") + b"\x00\x01\x00\x00" + b"x" * 10), []
    with pytest.raises(ValueError, match="65536 bytes"):
        for f in keyjobs.take_frames(buf, most=1000):
            got.append(f)
    assert got == [b"ok"]  # what came before the oversized frame was delivered


class _Writers(task.Clock):
    """The part of a reactor a helper's job pipe uses."""

    def __init__(self):
        super().__init__()
        self.writers = set()

    def addWriter(self, w):
        self.writers.add(w)

    def removeWriter(self, w):
        self.writers.discard(w)


@pytest.mark.parametrize("full", [False, True])
def test_a_helper_whose_job_pipe_breaks_takes_no_more_jobs(full):
    """The read end of the job pipe gone (the helper died) while jobs are waiting in ``out`` (full) or not: the
    next write marks the helper ended, so it takes no job before processEnded comes."""
    pool = type("Pool", (), {"reactor": _Writers()})()
    helper = helpers_module._Helper(pool, b"material")
    try:
        if full:  # jobs wait for the pipe to drain: the writer is watched and _flush does the failing write
            os.set_blocking(helper.job_write, False)
            assert helper.send(1, "open", b"x" * (1 << 20), defer.Deferred())
            assert helper.out and pool.reactor.writers == {helper.writer}
        for fd in helper.child_fds:
            os.close(fd)
        helper.child_fds = []
        if full:
            helper._flush()
            assert not helper.out and not pool.reactor.writers
        assert helper.ended == full
        assert not helper.send(2, "open", b"y", defer.Deferred())
        assert helper.ended and 2 not in helper.jobs
    finally:
        os.close(helper.job_write)
        os.close(helper.result_read)
        for fd in helper.child_fds:
            os.close(fd)


# --- real helper processes ------------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_helpers_do_jobs_in_their_own_processes_and_end_with_the_service(material, requester):
    helpers = KeyHelpers(reactor, material.dumps(), size=2)
    helpers.startService()
    try:
        pids = helpers.pids
        assert len(pids) == 2 and os.getpid() not in pids
        bodies = [_pkcs_req(material, requester, tid=f"T{i}") for i in range(12)]
        opened = yield defer.gatherResults([helpers.run("open", b) for b in bodies])
        assert [o.message.transaction_id for o in opened] == [f"T{i}" for i in range(12)]
        jobs = [keyjobs.certificate_job(requester[0].public_key(), _decision(), 100 + i, None) for i in range(6)]
        ders = yield defer.gatherResults([helpers.run("certificate", j) for j in jobs])
        assert ders == [keyjobs.certificate(material, j) for j in jobs]
        with pytest.raises(MalformedRequest):
            yield helpers.run("open", b"garbage")
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        for pid in pids:  # below the reactor thread, which serves every connection and goes first
            assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, mine + NICENESS)
        for pid in pids:  # the keys travel through a pipe: not in the arguments or the environment
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert f.read().split(b"\0")[1:4] == [b"-P", b"-m", b"getcertd.keyhelper"]
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert b"PRIVATE" not in f.read()
    finally:
        yield helpers.stopService()
    assert not any(running(p) for p in pids)
    with pytest.raises(KeyJobFailed, match="no key helper"):
        yield helpers.run("open", b"x")


@pytest_twisted.inlineCallbacks
def test_a_killed_helper_fails_its_own_jobs_and_is_replaced(material, requester):
    stats = Stats(task.Clock())
    helpers = KeyHelpers(reactor, material.dumps(), size=2, stats=stats)
    helpers.startService()
    try:
        yield helpers.run("open", _pkcs_req(material, requester))  # both running
        victim = helpers.helpers[0]
        bodies = [_pkcs_req(material, requester, tid=f"K{i}") for i in range(40)]
        pending = [helpers.run("open", b) for b in bodies]
        on_victim = len(victim.jobs)
        assert on_victim > 0
        os.kill(victim.pid, signal.SIGKILL)
        results = yield defer.DeferredList(pending, consumeErrors=True)
        failed = [r for ok, r in results if not ok]
        assert 0 < len(failed) <= on_victim
        assert all(f.check(KeyJobFailed) for f in failed)
        assert sum(ok for ok, _ in results) == 40 - len(failed)
        deadline = time.monotonic() + 10
        while len(helpers.pids) < 2 and time.monotonic() < deadline:  # replaced (after RESTART_DELAY if quick)
            yield task.deferLater(reactor, 0.1, lambda: None)
        assert len(helpers.pids) == 2 and victim.pid not in helpers.pids and helpers.restarts == 1
        assert b'getcertd_events_total{event="key_helper_restarted"} 1.0' in stats.metrics_text()
        again = yield defer.gatherResults([helpers.run("open", b) for b in bodies[:8]])
        assert len(again) == 8
    finally:
        yield helpers.stopService()


def test_a_running_appliance_replaces_a_killed_helper(appliance_factory):
    """Against a real twistd: its key helpers are its children; SIGTERM and SIGINT don't stop them (twistd does,
    after its drain); one killed (as a crash would), the next enrollments still succeed, the log says what
    happened, and stopping twistd ends the helpers."""
    from scepclient import Requester, basic, get_ca_certs, http
    app = appliance_factory({"policy": {"max_valid_per_user": "0"}}, users={"alice": "alice-pass"})
    # twistd binds its listeners before it starts its services: the port may answer before the helpers exist
    deadline, helpers = time.monotonic() + 10, []
    while len(helpers) < (os.cpu_count() or 1) and time.monotonic() < deadline:
        helpers = children(app.proc.pid)
        time.sleep(0.05)
    assert len(helpers) == (os.cpu_count() or 1)
    certs = get_ca_certs(app.url, app.ca_pem)

    def enroll():
        r = Requester(certs)
        status, _, body = http(app.url + "?operation=PKIOperation", data=r.message(), cafile=app.ca_pem,
                               headers=basic("alice", "alice-pass"))
        assert status == 200, body
        rep, issued = r.open_reply(body)
        assert rep.pki_status == scep.PkiStatus.SUCCESS
        return issued[0]
    enroll()
    for sig in (signal.SIGTERM, signal.SIGINT):  # systemd's stop and Ctrl-C reach every process in the group:
        for pid in helpers:                        # the helpers wait for twistd to finish and close their pipes
            os.kill(pid, sig)
    time.sleep(0.3)
    assert all(running(p) for p in helpers)
    enroll()
    os.kill(helpers[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running(helpers[0]) and time.monotonic() < deadline:  # gone, not just signalled (else in flight)
        time.sleep(0.05)
    for _ in range(4):
        enroll()
    deadline = time.monotonic() + 10
    while "key helper" not in app.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"key helper {helpers[0]} was killed by signal 9; starting another" in app.log()
    deadline, now = time.monotonic() + 10, []
    while len(now) < len(helpers) and time.monotonic() < deadline:  # replaced (a second later if it was new)
        time.sleep(0.1)
        now = children(app.proc.pid)
    assert helpers[0] not in now and len(now) == len(helpers)
    app.stop()
    assert not any(running(p) for p in now)


@pytest_twisted.inlineCallbacks
def test_a_helper_that_cannot_run_is_retried_once_a_second_and_jobs_fail_clearly(material):
    """A broken helper program (here: one that exits 3 at once) is started again, not in a tight loop; jobs
    meanwhile fail with KeyJobFailed (503) instead of waiting; stopping ends the retries."""
    import sys
    helpers = KeyHelpers(reactor, material.dumps(), size=1, argv=[sys.executable, "-c", "raise SystemExit(3)"])
    helpers.startService()
    try:
        yield task.deferLater(reactor, 2.5, lambda: None)
        assert 1 <= helpers.restarts <= 3  # about one a second, not thousands
        outcome = yield defer.DeferredList([helpers.run("open", b"x")], consumeErrors=True)
        assert outcome[0][1].check(KeyJobFailed)
    finally:
        yield helpers.stopService()
    restarts = helpers.restarts
    yield task.deferLater(reactor, 1.5, lambda: None)
    assert helpers.restarts == restarts and not helpers.helpers


@pytest_twisted.inlineCallbacks
def test_a_helper_that_cannot_get_its_pipes_is_retried(material, requester, monkeypatch):
    """Out of file descriptors (EMFILE) when making a helper's pipes: the error escaped _spawn and the helper was
    never started again, so every enrollment got 503 until a restart. It is retried like a failed start, and
    no descriptor leaks."""
    import errno
    real_pipe2 = os.pipe2
    calls = []

    def pipe2(flags):
        calls.append(flags)
        if len(calls) == 2:  # the second pipe of the first helper
            raise OSError(errno.EMFILE, "Too many open files")
        return real_pipe2(flags)
    monkeypatch.setattr(helpers_module.os, "pipe2", pipe2)
    open_fds = len(os.listdir("/proc/self/fd"))
    helpers = KeyHelpers(reactor, material.dumps(), size=1)
    helpers.startService()
    try:
        assert not helpers.helpers and len(os.listdir("/proc/self/fd")) == open_fds
        yield task.deferLater(reactor, helpers_module.RESTART_DELAY + 0.5, lambda: None)
        assert len(helpers.helpers) == 1
        opened = yield helpers.run("open", _pkcs_req(material, requester))
        assert opened.csr_der
    finally:
        yield helpers.stopService()


@pytest_twisted.inlineCallbacks
def test_stopping_kills_a_helper_that_does_not_end(material, monkeypatch):
    """A helper that keeps running after its input is closed (a job stuck in a loop, say) is killed after
    STOP_TIMEOUT, so that twistd can stop."""
    import sys
    from getcertd import helpers as helpers_module
    monkeypatch.setattr(helpers_module, "STOP_TIMEOUT", 0.5)
    stuck = KeyHelpers(reactor, material.dumps(), size=1,
                       argv=[sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
    stuck.startService()
    pid = stuck.pids[0]
    started = time.monotonic()
    yield stuck.stopService()
    assert 0.4 < time.monotonic() - started < 5 and not running(pid)


@pytest_twisted.inlineCallbacks
def test_a_helper_that_answers_nonsense_is_killed_and_its_jobs_fail(material):
    """A frame too short to be an answer (a helper gone wrong): the appliance kills that helper, fails its jobs
    with KeyJobFailed and starts another; it never takes the bytes for a result."""
    import sys
    program = "import os, time\nos.write(1, b'\\x00\\x00\\x00\\x02xx')\ntime.sleep(30)"
    helpers = KeyHelpers(reactor, material.dumps(), size=1, argv=[sys.executable, "-c", program])
    helpers.startService()
    try:
        pid = helpers.pids[0]
        outcome = yield defer.DeferredList([helpers.run("open", b"x")], consumeErrors=True)
        assert outcome[0][1].check(KeyJobFailed)
        deadline = time.monotonic() + 5
        while not helpers.restarts and time.monotonic() < deadline:  # killed, reaped, replaced
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert not running(pid) and helpers.restarts >= 1
    finally:
        yield helpers.stopService()
