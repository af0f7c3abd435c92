"""getcertd-users: manage the local accounts file (salted scrypt hashes)."""
import argparse
import getpass
import sys

from getcertd.local import format_users, hash_password, parse_users
from getcertd.policy import MAX_USER_LENGTH
from getcertd.state import write_file


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return parse_users(f.read())
    except FileNotFoundError:
        return {}


def _write(path, users):
    write_file(path, format_users(users).encode("utf-8"), 0o600)


def _password():
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise SystemExit("getcertd-users: the passwords differ")
        return first
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def _not_in_a_name(c: str) -> bool:
    """C0, DEL and C1 controls and the Unicode line breaks: the users file is lines (a bidi control is allowed:
    the policy puts the whole name in one CN value)."""
    return ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029"


def main(argv=None):
    try:
        return _main(argv)
    except OSError as e:
        raise SystemExit(f"getcertd-users: {e.filename or ''}: {e.strerror or e}")
    except UnicodeError:
        raise SystemExit("getcertd-users: the user name or the file is not valid UTF-8")


def _main(argv):
    ap = argparse.ArgumentParser(prog="getcertd-users", description=__doc__)
    ap.add_argument("--file", required=True, help="the users file named by [auth] users")
    sub = ap.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a user or change a password (read from standard input when not a terminal)")
    add.add_argument("user")
    rm = sub.add_parser("remove", help="remove a user")
    rm.add_argument("user")
    sub.add_parser("list", help="list the users")
    args = ap.parse_args(argv)
    try:
        users = _read(args.file)
    except ValueError as e:
        raise SystemExit(f"getcertd-users: {args.file}: {e}")
    if args.command == "list":
        for user in sorted(users):
            print(user)
        return 0
    user = args.user
    if args.command == "remove":
        if users.pop(user, None) is None:
            raise SystemExit(f"getcertd-users: no user {user!r}")
        _write(args.file, users)
        return 0
    if not user or len(user) > MAX_USER_LENGTH or any(_not_in_a_name(c) for c in user) or user.startswith("#") \
            or user != user.strip():
        raise SystemExit(f"getcertd-users: user names are 1 to {MAX_USER_LENGTH} printable characters")
    password = _password()
    if not password:
        raise SystemExit("getcertd-users: empty password")
    users[user] = hash_password(password.encode("utf-8"))
    _write(args.file, users)
    return 0


if __name__ == "__main__":
    sys.exit(main())
