"""The embedded default behind the README's first Quick start command: a demo config, a local account,
a generated CA; prints how to enroll, then runs `twistd -n getcertd` in the foreground."""
import argparse
import datetime
import os
import secrets
import shlex
import shutil
import sys

from twisted.logger import Logger

from getcertd import state
from getcertd.ca import fingerprint
from getcertd.local import format_users, hash_password, parse_users

DEMO_INI = """# getcertd demo configuration (see etc/getcertd.ini for every key)
[getcertd]
state_dir = {dir}/state
server_name = localhost

[https]
listen = tcp:{port}:interface=127.0.0.1

[auth]
backend = local
users = {dir}/users

[policy]
lifetime = 1h
"""


def main(argv=None):
    ap = argparse.ArgumentParser(prog="getcertd-demo")
    ap.add_argument("--dir", default="demo")
    ap.add_argument("--port", type=int, help="HTTPS port on 127.0.0.1 (8443 the first time; given again, it "
                                             "replaces the one in DIR/getcertd.ini)")
    ap.add_argument("--no-run", action="store_true", help="prepare and print, don't start twistd")
    args = ap.parse_args(argv)
    d = os.path.abspath(args.dir)
    os.makedirs(d, mode=0o700, exist_ok=True)
    ini = os.path.join(d, "getcertd.ini")
    if not os.path.exists(ini) or args.port is not None:
        with open(ini, "w") as f:
            f.write(DEMO_INI.format(dir=d, port=args.port or 8443))
    config = state.load_config(ini)
    users_path, pw_path = os.path.join(d, "users"), os.path.join(d, "demo-password")
    users = parse_users(open(users_path).read()) if os.path.exists(users_path) else {}
    if "demo" not in users or not os.path.exists(pw_path):
        password = secrets.token_urlsafe(12)
        state.write_private(pw_path, password.encode() + b"\n")
        users["demo"] = hash_password(password.encode())
        state.write_private(users_path, format_users(users).encode())
    state.ensure_state_dir(config.state_dir)
    ca = state.load_or_create_ca(config, datetime.datetime.now(datetime.timezone.utc), Logger())
    fp = fingerprint(ca.certificate).replace(":", "").lower()
    port = config.https_listen.split(":")[1]
    bindir = os.path.dirname(sys.executable)
    url = f"https://localhost:{port}/scep"
    q = shlex.quote
    print(f"""
getcertd demo
  SCEP URL:        {url}
  CA:              {ca.certificate.subject.rfc4514_string()}
  CA fingerprint:  sha256:{fp}
  account:         demo (password in {pw_path})
Enroll from another terminal:
  {q(os.path.join(bindir, "getcert"))} enroll --url {url} --user demo --password-stdin --ca-fingerprint sha256:{fp} \\
      --out {q(os.path.join(d, "client"))} < {q(pw_path)}
Starting: twistd -n getcertd --config {q(ini)}   (Ctrl-C stops it)
""", flush=True)
    if args.no_run:
        return 0
    twistd = os.path.join(bindir, "twistd")
    if not os.path.exists(twistd):
        twistd = shutil.which("twistd")
    os.execv(twistd, [twistd, "-n", "--pidfile", os.path.join(d, "twistd.pid"), "getcertd", "--config", ini])


if __name__ == "__main__":
    sys.exit(main())
