"""EST (RFC 7030) beside SCEP: a real `twistd getcertd`, enrolled by strongSwan's `pki --est`, by `getcert enroll
--protocol est`, and by raw requests that test channel binding, client certificates and the error answers.

A missing client fails (never skips). strongSwan's EST client uses its own TLS stack, which trusts --cacert (no
system bundle involved). Each real-client test records a row of the interoperability table (tests/peers.py).
"""
import base64
import datetime
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from appliance import Appliance
from estclient import EST, EstConnection, basic, certs_of, csr_b64
from freeradius import running_freeradius
from getcertd import est
from getcertd.auth import Identity
from getcertd.config import ProfileConfig
from getcertd.errors import ScepFailure
from getcertd.issuance import IssuanceLog
from getcertd.journal import replay
from getcertd.operations import format_serial
from getcertd.policy import Policy, check_public_key
from peers import Pki, interop_row
from scepclient import http

PASSWORD = "alice pass"
SUBJECT = "CN=alice,OU=remote-access,O=getcertd"
PROFILES = {
    "policy": {"max_valid_per_user": "0", "profile_map": "vip=restricted"},
    "profile short": {"lifetime": "30m", "subject": "CN={user}, OU=short, O=getcertd"},
    "profile restricted": {"lifetime": "1h", "subject": "CN={user}, OU=vip, O=getcertd"},
}


def openssl(*args, input=None):
    return subprocess.run(["openssl", *args], input=input, capture_output=True)


def record_of(app, cert):
    """The issuance-log record of ``cert``, read back from the appliance's journal."""
    log = IssuanceLog()
    replay(os.path.join(app.state_dir, "journal"), log)
    record = log.get(cert.serial_number)
    assert record is not None, f"serial {cert.serial_number:x} is not in the journal"
    return record


def pem_cert(path):
    return x509.load_pem_x509_certificate(open(path, "rb").read())


def one_line(body: bytes) -> str:
    text = body.decode("utf-8")
    assert text.endswith("\n") and text.count("\n") == 1 and "Traceback" not in text, text
    return text.strip()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """Local accounts, renewal by client certificate allowed, two extra profiles, and a plain-HTTP listener."""
    sections = {**PROFILES, "scep": {"renewal_without_auth": "yes"}}
    a = Appliance(tmp_path_factory.mktemp("est"), sections, {"alice": PASSWORD, "bob": "bob-pass"}, http=True)
    a.start()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def radius_server():
    with running_freeradius() as srv:
        yield srv


def est_url(app, label=""):
    return f"https://localhost:{app.port}{EST}" + (f"/{label}" if label else "")


def radius_app(appliance_factory, srv, servers=None):
    secret_file = srv.secret_file()
    return appliance_factory(sections={
        "auth": {"backend": "radius", "users": ""},
        "radius": {"servers": servers or f"{srv.host}:{srv.port}", "secret_file": secret_file, "timeout": "1s",
                   "retries": "1"},
        "policy": {"profile_map": "ikev2-short=short"},
        "profile short": {"lifetime": "30m", "subject": "CN={user}, OU=short, O=getcertd"},
    }, users={})


# --- codec ------------------------------------------------------------------------------------------------------

def test_csrattrs_names_what_the_policy_accepts():
    der = est.csr_attributes()
    attrs = dict(est.parse_csr_attributes(der))
    assert set(attrs) == {est.OID_RSA, est.OID_EC, est.OID_ED25519}
    assert sorted(attrs[est.OID_EC]) == sorted(est.CURVES.values())
    assert "1.2.840.113549.1.9.7" not in attrs  # challengePassword is not asked for
    for key in (rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1()),
                ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate()):
        check_public_key(key.public_key())  # listed, so accepted
    with pytest.raises(ScepFailure):
        check_public_key(ec.generate_private_key(ec.SECP521R1()).public_key())  # not listed, so refused


def test_body_codec_tolerates_line_breaks():
    der = est.csr_attributes()
    assert est.decode_body(base64.encodebytes(der)) == der
    assert est.decode_body(base64.b64encode(der).rstrip(b"=") + b"\r\n") == der
    assert b"\n" not in est.encode_body(der * 20)
    assert est.decode_body(der) == der  # plain DER is taken as it is


def test_label_never_lifts_a_user_out_of_the_mapped_profile():
    profiles = {n: ProfileConfig(n, 3600, f"CN={{user}}, OU={n}", "", ("clientAuth",))
                for n in ("default", "short", "restricted")}
    policy = Policy(profiles=profiles, profile_map={"vip": "restricted", "ikev2-short": "short"})
    plain, vip = Identity("u", "local"), Identity("v", "radius-pap", profile_hints=("vip",))
    assert policy.choose_profile(plain, "default") == "default"
    assert policy.choose_profile(vip, "restricted") == "restricted"
    for identity, label in ((plain, "restricted"), (plain, "short"), (vip, "default"), (vip, "short")):
        with pytest.raises(ScepFailure, match="not granted"):
            policy.choose_profile(identity, label)
    with pytest.raises(ScepFailure, match="not granted"):  # a renewal keeps its profile
        policy.choose_profile(plain, "default", granted="short")


# --- the HTTP surface -------------------------------------------------------------------------------------------

def test_cacerts_csrattrs_and_unsupported_operations(app):
    status, headers, body = http(est_url(app) + "/cacerts", cafile=app.ca_pem)
    assert status == 200 and headers["Content-Type"] == "application/pkcs7-mime"
    assert headers["Content-Transfer-Encoding"] == "base64"
    p = openssl("pkcs7", "-inform", "DER", "-print_certs", input=base64.b64decode(body))
    assert p.returncode == 0 and p.stdout.count(b"BEGIN CERTIFICATE") == 1, p.stderr
    printed = x509.load_pem_x509_certificates(p.stdout)
    assert printed[0].public_bytes(serialization.Encoding.PEM) == open(app.ca_pem, "rb").read()
    assert http(est_url(app, "short") + "/cacerts", cafile=app.ca_pem)[2] == body  # a label is the same CA

    status, headers, body = http(est_url(app) + "/csrattrs", cafile=app.ca_pem)
    assert status == 200 and headers["Content-Type"] == "application/csrattrs"
    der = base64.b64decode(body)
    assert openssl("asn1parse", "-inform", "DER", input=der).returncode == 0
    assert der == est.csr_attributes()

    for path, method, code in (("/serverkeygen", "POST", 501), ("/fullcmc", "POST", 501),
                               ("/simpleenroll", "GET", 405), ("/cacerts", "POST", 405), ("/nosuch", "GET", 404),
                               ("/nolabel/cacerts", "GET", 404), ("/nolabel/simpleenroll", "POST", 404),
                               ("/short/nosuch", "GET", 404), ("/", "GET", 404)):
        status, _, body = http(est_url(app) + path, data=b"x" if method == "POST" else None, method=method,
                               cafile=app.ca_pem)
        assert status == code, (path, status, body)
    status, _, _ = http(f"http://127.0.0.1:{app.http_port}{EST}/cacerts")
    assert status == 404  # EST is offered over TLS only


def test_errors_are_one_line_answers(app):
    conn = EstConnection(app.port, app.ca_pem)
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        status, headers, body = conn.request("POST", EST + "/simpleenroll", csr_b64(key),
                                             {"Content-Type": "application/pkcs10"})
        assert status == 401 and headers["www-authenticate"].startswith("Basic realm=")
        status, headers, body = conn.request("POST", EST + "/simpleenroll", csr_b64(key), basic("alice", "wrong"))
        assert status == 401 and headers["www-authenticate"].startswith("Basic") and one_line(body)
        status, _, body = conn.request("POST", EST + "/simpleenroll", b"not base64 at all!", basic("alice", PASSWORD))
        assert status == 400 and one_line(body).startswith("bad request:")
        bad_pop = bytearray(base64.b64decode(csr_b64(rsa.generate_private_key(65537, 2048))))
        bad_pop[-5] ^= 1  # the signature: proof of possession fails
        status, _, body = conn.request("POST", EST + "/simpleenroll", base64.b64encode(bad_pop),
                                       basic("alice", PASSWORD))
        assert status == 400 and "proof of possession" in one_line(body)
        status, _, body = conn.request("POST", EST + "/simpleenroll", csr_b64(rsa.generate_private_key(65537, 1024)),
                                       basic("alice", PASSWORD))
        assert status == 400 and one_line(body) == "refused: RSA keys must be at least 2048 bits, this one has 1024"
        status, _, body = conn.request("POST", EST + "/simpleenroll", csr_b64(key),
                                       {**basic("alice", PASSWORD), "Content-Type": "application/json"})
        assert status == 415 and one_line(body)
    finally:
        conn.close()
    assert "Traceback" not in app.log() and PASSWORD not in app.log()


@pytest.mark.parametrize("tls13", [False, True], ids=["tls1.2-tls-unique", "tls1.3-exporter"])
def test_channel_binding(app, tls13):
    """RFC 7030 3.5: a challengePassword holding the session's binding passes; another session's, or junk, is a 400."""
    first = EstConnection(app.port, app.ca_pem, tls13=tls13)
    other = EstConnection(app.port, app.ca_pem, tls13=tls13)
    try:
        assert first.version == ("TLSv1.3" if tls13 else "TLSv1.2")
        headers = {**basic("alice", PASSWORD), "Content-Type": "application/pkcs10"}
        key = ec.generate_private_key(ec.SECP256R1())
        status, reply_headers, body = first.request(
            "POST", EST + "/simpleenroll", csr_b64(key, base64.b64encode(first.binding()).decode()), headers)
        assert status == 200, body
        assert reply_headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
        cert = certs_of(body)[0]
        assert cert.subject.rfc4514_string() == SUBJECT
        assert "the CSR was bound to its TLS session" in app.log()
        # the same CSR relayed over another TLS session: refused
        status, _, body = other.request(
            "POST", EST + "/simpleenroll", csr_b64(key, base64.b64encode(first.binding()).decode()), headers)
        assert status == 400 and "channel binding" in one_line(body)
        status, _, body = first.request("POST", EST + "/simpleenroll", csr_b64(key, "not-a-binding"), headers)
        assert status == 400 and "channel binding" in one_line(body)
    finally:
        first.close()
        other.close()


# --- real clients -----------------------------------------------------------------------------------------------

def pki_suite(stderr: str) -> str:
    m = re.search(r"negotiated (TLS [\d.]+) using suite (\S+)", stderr)
    return f"{m.group(1)} {m.group(2)}" if m else ""


def pki_est(pki, app, tmp_path, name, *auth):
    """`pki --req` then `pki --est` (over HTTPS, trusting --cacert): the certificate file and pki's stderr.

    pki appends /.well-known/est/OPERATION to the URL's path, so it is given the bare server URL (and can't
    address a CA label).
    """
    key = pki.gen_rsa(tmp_path / f"{name}.der")
    req = tmp_path / f"{name}.req"
    p = subprocess.run([pki.path, "--req", "--in", key, "--dn", "CN=something else", "--outform", "der"],
                       capture_output=True, env={**os.environ, "STRONGSWAN_CONF": pki.conf}, timeout=30)
    assert p.returncode == 0, p.stderr
    req.write_bytes(p.stdout)
    p = pki.run("--est", "--url", f"https://localhost:{app.port}", "--in", str(req), "--cacert", app.ca_pem, *auth, "--outform", "pem")
    assert p.returncode == 0, p.stdout + p.stderr + app.log()[-2000:]
    out = tmp_path / f"{name}.pem"
    out.write_text(p.stdout)
    v = openssl("verify", "-CAfile", app.ca_pem, str(out))
    assert v.returncode == 0, v.stdout + v.stderr
    return str(out), key, p.stderr


def test_strongswan_pki_estca_est_and_reenroll(app, pki, tmp_path):
    with interop_row("strongSwan pki --estca", pki.describe(), "HTTPS", "none (cacerts)") as row:
        caout = tmp_path / "estca.pem"
        p = pki.run("--estca", "--url", f"https://localhost:{app.port}", "--cacert", app.ca_pem, "--caout",
                    str(caout), "--outform", "pem")
        assert p.returncode == 0, p.stdout + p.stderr
        row["cipher/digest"] = pki_suite(p.stderr)
        assert "Root CA cert is trusted" in p.stderr
        assert caout.read_bytes() == open(app.ca_pem, "rb").read()

    with interop_row("strongSwan pki --est", pki.describe(), "HTTPS", "HTTP Basic, local account") as row:
        cert_path, key, stderr = pki_est(pki, app, tmp_path, "first", "--userpass", f"alice:{PASSWORD}")
        row["cipher/digest"] = pki_suite(stderr)
        cert = pem_cert(cert_path)
        assert cert.subject.rfc4514_string() == SUBJECT  # from the policy, not the CSR
        assert f"issued serial {format_serial(cert.serial_number)} to 'alice'" in app.log()
        assert record_of(app, cert).auth_method == "local"

    with interop_row("strongSwan pki --est --cert --key (simplereenroll)", pki.describe(), "HTTPS",
                     "TLS client certificate") as row:
        # pki re-enrolls with the old certificate as its TLS client certificate, and no password
        cert_path2, _, stderr = pki_est(pki, app, tmp_path, "renewed", "--cert", cert_path, "--key", key)
        row["cipher/digest"] = pki_suite(stderr)
        assert "sending TLS client certificate" in stderr
        renewed = pem_cert(cert_path2)
        assert renewed.subject == cert.subject and renewed.serial_number != cert.serial_number
        record = record_of(app, renewed)
        assert record.auth_method == "tls-client-cert" and record.user == "alice"

    with interop_row("strongSwan pki --est", pki.describe(), "HTTPS", "wrong password (expect refusal)") as row:
        p = pki.run("--est", "--url", f"https://localhost:{app.port}", "--in", str(tmp_path / "first.req"),
                    "--cacert", app.ca_pem, "--userpass", "alice:wrong", "--outform", "pem")
        row["cipher/digest"] = pki_suite(p.stderr)
        assert p.returncode != 0 and "HTTP 401" in p.stderr, p.stderr
        row["result"] = "pass (refused: HTTP 401)"


def test_strongswan_pki_est_radius_pap(appliance_factory, radius_server, pki, tmp_path):
    app = radius_app(appliance_factory, radius_server)
    with interop_row("strongSwan pki --est", pki.describe(), "HTTPS", "HTTP Basic, RADIUS PAP (FreeRADIUS)") as row:
        cert_path, _, stderr = pki_est(pki, app, tmp_path, "radius", "--userpass", "alice:alice-pass")
        row["cipher/digest"] = pki_suite(stderr)
        cert = pem_cert(cert_path)
        assert cert.subject.rfc4514_string() == SUBJECT
        assert f"issued serial {format_serial(cert.serial_number)} to 'alice'" in app.log()
        assert record_of(app, cert).auth_method == "radius-pap"


def test_getcert_est(app, tmp_path):
    ca = pem_cert(app.ca_pem)
    out = tmp_path / "est"
    p = app.getcert("alice", [PASSWORD], out, "--protocol", "est", url=est_url(app), cafile=app.ca_pem)
    assert p.returncode == 0, p.stderr
    v = openssl("verify", "-CAfile", str(out / "ca.pem"), str(out / "cert.pem"))
    assert v.returncode == 0, v.stdout + v.stderr
    cert = pem_cert(out / "cert.pem")
    assert cert.subject.rfc4514_string() == SUBJECT
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert record_of(app, cert).auth_method == "local"
    # the bare server URL works too; EC key; trust by fingerprint
    fp = "sha256:" + ca.fingerprint(hashes.SHA256()).hex()
    p = app.getcert("bob", ["bob-pass"], tmp_path / "ec", "--protocol", "est", "--key-type", "ec-p256",
                    "--ca-fingerprint", fp, url=f"https://localhost:{app.port}")
    assert p.returncode == 0, p.stderr
    assert pem_cert(tmp_path / "ec" / "cert.pem").public_key().curve.name == "secp256r1"
    p = app.getcert("alice", ["wrong"], tmp_path / "bad", "--protocol", "est", url=est_url(app))
    assert p.returncode != 0 and "authentication failed" in p.stderr and not (tmp_path / "bad" / "key.pem").exists()
    p = app.getcert("alice", [PASSWORD], tmp_path / "fp", "--protocol", "est", "--ca-fingerprint",
                    "sha256:" + "00" * 32, url=est_url(app))
    assert p.returncode != 0 and "fingerprint" in p.stderr


def test_getcert_est_radius_challenge_rounds(appliance_factory, radius_server, tmp_path):
    app = radius_app(appliance_factory, radius_server)
    p = app.getcert("bob", ["bob-pass", "123456"], tmp_path / "b", "--protocol", "est", url=est_url(app))
    assert p.returncode == 0, p.stderr
    assert "Enter token code" in p.stderr
    assert record_of(app, pem_cert(tmp_path / "b" / "cert.pem")).auth_method == "radius-challenge"
    p = app.getcert("dave", ["dave-pass"], tmp_path / "d", "--protocol", "est", url=est_url(app))
    assert p.returncode == 0, p.stderr
    cert = pem_cert(tmp_path / "d" / "cert.pem")
    assert cert.subject.rfc4514_string() == "CN=dave,OU=short,O=getcertd"  # RADIUS Class -> profile short
    p = app.getcert("dave", ["dave-pass"], tmp_path / "d2", "--protocol", "est", url=est_url(app, "default"))
    assert p.returncode != 0 and "not granted" in p.stderr  # a label can't lift dave out of his profile
    p = app.getcert("bob", ["bob-pass", "999999"], tmp_path / "bad", "--protocol", "est", url=est_url(app))
    assert p.returncode != 0 and "authentication failed" in p.stderr
    assert "123456" not in app.log() and "bob-pass" not in app.log()


# --- client certificates ----------------------------------------------------------------------------------------

def reenroll_with_python_ssl(app, cert_file, key_file, operation="simplereenroll", headers=None):
    ctx = ssl.create_default_context(cafile=app.ca_pem)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    key = ec.generate_private_key(ec.SECP256R1())
    req = urllib.request.Request(f"{est_url(app)}/{operation}", data=csr_b64(key), method="POST",
                                 headers={"Content-Type": "application/pkcs10", **(headers or {})})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_client_certificate_simplereenroll(app, tmp_path):
    out = tmp_path / "scep"
    p = app.getcert("alice", [PASSWORD], out)  # SCEP, with the client certificate requested by the server
    assert p.returncode == 0, p.stderr
    old = pem_cert(out / "cert.pem")
    cert_file, key_file = str(out / "cert.pem"), str(out / "key.pem")

    status, headers, body = reenroll_with_python_ssl(app, cert_file, key_file)
    assert status == 200, body
    assert headers["Content-Type"] == "application/pkcs7-mime; smime-type=certs-only"
    new = certs_of(body)[0]
    assert new.subject == old.subject and new.serial_number != old.serial_number
    record = record_of(app, new)
    assert (record.user, record.auth_method, record.profile) == ("alice", "tls-client-cert", "default")
    # never longer than the certificate it renews
    assert new.not_valid_after_utc - new.not_valid_before_utc <= old.not_valid_after_utc - old.not_valid_before_utc

    # a client certificate authenticates simplereenroll only
    status, headers, _ = reenroll_with_python_ssl(app, cert_file, key_file, "simpleenroll")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    # and only one that this CA issued
    other_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")])
    now = datetime.datetime.now(datetime.timezone.utc)
    other = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(other_key.public_key())
             .serial_number(old.serial_number).not_valid_before(now - datetime.timedelta(minutes=1))
             .not_valid_after(now + datetime.timedelta(hours=1)).sign(other_key, hashes.SHA256()))
    (tmp_path / "other.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "other.key").write_bytes(other_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    status, _, body = reenroll_with_python_ssl(app, str(tmp_path / "other.pem"), str(tmp_path / "other.key"))
    assert status == 401 and "can't be used" in one_line(body)
    # without a client certificate, simplereenroll is password-authenticated like simpleenroll
    status, _, body = reenroll_with_python_ssl(app, None, None, headers=basic("bob", "bob-pass"))
    assert status == 200 and certs_of(body)[0].subject.rfc4514_string() == "CN=bob,OU=remote-access,O=getcertd"


def test_a_renewal_is_not_refused_for_the_certificate_it_replaces(appliance_factory, tmp_path):
    """max_valid_per_user = 1: a second certificate is refused, a renewal by the holder of the first is not (the
    certificate it replaces does not count), and a second renewal of the same certificate is (the first
    renewal's certificate does)."""
    app = appliance_factory(sections={"policy": {"max_valid_per_user": "1"}, "scep": {"renewal_without_auth": "yes"}},
                            users={"alice": PASSWORD})
    out = tmp_path / "scep"
    p = app.getcert("alice", [PASSWORD], out)
    assert p.returncode == 0, p.stderr
    cert_file, key_file = str(out / "cert.pem"), str(out / "key.pem")
    status, _, body = reenroll_with_python_ssl(app, None, None, "simpleenroll", headers=basic("alice", PASSWORD))
    assert status == 400 and "still valid (limit 1)" in one_line(body)
    status, _, body = reenroll_with_python_ssl(app, cert_file, key_file)
    assert status == 200, body
    assert record_of(app, certs_of(body)[0]).auth_method == "tls-client-cert"
    status, _, body = reenroll_with_python_ssl(app, cert_file, key_file)
    assert status == 400 and "still valid (limit 1)" in one_line(body)


def test_client_certificate_alone_needs_renewal_without_auth(appliance_factory, tmp_path):
    app = appliance_factory(users={"alice": PASSWORD})  # [scep] renewal_without_auth = no (the default)
    out = tmp_path / "est"
    p = app.getcert("alice", [PASSWORD], out, "--protocol", "est", url=est_url(app))
    assert p.returncode == 0, p.stderr
    cert_file, key_file = str(out / "cert.pem"), str(out / "key.pem")
    status, _, body = reenroll_with_python_ssl(app, cert_file, key_file)
    assert status == 401 and "renewal_without_auth" in one_line(body)
    status, _, body = reenroll_with_python_ssl(app, cert_file, key_file, headers=basic("alice", PASSWORD))
    assert status == 200
    assert record_of(app, certs_of(body)[0]).auth_method == "local"


# --- labels and an unavailable backend --------------------------------------------------------------------------

def test_labels_map_to_profiles(app):
    conn = EstConnection(app.port, app.ca_pem)
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        status, _, body = conn.request("POST", EST + "/short/simpleenroll", csr_b64(key), basic("alice", PASSWORD))
        assert status == 200, body
        cert = certs_of(body)[0]
        assert cert.subject.rfc4514_string() == "CN=alice,OU=short,O=getcertd"
        assert record_of(app, cert).profile == "short"
        status, _, body = conn.request("POST", EST + "/restricted/simpleenroll", csr_b64(key),
                                       basic("alice", PASSWORD))
        assert status == 400 and "not granted" in one_line(body)
    finally:
        conn.close()


def test_radius_down_is_202_with_retry_after(appliance_factory, radius_server):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        app = radius_app(appliance_factory, radius_server, servers=f"127.0.0.1:{silent.getsockname()[1]}")
        conn = EstConnection(app.port, app.ca_pem)
        try:
            t0 = time.monotonic()
            status, headers, body = conn.request("POST", EST + "/simpleenroll",
                                                 csr_b64(ec.generate_private_key(ec.SECP256R1())),
                                                 basic("alice", "alice-pass"))
            assert status == 202 and int(headers["retry-after"]) > 0 and "unavailable" in one_line(body)
            assert time.monotonic() - t0 < 2 * 1.0 + 1.5
        finally:
            conn.close()
        status, _, _ = http(est_url(app) + "/cacerts", cafile=app.ca_pem)
        assert status == 200
    finally:
        silent.close()
