"""The issuance journal: durability, replay, torn lines, corruption, group commit, ENOSPC, compaction."""
import base64
import errno
import json
import os
import pickle
import stat
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.python.failure import Failure

from getcertd import journal as journal_module
from getcertd.errors import ConfigError, StorageUnavailable
from getcertd.issuance import IssuanceLog, Record
from getcertd.journal import Journal, encode_event, issue_event, replay, revoke_event

T0 = 1_780_000_000
HOUR = 3600


def rec(serial, user="alice", issued_at=T0, lifetime=8 * HOUR, **kw):
    fields = dict(profile="vpn", subject=f"CN={user},O=Example", san=f"email:{user}@example.com",
                  key_type="ec-p256", tid=f"{serial:040X}", client="192.0.2.7", auth_method="local")
    fields.update(kw)
    return Record(serial, user, fields["profile"], fields["subject"], fields["san"], fields["key_type"],
                  issued_at - 300, issued_at + lifetime, fields["tid"], fields["client"], fields["auth_method"],
                  issued_at)


def der_of(serial):
    return b"\x30\x82" + serial.to_bytes(20, "big") * 30  # stands in for a certificate: any bytes round-trip


def sync_run(f, *args):
    return defer.maybeDeferred(f, *args)


def result_of(d):
    """The result of a Deferred that has already fired (the synchronous runner); raises its failure."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def state(log):
    return [(r.to_dict(), r.offset) for r in log]


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "journal")


def test_append_and_replay_round_trip(path):
    log = IssuanceLog()
    j = Journal(path, log, run=sync_run)
    records = [rec(2**126 + 1, "alice"), rec(5, "bob", T0 + 10),
               rec(2**127 - 1, "Zoë", T0 + 20, subject='CN=Zoë "Z" \\ Müller,O=Ex\\,ample', san="DNS:zoe.example"),
               rec(6, "alice", T0 + 30, auth_method="challengePassword", client="2001:db8::1")]
    for r in records:
        assert result_of(j.record_issue(r, der_of(r.serial))) is r
    assert result_of(j.record_revocation(5, "keyCompromise", T0 + 40)).revocation_reason == 1
    assert result_of(j.record_revocation(5, 4, T0 + 50)).revoked_at == T0 + 40  # already revoked: unchanged
    assert result_of(j.record_user_revocation("alice", 4, T0 + 60)) == [records[0], records[3]]
    result_of(j.close())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    lines = open(path, "rb").read().splitlines()
    assert len(lines) == 7  # 4 issues, 3 revocations (the repeated one wrote nothing)
    assert json.loads(lines[0])["der"] == base64.b64encode(der_of(2**126 + 1)).decode()
    assert json.loads(lines[4]) == {"e": "revoke", "serial": 5, "reason": 1, "at": T0 + 40}

    again = IssuanceLog()
    assert replay(path, again) == 7
    assert state(again) == state(log)
    assert again.get(5).revocation_reason == 1 and again.get(6).revoked_at == T0 + 60

    # After a restart the certificates are read back from the journal by offset.
    j2 = Journal(path, again, run=sync_run)
    for r in records:
        assert again.cached_der(r.serial) is None
        assert result_of(j2.certificate(r.serial)) == der_of(r.serial)
    assert result_of(j2.certificate(12345)) is None
    result_of(j2.close())


def test_missing_journal_replays_nothing(path):
    assert replay(path, IssuanceLog()) == 0


@pytest.mark.parametrize("record", [
    rec(1, "a"), rec(2**159 + 3, "b", T0 + 1), rec(0, "zero", 300, lifetime=300), rec(7, "neg", 0),
    rec(42, "ünï", subject="CN=ü"),
    rec(43, "tab", subject="CN=a\tb"), rec(44, "q", san='URI:"x"'),
])
@pytest.mark.parametrize("revoked", [None, (T0 + 5, 1), (T0 + 6, 0)])
def test_fast_path_agrees_with_json(record, revoked):
    if revoked:
        record.revoked_at, record.revocation_reason = revoked
    line = encode_event(issue_event(record, b"\x01\x02"))
    fast = journal_module._fast_issue(line, 77)
    event = json.loads(line)
    if fast is not None:
        assert fast.to_dict() == Record.from_dict(event).to_dict() and fast.offset == 77
    # Lines with escaped characters or negative numbers take the json path, which is the reference.
    plain = record.not_before >= 0 and record.user.isascii() and record.subject.isascii() \
        and "\t" not in record.subject and '"' not in record.san
    assert (fast is not None) == plain


def test_fast_path_refuses_other_layouts():
    good = encode_event(issue_event(rec(9), b"x"))
    assert journal_module._fast_issue(good, 0) is not None
    for bad in (good.replace(b'"user"', b'"usr"'), good.replace(b'"not_after":', b'"not_after":-'),
                good.replace(b'"serial":9', b'"serial":9.5'), good[:-2] + b',"x":1}\n',
                good.replace(b'"e":"issue",', b'"e":"issue","v":2,')):
        assert journal_module._fast_issue(bad, 0) is None, bad


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def lines_for(n):
    return [encode_event(issue_event(rec(i + 1, f"u{i}", T0 + i), der_of(i + 1))) for i in range(n)]


@pytest.mark.parametrize("torn", [b'{"e":"issue","serial":99,"us', b'{"e":"iss\n', b"\x00\x00\x00\x00", b"\n"])
def test_torn_last_line_is_skipped_then_truncated_before_the_next_append(path, torn):
    good = lines_for(3)
    write(path, b"".join(good) + torn)
    log = IssuanceLog()
    assert replay(path, log) == 3 and len(log) == 3
    j = Journal(path, log, run=sync_run)
    r = rec(100, "late", T0 + 100)
    offset = result_of(j.record_issue(r, b"late")).offset
    result_of(j.close())
    assert offset == sum(map(len, good))
    assert open(path, "rb").read() == b"".join(good) + encode_event(issue_event(r, b"late"))
    again = IssuanceLog()
    assert replay(path, again) == 4 and state(again) == state(log)


def _garbled(line, block):
    """``line`` with 64 bytes of its base64 DER overwritten by ``block`` (a zeroed or garbled disk block)."""
    at = line.index(b'"der":"') + 10
    return line[:at] + block + line[at + len(block):]


@pytest.mark.parametrize("bad", [b"{not json}\n", b'{"e":"issue","ser\n', b"\n", b"garbage",
                                 _garbled(lines_for(2)[1], bytes(64)), _garbled(lines_for(2)[1], b"\xa7" * 64)])
def test_corruption_before_the_last_line_names_the_file_and_line(path, bad):
    good = lines_for(3)
    write(path, good[0] + bad + (b"\n" if not bad.endswith(b"\n") else b"") + good[1] + good[2])
    with pytest.raises(ConfigError, match=rf"journal {path}, line 2: .*corrupt"):
        replay(path, IssuanceLog())


@pytest.mark.parametrize("last", [
    b'{"e":"bogus"}\n', b'{"e":"issue","serial":1}\n', b'{"e":"revoke","serial":1,"reason":7,"at":5}\n',
    b'{"e":"issue","serial":"7","user":"a","profile":"p","subject":"s","san":"","key_type":"k","not_before":1,'
    b'"not_after":2,"transaction_id":"t","client":"c","auth_method":"local","issued_at":1}\n'])
def test_a_complete_but_meaningless_line_is_corruption_even_at_the_end(path, last):
    write(path, b"".join(lines_for(2)) + last)
    with pytest.raises(ConfigError, match=rf"journal {path}, line 3"):
        replay(path, IssuanceLog())


def test_duplicate_serial_is_corruption(path):
    good = lines_for(2)
    write(path, good[0] + good[1] + good[0])
    with pytest.raises(ConfigError, match="line 3: serial 0x1 is already"):
        replay(path, IssuanceLog())


def test_revocation_of_a_pruned_serial_is_ignored(path):
    write(path, b"".join(lines_for(2)) + encode_event(revoke_event(555, 1, T0)))
    log = IssuanceLog()
    assert replay(path, log) == 3 and log.revoked_unexpired(0) == []


class Failing:
    """Wraps os.write/os.fsync so calls on the journal's own file fail with ENOSPC while ``armed``."""

    def __init__(self, monkeypatch, name, partial=False):
        self.real = getattr(os, name)
        self.armed = True
        self.calls = 0
        self.partial = partial
        monkeypatch.setattr(journal_module.os, name, self)
        self.journal = None

    def __call__(self, fd, *args):
        if self.armed and self.journal is not None and fd == self.journal._fd:
            self.calls += 1
            if self.partial:  # half the data reaches the file, then the disk is full
                self.real(fd, bytes(args[0][:len(args[0]) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, *args)


@pytest.mark.parametrize("name,partial", [("fsync", False), ("write", False), ("write", True)])
def test_enospc_fails_every_waiting_append_then_recovers(path, monkeypatch, name, partial):
    log = IssuanceLog()
    j = Journal(path, log, run=sync_run)
    result_of(j.record_issue(rec(1), b"one"))
    failing = Failing(monkeypatch, name, partial)
    failing.journal = j
    d = j.record_issue(rec(2), b"two")
    with pytest.raises(StorageUnavailable, match="No space left on device"):
        result_of(d)
    # never acknowledged, never in the log (a failed fsync: once for the batch, once cutting it away)
    assert failing.calls == (2 if name == "fsync" else 1) and log.get(2) is None
    with pytest.raises(StorageUnavailable):
        result_of(j.record_revocation(1, 1, T0))
    assert log.get(1).revoked_at is None
    failing.armed = False
    assert result_of(j.record_issue(rec(2), b"two")).serial == 2  # the same serial can be retried
    result_of(j.close())
    again = IssuanceLog()
    assert replay(path, again) == 2 and state(again) == state(log)
    assert open(path, "rb").read().count(b"\n") == 2


@pytest.mark.parametrize("name,partial", [("fsync", False), ("write", False), ("write", True)])
def test_a_failed_batch_does_not_come_back_at_the_next_start(path, monkeypatch, name, partial):
    """Its clients were answered 503: its events must not be replayed, even when nothing is appended after it
    (it used to be cut away only by the next batch, so a stop or a crash before one kept it)."""
    log = IssuanceLog()
    j = Journal(path, log, run=sync_run)
    result_of(j.record_issue(rec(1), b"one"))
    size = os.path.getsize(path)
    failing = Failing(monkeypatch, name, partial)
    failing.journal = j
    with pytest.raises(StorageUnavailable):
        result_of(j.record_issue(rec(2), b"two"))
    assert os.path.getsize(path) == size  # cut at once
    failing.armed = False
    result_of(j.close())
    again = IssuanceLog()
    assert replay(path, again) == 1 and again.get(2) is None and os.path.getsize(path) == size


def test_each_commit_reports_how_long_its_write_and_fsync_took(path, monkeypatch):
    """observe_commit (the getcertd_journal_commit_seconds histogram) gets one duration per successful batch,
    measured around the write and the fsync; a failed batch reports nothing."""
    seen = []
    j = Journal(path, IssuanceLog(), run=sync_run, observe_commit=seen.append)
    real_fsync = os.fsync

    def slow_fsync(fd):
        time.sleep(0.03)
        real_fsync(fd)
    monkeypatch.setattr(journal_module.os, "fsync", slow_fsync)
    result_of(j.record_issue(rec(1), b"one"))
    assert len(seen) == 1 and 0.03 <= seen[0] < 5
    failing = Failing(monkeypatch, "fsync")
    failing.journal = j
    with pytest.raises(StorageUnavailable):
        result_of(j.record_issue(rec(2), b"two"))
    assert len(seen) == 1
    failing.armed = False
    result_of(j.close())


def test_appends_after_close_fail(path):
    j = Journal(path, IssuanceLog(), run=sync_run)
    result_of(j.close())
    with pytest.raises(StorageUnavailable, match="closed"):
        result_of(j.append({"e": "noop"}))


class ManualRun:
    """A runner whose jobs complete only when the test says so (one at a time, like the one-thread pool)."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def step(self):
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)


def test_group_commit_with_a_hand_driven_worker(path):
    run = ManualRun()
    j = Journal(path, IssuanceLog(), run=run)
    first = j.append({"e": "x", "n": 1})
    assert len(run.jobs) == 1
    rest = [j.append({"e": "x", "n": n}) for n in (2, 3, 4)]  # while the first write+fsync runs
    assert len(run.jobs) == 1
    run.step()
    assert result_of(first) == 0 and not any(d.called for d in rest)
    assert len(run.jobs) == 1  # the three waiting events, as one batch
    assert run.jobs[0][1][0] == [encode_event({"e": "x", "n": n}) for n in (2, 3, 4)]
    run.step()
    assert [result_of(d) for d in rest] == [16, 32, 48]
    assert j.batches == 2
    closing = j.close()
    run.step()
    assert closing.called


@pytest_twisted.inlineCallbacks
def test_group_commit_with_the_real_thread_and_reactor(path, monkeypatch):
    """Events appended while an fsync blocks the worker thread go out together in the next write+fsync."""
    real_fsync, real_write = os.fsync, os.write
    entered, release = threading.Event(), threading.Event()
    fsyncs, writes = [], []
    j = Journal(path, IssuanceLog(), reactor)

    def fsync(fd):
        if fd == j._fd:
            fsyncs.append(threading.current_thread().name)
            if len(fsyncs) == 1:
                entered.set()
                release.wait(10)
        return real_fsync(fd)

    def write(fd, data):
        if fd == j._fd:
            writes.append(bytes(data).count(b"\n"))
        return real_write(fd, data)

    monkeypatch.setattr(journal_module.os, "fsync", fsync)
    monkeypatch.setattr(journal_module.os, "write", write)
    try:
        first = j.append({"e": "x", "n": 0})
        assert (yield threads.deferToThread(entered.wait, 10))
        rest = [j.append({"e": "x", "n": n}) for n in range(1, 6)]
        yield task.deferLater(reactor, 0.05, lambda: None)
        assert not first.called and not any(d.called for d in rest)  # nothing is acknowledged before fsync
        release.set()
        offsets = yield defer.gatherResults([first] + rest)
    finally:
        release.set()
        yield j.close()
    assert offsets == [i * 16 for i in range(6)]
    assert writes == [1, 5] and len(fsyncs) >= 2 and j.batches == 2
    assert all(name != threading.current_thread().name for name in fsyncs)  # never on the reactor thread
    assert [json.loads(line)["n"] for line in open(path, "rb")] == list(range(6))


def test_compaction_drops_old_records_folds_revocations_and_moves_offsets(path):
    log = IssuanceLog()
    j = Journal(path, log, run=sync_run)
    old = [rec(i, f"old{i}", T0 + i, lifetime=HOUR) for i in range(1, 4)]
    new = [rec(i, f"new{i}", T0 + i, lifetime=100 * HOUR) for i in range(10, 14)]
    for r in old + new:
        result_of(j.record_issue(r, der_of(r.serial)))
    result_of(j.record_revocation(2, 1, T0 + 50))  # an old one: dropped with its record
    result_of(j.record_revocation(11, 4, T0 + 60))
    before = os.path.getsize(path)
    kept = result_of(j.compact(T0 + 10 * HOUR, 2 * HOUR))  # cutoff T0 + 8h: the one-hour certificates go
    assert kept == 4
    assert sorted(r.serial for r in log) == [10, 11, 12, 13]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.path.getsize(path) < before
    assert not os.path.exists(path + ".compact")
    events = [json.loads(line) for line in open(path, "rb")]
    assert [e["e"] for e in events] == ["issue"] * 4
    assert events[1]["revoked_at"] == T0 + 60 and events[1]["revocation_reason"] == 4
    for r in new:  # offsets now point into the compacted file
        log._der.clear()
        assert result_of(j.certificate(r.serial)) == der_of(r.serial)
    result_of(j.record_issue(rec(20, "after"), der_of(20)))
    result_of(j.record_revocation(12, 5, T0 + 70))
    result_of(j.close())
    again = IssuanceLog()
    assert replay(path, again) == 6 and state(again) == state(log)


def _reordered(event: dict) -> bytes:
    """The event's line with its keys in another order ("e" not first): replay reads it like any other."""
    return encode_event(dict(reversed(list(event.items()))))


def test_compaction_reads_the_lines_the_log_cannot_decide_for_it(path):
    """Issue lines in the layout the appliance writes are decided by their record in the log, unparsed; lines in
    another key order (which replay accepts) are parsed, and neither those nor their revocations are lost."""
    lines = [
        encode_event(issue_event(rec(1, "a", T0, lifetime=HOUR), der_of(1))),  # expired
        _reordered(issue_event(rec(2, "b", T0, lifetime=HOUR), der_of(2))),  # expired
        _reordered(issue_event(rec(3, "c", T0, lifetime=100 * HOUR), der_of(3))),
        encode_event(issue_event(rec(4, "d", T0, lifetime=100 * HOUR), der_of(4))),
        encode_event(issue_event(rec(5, "e", T0, lifetime=100 * HOUR), der_of(5))),
        _reordered(revoke_event(4, 1, T0 + 60)),
        _reordered(revoke_event(3, 4, T0 + 70)),
        _reordered({"e": "checkpoint", "id": "0" * 32}),
    ]
    write(path, b"".join(lines))
    log = IssuanceLog()
    assert replay(path, log) == 8
    j = Journal(path, log, run=sync_run)
    assert result_of(j.compact(T0 + 10 * HOUR, 2 * HOUR)) == 3
    events = [json.loads(line) for line in open(path, "rb")]
    assert [(e["e"], e["serial"], e.get("revoked_at"), e.get("revocation_reason")) for e in events] == [
        ("issue", 3, T0 + 70, 4), ("issue", 4, T0 + 60, 1), ("issue", 5, None, None)]
    log._der.clear()
    assert [result_of(j.certificate(s)) for s in (3, 4, 5)] == [der_of(3), der_of(4), der_of(5)]
    result_of(j.close())
    again = IssuanceLog()
    assert replay(path, again) == 3 and state(again) == state(log)


def test_compaction_failure_leaves_the_journal_as_it_was(path, monkeypatch):
    log = IssuanceLog()
    j = Journal(path, log, run=sync_run)
    for r in (rec(1, lifetime=HOUR), rec(2, lifetime=100 * HOUR)):
        result_of(j.record_issue(r, der_of(r.serial)))
    content = open(path, "rb").read()
    real_fsync = os.fsync

    def fsync(fd):
        if fd != j._fd:
            raise OSError(errno.EIO, "I/O error")
        return real_fsync(fd)
    monkeypatch.setattr(journal_module.os, "fsync", fsync)
    with pytest.raises(StorageUnavailable, match="compact failed"):
        result_of(j.compact(T0 + 10 * HOUR, 0))
    monkeypatch.undo()
    assert open(path, "rb").read() == content and len(log) == 2 and not os.path.exists(path + ".compact")
    log._der.clear()
    assert result_of(j.certificate(1)) == der_of(1)
    result_of(j.close())


def test_a_read_queued_behind_a_compaction_uses_the_new_offset(path):
    run = ManualRun()
    log = IssuanceLog(der_cache_size=0)
    j = Journal(path, log, run=run)
    for r in (rec(1, lifetime=HOUR), rec(2, lifetime=100 * HOUR)):
        d = j.record_issue(r, der_of(r.serial))
        run.step()
        result_of(d)
    compacting = j.compact(T0 + 10 * HOUR, 0)
    reading = j.certificate(2)  # asked before the compaction finishes
    run.step()
    assert result_of(compacting) == 1 and log.get(2).offset == 0
    run.step()
    assert result_of(reading) == der_of(2)


# Checkpoints

@pytest.fixture
def said():
    """Every log line said while the test runs (formatted)."""
    from twisted.logger import formatEvent, globalLogPublisher
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def checkpointed(path, n=6, **kw):
    """A journal of ``n`` issues and two revocations, closed with a checkpoint; its log."""
    log = IssuanceLog()
    j = Journal(path, log, run=sync_run, checkpoint_records=1, **kw)
    for i in range(n):
        r = rec(i + 1, f"user{i % 3}", T0 + i, subject=f"CN=Zoë {i}" if i == 2 else f"CN=user{i % 3}")
        result_of(j.record_issue(r, der_of(r.serial)))
    result_of(j.record_revocation(2, "keyCompromise", T0 + 50))
    result_of(j.record_revocation(5, 4, T0 + 60))
    result_of(j.close())
    return log


def full_replay(path):
    """The log a replay of the whole journal gives (the checkpoint moved aside for it)."""
    checkpoint = path + journal_module.CHECKPOINT_SUFFIX
    moved = os.path.exists(checkpoint)
    if moved:
        os.rename(checkpoint, checkpoint + ".aside")
    try:
        log = IssuanceLog()
        replay(path, log)
        return log
    finally:
        if moved:
            os.rename(checkpoint + ".aside", checkpoint)


@pytest.fixture
def parsed_lines(monkeypatch):
    """How many issue lines the replay parses (the checkpoint's records are not parsed again)."""
    calls = []
    real = journal_module._fast_issue
    monkeypatch.setattr(journal_module, "_fast_issue", lambda line, offset: calls.append(1) or real(line, offset))
    return calls


def test_a_clean_close_writes_a_checkpoint_that_the_next_replay_reads_instead_of_the_lines(path, parsed_lines, said):
    log = checkpointed(path)
    checkpoint = path + journal_module.CHECKPOINT_SUFFIX
    assert stat.S_IMODE(os.stat(checkpoint).st_mode) == 0o600
    last = json.loads(open(path, "rb").read().splitlines()[-1])
    assert last["e"] == "checkpoint" and len(last["id"]) == 32
    assert any("checkpoint of 6 records written" in line for line in said)
    again = IssuanceLog()
    assert replay(path, again) == 6  # the records; the lines before the checkpoint are not read
    assert parsed_lines == []
    assert state(again) == state(log) == state(full_replay(path))
    assert again.get(2).revocation_reason == 1 and again.get(3).subject == "CN=Zoë 2"
    assert again.by_user("user1") == [again.get(2), again.get(5)]
    assert any(f"6 records read from the checkpoint {checkpoint}" in line for line in said)
    j = Journal(path, again, run=sync_run)  # certificates are read back from the journal by offset
    for serial in range(1, 7):
        assert result_of(j.certificate(serial)) == der_of(serial)
    result_of(j.close())


def test_events_after_the_checkpoint_are_replayed_on_top_of_it(path, parsed_lines):
    checkpointed(path)
    log = IssuanceLog()
    replay(path, log)
    j = Journal(path, log, run=sync_run)  # no checkpoint at this close (a crash would leave the same journal)
    result_of(j.record_issue(rec(7, "late", T0 + 70), der_of(7)))
    result_of(j.record_revocation(1, 5, T0 + 80))  # a record from the checkpoint
    result_of(j.record_revocation(7, 1, T0 + 90))
    result_of(j.close())
    again = IssuanceLog()
    assert replay(path, again) == 6 + 3
    assert len(parsed_lines) == 3  # only the lines after the checkpoint
    assert state(again) == state(log) == state(full_replay(path))
    assert again.get(1).revocation_reason == 5
    j = Journal(path, again, run=sync_run)
    assert result_of(j.certificate(7)) == der_of(7) and result_of(j.certificate(1)) == der_of(1)
    result_of(j.close())


def test_a_close_with_nothing_new_keeps_the_checkpoint(path):
    checkpointed(path)
    checkpoint = path + journal_module.CHECKPOINT_SUFFIX
    size, inode = os.path.getsize(path), os.stat(checkpoint).st_ino
    log = IssuanceLog()
    replay(path, log)
    result_of(Journal(path, log, run=sync_run, checkpoint_records=1).close())
    assert os.path.getsize(path) == size and os.stat(checkpoint).st_ino == inode
    result_of(Journal(path, log, run=sync_run, checkpoint_records=1).record_revocation(3, 1, T0 + 99))
    result_of(Journal(path, log, run=sync_run, checkpoint_records=1).close())
    assert os.stat(checkpoint).st_ino != inode  # something new: a new checkpoint


def test_a_small_log_gets_no_checkpoint(path):
    log = IssuanceLog()
    j = Journal(path, log, run=sync_run, checkpoint_records=4)
    for i in range(3):
        result_of(j.record_issue(rec(i + 1), der_of(i + 1)))
    result_of(j.close())
    assert not os.path.exists(path + journal_module.CHECKPOINT_SUFFIX)
    assert b"checkpoint" not in open(path, "rb").read()


def _flip(data):
    at = len(data) // 2
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


@pytest.mark.parametrize("damage, why", [
    (lambda c, j: (_flip(c), j), "digest does not match"),
    (lambda c, j: (c[:-30], j), "cut short"),
    (lambda c, j: (c + b"x", j), "record count does not match"),
    (lambda c, j: (c.replace(b"python 3.", b"python 2.", 1), j), "another version of getcertd or Python"),
    # the journal restored from a backup taken before the checkpoint, then written on
    (lambda c, j: (c, j[:j.rindex(b'{"e":"checkpoint"')] + encode_event(issue_event(rec(9, "x"), b"x"))),
     "does not hold its checkpoint line"),
    # another appliance's checkpoint line at that offset
    (lambda c, j: (c, j[:j.rindex(b'"id":"') + 6] + b"0" * 32 + b'"}\n'), "does not hold its checkpoint line"),
])
def test_an_unusable_checkpoint_means_a_full_replay(path, said, damage, why):
    checkpointed(path)
    checkpoint = path + journal_module.CHECKPOINT_SUFFIX
    c, j = damage(open(checkpoint, "rb").read(), open(path, "rb").read())
    write(checkpoint, c)
    write(path, j)
    expected = full_replay(path)
    log = IssuanceLog()
    replay(path, log)
    assert state(log) == state(expected) and len(log) >= 6
    assert any("not using the checkpoint" in line and why in line and "replaying the whole journal" in line
               for line in said), said


def _sharing(log):
    """Which of the log's strings are one object, as numbers in order of first sight (ids differ between logs)."""
    ids = {}
    return [tuple(ids.setdefault(id(getattr(r, f)), len(ids)) for f in ("user", "profile", "subject", "san",
                                                                        "key_type", "client", "auth_method"))
            + (r.issued_at is r.not_before,) for r in log]


def test_a_checkpoint_gives_back_the_strings_shared_as_in_the_log_that_wrote_it(path, monkeypatch, parsed_lines):
    monkeypatch.setattr(journal_module, "CHECKPOINT_CHUNK", 2)  # a user's records in several frames
    written = checkpointed(path, n=9)
    assert written.get(1).user is written.get(7).user and written.get(1).subject is written.get(4).subject
    log = IssuanceLog()
    assert replay(path, log) == 9 and not parsed_lines
    assert state(log) == state(written) == state(full_replay(path))
    assert _sharing(log) == _sharing(written)
    assert log.get(1).user is log.get(7).user is next(u for u in log._by_user if u == "user0")
    assert [r.serial for r in log.by_user("user1")] == [2, 5, 8] and log.by_transaction(written.get(3).transaction_id)
    assert sorted(r.serial for r in log.revoked_unexpired(T0)) == [2, 5]
    assert log.prune(T0 + 8 * HOUR + 4, 0) == 4 and len(log) == 5  # the expiry index: serials 1-4 expired


class _RunsCode:
    def __reduce__(self):
        return pytest.fail, ("a checkpoint made the appliance call a function",)


def _with_frame(checkpoint: bytes, data: bytes) -> bytes:
    """``checkpoint`` with its first frame of records replaced by ``data``, under a good digest."""
    size = journal_module._FRAME.size
    head = checkpoint.index(b"\n") + 1
    first = head + size + journal_module._FRAME.unpack_from(checkpoint, head)[0]
    rest = first + size + journal_module._FRAME.unpack_from(checkpoint, first)[0]
    return checkpoint[:first] + journal_module._frame(data) + checkpoint[rest:]


@pytest.mark.parametrize("data, why", [
    (pickle.dumps(_RunsCode(), 5), "names "),  # refused by name, never called
    (pickle.dumps([(1, "user0")], 5), "does not hold one column per record field"),  # rows, not columns
    (pickle.dumps(tuple([1]) * 15, 5), "does not hold one column per record field"),
    (pickle.dumps(tuple([[1]] * 14 + [[1, 2]]), 5), "does not hold one column per record field"),
    (pickle.dumps(tuple([[1]] * 15), 5) + b"more", "does not hold one column per record field"),
    (b"\x80\x05junk", "can't be read"),
], ids=["a function to call", "rows", "not lists", "uneven columns", "more after the pickle", "not a pickle"])
def test_a_checkpoint_frame_with_a_good_digest_but_not_plain_columns_means_a_full_replay(path, said, data, why):
    checkpointed(path)
    checkpoint = path + journal_module.CHECKPOINT_SUFFIX
    write(checkpoint, _with_frame(open(checkpoint, "rb").read(), data))
    log = IssuanceLog()
    replay(path, log)
    assert state(log) == state(full_replay(path)) and len(log) == 6
    assert any("not using the checkpoint" in line and why in line for line in said), said


def test_a_checkpoint_that_names_a_serial_twice_stops_the_start(path):
    checkpointed(path)
    checkpoint = path + journal_module.CHECKPOINT_SUFFIX
    rows = IssuanceLog()
    replay(path, rows)
    rows = rows.rows()
    twice = rows[:2] + rows[:1] + rows[3:]  # as many records as the header says, one of them twice
    write(checkpoint, _with_frame(open(checkpoint, "rb").read(), next(journal_module._frames_of(twice))))
    with pytest.raises(ConfigError, match="is not consistent .*move it aside"):
        replay(path, IssuanceLog())


def test_a_crash_between_the_checkpoint_line_and_its_file_keeps_the_previous_checkpoint(path, monkeypatch, said):
    checkpointed(path)
    previous = open(path + journal_module.CHECKPOINT_SUFFIX, "rb").read()
    log = IssuanceLog()
    replay(path, log)
    j = Journal(path, log, run=sync_run, checkpoint_records=1)
    result_of(j.record_issue(rec(7, "late", T0 + 70), der_of(7)))
    real_rename = os.rename

    def rename(src, dst):
        if dst.endswith(journal_module.CHECKPOINT_SUFFIX):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(src, dst)
    monkeypatch.setattr(journal_module.os, "rename", rename)
    result_of(j.close())  # the close itself succeeds
    monkeypatch.undo()
    assert any("no checkpoint written: No space left on device" in line for line in said)
    assert open(path + journal_module.CHECKPOINT_SUFFIX, "rb").read() == previous
    assert not os.path.exists(path + journal_module.CHECKPOINT_SUFFIX + ".tmp")
    assert open(path, "rb").read().count(b'{"e":"checkpoint"') == 2  # the new line is there, and harmless
    again = IssuanceLog()
    assert replay(path, again) == 6 + 2
    assert state(again) == state(log) == state(full_replay(path))


def test_compaction_removes_the_checkpoint_and_its_lines(path):
    checkpointed(path)
    log = IssuanceLog()
    replay(path, log)
    j = Journal(path, log, run=sync_run)
    result_of(j.compact(T0, 0))  # nothing expired: every record kept
    assert not os.path.exists(path + journal_module.CHECKPOINT_SUFFIX)
    assert [json.loads(line)["e"] for line in open(path, "rb")] == ["issue"] * 6
    result_of(j.close())
    again = IssuanceLog()
    assert replay(path, again) == 6 and state(again) == state(log)


def test_corruption_after_the_checkpoint_is_named_from_it(path):
    checkpointed(path)
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"{not json}\n" + lines_for(1)[0])
    with pytest.raises(ConfigError, match=rf"journal {path}, line \(counted from the checkpoint ending at byte "
                                          rf"{size}\) 1: not JSON"):
        replay(path, IssuanceLog())
