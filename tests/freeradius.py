"""Run a private FreeRADIUS 3.2 server for tests and benchmarks.

Plain functions and one context manager, no pytest dependency. Tests import it as ``freeradius``
(pytest puts tests/ on sys.path, like ``appliance``); a script puts tests/ on sys.path first::

    from freeradius import running_freeradius

    with running_freeradius() as server:        # FreeRadiusServer
        server.host, server.port, server.secret  # "127.0.0.1", free UDP port, bytes
        server.address                           # (host, port), ready for RadiusSettings.servers
    # the process is stopped (by its pid) and the temporary directory removed

The server is ``freeradius -f -l stdout -d DIR`` with a self-contained configuration written by
:func:`write_config`: one client 127.0.0.1 with ``require_message_authenticator = yes``, one auth
listener on 127.0.0.1, every reply (Accept, Reject, Challenge) signed with a Message-Authenticator,
``reject_delay = 0`` so rejects come back at once. Users are :data:`DEFAULT_USERS` unless others are
passed; see :class:`User`. If ``freeradius`` is not installed, :class:`FreeRadiusNotInstalled` is raised
(tests must fail on it, not skip: CI installs the package).
"""
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

READY_LINE = "Ready to process requests"


class FreeRadiusNotInstalled(RuntimeError):
    """The freeradius binary is missing."""


class FreeRadiusFailed(RuntimeError):
    """FreeRADIUS did not start (the message carries the tail of its log)."""


@dataclass(frozen=True)
class User:
    """A test account.

    ``password`` is checked first (PAP). With ``tokens``, a right password gets an Access-Challenge with
    Reply-Message ``prompts[0]`` and a State; each response must carry that State and the next token;
    after the last token the user is accepted. ``reply`` holds the attributes of the Access-Accept as
    (FreeRADIUS attribute name, value in FreeRADIUS syntax), e.g. ("Session-Timeout", "600").
    """
    name: str
    password: str
    tokens: Tuple[str, ...] = ()
    prompts: Tuple[str, ...] = ()
    reply: Tuple[Tuple[str, str], ...] = ()
    rechallenge: bool = False  # a wrong token gets another Access-Challenge ("try again"), not an Access-Reject


DEFAULT_USERS: Tuple[User, ...] = (
    # plain PAP
    User("alice", "alice-pass"),
    # password, then one challenge round
    User("bob", "bob-pass", tokens=("123456",), prompts=("Enter token code",)),
    # password, then two challenge rounds
    User("carol", "carol-pass", tokens=("111111", "222222"),
         prompts=("Enter token code", "Enter second token code")),
    # Accept carries Session-Timeout and Class
    User("dave", "dave-pass", reply=(("Session-Timeout", "600"), ("Class", '"ikev2-short"'))),
    # a password longer than one 16-octet block (RFC 2865 5.2 chaining)
    User("erin", "erin-has-a-much-longer-password-0123456789"),
    # Accept carries Filter-Id
    User("frank", "frank-pass", reply=(("Filter-Id", '"vpn-users"'),)),
    # an Accept with a Class of the server's own first (as Microsoft NPS adds) and two Session-Timeouts
    User("hank", "hank-pass", reply=(("Class", "0x00014e50530001"), ("Class", '"ikev2-short"'),
                                     ("Session-Timeout", "7200"), ("Session-Timeout", "300"))),
    # a directory that ignores case: the Accept names the user as it knows them
    User("IVAN", "ivan-pass", reply=(("User-Name", '"ivan"'),)),
    # a token server that answers a wrong code with another challenge
    User("gina", "gina-pass", tokens=("777777",), prompts=("Enter token code",), rechallenge=True),
)


@dataclass
class FreeRadiusServer:
    """A running server: where it listens, its secret, its process and log."""
    host: str
    port: int
    secret: bytes
    config_dir: str
    process: subprocess.Popen
    log_path: str

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    @property
    def pid(self) -> int:
        return self.process.pid

    def secret_file(self) -> str:
        """The shared secret in a 0600 file for the appliance's ``[radius] secret_file``; it lives in the server's
        config directory, so it goes when the server does."""
        path = os.path.join(self.config_dir, "client-secret")
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.secret)
        return path

    def log(self) -> str:
        """Everything the server has logged so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def freeradius_binary() -> str:
    """Path of the freeradius binary, or raise FreeRadiusNotInstalled."""
    for name in ("freeradius", "radiusd"):
        path = shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)), None)
        if path:
            return path
    raise FreeRadiusNotInstalled(
        "freeradius is not installed: the RADIUS integration tests need it "
        "(Debian: apt-get install freeradius freeradius-utils)")


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free a moment ago."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _quote(value: str) -> str:
    if any(c in value for c in '"\\\n\r'):
        raise ValueError(f"unsupported character in {value!r}")
    return f'"{value}"'


def _users_file(users: Sequence[User]) -> str:
    lines = []
    for user in users:
        if user.tokens:
            continue  # handled in unlang
        lines.append(f"{user.name}\tCleartext-Password := {_quote(user.password)}")
        if user.reply:
            lines.append(",\n".join(f"\t{name} += {value}" for name, value in user.reply))
        lines.append("")
    return "\n".join(lines) + "\n"


def _challenge_unlang(user: User) -> str:
    """Password, then one challenge per token; the round lives in session-state, keyed by State."""
    if len(user.prompts) != len(user.tokens):
        raise ValueError(f"user {user.name}: one prompt per token")
    out = [f"if (&User-Name == {_quote(user.name)}) {{",
           "    if (!&State) {",
           f"        if (&User-Password == {_quote(user.password)}) {{",
           "            update session-state { &Tmp-Integer-0 := 1 }",
           f"            update reply {{ &Reply-Message := {_quote(user.prompts[0])} }}",
           "            update control { &Response-Packet-Type := Access-Challenge }",
           "            handled",
           "        }",
           "        reject",
           "    }"]
    for i, token in enumerate(user.tokens, start=1):
        out.append(f"    elsif (&session-state:Tmp-Integer-0 == {i} && &User-Password == {_quote(token)}) {{")
        if i < len(user.tokens):
            out += [f"        update session-state {{ &Tmp-Integer-0 := {i + 1} }}",
                    f"        update reply {{ &Reply-Message := {_quote(user.prompts[i])} }}",
                    "        update control { &Response-Packet-Type := Access-Challenge }",
                    "        handled"]
        else:
            if user.reply:
                out.append("        update reply {")
                out += [f"            &{name} := {value}" for name, value in user.reply]
                out.append("        }")
            out += ["        update control { &Auth-Type := Accept }",
                    "        ok"]
        out.append("    }")
    if user.rechallenge:
        out += ["    elsif (&session-state:Tmp-Integer-0) {",
                "        update session-state { &Tmp-Integer-0 := &session-state:Tmp-Integer-0 }",
                '        update reply { &Reply-Message := "Wrong code, try again" }',
                "        update control { &Response-Packet-Type := Access-Challenge }",
                "        handled",
                "    }"]
    out += ["    else {",
            "        reject",
            "    }",
            "}"]
    return "\n".join(out)


def write_config(directory: str, port: int, secret: bytes, users: Sequence[User] = DEFAULT_USERS,
                 host: str = "127.0.0.1", require_message_authenticator: bool = True,
                 sign_replies: bool = True) -> None:
    """Write a self-contained FreeRADIUS configuration (radiusd.conf + users) into ``directory``."""
    secret_text = secret.decode("ascii")
    challenge_users = [u for u in users if u.tokens]
    blocks = []
    for n, user in enumerate(challenge_users):
        blocks.append(("" if n == 0 else "els") + _challenge_unlang(user))
    dispatch = "\n".join(blocks)
    if dispatch:
        dispatch += "\nelse {\n    files\n    pap\n}"
    else:
        dispatch = "files\npap"
    dispatch = "\n".join("        " + line for line in dispatch.splitlines())
    sign = "        update reply { &Message-Authenticator := 0x00 }\n" if sign_replies else ""
    conf = f"""\
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = {directory}
sbindir = /usr/sbin
logdir = {directory}
raddbdir = {directory}
radacctdir = {directory}
name = freeradius
confdir = {directory}
modconfdir = {directory}
run_dir = {directory}
db_dir = {directory}
libdir = /usr/lib/freeradius
pidfile = {directory}/radiusd.pid
max_request_time = 30
cleanup_delay = 5
max_requests = 16384
hostname_lookups = no

log {{
    destination = stdout
    auth = no
}}

security {{
    allow_core_dumps = no
    max_attributes = 200
    reject_delay = 0
    status_server = yes
}}

thread pool {{
    start_servers = 2
    max_servers = 8
    min_spare_servers = 1
    max_spare_servers = 4
    max_requests_per_server = 0
}}

client getcertd {{
    ipaddr = {host}
    secret = {_quote(secret_text)}
    require_message_authenticator = {"yes" if require_message_authenticator else "no"}
}}

modules {{
    pap {{
    }}
    files {{
        filename = ${{confdir}}/users
    }}
    always ok {{
        rcode = ok
    }}
    always handled {{
        rcode = handled
    }}
    always reject {{
        rcode = reject
    }}
}}

server default {{
    listen {{
        type = auth
        ipaddr = {host}
        port = {port}
    }}
    authorize {{
{sign}{dispatch}
    }}
    authenticate {{
        Auth-Type PAP {{
            pap
        }}
    }}
    post-auth {{
        ok
    }}
}}
"""
    os.chmod(directory, 0o755)
    for name, text in (("radiusd.conf", conf), ("users", _users_file(users))):
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o644)


def start_freeradius(directory: str, port: int, secret: bytes, users: Sequence[User] = DEFAULT_USERS,
                     host: str = "127.0.0.1", ready_timeout: float = 15.0, **config) -> FreeRadiusServer:
    """Write the configuration into ``directory``, start FreeRADIUS, wait for its ready line.

    Raises FreeRadiusNotInstalled or FreeRadiusFailed (the process is stopped first).
    """
    binary = freeradius_binary()
    write_config(directory, port, secret, users, host=host, **config)
    log_path = os.path.join(directory, "radiusd.log")
    log_file = open(log_path, "wb")
    try:
        process = subprocess.Popen([binary, "-f", "-l", "stdout", "-d", directory],
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    finally:
        log_file.close()
    server = FreeRadiusServer(host, port, secret, directory, process, log_path)
    deadline = time.monotonic() + ready_timeout
    while True:
        text = server.log()
        if READY_LINE in text:
            return server
        if process.poll() is not None or time.monotonic() > deadline:
            stop_freeradius(server)
            tail = "\n".join(server.log().splitlines()[-30:])
            raise FreeRadiusFailed(f"FreeRADIUS (pid {process.pid}) did not become ready "
                                   f"(exit status {process.returncode}); log:\n{tail}")
        time.sleep(0.02)


def stop_freeradius(server: FreeRadiusServer, timeout: float = 5.0) -> None:
    """Stop the server process by its pid (TERM, then KILL)."""
    process = server.process
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout)


@contextlib.contextmanager
def running_freeradius(users: Sequence[User] = DEFAULT_USERS, secret: Optional[bytes] = None,
                       host: str = "127.0.0.1", port: Optional[int] = None,
                       **config) -> Iterator[FreeRadiusServer]:
    """Start a private FreeRADIUS in a temporary directory; stop it and remove the directory on exit.

    ``secret`` defaults to a random one; ``port`` to a free UDP port (retried if the port was taken
    in between). Extra keyword arguments go to :func:`write_config`
    (``require_message_authenticator``, ``sign_replies``).
    """
    if secret is None:
        secret = secrets.token_hex(12).encode("ascii")
    directory = tempfile.mkdtemp(prefix="getcertd-freeradius-")
    try:
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            try:
                server = start_freeradius(directory, port or free_udp_port(host), secret, users,
                                          host=host, **config)
                break
            except FreeRadiusFailed:
                if attempt == attempts - 1:
                    raise
        try:
            yield server
        finally:
            stop_freeradius(server)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def default_users() -> List[User]:
    """The accounts :data:`DEFAULT_USERS` defines, as a list (handy for benchmarks)."""
    return list(DEFAULT_USERS)
