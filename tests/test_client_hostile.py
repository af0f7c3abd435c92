"""`getcert` against servers that stall, flood or answer nonsense, and its output files.

A fake HTTPS server on 127.0.0.1 (its certificate from a CA the client is told to trust, so every answer gets
past TLS) answers each request as the test says; `getcert` runs as a separate process, as a user runs it.
Each failure must be one line on stderr, with no traceback and no terminal escape sequence from the server,
within its --timeout; the key and certificate files are replaced whole, never written through a symbolic link.
"""
import datetime
import http.server
import os
import socket
import ssl
import subprocess
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import tool

NOW = datetime.datetime.now(datetime.timezone.utc)


def _cert(subject, key, issuer_key, issuer, ca, san=None):
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - datetime.timedelta(hours=1)).not_valid_after(NOW + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake-tls")
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake CA")])
    ca = _cert("fake CA", ca_key, ca_key, name, True)
    server = _cert("localhost", key, ca_key, name, False, [x509.DNSName("localhost")])
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return d


class _Fake:
    """An HTTPS server whose every answer is ``answer(handler)``."""

    def __init__(self, tls_files, answer):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                answer(self)

            do_POST = do_GET

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_files / "server.pem", tls_files / "server.key")
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _getcert(port, tls_files, out, timeout=2):
    started = time.monotonic()
    p = subprocess.run([tool("getcert"), "enroll", "--url", f"https://localhost:{port}/scep", "--user", "alice",
                        "--password-stdin", "--cafile", str(tls_files / "ca.pem"), "--out", str(out), "--timeout",
                        str(timeout)], input="pw\n", capture_output=True, text=True, timeout=60)
    return p, time.monotonic() - started


def _one_clean_line(p):
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "Traceback" not in p.stderr and "\x1b" not in p.stderr and "\x07" not in p.stderr, p.stderr


def test_a_server_that_never_speaks_tls_times_out(tls_files, tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepted by the kernel, never answered
    try:
        p, took = _getcert(silent.getsockname()[1], tls_files, tmp_path / "out")
    finally:
        silent.close()
    _one_clean_line(p)
    assert "no answer from the server within 2 s" in p.stderr and took < 15


@pytest.mark.parametrize("kind", ["stall", "flood", "escapes", "garbage CA", "garbage CA chain"])
def test_hostile_answers_are_one_clean_line(tls_files, tmp_path, kind):
    def answer(h):
        if kind == "stall":
            time.sleep(5)
            return
        if kind == "flood":  # 5 MiB of GetCACaps
            h.send_response(200)
            h.send_header("Content-Length", str(5 << 20))
            h.end_headers()
            for _ in range(5 * 16):
                h.wfile.write(b"A" * 65536)
            return
        status, content_type = 200, "text/plain"
        if "GetCACaps" in h.path:
            body = b"POSTPKIOperation\nSHA-256\nAES\n"
            if kind == "escapes":
                status = 500
                body = b"\x1b]0;pwned\x07\x1b[2J\x1b[31mFAKE: run again with --password on the command line\x1b[0m"
        else:
            body = os.urandom(300)
            content_type = "application/x-x509-ca-ra-cert" if kind == "garbage CA chain" \
                else "application/x-x509-ca-cert"
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    fake = _Fake(tls_files, answer)
    try:
        p, took = _getcert(fake.port, tls_files, tmp_path / "out")
    finally:
        fake.close()
    _one_clean_line(p)
    assert took < 15
    expected = {"stall": "no answer from the server within 2 s", "flood": "over 4 MiB", "escapes": "HTTP 500",
                "garbage CA": "can't be used", "garbage CA chain": "can't be used"}[kind]
    assert expected in p.stderr, p.stderr


def test_files_are_replaced_whole_and_not_through_a_symbolic_link(appliance_factory, tmp_path):
    app = appliance_factory(users={"alice": "alice pass"})
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.conf"
    victim.write_text("keep me\n")
    os.symlink(victim, out / "cert.pem")
    old_key = out / "key.pem"
    old_key.write_text("old key\n")
    os.chmod(old_key, 0o644)
    held = open(old_key)  # whoever had the old file open must not read the new key through it
    p = app.getcert("alice", ["alice pass"], out)
    assert p.returncode == 0, p.stderr
    assert victim.read_text() == "keep me\n" and not os.path.islink(out / "cert.pem")
    assert x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert held.read() == "old key\n" and (out / "key.pem").read_bytes().startswith(b"-----BEGIN")
    assert os.stat(out / "key.pem").st_mode & 0o777 == 0o600
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary file left
    held.close()
