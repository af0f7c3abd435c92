"""Hostile user names and transaction IDs against a real twistd with local accounts: they can't add RDNs or
subjectAltName entries to the issued certificate, nor forge log lines.

Names with commas, '=', '+', quotes, backslashes, '/', non-ASCII and bidi characters, and of the longest
allowed length, are added with getcertd-users and enrolled through HTTP Basic (and one through the CSR's
challengePassword): the certificate's subject has exactly the template's three RDNs, one attribute each, with
the name whole in the CN; with a URI subjectAltName template there is exactly one entry. Names
getcertd-users refuses (control characters, over 64 characters) are written into the users file directly
(a NUL, TAB, ESC, DEL, 65 and 5,000 characters) and answered with a FAILURE CertRep; names with line breaks,
which no users file can hold, are sent in HTTP Basic and answered 401. Nothing reaches the log as a line of
its own: no line (nor a carriage-return or Unicode line-separator segment of one) starts with the
injected text, and no NUL or ESC reaches the log at all.
"""
import re
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from appliance import tool
from getcertd import scep
from getcertd.errors import FailInfo
from getcertd.local import hash_password
from scepclient import Requester, basic, get_ca_certs, http

TEMPLATE = [(NameOID.ORGANIZATION_NAME, "getcertd"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "remote-access")]

# Accepted by getcertd-users (printable, 1 to 64 characters): each must come out as one CN value.
PRINTABLE_NAMES = [
    "eve,CN=admin",
    "eve+CN=admin",
    "O=evil,OU=x=y\\,z",
    '"quoted" CN=admin;',
    "CN=root/emailAddress=root@example.com",
    "bob@example.com,email:evil@example.net",
    "URI:https://evil.example/,DNS:evil.example",
    "\u00e9ve\u202eCN=nimda #",  # non-ASCII and a right-to-left override
    "m" * 64,
]
# Refused by getcertd-users; written to the users file directly to reach the policy.
CONTROL_NAMES = ["eve\x00admin", "eve\tINJECTED tab", "eve\x1b[2J\x1b[31mINJECTED", "eve\x7fdel", "n" * 65, "l" * 5000]
# Not even a users file can hold these: sent in HTTP Basic only.
LINE_BREAK_NAMES = ["alice\nINJECTED newline", "alice\r\nINJECTED crlf", "alice\rINJECTED cr",
                    "alice\u2028INJECTED ls", "alice\x85INJECTED nel"]
PASSWORD = "correct horse"
LINE_BREAKS = re.compile(r"[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _add_user(app, user):
    p = subprocess.run([tool("getcertd-users"), "--file", app.users_file, "add", user], input=PASSWORD + "\n",
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def _append_raw_user(app, user):
    with open(app.users_file, "a", encoding="utf-8") as f:
        f.write(f"{user}:{hash_password(PASSWORD.encode())}\n")


def _enroll(app, certs, user, password=PASSWORD, **message):
    """Through HTTP Basic; a name with ':' can't be a Basic user-id (RFC 7617), so it goes in the CSR: the
    subject CN names the user and the challengePassword carries the password."""
    r = Requester(certs)
    if ":" in user:
        data, headers = r.message(cn=user, challenge=password, **message), {}
    else:
        data, headers = r.message(**message), basic(user, password)
    status, headers, body = http(app.url + "?operation=PKIOperation", data=data, cafile=app.ca_pem,
                                 headers=headers)
    if status != 200:
        return status, None, None
    rep, issued = r.open_reply(body)
    return status, rep, issued[0] if issued else None


def _assert_log_clean(app):
    log = app.log()
    assert "\x00" not in log and "\x1b" not in log
    for line in log.split("\n"):
        for segment in LINE_BREAKS.split(line):
            assert not segment.lstrip().startswith("INJECTED"), repr(line)
    assert "Traceback" not in log and "Unhandled" not in log


def _assert_subject(cert, user):
    rdns = list(cert.subject.rdns)
    assert len(rdns) == 3 and all(len(rdn) == 1 for rdn in rdns), cert.subject
    values = [(next(iter(rdn)).oid, next(iter(rdn)).value) for rdn in rdns]
    assert values == TEMPLATE + [(NameOID.COMMON_NAME, user)], values


@pytest.fixture
def subject_only(appliance_factory):
    app = appliance_factory(name="subject")
    for user in PRINTABLE_NAMES:
        _add_user(app, user)
    return app


def test_printable_hostile_names_fill_one_cn_value(subject_only):
    app = subject_only
    certs = get_ca_certs(app.url, app.ca_pem)
    for user in PRINTABLE_NAMES:
        status, rep, cert = _enroll(app, certs, user)
        assert status == 200 and rep.pki_status == scep.PkiStatus.SUCCESS, (user, status, rep)
        _assert_subject(cert, user)
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        # what an IPsec gateway would print and match on: one CN, whatever the name holds
        pem = cert.public_bytes(serialization.Encoding.PEM)
        out = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253"], input=pem,
                             capture_output=True).stdout.decode("utf-8", "replace")
        assert out.count("OU=remote-access") == 1 and out.count("O=getcertd") == 1, out
    _assert_log_clean(app)


def test_challenge_password_path_takes_the_name_whole(subject_only):
    app = subject_only
    certs = get_ca_certs(app.url, app.ca_pem)
    r = Requester(certs)
    status, _, body = http(app.url + "?operation=PKIOperation", cafile=app.ca_pem,
                           data=r.message(cn="eve,CN=admin", challenge=PASSWORD))
    rep, issued = r.open_reply(body)
    assert status == 200 and rep.pki_status == scep.PkiStatus.SUCCESS
    _assert_subject(issued[0], "eve,CN=admin")
    # a CSR CN with a line break names no user: refused, and nothing of it reaches the log as a line
    r = Requester(certs)
    status, _, body = http(app.url + "?operation=PKIOperation", cafile=app.ca_pem,
                           data=r.message(cn="alice\nINJECTED csr", challenge=PASSWORD))
    rep, issued = r.open_reply(body)
    assert status == 200 and rep.pki_status == scep.PkiStatus.FAILURE and not issued
    _assert_log_clean(app)


def test_control_characters_and_long_names_are_refused(appliance_factory):
    app = appliance_factory(name="control")
    for user in CONTROL_NAMES[1:4] + ["x" * 65]:  # argv can't carry a NUL at all
        p = subprocess.run([tool("getcertd-users"), "--file", app.users_file, "add", user],
                           input=PASSWORD + "\n", capture_output=True, text=True)
        assert p.returncode != 0 and "printable" in p.stderr, (user, p.stderr)
    for user in CONTROL_NAMES:
        _append_raw_user(app, user)
    certs = get_ca_certs(app.url, app.ca_pem)
    for user in CONTROL_NAMES:
        status, rep, cert = _enroll(app, certs, user)
        if len(user.encode()) > 253:  # more than a RADIUS User-Name holds: refused before any authentication
            assert status == 400 and rep is None, (user[:20], status)
            continue
        assert status == 200 and rep.pki_status == scep.PkiStatus.FAILURE and cert is None, (user[:20], status)
        assert rep.fail_info == FailInfo.badRequest
    for user in LINE_BREAK_NAMES:
        status, _, _ = _enroll(app, certs, user)
        assert status == 401, (user, status)
    assert _enroll(app, certs, "alice", "alice-pass")[1].pki_status == scep.PkiStatus.SUCCESS
    _assert_log_clean(app)


def test_san_template_makes_exactly_one_entry(appliance_factory):
    app = appliance_factory(name="san", sections={"policy": {"san": "uri:urn:getcertd:user:{user}"}})
    names = [n for n in PRINTABLE_NAMES if not set(n) & set(' "<>\\^`{|}')]
    refused = [n for n in PRINTABLE_NAMES if n not in names]
    for user in PRINTABLE_NAMES:
        _add_user(app, user)
    certs = get_ca_certs(app.url, app.ca_pem)
    for user in names:
        status, rep, cert = _enroll(app, certs, user)
        assert rep.pki_status == scep.PkiStatus.SUCCESS, (user, rep)
        _assert_subject(cert, user)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert list(san) == [x509.UniformResourceIdentifier(f"urn:getcertd:user:{user}")], list(san)
    for user in refused:  # characters a URI can't hold: refused rather than escaped or split
        status, rep, cert = _enroll(app, certs, user)
        assert rep.pki_status == scep.PkiStatus.FAILURE and cert is None, user
    _assert_log_clean(app)


def test_hostile_transaction_ids_do_not_forge_log_lines(appliance_factory):
    """A transactionID is the client's string (UTF8String allowed). One with control characters or line breaks
    is refused with a 400 (no real client sends one); the printable ones that look like log or JSON syntax
    are issued, retried (the logged case) and found again after a restart."""
    app = appliance_factory(name="tid")
    certs = get_ca_certs(app.url, app.ca_pem)
    for tid in ["T1\nINJECTED tid", "T2\r\nINJECTED tid", "T3\u2028INJECTED tid", "T4\x1b[2JINJECTED"]:
        status, _, body = http(app.url + "?operation=PKIOperation", data=Requester(certs).message(transaction_id=tid),
                               cafile=app.ca_pem, headers=basic("alice", "alice-pass"))
        assert status == 400 and body == b"bad request: transactionID has control characters\n", body
    sent = []
    for tid in ['T5","x":"', "T6 ünïcödé {user} %s"]:
        r = Requester(certs)
        msg = r.message(transaction_id=tid)
        for _ in range(2):  # the second is a retry of an issued transaction: the logged case
            status, _, body = http(app.url + "?operation=PKIOperation", data=msg, cafile=app.ca_pem,
                                   headers=basic("alice", "alice-pass"))
            rep, issued = r.open_reply(body)
            assert status == 200 and rep.pki_status == scep.PkiStatus.SUCCESS
        sent.append((r, msg, issued[0].serial_number))
    # the journal holds these IDs: after a restart it replays, and a retry still finds each certificate
    app.stop()
    app.start()
    for r, msg, serial in sent:
        status, _, body = http(app.url + "?operation=PKIOperation", data=msg, cafile=app.ca_pem,
                               headers=basic("alice", "alice-pass"))
        rep, issued = r.open_reply(body)
        assert rep.pki_status == scep.PkiStatus.SUCCESS and issued[0].serial_number == serial
    _assert_log_clean(app)
