#!/usr/bin/env python
"""Measure the issuance log, journal replay and CRL building (numbers for the design targets).

    .venv/bin/python scripts/measure_log.py [--records 100000,1000000] [--replay 200000,1000000] [--crl 10000,100000]

Targets: <= 1 KiB of memory per record at 1,000,000 records; replay >= 200,000 records/s;
a CRL with 100,000 entries built in <= 1 s. Prints one line per measurement (and JSON with --json).
"""
import argparse
import datetime
import gc
import hashlib
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from getcertd.crl import build_crl  # noqa: E402
from getcertd.issuance import IssuanceLog, Record  # noqa: E402
from getcertd.journal import CHECKPOINT_SUFFIX, Journal, encode_event, issue_event, replay, revoke_event  # noqa
from twisted.internet import defer  # noqa: E402

T0 = 1_780_000_000


def make_records(n, users, rnd):
    """Records like a busy appliance's: 8-hour certificates, ``users`` distinct users, one every 2 s."""
    for i in range(n):
        user = f"user{i % users:07d}"
        now = T0 + i * 2
        yield Record(rnd.getrandbits(127) | 1, user, "vpn", f"CN={user},OU=VPN Users,O=Example Corp",
                     f"email:{user}@example.com", "ec-p256", now - 300, now + 8 * 3600,
                     hashlib.sha256(i.to_bytes(8, "big")).hexdigest().upper(),
                     f"198.51.{(i >> 8) & 255}.{i & 255}", "radius-pap", now, offset=i * 1700)


def memory_per_record(n, users):
    rnd = random.Random(1)
    gc.collect()
    tracemalloc.start()
    log = IssuanceLog()
    before = tracemalloc.get_traced_memory()[0]
    for record in make_records(n, users, rnd):
        log.add(record)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(log) == n
    return (after - before) / n


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_per_record_rss(n, users):
    """Like memory_per_record, but by the growth of a fresh process's resident set (much faster than tracemalloc
    at a million records; includes allocator overhead and the generator's transient garbage that was kept)."""
    import subprocess
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", str(n), str(users)],
                         check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def _rss_child(n, users):
    rnd = random.Random(1)
    records = make_records(n, users, rnd)
    log = IssuanceLog()
    log.add(next(records))
    gc.collect()
    gc.disable()
    before = _rss_bytes()
    for record in records:
        log.add(record)
    after = _rss_bytes()
    assert len(log) == n
    print((after - before) / (n - 1))


def make_ca(kind="ec"):
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Measure CA")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def replay_rate(n, users):
    key, cert = make_ca("rsa")  # an RSA-2048-signed certificate, about 1 KB of DER per line, as a worst case
    der = cert.public_bytes(__import__("cryptography.hazmat.primitives.serialization",
                                       fromlist=["Encoding"]).Encoding.DER)
    rnd = random.Random(2)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "journal")
        with open(path, "wb") as f:
            for i, record in enumerate(make_records(n, users, rnd)):
                f.write(encode_event(issue_event(record, der)))
                if i % 100 == 0:
                    f.write(encode_event(revoke_event(record.serial, 1, record.issued_at + 60)))
        size = os.path.getsize(path)
        with open(path, "rb") as f:  # warm the page cache: measure parsing, not the disk
            while f.read(1 << 24):
                pass

        def timed():
            walls, cpus = [], []
            for _ in range(3):  # the first run also pays for getting fresh memory from the OS, as at start-up
                log = IssuanceLog()
                gc.collect()
                t, c = time.perf_counter(), time.process_time()
                count = replay(path, log)
                walls.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
                t = time.perf_counter()
                gc.collect()
                pause = time.perf_counter() - t
                rows = log.rows()
                del log
            return {"first": n / walls[0], "best": n / min(walls), "cpu": n / min(cpus), "count": count,
                    "pause": pause}, rows

        out, rows = timed()
        out.update(line=size / n, der=len(der))
        # A clean stop writes a checkpoint (the appliance's [log] checkpoint_records); the next start reads it.
        log = IssuanceLog()
        replay(path, log)
        t = time.perf_counter()
        Journal(path, log, run=lambda f, *args: defer.maybeDeferred(f, *args), checkpoint_records=1).close()
        write = time.perf_counter() - t
        del log
        gc.collect()
        checkpoint, again = timed()
        assert checkpoint["count"] == n and again == rows, "the checkpoint did not give the replayed log back"
        checkpoint.update(write_seconds=write, bytes_per_record=os.path.getsize(path + CHECKPOINT_SUFFIX) / n)
        out["checkpoint"] = checkpoint
        return out


def crl_time(n, kind):
    key, cert = make_ca(kind)
    rnd = random.Random(3)
    revoked = [(rnd.getrandbits(127) | 1, T0 + i, (1, 4, 5, 0)[i % 4]) for i in range(n)]
    this_update = datetime.datetime.fromtimestamp(T0 + n, datetime.timezone.utc)
    t = time.perf_counter()
    c = time.process_time()
    der = build_crl(key, cert, revoked, 7, this_update, this_update + datetime.timedelta(days=1))
    elapsed = time.perf_counter() - t
    cpu = time.process_time() - c
    crl = x509.load_der_x509_crl(der)
    assert len(crl) == n and crl.is_signature_valid(key.public_key())
    return elapsed, cpu, len(der)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--rss-child":
        return _rss_child(int(sys.argv[2]), int(sys.argv[3]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", default="100000,1000000", help="memory: record counts (comma-separated)")
    p.add_argument("--users", type=int, default=0, help="distinct users (0: one per record, the worst case)")
    p.add_argument("--replay", default="200000,1000000", help="replay: journal record counts")
    p.add_argument("--crl", default="10000,100000", help="CRL: entry counts")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    results = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other work on the machine skews wall times)")
    for n in [int(x) for x in a.records.split(",") if x]:
        for users in ([a.users] if a.users else [n, max(n // 50, 1)]):
            b = memory_per_record(n, users)
            results[f"memory_bytes_per_record_{n}_records_{users}_users"] = round(b, 1)
            print(f"memory: {n:>9,} records, {users:>9,} users: {b:7.1f} bytes/record (tracemalloc)", flush=True)
    for n in [int(x) for x in a.replay.split(",") if x]:
        r = replay_rate(n, max(n // 50, 1))
        c = r["checkpoint"]
        results[f"replay_records_per_second_{n}"] = {k: round(r[k]) for k in ("first", "best", "cpu")}
        results[f"checkpoint_records_per_second_{n}"] = {k: round(c[k]) for k in ("first", "best", "cpu")}
        results[f"full_gc_seconds_{n}"] = round(r["pause"], 3)
        print(f"replay: {n:,} issue + {r['count'] - n:,} revoke events, {r['line']:.0f} bytes/line ({r['der']} B "
              f"DER): {r['first']:,.0f} records/s first run, {r['best']:,.0f} best, {r['cpu']:,.0f} per CPU second; "
              f"a full gc.collect() then takes {r['pause']:.2f} s", flush=True)
        print(f"  from a checkpoint ({c['bytes_per_record']:.0f} bytes/record, written in {c['write_seconds']:.2f} s):"
              f" {c['first']:,.0f} records/s first run, {c['best']:,.0f} best, {c['cpu']:,.0f} per CPU second",
              flush=True)
    for n in [int(x) for x in a.crl.split(",") if x]:
        for kind in ("ec", "rsa"):
            elapsed, cpu, size = crl_time(n, kind)
            results[f"crl_build_seconds_{n}_{kind}"] = {"wall": round(elapsed, 4), "cpu": round(cpu, 4)}
            print(f"crl: {n:>7,} entries, {kind:3} CA key: {elapsed:.3f} s ({cpu:.3f} s CPU), {size:,} bytes",
                  flush=True)
    if a.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
