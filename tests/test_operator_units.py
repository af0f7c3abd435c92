"""The operator plane without a process: config rules, the manhole namespace, Stats and /metrics, the state_dir
lock, compaction on a Clock, serial formatting against openssl, the RADIUS round-trip histogram."""
import datetime
import os
import re
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer
from twisted.internet.task import Clock

from getcertd import admin_ns, state
from getcertd.ca import CertificateAuthority, make_ca_certificate
from getcertd.config import loopback_only, parse_config
from getcertd.crl import CrlPublisher
from getcertd.errors import ConfigError
from getcertd.issuance import IssuanceLog, Record
from getcertd.journal import Journal, replay
from getcertd.operations import CompactionService, format_serial, parse_serial
from getcertd.stats import Stats

UTC = datetime.timezone.utc
T0 = 1_780_000_000
HOUR = 3600


def conf(extra=""):
    return parse_config("[auth]\nusers = /tmp/u\n" + extra)


# -- configuration --------------------------------------------------------------------------------------

@pytest.mark.parametrize("listen, local", [
    ("tcp:2222:interface=127.0.0.1", True), ("tcp:2222:interface=127.0.0.2", True),
    ("tcp6:2222:interface=\\:\\:1", True), ("tcp:2222:interface=localhost", True), ("unix:/run/g.sock", True),
    ("tcp:2222", False), ("2222", False), ("tcp:2222:interface=0.0.0.0", False),
    ("tcp6:2222:interface=\\:\\:", False), ("tcp:2222:interface=192.0.2.7", False),
    ("systemd:domain=INET:index=0", False)])
def test_loopback_only(listen, local):
    assert loopback_only(listen) is local


def test_manhole_and_metrics_refuse_remote_listeners_unless_allowed():
    c = conf()
    assert (c.manhole_listen, c.manhole_allow_remote, c.metrics_listen) == ("tcp:2222:interface=127.0.0.1", False, "")
    for section in ("manhole", "metrics"):
        with pytest.raises(ConfigError, match=rf"\[{section}\] listen: 'tcp:9999' is reachable from other machines"):
            conf(f"[{section}]\nlisten = tcp:9999\n")
        ok = conf(f"[{section}]\nlisten = tcp:9999\nallow_remote = yes\n")
        assert getattr(ok, f"{section}_listen") == "tcp:9999" and getattr(ok, f"{section}_allow_remote")
    with pytest.raises(ConfigError, match=r"\[manhole\] allow_remote: expected yes or no"):
        conf("[manhole]\nallow_remote = maybe\n")


def test_crl_lifetime_and_log_retention_must_outlast_the_interval():
    for lifetime in ("1h", "2h", "7259s"):
        with pytest.raises(ConfigError, match=r"\[crl\] lifetime: must exceed \[crl\] interval by at least 60 s"):
            conf(f"[crl]\ninterval = 2h\nlifetime = {lifetime}\n")
    assert conf("[crl]\ninterval = 2h\nlifetime = 121m\n").crl_lifetime == 7260
    with pytest.raises(ConfigError, match=r"\[log\] retain: must be at least \[crl\] lifetime"):
        conf("[crl]\ninterval = 1d\nlifetime = 2d\n[log]\nretain = 1d\n")


# -- serial numbers as openssl prints them --------------------------------------------------------------

@pytest.mark.parametrize("serial", [1, 0x0A, 0xABC, 0x80, 0xFF, 0x0100, 2**127 + 5, (2**127 - 1) >> 4, 2**158 + 3])
def test_serial_format_is_openssls(tmp_path, serial):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name.from_rfc4514_string("CN=t")
    now = datetime.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "c.pem"), "-serial", "-noout"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "serial=" + format_serial(serial)
    assert parse_serial(format_serial(serial)) == serial == parse_serial(out) == parse_serial(hex(serial))


def test_parse_serial_refuses_non_hex():
    for bad in ("", "xyz", "12g4", "serial="):
        with pytest.raises(ValueError, match="not a serial number"):
            parse_serial(bad)
    assert parse_serial("0a:1B") == 0x0A1B and parse_serial(42) == 42


# -- the manhole namespace, on a Clock, with the real journal, log and CRL publisher --------------------

def sync(f, *args):
    return defer.maybeDeferred(f, *args)


def fired(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


@pytest.fixture
def plane(tmp_path):
    clock = Clock()
    clock.advance(T0)
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.fromtimestamp(T0 - HOUR, UTC)
    ca = CertificateAuthority(key, make_ca_certificate(key, "CN=Unit CA", start, datetime.timedelta(days=30)))
    log = IssuanceLog()
    journal = Journal(str(tmp_path / "journal"), log, reactor=clock, run=sync)
    crl = CrlPublisher(ca, str(tmp_path), log, clock, interval=HOUR, lifetime=2 * HOUR)
    crl.startService()  # CRL 1 at once (synchronous run)
    stats = Stats(clock, backend="local", crl=crl, log=log)
    config = parse_config(f"[getcertd]\nstate_dir = {tmp_path}\n[auth]\nbackend = radius\n[radius]\n"
                          "servers = 127.0.0.1:1812\nsecret = s3cret-do-not-show\n")
    ns = admin_ns.namespace(issuance_log=log, journal=journal, crl=crl, clock=clock, stats=stats, config=config)

    def issue(serial, user, lifetime=8 * HOUR):
        now = int(clock.seconds())
        record = Record(serial, user, "default", f"CN={user}", "", "ec-p256", now, now + lifetime, f"tid-{serial}",
                        "192.0.2.1", "local", now)
        fired(journal.record_issue(record, b"\x30\x03\x02\x01\x00"))
        stats.count("issued", "default")
        return record
    yield ns, issue, clock, crl, stats, journal
    crl.stopService()
    fired(journal.close())


def test_log_view_tables_and_queries(plane):
    ns, issue, clock, *_ = plane
    issue(0x0ABC, "alice")
    clock.advance(HOUR)
    issue(0x1234, "bob")
    issue(0x5678, "alice")
    log = ns["log"]
    assert len(log) == 3 and "3 records" in repr(log)
    table = repr(log.recent(20)).splitlines()
    assert table[0].split()[:3] == ["serial", "user", "profile"]
    assert [line.split()[0] for line in table[1:4]] == ["5678", "1234", "0ABC"] and table[-1] == "(3 records)"
    assert [r.serial for r in log.user("alice")] == [0x0ABC, 0x5678]
    assert log.serial("0ABC").user == "alice" and log.serial(0x1234).user == "bob" and log.serial("FF") is None
    assert [r.serial for r in log.query(since="30m")] == [0x1234, 0x5678]
    assert [r.serial for r in log.query(until=T0 + 1)] == [0x0ABC]
    when = datetime.datetime.fromtimestamp(T0 + HOUR, UTC)
    assert [r.serial for r in log.query(user="alice", since=when.isoformat())] == [0x5678]
    with pytest.raises(ValueError, match="not a time"):
        log.query(since="yesterday")
    clock.advance(8 * HOUR)
    assert "expired" in repr(log.recent(3)).splitlines()[3]
    assert repr(log.recent(0)) == "(no records)"


def test_revoke_by_serial_and_user_journals_then_publishes(plane, tmp_path):
    ns, issue, clock, crl, stats, journal = plane
    issue(0x0ABC, "alice")
    issue(0x5678, "alice")
    issue(0x1234, "bob")
    first = crl.number
    out = fired(ns["revoke"]("0ABC", "keyCompromise"))
    assert [r.serial for r in out] == [0x0ABC] and out.crl["number"] == first + 1 and out.crl["entries"] == 1
    assert "revoked 0ABC (alice, keyCompromise" in repr(out) and f"CRL {first + 1} published: 1 entry" in repr(out)
    again = ns["revoke"](0x0ABC, "superseded")  # said plainly, not "revoked" again; the first reason stays
    assert re.fullmatch(r"nothing revoked: serial 0ABC was already revoked at \S+ \S+ UTC \(keyCompromise\)",
                        repr(again)), repr(again)
    assert journal.log.get(0x0ABC).revocation_reason == 1 and crl.number == first + 1
    out = fired(ns["revoke"]("bob", "4"))  # a reason code as text, as typed at the prompt
    assert [r.serial for r in out] == [0x1234] and crl.number == first + 2
    assert repr(ns["revoke"]("bob")) == "nothing revoked: 'bob' holds no unrevoked, unexpired certificate"
    assert repr(ns["revoke"]("carol")).startswith("nothing revoked: no user and no serial 'carol'")
    assert "nothing revoked: unknown revocation reason" in repr(ns["revoke"](user="alice", reason="nope"))
    revoked = x509.load_der_x509_crl(crl.der)
    assert sorted(e.serial_number for e in revoked) == [0x0ABC, 0x1234]
    assert revoked.get_revoked_certificate_by_serial_number(0x0ABC).extensions.get_extension_for_class(
        x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert [r.serial for r in ns["log"].revoked()] == [0x0ABC, 0x1234]
    # journalled: a replay sees the revocations
    again = IssuanceLog()
    replay(journal.path, again)
    assert again.get(0x0ABC).revocation_reason == 1 and again.get(0x1234).revocation_reason == 4
    assert again.get(0x5678).revoked_at is None


def test_revoke_refuses_an_ambiguous_name(plane):
    ns, issue, *_ = plane
    issue(0xBEEF, "beef")
    issue(0x0ABC, "BEEF")  # a user named like the first serial
    assert "is both a user and a serial" in repr(ns["revoke"]("BEEF"))
    assert [r.serial for r in fired(ns["revoke"](user="BEEF"))] == [0x0ABC]
    assert [r.serial for r in fired(ns["revoke"](serial="BEEF"))] == [0xBEEF]


def test_crl_radius_config_and_help(plane):
    ns, issue, clock, crl, *_ = plane
    info = ns["crl"].info()
    assert info["number"] == crl.number and re.match(r"<CRL \d+: 0 entries, thisUpdate .* UTC>", repr(info))
    clock.advance(60)
    published = fired(ns["crl"].publish())
    assert published["number"] == info["number"] + 1 and ns["crl"].pem.startswith("-----BEGIN X509 CRL-----")
    assert "backend = radius" in repr(ns["radius"]) and ns["radius"].servers == []
    config = ns["config"]
    assert "s3cret" not in repr(config) and "secret=(hidden)" in repr(config)
    assert config.radius.secret == "(hidden)" and config.crl_interval == 3600
    assert config.radius.servers == (("127.0.0.1", 1812),)
    text = repr(ns["help"])
    for name in ("log", "revoke", "crl", "radius", "stats()", "config"):
        assert re.search(rf"^{re.escape(name)}\s", text, re.M), name
    assert "keyCompromise (1)" in ns["help"](ns["revoke"]) and "log.recent(20)" in ns["help"](ns["log"])
    assert "same numbers as /metrics" in ns["help"](ns["stats"])


class FakeRadius:
    def status(self):
        return {"servers": [
            {"server": "192.0.2.1:1812", "host": "192.0.2.1", "port": 1812, "state": "up", "dead_for": 0.0,
             "in_flight": 2, "queued": 0, "requests": 10, "retransmissions": 3, "accepts": 6, "rejects": 2,
             "challenges": 1, "timeouts": 1, "dropped": 0, "last_rtt": 0.012},
            {"server": "192.0.2.2:1812", "host": "192.0.2.2", "port": 1812, "state": "dead", "dead_for": 12.0,
             "in_flight": 0, "queued": 0, "requests": 4, "retransmissions": 8, "accepts": 0, "rejects": 0,
             "challenges": 0, "timeouts": 4, "dropped": 1, "last_rtt": None}],
            "unknown_source_dropped": 7}


def metric(text, name, **labels):
    """The value of one sample in Prometheus text."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample == name and got == want:
            return float(value)
    raise KeyError(f"{name}{{{want}}} not in the metrics")


def test_stats_and_metrics_show_the_same_numbers(plane):
    ns, issue, clock, crl, stats, _ = plane
    stats.radius = FakeRadius()
    stats.backend = "radius"
    issue(1, "alice")
    for key in [("refused", "badRequest"), ("refused", "badRequest"), ("refused", "badAlg"),
                ("auth", "radius", "accept"), ("auth", "radius", "reject"), ("auth", "radius", "reject"),
                ("auth", "radius", "throttled"), ("auth", "radius", "challenge"), ("something", "else")]:
        stats.count(*key)
    stats.observe_radius_rtt("192.0.2.1:1812", 0.012)
    stats.observe_request("scep", 200, 0.2)
    clock.advance(90)
    text = stats.metrics_text().decode()
    snap = stats.snapshot()
    assert metric(text, "getcertd_enrollments_total", result="issued", profile="default", fail_info="") == 1
    assert metric(text, "getcertd_enrollments_total", result="refused", profile="", fail_info="badRequest") == 2
    assert metric(text, "getcertd_authentications_total", backend="radius", result="reject") == 2
    assert metric(text, "getcertd_radius_timeouts_total", server="192.0.2.2:1812") == 4
    assert metric(text, "getcertd_radius_up", server="192.0.2.2:1812") == 0
    assert metric(text, "getcertd_radius_replies_total", server="192.0.2.1:1812", code="accept") == 6
    assert metric(text, "getcertd_radius_rtt_seconds_count", server="192.0.2.1:1812") == 1
    assert metric(text, "getcertd_http_request_duration_seconds_count", endpoint="scep") == 1
    assert metric(text, "getcertd_crl_age_seconds") == 90 and metric(text, "getcertd_uptime_seconds") == 90
    assert metric(text, "getcertd_events_total", event="something:else") == 1
    assert (snap["issued"], snap["refused"], snap["auth_failures"], snap["throttled"], snap["radius_timeouts"]) == \
        (1, {"badRequest": 2, "badAlg": 1}, 2, 1, 5)
    assert snap["uptime"] == 90 and snap["crl_number"] == crl.number and snap["log_records"] == 1
    report = repr(ns["stats"]())
    for needle in ("uptime           1m 30s", "issued           1 (default 1)",
                   "refused          badAlg 1, badRequest 2", "auth failures    2 (throttled: 1)",
                   "RADIUS timeouts  5", "issuance log     1 records"):
        assert needle in report, report
    view = repr(admin_ns.RadiusView(FakeRadius(), "radius"))
    assert re.search(r"192\.0\.2\.1:1812\s+up\s+2\s+0\s+10\s+3\s+6\s+2\s+1\s+1\s+0\s+12\.0 ms", view), view
    assert "dead (12 s more)" in view and "unknown sources dropped: 7" in view


def test_two_stats_do_not_share_a_registry():
    a, b = Stats(Clock()), Stats(Clock())
    a.count("issued", "default")
    assert b.snapshot()["issued"] == 0 and a.snapshot()["issued"] == 1


def test_radius_client_feeds_the_round_trip_histogram():
    from test_radius_protocol import ACCESS_ACCEPT, A, make, reply_to
    from getcertd.radius import RadiusAuthenticator
    proto, clock, transport = make()
    stats = Stats(clock, backend="radius", radius=proto)
    proto.rtt_observer = stats.observe_radius_rtt
    RadiusAuthenticator(proto).authenticate("alice", b"pw", None, "192.0.2.9")
    [(datagram, _)] = transport.written
    clock.advance(0.03)
    proto.datagramReceived(reply_to(datagram, ACCESS_ACCEPT), A)
    text = stats.metrics_text().decode()
    label = proto.status()["servers"][0]["server"]
    assert metric(text, "getcertd_radius_rtt_seconds_bucket", server=label, le="0.05") == 1
    assert metric(text, "getcertd_radius_rtt_seconds_bucket", server=label, le="0.025") == 0
    assert metric(text, "getcertd_radius_replies_total", server=label, code="accept") == 1


# -- the state_dir lock, the SSH host key, compaction ---------------------------------------------------

def test_state_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    lock = state.StateLock(str(tmp_path))
    lock.startService()
    with pytest.raises(state.StateDirBusy, match=rf"in use by the appliance \(pid {os.getpid()}\)"):
        state.lock_state_dir(str(tmp_path))
    with pytest.raises(state.StateDirBusy):
        state.StateLock(str(tmp_path))
    lock.stopService()
    fd = state.lock_state_dir(str(tmp_path), holder="getcertd-admin (pid 1)")
    with pytest.raises(state.StateDirBusy, match=r"getcertd-admin \(pid 1\)"):
        state.lock_state_dir(str(tmp_path))
    os.close(fd)


def test_ssh_host_key_is_made_once_0600(tmp_path):
    key = state.load_or_create_ssh_host_key(str(tmp_path))
    path = tmp_path / state.SSH_HOST_KEY
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert (tmp_path / (state.SSH_HOST_KEY + ".pub")).read_text().startswith("ssh-ed25519 ")
    again = state.load_or_create_ssh_host_key(str(tmp_path))
    raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert again.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        state.load_or_create_ssh_host_key(str(tmp_path))


def test_compaction_runs_after_ten_minutes_then_daily_on_the_clock(tmp_path):
    clock = Clock()
    clock.advance(T0)
    log = IssuanceLog()
    journal = Journal(str(tmp_path / "journal"), log, reactor=clock, run=sync)
    for serial, lifetime in ((1, HOUR), (2, 40 * 86400)):
        fired(journal.record_issue(Record(serial, "u", "p", "CN=u", "", "ec-p256", T0, T0 + lifetime, f"t{serial}",
                                          "c", "local", T0), b"\x30\x00"))
    service = CompactionService(journal, clock, retain=86400, monotonic=clock.seconds)
    service.startService()
    clock.advance(599)
    assert len(log) == 2
    clock.advance(1)  # the first compaction: nothing expired a day ago yet
    assert len(log) == 2
    clock.advance(86400)  # the second: serial 1 expired 23 h ago, kept
    assert len(log) == 2
    clock.advance(86400)
    assert [r.serial for r in log] == [2]
    again = IssuanceLog()
    replay(journal.path, again)
    assert [r.serial for r in again] == [2]
    service.stopService()
    assert not clock.getDelayedCalls()
    fired(journal.close())


def test_no_compaction_while_the_wall_clock_is_ahead_of_the_time_elapsed(tmp_path):
    """A clock set a month ahead by mistake: the record of a revoked certificate that is still valid must not
    be pruned (the CRL lists it from the log); once the clock is set right, compaction goes on."""
    clock = Clock()
    clock.advance(T0)
    step = [0.0]  # how far the wall clock was set ahead
    log = IssuanceLog()
    journal = Journal(str(tmp_path / "journal"), log, reactor=clock, run=sync)
    fired(journal.record_issue(Record(1, "u", "p", "CN=u", "", "ec-p256", T0, T0 + 8 * HOUR, "t1", "c", "local", T0),
                               b"\x30\x00"))
    service = CompactionService(journal, clock, retain=86400, monotonic=lambda: clock.seconds() - step[0])
    service.startService()
    clock.advance(600)
    step[0] = 31 * 86400
    clock.advance(step[0])
    fired(service.compact())
    assert [r.serial for r in log] == [1]  # kept, though "expired" 31 days ago by the clock
    step[0] = 0.0
    clock.advance(2 * 86400)  # the clock is right (in this test: 2 days later it really expired long ago)
    fired(service.compact())
    assert len(log) == 0
    service.stopService()
    fired(journal.close())


# -- the appliance's own certificates -----------------------------------------------------------------------

def test_the_ra_certificate_lasts_as_long_as_the_ca_and_a_shorter_one_is_replaced(tmp_path):
    """It is re-issued only at a start, so a running appliance must not see it expire (a 365-day one did: every
    SCEP client then refused the CertReps). An older, shorter one is re-issued at the next start, same key."""
    ca, config, now = _own_ca(tmp_path)
    ra_key, ra_cert = state.load_or_create_ra(config, ca, now)
    assert ra_cert.not_valid_after_utc == ca.not_after()
    short = ca.issue_ra(ra_key, now, datetime.timedelta(days=365))
    state.write_public(str(tmp_path / "ra.pem"), short.public_bytes(serialization.Encoding.PEM))
    again_key, again = state.load_or_create_ra(config, ca, now + datetime.timedelta(days=1))
    assert again.not_valid_after_utc == ca.not_after() and again != short
    assert again_key.private_numbers() == ra_key.private_numbers()
    assert state.load_or_create_ra(config, ca, now + datetime.timedelta(days=2))[1] == again  # kept once good


def test_the_tls_certificate_is_renewed_in_the_running_context(tmp_path):
    """90 days, renewed 14 days before its end by the daily check, in the SSL context new connections use (it
    used to be renewed only at a start: a running appliance served it expired)."""
    from OpenSSL import SSL
    from getcertd import tap
    ca, config, now = _own_ca(tmp_path)
    key, cert, chain = state.load_or_create_tls(config, ca, now)
    tls = tap.tls_options(key, cert, chain)
    served = {"TLS certificate": cert, "CA certificate": ca.certificate}

    def in_context():
        return SSL.Connection(tls.getContext(), None).get_certificate().to_cryptography()
    tap.check_certificates(config, ca, tls, served, now + datetime.timedelta(days=70))
    assert in_context() == cert and served["TLS certificate"] == cert  # not due yet
    tap.check_certificates(config, ca, tls, served, now + datetime.timedelta(days=80))
    renewed = served["TLS certificate"]
    assert renewed != cert and in_context() == renewed
    assert renewed.not_valid_after_utc > cert.not_valid_after_utc + datetime.timedelta(days=70)
    assert state.load_cert(str(tmp_path / "tls.pem"), "tls") == renewed  # and on disk, for the next start


def _own_ca(tmp_path):
    now = datetime.datetime.fromtimestamp(int(datetime.datetime.now(datetime.timezone.utc).timestamp()),
                                          datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    ca = CertificateAuthority(key, make_ca_certificate(key, "CN=Unit CA", now, datetime.timedelta(days=3650)))
    return ca, conf(f"[getcertd]\nstate_dir = {tmp_path}\nserver_name = vpn.example.org\n"), now


def test_certificates_about_to_expire_are_named():
    now = datetime.datetime(2026, 11, 28, tzinfo=datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())

    def lasting(days):
        return make_ca_certificate(key, "CN=x", now - datetime.timedelta(days=1), datetime.timedelta(days=days + 1))
    lines = state.expiry_warnings({"TLS certificate": lasting(10), "RA certificate": lasting(-0.5),
                                   "CA certificate": lasting(400)}, now)
    assert lines == ["the TLS certificate expires on 2026-12-08 00:00 UTC, in 10 days",
                     "the RA certificate expired on 2026-11-27 12:00 UTC"]


def test_a_lost_ca_key_is_not_replaced_by_a_new_ca(tmp_path):
    from twisted.logger import Logger
    config = conf(f"[getcertd]\nstate_dir = {tmp_path}\n")
    now = datetime.datetime.now(datetime.timezone.utc)
    first = state.load_or_create_ca(config, now, Logger())
    os.rename(tmp_path / "ca.key", tmp_path / "ca.key.elsewhere")
    with pytest.raises(ConfigError, match="the CA key .* is missing, but its certificate .* is there"):
        state.load_or_create_ca(config, now, Logger())
    assert x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes()) == first.certificate


def test_the_manhole_names_users_and_addresses_that_must_wait():
    from getcertd.admin_ns import ThrottleView
    from getcertd.auth import Throttle, throttle_key
    clock = Clock()
    users, addresses = Throttle(free=1), Throttle(free=1)
    view = ThrottleView(users, addresses, clock, throttle_key)
    assert repr(view) == "no user name or address must wait"
    users.failure("alice", 0)
    addresses.failure("192.0.2.7", 0)
    assert repr(view) == "user 'alice' must wait 1 s\naddress '192.0.2.7' must wait 1 s"
    assert view.clear("ALICE") == "'ALICE': failures of the user name forgotten"


def test_the_radius_secret_is_refused_where_other_users_can_read_it(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret\n")
    conf = tmp_path / "getcertd.ini"
    base = "[getcertd]\nstate_dir = /tmp/x\n[auth]\nbackend = radius\n[radius]\nservers = 127.0.0.1:1812\n"
    conf.write_text(base + f"secret_file = {secret}\n")
    for mode, refused in ((0o644, True), (0o640, True), (0o600, False)):
        secret.chmod(mode)
        if refused:
            with pytest.raises(ConfigError, match=rf"secret_file {secret} is readable by others \(mode {mode:o}\); "
                                                  rf"run: chmod 600"):
                state.load_config(str(conf))
        else:
            assert state.load_config(str(conf)).radius.secret == b"s3cret"
    conf.write_text(base + "secret = s3cret\n")
    for mode, refused in ((0o644, True), (0o640, False), (0o600, False)):
        conf.chmod(mode)
        if refused:
            with pytest.raises(ConfigError, match="holds the \\[radius\\] secret and every user can read it"):
                state.load_config(str(conf))
        else:
            assert state.load_config(str(conf)).radius.secret == b"s3cret"
