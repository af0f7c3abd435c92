"""The EST enrollment service (layer 2): a CSR and how the client authenticated in, a certs-only reply out.

It shares everything with SCEP through :class:`getcertd.enroll.EnrollmentService`: the authenticator and the
401 challenge continuation (``authenticate``), the check of a certificate a client holds
(``check_held_certificate``), and policy, signing and the issuance log (``issue``). Typed errors go up to
getcertd.web.answer_error, the one place they become HTTP answers.
"""
import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.logger import Logger

from getcertd import est, scep
from getcertd.enroll import Credentials
from getcertd.errors import AuthenticationRequired, ScepFailure, refusals_name

log = Logger()

CLIENT_CERT_METHOD = "tls-client-cert"


@dataclass(frozen=True)
class TlsSession:
    """What the HTTP edge knows about the TLS connection a request came on."""
    binding: Optional[bytes] = None  # tls-unique (TLS 1.2) or the RFC 9266 exporter value (TLS 1.3)
    peer_certificate: Optional[x509.Certificate] = None  # unverified: checked here against the CA and the log


class EstService:
    """cacerts, csrattrs, simpleenroll and simplereenroll on top of the enrollment service."""

    def __init__(self, enrollment, ca_chain: Sequence[x509.Certificate]):
        self.enrollment = enrollment
        self.policy = enrollment.policy
        self.cacerts = est.certs_only(list(ca_chain))  # the CA's certificate, then its issuers for a sub-CA
        self.csrattrs = est.csr_attributes()

    def has_label(self, label: str) -> bool:
        """An EST CA label names a policy profile."""
        return label in self.policy.profiles

    def enroll(self, der: bytes, *, reenroll: bool, credentials: Optional[Credentials], tls: TlsSession,
               label: Optional[str], client: str):
        """A Deferred of the DER certs-only reply holding the new certificate."""
        return defer.Deferred.fromCoroutine(self._enroll(der, reenroll, credentials, tls, label, client))

    async def _enroll(self, der, reenroll, credentials, tls, label, client):
        operation = "simplereenroll" if reenroll else "simpleenroll"
        try:
            csr = scep.parse_csr(der)  # proof of possession
            bound = est.check_channel_binding(csr, tls.binding)
            granted = replaces = None
            if credentials is None and reenroll and tls.peer_certificate is not None:
                identity, replaces = self._holder(tls.peer_certificate, client)
                granted = replaces.profile
            else:
                identity = await self.enrollment.authenticate(credentials, client)
            with refusals_name(identity.user):
                profile = self.policy.choose_profile(identity, label, granted) if label else granted
                public_key = csr.public_key()
                spki = public_key.public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
                cert = await self.enrollment.issue(identity, public_key, "est-" + hashlib.sha1(spki).hexdigest(),
                                                   client, profile=profile, replaces=replaces)
        except ScepFailure as failure:
            self.enrollment.note_refusal(f"EST {operation}", client, failure)
            raise
        if bound:
            log.info("EST {operation} from {client}: the CSR was bound to its TLS session", operation=operation,
                     client=client)
        return est.certs_only([cert])

    def _holder(self, certificate, client):
        """(identity, issuance record) of the holder of a TLS client certificate that this CA issued.

        The renewal keeps the profile and, at most, the lifetime of the certificate being renewed. Allowed
        only with [scep] renewal_without_auth (off by default: a chain of renewals must not outlive what the
        authentication policy demands); otherwise, or when the certificate isn't good, the client is asked
        for HTTP authentication.
        """
        try:
            record = self.enrollment.check_held_certificate(certificate)
        except ScepFailure as failure:
            log.info("EST simplereenroll from {client}: client certificate not accepted: {reason}", client=client,
                     reason=failure)
            raise AuthenticationRequired(f"the client certificate can't be used: {failure.text}") from None
        if not self.enrollment.renewal_without_auth:
            raise AuthenticationRequired("renewal with a client certificate alone is off here "
                                         "([scep] renewal_without_auth); authenticate with a password")
        return self.enrollment.renewal_identity(record, CLIENT_CERT_METHOD), record
