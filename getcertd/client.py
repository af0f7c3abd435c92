"""getcert: the end entity's side of the draft's process flow (section 7).

Connect over TLS and check the server's certificate and name (service_identity), answer the 401 with HTTP
authentication (and further 401 challenge rounds), fetch GetCACaps and GetCACert (checked against the trust
anchor), generate the key locally, enroll with a SCEP PKCSReq, verify the CertRep and write the files.
"""
import argparse
import base64
import datetime
import getpass
import os
import socket
import select
import sys
import time
from io import BytesIO
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import defer, protocol, ssl, task, threads
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from getcertd import scep
from getcertd.ca import generate_key
from getcertd.errors import FailInfo, GetcertdError
from getcertd.state import write_file

CHALLENGE_HEADER = b"Getcertd-Challenge"
MAX_ROUNDS = 6
REQUEST_TIMEOUT = 60  # seconds for one request, from connecting to the end of its answer (--timeout)
MAX_ANSWER = 4 << 20  # bytes: a CertRep or a CA chain is a few KB


def printable(text: str, limit: int = 300) -> str:
    """Server-supplied text made safe for a terminal: control characters (escape sequences) shown as '?'."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class _BoundedBody(protocol.Protocol):
    """An answer's body, refused past MAX_ANSWER bytes."""

    def __init__(self, finished):
        self.finished = finished
        self.data = bytearray()
        self.transport = None

    def dataReceived(self, data):
        self.data += data
        if len(self.data) > MAX_ANSWER and not self.finished.called:
            self.finished.errback(ClientError(f"the server's answer is over {MAX_ANSWER >> 20} MiB"))
            self.transport.stopProducing()

    def connectionLost(self, reason):
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(bytes(self.data))
        else:
            self.finished.errback(reason)


def _read_body(response) -> defer.Deferred:
    """The body of ``response``, at most MAX_ANSWER bytes; cancelling it (a timeout) drops the connection."""
    body = _BoundedBody(None)

    def cancel(_):
        if body.transport is not None:
            body.transport.stopProducing()
    body.finished = defer.Deferred(cancel)
    response.deliverBody(body)
    return body.finished


class ClientError(Exception):
    """A one-line reason to stop with a non-zero exit."""


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _sha256_hex(cert) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def peer_chain(host: str, port: int, timeout: float = 15.0):
    """The certificates the server presents, unverified; used only to find the pinned CA by fingerprint."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    sock = socket.create_connection((host, port), timeout)
    try:
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(host.encode("idna"))
        conn.set_connect_state()
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.do_handshake()
                break
            except (SSL.WantReadError, SSL.WantWriteError):
                if time.monotonic() > deadline or not select.select([sock], [], [], 1.0):
                    raise OSError("TLS handshake timed out")
        return [c.to_cryptography() for c in conn.get_peer_cert_chain() or []]
    finally:
        sock.close()


@implementer(IOpenSSLTrustRoot)
class _Anchors:
    """Trust exactly these certificates, a sub-CA's too: OpenSSL otherwise wants every chain to end in a
    self-signed certificate, so pinning a sub-CA (--ca-fingerprint of the issuing CA) failed."""

    def __init__(self, certs):
        self._certs = [crypto.X509.from_cryptography(c) for c in certs]

    def _addCACertsToContext(self, context):  # IOpenSSLTrustRoot
        store = context.get_cert_store()
        for cert in self._certs:
            store.add_cert(cert)
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)


@implementer(IPolicyForHTTPS)
class PinnedTrust:
    """Verify the server's chain against our trust anchors and its name with service_identity, TLS 1.2+."""

    def __init__(self, anchors):
        self.root = _Anchors(anchors)

    def creatorForNetloc(self, hostname, port):
        return ssl.optionsForClientTLS(hostname.decode("idna"), trustRoot=self.root,
                                       extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2})


def trust_anchors(args, host, port):
    if args.cafile:
        try:
            with open(args.cafile, "rb") as f:
                return x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError) as e:
            raise ClientError(f"--cafile {args.cafile}: {e}")
    want = args.ca_fingerprint.lower()
    if want.startswith("sha256:"):
        want = want[7:]
    want = want.replace(":", "")
    if len(want) != 64:
        raise ClientError("--ca-fingerprint: expected sha256:HEX (64 hex digits)")
    try:
        chain = peer_chain(host, port)
    except (OSError, SSL.Error) as e:
        raise ClientError(f"can't reach {host}:{port}: {e or type(e).__name__}")
    for cert in chain:
        if _sha256_hex(cert) == want:
            return [cert]
    raise ClientError("the server did not present a CA certificate with the given fingerprint")


def _describe_tls_failure(failure) -> str:
    text = str(failure.value)
    if "certificate verify failed" in text or "VerificationError" in repr(failure.value) or "verify" in text:
        return "the server's certificate is not trusted or does not match its name; refusing to continue"
    return f"connection failed: {text.splitlines()[0] if text else failure.type.__name__}"


class ScepSession:
    def __init__(self, reactor, url, trust, args, password_source):
        self.reactor = reactor
        self.url = url.rstrip("?")
        self.agent = Agent(reactor, contextFactory=trust, pool=HTTPConnectionPool(reactor, persistent=True),
                           connectTimeout=30)
        self.args = args
        self.next_password = password_source

    async def request(self, method, url, headers=None, body=None):
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        timeout = getattr(self.args, "timeout", REQUEST_TIMEOUT)
        deadline = self.reactor.seconds() + timeout
        try:
            response = await self.agent.request(method, url.encode(), Headers(headers or {}), producer).addTimeout(
                timeout, self.reactor)
            data = await _read_body(response).addTimeout(max(deadline - self.reactor.seconds(), 0.001), self.reactor)
        except ClientError:
            raise
        except Exception as e:  # TLS, DNS and connection failures; the timeout's cancellation, as the agent wraps it
            if isinstance(e, defer.TimeoutError) or self.reactor.seconds() >= deadline:
                raise ClientError(f"no answer from the server within {timeout:g} s") from None
            raise ClientError(_describe_tls_failure(Failure(e)))
        return response, data

    async def get(self, operation, extra=""):
        response, data = await self.request(b"GET", f"{self.url}?operation={operation}{extra}")
        if response.code != 200:
            text = printable(data.decode("utf-8", "replace").strip(), 200)
            raise ClientError(f"{operation}: HTTP {response.code}: {text}")
        return response, data

    async def post_authenticated(self, url, content_type: bytes, body: bytes, password=None):
        """POST ``body``, answering 401s with the user's password and challenge responses (SCEP and EST).

        ``password``, when known (a retry after an EST 202), is sent up front. Returns (response, data,
        password) for the first answer that is not a 401; ``password`` is the one the user gave.
        """
        headers = {b"Content-Type": [content_type]}
        sent = password
        for _round in range(MAX_ROUNDS):
            if sent is not None:
                creds = base64.b64encode(self.args.user.encode("utf-8") + b":" + sent.encode("utf-8"))
                headers[b"Authorization"] = [b"Basic " + creds]
            response, data = await self.request(b"POST", url, headers, body)
            if response.code != 401:
                return response, data, password
            token = (response.headers.getRawHeaders(CHALLENGE_HEADER) or [b""])[0]
            if token:
                prompt = printable(data.decode("utf-8", "replace").strip(), 200) or "Response"
                sent = self.next_password(prompt)
            elif sent is None:
                password = sent = self.next_password(None)
            else:
                raise ClientError("authentication failed (wrong user name or password)")
            headers = {b"Content-Type": [content_type]}
            if token:
                headers[CHALLENGE_HEADER] = [token]
        raise ClientError("too many authentication rounds")

    async def pki_operation(self, message: bytes):
        """POST the message, answering 401s with the user's credentials and challenge responses."""
        response, data, _ = await self.post_authenticated(f"{self.url}?operation=PKIOperation",
                                                          b"application/x-pki-message", message)
        if response.code == 200:
            return data
        raise ClientError(f"PKIOperation: HTTP {response.code}: {printable(data.decode('utf-8', 'replace').strip())}")


def _load_ca_certs(content_type: bytes, body: bytes):
    """(ca, ra or None, all certs) from a GetCACert answer."""
    if b"ca-ra-cert" in content_type:
        certs, _ = scep.parse_degenerate(body)
    else:
        certs = [x509.load_der_x509_certificate(body)]
    return certs


def _is_ca(cert) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        return False


def find_ca(certs, anchors, what: str):
    """The CA that issues our certificate, from a GetCACert or cacerts answer: its lowest CA certificate (no other
    one there is issued by it; a sub-CA comes with its issuers), which must be one we trust (--cafile,
    --ca-fingerprint) or chain up to one through the answer."""
    der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
    anchor_der = {der(a) for a in anchors}
    cas = [c for c in certs if _is_ca(c)]
    lowest = [c for c in cas if not any(o is not c and o.issuer == c.subject for o in cas)]

    def trusted(cert, depth=0):
        if der(cert) in anchor_der:
            return True
        for parent in [c for c in cas if c is not cert] + list(anchors):
            if depth < 8 and parent.subject == cert.issuer:
                try:
                    cert.verify_directly_issued_by(parent)
                except Exception:  # noqa: BLE001 - another key, another algorithm: not this one
                    continue
                if der(parent) in anchor_der or trusted(parent, depth + 1):
                    return True
        return False
    ca = next((c for c in lowest if trusted(c)), None)
    if ca is None:
        raise ClientError(f"the CA certificate from {what} is not, and is not issued by, one you trust "
                          "(--cafile/--ca-fingerprint)")
    return ca


def _select_ra(certs, ca):
    """The certificate that will decrypt our request and sign the CertRep: an RA issued by the CA, else the CA."""
    for cert in certs:
        if cert is ca:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except Exception:
            continue
        return cert
    return ca


def _transport_key(key):
    """The key that signs the SCEP message and receives the encrypted CertRep: RSA (key transport)."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key
    return generate_key("rsa2048")


def _self_signed(key, user, now):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user[:64] or "getcert")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))


def _csr(key, user):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user[:64] or "getcert")])
    algorithm = None if key.__class__.__name__.startswith("Ed") else hashes.SHA256()
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, algorithm)


async def enroll(reactor, args, password_source):
    parts = urlsplit(args.url)
    if parts.scheme != "https" or not parts.hostname:
        raise ClientError("--url must be an https:// URL (credentials are only sent inside TLS)")
    host, port = parts.hostname, parts.port or 443
    anchors = await threads.deferToThread(trust_anchors, args, host, port)
    session = ScepSession(reactor, args.url, PinnedTrust(anchors), args, password_source)
    if getattr(args, "protocol", "scep") == "est":
        from getcertd.est_client import enroll_est
        cert, key, ca = await enroll_est(reactor, session, anchors)
    else:
        cert, key, ca = await _enroll_scep(session, anchors, args)
    _save(args, cert, key, ca, password_source)
    return cert, key, ca


async def _enroll_scep(session, anchors, args):
    _, caps = await session.get("GetCACaps")
    caps = {c.strip().upper() for c in caps.decode("ascii", "replace").split()}
    response, body = await session.get("GetCACert", "&message=getcert")
    content_type = (response.headers.getRawHeaders(b"Content-Type") or [b""])[0]
    certs = _load_ca_certs(content_type, body)
    ca = find_ca(certs, anchors, "GetCACert")
    recipient = _select_ra(certs, ca)

    now = datetime.datetime.now(datetime.timezone.utc)
    key = generate_key(args.key_type)
    transport = _transport_key(key)
    signer = _self_signed(transport, args.user, now)
    csr = _csr(key, args.user)
    cipher = "aes256" if "AES" in caps else "des3"
    digest = "sha256" if "SHA-256" in caps else "sha1"
    nonce = scep.new_nonce()
    tid = scep.new_transaction_id(key.public_key())
    message = scep.build_signed(
        message_type=scep.MessageType.PKCSReq, transaction_id=tid, sender_nonce=nonce, signer_key=transport,
        signer_cert=signer, digest=digest,
        content=scep.build_envelope(csr.public_bytes(serialization.Encoding.DER), recipient, cipher=cipher))
    reply = await session.pki_operation(message)

    try:
        rep = scep.parse_signed(reply)
    except GetcertdError as e:
        raise ClientError(f"the CertRep does not verify: {e}")
    if _spki(rep.signer_cert.public_key()) != _spki(recipient.public_key()):
        raise ClientError("the CertRep is not signed by the CA or its RA")
    if rep.message_type != scep.MessageType.CertRep or rep.transaction_id != tid or rep.recipient_nonce != nonce:
        raise ClientError("the CertRep does not answer our request (type, transactionID or nonce mismatch)")
    status = rep.pki_status.value if hasattr(rep.pki_status, "value") else rep.pki_status
    if status == scep.PkiStatus.FAILURE.value:
        names = {i.value: i.name for i in FailInfo}
        raise ClientError(f"the request was refused: {names.get(rep.fail_info, rep.fail_info)}: "
                          f"{rep.fail_info_text or 'no reason given'}")
    if status != scep.PkiStatus.SUCCESS.value:
        raise ClientError(f"the request was not granted (pkiStatus {status})")
    plaintext, _ = scep.decrypt_envelope(rep.content, transport, signer)
    issued, _ = scep.parse_degenerate(plaintext)
    cert = next((c for c in issued if _spki(c.public_key()) == _spki(key.public_key())), None)
    if cert is None:
        raise ClientError("the CertRep holds no certificate for our key")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise ClientError("the issued certificate was not signed by the CA")
    return cert, key, ca


def _save(args, cert, key, ca, password_source):
    """Write key.pem, cert.pem, ca.pem (and getcert.p12, swanctl.conf when asked) whatever the protocol."""
    os.makedirs(args.out, exist_ok=True)
    write_file(os.path.join(args.out, "key.pem"), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    write_file(os.path.join(args.out, "cert.pem"), _pem(cert), 0o644)
    write_file(os.path.join(args.out, "ca.pem"), _pem(ca), 0o644)
    if args.p12:
        p12_password = password_source("Password for getcert.p12", secret_kind="p12")
        write_file(os.path.join(args.out, "getcert.p12"), pkcs12.serialize_key_and_certificates(
            b"getcert", key, cert, [ca], serialization.BestAvailableEncryption(p12_password.encode("utf-8"))
            if p12_password else serialization.NoEncryption()), 0o600)
    if args.swanctl:
        write_swanctl(args.out, args.swanctl, cert)
    print(f"getcert: issued {cert.subject.rfc4514_string()}, serial {cert.serial_number:X}, "
          f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC; files in {args.out}")


def strongswan_id(name: x509.Name) -> str:
    """The DN as a strongSwan identity that is exactly the certificate's subject. strongSwan's text form of a DN
    has no escapes (charon reads `CN=Doe\\, John` as another name, or none), so the DER itself, in hex."""
    return "asn1dn:#" + name.public_bytes().hex()


SWANCTL_CONF = """# strongSwan swanctl.conf written by getcert for the certificate in {out}.
# Load it with:  SWANCTL_DIR={out}/swanctl swanctl --load-all --file {out}/swanctl/swanctl.conf
# (swanctl reads private keys from its private/ directory: {out}/swanctl/private/getcert.pem is key.pem.)
connections {{
    getcertd {{
        version = 2
        remote_addrs = {gateway}
        vips = 0.0.0.0
        local {{
            auth = pubkey
            certs = {out}/cert.pem
            # the certificate's subject, as DER (quoted: # starts a comment)
            id = "{local_id}"
        }}
        remote {{
            auth = pubkey
            id = {gateway}
            cacerts = {out}/ca.pem
        }}
        children {{
            getcertd {{
                remote_ts = 0.0.0.0/0
            }}
        }}
    }}
}}
"""


def write_swanctl(out, gateway, cert):
    """DIR/swanctl/swanctl.conf with the paths filled in, and the key where swanctl looks for keys."""
    out = os.path.abspath(out)
    if not gateway or any(c in gateway for c in ' "{}\n#'):
        raise ClientError("--swanctl: expected the gateway's address or DNS name")
    base = os.path.join(out, "swanctl")
    for sub in ("", "private", "x509", "x509ca"):
        os.makedirs(os.path.join(base, sub), mode=0o700, exist_ok=True)
    with open(os.path.join(out, "key.pem"), "rb") as f:
        write_file(os.path.join(base, "private", "getcert.pem"), f.read(), 0o600)
    write_file(os.path.join(base, "swanctl.conf"), SWANCTL_CONF.format(
        out=out, gateway=gateway, local_id=strongswan_id(cert.subject)).encode(), 0o644)


def password_reader(use_stdin: bool):
    """A function giving the password first, then a response for each challenge prompt."""
    def read(prompt, secret_kind="password"):
        if use_stdin or secret_kind == "p12" and not sys.stdin.isatty():
            if prompt:
                print(f"getcert: {prompt}", file=sys.stderr)
            line = sys.stdin.readline()
            if not line:
                raise ClientError("standard input ended before a password or response was read")
            return line.rstrip("\r\n")
        if secret_kind == "p12":
            first = getpass.getpass(prompt + ": ")
            if first != getpass.getpass("Again: "):
                raise ClientError("the PKCS#12 passwords differ")
            return first
        return getpass.getpass((prompt or "Password") + ": ")
    return read


def main(argv=None):
    ap = argparse.ArgumentParser(prog="getcert", description="Enroll for a short-lived IKE certificate.")
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("enroll", help="authenticate and enroll")
    e.add_argument("--url", required=True, help="e.g. https://vpn-ca.example.com:8443/scep (SCEP) or "
                   "https://vpn-ca.example.com:8443/.well-known/est[/LABEL] (EST)")
    e.add_argument("--protocol", choices=["scep", "est"], default="scep",
                   help="SCEP (default) or EST (RFC 7030) with HTTP Basic authentication")
    e.add_argument("--user", required=True)
    e.add_argument("--password-stdin", action="store_true",
                   help="read the password, then each challenge response, one line at a time from standard input")
    trust = e.add_mutually_exclusive_group(required=True)
    trust.add_argument("--cafile", help="PEM file of the CA to trust")
    trust.add_argument("--ca-fingerprint", help="sha256:HEX of the CA certificate to trust")
    e.add_argument("--out", required=True, help="directory for key.pem, cert.pem, ca.pem")
    e.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT,
                   help=f"seconds to wait for each answer of the server (default {REQUEST_TIMEOUT})")
    e.add_argument("--key-type", default="rsa2048", choices=["rsa2048", "rsa3072", "ec-p256", "ec-p384", "ed25519"])
    e.add_argument("--p12", action="store_true",
                   help="also write DIR/getcert.p12; its password is the next line of standard input (or asked)")
    e.add_argument("--swanctl", metavar="GATEWAY",
                   help="also write DIR/swanctl/swanctl.conf for a strongSwan client connecting to GATEWAY")
    args = ap.parse_args(argv)
    result = {}

    async def run(reactor):
        try:
            await enroll(reactor, args, password_reader(args.password_stdin))
        except ClientError as err:
            result["error"] = str(err)
        except (GetcertdError, ValueError, UnsupportedAlgorithm) as err:  # what a hostile answer raises
            result["error"] = f"the server's answer can't be used: {str(err).splitlines()[0] if str(err) else err!r}"
        except OSError as err:  # writing the results
            result["error"] = f"{err.filename or ''}: {err.strerror or err}"
    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            print("getcert: failed unexpectedly", file=sys.stderr)
            return 1
    if "error" in result:
        print(f"getcert: {printable(result['error'], 1000)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
