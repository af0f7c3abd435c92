"""Unit tests of the RADIUS codec and client state machine: a Clock, a fake transport, no sockets, no sleeps."""
import hashlib
import hmac
import itertools
import socket
import struct
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # run from the source tree, installed or not
    sys.path.insert(0, ROOT)

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from getcertd.auth import Accept, Challenge, IAuthenticator, Reject
from getcertd.errors import AuthUnavailable, ConfigError
from getcertd.radius import (
    ACCESS_ACCEPT, ACCESS_CHALLENGE, ACCESS_REJECT, BadReply, RadiusAuthenticator, RadiusClientProtocol,
    RadiusSettings, decode_reply, encode_access_request, encode_reply, listener_service, settings_from_config)

SECRET = b"unit-test-secret"
A = ("192.0.2.10", 1812)
B = ("192.0.2.11", 1812)
CLIENT = "198.51.100.7"


# -- independent reference implementations (straight from the RFCs) ----------------------------------

def parse_request(data):
    """(code, identifier, authenticator, [(type, value)]) of a datagram."""
    code, identifier, length = struct.unpack("!BBH", data[:4])
    assert length == len(data)
    attrs, offset = [], 20
    while offset < length:
        attr_type, attr_len = data[offset], data[offset + 1]
        attrs.append((attr_type, data[offset + 2:offset + attr_len]))
        offset += attr_len
    return code, identifier, data[4:20], attrs


def attr(attrs, attr_type):
    return [v for t, v in attrs if t == attr_type]


def rfc2865_unhide(hidden, authenticator, secret):
    out, last = b"", authenticator
    for i in range(0, len(hidden), 16):
        block = hidden[i:i + 16]
        pad = hashlib.md5(secret + last).digest()
        out += bytes(a ^ b for a, b in zip(block, pad))
        last = block
    return out.rstrip(b"\0")


def rfc2869_mac_ok(data, vector, secret):
    offset = 20
    while offset < len(data):
        if data[offset] == 80:
            zeroed = data[:offset + 2] + bytes(16) + data[offset + 18:]
            mac = hmac.new(secret, zeroed[:4] + vector + zeroed[20:], hashlib.md5).digest()
            return mac == data[offset + 2:offset + 18]
        offset += data[offset + 1]
    return False


# -- fixtures ---------------------------------------------------------------------------------------

class FakeTransport:
    def __init__(self):
        self.written = []

    def write(self, data, addr):
        self.written.append((data, addr))


def counting_random():
    counter = itertools.count(1)

    def random_bytes(n):
        value = next(counter)
        return bytes((value + i) % 256 for i in range(n))
    return random_bytes


def make(servers=(A,), **kwargs):
    settings = RadiusSettings(servers=tuple(servers), secret=SECRET, **kwargs)
    clock = Clock()
    proto = RadiusClientProtocol(settings, clock, random_bytes=counting_random())
    transport = FakeTransport()
    proto.makeConnection(transport)
    return proto, clock, transport


def results(d):
    out = []
    d.addBoth(out.append)
    return out


def reply_to(datagram, code, attributes=(), secret=SECRET, **kwargs):
    _, identifier, authenticator, _ = parse_request(datagram)
    return encode_reply(code, identifier, authenticator, secret, attributes, **kwargs)


def server_status(proto, index=0):
    return proto.status()["servers"][index]


# -- codec ------------------------------------------------------------------------------------------

def test_access_request_encoding():
    authenticator = bytes(range(16))
    password = b"a-password-longer-than-one-block-of-16"
    data = encode_access_request(42, authenticator, SECRET, [
        ("User-Name", "alice"), ("User-Password", password), ("NAS-Identifier", "getcertd"),
        ("Calling-Station-Id", CLIENT), ("State", b"\x01\x02")])
    code, identifier, auth, attrs = parse_request(data)
    assert (code, identifier, auth) == (1, 42, authenticator)
    assert attrs[0][0] == 80  # Message-Authenticator first
    assert rfc2869_mac_ok(data, authenticator, SECRET)
    assert not rfc2869_mac_ok(data, authenticator, b"other")
    assert attr(attrs, 1) == [b"alice"]
    hidden = attr(attrs, 2)[0]
    assert len(hidden) == 48 and password not in data
    assert rfc2865_unhide(hidden, authenticator, SECRET) == password
    assert attr(attrs, 32) == [b"getcertd"]
    assert attr(attrs, 31) == [CLIENT.encode()]
    assert attr(attrs, 24) == [b"\x01\x02"]


def test_empty_password_is_one_block():
    data = encode_access_request(1, bytes(16), SECRET, [("User-Name", "a"), ("User-Password", b"")])
    hidden = attr(parse_request(data)[3], 2)[0]
    assert len(hidden) == 16 and rfc2865_unhide(hidden, bytes(16), SECRET) == b""


def test_password_too_long():
    with pytest.raises(ValueError):
        encode_access_request(1, bytes(16), SECRET, [("User-Name", "a"), ("User-Password", b"x" * 129)])


def test_prepared_request_is_the_packet_pyrad_builds_byte_for_byte():
    """The attributes are encoded once per request and the password hidden per transmission: the packet is the
    one pyrad builds in one go (Message-Authenticator first), for each password length around the blocks."""
    from pyrad import packet as pyrad_packet
    from getcertd.radius import DICTIONARY, MESSAGE_AUTHENTICATOR, hide_password, message_authenticator
    for password in (b"", b"p", b"x" * 15, b"x" * 16, b"x" * 17, "p\u00e4ss", b"y" * 128):
        authenticator = bytes(range(7, 23))
        attributes = [("User-Name", "alice"), ("User-Password", password), ("NAS-Identifier", "getcertd"),
                      ("NAS-IP-Address", "192.0.2.1"), ("Calling-Station-Id", CLIENT), ("State", b"\x01\x02")]
        pkt = pyrad_packet.AuthPacket(code=1, id=9, secret=SECRET, authenticator=authenticator, dict=DICTIONARY)
        pkt[MESSAGE_AUTHENTICATOR] = [bytes(16)]
        for name, value in attributes:
            pkt.AddAttribute(name, pkt.PwCrypt(value) if name == "User-Password" else value)
        data = pkt.RequestPacket()
        expected = data[:22] + message_authenticator(data, authenticator, SECRET) + data[38:]
        assert encode_access_request(9, authenticator, SECRET, attributes) == expected
        plain = password.encode() if isinstance(password, str) else password
        assert hide_password(plain, authenticator, SECRET) == pkt.PwCrypt(password)


@pytest.mark.parametrize("attributes", [
    [("User-Name", "a"), ("User-Password", b"x"), ("User-Password", b"y")],
    [("User-Name", "a"), ("User-Password", b"x" * 129)],
    [("User-Name", "a" * 254)],
    [("User-Name", "a")] + [("Calling-Station-Id", "c" * 253)] * 16,  # 4,096 octets passed
])
def test_attributes_that_cant_be_sent_are_refused_before_anything_is_sent(attributes):
    proto, clock, transport = make()
    with pytest.raises(ValueError):
        proto.send_access_request(attributes)
    assert transport.written == [] and server_status(proto)["in_flight"] == 0


def test_decode_reply_checks():
    auth = bytes(range(16))
    good = encode_reply(ACCESS_ACCEPT, 3, auth, SECRET, [("Session-Timeout", 600), ("Class", b"gold")])
    reply = decode_reply(good + b"padding", auth, SECRET)
    assert reply.code == ACCESS_ACCEPT and reply.identifier == 3
    assert reply.attributes == {"Session-Timeout": (600,), "Class": (b"gold",)}
    with pytest.raises(BadReply, match="Response Authenticator"):
        decode_reply(good, bytes(16), SECRET)
    with pytest.raises(BadReply, match="Response Authenticator"):
        decode_reply(good, auth, b"wrong")
    unsigned = encode_reply(ACCESS_ACCEPT, 3, auth, SECRET, with_message_authenticator=False)
    with pytest.raises(BadReply, match="no Message-Authenticator"):
        decode_reply(unsigned, auth, SECRET)
    assert decode_reply(unsigned, auth, SECRET, require_message_authenticator=False).code == ACCESS_ACCEPT
    with pytest.raises(BadReply, match="unexpected code"):
        decode_reply(encode_reply(ACCESS_ACCEPT + 3, 3, auth, SECRET), auth, SECRET)
    with pytest.raises(BadReply):
        decode_reply(good[:19], auth, SECRET)
    with pytest.raises(BadReply, match="Proxy-State"):
        decode_reply(encode_reply(ACCESS_ACCEPT, 3, auth, SECRET, [(33, b"x")]), auth, SECRET)


def bad_mac_reply(datagram, code=ACCESS_ACCEPT):
    """A reply with a right Response Authenticator over a wrong Message-Authenticator."""
    good = bytearray(reply_to(datagram, code))
    assert good[20] == 80
    good[22] ^= 0xFF
    _, _, authenticator, _ = parse_request(datagram)
    good[4:20] = hashlib.md5(bytes(good[:4]) + authenticator + bytes(good[20:]) + SECRET).digest()
    return bytes(good)


def test_unknown_attributes_are_kept_raw():
    auth = bytes(16)
    data = encode_reply(ACCESS_ACCEPT, 1, auth, SECRET, [(200, b"raw"), (26, b"\x00\x00\x00\x09\x01\x05abc")])
    attributes = decode_reply(data, auth, SECRET).attributes
    assert attributes["Attr-200"] == (b"raw",)
    assert attributes["Attr-26.9.1"] == (b"abc",)


# -- settings ----------------------------------------------------------------------------------------

def test_settings_defaults_and_validation():
    s = RadiusSettings(servers=(("127.0.0.1", "1812"),), secret=b"s")
    assert (s.timeout, s.retries, s.nas_identifier, s.require_message_authenticator, s.dead_time,
            s.profile_attribute, s.nas_ip_address) == (3.0, 2, "getcertd", True, 30.0, "Class", None)
    assert s.servers == (("127.0.0.1", 1812),)
    assert "secret" not in repr(RadiusSettings(servers=(A,), secret=b"very-secret"))
    assert s.listen_interface == "0.0.0.0"
    assert RadiusSettings(servers=(("0::1", 1812),), secret=b"s").listen_interface == "::"
    assert RadiusSettings(servers=(A,), secret=b"s", nas_identifier="", nas_ip_address="192.0.2.1").nas_identifier == ""
    for bad in [dict(servers=()), dict(servers=(("radius.example", 1812),)),
                dict(servers=(("127.0.0.1", 1812), ("::1", 1812))), dict(secret=b""),
                dict(profile_attribute="Reply-Message"), dict(timeout=0), dict(nas_identifier="")]:
        kwargs = dict(servers=(A,), secret=b"s")
        kwargs.update(bad)
        with pytest.raises(ValueError):
            RadiusSettings(**kwargs)


class FakeRadiusConfig:
    def __init__(self, servers, **kwargs):
        self.servers = servers
        self.secret = b"s"
        self.timeout, self.retries, self.nas_identifier = 3.0, 2, "getcertd"
        self.require_message_authenticator, self.dead_time, self.profile_attribute = True, 30.0, "Class"
        self.__dict__.update(kwargs)


def fake_resolve(table):
    def resolve(host, port, family, socktype):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socktype, 17, "", (a, port)) for a in table[host]]
    return resolve


def test_settings_from_config():
    resolve = fake_resolve({"radius1.example": ["2001:db8::1", "192.0.2.1"], "radius2.example": ["192.0.2.2"],
                            "v6only.example": ["2001:db8::2"]})
    s = settings_from_config(FakeRadiusConfig((("192.0.2.9", 1812), ("radius1.example", 1645),
                                               ("radius2.example", 1812))), resolve)
    assert s.servers == (("192.0.2.9", 1812), ("192.0.2.1", 1645), ("192.0.2.2", 1812))
    assert s.listen_interface == "0.0.0.0"
    s = settings_from_config(FakeRadiusConfig((("radius1.example", 1812),), profile_attribute="Filter-Id",
                                              timeout=1.5), resolve)
    assert s.servers == (("2001:db8::1", 1812),) and s.timeout == 1.5 and s.profile_attribute == "Filter-Id"
    for servers in [(("nowhere.example", 1812),), (("192.0.2.1", 1812), ("v6only.example", 1812)), ()]:
        with pytest.raises(ConfigError, match=r"\[radius\]"):
            settings_from_config(FakeRadiusConfig(servers), resolve)
    with pytest.raises(ConfigError, match=r"\[radius\] profile_attribute"):
        settings_from_config(FakeRadiusConfig((("192.0.2.1", 1812),), profile_attribute="Nope"), resolve)


def test_listener_service_binds_nothing_until_started():
    proto = RadiusClientProtocol(RadiusSettings(servers=(("::1", 1812),), secret=b"s"), Clock())
    service = listener_service(proto)
    assert service.args == (0, proto) and service.kwargs == {"interface": "::"}
    assert not service.running


# -- the state machine -------------------------------------------------------------------------------

def test_request_attributes_and_accept():
    proto, clock, transport = make(nas_ip_address="192.0.2.1")
    auth = RadiusAuthenticator(proto)
    assert IAuthenticator.providedBy(auth) and auth.name == "radius"
    out = results(auth.authenticate("alice", b"alice-pass", None, CLIENT))
    [(datagram, addr)] = transport.written
    assert addr == A
    code, identifier, authenticator, attrs = parse_request(datagram)
    assert code == 1 and rfc2869_mac_ok(datagram, authenticator, SECRET)
    assert rfc2865_unhide(attr(attrs, 2)[0], authenticator, SECRET) == b"alice-pass"
    assert attr(attrs, 32) == [b"getcertd"]
    assert attr(attrs, 4) == [bytes([192, 0, 2, 1])]
    assert attr(attrs, 31) == [CLIENT.encode()]
    assert attr(attrs, 24) == []
    clock.advance(0.25)
    proto.datagramReceived(reply_to(datagram, ACCESS_ACCEPT, [("Session-Timeout", 600),
                                                              ("Class", b"ikev2-short")]), A)
    [result] = out
    assert isinstance(result, Accept)
    identity = result.identity
    assert (identity.user, identity.method, identity.session_timeout, identity.profile_hints) == \
        ("alice", "radius-pap", 600, ("ikev2-short",))
    assert identity.attributes == {"Session-Timeout": (600,), "Class": (b"ikev2-short",)}
    status = server_status(proto)
    assert status["accepts"] == 1 and status["requests"] == 1 and status["in_flight"] == 0
    assert status["last_rtt"] == pytest.approx(0.25)
    assert not clock.getDelayedCalls()


def test_ipv6_nas_address():
    proto, _, transport = make(nas_ip_address="2001:db8::1")
    proto.access_request("alice", b"pw")
    attrs = parse_request(transport.written[0][0])[3]
    assert attr(attrs, 95) == [bytes.fromhex("20010db8000000000000000000000001")]
    assert attr(attrs, 4) == []


def test_filter_id_profile_and_bad_utf8_class():
    proto, _, transport = make(profile_attribute="Filter-Id")
    out = results(RadiusAuthenticator(proto).authenticate("u", b"p", None, CLIENT))
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT,
                                    [("Filter-Id", "vpn-users"), ("Class", b"\xff")]), A)
    assert out[0].identity.profile_hints == ("vpn-users",)

    proto, _, transport = make()
    out = results(RadiusAuthenticator(proto).authenticate("u", b"p", None, CLIENT))
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT, [("Class", b"gold\xff")]), A)
    assert out[0].identity.profile_hints == ("gold\ufffd",)
    assert out[0].identity.session_timeout is None


def test_the_accepts_user_name_is_the_identity():
    proto, _, transport = make()
    out = results(RadiusAuthenticator(proto).authenticate("ALICE@Example.COM", b"p", None, CLIENT))
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT, [("User-Name", "alice")]), A)
    assert out[0].identity.user == "alice"
    proto, _, transport = make()
    out = results(RadiusAuthenticator(proto).authenticate("bob", b"p", None, CLIENT))
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT, [(1, b"bo\nb")]), A)
    assert isinstance(out[0], Reject) and "User-Name" in out[0].reason


def test_every_class_value_and_the_shortest_session_timeout():
    """Microsoft NPS adds a Class of its own to every Accept: each value is kept, in order, for the policy to find
    the one profile_map names; of several Session-Timeouts the shortest caps; one that can't be read is no
    Accept at all."""
    proto, _, transport = make()
    out = results(RadiusAuthenticator(proto).authenticate("u", b"p", None, CLIENT))
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT, [
        ("Class", b"\x00\x01nps-session-0001"), ("Class", b"ikev2-short"), ("Session-Timeout", 7200),
        ("Session-Timeout", 60)]), A)
    assert out[0].identity.profile_hints == ("\x00\x01nps-session-0001", "ikev2-short")
    assert out[0].identity.session_timeout == 60
    proto, _, transport = make()
    out = results(RadiusAuthenticator(proto).authenticate("u", b"p", None, CLIENT))
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT,
                                    [(27, b"\x00\x00\x00\x00\x00\x00\x02\x58")]), A)
    assert isinstance(out[0], Reject) and "Session-Timeout" in out[0].reason


def test_reject():
    proto, _, transport = make()
    out = results(RadiusAuthenticator(proto).authenticate("alice", b"wrong", None, CLIENT))
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_REJECT,
                                    [("Reply-Message", "Bad password")]), A)
    assert isinstance(out[0], Reject) and "Bad password" in out[0].reason
    assert server_status(proto)["rejects"] == 1


def test_challenge_and_continuation():
    proto, _, transport = make()
    auth = RadiusAuthenticator(proto)
    out = results(auth.authenticate("bob", b"bob-pass", None, CLIENT))
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_CHALLENGE, [
        ("Reply-Message", "Enter "), ("Reply-Message", "token code"), ("State", b"\x00state\xff")]), A)
    # the opaque state: the label of the server that sent the challenge, then its State
    assert out == [Challenge("Enter token code", b"\x0f192.0.2.10:1812\x00state\xff")]
    out = results(auth.authenticate("bob", b"123456", out[0].state, CLIENT))
    datagram = transport.written[1][0]
    attrs = parse_request(datagram)[3]
    assert attr(attrs, 24) == [b"\x00state\xff"]
    proto.datagramReceived(reply_to(datagram, ACCESS_ACCEPT), A)
    assert out[0].identity.method == "radius-challenge"
    assert server_status(proto)["challenges"] == 1


def test_a_response_goes_to_the_server_that_challenged():
    """Only the server that sent a State knows it: a response goes there even when another is first in line
    again (it went to A, which rejected the unknown State, a failed login)."""
    proto, clock, transport = make(servers=(A, B), timeout=1, retries=0, dead_time=30)
    auth = RadiusAuthenticator(proto)
    out = results(auth.authenticate("bob", b"bob-pass", None, CLIENT))
    clock.advance(1)  # A does not answer: marked dead, B challenges
    datagram, addr = transport.written[-1]
    assert addr == B
    proto.datagramReceived(reply_to(datagram, ACCESS_CHALLENGE, [("State", b"st")]), B)
    clock.advance(30)  # A is up again, first in line
    assert proto.status()["servers"][0]["state"] == "up"
    transport.written.clear()
    out = results(auth.authenticate("bob", b"123456", out[0].state, CLIENT))
    assert [addr for _, addr in transport.written] == [B]
    assert attr(parse_request(transport.written[0][0])[3], 24) == [b"st"]
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT), B)
    assert isinstance(out[0], Accept)
    out = results(auth.authenticate("bob", b"123456", b"\x0f192.0.2.11:1812st", CLIENT))
    clock.advance(1)  # B silent now: unavailable, and never asked of A
    assert [addr for _, addr in transport.written[1:]] == [B] and out[0].check(AuthUnavailable)


def test_challenge_without_state_is_a_reject():
    proto, _, transport = make()
    out = results(RadiusAuthenticator(proto).authenticate("bob", b"p", None, CLIENT))
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_CHALLENGE, [("Reply-Message", "x")]), A)
    assert isinstance(out[0], Reject)


def test_unencodable_request_is_a_reject():
    proto, _, transport = make()
    out = results(RadiusAuthenticator(proto).authenticate("alice", b"x" * 129, None, CLIENT))
    assert isinstance(out[0], Reject) and not transport.written


def test_retransmits_identical_bytes():
    proto, clock, transport = make(timeout=2, retries=2)
    out = results(proto.access_request("alice", b"pw"))
    clock.advance(1.999)
    assert len(transport.written) == 1
    clock.advance(0.001)
    clock.advance(2)
    assert len(transport.written) == 3
    assert len({data for data, _ in transport.written}) == 1
    assert {addr for _, addr in transport.written} == {A}
    assert server_status(proto)["retransmissions"] == 2 and server_status(proto)["requests"] == 1
    # a reply to the (identical) retransmission is a reply to the request
    proto.datagramReceived(reply_to(transport.written[2][0], ACCESS_ACCEPT), A)
    assert out[0].code == ACCESS_ACCEPT
    # the late duplicate reply finds no identifier in flight
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT), A)
    assert server_status(proto)["dropped"] == 1


def test_failover_then_auth_unavailable_after_the_bound():
    proto, clock, transport = make(servers=(A, B), timeout=3, retries=2)
    out = results(proto.access_request("alice", b"pw"))
    clock.pump([3, 3, 2.999])
    assert [addr for _, addr in transport.written] == [A, A, A]
    clock.advance(0.001)
    assert [addr for _, addr in transport.written] == [A, A, A, B]
    # a new identifier and Request Authenticator for the other server
    assert parse_request(transport.written[3][0])[2] != parse_request(transport.written[0][0])[2]
    clock.pump([3, 3, 2.999])
    assert out == [] and clock.seconds() == pytest.approx(17.999)
    clock.advance(0.001)  # 3 s x (2 + 1) x 2 servers
    assert len(transport.written) == 6
    assert out[0].check(AuthUnavailable)
    assert [s["timeouts"] for s in proto.status()["servers"]] == [1, 1]
    assert [s["state"] for s in proto.status()["servers"]] == ["dead", "dead"]
    assert not clock.getDelayedCalls()


def test_failover_accept_from_second_server():
    proto, clock, transport = make(servers=(A, B), timeout=1, retries=0)
    out = results(RadiusAuthenticator(proto).authenticate("alice", b"pw", None, CLIENT))
    clock.advance(1)
    datagram, addr = transport.written[-1]
    assert addr == B
    # the first server's packet, answered by the second server, is not a reply
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT), B)
    assert out == []
    proto.datagramReceived(reply_to(datagram, ACCESS_ACCEPT), B)
    assert isinstance(out[0], Accept)


def test_failover_hides_the_password_again_under_the_new_request_authenticator():
    proto, clock, transport = make(servers=(A, B), timeout=1, retries=0)
    results(RadiusAuthenticator(proto).authenticate("alice", b"alice-pass", None, CLIENT))
    clock.advance(1)
    (first, _), (second, addr) = transport.written
    assert addr == B
    for datagram in (first, second):
        code, identifier, authenticator, attrs = parse_request(datagram)
        assert rfc2869_mac_ok(datagram, authenticator, SECRET)
        assert rfc2865_unhide(attr(attrs, 2)[0], authenticator, SECRET) == b"alice-pass"
    assert parse_request(first)[2] != parse_request(second)[2]


def test_dead_marking_and_recovery():
    proto, clock, transport = make(servers=(A, B), timeout=1, retries=1, dead_time=30)
    results(proto.access_request("u1", b"pw"))
    clock.pump([1, 1])  # A timed out twice: marked dead, request moved to B
    assert proto.status()["servers"][0]["state"] == "dead"
    assert proto.status()["servers"][0]["dead_for"] == pytest.approx(30)
    proto.datagramReceived(reply_to(transport.written[-1][0], ACCESS_ACCEPT), B)
    # while A is dead, new requests go straight to B
    transport.written.clear()
    results(proto.access_request("u2", b"pw"))
    assert [addr for _, addr in transport.written] == [B]
    proto.datagramReceived(reply_to(transport.written[-1][0], ACCESS_ACCEPT), B)
    # after dead_time, A is up again and first in line
    clock.advance(29.999)  # marked dead at t=2
    assert proto.status()["servers"][0]["state"] == "dead"
    clock.advance(0.001)
    from twisted.logger import formatEvent, globalLogPublisher
    said = []
    globalLogPublisher.addObserver(said.append)
    try:
        # reading the status changes nothing and says nothing (it logged "no longer marked dead" on each read)
        assert [proto.status()["servers"][0]["state"] for _ in range(2)] == ["up", "up"]
        assert not [e for e in said if "RADIUS" in formatEvent(e)]
        transport.written.clear()
        results(proto.access_request("u3", b"pw"))
        assert [addr for _, addr in transport.written] == [A]
        proto.datagramReceived(reply_to(transport.written[-1][0], ACCESS_ACCEPT), A)
        assert [formatEvent(e) for e in said if "RADIUS" in formatEvent(e)] == [
            f"RADIUS server {A[0]}:{A[1]} answers again"]
    finally:
        globalLogPublisher.removeObserver(said.append)


def test_all_dead_are_tried_anyway_and_a_reply_revives():
    proto, clock, transport = make(servers=(A, B), timeout=1, retries=0, dead_time=60)
    out = results(proto.access_request("u1", b"pw"))
    clock.pump([1, 1])
    assert out[0].check(AuthUnavailable)
    assert [s["state"] for s in proto.status()["servers"]] == ["dead", "dead"]
    transport.written.clear()
    out = results(proto.access_request("u2", b"pw"))
    assert [addr for _, addr in transport.written] == [A]
    clock.advance(1)
    assert [addr for _, addr in transport.written] == [A, B]
    proto.datagramReceived(reply_to(transport.written[-1][0], ACCESS_ACCEPT), B)
    assert out[0].code == ACCESS_ACCEPT
    assert [s["state"] for s in proto.status()["servers"]] == ["dead", "up"]


def test_dead_server_is_tried_last_when_others_are_up():
    proto, clock, transport = make(servers=(A, B), timeout=1, retries=0, dead_time=60)
    results(proto.access_request("u1", b"pw"))
    clock.advance(1)  # A dead
    proto.datagramReceived(reply_to(transport.written[-1][0], ACCESS_ACCEPT), B)
    transport.written.clear()
    out = results(proto.access_request("u2", b"pw"))
    clock.advance(1)  # B times out: now A is the only server left to try
    assert [addr for _, addr in transport.written] == [B, A]
    clock.advance(1)
    assert out[0].check(AuthUnavailable)


@pytest.mark.parametrize("forge", ["wrong_secret", "no_message_authenticator", "bad_message_authenticator",
                                   "wrong_source_port", "wrong_source_host", "unknown_identifier",
                                   "garbage"])
def test_untrusted_replies_are_dropped_and_the_request_keeps_waiting(forge):
    proto, clock, transport = make(timeout=3, retries=0)
    out = results(proto.access_request("alice", b"pw"))
    datagram = transport.written[0][0]
    source = A
    if forge == "wrong_secret":
        bad = reply_to(datagram, ACCESS_ACCEPT, secret=b"not-the-secret")
    elif forge == "no_message_authenticator":
        bad = reply_to(datagram, ACCESS_ACCEPT, with_message_authenticator=False)
    elif forge == "bad_message_authenticator":
        bad = bad_mac_reply(datagram)
    elif forge == "wrong_source_port":
        bad, source = reply_to(datagram, ACCESS_ACCEPT), (A[0], 1813)
    elif forge == "wrong_source_host":
        bad, source = reply_to(datagram, ACCESS_ACCEPT), ("192.0.2.99", A[1])
    elif forge == "unknown_identifier":
        bad = bytearray(reply_to(datagram, ACCESS_ACCEPT))
        bad[1] = (bad[1] + 1) % 256
        bad = bytes(bad)
    else:
        bad = b"\x02" + datagram[1:2] + b"\x00"
    proto.datagramReceived(bad, source)
    assert out == []
    status = proto.status()
    if forge.startswith("wrong_source"):
        assert status["unknown_source_dropped"] == 1 and status["servers"][0]["dropped"] == 0
    else:
        assert status["servers"][0]["dropped"] == 1 and status["unknown_source_dropped"] == 0
    assert status["servers"][0]["in_flight"] == 1
    # a valid reply is still accepted
    proto.datagramReceived(reply_to(datagram, ACCESS_ACCEPT), A)
    assert out[0].code == ACCESS_ACCEPT


def test_unsigned_reply_accepted_when_not_required():
    proto, _, transport = make(require_message_authenticator=False)
    out = results(proto.access_request("alice", b"pw"))
    datagram = transport.written[0][0]
    proto.datagramReceived(bad_mac_reply(datagram), A)  # a wrong one present is still refused
    assert out == []
    proto.datagramReceived(reply_to(datagram, ACCESS_ACCEPT, with_message_authenticator=False), A)
    assert out[0].code == ACCESS_ACCEPT


def test_untrusted_replies_only_end_in_auth_unavailable():
    proto, clock, transport = make(timeout=1, retries=1)
    out = results(proto.access_request("alice", b"pw"))
    for _ in range(2):
        datagram = transport.written[-1][0]
        proto.datagramReceived(reply_to(datagram, ACCESS_ACCEPT, with_message_authenticator=False), A)
        clock.advance(1)
    assert out[0].check(AuthUnavailable)
    assert server_status(proto)["dropped"] == 2 and server_status(proto)["timeouts"] == 1


def test_identifiers_unique_in_flight_then_queue():
    proto, clock, transport = make(timeout=5)
    outs = [results(proto.access_request(f"user{i}", b"pw")) for i in range(256)]
    identifiers = [parse_request(data)[1] for data, _ in transport.written]
    assert sorted(identifiers) == list(range(256))
    assert server_status(proto)["in_flight"] == 256
    # the 257th waits for a free identifier
    late = results(proto.access_request("late", b"pw"))
    assert len(transport.written) == 256 and server_status(proto)["queued"] == 1
    clock.advance(1)
    freed = transport.written[100][0]
    proto.datagramReceived(reply_to(freed, ACCESS_REJECT), A)
    assert outs[100][0].code == ACCESS_REJECT
    assert len(transport.written) == 257 and server_status(proto)["queued"] == 0
    late_datagram = transport.written[256][0]
    assert parse_request(late_datagram)[1] == parse_request(freed)[1]
    assert parse_request(late_datagram)[2] != parse_request(freed)[2]
    # the old reply for that identifier doesn't match the new Request Authenticator
    proto.datagramReceived(reply_to(freed, ACCESS_ACCEPT), A)
    assert late == [] and server_status(proto)["dropped"] == 1
    proto.datagramReceived(reply_to(late_datagram, ACCESS_ACCEPT), A)
    assert late[0].code == ACCESS_ACCEPT


def test_identifiers_not_reused_back_to_back():
    proto, _, transport = make()
    seen = []
    for i in range(5):
        results(proto.access_request("u", b"pw"))
        datagram = transport.written[-1][0]
        seen.append(parse_request(datagram)[1])
        proto.datagramReceived(reply_to(datagram, ACCESS_ACCEPT), A)
    assert len(set(seen)) == 5


def test_queue_limit_fails_cleanly():
    settings = RadiusSettings(servers=(A,), secret=SECRET)
    proto = RadiusClientProtocol(settings, Clock(), max_queued=1)
    proto.makeConnection(FakeTransport())
    for _ in range(257):
        proto.access_request("u", b"pw")
    out = results(proto.access_request("u", b"pw"))
    assert out[0].check(AuthUnavailable)


def test_cancel_releases_the_identifier():
    proto, clock, transport = make()
    d = proto.access_request("u", b"pw")
    out = results(d)
    d.cancel()
    assert out[0].check(defer.CancelledError)
    assert server_status(proto)["in_flight"] == 0 and not clock.getDelayedCalls()
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT), A)
    assert server_status(proto)["dropped"] == 1


def test_stop_protocol_fails_in_flight_and_queued():
    proto, clock, _ = make()
    outs = [results(proto.access_request("u", b"pw")) for _ in range(258)]
    proto.doStop()
    assert all(out[0].check(AuthUnavailable) for out in outs)
    assert not clock.getDelayedCalls()
    assert results(proto.access_request("u", b"pw"))[0].check(AuthUnavailable)


def test_not_started_fails():
    proto = RadiusClientProtocol(RadiusSettings(servers=(A,), secret=SECRET), Clock())
    assert results(proto.access_request("u", b"pw"))[0].check(AuthUnavailable)


def test_logs_never_carry_passwords_or_state():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto, clock, transport = make(servers=(A, B), timeout=1, retries=0)
        auth = RadiusAuthenticator(proto)
        state = b"STATE-VALUE-1234"
        results(auth.authenticate("bob", b"PASSWORD-VALUE", b"\x0f192.0.2.10:1812" + state, CLIENT))
        datagram = transport.written[0][0]
        proto.datagramReceived(reply_to(datagram, ACCESS_CHALLENGE, [("State", state)],
                                        with_message_authenticator=False), A)
        proto.datagramReceived(bad_mac_reply(datagram), A)
        clock.pump([1, 1])
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "Dropped" in text and "marked dead" in text
    for secret in ("PASSWORD-VALUE", "STATE-VALUE", state.hex(), SECRET.decode()):
        assert secret not in text


def test_a_request_waiting_for_an_identifier_fails_within_the_bound():
    """With all 256 identifiers held by a server that doesn't answer, the requests waiting for one fail at the
    bound like the others: they used to wait a whole bound more for every 256 requests ahead of them, so with
    600 requests and RADIUS down the last answers came after three times the bound (tests/test_load_faults)."""
    proto, clock, transport = make(timeout=1, retries=1)
    assert proto.bound == 2
    outs = [results(proto.access_request(f"user{i}", b"pw")) for i in range(600)]
    assert len(transport.written) == 256 and server_status(proto)["queued"] == 344
    clock.pump([1, 0.5])  # (Clock.advance runs what falls due at the end of the step)
    late = results(proto.access_request("late", b"pw"))  # made at 1.5 s: fails at 3.5 s
    clock.advance(0.5)
    assert all(out and out[0].check(AuthUnavailable) for out in outs)
    assert server_status(proto)["timeouts"] == 256 and server_status(proto)["queued"] == 0
    # the late one got an identifier when they were freed, and gets the rest of its time, not more
    assert len(transport.written) == 256 * 2 + 1 and not late
    clock.advance(1.4)
    assert not late
    clock.advance(0.1)
    assert late[0].check(AuthUnavailable)
    assert server_status(proto)["in_flight"] == 0 and not clock.getDelayedCalls()


def test_queued_time_shortens_the_wait_without_marking_a_server_dead():
    proto, clock, transport = make(servers=(A, B), timeout=1, retries=1)
    assert proto.bound == 4
    held = [results(proto.access_request("u", b"pw")) for _ in range(256)]
    waiting = results(proto.access_request("w", b"pw"))
    clock.pump([1, 0.9])  # (Clock.advance runs what falls due at the end of the step)
    # A answers the first request at 1.9 s: the waiter gets its identifier with 2.1 s left of its 4
    proto.datagramReceived(reply_to(transport.written[0][0], ACCESS_ACCEPT), A)
    assert held[0][0].code == ACCESS_ACCEPT
    sent = transport.written[-1]
    assert sent[1] == A and parse_request(sent[0])[1] == parse_request(transport.written[0][0])[1]
    clock.advance(0.1)  # t = 2: the other 255 time out on A, fail over to B
    assert server_status(proto, 0)["state"] == "dead"
    clock.pump([0.9, 1])  # t = 3.9: the waiter, sent to A at 1.9 and 2.9, fails over to B with 0.1 s left
    assert not waiting and transmitted_to(transport, B)[-1] == parse_request(transport.written[-1][0])
    clock.advance(0.1)  # t = 4: its bound; B had no time to answer in: AuthUnavailable, and B is not blamed
    assert waiting[0].check(AuthUnavailable)
    assert server_status(proto, 1)["timeouts"] == 255  # the 255 others, which had their full time there
    assert not clock.getDelayedCalls()


def transmitted_to(transport, address):
    return [parse_request(data) for data, to in transport.written if to == address]


def test_a_datagram_flood_is_counted_but_not_logged_line_by_line():
    """Anyone can send the client's UDP port datagrams, with a configured server's address as source too: each
    used to log a warning, so a flood filled the disk with log lines at the rate it was sent (50,000 datagrams:
    1 MB of log). At most 10 lines a kind per 10 s now; the counters still count every one, and the number not
    logged is said in the next line that is, or when the client stops."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto, clock, transport = make(timeout=30)
        out = results(proto.access_request("u", b"pw"))
        datagram = transport.written[0][0]
        for i in range(5000):  # 5,000 forged replies and 5,000 datagrams from elsewhere in 5 s
            proto.datagramReceived(bad_mac_reply(datagram), A)
            proto.datagramReceived(b"\x02\x00\x00\x14" + bytes(16), ("203.0.113.9", 1812 + i))
            if i % 1000 == 999:
                clock.advance(1)
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "getcertd.radius"]
        assert len(lines) == 20
        clock.advance(5)  # a new window: the next line says how many were not logged
        proto.datagramReceived(bad_mac_reply(datagram), A)
        proto.datagramReceived(reply_to(datagram, ACCESS_ACCEPT), A)
        assert out[0].code == ACCESS_ACCEPT  # the real answer still gets through
        for _ in range(101):
            proto.datagramReceived(b"junk", ("203.0.113.9", 9))
        proto.doStop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert server_status(proto)["dropped"] == 5001 and proto.status()["unknown_source_dropped"] == 5101
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "getcertd.radius"]
    assert len(lines) == 20 + 1 + 10 + 1
    assert lines[20].endswith(": bad Message-Authenticator (4990 more dropped before this one were not logged)")
    assert lines[21].endswith("not a configured RADIUS server (4990 more dropped before this one were not logged)")
    assert lines[-1] == "91 more dropped datagrams from unknown sources were not logged"
