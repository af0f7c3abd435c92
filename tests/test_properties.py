"""Property-based tests (hypothesis) of every parser that reads bytes from the network or the disk.

The property is the parsers' contract: on any input they return, or raise their typed errors
(MalformedRequest / ScepFailure for SCEP, MalformedRequest / HttpError for the HTTP helpers, BadReply for
RADIUS, ConfigError for the configuration); never another exception. The SCEP inputs are valid messages
(built with getcertd.scep, the Apple and jscep vectors) mutated structurally: a small DER tree editor
truncates, flips bits, splices nodes between messages, changes tags, declares huge or indefinite
lengths, nests thousands of levels deep, drops, repeats and replaces nodes, and re-wraps a mutated inner
layer (CSR, EnvelopedData, signed attributes) in a correctly signed and encrypted outer one, so that the
mutation is what the deep parser sees. Every test is derandomized with a fixed example count; the file
runs in well under 30 s.
"""
import base64
import copy
import functools
import hashlib
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzztargets
from getcertd import config, radius, scep, web
from getcertd.errors import AuthenticationRequired, ConfigError, MalformedRequest

SCEP_TYPED = fuzztargets.TYPED["scep"]
QUERY_TYPED = fuzztargets.TYPED["query"]


def examples(n):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- a small DER tree editor -----------------------------------------------------------------------

class Node:
    """One TLV: tag octets, and children (constructed, or an OCTET/BIT STRING that encapsulates DER) or a
    primitive value. ``header`` overrides the length octets when a mutation wants a lying length."""
    __slots__ = ("tag", "children", "value", "header", "indefinite", "wrapper")

    def __init__(self, tag, children=None, value=b""):
        self.tag, self.children, self.value = tag, children, value
        self.header = None
        self.indefinite = False
        self.wrapper = b""  # the BIT STRING's unused-bits octet before encapsulated DER


def _read_tlv(data, i):
    start = i
    if i >= len(data):
        raise ValueError
    i += 1
    if data[start] & 0x1F == 0x1F:  # high tag number form
        while i < len(data) and data[i] & 0x80:
            i += 1
        i += 1
    tag = data[start:i]
    if i >= len(data):
        raise ValueError
    first = data[i]
    i += 1
    if first < 0x80:
        length = first
    elif first == 0x80 or first > 0x84:
        raise ValueError  # indefinite or absurd: the tree editor only reads what our builders make
    else:
        length = int.from_bytes(data[i:i + (first & 0x7F)], "big")
        i += first & 0x7F
    if i + length > len(data):
        raise ValueError
    return tag, data[i:i + length], i + length


def _children(content):
    out, i = [], 0
    while i < len(content):
        tag, value, i = _read_tlv(content, i)
        out.append(_tree(tag, value))
    return out


def _tree(tag, value):
    if tag[0] & 0x20:
        try:
            return Node(tag, _children(value))
        except ValueError:
            return Node(tag, None, value)
    if tag in (b"\x04", b"\x03") and len(value) > 2:
        inner, wrapper = (value, b"") if tag == b"\x04" else (value[1:], value[:1])
        if inner[:1] in (b"\x30", b"\x31"):
            try:
                children = _children(inner)
                if len(children) == 1:
                    node = Node(tag, children)
                    node.wrapper = wrapper
                    return node
            except ValueError:
                pass
    return Node(tag, None, value)


def parse_tree(der: bytes) -> Node:
    tag, value, end = _read_tlv(der, 0)
    assert end == len(der)
    return _tree(tag, value)


def _length(n):
    if n < 0x80:
        return bytes([n])
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def encode(node: Node) -> bytes:
    content = node.value if node.children is None else node.wrapper + b"".join(encode(c) for c in node.children)
    if node.indefinite:
        return bytes([node.tag[0] | 0x20]) + node.tag[1:] + b"\x80" + content + b"\x00\x00"
    return node.tag + (node.header if node.header is not None else _length(len(content))) + content


def nodes(root: Node) -> list:
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(reversed(node.children or ()))
    return out


HUGE_LENGTHS = [b"\x84\xff\xff\xff\xff", b"\x84\x7f\xff\xff\xff", b"\x88\xff\xff\xff\xff\xff\xff\xff\xff",
                b"\x8f" + b"\xff" * 15, b"\xff", b"\x81\x00", b"\x82\x00\x05", b"\x80"]
OPS = ("truncate", "flip", "splice", "tag", "huge_length", "indefinite", "nest", "nest_indefinite", "drop",
       "repeat", "swap", "value", "integer")


@functools.lru_cache(maxsize=None)
def _trees(samples):
    return [parse_tree(s) for s in samples]


@st.composite
def mutated(draw, samples):
    """A structurally mutated copy of one of ``samples`` (DER), after 1 to 3 edits."""
    trees = _trees(tuple(samples))
    root = copy.deepcopy(draw(st.sampled_from(trees)))
    for _ in range(draw(st.integers(1, 3))):
        everything = nodes(root)
        node = everything[draw(st.integers(0, len(everything) - 1))]
        op = draw(st.sampled_from(OPS))
        if op == "truncate":
            der = encode(root)
            return der[:draw(st.integers(0, len(der) - 1))]
        if op == "flip":
            der = bytearray(encode(root))
            for _ in range(draw(st.integers(1, 4))):
                position = draw(st.integers(0, len(der) - 1))
                der[position] ^= 1 << draw(st.integers(0, 7))
            return bytes(der)
        if op == "splice":
            donor = nodes(draw(st.sampled_from(trees)))
            graft = copy.deepcopy(donor[draw(st.integers(0, len(donor) - 1))])
            node.tag, node.children, node.value, node.wrapper = graft.tag, graft.children, graft.value, graft.wrapper
        elif op == "tag":
            node.tag = bytes([draw(st.integers(0, 255))]) if draw(st.booleans()) \
                else draw(st.sampled_from([b"\x1f\x81\x80\x80\x80\x80\x00", b"\x9f\xff\xff\xff\x7f", b"\x00",
                                           b"\x05", b"\x30", b"\x31", b"\xa0", b"\x04", b"\x02", b"\x06"]))
        elif op == "huge_length":
            node.header = draw(st.sampled_from(HUGE_LENGTHS))
        elif op == "indefinite":
            node.indefinite = True
        elif op == "nest":
            depth = draw(st.sampled_from([2, 50, 500, 3000]))
            inner = encode(node)
            for _ in range(depth - 1):  # as bytes: a Node chain this deep would overflow encode()'s stack
                inner = b"\x30" + _length(len(inner)) + inner
            node.tag, node.children, node.value, node.wrapper = b"\x30", None, inner, b""
        elif op == "nest_indefinite":
            depth = draw(st.sampled_from([10, 1000, 5000]))
            node.tag, node.children, node.value = b"\x30", None, b"\x30\x80" * depth + b"\x00\x00" * depth
            node.indefinite = True
        elif op in ("drop", "repeat", "swap") and node.children:
            i = draw(st.integers(0, len(node.children) - 1))
            if op == "drop":
                del node.children[i]
            elif op == "repeat":
                node.children[i:i] = [copy.deepcopy(node.children[i])] * draw(st.sampled_from([1, 2, 100]))
            else:
                j = draw(st.integers(0, len(node.children) - 1))
                node.children[i], node.children[j] = node.children[j], node.children[i]
        elif op == "value":
            node.children = None
            node.value = draw(st.binary(max_size=64) | st.sampled_from([b"", b"\x00" * 300, b"\xff" * 9]))
        elif op == "integer" and node.children is None:
            node.tag = b"\x02"
            node.value = draw(st.sampled_from([b"", b"\x00", b"\xff" * 1000, b"\x00\x00\x01", b"\x80",
                                               (2 ** 64).to_bytes(9, "big")]))
    return encode(root)


# --- the SCEP samples --------------------------------------------------------------------------------

SEEDS = fuzztargets.scep_seeds()
SIGNED = [SEEDS[k] for k in ("pkcsreq-aes128", "pkcsreq-des3", "pkcsreq-oaep-sha256", "renewalreq-ec-signer",
                             "pkcsreq-pss", "certrep-success", "certrep-failure", "getcert", "apple-pkcsreq",
                             "jscep-scep_req2", "jscep-scep_resp2")]
ENVELOPES = [SEEDS[k] for k in ("envelope-csr-aes256", "envelope-csr-des3-oaep", "jscep-scep_req1")]
CSRS = [SEEDS[k] for k in ("csr-rsa-challenge", "csr-ec-san", "jscep-scep_req0", "apple-csr-v2")]
CONTENTS = [SEEDS[k] for k in ("issuer-and-serial", "degenerate", "jscep-scep_resp0")]


def _wrap(inner: bytes, **kwargs) -> bytes:
    """inner encrypted to the fuzz RA and signed, as a client would send it."""
    ra_key, ra_cert = fuzztargets.ra()
    return scep.build_pkcs_req(inner, recipient_cert=ra_cert, signer_key=ra_key, signer_cert=ra_cert,
                               transaction_id="PROP", sender_nonce=b"n" * 16, **kwargs)


def _sign(content: bytes) -> bytes:
    ra_key, ra_cert = fuzztargets.ra()
    return scep.build_signed(message_type=scep.MessageType.PKCSReq, transaction_id="PROP", sender_nonce=b"n" * 16,
                             signer_key=ra_key, signer_cert=ra_cert, content=content)


def test_the_tree_editor_round_trips_every_sample():
    for der in SIGNED + ENVELOPES + CSRS + CONTENTS:
        if der[1:2] == b"\x80":  # a BER sample: the editor reads DER only
            continue
        assert encode(parse_tree(der)) == der


@examples(250)
@given(mutated(SIGNED))
def test_mutated_pki_messages(der):
    """parse_signed, decrypt_envelope with the RA key (on the content even when the signature broke),
    parse_csr and the content parsers: typed errors only."""
    fuzztargets.scep_target(der)


@examples(100)
@given(mutated(ENVELOPES))
def test_mutated_envelopes_inside_a_valid_signature(envelope):
    """The mutated EnvelopedData arrives correctly signed, so parse_signed passes and decrypt_envelope
    sees the mutation (as the enrollment service would)."""
    message = scep.parse_signed(_sign(envelope))
    assert message.content == envelope
    fuzztargets.scep_target(_sign(envelope))


@examples(120)
@given(mutated(CSRS), st.sampled_from(["aes128", "des3"]))
def test_mutated_csrs_inside_a_valid_message(csr, cipher):
    """A mutated CSR, encrypted and signed correctly: parse_csr sees the mutation after decryption."""
    der = _wrap(csr, cipher=cipher)
    ra_key, ra_cert = fuzztargets.ra()
    plaintext, _ = scep.decrypt_envelope(scep.parse_signed(der).content, ra_key, ra_cert)
    assert plaintext == csr
    try:
        parsed = scep.parse_csr(plaintext)
        scep.challenge_password(parsed)
    except SCEP_TYPED:
        pass


@examples(150)
@given(mutated(CONTENTS + CSRS))
def test_mutated_message_contents(der):
    for parse in (scep.parse_issuer_and_serial, scep.parse_issuer_and_subject, scep.parse_degenerate,
                  scep.parse_csr):
        try:
            parse(der)
        except SCEP_TYPED:
            pass


# Signed attributes: arbitrary (OID, values) sets, signed correctly by the RA key, so the attribute reader
# (not the signature check) has to cope with duplicates, missing ones, wrong types and many values.
SCEP_OIDS = [scep.OID_MESSAGE_TYPE, scep.OID_TRANSACTION_ID, scep.OID_SENDER_NONCE, scep.OID_RECIPIENT_NONCE,
             scep.OID_PKI_STATUS, scep.OID_FAIL_INFO, scep.OID_FAIL_INFO_TEXT, scep.OID_CONTENT_TYPE,
             scep.OID_MESSAGE_DIGEST, scep.OID_SIGNING_TIME, "1.2.3.4", "2.5.4.3"]


def _tlv(tag, content):
    return bytes([tag]) + _length(len(content)) + content


def _oid(dotted):
    from asn1crypto import core
    return core.ObjectIdentifier(dotted).dump()


ATTRIBUTE_VALUES = st.one_of(
    st.text(max_size=20).map(lambda t: _tlv(0x0C, t.encode())),  # UTF8String
    st.from_regex(r"[0-9]{0,12}", fullmatch=True).map(lambda t: _tlv(0x13, t.encode())),  # PrintableString
    st.binary(max_size=24).map(lambda b: _tlv(0x04, b)),  # OCTET STRING
    st.binary(max_size=8).map(lambda b: _tlv(0x02, b)),  # INTEGER, possibly empty (invalid)
    st.sampled_from([b"\x05\x00", b"\x01\x01\xff", _oid("1.2.840.113549.1.7.1"), b"\x17\x0d250301120000Z",
                     b"\x17\x0d991399999999Z", b"\x18\x0f20250301120000Z", b"\x30\x00", b"\x1e\x03abc",
                     b"\x14\x02\xff\xfe", b"\x13\x01\x00", b"\x0c\x02\xc3\x28", b"\x16\x01\x80"]),
)
ATTRIBUTES = st.lists(st.tuples(st.sampled_from(SCEP_OIDS), st.lists(ATTRIBUTE_VALUES, max_size=3)),
                      max_size=12)


def _signed_with_attributes(attributes, content=b"\x30\x00"):
    """A SignedData whose [0] signed attributes are exactly ``attributes``, with a valid signature over them."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    ra_key, ra_cert = fuzztargets.ra()
    template = parse_tree(_sign(content))
    signer_info = template.children[1].children[0].children[-1].children[0]  # ContentInfo/[0]/SignedData
    encoded = [_tlv(0x30, _oid(oid) + _tlv(0x31, b"".join(values))) for oid, values in attributes]
    attrs_der = b"".join(encoded)
    signature = ra_key.sign(_tlv(0x31, attrs_der), padding.PKCS1v15(), hashes.SHA256())
    signer_info.children[3] = Node(b"\xa0", None, attrs_der)
    signer_info.children[5] = Node(b"\x04", None, signature)
    return encode(template)


@examples(200)
@given(ATTRIBUTES)
def test_signed_attributes_of_any_shape(attributes):
    der = _signed_with_attributes(attributes)
    try:
        message = scep.parse_signed(der)
    except SCEP_TYPED:
        return
    # what was accepted is what the attributes said
    assert isinstance(message.transaction_id, str) and isinstance(message.message_type, int)


def test_signed_attributes_helper_makes_a_valid_message():
    digest = hashlib.sha256(b"\x30\x00").digest()
    attributes = [(scep.OID_CONTENT_TYPE, [_oid(scep.OID_DATA)]), (scep.OID_MESSAGE_DIGEST, [_tlv(0x04, digest)]),
                  (scep.OID_MESSAGE_TYPE, [_tlv(0x13, b"19")]), (scep.OID_TRANSACTION_ID, [_tlv(0x13, b"T1")])]
    message = scep.parse_signed(_signed_with_attributes(attributes))
    assert (message.message_type, message.transaction_id) == (19, "T1")


@examples(300)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_scep(data):
    fuzztargets.scep_target(data)


# --- HTTP: query strings, message encodings, Basic credentials --------------------------------------

@examples(300)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_http_helpers(data):
    fuzztargets.query_target(data)


URLISH = st.text(alphabet=string.ascii_letters + string.digits + "+/=%&?#;:@!$'()*,-._~ \t\r\n\x00\x7f\xe9\u20ac",
                 max_size=120)
ESCAPE = st.builds(lambda h: "%" + h, st.text(alphabet="0123456789abcdefABCDEFxg%", min_size=0, max_size=2))


@examples(300)
@given(st.lists(st.tuples(st.sampled_from(["message", "operation", "", "messag", "message%3D", "MESSAGE"]),
                          st.lists(URLISH | ESCAPE, max_size=6).map("".join)), max_size=5),
       st.sampled_from(["/scep?", "/cgi-bin/pkiclient.exe?", "/?", "", "?", "/scep"]))
def test_urlish_queries(parts, prefix):
    uri = (prefix + "&".join(f"{k}={v}" for k, v in parts)).encode("utf-8")
    raw = web.query_message(uri)
    assert raw is None or isinstance(raw, bytes)
    if raw is not None:
        try:
            der = web.decode_message(raw)
            assert der[:1] == b"\x30"
        except MalformedRequest:
            pass


def _client_spellings(b64: str):
    """How real clients put base64 into a query: raw, escaped, '+' as space, URL-safe, folded, unpadded."""
    yield b64
    yield b64.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    yield b64.replace("+", "%2b").replace("/", "%2f")
    yield b64.replace("+", " ")
    yield b64.replace("+", "-").replace("/", "_").rstrip("=")
    yield "%0A".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    yield "%0D%0A".join(b64[i:i + 76] for i in range(0, len(b64), 76)) + "%0D%0A"
    yield b64.rstrip("=")


@examples(150)
@given(st.binary(max_size=300).map(lambda b: b"\x30" + b))
def test_every_client_spelling_of_a_message_decodes_to_it(der):
    b64 = base64.b64encode(der).decode()
    for spelling in _client_spellings(b64):
        uri = f"/scep?operation=PKIOperation&message={spelling}".encode()
        assert web.decode_message(web.query_message(uri)) == der, spelling
    assert web.decode_message(der) == der  # a POST body in DER
    assert web.decode_message(b64.encode()) == der  # a POST body in base64


@examples(200)
@given(st.one_of(st.binary(max_size=200),
                 st.tuples(st.sampled_from([b"Basic ", b"basic  ", b"BASIC\t", b"Bearer ", b""]),
                           st.binary(max_size=60).map(base64.b64encode) | st.binary(max_size=60))
                 .map(b"".join)))
def test_basic_credentials(header):
    try:
        result = web.parse_basic(header)
    except web.HttpError as e:
        assert e.code == 400
        return
    except AuthenticationRequired:  # 401 with WWW-Authenticate: another scheme than Basic
        assert header.strip().split(b" ")[0].lower() != b"basic"
        return
    assert result is None or (isinstance(result[0], str) and isinstance(result[1], bytes))


# --- RADIUS replies ---------------------------------------------------------------------------------

RADIUS_REPLIES = list(fuzztargets.radius_seeds().values())


@examples(300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_radius(data):
    fuzztargets.radius_target(data)  # re-signs the bytes too, so they reach the attribute decoder


@st.composite
def mutated_reply(draw):
    data = bytearray(draw(st.sampled_from(RADIUS_REPLIES)))
    op = draw(st.sampled_from(["flip", "truncate", "attribute", "length", "splice"]))
    if op == "flip":
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif op == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif op == "attribute":  # an arbitrary attribute with an honest or a lying length
        attr_type = draw(st.integers(0, 255))
        value = draw(st.binary(max_size=40))
        length = draw(st.sampled_from([len(value) + 2, 0, 1, 255, len(value) + 3]))
        position = draw(st.sampled_from([20, len(data)]))
        data[position:position] = bytes([attr_type, length & 0xFF]) + value
    elif op == "length":
        data[2:4] = draw(st.integers(0, 65535)).to_bytes(2, "big")
    else:
        other = draw(st.sampled_from(RADIUS_REPLIES))
        data = data[:draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))):]
    return bytes(data)


@examples(300)
@given(mutated_reply())
def test_mutated_radius_replies(data):
    fuzztargets.radius_target(data)


def test_resigned_replies_are_accepted():
    """The harness's re-signing is right: a valid reply stays valid after it."""
    for data in RADIUS_REPLIES:
        assert fuzztargets.resign_radius(data) == data
        radius.decode_reply(data, fuzztargets.RADIUS_AUTHENTICATOR, fuzztargets.RADIUS_SECRET, False)


# --- the configuration ------------------------------------------------------------------------------

@examples(300)
@given(st.text(max_size=400))
def test_arbitrary_config_text(text):
    try:
        config.parse_config(text, read_file=lambda path: b"s")
    except ConfigError:
        pass


_KEYS = [(section, key) for section, keys in config._SCHEMA.items() for key in keys]
_VALUES = st.one_of(
    st.text(max_size=30).map(lambda t: t.replace("\n", " ").replace("\r", " ")),
    st.sampled_from(["", "yes", "no", "0", "-1", "1" * 30, "10m", "\u00b2", "\u0663", "8 h", "1w", "99999999999999d",
                     "radius", "local", "cn", "email", "Class", "Filter-Id", "h:1812", "[::1]:1812", "h:\u00b2", ":",
                     "[", "h:99999", "CN={user}", "{nope}", "a=b", "a=nope", "%(x)s", "rsa2048", "/a /b", "a"]))


@examples(300)
@given(st.lists(st.tuples(st.sampled_from(_KEYS + [("profile gold", "lifetime"), ("profile gold", "eku"),
                                                   ("profile ", "subject"), ("nosuch", "key"),
                                                   ("policy", "nosuch")]), _VALUES), max_size=12))
def test_structured_config(items):
    sections = {}
    for (section, key), value in items:
        sections.setdefault(section, {})[key] = value
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) for s, kv in sections.items())
    try:
        parsed = config.parse_config(text, read_file=lambda path: b" secret\n")
    except ConfigError:
        return
    assert all(p.lifetime >= 60 for p in parsed.profiles.values())
    for host, port in parsed.radius.servers:
        assert 0 < port < 65536


_PORTS = st.text(alphabet=st.characters(categories=["Nd", "No"]) | st.sampled_from("0123456789-+ _"), max_size=7)


@examples(200)
@given(st.lists(st.tuples(st.text(alphabet=string.ascii_letters + ":[].", max_size=12), _PORTS), max_size=4),
       st.sampled_from([" ", ", ", ",", "\t"]))
def test_radius_server_lists(servers, separator):
    """Every digit-like character (Unicode categories Nd and No, e.g. '²', '٣') in a port."""
    line = separator.join(f"{host}:{port}" for host, port in servers)
    try:
        parsed = config.parse_config(f"[auth]\nbackend = radius\n[radius]\nsecret = s\nservers = {line}\n")
    except ConfigError:
        return
    assert parsed.radius.servers and all(0 < port < 65536 for _, port in parsed.radius.servers)
