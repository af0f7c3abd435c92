import os
import stat
import subprocess

from twisted.internet.task import Clock

from appliance import tool
from getcertd.auth import Accept, Reject
from getcertd.local import LocalAuthenticator, hash_password, parse_users, verify_password


def test_hash_is_salted_scrypt_never_plain():
    a, b = hash_password(b"secret"), hash_password(b"secret")
    assert a != b and a.startswith("$scrypt$") and "secret" not in a
    assert verify_password(b"secret", a) and not verify_password(b"Secret", a)
    assert not verify_password(b"secret", "$scrypt$n=2,r=1,p=1$bad$")


def _run(*args, stdin=""):
    return subprocess.run([tool("getcertd-users"), *args], input=stdin, capture_output=True, text=True)


def test_getcertd_users_add_list_remove(tmp_path):
    f = str(tmp_path / "users")
    assert _run("--file", f, "add", "alice", stdin="pw one\n").returncode == 0
    assert _run("--file", f, "add", "bob@example.com", stdin="pw two\n").returncode == 0
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    text = open(f).read()
    assert "pw one" not in text and "pw two" not in text
    assert _run("--file", f, "list").stdout.split() == ["alice", "bob@example.com"]
    assert verify_password(b"pw one", parse_users(text)["alice"])
    assert _run("--file", f, "remove", "alice").returncode == 0
    assert _run("--file", f, "list").stdout.split() == ["bob@example.com"]
    bad = _run("--file", f, "remove", "nosuch")
    assert bad.returncode != 0 and "no user" in bad.stderr
    assert _run("--file", f, "add", "evil\tname", stdin="x\n").returncode != 0


def _sync(f, *a):
    from twisted.internet.defer import succeed
    return succeed(f(*a))


def _result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


def test_local_authenticator_accepts_rejects_and_caches():
    users = {"alice": hash_password(b"right")}
    calls = []

    def counting(f, *a):
        calls.append(a)
        return _sync(f, *a)
    clock = Clock()
    auth = LocalAuthenticator(lambda: users, clock, cache_ttl=60, defer_to_thread=counting)
    r = _result(auth.authenticate("alice", b"right", None, "127.0.0.1"))
    assert isinstance(r, Accept) and r.identity.user == "alice" and r.identity.method == "local"
    assert isinstance(_result(auth.authenticate("alice", b"wrong", None, "127.0.0.1")), Reject)
    assert isinstance(_result(auth.authenticate("nobody", b"right", None, "127.0.0.1")), Reject)
    assert len(calls) == 3  # an unknown user costs a hash too: no timing oracle
    assert isinstance(_result(auth.authenticate("alice", b"right", None, "127.0.0.1")), Accept)
    assert len(calls) == 3  # served from the cache
    clock.advance(61)
    assert isinstance(_result(auth.authenticate("alice", b"right", None, "127.0.0.1")), Accept)
    assert len(calls) == 4
    users["alice"] = hash_password(b"changed")
    assert isinstance(_result(auth.authenticate("alice", b"right", None, "127.0.0.1")), Reject)


def test_names_that_would_break_the_file_are_refused_and_a_line_is_a_line(tmp_path):
    """U+0085, U+2028 and U+2029 end a line for str.splitlines(): a name holding one, once written, made the file
    unreadable, and every local login failed (HTTP 500). They are refused now (with the other C1 controls), and
    a file that holds one anyway
    (written by hand) is read line by line on \\n."""
    f = str(tmp_path / "users")
    assert _run("--file", f, "add", "alice", stdin="pw\n").returncode == 0
    for name in ("bob\x85x", "bob\u2028x", "bob\u2029x", "bob\x9bx"):
        p = _run("--file", f, "add", name, stdin="pw\n")
        assert p.returncode != 0 and "printable" in p.stderr, name
    assert _run("--file", f, "list").stdout.split() == ["alice"]
    encoded = hash_password(b"pw")
    assert parse_users(f"carol\u2028x:{encoded}\nalice:{encoded}\n") == {"carol\u2028x": encoded, "alice": encoded}


def test_a_broken_users_file_is_503_not_500_and_logged_once():
    from getcertd.errors import AuthUnavailable, ConfigError

    def broken():
        raise ConfigError("/etc/getcertd/users: line 2: expected USER:$scrypt$...")
    auth = LocalAuthenticator(broken, Clock(), defer_to_thread=_sync)
    for _ in range(2):
        failure = _result(auth.authenticate("alice", b"pw", None, "127.0.0.1"))
        assert failure.check(AuthUnavailable)


def test_getcertd_users_bad_places_are_one_line(tmp_path):
    for args in (["--file", str(tmp_path / "nodir" / "users"), "add", "alice"], ["--file", str(tmp_path), "list"],
                 ["--file", str(tmp_path), "add", "alice"]):
        p = _run(*args, stdin="pw\n")
        assert p.returncode != 0 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (args, p.stderr)


def test_a_missing_users_file_is_said_at_start_and_at_login_and_read_once_created(appliance_factory):
    """A users file path with a typo, or accounts not yet created: every login was a silent 401 (an empty
    account list). It is now a warning at start, a 503 and an error in the log at login, and it is read as
    soon as getcertd-users creates it."""
    from scepclient import Requester, basic, get_ca_certs, http
    app = appliance_factory(start=False)
    os.unlink(app.users_file)
    app.start()
    assert f"local accounts: {app.users_file} does not exist (create accounts with getcertd-users add)" in app.log()
    r = Requester(get_ca_certs(app.url, app.ca_pem))

    def login():
        return http(app.url + "?operation=PKIOperation", data=r.message(), cafile=app.ca_pem,
                    headers=basic("alice", "pw1"))
    status, _, body = login()
    assert status == 503 and body.count(b"\n") == 1, body
    assert "every login fails until it is mended" in app.log().split("does not exist", 1)[1]
    from appliance import add_user
    add_user(app.users_file, "alice", "pw1")
    status, _, body = login()
    assert status == 200 and r.open_reply(body)[0].pki_status.name == "SUCCESS"
