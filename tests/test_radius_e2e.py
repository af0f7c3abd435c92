"""RADIUS end to end: `getcert` against a real `twistd getcertd` whose backend is a real FreeRADIUS."""
import datetime
import os
import socket
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from freeradius import running_freeradius
from scepclient import Requester, basic, get_ca_certs, http
from getcertd import scep
from getcertd.errors import FailInfo


@pytest.fixture(scope="module")
def radius_server():
    with running_freeradius() as srv:
        yield srv


def radius_app(appliance_factory, srv, servers=None, **extra):
    secret_file = srv.secret_file()
    sections = {
        "auth": {"backend": "radius", "users": ""},
        "radius": {"servers": servers or f"{srv.host}:{srv.port}", "secret_file": secret_file,
                   "timeout": "1s", "retries": "1"},
        "policy": {"profile_map": "ikev2-short=short"},
        "profile short": {"lifetime": "30m", "subject": "CN={user}, OU=short, O=getcertd"},
    }
    sections.update(extra)
    return appliance_factory(sections=sections, users={}, http=True)


def cert_of(out):
    return x509.load_pem_x509_certificate(open(os.path.join(out, "cert.pem"), "rb").read())


def test_pap_user_enrolls(appliance_factory, radius_server, tmp_path):
    app = radius_app(appliance_factory, radius_server)
    p = app.getcert("alice", ["alice-pass"], tmp_path / "a")
    assert p.returncode == 0, p.stderr + app.log()[-3000:]
    assert cert_of(tmp_path / "a").subject.rfc4514_string() == "CN=alice,OU=remote-access,O=getcertd"
    p = app.getcert("alice", ["wrong"], tmp_path / "w")
    assert p.returncode != 0 and "authentication failed" in p.stderr
    p = app.getcert("nosuch", ["alice-pass"], tmp_path / "n")
    assert p.returncode != 0 and "authentication failed" in p.stderr
    assert "alice-pass" not in app.log()


def test_challenge_response_one_and_two_rounds(appliance_factory, radius_server, tmp_path):
    app = radius_app(appliance_factory, radius_server)
    p = app.getcert("bob", ["bob-pass", "123456"], tmp_path / "b")
    assert p.returncode == 0, p.stderr
    assert "Enter token code" in p.stderr  # the Reply-Message was shown to the user
    p = app.getcert("carol", ["carol-pass", "111111", "222222"], tmp_path / "c")
    assert p.returncode == 0, p.stderr
    assert "Enter second token code" in p.stderr
    p = app.getcert("bob", ["bob-pass", "999999"], tmp_path / "bad")
    assert p.returncode != 0
    assert "123456" not in app.log() and "bob-pass" not in app.log()


def test_challenge_header_protocol(appliance_factory, radius_server):
    """The 401 continuation as a client sees it on the wire (documented in README)."""
    app = radius_app(appliance_factory, radius_server)
    r = Requester(get_ca_certs(app.url, app.ca_pem))
    msg = r.message()
    url = app.url + "?operation=PKIOperation"
    status, headers, body = http(url, data=msg, cafile=app.ca_pem, headers=basic("bob", "bob-pass"))
    assert status == 401 and headers.get("Getcertd-Challenge") and b"Enter token code" in body
    token = headers["Getcertd-Challenge"]
    # a token is bound to its user: another user can't answer it
    status, headers2, _ = http(url, data=msg, cafile=app.ca_pem,
                               headers={**basic("alice", "123456"), "Getcertd-Challenge": token})
    assert status == 401 and not headers2.get("Getcertd-Challenge")
    status, headers, body = http(url, data=msg, cafile=app.ca_pem, headers=basic("bob", "bob-pass"))
    token = headers["Getcertd-Challenge"]
    status, _, body = http(url, data=msg, cafile=app.ca_pem,
                           headers={**basic("bob", "123456"), "Getcertd-Challenge": token})
    assert status == 200 and r.open_reply(body)[0].pki_status == scep.PkiStatus.SUCCESS


def test_session_timeout_and_class_feed_policy_and_bind_renewals(appliance_factory, radius_server, tmp_path):
    app = radius_app(appliance_factory, radius_server, scep={"renewal_without_auth": "yes"})
    p = app.getcert("dave", ["dave-pass"], tmp_path / "d")
    assert p.returncode == 0, p.stderr
    cert = cert_of(tmp_path / "d")
    assert cert.subject.rfc4514_string() == "CN=dave,OU=short,O=getcertd"  # Class ikev2-short -> profile short
    life = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(seconds=500) < life <= datetime.timedelta(seconds=600)  # Session-Timeout 600 < 30m
    # every Class value is looked at (the server's own comes first), and the shortest Session-Timeout caps
    p = app.getcert("hank", ["hank-pass"], tmp_path / "h")
    assert p.returncode == 0, p.stderr
    hank = cert_of(tmp_path / "h")
    assert hank.subject.rfc4514_string() == "CN=hank,OU=short,O=getcertd"
    life = hank.not_valid_after_utc - hank.not_valid_before_utc - datetime.timedelta(minutes=2)
    assert datetime.timedelta(seconds=200) < life <= datetime.timedelta(seconds=300), life
    # the name the server answers with (User-Name in the Accept) names the certificate
    p = app.getcert("IVAN", ["ivan-pass"], tmp_path / "i")
    assert p.returncode == 0, p.stderr
    assert cert_of(tmp_path / "i").subject.rfc4514_string() == "CN=ivan,OU=remote-access,O=getcertd"
    # A SCEP RenewalReq signed by that certificate, without credentials, and a renewal of the renewal: the same
    # profile and at most the same lifetime, as EST's simplereenroll (not the default profile's 8 hours).
    key = serialization.load_pem_private_key((tmp_path / "d" / "key.pem").read_bytes(), None)
    certs = get_ca_certs(app.url, app.ca_pem)
    for _ in range(2):
        r = Requester(certs, key=key, signer=cert)
        status, _, body = http(app.url + "?operation=PKIOperation", data=r.message(scep.MessageType.RenewalReq),
                               cafile=app.ca_pem)
        assert status == 200, body
        rep, (cert,) = r.open_reply(body)
        assert cert.subject.rfc4514_string() == "CN=dave,OU=short,O=getcertd"
        life = cert.not_valid_after_utc - cert.not_valid_before_utc - datetime.timedelta(minutes=2)  # skew
        assert datetime.timedelta(seconds=500) < life <= datetime.timedelta(seconds=600), life


def test_a_wrong_code_challenged_again_counts_as_a_failed_login(appliance_factory, radius_server):
    """A token server that answers a wrong code with a new challenge, not a reject: each such round is a
    failed login (it was not counted at all: codes could be guessed without limit), and one login gets at most
    5 challenges."""
    app = radius_app(appliance_factory, radius_server)
    msg = Requester(get_ca_certs(app.url, app.ca_pem)).message()
    url = app.url + "?operation=PKIOperation"
    status, headers, body = http(url, data=msg, cafile=app.ca_pem, headers=basic("gina", "gina-pass"))
    assert status == 401 and b"Enter token code" in body
    for i in range(4):
        status, headers, body = http(url, data=msg, cafile=app.ca_pem, headers={
            **basic("gina", f"00000{i}"), "Getcertd-Challenge": headers["Getcertd-Challenge"]})
        assert status == 401 and body == b"Wrong code, try again\n" and headers.get("Getcertd-Challenge"), i
    status, headers, body = http(url, data=msg, cafile=app.ca_pem, headers={
        **basic("gina", "000009"), "Getcertd-Challenge": headers["Getcertd-Challenge"]})
    assert status == 401 and not headers.get("Getcertd-Challenge")  # the 6th challenge of one login: refused
    status, headers, body = http(url, data=msg, cafile=app.ca_pem, headers=basic("gina", "gina-pass"))
    assert status == 429, (status, body)  # 5 failed rounds: the user must wait


def test_a_response_the_server_could_not_check_may_be_sent_again(appliance_factory, radius_server):
    """RADIUS down between the challenge and the response: 503, and the same response works once it is back
    (the continuation was spent before the backend was asked, so the retry could only start over)."""
    from faultproxy import FaultProxy
    proxy = FaultProxy(radius_server.address, radius_server.secret, ports=1).start()
    try:
        app = radius_app(appliance_factory, radius_server, servers=proxy.servers)
        msg = Requester(get_ca_certs(app.url, app.ca_pem)).message()
        url = app.url + "?operation=PKIOperation"
        status, headers, _ = http(url, data=msg, cafile=app.ca_pem, headers=basic("bob", "bob-pass"))
        answer = {**basic("bob", "123456"), "Getcertd-Challenge": headers["Getcertd-Challenge"]}
        proxy.set_mode("down")  # every request dropped on the way
        status, headers, body = http(url, data=msg, cafile=app.ca_pem, headers=answer)
        assert status == 503 and headers["Retry-After"], (status, body)
        proxy.set_mode("pass")
        status, _, body = http(url, data=msg, cafile=app.ca_pem, headers=answer)
        assert status == 200, (status, body)
    finally:
        proxy.stop()


def test_challenge_password_over_plain_http(appliance_factory, radius_server):
    app = radius_app(appliance_factory, radius_server)
    certs = get_ca_certs(app.url, app.ca_pem)
    r = Requester(certs)
    status, _, body = http(app.http_url + "?operation=PKIOperation", data=r.message(challenge="alice-pass", cn="alice"))
    assert status == 200 and r.open_reply(body)[0].pki_status == scep.PkiStatus.SUCCESS
    r = Requester(certs)
    status, _, body = http(app.http_url + "?operation=PKIOperation", data=r.message(challenge="wrong", cn="alice"))
    rep, _ = r.open_reply(body)
    assert rep.pki_status == scep.PkiStatus.FAILURE and rep.fail_info == FailInfo.badRequest
    status, _, body = http(app.http_url + "?operation=PKIOperation", data=r.message(), headers=basic("alice", "x"))
    assert status == 403 and b"HTTPS" in body


def test_failover_and_radius_down(appliance_factory, radius_server, tmp_path):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        port = silent.getsockname()[1]
        app = radius_app(appliance_factory, radius_server, servers=f"127.0.0.1:{port} {radius_server.host}:{radius_server.port}")
        p = app.getcert("alice", ["alice-pass"], tmp_path / "f")
        assert p.returncode == 0, p.stderr  # the silent first server is skipped after its timeouts
        down = radius_app(appliance_factory, radius_server, servers=f"127.0.0.1:{port}")
        r = Requester(get_ca_certs(down.url, down.ca_pem))
        t0 = time.monotonic()
        status, headers, body = http(down.url + "?operation=PKIOperation", data=r.message(), cafile=down.ca_pem,
                                     headers=basic("alice", "alice-pass"))
        elapsed = time.monotonic() - t0
        assert status == 503 and headers.get("Retry-After") and elapsed < 2 * 1.0 + 1.5
        status, _, _ = http(down.url + "?operation=GetCACaps", cafile=down.ca_pem)
        assert status == 200  # everything else keeps serving
        # with a challengePassword too: a FAILURE CertRep was final to clients (certmonger stopped at
        # CA_REJECTED) for an outage that is not
        status, headers, body = http(down.http_url + "?operation=PKIOperation",
                                     data=r.message(challenge="alice-pass", cn="alice"))
        assert status == 503 and headers.get("Retry-After") == "30" and b"unavailable" in body
    finally:
        silent.close()
