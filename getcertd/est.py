"""EST (RFC 7030) codec (layer 1): bodies, certs-only replies, CSR attributes and channel binding.

Bytes in, bytes out, typed errors out; no I/O, no reactor, no clock. Bodies are base64 (RFC 4648, one line:
RFC 8951 section 3); incoming bodies may carry line breaks. The CSR itself is parsed and its proof of
possession checked by :func:`getcertd.scep.parse_csr`; certs-only replies are :func:`getcertd.scep.degenerate_pkcs7`.
"""
import base64
import binascii
import hmac
from typing import Iterable, Optional

from asn1crypto import core

from getcertd import scep
from getcertd.errors import FailInfo, MalformedRequest, ScepFailure

WELL_KNOWN = "/.well-known/est"
OPERATIONS = ("cacerts", "simpleenroll", "simplereenroll", "csrattrs", "serverkeygen", "fullcmc")
ENROLL_OPERATIONS = ("simpleenroll", "simplereenroll")

CACERTS_TYPE = b"application/pkcs7-mime"
CERTS_ONLY_TYPE = b"application/pkcs7-mime; smime-type=certs-only"
CSRATTRS_TYPE = b"application/csrattrs"
PKCS10_TYPE = b"application/pkcs10"

# RFC 9266: the channel binding of TLS 1.3, where tls-unique (RFC 5929) is not defined.
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
EXPORTER_LENGTH = 32

OID_RSA = "1.2.840.113549.1.1.1"
OID_EC = "1.2.840.10045.2.1"
OID_ED25519 = "1.3.101.112"
CURVES = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34"}

# The keys getcertd.policy.check_public_key accepts (tests/test_est.py keeps the two in step).
ACCEPTED_KEYS = ((OID_RSA, ()), (OID_EC, ("secp256r1", "secp384r1")), (OID_ED25519, ()))


def decode_body(raw: bytes, what: str = "request") -> bytes:
    """The DER inside a base64 body (line breaks and other whitespace tolerated, padding optional).

    A body that is plainly DER (a SEQUENCE that is not valid base64) is taken as it is.
    """
    text = b"".join(raw.split())
    try:
        der = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        if raw[:1] == b"\x30":
            return raw
        raise MalformedRequest(f"the {what} body is not base64") from None
    if not der:
        raise MalformedRequest(f"the {what} body is empty")
    if der[:1] != b"\x30":
        raise MalformedRequest(f"the {what} body is not base64 of a DER structure")
    return der


def encode_body(der: bytes) -> bytes:
    """Base64 of ``der`` on one line (RFC 8951: no line breaks are needed, and some clients can't take them)."""
    return base64.b64encode(der)


def certs_only(certs) -> bytes:
    """The DER of a certs-only CMC Simple PKI Response (a degenerate SignedData) holding ``certs``."""
    return scep.degenerate_pkcs7(list(certs))


class _Values(core.SetOf):
    _child_spec = core.Any


class _Attribute(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("values", _Values)]


class _AttrOrOid(core.Choice):
    _alternatives = [("oid", core.ObjectIdentifier), ("attribute", _Attribute)]


class CsrAttrs(core.SequenceOf):
    """RFC 7030 section 4.5.2: ``CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID``."""
    _child_spec = _AttrOrOid


def csr_attributes(accepted_keys: Iterable = ACCEPTED_KEYS) -> bytes:
    """The DER CsrAttrs naming the key types the policy accepts.

    A key algorithm with parameters (the EC curves) is an attribute whose values are the parameter OIDs,
    as in RFC 7030's example; one without is a bare OID. challengePassword is not listed: authentication
    is HTTP Basic or a client certificate, and channel binding is optional.
    """
    items = []
    for oid, curves in accepted_keys:
        if curves:
            values = _Values([core.ObjectIdentifier(CURVES[c]) for c in curves])
            items.append(_AttrOrOid(name="attribute", value=_Attribute({"type": oid, "values": values})))
        else:
            items.append(_AttrOrOid(name="oid", value=core.ObjectIdentifier(oid)))
    return CsrAttrs(items).dump(force=True)


def parse_csr_attributes(der: bytes) -> list:
    """[(oid, [value OIDs])] from a CsrAttrs (for clients and tests); MalformedRequest if it doesn't parse."""
    try:
        parsed = CsrAttrs.load(der, strict=True)
        result = []
        for item in parsed:
            if item.name == "oid":
                result.append((item.chosen.dotted, []))
            else:
                values = [core.ObjectIdentifier.load(v.dump()).dotted for v in item.chosen["values"]]
                result.append((item.chosen["type"].dotted, values))
        return result
    except (ValueError, TypeError) as e:
        raise MalformedRequest(f"CsrAttrs: {e}") from None


def check_channel_binding(csr, expected: Optional[bytes]) -> bool:
    """RFC 7030 section 3.5: a challengePassword in an EST CSR is the base64 of the TLS channel binding.

    ``expected`` is tls-unique (TLS 1.2) or the RFC 9266 exporter value (TLS 1.3) of the connection the CSR
    arrived on. True when the CSR carries a binding that matches; False when it carries none; ScepFailure
    (badMessageCheck) when it carries one that does not match, so a CSR relayed from another TLS session
    is refused.
    """
    value = scep.challenge_password(csr)
    if value is None:
        return False
    text = "".join(value.split()).encode("ascii", "replace")
    try:
        claimed = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        claimed = None
    if not claimed or not expected or not hmac.compare_digest(claimed, expected):
        raise ScepFailure(FailInfo.badMessageCheck, "the CSR's challengePassword does not match this TLS "
                                                    "session's channel binding (RFC 7030 section 3.5)")
    return True
