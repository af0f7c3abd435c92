"""A small synchronous SCEP test client over urllib, built on getcertd.scep, for tests that need raw HTTP."""
import base64
import datetime
import os
import ssl
import urllib.error
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID

from getcertd import scep


def http(url, data=None, headers=None, cafile=None, method=None):
    ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def rsa_key(bits=2048):
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def rsa_key_with_huge_exponent(bits=2048):
    """An RSA key whose public exponent is as long as its modulus (verifying with it costs like signing)."""
    import math
    base = rsa.generate_private_key(public_exponent=65537, key_size=bits).private_numbers()
    p, q = base.p, base.q
    phi = (p - 1) * (q - 1)
    e = (int.from_bytes(os.urandom(bits // 8), "big") >> 2) | (1 << (bits - 2)) | 1  # bits-1 bits: below n
    while math.gcd(e, phi) != 1:
        e += 2
    d = pow(e, -1, phi)
    return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                 rsa.RSAPublicNumbers(e, p * q)).private_key()


def self_signed(key, cn="requester"):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))


def csr_der(key, cn="ignored-by-server", challenge=None):
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if challenge is not None:
        b = b.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def raw_envelope(recipient, raw: bytes) -> bytes:
    """An EnvelopedData (aes256-CBC) whose decrypted content is ``raw`` exactly, its padding included: a test can
    send bad padding, or good padding around anything. ``len(raw)`` is a multiple of 16."""
    assert raw and len(raw) % 16 == 0
    secrets = [os.urandom(32), os.urandom(16)]  # the content key, then the IV, as build_envelope asks for them
    key, iv = secrets
    der = scep.build_envelope(b"\0" * (len(raw) - 1), recipient, "aes256", random=lambda n: secrets.pop(0))
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    honest = encryptor.update(b"\0" * (len(raw) - 1) + b"\x01") + encryptor.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    assert der.count(honest) == 1
    return der.replace(honest, encryptor.update(raw) + encryptor.finalize())


class Requester:
    """One enrolling identity: a key, its transient self-signed certificate, and the CA material."""

    def __init__(self, ca_certs, key=None, signer=None):
        self.key = key or rsa_key()
        self.signer_key = self.key
        self.signer = signer or self_signed(self.key)
        self.ca = next(c for c in ca_certs if c.issuer == c.subject)
        self.recipient = next((c for c in ca_certs if c is not self.ca), self.ca)

    def message(self, message_type=scep.MessageType.PKCSReq, inner=None, cipher="aes256", digest="sha256",
                transaction_id=None, challenge=None, cn="ignored-by-server", envelope=None):
        """A signed request; ``envelope`` (an EnvelopedData) replaces the encrypted ``inner``."""
        self.nonce = scep.new_nonce()
        self.tid = transaction_id or scep.new_transaction_id(self.key.public_key())
        if inner is None:
            inner = csr_der(self.key, cn, challenge)
        return scep.build_signed(message_type=message_type, transaction_id=self.tid, sender_nonce=self.nonce,
                                 signer_key=self.signer_key, signer_cert=self.signer, digest=digest,
                                 content=envelope or scep.build_envelope(inner, self.recipient, cipher=cipher))

    def open_reply(self, der):
        rep = scep.parse_signed(der)
        assert rep.message_type == scep.MessageType.CertRep
        assert rep.transaction_id == self.tid and rep.recipient_nonce == self.nonce
        certs = []
        if rep.pki_status == scep.PkiStatus.SUCCESS:
            plaintext, _ = scep.decrypt_envelope(rep.content, self.signer_key, self.signer)
            certs, _crls = scep.parse_degenerate(plaintext)
        return rep, certs


def get_ca_certs(url, cafile):
    status, headers, body = http(url + "?operation=GetCACert", cafile=cafile)
    assert status == 200
    if "ca-ra-cert" in headers.get("Content-Type", ""):
        return scep.parse_degenerate(body)[0]
    return [x509.load_der_x509_certificate(body)]
