"""CRL building (checked against cryptography's builder and openssl) and the publisher on a Clock."""
import datetime
import os
import shutil
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet import defer, task
from twisted.python.failure import Failure

from getcertd.ca import CertificateAuthority, make_ca_certificate
from getcertd.crl import CrlPublisher, build_crl, load_crl_number
from getcertd.errors import ConfigError
from getcertd.issuance import IssuanceLog, Record

UTC = datetime.timezone.utc
T0 = 1_780_000_000
HOUR = 3600
NOW = datetime.datetime.fromtimestamp(T0, UTC)
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")

_KEYS = {}


def ca_for(kind):
    if kind not in _KEYS:
        key = {"rsa": lambda: rsa.generate_private_key(65537, 2048),
               "ec": lambda: ec.generate_private_key(ec.SECP256R1()),
               "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
               "ed25519": ed25519.Ed25519PrivateKey.generate}[kind]()
        cert = make_ca_certificate(key, f"CN=Test {kind} CA,O=Example", NOW - datetime.timedelta(days=1),
                                   datetime.timedelta(days=3650))
        _KEYS[kind] = CertificateAuthority(key, cert)
    return _KEYS[kind]


def openssl(*args):
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, check=False)


def check_with_openssl(tmp_path, ca, der):
    crl_file, ca_file = tmp_path / "crl.der", tmp_path / "ca.pem"
    crl_file.write_bytes(der)
    ca_file.write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    verify = openssl("crl", "-inform", "DER", "-in", str(crl_file), "-CAfile", str(ca_file), "-verify", "-noout")
    assert verify.returncode == 0 and "verify OK" in verify.stderr + verify.stdout, verify
    text = openssl("crl", "-inform", "DER", "-in", str(crl_file), "-text", "-noout")
    assert text.returncode == 0, text
    return text.stdout


REVOKED = [(0x1234, T0 - 100, 1), (2**127 + 5, T0 - 50, None), (0xFF, T0 - 10, 5), (0x80, T0, 0),
           (77, 2_600_000_000, 9)]  # the last one is dated after 2049: GeneralizedTime


def cryptography_crl(ca, revoked, number, this_update, next_update):
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.certificate.subject)
         .last_update(this_update).next_update(next_update)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
             ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), critical=False)
         .add_extension(x509.CRLNumber(number), critical=False))
    names = {1: x509.ReasonFlags.key_compromise, 5: x509.ReasonFlags.cessation_of_operation,
             9: x509.ReasonFlags.privilege_withdrawn}
    for serial, at, reason in revoked:
        rb = (x509.RevokedCertificateBuilder().serial_number(serial)
              .revocation_date(datetime.datetime.fromtimestamp(at, UTC)))
        if reason:
            rb = rb.add_extension(x509.CRLReason(names[reason]), critical=False)
        b = b.add_revoked_certificate(rb.build())
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_same_bytes_as_cryptographys_builder():
    """RSA PKCS#1 v1.5 signatures are deterministic, so the whole CRL must match byte for byte."""
    ca = ca_for("rsa")
    nxt = NOW + datetime.timedelta(days=1)
    assert build_crl(ca.key, ca.certificate, REVOKED, 42, NOW, nxt) == cryptography_crl(ca, REVOKED, 42, NOW, nxt)
    assert build_crl(ca.key, ca.certificate, [], 43, NOW, nxt) == cryptography_crl(ca, [], 43, NOW, nxt)


@pytest.mark.parametrize("kind", ["rsa", "ec", "p384", "ed25519"])
def test_crl_parses_and_verifies(kind):
    ca = ca_for(kind)
    der = build_crl(ca.key, ca.certificate, REVOKED, 7, NOW, NOW + datetime.timedelta(hours=2))
    crl = x509.load_der_x509_crl(der)
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.issuer == ca.certificate.subject and len(crl) == len(REVOKED)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest
    entries = {r.serial_number: r for r in crl}
    assert entries[0x1234].extensions.get_extension_for_class(x509.CRLReason).value.reason \
        == x509.ReasonFlags.key_compromise
    assert len(entries[0x80].extensions) == 0  # unspecified (0) is left out, as RFC 5280 asks
    assert entries[77].revocation_date_utc == datetime.datetime.fromtimestamp(2_600_000_000, UTC)
    assert crl.next_update_utc == NOW + datetime.timedelta(hours=2)


@needs_openssl
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_openssl_verifies_and_lists_entries_and_reasons(tmp_path, kind):
    ca = ca_for(kind)
    text = check_with_openssl(tmp_path, ca, build_crl(ca.key, ca.certificate, REVOKED, 9, NOW,
                                                      NOW + datetime.timedelta(days=1)))
    assert "X509v3 CRL Number: \n                9" in text
    assert "Serial Number: 1234" in text and "Serial Number: 80000000000000000000000000000005" in text
    assert text.count("Key Compromise") == 1 and text.count("Cessation Of Operation") == 1
    assert "Privilege Withdrawn" in text and "2052 GMT" in text


def test_empty_crl_has_no_revoked_list_and_bad_input_is_refused():
    ca = ca_for("ec")
    crl = x509.load_der_x509_crl(build_crl(ca.key, ca.certificate, [], 1, NOW, NOW + datetime.timedelta(hours=1)))
    assert len(crl) == 0 and crl.is_signature_valid(ca.certificate.public_key())
    with pytest.raises(ValueError):
        build_crl(ca.key, ca.certificate, [(1, T0, 7)], 1, NOW, NOW + datetime.timedelta(hours=1))
    with pytest.raises(ValueError):
        build_crl(ca.key, ca.certificate, [(-1, T0, 1)], 1, NOW, NOW + datetime.timedelta(hours=1))
    with pytest.raises(ValueError):
        build_crl(ca.key, ca.certificate, [], 1, NOW, NOW)


def test_many_entries_quickly():
    """The 100,000-entry measurement is scripts/measure_log.py; here 20,000 must take well under a second."""
    import time
    ca = ca_for("ec")
    revoked = [(2**100 + i, T0 + i % 1000, (1, 4, None)[i % 3]) for i in range(20000)]
    start = time.perf_counter()
    der = build_crl(ca.key, ca.certificate, revoked, 1, NOW, NOW + datetime.timedelta(hours=1))
    assert time.perf_counter() - start < 1.0
    crl = x509.load_der_x509_crl(der)
    assert len(crl) == 20000 and crl.is_signature_valid(ca.certificate.public_key())


# The publisher

def rec(serial, user="alice", issued_at=T0, lifetime=8 * HOUR):
    return Record(serial, user, "vpn", f"CN={user}", "", "ec-p256", issued_at - 300, issued_at + lifetime,
                  f"t{serial}", "192.0.2.1", "local", issued_at)


@pytest.fixture
def setup(tmp_path):
    clock = task.Clock()
    clock.advance(T0)
    log = IssuanceLog()
    for serial in (1, 2, 3):
        log.add(rec(serial, lifetime=serial * HOUR))
    return clock, log, str(tmp_path)


def serials(der):
    return sorted(r.serial_number for r in x509.load_der_x509_crl(der))


def test_publisher_numbers_regenerates_and_drops_expired(setup, tmp_path):
    clock, log, state_dir = setup
    ca = ca_for("ec")
    pub = CrlPublisher(ca, state_dir, log, clock, interval=HOUR, lifetime=3 * HOUR)
    assert pub.info() == {"number": None, "this_update": None, "next_update": None, "entries": 0}
    pub.startService()
    assert pub.info() == {"number": 1, "this_update": NOW, "next_update": NOW + datetime.timedelta(hours=3),
                          "entries": 0}
    assert stat.S_IMODE(os.stat(pub.number_path).st_mode) == 0o600 and load_crl_number(pub.number_path) == 1
    assert pub.pem.startswith(b"-----BEGIN X509 CRL-----\n")
    assert x509.load_pem_x509_crl(pub.pem).public_bytes(serialization.Encoding.DER) == pub.der

    clock.advance(60)
    log.revoke(1, 1, T0 + 60)
    log.revoke(3, 4, T0 + 60)
    info = []
    pub.publish().addCallback(info.append)
    assert info[0]["number"] == 2 and info[0]["entries"] == 2 and serials(pub.der) == [1, 3]

    clock.advance(HOUR)  # the timer: serial 1 expired at T0 + 1h but stays one more interval
    assert pub.number == 3 and serials(pub.der) == [1, 3]
    clock.advance(HOUR)  # T0 + 2h + 60 s: more than an interval past serial 1's notAfter
    assert pub.number == 4 and serials(pub.der) == [3]
    # Two intervals at once (the timer ran late): serial 3 expired at T0 + 3h, and the last regular CRL (T0 + 2h
    # + 60 s) came before that, so this one (T0 + 4h + 60 s) must still list it (RFC 5280 section 3.3); it used
    # to drop it, being more than an interval past its notAfter.
    clock.advance(2 * HOUR)
    assert pub.number == 5 and serials(pub.der) == [3]
    crl = x509.load_der_x509_crl(pub.der)
    assert crl.last_update_utc == datetime.datetime.fromtimestamp(T0 + 4 * HOUR + 60, UTC)
    assert crl.is_signature_valid(ca.certificate.public_key())
    clock.advance(HOUR)  # a regular CRL issued after serial 3 expired has listed it: it goes
    assert pub.number == 6 and serials(pub.der) == []
    # A new publisher (a restart) has no regular CRL of its own yet: its first lists every revoked record left.
    again = CrlPublisher(ca, state_dir, log, clock, interval=HOUR, lifetime=3 * HOUR)
    again.startService()
    assert serials(again.der) == [1, 3]
    again.stopService()
    assert pub.stopService() is None
    clock.advance(10 * HOUR)
    assert pub.number == 6  # stopped: no more timer
    if OPENSSL:
        check_with_openssl(tmp_path, ca, pub.der)


def test_a_clock_that_was_ahead_does_not_keep_a_valid_revoked_certificate_off_the_crl(setup):
    """Hours ahead (local time typed in as UTC), a regular CRL rightly leaves out serial 3 (notAfter T0 + 3 h);
    set right again, the next CRL must list it: it is valid for hours yet."""
    clock, log, state_dir = setup
    pub = CrlPublisher(ca_for("ec"), state_dir, log, clock, interval=HOUR, lifetime=3 * HOUR)
    pub.startService()
    log.revoke(3, 1, T0 + 1)
    clock.advance(9 * HOUR)  # a regular CRL at T0 + 9 h lists serial 3 (none after its notAfter did yet) ...
    clock.advance(HOUR)  # ... so the next one, at T0 + 10 h, rightly leaves it out
    assert serials(pub.der) == []
    clock.advance(-10 * HOUR + 600)  # set right: T0 + 10 min
    fired = []
    pub.publish().addCallback(fired.append)  # a revocation, or the timer once it runs again
    assert fired and serials(pub.der) == [3]
    pub.stopService()


def test_crl_number_survives_a_restart(setup):
    clock, log, state_dir = setup
    ca = ca_for("ec")
    first = CrlPublisher(ca, state_dir, log, clock, interval=HOUR)
    first.startService()
    first.publish()
    first.publish()
    assert first.number == 3
    first.stopService()
    second = CrlPublisher(ca, state_dir, log, clock, interval=HOUR)
    second.startService()
    assert second.number == 4
    assert x509.load_der_x509_crl(second.der).extensions.get_extension_for_class(
        x509.CRLNumber).value.crl_number == 4


def test_bad_number_file_and_settings_are_refused(setup):
    clock, log, state_dir = setup
    with open(os.path.join(state_dir, "crl_number"), "w") as f:
        f.write("twelve\n")
    with pytest.raises(ConfigError, match="crl_number: not a CRL number"):
        CrlPublisher(ca_for("ec"), state_dir, log, clock)
    os.unlink(os.path.join(state_dir, "crl_number"))
    for lifetime in (60, HOUR, HOUR + 59):  # the next CRL must come before nextUpdate, even a little late
        with pytest.raises(ValueError, match="must exceed the interval"):
            CrlPublisher(ca_for("ec"), state_dir, log, clock, interval=HOUR, lifetime=lifetime)


class ManualRun:
    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def step(self, fail=False):
        f, args, d = self.jobs.pop(0)
        if fail:
            d.errback(OSError(28, "No space left on device"))
        else:
            d.callback(f(*args))


def test_publish_during_a_signing_shares_the_next_one_and_a_failure_keeps_the_old_crl(setup):
    clock, log, state_dir = setup
    run = ManualRun()
    pub = CrlPublisher(ca_for("ec"), state_dir, log, clock, interval=HOUR, run=run)
    pub.startService()
    assert pub.number == 1 and not run.jobs  # the first CRL is made at start, before the listeners: no job
    log.revoke(2, 1, T0)
    a = pub.publish()
    log.revoke(3, 1, T0)
    b, c = pub.publish(), pub.publish()
    assert len(run.jobs) == 1  # b and c wait for the generation after a's
    run.step()
    assert a.called and not b.called and serials(pub.der) == [2]
    assert len(run.jobs) == 1
    run.step(fail=True)  # e.g. the number file can't be written
    failures = []
    b.addErrback(failures.append)
    c.addErrback(failures.append)
    assert len(failures) == 2 and isinstance(failures[0], Failure)
    assert pub.number == 2 and serials(pub.der) == [2]  # the previous CRL stays
    d = pub.publish()
    run.step()
    assert d.called and pub.number == 4 and serials(pub.der) == [2, 3]  # number 3 was burnt, never reused
    pub.stopService()
