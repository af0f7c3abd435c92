"""Bounded coverage-guided fuzzing runs of scripts/fuzz (atheris) for CI: 30 s on the CMS parser, 15 s on the
differential check of its fast DER walkers, 10 s on each of the others, from the generated seed corpus. A
crash (any exception other than the target's typed errors) fails the test, names the saved input, and
belongs in tests/test_fuzz_regressions.py with a fix.

The long run is by hand: `scripts/fuzz scep -runs=1000000` (see SECURITY.md for the last figures).
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "scripts", "fuzz")

try:
    import atheris  # noqa: F401
except ImportError:  # pragma: no cover - atheris comes with the test extras
    atheris = None
pytestmark = pytest.mark.skipif(atheris is None, reason="atheris is not installed: pip install '.[test]'")


def fuzz(tmp_path, target, *options):
    corpus = tmp_path / "corpus"
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    p = subprocess.run([sys.executable, FUZZ, target, f"-artifact_prefix={artifacts}/", "-print_final_stats=1",
                        *options, str(corpus)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "GETCERTD_FUZZ_NO_REEXEC": "1"})
    crashes = sorted(os.listdir(artifacts))
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", p.stderr)
    rate = re.search(r"stat::average_exec_per_sec:\s*(\d+)", p.stderr)
    cov = re.findall(r"cov: (\d+)", p.stderr)
    return p, crashes, int(runs.group(1)) if runs else 0, int(rate.group(1)) if rate else 0, \
        int(cov[-1]) if cov else 0


@pytest.mark.parametrize("target, seconds, minimum_runs", [
    ("scep", 30, 5000), ("scep-diff", 15, 5000), ("query", 10, 20000), ("radius", 10, 5000), ("config", 10, 3000)])
def test_bounded_fuzz_run_finds_no_crash(tmp_path, target, seconds, minimum_runs):
    p, crashes, runs, rate, cov = fuzz(tmp_path, target, f"-max_total_time={seconds}")
    print(f"fuzz {target}: {runs} runs in {seconds} s ({rate}/s), coverage {cov} edges, {len(crashes)} crashes")
    tail = "\n".join((p.stdout + p.stderr).splitlines()[-40:])
    assert not crashes and p.returncode == 0, f"crash saved as {crashes}:\n{tail}"
    assert runs >= minimum_runs, tail
    assert len(os.listdir(tmp_path / "corpus")) > 3  # the seeds, and what the run added


def test_a_planted_fault_is_caught_and_saved(tmp_path):
    """The harness itself: an input that makes the target raise an untyped exception is reported as a crash,
    written to the artifact directory, and exits non-zero; replaying the saved input does the same."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "planted").write_bytes(b"CRASH")
    p, crashes, _, _, _ = fuzz(tmp_path, "selftest", "-runs=100")
    assert p.returncode != 0 and len(crashes) == 1 and crashes[0].startswith("crash-"), p.stderr[-2000:]
    assert "planted fault" in p.stdout + p.stderr  # atheris prints the Python traceback on stdout
    saved = tmp_path / "artifacts" / crashes[0]
    assert saved.read_bytes() == b"CRASH"
    replay = subprocess.run([sys.executable, FUZZ, "selftest", str(saved)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "GETCERTD_FUZZ_NO_REEXEC": "1"})
    assert replay.returncode != 0 and "planted fault" in replay.stdout + replay.stderr
