"""The issuance log's in-memory model (layer 1): pure, no I/O, no clock; times are ints (epoch seconds) passed in.

Memory: the target is at most 1 KiB per record at a million records, so a :class:`Record` is a ``__slots__``
object of ints and strings, repeated strings (user, profile, key type, auth method, client address) are
interned, and a user's repeated subject and SAN share the string of their previous record. The indexes are
plain dicts and lists of the same Record objects; there is no per-record dict. Measured with tracemalloc
(``scripts/measure_log.py``): about 550 bytes per record at a million records when users hold several
certificates each, about 890 when every record belongs to a different user.

Certificates (DER) are not kept per record: each record holds ``offset``, the byte offset of its ``issue``
line in the journal, from which :meth:`getcertd.journal.Journal.certificate` reads the DER back (GetCert and a
retried PKCSReq need it; re-signing is not allowed). The log also keeps a small bounded cache of the DER of the
most recently added records (``der_cache_size``), so a client that retries by transactionID a few minutes later
is answered without touching the disk.
"""
import sys
from collections import OrderedDict
from operator import attrgetter

# RFC 5280 section 5.3.1 CRLReason. 7 is unused; removeFromCRL (8) is for delta CRLs only.
CRL_REASONS = {
    0: "unspecified", 1: "keyCompromise", 2: "cACompromise", 3: "affiliationChanged", 4: "superseded",
    5: "cessationOfOperation", 6: "certificateHold", 9: "privilegeWithdrawn", 10: "aACompromise",
}
REASON_CODES = {name: code for code, name in CRL_REASONS.items()}

AUTH_METHODS = ("local", "radius-pap", "radius-challenge", "challengePassword")

# Expiry index granularity (seconds): prune drops whole buckets and only scans the one at the cutoff.
_BUCKET = 3600

_intern = sys.intern


def check_reason(reason) -> int:
    """A CRLReason code (an int, its decimal text, or a name such as 'keyCompromise'); ValueError if it can't go
    on a CRL."""
    if isinstance(reason, str) and reason.strip().isdecimal() and reason.strip().isascii():
        reason = int(reason)
    if isinstance(reason, str):
        if reason not in REASON_CODES:
            raise ValueError(f"unknown revocation reason {reason!r}")
        return REASON_CODES[reason]
    if type(reason) is not int or reason not in CRL_REASONS:
        raise ValueError(f"revocation reason must be one of {sorted(CRL_REASONS)}, not {reason!r}")
    return reason


class Record:
    """One issued certificate. Mutable only through :meth:`IssuanceLog.revoke`."""

    __slots__ = ("serial", "user", "profile", "subject", "san", "key_type", "not_before", "not_after",
                 "transaction_id", "client", "auth_method", "issued_at", "revoked_at", "revocation_reason",
                 "offset")

    FIELDS = __slots__[:-1]  # what the journal stores; offset is where it stored it

    def __init__(self, serial: int, user: str, profile: str, subject: str, san: str, key_type: str,
                 not_before: int, not_after: int, transaction_id: str, client: str, auth_method: str,
                 issued_at: int, revoked_at=None, revocation_reason=None, offset: int = -1):
        self.serial = serial
        self.user = user
        self.profile = profile
        self.subject = subject
        self.san = san
        self.key_type = key_type
        self.not_before = not_before
        self.not_after = not_after
        self.transaction_id = transaction_id
        self.client = client
        self.auth_method = auth_method
        self.issued_at = issued_at
        self.revoked_at = revoked_at
        self.revocation_reason = revocation_reason
        self.offset = offset

    @classmethod
    def from_dict(cls, d) -> "Record":
        """From a mapping with the keys of :attr:`FIELDS` (extra keys, e.g. the journal's "e" and "der", ignored)."""
        return cls(d["serial"], d["user"], d["profile"], d["subject"], d["san"], d["key_type"],
                   d["not_before"], d["not_after"], d["transaction_id"], d["client"], d["auth_method"],
                   d["issued_at"], d.get("revoked_at"), d.get("revocation_reason"))

    def to_dict(self) -> dict:
        """The journal fields as a new dict (not ``offset``)."""
        return {f: getattr(self, f) for f in self.FIELDS}

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def is_valid(self, now: int) -> bool:
        """Not revoked and within its validity period at ``now``."""
        return self.revoked_at is None and self.not_before <= now < self.not_after

    def __repr__(self):
        state = f" revoked_at={self.revoked_at} reason={self.revocation_reason}" if self.revoked_at is not None else ""
        return (f"<Record serial={self.serial:#x} user={self.user!r} profile={self.profile!r} "
                f"not_after={self.not_after}{state}>")


_ROW = attrgetter(*Record.__slots__)


class IssuanceLog:
    """Every certificate issued and not yet pruned, indexed by serial, user and transactionID.

    Indexes: ``serial -> Record`` (insertion ordered, so it is also the issue order), ``user -> [Record]``
    (issue order), ``transaction_id -> Record`` (the latest issued with that ID: a SCEP transactionID is
    usually a hash of the public key, so a re-enrollment with the same key reuses it), the revoked records,
    and expiry buckets for :meth:`prune`.
    """

    def __init__(self, der_cache_size: int = 4096):
        self._by_serial = {}
        self._by_user = {}
        self._by_tid = {}
        self._revoked = {}
        self._expiry = {}
        self._der = OrderedDict()
        self._der_cache_size = der_cache_size

    # Adding and reading

    def add(self, record: Record, der: bytes = None) -> Record:
        """Index ``record`` (ValueError if its serial is already there); ``der`` goes to the recent-DER cache."""
        # Hot: journal replay calls this a million times at start.
        serial = record.serial
        by_serial = self._by_serial
        if serial in by_serial:
            raise ValueError(f"serial {serial:#x} is already in the issuance log")
        user = record.user
        records = self._by_user.get(user)
        if records is None:
            record.user = user = _intern(user)
            self._by_user[user] = [record]
            record.profile = _intern(record.profile)
            record.key_type = _intern(record.key_type)
            record.auth_method = _intern(record.auth_method)
            record.client = _intern(record.client)
        else:
            # Share the strings a user's records usually repeat (the user's previous record has them interned).
            prev = records[-1]
            record.user = prev.user
            if record.profile == prev.profile:
                record.profile = prev.profile
            else:
                record.profile = _intern(record.profile)
            if record.key_type == prev.key_type:
                record.key_type = prev.key_type
            else:
                record.key_type = _intern(record.key_type)
            if record.auth_method == prev.auth_method:
                record.auth_method = prev.auth_method
            else:
                record.auth_method = _intern(record.auth_method)
            if record.client == prev.client:
                record.client = prev.client
            else:
                record.client = _intern(record.client)
            if record.subject == prev.subject:
                record.subject = prev.subject
            if record.san == prev.san:
                record.san = prev.san
            records.append(record)
        if record.issued_at == record.not_before:
            record.issued_at = record.not_before
        by_serial[serial] = record
        self._by_tid[record.transaction_id] = record
        bucket = record.not_after // _BUCKET
        expiring = self._expiry.get(bucket)
        if expiring is None:
            self._expiry[bucket] = [record]
        else:
            expiring.append(record)
        if record.revoked_at is not None:
            self._revoked[serial] = record
        if der is not None:
            self.cache_der(serial, der)
        return record

    def add_many(self, records: list, shared: bool = False) -> None:
        """add() each record in order (no DER), faster: journal replay adds a million at start.

        The same indexes, string sharing and error as one add() after another: a serial already in the log (or
        twice in ``records``) is a ValueError, with the records before it added. The serial and transactionID
        indexes are filled by dict.update; the loop does the rest of add() (kept in step with it by
        tests/test_issuance.py).

        ``shared``: the records' strings already share objects as in the log that wrote them (a journal
        checkpoint gives them back so): none are compared or interned, only the indexes are built, and a serial
        already there or twice is a ValueError with nothing added.
        """
        by_serial = self._by_serial
        serials = [r.serial for r in records]
        if len(set(serials)) != len(serials) or not by_serial.keys().isdisjoint(serials):
            if shared:
                raise ValueError("a serial is already in the issuance log, or twice in the records added")
            for record in records:  # a duplicate: one by one, so that the error is about the first of them
                self.add(record)
            return
        by_serial.update(zip(serials, records))
        self._by_tid.update(zip(map(_tid_of, records), records))
        by_user = self._by_user
        expiry = self._expiry
        revoked = self._revoked
        intern = _intern
        for record in records:
            user = record.user
            previous = by_user.get(user)
            if previous is None:
                if shared:
                    by_user[user] = [record]
                else:
                    record.user = user = intern(user)
                    by_user[user] = [record]
                    record.profile = intern(record.profile)
                    record.key_type = intern(record.key_type)
                    record.auth_method = intern(record.auth_method)
                    record.client = intern(record.client)
            elif shared:
                previous.append(record)
            else:
                prev = previous[-1]
                previous.append(record)
                record.user = prev.user
                value, shared_value = record.profile, prev.profile
                record.profile = shared_value if value == shared_value else intern(value)
                value, shared_value = record.key_type, prev.key_type
                record.key_type = shared_value if value == shared_value else intern(value)
                value, shared_value = record.auth_method, prev.auth_method
                record.auth_method = shared_value if value == shared_value else intern(value)
                value, shared_value = record.client, prev.client
                record.client = shared_value if value == shared_value else intern(value)
                if record.subject == prev.subject:
                    record.subject = prev.subject
                if record.san == prev.san:
                    record.san = prev.san
            if record.issued_at == record.not_before:
                record.issued_at = record.not_before
            bucket = record.not_after // _BUCKET
            expiring = expiry.get(bucket)
            if expiring is None:
                expiry[bucket] = [record]
            else:
                expiring.append(record)
            if record.revoked_at is not None:
                revoked[record.serial] = record

    def cache_der(self, serial: int, der: bytes):
        """Remember a certificate's DER among the ``der_cache_size`` most recent."""
        if self._der_cache_size <= 0:
            return
        self._der[serial] = der
        self._der.move_to_end(serial)
        while len(self._der) > self._der_cache_size:
            self._der.popitem(last=False)

    def cached_der(self, serial: int):
        """The DER of a recently added certificate, or None (then read it from the journal at ``offset``)."""
        return self._der.get(serial)

    def get(self, serial: int):
        """The record with this serial, or None."""
        return self._by_serial.get(serial)

    def by_user(self, user: str) -> list:
        """The user's records, oldest first."""
        return list(self._by_user.get(user, ()))

    def by_transaction(self, transaction_id: str):
        """The latest record issued with this SCEP transactionID, or None."""
        return self._by_tid.get(transaction_id)

    def valid_for_user(self, user: str, now: int) -> list:
        """The user's unrevoked certificates that have not expired at ``now``: valid, or not valid yet (a
        certificate issued just before the clock stepped back still counts against the user's limit)."""
        return [r for r in self._by_user.get(user, ()) if r.revoked_at is None and now < r.not_after]

    def count_issued_between(self, user: str, since: int, until: int) -> int:
        """How many certificates were issued to ``user`` with ``since <= issued_at <= until`` (per-user rate
        limits; ``until`` is now: records stamped in the future by a clock that was ahead don't count for as
        long as it was ahead)."""
        return sum(1 for r in self._by_user.get(user, ()) if since <= r.issued_at <= until)

    def query(self, user: str = None, serial: int = None, since: int = None, until: int = None) -> list:
        """Records matching every given filter, in issue order; ``since <= issued_at < until``."""
        if serial is not None:
            r = self._by_serial.get(serial)
            candidates = () if r is None else (r,)
        elif user is not None:
            candidates = self._by_user.get(user, ())
        else:
            candidates = self._by_serial.values()
        return [r for r in candidates
                if (user is None or r.user == user)
                and (since is None or r.issued_at >= since)
                and (until is None or r.issued_at < until)]

    def recent(self, n: int) -> list:
        """The ``n`` most recently added records, newest first."""
        out = []
        if n <= 0:
            return out
        for serial in reversed(self._by_serial):
            out.append(self._by_serial[serial])
            if len(out) >= n:
                break
        return out

    def __len__(self):
        return len(self._by_serial)

    def rows(self) -> list:
        """Every record as a tuple of its ``__slots__`` (``Record(*row)`` makes it again), in issue order: what a
        journal checkpoint stores."""
        return list(map(_ROW, self._by_serial.values()))

    def __iter__(self):
        """All records in the order they were added."""
        return iter(list(self._by_serial.values()))

    def __contains__(self, serial):
        return serial in self._by_serial

    # Revocation

    def revoke(self, serial: int, reason, now: int) -> Record:
        """Revoke one certificate (KeyError if unknown). Revoking again keeps the first date and reason."""
        reason = check_reason(reason)
        record = self._by_serial.get(serial)
        if record is None:
            raise KeyError(serial)
        if record.revoked_at is None:
            record.revoked_at = now
            record.revocation_reason = reason
            self._revoked[serial] = record
        return record

    def revoke_user(self, user: str, reason, now: int) -> list:
        """Revoke every unrevoked, unexpired certificate of ``user``; return those newly revoked."""
        reason = check_reason(reason)
        out = [r for r in self._by_user.get(user, ()) if r.revoked_at is None and r.not_after > now]
        for r in out:
            self.revoke(r.serial, reason, now)
        return out

    def revoked_unexpired(self, now: int) -> list:
        """Revoked records whose certificate has not expired at ``now`` (notAfter > now), by serial."""
        return sorted((r for r in self._revoked.values() if r.not_after > now), key=_serial_of)

    # Retention

    def prune(self, now: int, retain_seconds: int) -> int:
        """Drop records whose notAfter is before ``now - retain_seconds``; return how many were dropped."""
        cutoff = now - retain_seconds
        dropped = []
        last_full = cutoff // _BUCKET  # buckets below this one lie entirely before the cutoff
        for bucket in sorted(b for b in self._expiry if b <= last_full):
            records = self._expiry[bucket]
            if bucket < last_full:
                dropped.extend(records)
                del self._expiry[bucket]
            else:
                keep = [r for r in records if r.not_after >= cutoff]
                dropped.extend(r for r in records if r.not_after < cutoff)
                if keep:
                    self._expiry[bucket] = keep
                else:
                    del self._expiry[bucket]
        if not dropped:
            return 0
        users = set()
        for r in dropped:
            del self._by_serial[r.serial]
            self._revoked.pop(r.serial, None)
            self._der.pop(r.serial, None)
            if self._by_tid.get(r.transaction_id) is r:
                del self._by_tid[r.transaction_id]
            users.add(r.user)
        gone = set(map(id, dropped))
        for user in users:
            keep = [r for r in self._by_user[user] if id(r) not in gone]
            if keep:
                self._by_user[user] = keep
            else:
                del self._by_user[user]
        return len(dropped)


def _serial_of(record):
    return record.serial


def _tid_of(record):
    return record.transaction_id
