"""The rest of the RFC 8894 message set against a real twistd: CertPoll, unknown types, and single DES with a
real legacy client (Debian's `scep` package, micromdm's scepclient: always SHA-1 + single DES-CBC)."""
import subprocess

import pytest
from asn1crypto import cms
from cryptography import x509

from getcertd import scep
from getcertd.errors import FailInfo
from peers import interop_row, require
from scepclient import Requester, basic, get_ca_certs, http


@pytest.fixture
def app(appliance_factory):
    return appliance_factory(users={"alice": "alice-pass"}, http=True)


def _post(app, message, user="alice", password="alice-pass"):
    status, _, body = http(app.url + "?operation=PKIOperation", data=message, cafile=app.ca_pem,
                           headers=basic(user, password))
    assert status == 200, body
    return body


def test_certpoll_known_and_unknown_transaction(app):
    certs = get_ca_certs(app.url, app.ca_pem)
    r = Requester(certs)
    rep, issued = r.open_reply(_post(app, r.message()))
    assert rep.pki_status == scep.PkiStatus.SUCCESS
    ca = next(c for c in certs if c.issuer == c.subject)
    poll = r.message(message_type=scep.MessageType.CertPoll, transaction_id=r.tid,
                     inner=scep.build_issuer_and_subject(ca.subject, r.signer.subject))
    rep, polled = r.open_reply(_post(app, poll))
    assert rep.pki_status == scep.PkiStatus.SUCCESS and polled[0].serial_number == issued[0].serial_number
    poll = r.message(message_type=scep.MessageType.CertPoll, transaction_id="NO-SUCH-TRANSACTION",
                     inner=scep.build_issuer_and_subject(ca.subject, r.signer.subject))
    rep, _ = r.open_reply(_post(app, poll))
    assert rep.pki_status == scep.PkiStatus.FAILURE and rep.fail_info == FailInfo.badCertId


def test_unknown_message_type_is_bad_request(app):
    r = Requester(get_ca_certs(app.url, app.ca_pem))
    rep, _ = r.open_reply(_post(app, r.message(message_type=99)))
    assert rep.pki_status == scep.PkiStatus.FAILURE and rep.fail_info == FailInfo.badRequest
    assert "messageType" in rep.fail_info_text


def test_many_recipient_infos_naming_nobody_get_a_failure_certrep(app):
    """A PKCSReq whose envelope has 50 recipientInfos, none for the RA (the content key encrypted to the requester
    itself): the real twistd answers FAILURE badMessageCheck with a reason, not an HTTP error. (That it tries at
    most scep.MAX_KEY_TRANSPORT_TRIES of them with the RA key is counted in tests/test_scep_codec.py.)"""
    r = Requester(get_ca_certs(app.url, app.ca_pem))
    info = cms.ContentInfo.load(scep.build_envelope(b"not for the RA", r.signer, "aes128"))
    recipients = info["content"]["recipient_infos"]
    for _ in range(49):
        recipients.append(recipients[0].copy())
    # One byte short of whole cipher blocks: whatever content key the RA's tries give (random ones, since the
    # RSA step fails), none can open it, so the answer does not depend on a 1-in-256 lucky padding.
    encrypted = info["content"]["encrypted_content_info"]
    encrypted["encrypted_content"] = encrypted["encrypted_content"].native[:-1]
    r.nonce, r.tid = scep.new_nonce(), scep.new_transaction_id(r.key.public_key())
    message = scep.build_signed(message_type=scep.MessageType.PKCSReq, transaction_id=r.tid, sender_nonce=r.nonce,
                                signer_key=r.key, signer_cert=r.signer, content=info.dump(force=True))
    rep, _ = r.open_reply(_post(app, message))
    assert rep.pki_status == scep.PkiStatus.FAILURE and rep.fail_info == FailInfo.badMessageCheck
    assert "could not be decrypted" in rep.fail_info_text
    assert "Traceback" not in app.log()


def _scepclient(app, tmp_path):
    tool = require("scepclient", "scep")
    return subprocess.run([tool, "-server-url", app.http_url, "-challenge", "alice-pass", "-cn", "alice",
                           "-private-key", str(tmp_path / "key.pem"), "-certificate", str(tmp_path / "cert.pem")],
                          capture_output=True, text=True, timeout=60)


def _version():
    p = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "scep"], capture_output=True, text=True)
    return "scepclient " + (p.stdout or "?")


def test_legacy_des_client_refused_by_default(app, tmp_path):
    with interop_row("micromdm scepclient (Debian scep)", _version(), "plain HTTP", "challengePassword",
                     "DES-CBC / SHA-1") as row:
        p = _scepclient(app, tmp_path)
        assert p.returncode != 0 and "badAlg" in p.stdout + p.stderr
        assert "single DES is disabled" in app.log()
        row["result"] = "refused as expected with allow_legacy_des = no (FAILURE badAlg)"


def test_legacy_des_client_enrolls_when_allowed(appliance_factory, tmp_path):
    app = appliance_factory(users={"alice": "alice-pass"}, http=True, sections={"scep": {"allow_legacy_des": "yes"}})
    with interop_row("micromdm scepclient (Debian scep)", _version(), "plain HTTP", "challengePassword",
                     "DES-CBC / SHA-1") as row:
        p = _scepclient(app, tmp_path)
        assert p.returncode == 0, p.stdout + p.stderr
        v = subprocess.run(["openssl", "verify", "-CAfile", app.ca_pem, str(tmp_path / "cert.pem")],
                           capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr
        cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
        assert cert.subject.rfc4514_string() == "CN=alice,OU=remote-access,O=getcertd"
        row["result"] = "pass with allow_legacy_des = yes (its encryptedContent is BER, constructed)"
