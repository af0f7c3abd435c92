"""Memory: hostile CMS input can't make the parsers allocate beyond a small multiple of its own size, and the
2 MiB HTTP body cap holds against a real twistd when the body is really sent (3 MiB, announced or chunked)."""
import glob
import os
import socket
import ssl
import time
import tracemalloc

import pytest

import fuzztargets
import scepclient
from getcertd import scep
from getcertd.errors import MalformedRequest

MIB = 1024 * 1024


def _length(n):
    if n < 0x80:
        return bytes([n])
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _nest(depth, inner=b"\x05\x00"):
    for _ in range(depth):
        inner = b"\x30" + _length(len(inner)) + inner
    return inner


def _content_info(oid_hex, inner):
    body = bytes.fromhex(oid_hex) + b"\xa0" + _length(len(inner)) + inner
    return b"\x30" + _length(len(body)) + body


SIGNED_DATA = "06092a864886f70d010702"
ENVELOPED_DATA = "06092a864886f70d010703"
SEED = fuzztargets.scep_seeds()["pkcsreq-aes128"]
ENVELOPE = fuzztargets.scep_seeds()["envelope-csr-aes256"]

HOSTILE = {
    # a declared length of 2 GiB (and of 2^64) on the outer SEQUENCE, the real content being 2 KiB
    "outer-2GiB": b"\x30\x84\x7f\xff\xff\xff" + SEED[4:],
    "outer-2^64": b"\x30\x88\xff\xff\xff\xff\xff\xff\xff\xff" + SEED[4:],
    # 2 GiB declared deep inside an otherwise valid message: on the eContent OCTET STRING and the envelope
    "econtent-2GiB": SEED[:SEED.index(ENVELOPE[:8]) - 4] + b"\x04\x84\x7f\xff\xff\xff"
                     + SEED[SEED.index(ENVELOPE[:8]):],
    "envelope-2GiB": b"\x30\x84\x7f\xff\xff\xff" + ENVELOPE[4:],
    "length-of-length-127": b"\x30\xff" + b"\xff" * 127,
    # deep nesting: indefinite (BER) and definite, bare and as the content of a SignedData / EnvelopedData
    "indefinite-200k": b"\x30\x80" * 200000,
    "definite-20k": _nest(20000),
    "signeddata-definite-20k": _content_info(SIGNED_DATA, _nest(20000)),
    "signeddata-indefinite-100k": _content_info(SIGNED_DATA, b"\x30\x80" * 100000),
    "envelopeddata-definite-20k": _content_info(ENVELOPED_DATA, _nest(20000)),
    # width instead of depth: a SET OF with 200,000 elements, and one 2 MiB OCTET STRING
    "set-of-200k": b"\x31" + _length(400000) + b"\x05\x00" * 200000,
    "octets-2MiB": b"\x04" + _length(2 * MIB) + bytes(2 * MIB),
}


def _wide(seed_name, edit):
    """A valid seed with one SET OF blown up to hundreds of thousands of tiny elements (tests/test_properties.py's
    DER tree editor): each element costs asn1crypto a Python object, so before getcertd.scep counted values
    first these took 50 to 360 MiB and 5 to 86 s of CPU (on the reactor thread, before any authentication)."""
    from test_properties import parse_tree, encode
    tree = parse_tree(fuzztargets.scep_seeds()[seed_name])
    edit(tree)
    return encode(tree)


def _signer_info(tree):
    return tree.children[1].children[0].children[-1].children[0]


def _set_field(node, index, tag, contents):
    from test_properties import Node
    node.children[index] = Node(tag, None, contents)


def _attribute(oid, values):
    from test_properties import _oid, _tlv
    return _tlv(0x30, _oid(oid) + b"\x31" + _length(len(values)) + values)


WIDE = {
    "signed-attribute-400k-values": ("pkcsreq-aes128", lambda t: _set_field(
        _signer_info(t), 3, b"\xa0", _attribute("2.16.840.113733.1.9.7", b"\x05\x00" * 400000))),
    "signed-attributes-120k": ("pkcsreq-aes128", lambda t: _set_field(
        _signer_info(t), 3, b"\xa0", _attribute("1.2.3", b"\x05\x00") * 120000)),
    "signerinfos-700k": ("pkcsreq-aes128", lambda t: _set_field(
        t.children[1].children[0], -1, b"\x31", b"\x30\x00" * 700000)),
    "recipientinfos-700k": ("envelope-csr-aes256", lambda t: _set_field(
        t.children[1].children[0], 1, b"\x31", b"\x30\x00" * 700000)),
    "csr-attribute-400k-values": ("csr-rsa-challenge", lambda t: _set_field(
        t.children[0], 3, b"\xa0", _attribute("1.2.840.113549.1.9.7", b"\x05\x00" * 400000))),
}
HOSTILE.update({name: _wide(*spec) for name, spec in WIDE.items()})


@pytest.mark.parametrize("name", sorted(WIDE))
def test_wide_messages_are_refused_quickly(name):
    data = HOSTILE[name]
    ra_key, ra_cert = fuzztargets.ra()
    parse = {"recipientinfos-700k": lambda d: scep.decrypt_envelope(d, ra_key, ra_cert),
             "csr-attribute-400k-values": scep.parse_csr}.get(name, scep.parse_signed)
    t0 = time.monotonic()
    with pytest.raises(MalformedRequest, match="more than 10000 ASN.1 values"):
        parse(data)
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_cms_allocates_in_proportion_to_its_size(name):
    data = HOSTILE[name]
    fuzztargets.scep_target(data)  # warm up: imports, caches, the RA key
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        fuzztargets.scep_target(data)  # parse_signed, decrypt_envelope, parse_csr...: typed errors only
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bound = 4 * MIB + 4 * len(data)
    assert peak < bound, f"{name}: peak {peak} bytes for {len(data)} bytes of input"
    assert elapsed < 5, f"{name}: {elapsed:.1f} s"


def _rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _tls(app):
    ctx = ssl.create_default_context(cafile=app.ca_pem)
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", app.port), timeout=10),
                           server_hostname="localhost")


def _read_response(sock, timeout=10):
    """One HTTP response (head and Content-Length body); stops there, whether or not the server closes."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                return data
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
        return head + b"\r\n\r\n" + body
    except (OSError, ssl.SSLError):
        return data


def _spooled(pid):
    """Sizes of the deleted temporary files twistd holds open: where Twisted spools request bodies."""
    sizes = []
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            if os.readlink(fd).endswith("(deleted)"):
                sizes.append(os.stat(fd).st_size)
        except OSError:
            pass
    return sizes


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_three_mib_post_is_413_and_the_server_lives_on(appliance_factory, chunked):
    """The body is really sent, 3 MiB of it (a chunked one announces no length and must be cut as it
    arrives: before the fix in httpguard.GuardedRequest, twistd spooled any chunked body to a temporary file,
    200 MiB in a second, and answered only after the last chunk)."""
    app = appliance_factory()
    pid = app.proc.pid
    before = _rss(pid)
    piece = os.urandom(65536)
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % (3 * MIB)
    head = (b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/x-pki-message\r\n" + framing + b"\r\n")
    for _ in range(3):
        sock = _tls(app)
        sock.sendall(head)
        sent = 0
        try:
            while sent < 3 * MIB:
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n" if chunked else piece)
                sent += len(piece)
        except OSError:
            pass  # the server may close first; its answer is still to be read
        reply = _read_response(sock)
        assert reply.startswith(b"HTTP/1.1 413") and b"too large" in reply, reply[:200]
        spooled = _spooled(pid)
        assert all(size <= 2 * MIB for size in spooled), spooled
        sock.close()
    assert app.proc.poll() is None
    status, _, caps = scepclient.http(app.url + "?operation=GetCACaps", cafile=app.ca_pem)
    assert status == 200 and b"POSTPKIOperation" in caps
    growth = _rss(pid) - before
    assert growth < 48 * MIB, f"twistd grew by {growth / MIB:.1f} MiB after three 3 MiB bodies"
    log = app.log()
    assert "Traceback" not in log and "Unhandled" not in log
