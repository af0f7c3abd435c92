"""CA signing (layer 1): keys, the CA and RA certificates, TLS server certificates and issued certificates.

No file access and no clock: callers pass ``now`` and, where randomness matters to tests, ``random``.
"""
import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

EKU_BY_NAME = {
    "ipsecIKE": ExtendedKeyUsageOID.IPSEC_IKE,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
}


def generate_key(key_type: str):
    """A new private key: rsa2048, rsa3072, rsa4096, ec-p256, ec-p384, ed25519."""
    if key_type.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    curves = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1()}
    if key_type in curves:
        return ec.generate_private_key(curves[key_type])
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}")


def key_type_of(public_key) -> str:
    """A short name for a public key, e.g. 'rsa2048', 'ec-p256', 'ed25519'."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}.get(
            public_key.curve.name, "ec-" + public_key.curve.name)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return type(public_key).__name__


def hash_for(key):
    """The signature hash for a signing key (None for Ed25519, which hashes internally)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def random_serial(random=os.urandom) -> int:
    """A positive 128-bit random serial number (top bit cleared so the DER INTEGER stays 16 bytes)."""
    return (int.from_bytes(random(16), "big") >> 1) or 1


_RDN_SEPARATOR = re.compile(r"\s*(?<!\\),\s*")


def parse_name(text: str) -> x509.Name:
    """An RFC 4514 string (as in the config) to a Name, in the order written (most significant first). Spaces
    around the commas are allowed, as people write them ('CN=getcertd CA, O=Example'); ValueError if unreadable."""
    text = text.strip()
    return x509.Name.from_rfc4514_string(",".join(_RDN_SEPARATOR.split(text))) if text else x509.Name([])


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated upper-case hex, like `openssl x509 -fingerprint -sha256`."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def _base_builder(subject, issuer, public_key, serial, not_before, not_after):
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(serial).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI of what ``ca_cert`` signs: its SKI, or (an imported CA without one) the RFC 5280 SHA-1 of its key."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def ca_certificate_problems(cert: x509.Certificate) -> Tuple[Optional[str], List[str]]:
    """(why ``cert`` can't issue certificates that RFC 5280 validators such as OpenSSL and strongSwan accept, or
    None; what some validators will refuse in what it signs)."""
    try:
        exts = cert.extensions
        constraints = exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "it has no basicConstraints CA:TRUE (RFC 5280 4.2.1.9)", []
    except ValueError as e:
        return f"its extensions can't be read ({e})", []
    if not constraints.ca:
        return "it is not a CA certificate (basicConstraints CA:FALSE)", []
    warnings = []
    try:
        exts.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        warnings.append("it has no subjectKeyIdentifier: strict validators (openssl verify -x509_strict) will "
                        "refuse the certificates it signs")
    try:
        usage = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None, warnings
    if not usage.key_cert_sign:
        return "its keyUsage lacks keyCertSign", []
    if not usage.crl_sign:
        warnings.append("its keyUsage lacks cRLSign: validators that check it (strongSwan, OpenSSL) will refuse "
                        "the CRLs it signs")
    return None, warnings


def chain_problem(chain: Sequence[x509.Certificate]) -> Optional[str]:
    """Why ``chain`` (a CA certificate, then its issuer, ... up to a root) is not one, or None."""
    for below, above in zip(chain, chain[1:]):
        try:
            below.verify_directly_issued_by(above)
        except (ValueError, TypeError, InvalidSignature):
            return (f"{below.subject.rfc4514_string()!r} is not issued by the certificate after it, "
                    f"{above.subject.rfc4514_string()!r} (put the CA certificate first, then its issuer, up to the "
                    "root)")
    return None


def make_ca_certificate(key, subject: str, now: datetime.datetime, lifetime: datetime.timedelta,
                        random=os.urandom) -> x509.Certificate:
    """A self-signed CA certificate."""
    name = parse_name(subject)
    b = (_base_builder(name, name, key.public_key(), random_serial(random), now - datetime.timedelta(hours=1),
                       now + lifetime)
         .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                      crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False))
    return b.sign(key, hash_for(key))


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA key and certificate; ``issuers``: the certificates above it when it is a sub-CA (its issuer first,
    up to the root), which GetCACert and EST cacerts hand out with it."""
    key: object
    certificate: x509.Certificate
    issuers: Tuple[x509.Certificate, ...] = ()

    @property
    def chain(self) -> Tuple[x509.Certificate, ...]:
        """This CA's certificate and its issuers."""
        return (self.certificate,) + tuple(self.issuers)

    def _builder(self, subject: x509.Name, public_key, not_before, not_after, serial):
        return (_base_builder(subject, self.certificate.subject, public_key, serial, not_before, not_after)
                .add_extension(authority_key_identifier(self.certificate), critical=False))

    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    def issue_ra(self, ra_key, now, lifetime: datetime.timedelta, random=os.urandom) -> x509.Certificate:
        """The RA certificate: decrypts requests and signs CertReps (digitalSignature + keyEncipherment)."""
        subject = x509.Name(list(self.certificate.subject.rdns) + [
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "SCEP RA")])])
        not_after = min(now + lifetime, self.not_after())
        b = (self._builder(subject, ra_key.public_key(), now - datetime.timedelta(hours=1), not_after,
                           random_serial(random))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                          data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True))
        return b.sign(self.key, hash_for(self.key))

    def issue_tls(self, key, server_name: str, now, lifetime: datetime.timedelta,
                  random=os.urandom) -> x509.Certificate:
        """A TLS server certificate for ``server_name`` (a DNS name or an IP address)."""
        try:
            alt = [x509.IPAddress(ipaddress.ip_address(server_name))]
        except ValueError:
            alt = [x509.DNSName(server_name)]
            if server_name == "localhost":
                alt += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
        b = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]), key.public_key(),
                           now - datetime.timedelta(hours=1), min(now + lifetime, self.not_after()),
                           random_serial(random))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.SubjectAlternativeName(alt), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                          key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True))
        return b.sign(self.key, hash_for(self.key))

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a certificate built by :meth:`end_entity` (the private-key operation alone: a server runs it on
        another thread and builds the certificate on its own)."""
        return builder.sign(self.key, hash_for(self.key))

    def end_entity(self, public_key, subject: x509.Name, san: Sequence[x509.GeneralName], not_before, not_after,
                   serial: int, eku: Sequence[str], crl_url: Optional[str] = None) -> x509.CertificateBuilder:
        """An unsigned end-entity certificate for IKE: digitalSignature, the given EKUs, CA:FALSE, SKI/AKI."""
        b = (self._builder(subject, public_key, not_before, not_after, serial)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True))
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage([EKU_BY_NAME.get(e) or x509.ObjectIdentifier(e) for e in eku]),
                                critical=False)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        if crl_url:
            b = b.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                [x509.UniformResourceIdentifier(crl_url)], None, None, None)]), critical=False)
        return b


def key_pem(key, passphrase: Optional[bytes] = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
