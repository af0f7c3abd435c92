"""Fuzz targets and their seed inputs, shared by scripts/fuzz (atheris), tests/test_fuzz.py,
tests/test_fuzz_regressions.py and tests/test_properties.py.

A target takes arbitrary bytes. It may end in the parser's typed errors only (``TYPED[name]``); any other
exception is a crash. Everything here is deterministic: the RA key is the fixed test key in
tests/vectors/fuzz, so a saved corpus or crash input replays the same way on every run.
"""
import datetime
import hashlib
import hmac
import random
import struct
import warnings
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from getcertd import config, radius, scep, web
from getcertd.errors import AuthenticationRequired, ConfigError, MalformedRequest, ScepFailure

VECTORS = Path(__file__).parent / "vectors"
NOW = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.timezone.utc)
RADIUS_SECRET = b"fuzz-secret"
RADIUS_AUTHENTICATOR = bytes(range(16))

TYPED = {
    "scep": (MalformedRequest, ScepFailure),
    "query": (MalformedRequest, web.HttpError, AuthenticationRequired),
    "radius": (radius.BadReply,),
    "config": (ConfigError,),
    "scep-diff": (),  # a typed error from the asn1crypto path where the fast path accepted is a disagreement
    "selftest": (),
}

# asn1crypto warns about over-long name attributes (the Apple vector's C=USA); that is not a fault.
warnings.filterwarnings("ignore", message="Attribute's length")


# --- keys ------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def ra():
    """(key, certificate) of the fixed fuzzing RA: every built request is encrypted to it."""
    key = serialization.load_pem_private_key((VECTORS / "fuzz" / "ra.key").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((VECTORS / "fuzz" / "ra.pem").read_bytes())
    return key, cert


def _self_signed(key, cn):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))


@lru_cache(maxsize=None)
def ec_client():
    key = ec.derive_private_key(0x5EED, ec.SECP256R1())
    return key, _self_signed(key, "fuzz EC client")


def _csr(key, cn="fuzz client", challenge=None, san=None):
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if challenge is not None:
        builder = builder.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(san)]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# --- seeds -----------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def scep_seeds():
    """name -> DER: SignedData pkiMessages, bare EnvelopedData, bare CSRs and message contents."""
    ra_key, ra_cert = ra()
    ec_key, ec_cert = ec_client()
    rng = random.Random(1)
    fixed = rng.randbytes
    seeds = {}
    for path in sorted((VECTORS / "jscep-samples").glob("*.der")):
        seeds["jscep-" + path.stem] = path.read_bytes()
    seeds["apple-pkcsreq"] = (VECTORS / "apple-pkcsreq" / "PKCSReq.der").read_bytes()

    csr = _csr(ra_key, challenge="s3cret")
    seeds["csr-rsa-challenge"] = csr
    seeds["csr-ec-san"] = _csr(ec_key, cn="bob", san="bob@example.com")
    common = dict(recipient_cert=ra_cert, signer_key=ra_key, signer_cert=ra_cert, transaction_id="FUZZ-1",
                  sender_nonce=b"n" * 16, signing_time=NOW, random=fixed)
    for cipher in ("aes128", "aes256", "des3", "des"):
        seeds[f"pkcsreq-{cipher}"] = scep.build_pkcs_req(csr, cipher=cipher, **common)
    seeds["pkcsreq-oaep-sha256"] = scep.build_request(
        scep.MessageType.PKCSReq, csr, oaep=True, digest="sha512", **common)
    seeds["renewalreq-ec-signer"] = scep.build_pkcs_req(
        seeds["csr-ec-san"], message_type=scep.MessageType.RenewalReq,
        **{**common, "signer_key": ec_key, "signer_cert": ec_cert, "extra_certs": [ra_cert]})
    issuer_serial = scep.build_issuer_and_serial(ra_cert.subject, 12345)
    seeds["issuer-and-serial"] = issuer_serial
    seeds["getcert"] = scep.build_get_cert(ra_cert.subject, 12345, **common)
    seeds["certpoll"] = scep.build_cert_poll(ra_cert.subject, ec_cert.subject, **common)
    seeds["envelope-csr-aes256"] = scep.build_envelope(csr, ra_cert, "aes256", random=fixed)
    seeds["envelope-csr-des3-oaep"] = scep.build_envelope(csr, ra_cert, "des3", oaep=True, random=fixed)
    request = scep.parse_signed(seeds["pkcsreq-aes128"])
    seeds["certrep-success"] = scep.build_cert_rep(
        request=request, pki_status=scep.PkiStatus.SUCCESS, signer_key=ra_key, signer_cert=ra_cert,
        sender_nonce=b"s" * 16, certs=[ec_cert, ra_cert], cipher="aes128", signing_time=NOW, random=fixed)
    seeds["certrep-failure"] = scep.build_cert_rep(
        request=request, pki_status=scep.PkiStatus.FAILURE, signer_key=ra_key, signer_cert=ra_cert,
        sender_nonce=b"s" * 16, fail_info=2, fail_info_text="no", signing_time=NOW)
    seeds["degenerate"] = scep.degenerate_pkcs7([ra_cert, ec_cert])
    seeds["pkcsreq-pss"] = _pss_signed(seeds["pkcsreq-aes128"], ra_key)
    seeds["apple-csr-v2"] = _apple_csr()
    return seeds


def _pss_signed(der, key):
    """The message re-signed with RSASSA-PSS (SHA-256, MGF1-SHA-256, salt 32), which our builder never makes."""
    from asn1crypto import cms
    from cryptography.hazmat.primitives.asymmetric import padding
    info = cms.ContentInfo.load(der)
    signer = info["content"]["signer_infos"][0]
    to_sign = signer["signed_attrs"].untag().dump(force=True)
    signer["signature_algorithm"] = {"algorithm": "rsassa_pss", "parameters": {
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
        "salt_length": 32}}
    signer["signature"] = key.sign(to_sign, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    return info.dump(force=True)


def _apple_csr():
    """The Apple device's CSR (version 2: the legacy proof-of-possession path), from the vector's envelope.

    The vector's CA key is "traditional" PEM encrypted with an empty passphrase, which cryptography refuses:
    key = EVP_BytesToKey(MD5, salt = IV[:8], one iteration), DES-EDE3-CBC.
    """
    import base64
    import re
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    text = (VECTORS / "apple-pkcsreq" / "ca.key").read_text()
    iv = bytes.fromhex(re.search(r"DEK-Info: DES-EDE3-CBC,([0-9A-Fa-f]+)", text).group(1))
    body = base64.b64decode("".join(line for line in text.split("\n\n", 1)[1].splitlines()
                                    if not line.startswith("-----")))
    d1 = hashlib.md5(iv[:8]).digest()
    d2 = hashlib.md5(d1 + iv[:8]).digest()
    decryptor = Cipher(TripleDES((d1 + d2)[:24]), modes.CBC(iv)).decryptor()
    der = decryptor.update(body) + decryptor.finalize()
    key = serialization.load_der_private_key(der[:-der[-1]], None)
    cert = x509.load_pem_x509_certificate((VECTORS / "apple-pkcsreq" / "ca.crt").read_bytes())
    message = scep.parse_signed((VECTORS / "apple-pkcsreq" / "PKCSReq.der").read_bytes())
    return scep.decrypt_envelope(message.content, key, cert)[0]


def query_seeds():
    der = scep_seeds()["pkcsreq-aes128"]
    import base64
    b64 = base64.b64encode(der)
    return {
        "der": der,
        "b64": b64,
        "b64-urlsafe": base64.urlsafe_b64encode(der).rstrip(b"="),
        "query-raw": b"/scep?operation=PKIOperation&message=" + b64,
        "query-space-for-plus": b"/scep?operation=PKIOperation&message=" + b64.replace(b"+", b" "),
        "query-escaped": b"/scep?message=" + b64.replace(b"+", b"%2B").replace(b"/", b"%2F")
                         + b"&operation=PKIOperation",
        "query-lines": b"/cgi-bin/pkiclient.exe?operation=PKIOperation&message="
                       + b"%0A".join(b64[i:i + 64] for i in range(0, len(b64), 64)),
        "basic": b"Basic " + base64.b64encode(b"alice:alice-pass"),
    }


def radius_seeds():
    auth, secret = RADIUS_AUTHENTICATOR, RADIUS_SECRET
    enc = radius.encode_reply
    return {
        "accept": enc(radius.ACCESS_ACCEPT, 1, auth, secret,
                      [("Session-Timeout", 600), ("Class", b"gold"), ("Reply-Message", "welcome")]),
        "accept-filter-id": enc(radius.ACCESS_ACCEPT, 2, auth, secret,
                                [("Filter-Id", "silver"), ("Framed-IP-Address", "10.0.0.1"),
                                 ("NAS-IPv6-Address", "::1"), (26, b"\x00\x00\x00\x09\x01\x06abcd")]),
        "challenge": enc(radius.ACCESS_CHALLENGE, 3, auth, secret,
                         [("State", b"state-123"), ("Reply-Message", "Enter token"),
                          ("Reply-Message", " code")]),
        "reject": enc(radius.ACCESS_REJECT, 4, auth, secret, [("Reply-Message", "no")]),
        "accept-unsigned": enc(radius.ACCESS_ACCEPT, 5, auth, secret, [("Event-Timestamp", 1700000000)],
                               with_message_authenticator=False),
    }


def config_seeds():
    base = "[getcertd]\nstate_dir = /tmp/x\n[auth]\nusers = /tmp/users\n"
    return {
        "minimal": base,
        "sample": (Path(__file__).parent.parent / "etc" / "getcertd.ini").read_text(),
        "radius": "[auth]\nbackend = radius\n[radius]\nservers = 127.0.0.1:1812 [::1]:1813\nsecret = s\n"
                  "timeout = 2s\nretries = 3\ndead_time = 1m\nprofile_attribute = Filter-Id\n",
        "profiles": base + "[policy]\nprofile_map = gold=short, x=default\nlifetime = 2h\n"
                           "[profile short]\nlifetime = 10m\nsubject = CN={user}\neku = clientAuth\n",
        "secret-file": "[auth]\nbackend = radius\n[radius]\nservers = h:1\nsecret_file = /run/s\n",
    }


SEEDS = {"scep": scep_seeds, "scep-diff": scep_seeds, "query": query_seeds, "radius": radius_seeds,
         "config": config_seeds,
         "selftest": lambda: {"fine": b"fine"}}


def seeds(name):
    """The seed inputs of a target as bytes."""
    return {k: v.encode("utf-8") if isinstance(v, str) else v for k, v in SEEDS[name]().items()}


# --- targets ---------------------------------------------------------------------------------------

def _try(typed, fn, *args):
    try:
        return fn(*args)
    except typed:
        return None


def _inner(data):
    """The parsers of an envelope's plaintext: CSR (with its challengePassword), GetCert/CertPoll contents."""
    typed = TYPED["scep"]
    csr = _try(typed, scep.parse_csr, data)
    if csr is not None:
        _try(typed, scep.challenge_password, csr)
    _try(typed, scep.parse_issuer_and_serial, data)
    _try(typed, scep.parse_issuer_and_subject, data)
    _try(typed, scep.parse_degenerate, data)


def scep_target(data: bytes) -> None:
    """parse_signed, then decrypt_envelope with the fixed RA key on its content (verified or not, so that a
    mutation that breaks the signature still reaches the envelope), then the content parsers. The input
    itself is also tried as an envelope and as a CSR, for seeds that are bare envelopes or CSRs."""
    typed = TYPED["scep"]
    ra_key, ra_cert = ra()
    content = None
    try:
        content = scep.parse_signed(data).content
    except ScepFailure as failure:
        request = getattr(failure, "request", None)
        content = request.content if request is not None else None
    except MalformedRequest:
        pass
    for envelope in (content, data):
        if envelope is None:
            continue
        opened = _try(typed, scep.decrypt_envelope, envelope, ra_key, ra_cert, True)
        if opened is not None:
            _inner(opened[0])
    _inner(data)


def query_target(data: bytes) -> None:
    """query_message on the input as a request URI, decode_message on what it finds and on the input, and
    parse_basic on the input as an Authorization header."""
    typed = TYPED["query"]
    raw = _try(typed, web.query_message, data)
    if raw is not None:
        _try(typed, web.decode_message, raw)
    _try(typed, web.decode_message, data)
    _try(typed, web.parse_basic, data)


def resign_radius(data: bytes) -> bytes:
    """The input with a Length field that fits and correct authenticators, so that mutations reach the
    attribute decoder instead of stopping at the Response Authenticator check."""
    if len(data) < radius.HEADER_LENGTH:
        return data
    data = data[:radius.MAX_PACKET_LENGTH]
    body = bytearray(data[:2] + struct.pack("!H", len(data)) + RADIUS_AUTHENTICATOR + data[20:])
    offset = radius.HEADER_LENGTH
    while offset + 2 <= len(body):  # the first well-placed Message-Authenticator gets a right value
        attr_type, length = body[offset], body[offset + 1]
        if length < 2:
            break
        if attr_type == radius.MESSAGE_AUTHENTICATOR and length == 18 and offset + 18 <= len(body):
            body[offset + 2:offset + 18] = bytes(16)
            mac = hmac.new(RADIUS_SECRET, bytes(body), hashlib.md5).digest()
            body[offset + 2:offset + 18] = mac
            break
        offset += length
    response = radius.response_authenticator(bytes(body), RADIUS_AUTHENTICATOR, RADIUS_SECRET)
    return bytes(body[:4]) + response + bytes(body[20:])


def radius_target(data: bytes) -> None:
    """decode_reply on the input as received and re-signed, then interpret_reply (which may not raise)."""
    typed = TYPED["radius"]
    for packet in (data, resign_radius(data)):
        for require in (True, False):
            reply = _try(typed, radius.decode_reply, packet, RADIUS_AUTHENTICATOR, RADIUS_SECRET, require)
            if reply is not None:
                radius.interpret_reply(reply, "user", False)
                radius.interpret_reply(reply, "user", True, "Filter-Id")


def _read_file(path):
    if "missing" in path:
        raise ConfigError(f"[radius] secret_file: can't read {path}")
    return b" fuzz-secret\n"


def config_target(data: bytes) -> None:
    """parse_config on the input decoded as UTF-8 (undecodable bytes replaced, as a text file read would
    fail before parsing)."""
    _try(TYPED["config"], config.parse_config, data.decode("utf-8", "replace"), "fuzz.ini", _read_file)


def _signed_fields(parsed):
    out = {k: getattr(parsed, k) for k in parsed.__dataclass_fields__}
    out["attrs"] = {oid: [v.dump() for v in values] for oid, values in parsed.attrs.items()}
    return out


def scep_diff_target(data: bytes) -> None:
    """Differential: whatever getcertd.scep's fast DER walkers accept, the asn1crypto path accepts too and
    reads the same (the property of tests/test_scep_der.py, under coverage guidance). A disagreement is an
    AssertionError, i.e. a crash. The input is tried as a SignedData and as an EnvelopedData."""
    _, ra_cert = ra()
    fast = scep._fast_signed_structure(data)
    if fast is not None:
        original = scep._fast_signed_structure
        scep._fast_signed_structure = lambda _der: None
        try:
            slow = scep._parse_signed_structure(data)
        finally:
            scep._fast_signed_structure = original
        assert _signed_fields(fast) == _signed_fields(slow), "fast and asn1crypto SignedData paths differ"
    for allow_des in (False, True):
        fast = scep._fast_envelope_structure(data, allow_des, ra_cert)
        if fast is None:
            continue
        slow = scep._parse_envelope_structure(data, allow_des)
        asn1_cert = scep._asn1_cert(ra_cert)
        assert all(scep._rid_matches(r[0], asn1_cert) for r in slow[5]), "a recipient the fast path took as ours"
        assert fast[:5] == slow[:5], "fast and asn1crypto EnvelopedData paths differ"
        assert [(type(p), k) for _, p, k in fast[5]] == [(type(p), k) for _, p, k in slow[5]], \
            "fast and asn1crypto EnvelopedData recipients differ"


def selftest_target(data: bytes) -> None:
    """A target with a planted fault, for tests/test_fuzz.py to check that a crash is caught and saved."""
    if data.startswith(b"CRASH"):
        raise IndexError("planted fault")


TARGETS = {"scep": scep_target, "scep-diff": scep_diff_target, "query": query_target, "radius": radius_target,
           "config": config_target, "selftest": selftest_target}
