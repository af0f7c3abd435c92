"""The composition root: `twistd getcertd --config FILE`.

Options check their input in postOptions; makeService reads the files, builds every part and names each
child service. Nothing listens until the MultiService starts.
"""
import datetime
import gc
import os
import resource
import signal
import sys

from OpenSSL import SSL, crypto as _crypto
from OpenSSL._util import lib as _openssl_lib
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet import defer, ssl, threads
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from getcertd import scep
from getcertd.auth import ChallengeStore
from getcertd.ca import fingerprint, key_type_of
from getcertd.config import listen_port
from getcertd.crl import CrlPublisher
from getcertd.enroll import EnrollmentService
from getcertd.errors import ConfigError
from getcertd.helpers import KeyHelpers
from getcertd.httpguard import Drain
from getcertd.keyjobs import KeyMaterial
from getcertd.local import LocalAuthenticator
from getcertd.operations import CompactionService
from getcertd.policy import Policy
from getcertd.stats import Stats
from getcertd import est, est_web, state, web
from getcertd.est_enroll import EstService

log = Logger()

FILES_BESIDE_CONNECTIONS = 256  # key helpers' pipes, journal, state files, RADIUS and manhole sockets, logs


class Options(usage.Options):
    optParameters = [["config", "c", "/etc/getcertd/getcertd.ini", "the INI configuration file"]]

    def postOptions(self):
        try:
            self.config = state.load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e))


class CaMaterial:
    """What GetCACert and GetCACertChain return, built once: the RA certificate (if any), the CA's, and the CA's
    issuers when it is a sub-CA (RFC 8894 section 4.2.1.2: the chain in a degenerate PKCS#7)."""

    def __init__(self, ca_chain, ra_cert=None):
        certs = ([ra_cert] if ra_cert is not None else []) + list(ca_chain)
        if len(certs) > 1:
            self.ca_cert_type = b"application/x-x509-ca-ra-cert"
            self.ca_cert_body = scep.degenerate_pkcs7(certs)
        else:
            self.ca_cert_type = b"application/x-x509-ca-cert"
            self.ca_cert_body = certs[0].public_bytes(serialization.Encoding.DER)
        self.chain_body = scep.degenerate_pkcs7(certs)


def caps_for(config) -> bytes:
    """GetCACaps: what is actually enabled. SHA-384 is listed because strongSwan 5.9.8 accepts AES only then."""
    caps = ["POSTPKIOperation", "SCEPStandard", "Renewal", "AES", "DES3", "SHA-1", "SHA-256", "SHA-384", "SHA-512"]
    return "\n".join(caps).encode() + b"\n"


def _any_client_certificate(connection, certificate, errno, depth, ok):
    """Requested, never required: getcertd.est_enroll checks the certificate against the CA and the issuance log.
    Only an RSA key with a public exponent over 64 bits is refused here, before OpenSSL verifies the client's
    handshake signature with it (a 2,048-bit exponent costs milliseconds of reactor time per handshake)."""
    return depth != 0 or not scep.oversized_rsa_exponent(certificate.get_pubkey().to_cryptography_key())


ECDHE_GROUPS = b"X25519:P-256:P-384"  # Mozilla "intermediate": no X448, no P-521


def tls_options(key, cert, chain, client_ca=None):
    """TLS 1.2+ with ECDHE and AEAD ciphers only; the CA certificate is sent along for fingerprint pinning.

    With ``client_ca``, a client certificate issued by it is requested (EST simplereenroll authenticates
    with one) but not required: clients without one, such as every SCEP client, connect as before.
    """
    options = ssl.CertificateOptions(
        privateKey=_crypto.PKey.from_cryptography_key(key),
        certificate=_crypto.X509.from_cryptography(cert),
        extraCertChain=[_crypto.X509.from_cryptography(c) for c in chain],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(
            "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
            "ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"))
    # ECDHE only, in TLS 1.3 too: left alone, OpenSSL 3 also agrees finite-field DHE (ffdhe2048...) with a TLS 1.3
    # client that offers only those groups. pyOpenSSL has no public call for the groups list (Twisted uses the
    # same binding for its ECDH setup). The context is built once and kept: every connection uses it.
    context = options.getContext()
    if _openssl_lib.SSL_CTX_set1_curves_list(context._context, ECDHE_GROUPS) != 1:
        raise RuntimeError("OpenSSL refused the TLS key exchange groups " + ECDHE_GROUPS.decode())
    if client_ca is not None:
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _any_client_certificate)
        context.set_verify_depth(0)
        context.set_client_ca_list([_crypto.X509.from_cryptography(client_ca).get_subject()])
    return options


def check_certificates(config, ca, tls, served: dict, today: datetime.datetime) -> None:
    """Daily: renew our own TLS certificate when due (state.RENEW_BEFORE), in the context every new connection
    uses (``tls``, from tls_options); warn about any certificate in ``served`` that expires within 30 days."""
    if not config.https_certificate:
        key, cert, _ = state.load_or_create_tls(config, ca, today)
        if cert != served["TLS certificate"]:
            # pyOpenSSL refuses to change a context that made connections; OpenSSL itself allows it, and new
            # connections then use the new certificate (the extra chain, our CA, stays).
            ctx = tls.getContext()._context
            x509, pkey = _crypto.X509.from_cryptography(cert), _crypto.PKey.from_cryptography_key(key)
            if _openssl_lib.SSL_CTX_use_certificate(ctx, x509._x509) != 1 \
                    or _openssl_lib.SSL_CTX_use_PrivateKey(ctx, pkey._pkey) != 1 \
                    or _openssl_lib.SSL_CTX_check_private_key(ctx) != 1:
                raise RuntimeError("OpenSSL refused the renewed TLS certificate")
            served["TLS certificate"] = cert
            log.info("TLS certificate renewed, valid until {until}", until=cert.not_valid_after_utc.isoformat())
    for line in state.expiry_warnings(served, today):
        log.warn("{line}: replace it", line=line)


def raise_file_limit(needed: int) -> int:
    """Raise the soft limit on open files to ``needed`` (at most the hard limit); the soft limit now. A shell's
    usual 1024 is less than max_connections connections plus the helpers' pipes, the journal and the logs:
    past it, accept() fails and a key helper can't be started."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    config = options.config if hasattr(options, "config") else options["config"]
    now = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc)
    try:
        return _make(config, reactor, now)
    except ConfigError as e:
        # twistd prints a traceback for any exception from makeService; a configuration problem deserves
        # one line naming the file and key, and a non-zero exit.
        sys.stderr.write(f"getcertd: {e}\n")
        raise SystemExit(1) from None


def _make(config, reactor, now):
    from getcertd.issuance import IssuanceLog
    from getcertd.journal import Journal, replay

    needed = config.max_connections * (2 if config.http_listen else 1) + FILES_BESIDE_CONNECTIONS
    limit = raise_file_limit(needed)
    if limit < needed:
        log.warn("open files are limited to {limit}, fewer than [https] max_connections needs ({needed}): raise "
                 "the limit (systemd: LimitNOFILE) or lower max_connections", limit=limit, needed=needed)
    state.ensure_state_dir(config.state_dir)
    state_lock = state.StateLock(config.state_dir)  # a second appliance, or getcertd-admin, is refused
    ca = state.load_or_create_ca(config, now, log)
    if ca.not_after() <= now:
        # Nothing can be issued from it, our own RA and TLS certificates included: say so instead of a traceback.
        if config.ra or not config.https_certificate:
            raise ConfigError(f"the CA certificate expired on {ca.not_after():%Y-%m-%d %H:%M} UTC: getcertd can't "
                              "issue its RA or TLS certificate from it; configure a valid [ca] certificate")
        log.warn("the CA certificate expired on {when}: every enrollment is refused with badTime",
                 when=ca.not_after().isoformat())
    if ca.certificate.not_valid_before_utc > now:
        log.warn("the CA certificate is not valid before {when}: every enrollment is refused with badTime until "
                 "then; check this server's clock", when=ca.certificate.not_valid_before_utc.isoformat())
    if config.ra:
        ra_key, ra_cert = state.load_or_create_ra(config, ca, now)
    elif not isinstance(ca.key, rsa.RSAPrivateKey):
        # SCEP clients encrypt their requests to the RA certificate, or to the CA's without one, with RSA key
        # transport: an EC CA alone would advertise SCEP and fail every PKIOperation.
        raise ConfigError(f"[ca] ra = no needs an RSA CA key (SCEP clients encrypt requests to it with RSA); this "
                          f"CA's key is {key_type_of(ca.key.public_key())}: set ra = yes (the RA key is RSA)")
    else:
        ra_key, ra_cert = ca.key, None
    tls_key, tls_cert, tls_chain = state.load_or_create_tls(config, ca, now)

    top = Appliance(reactor)
    state_lock.setServiceParent(top)  # first in, last out: released once the journal is closed
    issuance_log = IssuanceLog()
    journal_path = os.path.join(config.state_dir, "journal")
    count = replay(journal_path, issuance_log)
    log.info("issuance log: {count} records replayed from {path}", count=count, path=journal_path)
    gc.freeze()  # the replayed records live as long as the process: keep them out of every cyclic collection
    stats = Stats(reactor, backend=config.auth_backend, log=issuance_log)
    journal = Journal(journal_path, issuance_log, reactor, observe_commit=stats.observe_journal_commit,
                      checkpoint_records=config.log_checkpoint_records)
    journal.setServiceParent(top)  # named "journal"; stopping it flushes and closes the file
    material = KeyMaterial(ca, ra_key, ra_cert or ca.certificate, config.allow_legacy_des)
    keys = KeyHelpers(reactor, material.dumps(), size=config.key_helpers or None, stats=stats)
    keys.setServiceParent(top)  # stops after the drain below: in-flight enrollments finish first
    crl = stats.crl = CrlPublisher(ca, config.state_dir, issuance_log, reactor, interval=config.crl_interval,
                                   lifetime=config.crl_lifetime, run=threads.deferToThread)
    crl.setServiceParent(top)  # named "crl": a CRL at start, every [crl] interval and after each revocation
    CompactionService(journal, reactor, config.log_retain).setServiceParent(top)
    tls = tls_options(tls_key, tls_cert, tls_chain, client_ca=ca.certificate)
    served = {"CA certificate": ca.certificate, "TLS certificate": tls_cert}
    if ra_cert is not None:
        served["RA certificate"] = ra_cert

    def daily():
        check_certificates(config, ca, tls, served, datetime.datetime.fromtimestamp(reactor.seconds(),
                                                                                    datetime.timezone.utc))
    certificates = TimerService(86400, daily)
    certificates.clock = reactor
    certificates.setName("certificates")
    certificates.setServiceParent(top)

    if config.auth_backend == "local":
        load_users = state.users_loader(config.users_file)
        try:
            log.info("local accounts: {n} in {path}", n=len(load_users()), path=config.users_file)
        except ConfigError as e:  # not fatal: mended or created while running, it is read again
            log.warn("local accounts: {error}; every login fails until it is mended", error=str(e))
        authenticator = LocalAuthenticator(load_users, reactor)
    else:
        from getcertd import radius
        proto = radius.RadiusClientProtocol(radius.settings_from_config(config.radius), reactor)
        authenticator = radius.RadiusAuthenticator(proto)
        proto.rtt_observer, stats.radius = stats.observe_radius_rtt, proto
        udp = radius.listener_service(proto)
        udp.setName("radius")
        udp.setServiceParent(top)

    policy = Policy(profiles=config.profiles, default_profile=config.default_profile,
                    profile_map=config.profile_map, skew=config.skew, max_valid_per_user=config.max_valid_per_user,
                    max_per_user_per_hour=config.max_per_user_per_hour)
    enrollment = EnrollmentService(
        ca=ca, keys=keys, policy=policy,
        issuance_log=issuance_log, journal=journal, authenticator=authenticator, clock=reactor,
        renewal_without_auth=config.renewal_without_auth,
        challenge_user=config.challenge_user, crl=crl, crl_url=config.crl_url or None,
        challenges=ChallengeStore(), stats=stats)

    material = CaMaterial(ca.chain, ra_cert)
    caps = caps_for(config)
    port = listen_port(config.https_listen)
    authority = config.server_name if ":" not in config.server_name else f"[{config.server_name}]"  # IPv6
    if port not in (None, 443):
        authority += f":{port}"
    scep_url = f"https://{authority}{config.scep_paths[-1]}"
    enroll_line = (f"getcert enroll --url {scep_url} --user USER --ca-fingerprint sha256:"
                   + fingerprint(ca.certificate).replace(":", "").lower() + " --out DIR")

    def page():  # it shows the CRL's next update
        return web.landing_page(ca.certificate.subject.rfc4514_string(), fingerprint(ca.certificate), scep_url,
                                enroll_line, crl.next_update)
    ca_der, ca_pem = (ca.certificate.public_bytes(e) for e in (serialization.Encoding.DER, serialization.Encoding.PEM))

    sites = []

    def site(secure):
        root = web.Root(page if secure else b"")
        web.add_downloads(root, ca_der, ca_pem, crl)  # /ca.crt /ca.pem /crl /crl.pem, plain HTTP too
        for path in config.scep_paths:
            web.add_path(root, path, web.ScepResource(enrollment, material, secure, caps))
        if secure:  # EST is defined over TLS only
            web.add_path(root, est.WELL_KNOWN, est_web.EstRoot(EstService(enrollment, ca.chain)))
        sites.append(web.Site(root, max_connections=config.max_connections,
                              max_per_address=config.max_connections_per_address,
                              request_timeout=config.request_timeout,
                              idle_timeout=config.idle_timeout))
        sites[-1].stats, sites[-1].endpoint = stats, endpoint_label(config.scep_paths)
        return sites[-1]

    Drain(sites, reactor).setServiceParent(top)  # stops after the listeners below: in-flight requests finish

    def listen(section, description, factory):
        try:
            listener = strports.service(description, factory)
        except (ValueError, KeyError, TypeError) as e:  # what config.py's check can't see (a bad option value)
            raise ConfigError(f"[{section}] listen: {description!r}: {e}") from None
        listener.setName(section)
        listener.setServiceParent(top)

    listen("https", config.https_listen, TLSMemoryBIOFactory(tls, False, site(True)))
    if config.http_listen:
        listen("http", config.http_listen, site(False))
    if config.manhole_authorized_keys:
        from getcertd import admin_ns, manhole
        namespace = admin_ns.namespace(issuance_log=issuance_log, journal=journal, crl=crl, clock=reactor,
                                       stats=stats, config=config, radius=stats.radius, enrollment=enrollment)
        listen("manhole", config.manhole_listen, manhole.factory(
            namespace, config.manhole_authorized_keys, state.load_or_create_ssh_host_key(config.state_dir),
            reactor))
    if config.metrics_listen:
        listen("metrics", config.metrics_listen, web.Site(web.metrics_root(stats)))
    log.info("SCEP at {url}, EST at https://{authority}{est}/", url=scep_url, authority=authority, est=est.WELL_KNOWN)
    top.enrollment, top.keys = enrollment, keys
    top.issuance_log = issuance_log
    top.crl, top.stats = crl, stats
    return top


def endpoint_label(scep_paths):
    """Request path -> the label of its latency histogram (a fixed, small set)."""
    labels = {p.encode(): "scep" for p in scep_paths}
    labels.update({b"/crl": "crl", b"/crl.pem": "crl", b"/ca.crt": "ca", b"/ca.pem": "ca", b"/": "page"})
    est_prefix = est.WELL_KNOWN.encode()

    def label(path):
        return labels.get(path) or ("est" if path.startswith(est_prefix) else "other")
    return label


class Appliance(service.MultiService):
    """The top service: children stop one after another, in reverse order of addition (listeners first,
    then the drain, then the backends, the journal last), each waiting for the one before.

    After a clean stop on SIGTERM the process exits 0: twistd would otherwise re-raise the signal against
    itself (exit status -15), which supervisors other than systemd report as a crash.

    SIGHUP (a closed terminal, an admin's habit of "kill -HUP" to reload) killed the process, and systemd's
    Restart=on-failure counts SIGHUP as a clean end, so the appliance stayed down. It is logged and ignored: the
    configuration is read at start only (the users file is re-read by itself when it changes).
    """

    def __init__(self, reactor=None):
        super().__init__()
        self._reactor = reactor
        self._previous_sighup = None

    def privilegedStartService(self):
        """twistd binds the listeners here, before anything else starts."""
        for child in self:
            try:
                child.privilegedStartService()
            except CannotListenError as e:  # twistd would print a traceback: one line naming the key instead
                why = getattr(e.socketError, "strerror", None) or e.socketError
                sys.stderr.write(f"getcertd: [{child.name}] listen: can't listen on {e.interface or '*'}:{e.port}: "
                                 f"{why}\n")
                raise SystemExit(1) from None

    def startService(self):
        super().startService()
        if self._reactor is not None:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum, frame):
        self._reactor.callFromThread(
            log.info, "SIGHUP ignored: getcertd reads its configuration only at start; restart it to apply a "
                      "change (the users file is re-read by itself when it changes)")

    def stopService(self):
        service.Service.stopService(self)
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        d = defer.succeed(None)
        failed = []
        for child in reversed(list(self)):
            d.addCallback(lambda _, c=child: c.stopService())
            d.addErrback(lambda f, c=child: (failed.append(c.name), log.failure("stopping {name}", f, name=c.name)))

        def stopped(_):
            if not failed and getattr(self._reactor, "_exitSignal", None) is not None:
                self._reactor._exitSignal = None  # read by twistd's ApplicationRunner after reactor.run returns
        return d.addCallback(stopped)
