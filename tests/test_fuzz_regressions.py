"""Inputs that crashed a parser under scripts/fuzz or tests/test_properties.py, kept as regression tests.

A crash is any exception other than the parser's typed errors (see tests/fuzztargets.py). Each entry says
who found it, what it raised before the fix, and the fix.
"""
import pytest

import fuzztargets
import scepclient
from getcertd import config, scep, web
from getcertd.errors import ConfigError, MalformedRequest

CRASHES = [
    # scripts/fuzz query, crash-4c7351de9553cf7bad4981351a27e3fec053f786, within the first 1,000 runs: a
    # message whose %EA escape is not UTF-8. query_message percent-decoded with unquote() (UTF-8, with
    # replacement) and re-encoded as latin-1: UnicodeEncodeError on U+FFFD, an HTTP 500 for a GET
    # PKIOperation. Fixed in getcertd/web.py: unquote_to_bytes, bytes to bytes.
    pytest.param("query", b"/scep?message=MIIJTgYJKoZIhvcNAQcCBasTsCAQExDzANBglghkgBZQM%EAgEFADCCBC\x19\x00\x00"
                          b"\x00\x00\x00\x00\x00sGCSqBKL\x08\x00\x00\x00\x00\x00\x00\x00Ya%2F6nSJD%2FXkChmTQU8q"
                          b"ZAMTCCAq4GCSqGSIb2DwQ==", id="query-non-utf8-percent-escape"),
    pytest.param("query", b"/scep?operation=PKIOperation&message=%C4%80%FF", id="query-minimal-escapes"),
    # Found while writing tests/test_properties.py (test_radius_server_lists falsifies the old code with the
    # port '⓵'; the fuzzer's random INI text did not get there): a RADIUS server port of '²' passed
    # str.isdigit() and then int() raised ValueError; port 0 was accepted. Fixed in getcertd/config.py:
    # ports are [0-9]{1,5} in 1..65535 (and durations [0-9]{1,12}, at most 100 years).
    pytest.param("config", "[auth]\nbackend = radius\n[radius]\nservers = radius.example:\u00b2\nsecret = s\n"
                 .encode(), id="config-superscript-port"),
]


def _econtent_type_changed(name, to_oid):
    """A seed pkiMessage whose eContentType (the first id-data OID in it) names another type."""
    seed = fuzztargets.seeds("scep")[name]
    data_oid = scep._der_oid(scep.OID_DATA)
    assert data_oid in seed
    return seed.replace(data_oid, scep._der_oid(to_oid), 1)


# scripts/fuzz scep-diff, crash-2a5671ad2f0538addfe893f8e9e5b90c8cf8d71d in CI (and again in a local run): a
# SignedData whose eContentType was mutated from id-data to envelopedData. The fast DER walker read eContent as
# the OCTET STRING it is; asn1crypto reads eContent by its type and raised "EnvelopedData ... should have been
# constructed", so the two paths disagreed. Fixed in getcertd/scep.py: only id-data content takes the fast path;
# the request is a 400 either way.
CRASHES.append(pytest.param("scep-diff", _econtent_type_changed("pkcsreq-aes128", scep.OID_ENVELOPED_DATA),
                            id="scep-diff-econtent-type-enveloped"))


def test_econtent_of_another_type_is_refused_by_both_paths():
    data = _econtent_type_changed("pkcsreq-aes128", scep.OID_ENVELOPED_DATA)
    assert scep._fast_signed_structure(data) is None
    with pytest.raises(MalformedRequest, match="SignedData"):
        scep.parse_signed(data)


@pytest.mark.parametrize("target, data", CRASHES)
def test_crash_input_ends_in_a_typed_error(target, data):
    fuzztargets.TARGETS[target](data)  # raises anything but the typed errors -> the test fails


def test_query_message_keeps_escaped_bytes():
    assert web.query_message(b"/scep?message=%C4%80%FF%2B+/") == b"\xc4\x80\xff++/"
    with pytest.raises(MalformedRequest):
        web.decode_message(web.query_message(b"/scep?message=%C4%80%FF"))


@pytest.mark.parametrize("servers", ["h:\u00b2", "h:\u0663", "h:0", "h:65536", "h:123456", "[::1]:", "h:-1"])
def test_radius_server_ports_are_ascii_and_in_range(servers):
    with pytest.raises(ConfigError, match="port from 1 to 65535"):
        config.parse_config(f"[auth]\nbackend = radius\n[radius]\nservers = {servers}\nsecret = s\n")


@pytest.mark.parametrize("lifetime", ["\u0663h", "9" * 13, "36601d", "99999999999w"])
def test_durations_are_ascii_and_bounded(lifetime):
    with pytest.raises(ConfigError, match=r"\[policy\] lifetime"):
        config.parse_config(f"[auth]\nusers = /u\n[policy]\nlifetime = {lifetime}\n")


def test_non_utf8_escape_in_a_get_is_400_not_500(appliance_factory):
    """The query crash, end to end: before the fix twistd answered 500 and logged a traceback."""
    app = appliance_factory()
    status, _, body = scepclient.http(app.url + "?operation=PKIOperation&message=MIIB%EA%FF%C4%80",
                                      cafile=app.ca_pem)
    assert status == 400, body
    assert "Traceback" not in app.log() and "Unhandled" not in app.log()


# scripts/fuzz scep-diff (the fast DER walkers of getcertd.scep against the asn1crypto path), two findings in
# the SignedData fast path, rebuilt here from a valid message with the tree editor of tests/test_properties.py.

def _edited_pkcs_req(edit):
    from test_properties import encode, parse_tree
    tree = parse_tree(fuzztargets.scep_seeds()["pkcsreq-aes128"])
    edit(tree.children[1].children[0])  # the SignedData
    return encode(tree)


def _certificate_version_18(signed_data):
    # crash-a7dbf35f...: the included certificate says version 18. cryptography raises x509.InvalidVersion,
    # which is no ValueError: it escaped _fast_signed_structure (parse_signed's guard still made it a
    # MalformedRequest). Fixed: the fast path hands it to asn1crypto.
    signed_data.children[3].children[0].children[0].children[0].children[0].value = b"\x12"


def _signature_parameters_tag_0(signed_data):
    # crash-1d3c8d93...: signatureAlgorithm parameters with universal tag 0 (00 00). The fast path took the
    # message, which asn1crypto refuses ("Unknown element"); the parameters of rsaEncryption are not read, so
    # the fast path accepted more than it may. Fixed: it takes NULL or a SEQUENCE there, else gives way.
    from test_properties import Node
    signature_algorithm = signed_data.children[-1].children[0].children[4]
    signature_algorithm.children[1] = Node(b"\x00", None, b"")


@pytest.mark.parametrize("edit", [_certificate_version_18, _signature_parameters_tag_0])
def test_fast_signed_structure_gives_way(edit):
    from getcertd import scep
    der = _edited_pkcs_req(edit)
    assert scep._fast_signed_structure(der) is None
    with pytest.raises(MalformedRequest):
        scep.parse_signed(der)
    fuzztargets.TARGETS["scep-diff"](der)
    fuzztargets.TARGETS["scep"](der)
