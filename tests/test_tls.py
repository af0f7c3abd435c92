"""TLS of the HTTPS listener, checked from outside against a real twistd: TLS 1.2 and 1.3 only, ECDHE key
exchange only (X25519, P-256, P-384), AEAD ciphers only. Two appliances: the generated ECDSA TLS
certificate, and an RSA certificate given in [https] certificate/key (so that an ECDHE-RSA CBC suite is
refused because it is CBC, not because the key does not fit).

Probes: `openssl s_client` per version and per weak suite, a sweep of every TLS 1.2 suite this OpenSSL
knows, and sslyze (PyPI) when it can be installed. sslyze 6 pins cryptography < 47 while getcertd runs on
cryptography 50, so it never goes into the project's venv: the test installs it into a throwaway venv in
its temp dir (about 15 s with a warm pip cache) and skips, saying why, when that fails (no registry, no venv
module).
"""
import datetime
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance import Appliance

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is needed (Debian package openssl)")

AEAD = re.compile(r"GCM|CHACHA20|CCM")


def _rsa_tls_files(directory):
    """An RSA key and a self-signed certificate for localhost / 127.0.0.1, as an operator would bring."""
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = os.path.join(directory, "tls-rsa.key"), os.path.join(directory, "tls-rsa.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module", params=["ecdsa-generated", "rsa-configured"])
def server(request, tmp_path_factory):
    """(appliance, CA file the client checks the server certificate with, certificate key type)."""
    d = tmp_path_factory.mktemp(request.param)
    sections, cafile = None, None
    if request.param == "rsa-configured":
        key_path, cert_path = _rsa_tls_files(str(d))
        sections = {"https": {"certificate": cert_path, "key": key_path}}
        cafile = cert_path
    os.mkdir(d / "app")
    app = Appliance(d / "app", sections, {"alice": "alice-pass"}).start()
    yield app, cafile or app.ca_pem, request.param.split("-")[0]
    app.stop()


def s_client(app, cafile, *args):
    """(ok, protocol, cipher, temp key) of one handshake with certificate checking."""
    p = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{app.port}", "-servername", "localhost",
                        "-CAfile", cafile, "-verify_return_error", "-brief", *args],
                       input=b"", capture_output=True, timeout=30)
    out = (p.stdout + p.stderr).decode("utf-8", "replace")
    field = lambda name: (re.search(rf"^{name}: (.+)$", out, re.M) or [None, ""])[1].strip()  # noqa: E731
    ok = p.returncode == 0 and "Verification: OK" in out
    return ok, field("Protocol version"), field("Ciphersuite"), field("(?:Server|Peer) Temp Key"), out


@pytest.mark.parametrize("version, expected", [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_tls12_and_tls13_connect_with_ecdhe_aead(server, version, expected):
    app, cafile, key_type = server
    ok, protocol, cipher, temp_key, out = s_client(app, cafile, version)
    assert ok, out
    assert protocol == expected
    assert AEAD.search(cipher), cipher
    if expected == "TLSv1.2":
        assert cipher.startswith(f"ECDHE-{'ECDSA' if key_type == 'ecdsa' else 'RSA'}-"), cipher
    assert temp_key.startswith(("X25519", "ECDH")), temp_key


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_tls10_and_tls11_are_refused(server, version):
    app, cafile, _ = server
    # OpenSSL 3's default security level would refuse these versions on the client side already:
    # SECLEVEL=0 makes the client offer them, so the refusal is the server's.
    ok, protocol, _, _, out = s_client(app, cafile, version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert not ok and "protocol version" in out, out


WEAK = [
    ("AES128-SHA", "RSA key exchange, CBC"),
    ("AES128-GCM-SHA256", "RSA key exchange (no forward secrecy), even with GCM"),
    ("ECDHE-RSA-AES128-SHA", "CBC"),
    ("ECDHE-RSA-AES128-SHA256", "CBC"),
    ("ECDHE-ECDSA-AES128-SHA", "CBC"),
    ("ECDHE-ECDSA-AES256-SHA384", "CBC"),
    ("DHE-RSA-AES128-GCM-SHA256", "finite-field DHE"),
    ("ECDHE-RSA-DES-CBC3-SHA", "3DES"),
    ("ECDHE-ECDSA-NULL-SHA", "no encryption"),
]


@pytest.mark.parametrize("cipher, why", WEAK, ids=[w[0] for w in WEAK])
def test_weak_tls12_suites_are_refused(server, cipher, why):
    app, cafile, _ = server
    ok, _, negotiated, _, out = s_client(app, cafile, "-tls1_2", "-cipher", f"{cipher}@SECLEVEL=0")
    assert not ok, f"{cipher} ({why}) was accepted: {negotiated}"


@pytest.mark.parametrize("args, why", [
    (("-tls1_3", "-groups", "ffdhe2048:ffdhe3072"), "finite-field DHE in TLS 1.3"),
    (("-tls1_2", "-groups", "ffdhe2048"), "finite-field DHE in TLS 1.2"),
    (("-tls1_3", "-groups", "X448"), "a curve outside X25519, P-256, P-384"),
    (("-tls1_3", "-groups", "P-521"), "a curve outside X25519, P-256, P-384"),
    (("-tls1_3", "-ciphersuites", "TLS_AES_128_CCM_8_SHA256"), "the short-tag CCM_8 suite"),
], ids=["tls13-ffdhe", "tls12-ffdhe", "x448", "p521", "ccm8"])
def test_non_ecdhe_groups_are_refused(server, args, why):
    app, cafile, _ = server
    ok, _, _, temp_key, out = s_client(app, cafile, *args)
    assert not ok, f"{why} was accepted: {temp_key}"


@pytest.mark.parametrize("group", ["X25519", "P-256", "P-384"])
def test_each_offered_group_works_alone(server, group):
    app, cafile, _ = server
    ok, _, _, temp_key, out = s_client(app, cafile, "-tls1_3", "-groups", group)
    assert ok, out


def test_every_tls12_suite_openssl_knows(server):
    """The accepted TLS 1.2 suites, from a sweep of all of them, are ECDHE with AEAD only."""
    app, cafile, _ = server
    names = subprocess.run([OPENSSL, "ciphers", "-tls1_2", "ALL:COMPLEMENTOFALL:@SECLEVEL=0"],
                           capture_output=True, text=True, check=True).stdout.strip().split(":")
    names = [n for n in names if not n.startswith("TLS_")]  # TLS 1.3 suites are listed too
    accepted = [n for n in names if s_client(app, cafile, "-tls1_2", "-cipher", f"{n}@SECLEVEL=0")[0]]
    print(f"TLS 1.2 sweep: {len(accepted)} of {len(names)} suites accepted: {accepted}")
    assert len(names) > 50 and accepted, (len(names), accepted)
    assert all(n.startswith("ECDHE-") and AEAD.search(n) for n in accepted), accepted


@pytest.fixture(scope="module")
def sslyze(tmp_path_factory):
    venv = tmp_path_factory.mktemp("sslyze-venv")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "sslyze >= 6, < 7"],
                             capture_output=True, text=True, timeout=400)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"SSLYZE NOT RUN: could not make a venv for it ({e})")
    if pip.returncode:
        pytest.skip("SSLYZE NOT RUN: `pip install sslyze` failed in a throwaway venv: " + pip.stderr[-500:])
    return str(venv / "bin" / "python")


def test_sslyze(server, sslyze, tmp_path):
    app, cafile, _ = server
    out = tmp_path / "sslyze.json"
    p = subprocess.run([sslyze, "-m", "sslyze", "--json_out", str(out), f"localhost:{app.port}{{127.0.0.1}}"],
                       capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())["server_scan_results"][0]
    assert result["scan_status"] == "COMPLETED", p.stdout[-3000:]
    scan = result["scan_result"]
    accepted = {}
    for version in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3"):
        entry = scan[f"{version}_cipher_suites"]
        assert entry["status"] == "COMPLETED", entry
        accepted[version] = [c["cipher_suite"]["name"] for c in entry["result"]["accepted_cipher_suites"]]
    assert not any(accepted[v] for v in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1")), accepted
    assert accepted["tls_1_2"] and accepted["tls_1_3"], accepted
    assert all(n.startswith("TLS_ECDHE_") and AEAD.search(n) for n in accepted["tls_1_2"]), accepted
    assert all(AEAD.search(n) for n in accepted["tls_1_3"]), accepted
    curves = [c["name"] for c in scan["elliptic_curves"]["result"]["supported_curves"]]
    print(f"sslyze {app.port}: accepted {accepted}, curves {curves}")
    assert set(curves) <= {"X25519", "prime256v1", "secp256r1", "secp384r1"}, curves
    assert scan["heartbleed"]["result"]["is_vulnerable_to_heartbleed"] is False
    assert scan["openssl_ccs_injection"]["result"]["is_vulnerable_to_ccs_injection"] is False
    assert scan["tls_compression"]["result"]["supports_compression"] is False
    assert scan["tls_fallback_scsv"]["result"]["supports_fallback_scsv"] is True
    assert scan["session_renegotiation"]["result"]["is_vulnerable_to_client_renegotiation_dos"] is False
    assert scan["session_renegotiation"]["result"]["supports_secure_renegotiation"] is True
    assert scan["robot"]["result"]["robot_result"] in ("NOT_VULNERABLE_NO_ORACLE", "NOT_VULNERABLE_RSA_NOT_SUPPORTED")
    # Mozilla "intermediate": the only miss allowed is the path validation of a private CA (ours, or the
    # operator's self-signed test certificate), which sslyze's public trust stores can't know.
    compliance = p.stdout.split("COMPLIANCE AGAINST TLS CONFIGURATION", 1)[-1]
    problems = [line.strip() for line in compliance.splitlines() if line.strip().startswith("* ")]
    assert all(line.startswith("* certificate_path_validation") for line in problems), problems


def _client_chain(directory, n, huge):
    """A client key and certificate chain of ``n`` certificates, each signed by the next (none by our CA)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from scepclient import rsa_key_with_huge_exponent
    now = datetime.datetime.now(datetime.timezone.utc)
    keys = [rsa_key_with_huge_exponent() if huge and i == 0 else rsa.generate_private_key(65537, 2048)
            for i in range(n + 1)]
    names = [x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"link {i}")]) for i in range(n + 1)]
    certs = []
    for i in range(n):
        b = (x509.CertificateBuilder().subject_name(names[i]).issuer_name(names[i + 1])
             .public_key(keys[i].public_key()).serial_number(i + 1)
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1)))
        if i:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        certs.append(b.sign(keys[i + 1], hashes.SHA256()))
    key_path, cert_path, chain_path = (os.path.join(directory, f"client-{huge}-{n}.{x}") for x in ("key", "crt", "chain"))
    with open(key_path, "wb") as f:
        f.write(keys[0].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(certs[0].public_bytes(serialization.Encoding.PEM))
    with open(chain_path, "wb") as f:
        f.write(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[1:]))
    return key_path, cert_path, chain_path


def test_client_certificates_are_not_chain_verified_and_huge_exponents_are_refused(server, tmp_path):
    """The client certificate is requested for EST re-enrollment, which checks it against our CA itself. OpenSSL
    verified whatever chain a client sent: 29 certificates with 2,048-bit public exponents cost 22.8 ms of the
    reactor's CPU per handshake (1 ms without). Chains are no longer verified (depth 0; 4.0 ms), and a client
    key with an exponent over 64 bits is refused before its handshake signature is checked."""
    app, cafile, _ = server
    key, cert, chain = _client_chain(str(tmp_path), 8, huge=False)
    ok, _, _, _, out = s_client(app, cafile, "-tls1_3", "-key", key, "-cert", cert, "-cert_chain", chain)
    assert ok, out  # a foreign chain is not verified, nor refused: the certificate is simply not ours
    key, cert, chain = _client_chain(str(tmp_path), 2, huge=True)
    p = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{app.port}", "-servername", "localhost",
                        "-CAfile", cafile, "-tls1_2", "-key", key, "-cert", cert, "-cert_chain", chain],
                       input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=30)
    out = (p.stdout + p.stderr).decode("utf-8", "replace")
    assert "alert" in out and "HTTP/1." not in out, out  # TLS 1.2: the alert ends the handshake itself


def test_the_tls_context_verifies_no_client_chain():
    from getcertd.ca import CertificateAuthority, generate_key, make_ca_certificate
    from getcertd.tap import tls_options
    now = datetime.datetime.now(datetime.timezone.utc)
    key = generate_key("ec-p256")
    ca = CertificateAuthority(key, make_ca_certificate(key, "CN=t", now, datetime.timedelta(days=1)))
    context = tls_options(key, ca.certificate, [], client_ca=ca.certificate).getContext()
    assert context.get_verify_depth() == 0  # the default, 100, verified up to 100 certificates per handshake
    assert tls_options(key, ca.certificate, [], client_ca=None).getContext().get_verify_mode() == 0
