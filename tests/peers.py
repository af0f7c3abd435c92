"""Helpers to run real SCEP clients (strongSwan pki, certmonger) against a test appliance.

No client is ever skipped: a missing one fails the test with the package to install (scripts/test installs
them). Nothing outside the test's directories is changed: HTTPS trust goes through a bind mount of the
appliance's CA over the system bundle inside a private mount namespace, and certmonger runs on a private
D-Bus with private state, in its own PID namespace, and is killed by pid afterwards.

Run as a script, ``python tests/peers.py TABLE.json`` prints the interoperability table recorded by the
interop tests (GETCERTD_INTEROP_TABLE=TABLE.json) as Markdown.
"""
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PKI_PLUGINS = ("random nonce aes rc2 sha1 sha2 md5 mgf1 x509 revocation constraints pubkey pkcs1 pkcs7 pkcs8 "
               "pkcs12 pem openssl gmp curl")  # 5.9.8 has no separate "des" plugin: openssl does 3DES
CERTMONGER = "/usr/sbin/certmonger"
CERTMONGER_GETCERT = "/usr/bin/getcert"  # certmonger's, not our .venv/bin/getcert
SCEP_SUBMIT = "/usr/lib/certmonger/scep-submit"
PACKAGES = ("strongswan-pki libstrongswan-extra-plugins libstrongswan-standard-plugins certmonger dbus "
            "util-linux")


def require(path_or_name: str, package: str) -> str:
    """The absolute path of a tool, or fail (never skip) naming the Debian package that provides it."""
    path = path_or_name if os.path.isabs(path_or_name) else shutil.which(path_or_name)
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"{path_or_name} is missing: install the Debian package {package} (scripts/test installs "
                    f"{PACKAGES}); interop tests never skip", pytrace=False)
    return path


def dpkg_version(package: str) -> str:
    p = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else "unknown"


def namespaced(cmd: list, *, bundle: str = None, pid: bool = False) -> list:
    """``cmd`` under unshare: with ``bundle``, in a private mount namespace where the system CA bundle is that
    file (nothing changes outside); with ``pid``, in a new PID namespace, so nothing it forks outlives it."""
    require("unshare", "util-linux")
    flags = [] if os.geteuid() == 0 else ["-r"]
    if pid:
        flags += ["--pid", "--fork", "--kill-child"]
    if bundle is None:
        return ["unshare", *flags, *cmd]
    if not os.path.exists(SYSTEM_BUNDLE):
        pytest.fail(f"{SYSTEM_BUNDLE} is missing (package ca-certificates): it is the bind-mount target", pytrace=False)
    return ["unshare", *flags, "-m", "sh", "-c", f'mount --bind "$0" {SYSTEM_BUNDLE} && exec "$@"', bundle, *cmd]


# --- strongSwan pki -------------------------------------------------------------------------------------------

class Pki:
    """strongSwan's `pki` with a private strongswan.conf (a quiet, fixed plugin list)."""

    def __init__(self, directory):
        self.path = require("pki", "strongswan-pki")
        self.conf = os.path.join(str(directory), "strongswan.conf")
        with open(self.conf, "w") as f:
            f.write("pki {\n  load = " + PKI_PLUGINS + "\n}\n")
        banner = self.run("-h").stdout
        m = re.search(r"strongSwan (\S+) PKI tool", banner)
        self.version = m.group(1) if m else "unknown"
        loaded = re.search(r"loaded plugins: (.*)", banner)
        loaded = loaded.group(1).split() if loaded else []
        for plugin, package in (("curl", "libstrongswan-extra-plugins"), ("openssl", "libstrongswan-standard-plugins")):
            if plugin not in loaded:
                pytest.fail(f"strongSwan's {plugin} plugin did not load: install {package}", pytrace=False)

    def describe(self) -> str:
        return f"strongSwan pki {self.version} (Debian {dpkg_version('strongswan-pki')})"

    def gen_rsa(self, path) -> str:
        """A new RSA-2048 key (DER) at ``path``: `pki --scep` takes RSA keys only."""
        p = subprocess.run([self.path, "--gen", "--type", "rsa", "--size", "2048"], capture_output=True,
                           env={**os.environ, "STRONGSWAN_CONF": self.conf}, timeout=30)
        assert p.returncode == 0, p.stderr
        with open(path, "wb") as f:
            f.write(p.stdout)
        return str(path)

    def run(self, *args, bundle=None, timeout=30) -> subprocess.CompletedProcess:
        cmd = [self.path, *args]
        if bundle is not None:
            cmd = namespaced(cmd, bundle=bundle)
        return subprocess.run(cmd, env={**os.environ, "STRONGSWAN_CONF": self.conf}, capture_output=True,
                              text=True, timeout=timeout)


# --- certmonger -----------------------------------------------------------------------------------------------

def tree_state(path: str) -> list:
    """(path, size, mtime_ns) of everything under ``path``, to show that nothing was written there."""
    found = []
    for root, dirs, files in os.walk(path):
        for name in [""] + dirs + files:
            p = os.path.join(root, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(p)
                found.append((p, st.st_size, st.st_mtime_ns))
    return sorted(found)


def session_members(sid: int) -> list:
    """Live (non-zombie) processes of session ``sid``, read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout=5.0) -> list:
    """SIGKILL every process of session ``sid`` by pid; returns the pids that had to be killed."""
    killed = []
    deadline = time.monotonic() + timeout
    while True:
        pids = session_members(sid)
        if not pids:
            return killed
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of session {sid} survived SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)


class CertmongerResult:
    def __init__(self, returncode, output, cert_path, leftovers):
        self.returncode = returncode
        self.output = output
        self.cert_path = cert_path
        self.leftovers = leftovers  # pids still alive after the run, killed by us

    def chosen(self, what: str) -> str:
        """What certmonger picked from GetCACaps: chosen("AES") -> "AES256", chosen("SHA") -> "SHA-256"."""
        if what == "AES":
            m = re.search(r"Server supports AES, using (\S+?)\.", self.output)
        else:
            m = re.search(r"Server supports (SHA-\d+), using that", self.output)
        return m.group(1) if m else "?"


def certmonger_version() -> str:
    return f"certmonger {dpkg_version('certmonger')}"


def certmonger_enroll(directory, url: str, *, subject: str, challenge: str, ca_pem: str,
                      bundle: str = None, resubmit: bool = False, timeout=40) -> CertmongerResult:
    """Enroll with a private certmonger daemon; returns when the daemon and all it spawned are gone.

    With ``resubmit``, the first certificate is copied to first.pem and then renewed with `getcert resubmit`
    (same key: certmonger signs that PKCSReq with the certificate it holds, under the same transactionID).

    The daemon runs in a new session and PID namespace (so nothing it forks can outlive it); afterwards every
    process left in the session is killed by pid. ``bundle`` replaces the system CA bundle for the daemon's
    HTTPS requests (certmonger's -R covers only its first request).
    """
    require(CERTMONGER, "certmonger")
    require(CERTMONGER_GETCERT, "certmonger")
    require("dbus-run-session", "dbus")
    d = str(directory)
    env = dict(os.environ)
    for var, sub in (("CERTMONGER_CAS_DIR", "cas"), ("CERTMONGER_REQUESTS_DIR", "requests"),
                     ("CERTMONGER_CONFIG_DIR", "config"), ("CERTMONGER_LOCAL_CA_DIR", "local"),
                     ("CERTMONGER_TMPDIR", "tmp")):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
        env[var] = os.path.join(d, sub)
    env["CERTMONGER_SYSTEM_LOCK_FILE"] = os.path.join(d, "lock")
    key, cert = os.path.join(d, "key.pem"), os.path.join(d, "cert.pem")
    q = shlex.quote
    add = f"{CERTMONGER_GETCERT} add-scep-ca -s -c getcertd-test -u {q(url)}"
    if url.startswith("https:"):
        add += f" -R {q(ca_pem)}"
    script = os.path.join(d, "enroll.sh")
    with open(script, "w") as f:
        f.write(f"{add} || exit 1\n"
                f"{CERTMONGER_GETCERT} request -s -c getcertd-test -k {q(key)} -f {q(cert)} -N {q(subject)} "
                f"-L {q(challenge)} -w\n"
                "rc=$?\n")
        if resubmit:
            f.write(f"[ $rc = 0 ] && cp {q(cert)} {q(os.path.join(d, 'first.pem'))} && "
                    f"{CERTMONGER_GETCERT} resubmit -s -f {q(cert)} -w\n"
                    "rc=$?\n")
        f.write(f"{CERTMONGER_GETCERT} list -s\n"
                "exit $rc\n")
    daemon = ["dbus-run-session", "--", CERTMONGER, "-s", "-n", "-d", "1", "-c", "sh " + q(script)]
    proc = subprocess.Popen(namespaced(daemon, bundle=bundle, pid=True), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=d)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        output, _ = proc.communicate()
        raise AssertionError(f"certmonger did not finish in {timeout}s:\n{output[-3000:]}")
    finally:
        leftovers = kill_session(proc.pid)
    return CertmongerResult(proc.returncode, output, cert, leftovers)


# --- the interoperability table -------------------------------------------------------------------------------

COLUMNS = ("client", "version", "transport", "auth", "cipher/digest", "result")


@contextlib.contextmanager
def interop_row(client: str, version: str, transport: str, auth: str, cipher: str = ""):
    """Record one row of the interop table (GETCERTD_INTEROP_TABLE) whether the test passes or fails.

    The test may fill in row["cipher/digest"] and row["result"] (default "pass") as it learns them.
    """
    row = {"client": client, "version": version, "transport": transport, "auth": auth, "cipher/digest": cipher,
           "result": "pass"}
    try:
        yield row
    except BaseException as e:
        row["result"] = "FAIL: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise
    finally:
        _append_row(row)


def _append_row(row: dict) -> None:
    path = os.environ.get("GETCERTD_INTEROP_TABLE")
    if not path:
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        rows = json.loads(text) if text.strip() else []
        rows.append(row)
        f.seek(0)
        f.truncate()
        json.dump(rows, f, indent=1)
        f.write("\n")


def markdown_table(rows: list) -> str:
    """The rows as a Markdown table; a later row for the same client/transport/auth/cipher replaces an earlier one."""
    latest = {}
    for row in rows:
        latest[tuple(row[c] for c in COLUMNS[:5] if c != "version")] = row
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in latest.values():
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/peers.py TABLE.json")
    with open(sys.argv[1]) as f:
        sys.stdout.write(markdown_table(json.load(f)))
