"""getcertd.scep's builders write DER directly: byte for byte what asn1crypto's object model writes.

The reference builders below are the asn1crypto code the direct builders replaced (for speed: the server
builds one CertRep per enrollment). Randomness is pinned where the API allows it (content key and IV); RSA
PKCS#1 v1.5 key transport and ECDSA signatures are randomized inside cryptography, so those fields are copied
from the reference before comparing.
"""
import datetime
import hashlib
import random

import pytest
from asn1crypto import algos, cms, core
from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as block_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from getcertd import scep
from getcertd.scep import MessageType, PkiStatus

NOW = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.timezone.utc)


# --- the reference: asn1crypto ---------------------------------------------------------

class _OrderedCertificateSet(cms.CertificateSet):
    def _set_contents(self, force=False):
        core.SequenceOf._set_contents(self, force)


class _OrderedRevocationInfoChoices(cms.RevocationInfoChoices):
    def _set_contents(self, force=False):
        core.SequenceOf._set_contents(self, force)


def _asn1_cert(cert):
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _issuer_and_serial_of(cert):
    tbs = _asn1_cert(cert)["tbs_certificate"]
    return cms.IssuerAndSerialNumber({"issuer": asn1_x509.Name.load(tbs["issuer"].dump()),
                                      "serial_number": cert.serial_number})


def _attribute(oid, value):
    return cms.CMSAttribute({"type": oid, "values": [value]})


def ref_build_signed(*, message_type, transaction_id, sender_nonce, signer_key, signer_cert, digest="sha256",
                     content=None, pki_status=None, fail_info=None, fail_info_text=None, recipient_nonce=None,
                     extra_certs=(), signing_time=None):
    attributes = [
        _attribute(scep.OID_CONTENT_TYPE, cms.ContentType(scep.OID_DATA)),
        _attribute(scep.OID_MESSAGE_DIGEST, core.OctetString(hashlib.new(digest, content or b"").digest())),
        _attribute(scep.OID_MESSAGE_TYPE, core.PrintableString(str(int(message_type)))),
        _attribute(scep.OID_TRANSACTION_ID, core.PrintableString(transaction_id)
                   if scep._PRINTABLE.match(transaction_id) else core.UTF8String(transaction_id)),
    ]
    if signing_time is not None:
        moment = scep._utc(signing_time)
        time = cms.Time({"utc_time": moment}) if 1950 <= moment.year < 2050 \
            else cms.Time({"generalized_time": moment})
        attributes.append(_attribute(scep.OID_SIGNING_TIME, time))
    if sender_nonce is not None:
        attributes.append(_attribute(scep.OID_SENDER_NONCE, core.OctetString(bytes(sender_nonce))))
    if recipient_nonce is not None:
        attributes.append(_attribute(scep.OID_RECIPIENT_NONCE, core.OctetString(bytes(recipient_nonce))))
    if pki_status is not None:
        attributes.append(_attribute(scep.OID_PKI_STATUS, core.PrintableString(PkiStatus(pki_status).value)))
    if fail_info is not None:
        attributes.append(_attribute(scep.OID_FAIL_INFO, core.PrintableString(str(int(fail_info)))))
    if fail_info_text is not None:
        attributes.append(_attribute(scep.OID_FAIL_INFO_TEXT, core.UTF8String(fail_info_text)))
    signed_attrs = cms.CMSAttributes(attributes)
    to_sign = signed_attrs.dump(force=True)
    hash_algorithm = scep._hash(digest)
    if isinstance(signer_key, rsa.RSAPrivateKey):
        signature = signer_key.sign(to_sign, padding.PKCS1v15(), hash_algorithm)
        signature_algorithm = {"algorithm": scep.OID_RSA_ENCRYPTION, "parameters": core.Null()}
    else:
        signature = signer_key.sign(to_sign, ec.ECDSA(hash_algorithm))
        signature_algorithm = {"algorithm": scep._ECDSA_OID_OF_DIGEST[digest]}
    digest_algorithm = {"algorithm": scep._OID_OF_DIGEST[digest], "parameters": core.Null()}
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": _issuer_and_serial_of(signer_cert)}),
        "digest_algorithm": digest_algorithm, "signed_attrs": signed_attrs,
        "signature_algorithm": signature_algorithm, "signature": signature,
    })
    encap = {"content_type": "data"}
    if content is not None:
        encap["content"] = bytes(content)
    signed_data = cms.SignedData({
        "version": "v1", "digest_algorithms": [digest_algorithm], "encap_content_info": encap,
        "certificates": _OrderedCertificateSet([_asn1_cert(c) for c in [signer_cert, *extra_certs]]),
        "signer_infos": [signer_info],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()


def ref_build_envelope(plaintext, recipient_cert, cipher="aes256", oaep=False, *, random, oaep_hash="sha1"):
    oid, key_length, block = scep._CIPHER_TABLE[cipher]
    key = random(key_length)
    iv = random(block)
    padder = block_padding.PKCS7(block * 8).padder()
    encryptor = scep._content_cipher(cipher, key, iv).encryptor()
    ciphertext = encryptor.update(padder.update(bytes(plaintext)) + padder.finalize()) + encryptor.finalize()
    if oaep:
        pad = padding.OAEP(mgf=padding.MGF1(scep._hash(oaep_hash)), algorithm=scep._hash(oaep_hash), label=None)
        if oaep_hash == "sha1":
            params = algos.RSAESOAEPParams.load(b"\x30\x00")
        else:
            params = {"hash_algorithm": {"algorithm": oaep_hash},
                      "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": oaep_hash}}}
        key_encryption = {"algorithm": "rsaes_oaep", "parameters": params}
    else:
        pad = padding.PKCS1v15()
        key_encryption = {"algorithm": "rsaes_pkcs1v15", "parameters": core.Null()}
    ktri = cms.KeyTransRecipientInfo({
        "version": "v0",
        "rid": cms.RecipientIdentifier({"issuer_and_serial_number": _issuer_and_serial_of(recipient_cert)}),
        "key_encryption_algorithm": key_encryption,
        "encrypted_key": recipient_cert.public_key().encrypt(key, pad),
    })
    enveloped = cms.EnvelopedData({
        "version": "v0",
        "recipient_infos": [cms.RecipientInfo({"ktri": ktri})],
        "encrypted_content_info": {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": oid, "parameters": core.OctetString(iv)},
            "encrypted_content": ciphertext,
        },
    })
    return cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump()


def ref_degenerate_pkcs7(certs, crls=()):
    signed_data = {"version": "v1", "digest_algorithms": [], "encap_content_info": {"content_type": "data"},
                   "signer_infos": []}
    if certs:
        signed_data["certificates"] = _OrderedCertificateSet([_asn1_cert(c) for c in certs])
    if crls:
        signed_data["crls"] = _OrderedRevocationInfoChoices([
            cms.RevocationInfoChoice({"crl": asn1_crl.CertificateList.load(
                crl.public_bytes(serialization.Encoding.DER))}) for crl in crls])
    return cms.ContentInfo({"content_type": "signed_data", "content": cms.SignedData(signed_data)}).dump()


# --- fixtures ---------------------------------------------------------------------------

def _cert(key, cn, serial, issuer_key=None, issuer_name=None):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ö")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=30))
            .sign(issuer_key or key, hashes.SHA256()))


@pytest.fixture(scope="module")
def rsa_party():
    key = rsa.generate_private_key(65537, 2048)
    return key, _cert(key, "rsa party", 2 ** 159 - 1)  # serial with the top bit of its first octet set


@pytest.fixture(scope="module")
def others():
    ec_key = ec.generate_private_key(ec.SECP256R1())
    key = rsa.generate_private_key(65537, 2048)
    return [(ec_key, _cert(ec_key, "ec party", 1)), (key, _cert(key, "x" * 64, 128))]


def _swap_octets(new, ref, what):
    """Put ref's value of an octet-string field (randomized inside cryptography) into new."""
    mine, theirs = what(new), what(ref)
    assert len(mine) == len(theirs) and new.count(mine) == 1
    return new.replace(mine, theirs)


def _seeded(seed):
    stream = random.Random(seed)
    return lambda n: bytes(stream.getrandbits(8) for _ in range(n))


# --- the comparisons ----------------------------------------------------------------------

@pytest.mark.parametrize("digest", scep.DIGESTS)
@pytest.mark.parametrize("variant", ["pkcsreq", "success", "failure", "pending", "time", "unicode"])
def test_build_signed_matches_asn1crypto(digest, variant, rsa_party, others):
    key, cert = rsa_party
    kwargs = dict(message_type=MessageType.PKCSReq, transaction_id="A1B2C3" * 10, sender_nonce=b"\x01" * 16,
                  signer_key=key, signer_cert=cert, digest=digest)
    if variant == "pkcsreq":
        kwargs["content"] = bytes(range(256)) * 20
    elif variant == "success":
        kwargs.update(message_type=MessageType.CertRep, recipient_nonce=b"\xff" * 16, pki_status=PkiStatus.SUCCESS,
                      content=b"x" * 100, extra_certs=[c for _, c in others])
    elif variant == "failure":
        kwargs.update(message_type=MessageType.CertRep, recipient_nonce=b"r" * 16, pki_status=PkiStatus.FAILURE,
                      fail_info=2, fail_info_text="the CSR's signature (proof of possession) does not verify")
    elif variant == "pending":
        kwargs.update(message_type=MessageType.CertRep, sender_nonce=None, pki_status=PkiStatus.PENDING)
    elif variant == "time":
        kwargs.update(signing_time=datetime.datetime(2051, 1, 2, 3, 4, 5), content=b"")
    else:
        kwargs.update(transaction_id="tid with ünïcödé and * and _", fail_info_text="échec",
                      message_type=MessageType.CertRep, pki_status=PkiStatus.FAILURE, fail_info=0)
    assert scep.build_signed(**kwargs) == ref_build_signed(**kwargs)


def test_build_signed_ec_signer_matches_asn1crypto(others):
    key, cert = others[0]
    kwargs = dict(message_type=19, transaction_id="T", sender_nonce=b"n" * 16, signer_key=key, signer_cert=cert,
                  content=b"c" * 3000, digest="sha384")
    signature = lambda der: cms.ContentInfo.load(der)["content"]["signer_infos"][0]["signature"].native  # noqa: E731
    for _ in range(50):  # ECDSA signatures vary in length: compare two of the same length
        new, ref = scep.build_signed(**kwargs), ref_build_signed(**kwargs)
        if len(signature(new)) == len(signature(ref)):
            break
    assert _swap_octets(new, ref, signature) == ref


@pytest.mark.parametrize("cipher", scep.CIPHERS)
@pytest.mark.parametrize("oaep_hash", [None, "sha1", "sha256"])
def test_build_envelope_matches_asn1crypto(cipher, oaep_hash, rsa_party):
    _, cert = rsa_party
    plaintext = b"p" * 777
    options = dict(oaep=oaep_hash is not None, oaep_hash=oaep_hash or "sha1")
    new = scep.build_envelope(plaintext, cert, cipher, random=_seeded(1), **options)
    ref = ref_build_envelope(plaintext, cert, cipher, random=_seeded(1), **options)
    encrypted_key = lambda der: cms.ContentInfo.load(der)["content"]["recipient_infos"][0].chosen[  # noqa: E731
        "encrypted_key"].native
    assert _swap_octets(new, ref, encrypted_key) == ref


def test_degenerate_pkcs7_matches_asn1crypto(rsa_party, others):
    key, cert = rsa_party
    crl = (x509.CertificateRevocationListBuilder().issuer_name(cert.subject).last_update(NOW)
           .next_update(NOW + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    certs = [cert] + [c for _, c in others]
    for args in ([certs], [[]], [[], [crl]], [certs[:1], [crl, crl]], [list(reversed(certs))]):
        assert scep.degenerate_pkcs7(*args) == ref_degenerate_pkcs7(*args)


def test_issuer_taken_as_encoded(rsa_party):
    """A certificate whose issuer Name uses a string type that cryptography would re-encode differently."""
    key, _ = rsa_party
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "printable issuer", _type=x509.name._ASN1Type.PrintableString),
                        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE")])
    cert = _cert(key, "subject", 5, issuer_key=key, issuer_name=issuer)
    kwargs = dict(message_type=3, transaction_id="t", sender_nonce=None, signer_key=key, signer_cert=cert,
                  pki_status=PkiStatus.PENDING)
    assert scep.build_signed(**kwargs) == ref_build_signed(**kwargs)


def test_der_int():
    for value in (0, 1, 127, 128, 255, 256, -1, -128, -129, 2 ** 127, -(2 ** 64), 2 ** 159 - 1):
        assert scep._der_int(value) == core.Integer(value).dump()


# --- the parsers' fast paths agree with the asn1crypto paths -------------------------------------------------
# _fast_signed_structure, _fast_envelope_structure and the v1 CSR shortcut read the common shape of a message
# with a small DER walker and hand anything else to asn1crypto. Property: whatever a fast path accepts, the
# asn1crypto path accepts too and reads the same; on the seeds and on structurally mutated messages.

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzztargets  # noqa: E402
import test_properties as props  # noqa: E402
from getcertd.errors import MalformedRequest, ScepFailure  # noqa: E402


def _slow(monkeypatch, name, replacement):
    monkeypatch.setattr(scep, name, replacement)


def _outcome(f, *args):
    try:
        return "ok", f(*args)
    except (MalformedRequest, ScepFailure) as e:
        return "error", (type(e).__name__, str(e))


def _parsed_fields(parsed):
    out = {k: getattr(parsed, k) for k in parsed.__dataclass_fields__}
    out["attrs"] = {oid: [v.dump() for v in values] for oid, values in parsed.attrs.items()}
    return out


def _check_signed(der):
    fast = scep._fast_signed_structure(der)
    if fast is None:
        return False
    original = scep._fast_signed_structure
    scep._fast_signed_structure = lambda _der: None
    try:
        status, slow = _outcome(scep._parse_signed_structure, der)
    finally:
        scep._fast_signed_structure = original
    assert status == "ok", slow
    assert _parsed_fields(fast) == _parsed_fields(slow)
    return True


def _check_envelope(envelope, allow_des):
    _, ra_cert = fuzztargets.ra()
    fast = scep._fast_envelope_structure(envelope, allow_des, ra_cert)
    if fast is None:
        return False
    status, slow = _outcome(scep._parse_envelope_structure, envelope, allow_des)
    assert status == "ok", slow
    cipher, key_length, block, iv, ciphertext, recipients = slow
    asn1_cert = scep._asn1_cert(ra_cert)
    assert all(scep._rid_matches(r[0], asn1_cert) for r in recipients)
    assert fast[:5] == slow[:5]
    assert [(type(p), k) for _, p, k in fast[5]] == [(type(p), k) for _, p, k in recipients]
    return True


def _check_csr(der, monkeypatch):
    fast = _outcome(scep._load_csr, der)
    with monkeypatch.context() as m:
        m.setattr(scep, "_csr_shape", lambda _der: None)
        slow = _outcome(scep._load_csr, der)
        slow_password = _outcome(scep.challenge_password, slow[1][0]) if slow[0] == "ok" else None
    if fast[0] == "ok":
        assert slow[0] == "ok", slow
        assert fast[1][0].public_bytes(serialization.Encoding.DER) == slow[1][0].public_bytes(serialization.Encoding.DER)
        assert fast[1][1] == slow[1][1]
        assert _outcome(scep.challenge_password, fast[1][0]) == slow_password
    else:
        assert fast == slow


def test_fast_paths_take_the_seeds():
    taken = [name for name, der in fuzztargets.scep_seeds().items() if der[:1] == b"\x30" and _check_signed(der)]
    assert {"pkcsreq-aes128", "pkcsreq-des3", "certrep-success", "certrep-failure"} <= set(taken)
    seeds = fuzztargets.scep_seeds()
    assert _check_envelope(seeds["envelope-csr-aes256"], False)
    assert not _check_envelope(seeds["envelope-csr-des3-oaep"], False)  # OAEP: the asn1crypto path


@props.examples(300)
@given(props.mutated(props.SIGNED))
def test_fast_signed_structure_agrees(der):
    _check_signed(der)


@props.examples(200)
@given(props.mutated(props.ENVELOPES), st.booleans())
def test_fast_envelope_structure_agrees(envelope, allow_des):
    _check_envelope(envelope, allow_des)
    _check_signed(props._sign(envelope))


@props.examples(200)
@given(props.mutated(props.CSRS))
def test_fast_csr_agrees(csr):
    import _pytest.monkeypatch
    with _pytest.monkeypatch.MonkeyPatch.context() as monkeypatch:
        _check_csr(csr, monkeypatch)


def test_fast_csr_agrees_on_the_seeds(monkeypatch):
    for der in props.CSRS:
        _check_csr(der, monkeypatch)
