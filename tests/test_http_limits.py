"""HTTP limits: a unit test of the channel's deadline on a deterministic clock, and the caps against a real twistd."""
import socket
import ssl
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import resource, server

from getcertd.httpguard import MAX_BODY, GuardedSite


def _channel(site, clock):
    ch = site.buildProtocol(None)
    ch.callLater = clock.callLater
    tr = StringTransport()
    ch.makeConnection(tr)
    return ch, tr


def test_slow_request_is_cut_off_on_a_clock():
    clock = Clock()
    site = GuardedSite(resource.Resource(), max_connections=2, request_timeout=30, idle_timeout=600,
                       reactor=clock)
    ch, tr = _channel(site, clock)
    for _ in range(29):  # one header byte a second: Twisted's own idle timeout would never fire
        ch.dataReceived(b"X")
        clock.advance(1)
    assert not tr.disconnecting
    clock.advance(1.5)
    assert tr.value().startswith(b"HTTP/1.1 408") and tr.disconnecting
    ch.connectionLost(None)
    assert site.active == 0


def test_connection_cap_and_body_cap_on_a_clock():
    clock = Clock()
    site = GuardedSite(resource.Resource(), max_connections=1, reactor=clock)
    ch, tr = _channel(site, clock)
    over, tr2 = _channel(site, clock)
    assert tr2.value().startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in tr2.value() and tr2.disconnecting
    ch.dataReceived(b"POST /scep HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    assert tr.value().startswith(b"HTTP/1.1 413") and tr.disconnecting
    ch.connectionLost(None)
    assert site.active == 0 and site.refused == 1


def test_connections_from_one_address_are_capped_on_a_clock():
    from twisted.internet.address import IPv4Address
    clock = Clock()
    site = GuardedSite(resource.Resource(), max_connections=10, max_per_address=2, reactor=clock)

    def connect(host):
        ch = site.buildProtocol(IPv4Address("TCP", host, 40000))
        tr = StringTransport()
        ch.makeConnection(tr)
        return ch, tr
    first, second = connect("192.0.2.1"), connect("192.0.2.1")
    _, over = connect("192.0.2.1")
    assert over.value().startswith(b"HTTP/1.1 503") and over.disconnecting and site.refused == 1
    _, other = connect("192.0.2.2")  # another address still gets in
    assert not other.value() and site.by_address == {"192.0.2.1": 2, "192.0.2.2": 1}
    first[0].connectionLost(None)
    _, again = connect("192.0.2.1")  # a slot given back
    assert not again.value() and site.by_address["192.0.2.1"] == 2 and site.active == 3


def test_one_address_cannot_take_every_connection_of_a_real_appliance(appliance_factory):
    app = appliance_factory(sections={"https": {"max_connections": "10", "max_connections_per_address": "3"}})

    def connect(source):
        raw = socket.create_connection(("127.0.0.1", app.port), 5, source_address=(source, 0))
        s = ssl.create_default_context(cafile=app.ca_pem).wrap_socket(raw, server_hostname="localhost")
        s.settimeout(10)
        return s
    held = [connect("127.0.0.1") for _ in range(3)]
    assert _read_all(connect("127.0.0.1")).startswith(b"HTTP/1.1 503")
    other = connect("127.0.0.2")
    other.sendall(b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"POSTPKIOperation" in _read_all(other)
    for s in held:
        s.close()


def _tls(app):
    ctx = ssl.create_default_context(cafile=app.ca_pem)
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", app.port), 5), server_hostname="localhost")
    s.settimeout(10)
    return s


def _read_all(s):
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ssl.SSLError, OSError):
        pass
    s.close()
    return data


def test_caps_against_a_real_appliance(appliance_factory):
    app = appliance_factory(sections={"https": {"max_connections": "4", "request_timeout": "2s",
                                                 "idle_timeout": "3s"}})
    # slowloris: one header byte every 0.4 s is cut off after the 2 s request deadline
    s = _tls(app)
    s.sendall(b"GET /scep?operation=GetCACaps HTTP/1.1\r\n")
    t0 = time.monotonic()
    for _ in range(20):
        try:
            s.sendall(b"X")
        except OSError:
            break
        time.sleep(0.4)
        if time.monotonic() - t0 > 2.5:
            break
    reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - t0 < 6
    # too many headers, a body over the cap, a URI over the cap: clear 4xx, the server lives on
    s = _tls(app)
    s.sendall(b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n")
    assert _read_all(s).startswith(b"HTTP/1.1 400")
    s = _tls(app)
    s.sendall(b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nContent-Length: 3145728\r\n\r\n")
    r = _read_all(s)
    assert r.startswith(b"HTTP/1.1 413") and b"too large" in r
    s = _tls(app)
    s.sendall(b"GET /scep?operation=PKIOperation&message=" + b"A" * 265000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    r = _read_all(s)
    assert r.startswith(b"HTTP/1.1 414") and b"too long" in r
    # the connection cap: 4 idle connections held, the 5th gets a 503 with Retry-After
    time.sleep(0.5)  # let the server see the closes above
    held = [_tls(app) for _ in range(4)]
    s = _tls(app)
    r = _read_all(s)
    assert r.startswith(b"HTTP/1.1 503") and b"Retry-After" in r
    # idle connections are closed after idle_timeout, freeing the slots
    t0 = time.monotonic()
    for h in held:  # a fresh connection that sends nothing is cut at the request deadline
        assert _read_all(h).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - t0 < 8
    # a keep-alive connection: two requests, then closed quietly after idle_timeout
    s = _tls(app)
    for _ in range(2):
        s.sendall(b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
    t0 = time.monotonic()
    r = _read_all(s)
    assert r.count(b"POSTPKIOperation") == 2 and b"408" not in r and 2 < time.monotonic() - t0 < 8


def test_drain_waits_for_requests_in_progress_within_a_bound():
    from getcertd.httpguard import Drain
    clock = Clock()
    site = GuardedSite(resource.Resource(), reactor=clock)
    site.processing = 2
    d = Drain([site], clock, timeout=5).stopService()
    fired = []
    d.addCallback(fired.append)
    clock.advance(1)
    assert not fired
    site.processing = 0
    clock.advance(0.05)
    assert fired
    site.processing = 1  # a request that never ends doesn't hold shutdown past the bound
    d = Drain([site], clock, timeout=5).stopService()
    fired = []
    d.addCallback(fired.append)
    for _ in range(110):
        clock.advance(0.05)
    assert fired


class _Held(resource.Resource):
    """Answers nothing until told: requests stay in progress, as while RADIUS is slow."""
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        return server.NOT_DONE_YET


def test_bytes_held_by_requests_in_progress_are_capped_on_a_clock():
    """Requests waiting for their answer (RADIUS slow or down: seconds) hold about twice their body; with 2 MiB
    bodies, 100 of them held 440 MiB (tests/test_load_faults), and max_connections of them would hold
    gigabytes. Past max_held bytes of request lines and bodies, a request gets a 503 with Retry-After."""
    clock = Clock()
    held = _Held()
    site = GuardedSite(held, max_held=1000 * 1000, reactor=clock)
    post = b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nContent-Length: 600000\r\n\r\n"
    first, tr1 = _channel(site, clock)
    first.dataReceived(post + b"x" * 600000)
    assert len(held.requests) == 1 and site.held == 600000 + len(b"/scep?operation=PKIOperation")
    second, tr2 = _channel(site, clock)
    second.dataReceived(post + b"x" * 600000)
    assert tr2.value().startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in tr2.value() and tr2.disconnecting
    assert len(held.requests) == 1 and site.refused_busy == 1
    second.connectionLost(None)  # its bytes are given back with the connection
    assert site.held == 600000 + len(b"/scep?operation=PKIOperation")
    held.requests[0].write(b"done")
    held.requests[0].finish()  # the first is answered: its bytes are given back
    assert site.held == 0
    third, tr3 = _channel(site, clock)
    third.dataReceived(post + b"x" * 600000)
    assert len(held.requests) == 2 and not tr3.value()
    third.connectionLost(None)
    assert site.held == 0
    # a long request line counts too (a GET message is in it)
    site = GuardedSite(held, max_held=100 * 1000, reactor=clock)
    fourth, tr4 = _channel(site, clock)
    fourth.dataReceived(b"GET /scep?operation=PKIOperation&message=" + b"A" * 200000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert tr4.value().startswith(b"HTTP/1.1 503") and len(held.requests) == 2
    fourth.connectionLost(None)
    assert site.held == 0


class _Answers(resource.Resource):
    isLeaf = True

    def render(self, request):
        return b"answer %s\n" % request.args.get(b"n", [b"?"])[0]


class _FullAfterEachWrite(StringTransport):
    """A transport whose send buffer fills with every answer until drained: it pauses its producer as a TCP or
    TLS transport does when the peer stops reading."""
    aborted = False

    def write(self, data):
        super().write(data)
        if self.producer is not None:
            self.producer.pauseProducing()

    def abortConnection(self):
        self.aborted = True


def test_pipelined_requests_wait_while_the_peer_does_not_read():
    """A client that pipelines requests and never reads the answers grew the server by 1 GB for 27 MB sent
    (Twisted's HTTPChannel went on answering buffered requests into a full send buffer, and reading more). The
    channel stops parsing and reading while its transport is paused and goes on when it drains."""
    clock = Clock()
    site = GuardedSite(_Answers(), reactor=clock)
    ch = site.buildProtocol(None)
    ch.callLater = clock.callLater
    tr = _FullAfterEachWrite()
    ch.makeConnection(tr)
    ch.dataReceived(b"".join(b"GET /x?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
    assert tr.value().count(b"answer") == 1 and tr.producerState == "paused"
    ch.dataReceived(b"GET /x?n=5 HTTP/1.1\r\nHost: x\r\n\r\n")  # what was in flight is buffered, not answered
    assert tr.value().count(b"answer") == 1
    for n in range(2, 7):
        ch.resumeProducing()  # the peer read: one more answer, then the buffer is full again
        assert tr.value().count(b"answer") == n
    assert b"answer 5" in tr.value()
    ch.resumeProducing()
    assert tr.producerState == "producing"
    ch.connectionLost(None)
    assert site.active == 0


def test_a_rejected_connection_that_never_drains_is_aborted():
    clock = Clock()
    site = GuardedSite(resource.Resource(), request_timeout=30, reactor=clock)
    ch = site.buildProtocol(None)
    ch.callLater = clock.callLater
    tr = _FullAfterEachWrite()
    ch.makeConnection(tr)
    clock.advance(30)
    assert tr.value().startswith(b"HTTP/1.1 408") and tr.disconnecting and not tr.aborted
    clock.advance(ch.abortTimeout)
    assert tr.aborted
    ch.connectionLost(None)
    assert site.active == 0 and not clock.getDelayedCalls()


def test_a_client_pipelining_without_reading_holds_no_memory(appliance_factory):
    app = appliance_factory(sections={"https": {"request_timeout": "3s"}})

    def rss():
        with open(f"/proc/{app.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024

    before = rss()
    s = socket.create_connection(("127.0.0.1", app.port), 5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s = ssl.create_default_context(cafile=app.ca_pem).wrap_socket(s, server_hostname="localhost")
    s.settimeout(2)
    burst = b"GET /scep?operation=GetCACert HTTP/1.1\r\nHost: x\r\n\r\n" * 200
    sent = 0
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 10:
            s.sendall(burst)
            sent += len(burst)
    except (socket.timeout, ssl.SSLError, OSError):
        pass
    grown = rss() - before
    # before the fix the server read all of it and answered every request into memory: 1 GB for 27 MB
    assert time.monotonic() - t0 < 10, f"the server read {sent} bytes without pause"
    assert grown < 32 * 1024 * 1024, f"server grew {grown >> 20} MiB for {sent >> 20} MiB of unread pipelining"
    other = _tls(app)  # the server still answers others
    other.sendall(b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"POSTPKIOperation" in _read_all(other)
    s.close()
