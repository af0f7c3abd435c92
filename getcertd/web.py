"""The HTTP edge: SCEP resources on twisted.web, and the one place where errors become HTTP answers.

The HTTP layer never sees ASN.1: it moves bytes between the request and the enrollment service.
"""
import base64
import binascii
import html
from typing import Optional
from urllib.parse import parse_qsl, unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import datetimeToString as http_date

from getcertd.enroll import Credentials
from getcertd.httpguard import MAX_URI, GuardedSite
from getcertd.errors import (AuthenticationRequired, AuthUnavailable, KeyJobFailed, MalformedRequest,
                             ScepFailure, StorageUnavailable, Throttled)

log = Logger()

MAX_MESSAGE = 2 * 1024 * 1024  # request bodies and query strings
REALM = "getcertd"
CHALLENGE_HEADER = b"Getcertd-Challenge"


class HttpError(Exception):
    """An HTTP answer decided at the edge (e.g. 403 for Basic over plain HTTP)."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code
        self.text = text


def _plain(request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return text.encode("utf-8") + b"\n"


def answer_error(request, failure: Failure, est: bool = False) -> bytes:
    """Map a typed error to an HTTP answer: the one place this happens. Never a traceback to the client.

    ``est``: the answer is for EST (RFC 7030), where an unreachable authentication backend is a 202 with
    Retry-After (the client repeats the request) and a refusal (ScepFailure) a 400 with its reason.
    """
    e = failure.value
    if isinstance(e, MalformedRequest):
        return _plain(request, 400, f"bad request: {e}")
    if isinstance(e, HttpError):
        return _plain(request, e.code, e.text)
    if isinstance(e, AuthenticationRequired):
        request.setHeader(b"WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode())
        if e.token:
            request.setHeader(CHALLENGE_HEADER, e.token.encode("ascii"))
            return _plain(request, 401, e.message)
        return _plain(request, 401, e.message or "authentication required")
    if isinstance(e, ScepFailure):  # only EST gets here: SCEP answers refusals with a FAILURE CertRep
        return _plain(request, 400, f"refused: {e.text}")
    if isinstance(e, Throttled):
        request.setHeader(b"Retry-After", str(e.retry_after).encode())
        return _plain(request, 429, str(e))
    if isinstance(e, AuthUnavailable):
        request.setHeader(b"Retry-After", b"30")
        if est:
            return _plain(request, 202, "the authentication service is unavailable; retry later")
        return _plain(request, 503, "the authentication service is unavailable; try again later")
    if isinstance(e, StorageUnavailable):
        request.setHeader(b"Retry-After", b"10")
        return _plain(request, 503, "issuance is suspended: the issuance log can't be written; try again later")
    if isinstance(e, KeyJobFailed):
        log.error("answering {uri}: {error}", uri=request.uri, error=e)
        request.setHeader(b"Retry-After", b"5")
        return _plain(request, 503, "the request could not be completed; try again")
    log.failure("unexpected error answering {uri}", failure, uri=request.uri)
    return _plain(request, 500, "internal error")


def _finish(request, body: bytes):
    if not request.finished and not getattr(request, "_disconnected", False):
        request.setHeader(b"Content-Length", b"%d" % len(body))  # one write: no chunked encoding (as EST does)
        request.write(body)
        request.finish()


MAX_USER_BYTES = 253  # what a RADIUS User-Name holds (RFC 2865 5.1)


def parse_basic(header: Optional[bytes]) -> Optional[tuple]:
    """(user, password bytes) from an Authorization: Basic header, or None if absent."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise AuthenticationRequired("only Basic authentication is supported")
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
        user, sep, password = decoded.partition(b":")
        if not sep:
            raise ValueError
        user = user.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise HttpError(400, "bad request: malformed Basic credentials") from None
    if len(user.encode()) > MAX_USER_BYTES:
        raise HttpError(400, f"bad request: a user name longer than {MAX_USER_BYTES} bytes")
    return user, password


def decode_message(raw: bytes) -> bytes:
    """A PKIOperation message from a GET query value or a POST body: DER, or base64 of DER.

    Tolerates the unescaped '+' and '/' that many clients leave in the query (a '+' that was turned into a
    space is turned back), percent-escapes, line breaks and missing padding.
    """
    if raw[:1] == b"\x30":
        return raw
    text = b"".join(raw.replace(b" ", b"+").split())
    text = text.replace(b"-", b"+").replace(b"_", b"/")
    text += b"=" * (-len(text) % 4)
    try:
        der = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest("the message is neither DER nor base64") from None
    if der[:1] != b"\x30":
        raise MalformedRequest("the message is not a DER-encoded CMS structure")
    return der


def query_message(uri: bytes) -> Optional[bytes]:
    """The raw ``message`` value of the query string, percent-decoded but with '+' kept as '+'."""
    _, _, query = uri.partition(b"?")
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if name == b"message":
            # Bytes to bytes: unquote() would decode %XX as UTF-8, and a non-UTF-8 escape such as %C4%80
            # or %FF then fails to re-encode (an uncaught UnicodeEncodeError, HTTP 500; found by scripts/fuzz).
            return unquote_to_bytes(value)
    return None


def _operation(request) -> str:
    _, _, query = request.uri.partition(b"?")
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name == "operation":
            return value
    return ""


class ScepResource(resource.Resource):
    """One PKI-PATH (e.g. /cgi-bin/pkiclient.exe): GetCACaps, GetCACert, GetCACertChain, PKIOperation."""
    isLeaf = True

    def __init__(self, service, ca_material, secure: bool, caps: bytes):
        super().__init__()
        self.service = service
        self.ca = ca_material  # .ca_cert_body, .ca_cert_type, .chain_body
        self.secure = secure
        self.caps = caps

    def render_GET(self, request):
        return self._render(request, None)

    def render_POST(self, request):
        length = request.content.seek(0, 2)
        if length > MAX_MESSAGE:
            return _plain(request, 413, f"request body too large (limit {MAX_MESSAGE} bytes)")
        request.content.seek(0)
        return self._render(request, request.content.read())

    def _render(self, request, body):
        if len(request.uri) > MAX_URI - 1024:
            return _plain(request, 414, f"request URI too long (limit {MAX_URI - 1024} bytes)")
        op = _operation(request)
        if op == "GetCACaps":
            request.setHeader(b"Content-Type", b"text/plain")
            return self.caps
        if op == "GetCACert":
            request.setHeader(b"Content-Type", self.ca.ca_cert_type)
            return self.ca.ca_cert_body
        if op == "GetCACertChain":
            request.setHeader(b"Content-Type", b"application/x-x509-ca-ra-cert-chain")
            return self.ca.chain_body
        if op == "PKIOperation":
            return self._pki_operation(request, body)
        if not op:
            return _plain(request, 400, "bad request: no operation= parameter")
        return _plain(request, 400, f"bad request: unsupported operation {op[:40]!r}")

    def _pki_operation(self, request, body):
        try:
            if body is None:
                raw = query_message(request.uri)
                if raw is None:
                    raise MalformedRequest("PKIOperation by GET needs a message= parameter")
            else:
                raw = body
            der = decode_message(raw)
            credentials = None
            basic = parse_basic(request.getHeader(b"Authorization"))
            if basic is not None:
                if not self.secure:
                    raise HttpError(403, "HTTP authentication is refused over plain HTTP; use HTTPS")
                token = (request.getHeader(CHALLENGE_HEADER) or b"").strip()[:200].decode("ascii", "replace")
                credentials = Credentials(basic[0], basic[1], token)
            client = request.getClientAddress()
            client = getattr(client, "host", str(client))
        except Exception:
            return answer_error(request, Failure())

        d = defer.maybeDeferred(self.service.pki_operation, der, credentials, client, self.secure)

        def done(reply):
            request.setHeader(b"Content-Type", b"application/x-pki-message")
            return reply
        d.addCallbacks(done, lambda f: answer_error(request, f))
        d.addCallback(lambda body: _finish(request, body))
        d.addErrback(lambda f: log.failure("writing a PKIOperation answer", f))
        request.notifyFinish().addErrback(lambda _: setattr(request, "_disconnected", True))
        return server.NOT_DONE_YET


def landing_page(ca_subject: str, fingerprint: str, scep_url: str, enroll_line: str, crl_next_update=None) -> bytes:
    """The small HTML page at / (the draft uses HTML as a data representation): no script, no private data.

    ``crl_next_update``: the served CRL's nextUpdate (a datetime), or None before the first CRL.
    """
    e = html.escape
    next_update = crl_next_update.strftime("%Y-%m-%d %H:%M:%S UTC") if crl_next_update else "no CRL published yet"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>getcertd</title>
<style>body{{font-family:sans-serif;max-width:46em;margin:2em auto;line-height:1.5}}code{{background:#eee;padding:0 .2em}}</style>
</head><body>
<h1>getcertd certificate enrollment</h1>
<p>CA: <code id="ca-subject">{e(ca_subject)}</code></p>
<p>SHA-256 fingerprint: <code id="ca-fingerprint">{e(fingerprint)}</code></p>
<p>SCEP URL: <code id="scep-url">{e(scep_url)}</code></p>
<p>Enroll: <code id="enroll">{e(enroll_line)}</code></p>
<p>CA certificate: <a id="ca-der" href="/ca.crt">DER</a>, <a id="ca-pem" href="/ca.pem">PEM</a></p>
<p>CRL: <a id="crl-der" href="/crl">DER</a>, <a id="crl-pem" href="/crl.pem">PEM</a>;
next update <time id="crl-next-update">{e(next_update)}</time></p>
</body></html>
""".encode()


class Root(resource.Resource):
    """The site root: the SCEP paths, CA downloads, the CRL and the landing page.

    ``page``: the landing page's bytes, or a function returning them (it shows the CRL's next update); empty:
    no page (plain HTTP).
    """

    def __init__(self, page=b""):
        super().__init__()
        self.page = page

    def getChild(self, path, request):
        if path == b"" and request.postpath == [] and self.page:
            return self
        return resource.NoResource("no such resource")

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return self.page() if callable(self.page) else self.page


class Download(resource.Resource):
    """Fixed bytes with a content type (the CA certificate)."""
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes):
        super().__init__()
        self.body = body
        self.content_type = content_type

    def render_GET(self, request):
        request.setHeader(b"Content-Type", self.content_type)
        return self.body


class CrlResource(resource.Resource):
    """The current CRL of a getcertd.crl.CrlPublisher: DER (application/pkix-crl, RFC 5280 section 4.2.1.13)
    or PEM. Revalidated on each use: a revocation publishes a new CRL at once."""
    isLeaf = True

    def __init__(self, publisher, pem: bool = False):
        super().__init__()
        self.publisher = publisher
        self.pem = pem

    def render_GET(self, request):
        body = self.publisher.pem if self.pem else self.publisher.der
        if body is None:
            request.setHeader(b"Retry-After", b"5")
            return _plain(request, 503, "no CRL has been published yet; try again in a few seconds")
        request.setHeader(b"Content-Type", b"application/x-pem-file" if self.pem else b"application/pkix-crl")
        request.setHeader(b"Cache-Control", b"no-cache")
        if self.publisher.this_update is not None:
            request.setHeader(b"Last-Modified", http_date(self.publisher.this_update.timestamp()))
        return body


def add_downloads(root: resource.Resource, ca_cert_der: bytes, ca_cert_pem: bytes, crl_publisher) -> None:
    """/ca.crt, /ca.pem, /crl and /crl.pem."""
    root.putChild(b"ca.crt", Download(ca_cert_der, b"application/pkix-cert"))
    root.putChild(b"ca.pem", Download(ca_cert_pem, b"application/x-pem-file"))
    root.putChild(b"crl", CrlResource(crl_publisher))
    root.putChild(b"crl.pem", CrlResource(crl_publisher, pem=True))


class MetricsResource(resource.Resource):
    """/metrics: the Prometheus text format of a getcertd.stats.Stats, collected on the reactor thread."""
    isLeaf = True

    def __init__(self, stats):
        super().__init__()
        self.stats = stats

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return self.stats.metrics_text()


def metrics_root(stats) -> resource.Resource:
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(stats))
    return root


def add_path(root: resource.Resource, path: str, leaf: resource.Resource) -> None:
    """Mount ``leaf`` at an absolute path such as /cgi-bin/pkiclient.exe, creating intermediate nodes."""
    parts = [p.encode() for p in path.strip("/").split("/")]
    node = root
    for part in parts[:-1]:
        child = node.children.get(part)
        if child is None:
            child = resource.Resource()
            node.putChild(part, child)
        node = child
    node.putChild(parts[-1], leaf)


class Site(GuardedSite):
    """Connection limits (getcertd.httpguard), no tracebacks to clients, and no access log lines carrying query
    strings (they may hold secrets).

    With ``stats`` (a getcertd.stats.Stats) and ``endpoint`` (request path bytes -> a short label), each answer's
    latency and status code are counted.
    """
    displayTracebacks = False
    stats = None
    endpoint = staticmethod(lambda path: "other")

    def getResourceFor(self, request):
        if self.stats is not None:
            request.getcertd_started = self.stats.clock.seconds()
        return super().getResourceFor(request)

    def log(self, request):
        started = getattr(request, "getcertd_started", None)
        if started is not None and self.stats is not None:
            self.stats.observe_request(self.endpoint(request.path), request.code,
                                       self.stats.clock.seconds() - started)
