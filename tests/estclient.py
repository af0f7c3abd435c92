"""A small synchronous EST test client on pyOpenSSL, for tests that need the TLS session itself.

Python's ssl module gives tls-unique but not the TLS 1.3 exporter (RFC 9266), so the raw EST requests that
test channel binding go through a pyOpenSSL connection: handshake first, read the binding, then send the
CSR that carries it on the same connection.
"""
import base64
import socket
import struct

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from getcertd import est, scep

EST = "/.well-known/est"


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def csr_b64(key, challenge=None, cn="ignored-by-server") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if challenge is not None:
        builder = builder.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    algorithm = None if key.__class__.__name__.startswith("Ed") else hashes.SHA256()
    return base64.encodebytes(builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER))


def certs_of(body: bytes):
    return scep.parse_degenerate(est.decode_body(body))[0]


class EstConnection:
    """One TLS connection to the appliance, verified against its CA; requests are HTTP/1.1 on it."""

    def __init__(self, port, cafile, tls13=True, cert=None, key=None, host="localhost"):
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION if tls13 else SSL.TLS1_2_VERSION)
        ctx.load_verify_locations(cafile)
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
        if cert is not None:
            ctx.use_certificate(crypto.X509.from_cryptography(cert))
            ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
        self.host = host
        self.sock = socket.create_connection(("127.0.0.1", port), 30)
        self.sock.settimeout(None)  # pyOpenSSL wants a blocking socket; the kernel timeouts keep a test from hanging
        timeout = struct.pack("ll", 30, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        self.conn = SSL.Connection(ctx, self.sock)
        self.conn.set_tlsext_host_name(host.encode())
        self.conn.set_connect_state()
        self.conn.do_handshake()
        self.version = self.conn.get_protocol_version_name()

    def binding(self) -> bytes:
        """tls-unique (the client's Finished of this full handshake) on TLS 1.2, the RFC 9266 exporter on 1.3."""
        if self.version == "TLSv1.3":
            return self.conn.export_keying_material(est.EXPORTER_LABEL, est.EXPORTER_LENGTH)
        return self.conn.get_finished()

    def request(self, method, path, body=b"", headers=None):
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._read()
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        reply_headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            reply_headers[name.strip().lower()] = value.strip()
        length = int(reply_headers.get("content-length", "0"))
        while len(rest) < length:
            rest += self._read()
        return int(status_line.split()[1]), reply_headers, rest

    def _read(self):
        chunk = self.conn.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self):
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass
        self.sock.close()
