"""getcertd-admin: the issuance journal of a stopped appliance, for scripts and recovery.

    getcertd-admin (--state-dir DIR | --config FILE) list [--user USER]
    getcertd-admin (--state-dir DIR | --config FILE) revoke (SERIAL | --user USER) [--reason REASON]
    getcertd-admin (--state-dir DIR | --config FILE) crl [--out FILE] [--der]

``revoke`` and ``crl`` take the state_dir lock that a running appliance holds, so they refuse while it runs
(use the SSH manhole then); ``list`` only reads and works either way. A revocation made here is on the CRL
the appliance publishes when it starts; ``crl`` writes one now, with the next CRL number.
"""
import argparse
import datetime
import os
import sys
import time

from twisted.internet import defer
from twisted.python.failure import Failure

from getcertd import state
from getcertd.crl import CrlPublisher
from getcertd.errors import ConfigError, StorageUnavailable
from getcertd.issuance import CRL_REASONS, IssuanceLog, check_reason
from getcertd.journal import Journal, replay
from getcertd.operations import NothingToRevoke, format_serial, parse_serial, revoke

_UTC = datetime.timezone.utc
DEFAULT_CRL_INTERVAL = 3600
DEFAULT_CRL_LIFETIME = 86400


class _WallClock:
    """The admin tool is an edge: it reads the wall clock here and passes it in."""

    def seconds(self):
        return time.time()


def _iso(t):
    return "-" if t is None else datetime.datetime.fromtimestamp(t, _UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _state(record, now):
    if record.revoked_at is not None:
        return "revoked"
    if record.not_after <= now:
        return "expired"
    if record.not_before > now:
        return "not-yet-valid"
    return "valid"


def format_record(record, now) -> str:
    """One line, tab separated: serial (hex, as openssl x509 -serial), state, user, profile, notBefore,
    notAfter, revocation (time and reason, or -), auth method, client, subject."""
    if record.revoked_at is not None:
        revocation = f"{_iso(record.revoked_at)}/{CRL_REASONS.get(record.revocation_reason, record.revocation_reason)}"
    else:
        revocation = "-"
    fields = (format_serial(record.serial), _state(record, now), record.user, record.profile,
              _iso(record.not_before), _iso(record.not_after), revocation, record.auth_method, record.client,
              record.subject)
    return "\t".join(str(f).replace("\t", " ").replace("\n", " ") for f in fields)


def _sync(f, *args):
    return defer.maybeDeferred(f, *args)


def _result(d):
    """The result of a Deferred that has already fired (everything here runs synchronously)."""
    out = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("an operation did not complete synchronously")
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class _Context:
    def __init__(self, args):
        self.config = None
        if args.config:
            self.config = state.load_config(args.config)
        elif not args.state_dir:
            raise ConfigError("--state-dir: empty")
        self.state_dir = args.state_dir or self.config.state_dir
        if not os.path.isdir(self.state_dir):
            raise ConfigError(f"{self.state_dir}: no such state directory")
        self.journal_path = os.path.join(self.state_dir, "journal")
        self.log = IssuanceLog()
        self.lock = None

    def take_lock(self):
        try:
            self.lock = state.lock_state_dir(self.state_dir, holder=f"getcertd-admin (pid {os.getpid()})")
        except state.StateDirBusy as e:
            raise ConfigError(f"{e}: stop the appliance first, or use the SSH manhole") from None

    def replay(self):
        replay(self.journal_path, self.log)
        return self.log

    def ca(self):
        from getcertd.ca import CertificateAuthority
        passphrase = state.read_passphrase(self.config.ca_key_passphrase_file) if self.config else None
        if self.config is not None and self.config.ca_certificate:
            key = state.load_key(self.config.ca_key, "[ca] key", passphrase)
            cert = state.load_cert(self.config.ca_certificate, "[ca] certificate")
        else:
            key_path = os.path.join(self.state_dir, "ca.key")
            if not os.path.exists(key_path):
                raise ConfigError(f"no CA key in {self.state_dir}: give --config with the [ca] certificate and key")
            key = state.load_key(key_path, "CA key", passphrase)
            cert = state.load_cert(os.path.join(self.state_dir, "ca.pem"), "CA certificate")
        return CertificateAuthority(key, cert)


def cmd_list(ctx, args, out):
    if _appliance_running(ctx.state_dir):
        sys.stderr.write("getcertd-admin: the appliance is running: this is its journal as written so far\n")
    log = ctx.replay()
    now = int(time.time())
    records = log.by_user(args.user) if args.user else log
    for record in records:
        out.write(format_record(record, now) + "\n")
    return 0


def cmd_revoke(ctx, args, out):
    ctx.take_lock()
    reason = args.reason
    try:
        reason = check_reason(reason)
    except ValueError as e:
        raise ConfigError(f"{e}; reasons: {', '.join(CRL_REASONS.values())}") from None
    serial = None
    if args.serial is not None:
        try:
            serial = parse_serial(args.serial)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    ctx.replay()
    journal = Journal(ctx.journal_path, ctx.log, reactor=_WallClock(), run=_sync)
    now = int(time.time())
    try:
        records, _info = _result(revoke(journal, None, now, serial=serial, user=args.user, reason=reason))
    except NothingToRevoke as e:
        sys.stderr.write(f"getcertd-admin: {e}\n")
        return 1
    finally:
        _result(journal.close())
    for record in records:
        out.write(format_record(record, now) + "\n")
    sys.stderr.write(f"revoked {len(records)} certificate{'s' if len(records) != 1 else ''}; the appliance "
                     "publishes a CRL listing them when it starts (or run: getcertd-admin crl)\n")
    return 0


def cmd_crl(ctx, args, out):
    if args.out not in (None, "-"):  # before a CRL number is spent on it
        if os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise ConfigError(f"--out {args.out}: not a file in an existing directory")
    ctx.take_lock()
    ca = ctx.ca()
    ctx.replay()
    interval = ctx.config.crl_interval if ctx.config else DEFAULT_CRL_INTERVAL
    lifetime = ctx.config.crl_lifetime if ctx.config else DEFAULT_CRL_LIFETIME
    publisher = CrlPublisher(ca, ctx.state_dir, ctx.log, _WallClock(), interval=interval, lifetime=lifetime)
    info = _result(publisher.publish())
    if not isinstance(info, dict):  # the publisher hands a failed generation's Failure to its waiters
        info.raiseException()
    body = publisher.der if args.der else publisher.pem
    if args.out in (None, "-"):
        (out.buffer if hasattr(out, "buffer") else out).write(body)
    else:
        state.write_public(args.out, body)
    sys.stderr.write(f"CRL {info['number']}: {info['entries']} entries, next update "
                     f"{info['next_update']:%Y-%m-%d %H:%M:%S} UTC\n")
    return 0


def _appliance_running(state_dir) -> bool:
    try:
        fd = state.lock_state_dir(state_dir)
    except state.StateDirBusy:
        return True
    except ConfigError:
        return False
    os.close(fd)
    return False


def parser():
    p = argparse.ArgumentParser(prog="getcertd-admin", description="Inspect and change a stopped getcertd's "
                                "issuance journal (the running appliance: use the SSH manhole).")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", help="the appliance's state_dir")
    where.add_argument("--config", help="the appliance's configuration (for state_dir, the CA and [crl])")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="one record a line: serial (hex, as openssl x509 -serial), state, user, "
                                     "profile, notBefore, notAfter, revocation, auth, client, subject (tab separated)")
    ls.add_argument("--user")
    rv = sub.add_parser("revoke", help="revoke a certificate by serial (hex), or every valid one of --user")
    target = rv.add_mutually_exclusive_group(required=True)
    target.add_argument("serial", nargs="?", help="hexadecimal, as getcertd-admin list or openssl x509 -serial "
                                                  "prints it")
    target.add_argument("--user")
    rv.add_argument("--reason", default="unspecified",
                    help="a CRLReason name or code: " + ", ".join(f"{n} ({c})" for c, n in CRL_REASONS.items()))
    crl = sub.add_parser("crl", help="sign a fresh CRL (the next CRL number) and write it out")
    crl.add_argument("--out", help="the file to write (default: standard output)")
    crl.add_argument("--der", action="store_true", help="DER instead of PEM")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    commands = {"list": cmd_list, "revoke": cmd_revoke, "crl": cmd_crl}
    try:
        return commands[args.command](_Context(args), args, sys.stdout)
    except (ConfigError, StorageUnavailable) as e:
        sys.stderr.write(f"getcertd-admin: {e}\n")
        return 2
    except BrokenPipeError:
        return 0
    except OSError as e:
        sys.stderr.write(f"getcertd-admin: {e.filename or ''}: {e.strerror or e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
