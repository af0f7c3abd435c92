"""CRLs: :func:`build_crl` (layer 1, pure) and :class:`CrlPublisher` (layer 2, a timer service).

cryptography's ``CertificateRevocationListBuilder`` copies its entry list on every
``add_revoked_certificate`` (quadratic: minutes for 100,000 entries), so :func:`build_crl` lets the builder
make an entry-less CRL (issuer, times, signature algorithm, AuthorityKeyIdentifier, CRLNumber), splices the
DER of the revokedCertificates list into its TBSCertList, and signs that with the CA key. The entries are
encoded as cryptography would encode them (the tests compare the two byte for byte).
"""
import base64
import datetime
import os
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from getcertd.ca import authority_key_identifier
from getcertd.config import crl_margin
from getcertd.errors import ConfigError
from getcertd.issuance import CRL_REASONS
from getcertd.journal import fsync_dir

_log = Logger()

_UTC = datetime.timezone.utc


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(b),)) + b


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _der_length(len(content)) + content


def _children(der: bytes, start: int, end: int):
    """The (tag, start, end) of each element of a constructed value's content der[start:end]."""
    out = []
    pos = start
    while pos < end:
        tag = der[pos]
        first = der[pos + 1]
        if first & 0x80:
            n = first & 0x7F
            length = int.from_bytes(der[pos + 2:pos + 2 + n], "big")
            header = 2 + n
        else:
            length, header = first, 2
        out.append((tag, pos, pos + header + length))
        pos += header + length
    if pos != end:
        raise ValueError("malformed DER")
    return out


def _outer(der: bytes):
    """The children of the SEQUENCE that is all of ``der``."""
    (tag, start, end), = _children(der, 0, len(der))
    header = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    return _children(der, start + header, end)


def _der_time(t: int) -> bytes:
    """RFC 5280 Time: UTCTime through 2049, GeneralizedTime from 2050."""
    tm = time.gmtime(t)
    if 1950 <= tm.tm_year < 2050:
        return b"\x17\x0d" + time.strftime("%y%m%d%H%M%SZ", tm).encode("ascii")
    return b"\x18\x0f" + time.strftime("%Y%m%d%H%M%SZ", tm).encode("ascii")


# crlEntryExtensions holding only a non-critical reasonCode (2.5.29.21) with an ENUMERATED value.
_REASON_EXTENSIONS = {code: bytes.fromhex("300c300a0603551d150403 0a01".replace(" ", "")) + bytes((code,))
                      for code in CRL_REASONS if code != 0}


def _epoch(t) -> int:
    if isinstance(t, datetime.datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=_UTC)
        return int(t.timestamp())
    return int(t)


def encode_revoked(revoked) -> bytes:
    """The DER of revokedCertificates (SEQUENCE OF SEQUENCE {serial, revocationDate, reasonCode}).

    ``revoked`` yields (serial, revoked_at, reason): revoked_at in epoch seconds (or a datetime), reason an
    RFC 5280 CRLReason code or None. Reason 0 (unspecified) is left out, as RFC 5280 section 5.3.1 asks.
    """
    times = {}
    reasons = _REASON_EXTENSIONS
    parts = []
    append = parts.append
    for serial, revoked_at, reason in revoked:
        if serial < 0:
            raise ValueError(f"negative serial number {serial}")
        raw = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # a leading zero keeps it positive
        when = times.get(revoked_at)
        if when is None:
            when = times[revoked_at] = _der_time(_epoch(revoked_at))
        if reason is None or reason == 0:
            body = b"\x02" + _der_length(len(raw)) + raw + when
        else:
            ext = reasons.get(reason)
            if ext is None:
                raise ValueError(f"not a CRL reason code: {reason!r}")
            body = b"\x02" + _der_length(len(raw)) + raw + when + ext
        append(b"\x30" + _der_length(len(body)) + body)
    return _tlv(0x30, b"".join(parts))


def default_hash(key):
    """The signature hash for a CA key (None for EdDSA): SHA-384 for P-384 and larger curves, else SHA-256."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _sign(key, data: bytes, algorithm) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), algorithm)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(algorithm))
    if isinstance(key, dsa.DSAPrivateKey):
        return key.sign(data, algorithm)
    return key.sign(data)  # EdDSA


_DEFAULT = object()


def build_crl(ca_key, ca_cert: x509.Certificate, revoked, crl_number: int, this_update: datetime.datetime,
              next_update: datetime.datetime, algorithm=_DEFAULT) -> bytes:
    """A signed v2 CRL (DER) with AuthorityKeyIdentifier (from the CA's SKI), CRLNumber and per-entry reasons.

    ``revoked`` yields (serial, revoked_at, reason) as for :func:`encode_revoked`; entries keep that order.
    ``algorithm`` is the signature hash (default: :func:`default_hash` of the key).
    """
    if algorithm is _DEFAULT:
        algorithm = default_hash(ca_key)
    if next_update <= this_update:
        raise ValueError("next_update must be after this_update")
    empty = (x509.CertificateRevocationListBuilder()
             .issuer_name(ca_cert.subject)
             .last_update(this_update)
             .next_update(next_update)
             .add_extension(authority_key_identifier(ca_cert), critical=False)
             .add_extension(x509.CRLNumber(crl_number), critical=False)
             .sign(ca_key, algorithm))
    entries = encode_revoked(revoked)
    if entries == b"\x30\x00":
        return empty.public_bytes(serialization.Encoding.DER)  # revokedCertificates must then be absent
    crl = empty.public_bytes(serialization.Encoding.DER)
    (_, tbs_start, tbs_end), (_, alg_start, alg_end), _signature = _outer(crl)
    tbs = crl[tbs_start:tbs_end]
    parts = _outer(tbs)
    # TBSCertList: version, signature, issuer, thisUpdate, nextUpdate, [revokedCertificates], [0] crlExtensions
    at = next((start for tag, start, _ in parts if tag == 0xA0), len(tbs))
    header = parts[0][1]
    new_tbs = _tlv(0x30, tbs[header:at] + entries + tbs[at:])
    signature = _sign(ca_key, new_tbs, algorithm)
    return _tlv(0x30, new_tbs + crl[alg_start:alg_end] + _tlv(0x03, b"\x00" + signature))


def crl_pem(der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    return (b"-----BEGIN X509 CRL-----\n" + b"".join(b64[i:i + 64] + b"\n" for i in range(0, len(b64), 64))
            + b"-----END X509 CRL-----\n")


def load_crl_number(path: str) -> int:
    """The last CRL number issued, from ``path`` (0 if there is no file yet)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return 0
    try:
        number = int(text.strip())
        if number < 0:
            raise ValueError("negative")
    except ValueError:
        raise ConfigError(f"{path}: not a CRL number: {text[:40]!r}") from None
    return number


def save_crl_number(path: str, number: int):
    """Write ``number`` to ``path`` atomically (temporary file, fsync, rename, fsync the directory), 0600."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.write(fd, b"%d\n" % number)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path)


class CrlPublisher(service.Service):
    """Keeps the current CRL: regenerated on :meth:`publish` (call it after every revocation) and every
    ``interval`` seconds on ``clock``.

    :param ca: an object with ``key`` (the CA private key) and ``certificate``
        (e.g. :class:`getcertd.ca.CertificateAuthority`).
    :param state_dir: where ``crl_number`` keeps the last number issued, so numbers keep increasing across
        restarts (written before a CRL with that number is published; numbers may skip, never repeat).
    :param log: the :class:`~getcertd.issuance.IssuanceLog`.
    :param clock: an IReactorTime.
    :param interval: seconds between regular CRLs.
    :param lifetime: seconds from thisUpdate to nextUpdate (at least ``interval + crl_margin(interval)``, so the
        next regular CRL comes before it; default ``2 * interval``).
    :param run: ``run(f, *args) -> Deferred`` for the signing and the number file (by default synchronous;
        pass e.g. ``twisted.internet.threads.deferToThread`` to keep a big CRL's signing off the reactor).

    A revoked certificate stays on the CRL until a regularly scheduled CRL issued after its notAfter has listed
    it (RFC 5280 section 3.3), then drops off: however late a timer tick runs. After a start, before any
    scheduled CRL of this process, every revoked certificate still in the issuance log is listed.
    """

    name = "crl"

    def __init__(self, ca, state_dir: str, log, clock, interval: int = 3600, lifetime: int = None, run=None):
        if interval <= 0:
            raise ValueError("CRL interval must be positive")
        lifetime = 2 * interval if lifetime is None else lifetime
        if lifetime < interval + crl_margin(interval):
            raise ValueError(f"CRL lifetime ({lifetime} s) must exceed the interval ({interval} s) by at least "
                             f"{crl_margin(interval)} s")
        self.ca = ca
        self.log = log
        self.clock = clock
        self.interval = interval
        self.lifetime = lifetime
        self._run = run or defer.maybeDeferred
        self.number_path = os.path.join(state_dir, "crl_number")
        self._last_number = load_crl_number(self.number_path)
        self.der = None
        self.pem = None
        self.number = None
        self.this_update = None
        self.next_update = None
        self.entries = 0
        self._scheduled = False  # the next generation is a regular one (the timer's, or the first)
        self._scheduled_this_update = None  # thisUpdate (seconds) of the last regular CRL published
        self._waiting = []  # Deferreds of publish() calls not yet served by a running generation
        self._running = None  # Deferred of the generation in progress
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def startService(self):
        super().startService()
        if self.der is None and self._running is None:
            # The first CRL on this thread, before the listeners start (they are started after this service):
            # a gateway or client asking right after a restart gets a CRL, not a 503.
            self._scheduled = True
            self._generate(defer.maybeDeferred)
        self._loop.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._running is not None:
            d = defer.Deferred()
            self._running.addBoth(lambda r: (d.callback(None), r)[1])
            return d
        return None

    def info(self) -> dict:
        """The current CRL: number, this_update and next_update (aware UTC datetimes), entries."""
        return {"number": self.number, "this_update": self.this_update, "next_update": self.next_update,
                "entries": self.entries}

    def publish(self) -> defer.Deferred:
        """Regenerate the CRL now; fires with :meth:`info` of a CRL that includes every revocation made before
        the call. Calls during a regeneration share the next one."""
        d = defer.Deferred()
        self._waiting.append(d)
        if self._running is None:
            self._generate()
        return d

    def _tick(self):
        self._scheduled = True
        self.publish().addErrback(lambda f: None)  # logged in _generated

    def _generate(self, run=None):
        waiters, self._waiting = self._waiting, []
        now = int(self.clock.seconds())
        number = self._last_number + 1
        self._last_number = number  # never reused, even if this attempt fails
        scheduled, self._scheduled = self._scheduled, False
        # Listed: every revoked certificate that no regular CRL issued after its notAfter has listed yet. (A CRL
        # made while the clock was ahead does not count past now: after the clock is set right, certificates
        # that expire later than now are listed again.)
        listed_after = -1 if self._scheduled_this_update is None else min(self._scheduled_this_update, now) - 1
        revoked = [(r.serial, r.revoked_at, r.revocation_reason) for r in self.log.revoked_unexpired(listed_after)]
        this_update = datetime.datetime.fromtimestamp(now, _UTC)
        next_update = datetime.datetime.fromtimestamp(now + self.lifetime, _UTC)
        d = self._running = (run or self._run)(self._make, number, revoked, this_update, next_update)
        d.addBoth(self._generated, waiters, number, this_update, next_update, len(revoked),
                  now if scheduled else None)

    def _make(self, number, revoked, this_update, next_update):
        save_crl_number(self.number_path, number)
        return build_crl(self.ca.key, self.ca.certificate, revoked, number, this_update, next_update)

    def _generated(self, result, waiters, number, this_update, next_update, entries, scheduled_at):
        self._running = None
        if isinstance(result, bytes):
            if scheduled_at is not None:
                self._scheduled_this_update = scheduled_at
            self.der = result
            self.pem = crl_pem(result)
            self.number, self.this_update, self.next_update, self.entries = number, this_update, next_update, entries
            _log.info("CRL {number} published: {entries} entries, next update {next_update}",
                      number=number, entries=entries, next_update=next_update.isoformat())
            outcome = self.info()
        else:
            _log.failure("CRL {number} could not be generated; keeping CRL {current}", result,
                         number=number, current=self.number)
            outcome = result
        for d in waiters:
            d.callback(outcome)
        if self._waiting:
            self._generate()
        return None
