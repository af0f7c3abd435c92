"""The enrollment service (layer 2): a parsed pkiMessage in, a CertRep out.

This is the one place where SCEP outcomes become CertReps: a request that parses but can't be granted
(``ScepFailure``) is answered with a FAILURE CertRep carrying failInfo and failInfoText. Errors that are
answered at the HTTP level (malformed input, authentication needed, backend or journal unavailable)
propagate to getcertd.web, which maps them to status codes.
"""
import datetime
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.logger import Logger

from getcertd import keyjobs, scep
from getcertd.ca import random_serial
from getcertd.auth import Accept, Challenge, ChallengeStore, Identity, Reject, Throttle, throttle_key
from getcertd.errors import (AuthenticationRequired, AuthUnavailable, FailInfo, MalformedRequest, ScepFailure,
                             Throttled, refusals_name)
from getcertd.issuance import Record
from getcertd.loglimit import LogLimit, more
from getcertd.operations import format_serial

log = Logger()


@dataclass(frozen=True)
class Credentials:
    """HTTP Basic credentials, with the continuation token when answering a challenge."""
    user: str
    password: bytes = field(repr=False)  # never in logs
    token: str = ""


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


LOG_BURST = 50  # refusal and failed-login lines a kind per 10 s (getcertd.loglimit)
MAX_CHALLENGE_ROUNDS = 5  # challenges in one login; a server that challenges forever gets a failed login


def _prompt(message: str) -> str:
    """A RADIUS Reply-Message as the one line of a 401: printable, at most 200 characters, never empty."""
    text = " ".join("".join(c if c.isprintable() else " " for c in message).split())[:200]
    return text or "Enter the response"


class EnrollmentService:
    """Decides and answers SCEP PKIOperations; shares the issuance log with the rest of the appliance.

    ``keys.run(op, arg)`` does the work that needs the CA's or the RA's private key (getcertd.keyjobs: open a
    PKIOperation, sign a certificate, build a CertRep) and returns a Deferred: getcertd.helpers.KeyHelpers runs
    it in helper processes, on the other cores; this service does the rest (authentication, policy, the log).
    """

    def __init__(self, *, ca, keys, policy, issuance_log, journal, authenticator, clock,
                 renewal_without_auth=False, challenge_user="cn", crl=None,
                 crl_url=None, challenges: Optional[ChallengeStore] = None, throttle: Optional[Throttle] = None,
                 address_throttle: Optional[Throttle] = None, stats=None):
        self.ca = ca
        self.keys = keys
        self.policy = policy
        self.log = issuance_log
        self.journal = journal
        self.authenticator = authenticator
        self.clock = clock
        self.renewal_without_auth = renewal_without_auth
        self.challenge_user = challenge_user
        self.crl = crl
        self.crl_url = crl_url
        self.challenges = challenges or ChallengeStore()
        self.throttle = throttle or Throttle()  # per user name
        # Per client address: more lenient, since a whole office may come from one NAT address.
        self.address_throttle = address_throttle or Throttle(free=20, lockout_after=60)
        self.stats = stats
        self._in_flight = {}  # transactionID -> Deferred of the certificate being issued
        self._turns = {}  # (throttle, key) -> Deferreds of logins waiting for one of that key's attempts to end
        self._attempt_key = os.urandom(32)  # tags the passwords in flight (Throttle.busy) without keeping them
        self._pending_users = {}  # user -> issues in progress, counted against the per-user limits
        self._pending_serials = set()
        # anyone can cause these lines: at most LOG_BURST of a kind per 10 s (the metrics count every one)
        self._log_limits = {kind: LogLimit(clock, burst=LOG_BURST) for kind in ("refusals", "failed logins")}

    def note_refusal(self, what: str, client: str, failure: ScepFailure) -> None:
        """Count a refusal (SCEP or EST) and log it, naming the user once authenticated (rate-limited)."""
        self._count("refused", failure.fail_info.name)
        self.log_limited("refusals", "{what} from {client}{user} refused: {reason}", what=what, client=client,
                         user=f" for {failure.user!r}" if failure.user else "", reason=failure)

    def log_limited(self, kind: str, text: str, **fields) -> None:
        """Log ``text`` unless more than LOG_BURST lines of ``kind`` were logged in the last 10 s."""
        suppressed = self._log_limits[kind].allow()
        if suppressed is not None:
            log.info(text + "{more}", more=more(suppressed, kind), **fields)

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)

    def pki_operation(self, der: bytes, credentials: Optional[Credentials], client: str, secure: bool):
        """A Deferred CertRep (bytes) for a PKIOperation message."""
        return defer.Deferred.fromCoroutine(self._pki_operation(der, credentials, client, secure))

    async def _pki_operation(self, der, credentials, client, secure):
        try:
            opened = await self.keys.run("open", der)  # verified, decrypted, its CSR read
        except ScepFailure as failure:  # read, but its signature, an algorithm or its content is not acceptable
            if getattr(failure, "request", None) is None:
                raise MalformedRequest(failure.text) from None
            return await self._refuse(failure.request, failure, client)
        msg = opened.message
        try:
            if msg.message_type in (scep.MessageType.PKCSReq, scep.MessageType.RenewalReq):
                cert_der, reply = await self._enroll(opened, credentials, client, secure)
                if reply is not None:  # built right after signing
                    return reply
            elif msg.message_type == scep.MessageType.CertPoll:
                cert_der = await self._poll(msg)
            elif msg.message_type == scep.MessageType.GetCert:
                cert_der = await self._get_cert(opened.plaintext)
            elif msg.message_type == scep.MessageType.GetCRL:
                return await self._get_crl(opened)
            else:
                raise ScepFailure(FailInfo.badRequest, f"unsupported messageType {msg.message_type}")
            return await self._reply(msg, scep.PkiStatus.SUCCESS, content=scep.certs_only([cert_der]),
                                     cipher=opened.cipher)
        except ScepFailure as failure:
            return await self._refuse(msg, failure, client)

    def _refuse(self, msg, failure, client):
        self.note_refusal(f"SCEP {scep.message_type_name(msg.message_type)}", client, failure)
        return self._reply(msg, scep.PkiStatus.FAILURE, fail_info=failure.fail_info, fail_info_text=failure.text)

    def _count(self, *key):
        if self.stats is not None:
            self.stats.count(*key)

    def _reply(self, msg, status, content=None, cipher="aes256", fail_info=None, fail_info_text=None):
        """A Deferred CertRep, built and signed by a key helper (``content``: the certs-only PKCS#7 to encrypt)."""
        return self.keys.run("cert_rep", keyjobs.cert_rep_job(msg, status, content, cipher, fail_info,
                                                              fail_info_text))

    async def _enroll(self, opened, credentials, client, secure):
        """(certificate DER, CertRep or None): the CertRep of a new certificate is built with it."""
        msg = opened.message
        csr = opened.csr()
        public_key = csr.public_key()
        spki = _spki(public_key)

        previous = self.log.by_transaction(msg.transaction_id)
        if previous is not None:
            der = await self.journal.certificate(previous.serial)
            cert = x509.load_der_x509_certificate(der) if der is not None else None
            if cert is None or _spki(cert.public_key()) != spki:
                raise ScepFailure(FailInfo.badRequest, "this transactionID was already used for another key")
            # A retry gets the same certificate. A request signed by that certificate is a renewal with the same
            # key (so the same transactionID: certmonger's resubmit, pki --cert), and an expired one is no answer.
            if msg.signer_cert != cert and self.now() < cert.not_valid_after_utc:
                # !r: the transactionID is the client's string (a UTF8String may hold line breaks and escapes)
                log.info("SCEP retry of transaction {tid!r}: the certificate already issued", tid=msg.transaction_id)
                return der, None
        pending = self._in_flight.get(msg.transaction_id)
        if pending is not None:  # the same request, retried while the first is still being issued
            waiter = defer.Deferred()
            pending.append(waiter)
            der = await waiter
            if _spki(x509.load_der_x509_certificate(der).public_key()) != spki:
                raise ScepFailure(FailInfo.badRequest, "this transactionID was already used for another key")
            return der, None

        renewal_of = None
        if msg.message_type == scep.MessageType.RenewalReq:
            renewal_of = self.check_held_certificate(msg.signer_cert)
        profile = None
        if renewal_of is not None and self.renewal_without_auth and credentials is None:
            identity, profile = self.renewal_identity(renewal_of, "renewal"), renewal_of.profile
        else:
            identity = await self._authenticate(credentials, csr, client, secure)
        with refusals_name(identity.user):
            return await self._enroll_as(identity, opened, public_key, spki, renewal_of, profile, client)

    async def _enroll_as(self, identity, opened, public_key, spki, renewal_of, profile, client):
        msg = opened.message
        if renewal_of is not None and identity.user != renewal_of.user:
            raise ScepFailure(FailInfo.badRequest, "a renewal must be made by the holder of the certificate")
        if identity.method == "challengePassword":
            der = await self._valid_certificate_for_key(identity.user, spki, msg.signer_cert)
            if der is not None:
                log.info("SCEP request with {user!r}'s challengePassword for a key that has a valid certificate: "
                         "that certificate again (a retry under a new transactionID, or a replay)",
                         user=identity.user)
                return der, None
        replaces = renewal_of or self._held_by(msg.signer_cert, identity.user)

        waiters = self._in_flight[msg.transaction_id] = []

        def cert_rep(der):
            return self._reply(msg, scep.PkiStatus.SUCCESS, scep.certs_only([der]), opened.cipher)
        try:
            der, reply = await self._issue(identity, public_key, msg.transaction_id, client, profile=profile,
                                           then=cert_rep, replaces=replaces)
        except BaseException as e:
            for w in waiters:
                w.errback(e)
            raise
        finally:
            del self._in_flight[msg.transaction_id]
        for w in waiters:
            w.callback(der)
        return der, reply

    async def _valid_certificate_for_key(self, user: str, spki: bytes, signer: x509.Certificate) -> Optional[bytes]:
        """The DER of the newest valid certificate of ``user`` for this public key, unless ``signer`` is that
        certificate (a renewal with the same key); else None.

        For requests that carry their own credentials (a challengePassword, inside the envelope): anyone who
        recorded one can resend its envelope in a message of their own with a new transactionID, and the
        password checks again. Without this, each resend issued another certificate in the user's name, for a
        key only the user holds: useless to the sender, but each counted against max_valid_per_user, so a few
        of them locked the user out for a certificate lifetime. (HTTP Basic credentials travel outside the
        envelope, inside TLS: a recorded envelope alone can't be resent with them.)
        """
        for record in reversed(self.log.valid_for_user(user, int(self.clock.seconds()))):
            der = await self.journal.certificate(record.serial)
            if der is None:
                continue
            cert = x509.load_der_x509_certificate(der)
            if _spki(cert.public_key()) == spki:
                return None if cert == signer else der
        return None

    def check_held_certificate(self, old: x509.Certificate) -> Record:
        """The issuance record of a certificate a client proves it holds (a RenewalReq signer, an EST TLS client
        certificate): it must be ours, unexpired, not revoked and in the issuance log; else ScepFailure."""
        if old.issuer != self.ca.certificate.subject:
            raise ScepFailure(FailInfo.badMessageCheck, "a renewal must be signed with a certificate issued by this CA")
        try:
            old.verify_directly_issued_by(self.ca.certificate)
        except (ValueError, TypeError, Exception):  # InvalidSignature and friends
            raise ScepFailure(FailInfo.badMessageCheck, "the renewal signer certificate was not issued by this CA")
        now = self.now()
        if not (old.not_valid_before_utc <= now <= old.not_valid_after_utc):
            raise ScepFailure(FailInfo.badTime, "the certificate being renewed has expired")
        record = self.log.get(old.serial_number)
        if record is None:
            raise ScepFailure(FailInfo.badCertId, "the certificate being renewed is not in the issuance log")
        if record.revoked_at is not None:
            raise ScepFailure(FailInfo.badCertId, "the certificate being renewed was revoked")
        return record

    @staticmethod
    def renewal_identity(record: Record, method: str) -> Identity:
        """Who renews, on the strength of holding the certificate of ``record`` alone ([scep]
        renewal_without_auth): its user, capped at its lifetime (a Session-Timeout that capped it caps every
        renewal); the caller keeps its profile."""
        return Identity(user=record.user, method=method, session_timeout=max(60, record.not_after - record.issued_at))

    def _held_by(self, certificate: x509.Certificate, user: str) -> Optional[Record]:
        """The record of a good certificate of ours that ``user`` signed a PKCSReq with (a re-enrollment, as
        certmonger's resubmit sends it), or None: any other signer makes it a new enrollment, as before."""
        try:
            record = self.check_held_certificate(certificate)
        except ScepFailure:
            return None
        return record if record.user == user else None

    async def authenticate(self, credentials: Optional[Credentials], client: str) -> Identity:
        """Check HTTP Basic credentials, or a response to a challenge (SCEP and EST share this).

        AuthenticationRequired (HTTP 401) without credentials, when they are wrong, or with a new challenge
        and its continuation token; AuthUnavailable when the backend can't be reached.
        """
        if credentials is None:
            raise AuthenticationRequired()
        now = self.clock.seconds()
        state, rounds = None, 0
        if credentials.token:
            taken = self.challenges.take(credentials.token, credentials.user, now)
            if taken is None:
                raise AuthenticationRequired()  # expired or unknown continuation: start over
            state, rounds = taken
        try:
            result = await self._check(credentials.user, credentials.password, state, client)
        except (AuthUnavailable, Throttled):
            if state is not None:  # not an answer to the challenge: the same response may be sent again
                self.challenges.put(credentials.token, credentials.user, state, now, client, rounds)
            raise
        if isinstance(result, Accept):
            self._count("auth", self.authenticator.name, "accept")
            return result.identity
        if isinstance(result, Challenge) and rounds < MAX_CHALLENGE_ROUNDS:
            self._count("auth", self.authenticator.name, "challenge")
            token = secrets.token_urlsafe(24)
            if not self.challenges.put(token, credentials.user, result.state, now, client, rounds + 1):
                raise Throttled(self.challenges.ttl, "too many logins from here are waiting for a response")
            raise AuthenticationRequired(_prompt(result.message), token)
        self._count("auth", self.authenticator.name, "reject")
        self.log_limited("failed logins", "authentication failed for {user!r} from {client}", user=credentials.user,
                         client=client)
        raise AuthenticationRequired()

    async def _authenticate(self, credentials, csr, client, secure) -> Identity:
        if credentials is not None:
            return await self.authenticate(credentials, client)
        password = scep.challenge_password(csr)
        if password is None:
            if not secure:
                raise ScepFailure(FailInfo.badRequest, "a challengePassword is required (HTTP authentication "
                                                       "is only accepted over HTTPS)")
            raise AuthenticationRequired()
        user = self._challenge_user(csr)
        try:  # AuthUnavailable goes on to a 503 with Retry-After: a FAILURE is final to clients (certmonger's
            # CA_REJECTED), while the outage is not, and an HTTP error makes them try again later
            result = await self._check(user, password.encode("utf-8"), None, client)
        except Throttled as e:
            raise ScepFailure(FailInfo.badRequest, str(e))
        if isinstance(result, Accept):
            self._count("auth", self.authenticator.name, "accept")
            return Identity(user=result.identity.user, method="challengePassword",
                            session_timeout=result.identity.session_timeout,
                            profile_hints=result.identity.profile_hints, attributes=result.identity.attributes)
        self._count("auth", self.authenticator.name, "reject")
        self.log_limited("failed logins", "challengePassword authentication failed for {user!r} from {client}",
                         user=user, client=client)
        raise ScepFailure(FailInfo.badRequest, "authentication failed")

    async def _check(self, user, password, state, client):
        """Ask the backend, unless the user or the address must first wait out earlier failures. A Reject is
        a failure, and so is a new challenge in answer to a response (a wrong token code, for servers that
        challenge again instead of rejecting)."""
        user_key = throttle_key(user)
        checks = ((self.throttle, user_key), (self.address_throttle, client))
        attempt = hmac.new(self._attempt_key, user_key.encode() + b"\0" + password, hashlib.sha256).digest()
        while True:
            wait = max(throttle.wait(key, self.clock.seconds()) for throttle, key in checks)
            if wait > 0:
                self._count("auth", self.authenticator.name, "throttled")
                raise Throttled(wait)
            busy = next(((throttle, key) for throttle, key in checks if throttle.busy(key, attempt)), None)
            if busy is None:
                break
            # As many attempts in flight as free failures are left: this one waits for one of them to end
            # (a guess sent alongside others is counted after them; a user's parallel logins just queue).
            turn = defer.Deferred()
            self._turns.setdefault(busy, []).append(turn)
            await turn
        for throttle, key in checks:
            throttle.begin(key, attempt)
        try:
            result = await self.authenticator.authenticate(user, password, state, client)
            if isinstance(result, Reject) or isinstance(result, Challenge) and state is not None:
                now = self.clock.seconds()
                failures = self.throttle.failure(user_key, now)
                if failures == self.throttle.lockout_after:
                    log.warn("user {user!r} is locked out for {seconds:.0f} s after {n} failed logins (the "
                             "manhole's throttled.clear(user) ends it)", user=user, seconds=self.throttle.lockout,
                             n=failures)
                if self.address_throttle.failure(client, now) == self.address_throttle.lockout_after:
                    log.warn("{client} is locked out for {seconds:.0f} s after {n} failed logins", client=client,
                             seconds=self.address_throttle.lockout, n=self.address_throttle.lockout_after)
            elif isinstance(result, Accept):
                self.throttle.success(user_key)  # an address's failures only fade with time
        finally:  # counted first, then the logins held back look again
            for throttle, key in checks:
                throttle.end(key, attempt)
                for turn in self._turns.pop((throttle, key), ()):
                    turn.callback(None)
        return result

    def _challenge_user(self, csr) -> str:
        if self.challenge_user == "email":
            try:
                for san in csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                        .get_values_for_type(x509.RFC822Name):
                    return san
            except x509.ExtensionNotFound:
                pass
            values = csr.subject.get_attributes_for_oid(x509.NameOID.EMAIL_ADDRESS)
        else:
            values = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not values:
            raise ScepFailure(FailInfo.badRequest, f"the CSR subject has no {self.challenge_user.upper()} to name the user")
        return str(values[0].value)

    async def issue(self, identity: Identity, public_key, transaction_id: str, client: str,
                    profile: Optional[str] = None, replaces: Optional[Record] = None) -> x509.Certificate:
        """Decide (policy), sign and journal a certificate for ``identity`` (SCEP and EST share this).

        ScepFailure when the policy refuses; StorageUnavailable when the journal can't record it, and then
        no certificate leaves the server. ``profile`` overrides the policy's choice (already checked).
        ``replaces``: the user's certificate this one renews (its holder proved it has it), which then does not
        count against ``max_valid_per_user``: a renewal must not be refused because the certificate it
        replaces is still valid. It still counts as an issue against ``max_per_user_per_hour``.
        """
        der, _ = await self._issue(identity, public_key, transaction_id, client, profile, replaces=replaces)
        return x509.load_der_x509_certificate(der)

    async def _issue(self, identity, public_key, transaction_id, client, profile=None, then=None, replaces=None):
        """issue(); with ``then``, the Deferred ``then(der)`` (the SCEP CertRep) runs while the journal
        commits, and its result is returned too: (certificate DER, its result or None)."""
        now = self.now()
        seconds = int(self.clock.seconds())
        user = identity.user
        pending = self._pending_users.get(user, 0)  # issues of this user still being signed or journalled
        policy = self.policy
        # The per-user limits scan the user's records: only when they are on.
        valid_count = 0
        if getattr(policy, "max_valid_per_user", 1):
            valid = self.log.valid_for_user(user, seconds)
            valid_count = len(valid) + pending - (replaces in valid)  # Records compare by identity
        issued_last_hour = self.log.count_issued_between(user, seconds - 3600, seconds) + pending \
            if getattr(policy, "max_per_user_per_hour", 1) else 0
        decision = policy.decide(identity, public_key, now, self.ca.not_after(), valid_count=valid_count,
                                 issued_last_hour=issued_last_hour, profile=profile,
                                 ca_not_before=self.ca.certificate.not_valid_before_utc)
        serial = self._new_serial()
        self._pending_users[user] = pending + 1
        self._pending_serials.add(serial)
        try:
            der = await self.keys.run("certificate", keyjobs.certificate_job(public_key, decision, serial,
                                                                              self.crl_url))
            record = Record(serial, user, decision.profile, decision.subject_text,
                            ", ".join(str(g.value) for g in decision.san), decision.key_type,
                            int(decision.not_before.timestamp()), int(decision.not_after.timestamp()),
                            transaction_id, client, identity.method, seconds)
            # Journalled and fsynced before anything leaves the server; StorageUnavailable becomes a 503.
            committed = self.journal.record_issue(record, der)
            extra = None
            if then is not None:  # built and signed while the journal writes
                extra = then(der)
            try:
                await committed
            except BaseException:
                if extra is not None:
                    extra.addErrback(lambda _: None)  # nothing leaves: whatever it became is not needed
                raise
            if extra is not None:
                extra = await extra
        finally:
            self._pending_serials.discard(serial)
            left = self._pending_users[user] - 1
            if left:
                self._pending_users[user] = left
            else:
                del self._pending_users[user]
        self._count("issued", decision.profile)
        # One line per certificate: written out by the log observer as it stands (a format with five fields
        # took half as long again to render: 51-64 against 30-44 us, 1-2% of the reactor thread per enrollment).
        # The user name is repr'd (it is the client's string) and the braces of the line escaped for the format;
        # the event keeps the same fields as before for any other observer.
        fields = dict(serial=format_serial(serial), user=identity.user, profile=decision.profile,
                      until=decision.not_after.isoformat(), client=client)
        line = "issued serial {serial} to {user!r} ({profile}, until {until}) for {client}".format_map(fields)
        log.info(line.replace("{", "{{").replace("}", "}}"), **fields)
        return der, extra

    def _new_serial(self) -> int:
        while True:
            serial = random_serial()
            if self.log.get(serial) is None and serial not in self._pending_serials:
                return serial

    async def _poll(self, msg):
        """CertPoll: the certificate issued for this transactionID (automatic mode never leaves one pending)."""
        record = self.log.by_transaction(msg.transaction_id)
        der = await self.journal.certificate(record.serial) if record is not None else None
        if der is None:
            raise ScepFailure(FailInfo.badCertId, "no certificate is known for this transactionID")
        return der

    async def _get_cert(self, content):
        issuer, serial = scep.parse_issuer_and_serial(content)
        der = await self.journal.certificate(serial) if issuer == self.ca.certificate.subject else None
        if der is None:  # the same answer as a content that can't be read: see keyjobs._UNREADABLE
            raise keyjobs.unreadable(scep.MessageType.GetCert)
        return der

    async def _get_crl(self, opened):
        issuer, _serial = scep.parse_issuer_and_serial(opened.plaintext)
        crl = self.crl.der if self.crl is not None else None
        if issuer != self.ca.certificate.subject or crl is None:
            raise keyjobs.unreadable(scep.MessageType.GetCRL)
        return await self._reply(opened.message, scep.PkiStatus.SUCCESS, content=scep.certs_only([], [crl]),
                                 cipher=opened.cipher)
