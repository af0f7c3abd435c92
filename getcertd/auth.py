"""The authenticator interface shared by the local accounts file and RADIUS.

An authenticator's ``authenticate(user, password, state, client)`` returns a Deferred that fires with one of
:class:`Accept`, :class:`Reject` or :class:`Challenge`, or fails with
:class:`getcertd.errors.AuthUnavailable` when the backend can't be reached.
``state`` is None on a first attempt, or the opaque backend state from a previous :class:`Challenge`
(RADIUS State) when the password is a response to that challenge.
"""
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class Identity:
    """Who authenticated, how, and what the backend said about them (feeds policy)."""
    user: str
    method: str  # "local", "radius-pap", "radius-challenge", "challengePassword"
    session_timeout: Optional[int] = None  # seconds; caps the certificate lifetime
    profile_hint: Optional[str] = None  # e.g. RADIUS Class or Filter-Id
    attributes: Mapping[str, Tuple] = field(default_factory=dict)


@dataclass(frozen=True)
class Accept:
    identity: Identity


@dataclass(frozen=True)
class Reject:
    reason: str  # for the log only; never shown to the client (it must not reveal whether the user exists)


@dataclass(frozen=True)
class Challenge:
    message: str  # shown to the user (RADIUS Reply-Message)
    state: bytes  # opaque backend state, kept server-side


class IAuthenticator(Interface):
    """A password/token/challenge-response checker."""

    name = Attribute("short backend name for logs and metrics, e.g. 'local' or 'radius'")

    def authenticate(user, password, state, client):
        """Check ``password`` (bytes) for ``user`` (str); return a Deferred of Accept | Reject | Challenge."""


class ChallengeStore:
    """Server-side continuations of challenge/response authentication (layer 1: time is passed in).

    A 401 that carries a RADIUS challenge hands the client an opaque random token; the backend State stays
    here, bound to the user name, and expires after ``ttl`` seconds. A token is good for one response.
    """

    def __init__(self, ttl: float = 120.0, max_entries: int = 10000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries = {}  # token -> (user, state, expires)

    def put(self, token: str, user: str, state: bytes, now: float) -> None:
        self.expire(now)
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[token] = (user, state, now + self.ttl)

    def take(self, token: str, user: str, now: float) -> Optional[bytes]:
        """The backend state for this token if it belongs to ``user`` and has not expired; used once."""
        entry = self._entries.pop(token, None)
        if entry is None or entry[2] < now or entry[0] != user:
            return None
        return entry[1]

    def expire(self, now: float) -> None:
        for token in [t for t, e in self._entries.items() if e[2] < now]:
            del self._entries[token]

    def __len__(self):
        return len(self._entries)


class Throttle:
    """Failed authentications slow down, per key (a user name, a client address), then lock out for a while.

    The first ``free`` failures cost nothing; after that each attempt must wait 2**(n - free) seconds after
    the last failure (capped at ``max_wait``), and from ``lockout_after`` failures on the key is locked for
    ``lockout`` seconds. A key forgets its failures after ``forget`` seconds without one. Unknown users are
    throttled exactly like known ones, so the answers reveal nothing. Layer 1: time is passed in.
    """

    def __init__(self, free=5, max_wait=300.0, lockout_after=20, lockout=900.0, forget=3600.0, max_keys=100000):
        self.free, self.max_wait, self.lockout_after = free, max_wait, lockout_after
        self.lockout, self.forget, self.max_keys = lockout, forget, max_keys
        self._failures = {}  # key -> (count, last failure time)

    def wait(self, key, now: float) -> float:
        """Seconds ``key`` must still wait before it may try again (0 when it may)."""
        entry = self._failures.get(key)
        if entry is None:
            return 0.0
        count, last = entry
        if now - last > self.forget:
            del self._failures[key]
            return 0.0
        if count >= self.lockout_after:
            delay = self.lockout
        elif count >= self.free:
            delay = min(2.0 ** (count - self.free), self.max_wait)
        else:
            return 0.0
        return max(0.0, last + delay - now)

    def failure(self, key, now: float) -> None:
        count = self._failures.pop(key, (0, now))[0]
        if len(self._failures) >= self.max_keys:
            self._failures.pop(next(iter(self._failures)))  # the oldest entry
        self._failures[key] = (count + 1, now)

    def success(self, key) -> None:
        self._failures.pop(key, None)

    def __len__(self):
        return len(self._failures)
