"""The SSH manhole (edge): a Python prompt in the running appliance, for admins holding a listed key.

twisted.conch's manhole over SSH, as ``twisted.conch.manhole_tap`` builds it, with one difference: the portal's
only checker is an SSH public-key checker over the ``[manhole] authorized_keys`` file, for any SSH user name
(the key decides). With no password checker in the portal, conch offers only the ``publickey`` method, so
password authentication is never offered. The file is read at each login, so adding or removing a key needs
no restart. Each session gets its own copy of the namespace (getcertd.admin_ns).
"""
import os

from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.ssh import keys, transport
from twisted.cred import portal
from twisted.logger import Logger
from twisted.conch.checkers import IAuthorizedKeysDB
from zope.interface import implementer

log = Logger()


@implementer(IAuthorizedKeysDB)
class AnyUserAuthorizedKeys:
    """The keys of an OpenSSH authorized_keys file, for whatever user name the client sends."""

    def __init__(self, path: str):
        self.path = path

    def getAuthorizedKeys(self, username):
        try:
            with open(self.path, "rb") as f:
                found = list(readAuthorizedKeyFile(f))
        except OSError as e:
            log.error("manhole: can't read {path}: {error}", path=self.path, error=e.strerror)
            return []
        return found



class _LoggingChecker(SSHPublicKeyChecker):
    """Logs each login and each refused key (by fingerprint)."""

    def requestAvatarId(self, credentials):
        d = super().requestAvatarId(credentials)

        user = credentials.username.decode("utf-8", "replace")

        def fingerprint():  # as ssh-keygen -l shows it
            try:
                fp = keys.Key.fromString(credentials.blob).fingerprint(keys.FingerprintFormats.SHA256_BASE64)
            except Exception:
                return "?"
            return "SHA256:" + (fp.decode() if isinstance(fp, bytes) else fp).rstrip("=")

        def ok(avatar):
            log.info("manhole: {user!r} logged in with key {fp}", user=user, fp=fingerprint())
            return avatar

        def refused(failure):
            if credentials.signature:  # without a signature it is the client asking whether a key would do
                log.warn("manhole: key {fp} (user {user!r}) refused: not in the authorized keys", fp=fingerprint(),
                         user=user)
            return failure
        return d.addCallbacks(ok, refused)


class _Transport(transport.SSHServerTransport):
    """An SSH connection that must log in within the factory's ``login_timeout`` (conch waits 10 hours once the
    key exchange is done, and forever before it)."""

    _deadline = None

    def connectionMade(self):
        super().connectionMade()
        self._deadline = self.factory.clock.callLater(self.factory.login_timeout, self._too_slow)

    def _too_slow(self):
        self._deadline = None
        if getattr(self, "avatar", None) is None:  # conch's userauth sets it on a successful login
            log.info("manhole: a connection did not log in within {t:.0f} s; closed", t=self.factory.login_timeout)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self.factory.open -= 1
        super().connectionLost(reason)


class _Factory(manhole_ssh.ConchFactory):
    """At most ``max_connections`` at a time (the manhole is for an admin or two, not for whoever connects)."""
    protocol = _Transport
    max_connections = 10
    login_timeout = 60.0

    def __init__(self, portal, clock):
        super().__init__(portal)
        self.clock = clock
        self.open = 0

    def buildProtocol(self, addr):
        if self.open >= self.max_connections:
            log.warn("manhole: refused a connection: {n} already open", n=self.open)
            return None
        self.open += 1
        return super().buildProtocol(addr)


class _Session(manhole_ssh.TerminalSession):
    def windowChanged(self, size):
        pass  # the manhole keeps its first size: good enough for a prompt

    def eofReceived(self):
        pass


class _Realm(manhole_ssh.TerminalRealm):
    sessionFactory = _Session

    def __init__(self, namespace):
        super().__init__()
        self.chainedProtocolFactory = lambda: insults.ServerProtocol(manhole.ColoredManhole, dict(namespace))


def factory(namespace: dict, authorized_keys: str, host_key, clock) -> manhole_ssh.ConchFactory:
    """The SSH server factory: ``host_key`` a cryptography private key (getcertd.state makes an Ed25519 one)."""
    checker = _LoggingChecker(AnyUserAuthorizedKeys(os.path.abspath(authorized_keys)))
    f = _Factory(portal.Portal(_Realm(namespace), [checker]), clock)
    key = keys.Key(host_key)
    # Instance dicts: ConchFactory's are class attributes, shared by every factory.
    f.publicKeys = {key.sshType(): key.public()}
    f.privateKeys = {key.sshType(): key}
    return f
