"""The authenticator interface shared by the local accounts file and RADIUS.

An authenticator's ``authenticate(user, password, state, client)`` returns a Deferred that fires with one of
:class:`Accept`, :class:`Reject` or :class:`Challenge`, or fails with
:class:`getcertd.errors.AuthUnavailable` when the backend can't be reached.
``state`` is None on a first attempt, or the opaque backend state from a previous :class:`Challenge`
(RADIUS State) when the password is a response to that challenge.
"""
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class Identity:
    """Who authenticated, how, and what the backend said about them (feeds policy)."""
    user: str
    method: str  # "local", "radius-pap", "radius-challenge", "challengePassword"
    session_timeout: Optional[int] = None  # seconds; caps the certificate lifetime
    profile_hints: Tuple[str, ...] = ()  # e.g. the RADIUS Class or Filter-Id values, in order
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
    here, bound to the user name, and expires after ``ttl`` seconds. A token is good for one response. Each user
    has at most ``per_user`` pending (a new one replaces that user's oldest) and each client address at most
    ``per_client``; when the store is full, or an address has its share, a new challenge is refused rather
    than anyone else's dropped. ``rounds`` counts the challenges of one login, for the caller to cap.
    """

    def __init__(self, ttl: float = 120.0, max_entries: int = 10000, per_user: int = 3, per_client: int = 20):
        self.ttl = ttl
        self.max_entries, self.per_user, self.per_client = max_entries, per_user, per_client
        self._entries = {}  # token -> (user, state, expires, client, rounds), oldest first
        self._by_user = {}  # user -> [token, ...], oldest first
        self._by_client = {}  # client -> number pending

    def put(self, token: str, user: str, state: bytes, now: float, client: str = "", rounds: int = 1) -> bool:
        """Keep a continuation; False (nothing kept) when the store or this client's share is full."""
        self.expire(now)
        mine = self._by_user.get(user, ())
        while len(mine) >= self.per_user:
            self._drop(mine[0])
        if len(self._entries) >= self.max_entries or self._by_client.get(client, 0) >= self.per_client:
            return False
        self._entries[token] = (user, state, now + self.ttl, client, rounds)
        self._by_user.setdefault(user, []).append(token)
        self._by_client[client] = self._by_client.get(client, 0) + 1
        return True

    def take(self, token: str, user: str, now: float) -> Optional[Tuple[bytes, int]]:
        """(backend state, rounds so far) for this token if it belongs to ``user`` and has not expired; used
        once. A token presented by another user is not spent."""
        entry = self._entries.get(token)
        if entry is None or entry[0] != user:
            return None
        self._drop(token)
        return None if entry[2] < now else (entry[1], entry[4])

    def expire(self, now: float) -> None:
        expired = []
        for token, entry in self._entries.items():  # one ttl for all: the oldest expire first
            if entry[2] >= now:
                break
            expired.append(token)
        for token in expired:
            self._drop(token)

    def _drop(self, token: str) -> None:
        user, _, _, client, _ = self._entries.pop(token)
        tokens = self._by_user[user]
        tokens.remove(token)
        if not tokens:
            del self._by_user[user]
        left = self._by_client.pop(client) - 1
        if left:
            self._by_client[client] = left

    def __len__(self):
        return len(self._entries)


def throttle_key(user: str) -> str:
    """The user name as the failed-login throttle counts it: one count for the spellings a case-insensitive
    backend (AD, LDAP, many RADIUS set-ups) takes as one account, so that ALICE and Alice are not 2 more
    guesses at alice's password."""
    return unicodedata.normalize("NFKC", user).casefold()


class Throttle:
    """Failed authentications slow down, per key (a user name, a client address), then lock out for a while.

    The first ``free`` failures cost nothing; after that each attempt must wait 2**(n - free) seconds after
    the last failure (capped at ``max_wait``), and from ``lockout_after`` failures on the key is locked for
    ``lockout`` seconds. A key forgets its failures after ``forget`` seconds without one. Unknown users are
    throttled exactly like known ones, so the answers reveal nothing. Layer 1: time is passed in.

    Attempts still being decided count as failures until they are (``begin`` / ``end``), one per distinct
    ``attempt`` (an opaque tag of the password tried): while ``busy``, the caller holds a new guess back until
    one ends. Without that, guesses sent in parallel all passed ``wait`` before the first of them failed; the
    same password sent many times at once (a client's retries, several devices) is one attempt, not a queue.
    """

    def __init__(self, free=5, max_wait=300.0, lockout_after=20, lockout=900.0, forget=3600.0, max_keys=100000):
        self.free, self.max_wait, self.lockout_after = free, max_wait, lockout_after
        self.lockout, self.forget, self.max_keys = lockout, forget, max_keys
        self._failures = {}  # key -> (count, last failure time)
        self._in_flight = {}  # key -> {attempt: how many of it begun and not yet ended}

    def wait(self, key, now: float) -> float:
        """Seconds ``key`` must still wait before it may try again (0 when it may)."""
        count, last = self._failures.get(key, (0, now))
        last = min(last, now)  # a clock stepped back must not lengthen the wait by the step
        if count and now - last > self.forget:
            del self._failures[key]
            count = 0
        if count >= self.lockout_after:
            delay = self.lockout
        elif count >= self.free:
            delay = min(2.0 ** (count - self.free), self.max_wait)
        else:
            return 0.0
        return max(0.0, last + delay - now)

    def busy(self, key, attempt) -> bool:
        """Whether a new ``attempt`` must wait: the distinct attempts in flight, counted as failures, would use up
        the free ones (an attempt already in flight is no new guess)."""
        pending = self._in_flight.get(key)
        return bool(pending) and attempt not in pending and \
            self._failures.get(key, (0, 0))[0] + len(pending) >= self.free

    def begin(self, key, attempt) -> None:
        pending = self._in_flight.setdefault(key, {})
        pending[attempt] = pending.get(attempt, 0) + 1

    def end(self, key, attempt) -> None:
        pending = self._in_flight[key]
        pending[attempt] -= 1
        if not pending[attempt]:
            del pending[attempt]
            if not pending:
                del self._in_flight[key]

    def failure(self, key, now: float) -> int:
        """Count a failure; return the key's failures so far."""
        count = self._failures.pop(key, (0, now))[0] + 1
        if len(self._failures) >= self.max_keys:
            self._failures.pop(next(iter(self._failures)))  # the oldest entry
        self._failures[key] = (count, now)
        return count

    def success(self, key) -> None:
        self._failures.pop(key, None)

    def clear(self, key) -> bool:
        """Forget ``key``'s failures (an administrator's unlock); whether it had any."""
        return self._failures.pop(key, None) is not None

    def waiting(self, now: float) -> dict:
        """{key: seconds it must still wait} for every key that must."""
        return {key: w for key in list(self._failures) if (w := self.wait(key, now)) > 0}

    def __len__(self):
        return len(self._failures)
