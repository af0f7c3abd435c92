"""HTTP connection limits: header and body caps, a deadline for each request to arrive (slowloris), an
idle timeout, and a cap on concurrent connections answered with a clear 503.

Twisted's HTTPChannel resets its timeout on every byte received, so a client trickling one header byte at a
time would hold a connection forever; here each request must arrive whole within ``request_timeout``.

A client that pipelines requests and never reads the answers: Twisted's HTTPChannel keeps answering the
requests it has buffered while the transport's send buffer is full, and keeps reading more (27 MB of
pipelined GetCACert grew the server to 1 GB). Here a channel whose transport asks it to pause stops parsing
and reading until the transport drains, so one connection holds at most its send buffer and one answer.
A connection told to close is aborted if it has not gone ``abortTimeout`` seconds later (a peer that never
reads would otherwise hold its unsent answer forever).
"""
import inspect

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.web import http, server

log = Logger()

MAX_BODY = 2 * 1024 * 1024  # request bodies
# Request lines and bodies held at once, all connections of a site together: a request waiting for its answer
# (RADIUS slow or down: seconds) holds about twice its body, so max_connections x MAX_BODY would be gigabytes.
MAX_HELD = 64 * 1024 * 1024
MAX_URI = 256 * 1024  # the request line; real SCEP GET messages are a few KiB
MAX_HEADER_BYTES = MAX_URI + 16 * 1024
MAX_HEADERS = 100


def _canned(code: int, reason: str, text: str, extra: bytes = b"") -> bytes:
    body = text.encode() + b"\n"
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n" + body


class GuardedChannel(http.HTTPChannel):
    """An HTTP/1.1 channel with caps and a whole-request deadline."""
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES
    MAX_LENGTH = MAX_HEADER_BYTES
    request_timeout = 30.0

    _deadline = None
    _rejected = False
    _body_bytes = 0
    _held = 0  # bytes of the current request counted in the site's ``held``
    _counted = False
    _host = None  # the peer's IP address, counted in the site's by_address
    _between_requests = False
    _abort_call = None

    def connectionMade(self):
        super().connectionMade()
        self._arm()

    def _arm(self):
        self._disarm()
        self._deadline = self.callLater(self.request_timeout, self._too_slow)

    def _disarm(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self):
        self._deadline = None
        log.info("cut off a client that did not send a whole request in {t:.0f} s", t=self.request_timeout)
        self._reject(408, "Request Timeout", f"the request did not arrive within {self.request_timeout:.0f} s")

    def _reject(self, code, reason, text, extra=b""):
        if self._rejected:
            return
        self._rejected = True
        self._disarm()
        self.transport.write(_canned(code, reason, text, extra))
        self.transport.loseConnection()
        self._abort_later()

    def _abort_later(self):
        """After loseConnection: abort ``abortTimeout`` seconds later if the unsent answer never goes out."""
        if self._abort_call is None:
            self._abort_call = self.callLater(self.abortTimeout, self.transport.abortConnection)

    def _respondToBadRequestAndDisconnect(self):
        super()._respondToBadRequestAndDisconnect()
        self._abort_later()

    def pauseProducing(self):
        """The transport's send buffer is full: stop answering pipelined requests and stop reading."""
        super().pauseProducing()
        self.paused = True  # LineReceiver stops parsing what it has buffered
        self._networkProducer.pauseProducing()

    def resumeProducing(self):
        super().resumeProducing()  # reading resumes here, or at requestDone while a request is in hand
        if self.paused:
            self.paused = False
            if self._buffer and not self._rejected:
                self.dataReceived(b"")  # go on with the pipelined requests already buffered

    def _hold(self, n) -> bool:
        """Count ``n`` more bytes of this request against the site's budget; False (and a 503) past it."""
        self._held += n
        self.factory.held += n
        if self.factory.held > self.factory.max_held:
            self.factory.refused_busy += 1
            self._reject(503, "Service Unavailable", "too many requests in progress; try again shortly",
                         b"Retry-After: 5\r\n")
            return False
        return True

    def _release(self):
        self.factory.held -= self._held
        self._held = 0

    def dataReceived(self, data):
        if self._rejected:
            return
        if self._between_requests:  # the first byte of the next request on a keep-alive connection
            self._between_requests = False
            self._arm()
        super().dataReceived(data)

    def lineReceived(self, line):
        if not self._rejected:
            super().lineReceived(line)

    def rawDataReceived(self, data):
        if not self._rejected:
            super().rawDataReceived(data)

    def allHeadersReceived(self):
        self._body_bytes = 0
        if self.length is not None and self.length > MAX_BODY:
            self._reject(413, "Payload Too Large", f"request body too large (limit {MAX_BODY} bytes)")
            return
        if not self._hold(len(getattr(self, "_path", b"") or b"")):  # the request line: a GET message is in it
            return
        super().allHeadersReceived()

    def body_chunk(self, data) -> bool:
        """Count a piece of request body (GuardedRequest calls this); False once past the cap.

        HTTPChannel hands body data straight to the request (its transfer decoders call
        Request.handleContentChunk), so the count lives here but is driven from the request: a chunked body
        announces no length and would otherwise be spooled to a temporary file without limit.
        """
        if self._rejected:
            return False
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY:
            self._reject(413, "Payload Too Large", f"request body too large (limit {MAX_BODY} bytes)")
            return False
        return self._hold(len(data))

    def allContentReceived(self):
        if self._rejected:
            return
        self._disarm()  # the request is in; processing time is the application's business
        self.factory.processing += 1
        super().allContentReceived()

    def requestDone(self, request):
        self.factory.processing -= 1
        self._release()
        super().requestDone(request)
        self._between_requests = True  # waiting is idle_timeout's business until a byte arrives

    def connectionLost(self, reason):
        self._disarm()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._release()
        if self._counted:
            self._counted = False
            self.factory.connection_closed(self._host)
        super().connectionLost(reason)


class GuardedRequest(server.Request):
    """A request whose body counts against its channel's cap as it arrives."""

    def handleContentChunk(self, data):
        body_chunk = getattr(self.channel, "body_chunk", None)
        if body_chunk is None or body_chunk(data):
            super().handleContentChunk(data)


class Overloaded(protocol.Protocol):
    """Past the connection cap: a clear 503, then close."""

    def connectionMade(self):
        self.transport.write(_canned(503, "Service Unavailable", "too many connections; try again shortly",
                                     b"Retry-After: 5\r\n"))
        self.transport.loseConnection()


class GuardedSite(server.Site):
    """A Site whose channels are GuardedChannels, at most ``max_connections`` at a time (``max_per_address`` from
    one IP address), holding at most ``max_held`` bytes of request lines and bodies at a time (past any of
    these: 503 with Retry-After)."""
    protocol = GuardedChannel
    requestFactory = GuardedRequest

    def __init__(self, resource, max_connections=1000, request_timeout=30.0, idle_timeout=60.0, max_held=MAX_HELD,
                 max_per_address=None, **kw):
        # getcertd reads request bodies raw (SCEP, EST), never as HTML forms: without this, every POST with a
        # Content-Type has it parsed with the email package (about a third of twisted.web's time per request).
        if "parsePOSTFormSubmission" in inspect.signature(server.Site.__init__).parameters:
            kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, timeout=idle_timeout, **kw)
        self.max_connections = max_connections
        self.max_per_address = max_per_address or max_connections
        self.request_timeout = request_timeout
        self.active = 0
        self.by_address = {}  # IP address -> connections open from it
        self.refused = 0
        self.processing = 0  # requests received whole and not yet answered
        self.max_held = max_held
        self.held = 0  # bytes of request lines and bodies of the requests in progress
        self.refused_busy = 0

    def buildProtocol(self, addr):
        host = getattr(addr, "host", None)  # None: a UNIX socket
        if self.active >= self.max_connections or self.by_address.get(host, 0) >= self.max_per_address:
            self.refused += 1
            p = Overloaded()
            p.factory = self
            return p
        channel = super().buildProtocol(addr)
        channel.request_timeout = self.request_timeout
        channel._counted, channel._host = True, host
        self.active += 1
        if host is not None:
            self.by_address[host] = self.by_address.get(host, 0) + 1
        return channel

    def connection_closed(self, host=None):
        self.active -= 1
        if host is not None:
            left = self.by_address.pop(host) - 1
            if left:
                self.by_address[host] = left


class Drain(service.Service):
    """On shutdown, after the listeners have stopped accepting: wait (at most ``timeout`` seconds) until the
    sites have answered every request they received, so in-flight enrollments finish and are journalled."""
    name = "drain"

    def __init__(self, sites, clock, timeout=20.0):
        self.sites = sites
        self.clock = clock
        self.timeout = timeout

    def stopService(self):
        super().stopService()
        done = defer.Deferred()
        deadline = self.clock.seconds() + self.timeout

        def check():
            busy = sum(site.processing for site in self.sites)
            if busy == 0:
                done.callback(None)
            elif self.clock.seconds() >= deadline:
                log.warn("shutting down with {n} requests still in progress", n=busy)
                done.callback(None)
            else:
                self.clock.callLater(0.05, check)
        check()
        return done

