"""SCEP (RFC 8894) pkiMessage codec: CMS SignedData and EnvelopedData with SCEP attributes.

Layer 1: bytes in, bytes out, typed errors out. No I/O, no reactor, no wall clock (a
signing time is passed in). Both the server and the client use it.

Structure comes from asn1crypto, all cryptography from ``cryptography``. asn1crypto
parses lazily, so every parser here forces what it uses inside a guard: on arbitrary
input the parsers raise only ``MalformedRequest`` (cannot parse, HTTP 400) or
``ScepFailure`` (parsed but not acceptable, FAILURE CertRep with a failInfo).

A ``ScepFailure`` raised by ``parse_signed`` after the SCEP attributes were read carries
them, unverified, as ``failure.request`` (a ``SignedMessage``) so that the server can
still answer with a FAILURE CertRep that echoes the transactionID and senderNonce.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Callable, Iterable, Optional, Sequence

from asn1crypto import parser as _ber_parser
from asn1crypto import algos, cms, core
from asn1crypto import csr as asn1_csr
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as block_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from getcertd.errors import FailInfo, MalformedRequest, ScepFailure

__all__ = [
    "MessageType", "PkiStatus", "SignedMessage",
    "parse_signed", "build_signed", "verify_signed_data", "VerifiedSignedData",
    "decrypt_envelope", "build_envelope",
    "degenerate_pkcs7", "parse_degenerate",
    "build_request", "build_pkcs_req", "build_cert_poll", "build_get_cert", "build_get_crl",
    "build_cert_rep",
    "parse_issuer_and_serial", "build_issuer_and_serial",
    "parse_issuer_and_subject", "build_issuer_and_subject",
    "parse_csr", "challenge_password",
    "new_transaction_id", "new_nonce", "message_type_name", "NO_ENVELOPE", "oversized_rsa_exponent",
    "CIPHERS", "DIGESTS",
]


class MessageType(IntEnum):
    """SCEP messageType values (RFC 8894 section 3.2.1.2)."""
    CertRep = 3
    RenewalReq = 17
    PKCSReq = 19
    CertPoll = 20
    GetCert = 21
    GetCRL = 22


def message_type_name(message_type: int) -> str:
    """'PKCSReq' for 19; 'messageType 99' for a value SCEP doesn't define."""
    try:
        return MessageType(message_type).name
    except ValueError:
        return f"messageType {message_type}"


class PkiStatus(str, Enum):
    """SCEP pkiStatus values, carried as PrintableString decimals."""
    SUCCESS = "0"
    FAILURE = "2"
    PENDING = "3"


@dataclass(frozen=True)
class SignedMessage:
    """A parsed pkiMessage: its SCEP attributes, its signer and its encapsulated content.

    ``message_type`` may be a value outside ``MessageType``; ``content`` is the eContent
    (an EnvelopedData ContentInfo in SCEP) or None when absent.
    """
    message_type: int
    transaction_id: str
    sender_nonce: Optional[bytes]
    recipient_nonce: Optional[bytes]
    pki_status: Optional[PkiStatus]
    fail_info: Optional[int]
    fail_info_text: Optional[str]
    signer_cert: x509.Certificate
    signer_certs: tuple[x509.Certificate, ...]
    digest: str  # one of DIGESTS (SHA-256 when the message's own is unsupported and so refused)
    content: Optional[bytes] = field(repr=False)
    signing_time: Optional[datetime.datetime] = None


# --- object identifiers ----------------------------------------------------------------

OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"
_SCEP = "2.16.840.1.113733.1.9."
OID_MESSAGE_TYPE = _SCEP + "2"
OID_PKI_STATUS = _SCEP + "3"
OID_FAIL_INFO = _SCEP + "4"
OID_SENDER_NONCE = _SCEP + "5"
OID_RECIPIENT_NONCE = _SCEP + "6"
OID_TRANSACTION_ID = _SCEP + "7"
OID_FAIL_INFO_TEXT = "1.3.6.1.5.5.7.24.1"

OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
OID_RSASSA_PSS = "1.2.840.113549.1.1.10"
OID_MGF1 = "1.2.840.113549.1.1.8"

_DIGEST_OIDS = {
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
}
_OID_OF_DIGEST = {name: oid for oid, name in _DIGEST_OIDS.items()}
_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
DIGESTS = tuple(_HASHES)
MAX_TRANSACTION_ID = 128

# signerInfo signatureAlgorithm -> (key family, implied digest or None)
_SIGNATURE_OIDS = {
    OID_RSA_ENCRYPTION: ("rsa", None),
    "1.2.840.113549.1.1.5": ("rsa", "sha1"),
    "1.2.840.113549.1.1.11": ("rsa", "sha256"),
    "1.2.840.113549.1.1.12": ("rsa", "sha384"),
    "1.2.840.113549.1.1.13": ("rsa", "sha512"),
    OID_RSASSA_PSS: ("rsa-pss", None),
    "1.2.840.10045.2.1": ("ecdsa", None),  # id-ecPublicKey, seen from some signers
    "1.2.840.10045.4.1": ("ecdsa", "sha1"),
    "1.2.840.10045.4.3.2": ("ecdsa", "sha256"),
    "1.2.840.10045.4.3.3": ("ecdsa", "sha384"),
    "1.2.840.10045.4.3.4": ("ecdsa", "sha512"),
}
_ECDSA_OID_OF_DIGEST = {"sha1": "1.2.840.10045.4.1", "sha256": "1.2.840.10045.4.3.2",
                        "sha384": "1.2.840.10045.4.3.3", "sha512": "1.2.840.10045.4.3.4"}

# name -> (content-encryption OID, key length, block size)
_CIPHER_TABLE = {
    "aes128": ("2.16.840.1.101.3.4.1.2", 16, 16),
    "aes192": ("2.16.840.1.101.3.4.1.22", 24, 16),
    "aes256": ("2.16.840.1.101.3.4.1.42", 32, 16),
    "des3": ("1.2.840.113549.3.7", 24, 8),
    "des": ("1.3.14.3.2.7", 8, 8),
}
_CIPHER_OF_OID = {oid: name for name, (oid, _, _) in _CIPHER_TABLE.items()}
CIPHERS = tuple(_CIPHER_TABLE)

_PRINTABLE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]*\Z")
_DECIMAL = re.compile(r"[0-9]{1,9}\Z")


# --- small helpers ---------------------------------------------------------------------

def _one_line(exc: BaseException, limit: int = 160) -> str:
    """A short single-line description of an exception, for MalformedRequest reasons."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _guard(what: str):
    """Turn any unexpected exception of the wrapped parser into MalformedRequest.

    asn1crypto parses lazily and raises ValueError, TypeError, KeyError and friends
    from deep inside; cryptography raises ValueError on bad DER. Typed errors pass.
    """
    def decorate(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (MalformedRequest, ScepFailure):
                raise
            except Exception as exc:  # noqa: BLE001 - the parsers' contract
                raise MalformedRequest(f"{what}: {_one_line(exc)}") from None
        return guarded
    return decorate


def _der_tlv(tag: int, contents: bytes) -> bytes:
    """DER-encode one TLV with a single-byte tag."""
    n = len(contents)
    if n < 0x80:
        length = bytes([n])
    else:
        octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(octets)]) + octets
    return bytes([tag]) + length + contents


MAX_VALUES = 10000  # ASN.1 values in one layer of a message; real ones (certificates included) have a few hundred


def _check_value_count(der, what: str, most: int = MAX_VALUES) -> None:
    """MalformedRequest if ``der`` holds more than ``most`` ASN.1 values, counted through constructed ones.

    asn1crypto makes a Python object of some hundreds of bytes for each value it reads, and the parsers read
    every attribute, attribute value, certificate, signerInfo and recipientInfo: a 2 MiB body of two-byte
    values cost hundreds of MiB and tens of seconds on the reactor thread (tests/test_memory.py). This counts
    first, allocating nothing per value (BER too: indefinite lengths are followed); encodings it can't
    follow are left to the parsers to report.
    """
    if not isinstance(der, (bytes, bytearray, memoryview)):
        return
    n, pos, count, ends = len(der), 0, 0, []  # ends: where each open constructed value ends (None: indefinite)
    try:
        while pos < n:
            while ends and ends[-1] is not None and pos >= ends[-1]:
                ends.pop()
            tag = der[pos]
            if tag == 0 and der[pos + 1] == 0 and ends and ends[-1] is None:  # end-of-contents
                ends.pop()
                pos += 2
                continue
            pos += 1
            if tag & 0x1F == 0x1F:
                while der[pos] & 0x80:
                    pos += 1
                pos += 1
            first = der[pos]
            pos += 1
            count += 1
            if count > most:
                raise MalformedRequest(f"{what}: more than {most} ASN.1 values")
            if first == 0x80:
                if not tag & 0x20:
                    return
                ends.append(None)
                continue
            if first > 0x80:
                if first > 0x88:
                    return
                length = int.from_bytes(der[pos:pos + (first & 0x7F)], "big")
                pos += first & 0x7F
            else:
                length = first
            if tag & 0x20:
                ends.append(pos + length)
            else:
                pos += length
    except IndexError:
        return


def _der_int(value: int) -> bytes:
    """DER INTEGER (two's complement, minimal)."""
    n = (value + (value < 0)).bit_length() // 8 + 1
    return _der_tlv(0x02, value.to_bytes(n, "big", signed=True))


def _der_oid(dotted: str) -> bytes:
    """DER OBJECT IDENTIFIER."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _der_tlv(0x06, bytes(out))


def _der_read(der: bytes, pos: int, limit: Optional[int] = None) -> tuple:
    """(tag, start of contents, end) of the DER TLV at ``pos``, which must end by ``limit`` (default: the end
    of ``der``); ValueError unless it is a low-tag-number TLV with a definite, minimally encoded length."""
    tag = der[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte tags are not expected here")
    first = der[pos + 1]
    start = pos + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 0 < count <= 4 or der[start] == 0:
            raise ValueError("unsupported length encoding")
        length = int.from_bytes(der[start:start + count], "big")
        if length < 0x80:
            raise ValueError("non-minimal length")
        start += count
    end = start + length
    if end > (len(der) if limit is None else limit):
        raise ValueError("truncated")
    return tag, start, end


def _der_children(der: bytes, start: int, end: int, most: int = 256) -> list:
    """(tag, start of contents, end, start of the TLV) of each TLV from ``start`` exactly to ``end``; ValueError
    past ``most`` of them (the fast paths then give way to asn1crypto: a primitive's 2 MiB of zeros would
    otherwise be split into a million tuples, 150 MiB)."""
    out = []
    pos = start
    while pos < end:
        if len(out) == most:
            raise ValueError("too many elements for the fast path")
        tag, cstart, cend = _der_read(der, pos, end)
        out.append((tag, cstart, cend, pos))
        pos = cend
    return out


_OIDS = {}  # DER OID contents -> dotted string, for the few OIDs messages carry


def _der_oid_dotted(contents: bytes) -> str:
    dotted = _OIDS.get(contents)
    if dotted is None:
        if not contents or contents[-1] & 0x80 or contents[0] == 0x80:
            raise ValueError("bad OID")
        arcs, value = [], 0
        for octet in contents:
            value = (value << 7) | (octet & 0x7F)
            if not octet & 0x80:
                arcs.append(value)
                value = 0
        first = min(arcs[0] // 40, 2)
        dotted = ".".join(map(str, [first, arcs[0] - 40 * first] + arcs[1:]))
        if len(_OIDS) < 1024:
            _OIDS[contents] = dotted
    return dotted


def _der_unsigned_int(der: bytes, start: int, end: int) -> int:
    if start == end or (end - start > 1 and (der[start] == 0 and der[start + 1] < 0x80
                                             or der[start] == 0xFF and der[start + 1] >= 0x80)):
        raise ValueError("bad INTEGER")
    return int.from_bytes(der[start:end], "big", signed=True)


_NULL = b"\x05\x00"
_DER_DATA = _der_oid(OID_DATA)
_DER_SIGNED_DATA = _der_oid(OID_SIGNED_DATA)
_DER_ENVELOPED_DATA = _der_oid(OID_ENVELOPED_DATA)
_DER_RSA_PKCS1 = _der_tlv(0x30, _der_oid(OID_RSA_ENCRYPTION) + _NULL)
_DER_DIGEST_ALGORITHM = {name: _der_tlv(0x30, _der_oid(oid) + _NULL) for oid, name in _DIGEST_OIDS.items()}
_DER_ECDSA_ALGORITHM = {name: _der_tlv(0x30, _der_oid(oid)) for name, oid in _ECDSA_OID_OF_DIGEST.items()}
_DER_ATTRIBUTE_TYPE = {oid: _der_oid(oid) for oid in (
    OID_CONTENT_TYPE, OID_MESSAGE_DIGEST, OID_MESSAGE_TYPE, OID_TRANSACTION_ID, OID_SIGNING_TIME, OID_SENDER_NONCE,
    OID_RECIPIENT_NONCE, OID_PKI_STATUS, OID_FAIL_INFO, OID_FAIL_INFO_TEXT)}


@functools.lru_cache(maxsize=256)
def _cert_parts(cert: x509.Certificate) -> tuple:
    """(certificate DER, IssuerAndSerialNumber DER, issuer Name DER) of a certificate, computed once per
    certificate.

    The issuer is taken as encoded in the certificate, not a re-encoding of the parsed name.
    """
    der = cert.public_bytes(serialization.Encoding.DER)
    tbs = cert.tbs_certificate_bytes
    try:
        _, pos, _ = _der_read(tbs, 0)
        tag, _, end = _der_read(tbs, pos)
        if tag == 0xA0:  # [0] version
            tag, _, end = _der_read(tbs, end)
        if tag != 0x02:
            raise ValueError("no serialNumber")
        _, _, end = _der_read(tbs, end)  # signature AlgorithmIdentifier
        tag, issuer_start, issuer_end = _der_read(tbs, end)
        if tag != 0x30:
            raise ValueError("no issuer Name")
        issuer = tbs[end:issuer_end]
    except (ValueError, IndexError):  # cryptography parsed it, so this is not expected: let asn1crypto say why
        issuer = asn1_x509.Certificate.load(der)["tbs_certificate"]["issuer"].dump()
    return der, _der_tlv(0x30, issuer + _der_int(cert.serial_number)), issuer


@functools.lru_cache(maxsize=64)
def _key_matches_cert(private_key, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def _is_absent(value) -> bool:
    return value is None or isinstance(value, core.Void)


def _octets(value) -> bytes:
    """The octets of an (possibly constructed, BER) OCTET STRING."""
    if isinstance(value, core.ParsableOctetString):
        return bytes(value)
    return value.native


def _cert_der(cert: x509.Certificate) -> bytes:
    return _cert_parts(cert)[0]


def _asn1_cert(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(_cert_der(cert))


def _subject_key_ids(asn1_cert: asn1_x509.Certificate) -> set:
    """Key identifiers that may name this certificate: its SKI extension and the RFC 5280 SHA-1."""
    ids = {asn1_cert.public_key.sha1}
    try:
        if asn1_cert.key_identifier is not None:
            ids.add(asn1_cert.key_identifier)
    except Exception:  # noqa: BLE001 - a malformed SKI extension just doesn't match
        pass
    return ids


def _rid_matches(rid: cms.Choice, asn1_cert: asn1_x509.Certificate) -> bool:
    """Whether a SignerIdentifier / RecipientIdentifier names this certificate."""
    if rid.name == "issuer_and_serial_number":
        ias = rid.chosen
        tbs = asn1_cert["tbs_certificate"]
        if ias["serial_number"].native != tbs["serial_number"].native:
            return False
        if ias["issuer"].dump() == tbs["issuer"].dump():
            return True
        try:
            return ias["issuer"] == tbs["issuer"]  # asn1crypto's normalised comparison
        except Exception:  # noqa: BLE001
            return False
    if rid.name == "subject_key_identifier":
        return _octets(rid.chosen) in _subject_key_ids(asn1_cert)
    return False


def _name_from_der(der: bytes) -> x509.Name:
    """Parse a DER X.501 Name into a cryptography Name.

    cryptography has no public Name loader, so wrap the Name as the subject of a minimal
    (unsigned, never verified) CertificationRequest and let cryptography parse that: the
    result compares equal to the names cryptography parses out of certificates.
    """
    spki = _der_tlv(0x30, _der_tlv(0x30, bytes.fromhex("06092a864886f70d0101010500")) + _der_tlv(0x03, b"\x00"))
    info = _der_tlv(0x30, b"\x02\x01\x00" + der + spki + b"\xa0\x00")
    wrapper = _der_tlv(0x30, info + _der_tlv(0x30, bytes.fromhex("06092a864886f70d01010b0500"))
                       + _der_tlv(0x03, b"\x00"))
    name = x509.load_der_x509_csr(wrapper).subject
    for rdn in name.rdns:  # force every attribute
        for attribute in rdn:
            attribute.value  # noqa: B018
    return name


def _load_content_info(der: bytes, expected: str, what: str):
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise MalformedRequest(f"{what}: expected bytes, got {type(der).__name__}")
    info = cms.ContentInfo.load(bytes(der), strict=True)
    content_type = info["content_type"].dotted
    if content_type != expected:
        raise MalformedRequest(f"{what}: content type is {content_type}, not {expected}")
    content = info["content"]
    if _is_absent(content):
        raise MalformedRequest(f"{what}: ContentInfo has no content")
    return content


def _certificates(signed_data: cms.SignedData) -> list:
    """(asn1crypto, cryptography) pairs for the plain X.509 certificates in a SignedData."""
    out = []
    certs = signed_data["certificates"]
    if _is_absent(certs):
        return out
    for choice in certs:
        if choice.name != "certificate":
            continue  # attribute certificates and other formats are of no use here
        asn1_cert = choice.chosen
        cert = x509.load_der_x509_certificate(asn1_cert.dump())
        out.append((asn1_cert, cert))
    return out


class _AnyValues(core.SetOf):
    _child_spec = core.Any


class _RawAttribute(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("values", _AnyValues)]


class _RawAttributes(core.SetOf):
    """Attributes read without asn1crypto's per-OID value specs: we check every value ourselves."""
    _child_spec = _RawAttribute


class _IssuerAndSubject(core.Sequence):
    """RFC 8894 IssuerAndSubject, the CertPoll content."""
    _fields = [("issuer", asn1_x509.Name), ("subject", asn1_x509.Name)]


def _read_attributes(der_set: bytes, what: str) -> dict:
    """OID -> list of values (each a loaded universal ASN.1 value) from a DER SET OF Attribute."""
    attrs = {}
    for attribute in _RawAttributes.load(der_set, strict=True):
        oid = attribute["type"].dotted
        if oid in attrs:
            raise MalformedRequest(f"{what}: attribute {oid} appears twice")
        attrs[oid] = [core.Asn1Value.load(value.dump(), strict=True) for value in attribute["values"]]
    return attrs


def _single(attrs: dict, oid: str, name: str):
    values = attrs.get(oid)
    if values is None:
        return None
    if len(values) != 1:
        raise MalformedRequest(f"{name} attribute has {len(values)} values, expected 1")
    return values[0]


def _string_attr(attrs: dict, oid: str, name: str) -> Optional[str]:
    value = _single(attrs, oid, name)
    if value is None:
        return None
    if not isinstance(value, core.AbstractString):
        raise MalformedRequest(f"{name} attribute is not a string")
    return value.native


def _octets_attr(attrs: dict, oid: str, name: str) -> Optional[bytes]:
    value = _single(attrs, oid, name)
    if value is None:
        return None
    if not isinstance(value, core.OctetString):
        raise MalformedRequest(f"{name} attribute is not an OCTET STRING")
    return value.native


def _decimal_attr(attrs: dict, oid: str, name: str) -> Optional[int]:
    text = _string_attr(attrs, oid, name)
    if text is None:
        return None
    if not _DECIMAL.match(text.strip()):
        raise MalformedRequest(f"{name} attribute {text[:20]!r} is not a decimal number")
    return int(text.strip())


def _hash(name: str) -> hashes.HashAlgorithm:
    return _HASHES[name]()


def _digest_name(oid: str, what: str, message=None) -> str:
    name = _DIGEST_OIDS.get(oid)
    if name is None:
        raise _failure(FailInfo.badAlg, f"unsupported {what} digest algorithm {oid}", message)
    return name


def oversized_rsa_exponent(key) -> bool:
    """An RSA public key whose exponent is over 64 bits: verifying with it costs like signing (a 3,072-bit one
    made each CSR signature check cost 5.9 ms instead of 0.05; OpenSSL itself caps it at 64 bits only above
    3,072-bit moduli). Real keys use 65537."""
    return isinstance(key, rsa.RSAPublicKey) and key.public_numbers().e.bit_length() > 64


def _check_rsa_exponent(key, what: str, message=None) -> None:
    """Refuse an oversized RSA exponent (badAlg) before verifying with it."""
    if oversized_rsa_exponent(key):
        raise _failure(FailInfo.badAlg, f"{what}: RSA public exponents over 64 bits are not accepted", message)


def _failure(fail_info: FailInfo, text: str, message: Optional[SignedMessage]) -> ScepFailure:
    failure = ScepFailure(fail_info, text)
    failure.request = message
    return failure


# --- SignedData: parse -----------------------------------------------------------------

@dataclass(frozen=True)
class VerifiedSignedData:
    """A verified CMS SignedData without SCEP semantics (see verify_signed_data)."""
    signer_cert: x509.Certificate
    signer_certs: tuple[x509.Certificate, ...]
    digest: str
    content: Optional[bytes] = field(repr=False)
    content_type: str = OID_DATA
    signing_time: Optional[datetime.datetime] = None


@dataclass(frozen=True)
class _ParsedSigned:
    """What the structural pass read; nothing here is verified yet."""
    signer_cert: x509.Certificate
    signer_certs: tuple[x509.Certificate, ...]
    digest_oid: str
    signature_oid: str
    signature_params: Optional[bytes]
    signature: bytes
    signed_attrs_candidates: tuple
    attrs: dict
    econtent_type: str
    content: Optional[bytes]
    signing_time: Optional[datetime.datetime]


def _signing_time(attrs: dict) -> Optional[datetime.datetime]:
    """signingTime is informational: one that can't be read is reported as None, not refused."""
    time_value = _single(attrs, OID_SIGNING_TIME, "signingTime")
    signing_time = None
    if isinstance(time_value, (core.UTCTime, core.GeneralizedTime)):
        try:
            signing_time = time_value.native
        except Exception:  # noqa: BLE001 - asn1crypto's ValueError on odd time formats
            pass
        if not isinstance(signing_time, datetime.datetime):
            signing_time = None
    return signing_time


def _fast_content_fields(der, content_type: bytes) -> Optional[list]:
    """The fields (as _der_children gives them) of the SEQUENCE in a plain-DER ContentInfo whose contentType is
    the DER OID ``content_type``; None for anything else. ValueError or IndexError on bad DER, which the fast
    paths below turn into None like every other surprise."""
    if not isinstance(der, bytes):
        return None
    tag, start, end = _der_read(der, 0)
    info = _der_children(der, start, end)
    if tag != 0x30 or end != len(der) or len(info) != 2 or info[0][0] != 0x06 or info[1][0] != 0xA0 \
            or der[info[0][3]:info[0][2]] != content_type:
        return None
    inner = _der_children(der, info[1][1], info[1][2])
    if len(inner) != 1 or inner[0][0] != 0x30:
        return None
    return _der_children(der, inner[0][1], inner[0][2])


# Signed attribute values the fast path reads at most (SCEP messages carry seven or eight, one value each); with
# _der_children's cap on each level, this bounds what it allocates, so the value count runs only before asn1crypto.
_FAST_MAX_ATTRIBUTE_VALUES = 64


def _fast_signed_structure(der) -> Optional[_ParsedSigned]:
    """The _ParsedSigned of the common shape of SignedData (plain DER; one signerInfo naming its certificate by
    issuer and serial number; signed attributes; eContent in one primitive OCTET STRING), read with a small DER
    walker; None for anything else, which then takes the asn1crypto path (and its errors). It reads exactly
    what that path reads, from a subset of what it accepts (tests/test_scep_der.py compares the two)."""
    try:
        fields = _fast_content_fields(der, _DER_SIGNED_DATA)
        if fields is None:
            return None
        tags = [f[0] for f in fields]
        if tags[:3] != [0x02, 0x31, 0x30] or tags[-1] != 0x31 or tags[3:-1] not in ([], [0xA0], [0xA0, 0xA1], [0xA1]):
            return None
        # encapContentInfo
        encap = _der_children(der, fields[2][1], fields[2][2])
        if not 1 <= len(encap) <= 2 or encap[0][0] != 0x06:
            return None
        econtent_type = _der_oid_dotted(der[encap[0][1]:encap[0][2]])
        content = None
        if len(encap) == 2:
            # asn1crypto reads eContent by its type (an envelopedData one as an EnvelopedData, not an OCTET
            # STRING, found by scripts/fuzz scep-diff): only id-data takes the fast path
            if encap[1][0] != 0xA0 or econtent_type != OID_DATA:
                return None
            octets = _der_children(der, encap[1][1], encap[1][2])
            if len(octets) != 1 or octets[0][0] != 0x04:
                return None
            content = der[octets[0][1]:octets[0][2]]
        # certificates: the plain ones (SEQUENCE); other CertificateChoices are skipped
        certs = []
        if tags[3:4] == [0xA0]:
            for ctag, cstart, cend, cpos in _der_children(der, fields[3][1], fields[3][2]):
                if ctag == 0x30:
                    certs.append(x509.load_der_x509_certificate(der[cpos:cend]))
                elif ctag not in (0xA0, 0xA1, 0xA2, 0xA3):
                    return None
        signer_infos = _der_children(der, fields[-1][1], fields[-1][2])
        if len(signer_infos) != 1 or signer_infos[0][0] != 0x30:
            return None
        si = _der_children(der, signer_infos[0][1], signer_infos[0][2])
        si_tags = [f[0] for f in si]
        if si_tags[:5] != [0x02, 0x30, 0x30, 0xA0, 0x30] or si_tags[5:] not in ([0x04], [0x04, 0xA1]):
            return None
        # sid: IssuerAndSerialNumber, matched against the certificates as the asn1crypto path does
        sid = _der_children(der, si[1][1], si[1][2])
        if len(sid) != 2 or sid[0][0] != 0x30 or sid[1][0] != 0x02:
            return None
        sid_issuer = der[sid[0][3]:sid[0][2]]
        sid_serial = _der_unsigned_int(der, sid[1][1], sid[1][2])
        signer = None
        for cert in certs:
            if cert.serial_number != sid_serial:
                continue
            if _cert_parts(cert)[2] != sid_issuer:
                return None  # maybe equal after normalisation: asn1crypto decides
            signer = cert
            break
        if signer is None:
            return None
        # digest and signature algorithms
        digest_alg = _der_children(der, si[2][1], si[2][2])
        signature_alg = _der_children(der, si[4][1], si[4][2])
        if not 1 <= len(digest_alg) <= 2 or not 1 <= len(signature_alg) <= 2 or digest_alg[0][0] != 0x06 \
                or signature_alg[0][0] != 0x06:
            return None
        signature_params = None
        if len(signature_alg) == 2:
            if signature_alg[1][0] not in (0x05, 0x30):  # NULL or RSASSA-PSS parameters; asn1crypto judges the
                return None  # rest (e.g. refuses universal tag 0, which scripts/fuzz scep-diff put there)
            signature_params = der[signature_alg[1][3]:signature_alg[1][2]]
        # signed attributes: each value as asn1crypto's universal type, like _read_attributes
        as_received = b"\x31" + der[si[3][3] + 1:si[3][2]]
        attrs = {}
        encoded = []
        values_left = _FAST_MAX_ATTRIBUTE_VALUES
        for atag, astart, aend, apos in _der_children(der, si[3][1], si[3][2], most=values_left):
            parts = _der_children(der, astart, aend)
            if atag != 0x30 or len(parts) != 2 or parts[0][0] != 0x06 or parts[1][0] != 0x31:
                return None
            oid = _der_oid_dotted(der[parts[0][1]:parts[0][2]])
            if oid in attrs:
                return None
            values = _der_children(der, parts[1][1], parts[1][2], most=values_left)
            values_left -= len(values)
            if values_left < 0:
                return None
            attrs[oid] = [core.Asn1Value.load(der[vpos:vend], strict=True) for _, _, vend, vpos in values]
            encoded.append(der[apos:aend])
        as_sorted = b"\x31" + as_received[1:len(as_received) - sum(map(len, encoded))] + b"".join(sorted(encoded))
        signing_time = _signing_time(attrs)
        return _ParsedSigned(
            signer_cert=signer, signer_certs=tuple(certs),
            digest_oid=_der_oid_dotted(der[digest_alg[0][1]:digest_alg[0][2]]),
            signature_oid=_der_oid_dotted(der[signature_alg[0][1]:signature_alg[0][2]]),
            signature_params=signature_params, signature=der[si[5][1]:si[5][2]],
            signed_attrs_candidates=(as_received,) if as_sorted == as_received else (as_received, as_sorted),
            attrs=attrs, econtent_type=econtent_type, content=content, signing_time=signing_time)
    except (ValueError, IndexError, TypeError, MalformedRequest, x509.InvalidVersion):
        # InvalidVersion (not a ValueError): a certificate with version 18 in it, found by scripts/fuzz scep-diff
        return None


@_guard("SignedData")
def _parse_signed_structure(der: bytes) -> _ParsedSigned:
    fast = _fast_signed_structure(der)
    if fast is not None:
        return fast
    _check_value_count(der, "SignedData")  # the fast path allocates a bounded amount; asn1crypto would not
    signed_data = _load_content_info(der, OID_SIGNED_DATA, "SignedData")
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) != 1:
        raise MalformedRequest(f"SignedData has {len(signer_infos)} signerInfos, expected 1")
    signer_info = signer_infos[0]

    certs = _certificates(signed_data)
    sid = signer_info["sid"]
    matches = [cert for asn1_cert, cert in certs if _rid_matches(sid, asn1_cert)]
    if not matches:
        raise MalformedRequest("the signer's certificate is not in the SignedData")

    encap = signed_data["encap_content_info"]
    econtent = encap["content"]

    signed_attrs = signer_info["signed_attrs"]
    if _is_absent(signed_attrs):
        raise MalformedRequest("SignedData has no signed attributes (SCEP needs them)")
    # The signature covers the attributes as a DER SET OF: the received encoding with the
    # [0] tag replaced, or, for signers that did not sort, the sorted re-encoding.
    as_received = _der_tlv(0x31, signed_attrs.contents)
    raw = _RawAttributes.load(as_received, strict=True)
    as_sorted = _der_tlv(0x31, b"".join(sorted(attr.dump() for attr in raw)))
    attrs = _read_attributes(as_received, "signed attributes")

    signing_time = _signing_time(attrs)
    signature_params = signer_info["signature_algorithm"]["parameters"]
    return _ParsedSigned(
        signer_cert=matches[0],
        signer_certs=tuple(cert for _, cert in certs),
        digest_oid=signer_info["digest_algorithm"]["algorithm"].dotted,
        signature_oid=signer_info["signature_algorithm"]["algorithm"].dotted,
        # re-read on use with the right spec
        signature_params=None if _is_absent(signature_params) else signature_params.dump(),
        signature=signer_info["signature"].native,
        signed_attrs_candidates=(as_received,) if as_sorted == as_received else (as_received, as_sorted),
        attrs=attrs,
        econtent_type=encap["content_type"].dotted,
        content=None if _is_absent(econtent) else _octets(econtent),
        signing_time=signing_time,
    )


@_guard("SCEP attributes")
def _scep_message(parsed: _ParsedSigned) -> SignedMessage:
    attrs = parsed.attrs
    message_type = _decimal_attr(attrs, OID_MESSAGE_TYPE, "messageType")
    if message_type is None:
        raise MalformedRequest("no messageType attribute")
    transaction_id = _string_attr(attrs, OID_TRANSACTION_ID, "transactionID")
    if transaction_id is None:
        raise MalformedRequest("no transactionID attribute")
    # Clients send a hash of their key (40 or 64 hex digits) or a short random string; an unbounded one would
    # go into every journal line and log line of the transaction.
    if len(transaction_id) > MAX_TRANSACTION_ID:
        raise MalformedRequest(f"transactionID longer than {MAX_TRANSACTION_ID} characters")
    if not transaction_id.isprintable():
        raise MalformedRequest("transactionID has control characters")
    status_text = _string_attr(attrs, OID_PKI_STATUS, "pkiStatus")
    pki_status = None
    if status_text is not None:
        try:
            pki_status = PkiStatus(status_text.strip())
        except ValueError:
            raise MalformedRequest(f"unknown pkiStatus {status_text[:20]!r}") from None
    if message_type == MessageType.CertRep and pki_status is None:
        raise MalformedRequest("CertRep without pkiStatus")
    return SignedMessage(
        message_type=message_type,
        transaction_id=transaction_id,
        sender_nonce=_octets_attr(attrs, OID_SENDER_NONCE, "senderNonce"),
        recipient_nonce=_octets_attr(attrs, OID_RECIPIENT_NONCE, "recipientNonce"),
        pki_status=pki_status,
        fail_info=_decimal_attr(attrs, OID_FAIL_INFO, "failInfo"),
        fail_info_text=_string_attr(attrs, OID_FAIL_INFO_TEXT, "failInfoText"),
        signer_cert=parsed.signer_cert,
        signer_certs=parsed.signer_certs,
        # an unsupported digest is refused (badAlg) by verification; the FAILURE CertRep then uses SHA-256
        digest=_DIGEST_OIDS.get(parsed.digest_oid, "sha256"),
        content=parsed.content,
        signing_time=parsed.signing_time,
    )


def _pss_padding(params_der, digest: str, message) -> padding.PSS:
    if params_der is None:
        raise _failure(FailInfo.badAlg, "RSASSA-PSS without parameters", message)
    try:
        params = algos.RSASSAPSSParams.load(params_der, strict=True)
        hash_oid = params["hash_algorithm"]["algorithm"].dotted
        mgf = params["mask_gen_algorithm"]
        mgf_oid = mgf["algorithm"].dotted
        mgf_hash_oid = mgf["parameters"]["algorithm"].dotted
        salt_length = params["salt_length"].native
        trailer = params["trailer_field"].native
    except Exception as exc:  # noqa: BLE001
        raise MalformedRequest(f"RSASSA-PSS parameters: {_one_line(exc)}") from None
    pss_hash = _digest_name(hash_oid, "RSASSA-PSS", message)
    if pss_hash != digest:
        raise _failure(FailInfo.badAlg, f"RSASSA-PSS hash {pss_hash} differs from digest {digest}", message)
    if mgf_oid != OID_MGF1 or trailer not in (1, "trailer_field_bc"):
        raise _failure(FailInfo.badAlg, "unsupported RSASSA-PSS mask generation or trailer", message)
    if not isinstance(salt_length, int) or not 0 <= salt_length <= 1024:
        raise MalformedRequest("RSASSA-PSS salt length out of range")
    return padding.PSS(mgf=padding.MGF1(_hash(_digest_name(mgf_hash_oid, "MGF1", message))),
                       salt_length=salt_length)


def _verify_signed(parsed: _ParsedSigned, message: Optional[SignedMessage]) -> None:
    """Check digest and signature; failures carry ``message`` (unverified) as ``.request``."""
    digest = _digest_name(parsed.digest_oid, "signer", message)
    family, implied = _SIGNATURE_OIDS.get(parsed.signature_oid, (None, None))
    if family is None:
        raise _failure(FailInfo.badAlg, f"unsupported signature algorithm {parsed.signature_oid}", message)
    if implied is not None and implied != digest:
        raise _failure(FailInfo.badAlg, f"signature algorithm hash {implied} differs from digest {digest}",
                       message)

    content_type = _single(parsed.attrs, OID_CONTENT_TYPE, "contentType")
    if content_type is not None and (not isinstance(content_type, core.ObjectIdentifier)
                                     or content_type.dotted != parsed.econtent_type):
        raise _failure(FailInfo.badMessageCheck, "contentType attribute differs from the content's type",
                       message)
    message_digest = _octets_attr(parsed.attrs, OID_MESSAGE_DIGEST, "messageDigest")
    if message_digest is None:
        raise _failure(FailInfo.badMessageCheck, "no messageDigest attribute", message)
    # An absent eContent (FAILURE or PENDING CertRep) is digested as the empty string.
    actual = hashlib.new(digest, parsed.content or b"").digest()
    if not hmac.compare_digest(actual, message_digest):
        raise _failure(FailInfo.badMessageCheck, "messageDigest does not match the content", message)

    try:
        public_key = parsed.signer_cert.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise _failure(FailInfo.badAlg, f"unsupported signer key: {_one_line(exc)}", message) from None
    _check_rsa_exponent(public_key, "signer key", message)
    if family in ("rsa", "rsa-pss"):
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise _failure(FailInfo.badAlg, "RSA signature algorithm with a non-RSA signer key", message)
        pad = _pss_padding(parsed.signature_params, digest, message) if family == "rsa-pss" \
            else padding.PKCS1v15()

        def verify(data):
            public_key.verify(parsed.signature, data, pad, _hash(digest))
    else:
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise _failure(FailInfo.badAlg, "ECDSA signature algorithm with a non-EC signer key", message)

        def verify(data):
            public_key.verify(parsed.signature, data, ec.ECDSA(_hash(digest)))

    for data in parsed.signed_attrs_candidates:
        try:
            verify(data)
            return
        except (InvalidSignature, ValueError):
            continue
    raise _failure(FailInfo.badMessageCheck, "the signature does not verify", message)


_verify_signed_guarded = _guard("SignedData verification")(_verify_signed)


def parse_signed(der: bytes) -> SignedMessage:
    """Parse and verify a pkiMessage (ContentInfo with SignedData).

    Finds the signer's certificate among the included certificates, checks messageDigest
    against the content and the signature over the signed attributes (RSA PKCS#1 v1.5
    with rsaEncryption or shaNWithRSAEncryption, RSASSA-PSS, ECDSA). The signer's
    certificate is not validated against any trust anchor: that is the caller's policy.

    Raises MalformedRequest if the structure can't be read or lacks messageType or
    transactionID; ScepFailure(badAlg) for an unsupported digest or signature algorithm;
    ScepFailure(badMessageCheck) for a digest mismatch or a bad signature. Such a
    ScepFailure carries the unverified message as ``.request`` (for the FAILURE CertRep).
    """
    parsed = _parse_signed_structure(der)
    message = _scep_message(parsed)
    _verify_signed_guarded(parsed, message)
    return message


def verify_signed_data(der: bytes) -> VerifiedSignedData:
    """Parse and verify any CMS SignedData with signed attributes, SCEP attributes or not.

    Same checks and errors as parse_signed, without requiring messageType/transactionID
    (e.g. for content signed by ``openssl cms -sign``).
    """
    parsed = _parse_signed_structure(der)
    _verify_signed_guarded(parsed, None)
    return VerifiedSignedData(
        signer_cert=parsed.signer_cert, signer_certs=parsed.signer_certs,
        digest=_DIGEST_OIDS[parsed.digest_oid], content=parsed.content,
        content_type=parsed.econtent_type, signing_time=parsed.signing_time)


# --- SignedData: build -----------------------------------------------------------------

def _utc(moment: datetime.datetime) -> datetime.datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=datetime.timezone.utc)
    return moment.astimezone(datetime.timezone.utc)


def _string_value(text: str) -> bytes:
    """DER PrintableString when the text allows it (as RFC 8894 says), else UTF8String."""
    if _PRINTABLE.match(text):
        return _der_tlv(0x13, text.encode("ascii"))
    return _der_tlv(0x0C, text.encode("utf-8"))


def _attribute(oid: str, value: bytes) -> bytes:
    """DER Attribute with one (DER) value."""
    return _der_tlv(0x30, _DER_ATTRIBUTE_TYPE[oid] + _der_tlv(0x31, value))


def _same_public_key(private_key, cert: x509.Certificate) -> bool:
    return _key_matches_cert(private_key, cert)


# The builders write DER directly (asn1crypto's object model costs milliseconds per message, and the server
# builds one CertRep per enrollment); tests/test_scep_codec.py checks them byte for byte against asn1crypto.

def build_signed(*, signer_key, signer_cert: x509.Certificate, digest: str = "sha256", **fields) -> bytes:
    """Build a pkiMessage: ContentInfo with SignedData carrying the SCEP signed attributes.

    ``fields`` are those of :func:`prepare_signed`; the signature is made here with ``signer_key``.
    Raises ValueError on misuse (unknown digest, key not matching the certificate...).
    """
    if not _same_public_key(signer_key, signer_cert):
        raise ValueError("signer_key does not belong to signer_cert")
    unsigned = prepare_signed(signer_cert=signer_cert, digest=digest, **fields)
    return unsigned.finish(sign_attributes(signer_key, unsigned.to_sign, digest))


class UnsignedMessage:
    """A pkiMessage waiting for its signature: ``to_sign`` (the signed attributes as a DER SET OF) goes to
    :func:`sign_attributes`, and :meth:`finish` puts the signature in."""

    __slots__ = ("to_sign", "_finish")

    def __init__(self, to_sign: bytes, finish: Callable[[bytes], bytes]):
        self.to_sign = to_sign
        self._finish = finish

    def finish(self, signature: bytes) -> bytes:
        """The whole pkiMessage (ContentInfo DER) with ``signature``."""
        return self._finish(signature)


def sign_attributes(signer_key, to_sign: bytes, digest: str = "sha256") -> bytes:
    """The signature of a pkiMessage's signed attributes: RSA PKCS#1 v1.5 or ECDSA (one private-key operation,
    nothing else: a server runs it on another thread)."""
    hash_algorithm = _hash(digest)
    if isinstance(signer_key, rsa.RSAPrivateKey):
        return signer_key.sign(to_sign, padding.PKCS1v15(), hash_algorithm)
    if isinstance(signer_key, ec.EllipticCurvePrivateKey):
        return signer_key.sign(to_sign, ec.ECDSA(hash_algorithm))
    raise ValueError(f"unsupported signer key type {type(signer_key).__name__}")


def prepare_signed(*, message_type: int, transaction_id: str, sender_nonce: Optional[bytes],
                   signer_cert: x509.Certificate, digest: str = "sha256",
                   content: Optional[bytes] = None, pki_status: Optional[PkiStatus] = None,
                   fail_info: Optional[int] = None, fail_info_text: Optional[str] = None,
                   recipient_nonce: Optional[bytes] = None, extra_certs: Iterable[x509.Certificate] = (),
                   signing_time: Optional[datetime.datetime] = None) -> UnsignedMessage:
    """A pkiMessage to be signed by the key of ``signer_cert``; :func:`build_signed` does it all in one go.

    ``content`` (normally EnvelopedData DER) becomes the id-data eContent; when None the
    eContent is absent and messageDigest is the digest of the empty string. RSA signers
    get signatureAlgorithm rsaEncryption (strongSwan 5.9.8 refuses shaNWithRSAEncryption
    there), ECDSA signers ecdsa-with-SHAn. Certificates: the signer's, then extra_certs.
    Raises ValueError on misuse (unknown digest or signer key type...).
    """
    if digest not in _HASHES:
        raise ValueError(f"unsupported digest {digest!r}; use one of {', '.join(_HASHES)}")
    if int(message_type) < 0 or (fail_info is not None and int(fail_info) < 0):
        raise ValueError("message_type and fail_info are non-negative numbers")
    signer_public_key = signer_cert.public_key()
    if isinstance(signer_public_key, rsa.RSAPublicKey):
        signature_algorithm = _DER_RSA_PKCS1
    elif isinstance(signer_public_key, ec.EllipticCurvePublicKey):
        signature_algorithm = _DER_ECDSA_ALGORITHM[digest]
    else:
        raise ValueError(f"unsupported signer key type {type(signer_public_key).__name__}")

    attributes = [
        _attribute(OID_CONTENT_TYPE, _DER_DATA),
        _attribute(OID_MESSAGE_DIGEST, _der_tlv(0x04, hashlib.new(digest, content or b"").digest())),
        _attribute(OID_MESSAGE_TYPE, _der_tlv(0x13, str(int(message_type)).encode("ascii"))),
        _attribute(OID_TRANSACTION_ID, _string_value(transaction_id)),
    ]
    if signing_time is not None:
        moment = _utc(signing_time)
        time = cms.Time({"utc_time": moment}) if 1950 <= moment.year < 2050 \
            else cms.Time({"generalized_time": moment})
        attributes.append(_attribute(OID_SIGNING_TIME, time.dump()))
    if sender_nonce is not None:
        attributes.append(_attribute(OID_SENDER_NONCE, _der_tlv(0x04, bytes(sender_nonce))))
    if recipient_nonce is not None:
        attributes.append(_attribute(OID_RECIPIENT_NONCE, _der_tlv(0x04, bytes(recipient_nonce))))
    if pki_status is not None:
        attributes.append(_attribute(OID_PKI_STATUS, _der_tlv(0x13, PkiStatus(pki_status).value.encode("ascii"))))
    if fail_info is not None:
        attributes.append(_attribute(OID_FAIL_INFO, _der_tlv(0x13, str(int(fail_info)).encode("ascii"))))
    if fail_info_text is not None:
        attributes.append(_attribute(OID_FAIL_INFO_TEXT, _der_tlv(0x0C, fail_info_text.encode("utf-8"))))
    attributes.sort()  # DER SET OF order
    attributes = b"".join(attributes)

    digest_algorithm = _DER_DIGEST_ALGORITHM[digest]
    signer_der, signer_id, _ = _cert_parts(signer_cert)
    encap = _DER_DATA
    if content is not None:
        encap += _der_tlv(0xA0, _der_tlv(0x04, bytes(content)))
    certificates = signer_der + b"".join(_cert_parts(cert)[0] for cert in extra_certs)

    def finish(signature: bytes) -> bytes:
        signer_info = _der_tlv(0x30, b"\x02\x01\x01" + signer_id + digest_algorithm + _der_tlv(0xA0, attributes)
                               + signature_algorithm + _der_tlv(0x04, signature))
        signed_data = _der_tlv(0x30, b"\x02\x01\x01" + _der_tlv(0x31, digest_algorithm) + _der_tlv(0x30, encap)
                               + _der_tlv(0xA0, certificates) + _der_tlv(0x31, signer_info))
        return _der_tlv(0x30, _DER_SIGNED_DATA + _der_tlv(0xA0, signed_data))
    # the signature covers the attributes as a SET OF
    return UnsignedMessage(_der_tlv(0x31, attributes), finish)


# --- EnvelopedData ---------------------------------------------------------------------

def _content_cipher(name: str, key: bytes, iv: bytes) -> Cipher:
    if name.startswith("aes"):
        return Cipher(algorithms.AES(key), modes.CBC(iv))
    if name == "des3":
        return Cipher(TripleDES(key), modes.CBC(iv))
    # Single DES is EDE with three equal keys; cryptography has no DES class of its own.
    return Cipher(TripleDES(key * 3), modes.CBC(iv))


def _key_transport_padding(algorithm) -> padding.AsymmetricPadding:
    """RSA padding for a KeyTransRecipientInfo's keyEncryptionAlgorithm; ScepFailure(badAlg) if unsupported."""
    oid = algorithm["algorithm"].dotted
    if oid == OID_RSA_ENCRYPTION:
        return padding.PKCS1v15()
    if oid != OID_RSAES_OAEP:
        raise ScepFailure(FailInfo.badAlg, f"unsupported key transport algorithm {oid}")
    params = algorithm["parameters"]
    if _is_absent(params):
        params = algos.RSAESOAEPParams.load(b"\x30\x00")  # all defaults: SHA-1, MGF1 with SHA-1
    oaep_hash = _digest_name(params["hash_algorithm"]["algorithm"].dotted, "RSAES-OAEP")
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].dotted != OID_MGF1:
        raise ScepFailure(FailInfo.badAlg, "unsupported RSAES-OAEP mask generation function")
    mgf_hash = _digest_name(mgf["parameters"]["algorithm"].dotted, "MGF1")
    label = params["p_source_algorithm"]["parameters"].native or None
    return padding.OAEP(mgf=padding.MGF1(_hash(mgf_hash)), algorithm=_hash(oaep_hash), label=label)


_PKCS1V15 = padding.PKCS1v15()
_DER_RSA_ENCRYPTION = _der_oid(OID_RSA_ENCRYPTION)


def _fast_envelope_structure(der, allow_des: bool, recipient_cert: x509.Certificate):
    """What _parse_envelope_structure returns, for the common shape of EnvelopedData (plain DER; only key
    transport recipientInfos with RSA PKCS#1 v1.5, all naming ``recipient_cert`` by issuer and serial number; a
    supported cipher with its IV; the ciphertext in one primitive [0]), the recipients as (None, padding,
    encrypted key) since all of them are named; None for anything else, which takes the asn1crypto path."""
    try:
        fields = _fast_content_fields(der, _DER_ENVELOPED_DATA)
        if fields is None:
            return None
        if [f[0] for f in fields[:3]] != [0x02, 0x31, 0x30] or [f[0] for f in fields[3:]] not in ([], [0xA1]):
            return None
        eci = _der_children(der, fields[2][1], fields[2][2])
        if len(eci) != 3 or eci[0][0] != 0x06 or eci[1][0] != 0x30 or eci[2][0] != 0x80:
            return None
        algorithm = _der_children(der, eci[1][1], eci[1][2])
        if len(algorithm) != 2 or algorithm[0][0] != 0x06 or algorithm[1][0] != 0x04:
            return None
        cipher = _CIPHER_OF_OID.get(_der_oid_dotted(der[algorithm[0][1]:algorithm[0][2]]))
        if cipher is None or (cipher == "des" and not allow_des):
            return None
        _, key_length, block = _CIPHER_TABLE[cipher]
        iv = der[algorithm[1][1]:algorithm[1][2]]
        if len(iv) != block:
            return None
        ias = _cert_parts(recipient_cert)[1]
        recipients = []
        for rtag, rstart, rend, _ in _der_children(der, fields[1][1], fields[1][2]):
            ktri = _der_children(der, rstart, rend)
            if rtag != 0x30 or [k[0] for k in ktri] != [0x02, 0x30, 0x30, 0x04] \
                    or der[ktri[1][3]:ktri[1][2]] != ias:
                return None
            algorithm = _der_children(der, ktri[2][1], ktri[2][2])
            if not 1 <= len(algorithm) <= 2 or der[algorithm[0][3]:algorithm[0][2]] != _DER_RSA_ENCRYPTION:
                return None
            recipients.append((None, _PKCS1V15, der[ktri[3][1]:ktri[3][2]]))
        if not recipients:
            return None
        return cipher, key_length, block, iv, der[eci[2][1]:eci[2][2]], recipients
    except (ValueError, IndexError, TypeError):
        return None


@_guard("EnvelopedData")
def _parse_envelope_structure(der: bytes, allow_des: bool):
    enveloped = _load_content_info(der, OID_ENVELOPED_DATA, "EnvelopedData")
    encrypted_info = enveloped["encrypted_content_info"]
    algorithm = encrypted_info["content_encryption_algorithm"]
    cipher = _CIPHER_OF_OID.get(algorithm["algorithm"].dotted)
    if cipher is None:
        raise ScepFailure(FailInfo.badAlg, f"unsupported content cipher {algorithm['algorithm'].dotted}")
    if cipher == "des" and not allow_des:
        raise ScepFailure(FailInfo.badAlg, "single DES is disabled (allow_des is off); use AES or 3DES")
    _, key_length, block = _CIPHER_TABLE[cipher]
    iv = algorithm["parameters"]
    if not isinstance(iv, core.OctetString) or len(iv.native) != block:
        raise MalformedRequest(f"{cipher} content cipher needs a {block}-byte IV")
    encrypted = _encrypted_content(encrypted_info)
    if encrypted is None:
        raise MalformedRequest("EnvelopedData has no encrypted content")

    recipients = []
    unsupported = "no key transport (RSA) recipientInfo"
    for info in enveloped["recipient_infos"]:
        if info.name != "ktri":
            continue
        ktri = info.chosen
        try:
            pad = _key_transport_padding(ktri["key_encryption_algorithm"])
        except ScepFailure as failure:  # maybe another recipient's: ours may still be usable
            unsupported = failure.text
            continue
        rid = ktri["rid"]
        rid.chosen.native  # noqa: B018 - force the parse
        recipients.append((rid, pad, ktri["encrypted_key"].native))
    if not recipients:
        raise ScepFailure(FailInfo.badAlg, unsupported)
    return cipher, key_length, block, iv.native, encrypted, recipients


def _encrypted_content(encrypted_info) -> Optional[bytes]:
    """The encryptedContent octets, also in the constructed (BER) form that micromdm's scepclient sends
    ([0] constructed holding OCTET STRING chunks), which asn1crypto refuses for an implicitly tagged field."""
    try:
        encrypted = encrypted_info["encrypted_content"]
        return None if _is_absent(encrypted) else _octets(encrypted)
    except ValueError:
        pass
    try:
        children = _ber_children(encrypted_info.contents)
        if len(children) < 3 or children[2][0] != 2 or children[2][2] != 0:
            return None
        return _ber_chunks(children[2], depth=0)
    except ValueError as exc:
        raise MalformedRequest(f"EnvelopedData encryptedContent: {_one_line(exc)}") from None


def _ber_children(contents: bytes) -> list:
    # asn1crypto.parser._parse walks with a pointer (linear); its public parse() would need a copy per child
    pointer, children = 0, []
    while pointer < len(contents):
        if len(children) >= 10000:
            raise ValueError("too many elements")
        info, pointer = _ber_parser._parse(contents, len(contents), pointer)
        children.append(info)
    return children


def _ber_chunks(info, depth: int) -> bytes:
    """The octets of a possibly constructed OCTET STRING from asn1crypto.parser's (class, method, tag,
    header, contents, trailer) tuple; nested chunks at most 8 deep."""
    if info[1] == 0:
        return info[4]
    if depth > 8:
        raise ValueError("constructed OCTET STRING nested too deeply")
    out = []
    for chunk in _ber_children(info[4]):
        if chunk[0] != 0 or chunk[2] != 4:
            raise ValueError("a constructed OCTET STRING holds something else")
        out.append(_ber_chunks(chunk, depth + 1))
    return b"".join(out)


_rid_matches_guarded = _guard("recipientInfo")(_rid_matches)


def _decrypt_content(cipher: str, key: bytes, iv: bytes, ciphertext: bytes, block: int) -> Optional[bytes]:
    if not ciphertext or len(ciphertext) % block:
        return None
    decryptor = _content_cipher(cipher, key, iv).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = block_padding.PKCS7(block * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        return None


# The one answer to a message whose encrypted content can't be decrypted, or can't be read once decrypted (see
# getcertd.keyjobs.open_message: telling those apart would be a padding oracle).
UNDECRYPTABLE = "the message's encrypted content could not be decrypted and read"

# The content of a FAILURE or PENDING CertRep, which carries no pkcsPKIEnvelope: an empty eContent rather than
# none. certmonger (OpenSSL's PKCS7 verify) can't read a SignedData without content ("PKCS7 routines::no
# content"), takes the refusal for an unreachable CA and sends the request again and again (a wrong
# challengePassword: a failed login each time); with an empty one it reports the refusal. The messageDigest
# is the same: the digest of the empty string.
NO_ENVELOPE = b""

MAX_KEY_TRANSPORT_TRIES = 4  # recipientInfos tried with our key, at most


class SealedEnvelope:
    """A parsed EnvelopedData addressed to us, not yet opened (see :func:`open_envelope`).

    Opening is two steps so that a server can run the RSA private-key operation alone on another thread and
    keep the rest (Python) on its own: :meth:`unwrap` (the recipientInfos' encrypted content keys through the
    private key: one foreign call each, nothing else) and :meth:`open` (the content cipher and its padding).
    """

    __slots__ = ("cipher", "_key_length", "_block", "_iv", "_ciphertext", "_named")

    def __init__(self, cipher, key_length, block, iv, ciphertext, named):
        self.cipher = cipher
        self._key_length, self._block, self._iv, self._ciphertext = key_length, block, iv, ciphertext
        self._named = named

    def unwrap(self, recipient_key) -> list:
        """The content-encryption key from each candidate recipientInfo (b"" where RSA refused it)."""
        keys = []
        for _, pad, encrypted_key in self._named:
            try:
                keys.append(recipient_key.decrypt(encrypted_key, pad))
            except ValueError:
                keys.append(b"")
        return keys

    def open(self, keys: list) -> tuple[bytes, str]:
        """(plaintext, cipher name) with the first of ``keys`` (from :meth:`unwrap`) that decrypts the content.

        A failed RSA unwrap is not reported as such: a random content key is used instead (and OpenSSL's
        implicit rejection does the same inside), so a wrong key, bad RSA padding and bad content padding all
        end in the same ScepFailure(badMessageCheck).
        """
        for key in keys:
            if len(key) != self._key_length:
                key = os.urandom(self._key_length)
            plaintext = _decrypt_content(self.cipher, key, self._iv, self._ciphertext, self._block)
            if plaintext is not None:
                return plaintext, self.cipher
        raise ScepFailure(FailInfo.badMessageCheck, UNDECRYPTABLE)


def open_envelope(der: bytes, recipient_cert: x509.Certificate, allow_des: bool = False) -> SealedEnvelope:
    """Read an EnvelopedData (ContentInfo DER) addressed to recipient_cert, up to its RSA key transport.

    Key transport: RSA PKCS#1 v1.5 or RSAES-OAEP (any of our digests). Content ciphers: aes128/aes192/aes256-CBC,
    des3 (des-ede3-cbc), and des (des-cbc) only if allow_des. The recipientInfo naming recipient_cert is used;
    if none does, each key transport recipientInfo is a candidate.
    Unsupported algorithms -> ScepFailure(badAlg); unreadable structure -> MalformedRequest.
    """
    fast = _fast_envelope_structure(der, allow_des, recipient_cert)
    if fast is not None:
        cipher, key_length, block, iv, ciphertext, named = fast
    else:
        _check_value_count(der, "EnvelopedData")  # the fast path allocates a bounded amount; asn1crypto would not
        cipher, key_length, block, iv, ciphertext, recipients = _parse_envelope_structure(der, allow_des)
        asn1_cert = _asn1_cert(recipient_cert)
        named = [r for r in recipients if _rid_matches_guarded(r[0], asn1_cert)] or recipients
    # Each candidate costs an RSA decryption; SCEP has one recipient. A message with thousands of recipientInfos
    # naming nobody would otherwise cost a private-key operation each.
    return SealedEnvelope(cipher, key_length, block, iv, ciphertext, named[:MAX_KEY_TRANSPORT_TRIES])


def decrypt_envelope(der: bytes, recipient_key, recipient_cert: x509.Certificate,
                     allow_des: bool = False) -> tuple[bytes, str]:
    """Open an EnvelopedData addressed to recipient_cert with its key: (plaintext, cipher name).

    :func:`open_envelope`, then :meth:`SealedEnvelope.unwrap` and :meth:`SealedEnvelope.open` in one go.
    """
    sealed = open_envelope(der, recipient_cert, allow_des)
    if not isinstance(recipient_key, rsa.RSAPrivateKey):
        raise ScepFailure(FailInfo.badAlg, "the recipient key is not an RSA key")
    return sealed.open(sealed.unwrap(recipient_key))


def build_envelope(plaintext: bytes, recipient_cert: x509.Certificate, cipher: str = "aes256",
                   oaep: bool = False, *, random: Callable[[int], bytes] = os.urandom,
                   oaep_hash: str = "sha1") -> bytes:
    """Encrypt plaintext for recipient_cert's RSA key: ContentInfo with EnvelopedData DER.

    cipher is one of CIPHERS; key transport is RSA PKCS#1 v1.5, or RSAES-OAEP with
    oaep_hash (MGF1 with the same hash) when oaep is true. ``random`` supplies the
    content key and IV (the RSA padding uses cryptography's own generator). A recipient
    certificate without an RSA key raises ScepFailure(badAlg): SCEP needs key transport.
    """
    if cipher not in _CIPHER_TABLE:
        raise ValueError(f"unsupported cipher {cipher!r}; use one of {', '.join(_CIPHER_TABLE)}")
    if oaep and oaep_hash not in _HASHES:
        raise ValueError(f"unsupported OAEP hash {oaep_hash!r}")
    public_key = recipient_cert.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ScepFailure(FailInfo.badAlg, "the recipient's certificate has no RSA key for key transport")
    oid, key_length, block = _CIPHER_TABLE[cipher]
    key = random(key_length)
    iv = random(block)
    padder = block_padding.PKCS7(block * 8).padder()
    encryptor = _content_cipher(cipher, key, iv).encryptor()
    ciphertext = encryptor.update(padder.update(bytes(plaintext)) + padder.finalize()) + encryptor.finalize()

    if oaep:
        pad = padding.OAEP(mgf=padding.MGF1(_hash(oaep_hash)), algorithm=_hash(oaep_hash), label=None)
        key_encryption = _oaep_algorithm(oaep_hash)
    else:
        pad = padding.PKCS1v15()
        key_encryption = _DER_RSA_PKCS1
    ktri = _der_tlv(0x30, b"\x02\x01\x00" + _cert_parts(recipient_cert)[1] + key_encryption
                    + _der_tlv(0x04, public_key.encrypt(key, pad)))
    encrypted_content_info = _der_tlv(0x30, _DER_DATA + _der_tlv(0x30, _der_oid(oid) + _der_tlv(0x04, iv))
                                      + _der_tlv(0x80, ciphertext))
    enveloped = _der_tlv(0x30, b"\x02\x01\x00" + _der_tlv(0x31, ktri) + encrypted_content_info)
    return _der_tlv(0x30, _DER_ENVELOPED_DATA + _der_tlv(0xA0, enveloped))


@functools.lru_cache(maxsize=None)
def _oaep_algorithm(oaep_hash: str) -> bytes:
    """DER AlgorithmIdentifier of RSAES-OAEP with oaep_hash (and MGF1 with it)."""
    if oaep_hash == "sha1":
        # All defaults: an empty SEQUENCE (asn1crypto won't build one from {}).
        params = algos.RSAESOAEPParams.load(b"\x30\x00")
    else:
        params = {"hash_algorithm": {"algorithm": oaep_hash},
                  "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": oaep_hash}}}
    return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": params}).dump()


# --- degenerate PKCS#7 (certs-only) ----------------------------------------------------

def degenerate_pkcs7(certs: Sequence[x509.Certificate],
                     crls: Sequence[x509.CertificateRevocationList] = ()) -> bytes:
    """A certs-only SignedData (no signers, no content), certificates in the given order."""
    return certs_only([_cert_der(cert) for cert in certs],
                      [crl.public_bytes(serialization.Encoding.DER) for crl in crls])


def certs_only(cert_ders: Sequence[bytes], crl_ders: Sequence[bytes] = ()) -> bytes:
    """:func:`degenerate_pkcs7` of certificates and CRLs already in DER."""
    body = b"\x02\x01\x01\x31\x00" + _der_tlv(0x30, _DER_DATA)
    if cert_ders:
        body += _der_tlv(0xA0, b"".join(cert_ders))
    if crl_ders:
        body += _der_tlv(0xA1, b"".join(crl_ders))
    body += b"\x31\x00"
    return _der_tlv(0x30, _DER_SIGNED_DATA + _der_tlv(0xA0, _der_tlv(0x30, body)))


@_guard("degenerate PKCS#7")
def parse_degenerate(der: bytes) -> tuple[list[x509.Certificate], list[x509.CertificateRevocationList]]:
    """(certificates, crls) from a SignedData, as cryptography objects in encoded order.

    Signers, if any, are ignored: this reads the certs-only reply inside a CertRep or a
    GetCACert answer. Raises only MalformedRequest.
    """
    signed_data = _load_content_info(der, OID_SIGNED_DATA, "degenerate PKCS#7")
    certs = [cert for _, cert in _certificates(signed_data)]
    crls = []
    revocation = signed_data["crls"]
    if not _is_absent(revocation):
        for choice in revocation:
            if choice.name == "crl":
                crl = x509.load_der_x509_crl(choice.chosen.dump())
                crl.issuer  # noqa: B018 - force the parse
                crls.append(crl)
    return certs, crls


# --- message contents: IssuerAndSerialNumber, IssuerAndSubject, CSR ---------------------

@_guard("IssuerAndSerialNumber")
def parse_issuer_and_serial(der: bytes) -> tuple[x509.Name, int]:
    """(issuer Name, serial int) from a GetCert / GetCRL content. Raises only MalformedRequest."""
    _check_value_count(der, "IssuerAndSerialNumber")
    value = cms.IssuerAndSerialNumber.load(bytes(der), strict=True)
    return _name_from_der(value["issuer"].dump()), value["serial_number"].native


def build_issuer_and_serial(issuer: x509.Name, serial: int) -> bytes:
    """DER IssuerAndSerialNumber, the content of GetCert and GetCRL."""
    return cms.IssuerAndSerialNumber({
        "issuer": asn1_x509.Name.load(issuer.public_bytes()),
        "serial_number": int(serial),
    }).dump()


@_guard("IssuerAndSubject")
def parse_issuer_and_subject(der: bytes) -> tuple[x509.Name, x509.Name]:
    """(issuer Name, subject Name) from a CertPoll content. Raises only MalformedRequest."""
    _check_value_count(der, "IssuerAndSubject")
    value = _IssuerAndSubject.load(bytes(der), strict=True)
    return _name_from_der(value["issuer"].dump()), _name_from_der(value["subject"].dump())


def build_issuer_and_subject(issuer: x509.Name, subject: x509.Name) -> bytes:
    """DER IssuerAndSubject, the content of CertPoll."""
    return _IssuerAndSubject({
        "issuer": asn1_x509.Name.load(issuer.public_bytes()),
        "subject": asn1_x509.Name.load(subject.public_bytes()),
    }).dump()


def _csr_shape(der: bytes) -> Optional[bool]:
    """For a v1 (version 0) CertificationRequest in plain DER: whether its attributes are empty; else None."""
    try:
        tag, start, end = _der_read(der, 0)
        request = _der_children(der, start, end)
        if tag != 0x30 or end != len(der) or [r[0] for r in request] != [0x30, 0x30, 0x03]:
            return None
        info = _der_children(der, request[0][1], request[0][2])
        if [i[0] for i in info] != [0x02, 0x30, 0x30, 0xA0] or der[info[0][3]:info[0][2]] != b"\x02\x01\x00":
            return None
        return info[3][1] == info[3][2]
    except (ValueError, IndexError):
        return None


@_guard("CSR")
def _load_csr(der: bytes) -> tuple:
    """(csr, legacy) where legacy is None, or what is needed to check a non-v1 CSR's POP.

    cryptography refuses a CSR whose version is not 0 ("v1"), but some clients send 1 or
    2 (an Apple device's PKCSReq among our vectors, older certbot). Such a CSR is loaded
    with its version rewritten to 0 and its signature is checked here over the original
    CertificationRequestInfo: legacy = (info DER, signature algorithm, signature).
    """
    der = bytes(der)
    shape = _csr_shape(der)
    if shape is not True:  # attributes (asn1crypto reads them) or another shape: count first
        _check_value_count(der, "CSR")
    if shape is not None:  # the common case, v1, is read by cryptography alone (and attributes)
        try:
            csr = x509.load_der_x509_csr(der)
            csr.subject.rdns  # noqa: B018 - force what the policy will read
            csr.extensions  # noqa: B018
            csr.signature_algorithm_oid  # noqa: B018
            challenge_password(csr)
            return csr, None
        except Exception:  # noqa: BLE001 - the path below gives the error it always gave
            pass
    request = asn1_csr.CertificationRequest.load(der, strict=True)
    info = request["certification_request_info"]
    version = info["version"].native
    legacy = None
    if version != "v1":
        if version not in (1, 2):
            raise MalformedRequest(f"CSR version {version!r} is not supported")
        legacy = (info.dump(), request["signature_algorithm"]["algorithm"].dotted, request["signature"].native)
        fixed = info.copy()
        fixed["version"] = "v1"
        der = asn1_csr.CertificationRequest({
            "certification_request_info": fixed,
            "signature_algorithm": request["signature_algorithm"],
            "signature": request["signature"],
        }).dump()
    csr = x509.load_der_x509_csr(der)
    csr.subject.rdns  # noqa: B018 - force what the policy will read
    csr.extensions  # noqa: B018
    csr.signature_algorithm_oid  # noqa: B018
    challenge_password(csr)
    return csr, legacy


# CSR signature algorithms cryptography verifies itself; SHA-1 ones (which it no longer verifies, and which older
# SCEP clients still sign their requests with: a proof of possession, not a signature anyone relies on later)
# are checked by _pop_valid; anything else (MD5, MD2, SHA-224 ...) is badAlg.
_CSR_SIGNATURES = frozenset(oid for oid, (family, digest) in _SIGNATURE_OIDS.items()
                            if digest not in (None, "sha1")) | {"1.3.101.112", OID_RSASSA_PSS}  # Ed25519, PSS


def _pop_valid(csr: x509.CertificateSigningRequest, info_der: bytes, algorithm: str, signature: bytes) -> bool:
    """The CSR's proof of possession checked over ``info_der`` (the CertificationRequestInfo as received)."""
    family, digest = _SIGNATURE_OIDS.get(algorithm, (None, None))
    if digest is None:
        raise ScepFailure(FailInfo.badAlg, f"unsupported CSR signature algorithm {algorithm}")
    public_key = csr.public_key()
    try:
        if family == "rsa" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, info_der, padding.PKCS1v15(), _hash(digest))
        elif family == "ecdsa" and isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, info_der, ec.ECDSA(_hash(digest)))
        else:
            raise ScepFailure(FailInfo.badAlg, "the CSR's signature algorithm does not fit its key")
    except (InvalidSignature, ValueError):
        return False
    return True


def parse_csr(der: bytes) -> x509.CertificateSigningRequest:
    """Load a PKCS#10 request and check its proof of possession.

    MalformedRequest if it doesn't parse (including its extensions and challengePassword);
    ScepFailure(badAlg) for an unsupported key or signature algorithm;
    ScepFailure(badMessageCheck) if the self-signature does not verify.

    A CSR with version 1 or 2 instead of 0 is accepted (some clients send it): the
    returned object then has version 0, so its own ``is_signature_valid`` is False;
    the proof of possession was checked here over the bytes as received.
    """
    csr, legacy = _load_csr(der)
    try:
        key = csr.public_key()
        _check_rsa_exponent(key, "CSR key")
        if isinstance(key, rsa.RSAPublicKey) and key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
                not in csr.tbs_certrequest_bytes and \
                asn1_csr.CertificationRequestInfo.load(csr.tbs_certrequest_bytes)["subject_pk_info"]["algorithm"][
                    "algorithm"].dotted == OID_RSASSA_PSS:
            # cryptography reads an id-RSASSA-PSS key as plain RSA; the certificate would then carry it as
            # rsaEncryption, lifting the key's restriction to PSS
            raise ScepFailure(FailInfo.badAlg, "RSASSA-PSS keys (id-RSASSA-PSS) are not supported; use an "
                                               "rsaEncryption RSA key")
        algorithm = csr.signature_algorithm_oid.dotted_string
        if legacy is not None:
            valid = _pop_valid(csr, *legacy)
        elif algorithm in _CSR_SIGNATURES:
            valid = csr.is_signature_valid
        else:
            valid = _pop_valid(csr, csr.tbs_certrequest_bytes, algorithm, csr.signature)
    except UnsupportedAlgorithm as exc:
        raise ScepFailure(FailInfo.badAlg, f"CSR: {_one_line(exc)}") from None
    except ValueError as exc:
        raise MalformedRequest(f"CSR: {_one_line(exc)}") from None
    if not valid:
        raise ScepFailure(FailInfo.badMessageCheck, "the CSR's signature (proof of possession) does not verify")
    return csr


@_guard("CSR challengePassword")
def challenge_password(csr: x509.CertificateSigningRequest) -> Optional[str]:
    """The PKCS#9 challengePassword of a CSR (any directory string type), or None."""
    der = csr.public_bytes(serialization.Encoding.DER)
    if _csr_shape(der):  # no attributes at all
        return None
    request = asn1_csr.CertificationRequest.load(der)
    attributes = request["certification_request_info"]["attributes"]
    if _is_absent(attributes):
        return None
    attrs = _read_attributes(_der_tlv(0x31, attributes.contents), "CSR attributes")
    return _string_attr(attrs, OID_CHALLENGE_PASSWORD, "challengePassword")


# --- convenience builders --------------------------------------------------------------

def build_request(message_type: int, inner: bytes, *, recipient_cert: x509.Certificate, signer_key,
                  signer_cert: x509.Certificate, transaction_id: str, sender_nonce: bytes,
                  cipher: str = "aes256", digest: str = "sha256", oaep: bool = False,
                  extra_certs: Iterable[x509.Certificate] = (),
                  signing_time: Optional[datetime.datetime] = None,
                  random: Callable[[int], bytes] = os.urandom) -> bytes:
    """A client request: inner encrypted to recipient_cert (the CA/RA), then signed."""
    envelope = build_envelope(inner, recipient_cert, cipher, oaep, random=random)
    return build_signed(message_type=message_type, transaction_id=transaction_id,
                        sender_nonce=sender_nonce, signer_key=signer_key, signer_cert=signer_cert,
                        digest=digest, content=envelope, extra_certs=extra_certs,
                        signing_time=signing_time)


def build_pkcs_req(csr, **kwargs) -> bytes:
    """PKCSReq (or RenewalReq with message_type=) for a CSR object or DER; kwargs as build_request."""
    der = csr if isinstance(csr, (bytes, bytearray)) else csr.public_bytes(serialization.Encoding.DER)
    message_type = kwargs.pop("message_type", MessageType.PKCSReq)
    return build_request(message_type, bytes(der), **kwargs)


def build_cert_poll(issuer: x509.Name, subject: x509.Name, **kwargs) -> bytes:
    """CertPoll (IssuerAndSubject); kwargs as build_request."""
    return build_request(MessageType.CertPoll, build_issuer_and_subject(issuer, subject), **kwargs)


def build_get_cert(issuer: x509.Name, serial: int, **kwargs) -> bytes:
    """GetCert (IssuerAndSerialNumber); kwargs as build_request."""
    return build_request(MessageType.GetCert, build_issuer_and_serial(issuer, serial), **kwargs)


def build_get_crl(issuer: x509.Name, serial: int, **kwargs) -> bytes:
    """GetCRL (IssuerAndSerialNumber of a certificate); kwargs as build_request."""
    return build_request(MessageType.GetCRL, build_issuer_and_serial(issuer, serial), **kwargs)


def build_cert_rep(*, request: SignedMessage, pki_status: PkiStatus, signer_key,
                   signer_cert: x509.Certificate, sender_nonce: bytes,
                   certs: Sequence[x509.Certificate] = (),
                   crls: Sequence[x509.CertificateRevocationList] = (),
                   cipher: Optional[str] = None, fail_info: Optional[int] = None,
                   fail_info_text: Optional[str] = None, digest: Optional[str] = None,
                   extra_certs: Iterable[x509.Certificate] = (),
                   signing_time: Optional[datetime.datetime] = None,
                   random: Callable[[int], bytes] = os.urandom) -> bytes:
    """A CertRep answering request (same transactionID, recipientNonce = its senderNonce).

    SUCCESS: a degenerate PKCS#7 of certs (and crls, for GetCRL) encrypted with ``cipher``
    (pass the one decrypt_envelope reported for the request) to the requester's signer
    certificate. FAILURE: fail_info (required) and fail_info_text, an empty content
    (NO_ENVELOPE). PENDING: an empty content. ``digest`` defaults to the request's.
    ``sender_nonce`` is the server's fresh one.
    """
    pki_status = PkiStatus(pki_status)
    content = NO_ENVELOPE
    if pki_status is PkiStatus.SUCCESS:
        if not certs and not crls:
            raise ValueError("a SUCCESS CertRep needs certificates or CRLs")
        if cipher is None:
            raise ValueError("a SUCCESS CertRep needs the cipher the request used")
        content = build_envelope(degenerate_pkcs7(certs, crls), request.signer_cert, cipher, random=random)
        fail_info = fail_info_text = None
    elif pki_status is PkiStatus.FAILURE:
        if fail_info is None:
            raise ValueError("a FAILURE CertRep needs fail_info")
    else:
        fail_info = fail_info_text = None
    if digest is None:
        digest = request.digest
    return build_signed(message_type=MessageType.CertRep, transaction_id=request.transaction_id,
                        sender_nonce=sender_nonce, recipient_nonce=request.sender_nonce,
                        signer_key=signer_key, signer_cert=signer_cert, digest=digest,
                        content=content, pki_status=pki_status, fail_info=fail_info,
                        fail_info_text=fail_info_text, extra_certs=extra_certs,
                        signing_time=signing_time)


# --- identifiers -----------------------------------------------------------------------

def new_transaction_id(public_key) -> str:
    """A transactionID for a key: upper-case hex SHA-256 of its SubjectPublicKeyInfo.

    The same key gives the same ID (strongSwan does the same with SHA-1), which is what
    lets a client poll for or re-send a request.
    """
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest().upper()


def new_nonce(random: Callable[[int], bytes] = os.urandom) -> bytes:
    """A fresh 16-byte senderNonce."""
    return random(16)
