"""Key material in state_dir: loaded or generated at start. Called only from the composition root (tap.py).

state_dir is 0700 and key files 0600; the appliance refuses to start with a CA or RA key that others can read.
"""
import datetime
import fcntl
import os
import stat
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application import service
from twisted.logger import Logger

from getcertd.ca import (CertificateAuthority, ca_certificate_problems, cert_pem, chain_problem, fingerprint,
                         generate_key, key_pem, make_ca_certificate)
from getcertd.config import parse_config
from getcertd.errors import ConfigError
from getcertd.local import parse_users

log = Logger()

# The RA certificate this appliance issues itself is valid as long as its CA (it is re-issued only at a start,
# and a running appliance must not find it expired: every SCEP client would refuse its CertReps; its key sits
# beside the CA key, so a shorter life would protect nothing). A shorter one from before is replaced at the
# next start. The TLS certificate keeps a short life (clients and scanners hold a TLS server certificate to at
# most 366 days) and is renewed RENEW_BEFORE its end, also while running (getcertd.tap checks daily).
CA_LONG = datetime.timedelta(days=365 * 100)  # "until the CA's notAfter" (issue_ra caps there)
TLS_LIFETIME = datetime.timedelta(days=90)
RENEW_BEFORE = datetime.timedelta(days=14)
EXPIRY_WARNING = datetime.timedelta(days=30)  # a certificate the appliance serves warns this long before


def load_config(path: str):
    """The INI configuration at ``path`` and the [radius] secret_file it names; ConfigError (one line) if either
    can't be read."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
            world_readable = os.fstat(f.fileno()).st_mode & stat.S_IROTH
    except OSError as e:
        raise ConfigError(f"can't read the configuration {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the configuration {path} is not UTF-8 text") from None

    secret_files = []

    def read_secret(secret_path):
        secret_files.append(secret_path)
        try:
            with open(secret_path, "rb") as f:  # as for the CA key: the secret lets anyone forge RADIUS answers
                check_private_mode(os.fstat(f.fileno()).st_mode, "[radius] secret_file", secret_path)
                return f.read()
        except OSError as e:
            raise ConfigError(f"[radius] secret_file {secret_path}: {e.strerror}") from None
    config = parse_config(text, source=path, read_file=read_secret)
    if world_readable and config.radius.secret and not secret_files:
        raise ConfigError(f"{path} holds the [radius] secret and every user can read it: run chmod o-r {path}, or "
                          "put the secret in a secret_file (mode 0600)")
    return config


def ensure_state_dir(path: str) -> None:
    """Make ``state_dir`` (0700), or check the one there: ours, and closed to others (narrowed to 0700 if it
    was open). ConfigError (one line) when it can't be made or is someone else's: a state_dir = /var/lib by
    mistake must not have /var/lib narrowed."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
        if st.st_uid != os.geteuid():
            raise ConfigError(f"[getcertd] state_dir {path} belongs to uid {st.st_uid}, not to this user "
                              f"({os.geteuid()}): give getcertd a directory of its own")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, 0o700)
    except OSError as e:
        raise ConfigError(f"[getcertd] state_dir {path}: {e.strerror}") from None


def write_file(path: str, data: bytes, mode: int) -> None:
    """Write a new file in place of ``path``, whole and synced, or not at all: a temporary file in the same
    directory (0600 from its creation), then renamed over ``path`` (a symbolic link there is replaced, not
    followed; whoever held the old file open does not see the new data)."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_private(path: str, data: bytes) -> None:
    """Write a file readable by its owner only, atomically."""
    write_file(path, data, 0o600)


def write_public(path: str, data: bytes) -> None:
    write_file(path, data, 0o644)


def check_private_mode(st_mode: int, what: str, path: str) -> None:
    """ConfigError when a file holding a secret can be read by anyone but its owner (as ssh does)."""
    mode = stat.S_IMODE(st_mode)
    if mode & 0o077:
        raise ConfigError(f"{what} {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")


def load_key(path: str, what: str, passphrase=None, check_mode=True):
    try:
        if check_mode:
            check_private_mode(os.stat(path).st_mode, what, path)
        with open(path, "rb") as f:
            return serialization.load_pem_private_key(f.read(), passphrase)
    except TypeError:
        raise ConfigError(f"{what} {path} is encrypted: set [ca] key_passphrase_file" if passphrase is None
                          else f"{what} {path} is not encrypted, but [ca] key_passphrase_file is set") from None
    except (OSError, ValueError) as e:
        if passphrase is not None and isinstance(e, ValueError):
            raise ConfigError(f"{what} {path}: the passphrase in [ca] key_passphrase_file does not open it") from None
        raise ConfigError(f"{what} {path}: {e}") from None


def load_cert(path: str, what: str) -> x509.Certificate:
    return load_certs(path, what)[0]


def load_certs(path: str, what: str) -> list:
    """The certificates of a PEM file, in order, or the one of a DER file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {path}: {e}") from None


def _same_public_key(key, cert) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def read_passphrase(path: str):
    """The CA key passphrase from [ca] key_passphrase_file (first line), or None when not configured."""
    if not path:
        return None
    try:
        check_private_mode(os.stat(path).st_mode, "[ca] key_passphrase_file", path)
        with open(path, "rb") as f:
            passphrase = f.readline().rstrip(b"\r\n")
    except OSError as e:
        raise ConfigError(f"[ca] key_passphrase_file {path}: {e.strerror}") from None
    if not passphrase:
        raise ConfigError(f"[ca] key_passphrase_file {path} is empty")
    return passphrase


def load_or_create_ca(config, now: datetime.datetime, log) -> CertificateAuthority:
    passphrase = read_passphrase(config.ca_key_passphrase_file)
    issuers = []
    if config.ca_certificate:
        key = load_key(config.ca_key, "[ca] key", passphrase)
        # a sub-CA's file may hold its issuers after it, up to the root: handed out with it
        cert, *issuers = load_certs(config.ca_certificate, "[ca] certificate")
        problem = chain_problem([cert, *issuers])
        if problem:
            raise ConfigError(f"[ca] certificate {config.ca_certificate}: {problem}")
        refusal, warnings = ca_certificate_problems(cert)
        if refusal:
            raise ConfigError(f"[ca] certificate {config.ca_certificate}: {refusal}")
        for warning in warnings:
            log.warn("[ca] certificate {path}: {warning}", path=config.ca_certificate, warning=warning)
    else:
        key_path = os.path.join(config.state_dir, "ca.key")
        cert_path = os.path.join(config.state_dir, "ca.pem")
        if os.path.exists(key_path):
            key = load_key(key_path, "CA key", passphrase)
            cert = load_cert(cert_path, "CA certificate")
        elif os.path.exists(cert_path):
            # A key lost (a backup that skipped the 0600 file, say) must not quietly become a new CA that no
            # gateway trusts.
            raise ConfigError(f"the CA key {key_path} is missing, but its certificate {cert_path} is there: restore "
                              "the key, or remove the certificate to make a new CA")
        else:
            key = generate_key(config.ca_key_type)
            cert = make_ca_certificate(key, config.ca_subject, now, datetime.timedelta(seconds=config.ca_lifetime))
            write_private(key_path, key_pem(key, passphrase))
            write_public(cert_path, cert_pem(cert))
            log.info("generated a new CA {subject} in {dir}", subject=cert.subject.rfc4514_string(),
                     dir=config.state_dir)
    if not _same_public_key(key, cert):
        raise ConfigError("the CA key does not match the CA certificate")
    log.info("CA {subject}, SHA-256 fingerprint {fp}", subject=cert.subject.rfc4514_string(), fp=fingerprint(cert))
    if issuers:
        log.info("CA issued by {chain}: handed out with it", chain=" < ".join(
            c.subject.rfc4514_string() for c in issuers))
    return CertificateAuthority(key, cert, tuple(issuers))


def _load_or_issue(state_dir, name, now, ca, make_key, issue, still_good):
    key_path = os.path.join(state_dir, name + ".key")
    cert_path = os.path.join(state_dir, name + ".pem")
    if os.path.exists(key_path) and os.path.exists(cert_path):
        key = load_key(key_path, name + " key")
        cert = load_cert(cert_path, name + " certificate")
        why = "the one in state_dir is not this CA's or is due for renewal"
        if _same_public_key(key, cert) and cert.issuer == ca.certificate.subject and still_good(cert):
            try:
                cert.verify_directly_issued_by(ca.certificate)
                return key, cert
            except Exception:
                pass
    else:
        key, why = make_key(), "none was in state_dir"
    cert = issue(key)
    write_private(key_path, key_pem(key))
    write_public(cert_path, cert_pem(cert))
    log.info("issued a new {name} certificate, valid until {until} ({why})", name=name.upper(),
             until=cert.not_valid_after_utc.isoformat(), why=why)
    return key, cert


def load_or_create_ra(config, ca: CertificateAuthority, now: datetime.datetime):
    """The RA key (always RSA-2048: SCEP clients encrypt to it with RSA key transport) and its certificate."""
    return _load_or_issue(config.state_dir, "ra", now, ca, lambda: generate_key("rsa2048"),
                          lambda key: ca.issue_ra(key, now, CA_LONG),
                          lambda cert: cert.not_valid_after_utc >= ca.not_after() - datetime.timedelta(minutes=1))


def load_or_create_tls(config, ca: CertificateAuthority, now: datetime.datetime):
    """(key, certificate, chain): the configured PEM files, or a certificate from our CA for server_name."""
    if config.https_certificate:
        chain = load_certs(config.https_certificate, "[https] certificate")
        key = load_key(config.https_key, "[https] key")
        if not chain or not _same_public_key(key, chain[0]):
            raise ConfigError("[https] key does not match [https] certificate")
        return key, chain[0], chain[1:]

    def still_good(cert):
        return cert.subject.rfc4514_string() == f"CN={config.server_name}" \
            and cert.not_valid_after_utc - RENEW_BEFORE > now
    key, cert = _load_or_issue(config.state_dir, "tls", now, ca, lambda: generate_key("ec-p256"),
                               lambda key: ca.issue_tls(key, config.server_name, now, TLS_LIFETIME), still_good)
    return key, cert, [ca.certificate]


def expiry_warnings(certificates: dict, now: datetime.datetime) -> list:
    """One line for each of ``certificates`` (what -> x509.Certificate) that has expired or expires within
    EXPIRY_WARNING of ``now``."""
    lines = []
    for what, cert in certificates.items():
        left = cert.not_valid_after_utc - now
        if left <= datetime.timedelta(0):
            lines.append(f"the {what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        elif left <= EXPIRY_WARNING:
            lines.append(f"the {what} expires on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, in {left.days} days")
    return lines


def users_loader(path: str):
    """A function returning the users file's accounts, re-read when the file changes (mtime/size/inode).
    ConfigError when it is missing or malformed (an empty file is no accounts; a missing one is a mistake)."""
    cache = {"sig": None, "users": {}}

    def load():
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist (create accounts with getcertd-users add)") from None
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig != cache["sig"]:
            with open(path, encoding="utf-8") as f:
                try:
                    cache["users"] = parse_users(f.read())
                except ValueError as e:
                    raise ConfigError(f"{path}: {e}") from None
            cache["sig"] = sig
        return cache["users"]
    return load


class StateDirBusy(ConfigError):
    """Another process (a running appliance, getcertd-admin) holds the state_dir lock."""


def lock_state_dir(state_dir: str, holder: str = None) -> int:
    """Take the exclusive lock on ``state_dir/lock`` (flock; the kernel drops it when the process dies, SIGKILL
    included); the fd holding it. StateDirBusy naming the holder if it is taken. ``holder`` is written into the
    file for that message (see :class:`StateLock` for the appliance)."""
    path = os.path.join(state_dir, "lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        raise ConfigError(f"can't open the lock file {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise StateDirBusy(f"{state_dir} is in use by {who} (it holds {path})") from None
    if holder is not None:
        write_lock_holder(fd, holder)
    return fd


def write_lock_holder(fd: int, holder: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder}\n".encode("utf-8"), 0)


class StateLock(service.Service):
    """The appliance's hold on ``state_dir/lock`` while it runs: getcertd-admin refuses to change the journal or
    the CRL number then, and a second appliance on the same state_dir is refused at start.

    The lock is taken when this is made (before anything listens); the holder's pid is written at start (after
    twistd has daemonized); it is released at stop. Added to the appliance first, it stops last.
    """
    name = "statelock"

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.fd = lock_state_dir(state_dir)

    def startService(self):
        super().startService()
        if self.fd is not None:
            write_lock_holder(self.fd, f"the appliance (pid {os.getpid()})")

    def stopService(self):
        super().stopService()
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


SSH_HOST_KEY = "ssh_host_ed25519_key"


def load_or_create_ssh_host_key(state_dir: str):
    """The manhole's SSH host key (Ed25519, OpenSSH format, 0600 in state_dir), generated at first start."""
    path = os.path.join(state_dir, SSH_HOST_KEY)
    if not os.path.exists(path):
        key = ed25519.Ed25519PrivateKey.generate()
        write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        write_public(path + ".pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH) + b"\n")
        return key
    check_private_mode(os.stat(path).st_mode, "manhole host key", path)
    try:
        with open(path, "rb") as f:
            return serialization.load_ssh_private_key(f.read(), None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"manhole host key {path}: {e}") from None
