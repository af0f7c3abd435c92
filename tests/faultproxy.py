"""A UDP fault injector between getcertd's RADIUS client and a real RADIUS server, for the fault tests.

It runs an asyncio loop in a thread of the test process. getcertd is configured with one or more of its
listening ports as RADIUS servers; each port forwards Access-Requests to the real server through a socket of its
own (so the server sees one client per "server") and sends the answers back from the listening port, which is
the only source getcertd trusts. What happens in between is ``mode``::

    proxy = FaultProxy(freeradius.address, freeradius.secret, ports=2).start()
    proxy.mode = "slow"      # "pass" | "slow" | "down" | "flap" | "garbage"
    ...
    proxy.counters           # what was forwarded, dropped, delayed, forged
    proxy.stop()

* ``slow``: every reply is held for a random 0.5 to 2 s (``slow_range``).
* ``down``: every request is dropped (the server is unreachable).
* ``flap``: up for ``flap_period`` seconds, down for as long, and so on (requests and replies dropped while down).
* ``garbage``: every request is answered at once with ``garbage_per_request`` forged datagrams (random bytes,
  truncated packets, replies with a wrong Response Authenticator, signed with the wrong secret, without or with a
  wrong Message-Authenticator, with a Proxy-State, for the wrong identifier: kinds :data:`GARBAGE_KINDS`), and
  forwarded to the real server with probability ``garbage_forward`` only (the real answer then follows). Forged
  replies are Access-Accepts, so a client that trusted one would let a wrong password in.
"""
import asyncio
import collections
import hashlib
import hmac
import os
import random
import struct
import threading
import time

ACCESS_ACCEPT = 2
MESSAGE_AUTHENTICATOR = 80
PROXY_STATE = 33

GARBAGE_KINDS = ("random", "short", "truncated", "bad-response-authenticator", "wrong-secret",
                 "no-message-authenticator", "bad-message-authenticator", "proxy-state", "wrong-identifier")


def forge_reply(identifier, request_authenticator, secret, code=ACCESS_ACCEPT, message_authenticator=True,
                bad_message_authenticator=False, bad_response_authenticator=False, extra=b""):
    """An Access-Accept (by default) for a request, signed with ``secret`` unless told to spoil it.

    Built by hand (RFC 2865 section 3, RFC 2869 section 5.14), independently of getcertd's codec.
    """
    attrs = b"\x12\x0cforged-ok!"  # Reply-Message
    if message_authenticator:
        attrs = bytes((MESSAGE_AUTHENTICATOR, 18)) + bytes(16) + attrs
    attrs += extra
    header = struct.pack("!BBH", code, identifier, 20 + len(attrs))
    if message_authenticator:
        mac = hmac.new(secret, header + request_authenticator + attrs, hashlib.md5).digest()
        if bad_message_authenticator:
            mac = bytes(b ^ 0x5A for b in mac)
        attrs = attrs[:2] + mac + attrs[18:]
    response = hashlib.md5(header + request_authenticator + attrs + secret).digest()
    if bad_response_authenticator:
        response = bytes(b ^ 0xA5 for b in response)
    return header + response + attrs


def garbage(kind, request, secret, rng):
    """One forged datagram of ``kind`` in answer to the Access-Request ``request``."""
    identifier, authenticator = request[1], request[4:20]
    if kind == "random":
        return rng.randbytes(rng.choice((1, 19, 20, 21, 64, 300, 4096, 4200)))
    if kind == "short":
        return bytes((ACCESS_ACCEPT, identifier)) + rng.randbytes(rng.randrange(0, 18))
    if kind == "truncated":  # a good reply cut short: its Length field says more than arrived
        good = forge_reply(identifier, authenticator, secret)
        return good[:rng.randrange(20, len(good))]
    if kind == "bad-response-authenticator":
        return forge_reply(identifier, authenticator, secret, bad_response_authenticator=True)
    if kind == "wrong-secret":
        return forge_reply(identifier, authenticator, secret + b"-not")
    if kind == "no-message-authenticator":  # a right Response Authenticator, no Message-Authenticator
        return forge_reply(identifier, authenticator, secret, message_authenticator=False)
    if kind == "bad-message-authenticator":  # a right Response Authenticator over a wrong Message-Authenticator
        return forge_reply(identifier, authenticator, secret, bad_message_authenticator=True)
    if kind == "proxy-state":  # right authenticators, but a Proxy-State the client never sent
        return forge_reply(identifier, authenticator, secret, extra=bytes((PROXY_STATE, 6)) + b"abcd")
    if kind == "wrong-identifier":
        return forge_reply((identifier + 1) % 256, authenticator, secret)
    raise ValueError(kind)


class _Listener(asyncio.DatagramProtocol):
    """One proxy port, as getcertd sees a RADIUS server."""

    def __init__(self, proxy, index):
        self.proxy = proxy
        self.index = index
        self.transport = None
        self.upstream = None  # _Upstream
        self.client = None  # getcertd's address, learnt from its first request

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.client = addr
        self.proxy._request(self, data)


class _Upstream(asyncio.DatagramProtocol):
    """The socket one proxy port uses towards the real server."""

    def __init__(self, listener):
        self.listener = listener
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.listener.proxy._reply(self.listener, data)


class FaultProxy:
    """See the module docstring."""

    def __init__(self, upstream, secret, ports=1, host="127.0.0.1", seed=None, slow_range=(0.5, 2.0),
                 flap_period=1.0, garbage_per_request=2, garbage_forward=0.5):
        self.upstream = tuple(upstream)
        self.secret = secret
        self.host = host
        self.rng = random.Random(seed if seed is not None else os.urandom(8))
        self.slow_range = slow_range
        self.flap_period = flap_period
        self.garbage_per_request = garbage_per_request
        self.garbage_forward = garbage_forward
        self.mode = "pass"
        self.counters = collections.Counter()
        self.addresses = []  # (host, port) of each proxy port, in order
        self._n = ports
        self._listeners = []
        self._loop = None
        self._thread = None
        self._flap_origin = 0.0
        self._kind = 0

    # -- control, from the test's thread -----------------------------------------------------------

    def start(self):
        ready = threading.Event()
        failure = []

        def run():
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except BaseException as e:  # noqa: BLE001 - reported to start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            for listener in self._listeners:
                listener.transport.close()
                listener.upstream.transport.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def set_mode(self, mode):
        if mode not in ("pass", "slow", "down", "flap", "garbage"):
            raise ValueError(mode)
        self._flap_origin = time.monotonic()
        self.mode = mode

    def stop(self):
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def servers(self):
        """For the [radius] servers key."""
        return " ".join(f"{h}:{p}" for h, p in self.addresses)

    # -- the loop's side -------------------------------------------------------------------------------

    async def _open(self):
        loop = asyncio.get_running_loop()
        for i in range(self._n):
            transport, listener = await loop.create_datagram_endpoint(
                lambda i=i: _Listener(self, i), local_addr=(self.host, 0))
            _, upstream = await loop.create_datagram_endpoint(
                lambda: _Upstream(listener), local_addr=(self.host, 0), remote_addr=self.upstream)
            listener.upstream = upstream
            self._listeners.append(listener)
            self.addresses.append(transport.get_extra_info("sockname")[:2])

    def _up(self):
        if self.mode == "down":
            return False
        if self.mode == "flap":
            return int((time.monotonic() - self._flap_origin) / self.flap_period) % 2 == 0
        return True

    def _request(self, listener, data):
        c = self.counters
        c["requests"] += 1
        if not self._up():
            c["requests dropped"] += 1
            return
        if self.mode == "garbage" and len(data) >= 20:
            for _ in range(self.garbage_per_request):
                kind = GARBAGE_KINDS[self._kind % len(GARBAGE_KINDS)]
                self._kind += 1
                listener.transport.sendto(garbage(kind, data, self.secret, self.rng), listener.client)
                c["garbage sent"] += 1
                c["garbage " + kind] += 1
            if self.rng.random() >= self.garbage_forward:
                c["requests dropped"] += 1
                return
        c["requests forwarded"] += 1
        listener.upstream.transport.sendto(data)

    def _reply(self, listener, data):
        c = self.counters
        c["replies"] += 1
        if not self._up():
            c["replies dropped"] += 1
            return
        if self.mode == "slow":
            c["replies delayed"] += 1
            self._loop.call_later(self.rng.uniform(*self.slow_range), self._send_reply, listener, data)
            return
        self._send_reply(listener, data)

    def _send_reply(self, listener, data):
        self.counters["replies forwarded"] += 1
        listener.transport.sendto(data, listener.client)
