"""The issuance journal: an append-only file of JSON lines that makes the issuance log durable (layer 2).

One event per line, ASCII, ``\\n``-terminated::

    {"e":"issue","serial":..,"user":..,...every Record field...,"der":"<base64 certificate>"}
    {"e":"revoke","serial":..,"reason":..,"at":..}

:func:`replay` reads a journal into an :class:`~getcertd.issuance.IssuanceLog` at start. A torn last line (no
trailing newline, or not JSON) is what a crash during a write leaves: that event was never acknowledged, so it
is skipped with a warning, and :class:`Journal` truncates it away before it appends again. Any other bad line
is corruption and raises :class:`~getcertd.errors.ConfigError` naming the file and line. Issue lines in the
layout this module writes are parsed without json.loads (one regular expression; see ``_fast_issue``) and added to
the log in batches (:meth:`~getcertd.issuance.IssuanceLog.add_many`).

:class:`Journal` acknowledges an event (fires the Deferred of :meth:`Journal.append`) only after its line is
written and fsynced. Writes run in a dedicated one-thread pool so the reactor never waits on the disk, and
commit in groups: every event appended while a write+fsync is running goes into the next single write+fsync.
If a write fails (ENOSPC, EIO, ...) every event of that batch fails with
:class:`~getcertd.errors.StorageUnavailable`, the partial write is truncated away, and the next append tries
again. All work on the file (batches, reading a certificate back, compaction) is serialized by one lock,
so a record's ``offset`` is only read or changed while no other job runs.

Checkpoints: a big log (``checkpoint_records``) is written at a clean stop to ``<journal>.checkpoint`` (0600):
the records in frames of 4,096, each frame with its length and BLAKE2b digest, after a line naming the format,
the pickle protocol and the Python version. A frame is the records' fields as a tuple of columns (one list per
field), pickled (protocol 5) by one pickler for the whole file: its memo spans the frames, so every string the
log shares between records (a user's name, profile, subject...) is written once and read back as one object,
and loading only builds the indexes (:meth:`~getcertd.issuance.IssuanceLog.add_many` with ``shared``). It is read by an
unpickler that refuses every class and function: only tuples, lists, ints, strings and None come out.

Before the checkpoint is written, a line ``{"e":"checkpoint","id":"<128 random bits>"}`` is appended to the
journal and fsynced; the checkpoint file holds that id and the line's offset. :func:`replay` uses a checkpoint
only when the journal still holds that very line at that offset (so the journal up to it is the one the
checkpoint was made from), every frame's digest matches and the versions are this process's: then it loads the
records and replays only the lines after the checkpoint line. Anything else (no file, a compacted, replaced or
restored journal, a crash while writing, another Python) is a full replay, with a warning when a checkpoint was
there and unusable. Checkpoint lines are no-ops in a replay, and compaction drops them and removes the
checkpoint file.
"""
import base64
import gc
import hashlib
import io
import json
import os
import pickle
import re
import struct
import sys
import time
from array import array

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from getcertd.errors import ConfigError, StorageUnavailable
from getcertd.issuance import CRL_REASONS, Record, check_reason
from getcertd.workers import WorkerPool

_log = Logger()

_loads = json.loads
_dumps = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
_REVOKE_PREFIX = b'{"e":"revoke"'
_ISSUE_PREFIX = b'{"e":"issue"'
_CHECKPOINT_PREFIX = b'{"e":"checkpoint"'


def issue_event(record: Record, der: bytes) -> dict:
    """The journal event for an issued certificate."""
    event = {"e": "issue"}
    event.update(record.to_dict())
    event["der"] = base64.b64encode(der).decode("ascii")
    return event


def revoke_event(serial: int, reason: int, at: int) -> dict:
    """The journal event for a revocation."""
    return {"e": "revoke", "serial": serial, "reason": reason, "at": at}


def encode_event(event: dict) -> bytes:
    """One journal line."""
    return _dumps(event).encode("ascii") + b"\n"


def _torn(path, line, why):
    _log.warn("journal {path}: ignoring the torn last {line} ({why}): it was never acknowledged",
              path=path, line=line, why=why)


def replay(path: str, log) -> int:
    """Apply the journal at ``path`` to ``log``; return how many events were applied (0 if there is no file)."""
    return _replay(path, log)[0]


# The replay fast path. Lines written by encode_event(issue_event(...)) have a fixed layout, "der" last. One
# compiled regular expression reads the part before the DER when every string in it is printable ASCII without
# a quote or a backslash (so it holds no escape) and every number is unsigned; anything else (escapes, another
# layout, a revoke event) goes to json.loads, the reference. (The base64 DER is only checked for its closing
# quote, NUL bytes and bytes over 0x7F, which a zeroed or garbled disk block leaves and json.loads would refuse;
# the rest when it is read back.) A quarter fewer instructions than splitting on quotes.
_DER_KEY = b',"der":"'
_STRING_FIELDS = ("user", "profile", "subject", "san", "key_type", "transaction_id", "client", "auth_method")
_OPTIONAL_FIELDS = ("revoked_at", "revocation_reason")
_ISSUE_LINE = re.compile(rb'\{"e":"issue"' + b"".join(
    b',"' + name.encode() + b'":' + (rb'"([ !#-\[\]-~]*)"' if name in _STRING_FIELDS else
                                     rb'(null|[0-9]+)' if name in _OPTIONAL_FIELDS else rb'([0-9]+)')
    for name in Record.FIELDS) + re.escape(_DER_KEY))
_CANONICAL = encode_event(issue_event(Record(1, "U", "P", "S", "X", "K", 2, 3, "T", "C", "A", 4), b""))
assert _ISSUE_LINE.match(_CANONICAL).groups() == (b"1", b"U", b"P", b"S", b"X", b"K", b"2", b"3", b"T", b"C", b"A",
                                                  b"4", b"null", b"null")
_issue_match = _ISSUE_LINE.match


_SERIAL_AT = len(_ISSUE_PREFIX + b',"serial":')


def _serial_of(line: bytes):
    """The serial of an issue line in the canonical layout (``{"e":"issue","serial":<digits>,``), or None."""
    end = line.find(b",", _SERIAL_AT, _SERIAL_AT + 60)
    digits = line[_SERIAL_AT:end]
    if end < 0 or not line.startswith(b',"serial":', len(_ISSUE_PREFIX)) or not digits.isdigit():
        return None
    return int(digits)


def _fast_issue(line: bytes, offset: int):
    """A Record from a newline-terminated issue line in the canonical layout, or None."""
    m = _issue_match(line)
    if m is None or line[-3:] != b'"}\n' or line.find(b'"', m.end()) != len(line) - 3 or not line.isascii() \
            or line.find(b"\0") >= 0:
        return None
    serial, user, profile, subject, san, key_type, not_before, not_after, tid, client, auth, issued_at, \
        revoked_at, reason = m.groups()
    return Record(int(serial), user.decode(), profile.decode(), subject.decode(), san.decode(), key_type.decode(),
                  int(not_before), int(not_after), tid.decode(), client.decode(), auth.decode(), int(issued_at),
                  None if revoked_at == b"null" else int(revoked_at), None if reason == b"null" else int(reason),
                  offset)


def _replay(path, log):
    """Replay; return (records and events applied, length of the valid prefix, i.e. without a torn last line)."""
    try:
        f = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        return 0, 0
    # Millions of new long-lived objects would trigger a cyclic collection every few hundred lines, each
    # walking everything loaded so far: it makes replay several times slower. Nothing here makes cycles.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with f:
            loaded, offset = _load_checkpoint(path, f, log) if not len(log) else (0, 0)
            f.seek(offset)
            count, end = _replay_file(f, path, log, offset)
            return loaded + count, end
    finally:
        if collecting:
            gc.enable()


def _replay_file(f, path, log, offset=0):
    """Replay the lines of ``f`` from ``offset`` (0, or the end of a checkpoint line)."""
    where = "line " if offset == 0 else f"line (counted from the checkpoint ending at byte {offset}) "
    count = 0
    lineno = 0
    bad = None  # (lineno, reason) of an unparsable line: fatal unless it is the last one
    fast = _fast_issue
    # Records of consecutive fast-path lines go to the log in batches (IssuanceLog.add_many); any other event
    # first flushes the batch, so events apply in journal order.
    batch = []
    first = 0  # the line number of batch[0]

    def flush():
        try:
            log.add_many(batch)
        except ValueError as e:  # a serial already issued: add_many stopped at it
            i = next(i for i, r in enumerate(batch) if log.get(r.serial) is not r)
            raise ConfigError(f"journal {path}, {where}{first + i}: {e}") from None
        batch.clear()

    for line in f:
        lineno += 1
        if bad is not None:
            raise ConfigError(f"journal {path}, {where}{bad[0]}: {bad[1]} (not the last line: the file is corrupt)")
        record = fast(line, offset)
        if record is not None:
            if record.revoked_at is not None and record.revocation_reason not in CRL_REASONS:
                raise ConfigError(f"journal {path}, {where}{lineno}: bad revocation reason")
            if not batch:
                first = lineno
            batch.append(record)
            if len(batch) >= 4096:
                flush()
        elif line[-1:] != b"\n":
            bad = (lineno, "no newline at the end")
            continue
        else:
            if batch:
                flush()
            try:
                event = _loads(line)
            except ValueError as e:
                bad = (lineno, f"not JSON: {e}")
                continue
            _apply(event, log, path, f"{where}{lineno}", offset)
        count += 1
        offset += len(line)
    if batch:
        flush()
    if bad is not None:
        _torn(path, f"{where}{bad[0]}", bad[1])
    return count, offset


def _apply(event, log, path, line, offset):
    """Apply one parsed event (the slow path); ConfigError if it makes no sense (``line`` says where it is)."""
    try:
        kind = event["e"]
        if kind == "issue":
            record = Record(event["serial"], event["user"], event["profile"], event["subject"], event["san"],
                            event["key_type"], event["not_before"], event["not_after"], event["transaction_id"],
                            event["client"], event["auth_method"], event["issued_at"], event.get("revoked_at"),
                            event.get("revocation_reason"), offset)
            if not all(type(getattr(record, f)) is int for f in ("serial", "not_before", "not_after", "issued_at")):
                raise ValueError("serial and times must be integers")
            if not all(type(getattr(record, f)) is str for f in ("user", "profile", "subject", "san", "key_type",
                                                                  "transaction_id", "client", "auth_method")):
                raise ValueError("names must be strings")
            if record.revoked_at is not None:
                check_reason(record.revocation_reason)
            log.add(record)
        elif kind == "revoke":
            serial = event["serial"]
            if serial in log:
                log.revoke(serial, event["reason"], event["at"])
            else:
                # Only possible when a revocation raced a compaction that pruned the record: harmless, the
                # certificate expired long ago and belongs on no CRL.
                _log.warn("journal {path}, {line}: revocation of unknown serial {serial}",
                          path=path, line=line, serial=serial)
        elif kind == "checkpoint":
            pass  # where a checkpoint was taken: nothing to apply
        else:
            raise ValueError(f"unknown event {kind!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ConfigError(f"journal {path}, {line}: {what}") from None


# Checkpoints (see the module docstring).
CHECKPOINT_SUFFIX = ".checkpoint"
CHECKPOINT_CHUNK = 4096  # records per frame
_PICKLE_PROTOCOL = 5
_FIELDS = len(Record.__slots__)
_CHECKPOINT_MAGIC = b"getcertd checkpoint 2, pickle %d, python %d.%d\n" % (_PICKLE_PROTOCOL, *sys.version_info[:2])
_FRAME = struct.Struct("<I16s")  # the data's length and its BLAKE2b-128 digest; a zero length ends the file


class _Unusable(Exception):
    """A checkpoint that can't be used: replay the whole journal."""


def _checkpoint_line(cid: str) -> bytes:
    return encode_event({"e": "checkpoint", "id": cid})


def _frame(data: bytes) -> bytes:
    return _FRAME.pack(len(data), hashlib.blake2b(data, digest_size=16).digest()) + data


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain values only: a pickle that names any class or function (to build or call it) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}: a checkpoint holds plain values only")


def _plain_loads(data: bytes):
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - whatever a bad frame makes the unpickler raise, it is not usable
        raise _Unusable(f"a frame can't be read: {e}") from None


def _plain_dumps(value) -> bytes:
    return pickle.dumps(value, _PICKLE_PROTOCOL)


class _FrameReader:
    """Reads a checkpoint's frames one after another with one unpickler, whose memo spans them as the writer's
    did (:func:`_frames_of`). (Nothing here refers back to the reader: no cycle keeps the memo alive after it.)"""

    def __init__(self):
        self._file = io.BytesIO()  # each frame's data in turn: the unpickler takes this file's methods once
        self._unpickler = _PlainUnpickler(self._file)

    def load(self, data: bytes) -> list:
        """The records of one frame; _Unusable if it is not one pickle of one column per Record field."""
        file = self._file
        file.seek(0)
        file.truncate()
        file.write(data)
        file.seek(0)
        try:
            columns = self._unpickler.load()
        except Exception as e:  # noqa: BLE001 - as in _plain_loads
            raise _Unusable(f"a frame can't be read: {e}") from None
        if file.tell() != len(data) or type(columns) is not tuple or len(columns) != _FIELDS \
                or any(type(c) is not list for c in columns) or len(set(map(len, columns))) != 1:
            raise _Unusable("a frame does not hold one column per record field")
        records = list(map(Record, *columns))
        for column in columns:
            column.clear()  # the memo keeps the lists (a later frame could name them), not what they held
        return records


def _frames_of(rows: list):
    """The frames' data of a checkpoint of ``rows``: one pickle of columns each, by one pickler (one memo)."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, _PICKLE_PROTOCOL)
    for start in range(0, len(rows), CHECKPOINT_CHUNK):
        columns = tuple(map(list, zip(*rows[start:start + CHECKPOINT_CHUNK])))
        pickler.dump(columns)
        for column in columns:
            column.clear()  # as in _FrameReader.load: the memo holds on to every list it has seen
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()


def _read_frame(f):
    """The data of the next frame (b"" at the end mark); _Unusable if it is cut short or its digest is wrong."""
    head = f.read(_FRAME.size)
    if len(head) != _FRAME.size:
        raise _Unusable("it is cut short")
    length, digest = _FRAME.unpack(head)
    data = f.read(length)
    if len(data) != length:
        raise _Unusable("it is cut short")
    if hashlib.blake2b(data, digest_size=16).digest() != digest:
        raise _Unusable("a frame's digest does not match")
    return data


def _load_checkpoint(path, journal, log):
    """Add the records of ``path``'s usable checkpoint to the empty ``log``: (records, journal offset just after
    the checkpoint line), or (0, 0) to replay the whole journal (open as ``journal``)."""
    checkpoint = path + CHECKPOINT_SUFFIX
    try:
        f = open(checkpoint, "rb", buffering=1 << 20)
    except FileNotFoundError:
        return 0, 0
    try:
        with f:
            magic = f.readline(200)
            if magic != _CHECKPOINT_MAGIC:
                raise _Unusable(f"it was written by another version of getcertd or Python "
                                f"({magic[:100].decode('ascii', 'replace').strip()!r})")
            cid, offset, count = _plain_loads(_read_frame(f))
            line = _checkpoint_line(cid)
            journal.seek(offset)
            if journal.read(len(line)) != line:
                raise _Unusable("the journal does not hold its checkpoint line (compacted, restored or replaced "
                                "since)")
            reader = _FrameReader()
            chunks = []
            while True:
                data = _read_frame(f)
                if not data:
                    break
                chunks.append(reader.load(data))
            if sum(map(len, chunks)) != count or f.read(1):
                raise _Unusable("its record count does not match")
    except (_Unusable, OSError, ValueError, TypeError, EOFError) as e:
        _log.warn("journal {path}: not using the checkpoint {checkpoint}: {why}; replaying the whole journal",
                  path=path, checkpoint=checkpoint, why=e)
        return 0, 0
    try:
        for chunk in chunks:
            log.add_many(chunk, shared=True)
    except ValueError as e:  # a serial twice: only a checkpoint made by hand can say that with good digests
        raise ConfigError(f"journal {path}: the checkpoint {checkpoint} is not consistent ({e}); move it aside "
                          f"to replay the whole journal") from None
    _log.info("journal {path}: {count} records read from the checkpoint {checkpoint}", path=path, count=count,
              checkpoint=checkpoint)
    return count, offset + len(line)


def _checkpoint_meta(path):
    """(id, offset of its line, record count) of the checkpoint of the journal at ``path``; None if none."""
    try:
        with open(path + CHECKPOINT_SUFFIX, "rb") as f:
            if f.readline(200) != _CHECKPOINT_MAGIC:
                return None
            return _plain_loads(_read_frame(f))
    except (FileNotFoundError, _Unusable, ValueError, EOFError, TypeError):
        return None


def write_checkpoint(path: str, cid: str, offset: int, rows: list) -> None:
    """Write ``rows`` (IssuanceLog.rows()) as the checkpoint of the journal at ``path`` whose checkpoint line
    with ``cid`` is at ``offset``, durably and atomically (a crash leaves the previous checkpoint, or none)."""
    target = path + CHECKPOINT_SUFFIX
    tmp = target + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            with open(fd, "wb", buffering=1 << 20, closefd=False) as out:
                out.write(_CHECKPOINT_MAGIC)
                out.write(_frame(_plain_dumps((cid, offset, len(rows)))))
                for data in _frames_of(rows):
                    out.write(_frame(data))
                out.write(_frame(b""))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(target)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _valid_length(fd, size, path=None):
    """The file length without a torn last line (checked like :func:`replay` does)."""
    if size == 0:
        return 0
    chunk = 1 << 16
    pos = size
    buf = b""
    while True:
        start = max(0, pos - chunk)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        nl = buf.rfind(b"\n", 0, len(buf) - 1)
        if nl >= 0 or pos == 0:
            break
        chunk *= 2
    last = buf[nl + 1:]
    line_start = pos + nl + 1
    if last.endswith(b"\n"):
        if last.startswith(_ISSUE_PREFIX) and _fast_issue(last, 0) is not None:
            return size
        try:
            _loads(last)
            return size
        except ValueError:
            pass
    _log.warn("journal {path}: truncating a torn last line ({n} bytes at offset {at})",
              path=path, n=size - line_start, at=line_start)
    return line_start


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(path):
    """Make the directory entry of ``path`` durable (after a create or a rename)."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal(service.Service):
    """The durable writer of issuance-log events.

    :param path: the journal file (created 0600 on the first write).
    :param log: the :class:`~getcertd.issuance.IssuanceLog` that :meth:`record_issue`, :meth:`record_revocation`
        and :meth:`compact` keep in step with the file (already replayed from it).
    :param reactor: fires the results of the file work; the global reactor by default.
    :param run: ``run(f, *args) -> Deferred`` runs blocking file work; by default in a dedicated one-thread pool.
        Tests may pass a synchronous or hand-driven double.
    :param observe_commit: called on the reactor thread with the seconds each successful batch took to write and
        fsync (getcertd.stats: the disk's latency, which every answer waiting for that batch pays).
    :param checkpoint_records: :meth:`close` writes a checkpoint when the log holds at least this many records
        (0: never). Below that, a full replay is quick and checks every line at each start.
    """

    name = "journal"

    def __init__(self, path: str, log, reactor=None, run=None, observe_commit=None, checkpoint_records=0):
        self.path = path
        self.log = log
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._run = run or self._run_in_pool
        self._observe_commit = observe_commit
        self._checkpoint_records = checkpoint_records
        self._pool = None
        self._lock = defer.DeferredLock()
        self._queue = []  # [(line, Deferred)] for the next batch
        self._busy = False  # a batch is waiting for or holding the lock
        self._closing = False
        self._closed = None  # [result] once close() has finished
        self._close_waiters = []
        self._idle_waiters = []
        self._pending_serials = set()
        # Worker state: only touched by jobs, which the lock serializes.
        self._fd = None
        self._size = 0  # bytes durably written
        self._dirty = False  # a failed write may have left bytes past _size
        self.batches = 0  # successful write+fsync rounds (metrics, tests)

    # The reactor side

    def append(self, event: dict) -> defer.Deferred:
        """Write ``event``; the Deferred fires with the line's byte offset once it is fsynced.

        It fails with StorageUnavailable if the write or fsync fails (the event is then not in the journal).
        """
        if self._closing:
            return defer.fail(StorageUnavailable(f"journal {self.path} is closed"))
        line = encode_event(event)
        d = defer.Deferred()
        self._queue.append((line, d))
        self._flush()
        return d

    def record_issue(self, record: Record, der: bytes) -> defer.Deferred:
        """Journal an issued certificate, then add it to the log; fires with the record."""
        serial = record.serial
        if serial in self.log or serial in self._pending_serials:
            return defer.fail(ValueError(f"serial {serial:#x} was already issued"))
        self._pending_serials.add(serial)

        def added(offset):
            record.offset = offset
            return self.log.add(record, der)

        def done(result):
            self._pending_serials.discard(serial)
            return result

        return self.append(issue_event(record, der)).addCallback(added).addBoth(done)

    def record_revocation(self, serial: int, reason, now: int) -> defer.Deferred:
        """Journal a revocation, then apply it to the log; fires with the record (KeyError if unknown).

        Revoking a revoked certificate writes nothing and keeps the first date and reason.
        """
        try:
            reason = check_reason(reason)
        except ValueError:
            return defer.fail()
        record = self.log.get(serial)
        if record is None:
            return defer.fail(KeyError(serial))
        if record.revoked_at is not None:
            return defer.succeed(record)
        d = self.append(revoke_event(serial, reason, now))
        return d.addCallback(lambda _: self.log.revoke(serial, reason, now))

    def record_user_revocation(self, user: str, reason, now: int) -> defer.Deferred:
        """Revoke every unrevoked, unexpired certificate of ``user`` (one batch); fires with the records."""
        targets = [r for r in self.log.by_user(user) if r.revoked_at is None and r.not_after > now]
        d = defer.gatherResults([self.record_revocation(r.serial, reason, now) for r in targets],
                                consumeErrors=True)
        return d.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)

    def certificate(self, serial: int) -> defer.Deferred:
        """The DER of an issued certificate (from the recent cache, else read back); None if unknown."""
        der = self.log.cached_der(serial)
        if der is not None:
            return defer.succeed(der)
        if serial not in self.log:
            return defer.succeed(None)

        def read():
            record = self.log.get(serial)  # looked up under the lock: compaction may have moved it
            if record is None or record.offset < 0:
                return None
            return self._run(self._read_der, serial, record.offset)

        return self._lock.run(read).addErrback(self._storage_failure, "read")

    def compact(self, now: int, retain: int) -> defer.Deferred:
        """Rewrite the journal without records whose notAfter is before ``now - retain`` (and prune the log).

        Revocations are folded into their issue lines. Fires with the number of records kept.
        """
        cutoff = now - retain

        def job():
            d = self._run(self._compact_file, cutoff)

            def done(kept):
                self.log.prune(now, retain)
                return kept
            return d.addCallback(done)

        return self._lock.run(job).addErrback(self._storage_failure, "compact")

    def close(self) -> defer.Deferred:
        """Write what is queued, close the file and stop the thread; fires when done (for shutdown)."""
        if self._closed is None:
            self._closing = True
            self._closed = []
            self._close_waiters = []

            def closed(result):
                self._closed.append(result)
                for waiter in self._close_waiters:
                    waiter.callback(result)
            self._close().addBoth(closed)
        d = defer.Deferred()
        if self._closed:
            d.callback(self._closed[0])
        else:
            self._close_waiters.append(d)
        return d

    @defer.inlineCallbacks
    def _close(self):
        while self._busy or self._queue:
            waiter = defer.Deferred()
            self._idle_waiters.append(waiter)
            yield waiter
        if self._checkpoint_records and len(self.log) >= self._checkpoint_records:
            try:
                count, seconds = yield self._lock.run(lambda: self._run(self._write_checkpoint, self.log.rows()))
                if count:
                    _log.info("journal {path}: checkpoint of {count} records written in {seconds:.2f} s",
                              path=self.path, count=count, seconds=seconds)
            except Exception as e:
                # The journal itself is intact: the next start replays all of it.
                _log.warn("journal {path}: no checkpoint written: {why}", path=self.path,
                          why=getattr(e, "strerror", None) or e)
        try:
            # Under the lock no job runs, so the worker's _fd can be looked at here.
            yield self._lock.run(lambda: self._run(self._close_fd) if self._fd is not None else None)
        finally:
            if self._pool is not None:
                pool, self._pool = self._pool, None
                yield pool.stop()

    def stopService(self):
        super().stopService()
        return self.close()

    def _flush(self):
        if self._busy or not self._queue:
            return
        self._busy = True
        self._lock.acquire().addCallback(self._write_queue)

    def _write_queue(self, lock):
        batch, self._queue = self._queue, []
        d = self._run(self._write_batch, [line for line, _ in batch])

        def done(result):
            if isinstance(result, Failure):
                error = self._storage_error(result, "write")
                for _, waiter in batch:
                    waiter.errback(error)
            else:
                offsets, seconds = result
                if self._observe_commit is not None:
                    self._observe_commit(seconds)
                for (_, waiter), offset in zip(batch, offsets):
                    waiter.callback(offset)
            lock.release()
            self._busy = False
            self._flush()
            if not self._busy:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

        d.addBoth(done)

    def _storage_error(self, failure, what):
        if failure.check(StorageUnavailable):
            return failure.value
        if failure.check(OSError):
            e = failure.value
            return StorageUnavailable(f"journal {self.path}: {what} failed: {e.strerror or e}")
        _log.failure("journal {path}: unexpected error in {what}", failure, path=self.path, what=what)
        return StorageUnavailable(f"journal {self.path}: {what} failed")

    def _storage_failure(self, failure, what):
        if failure.check(OSError, StorageUnavailable):
            raise self._storage_error(failure, what)
        return failure

    def _run_in_pool(self, f, *args):
        if self._pool is None:
            # getcertd.workers: a job costs a fraction of Twisted's deferToThreadPool (one per batch of appends).
            self._pool = WorkerPool(self._reactor, 1, "getcertd-journal")
            pool = self._pool
            self._reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
        return self._pool.run(f, *args)

    # The worker side: blocking file work, one job at a time.

    def _open(self):
        if self._fd is None:
            existed = os.path.exists(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                os.fchmod(fd, 0o600)
                size = os.fstat(fd).st_size
                valid = _valid_length(fd, size, self.path)
                if valid != size:
                    os.ftruncate(fd, valid)
                    os.fsync(fd)
                if not existed:
                    fsync_dir(self.path)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._size, self._dirty = fd, valid, False
        return self._fd

    def _write_batch(self, lines):
        """Write and fsync ``lines``: (the byte offset of each, how long the write and fsync took)."""
        fd = self._open()
        if self._dirty:
            os.ftruncate(fd, self._size)
            self._dirty = False
        data = b"".join(lines)
        self._dirty = True
        started = time.monotonic()
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            self._cut_failed_batch(fd)
            raise
        seconds = time.monotonic() - started
        start = self._size
        self._size += len(data)
        self._dirty = False
        self.batches += 1
        offsets = []
        for line in lines:
            offsets.append(start)
            start += len(line)
        return offsets, seconds

    def _write_checkpoint(self, rows):
        """Append a checkpoint line, then write the checkpoint file: (records written, seconds); (0, 0) when the
        journal already ends with the line of the current checkpoint (nothing happened since it was read)."""
        started = time.monotonic()
        fd = self._open()
        current = _checkpoint_meta(self.path)
        if current is not None:
            line = _checkpoint_line(current[0])
            if current[1] + len(line) == self._size and os.pread(fd, len(line), current[1]) == line \
                    and current[2] == len(rows):
                return 0, 0
        cid = os.urandom(16).hex()
        (offset,), _ = self._write_batch([_checkpoint_line(cid)])
        write_checkpoint(self.path, cid, offset, rows)
        return len(rows), time.monotonic() - started

    def _cut_failed_batch(self, fd):
        """Cut what a failed batch wrote, now: its events were refused to their clients, so they must not come
        back at the next start. If even that fails, ``_dirty`` stays set and the next batch, compaction or
        close tries again (and a crash before then leaves them: as for a crash during any batch)."""
        try:
            os.ftruncate(fd, self._size)
            os.fsync(fd)
        except OSError:
            return
        self._dirty = False

    def _read_der(self, serial, offset):
        fd = self._open()
        buf = b""
        while True:
            chunk = os.pread(fd, 8192, offset + len(buf))
            if not chunk:
                break
            buf += chunk
            if b"\n" in chunk:
                break
        end = buf.find(b"\n")
        line = buf[:end] if end >= 0 else buf
        try:
            event = _loads(line)
            if event["e"] != "issue" or event["serial"] != serial:
                raise ValueError("offset points at another event")
            return base64.b64decode(event["der"])
        except (ValueError, KeyError, TypeError) as e:
            raise StorageUnavailable(f"journal {self.path}: can't read serial {serial:#x} at {offset}: {e}")

    def _compact_file(self, cutoff):
        self._open()
        if self._dirty:
            os.ftruncate(self._fd, self._size)
            self._dirty = False
        end = self._size
        revocations = {}
        with open(self.path, "rb", buffering=1 << 20) as src:
            pos = 0
            for line in src:
                pos += len(line)
                if pos > end:
                    break
                if line.startswith(_ISSUE_PREFIX) or line.startswith(_CHECKPOINT_PREFIX):
                    continue
                event = _loads(line)  # a revocation (or an event in another key order, which replay accepts)
                if event.get("e") == "revoke":
                    revocations.setdefault(event["serial"], event)
        tmp = self.path + ".compact"
        records, offsets = [], array("q")
        get = self.log.get
        kept = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            with open(fd, "wb", buffering=1 << 20, closefd=False) as out, \
                    open(self.path, "rb", buffering=1 << 20) as src:
                written = 0
                pos = 0
                for line in src:
                    pos += len(line)
                    if pos > end:
                        break
                    # An issue line whose record the log holds (replayed from it, or written with it): that
                    # record's notAfter decides, and the line is copied unparsed. Any other line, and one a
                    # revocation may have to be folded into, is parsed. (At 200,000 records: 2.27 -> 1.34 s of
                    # CPU, while the lock keeps every commit waiting.)
                    if line.startswith(_ISSUE_PREFIX):
                        serial = _serial_of(line)
                        record = get(serial) if serial is not None else None
                    elif line.startswith(_REVOKE_PREFIX) or line.startswith(_CHECKPOINT_PREFIX):
                        continue
                    else:
                        serial = record = None  # another key order: parsed below
                    if record is None or serial in revocations:
                        event = _loads(line)
                        if event.get("e") != "issue" or event["not_after"] < cutoff:
                            continue
                        serial = event["serial"]
                        revocation = revocations.get(serial)
                        if revocation is not None and event.get("revoked_at") is None:
                            event["revoked_at"] = revocation["at"]
                            event["revocation_reason"] = revocation["reason"]
                            line = encode_event(event)
                        record = get(serial)
                    elif record.not_after < cutoff:
                        continue
                    if record is not None:
                        records.append(record)
                        offsets.append(written)
                    out.write(line)
                    written += len(line)
                    kept += 1
                out.flush()
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(fd)
        _unlink(self.path + CHECKPOINT_SUFFIX)  # its checkpoint line is not in the compacted journal
        os.rename(tmp, self.path)
        # From here on the compacted file is the journal, whatever fails next.
        for record, offset in zip(records, offsets):
            record.offset = offset
        old, self._fd, self._size, self._dirty = self._fd, None, 0, False
        os.close(old)
        fsync_dir(self.path)
        return kept

    def _close_fd(self):
        if self._fd is not None:
            if self._dirty:
                os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

