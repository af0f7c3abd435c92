"""getcert's EST side (RFC 7030), for ``getcert enroll --protocol est``.

Same trust and authentication as SCEP (getcertd.client): the TLS server is checked against the pinned CA,
cacerts must hold that CA, and simpleenroll answers the 401 with HTTP Basic and any challenge rounds. A 202
(the server's authentication backend is slow or down) is retried after its Retry-After.
"""
import sys
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives import serialization
from twisted.internet import task

from getcertd import est, scep
from getcertd.ca import generate_key
from getcertd.client import ClientError, _csr, _spki, find_ca, printable
from getcertd.errors import GetcertdError

MAX_WAITS = 3
MAX_RETRY_AFTER = 60


def est_base(url: str) -> str:
    """The EST base URL (…/.well-known/est or …/.well-known/est/LABEL) from what the user gave."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if est.WELL_KNOWN not in path:
        path += est.WELL_KNOWN
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _text(data: bytes) -> str:
    return printable(data[:300].decode("utf-8", "replace").strip())


def _retry_after(response) -> int:
    value = (response.headers.getRawHeaders(b"Retry-After") or [b""])[0]
    try:
        return max(1, min(int(value), MAX_RETRY_AFTER))
    except ValueError:
        return 10


async def enroll_est(reactor, session, anchors):
    """(certificate, key, CA certificate) enrolled by EST simpleenroll."""
    args = session.args
    base = est_base(args.url)
    response, body = await session.request(b"GET", base + "/cacerts")
    if response.code != 200:
        raise ClientError(f"cacerts: HTTP {response.code}: {_text(body)}")
    try:
        certs, _ = scep.parse_degenerate(est.decode_body(body, "cacerts"))
    except GetcertdError as e:
        raise ClientError(f"the cacerts answer can't be read: {e}")
    ca = find_ca(certs, anchors, "cacerts")

    key = generate_key(args.key_type)
    request = est.encode_body(_csr(key, args.user).public_bytes(serialization.Encoding.DER))
    password = None
    for _ in range(MAX_WAITS + 1):
        response, data, password = await session.post_authenticated(base + "/simpleenroll", est.PKCS10_TYPE,
                                                                     request, password)
        if response.code != 202:
            break
        delay = _retry_after(response)
        print(f"getcert: {_text(data) or 'the request is pending'}; retrying in {delay} s", file=sys.stderr)
        await task.deferLater(reactor, delay, lambda: None)
    else:
        raise ClientError("the server still could not decide the request; try again later")
    if response.code != 200:
        raise ClientError(f"simpleenroll: HTTP {response.code}: {_text(data)}")
    try:
        issued, _ = scep.parse_degenerate(est.decode_body(data, "simpleenroll"))
    except GetcertdError as e:
        raise ClientError(f"the simpleenroll answer can't be read: {e}")
    cert = next((c for c in issued if _spki(c.public_key()) == _spki(key.public_key())), None)
    if cert is None:
        raise ClientError("the simpleenroll answer holds no certificate for our key")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise ClientError("the issued certificate was not signed by the CA")
    return cert, key, ca
