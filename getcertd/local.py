"""The local accounts backend: a users file of salted scrypt hashes (never plain text).

File format, one account a line: ``USER:$scrypt$n=16384,r=8,p=1$SALT_B64$HASH_B64``; lines starting with
``#`` are comments. Managed with ``getcertd-users``.
"""
import base64
import hashlib
import hmac
import os
from typing import Callable, Dict, Optional

from twisted.internet import threads
from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from getcertd.auth import Accept, IAuthenticator, Identity, Reject
from getcertd.errors import AuthUnavailable, ConfigError

log = Logger()

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=32)


def hash_password(password: bytes, salt: Optional[bytes] = None) -> str:
    salt = salt or os.urandom(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"$scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}${b64(salt)}${b64(digest)}"


def verify_password(password: bytes, encoded: str) -> bool:
    try:
        _, scheme, params, salt, digest = encoded.split("$")
        p = dict(kv.split("=") for kv in params.split(","))
        n, r, par = int(p["n"]), int(p["r"]), int(p["p"])
        if scheme != "scrypt" or not (2 <= n <= 2 ** 20 and 1 <= r <= 32 and 1 <= par <= 16):
            return False
        expected = base64.b64decode(digest)
        return hmac.compare_digest(_scrypt(password, base64.b64decode(salt), n, r, par), expected)
    except (ValueError, KeyError):
        return False


def parse_users(text: str) -> Dict[str, str]:
    """USER -> encoded hash. Raises ValueError naming the line of a malformed entry."""
    users = {}
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): a name may hold U+2028 and the like
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.rpartition(":")
        if not sep or not user or not encoded.startswith("$scrypt$"):
            raise ValueError(f"line {number}: expected USER:$scrypt$...")
        users[user] = encoded
    return users


def format_users(users: Dict[str, str]) -> str:
    return "".join(f"{u}:{h}\n" for u, h in sorted(users.items()))


_DUMMY = hash_password(b"no such user", b"0123456789abcdef")


@implementer(IAuthenticator)
class LocalAuthenticator:
    """Checks passwords against the users file; the slow hash runs in a thread, off the reactor.

    ``load_users()`` returns the current USER -> hash mapping (tap.py passes a loader that re-reads the file
    when it changes, so `getcertd-users add` takes effect without a restart). Successful verifications are
    remembered for ``cache_ttl`` seconds as an HMAC under a per-process random key (never the password), so a
    client that enrolls twice in a row does not pay scrypt twice; a changed hash in the file misses the cache.
    """
    name = "local"

    def __init__(self, load_users: Callable[[], Dict[str, str]], clock, cache_ttl: float = 300.0,
                 defer_to_thread=threads.deferToThread):
        self._load_users = load_users
        self._clock = clock
        self._cache_ttl = cache_ttl
        self._cache = {}  # HMAC(user, hash, password) -> expiry
        self._cache_key = os.urandom(32)
        self._defer = defer_to_thread
        self._broken = None  # the users file's error, logged once

    def _cache_tag(self, user: str, encoded: str, password: bytes) -> bytes:
        return hmac.new(self._cache_key, b"\0".join([user.encode(), encoded.encode(), password]),
                        hashlib.sha256).digest()

    def authenticate(self, user, password, state, client):
        try:
            users = self._load_users()
        except ConfigError as e:  # nobody is let in while the file is broken (503): an edit gone wrong, say
            if str(e) != self._broken:
                log.error("local accounts: {error}; every login fails until it is mended", error=str(e))
                self._broken = str(e)
            return fail(AuthUnavailable("the users file can't be read"))
        self._broken = None
        encoded = users.get(user)
        now = self._clock.seconds()
        tag = self._cache_tag(user, encoded or _DUMMY, password)
        expiry = self._cache.get(tag)
        if encoded is not None and expiry is not None and expiry > now:
            return succeed(Accept(Identity(user=user, method="local")))

        def checked(ok):
            if ok and encoded is not None:
                if len(self._cache) > 10000:
                    self._cache = {t: e for t, e in self._cache.items() if e > self._clock.seconds()}
                self._cache[tag] = self._clock.seconds() + self._cache_ttl
                return Accept(Identity(user=user, method="local"))
            return Reject("bad user name or password")
        return self._defer(verify_password, password, encoded or _DUMMY).addCallback(checked)
