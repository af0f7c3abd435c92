"""RADIUS client: authenticate users against the organisation's RADIUS servers (RFC 2865, RFC 2869).

Lowest layer first:

* Settings (layer 1): :class:`RadiusSettings`; :func:`settings_from_config` builds them from the
  ``[radius]`` config section (resolving host names once, when the service is composed).
* Packet codec (layer 1, pure, no I/O): :func:`encode_access_request` builds an Access-Request with
  PAP User-Password hiding (RFC 2865 5.2) and a Message-Authenticator (RFC 2869 5.14) as its first
  attribute (in two steps: :func:`prepare_access_request` encodes the attributes once per request,
  :func:`finish_access_request` each transmission to a server); :func:`decode_reply` checks a reply's
  Response Authenticator, Message-Authenticator and structure and decodes its attributes;
  :func:`interpret_reply` maps a reply to Accept / Reject / Challenge. Attributes are encoded and
  decoded by pyrad's packet layer with the dictionary shipped as package data (``getcertd/dictionary``);
  the password hiding and the authenticators are computed here.
* :class:`RadiusClientProtocol` (layer 2): one UDP socket, an in-flight table keyed by (server,
  identifier), retransmission, failover, dead-server marking and counters, driven by the clock passed
  in. The caller listens: ``reactor.listenUDP(0, protocol, interface=settings.listen_interface)``, or
  adds :func:`listener_service` to its MultiService.
* :class:`RadiusAuthenticator`: the :class:`getcertd.auth.IAuthenticator` on top of it.
"""
import dataclasses
import hashlib
import hmac
import io
import ipaddress
import os
import socket
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from pyrad import packet as pyrad_packet
from pyrad.dictionary import Dictionary
from twisted.application import internet
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from getcertd.auth import Accept, Challenge, IAuthenticator, Identity, Reject
from getcertd.errors import AuthUnavailable, ConfigError
from getcertd.loglimit import LogLimit, more

log = Logger()

ACCESS_REQUEST = pyrad_packet.AccessRequest
ACCESS_ACCEPT = pyrad_packet.AccessAccept
ACCESS_REJECT = pyrad_packet.AccessReject
ACCESS_CHALLENGE = pyrad_packet.AccessChallenge
CODE_NAMES = {ACCESS_REQUEST: "Access-Request", ACCESS_ACCEPT: "Access-Accept",
              ACCESS_REJECT: "Access-Reject", ACCESS_CHALLENGE: "Access-Challenge"}
REPLY_CODES = frozenset((ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE))

USER_PASSWORD = 2
MESSAGE_AUTHENTICATOR = 80
PROXY_STATE = 33
HEADER_LENGTH = 20
MAX_PACKET_LENGTH = 4096  # RFC 2865 section 3
MAX_PASSWORD_LENGTH = 128  # RFC 2865 section 5.2
PROFILE_ATTRIBUTES = ("Class", "Filter-Id")


def _load_dictionary() -> Dictionary:
    text = resources.files("getcertd").joinpath("dictionary").read_text(encoding="utf-8")
    return Dictionary(io.StringIO(text))


DICTIONARY = _load_dictionary()


# ---------------------------------------------------------------------------------------------------
# Layer 1: packet codec
# ---------------------------------------------------------------------------------------------------

class BadReply(ValueError):
    """A datagram that is not a trustworthy reply. The message names the reason, never a value."""


@dataclass(frozen=True)
class RadiusReply:
    """A verified reply: its code, identifier and decoded attributes (name -> tuple of values).

    Attributes keep their dictionary types (str, int, bytes for octets); unknown ones are named like
    FreeRADIUS names them (``Attr-N``, ``Attr-26.VENDOR.N``) with raw bytes values. The
    Message-Authenticator is not listed.
    """
    code: int
    identifier: int
    attributes: Mapping[str, Tuple] = field(default_factory=dict)
    server: Optional[str] = None  # the label of the server that sent it (set by the client protocol)

    @property
    def code_name(self) -> str:
        return CODE_NAMES.get(self.code, str(self.code))

    def first(self, name: str, default=None):
        values = self.attributes.get(name)
        return values[0] if values else default


def response_authenticator(data: bytes, request_authenticator: bytes, secret: bytes) -> bytes:
    """MD5(Code + Identifier + Length + Request Authenticator + Attributes + Secret), RFC 2865 section 3."""
    return hashlib.md5(data[:4] + request_authenticator + data[HEADER_LENGTH:] + secret).digest()


def message_authenticator(data: bytes, vector: bytes, secret: bytes) -> bytes:
    """HMAC-MD5 over the packet with ``vector`` as Authenticator field (RFC 2869 section 5.14).

    ``data`` must have its Message-Authenticator value zeroed. ``vector`` is the packet's own
    Request Authenticator for an Access-Request, the Request Authenticator of the request for a reply.
    """
    return hmac.new(secret, data[:4] + vector + data[HEADER_LENGTH:], hashlib.md5).digest()


def _split_attributes(data: bytes) -> List[Tuple[int, int, int]]:
    """(type, offset, length) of each attribute of a packet; BadReply if they don't add up."""
    out = []
    offset = HEADER_LENGTH
    while offset < len(data):
        if len(data) - offset < 2:
            raise BadReply("truncated attribute header")
        attr_type, length = data[offset], data[offset + 1]
        if length < 2 or offset + length > len(data):
            raise BadReply("bad attribute length")
        out.append((attr_type, offset, length))
        offset += length
    return out


@dataclass(frozen=True)
class PreparedRequest:
    """An Access-Request's attributes, encoded once by pyrad (the slow part), around the one value that changes
    with each transmission's Request Authenticator: the User-Password, hidden by :func:`finish_access_request`."""
    before: bytes  # the encoded attributes before the User-Password
    password: Optional[bytes]  # its plaintext, or None
    after: bytes  # the encoded attributes after it


def _encode_attributes(attributes) -> bytes:
    pkt = pyrad_packet.AuthPacket(code=ACCESS_REQUEST, id=0, secret=b"", authenticator=bytes(16), dict=DICTIONARY)
    for name, value in attributes:
        pkt.AddAttribute(name, value)
    return pkt.RequestPacket()[HEADER_LENGTH:]


def _hidden_length(password: bytes) -> int:
    return max(16, -(-len(password) // 16) * 16)


def prepare_access_request(attributes: Sequence[Tuple[str, Any]]) -> PreparedRequest:
    """``attributes`` ((dictionary name, value) pairs; a User-Password value is the plaintext, bytes or str)
    encoded for :func:`finish_access_request`. Raises ValueError for what can't be sent (a password over 128
    octets, a second User-Password, an attribute over 253 octets, a packet over 4096)."""
    names = [name for name, _ in attributes]
    if names.count("User-Password") > 1:
        raise ValueError("one User-Password at most")
    at = names.index("User-Password") if "User-Password" in names else len(names)
    password = None
    if at < len(names):
        password = attributes[at][1]
        if isinstance(password, str):
            password = password.encode("utf-8")
        if len(password) > MAX_PASSWORD_LENGTH:
            raise ValueError(f"password longer than {MAX_PASSWORD_LENGTH} octets")
    prepared = PreparedRequest(_encode_attributes(attributes[:at]), password, _encode_attributes(attributes[at + 1:]))
    length = HEADER_LENGTH + 18 + len(prepared.before) + len(prepared.after) \
        + (2 + _hidden_length(password) if password is not None else 0)
    if length > MAX_PACKET_LENGTH:
        raise ValueError(f"Access-Request longer than {MAX_PACKET_LENGTH} octets")
    return prepared


def hide_password(password: bytes, authenticator: bytes, secret: bytes) -> bytes:
    """The User-Password value: the password padded with zeros to a multiple of 16 octets (at least 16), each
    block XORed with MD5(secret + the previous hidden block, or the Request Authenticator), RFC 2865 5.2."""
    padded = password + bytes(_hidden_length(password) - len(password))
    out, last = [], authenticator
    for i in range(0, len(padded), 16):
        last = (int.from_bytes(padded[i:i + 16], "big")
                ^ int.from_bytes(hashlib.md5(secret + last).digest(), "big")).to_bytes(16, "big")
        out.append(last)
    return b"".join(out)


def finish_access_request(prepared: PreparedRequest, identifier: int, authenticator: bytes, secret: bytes) -> bytes:
    """The Access-Request of :func:`prepare_access_request` with this identifier and Request Authenticator: a
    Message-Authenticator first (BlastRADIUS advice), then the attributes in their order."""
    if not 0 <= identifier <= 255:
        raise ValueError("identifier out of range")
    if len(authenticator) != 16:
        raise ValueError("the Request Authenticator is 16 octets")
    attributes = [bytes((MESSAGE_AUTHENTICATOR, 18)), bytes(16), prepared.before]
    if prepared.password is not None:
        hidden = hide_password(prepared.password, authenticator, secret)
        attributes += [bytes((USER_PASSWORD, 2 + len(hidden))), hidden]
    attributes.append(prepared.after)
    attrs = b"".join(attributes)
    data = struct.pack("!BBH", ACCESS_REQUEST, identifier, HEADER_LENGTH + len(attrs)) + authenticator + attrs
    start = HEADER_LENGTH + 2  # the Message-Authenticator's value, zero while the HMAC is computed
    return data[:start] + message_authenticator(data, authenticator, secret) + data[start + 16:]


def encode_access_request(identifier: int, authenticator: bytes, secret: bytes,
                          attributes: Sequence[Tuple[str, Any]]) -> bytes:
    """Build an Access-Request (:func:`prepare_access_request` and :func:`finish_access_request` at once)."""
    return finish_access_request(prepare_access_request(attributes), identifier, authenticator, secret)


def encode_reply(code: int, identifier: int, request_authenticator: bytes, secret: bytes,
                 attributes: Sequence[Tuple[Union[str, int], Any]] = (), *,
                 with_message_authenticator: bool = True) -> bytes:
    """Build a reply as a server would (tests and fake servers use it).

    ``attributes`` are (name, value) pairs, or (attribute number, raw bytes). The
    Message-Authenticator, when asked for, comes first.
    """
    pkt = pyrad_packet.AuthPacket(code=code, id=identifier, secret=secret,
                                  authenticator=request_authenticator, dict=DICTIONARY)
    if with_message_authenticator:
        pkt[MESSAGE_AUTHENTICATOR] = [bytes(16)]
    for name, value in attributes:
        if isinstance(name, int):
            OrderedDict.setdefault(pkt, name, []).append(value)
        else:
            pkt.AddAttribute(name, value)
    attrs = pkt.RequestPacket()[HEADER_LENGTH:]
    header = struct.pack("!BBH", code, identifier, HEADER_LENGTH + len(attrs))
    data = header + request_authenticator + attrs
    if with_message_authenticator:
        start = HEADER_LENGTH + 2
        data = data[:start] + message_authenticator(data, request_authenticator, secret) + data[start + 16:]
    return header + response_authenticator(data, request_authenticator, secret) + data[HEADER_LENGTH:]


def _attribute_name(key) -> str:
    if isinstance(key, tuple):
        return "Attr-26." + ".".join(str(k) for k in key)
    if isinstance(key, int):
        return f"Attr-{key}"
    return key


def _decode_attributes(data: bytes) -> Dict[str, Tuple]:
    try:
        pkt = pyrad_packet.AuthPacket(packet=data, dict=DICTIONARY)
    except pyrad_packet.PacketError as e:
        raise BadReply(f"undecodable attributes ({e})") from None
    out: Dict[str, Tuple] = {}
    for key in pkt.keys():
        if key in ("Message-Authenticator", MESSAGE_AUTHENTICATOR):
            continue
        try:
            values = tuple(pkt[key]) if isinstance(key, str) else tuple(OrderedDict.__getitem__(pkt, key))
        except (ValueError, KeyError, TypeError, pyrad_packet.PacketError):
            # a value that doesn't fit its dictionary type: keep the raw octets
            values = tuple(OrderedDict.__getitem__(pkt, DICTIONARY.attributes[key].code))
        out[_attribute_name(key)] = values
    return out


def decode_reply(data: bytes, request_authenticator: bytes, secret: bytes,
                 require_message_authenticator: bool = True) -> RadiusReply:
    """Verify and decode a reply to the Access-Request that had ``request_authenticator``.

    Raises BadReply unless: the header and attributes are well formed, the code is Access-Accept,
    -Reject or -Challenge, the Response Authenticator is right, the Message-Authenticator (if
    present, and it must be when ``require_message_authenticator``) is right and unique, and there is
    no Proxy-State (we never send one). Octets after the Length field are ignored (RFC 2865 section 3).
    """
    if len(data) < HEADER_LENGTH:
        raise BadReply("shorter than a RADIUS header")
    code, identifier, length = struct.unpack("!BBH", data[:4])
    if length < HEADER_LENGTH or length > MAX_PACKET_LENGTH or length > len(data):
        raise BadReply("bad Length field")
    data = data[:length]
    if code not in REPLY_CODES:
        raise BadReply(f"unexpected code {code}")
    attributes = _split_attributes(data)
    expected = response_authenticator(data, request_authenticator, secret)
    if not hmac.compare_digest(expected, data[4:HEADER_LENGTH]):
        raise BadReply("bad Response Authenticator")
    macs = [(offset, attr_length) for attr_type, offset, attr_length in attributes
            if attr_type == MESSAGE_AUTHENTICATOR]
    if len(macs) > 1:
        raise BadReply("more than one Message-Authenticator")
    if macs:
        offset, attr_length = macs[0]
        if attr_length != 18:
            raise BadReply("bad Message-Authenticator length")
        received = data[offset + 2:offset + 18]
        zeroed = data[:offset + 2] + bytes(16) + data[offset + 18:]
        if not hmac.compare_digest(message_authenticator(zeroed, request_authenticator, secret), received):
            raise BadReply("bad Message-Authenticator")
    elif require_message_authenticator:
        raise BadReply("no Message-Authenticator")
    if any(attr_type == PROXY_STATE for attr_type, _, _ in attributes):
        raise BadReply("unexpected Proxy-State")
    return RadiusReply(code, identifier, _decode_attributes(data))


def access_request_attributes(user: str, password: Union[bytes, str], state: Optional[bytes] = None,
                              calling_station_id: Optional[str] = None,
                              nas_identifier: Optional[str] = None,
                              nas_ip_address: Optional[str] = None) -> List[Tuple[str, Any]]:
    """The attributes of an Access-Request (without the Message-Authenticator), in sending order."""
    attributes: List[Tuple[str, Any]] = [("User-Name", user), ("User-Password", password)]
    if nas_identifier:
        attributes.append(("NAS-Identifier", nas_identifier))
    if nas_ip_address:
        ip = ipaddress.ip_address(nas_ip_address)
        attributes.append(("NAS-IP-Address" if ip.version == 4 else "NAS-IPv6-Address", str(ip)))
    if calling_station_id:
        attributes.append(("Calling-Station-Id", calling_station_id))
    if state:
        attributes.append(("State", bytes(state)))
    return attributes


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def interpret_reply(reply: RadiusReply, user: str, challenged: bool,
                    profile_attribute: str = "Class") -> Union[Accept, Reject, Challenge]:
    """Map a verified reply to the authenticator result.

    ``challenged``: the request carried a State (it answered a challenge).
    """
    if reply.code == ACCESS_ACCEPT:
        # Session-Timeout caps the certificate's lifetime: with several values the shortest; one that can't be
        # read is no Accept (issuing without the cap the server meant would outlive it). 0 means no cap.
        timeouts = reply.attributes.get("Session-Timeout", ())
        if not all(isinstance(t, int) for t in timeouts):
            return Reject("Access-Accept with a Session-Timeout that is not a 4-octet integer")
        # A User-Name in the Accept is the name the server knows the user by (RFC 2865 5.1: the NAS uses it from
        # then on): a directory that ignores case or strips a realm says "alice" for ALICE and alice@EXAMPLE, so
        # they are one user here too (one subject, one per-user limit).
        named = reply.first("User-Name")
        if named is not None:
            named = _text(named)
            if not named or not named.isprintable():
                return Reject("Access-Accept with a User-Name that can't name a user")
            user = named
        return Accept(Identity(
            user=user,
            method="radius-challenge" if challenged else "radius-pap",
            session_timeout=min(timeouts) if timeouts else None,
            profile_hints=tuple(_text(h) for h in reply.attributes.get(profile_attribute, ())),
            attributes=dict(reply.attributes)))
    messages = "".join(_text(m) for m in reply.attributes.get("Reply-Message", ()))
    if reply.code == ACCESS_CHALLENGE:
        state = reply.first("State")
        if not state:
            return Reject("Access-Challenge without State")
        return Challenge(messages, bytes(state))
    return Reject("Access-Reject" + (f": {messages}" if messages else ""))


# ---------------------------------------------------------------------------------------------------
# Layer 2: the client protocol
# ---------------------------------------------------------------------------------------------------

def _normalise_host(host: str) -> str:
    return str(ipaddress.ip_address(host.split("%", 1)[0]))


@dataclass(frozen=True)
class RadiusSettings:
    """How to reach the RADIUS servers.

    ``servers`` are (IP address, port) pairs tried in order, all of one address family (one socket);
    names must be resolved before. ``retries`` is the number of retransmissions per server;
    ``dead_time`` how long a server that let a request time out is skipped while others are up.
    ``nas_ip_address`` (optional) is sent as NAS-IP-Address or NAS-IPv6-Address.
    """
    servers: Tuple[Tuple[str, int], ...]
    secret: bytes = field(repr=False)  # never in logs
    timeout: float = 3.0
    retries: int = 2
    nas_identifier: str = "getcertd"
    require_message_authenticator: bool = True
    dead_time: float = 30.0
    profile_attribute: str = "Class"
    nas_ip_address: Optional[str] = None

    def __post_init__(self):
        if not self.servers:
            raise ValueError("RADIUS: at least one server is needed")
        servers = []
        for server in self.servers:
            try:
                host, port = server
                host = _normalise_host(str(host))
                port = int(port)
            except (TypeError, ValueError):
                raise ValueError(f"RADIUS server {server!r}: expected (IP address, port)") from None
            if not 0 < port < 65536:
                raise ValueError(f"RADIUS server {server!r}: bad port")
            servers.append((host, port))
        if len(set(servers)) != len(servers):
            raise ValueError("RADIUS: a server is listed twice")
        if len({ipaddress.ip_address(h).version for h, _ in servers}) != 1:
            raise ValueError("RADIUS: servers must all be IPv4 or all IPv6 (one socket)")
        object.__setattr__(self, "servers", tuple(servers))
        if not isinstance(self.secret, bytes) or not self.secret:
            raise ValueError("RADIUS: the secret must be non-empty bytes")
        if not self.timeout > 0:
            raise ValueError("RADIUS: timeout must be positive")
        if self.retries < 0:
            raise ValueError("RADIUS: retries must be 0 or more")
        if self.dead_time < 0:
            raise ValueError("RADIUS: dead_time must be 0 or more")
        if self.profile_attribute not in PROFILE_ATTRIBUTES:
            raise ValueError(f"RADIUS: profile_attribute must be one of {', '.join(PROFILE_ATTRIBUTES)}")
        if self.nas_ip_address is not None:
            object.__setattr__(self, "nas_ip_address", _normalise_host(self.nas_ip_address))
        elif not self.nas_identifier:
            raise ValueError("RADIUS: a NAS-Identifier or a NAS address is needed (RFC 2865 section 4.1)")

    @property
    def address_family(self) -> int:
        return socket.AF_INET6 if ipaddress.ip_address(self.servers[0][0]).version == 6 else socket.AF_INET

    @property
    def listen_interface(self) -> str:
        """The wildcard address of the servers' family, for ``reactor.listenUDP(0, p, interface=...)``."""
        return "::" if self.address_family == socket.AF_INET6 else "0.0.0.0"


def settings_from_config(config, resolve=socket.getaddrinfo) -> RadiusSettings:
    """RadiusSettings from the ``[radius]`` section (getcertd.config.RadiusConfig).

    Host names are resolved here, once, with ``resolve`` (getaddrinfo: blocking, so call this while
    composing the service, before the reactor runs). All servers must share the first server's address
    family; a name with addresses of both families uses the matching one. Raises ConfigError.
    """
    candidates = []
    for host, port in config.servers:
        try:
            candidates.append([_normalise_host(host)])
            continue
        except ValueError:
            pass
        try:
            infos = resolve(host, port, 0, socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as e:
            raise ConfigError(f"[radius] servers: can't resolve {host!r}: {e}") from None
        addresses = []
        for info in infos:
            address = _normalise_host(info[4][0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise ConfigError(f"[radius] servers: {host!r} has no address")
        candidates.append(addresses)
    if not candidates:
        raise ConfigError("[radius] servers: at least one host:port is needed")
    version = ipaddress.ip_address(candidates[0][0]).version
    servers = []
    for (host, port), addresses in zip(config.servers, candidates):
        same = [a for a in addresses if ipaddress.ip_address(a).version == version]
        if not same:
            raise ConfigError(f"[radius] servers: {host!r} has no IPv{version} address; all servers must "
                              f"use the first server's address family (one socket)")
        servers.append((same[0], port))
    try:
        return RadiusSettings(
            servers=tuple(servers), secret=config.secret, timeout=config.timeout, retries=config.retries,
            nas_identifier=config.nas_identifier,
            require_message_authenticator=config.require_message_authenticator,
            dead_time=config.dead_time, profile_attribute=config.profile_attribute,
            nas_ip_address=getattr(config, "nas_ip_address", None) or None)
    except ValueError as e:
        raise ConfigError(f"[radius] {str(e).removeprefix('RADIUS: ')}") from None


def listener_service(protocol: "RadiusClientProtocol") -> internet.UDPServer:
    """A service that binds the client's UDP socket (any port, the servers' family) when started."""
    return internet.UDPServer(0, protocol, interface=protocol.settings.listen_interface)


def _label(address: Tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Server:
    """One RADIUS server: identifiers in flight, requests waiting for an identifier, dead marking, counters."""

    def __init__(self, address: Tuple[str, int], first_identifier: int):
        self.address = address
        self.label = _label(address)
        self.in_flight: Dict[int, "_Request"] = {}
        self.waiting: Deque["_Request"] = deque()
        self.next_identifier = first_identifier
        self.dead_until: Optional[float] = None
        self.requests = 0
        self.retransmissions = 0
        self.accepts = 0
        self.rejects = 0
        self.challenges = 0
        self.timeouts = 0
        self.dropped = 0
        self.last_rtt: Optional[float] = None

    def is_up(self, now: float) -> bool:
        """Not marked dead, or its dead_time is over (it is tried again). No side effects: status() reads it."""
        return self.dead_until is None or now >= self.dead_until

    def allocate_identifier(self) -> Optional[int]:
        if len(self.in_flight) >= 256:
            return None
        while self.next_identifier in self.in_flight:
            self.next_identifier = (self.next_identifier + 1) % 256
        identifier = self.next_identifier
        self.next_identifier = (identifier + 1) % 256
        return identifier


class _Request:
    """One authentication: its attributes and where it stands (server, identifier, transmissions)."""

    def __init__(self, prepared: PreparedRequest, deferred: defer.Deferred):
        self.prepared = prepared
        self.deferred = deferred
        self.tried: set = set()
        self.server: Optional[_Server] = None
        self.queued = False
        self.identifier: Optional[int] = None
        self.authenticator = b""
        self.packet = b""
        self.transmissions = 0
        self.first_sent = 0.0
        self.deadline = 0.0  # when the request fails wherever it stands (RadiusClientProtocol.bound)
        self.timer = None
        self.done = False


class RadiusClientProtocol(DatagramProtocol):
    """Sends Access-Requests and matches verified replies to them; one UDP socket for all servers.

    Each request is sent to the first server that is up (in configured order) and not yet tried for
    it, retransmitted unchanged every ``timeout`` seconds ``retries`` times, then the server is marked
    dead for ``dead_time`` and the request fails over with a new identifier and Request
    Authenticator. When every server was tried, the request fails with AuthUnavailable. Either way it
    fails at most timeout x (retries + 1) x number of servers after it was made (:attr:`bound`), time
    spent waiting for a free identifier included. Servers marked dead are tried only after those up.
    A reply is trusted only if it comes from the server's address and port, for an identifier in
    flight, with the right Response Authenticator and Message-Authenticator (see
    :func:`decode_reply`); anything else is dropped, counted and logged (:class:`getcertd.loglimit.LogLimit`: at most
    10 lines a kind per 10 s), and the request keeps waiting.
    When all 256 identifiers of a server are in flight, requests wait in a queue (at most
    ``max_queued``, beyond that they fail with AuthUnavailable; a request still waiting at its bound
    fails with AuthUnavailable too).
    """

    def __init__(self, settings: RadiusSettings, clock: IReactorTime, *,
                 random_bytes: Callable[[int], bytes] = os.urandom, max_queued: int = 4096):
        self.settings = settings
        self.clock = clock
        self._random = random_bytes
        self.max_queued = max_queued
        self._servers = [_Server(address, random_bytes(1)[0]) for address in settings.servers]
        self._by_address = {server.address: server for server in self._servers}
        self.unknown_source_dropped = 0
        self._unknown_source_log = LogLimit(clock)
        self._drop_log = LogLimit(clock)
        self._running = False
        self.rtt_observer = None  # rtt_observer(server label, seconds) for each verified reply (metrics)

    # -- Twisted's DatagramProtocol ----------------------------------------------------------------

    def startProtocol(self):
        self._running = True

    def stopProtocol(self):
        self._running = False
        requests = []
        for server in self._servers:
            requests += list(server.in_flight.values()) + list(server.waiting)
            server.in_flight.clear()
            server.waiting.clear()
        for request in requests:
            self._fail(request, AuthUnavailable("RADIUS client stopped"))
        for limit, what in ((self._unknown_source_log, "datagrams from unknown sources"),
                            (self._drop_log, "replies from RADIUS servers")):
            if limit.suppressed:
                log.warn("{count} more dropped {what} were not logged", count=limit.suppressed, what=what)
                limit.suppressed = 0

    def datagramReceived(self, data: bytes, addr):
        try:
            source = (_normalise_host(addr[0]), int(addr[1]))
        except (ValueError, TypeError, IndexError):
            source = None
        server = self._by_address.get(source)
        if server is None:
            self.unknown_source_dropped += 1
            suppressed = self._unknown_source_log.allow()
            if suppressed is not None:
                log.warn("Dropped a datagram from {source}: not a configured RADIUS server{more}", source=addr,
                         more=more(suppressed))
            return
        if len(data) < HEADER_LENGTH:
            self._drop(server, None, "shorter than a RADIUS header")
            return
        identifier = data[1]
        request = server.in_flight.get(identifier)
        if request is None:
            self._drop(server, identifier, "identifier not in flight")
            return
        try:
            reply = decode_reply(data, request.authenticator, self.settings.secret,
                                 self.settings.require_message_authenticator)
        except BadReply as e:
            self._drop(server, identifier, str(e))
            return
        server.last_rtt = self.clock.seconds() - request.first_sent
        if self.rtt_observer is not None:
            self.rtt_observer(server.label, server.last_rtt)
        if server.dead_until is not None:
            log.info("RADIUS server {server} answers again", server=server.label)
            server.dead_until = None
        if reply.code == ACCESS_ACCEPT:
            server.accepts += 1
        elif reply.code == ACCESS_REJECT:
            server.rejects += 1
        else:
            server.challenges += 1
        self._cancel_timer(request)
        self._release(request)
        request.done = True
        request.deferred.callback(dataclasses.replace(reply, server=server.label))

    # -- API --------------------------------------------------------------------------------------

    def send_access_request(self, attributes: Sequence[Tuple[str, Any]],
                            server: Optional[str] = None) -> defer.Deferred:
        """Send an Access-Request with ``attributes`` (see :func:`encode_access_request`); with ``server`` (a
        label), to that server only, up or marked dead (an answer to its challenge: no other has the State).

        Returns a Deferred that fires with the verified :class:`RadiusReply`, or fails with
        AuthUnavailable when no server answered. Raises ValueError at once if the attributes can't be
        encoded. Cancelling the Deferred forgets the request.
        """
        prepared = prepare_access_request(list(attributes))  # ValueError at once; encoded once for every server
        request: Optional[_Request] = None

        def cancel(_):
            if request is not None and not request.done:
                request.done = True
                self._cancel_timer(request)
                self._release(request)

        request = _Request(prepared, defer.Deferred(cancel))
        request.deadline = self.clock.seconds() + self.bound
        if server is not None:  # the others count as tried
            request.tried.update(s.address for s in self._servers if s.label != server)
        if not self._running or self.transport is None:
            self._fail(request, AuthUnavailable("RADIUS client is not running"))
        else:
            self._dispatch(request)
        return request.deferred

    def access_request(self, user: str, password: Union[bytes, str], state: Optional[bytes] = None,
                       calling_station_id: Optional[str] = None, server: Optional[str] = None) -> defer.Deferred:
        """Send an Access-Request for ``user``, with this client's NAS-Identifier and NAS address."""
        return self.send_access_request(access_request_attributes(
            user, password, state, calling_station_id,
            self.settings.nas_identifier, self.settings.nas_ip_address), server)

    @property
    def bound(self) -> float:
        """The longest a request can take: every server tried, each sent to retries + 1 times."""
        return self.settings.timeout * (self.settings.retries + 1) * len(self._servers)

    def status(self) -> dict:
        """Counters for the admin manhole and metrics, as plain data."""
        now = self.clock.seconds()
        servers = []
        for server in self._servers:
            up = server.is_up(now)
            servers.append({
                "server": server.label,
                "host": server.address[0],
                "port": server.address[1],
                "state": "up" if up else "dead",
                "dead_for": 0.0 if up else server.dead_until - now,
                "in_flight": len(server.in_flight),
                "queued": len(server.waiting),
                "requests": server.requests,
                "retransmissions": server.retransmissions,
                "accepts": server.accepts,
                "rejects": server.rejects,
                "challenges": server.challenges,
                "timeouts": server.timeouts,
                "dropped": server.dropped,
                "last_rtt": server.last_rtt,
            })
        return {"servers": servers, "unknown_source_dropped": self.unknown_source_dropped}

    # -- the state machine ------------------------------------------------------------------------

    def _choose_server(self, request: _Request) -> Optional[_Server]:
        now = self.clock.seconds()
        untried = [s for s in self._servers if s.address not in request.tried]
        up = [s for s in untried if s.is_up(now)]
        candidates = up or untried
        return candidates[0] if candidates else None

    def _dispatch(self, request: _Request):
        """Send the request to the next server, or queue it, or fail it when every server was tried."""
        server = self._choose_server(request)
        if server is None:
            tried = len(request.tried)
            self._fail(request, AuthUnavailable(
                f"no answer from {tried} RADIUS server{'s' if tried != 1 else ''}"))
            return
        identifier = server.allocate_identifier()
        if identifier is None:
            if sum(len(s.waiting) for s in self._servers) >= self.max_queued:
                self._fail(request, AuthUnavailable("too many RADIUS requests waiting"))
                return
            request.server, request.queued = server, True
            server.waiting.append(request)
            # Waiting counts against the bound: with every identifier held by a server that doesn't answer, a
            # request would otherwise wait a whole bound per 256 requests ahead of it.
            request.timer = self.clock.callLater(max(0.0, request.deadline - self.clock.seconds()),
                                                 self._waited_too_long, request)
            return
        request.server, request.queued, request.identifier = server, False, identifier
        request.authenticator = self._random(16)
        request.packet = finish_access_request(request.prepared, identifier, request.authenticator,
                                               self.settings.secret)
        request.tried.add(server.address)
        request.transmissions = 0
        request.first_sent = self.clock.seconds()
        server.in_flight[identifier] = request
        server.requests += 1
        self._transmit(request)

    def _transmit(self, request: _Request):
        request.transmissions += 1
        try:
            self.transport.write(request.packet, request.server.address)
        except Exception as e:  # e.g. no route: the timer will fail over
            log.warn("Could not send to RADIUS server {server}: {error}",
                     server=request.server.label, error=str(e))
        wait = min(self.settings.timeout, request.deadline - self.clock.seconds())
        request.timer = self.clock.callLater(max(0.0, wait), self._timed_out, request)

    def _timed_out(self, request: _Request):
        request.timer = None
        server = request.server
        late = self.clock.seconds() >= request.deadline
        if request.transmissions <= self.settings.retries and not late:
            server.retransmissions += 1
            self._transmit(request)
            return
        if request.transmissions > self.settings.retries:  # it had its full share of the server's time
            server.timeouts += 1
            if server.is_up(self.clock.seconds()):
                log.warn("RADIUS server {server} did not answer: marked dead for {dead_time} s",
                         server=server.label, dead_time=self.settings.dead_time)
            server.dead_until = self.clock.seconds() + self.settings.dead_time
        self._release(request)
        if late and any(s.address not in request.tried for s in self._servers):
            self._fail(request, AuthUnavailable(f"no RADIUS answer within {self.bound:g} s"))
        else:
            self._dispatch(request)

    def _waited_too_long(self, request: _Request):
        request.timer = None
        self._release(request)  # off its server's waiting queue
        self._fail(request, AuthUnavailable(f"no RADIUS identifier free within {self.bound:g} s"))

    def _release(self, request: _Request):
        """Take the request off its server; give a freed identifier to the first waiting request."""
        server, request.server = request.server, None
        if server is None:
            return
        if request.queued:
            request.queued = False
            try:
                server.waiting.remove(request)
            except ValueError:
                pass
            return
        if server.in_flight.get(request.identifier) is request:
            del server.in_flight[request.identifier]
        request.identifier = None
        if server.waiting and self._running:
            waiter = server.waiting.popleft()
            waiter.server, waiter.queued = None, False
            self._cancel_timer(waiter)
            self._dispatch(waiter)

    def _cancel_timer(self, request: _Request):
        if request.timer is not None:
            if request.timer.active():
                request.timer.cancel()
            request.timer = None

    def _fail(self, request: _Request, error: Exception):
        if request.done:
            return
        request.done = True
        self._cancel_timer(request)
        request.deferred.errback(error)

    def _drop(self, server: _Server, identifier: Optional[int], reason: str):
        server.dropped += 1
        suppressed = self._drop_log.allow()
        if suppressed is not None:
            log.warn("Dropped a reply from RADIUS server {server} (identifier {identifier}): {reason}{more}",
                     server=server.label, identifier=identifier, reason=reason, more=more(suppressed))


# ---------------------------------------------------------------------------------------------------
# The authenticator
# ---------------------------------------------------------------------------------------------------

@implementer(IAuthenticator)
class RadiusAuthenticator:
    """IAuthenticator over RADIUS PAP, with Access-Challenge continuation through State."""

    name = "radius"

    def __init__(self, protocol: RadiusClientProtocol):
        self.protocol = protocol

    def authenticate(self, user: str, password: bytes, state: Optional[bytes], client: str) -> defer.Deferred:
        """``state`` (from a Challenge of ours) is the RADIUS State with the label of the server that sent it in
        front: the answer goes to that server alone."""
        server = None
        if state:
            server, state = state[1:1 + state[0]].decode(), state[1 + state[0]:]
        try:
            d = self.protocol.access_request(user, password, state or None, client or None, server)
        except ValueError as e:
            return defer.succeed(Reject(f"request can't be sent over RADIUS: {e}"))

        def interpret(reply):
            result = interpret_reply(reply, user, server is not None, self.protocol.settings.profile_attribute)
            if isinstance(result, Challenge):
                label = reply.server.encode()
                result = Challenge(result.message, bytes([len(label)]) + label + result.state)
            return result
        return d.addCallback(interpret)
