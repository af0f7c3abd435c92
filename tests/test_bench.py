"""scripts/bench --quick runs end to end (a real twistd with local accounts and with FreeRADIUS, the load
process, the CertRep checks, the issuance-log measurements) and writes bench.json of the documented shape.

Only the shape is checked, not speed: the numbers depend on the machine and its other load.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(value):
    return isinstance(value, (int, float)) and value > 0


def test_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=dict(os.environ, GETCERTD_BENCH_NO_REEXEC="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| backend | connections | enrollments/s |" in p.stdout
    r = json.loads(out.read_text())

    bound = r["bound"]
    assert all(_positive(v) for v in bound["rsa_private_ops_us"].values())
    for key in ("one_core_enrollments_per_second", "local_one_core_enrollments_per_second",
                "local_scrypt_one_core_enrollments_per_second", "password_scrypt_ms", "password_cache_hit_us"):
        assert _positive(bound[key]), key

    for backend in ("local", "radius"):
        b = r[backend]
        assert [row["connections"] for row in b["levels"]] == [1, 4, 16, 64]
        for row in b["levels"] + [b["half_peak"]]:
            for key in ("enrollments_per_second", "p50_ms", "p95_ms", "p99_ms", "server_cpu_ms_per_enrollment"):
                assert _positive(row[key]), (backend, row["connections"], key)
            assert row["errors"] == 0
            assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
            # the appliance's own histograms: every timed answer, and the journal commits that recorded them
            assert row["server_answers"] == row["requests"] and 0 <= row["server_answers_over_20ms"] <= row[
                "server_answers"]
            assert 0 < row["journal_commits"] <= row["requests"] and 0 <= row["journal_commits_over_20ms"] <= row[
                "journal_commits"]
        assert _positive(b["half_peak"]["offered_rate"])
        assert _positive(b["bound"]) and _positive(b["ratio"]) and _positive(b["ratio_against_run_bound"])
        for row in b["levels"]:  # each level against the bound measured around it
            assert _positive(row["bound_nearby"])
            assert abs(row["ratio"] - row["enrollments_per_second"] / row["bound_nearby"]) < 0.01
        assert b["ratio"] == max(row["ratio"] for row in b["levels"])
        assert b["best_enrollments_per_second"] == max(row["enrollments_per_second"] for row in b["levels"])
        assert b["errors"] == 0 and b["checked_replies"] > 0
        assert b["serials_unique"] is True and b["serials_decoded"] == b["checked_replies"]
        assert b["journal_serials_unique"] is True and b["journal_records"] >= b["serials_decoded"]

    for n in ("100000", "1000000"):
        assert _positive(r["memory_bytes_per_record"][n])
    assert _positive(r["replay"]["records_per_second"])
    assert _positive(r["replay"]["from_checkpoint"]["records_per_second"])
    assert _positive(r["replay"]["from_checkpoint"]["bytes_per_record"])
    for n in ("10000", "100000"):
        assert _positive(r["crl_build"][n]["seconds"])
