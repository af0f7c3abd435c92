"""The RADIUS client against a real FreeRADIUS 3.2 (and small fake servers), on the real reactor.

FreeRADIUS must be installed (CI installs it): without it these tests fail, they don't skip.
"""
import contextlib
import hashlib
import hmac
import struct
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # run from the source tree, installed or not
    sys.path.insert(0, ROOT)

from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.protocol import DatagramProtocol  # noqa: E402

from getcertd.auth import Accept, Challenge, Reject  # noqa: E402
from getcertd.errors import AuthUnavailable  # noqa: E402
from getcertd.radius import (  # noqa: E402
    ACCESS_ACCEPT, RadiusAuthenticator, RadiusClientProtocol, RadiusSettings, encode_reply)
from freeradius import FreeRadiusNotInstalled, running_freeradius  # noqa: E402  (tests/ is on sys.path)

CLIENT = "198.51.100.7"


@contextlib.contextmanager
def freeradius_or_fail(**kwargs):
    """running_freeradius, failing the test (not skipping it) when FreeRADIUS is missing."""
    manager = running_freeradius(**kwargs)
    try:
        server = manager.__enter__()
    except FreeRadiusNotInstalled as e:
        missing = str(e)
    else:
        missing = None
    if missing:
        pytest.fail(missing, pytrace=False)
    try:
        yield server
    finally:
        manager.__exit__(None, None, None)
        assert server.process.poll() is not None


@pytest.fixture(scope="module")
def freeradius():
    with freeradius_or_fail() as server:
        yield server


class Client:
    """A RadiusClientProtocol listening on 127.0.0.1, with its authenticator."""

    def __init__(self, servers, secret, **settings):
        self.settings = RadiusSettings(servers=tuple(servers), secret=secret, **settings)
        self.protocol = RadiusClientProtocol(self.settings, reactor)
        self.port = reactor.listenUDP(0, self.protocol, interface="127.0.0.1")
        self.auth = RadiusAuthenticator(self.protocol)

    def authenticate(self, user, password, state=None):
        return self.auth.authenticate(user, password, state, CLIENT)

    def server(self, index):
        return self.protocol.status()["servers"][index]

    def close(self):
        return self.port.stopListening()


@pytest.fixture
def listeners():
    """UDP ports opened by a test, closed after it."""
    ports = []
    yield ports
    for port in ports:
        port.stopListening()


def silent_port(listeners):
    """A bound UDP port that never answers."""
    port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
    listeners.append(port)
    return ("127.0.0.1", port.getHost().port)


class FakeServer(DatagramProtocol):
    """Answers every Access-Request with an Access-Accept, spoiled as ``mode`` says."""

    def __init__(self, secret, mode):
        self.secret = secret
        self.mode = mode
        self.requests = []

    def datagramReceived(self, data, addr):
        code, identifier, length = struct.unpack("!BBH", data[:4])
        authenticator = data[4:20]
        self.requests.append(data)
        if self.mode == "wrong_response_authenticator":
            reply = bytearray(encode_reply(ACCESS_ACCEPT, identifier, authenticator, self.secret))
            reply[4] ^= 1
        elif self.mode == "no_message_authenticator":
            reply = encode_reply(ACCESS_ACCEPT, identifier, authenticator, self.secret,
                                 with_message_authenticator=False)
        elif self.mode == "wrong_secret":
            reply = encode_reply(ACCESS_ACCEPT, identifier, authenticator, self.secret + b"x")
        else:
            reply = encode_reply(ACCESS_ACCEPT, identifier, authenticator, self.secret)
        self.transport.write(bytes(reply), addr)


def fake_server(listeners, secret, mode):
    proto = FakeServer(secret, mode)
    port = reactor.listenUDP(0, proto, interface="127.0.0.1")
    listeners.append(port)
    return proto, ("127.0.0.1", port.getHost().port)


# -- against FreeRADIUS -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_pap_accept(freeradius):
    client = Client([freeradius.address], freeradius.secret)
    try:
        result = await client.authenticate("alice", b"alice-pass")
        assert isinstance(result, Accept)
        identity = result.identity
        assert (identity.user, identity.method, identity.session_timeout, identity.profile_hints) == \
            ("alice", "radius-pap", None, ())
        # a password longer than one 16-octet block
        result = await client.authenticate("erin", b"erin-has-a-much-longer-password-0123456789")
        assert isinstance(result, Accept)
        status = client.server(0)
        assert (status["accepts"], status["dropped"], status["state"]) == (2, 0, "up")
        assert status["last_rtt"] is not None and status["last_rtt"] < 1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_wrong_password_and_unknown_user_are_rejected(freeradius):
    client = Client([freeradius.address], freeradius.secret)
    try:
        assert isinstance(await client.authenticate("alice", b"not-alices-pass"), Reject)
        assert isinstance(await client.authenticate("nobody", b"alice-pass"), Reject)
        assert client.server(0)["rejects"] == 2 and client.server(0)["dropped"] == 0
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_session_timeout_and_class(freeradius):
    client = Client([freeradius.address], freeradius.secret)
    try:
        result = await client.authenticate("dave", b"dave-pass")
        assert isinstance(result, Accept)
        assert result.identity.session_timeout == 600
        assert result.identity.profile_hints == ("ikev2-short",)
        assert result.identity.attributes["Class"] == (b"ikev2-short",)
        assert result.identity.attributes["Session-Timeout"] == (600,)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_filter_id_as_profile(freeradius):
    client = Client([freeradius.address], freeradius.secret, profile_attribute="Filter-Id")
    try:
        result = await client.authenticate("frank", b"frank-pass")
        assert result.identity.profile_hints == ("vpn-users",)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_challenge_one_round(freeradius):
    client = Client([freeradius.address], freeradius.secret)
    try:
        challenge = await client.authenticate("bob", b"bob-pass")
        assert isinstance(challenge, Challenge)
        assert challenge.message == "Enter token code" and len(challenge.state) >= 1
        result = await client.authenticate("bob", b"123456", challenge.state)
        assert isinstance(result, Accept) and result.identity.method == "radius-challenge"
        # a wrong token, and a right token with a State the server never issued
        challenge = await client.authenticate("bob", b"bob-pass")
        assert isinstance(await client.authenticate("bob", b"654321", challenge.state), Reject)
        forged = challenge.state[:1 + challenge.state[0]] + b"\x00" * 16  # our server label, a State it never sent
        assert isinstance(await client.authenticate("bob", b"123456", forged), Reject)
        # a wrong first password gets no challenge
        assert isinstance(await client.authenticate("bob", b"wrong"), Reject)
        assert client.server(0)["challenges"] == 2
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_challenge_two_rounds(freeradius):
    client = Client([freeradius.address], freeradius.secret)
    try:
        first = await client.authenticate("carol", b"carol-pass")
        assert isinstance(first, Challenge) and first.message == "Enter token code"
        second = await client.authenticate("carol", b"111111", first.state)
        assert isinstance(second, Challenge) and second.message == "Enter second token code"
        assert second.state != first.state
        result = await client.authenticate("carol", b"222222", second.state)
        assert isinstance(result, Accept) and result.identity.method == "radius-challenge"
        # the second token can't be given in the first round
        first = await client.authenticate("carol", b"carol-pass")
        assert isinstance(await client.authenticate("carol", b"222222", first.state), Reject)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_failover_from_a_silent_server(freeradius, listeners):
    silent = silent_port(listeners)
    client = Client([silent, freeradius.address], freeradius.secret, timeout=0.2, retries=1)
    try:
        started = time.monotonic()
        result = await client.authenticate("alice", b"alice-pass")
        elapsed = time.monotonic() - started
        assert isinstance(result, Accept)
        assert 0.4 <= elapsed < 1.5
        silent_status, real_status = client.server(0), client.server(1)
        assert (silent_status["state"], silent_status["timeouts"], silent_status["retransmissions"]) == \
            ("dead", 1, 1)
        assert (real_status["state"], real_status["accepts"]) == ("up", 1)
        # the dead server is skipped now: the next answer is immediate
        started = time.monotonic()
        assert isinstance(await client.authenticate("alice", b"alice-pass"), Accept)
        assert time.monotonic() - started < 0.2
        assert client.server(0)["requests"] == 1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_all_silent_is_auth_unavailable_within_the_bound(listeners):
    servers = [silent_port(listeners), silent_port(listeners)]
    client = Client(servers, b"secret", timeout=0.1, retries=2)
    try:
        started = time.monotonic()
        with pytest.raises(AuthUnavailable):
            await client.authenticate("alice", b"alice-pass")
        elapsed = time.monotonic() - started
        assert 0.6 <= elapsed < 1.5  # 0.1 s x (2 + 1) x 2 servers
        assert [s["timeouts"] for s in client.protocol.status()["servers"]] == [1, 1]
    finally:
        await client.close()


@pytest.mark.parametrize("mode", ["wrong_response_authenticator", "no_message_authenticator", "wrong_secret"])
@pytest_twisted.ensureDeferred
async def test_untrusted_replies_end_in_auth_unavailable(listeners, mode):
    secret = b"fake-server-secret"
    fake, address = fake_server(listeners, secret, mode)
    client = Client([address], secret, timeout=0.15, retries=1)
    try:
        with pytest.raises(AuthUnavailable):
            await client.authenticate("alice", b"alice-pass")
        assert len(fake.requests) == 2  # sent and retransmitted, both answered, both dropped
        assert fake.requests[0] == fake.requests[1]
        status = client.server(0)
        assert (status["dropped"], status["accepts"], status["timeouts"]) == (2, 0, 1)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_fake_server_control(listeners):
    """The fake server's good replies are accepted, so the failures above are the spoiled replies."""
    secret = b"fake-server-secret"
    fake, address = fake_server(listeners, secret, "good")
    client = Client([address], secret, timeout=0.15, retries=1)
    try:
        assert isinstance(await client.authenticate("alice", b"alice-pass"), Accept)
        # the request carries a valid Message-Authenticator (RFC 2869 5.14), checked independently
        data = fake.requests[0]
        assert data[20] == 80
        zeroed = data[:22] + bytes(16) + data[38:]
        assert hmac.new(secret, zeroed, hashlib.md5).digest() == data[22:38]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_freeradius_drops_requests_without_message_authenticator(freeradius, listeners):
    """The client config really requires a Message-Authenticator, so the accepts above prove ours right."""
    answers = []

    class Raw(DatagramProtocol):
        def datagramReceived(self, data, addr):
            answers.append(data)

    port = reactor.listenUDP(0, Raw(), interface="127.0.0.1")
    listeners.append(port)
    authenticator = bytes(range(16))
    hidden = bytes(a ^ b for a, b in zip(b"alice-pass".ljust(16, b"\0"),
                                         hashlib.md5(freeradius.secret + authenticator).digest()))
    attrs = b"\x01\x07alice" + b"\x02\x12" + hidden
    packet = struct.pack("!BBH", 1, 99, 20 + len(attrs)) + authenticator + attrs
    port.write(packet, freeradius.address)
    d = defer.Deferred()
    reactor.callLater(0.5, d.callback, None)
    await d
    assert answers == []


@pytest_twisted.ensureDeferred
async def test_unsigned_freeradius_replies():
    """FreeRADIUS signs replies only when told to (``update reply { &Message-Authenticator := 0x00 }``)."""
    with freeradius_or_fail(sign_replies=False) as server:
        strict = Client([server.address], server.secret, timeout=0.15, retries=0)
        lax = Client([server.address], server.secret, timeout=0.15, retries=0,
                     require_message_authenticator=False)
        try:
            with pytest.raises(AuthUnavailable):
                await strict.authenticate("alice", b"alice-pass")
            assert strict.server(0)["dropped"] == 1
            assert isinstance(await lax.authenticate("alice", b"alice-pass"), Accept)
        finally:
            await strict.close()
            await lax.close()
