"""The work of an enrollment that needs the CA's or the RA's private key, as jobs of plain values (layer 1).

A key helper process (getcertd.keyhelper, run by getcertd.helpers) does these jobs, so that the CMS parsing,
the decryption, the certificate building and the CertRep building of many requests run on all the cores, each
helper with its own interpreter, while the reactor thread serves HTTP, authenticates and decides. Tests call
the same functions in-process.

* :func:`open_message`: a PKIOperation body -> the verified message, its decrypted content and, for PKCSReq and
  RenewalReq, the CSR (its proof of possession checked).
* :func:`certificate`: the policy's decision -> the signed certificate (DER).
* :func:`cert_rep`: the answer's fields -> the signed CertRep (DER).

Across the process boundary: jobs (from the appliance, trusted) are marshal'd tuples of plain values; results
(from a process that parses untrusted input) are flat lists of byte strings, read here without an unpickler.
"""
import datetime
import ipaddress
import marshal
import struct
from dataclasses import dataclass
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.name import _ASN1Type

from getcertd import scep
from getcertd.ca import CertificateAuthority
from getcertd.errors import FailInfo, KeyJobFailed, MalformedRequest, ScepFailure

# Message types whose content is decrypted with the RA key, and how that content is read; the first two carry
# a CSR. A CertPoll's content (IssuerAndSubject) is not decrypted: it is answered by its transactionID.
_WITH_CSR = (scep.MessageType.PKCSReq, scep.MessageType.RenewalReq)
_CONTENT = {scep.MessageType.PKCSReq: scep.parse_csr, scep.MessageType.RenewalReq: scep.parse_csr,
            scep.MessageType.GetCert: scep.parse_issuer_and_serial,
            scep.MessageType.GetCRL: scep.parse_issuer_and_serial}
_ENVELOPED = tuple(_CONTENT) + (scep.MessageType.CertPoll,)

# The one answer, per message type, to an encrypted content that can't be decrypted and read. Whoever resends a
# recorded request's envelope, altered, inside a message signed by a key of their own must learn nothing of what
# it decrypts to: an answer that told bad padding from good (a padding oracle) or told back any part of the
# content would decrypt it, challengePassword included. A CSR's proof of possession authenticates it, so what
# follows a verified CSR may differ; GetCert and GetCRL contents are not authenticated, so "not known here" is
# this same answer (getcertd.enroll).
_UNREADABLE = {
    scep.MessageType.PKCSReq: (FailInfo.badMessageCheck, scep.UNDECRYPTABLE),
    scep.MessageType.RenewalReq: (FailInfo.badMessageCheck, scep.UNDECRYPTABLE),
    scep.MessageType.GetCert: (FailInfo.badCertId, "no certificate of this CA is known with the serial number asked "
                                                   "for, or the request could not be decrypted and read"),
    scep.MessageType.GetCRL: (FailInfo.badCertId, "no CRL is published for the issuer asked for, or the request "
                                                  "could not be decrypted and read"),
}


def unreadable(message_type: int, detail: Optional[str] = None) -> ScepFailure:
    """The refusal of an encrypted content that can't be decrypted and read (``detail``: for the log only)."""
    return ScepFailure(*_UNREADABLE[message_type], detail=detail)


@dataclass(frozen=True)
class Opened:
    """A PKIOperation, verified and opened: ``plaintext`` and ``cipher`` for the message types that carry an
    encrypted request, ``csr_der`` (proof of possession checked) for PKCSReq and RenewalReq."""
    message: scep.SignedMessage
    plaintext: Optional[bytes] = None
    cipher: Optional[str] = None
    csr_der: Optional[bytes] = None

    def csr(self) -> x509.CertificateSigningRequest:
        return x509.load_der_x509_csr(self.csr_der)


@dataclass(frozen=True)
class KeyMaterial:
    """What the jobs need: the CA (key and certificate), the key and certificate that decrypt requests and sign
    CertReps (the RA's, or the CA's without an RA), and whether single DES is accepted."""
    ca: CertificateAuthority
    signer_key: object
    signer_cert: x509.Certificate
    allow_des: bool = False

    def dumps(self) -> bytes:
        """The material for a helper process (sent over its stdin pipe, never in its arguments or a file)."""
        def key(k):
            return k.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())

        def cert(c):
            return c.public_bytes(serialization.Encoding.DER)
        return marshal.dumps((key(self.ca.key), cert(self.ca.certificate), key(self.signer_key),
                              cert(self.signer_cert), self.allow_des))

    @classmethod
    def loads(cls, data: bytes) -> "KeyMaterial":
        ca_key, ca_cert, signer_key, signer_cert, allow_des = marshal.loads(data)
        load_key = serialization.load_der_private_key
        ca = CertificateAuthority(load_key(ca_key, None), x509.load_der_x509_certificate(ca_cert))
        signer = ca.key if signer_key == ca_key else load_key(signer_key, None)
        return cls(ca, signer, x509.load_der_x509_certificate(signer_cert), bool(allow_des))


# --- the jobs -------------------------------------------------------------------------------------------------

def open_message(material: KeyMaterial, body: bytes) -> Opened:
    """Verify a pkiMessage and open what it carries. MalformedRequest when it can't be read; ScepFailure, with the
    message as ``.request`` once it was read, when it can't be granted (bad signature, algorithm, CSR)."""
    msg = scep.parse_signed(body)
    if msg.message_type not in _ENVELOPED:
        return Opened(msg)
    try:
        if msg.message_type in _WITH_CSR and not isinstance(msg.signer_cert.public_key(), rsa.RSAPublicKey):
            raise ScepFailure(FailInfo.badAlg, "the message signer needs an RSA key: SCEP returns the certificate "
                                               "encrypted to it (the CSR's own key may be EC or Ed25519)")
        if msg.content is None:
            raise ScepFailure(FailInfo.badRequest, "the message carries no enveloped content")
        sealed = scep.open_envelope(msg.content, material.signer_cert, material.allow_des)  # what is in the clear
        read = _CONTENT.get(msg.message_type)
        if read is None:  # CertPoll
            return Opened(msg, None, sealed.cipher)
        try:
            plaintext, cipher = sealed.open(sealed.unwrap(material.signer_key))
        except ScepFailure:
            raise unreadable(msg.message_type) from None
        try:
            content = read(plaintext)
        except (MalformedRequest, ScepFailure) as e:  # why (a parser's words, not the content) for the log only
            raise unreadable(msg.message_type, str(e)) from None
        csr_der = content.public_bytes(serialization.Encoding.DER) if msg.message_type in _WITH_CSR else None
    except ScepFailure as failure:
        failure.request = msg
        raise
    return Opened(msg, plaintext, cipher, csr_der)


def certificate_job(public_key, decision, serial: int, crl_url: Optional[str]) -> tuple:
    """The job for :func:`certificate`, from a policy decision (getcertd.policy.Decision)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    subject = tuple(tuple((a.oid.dotted_string, a.value, a._type.value) for a in rdn) for rdn in decision.subject.rdns)
    return (spki, subject, tuple(_general_name(g) for g in decision.san), decision.not_before.isoformat(),
            decision.not_after.isoformat(), serial, tuple(decision.eku), crl_url)


def certificate(material: KeyMaterial, job: tuple) -> bytes:
    """Build and sign the certificate of :func:`certificate_job`; its DER."""
    spki, subject, san, not_before, not_after, serial, eku, crl_url = job
    name = x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(x509.ObjectIdentifier(oid), value,
                                                                         _ASN1Type(kind))
                                                      for oid, value, kind in rdn]) for rdn in subject])
    builder = material.ca.end_entity(serialization.load_der_public_key(spki), name,
                                     [_GENERAL_NAMES[kind](value) for kind, value in san],
                                     datetime.datetime.fromisoformat(not_before),
                                     datetime.datetime.fromisoformat(not_after), serial, eku, crl_url)
    return material.ca.sign(builder).public_bytes(serialization.Encoding.DER)


def cert_rep_job(msg: scep.SignedMessage, status: scep.PkiStatus, content: Optional[bytes] = None,
                 cipher: str = "aes256", fail_info: Optional[FailInfo] = None,
                 fail_info_text: Optional[str] = None) -> tuple:
    """The job for :func:`cert_rep`: the answer to ``msg``, with ``content`` (certs-only PKCS#7) encrypted to
    its signer."""
    return (status.value, None if fail_info is None else int(fail_info), fail_info_text, msg.transaction_id,
            msg.sender_nonce, msg.digest, msg.signer_cert.public_bytes(serialization.Encoding.DER), content, cipher)


def cert_rep(material: KeyMaterial, job: tuple) -> bytes:
    """The signed CertRep of :func:`cert_rep_job`."""
    status, fail_info, fail_info_text, transaction_id, recipient_nonce, digest, recipient, content, cipher = job
    envelope = scep.NO_ENVELOPE
    if content is not None:
        envelope = scep.build_envelope(content, x509.load_der_x509_certificate(recipient), cipher=cipher)
    unsigned = scep.prepare_signed(
        message_type=scep.MessageType.CertRep, transaction_id=transaction_id, sender_nonce=scep.new_nonce(),
        recipient_nonce=recipient_nonce, signer_cert=material.signer_cert, digest=digest, content=envelope,
        pki_status=scep.PkiStatus(status), fail_info=None if fail_info is None else FailInfo(fail_info),
        fail_info_text=fail_info_text)
    return unsigned.finish(scep.sign_attributes(material.signer_key, unsigned.to_sign, digest))


_GENERAL_NAMES = {"email": x509.RFC822Name, "dns": x509.DNSName, "uri": x509.UniformResourceIdentifier,
                  "ip": lambda v: x509.IPAddress(ipaddress.ip_address(v))}
_KIND_OF = {x509.RFC822Name: "email", x509.DNSName: "dns", x509.UniformResourceIdentifier: "uri",
            x509.IPAddress: "ip"}


def _general_name(g) -> tuple:
    kind = _KIND_OF.get(type(g))
    if kind is None:
        raise ValueError(f"a subjectAltName of type {type(g).__name__} can't be sent to a key helper")
    return kind, str(g.value)


OPS = {"open": open_message, "certificate": certificate, "cert_rep": cert_rep}


# --- frames on the pipes, both ways: a 4-byte big-endian length, then that many bytes ---------------------------

def frame(*parts: bytes) -> bytes:
    body = b"".join(parts)
    return _LENGTH.pack(len(body)) + body


def take_frames(buf: bytearray, most: Optional[int] = None):
    """Yield the whole frames at the start of ``buf``, taking them out of it (also when the caller stops early);
    ValueError at a frame that announces more than ``most`` bytes (those before it are yielded first)."""
    pos = 0
    try:
        while len(buf) - pos >= 4:
            (n,) = _LENGTH.unpack_from(buf, pos)
            if most is not None and n > most:
                raise ValueError(f"a frame of {n} bytes")
            if len(buf) - pos - 4 < n:
                return
            start, pos = pos + 4, pos + 4 + n  # taken before the yield: a caller that stops here took it
            yield bytes(buf[start:pos])
    finally:
        del buf[:pos]


# --- results on the wire (helper -> appliance) ----------------------------------------------------------------
# A result: one byte of kind, then fields, each a 4-byte length (0xFFFFFFFF: None) and its bytes.

OK, REFUSED, MALFORMED, BROKEN = b"0", b"1", b"2", b"3"
_NONE = 0xFFFFFFFF
_LENGTH = struct.Struct(">I")


def pack(kind: bytes, fields) -> bytes:
    out = [kind]
    for f in fields:
        if f is None:
            out.append(_LENGTH.pack(_NONE))
        else:
            out.append(_LENGTH.pack(len(f)))
            out.append(f)
    return b"".join(out)


def unpack(data: bytes) -> tuple:
    """(kind, [fields]); ValueError when it is not a well-formed result."""
    kind, pos, end, fields = data[:1], 1, len(data), []
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated result")
        (n,) = _LENGTH.unpack_from(data, pos)
        pos += 4
        if n == _NONE:
            fields.append(None)
            continue
        if pos + n > end:
            raise ValueError("truncated result")
        fields.append(data[pos:pos + n])
        pos += n
    return kind, fields


def _text(value: Optional[str]) -> Optional[bytes]:
    return None if value is None else value.encode("utf-8")


def _message_fields(msg: scep.SignedMessage) -> list:
    return [str(msg.message_type).encode(), msg.transaction_id.encode("utf-8"), msg.sender_nonce,
            msg.recipient_nonce, _text(None if msg.pki_status is None else msg.pki_status.value),
            None if msg.fail_info is None else str(int(msg.fail_info)).encode(), _text(msg.fail_info_text),
            msg.signer_cert.public_bytes(serialization.Encoding.DER), msg.digest.encode(),
            _text(None if msg.signing_time is None else msg.signing_time.isoformat())]


_MESSAGE_FIELDS = 10


def _message(fields: list) -> scep.SignedMessage:
    (message_type, tid, sender_nonce, recipient_nonce, status, fail_info, fail_info_text, signer, digest,
     signing_time) = fields
    signer_cert = x509.load_der_x509_certificate(signer)
    return scep.SignedMessage(
        message_type=int(message_type), transaction_id=tid.decode("utf-8"), sender_nonce=sender_nonce,
        recipient_nonce=recipient_nonce, pki_status=None if status is None else scep.PkiStatus(status.decode()),
        fail_info=None if fail_info is None else int(fail_info),
        fail_info_text=None if fail_info_text is None else fail_info_text.decode("utf-8"), signer_cert=signer_cert,
        signer_certs=(signer_cert,), digest=digest.decode(), content=None,
        signing_time=None if signing_time is None else datetime.datetime.fromisoformat(signing_time.decode()))


def encode_result(op: str, value) -> bytes:
    if op == "open":
        return pack(OK, _message_fields(value.message) + [value.plaintext, _text(value.cipher), value.csr_der])
    return pack(OK, [value])


def encode_error(exc: BaseException) -> bytes:
    """A job's exception as a result: the typed ones keep their meaning, anything else is BROKEN."""
    if isinstance(exc, ScepFailure):
        request = getattr(exc, "request", None)
        return pack(REFUSED, [str(int(exc.fail_info)).encode(), exc.text.encode("utf-8"), _text(exc.detail)]
                    + (_message_fields(request) if request is not None else []))
    if isinstance(exc, MalformedRequest):
        return pack(MALFORMED, [str(exc).encode("utf-8")])
    return pack(BROKEN, [f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")])


def decode_result(op: str, data: bytes):
    """The value of a job, or its exception raised again (ScepFailure, MalformedRequest, KeyJobFailed)."""
    try:
        kind, fields = unpack(data)
        if kind == OK:
            if op != "open":
                (value,) = fields
                return value
            plaintext, cipher, csr_der = fields[_MESSAGE_FIELDS:]
            return Opened(_message(fields[:_MESSAGE_FIELDS]), plaintext, None if cipher is None else cipher.decode(),
                          csr_der)
        if kind == REFUSED:
            failure = ScepFailure(FailInfo(int(fields[0])), fields[1].decode("utf-8"),
                                  None if fields[2] is None else fields[2].decode("utf-8"))
            if len(fields) > 3:
                failure.request = _message(fields[3:])
        elif kind == MALFORMED:
            (text,) = fields
            failure = MalformedRequest(text.decode("utf-8"))
        elif kind == BROKEN:
            failure = KeyJobFailed(fields[0].decode("utf-8", "replace"))
        else:
            raise ValueError(f"unknown result kind {kind!r}")
    except (ValueError, TypeError, IndexError) as e:  # a helper that answers nonsense is broken
        raise KeyJobFailed(f"unreadable result from a key helper: {e}") from None
    raise failure
