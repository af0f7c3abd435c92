"""The proof with a real IKE stack: a certificate enrolled from a running getcertd by `getcert enroll` opens an
IKEv2 tunnel to a strongSwan gateway that trusts getcertd's CA and matches the remote-access name; expired
certificates and certificates with another name format are refused.

Two strongSwan charons run in their own network namespaces joined by a veth pair (see tests/ike.py); getcertd
runs in the root namespace on 127.0.0.1.
"""
import datetime
import ipaddress
import os
import re
import shutil
import time
from itertools import count

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import ike

GW_OUTER, CLIENT_OUTER = "10.98.0.1", "10.98.0.2"
GW_INNER, CLIENT_INNER = "10.98.1.1", "10.98.2.2"
# What a gateway operator writes: getcertd's default policy issues CN=<user>, OU=remote-access, O=getcertd
# (RFC 4514 order); strongSwan writes and matches DNs in DER order, O first, with * for any value of one RDN.
REMOTE_ACCESS_ID = '"O=getcertd, OU=remote-access, CN=*"'
_serial = count()


def _require_ike_stack():
    missing = ike.missing_tools()
    if missing:
        pytest.fail(f"strongSwan/iproute2 missing ({', '.join(missing)}): run scripts/test, which installs "
                    "strongswan-charon strongswan-swanctl charon-cmd iproute2")
    ok, why = ike.netns_permitted()
    if not ok:
        pytest.skip(f"!!! IKE END-TO-END PROOF NOT RUN: needs root and network namespaces ({why}) !!!")


class Ike:
    """A gateway charon and a client charon in a namespace pair; per-test config dirs under tmp_path."""

    def __init__(self, pair, gw, client):
        self.pair, self.gw, self.client = pair, gw, client
        self.client_conns = {}

    def gateway_trusts(self, ca_pem, gw_key, gw_cert):
        self.gw.add_cacert("ca.pem", ca_pem)
        self.client.add_cacert("ca.pem", ca_pem)
        self.gw.add_cert("gateway.pem", ike.cert_pem(gw_cert))
        self.gw.add_key("gateway.key", ike.key_pem(gw_key))
        self.gw.write_swanctl_conf({"ra": ike.connection(
            GW_OUTER, "%any", f"{GW_INNER}/32", f"{CLIENT_INNER}/32", "gateway.pem", local_id=GW_OUTER,
            remote_id=REMOTE_ACCESS_ID, remote_cacert="ca.pem", child="ra")})
        self.gw.load_all()

    def add_client(self, name, key_pem, cert_pem):
        """A client connection (and CHILD_SA) called ``name`` that authenticates with this key and certificate."""
        self.client.add_cert(name + ".pem", cert_pem)
        self.client.add_key(name + ".key", key_pem)
        self.client_conns[name] = ike.connection(
            CLIENT_OUTER, GW_OUTER, f"{CLIENT_INNER}/32", f"{GW_INNER}/32", name + ".pem", remote_id=GW_OUTER,
            remote_cacert="ca.pem", child=name)
        self.client.write_swanctl_conf(self.client_conns)
        self.client.load_all()


@pytest.fixture
def ike_peers(tmp_path):
    _require_ike_stack()
    n = next(_serial)
    # Short directory: the vici socket path must fit a sockaddr_un.
    base = tmp_path / "ike"
    base.mkdir()
    pair = ike.NetnsPair.create(f"gcd-gw-{os.getpid()}-{n}", f"gcd-cl-{os.getpid()}-{n}",
                                outer=(GW_OUTER, CLIENT_OUTER), inner=(GW_INNER, CLIENT_INNER))
    charons = []
    try:
        t = time.monotonic()
        gw = ike.Charon(pair.gw, base / "gw")
        client = ike.Charon(pair.client, base / "client")
        charons += [gw, client]
        gw.start()
        client.start()
        print(f"\n[ike] two charons up in {time.monotonic() - t:.2f}s")
        yield Ike(pair, gw, client)
    finally:
        for c in charons:
            c.stop()
        pair.delete()
        for c in charons:
            if c.proc is not None:
                assert c.proc.poll() is not None, f"charon pid {c.proc.pid} still running"


@pytest.fixture
def enrolled(appliance_factory, tmp_path):
    """A running getcertd, alice's certificate enrolled from it with `getcert enroll`, and the CA's key."""
    app = appliance_factory(users={"alice": "alice pass"})
    out = tmp_path / "alice"
    t = time.monotonic()
    p = app.getcert("alice", ["alice pass"], out)
    assert p.returncode == 0, f"getcert enroll failed: {p.stderr}\n{app.log()[-3000:]}"
    print(f"\n[ike] getcert enroll took {time.monotonic() - t:.2f}s")
    ca_key = ike.load_key(os.path.join(app.state_dir, "ca.key"))
    ca_cert = ike.load_cert(app.ca_pem)
    return app, out, ca_key, ca_cert


def gateway_certificate(ca_key, ca_cert):
    san = [x509.IPAddress(ipaddress.ip_address(GW_OUTER))]
    return ike.issue(ca_key, ca_cert, "CN=vpn gateway,O=getcertd", san=san,
                     eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.IPSEC_IKE])


def no_sa(charon):
    return "ESTABLISHED" not in charon.list_sas()


def test_enrolled_certificate_opens_the_tunnel(ike_peers, enrolled):
    app, out, ca_key, ca_cert = enrolled
    alice = ike.load_cert(out / "cert.pem")
    assert alice.subject.rfc4514_string() == "CN=alice,OU=remote-access,O=getcertd"
    ike_peers.gateway_trusts(open(app.ca_pem, "rb").read(), *gateway_certificate(ca_key, ca_cert))
    ike_peers.add_client("alice", (out / "key.pem").read_bytes(), (out / "cert.pem").read_bytes())

    t = time.monotonic()
    p = ike_peers.client.initiate("alice", check=False)
    elapsed = time.monotonic() - t
    assert p.returncode == 0, p.stdout + p.stderr + ike_peers.gw.output()
    print(f"[ike] IKE_SA + CHILD_SA with getcertd's certificate established in {elapsed * 1000:.0f} ms "
          "(swanctl --initiate wall time)")
    assert "IKE_SA alice[1] established between 10.98.0.2[O=getcertd, OU=remote-access, CN=alice]" in p.stdout

    sas = ike_peers.gw.list_sas()
    assert re.search(r"ra: #\d+, ESTABLISHED, IKEv2", sas), sas
    assert "remote 'O=getcertd, OU=remote-access, CN=alice' @ 10.98.0.2" in sas, sas
    assert "INSTALLED, TUNNEL" in sas and f"remote {CLIENT_INNER}/32" in sas, sas
    assert 'using trusted ca certificate "CN=getcertd CA"' in ike_peers.gw.log()

    # A packet crosses the tunnel and comes back (the gateway has no other route to the client's inner address).
    t = time.monotonic()
    assert ike.udp_echo(ike_peers.pair.gw, GW_INNER, ike_peers.pair.client, CLIENT_INNER)
    if shutil.which("ping"):
        ping = ike_peers.pair.client.run("ping", "-c", "1", "-W", "2", "-I", CLIENT_INNER, GW_INNER, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    print(f"[ike] traffic through the tunnel in {(time.monotonic() - t) * 1000:.0f} ms")
    sas = ike_peers.gw.list_sas()
    packets_in = re.search(r"\n\s+in\s+\w+,\s+\d+ bytes,\s+(\d+) packets", sas)
    assert packets_in and int(packets_in.group(1)) >= 1, sas


def _assert_refused(ike_peers, name, gateway_says):
    p = ike_peers.client.initiate(name, check=False)
    assert p.returncode != 0, p.stdout
    assert "received AUTHENTICATION_FAILED notify error" in p.stdout, p.stdout
    # Refused by the gateway's check, not by the client declining to send the certificate.
    assert gateway_says in ike_peers.gw.log(), ike_peers.gw.output()
    assert no_sa(ike_peers.gw) and no_sa(ike_peers.client)


def test_expired_certificate_is_refused(ike_peers, enrolled):
    app, out, ca_key, ca_cert = enrolled
    ike_peers.gateway_trusts(open(app.ca_pem, "rb").read(), *gateway_certificate(ca_key, ca_cert))
    # getcertd won't issue an already-expired certificate: sign one with its CA key, same name, past notAfter.
    now = ike.now()
    key, cert = ike.issue(ca_key, ca_cert, "CN=alice,OU=remote-access,O=getcertd",
                          not_before=now - datetime.timedelta(hours=9), not_after=now - datetime.timedelta(hours=1))
    ike_peers.add_client("expired", ike.key_pem(key), ike.cert_pem(cert))
    _assert_refused(ike_peers, "expired", "subject certificate invalid (valid from")


@pytest.mark.parametrize("subject", ["CN=alice,OU=other,O=getcertd", "CN=alice,O=getcertd",
                                     "CN=alice,OU=remote-access,O=getcertd,DC=example"])
def test_wrong_name_format_is_refused(ike_peers, enrolled, subject):
    app, out, ca_key, ca_cert = enrolled
    ike_peers.gateway_trusts(open(app.ca_pem, "rb").read(), *gateway_certificate(ca_key, ca_cert))
    key, cert = ike.issue(ca_key, ca_cert, subject)
    ike_peers.add_client("wrongname", ike.key_pem(key), ike.cert_pem(cert))
    _assert_refused(ike_peers, "wrongname", "no matching peer config found")


def test_certificate_from_another_ca_is_refused(ike_peers, enrolled):
    app, out, ca_key, ca_cert = enrolled
    ike_peers.gateway_trusts(open(app.ca_pem, "rb").read(), *gateway_certificate(ca_key, ca_cert))
    other_key, other_ca = ike.make_ca("CN=getcertd CA")  # same name, different key
    key, cert = ike.issue(other_key, other_ca, "CN=alice,OU=remote-access,O=getcertd")
    ike_peers.add_client("otherca", ike.key_pem(key), ike.cert_pem(cert))
    _assert_refused(ike_peers, "otherca", 'no issuer certificate found for "O=getcertd, OU=remote-access, CN=alice"')


@pytest.mark.parametrize("user", ["alice", 'Doe, John "JD" +1\\x'])
def test_getcert_swanctl_snippet_and_p12(ike_peers, appliance_factory, tmp_path, user):
    """`getcert enroll --swanctl GATEWAY --p12` output, used as written by a road-warrior client; a user name
    with the characters a DN string escapes (`,` `"` `+` `\\`) must reach the gateway as the certificate's
    own name, not as a different DN read from text."""
    app = appliance_factory(users={user: "alice pass"})
    out = tmp_path / "rw"
    p = app.getcert(user, ["alice pass", "p12 secret"], out, "--swanctl", GW_OUTER, "--p12")
    assert p.returncode == 0, p.stderr
    v = ike._run(["openssl", "pkcs12", "-in", str(out / "getcert.p12"), "-passin", "pass:p12 secret", "-nokeys",
                  "-clcerts"])
    issued = x509.load_pem_x509_certificate(v.stdout[v.stdout.index("-----BEGIN"):].encode())
    assert issued == ike.load_cert(str(out / "cert.pem"))
    assert issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == user
    ca_key, ca_cert = ike.load_key(os.path.join(app.state_dir, "ca.key")), ike.load_cert(app.ca_pem)
    gw_key, gw_cert = gateway_certificate(ca_key, ca_cert)
    gw, client = ike_peers.gw, ike_peers.client
    gw.add_cacert("ca.pem", open(app.ca_pem).read())
    gw.add_cert("gateway.pem", ike.cert_pem(gw_cert))
    gw.add_key("gateway.key", ike.key_pem(gw_key))
    conn = ike.connection(GW_OUTER, "%any", f"{GW_INNER}/32", "dynamic", "gateway.pem", local_id=GW_OUTER,
                          remote_id=REMOTE_ACCESS_ID, remote_cacert="ca.pem", child="rw")
    conn["pools"] = "rw"
    with open(gw.swanctl_path, "w") as f:
        f.write(ike._render({"connections": {"rw": conn}, "pools": {"rw": {"addrs": "10.98.3.0/24"}}}))
    gw.load_all()
    env = dict(os.environ, SWANCTL_DIR=str(out / "swanctl"), STRONGSWAN_CONF=client.conf_path)
    load = ike._run([ike.SWANCTL, "--load-all", "--noprompt", "--file", str(out / "swanctl" / "swanctl.conf"),
                     "--uri", client.uri], check=False, env=env)
    assert load.returncode == 0, load.stdout + load.stderr
    up = ike._run([ike.SWANCTL, "--initiate", "--child", "getcertd", "--timeout", "10", "--uri", client.uri],
                  check=False, env=env, timeout=20)
    assert up.returncode == 0, (up.stdout + up.stderr)[-3000:] + gw.log()[-3000:]
    sas = gw.list_sas()
    assert "ESTABLISHED" in sas and f"CN={user}" in sas and "10.98.3." in sas, sas
