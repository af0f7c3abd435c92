"""The appliance end to end: a real `twistd getcertd` process, enrolled by `getcert` as a separate process."""
import base64
import os
import stat
import subprocess
import sys
import urllib.parse
import zipfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from getcertd import scep
from getcertd.errors import FailInfo
from getcertd.issuance import IssuanceLog
from getcertd.journal import replay
from scepclient import (Requester, basic, csr_der, get_ca_certs, http, raw_envelope, rsa_key,
                        rsa_key_with_huge_exponent)


def openssl(*args, input=None):
    return subprocess.run(["openssl", *args], input=input, capture_output=True)


@pytest.fixture
def app(appliance_factory):
    return appliance_factory(users={"alice": "alice pass", "bob": "bob-pass"})


def test_getcert_enrolls_and_openssl_verifies(app, tmp_path):
    out = tmp_path / "out"
    p = app.getcert("alice", ["alice pass"], out)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    v = openssl("verify", "-CAfile", str(out / "ca.pem"), str(out / "cert.pem"))
    assert v.returncode == 0, v.stdout + v.stderr
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=alice,OU=remote-access,O=getcertd"
    assert (out / "ca.pem").read_bytes() == open(app.ca_pem, "rb").read()
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert "issued serial" in app.log() and "alice pass" not in app.log()


def test_getcert_ec_key_and_fingerprint_pinning(app, tmp_path):
    ca = x509.load_pem_x509_certificate(open(app.ca_pem, "rb").read())
    fp = "sha256:" + ca.fingerprint(hashes.SHA256()).hex()
    p = app.getcert("bob", ["bob-pass"], tmp_path / "o", "--ca-fingerprint", fp, "--key-type", "ec-p256")
    assert p.returncode == 0, p.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "o" / "cert.pem").read_bytes())
    assert cert.public_key().curve.name == "secp256r1"
    bad = app.getcert("bob", ["bob-pass"], tmp_path / "x", "--ca-fingerprint", "sha256:" + "00" * 32)
    assert bad.returncode != 0 and "fingerprint" in bad.stderr


def test_wrong_password_and_untrusted_server_refused(app, tmp_path):
    p = app.getcert("alice", ["wrong"], tmp_path / "bad")
    assert p.returncode != 0 and "authentication failed" in p.stderr
    p = app.getcert("nosuchuser", ["whatever"], tmp_path / "bad2")
    assert p.returncode != 0 and "authentication failed" in p.stderr
    other = tmp_path / "other.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            str(tmp_path / "other.key"), "-subj", "/CN=other", "-days", "1", "-out", str(other))
    p = app.getcert("alice", ["alice pass"], tmp_path / "mitm", cafile=str(other))
    assert p.returncode != 0 and "not trusted" in p.stderr
    assert not (tmp_path / "mitm" / "key.pem").exists()


def test_getcacaps_getcacert_chain(app):
    for path in ("/scep", "/cgi-bin/pkiclient.exe"):
        url = f"https://localhost:{app.port}{path}"
        status, headers, caps = http(url + "?operation=GetCACaps", cafile=app.ca_pem)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        for cap in (b"POSTPKIOperation", b"SHA-256", b"AES", b"SCEPStandard", b"Renewal"):
            assert cap in caps.split()
    status, headers, body = http(app.url + "?operation=GetCACert", cafile=app.ca_pem)
    assert headers["Content-Type"] == "application/x-x509-ca-ra-cert"
    p = openssl("pkcs7", "-inform", "DER", "-print_certs", input=body)
    assert p.returncode == 0 and p.stdout.count(b"BEGIN CERTIFICATE") == 2
    certs = scep.parse_degenerate(body)[0]
    ca = [c for c in certs if c.issuer == c.subject]
    assert len(ca) == 1 and ca[0].public_bytes(serialization.Encoding.PEM) == open(app.ca_pem, "rb").read()
    ra = [c for c in certs if c.issuer != c.subject][0]
    ku = ra.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    status, headers, body = http(app.url + "?operation=GetCACertChain", cafile=app.ca_pem)
    assert status == 200 and len(scep.parse_degenerate(body)[0]) == 2


def test_lone_ca_without_ra(appliance_factory):
    app = appliance_factory(sections={"ca": {"ra": "no"}})  # an RSA CA: an EC one alone is refused at start
    status, headers, body = http(app.url + "?operation=GetCACert", cafile=app.ca_pem)
    assert headers["Content-Type"] == "application/x-x509-ca-cert"
    assert x509.load_der_x509_certificate(body).issuer == x509.load_der_x509_certificate(body).subject


def test_pkioperation_401_then_basic_by_post_and_get(app):
    certs = get_ca_certs(app.url, app.ca_pem)
    r = Requester(certs)
    msg = r.message()
    status, headers, body = http(app.url + "?operation=PKIOperation", data=msg, cafile=app.ca_pem)
    assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="getcertd"')
    status, headers, body = http(app.url + "?operation=PKIOperation", data=msg, cafile=app.ca_pem,
                                 headers=basic("alice", "alice pass"))
    assert status == 200 and headers["Content-Type"] == "application/x-pki-message"
    rep, issued = r.open_reply(body)
    assert rep.pki_status == scep.PkiStatus.SUCCESS and len(issued) == 1
    # the same by GET, with the base64 left unescaped ('+' and '/' raw), as many clients send it
    r2 = Requester(certs)
    b64 = base64.b64encode(r2.message(cipher="des3", digest="sha1")).decode()
    assert "+" in b64 or "/" in b64
    status, headers, body = http(app.url + "?operation=PKIOperation&message=" + b64, cafile=app.ca_pem,
                                 headers=basic("bob", "bob-pass"))
    assert status == 200
    rep, issued = r2.open_reply(body)
    assert rep.pki_status == scep.PkiStatus.SUCCESS
    assert issued[0].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "bob"
    # percent-escaped too
    r3 = Requester(certs)
    q = urllib.parse.quote(base64.b64encode(r3.message()).decode(), safe="")
    status, _, body = http(app.url + "?operation=PKIOperation&message=" + q, cafile=app.ca_pem,
                           headers=basic("bob", "bob-pass"))
    assert status == 200 and r3.open_reply(body)[0].pki_status == scep.PkiStatus.SUCCESS


def test_refusals_are_failure_certreps_and_garbage_is_400(app):
    certs = get_ca_certs(app.url, app.ca_pem)
    weak = Requester(certs)
    small = rsa_key(1024)
    msg = weak.message(inner=csr_der(small))
    status, _, body = http(app.url + "?operation=PKIOperation", data=msg, cafile=app.ca_pem,
                           headers=basic("alice", "alice pass"))
    assert status == 200
    rep, _ = weak.open_reply(body)
    assert rep.pki_status == scep.PkiStatus.FAILURE and rep.fail_info == FailInfo.badAlg
    assert "2048" in rep.fail_info_text and rep.content == b""
    # the log names the message type and who was refused, and whose login failed (an operator asked "who?")
    assert "SCEP PKCSReq from 127.0.0.1 for 'alice' refused: badAlg: RSA keys must be at least 2048" in app.log()
    status, _, _ = http(app.url + "?operation=PKIOperation", data=Requester(certs).message(), cafile=app.ca_pem,
                        headers=basic("carol", "not her password"))
    assert status == 401 and "authentication failed for 'carol' from 127.0.0.1" in app.log()
    assert "not her password" not in app.log()
    v = openssl("cms", "-verify", "-inform", "DER", "-noverify", "-content", os.devnull, "-out", os.devnull, input=body)
    assert v.returncode == 0, v.stderr
    for garbage in (b"hello", b"\x30\x03\x02\x01\x01", b""):
        status, headers, body = http(app.url + "?operation=PKIOperation", data=garbage, cafile=app.ca_pem)
        assert status == 400 and body.count(b"\n") == 1 and b"Traceback" not in body
    status, _, body = http(app.url + "?operation=PKIOperation&message=%%%%", cafile=app.ca_pem)
    assert status == 400
    status, _, body = http(app.url + "?operation=Nonsense", cafile=app.ca_pem)
    assert status == 400 and b"unsupported operation" in body


SHA256_OID = bytes.fromhex("0609608648016503040201")
SHA224_OID = bytes.fromhex("0609608648016503040204")


def test_an_unsupported_digest_or_transaction_id_gets_a_clear_answer(app):
    """A request digested with SHA-224 (not among SCEP's) got a 503 on every retry: its FAILURE CertRep was
    signed with the request's digest. It is a FAILURE badAlg signed with SHA-256. A transactionID over 128
    characters or with control characters (it goes into every journal and log line) is a 400 with one line."""
    certs = get_ca_certs(app.url, app.ca_pem)
    r = Requester(certs)
    msg = r.message()
    assert msg.count(SHA256_OID) >= 2  # digestAlgorithms and the signerInfo's digestAlgorithm
    status, _, body = http(app.url + "?operation=PKIOperation", data=msg.replace(SHA256_OID, SHA224_OID),
                           cafile=app.ca_pem, headers=basic("alice", "alice pass"))
    assert status == 200, body
    rep = scep.parse_signed(body)
    assert rep.pki_status == scep.PkiStatus.FAILURE and rep.fail_info == FailInfo.badAlg
    assert "2.16.840.1.101.3.4.2.4" in rep.fail_info_text and rep.digest == "sha256"
    for tid, why in (("A" * 129, b"transactionID longer than 128 characters"),
                     ("ab\ncd", b"transactionID has control characters")):
        status, _, body = http(app.url + "?operation=PKIOperation", data=r.message(transaction_id=tid),
                               cafile=app.ca_pem, headers=basic("alice", "alice pass"))
        assert status == 400 and why in body and body.count(b"\n") == 1, body
    status, _, body = http(app.url + "?operation=PKIOperation", data=r.message(transaction_id="B" * 128),
                           cafile=app.ca_pem, headers=basic("alice", "alice pass"))
    assert status == 200 and r.open_reply(body)[0].pki_status == scep.PkiStatus.SUCCESS


def test_rsa_keys_with_huge_public_exponents_are_refused_before_verifying(app):
    """An RSA public exponent as long as the modulus makes each signature check cost like a signature (5.9 ms
    instead of 0.05 for a CSR): the signer's key and the CSR's key are refused (badAlg) before verifying."""
    certs = get_ca_certs(app.url, app.ca_pem)
    huge = rsa_key_with_huge_exponent()
    # a CSR that fails inside the envelope gets the one answer of an unreadable content (no decryption oracle);
    # scep.parse_csr's own refusal is tested in test_scep_codec
    for r, fail_info, why in (
            (Requester(certs, key=huge), FailInfo.badAlg, "signer key: RSA public exponents over 64 bits"),
            (Requester(certs), FailInfo.badMessageCheck, scep.UNDECRYPTABLE)):
        inner = None if r.key is huge else csr_der(huge)
        status, _, body = http(app.url + "?operation=PKIOperation", data=r.message(inner=inner),
                               cafile=app.ca_pem, headers=basic("alice", "alice pass"))
        assert status == 200, body
        rep, _ = r.open_reply(body)
        assert rep.pki_status == scep.PkiStatus.FAILURE and rep.fail_info == fail_info
        assert why in rep.fail_info_text
    assert "CSR key: RSA public exponents over 64 bits" in app.log()


def _padded(data):
    n = 16 - len(data) % 16
    return data + bytes([n]) * n


def test_what_fails_inside_the_envelope_gets_one_answer(app):
    """No decryption oracle. Whoever resends a recorded request's envelope, altered, in a message signed by a key of
    their own must learn nothing of what it decrypts to: for each message type, bad CBC padding, good padding
    around garbage, DER of another kind, and a content that reads but names nothing known here (a foreign
    issuer; this CA with a serial that is really a password) get one answer, which tells nothing of the content
    back. A CertPoll's content is not decrypted at all: it is answered by its transactionID."""
    certs = get_ca_certs(app.url, app.ca_pem)
    ca = next(c for c in certs if c.issuer == c.subject)
    requester = Requester(certs)
    secret = b"\x01alice s3cret pass"
    foreign = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "another CA")])
    contents = {
        "bad padding": os.urandom(31) + b"\x00",
        "garbage": os.urandom(31) + b"\x01",
        "DER of another kind": _padded(b"\x30\x03\x02\x01\x01"),
        "a foreign issuer": _padded(scep.build_issuer_and_serial(foreign, 7)),
        "a password as serial": _padded(scep.build_issuer_and_serial(ca.subject, int.from_bytes(secret, "big"))),
        "an empty issuer and a password as serial": _padded(b"\x30\x17\x30\x00\x02\x13" + secret),
        "an IssuerAndSubject": _padded(scep.build_issuer_and_subject(ca.subject, foreign)),
    }
    answers = {}
    for message_type in (scep.MessageType.PKCSReq, scep.MessageType.RenewalReq, scep.MessageType.CertPoll,
                         scep.MessageType.GetCert, scep.MessageType.GetCRL):
        for what, raw in contents.items():
            msg = requester.message(message_type, envelope=raw_envelope(requester.recipient, raw))
            status, _, body = http(app.url + "?operation=PKIOperation", data=msg, cafile=app.ca_pem,
                                   headers=basic("alice", "alice pass"))
            assert status == 200, (message_type, what, body)
            rep, _ = requester.open_reply(body)
            if message_type == scep.MessageType.GetCRL and what == "a password as serial":
                assert rep.pki_status == scep.PkiStatus.SUCCESS  # it names this CA: its CRL, whatever the serial
                continue
            assert rep.pki_status == scep.PkiStatus.FAILURE, (message_type, what)
            assert secret.hex()[2:] not in rep.fail_info_text.lower() and "s3cret" not in rep.fail_info_text
            answers.setdefault(message_type, set()).add((rep.fail_info, rep.fail_info_text))
    assert all(len(a) == 1 for a in answers.values()), answers
    assert answers[scep.MessageType.PKCSReq] == {(FailInfo.badMessageCheck, scep.UNDECRYPTABLE)}
    assert answers[scep.MessageType.CertPoll] == {(FailInfo.badCertId, "no certificate is known for this "
                                                                       "transactionID")}
    assert "(CSR: " in app.log() and "s3cret" not in app.log() and secret.hex()[2:] not in app.log()  # why, for the admin
    # A CertPoll for a transactionID that has a certificate gets it, whatever its content decrypts to.
    status, _, body = http(app.url + "?operation=PKIOperation", data=requester.message(), cafile=app.ca_pem,
                           headers=basic("alice", "alice pass"))
    assert status == 200 and requester.open_reply(body)[0].pki_status == scep.PkiStatus.SUCCESS
    issued = requester.open_reply(body)[1]
    poll = requester.message(scep.MessageType.CertPoll, transaction_id=requester.tid,
                             envelope=raw_envelope(requester.recipient, contents["bad padding"]))
    status, _, body = http(app.url + "?operation=PKIOperation", data=poll, cafile=app.ca_pem)
    rep, polled = requester.open_reply(body)
    assert rep.pki_status == scep.PkiStatus.SUCCESS and polled == issued


def test_a_recorded_challenge_password_request_resent_issues_nothing_new(appliance_factory):
    """A plain-HTTP device enrolls with its challengePassword; whoever recorded that request resends its envelope in
    messages of their own with new transactionIDs. Each gets the device's certificate again, not a new one
    (before, each issued one more in alice's name, and with max_valid_per_user, 1 here, the second was refused
    and so was alice). A renewal signed by that certificate, with the same key, still gets a new one."""
    app = appliance_factory(sections={"policy": {"max_valid_per_user": "1"}}, users={"alice": "alice s3cret pass"},
                            http=True)
    certs = get_ca_certs(app.url, app.ca_pem)
    device = Requester(certs)
    recorded = device.message(challenge="alice s3cret pass", cn="alice")
    status, _, body = http(app.http_url + "?operation=PKIOperation", data=recorded)
    rep, (issued,) = device.open_reply(body)
    assert status == 200 and rep.pki_status == scep.PkiStatus.SUCCESS
    sender = Requester(certs)
    for i in range(3):
        msg = sender.message(envelope=scep.parse_signed(recorded).content, transaction_id=f"resent-{i}")
        status, _, body = http(app.http_url + "?operation=PKIOperation", data=msg)
        rep, got = sender.open_reply(body)
        assert rep.pki_status == scep.PkiStatus.SUCCESS and got == [issued], (i, rep.fail_info_text)
    assert app.log().count("that certificate again") == 3 and "s3cret" not in app.log()
    assert [r.serial for r in journal_records(app)] == [issued.serial_number]
    renewal = Requester(certs, key=device.key, signer=issued)
    status, _, body = http(app.http_url + "?operation=PKIOperation", data=renewal.message(
        scep.MessageType.RenewalReq, challenge="alice s3cret pass", cn="alice"))
    rep, (renewed,) = renewal.open_reply(body)
    assert renewed.serial_number != issued.serial_number and renewed.public_key() == issued.public_key()
    assert [r.serial for r in journal_records(app)] == [issued.serial_number, renewed.serial_number]


def journal_records(app):
    log = IssuanceLog()
    replay(os.path.join(app.state_dir, "journal"), log)
    return list(log)


def test_state_dir_and_key_modes(app):
    assert stat.S_IMODE(os.stat(app.state_dir).st_mode) == 0o700
    for name in ("ca.key", "ra.key", "tls.key"):
        assert stat.S_IMODE(os.stat(os.path.join(app.state_dir, name)).st_mode) == 0o600


def test_refuses_to_start_with_readable_ca_key(app, appliance_factory):
    app.stop()
    os.chmod(os.path.join(app.state_dir, "ca.key"), 0o644)
    with pytest.raises(RuntimeError, match="readable by others"):
        app.start()


def test_wheel_contains_the_plugin(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["git", "-C", root, "archive", "--format=tar", "HEAD", "-o", str(tmp_path / "src.tar")], check=True)
    subprocess.run(["tar", "-xf", str(tmp_path / "src.tar"), "-C", str(src)], check=True)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel",
                        "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    wheel = next((tmp_path / "dist").glob("getcertd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/getcertd_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names and "getcertd/tap.py" in names


def test_failed_logins_are_throttled_the_same_for_unknown_users(app, tmp_path):
    certs = get_ca_certs(app.url, app.ca_pem)
    r = Requester(certs)
    msg = r.message()
    url = app.url + "?operation=PKIOperation"
    for user in ("alice", "nosuchuser"):
        codes = [http(url, data=msg, cafile=app.ca_pem, headers=basic(user, "wrong"))[0] for _ in range(6)]
        assert codes[:5] == [401] * 5 and codes[5] == 429, (user, codes)
    status, headers, body = http(url, data=msg, cafile=app.ca_pem, headers=basic("alice", "alice pass"))
    assert status == 429 and int(headers["Retry-After"]) >= 1 and b"too many failed attempts" in body


def test_parallel_guesses_and_other_spellings_get_no_more_tries(app):
    """Guesses sent at once used to pass the throttle before the first of them failed (all 30 reached the
    backend); and ALICE, Alice... were each 5 more guesses at an account that a case-insensitive backend
    takes as alice's."""
    from concurrent.futures import ThreadPoolExecutor
    msg = Requester(get_ca_certs(app.url, app.ca_pem)).message()
    url = app.url + "?operation=PKIOperation"

    def guess(i):
        return http(url, data=msg, cafile=app.ca_pem, headers=basic("alice", f"guess {i}"))[0]
    with ThreadPoolExecutor(30) as pool:
        codes = list(pool.map(guess, range(30)))
    assert codes.count(401) <= 5 and codes.count(429) >= 25, codes
    status, headers, body = http(url, data=msg, cafile=app.ca_pem, headers=basic("BOB", "wrong"))
    for spelling in ("Bob", "bOb", "BoB", "boB"):
        assert http(url, data=msg, cafile=app.ca_pem, headers=basic(spelling, "wrong"))[0] == 401
    assert http(url, data=msg, cafile=app.ca_pem, headers=basic("bob", "wrong"))[0] == 429


def test_credentials_that_cannot_be_names_or_basic_get_one_clear_answer(app):
    msg = Requester(get_ca_certs(app.url, app.ca_pem)).message()
    url = app.url + "?operation=PKIOperation"
    status, _, body = http(url, data=msg, cafile=app.ca_pem, headers=basic("a" * 254, "x"))
    assert status == 400 and body == b"bad request: a user name longer than 253 bytes\n"
    status, headers, body = http(url, data=msg, cafile=app.ca_pem, headers={"Authorization": "Bearer abc"})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=") \
        and body == b"only Basic authentication is supported\n"


def test_key_helpers_do_not_run_code_from_the_working_directory(tmp_path):
    """twistd started from a directory holding a getcertd/ (a checkout, a download): `python -m` put the working
    directory first on the helpers' path, so its keyhelper.py ran as the appliance's user and read the keys."""
    from appliance import Appliance
    (tmp_path / "app").mkdir()
    app = Appliance(tmp_path / "app", None, {"alice": "alice pass"})
    fake = tmp_path / "app" / "getcertd"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "keyhelper.py").write_text(
        f"import sys\nopen({str(tmp_path / 'ran')!r}, 'wb').write(sys.stdin.buffer.read(64))\n")
    app.start()
    try:
        p = app.getcert("alice", ["alice pass"], tmp_path / "out")
        assert p.returncode == 0, p.stderr
    finally:
        app.stop()
    assert not (tmp_path / "ran").exists()


def test_the_demo_prints_an_enroll_command_that_works_as_printed(tmp_path):
    """The Quick start's first command ends in `python -m getcertd.demo`: it must start the appliance and print
    a getcert line that enrolls when pasted into a shell, even from a directory whose name has a space."""
    import signal
    import socket
    import time
    from appliance import free_port
    d, port = tmp_path / "demo dir", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "getcertd.demo", "--dir", str(d), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        lines = []
        while not lines or not lines[-1].startswith("Starting:"):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        text = "".join(lines)
        command = text[text.index("Enroll from another terminal:\n") + 30:text.index("Starting:")]
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, text
                time.sleep(0.1)
        p = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (command, p.stdout, p.stderr)
        cert = x509.load_pem_x509_certificate((d / "client" / "cert.pem").read_bytes())
        assert cert.subject.rfc4514_string() == "CN=demo,OU=remote-access,O=getcertd"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_passphrase_encrypted_ca_key(appliance_factory, tmp_path):
    pw = tmp_path / "ca-pass"
    pw.write_text("correct horse battery staple\n")
    os.chmod(pw, 0o600)
    app = appliance_factory(sections={"ca": {"key_passphrase_file": str(pw)}}, users={"alice": "alice-pass"})
    key_pem = open(os.path.join(app.state_dir, "ca.key"), "rb").read()
    assert b"ENCRYPTED PRIVATE KEY" in key_pem
    p = app.getcert("alice", ["alice-pass"], tmp_path / "o")
    assert p.returncode == 0, p.stderr
    assert app.stop() == 0
    app.start()  # restarts with the same passphrase
    app.stop()
    pw.write_text("wrong\n")
    with pytest.raises(RuntimeError, match="does not open it"):
        app.start()
    pw.unlink()
    with pytest.raises(RuntimeError, match="key_passphrase_file"):
        app.start()


def test_start_up_problems_are_one_line_without_traceback(tmp_path):
    from appliance import tool
    conf = tmp_path / "bad.ini"
    conf.write_text(f"[getcertd]\nstate_dir = {tmp_path}/s\n[auth]\nusers = {tmp_path}/u\n[ca]\nkey_passphrase_file = /nonexistent\n")
    p = subprocess.run([tool("twistd"), "-n", "--pidfile", "", "getcertd", "--config", str(conf)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "key_passphrase_file" in out and "Traceback" not in out, out
    if os.geteuid() == 0:  # someone else's directory: refused, not narrowed to 0700
        other = tmp_path / "other"
        other.mkdir(mode=0o755)
        os.chown(other, 65534, 65534)
        conf.write_text(f"[getcertd]\nstate_dir = {other}\n[auth]\nusers = {tmp_path}/u\n")
        p = subprocess.run([tool("twistd"), "-n", "--pidfile", "", "getcertd", "--config", str(conf)],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        out = p.stdout + p.stderr
        assert p.returncode != 0 and f"state_dir {other} belongs to uid 65534" in out and "Traceback" not in out, out
        assert stat.S_IMODE(os.stat(other).st_mode) == 0o755
    conf.write_text("[getcertd]\nstate_dir = /tmp/x\n[nosuch]\n")
    p = subprocess.run([tool("twistd"), "-n", "--pidfile", "", "getcertd", "--config", str(conf)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "unknown section [nosuch]" in out and "Traceback" not in out, out


@pytest.mark.parametrize("content, expect", [
    (b"[getcertd]\nstate_dir = /tmp/caf\xe9\n", "the configuration {conf} is not UTF-8 text"),
    (b"[auth]\nbackend = radius\n[radius]\nservers = 127.0.0.1:1812\nsecret_file = {tmp}/gone\n",
     "[radius] secret_file {tmp}/gone: No such file or directory"),
    (None, "can't read the configuration {conf}: No such file or directory"),
])
def test_a_configuration_that_cannot_be_read_is_one_line_for_twistd_and_getcertd_admin(tmp_path, content, expect):
    from appliance import tool
    conf = tmp_path / "getcertd.ini"
    if content is not None:
        conf.write_bytes(content.replace(b"{tmp}", str(tmp_path).encode()))
    expect = expect.format(conf=conf, tmp=tmp_path)
    for args in ([tool("twistd"), "-n", "--pidfile", "", "getcertd", "--config", str(conf)],
                 [tool("getcertd-admin"), "--config", str(conf), "list"]):
        p = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        out = p.stdout + p.stderr
        assert p.returncode != 0 and expect in out and "Traceback" not in out, (args[0], out)


@pytest.mark.parametrize("key_type,expect", [("ec-p384", "secp384r1"), ("ed25519", "ed25519")])
def test_getcert_other_key_types(app, tmp_path, key_type, expect):
    p = app.getcert("alice", ["alice pass"], tmp_path / key_type, "--key-type", key_type)
    assert p.returncode == 0, p.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / key_type / "cert.pem").read_bytes())
    key = cert.public_key()
    assert getattr(getattr(key, "curve", None), "name", "ed25519") == expect
    v = openssl("verify", "-CAfile", app.ca_pem, str(tmp_path / key_type / "cert.pem"))
    assert v.returncode == 0
