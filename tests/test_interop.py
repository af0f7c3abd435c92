"""Real SCEP clients against a real `twistd getcertd`: strongSwan `pki`, certmonger, and an Apple device's PKCSReq.

A missing client fails (never skips). Each test records a row of the interoperability table in the JSON file
named by GETCERTD_INTEROP_TABLE (see tests/peers.py); the README's "Interoperability" table comes from it.
"""
import datetime
import os
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import Appliance, tool
from getcertd import scep
from getcertd.errors import FailInfo
from getcertd.operations import format_serial
from peers import (CERTMONGER, SCEP_SUBMIT, Pki, certmonger_enroll, certmonger_version, interop_row, require,
                   tree_state)
from scepclient import Requester, basic, get_ca_certs, http

APPLE = Path(__file__).parent / "vectors" / "apple-pkcsreq"
PASSWORD = "alice pass"  # a space, so that Basic credentials in a URL must be percent-encoded
SUBJECT = "CN=alice,OU=remote-access,O=getcertd"  # from the policy, whatever the CSR says
CERTMONGER_STATE = "/var/lib/certmonger"


def openssl(*args, input=None):
    return subprocess.run(["openssl", *args], input=input, capture_output=True)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """One appliance with HTTPS and plain HTTP for all the real clients (the per-user limit off: many certs)."""
    a = Appliance(tmp_path_factory.mktemp("interop"), {"policy": {"max_valid_per_user": "0"}},
                  {"alice": PASSWORD}, http=True)
    a.start()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def scep_ca(app, pki, tmp_path_factory):
    """GetCACert by `pki --scepca` over HTTPS: (CA file, RA file) as pki wrote them."""
    d = tmp_path_factory.mktemp("scepca")
    ca, ra = str(d / "ca.pem"), str(d / "ra.pem")
    p = pki.run("--scepca", "--url", app.url, "--caout", ca, "--raout", ra, "--outform", "pem",
                bundle=app.ca_pem)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "RA cert is trusted" in p.stderr, p.stderr
    assert open(ca, "rb").read() == open(app.ca_pem, "rb").read()
    return ca, ra


def check_issued(app, cert_path):
    """The certificate verifies against the appliance's CA, has the policy's subject, and was logged."""
    v = openssl("verify", "-CAfile", app.ca_pem, str(cert_path))
    assert v.returncode == 0, v.stdout + v.stderr
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    assert cert.subject.rfc4514_string() == SUBJECT
    assert f"issued serial {format_serial(cert.serial_number)} to 'alice'" in app.log()
    return cert


def pki_cipher(stderr: str, cipher: str, digest: str) -> str:
    """The request's content cipher as pki's debug output shows it (the symmetric key length)."""
    m = re.search(r"symmetric encryption key: => (\d+) bytes", stderr)
    size = int(m.group(1)) if m else 0
    name = f"AES-{8 * size}-CBC" if cipher == "aes" else "DES-EDE3-CBC" if size == 24 else f"{cipher}?"
    return f"{name} / {digest.upper().replace('SHA', 'SHA-')}"


@pytest.mark.parametrize("transport, cipher, digest", [
    ("https-basic", "aes", "sha256"),
    ("https-basic", "des3", "sha256"),
    ("http-challenge", "aes", "sha256"),
])
def test_strongswan_pki_enrolls(app, pki, scep_ca, tmp_path, transport, cipher, digest):
    ca, ra = scep_ca
    key = pki.gen_rsa(tmp_path / "key.der")
    out = tmp_path / "cert.pem"
    args = ["--scep", "--in", key, "--cacert-enc", ra, "--cacert-sig", ca, "--cipher", cipher, "--digest",
            digest, "--outform", "pem", "--debug", "4"]
    if transport == "https-basic":
        # Basic credentials in the URL, percent-encoded; the CSR's own subject and no challengePassword.
        url = app.url.replace("https://", f"https://alice:{urllib.parse.quote(PASSWORD, safe='')}@")
        args += ["--url", url, "--dn", "CN=something else"]
        row = ("HTTPS", "HTTP Basic (user:pass@ in the URL)")
    else:
        args += ["--url", app.http_url, "--dn", "CN=alice", "--password", PASSWORD]
        row = ("plain HTTP", "challengePassword (CN names the user)")
    with interop_row("strongSwan pki --scep", pki.describe(), *row) as r:
        p = pki.run(*args, bundle=app.ca_pem if transport == "https-basic" else None)
        r["cipher/digest"] = pki_cipher(p.stderr, cipher, digest)
        assert p.returncode == 0, p.stderr[-3000:]
        out.write_text(first_pem(p.stdout))
        check_issued(app, out)
        assert "Issued certificate is trusted" in p.stderr


def first_pem(text: str) -> str:
    return re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", text, re.S).group(0)


def pki_first_certificate(app, pki, ca, ra, tmp_path):
    """`pki --scep` enrolls alice (Basic credentials in the URL) with a new key: (the arguments every later
    request repeats, the key file, the certificate)."""
    url = app.url.replace("https://", f"https://alice:{urllib.parse.quote(PASSWORD, safe='')}@")
    common = ["--url", url, "--dn", "CN=alice", "--cacert-enc", ra, "--cacert-sig", ca, "--outform", "pem"]
    key = pki.gen_rsa(tmp_path / "old.der")
    p = pki.run("--scep", "--in", key, *common, bundle=app.ca_pem)
    assert p.returncode == 0, p.stderr[-3000:]
    (tmp_path / "old.pem").write_text(p.stdout)
    return common, key, check_issued(app, tmp_path / "old.pem")


@pytest.mark.parametrize("new_key", [True, False], ids=["new-key", "same-key"])
def test_strongswan_pki_renews(app, pki, scep_ca, tmp_path, new_key):
    """RenewalReq signed by the current certificate (`--cert/--key`), with Basic credentials."""
    common, old_key, old = pki_first_certificate(app, pki, *scep_ca, tmp_path)
    key = pki.gen_rsa(tmp_path / "new.der") if new_key else old_key
    variant = "new key" if new_key else "same key, so same transactionID"
    with interop_row(f"strongSwan pki --scep --cert (RenewalReq, {variant})", pki.describe(), "HTTPS",
                     "HTTP Basic + signed by the current certificate") as r:
        p = pki.run("--scep", "--in", key, "--cert", str(tmp_path / "old.pem"), "--key", old_key, *common,
                    "--debug", "4", bundle=app.ca_pem)
        r["cipher/digest"] = pki_cipher(p.stderr, "aes", "sha256")
        assert p.returncode == 0, p.stderr[-3000:]
        (tmp_path / "new.pem").write_text(first_pem(p.stdout))
        new = check_issued(app, tmp_path / "new.pem")
        # Same key, same transactionID (pki hashes the key): still a renewal, not a retry of the first request.
        assert new.serial_number != old.serial_number


def test_renewals_at_a_limit_of_one_valid_certificate(appliance_factory, pki, tmp_path):
    """max_valid_per_user = 1. A second certificate for a new key is refused; a renewal is not, whether it comes
    as `pki --cert` sends it (RenewalReq signed by the certificate) or as `getcert resubmit` does (PKCSReq signed
    by the certificate): the certificate it replaces does not count against the limit."""
    app = appliance_factory(sections={"policy": {"max_valid_per_user": "1"}}, users={"alice": PASSWORD})
    ca, ra = str(tmp_path / "ca.pem"), str(tmp_path / "ra.pem")
    p = pki.run("--scepca", "--url", app.url, "--caout", ca, "--raout", ra, "--outform", "pem", bundle=app.ca_pem)
    assert p.returncode == 0, p.stderr
    common, old_key, old = pki_first_certificate(app, pki, ca, ra, tmp_path)
    p = pki.run("--scep", "--in", pki.gen_rsa(tmp_path / "other.der"), *common, bundle=app.ca_pem)
    assert p.returncode != 0 and "still valid (limit 1)" in app.log()
    with interop_row("strongSwan pki --scep --cert (RenewalReq at max_valid_per_user = 1)", pki.describe(), "HTTPS",
                     "HTTP Basic + signed by the current certificate"):
        p = pki.run("--scep", "--in", pki.gen_rsa(tmp_path / "new.der"), "--cert", str(tmp_path / "old.pem"),
                    "--key", old_key, *common, bundle=app.ca_pem)
        assert p.returncode == 0, p.stderr[-3000:]
        (tmp_path / "new.pem").write_text(first_pem(p.stdout))
        assert check_issued(app, tmp_path / "new.pem").serial_number != old.serial_number

    other = appliance_factory(sections={"policy": {"max_valid_per_user": "1"}}, users={"alice": PASSWORD})
    with interop_row("certmonger (getcert resubmit at max_valid_per_user = 1)", certmonger_version(), "HTTPS",
                     "challengePassword, then signed by the current certificate"):
        result = certmonger_enroll(tmp_path / "certmonger", other.url, subject="CN=alice", challenge=PASSWORD,
                                   ca_pem=other.ca_pem, bundle=other.ca_pem, resubmit=True)
        assert result.returncode == 0, result.output[-4000:]
        first = check_issued(other, tmp_path / "certmonger" / "first.pem")
        assert check_issued(other, result.cert_path).serial_number != first.serial_number
    assert result.leftovers == [], "certmonger's processes outlived the run (killed by pid)"


def test_retry_gets_the_same_certificate(app):
    """The counterpart of the renewals above: the same PKCSReq sent again (a lost reply) is not issued twice."""
    requester = Requester(get_ca_certs(app.url, app.ca_pem))
    message = requester.message()
    serials = []
    for _ in range(2):
        status, _, body = http(app.url + "?operation=PKIOperation", data=message, cafile=app.ca_pem,
                               headers=basic("alice", PASSWORD))
        assert status == 200
        reply, certs = requester.open_reply(body)
        assert reply.pki_status == scep.PkiStatus.SUCCESS
        serials.append(certs[0].serial_number)
    assert serials[0] == serials[1]
    assert f"SCEP retry of transaction {requester.tid!r}" in app.log()


def test_strongswan_pki_wrong_challenge_gets_failure(app, pki, scep_ca, tmp_path):
    ca, ra = scep_ca
    key = pki.gen_rsa(tmp_path / "key.der")
    with interop_row("strongSwan pki --scep", pki.describe(), "plain HTTP", "wrong challengePassword") as r:
        p = pki.run("--scep", "--url", app.http_url, "--in", key, "--dn", "CN=alice", "--password", "wrong",
                    "--cacert-enc", ra, "--cacert-sig", ca, "--outform", "pem", "--debug", "4")
        r["cipher/digest"] = pki_cipher(p.stderr, "aes", "sha256")
        assert p.returncode != 0 and "BEGIN CERTIFICATE" not in p.stdout
        assert re.search(r"failInfo: +badRequest", p.stderr), p.stderr[-2000:]
        assert "challengePassword authentication failed" in app.log()
        r["result"] = "refused as expected (CertRep FAILURE, failInfo badRequest)"


def test_certmonger_scep_submit_caps_and_ca_certs(app, tmp_path):
    submit = require(SCEP_SUBMIT, "certmonger")
    with interop_row("certmonger scep-submit -c/-C", certmonger_version(), "HTTPS", "none (GetCACaps, GetCACert)",
                     "") as r:
        p = subprocess.run([submit, "-u", app.url, "-R", app.ca_pem, "-c"], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0, p.stdout + p.stderr
        caps = p.stdout.split()
        for cap in ("POSTPKIOperation", "SCEPStandard", "AES", "SHA-256"):
            assert cap in caps
        p = subprocess.run([submit, "-u", app.url, "-R", app.ca_pem, "-C"], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0, p.stdout + p.stderr
        certs = x509.load_pem_x509_certificates(p.stdout.encode())
        ca = x509.load_pem_x509_certificate(open(app.ca_pem, "rb").read())
        assert ca in certs and len(certs) == 2  # the RA certificate and the CA
        r["result"] = "pass (caps: " + " ".join(caps) + ")"


def test_certmonger_reads_a_refusal(app, tmp_path):
    """A wrong challengePassword: certmonger could not read the FAILURE CertRep (a SignedData without content:
    'PKCS7 routines::no content'), took the CA for unreachable and would have sent the request again and again,
    each time a failed login. With an empty content it reports the refusal and stops (CA_REJECTED)."""
    with interop_row("certmonger (getcert request)", certmonger_version(), "plain HTTP",
                     "wrong challengePassword") as r:
        result = certmonger_enroll(tmp_path, app.http_url, subject="CN=alice", challenge="not the password",
                                   ca_pem=app.ca_pem)
        assert "status: CA_REJECTED" in result.output and "no content" not in result.output, result.output[-4000:]
        assert "CA_UNREACHABLE" not in result.output, result.output[-4000:]
        r["result"] = "refused as expected (CertRep FAILURE read: CA_REJECTED)"
    assert result.leftovers == [], "certmonger's processes outlived the run (killed by pid)"


@pytest.mark.parametrize("transport", ["https", "http"])
def test_certmonger_enrolls(app, tmp_path, transport):
    require(CERTMONGER, "certmonger")
    before = tree_state(CERTMONGER_STATE)
    url, bundle = (app.url, app.ca_pem) if transport == "https" else (app.http_url, None)
    with interop_row("certmonger (getcert request)", certmonger_version(),
                     "HTTPS" if transport == "https" else "plain HTTP", "challengePassword (CN names the user)") as r:
        result = certmonger_enroll(tmp_path, url, subject="CN=alice", challenge=PASSWORD, ca_pem=app.ca_pem,
                                   bundle=bundle, resubmit=True)
        r["cipher/digest"] = f"{result.chosen('AES').replace('AES', 'AES-')}-CBC / {result.chosen('SHA')}"
        assert result.returncode == 0, result.output[-4000:]
        assert "status: MONITORING" in result.output, result.output[-4000:]
        first = check_issued(app, tmp_path / "first.pem")
        # `getcert resubmit` keeps the key, so the transactionID too, and signs with the certificate it holds:
        # a renewal, answered with a new certificate (not the one it already has, as for a retry).
        renewed = check_issued(app, result.cert_path)
        assert renewed.serial_number != first.serial_number
        assert renewed.public_key().public_numbers() == first.public_key().public_numbers()
        r["result"] = "pass (enrollment, and `getcert resubmit` renewal with the same key)"
    assert result.leftovers == [], "certmonger's processes outlived the run (killed by pid)"
    assert tree_state(CERTMONGER_STATE) == before, f"something was written under {CERTMONGER_STATE}"


# --- the Apple device's PKCSReq ------------------------------------------------------------------------------

def _private_pem(path: Path, pem: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return str(path)


@pytest.fixture
def apple_ca(tmp_path):
    """The vector's CA key decrypted (its PEM passphrase is empty) into a 0600 file, and its certificate."""
    p = openssl("rsa", "-in", str(APPLE / "ca.key"), "-passin", "pass:")
    assert p.returncode == 0, p.stderr
    return _private_pem(tmp_path / "apple-ca.key", p.stdout), str(APPLE / "ca.crt")


@pytest.fixture
def tls_files(tmp_path):
    """A throwaway TLS certificate for localhost: getcertd can't issue one from a CA that has expired."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path = tmp_path / "tls.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return str(cert_path), _private_pem(tmp_path / "tls.key", key_pem)


@pytest.mark.filterwarnings("ignore:Attribute's length")  # the vector CA's C=USA
def test_apple_pkcsreq_answered_by_appliance(appliance_factory, apple_ca, tls_files):
    key_path, cert_path = apple_ca
    ca_cert = x509.load_pem_x509_certificate(open(cert_path, "rb").read())
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = ca_cert.not_valid_after_utc <= now  # 2026-05-29: it has
    app = appliance_factory(sections={"ca": {"certificate": cert_path, "key": key_path, "ra": "no"},
                                      "https": {"certificate": tls_files[0], "key": tls_files[1]}},
                            users={"device": "device-pass"})
    der = (APPLE / "PKCSReq.der").read_bytes()
    request = scep.parse_signed(der)
    assert len(request.sender_nonce) == 8
    with interop_row("Apple device PKCSReq (vector)", "iOS, 2016 (micromdm/scep testdata)", "HTTPS",
                     "HTTP Basic", "DES-EDE3-CBC / SHA-1") as r:
        status, headers, body = http(app.url + "?operation=PKIOperation", data=der, cafile=tls_files[0],
                                     headers={**basic("device", "device-pass"),
                                              "Content-Type": "application/x-pki-message"})
        assert status == 200 and headers["Content-Type"] == "application/x-pki-message"
        reply = scep.parse_signed(body)  # verifies the signature
        assert reply.message_type == scep.MessageType.CertRep
        assert reply.transaction_id == request.transaction_id
        assert reply.recipient_nonce == request.sender_nonce  # the 8-byte nonce echoed as sent
        assert len(reply.sender_nonce) == 16 and reply.sender_nonce != request.sender_nonce
        assert reply.digest == "sha1"  # the device's digest mirrored
        assert reply.signer_cert == ca_cert  # [ca] ra = no: the CA signs
        # Independent check of the CertRep's CMS signature (chain verification off: the CA has expired).
        v = openssl("cms", "-verify", "-inform", "DER", "-noverify", "-binary", "-content", os.devnull, "-out", os.devnull,
                    input=body)  # a FAILURE carries no content: its digest is over the empty string
        assert v.returncode == 0, v.stderr
        # The device's CSR holds an RSA-1024 key: refused before anything else about it (time included).
        assert reply.pki_status == scep.PkiStatus.FAILURE
        assert reply.fail_info == FailInfo.badAlg and "1024" in reply.fail_info_text
        assert reply.content == b""  # no envelope (scep.NO_ENVELOPE)
        r["result"] = f"CertRep FAILURE badAlg ({reply.fail_info_text}), as expected"

    # The same CA with an acceptable key, as the device would send it (3DES, SHA-1): once the CA has expired,
    # a FAILURE with badTime, not an HTTP error; before that, a certificate.
    requester = Requester([ca_cert])
    message = requester.message(cipher="des3", digest="sha1")
    status, headers, body = http(app.url + "?operation=PKIOperation", data=message, cafile=tls_files[0],
                                 headers=basic("device", "device-pass"))
    assert status == 200, body
    reply, certs = requester.open_reply(body)
    if expired:
        assert reply.pki_status == scep.PkiStatus.FAILURE and reply.fail_info == FailInfo.badTime, reply
        assert "expired" in reply.fail_info_text
    else:
        assert reply.pki_status == scep.PkiStatus.SUCCESS and certs[0].issuer == ca_cert.subject
    assert "refused: badAlg" in app.log()
    if expired:
        assert "the CA certificate expired on 2026-05-29" in app.log()  # warned at start


@pytest.mark.filterwarnings("ignore:Attribute's length")
def test_expired_ca_refused_at_start_when_it_must_issue_ra_or_tls(appliance_factory, apple_ca):
    key_path, cert_path = apple_ca
    ca_cert = x509.load_pem_x509_certificate(open(cert_path, "rb").read())
    if ca_cert.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc):
        pytest.fail("the clock reads before 2026-05-29, when the Apple vector's CA expired")
    with pytest.raises(RuntimeError) as caught:
        appliance_factory(sections={"ca": {"certificate": cert_path, "key": key_path}})
    assert "the CA certificate expired on 2026-05-29" in str(caught.value)
    assert "can't issue its RA or TLS certificate" in str(caught.value)


# --- a sub-CA: the company's root issued getcertd's CA ------------------------------------------------------

def _ca_pair(name, signer_key=None, issuer=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(signer_key or key, hashes.SHA256()))
    return key, cert


def test_a_sub_ca_hands_out_its_chain_and_clients_trusting_the_root_enroll(appliance_factory, tmp_path):
    """[ca] certificate holding the CA's certificate and then its issuer: GetCACert, GetCACertChain and EST
    cacerts carry the root too (they carried only the sub-CA, so a client trusting the company root could not
    build a chain), our client trusting only the root enrolls by SCEP and EST, certmonger too, and openssl
    verifies what was issued up to the root."""
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    root_key, root = _ca_pair("Example Corp Root")
    sub_key, sub = _ca_pair("Example VPN CA", root_key, root.subject)
    (tmp_path / "root.pem").write_bytes(pem(root))
    (tmp_path / "chain.pem").write_bytes(pem(sub) + pem(root))
    key_path = _private_pem(tmp_path / "sub.key", sub_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    root_pem = str(tmp_path / "root.pem")
    app = appliance_factory(sections={"ca": {"certificate": str(tmp_path / "chain.pem"), "key": key_path},
                                      "policy": {"max_valid_per_user": "0"}}, users={"alice": PASSWORD})
    assert "CA issued by CN=Example Corp Root: handed out with it" in app.log()
    for operation in ("GetCACert", "GetCACertChain"):
        status, headers, body = http(app.url + f"?operation={operation}", cafile=root_pem)
        certs = scep.parse_degenerate(body)[0]
        assert status == 200 and certs[1:] == [sub, root] and certs[0].issuer == sub.subject, operation
    out = tmp_path / "scep"
    p = app.getcert("alice", [PASSWORD], out, cafile=root_pem)
    assert p.returncode == 0, p.stderr
    assert open(out / "ca.pem", "rb").read() == pem(sub)  # the issuing CA, which the gateway is told to trust
    v = openssl("verify", "-CAfile", root_pem, "-untrusted", str(tmp_path / "chain.pem"), str(out / "cert.pem"))
    assert v.returncode == 0, v.stdout + v.stderr
    est_url = app.url.replace("/scep", "/.well-known/est")
    p = app.getcert("alice", [PASSWORD], tmp_path / "est", "--protocol", "est", url=est_url, cafile=root_pem)
    assert p.returncode == 0, p.stderr
    fingerprint = "sha256:" + sub.fingerprint(hashes.SHA256()).hex()  # pinned to the sub-CA: also fine
    p = app.getcert("alice", [PASSWORD], tmp_path / "pinned", "--ca-fingerprint", fingerprint)
    assert p.returncode == 0, p.stderr
    with interop_row("certmonger with a sub-CA", certmonger_version(), "HTTPS",
                     "challengePassword (CN names the user)") as r:
        result = certmonger_enroll(tmp_path / "certmonger", app.url, subject="CN=alice", challenge=PASSWORD,
                                   ca_pem=root_pem, bundle=root_pem)
        assert result.returncode == 0 and "status: MONITORING" in result.output, result.output[-4000:]
        v = openssl("verify", "-CAfile", root_pem, "-untrusted", str(tmp_path / "chain.pem"), result.cert_path)
        assert v.returncode == 0, v.stdout + v.stderr
        r["result"] = "pass (the root trusted, the sub-CA's chain from GetCACert)"
    # the chain in the wrong order is one line at start
    (tmp_path / "wrong.pem").write_bytes(pem(root) + pem(sub))
    bad = appliance_factory(sections={"ca": {"certificate": str(tmp_path / "wrong.pem"), "key": key_path}},
                            start=False)
    p = subprocess.run([tool("twistd"), "-n", "--pidfile", "", "getcertd", "--config", bad.config_path],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "is not issued by the certificate after it" in p.stdout + p.stderr


def test_the_client_finds_the_issuing_ca_and_its_way_to_a_trusted_one():
    from getcertd.client import ClientError, find_ca
    root_key, root = _ca_pair("Root")
    sub_key, sub = _ca_pair("Sub", root_key, root.subject)
    _, other = _ca_pair("Other")
    ra = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RA")]))
          .issuer_name(sub.subject).public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
          .serial_number(1).not_valid_before(sub.not_valid_before_utc).not_valid_after(sub.not_valid_after_utc)
          .sign(sub_key, hashes.SHA256()))
    assert find_ca([ra, sub, root], [root], "GetCACert") == sub
    assert find_ca([ra, sub, root], [sub], "GetCACert") == sub
    assert find_ca([ra, sub], [root], "GetCACert") == sub  # the root left out: the anchor itself issued it
    assert find_ca([root], [root], "GetCACert") == root
    for certs, anchors in (([ra, sub, root], [other]), ([ra, sub], [other]), ([sub, root], [ra])):
        with pytest.raises(ClientError, match="is not, and is not issued by, one you trust"):
            find_ca(certs, anchors, "GetCACert")
