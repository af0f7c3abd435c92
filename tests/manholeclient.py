"""Drive the getcertd SSH manhole with the real OpenSSH client (`ssh -tt` on a pseudo-terminal)."""
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

_ANSI = re.compile(rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78DEHMcZ])")
PROMPT = ">>> "


def ssh_command(port, key, user="admin", *extra):
    return ["ssh", "-tt", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-F", "/dev/null",
            "-i", str(key), "-p", str(port), *extra, f"{user}@127.0.0.1"]


def ssh_keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", os.path.basename(str(path)), "-f",
                    str(path)], check=True)
    return path


class ManholeSession:
    """An interactive `ssh -tt` session; :meth:`run` types a line and returns the text up to the next prompt."""

    def __init__(self, port, key, user="admin", timeout=30):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(ssh_command(port, key, user), stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.fd = master
        self.raw = b""
        self.pos = 0  # where the next expect() starts looking, in text()
        self.login_seconds = None
        self.expect(re.escape(PROMPT), timeout)
        self.login_seconds = time.monotonic() - self.started

    def text(self) -> str:
        return _ANSI.sub(b"", self.raw).replace(b"\r", b"").decode("utf-8", "replace")

    def _read(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: ssh exited
            data = b""
        if not data:
            raise EOFError("ssh exited: " + self.text()[-500:])
        self.raw += data
        return True

    def expect(self, pattern, timeout=30):
        """Wait for ``pattern`` (a regex) after the last match; the match object."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.S)
        while True:
            m = regex.search(self.text(), self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {pattern!r} in: {self.text()[self.pos:][-1500:]!r}")
            self._read(min(left, 0.5))

    def run(self, line, timeout=30) -> str:
        """Type ``line``; the output it printed up to the next prompt (without the echo and the prompt)."""
        os.write(self.fd, line.encode() + b"\r")
        # the manhole redraws the whole line (prompt included) at each key: the last redraw, then the output
        m = self.expect(re.escape(PROMPT + line) + r"\n(.*?)" + re.escape(PROMPT), timeout)
        return m.group(1).rstrip("\n")

    def close(self):
        try:
            os.write(self.fd, b"\x04")  # Ctrl-D on an empty line leaves the manhole
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        finally:
            os.close(self.fd)
