"""Operator actions on the issuance log (layer 2): revocation, and the daily journal compaction.

Shared by the manhole (getcertd.admin_ns, on a running appliance) and getcertd-admin (on a stopped one).
"""
import time

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from getcertd.issuance import CRL_REASONS, check_reason

log = Logger()

COMPACT_EVERY = 86400
COMPACT_FIRST_AFTER = 600  # not at start: a restart loop should not rewrite the journal each time


def format_serial(serial: int) -> str:
    """A serial as ``openssl x509 -serial`` prints it: upper-case hex of its bytes, no 0x (e.g. 0A1B)."""
    text = f"{serial:X}"
    return "0" + text if len(text) % 2 else text


def parse_serial(text) -> int:
    """A serial number from an int, or from hex text as openssl prints it (``0x``, colons and spaces allowed)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    cleaned = str(text).strip().replace(":", "").replace(" ", "")
    if cleaned[:2].lower() == "0x":
        cleaned = cleaned[2:]
    if cleaned.lower().startswith("serial="):
        cleaned = cleaned[len("serial="):]
    try:
        if not cleaned:
            raise ValueError
        return int(cleaned, 16)
    except ValueError:
        raise ValueError(f"not a serial number in hexadecimal: {str(text)[:60]!r}") from None


class NothingToRevoke(LookupError):
    """No such serial, or the user holds no valid certificate."""


def revoke(journal, crl, now: int, *, serial: int = None, user: str = None, reason=0) -> defer.Deferred:
    """Revoke one certificate (``serial``) or every valid certificate of ``user``, with a CRLReason (code or
    name): journalled (fsynced) first, then a new CRL is published (when ``crl`` is given) that lists them.

    Fires with ``(records, crl_info)``: the records now revoked and :meth:`CrlPublisher.info` of the new CRL
    (None without ``crl``). Fails with NothingToRevoke (also for a serial already revoked: its first date and
    reason stay), or ValueError for a bad reason.
    """
    if (serial is None) == (user is None):
        return defer.fail(TypeError("revoke: give a serial or a user"))
    try:
        reason = check_reason(reason)
    except ValueError:
        return defer.fail()
    log_ = journal.log
    if serial is not None:
        record = log_.get(serial)
        if record is None:
            return defer.fail(NothingToRevoke(f"no certificate with serial {format_serial(serial)} in the "
                                              "issuance log"))
        if record.revoked_at is not None:  # the first date and reason stay; say so rather than "revoked"
            return defer.fail(NothingToRevoke(
                f"serial {format_serial(serial)} was already revoked at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(record.revoked_at))} UTC "
                f"({CRL_REASONS.get(record.revocation_reason, record.revocation_reason)})"))
        d = journal.record_revocation(serial, reason, now).addCallback(lambda r: [r])
    else:
        targets = [r for r in log_.by_user(user) if r.revoked_at is None and r.not_after > now]
        if not targets:
            return defer.fail(NothingToRevoke(f"{user!r} holds no unrevoked, unexpired certificate"))
        d = journal.record_user_revocation(user, reason, now)

    def published(records):
        for r in records:
            log.info("revoked serial {serial} of {user!r} ({reason})", serial=format_serial(r.serial), user=r.user,
                     reason=r.revocation_reason)
        if crl is None:
            return records, None
        return crl.publish().addCallback(lambda info: (records, info))
    return d.addCallback(published)


STEP_TOLERANCE = 300  # seconds the wall clock may gain on the time elapsed before compaction waits


class CompactionService(service.Service):
    """Compacts the journal (and prunes the in-memory log) ``first_after`` seconds after start, then every
    ``every`` seconds: records of certificates expired more than ``retain`` seconds ago go.

    Not while the wall clock (``clock``) has run ahead of the time that really elapsed since start
    (``monotonic``) by more than STEP_TOLERANCE: a clock set a month ahead by mistake would otherwise drop, for
    good, the records of revoked certificates that are still valid, and the CRL with them.
    """
    name = "compaction"

    def __init__(self, journal, clock, retain: int, every: int = COMPACT_EVERY, first_after: int = COMPACT_FIRST_AFTER,
                 monotonic=time.monotonic):
        self.journal = journal
        self.clock = clock
        self.retain = retain
        self.every = every
        self.first_after = first_after
        self._monotonic = monotonic
        self._origin = None  # (wall clock, monotonic clock) at start
        self._loop = LoopingCall(self.compact)
        self._loop.clock = clock
        self._first = None
        self._running = None

    def startService(self):
        super().startService()
        self._origin = (self.clock.seconds(), self._monotonic())
        self._first = self.clock.callLater(self.first_after, self._start_loop)

    def _start_loop(self):
        self._first = None
        self._loop.start(self.every, now=True)

    def compact(self):
        """Compact now; fires with the number of records kept (errors are logged, the next run tries again)."""
        before = len(self.journal.log)
        started = self.clock.seconds()
        if self._origin is not None:
            ahead = (started - self._origin[0]) - (self._monotonic() - self._origin[1])
            if ahead > STEP_TOLERANCE:
                log.warn("the wall clock is {ahead:.0f} s ahead of the time elapsed since start: the journal is not "
                         "compacted until it is set right (or getcertd restarts), so that no record of a revoked "
                         "certificate that is still valid is dropped", ahead=ahead)
                return defer.succeed(before)
        d = self._running = self.journal.compact(int(started), self.retain)

        def done(kept):
            log.info("journal compacted: {kept} records kept, {pruned} pruned", kept=kept,
                     pruned=before - len(self.journal.log))
            return kept

        def failed(f):
            log.failure("journal compaction failed; the next one tries again", f)

        def finished(result):
            self._running = None
            return result
        return d.addCallbacks(done, failed).addBoth(finished)

    def stopService(self):
        super().stopService()
        if self._first is not None and self._first.active():
            self._first.cancel()
        self._first = None
        if self._loop.running:
            self._loop.stop()
        if self._running is not None:  # let it finish before the journal closes
            waiter = defer.Deferred()
            self._running.addBoth(lambda r: (waiter.callback(None), r)[1])
            return waiter
        return None
