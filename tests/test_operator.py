"""The operator plane against a real `twistd getcertd`: CRLs over HTTP(S) and SCEP GetCRL, CA downloads, restarts,
SIGKILL during a burst, the SSH manhole driven by OpenSSH, /metrics, getcertd-admin, and the landing page in
headless Chromium."""
import base64
import datetime
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from appliance import children, free_port, running, tool
from getcertd import scep
from getcertd.operations import format_serial
from manholeclient import ManholeSession, ssh_command, ssh_keygen
from scepclient import Requester, basic, get_ca_certs, http
from test_operator_units import metric

needs_ssh = pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
                               reason="openssh-client not installed (scripts/test installs it)")
CHROMIUM = shutil.which("chromium")


def openssl(*args, input=None):
    return subprocess.run(["openssl", *args], input=input, capture_output=True)


def admin(*args, input=None):
    return subprocess.run([tool("getcertd-admin"), *args], capture_output=True, text=True, input=input, timeout=60)


def ca_of(app):
    return x509.load_pem_x509_certificate(open(app.ca_pem, "rb").read())


def get(app, path, plain=False):
    if plain:
        return http(f"http://127.0.0.1:{app.http_port}{path}")
    return http(f"https://localhost:{app.port}{path}", cafile=app.ca_pem)


def crl_of(app):
    status, headers, body = get(app, "/crl")
    assert status == 200 and headers["Content-Type"] == "application/pkix-crl", (status, headers, body[:200])
    return x509.load_der_x509_crl(body)


def enroll(app, certs, user="alice", password="alice pass"):
    r = Requester(certs)
    status, _, body = http(app.url + "?operation=PKIOperation", data=r.message(), cafile=app.ca_pem,
                           headers=basic(user, password))
    assert status == 200, body
    rep, issued = r.open_reply(body)
    assert rep.pki_status == scep.PkiStatus.SUCCESS
    return issued[0]


@pytest.fixture
def keys(tmp_path):
    if shutil.which("ssh-keygen") is None:
        pytest.skip("openssh-client not installed")
    admin_key = ssh_keygen(tmp_path / "admin_key")
    other_key = ssh_keygen(tmp_path / "other_key")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text("# the admins\n" + (tmp_path / "admin_key.pub").read_text())
    return admin_key, other_key, authorized


def manhole_sections(authorized, port, **more):
    sections = {"manhole": {"listen": f"tcp:{port}:interface=127.0.0.1", "authorized_keys": str(authorized)}}
    sections.update(more)
    return sections


# -- CRLs and CA downloads -------------------------------------------------------------------------------

def test_crl_over_https_http_and_getcrl_ca_downloads_and_distribution_point(appliance_factory, tmp_path):
    app = appliance_factory(users={"alice": "alice pass"}, http=True,
                            sections={"crl": {"url": "http://crl.example.net/getcertd.crl"}})
    ca = ca_of(app)
    # CA downloads, on both listeners
    for plain in (False, True):
        status, headers, body = get(app, "/ca.crt", plain)
        assert status == 200 and headers["Content-Type"] == "application/pkix-cert"
        assert body == ca.public_bytes(serialization.Encoding.DER)
        status, headers, body = get(app, "/ca.pem", plain)
        assert status == 200 and headers["Content-Type"] == "application/x-pem-file"
        assert body == open(app.ca_pem, "rb").read()
    # the CRL: DER and PEM, HTTPS and plain HTTP, the same CRL; openssl verifies it against the CA
    status, headers, der = get(app, "/crl")
    assert status == 200 and headers["Content-Type"] == "application/pkix-crl"
    assert headers["Cache-Control"] == "no-cache"
    assert get(app, "/crl", plain=True)[2] == der
    status, headers, pem = get(app, "/crl.pem", plain=True)
    assert status == 200 and headers["Content-Type"] == "application/x-pem-file"
    assert x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER) == der
    (tmp_path / "crl.der").write_bytes(der)
    v = openssl("crl", "-inform", "DER", "-in", str(tmp_path / "crl.der"), "-CAfile", app.ca_pem, "-verify", "-noout")
    assert v.returncode == 0 and b"verify OK" in v.stdout + v.stderr, v
    crl = x509.load_der_x509_crl(der)
    assert crl.is_signature_valid(ca.public_key()) and len(crl) == 0
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 1
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(days=1)
    # an issued certificate names the configured distribution point
    out = tmp_path / "out"
    p = app.getcert("alice", ["alice pass"], out)
    assert p.returncode == 0, p.stderr
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    [point] = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for n in point.full_name] == ["http://crl.example.net/getcertd.crl"]
    # SCEP GetCRL, a real message built by getcertd.scep.build_get_crl
    certs = get_ca_certs(app.url, app.ca_pem)
    r = Requester(certs)
    nonce, tid = scep.new_nonce(), scep.new_transaction_id(r.key.public_key())
    message = scep.build_get_crl(ca.subject, cert.serial_number, recipient_cert=r.recipient, signer_key=r.key,
                                 signer_cert=r.signer, transaction_id=tid, sender_nonce=nonce)
    status, headers, body = http(app.url + "?operation=PKIOperation", data=message, cafile=app.ca_pem)
    assert status == 200 and headers["Content-Type"] == "application/x-pki-message"
    rep = scep.parse_signed(body)
    assert rep.message_type == scep.MessageType.CertRep and rep.pki_status == scep.PkiStatus.SUCCESS
    assert rep.transaction_id == tid and rep.recipient_nonce == nonce
    plaintext, _ = scep.decrypt_envelope(rep.content, r.key, r.signer)
    _certs, crls = scep.parse_degenerate(plaintext)
    assert [c.public_bytes(serialization.Encoding.DER) for c in crls] == [get(app, "/crl")[2]]
    # GetCRL for another issuer: a FAILURE CertRep, not an HTTP error
    other = x509.Name.from_rfc4514_string("CN=Someone Else")
    message = scep.build_get_crl(other, 1, recipient_cert=r.recipient, signer_key=r.key, signer_cert=r.signer,
                                 transaction_id=tid, sender_nonce=nonce)
    rep = scep.parse_signed(http(app.url + "?operation=PKIOperation", data=message, cafile=app.ca_pem)[2])
    assert rep.pki_status == scep.PkiStatus.FAILURE and rep.fail_info == scep.FailInfo.badCertId
    assert get(app, "/metrics")[0] == 404  # metrics only ever on their own listener
    assert "Traceback" not in app.log()


# -- the SSH manhole, with OpenSSH -----------------------------------------------------------------------

@needs_ssh
def test_manhole_with_openssh_revokes_and_the_next_crl_lists_it(appliance_factory, keys, tmp_path):
    admin_key, other_key, authorized = keys
    port, metrics_port = free_port(), free_port()
    app = appliance_factory(users={"alice": "alice pass", "bob": "bob pass"}, sections=manhole_sections(
        authorized, port, metrics={"listen": f"tcp:{metrics_port}:interface=127.0.0.1"}))
    host_key = os.path.join(app.state_dir, "ssh_host_ed25519_key")
    assert oct(os.stat(host_key).st_mode & 0o777) == "0o600"
    certs = get_ca_certs(app.url, app.ca_pem)
    a1, a2, b1 = enroll(app, certs), enroll(app, certs), enroll(app, certs, "bob", "bob pass")
    http(app.url + "?operation=PKIOperation", data=Requester(certs).message(), cafile=app.ca_pem,
         headers=basic("bob", "wrong"))

    # refused: a key that is not listed, and password authentication, which is not even offered
    for extra in ([], ["-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no"]):
        p = subprocess.run(ssh_command(port, other_key, "admin", *extra) + ["true"], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        assert p.returncode == 255 and "Permission denied (publickey)" in p.stderr, p.stderr
    assert "not in the authorized keys" in app.log()

    m = ManholeSession(port, admin_key, user="any-name-at-all")
    try:
        assert m.login_seconds < 10
        print(f"\nmanhole login (ssh start to first prompt): {m.login_seconds * 1000:.0f} ms")
        table = m.run("log.recent(20)")
        for cert in (a1, a2, b1):
            assert format_serial(cert.serial_number) in table
        assert "(3 records)" in table
        assert format_serial(a1.serial_number) in m.run("log.user('alice')")
        crl_before = crl_of(app).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        m.run(f"revoke('{format_serial(a1.serial_number)}', 'keyCompromise')")
        done = m.expect(r"Deferred #\d+ called back: (revoked .*?)\n>>> ").group(1)
        assert f"revoked {format_serial(a1.serial_number)} (alice, keyCompromise" in done
        assert f"CRL {crl_before + 1} published: 1 entry" in done
        # the next CRL fetched over HTTPS lists it, with its reason; openssl agrees
        status, _, der = get(app, "/crl")
        text = openssl("crl", "-inform", "DER", "-noout", "-text", input=der).stdout.decode()
        assert f"Serial Number: {format_serial(a1.serial_number)}" in text and "Key Compromise" in text
        assert format_serial(a2.serial_number) not in text
        m.run("revoke('bob', reason='cessationOfOperation')")
        assert format_serial(b1.serial_number) in m.expect(r"called back: (revoked .*?)\n>>> ").group(1)
        assert "nothing revoked: no user and no serial 'nobody'" in m.run("revoke('nobody')")
        assert len(crl_of(app)) == 2
        # the same numbers in stats() and at /metrics
        report = m.run("stats()")
        assert re.search(r"issued\s+3 \(default 3\)", report) and re.search(r"auth failures\s+1", report), report
        status, headers, body = http(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = body.decode()
        assert metric(body, "getcertd_enrollments_total", result="issued", profile="default", fail_info="") == 3
        assert metric(body, "getcertd_authentications_total", backend="local", result="reject") == 1
        assert metric(body, "getcertd_crl_entries") == 2 and metric(body, "getcertd_issuance_log_records") == 3
        assert metric(body, "getcertd_http_request_duration_seconds_count", endpoint="scep") >= 4
        assert "RADIUS" in m.run("radius") or "no RADIUS" in m.run("radius")
        # bob, held back by someone's guesses (7 failures in all, in any spelling: 4 s to wait after the last),
        # is let in again by the admin
        for pause in (0, 0, 0, 0, 1.1, 2.1):
            time.sleep(pause)
            status = http(app.url + "?operation=PKIOperation", data=Requester(certs).message(), cafile=app.ca_pem,
                          headers=basic("BOB" if pause else "bob", "wrong"))[0]
            assert status == 401, status
        assert http(app.url + "?operation=PKIOperation", data=Requester(certs).message(), cafile=app.ca_pem,
                    headers=basic("bob", "bob pass"))[0] == 429
        assert re.fullmatch(r"user 'bob' must wait [234] s\s*", m.run("throttled")), m.run("throttled")
        assert m.run("throttled.clear('Bob')").strip() == "'Bob': failures of the user name forgotten"
        assert m.run("throttled").strip() == "no user name or address must wait"
        assert m.run("throttled.clear('127.0.0.1')").strip() == "'127.0.0.1': failures of the address forgotten"
        assert m.run("throttled.clear('carol')").strip() == "'carol': no failed logins on record"
        enroll(app, certs, "bob", "bob pass")
        assert "manhole_authorized_keys" in m.run("config") and ">>> " not in m.run("help")
        m.run("mine = 42")
    finally:
        m.close()
    m = ManholeSession(port, admin_key)  # each session has its own variables
    try:
        assert m.run("'mine' in dir(), 'log' in dir()").strip() == "(False, True)"
    finally:
        m.close()
    assert "logged in with key SHA256:" in app.log() and "Traceback" not in app.log()
    # the host key stays across a restart
    before = open(host_key, "rb").read()
    app.stop()
    app.start()
    assert open(host_key, "rb").read() == before


def test_manhole_off_without_authorized_keys_and_remote_listen_refused(appliance_factory, tmp_path):
    port = free_port()
    app = appliance_factory(sections={"manhole": {"listen": f"tcp:{port}:interface=127.0.0.1"}})
    assert "ConchFactory" not in app.log() and not os.path.exists(os.path.join(app.state_dir, "ssh_host_ed25519_key"))
    app.stop()
    with open(app.config_path, "a") as f:
        f.write(f"[metrics]\nlisten = tcp:{free_port()}\n")
    p = subprocess.run([tool("twistd"), "-n", "--pidfile", "", "getcertd", "--config", app.config_path],
                       capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "[metrics] listen: 'tcp:" in out and "allow_remote = yes" in out, out


# -- durability: restart, SIGKILL ------------------------------------------------------------------------

@needs_ssh
def test_restart_keeps_records_revocations_and_the_crl_number(appliance_factory, keys):
    admin_key, _, authorized = keys
    port = free_port()
    app = appliance_factory(users={"alice": "alice pass"}, sections=manhole_sections(authorized, port))
    certs = get_ca_certs(app.url, app.ca_pem)
    issued = [enroll(app, certs) for _ in range(3)]
    m = ManholeSession(port, admin_key)
    m.run(f"revoke({issued[0].serial_number:#x}, 'superseded')")
    m.expect(r"called back: revoked")
    m.close()
    before = crl_of(app)
    number = before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert [e.serial_number for e in before] == [issued[0].serial_number]
    assert app.stop() == 0
    t0 = time.monotonic()
    app.start()
    print(f"\nrestart: listening again after {time.monotonic() - t0:.2f} s")
    assert "issuance log: 4 records replayed" in app.log()  # three issues and one revocation
    for name in ("RA", "TLS"):  # issued at the first start, said so, and kept at the restart
        assert app.log().count(f"issued a new {name} certificate, valid until ") == 1
    assert "(none was in state_dir)" in app.log()
    after = crl_of(app)
    assert after.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    [entry] = list(after)
    assert entry.serial_number == issued[0].serial_number
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.superseded
    # the records are back: a retry by transactionID, GetCert, and the per-user count all see them
    m = ManholeSession(port, admin_key)
    table = m.run("log.recent(10)")
    m.close()
    for cert in issued:
        assert format_serial(cert.serial_number) in table
    assert "revoked" in table.splitlines()[3] and "superseded" in table
    r = Requester(certs)
    reply = http(app.url + "?operation=PKIOperation", cafile=app.ca_pem, data=scep.build_get_cert(
        ca_of(app).subject, issued[1].serial_number, recipient_cert=r.recipient, signer_key=r.key,
        signer_cert=r.signer, transaction_id="t", sender_nonce=scep.new_nonce()))[2]
    rep = scep.parse_signed(reply)
    assert rep.pki_status == scep.PkiStatus.SUCCESS
    got, _ = scep.parse_degenerate(scep.decrypt_envelope(rep.content, r.key, r.signer)[0])
    assert got == [issued[1]]


def test_restart_from_a_checkpoint_then_after_an_offline_revocation_and_a_crash(appliance_factory):
    """[log] checkpoint_records: a clean stop writes the log to journal.checkpoint; the next start reads it and
    replays only the journal lines after it, and a crash (no new checkpoint) still loses nothing."""
    app = appliance_factory(users={"alice": "alice pass"}, sections={"log": {"checkpoint_records": "2"}})
    certs = get_ca_certs(app.url, app.ca_pem)
    issued = [enroll(app, certs) for _ in range(3)]
    assert app.stop() == 0
    checkpoint = os.path.join(app.state_dir, "journal.checkpoint")
    assert oct(os.stat(checkpoint).st_mode & 0o777) == "0o600"
    assert "journal " in app.log() and "checkpoint of 3 records written" in app.log()
    # offline, while it is stopped: a revocation appended after the checkpoint line
    p = admin("--state-dir", app.state_dir, "revoke", format_serial(issued[0].serial_number), "--reason",
              "superseded")
    assert p.returncode == 0, p.stderr
    app.start()
    assert "3 records read from the checkpoint" in app.log()
    assert "issuance log: 4 records replayed" in app.log()  # 3 from the checkpoint, then the revocation
    [entry] = list(crl_of(app))
    assert entry.serial_number == issued[0].serial_number
    later = enroll(app, certs)
    assert app.stop(signal.SIGKILL) == -signal.SIGKILL  # no checkpoint at this stop
    app.start()
    assert app.log().count("3 records read from the checkpoint") == 2
    assert app.log().count("issuance log: 5 records replayed") == 1  # the revocation and the later issue
    listed = admin("--state-dir", app.state_dir, "list").stdout
    for cert in issued + [later]:
        assert format_serial(cert.serial_number) in listed
    # the certificates of the checkpoint are read back from the journal by their offsets
    r = Requester(certs)
    for cert in (issued[2], later):
        reply = http(app.url + "?operation=PKIOperation", cafile=app.ca_pem, data=scep.build_get_cert(
            ca_of(app).subject, cert.serial_number, recipient_cert=r.recipient, signer_key=r.key,
            signer_cert=r.signer, transaction_id="t", sender_nonce=scep.new_nonce()))[2]
        rep = scep.parse_signed(reply)
        assert rep.pki_status == scep.PkiStatus.SUCCESS
        assert scep.parse_degenerate(scep.decrypt_envelope(rep.content, r.key, r.signer)[0])[0] == [cert]


def test_sigkill_during_a_burst_loses_no_certificate_a_client_received(appliance_factory):
    app = appliance_factory(users={"alice": "alice pass"},
                            sections={"policy": {"max_valid_per_user": "0", "max_per_user_per_hour": "0"}})
    certs = get_ca_certs(app.url, app.ca_pem)
    per_thread, threads_n = 6, 8
    requesters = [[Requester(certs) for _ in range(per_thread)] for _ in range(threads_n)]
    messages = [[r.message() for r in rs] for rs in requesters]
    received, errors = [], []
    lock = threading.Lock()
    enough = threading.Event()

    def run(t):
        for r, message in zip(requesters[t], messages[t]):
            try:
                status, _, body = http(app.url + "?operation=PKIOperation", data=message, cafile=app.ca_pem,
                                       headers=basic("alice", "alice pass"))
            except OSError as e:  # the process is gone
                errors.append(str(e))
                return
            if status != 200:
                errors.append(status)
                return
            rep, issued = r.open_reply(body)
            assert rep.pki_status == scep.PkiStatus.SUCCESS
            with lock:
                received.append(issued[0].serial_number)
                if len(received) >= 12:
                    enough.set()
    threads = [threading.Thread(target=run, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    assert enough.wait(120)
    helpers = children(app.proc.pid)
    app.stop(signal.SIGKILL)
    for t in threads:
        t.join(60)
    deadline = time.monotonic() + 10  # its key helpers see the end of their input and end too: no orphans
    while any(running(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert helpers and not any(running(p) for p in helpers)
    assert len(received) < per_thread * threads_n, "the burst was over before the kill"
    # getcertd-admin on the stopped appliance's state dir: the kill left the lock free
    p = admin("--state-dir", app.state_dir, "list")
    assert p.returncode == 0, p.stderr
    listed = {line.split("\t")[0] for line in p.stdout.splitlines()}
    missing = {format_serial(s) for s in received} - listed
    assert not missing, f"certificates a client received but the journal lost: {missing}"
    print(f"\nSIGKILL: {len(received)} certificates received, {len(listed)} in the journal "
          f"(issued but never received: {len(listed) - len(received)})")
    app.start()  # and it starts again on that journal
    assert f"issuance log: {len(listed)} records replayed" in app.log()


# -- getcertd-admin --------------------------------------------------------------------------------------

def test_getcertd_admin_list_revoke_crl(appliance_factory, tmp_path):
    app = appliance_factory(users={"alice": "alice pass", "bob": "bob pass"}, http=True)
    alice = [app.getcert("alice", ["alice pass"], tmp_path / f"a{i}") for i in range(2)]
    assert all(p.returncode == 0 for p in alice), [p.stderr for p in alice]
    assert app.getcert("bob", ["bob pass"], tmp_path / "b").returncode == 0
    serials = {}
    for name in ("a0", "a1", "b"):
        out = openssl("x509", "-in", str(tmp_path / name / "cert.pem"), "-serial", "-noout").stdout.decode()
        serials[name] = out.strip().split("=")[1]
    # list reads a running appliance's journal (and says so); revoke and crl refuse while it runs
    p = admin("--state-dir", app.state_dir, "list")
    assert p.returncode == 0 and "the appliance is running" in p.stderr
    rows = [line.split("\t") for line in p.stdout.splitlines()]
    assert [row[0] for row in rows] == [serials["a0"], serials["a1"], serials["b"]]
    assert [row[1:4] for row in rows] == [["valid", "alice", "default"]] * 2 + [["valid", "bob", "default"]]
    assert rows[0][-1] == "CN=alice,OU=remote-access,O=getcertd"
    for args in (["revoke", serials["a0"]], ["crl"]):
        p = admin("--state-dir", app.state_dir, *args)
        assert p.returncode == 2, p.stderr
        assert re.search(r"in use by the appliance \(pid \d+\).*stop the appliance first", p.stderr), p.stderr
    number = crl_of(app).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert app.stop() == 0
    # stopped: revoke by serial (as openssl printed it) and by user
    p = admin("--state-dir", app.state_dir, "revoke", serials["a0"].lower(), "--reason", "keyCompromise")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\t")[:2] == [serials["a0"], "revoked"] and "/keyCompromise" in p.stdout
    p = admin("--state-dir", app.state_dir, "revoke", serials["a0"], "--reason", "superseded")  # again: said so
    assert p.returncode == 1 and f"serial {serials['a0']} was already revoked at " in p.stderr, p.stderr
    assert "(keyCompromise)" in p.stderr and not p.stdout
    p = admin("--config", app.config_path, "revoke", "--user", "bob", "--reason", "4")
    assert p.returncode == 0 and p.stdout.startswith(serials["b"]) and "/superseded" in p.stdout, p.stderr
    assert admin("--state-dir", app.state_dir, "revoke", "--user", "bob").returncode == 1
    p = admin("--state-dir", app.state_dir, "revoke", "00FF")
    assert p.returncode == 1 and "no certificate with serial FF in the issuance log" in p.stderr
    p = admin("--state-dir", app.state_dir, "revoke", serials["a1"], "--reason", "whatever")
    assert p.returncode == 2 and "unknown revocation reason" in p.stderr
    p = admin("--state-dir", app.state_dir, "list", "--user", "alice")
    assert [line.split("\t")[1] for line in p.stdout.splitlines()] == ["revoked", "valid"]
    # crl: a fresh CRL with the next number, signed by the CA
    out = tmp_path / "fresh.crl"
    p = admin("--state-dir", app.state_dir, "crl", "--der", "--out", str(out))
    assert p.returncode == 0 and re.match(rf"CRL {number + 1}: 2 entries", p.stderr), p.stderr
    v = openssl("crl", "-inform", "DER", "-in", str(out), "-CAfile", app.ca_pem, "-verify", "-noout", "-text")
    assert v.returncode == 0 and serials["a0"] in v.stdout.decode() and serials["b"] in v.stdout.decode()
    p = subprocess.run([tool("getcertd-admin"), "--config", app.config_path, "crl"], capture_output=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith(b"-----BEGIN X509 CRL-----")
    # bad places and inputs: one line each, no traceback, no CRL number spent, no stray file
    latin1 = tmp_path / "latin1.ini"
    latin1.write_bytes(b"[getcertd]\nstate_dir = /tmp/caf\xe9\n")
    for args in (["--state-dir", app.state_dir, "crl", "--out", str(tmp_path / "nodir" / "x.crl")],
                 ["--state-dir", app.state_dir, "crl", "--out", str(tmp_path)],
                 ["--config", str(latin1), "list"], ["--state-dir", "", "list"]):
        p = admin(*args)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (args, p.stderr)
    assert not os.path.exists(str(tmp_path) + ".tmp")
    # the appliance starts on it: the CRL it serves lists both, with a number past getcertd-admin's
    app.start()
    crl = crl_of(app)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 3
    assert sorted(format_serial(e.serial_number) for e in crl) == sorted([serials["a0"], serials["b"]])


def test_a_second_appliance_on_the_same_state_dir_is_refused(appliance_factory):
    app = appliance_factory()
    p = subprocess.run([tool("twistd"), "-n", "--pidfile", "", "getcertd", "--config", app.config_path],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and f"is in use by the appliance (pid {app.proc.pid})" in p.stderr, p.stderr


# -- the landing page, in a real browser ----------------------------------------------------------------

@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/test installs it)")
def test_landing_page_in_headless_chromium(appliance_factory, tmp_path):
    app = appliance_factory()
    ca = ca_of(app)
    tls = x509.load_pem_x509_certificate(open(os.path.join(app.state_dir, "tls.pem"), "rb").read())
    spki = tls.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    # Chromium can't be told to trust our CA without an NSS database; instead it trusts exactly this server's
    # TLS key (an SPKI pin; the flag needs --user-data-dir). Loopback only, and only in this test.
    t0 = time.monotonic()
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'chromium'}", f"--ignore-certificate-errors-spki-list={pin}",
                        "--dump-dom", f"https://localhost:{app.port}/"],
                       capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    dom = p.stdout
    # the server asks every TLS client for a certificate (EST); Chromium has none and must go on without
    assert elapsed < 60, "chromium hung"
    m = re.search(r'<code id="ca-fingerprint">([0-9A-F:]+)</code>', dom)
    assert m, (p.returncode, dom[:500], p.stderr[-2000:])
    assert m.group(1).replace(":", "").lower() == ca.fingerprint(hashes.SHA256()).hex()
    assert f'<code id="ca-subject">{ca.subject.rfc4514_string()}</code>' in dom
    for link in ("/ca.crt", "/ca.pem", "/crl", "/crl.pem"):
        assert f'href="{link}"' in dom
    next_update = re.search(r'<time id="crl-next-update">([^<]+)</time>', dom).group(1)
    assert next_update == crl_of(app).next_update_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert "<script" not in dom


# -- an imported CA ([ca] certificate and key) -------------------------------------------------------------

def _imported_ca(tmp_path, name, *, ca=True, constraints=True, ski=True, cert_sign=True, crl_sign=True,
                 starts=datetime.timedelta(minutes=-5)):
    """A CA made elsewhere, written as [ca] certificate and key files; the keyword arguments take parts out."""
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name.from_rfc4514_string(f"CN=Imported {name} CA,O=Example")
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now + starts)
         .not_valid_after(now + datetime.timedelta(days=30)))
    if constraints:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if ski:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                                      crl_sign=crl_sign, encipher_only=False, decipher_only=False), critical=True)
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    os.close(fd)
    return {"ca": {"certificate": str(cert_path), "key": str(key_path)}}


def test_an_imported_ca_without_subject_key_identifier_issues_what_openssl_accepts(appliance_factory, tmp_path):
    """A CA made by another tool may lack the SKI that issued certificates' AKI usually copies: RFC 5280's SHA-1
    of its key then; the certificate and the CRL verify (not in OpenSSL's strict mode, which wants the CA's SKI:
    a warning at start says so)."""
    sections = _imported_ca(tmp_path, "noski", ski=False)
    ca_pem = sections["ca"]["certificate"]
    app = appliance_factory(users={"alice": "alice pass"}, sections=sections)
    ca = x509.load_pem_x509_certificate(open(ca_pem, "rb").read())
    p = app.getcert("alice", ["alice pass"], tmp_path / "out", cafile=ca_pem)
    assert p.returncode == 0, p.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "cert.pem").read_bytes())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest
    (tmp_path / "crl.der").write_bytes(http(f"https://localhost:{app.port}/crl", cafile=ca_pem)[2])
    openssl("crl", "-inform", "DER", "-in", str(tmp_path / "crl.der"), "-out", str(tmp_path / "crl.pem"))
    v = openssl("verify", "-crl_check", "-CAfile", ca_pem, "-CRLfile", str(tmp_path / "crl.pem"),
                str(tmp_path / "out" / "cert.pem"))
    assert v.returncode == 0, v.stdout + v.stderr
    assert "it has no subjectKeyIdentifier: strict validators" in app.log()
    assert "Traceback" not in app.log()


@pytest.mark.parametrize("what, parts", [
    ("it is not a CA certificate (basicConstraints CA:FALSE)", {"ca": False}),
    ("it has no basicConstraints CA:TRUE", {"constraints": False}),
    ("its keyUsage lacks keyCertSign", {"cert_sign": False}),
])
def test_an_imported_certificate_that_cannot_be_a_ca_is_refused_at_start(appliance_factory, tmp_path, what, parts):
    with pytest.raises(RuntimeError) as caught:
        appliance_factory(sections=_imported_ca(tmp_path, "bad", **parts))
    assert f"[ca] certificate {tmp_path / 'bad.pem'}: {what}" in str(caught.value)
    assert "Traceback" not in str(caught.value)


def test_an_imported_ca_that_cannot_sign_crls_is_named_at_start(appliance_factory, tmp_path):
    sections = _imported_ca(tmp_path, "nocrl", crl_sign=False)
    app = appliance_factory(users={"alice": "alice pass"}, sections=sections)
    assert "its keyUsage lacks cRLSign: validators that check it (strongSwan, OpenSSL) will refuse" in app.log()
    p = app.getcert("alice", ["alice pass"], tmp_path / "out", cafile=sections["ca"]["certificate"])
    assert p.returncode == 0, p.stderr


def test_an_imported_ca_not_valid_yet_is_named_at_start_and_refuses_with_bad_time(appliance_factory, tmp_path):
    """A CA whose notBefore is ahead of this server's clock (a clock behind, or a CA made elsewhere a moment
    ago): its certificates would not validate before then, so none are issued before then."""
    sections = _imported_ca(tmp_path, "early", starts=datetime.timedelta(minutes=10))
    app = appliance_factory(users={"alice": "alice pass"}, sections=sections, http=True)
    assert "the CA certificate is not valid before" in app.log()
    ca = x509.load_pem_x509_certificate(open(sections["ca"]["certificate"], "rb").read())
    r = Requester(get_ca_certs(app.http_url, None))  # plain HTTP: the TLS certificate is no more valid than its CA
    status, _, body = http(app.http_url + "?operation=PKIOperation", data=r.message(challenge="alice pass", cn="alice"))
    rep, _ = r.open_reply(body)
    assert rep.pki_status == scep.PkiStatus.FAILURE and rep.fail_info == scep.FailInfo.badTime, rep
    assert f"not valid before {ca.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC" in rep.fail_info_text


def test_sighup_is_logged_and_ignored(appliance_factory):
    """SIGHUP killed twistd, and systemd's Restart=on-failure counts that as a clean end: the appliance stayed
    down after a 'kill -HUP' meant as a reload."""
    app = appliance_factory()
    app.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "SIGHUP ignored" not in app.log() and time.monotonic() < deadline and app.proc.poll() is None:
        time.sleep(0.1)
    assert app.proc.poll() is None, app.log()[-2000:]
    assert "SIGHUP ignored: getcertd reads its configuration only at start" in app.log()
    assert http(app.url + "?operation=GetCACaps", cafile=app.ca_pem)[0] == 200
    app.stop()
    assert app.proc.returncode == 0


def _open_files_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    return [int(v) for v in line.split()[3:5]]


def test_the_open_files_limit_is_raised_for_max_connections_or_named(appliance_factory):
    """Started from a shell with the usual soft limit of 1024 open files, the 1000 connections of
    max_connections plus the helpers' pipes and the journal did not fit: accept() and key helper starts failed
    with EMFILE. The soft limit is raised to what max_connections needs; past the hard limit it is named."""
    app = appliance_factory(start=False, sections={"https": {"max_connections": "1000"}})
    app.start(wrapper=["prlimit", "--nofile=256:4096", "--"])
    assert _open_files_limit(app.proc.pid) == [1256, 4096]
    assert "open files are limited" not in app.log()
    app.stop()
    app.start(wrapper=["prlimit", "--nofile=256:512", "--"])
    assert _open_files_limit(app.proc.pid) == [512, 512]
    assert "open files are limited to 512, fewer than [https] max_connections needs (1256)" in app.log()
    assert http(app.url + "?operation=GetCACaps", cafile=app.ca_pem)[0] == 200


def test_configuration_mistakes_found_at_start_are_one_line_not_a_traceback(appliance_factory):
    """A port already taken, a subject template with a stray brace, a CA subject twistd couldn't build: each was a
    traceback from twistd (or, for the template, a failure at every enrollment). Each is now one line naming
    the key, and exit status 1."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cases = [({"https": {"listen": f"tcp:{port}:interface=127.0.0.1"}},
              f"getcertd: [https] listen: can't listen on 127.0.0.1:{port}: Address already in use"),
             ({"policy": {"subject": "CN={user"}},
              "getcertd: [policy] subject: a { or } outside a placeholder in subject template 'CN={user'"),
             ({"ca": {"subject": "CN=getcertd CA, O="}}, "[ca] subject: 'CN=getcertd CA, O='"),
             # SCEP clients encrypt to the CA's key without an RA: an EC CA would fail every PKIOperation
             ({"ca": {"key_type": "ec-p256", "ra": "no"}},
              "getcertd: [ca] ra = no needs an RSA CA key (SCEP clients encrypt requests to it with RSA); this CA's "
              "key is ec-p256: set ra = yes")]
    try:
        for sections, line in cases:
            app = appliance_factory(sections=sections, start=False)
            p = subprocess.run([tool("twistd"), "-n", "--pidfile", "", "getcertd", "--config", app.config_path],
                               capture_output=True, text=True, timeout=60)
            out = p.stdout + p.stderr
            assert p.returncode == 1 and line in out and "Traceback" not in out, out[-3000:]
    finally:
        taken.close()


def test_manhole_connections_are_capped_and_must_log_in_in_time(appliance_factory, keys):
    """conch waits forever for an SSH connection that never exchanges keys, and 10 hours for one that never
    logs in, with no cap on connections. Past 10 open the manhole refuses; one that has not logged in within
    login_timeout is closed (that part on a deterministic clock below)."""
    from getcertd import manhole
    _, _, authorized = keys
    port = free_port()
    app = appliance_factory(sections=manhole_sections(authorized, port))
    idle = [socket.create_connection(("127.0.0.1", port), 5) for _ in range(manhole._Factory.max_connections)]
    for s in idle:
        assert s.recv(100).startswith(b"SSH-2.0-")  # each got the server's version line
    extra = socket.create_connection(("127.0.0.1", port), 5)
    extra.settimeout(5)
    assert extra.recv(100) == b""  # closed at once
    deadline = time.monotonic() + 5
    while "manhole: refused a connection: 10 already open" not in app.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "manhole: refused a connection: 10 already open" in app.log()
    for s in idle:
        s.close()

    clock = Clock()
    f = manhole.factory({}, str(authorized), ec.generate_private_key(ec.SECP256R1()), clock)
    f.doStart()
    p = f.buildProtocol(None)
    tr = StringTransport()
    p.makeConnection(tr)
    clock.advance(f.login_timeout - 1)
    assert not tr.disconnecting
    clock.advance(1)
    assert tr.disconnecting
    p.connectionLost(None)
    assert f.open == 0 and not clock.getDelayedCalls()
    f.doStop()
