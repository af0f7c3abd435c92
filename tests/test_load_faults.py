"""Faults and load (issue 8): RADIUS slow, down, flapping or answering garbage under a load of concurrent
enrollments; 200 enrolling TLS clients beside 1,000 idle connections; no secret in any log line.

Everything runs on loopback against a real `twistd getcertd` and a real FreeRADIUS, with the UDP fault injector
of tests/faultproxy.py in between and the clients of tests/loadgen.py. Each test prints one ``FIGURES`` JSON
line (run with -s to see them); with GETCERTD_FIGURES=FILE they are also appended to FILE, one JSON object a line.
"""
import base64
import collections
import json
import os
import re
import resource
import secrets
import shutil
import time

import pytest
from cryptography.hazmat.primitives import serialization

from appliance import Appliance
from faultproxy import GARBAGE_KINDS, FaultProxy
from freeradius import DEFAULT_USERS, User, running_freeradius
from getcertd import scep
from getcertd.issuance import IssuanceLog
from getcertd.journal import replay
from loadgen import Heartbeat, Sampler, basic_header, build_messages, check_replies, rss_kib, run_load
from scepclient import Requester, basic, get_ca_certs, http, rsa_key

CONCURRENCY = 64
MESSAGES = 3000  # built once, before any clock, for all scenarios (each appliance has its own journal)
SCENARIO_SECONDS = 10.0
RADIUS_TIMEOUT, RADIUS_RETRIES, RADIUS_SERVERS = 1.0, 1, 2
# Longest a request may wait for RADIUS: every server tried, each sent to retries + 1 times.
RADIUS_BOUND = RADIUS_TIMEOUT * (RADIUS_RETRIES + 1) * RADIUS_SERVERS
MARGIN = 3.0  # the rest of an enrollment (crypto, journal fsync) on a loaded 2-core machine
HEARTBEAT_INTERVAL = 0.05
HEARTBEAT_P99 = 0.050

TLS_CLIENTS = 200
IDLE_CONNECTIONS = 1000
TLS_LOAD_SECONDS = 20.0
TLS_MESSAGES = 9000  # more than 200 back-to-back clients get through in 20 s (270 to 450/s on 2 cores)
RSS_PEAK_LIMIT_MIB = 400

# Accounts whose secrets are grepped for in the logs: distinctive, so that a hit is never a coincidence.
_R = secrets.token_hex(6)
PAT = User("pat", f"pat-pass-{_R}")
TOM = User("tom", f"tom-pass-{_R}", tokens=(f"tok1-{_R}", f"tok2-{_R}"),
           prompts=("Enter token code", "Enter second token code"))
CHALLENGE_PASSWORD = f"cp-pass-{_R}"
CPUSER = User("cpuser", CHALLENGE_PASSWORD)
USERS = DEFAULT_USERS + (PAT, TOM, CPUSER)

RUN_LOGS = []  # (label, twistd log path) of every appliance this module ran, for the log check at the end
KEYS = []  # every private key a client of this module used


def _figures(name, figures):
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print("FIGURES " + line)
    path = os.environ.get("GETCERTD_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def radius():
    with running_freeradius(users=USERS) as server:
        yield server


@pytest.fixture(scope="module")
def keys():
    KEYS[:] = [rsa_key() for _ in range(8)]
    return KEYS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("load")


@pytest.fixture(scope="module")
def template(workdir):
    """A state_dir (CA, RA and TLS keys and certificates) made once and copied into every appliance of this
    module, so that requests built once are good for all of them (each appliance has a journal of its own)."""
    (workdir / "template").mkdir()
    app = Appliance(workdir / "template", users={"alice": "alice-pass"})
    app.start()
    try:
        ca_certs = get_ca_certs(app.url, app.ca_pem)
    finally:
        assert app.stop() == 0
    RUN_LOGS.append(("template", app.log_path))
    for name in os.listdir(app.state_dir):
        if name.startswith("journal"):
            os.unlink(os.path.join(app.state_dir, name))
    return app.state_dir, ca_certs


class MessagePool:
    """PKCSReq messages for the template's RA, built before any clock starts and grown on demand."""

    def __init__(self, ca_certs, keys):
        self.ca_certs, self.keys, self.messages = ca_certs, keys, []

    def take(self, n):
        if len(self.messages) < n:
            self.messages += build_messages(self.ca_certs, self.keys, n - len(self.messages))
        return list(self.messages[:n])


@pytest.fixture(scope="module")
def pool(template, keys):
    return MessagePool(template[1], keys)


def appliance(workdir, template, name, sections, users=None, http=False):
    directory = workdir / name
    directory.mkdir()
    shutil.copytree(template[0], directory / "state")
    # every simulated client connects from 127.0.0.1: the per-address cap (tested in test_http_limits) goes up
    # to the total one
    https = sections.setdefault("https", {})
    https.setdefault("max_connections_per_address", https.get("max_connections", "1000"))
    app = Appliance(directory, sections, users or {}, http=http)
    RUN_LOGS.append((name, app.log_path))
    return app


def radius_sections(workdir, server, servers):
    secret_file = workdir / "radius-secret"
    if not secret_file.exists():
        secret_file.write_bytes(server.secret)
        os.chmod(secret_file, 0o600)
    return {"auth": {"backend": "radius", "users": ""},
            "radius": {"servers": servers, "secret_file": str(secret_file), "timeout": f"{RADIUS_TIMEOUT:.0f}s",
                       "retries": str(RADIUS_RETRIES)},
            "policy": {"max_valid_per_user": "0", "max_per_user_per_hour": "0"}}


def journal_serials(app):
    log = IssuanceLog()
    replay(os.path.join(app.state_dir, "journal"), log)
    return {r.serial for r in log}


def reported_drops(text):
    """Dropped RADIUS replies as the log tells them: lines, and lines plus the counts of those not logged."""
    lines = text.count("Dropped a reply from RADIUS server")
    more = sum(int(n) for n in re.findall(r"Dropped a reply from RADIUS server.*\((\d+) more dropped", text))
    more += sum(int(n) for n in re.findall(r"(\d+) more dropped replies from RADIUS servers were not logged", text))
    return {"lines": lines, "reported": lines + more}


def summary(values):
    return {"p50_s": round(sorted(values)[len(values) // 2], 3) if values else None,
            "max_s": round(max(values), 3) if values else None}


# ---------------------------------------------------------------------------------------------------
# 1. RADIUS faults under a load of concurrent enrollments
# ---------------------------------------------------------------------------------------------------

# Each client pauses 0.5 to 1.5 s between enrollments, so the offered load stays below what the appliance can
# sign: the heartbeat then measures blocking, not queueing. "saturated" is the reference without faults and
# without pauses (as many enrollments as the machine can sign): its heartbeat is reported, not held to 50 ms.
THINK = (0.5, 1.5)
SCENARIOS = {"slow": THINK, "down": THINK, "flap": THINK, "garbage": THINK, "saturated": None}
WRONG_PASSWORD_SOURCE = "127.0.0.2"  # the one worker with a wrong password has an address (and throttle) of its own


@pytest.mark.parametrize("mode", list(SCENARIOS))
def test_radius_faults_under_load(mode, workdir, template, pool, radius):
    proxy = FaultProxy(radius.address, radius.secret, ports=RADIUS_SERVERS).start()
    app = appliance(workdir, template, f"radius-{mode}", radius_sections(workdir, radius, proxy.servers))
    think = SCENARIOS[mode]
    try:
        app.start()
        messages = pool.take(MESSAGES)
        wrong = CONCURRENCY - 1 if mode == "garbage" else None  # a client whose password is wrong

        def headers_for(worker):
            return basic_header("erin", "not-erins-pass") if worker == wrong else basic_header("alice", "alice-pass")
        sources = ["127.0.0.1"] * (CONCURRENCY - 1) + [WRONG_PASSWORD_SOURCE if wrong else "127.0.0.1"]
        proxy.set_mode("pass" if mode == "saturated" else mode)
        heartbeat = Heartbeat(app.port, app.ca_pem, HEARTBEAT_INTERVAL).start()
        with Sampler(app.proc.pid) as rss:
            t0 = time.monotonic()
            report = run_load(app.port, app.ca_pem, messages, CONCURRENCY, SCENARIO_SECONDS, headers_for,
                              timeout=RADIUS_BOUND + 15, sources=sources, pause_after={"429": 0.5},
                              think=think)
            t1 = time.monotonic()
        heartbeat.stop()
        proxy.set_mode("pass")
        assert app.stop() == 0
    finally:
        proxy.stop()
        app.stop()
    text = app.log()

    mine = [r for r in report.results if r.worker != wrong]
    theirs = [r for r in report.results if r.worker == wrong]
    opened = check_replies(report)
    received = {cert.serial_number for _, cert in opened["SUCCESS"]}
    in_journal = journal_serials(app)
    beats = Heartbeat.summary(heartbeat.latencies(t0, t1))
    outcomes = report.outcomes()
    figures = {
        "scenario": mode, "clients": CONCURRENCY, "think_s": think, "seconds": round(report.duration, 1),
        "requests": len(report.results), "success": len(opened["SUCCESS"]),
        "per_second": round(len(opened["SUCCESS"]) / report.duration, 1),
        "outcomes": dict(outcomes), "latency": summary([r.elapsed for r in mine]),
        "deadline_s": RADIUS_BOUND + MARGIN, "heartbeat": beats, "heartbeat_errors": len(heartbeat.errors),
        "rss_mib": [round(rss.samples[0][1] / 1024, 1), round(rss.peak_rss() / 1024, 1)],
        # the reactor thread's CPU time, and its time runnable but waiting for a CPU (other processes)
        "reactor_thread_s": {"cpu": rss.reactor_cpu, "waiting_for_cpu": rss.reactor_runqueue_wait},
        "journal": {"records": len(in_journal), "received_missing": len(received - in_journal)},
        "proxy": dict(proxy.counters), "radius_drops": reported_drops(text),
        "messages_left": report.unused_messages,
    }
    if wrong is not None:
        figures["wrong_password"] = dict(collections.Counter(r.outcome for r in theirs))
    _figures(f"radius-{mode}", figures)

    # Succeeded (200 SUCCESS CertRep) or failed cleanly (503 with Retry-After) within the deadline; nothing else.
    assert {r.outcome for r in mine} <= {"200", "503"}, outcomes
    assert all(r.headers.get("retry-after") for r in mine if r.outcome == "503")
    assert all(b"authentication service is unavailable" in r.body for r in mine if r.outcome == "503")
    assert max(r.elapsed for r in mine) < RADIUS_BOUND + MARGIN, figures["latency"]
    assert set(opened) <= {"SUCCESS"} and len(opened["SUCCESS"]) == outcomes["200"]
    # The reactor never blocked.
    assert not heartbeat.errors, heartbeat.errors[:3]
    if think:
        assert beats["n"] >= 0.8 * (t1 - t0) / HEARTBEAT_INTERVAL, beats
        assert beats["p99_ms"] < HEARTBEAT_P99 * 1000, beats
    # Nothing handed out that the journal doesn't hold.
    assert received <= in_journal
    assert len(in_journal) == len(received)  # and nothing issued that nobody got: no client gave up
    assert "Traceback" not in text and "Unhandled" not in text

    ok = [r for r in mine if r.outcome == "200"]
    failed = [r for r in mine if r.outcome == "503"]
    if mode == "saturated":
        assert len(ok) == len(mine)
    elif mode == "slow":  # 0.5 to 2 s per reply: the retransmission or the other server answers in time
        assert len(ok) >= 0.95 * len(mine) and len(mine) >= 100
    elif mode == "down":  # every request waits for every server, then a clean 503
        assert not ok and len(failed) >= CONCURRENCY
        assert min(r.elapsed for r in failed) >= RADIUS_BOUND - 0.1
    elif mode == "flap":
        assert len(ok) >= 0.5 * len(mine)
    elif mode == "garbage":
        assert len(ok) >= 0.5 * len(mine)
        assert all(proxy.counters["garbage " + kind] for kind in GARBAGE_KINDS)
        # every forged datagram was dropped, and said so, in a bounded number of lines (loopback UDP may lose a few)
        assert figures["radius_drops"]["reported"] >= 0.95 * proxy.counters["garbage sent"]
        assert figures["radius_drops"]["lines"] <= 10 * (report.duration // 10 + 2) + 1
        # a forged Access-Accept never let a wrong password in
        assert theirs and {r.outcome for r in theirs} <= {"401", "429", "503"}, figures["wrong_password"]


def test_radius_down_with_more_requests_than_identifiers(workdir, template, pool, radius):
    """520 enrollments at once (connected first, then all sent together) against one RADIUS server that is down:
    more than twice its 256 identifiers, so most wait for one. Every one is a 503 within the bound of one server,
    timeout x (retries + 1), plus the margin (the waiting ones used to get a bound of their own per 256 ahead of
    them: 503s after 4 and 6 s)."""
    n = 520
    bound = RADIUS_TIMEOUT * (RADIUS_RETRIES + 1)
    proxy = FaultProxy(radius.address, radius.secret, ports=1).start()
    app = appliance(workdir, template, "radius-down-520", radius_sections(workdir, radius, proxy.servers))
    try:
        app.start()
        messages = pool.take(n)
        proxy.set_mode("down")
        heartbeat = Heartbeat(app.port, app.ca_pem, HEARTBEAT_INTERVAL).start()
        started = {}
        report = run_load(app.port, app.ca_pem, messages, n, 30.0, lambda w: basic_header("alice", "alice-pass"),
                          timeout=bound + 15, preconnect=True, per_worker=1,
                          on_started=lambda: started.update(t0=time.monotonic()))
        t1 = time.monotonic()
        heartbeat.stop()
        assert app.stop() == 0
    finally:
        proxy.stop()
        app.stop()
    outcomes = report.outcomes()
    figures = {"scenario": "down, 520 at once, 1 server", "requests": len(report.results), "outcomes": dict(outcomes),
               "latency": summary([r.elapsed for r in report.results]),
               "answer_time": summary([r.answer_time for r in report.results]),
               "connect": summary([r.connect for r in report.results]), "deadline_s": bound + MARGIN,
               "heartbeat": Heartbeat.summary(heartbeat.latencies(started["t0"], t1)), "proxy": dict(proxy.counters)}
    _figures("radius-down-520", figures)
    assert len(report.results) == n and set(outcomes) == {"503"}, outcomes
    assert all(r.headers.get("retry-after") for r in report.results)
    assert max(r.answer_time for r in report.results) < bound + MARGIN, figures
    assert "Traceback" not in app.log()


def _big_signer(key, size):
    """A self-signed requester certificate carrying ``size`` octets in an extension (a message near the 2 MiB cap)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "big")])
    now = datetime.datetime.now(datetime.timezone.utc)
    value = b"\x04\x83" + size.to_bytes(3, "big") + b"A" * size
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), value), False)
            .sign(key, hashes.SHA256()))


BIG_REQUESTS, BIG_RSS_LIMIT_MIB = 150, 320


def test_big_requests_while_radius_is_down_hold_bounded_memory(workdir, template, keys, radius):
    """150 requests of 1.9 MB at once while RADIUS is down: each waits the bound holding about twice its body,
    which took 437 MiB for 100 of them. The bytes held by requests in progress are capped (httpguard.MAX_HELD):
    past it a 503 with Retry-After. Every answer is a 503, memory stays under the limit."""
    from loadgen import Message
    from scepclient import csr_der
    proxy = FaultProxy(radius.address, radius.secret, ports=1).start()
    app = appliance(workdir, template, "radius-down-big", radius_sections(workdir, radius, proxy.servers))
    try:
        app.start()
        requester = Requester(template[1], key=keys[0], signer=_big_signer(keys[0], 1900 * 1000))
        inner = csr_der(keys[0])
        messages = []
        for _ in range(BIG_REQUESTS):
            der = requester.message(transaction_id=secrets.token_hex(16).upper(), inner=inner)
            messages.append(Message(requester, requester.tid, requester.nonce, der))
        proxy.set_mode("down")
        with Sampler(app.proc.pid, 0.1) as sampler:
            report = run_load(app.port, app.ca_pem, messages, BIG_REQUESTS, 30.0,
                              lambda w: basic_header("alice", "alice-pass"), timeout=30, preconnect=True, per_worker=1)
            time.sleep(0.5)
        assert app.stop() == 0
    finally:
        proxy.stop()
        app.stop()
    kinds = collections.Counter(r.body.split(b";")[0].decode() if r.outcome == "503" else r.outcome
                                for r in report.results)
    figures = {"requests": len(report.results), "message_bytes": len(messages[0].der), "answers": dict(kinds),
               "latency": summary([r.elapsed for r in report.results]),
               "rss_mib": [round(sampler.samples[0][1] / 1024, 1), round(sampler.peak_rss() / 1024, 1)]}
    _figures("radius-down-big-requests", figures)
    assert report.outcomes() == {"503": BIG_REQUESTS}, kinds
    assert all(r.headers.get("retry-after") for r in report.results)
    assert sampler.peak_rss() < BIG_RSS_LIMIT_MIB * 1024, figures
    assert "Traceback" not in app.log()


# ---------------------------------------------------------------------------------------------------
# 2. 200 enrolling TLS clients beside 1,000 idle connections
# ---------------------------------------------------------------------------------------------------

def _raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:  # twistd, started after this, inherits the limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, soft), max(need, hard)))
    except (ValueError, OSError):
        pytest.fail(f"needs {need} file descriptors, the limit is {soft}/{hard} and can't be raised")


def test_tls_clients_beside_idle_connections(workdir, template, pool):
    need = 2 * (TLS_CLIENTS + IDLE_CONNECTIONS) + 500
    _raise_fd_limit(need)
    app = appliance(workdir, template, "tls-load", {
        # room for every connection (the cap's 503 is tested in test_http_limits); no request deadline or idle
        # timeout within the run, so an idle connection is still idle at its end
        "https": {"max_connections": str(TLS_CLIENTS + IDLE_CONNECTIONS + 100), "request_timeout": "120s",
                  "idle_timeout": "120s"},
        "policy": {"max_valid_per_user": "0", "max_per_user_per_hour": "0"}}, users={"alice": "alice-pass"})
    try:
        app.start()
        messages = pool.take(TLS_MESSAGES)
        rss_before = rss_kib(app.proc.pid)
        started = {}
        heartbeat = Heartbeat(app.port, app.ca_pem, HEARTBEAT_INTERVAL).start()
        with Sampler(app.proc.pid) as sampler:
            report = run_load(app.port, app.ca_pem, messages, TLS_CLIENTS, TLS_LOAD_SECONDS,
                              lambda n: basic_header("alice", "alice-pass"), timeout=60, idle=IDLE_CONNECTIONS,
                              pause_after={"503": 0.5}, on_started=lambda: started.update(
                                  t0=time.monotonic(), rss=rss_kib(app.proc.pid)))
            t1 = time.monotonic()
            time.sleep(2)  # the server sees every close
        heartbeat.stop()
        rss_after = rss_kib(app.proc.pid)
        assert app.stop() == 0
    finally:
        app.stop()
    text = app.log()
    opened = check_replies(report)
    received = {cert.serial_number for _, cert in opened["SUCCESS"]}
    in_journal = journal_serials(app)
    outcomes = report.outcomes()
    during = [s for s in sampler.samples if s[0] >= started["t0"]]
    figures = {
        "clients": TLS_CLIENTS, "idle": IDLE_CONNECTIONS, "idle_opened": report.idle_opened,
        "idle_failed": dict(report.idle_failed), "idle_answers": dict(report.idle_answers),
        "seconds": round(report.duration, 1), "requests": len(report.results), "success": len(opened["SUCCESS"]),
        "per_second": round(len(opened["SUCCESS"]) / report.duration, 1), "outcomes": dict(outcomes),
        "latency": summary([r.elapsed for r in report.results]),
        "heartbeat": Heartbeat.summary(heartbeat.latencies(started["t0"], t1)),
        "rss_mib": {"before": round(rss_before / 1024, 1), "with_idle": round(started["rss"] / 1024, 1),
                    "peak": round(max(s[1] for s in during) / 1024, 1), "after": round(rss_after / 1024, 1)},
        "peak_fds": max(s[2] for s in during),
        "reactor_thread_s": {"cpu": sampler.reactor_cpu, "waiting_for_cpu": sampler.reactor_runqueue_wait},
        "journal": {"records": len(in_journal), "received_missing": len(received - in_journal)},
        "messages_left": report.unused_messages,
    }
    _figures("tls-load", figures)

    assert report.idle_opened == IDLE_CONNECTIONS and not report.idle_failed
    assert not report.idle_answers, "an idle connection was answered or cut during the run"
    # No error but the designed 503 (with Retry-After) past the connection cap, and no hang.
    assert set(outcomes) <= {"200", "503"}, outcomes
    assert all(r.headers.get("retry-after") for r in report.results if r.outcome == "503")
    assert set(opened) <= {"SUCCESS"} and len(opened["SUCCESS"]) == outcomes["200"] >= TLS_CLIENTS
    assert figures["peak_fds"] >= TLS_CLIENTS + IDLE_CONNECTIONS  # they really were all open at once
    # Memory bounded.
    assert max(s[1] for s in sampler.samples) < RSS_PEAK_LIMIT_MIB * 1024, figures["rss_mib"]
    # Every certificate handed out is in the journal.
    assert received <= in_journal and len(in_journal) == len(received)
    assert "Traceback" not in text and "Unhandled" not in text


# ---------------------------------------------------------------------------------------------------
# 3. No credential, challenge response, RADIUS secret or private key in any log line
# ---------------------------------------------------------------------------------------------------

def _pem_fragments(pem: bytes):
    """The base64 lines of a PEM private key (any one of them in a log would be a leak)."""
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----") and len(line) >= 24]


def _key_secrets(key):
    out = []
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        out += _pem_fragments(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    numbers = key.private_numbers()
    private = getattr(numbers, "d", None) or getattr(numbers, "private_value", None)
    out += [f"{private:x}"[:32], str(private)[:32]]
    return out


def test_no_secret_in_any_log(workdir, template, radius, keys):
    proxy = FaultProxy(radius.address, radius.secret, ports=1).start()
    app = appliance(workdir, template, "secrets", radius_sections(workdir, radius, proxy.servers), http=True)
    tokens = []
    try:
        app.start()
        certs = get_ca_certs(app.url, app.ca_pem)
        url = app.url + "?operation=PKIOperation"

        def post(requester, user, password, token=None, message=None):
            headers = basic(user, password)
            if token:
                headers["Getcertd-Challenge"] = token
            return http(url, data=message or requester.message(), cafile=app.ca_pem, headers=headers)

        # PAP, right and wrong
        r = Requester(certs, key=keys[0])
        status, _, body = post(r, PAT.name, PAT.password)
        assert status == 200 and r.open_reply(body)[0].pki_status == scep.PkiStatus.SUCCESS
        assert post(Requester(certs, key=keys[1]), PAT.name, PAT.password + "x")[0] == 401
        # challenge/response, two rounds, then a wrong token
        r = Requester(certs, key=keys[2])
        message = r.message()
        status, headers, body = post(r, TOM.name, TOM.password, message=message)
        assert status == 401 and headers.get("Getcertd-Challenge"), body
        for token in TOM.tokens:
            tokens.append(headers["Getcertd-Challenge"])
            status, headers, body = post(r, TOM.name, token, headers["Getcertd-Challenge"], message)
        assert status == 200 and r.open_reply(body)[0].pki_status == scep.PkiStatus.SUCCESS
        status, headers, _ = post(Requester(certs, key=keys[3]), TOM.name, TOM.password)
        tokens.append(headers["Getcertd-Challenge"])
        assert post(None, TOM.name, "tok-wrong", headers["Getcertd-Challenge"],
                    Requester(certs, key=keys[3]).message())[0] == 401
        # challengePassword in the CSR, over HTTP and HTTPS, right and wrong
        for base, cafile in ((app.http_url, None), (app.url, app.ca_pem)):
            for password, expected in ((CHALLENGE_PASSWORD, scep.PkiStatus.SUCCESS),
                                       (CHALLENGE_PASSWORD + "x", scep.PkiStatus.FAILURE)):
                r = Requester(certs, key=keys[4])  # a transactionID of its own: the same one would be a retry
                status, _, body = http(base + "?operation=PKIOperation", cafile=cafile,
                                       data=r.message(challenge=password, cn=CPUSER.name,
                                                      transaction_id=secrets.token_hex(16).upper()))
                assert status == 200 and r.open_reply(body)[0].pki_status == expected
        # and RADIUS answering garbage for a moment (the drop log lines)
        proxy.set_mode("garbage")
        r = Requester(certs, key=keys[5])
        status, _, _ = post(r, PAT.name, PAT.password)
        assert status in (200, 503)
        proxy.set_mode("pass")
    finally:
        proxy.stop()
        app.stop()

    needles = {
        "password": [u.password for u in USERS] + [CHALLENGE_PASSWORD + "x", PAT.password + "x", "not-erins-pass"],
        # (only the distinctive ones this module sends: the default users' six digits occur in hex serials by chance)
        "challenge response": list(TOM.tokens),
        "challenge token": tokens,
        "Basic credentials": [base64.b64encode(f"{u.name}:{u.password}".encode()).decode() for u in USERS],
        "RADIUS secret": [radius.secret.decode()],
        "private key": [],
    }
    for name in ("ca.key", "ra.key", "tls.key"):
        path = os.path.join(template[0], name)
        with open(path, "rb") as f:
            needles["private key"] += _pem_fragments(f.read())
    for key in KEYS:
        needles["private key"] += _key_secrets(key)
    assert len(needles["private key"]) > 100

    checked, found = [], []
    for label, path in RUN_LOGS:
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        checked.append((label, len(text)))
        if label == "secrets":  # the log is the one of the run above (so the search below is not vacuous)
            assert f"to {PAT.name!r}" in text and f"to {TOM.name!r}" in text and f"to {CPUSER.name!r}" in text
        for kind, values in needles.items():
            for value in values:
                if value and value in text:
                    found.append((label, kind))
    _figures("secrets-in-logs", {"logs": len(checked), "bytes": sum(n for _, n in checked),
                                 "needles": {k: len(v) for k, v in needles.items()}, "found": len(found)})
    assert any(label == "secrets" for label, _ in checked)
    assert not found, found
