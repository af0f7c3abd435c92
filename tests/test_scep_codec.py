"""Tests of getcertd.scep, the SCEP pkiMessage codec.

Round trips through our own builder and parser, the `openssl cms` command as an
independent implementation in both directions, real-world vectors (an Apple device's
PKCSReq, jscep's samples) and garbage that must end in typed errors only.
"""
import base64
import datetime
import hashlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from asn1crypto import cms, core
from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.x509.oid import AttributeOID, NameOID

from getcertd import scep
from getcertd.errors import FailInfo, MalformedRequest, ScepFailure
from getcertd.scep import MessageType, PkiStatus

VECTORS = Path(__file__).parent / "vectors"
APPLE = VECTORS / "apple-pkcsreq"
JSCEP = VECTORS / "jscep-samples"
NOW = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.timezone.utc)
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
needs_openssl = pytest.mark.skipif(not os.path.exists(OPENSSL), reason="openssl command not found")
TYPED = (MalformedRequest, ScepFailure)


# --- fixtures --------------------------------------------------------------------------

def _self_signed(cn, key, *, ca=False, ski=True):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(days=1))
               .not_valid_after(NOW + datetime.timedelta(days=365))
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=True,
                   data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                   encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                        critical=False)
    return builder.sign(key, hashes.SHA256())


class Party:
    def __init__(self, cn, key, **kwargs):
        self.key = key
        self.cert = _self_signed(cn, key, **kwargs)

    def write(self, directory: Path, stem: str):
        cert = directory / f"{stem}.pem"
        key = directory / f"{stem}.key"
        cert.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(self.key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(cert), str(key)


@pytest.fixture(scope="module")
def ca():
    return Party("getcertd test CA", rsa.generate_private_key(65537, 2048), ca=True)


@pytest.fixture(scope="module")
def client():
    return Party("client 1", rsa.generate_private_key(65537, 2048))


@pytest.fixture(scope="module")
def ec_client():
    return Party("ec client", ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def csr(client):
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-42")]))
            .add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"s3cret")
            .sign(client.key, hashes.SHA256()))


@pytest.fixture(scope="module")
def files(tmp_path_factory, ca, client, ec_client):
    directory = tmp_path_factory.mktemp("scep-openssl")
    paths = {"dir": directory}
    for stem, party in (("ca", ca), ("client", client), ("ec", ec_client)):
        paths[stem], paths[stem + "_key"] = party.write(directory, stem)
    return paths


def _pkcs_req(csr, client, ca, **kwargs):
    kwargs.setdefault("transaction_id", scep.new_transaction_id(client.key.public_key()))
    kwargs.setdefault("sender_nonce", scep.new_nonce())
    return scep.build_pkcs_req(csr, recipient_cert=ca.cert, signer_key=client.key,
                               signer_cert=client.cert, **kwargs)


def _issue(ca, public_key, cn="device-42"):
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=30))
            .sign(ca.key, hashes.SHA256()))


def _openssl(*args, input=None):
    result = subprocess.run([OPENSSL, *args], input=input, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def _signer_info(der):
    return cms.ContentInfo.load(der)["content"]["signer_infos"][0]


def _redump_signer_info(der, mutate):
    """Re-encode a SignedData after mutate(signer_info) changed it."""
    info = cms.ContentInfo.load(der)
    signed_data = info["content"]
    signer_info = signed_data["signer_infos"][0]
    mutate(signer_info)
    return info.dump(force=True)


# --- round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["pkcs1v15", "oaep-sha1", "oaep-sha256"])
@pytest.mark.parametrize("digest", scep.DIGESTS)
@pytest.mark.parametrize("cipher", ["aes128", "aes192", "aes256", "des3", "des"])
def test_pkcs_req_round_trip(cipher, digest, transport, csr, client, ca):
    nonce = scep.new_nonce()
    tid = scep.new_transaction_id(client.key.public_key())
    envelope = scep.build_envelope(csr.public_bytes(serialization.Encoding.DER), ca.cert, cipher,
                                   oaep=transport != "pkcs1v15", oaep_hash=transport[5:] or "sha1")
    der = scep.build_signed(message_type=MessageType.PKCSReq, transaction_id=tid, sender_nonce=nonce,
                            signer_key=client.key, signer_cert=client.cert, digest=digest,
                            content=envelope, signing_time=NOW)
    message = scep.parse_signed(der)
    assert message.message_type == MessageType.PKCSReq
    assert message.transaction_id == tid
    assert message.sender_nonce == nonce
    assert message.recipient_nonce is None and message.pki_status is None
    assert message.digest == digest
    assert message.signing_time == NOW
    assert message.signer_cert == client.cert
    assert message.content == envelope
    plaintext, used = scep.decrypt_envelope(message.content, ca.key, ca.cert, allow_des=cipher == "des")
    assert used == cipher
    parsed = scep.parse_csr(plaintext)
    assert parsed.subject == csr.subject
    assert scep.challenge_password(parsed) == "s3cret"


def _undecryptable(open_it):
    """Run ``open_it()``, which opens an envelope with a content key that can't be right (another RSA key, or a
    mangled RSA block): ScepFailure(badMessageCheck), the same answer as any corrupt message. The key used is then
    random (a failed RSA unwrap is never reported as such), so in about 1 run in 256 the content's padding happens
    to check out and open_it returns garbage instead: that is returned, for the caller to check it is not the
    plaintext (the server's CSR parse refuses such garbage)."""
    try:
        return open_it()
    except ScepFailure as failure:
        assert (failure.fail_info, failure.text) == (FailInfo.badMessageCheck, scep.UNDECRYPTABLE)
        return None


def _truncated_ciphertext(der):
    """The EnvelopedData with one byte cut from its encrypted content: no content key can decrypt it (not a whole
    number of cipher blocks), so opening it fails whatever the RSA step gave."""
    info = cms.ContentInfo.load(der)
    encrypted = info["content"]["encrypted_content_info"]
    encrypted["encrypted_content"] = encrypted["encrypted_content"].native[:-1]
    return info.dump(force=True)


@pytest.mark.parametrize("digest", scep.DIGESTS)
def test_the_two_step_forms_make_the_same_messages(digest, csr, client, ca, ec_client):
    """What the server does with the private-key operation on another thread (prepare_signed, sign_attributes,
    finish; open_envelope, unwrap, open) gives what the one-step build_signed and decrypt_envelope give."""
    fields = dict(message_type=MessageType.CertRep, transaction_id="T-1", sender_nonce=b"n" * 16,
                  recipient_nonce=b"r" * 16, digest=digest, content=b"c", pki_status=PkiStatus.SUCCESS,
                  signing_time=NOW)
    unsigned = scep.prepare_signed(signer_cert=client.cert, **fields)
    two_step = unsigned.finish(scep.sign_attributes(client.key, unsigned.to_sign, digest))
    assert two_step == scep.build_signed(signer_key=client.key, signer_cert=client.cert, **fields)  # PKCS#1 v1.5
    assert scep.parse_signed(two_step).transaction_id == "T-1"
    unsigned = scep.prepare_signed(signer_cert=ec_client.cert, **fields)  # ECDSA: random, so parse it back
    assert scep.parse_signed(unsigned.finish(scep.sign_attributes(ec_client.key, unsigned.to_sign, digest))) \
        .pki_status == PkiStatus.SUCCESS
    with pytest.raises(ValueError, match="does not belong"):
        scep.build_signed(signer_key=ec_client.key, signer_cert=client.cert, **fields)

    plaintext = csr.public_bytes(serialization.Encoding.DER)
    envelope = scep.build_envelope(plaintext, ca.cert, "aes128")
    sealed = scep.open_envelope(envelope, ca.cert)
    assert sealed.cipher == "aes128"
    assert sealed.open(sealed.unwrap(ca.key)) == (plaintext, "aes128") == scep.decrypt_envelope(envelope, ca.key,
                                                                                                 ca.cert)
    garbage = _undecryptable(lambda: sealed.open(sealed.unwrap(client.key)))  # another key
    assert garbage is None or garbage[0] != plaintext


def test_key_transport_tries_are_capped(client, ca):
    """An EnvelopedData with many recipientInfos naming nobody we know: each candidate costs an RSA decryption,
    so only the first MAX_KEY_TRANSPORT_TRIES are tried (SCEP has one recipient)."""
    info = cms.ContentInfo.load(scep.build_envelope(b"payload", client.cert, "aes128"))
    recipients = info["content"]["recipient_infos"]
    for _ in range(49):
        recipients.append(recipients[0].copy())
    der = info.dump(force=True)
    broken = _truncated_ciphertext(der)  # so that no candidate key can open it, and every one is tried

    class CountingKey:
        calls = 0

        def decrypt(self, ciphertext, pad):
            CountingKey.calls += 1
            return ca.key.decrypt(ciphertext, pad)
    sealed = scep.open_envelope(broken, ca.cert)  # nobody is named: every recipientInfo is a candidate
    with pytest.raises(ScepFailure) as failure:
        sealed.open(sealed.unwrap(CountingKey()))
    assert failure.value.fail_info == FailInfo.badMessageCheck
    assert CountingKey.calls == scep.MAX_KEY_TRANSPORT_TRIES < 50
    sealed = scep.open_envelope(der, client.cert)  # named: the real recipient opens it
    assert sealed.open(sealed.unwrap(client.key)) == (b"payload", "aes128")


def test_build_pkcs_req_wrapper(csr, client, ca):
    der = _pkcs_req(csr, client, ca, cipher="des3", digest="sha1", oaep=True)
    message = scep.parse_signed(der)
    plaintext, cipher = scep.decrypt_envelope(message.content, ca.key, ca.cert)
    assert (cipher, message.digest) == ("des3", "sha1")
    assert plaintext == csr.public_bytes(serialization.Encoding.DER)
    renewal = scep.parse_signed(_pkcs_req(csr, client, ca, message_type=MessageType.RenewalReq))
    assert renewal.message_type == MessageType.RenewalReq


def test_single_des_refused_unless_allowed(csr, client, ca):
    message = scep.parse_signed(_pkcs_req(csr, client, ca, cipher="des"))
    with pytest.raises(ScepFailure) as caught:
        scep.decrypt_envelope(message.content, ca.key, ca.cert)
    assert caught.value.fail_info == FailInfo.badAlg
    assert "single DES is disabled" in caught.value.text
    assert scep.decrypt_envelope(message.content, ca.key, ca.cert, allow_des=True)[1] == "des"


def test_cert_rep_success(csr, client, ca):
    request = scep.parse_signed(_pkcs_req(csr, client, ca, cipher="des3", digest="sha512"))
    _, cipher = scep.decrypt_envelope(request.content, ca.key, ca.cert)
    issued = _issue(ca, csr.public_key())
    server_nonce = scep.new_nonce()
    der = scep.build_cert_rep(request=request, pki_status=PkiStatus.SUCCESS, signer_key=ca.key,
                              signer_cert=ca.cert, sender_nonce=server_nonce, certs=[issued, ca.cert],
                              cipher=cipher, signing_time=NOW)
    reply = scep.parse_signed(der)
    assert reply.message_type == MessageType.CertRep
    assert reply.pki_status is PkiStatus.SUCCESS
    assert reply.transaction_id == request.transaction_id
    assert reply.recipient_nonce == request.sender_nonce
    assert reply.sender_nonce == server_nonce
    assert reply.digest == "sha512"  # the request's
    assert reply.fail_info is None and reply.fail_info_text is None
    inner, reply_cipher = scep.decrypt_envelope(reply.content, client.key, client.cert)
    assert reply_cipher == "des3"  # the request's
    certs, crls = scep.parse_degenerate(inner)
    assert certs == [issued, ca.cert] and crls == []  # order kept: the issued one first


def test_cert_rep_failure(csr, client, ca):
    request = scep.parse_signed(_pkcs_req(csr, client, ca))
    der = scep.build_cert_rep(request=request, pki_status=PkiStatus.FAILURE, signer_key=ca.key,
                              signer_cert=ca.cert, sender_nonce=scep.new_nonce(),
                              fail_info=FailInfo.badRequest, fail_info_text="challenge password refusé")
    reply = scep.parse_signed(der)
    assert reply.pki_status is PkiStatus.FAILURE
    assert reply.fail_info == FailInfo.badRequest
    assert reply.fail_info_text == "challenge password refusé"
    assert reply.content == b""
    assert reply.recipient_nonce == request.sender_nonce
    signed_data = cms.ContentInfo.load(der)["content"]
    # an empty eContent, not none: certmonger can't read a SignedData without content (scep.NO_ENVELOPE)
    assert signed_data["encap_content_info"]["content"].native == b""
    types = {a["type"].dotted: a["values"][0] for a in _signer_info(der)["signed_attrs"]}
    assert isinstance(types[scep.OID_FAIL_INFO_TEXT], core.Any)
    assert types[scep.OID_FAIL_INFO_TEXT].parse(core.UTF8String).native == "challenge password refusé"
    assert types[scep.OID_FAIL_INFO].parse(core.PrintableString).native == "2"


def test_cert_rep_pending(csr, client, ca, ec_client):
    request = scep.parse_signed(_pkcs_req(csr, client, ca))
    # an ECDSA signer for once: the reply signer is free to be EC, only key transport must be RSA
    der = scep.build_cert_rep(request=request, pki_status=PkiStatus.PENDING, signer_key=ec_client.key,
                              signer_cert=ec_client.cert, sender_nonce=scep.new_nonce(),
                              fail_info=FailInfo.badAlg)
    reply = scep.parse_signed(der)
    assert reply.pki_status is PkiStatus.PENDING
    assert reply.content == b"" and reply.fail_info is None
    assert _signer_info(der)["signature_algorithm"]["algorithm"].dotted == "1.2.840.10045.4.3.2"


def test_cert_rep_misuse_is_a_value_error(csr, client, ca):
    request = scep.parse_signed(_pkcs_req(csr, client, ca))
    common = dict(request=request, signer_key=ca.key, signer_cert=ca.cert, sender_nonce=b"n" * 16)
    with pytest.raises(ValueError):
        scep.build_cert_rep(pki_status=PkiStatus.SUCCESS, certs=[ca.cert], **common)  # no cipher
    with pytest.raises(ValueError):
        scep.build_cert_rep(pki_status=PkiStatus.SUCCESS, cipher="aes256", **common)  # no certs
    with pytest.raises(ValueError):
        scep.build_cert_rep(pki_status=PkiStatus.FAILURE, **common)  # no failInfo
    with pytest.raises(ValueError):
        scep.build_signed(message_type=3, transaction_id="x", sender_nonce=None, signer_key=client.key,
                          signer_cert=ca.cert)  # key of another certificate


def test_cert_rep_to_an_ec_requester_is_bad_alg(ec_client, ca):
    # SCEP key transport is RSA: a requester signing with EC can't get an encrypted reply.
    envelope = scep.build_envelope(b"csr", ca.cert)
    request = scep.parse_signed(scep.build_signed(
        message_type=MessageType.PKCSReq, transaction_id="T", sender_nonce=b"n" * 16,
        signer_key=ec_client.key, signer_cert=ec_client.cert, content=envelope))
    with pytest.raises(ScepFailure) as caught:
        scep.build_cert_rep(request=request, pki_status=PkiStatus.SUCCESS, signer_key=ca.key,
                            signer_cert=ca.cert, sender_nonce=b"m" * 16, certs=[ca.cert], cipher="aes256")
    assert caught.value.fail_info == FailInfo.badAlg


def test_rsa_signer_info_uses_rsa_encryption(client):
    # strongSwan 5.9.8 refuses sha1WithRSAEncryption as the signerInfo signature algorithm.
    for digest in scep.DIGESTS:
        der = scep.build_signed(message_type=MessageType.CertRep, transaction_id="T", sender_nonce=None,
                                signer_key=client.key, signer_cert=client.cert, digest=digest,
                                pki_status=PkiStatus.PENDING)
        signer_info = _signer_info(der)
        assert signer_info["signature_algorithm"]["algorithm"].dotted == "1.2.840.113549.1.1.1"
        assert signer_info["digest_algorithm"]["algorithm"].native == digest
        assert signer_info["sid"].name == "issuer_and_serial_number"


def test_signed_attributes(client):
    der = scep.build_signed(message_type=MessageType.GetCRL, transaction_id="ABC-123", sender_nonce=b"N" * 16,
                            recipient_nonce=b"R" * 16, signer_key=client.key, signer_cert=client.cert,
                            content=b"payload", signing_time=datetime.datetime(2051, 1, 2, 3, 4, 5))
    attrs = _signer_info(der)["signed_attrs"]
    encoded = [a.dump() for a in attrs]
    assert encoded == sorted(encoded)  # DER SET OF order
    values = {a["type"].dotted: a["values"][0] for a in attrs}
    assert values[scep.OID_MESSAGE_TYPE].parse(core.PrintableString).native == "22"
    assert values[scep.OID_TRANSACTION_ID].parse(core.PrintableString).native == "ABC-123"
    assert values["1.2.840.113549.1.9.3"].native == "data"
    assert scep.OID_PKI_STATUS not in values and scep.OID_FAIL_INFO not in values
    message = scep.parse_signed(der)
    # naive datetime taken as UTC; after 2049 signingTime is a GeneralizedTime
    assert message.signing_time == datetime.datetime(2051, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    assert (message.sender_nonce, message.recipient_nonce, message.content) == (b"N" * 16, b"R" * 16, b"payload")
    # no signing_time: no signingTime attribute (the codec never reads the clock)
    der = scep.build_signed(message_type=19, transaction_id="x", sender_nonce=None,
                            signer_key=client.key, signer_cert=client.cert)
    assert "1.2.840.113549.1.9.5" not in {a["type"].dotted for a in _signer_info(der)["signed_attrs"]}
    assert scep.parse_signed(der).signing_time is None


def test_unknown_message_type_is_kept(client):
    der = scep.build_signed(message_type=99, transaction_id="x", sender_nonce=None,
                            signer_key=client.key, signer_cert=client.cert)
    assert scep.parse_signed(der).message_type == 99


def test_extra_certs_are_included(client, ca, ec_client):
    der = scep.build_signed(message_type=3, transaction_id="x", sender_nonce=None, signer_key=ca.key,
                            signer_cert=ca.cert, pki_status=PkiStatus.PENDING,
                            extra_certs=[client.cert, ec_client.cert])
    message = scep.parse_signed(der)
    assert message.signer_cert == ca.cert
    assert list(message.signer_certs) == [ca.cert, client.cert, ec_client.cert]


def test_signer_found_by_subject_key_identifier(client):
    der = scep.build_signed(message_type=19, transaction_id="x", sender_nonce=None,
                            signer_key=client.key, signer_cert=client.cert, content=b"c")
    ski = client.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    def use_ski(signer_info):
        signer_info["version"] = "v3"
        signer_info["sid"] = cms.SignerIdentifier({"subject_key_identifier": ski})
    message = scep.parse_signed(_redump_signer_info(der, use_ski))
    assert message.signer_cert == client.cert

    def unknown_ski(signer_info):
        signer_info["sid"] = cms.SignerIdentifier({"subject_key_identifier": b"\x00" * 20})
    with pytest.raises(MalformedRequest, match="signer's certificate"):
        scep.parse_signed(_redump_signer_info(der, unknown_ski))


def test_signed_attributes_in_any_order(client):
    """The signature is over the DER (sorted) SET; a signer may send them unsorted, or sign unsorted."""
    der = scep.build_signed(message_type=19, transaction_id="order", sender_nonce=b"n" * 16,
                            signer_key=client.key, signer_cert=client.cert, content=b"c")
    signer_info = _signer_info(der)
    attrs = signer_info["signed_attrs"]
    children = [a.dump() for a in attrs]
    reordered = attrs.dump()[:-len(b"".join(children))] + b"".join(reversed(children))
    assert reordered != attrs.dump() and len(reordered) == len(attrs.dump())
    sent_unsorted = der.replace(attrs.dump(), reordered)
    assert scep.parse_signed(sent_unsorted).transaction_id == "order"  # verified against the sorted form
    # a signer that signed exactly the unsorted encoding it sent
    old_signature = signer_info["signature"].native
    new_signature = client.key.sign(b"\x31" + reordered[1:], padding.PKCS1v15(), hashes.SHA256())
    signed_unsorted = sent_unsorted.replace(old_signature, new_signature)
    assert scep.parse_signed(signed_unsorted).transaction_id == "order"


# --- verification failures -------------------------------------------------------------

def test_bad_signature_is_bad_message_check_and_keeps_the_request(csr, client, ca):
    der = _pkcs_req(csr, client, ca, transaction_id="TID-1")

    def flip(signer_info):
        signature = bytearray(signer_info["signature"].native)
        signature[10] ^= 1
        signer_info["signature"] = bytes(signature)
    with pytest.raises(ScepFailure) as caught:
        scep.parse_signed(_redump_signer_info(der, flip))
    assert caught.value.fail_info == FailInfo.badMessageCheck
    # the unverified request, for a FAILURE CertRep echoing transactionID and nonce
    assert caught.value.request.transaction_id == "TID-1"
    assert caught.value.request.sender_nonce is not None


def test_content_change_is_a_digest_mismatch(client):
    der = scep.build_signed(message_type=19, transaction_id="x", sender_nonce=None,
                            signer_key=client.key, signer_cert=client.cert, content=b"A" * 40)
    tampered = der.replace(b"A" * 40, b"A" * 39 + b"B")
    with pytest.raises(ScepFailure) as caught:
        scep.parse_signed(tampered)
    assert caught.value.fail_info == FailInfo.badMessageCheck
    assert "messageDigest" in caught.value.text


def test_unsupported_digest_is_bad_alg(client):
    der = scep.build_signed(message_type=19, transaction_id="x", sender_nonce=None,
                            signer_key=client.key, signer_cert=client.cert)

    def md5(signer_info):
        signer_info["digest_algorithm"] = {"algorithm": "md5"}
    with pytest.raises(ScepFailure) as caught:
        scep.parse_signed(_redump_signer_info(der, md5))
    assert caught.value.fail_info == FailInfo.badAlg
    assert caught.value.request.transaction_id == "x"


def test_missing_scep_attributes_is_malformed(client):
    der = scep.build_signed(message_type=19, transaction_id="x", sender_nonce=None,
                            signer_key=client.key, signer_cert=client.cert)

    def drop_transaction_id(signer_info):
        attrs = [a for a in signer_info["signed_attrs"] if a["type"].dotted != scep.OID_TRANSACTION_ID]
        signer_info["signed_attrs"] = cms.CMSAttributes(attrs)
    with pytest.raises(MalformedRequest, match="transactionID"):
        scep.parse_signed(_redump_signer_info(der, drop_transaction_id))


def test_decrypt_failures_are_indistinguishable(csr, client, ca):
    message = scep.parse_signed(_pkcs_req(csr, client, ca))
    other = Party("someone else", rsa.generate_private_key(65537, 2048))
    plaintext = scep.decrypt_envelope(message.content, ca.key, ca.cert)[0]
    # wrong key (the recipientInfo names another cert): the one answer every failure gets, or rarely garbage
    garbage = _undecryptable(lambda: scep.decrypt_envelope(message.content, other.key, other.cert))
    assert garbage is None or garbage[0] != plaintext
    info = cms.ContentInfo.load(message.content)
    ktri = info["content"]["recipient_infos"][0].chosen
    key = bytearray(ktri["encrypted_key"].native)
    key[-1] ^= 0x55
    ktri["encrypted_key"] = bytes(key)
    garbage = _undecryptable(lambda: scep.decrypt_envelope(info.dump(force=True), ca.key, ca.cert))  # mangled RSA
    assert garbage is None or garbage[0] != plaintext


def test_envelope_random_is_injectable(ca):
    stream = random.Random(7)
    fixed = lambda n: bytes(stream.getrandbits(8) for _ in range(n))  # noqa: E731
    first = scep.build_envelope(b"hello", ca.cert, "aes128", random=fixed)
    stream.seed(7)
    second = scep.build_envelope(b"hello", ca.cert, "aes128", random=fixed)

    def encrypted(der):
        return cms.ContentInfo.load(der)["content"]["encrypted_content_info"]["encrypted_content"].native
    assert encrypted(first) == encrypted(second)
    assert scep.decrypt_envelope(first, ca.key, ca.cert) == (b"hello", "aes128")
    assert scep.new_nonce(random=lambda n: b"\x01" * n) == b"\x01" * 16


# --- contents and CSRs -----------------------------------------------------------------

def test_issuer_and_serial_and_subject(ca, client):
    der = scep.build_issuer_and_serial(ca.cert.subject, 2 ** 70 + 5)
    assert scep.parse_issuer_and_serial(der) == (ca.cert.subject, 2 ** 70 + 5)
    der = scep.build_issuer_and_subject(ca.cert.subject, client.cert.subject)
    assert scep.parse_issuer_and_subject(der) == (ca.cert.subject, client.cert.subject)
    # a name cryptography would refuse to build (C=USA) still parses and compares
    apple_ca = x509.load_pem_x509_certificate((APPLE / "ca.crt").read_bytes())
    with pytest.warns(UserWarning):
        issuer, serial = scep.parse_issuer_and_serial(scep.build_issuer_and_serial(apple_ca.subject, 1))
    assert issuer == apple_ca.subject and serial == 1
    for bad in (b"", b"\x30\x00", der + b"\x00", b"\x30\x03\x02\x01\x01"):
        with pytest.raises(MalformedRequest):
            scep.parse_issuer_and_serial(bad)
        with pytest.raises(MalformedRequest):
            scep.parse_issuer_and_subject(bad)


@pytest.mark.parametrize("kind", [MessageType.GetCert, MessageType.GetCRL, MessageType.CertPoll])
def test_other_requests(kind, ca, client):
    common = dict(recipient_cert=ca.cert, signer_key=client.key, signer_cert=client.cert,
                  transaction_id="poll-1", sender_nonce=scep.new_nonce(), cipher="aes128")
    if kind == MessageType.CertPoll:
        der = scep.build_cert_poll(ca.cert.subject, client.cert.subject, **common)
    elif kind == MessageType.GetCert:
        der = scep.build_get_cert(ca.cert.subject, 1234, **common)
    else:
        der = scep.build_get_crl(ca.cert.subject, 1234, **common)
    message = scep.parse_signed(der)
    assert message.message_type == kind
    inner, _ = scep.decrypt_envelope(message.content, ca.key, ca.cert)
    if kind == MessageType.CertPoll:
        assert scep.parse_issuer_and_subject(inner) == (ca.cert.subject, client.cert.subject)
    else:
        assert scep.parse_issuer_and_serial(inner) == (ca.cert.subject, 1234)


def test_get_crl_reply_carries_a_crl(ca, client):
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
           .last_update(NOW).next_update(NOW + datetime.timedelta(days=1))
           .sign(ca.key, hashes.SHA256()))
    request = scep.parse_signed(scep.build_get_crl(ca.cert.subject, 1, recipient_cert=ca.cert,
                                                   signer_key=client.key, signer_cert=client.cert,
                                                   transaction_id="crl", sender_nonce=b"n" * 16))
    der = scep.build_cert_rep(request=request, pki_status=PkiStatus.SUCCESS, signer_key=ca.key,
                              signer_cert=ca.cert, sender_nonce=b"m" * 16, crls=[crl], cipher="aes256")
    inner, _ = scep.decrypt_envelope(scep.parse_signed(der).content, client.key, client.cert)
    assert scep.parse_degenerate(inner) == ([], [crl])


def test_challenge_password_string_types(client):
    from cryptography.x509.name import _ASN1Type
    for tag in (_ASN1Type.PrintableString, _ASN1Type.UTF8String):
        request = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
                   .add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"one-time", _tag=tag)
                   .sign(client.key, hashes.SHA256()))
        assert scep.challenge_password(scep.parse_csr(request.public_bytes(serialization.Encoding.DER))) \
            == "one-time"
    plain = (x509.CertificateSigningRequestBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
             .sign(client.key, hashes.SHA256()))
    assert scep.challenge_password(plain) is None


def test_csr_proof_of_possession(csr):
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    with pytest.raises(ScepFailure) as caught:
        scep.parse_csr(bytes(der))
    assert caught.value.fail_info == FailInfo.badMessageCheck
    for bad in (b"", b"\x30\x00", bytes(der[:100])):
        with pytest.raises(MalformedRequest):
            scep.parse_csr(bad)


@needs_openssl
def test_csr_signature_algorithms_made_by_openssl(tmp_path):
    """Older SCEP clients sign their CSR with SHA-1: accepted on every path (a v1 CSR was refused as a bad
    signature, while a v2 one passed). MD5 and an id-RSASSA-PSS key (which the certificate would carry as plain
    rsaEncryption) are badAlg."""
    def csr(keyalg, digest):
        key = tmp_path / f"{keyalg}.pem"
        if not key.exists():
            assert subprocess.run(["openssl", "genpkey", "-algorithm", keyalg, "-pkeyopt", "rsa_keygen_bits:2048",
                                   "-out", str(key)], capture_output=True).returncode == 0
        p = subprocess.run(["openssl", "req", "-new", f"-{digest}", "-key", str(key), "-subj", "/CN=x",
                            "-outform", "DER"], capture_output=True)
        assert p.returncode == 0, p.stderr
        return p.stdout
    sha1 = csr("RSA", "sha1")
    assert scep.parse_csr(sha1).signature_algorithm_oid.dotted_string == "1.2.840.113549.1.1.5"
    tampered = bytearray(sha1)
    tampered[-5] ^= 0x01
    with pytest.raises(ScepFailure) as caught:
        scep.parse_csr(bytes(tampered))
    assert caught.value.fail_info == FailInfo.badMessageCheck
    for der, why in ((csr("RSA", "md5"), "unsupported CSR signature algorithm 1.2.840.113549.1.1.4"),
                     (csr("RSA-PSS", "sha256"), "RSASSA-PSS keys (id-RSASSA-PSS) are not supported")):
        with pytest.raises(ScepFailure) as caught:
            scep.parse_csr(der)
        assert caught.value.fail_info == FailInfo.badAlg and why in caught.value.text


def test_rsa_keys_with_huge_public_exponents_are_refused_by_parse_csr():
    from scepclient import rsa_key_with_huge_exponent
    huge = rsa_key_with_huge_exponent()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(huge, hashes.SHA256())
    with pytest.raises(ScepFailure) as caught:
        scep.parse_csr(csr.public_bytes(serialization.Encoding.DER))
    assert caught.value.fail_info == FailInfo.badAlg and "exponents over 64 bits" in caught.value.text


def test_transaction_id(client, ec_client):
    tid = scep.new_transaction_id(client.key.public_key())
    assert tid == scep.new_transaction_id(client.cert.public_key())  # same key, same ID
    assert tid != scep.new_transaction_id(ec_client.key.public_key())
    assert re.fullmatch(r"[0-9A-F]{64}", tid)


def test_degenerate_pkcs7_keeps_order(ca, client, ec_client):
    certs = [ec_client.cert, ca.cert, client.cert]
    der = scep.degenerate_pkcs7(certs)
    assert scep.parse_degenerate(der) == (certs, [])
    assert scep.parse_degenerate(scep.degenerate_pkcs7([])) == ([], [])


# --- openssl cms as the independent implementation -------------------------------------

@needs_openssl
def test_openssl_verifies_our_cert_rep(csr, client, ca, files):
    request = scep.parse_signed(_pkcs_req(csr, client, ca))
    for digest in ("sha1", "sha256"):
        der = scep.build_cert_rep(request=request, pki_status=PkiStatus.SUCCESS, signer_key=ca.key,
                                  signer_cert=ca.cert, sender_nonce=scep.new_nonce(),
                                  certs=[_issue(ca, csr.public_key())], cipher="aes256", digest=digest,
                                  signing_time=NOW)
        content = _openssl("cms", "-verify", "-inform", "DER", "-binary", "-noverify", input=der)
        assert content == scep.parse_signed(der).content
        content = _openssl("cms", "-verify", "-inform", "DER", "-binary", "-CAfile", files["ca"],
                           "-purpose", "any", "-attime", str(int(NOW.timestamp())), input=der)
        assert content == scep.parse_signed(der).content
        # and openssl opens the envelope inside with the requester's key
        inner = _openssl("cms", "-decrypt", "-inform", "DER", "-binary", "-recip", files["client"],
                         "-inkey", files["client_key"], input=content)
        assert scep.parse_degenerate(inner)[0][0].public_key() == csr.public_key()


@needs_openssl
def test_openssl_prints_our_degenerate_pkcs7(ca, client):
    der = scep.degenerate_pkcs7([client.cert, ca.cert])
    out = _openssl("pkcs7", "-inform", "DER", "-print_certs", "-noout", input=der).decode()
    assert out.index("client 1") < out.index("getcertd test CA")


@needs_openssl
@pytest.mark.parametrize("cipher,oaep", [("aes256", False), ("des3", False), ("aes128", True)])
def test_openssl_decrypts_our_envelope(cipher, oaep, ca, files):
    der = scep.build_envelope(b"inner message\x00\xff", ca.cert, cipher, oaep=oaep)
    out = _openssl("cms", "-decrypt", "-inform", "DER", "-binary", "-recip", files["ca"],
                   "-inkey", files["ca_key"], input=der)
    assert out == b"inner message\x00\xff"


@needs_openssl
@pytest.mark.parametrize("signer,options", [
    ("client", ["-md", "sha256"]),
    ("client", ["-md", "sha1"]),
    ("client", ["-md", "sha512", "-keyid"]),
    ("client", ["-md", "sha256", "-keyopt", "rsa_padding_mode:pss"]),
    ("ec", ["-md", "sha384"]),
    ("client", ["-md", "sha256", "-stream"]),  # BER: indefinite lengths, chunked eContent
])
def test_we_verify_openssl_signed_data(signer, options, files):
    content = b"\x30\x03\x02\x01\x05 some bytes"
    der = _openssl("cms", "-sign", "-nodetach", "-binary", "-outform", "DER", "-signer", files[signer],
                   "-inkey", files[signer + "_key"], *options, input=content)
    verified = scep.verify_signed_data(der)
    assert verified.content == content
    assert verified.digest == options[1]
    assert verified.signing_time is not None  # openssl adds signingTime among its signed attributes
    assert verified.signer_cert.public_bytes(serialization.Encoding.PEM) == Path(files[signer]).read_bytes()
    # without SCEP attributes it is not a pkiMessage
    with pytest.raises(MalformedRequest, match="messageType"):
        scep.parse_signed(der)
    tampered = der.replace(b"some bytes", b"some bytez")
    with pytest.raises(ScepFailure) as caught:
        scep.verify_signed_data(tampered)
    assert caught.value.fail_info == FailInfo.badMessageCheck


@needs_openssl
def test_openssl_signed_data_without_attributes_is_malformed(files):
    der = _openssl("cms", "-sign", "-nodetach", "-binary", "-noattr", "-outform", "DER",
                   "-signer", files["client"], "-inkey", files["client_key"], input=b"x")
    with pytest.raises(MalformedRequest, match="signed attributes"):
        scep.parse_signed(der)


@needs_openssl
@pytest.mark.parametrize("options,cipher", [
    (["-aes256"], "aes256"),
    (["-des3"], "des3"),
    (["-aes128", "-keyopt", "rsa_padding_mode:oaep"], "aes128"),
    (["-aes192", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"], "aes192"),
    (["-aes256", "-keyid"], "aes256"),
    (["-aes256", "-stream"], "aes256"),
])
def test_we_decrypt_openssl_envelopes(options, cipher, ca, files):
    plaintext = os.urandom(100)
    # -keyopt applies to the -recip before it
    der = _openssl("cms", "-encrypt", "-binary", "-outform", "DER", "-recip", files["ca"], *options,
                   input=plaintext)
    assert scep.decrypt_envelope(der, ca.key, ca.cert) == (plaintext, cipher)


@needs_openssl
def test_we_decrypt_openssl_envelope_for_another_recipient_too(ca, client, files):
    # Two recipients, ours second and named by SKI: the codec picks the right recipientInfo.
    der = _openssl("cms", "-encrypt", "-binary", "-outform", "DER", "-aes128", "-keyid",
                   "-recip", files["client"], "-recip", files["ca"], input=b"both")
    assert scep.decrypt_envelope(der, ca.key, ca.cert) == (b"both", "aes128")
    assert scep.decrypt_envelope(der, client.key, client.cert) == (b"both", "aes128")


# --- real-world vectors ----------------------------------------------------------------

def _legacy_pem_key(path: Path):
    """Load an OpenSSL "traditional" encrypted PEM key whose passphrase is empty.

    cryptography refuses an empty password, but the Apple vector's ca.key is DES-EDE3-CBC
    encrypted with exactly that: key = EVP_BytesToKey(MD5, salt = IV[:8], one iteration).
    """
    text = path.read_text()
    iv = bytes.fromhex(re.search(r"DEK-Info: DES-EDE3-CBC,([0-9A-Fa-f]+)", text).group(1))
    body = base64.b64decode("".join(line for line in text.split("\n\n", 1)[1].splitlines()
                                    if not line.startswith("-----")))
    d1 = hashlib.md5(iv[:8]).digest()
    d2 = hashlib.md5(d1 + iv[:8]).digest()
    decryptor = Cipher(TripleDES((d1 + d2)[:24]), modes.CBC(iv)).decryptor()
    der = decryptor.update(body) + decryptor.finalize()
    return serialization.load_der_private_key(der[:-der[-1]], None)


@pytest.fixture(scope="module")
def apple():
    key = _legacy_pem_key(APPLE / "ca.key")
    cert = x509.load_pem_x509_certificate((APPLE / "ca.crt").read_bytes())
    return key, cert, (APPLE / "PKCSReq.der").read_bytes()


@pytest.mark.filterwarnings("ignore:Attribute's length")  # the vector CA's C=USA
def test_apple_pkcs_req(apple):
    key, cert, der = apple
    message = scep.parse_signed(der)
    assert message.message_type == MessageType.PKCSReq
    assert message.transaction_id == "A13090761A30F66664F85D37433D2065E1112BA1"
    assert message.digest == "sha1"
    assert len(message.sender_nonce) == 8  # Apple sends 8-byte nonces, not 16
    assert message.signing_time == datetime.datetime(2016, 5, 31, 11, 30, 13, tzinfo=datetime.timezone.utc)
    assert message.signer_cert.subject.rfc4514_string() == "C=US,CN=MDM SCEP SIGNER"
    plaintext, cipher = scep.decrypt_envelope(message.content, key, cert)
    assert cipher == "des3"
    # The device's CSR says version 2 (should be 0): accepted, POP checked on the bytes as sent.
    csr = scep.parse_csr(plaintext)
    assert csr.subject.rfc4514_string().startswith("CN=com.apple.security.scep.")
    assert not csr.is_signature_valid  # documented: the object is the version-0 rewrite
    assert scep.challenge_password(csr) is None
    tampered = bytearray(plaintext)
    tampered[-3] ^= 0x10
    with pytest.raises(ScepFailure) as caught:
        scep.parse_csr(bytes(tampered))
    assert caught.value.fail_info == FailInfo.badMessageCheck


@pytest.mark.filterwarnings("ignore:Attribute's length")
def test_apple_cert_rep(apple):
    key, cert, der = apple
    request = scep.parse_signed(der)
    plaintext, cipher = scep.decrypt_envelope(request.content, key, cert)
    csr = scep.parse_csr(plaintext)
    issued = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(cert.subject)
              .public_key(csr.public_key()).serial_number(2)
              .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=1))
              .sign(key, hashes.SHA256()))
    reply_der = scep.build_cert_rep(request=request, pki_status=PkiStatus.SUCCESS, signer_key=key,
                                    signer_cert=cert, sender_nonce=scep.new_nonce(), certs=[issued],
                                    cipher=cipher, signing_time=NOW)
    reply = scep.parse_signed(reply_der)
    assert (reply.transaction_id, reply.recipient_nonce, reply.digest) == \
        (request.transaction_id, request.sender_nonce, "sha1")
    enveloped = cms.ContentInfo.load(reply.content)["content"]
    algorithm = enveloped["encrypted_content_info"]["content_encryption_algorithm"]["algorithm"]
    assert algorithm.dotted == "1.2.840.113549.3.7"  # des-ede3-cbc, as the device asked
    rid = enveloped["recipient_infos"][0].chosen["rid"].chosen
    assert rid["serial_number"].native == request.signer_cert.serial_number  # to the device's cert


def test_jscep_samples():
    request = scep.parse_signed((JSCEP / "scep_req2.der").read_bytes())
    assert request.message_type == MessageType.PKCSReq
    assert request.transaction_id == "7XXEY-ERLPU-2JDR9"
    assert request.digest == "sha256"
    assert request.content == (JSCEP / "scep_req1.der").read_bytes()
    reply = scep.parse_signed((JSCEP / "scep_resp2.der").read_bytes())
    assert reply.message_type == MessageType.CertRep
    assert reply.pki_status is PkiStatus.SUCCESS
    assert reply.transaction_id == request.transaction_id
    assert reply.recipient_nonce == request.sender_nonce
    assert reply.content == (JSCEP / "scep_resp1.der").read_bytes()
    csr = scep.parse_csr((JSCEP / "scep_req0.der").read_bytes())
    assert scep.challenge_password(csr) == "NQ3C6-GS3ZN-2XPGL-SEJTQ"
    certs, crls = scep.parse_degenerate((JSCEP / "scep_resp0.der").read_bytes())
    assert [c.public_key() for c in certs] == [csr.public_key()] and crls == []
    # no keys came with the samples: the envelope reads, and any key fails the same way
    stranger = Party("stranger", rsa.generate_private_key(65537, 1536))
    garbage = _undecryptable(lambda: scep.decrypt_envelope(reply.content, stranger.key, stranger.cert))
    if garbage is not None:  # a random content key that happened to give valid padding: not a certs-only PKCS#7
        with pytest.raises(MalformedRequest):
            scep.parse_degenerate(garbage[0])


# --- garbage ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def samples(csr, client, ca):
    request = _pkcs_req(csr, client, ca, cipher="aes128")
    parsed = scep.parse_signed(request)
    failure = scep.build_cert_rep(request=parsed, pki_status=PkiStatus.FAILURE, signer_key=ca.key,
                                  signer_cert=ca.cert, sender_nonce=b"n" * 16, fail_info=2,
                                  fail_info_text="no")
    return {
        "signed": [request, failure, (APPLE / "PKCSReq.der").read_bytes(),
                   (JSCEP / "scep_resp2.der").read_bytes()],
        "envelope": [parsed.content, scep.build_envelope(b"x" * 20, ca.cert, "des3", oaep=True)],
    }


def _mutants(rng: random.Random, der: bytes, count: int):
    for _ in range(count):
        data = bytearray(der)
        choice = rng.random()
        if choice < 0.3:
            yield bytes(data[:rng.randrange(len(data))])
        elif choice < 0.8:
            for _ in range(rng.randint(1, 4)):
                position = rng.randrange(len(data))
                data[position] ^= 1 << rng.randrange(8)
            yield bytes(data)
        else:
            position = rng.randrange(len(data))
            yield bytes(data[:position] + rng.randbytes(rng.randint(1, 8)) + data[position:])


def _only_typed(fn, data):
    try:
        fn(data)
    except TYPED:
        pass


def test_garbage_raises_only_typed_errors(samples, ca):
    rng = random.Random(20250301)
    inputs = [rng.randbytes(rng.randint(0, 300)) for _ in range(150)]
    inputs += [b"", b"\x30", b"\x30\x80", b"\x30\x00", b"\x30\x84\xff\xff\xff\xff", b"\x06\x00" * 10,
               b"\x30\x80" * 2000]  # deep indefinite nesting
    decrypt = lambda der: scep.decrypt_envelope(der, ca.key, ca.cert, allow_des=True)  # noqa: E731
    for der in inputs:
        for fn in (scep.parse_signed, decrypt, scep.parse_degenerate, scep.parse_csr,
                   scep.parse_issuer_and_serial, scep.parse_issuer_and_subject, scep.verify_signed_data):
            _only_typed(fn, der)
    for der in samples["signed"]:
        for mutant in _mutants(rng, der, 120):
            _only_typed(scep.parse_signed, mutant)
            _only_typed(scep.parse_degenerate, mutant)
    for der in samples["envelope"]:
        for mutant in _mutants(rng, der, 150):
            _only_typed(decrypt, mutant)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

    @FUZZ
    @given(st.binary(max_size=400))
    def test_hypothesis_arbitrary_bytes(data):
        for fn in (scep.parse_signed, scep.parse_degenerate, scep.parse_csr,
                   scep.parse_issuer_and_serial, scep.parse_issuer_and_subject):
            _only_typed(fn, data)

    @FUZZ
    @given(st.data())
    def test_hypothesis_mutated_messages(samples, ca, data):
        der = bytearray(data.draw(st.sampled_from(samples["signed"] + samples["envelope"])))
        edits = data.draw(st.lists(st.tuples(st.integers(0, len(der) - 1), st.integers(0, 255)),
                                   min_size=1, max_size=6))
        for position, value in edits:
            der[position] = value
        cut = data.draw(st.integers(0, len(der)))
        mutant = bytes(der[:cut])
        _only_typed(scep.parse_signed, mutant)
        _only_typed(lambda d: scep.decrypt_envelope(d, ca.key, ca.cert, allow_des=True), mutant)
