"""Start getcertd as a real `twistd` process on a free loopback port, for tests and the benchmark."""
import os
import signal
import socket
import subprocess
import sys
import time

BIN = os.path.dirname(sys.executable)


def tool(name):
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} is not installed next to {sys.executable}; run scripts/test")
    return path


def free_port(family=socket.AF_INET, kind=socket.SOCK_STREAM, host="127.0.0.1"):
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stat(pid):
    """The fields of /proc/PID/stat after the command name (state, parent pid, ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def running(pid):
    """Whether ``pid`` is a live process (a zombie waiting for its parent to reap it is not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children(pid):
    """The process IDs of ``pid``'s live children (getcertd's key helpers), from every /proc/N/stat: the kernel's
    /proc/PID/task/TID/children misses some while the process has other threads running."""
    found = []
    for name in os.listdir("/proc"):
        fields = _stat(name) if name.isdigit() else None
        if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(name))
    return sorted(found)


def add_user(users_file, user, password):
    p = subprocess.run([tool("getcertd-users"), "--file", users_file, "add", user], input=password + "\n",
                       capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr)


class Appliance:
    """A running `twistd -n getcertd`; ``sections`` maps INI sections to {key: value} overrides."""

    def __init__(self, directory, sections=None, users=None, http=False):
        self.dir = str(directory)
        self.port = free_port()
        self.http_port = free_port() if http else None
        self.users_file = os.path.join(self.dir, "users")
        self.state_dir = os.path.join(self.dir, "state")
        self.config_path = os.path.join(self.dir, "getcertd.ini")
        self.log_path = os.path.join(self.dir, "twistd.log")
        conf = {
            "getcertd": {"state_dir": self.state_dir, "server_name": "localhost"},
            "https": {"listen": f"tcp:{self.port}:interface=127.0.0.1"},
            "auth": {"backend": "local", "users": self.users_file},
        }
        if http:
            conf["http"] = {"listen": f"tcp:{self.http_port}:interface=127.0.0.1"}
        for section, values in (sections or {}).items():
            conf.setdefault(section, {}).update(values)
        with open(self.config_path, "w") as f:
            for section, values in conf.items():
                f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n")
        for user, password in (users or {}).items():
            add_user(self.users_file, user, password)
        if not os.path.exists(self.users_file):
            open(self.users_file, "w").close()
        self.proc = None

    @property
    def url(self):
        return f"https://localhost:{self.port}/scep"

    @property
    def http_url(self):
        return f"http://127.0.0.1:{self.http_port}/scep"

    @property
    def ca_pem(self):
        return os.path.join(self.state_dir, "ca.pem")

    def start(self, timeout=30, namespace_setup=None, wrapper=()):
        """Start twistd; with ``namespace_setup`` (a shell script), first run that script in a private mount
        namespace (`unshare -m`) and exec twistd there, with the same pid. ``wrapper``: a command that execs
        the rest (prlimit ... --, say)."""
        log = open(self.log_path, "ab")
        args = [tool("twistd"), "-n", "--pidfile", os.path.join(self.dir, "twistd.pid"), "getcertd",
                "--config", self.config_path]
        args = list(wrapper) + args
        if namespace_setup:
            args = ["unshare", "-m", "sh", "-c", namespace_setup + ' && exec "$@"', "sh"] + args
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("twistd did not listen in time: " + self.log()[-2000:])

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def getcert(self, user, password_lines, out, *extra, cafile=None, url=None, timeout=90):
        args = [tool("getcert"), "enroll", "--url", url or self.url, "--user", user, "--password-stdin",
                "--out", str(out)]
        args += ["--cafile", cafile or self.ca_pem] if "--ca-fingerprint" not in extra else []
        args += list(extra)
        return subprocess.run(args, input="".join(p + "\n" for p in password_lines), capture_output=True,
                              text=True, timeout=timeout)
