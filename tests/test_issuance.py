"""The issuance log model: indexes, queries, revocation, pruning, memory."""
import sys
import tracemalloc

import pytest

from getcertd.issuance import IssuanceLog, Record, check_reason

T0 = 1_780_000_000
HOUR = 3600


def rec(serial, user="alice", issued_at=T0, lifetime=8 * HOUR, tid=None, **kw):
    fields = dict(profile="vpn", subject=f"CN={user},O=Example", san=f"email:{user}@example.com",
                  key_type="ec-p256", client="192.0.2.7", auth_method="radius-pap")
    fields.update(kw)
    return Record(serial, user, fields["profile"], fields["subject"], fields["san"], fields["key_type"],
                  issued_at - 300, issued_at + lifetime, tid or f"tid-{serial}", fields["client"],
                  fields["auth_method"], issued_at)


@pytest.fixture
def log():
    log = IssuanceLog()
    log.add(rec(1, "alice", T0))
    log.add(rec(2, "bob", T0 + 10))
    log.add(rec(3, "alice", T0 + 20))
    log.add(rec(4, "alice", T0 + 2 * HOUR, lifetime=HOUR))
    return log


def test_indexes(log):
    assert len(log) == 4
    assert log.get(3).user == "alice" and log.get(99) is None
    assert [r.serial for r in log.by_user("alice")] == [1, 3, 4]
    assert log.by_user("nobody") == []
    assert log.by_transaction("tid-2").serial == 2 and log.by_transaction("nope") is None
    assert 2 in log and 99 not in log
    assert [r.serial for r in log] == [1, 2, 3, 4]


def test_duplicate_serial_refused(log):
    with pytest.raises(ValueError, match="already"):
        log.add(rec(3, "carol"))
    assert len(log) == 4 and log.get(3).user == "alice"


def test_transaction_id_reused_by_a_reenrollment_finds_the_latest(log):
    log.add(rec(10, "carol", T0, tid="same"))
    log.add(rec(11, "carol", T0 + 60, tid="same"))
    assert log.by_transaction("same").serial == 11


def test_valid_for_user_and_rate_counts(log):
    now = T0 + 2 * HOUR + 1
    assert [r.serial for r in log.valid_for_user("alice", now)] == [1, 3, 4]
    assert [r.serial for r in log.valid_for_user("alice", T0 + 3 * HOUR + 1)] == [1, 3]  # 4 expired
    # not valid yet (the clock stepped back after they were issued): they still count against the limit
    assert [r.serial for r in log.valid_for_user("alice", T0 - 301)] == [1, 3, 4]
    log.revoke(1, 1, now)
    assert [r.serial for r in log.valid_for_user("alice", now)] == [3, 4]
    assert log.count_issued_between("alice", T0, now) == 3
    assert log.count_issued_between("alice", T0 + 1, now) == 2
    assert log.count_issued_between("alice", T0 + 2 * HOUR + 1, now) == 0
    assert log.count_issued_between("alice", T0 - HOUR, T0 - 1) == 0  # stamped in the future of that clock
    assert log.count_issued_between("nobody", 0, now) == 0


def test_revoke(log):
    r = log.revoke(3, 1, T0 + 100)
    assert (r.serial, r.revoked_at, r.revocation_reason, r.revoked) == (3, T0 + 100, 1, True)
    again = log.revoke(3, "superseded", T0 + 200)  # the first revocation stands
    assert again is r and (r.revoked_at, r.revocation_reason) == (T0 + 100, 1)
    with pytest.raises(KeyError):
        log.revoke(99, 1, T0)
    for bad in (7, 8, 11, -1, True, "bogus", None, 1.0):
        with pytest.raises(ValueError):
            log.revoke(1, bad, T0)
    assert log.get(1).revoked_at is None


def test_reason_names_and_codes():
    assert check_reason("keyCompromise") == 1 and check_reason(0) == 0 and check_reason(10) == 10


def test_revoke_user_and_revoked_unexpired(log):
    now = T0 + 3 * HOUR + 10  # serial 4 (one-hour certificate) has expired
    revoked = log.revoke_user("alice", "cessationOfOperation", now)
    assert [r.serial for r in revoked] == [1, 3]
    assert log.get(4).revoked_at is None
    assert log.revoke_user("alice", 5, now) == []
    log.revoke(2, 1, now)
    assert [r.serial for r in log.revoked_unexpired(now)] == [1, 2, 3]
    # 1 and 3 expire at T0 + 8h (+20 s for 3), 2 at T0 + 8h + 10 s
    assert [r.serial for r in log.revoked_unexpired(T0 + 8 * HOUR + 10)] == [3]
    assert log.revoked_unexpired(T0 + 9 * HOUR) == []


def test_prune_drops_old_records_from_every_index(log):
    log.revoke(1, 1, T0 + 5)
    log.add(rec(5, "dave", T0 + 20 * HOUR), der=b"cert5")
    log.cache_der(1, b"cert1")
    # cutoff = now - retain = T0 + 8h + 10: drops 1 (T0+8h) and 4 (T0+3h), keeps 2 (== cutoff), 3 and 5
    assert log.prune(T0 + 9 * HOUR + 10, HOUR) == 2
    assert [r.serial for r in log] == [2, 3, 5]
    assert log.get(1) is None and log.get(4) is None and log.by_transaction("tid-1") is None
    assert [r.serial for r in log.by_user("alice")] == [3]
    assert log.revoked_unexpired(0) == [] and log.cached_der(1) is None and log.cached_der(5) == b"cert5"
    assert log.prune(T0 + 9 * HOUR + 10, HOUR) == 0
    assert log.prune(T0 + 100 * HOUR, 0) == 3
    assert len(log) == 0 and log.by_user("dave") == [] and log.recent(5) == []


def test_prune_keeps_a_reused_transaction_id_pointing_at_the_newer_record():
    log = IssuanceLog()
    log.add(rec(1, "a", T0, tid="t", lifetime=HOUR))
    log.add(rec(2, "a", T0 + 10 * HOUR, tid="t"))
    assert log.prune(T0 + 5 * HOUR, 0) == 1
    assert log.by_transaction("t").serial == 2


def test_query_and_recent(log):
    assert [r.serial for r in log.query()] == [1, 2, 3, 4]
    assert [r.serial for r in log.query(user="alice", since=T0 + 10)] == [3, 4]
    assert [r.serial for r in log.query(since=T0 + 10, until=T0 + 21)] == [2, 3]
    assert [r.serial for r in log.query(serial=2)] == [2]
    assert log.query(serial=2, user="alice") == [] and log.query(serial=99) == []
    assert [r.serial for r in log.recent(2)] == [4, 3]
    assert [r.serial for r in log.recent(10)] == [4, 3, 2, 1] and log.recent(0) == []


def test_repeated_strings_are_shared():
    log = IssuanceLog()
    a = log.add(rec(1, "".join(["al", "ice"]), subject="".join(["CN=", "alice"]), profile="".join(["v", "pn"])))
    b = log.add(rec(2, "".join(["ali", "ce"]), subject="".join(["CN=a", "lice"]), profile="".join(["vp", "n"])))
    c = log.add(rec(3, "".join(["bo", "b"]), profile="".join(["vp", "n"])))
    assert a.user is b.user and a.subject is b.subject and a.san is b.san
    assert a.profile is b.profile is c.profile and a.key_type is c.key_type and a.client is c.client


def test_der_cache_is_bounded():
    log = IssuanceLog(der_cache_size=2)
    for serial in (1, 2, 3):
        log.add(rec(serial), der=b"der%d" % serial)
    assert [log.cached_der(s) for s in (1, 2, 3)] == [None, b"der2", b"der3"]
    uncached = IssuanceLog(der_cache_size=0)
    uncached.add(rec(1), der=b"x")
    assert uncached.cached_der(1) is None


def test_record_round_trips_through_a_dict():
    r = rec(7, revoked_at=None)
    d = r.to_dict()
    assert "offset" not in d and d["serial"] == 7
    assert Record.from_dict(dict(d, e="issue", der="AA==")).to_dict() == d
    assert "serial=0x7" in repr(r)


def test_memory_per_record_is_well_under_a_kibibyte():
    """The full measurement (1,000,000 records) is scripts/measure_log.py; this is a quick guard."""
    n = 20000
    records = [rec(2**126 + i, f"user{i:07d}", T0 + i, tid=f"{i:064X}", client=f"198.51.{i >> 8 & 255}.{i & 255}")
               for i in range(n)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        log = IssuanceLog()
        for r in records:
            log.add(r)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Only the indexes here (the records were built above); a whole record was ~900 bytes at 1M.
    assert used / n < 400, used / n


def _fresh(text):
    return "".join(list(text))  # an equal string that is not the same object


def _varied(n):
    out = []
    for i in range(n):
        user = _fresh(f"user{i % 7}")
        out.append(rec(1000 + i, user, T0 + i * 97, lifetime=(i % 5 + 1) * HOUR, tid=f"tid-{i % 11}",
                       profile=_fresh("vpn" if i % 3 else "short"), subject=_fresh(f"CN={user},O=Example"),
                       san=_fresh(f"email:{user}@example.com" if i % 4 else ""), client=_fresh(f"192.0.2.{i % 3}"),
                       key_type=_fresh("ec-p256" if i % 2 else "rsa2048"), auth_method=_fresh("local"),
                       revoked_at=T0 + i if i % 9 == 0 else None, revocation_reason=1 if i % 9 == 0 else None))
    return out


def _layout(log):
    """Everything add() builds, with string identity (sharing) as object ids."""
    return ([(r.serial, r.user, r.subject, r.san, id(r.user), id(r.profile), id(r.key_type), id(r.auth_method),
              id(r.client), id(r.subject), id(r.san), r.issued_at is r.not_before) for r in log],
            {u: [r.serial for r in rs] for u, rs in log._by_user.items()},
            {t: r.serial for t, r in log._by_tid.items()}, sorted(log._revoked),
            {b: [r.serial for r in rs] for b, rs in log._expiry.items()})


def test_add_many_builds_what_add_builds():
    one, many = IssuanceLog(), IssuanceLog()
    records = _varied(200)
    for r in records[:50]:
        one.add(r)
    for r in records[50:]:
        one.add(r)
    shared = _layout(one)
    many_records = _varied(200)
    many.add_many(many_records[:50])
    many.add_many(many_records[50:])
    mine = _layout(many)
    # equal, and shared the same way (ids differ between the two logs: compare the sharing pattern)
    def pattern(layout):
        rows, *rest = layout
        ids = {}
        return [row[:4] + tuple(ids.setdefault(x, len(ids)) for x in row[4:11]) + row[11:] for row in rows], rest
    assert pattern(mine) == pattern(shared)


def test_add_many_of_shared_records_builds_the_same_without_sharing_again():
    many, loaded = IssuanceLog(), IssuanceLog()
    many.add_many(_varied(200))
    copies = [Record(*row) for row in many.rows()]  # the same string objects, as a checkpoint gives them back
    for row in copies:
        row.issued_at = int(str(row.issued_at))  # ints are not shared by a checkpoint
    loaded.add_many(copies[:50], shared=True)
    loaded.add_many(copies[50:], shared=True)
    assert _layout(loaded) == _layout(many)  # ids included
    # Nothing is compared or interned: strings shared among the records (not interned) stay as they are.
    user, profile = _fresh("carol"), _fresh("vpn")
    fresh = IssuanceLog()
    fresh.add_many([rec(1, user, profile=profile), rec(2, user, profile=profile)], shared=True)
    assert all(r.user is user and r.profile is profile for r in fresh) and profile is not sys.intern("vpn")
    assert fresh.by_user("carol") == list(fresh)


def test_add_many_of_shared_records_refuses_a_serial_twice_and_adds_nothing():
    log = IssuanceLog()
    log.add(rec(5))
    with pytest.raises(ValueError, match="already in the issuance log, or twice"):
        log.add_many([rec(1, "a"), rec(5, "b")], shared=True)
    with pytest.raises(ValueError, match="already in the issuance log, or twice"):
        log.add_many([rec(7, "a"), rec(7, "b")], shared=True)
    assert [r.serial for r in log] == [5] and log.by_user("a") == []


def test_add_many_stops_at_a_duplicate_serial_like_add():
    log = IssuanceLog()
    log.add(rec(5))
    batch = [rec(1, "a"), rec(2, "b"), rec(5, "c"), rec(6, "d")]
    with pytest.raises(ValueError, match="serial 0x5 is already"):
        log.add_many(batch)
    assert [r.serial for r in log] == [5, 1, 2]
    again = IssuanceLog()
    with pytest.raises(ValueError, match="serial 0x7 is already"):
        again.add_many([rec(7, "a"), rec(8, "b"), rec(7, "c")])
    assert [r.serial for r in again] == [7, 8]


def test_refusal_and_failed_login_lines_are_rate_limited():
    """Anyone can make the appliance refuse or fail a login as fast as they can send; twistd's log file keeps
    every rotated file, so a line each would fill the disk. At most LOG_BURST a kind per 10 s are logged; the
    next one logged says how many were not."""
    from twisted.internet.task import Clock
    from twisted.logger import formatEvent, globalLogPublisher
    from getcertd.enroll import LOG_BURST, EnrollmentService
    clock = Clock()
    service = EnrollmentService(ca=None, keys=None, policy=None, issuance_log=None, journal=None,
                                authenticator=None, clock=clock)
    said = []
    observer = lambda e: said.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        for i in range(LOG_BURST + 10):
            service.log_limited("refusals", "refused number {i}", i=i)
        service.log_limited("failed logins", "a failed login")  # another kind has its own allowance
        assert said[:LOG_BURST] == [f"refused number {i}" for i in range(LOG_BURST)]
        assert said[LOG_BURST:] == ["a failed login"]
        clock.advance(10)
        service.log_limited("refusals", "refused again")
        assert said[-1] == "refused again (10 more refusals before this one were not logged)"
    finally:
        globalLogPublisher.removeObserver(observer)
