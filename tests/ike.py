"""strongSwan charon peers in network namespaces: the real IKEv2 stack for tests, a benchmark or a soak.

What this machine needs (see shared/peers.md): root and `ip netns`; each charon runs in its own network
namespace with a private tmpfs on /run (its pid file path is compiled in), its own strongswan.conf and vici
socket; ESP is done in userspace by kernel-libipsec (the kernel has no XFRM ESP), so each side carries an
inner /32 address on `lo` that serves as its traffic selector.

Typical use (tests/test_ike.py does this)::

    pair = NetnsPair.create(f"gcd-gw-{os.getpid()}", f"gcd-cl-{os.getpid()}")
    try:
        gw, cl = Charon(pair.gw, dir_gw).start(), Charon(pair.client, dir_cl).start()
        gw.add_cacert("ca.pem", ca_pem); gw.add_cert("gw.pem", ...); gw.add_key("gw.key", ...)
        gw.write_swanctl_conf({"ra": connection("10.98.0.1", "%any", "10.98.1.1/32", "10.98.2.2/32", "gw.pem",
                                                local_id="10.98.0.1", remote_id='"O=getcertd, OU=remote-access, CN=*"')})
        gw.load_all()  # likewise for cl, then cl.initiate("child name")
    finally:
        cl.stop(); gw.stop(); pair.delete()

Quirk: with kernel-libipsec charon always logs "remote host is behind NAT" and uses ESP in UDP on port 4500
(swanctl shows TUNNEL-in-UDP), because libipsec only does UDP-encapsulated ESP; expected, not a NAT.
"""
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = shutil.which("swanctl") or "/usr/sbin/swanctl"
IP = shutil.which("ip") or "/usr/sbin/ip"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"

# charon's plugins, tried on Debian 12's strongSwan 5.9.8 with OpenSSL 3. Found by trying:
# - kernel-libipsec (userspace ESP over /dev/net/tun) must come BEFORE kernel-netlink, else charon installs the
#   SAs with XFRM ("unable to add SAD entry", this kernel has no XFRM ESP);
# - kernel-netlink is still required (kernel-net: addresses, routes into the tun device, the routing rule);
# - openssl alone is not enough: without kdf, IKE fails with "key derivation failed". The minimal working list
#   is random nonce openssl kdf pem pkcs1 pkcs8 x509 pubkey constraints revocation kernel-libipsec
#   kernel-netlink socket-default vici; aes sha1 sha2 hmac gcm curve25519 are kept as fallbacks.
CHARON_PLUGINS = ("random nonce openssl aes sha1 sha2 hmac kdf gcm curve25519 pem pkcs1 pkcs8 x509 pubkey "
                  "constraints revocation kernel-libipsec kernel-netlink socket-default vici").split()
# swanctl parses keys and certificates before sending them over vici.
SWANCTL_PLUGINS = "random nonce openssl pem pkcs1 pkcs8 x509 pubkey sha1 sha2".split()


def missing_tools():
    """The executables this module needs that are not installed (empty when all are)."""
    return [p for p in (CHARON, SWANCTL, IP, UNSHARE) if not os.access(p, os.X_OK)] + \
        ([] if os.path.exists("/dev/net/tun") else ["/dev/net/tun"])


def netns_permitted():
    """(True, "") when this process may create network namespaces, else (False, why not)."""
    if not os.access(IP, os.X_OK):
        return False, f"{IP} is not installed (iproute2)"
    name = f"gcd-probe-{os.getpid()}"
    p = subprocess.run([IP, "netns", "add", name], capture_output=True, text=True)
    if p.returncode:
        return False, f"`ip netns add` is not permitted here: {p.stderr.strip()}"
    subprocess.run([IP, "netns", "del", name], capture_output=True)
    return True, ""


def _run(args, check=True, timeout=15, **kw):
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}: {p.stdout}{p.stderr}")
    return p


class Netns:
    """One named network namespace (`ip netns`), with lo up."""

    def __init__(self, name):
        self.name = name

    def create(self):
        # A leftover of a killed run of the same pid-derived name would make `ip netns add` fail.
        subprocess.run([IP, "netns", "del", self.name], capture_output=True)
        _run([IP, "netns", "add", self.name])
        self.ip("link", "set", "lo", "up")
        return self

    def ip(self, *args, check=True):
        return _run([IP, "-n", self.name, *args], check=check)

    def exec_args(self, *args):
        return [IP, "netns", "exec", self.name, *args]

    def run(self, *args, check=True, timeout=15):
        return _run(self.exec_args(*map(str, args)), check=check, timeout=timeout)

    def delete(self):
        subprocess.run([IP, "netns", "del", self.name], capture_output=True)


class NetnsPair:
    """A gateway and a client namespace joined by a veth pair (``veth0`` on each side).

    ``outer`` are the veth addresses (IKE and ESP run between them), ``inner`` the /32 addresses on each
    side's lo that serve as traffic selectors.
    """

    def __init__(self, gw_name, client_name, outer=("10.98.0.1", "10.98.0.2"), inner=("10.98.1.1", "10.98.2.2"),
                 prefix=24):
        self.gw, self.client = Netns(gw_name), Netns(client_name)
        self.gw_outer, self.client_outer = outer
        self.gw_inner, self.client_inner = inner
        self.prefix = prefix

    @classmethod
    def create(cls, gw_name, client_name, **kw):
        pair = cls(gw_name, client_name, **kw)
        try:
            pair.gw.create()
            pair.client.create()
            # Created inside the gateway namespace, so no interface name ever exists in the root namespace.
            pair.gw.ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", pair.client.name)
            for ns, outer, inner in ((pair.gw, pair.gw_outer, pair.gw_inner),
                                     (pair.client, pair.client_outer, pair.client_inner)):
                ns.ip("addr", "add", f"{outer}/{pair.prefix}", "dev", "veth0")
                ns.ip("link", "set", "veth0", "up")
                ns.ip("addr", "add", f"{inner}/32", "dev", "lo")
        except BaseException:
            pair.delete()
            raise
        return pair

    def delete(self):
        self.client.delete()
        self.gw.delete()


def _render(value, indent=0):
    """strongswan.conf / swanctl.conf syntax from nested dicts (lists become comma-separated values)."""
    pad = "  " * indent
    out = []
    for key, val in value.items():
        if isinstance(val, dict):
            out.append(f"{pad}{key} {{\n{_render(val, indent + 1)}{pad}}}\n")
        else:
            if isinstance(val, (list, tuple)):
                val = ", ".join(map(str, val))
            elif isinstance(val, bool):
                val = "yes" if val else "no"
            out.append(f"{pad}{key} = {val}\n")
    return "".join(out)


def strongswan_conf(directory, plugins=CHARON_PLUGINS, debug=1, extra=None):
    """A self-contained strongswan.conf: own plugin list, vici socket and log file, all inside ``directory``."""
    charon = {
        "load": " ".join(plugins),
        "load_modular": False,
        # Outcomes are judged from the log and the return codes; don't wait for retransmissions.
        "retransmit_tries": 2,
        "retransmit_timeout": 1.0,
        "filelog": {
            "charon": {"path": os.path.join(directory, "charon.log"), "time_format": "%T", "ike_name": True,
                       "append": False, "flush_line": True, "default": debug, "ike": 2, "cfg": debug}},
        "plugins": {"vici": {"socket": f"unix://{os.path.join(directory, 'charon.vici')}"}},
    }
    for key, val in (extra or {}).items():
        charon[key] = val
    return _render({"charon": charon, "swanctl": {"load": " ".join(SWANCTL_PLUGINS)}})


def connection(local_addr, remote_addr, local_ts, remote_ts, local_cert, local_id=None, remote_id="%any",
               remote_cacert=None, child=None, start_action="none"):
    """One IKEv2 connection with certificate authentication (a swanctl.conf ``connections`` entry).

    ``local_cert`` and ``remote_cacert`` are file names in the charon's x509/ and x509ca/ directories.
    """
    local = {"auth": "pubkey", "certs": local_cert}
    if local_id:
        local["id"] = local_id
    remote = {"auth": "pubkey", "id": remote_id}
    if remote_cacert:
        remote["cacerts"] = remote_cacert
    return {
        "version": 2,
        "local_addrs": local_addr,
        "remote_addrs": remote_addr,
        "proposals": "aes256gcm16-prfsha256-ecp256,aes128-sha256-x25519,default",
        "local": local,
        "remote": remote,
        "children": {child or "net": {
            "local_ts": local_ts, "remote_ts": remote_ts,
            "esp_proposals": "aes256gcm16,aes128gcm16,default",
            "start_action": start_action,
        }},
    }


class Charon:
    """A charon daemon in a network namespace, with its config, credentials and vici socket in ``directory``.

    Credentials go in ``directory``/x509 (own certificates), x509ca (CAs) and private (keys): swanctl finds
    them through SWANCTL_DIR.
    """

    def __init__(self, netns, directory, plugins=CHARON_PLUGINS, debug=1, extra_conf=None):
        self.netns = netns
        self.dir = str(directory)
        self.conf_path = os.path.join(self.dir, "strongswan.conf")
        self.swanctl_path = os.path.join(self.dir, "swanctl.conf")
        self.vici_path = os.path.join(self.dir, "charon.vici")
        self.log_path = os.path.join(self.dir, "charon.log")
        self.stderr_path = os.path.join(self.dir, "charon.stderr")
        if len(self.vici_path) > 100:
            raise ValueError(f"{self.vici_path} is too long for a unix socket path; use a shorter directory")
        for sub in ("x509", "x509ca", "private"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        with open(self.conf_path, "w") as f:
            f.write(strongswan_conf(self.dir, plugins, debug, extra_conf))
        self.proc = None

    @property
    def uri(self):
        return f"unix://{self.vici_path}"

    def start(self, timeout=10):
        script = f"mount -t tmpfs tmpfs /run && exec {CHARON}"
        env = dict(os.environ, STRONGSWAN_CONF=self.conf_path)
        with open(self.stderr_path, "ab") as err:
            # ip netns exec and unshare exec (no fork) and sh execs charon: self.proc.pid is charon's pid.
            self.proc = subprocess.Popen(self.netns.exec_args(UNSHARE, "-m", "sh", "-c", script),
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"charon in {self.netns.name} exited {self.proc.returncode}: {self.output()}")
            if os.path.exists(self.vici_path):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.vici_path)
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"charon in {self.netns.name} did not open {self.vici_path}: {self.output()}")

    def output(self):
        text = ""
        for path in (self.stderr_path, self.log_path):
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    text += f.read()
        return text[-6000:]

    def log(self):
        if not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, timeout=5):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # Credentials and configuration

    def add_cert(self, name, pem):
        return self._put("x509", name, pem)

    def add_cacert(self, name, pem):
        return self._put("x509ca", name, pem)

    def add_key(self, name, pem):
        path = self._put("private", name, pem)
        os.chmod(path, 0o600)
        return path

    def _put(self, sub, name, pem):
        if isinstance(pem, str) and os.path.exists(pem):
            with open(pem, "rb") as f:
                pem = f.read()
        path = os.path.join(self.dir, sub, name)
        with open(path, "wb") as f:
            f.write(pem if isinstance(pem, bytes) else pem.encode())
        return path

    def write_swanctl_conf(self, connections):
        with open(self.swanctl_path, "w") as f:
            f.write(_render({"connections": connections}))

    # swanctl over this charon's vici socket

    def swanctl(self, *args, check=True, timeout=20):
        env = dict(os.environ, SWANCTL_DIR=self.dir, STRONGSWAN_CONF=self.conf_path)
        return _run([SWANCTL, *args, "--uri", self.uri], check=check, timeout=timeout, env=env)

    def load_all(self):
        return self.swanctl("--load-all", "--noprompt", "--file", self.swanctl_path)

    def initiate(self, child, ike=None, timeout=10, check=True):
        args = ["--initiate", "--child", child, "--timeout", str(timeout)]
        if ike:
            args += ["--ike", ike]
        return self.swanctl(*args, check=check, timeout=timeout + 10)

    def terminate_ike(self, ike, timeout=5):
        return self.swanctl("--terminate", "--ike", ike, "--timeout", str(timeout), "--force", check=False,
                            timeout=timeout + 10)

    def list_sas(self):
        return self.swanctl("--list-sas").stdout


# Certificates made with cryptography, for the peers' own certificates and for certificates getcertd won't issue.

def now():
    return datetime.datetime.now(datetime.timezone.utc)


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(subject="CN=IKE test CA", key=None, days=1):
    key = key or new_key()
    name = x509.Name.from_rfc4514_string(subject)
    t = now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(t - datetime.timedelta(minutes=5)).not_valid_after(t + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key, ca_cert, subject, key=None, not_before=None, not_after=None, eku=None, san=()):
    """An end-entity certificate (``subject`` in RFC 4514 form); returns (key, cert)."""
    key = key or new_key()
    not_before = not_before or now() - datetime.timedelta(minutes=5)
    not_after = not_after or now() + datetime.timedelta(hours=1)
    eku = eku if eku is not None else [ExtendedKeyUsageOID.IPSEC_IKE, ExtendedKeyUsageOID.CLIENT_AUTH]
    b = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string(subject))
         .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(path):
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), None)


def load_cert(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


_ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
s.settimeout(float(sys.argv[3]))
data, peer = s.recvfrom(2048)
s.sendto(data, peer)
print(peer[0], flush=True)
"""

_ECHO_CLIENT = """
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.settimeout(float(sys.argv[4]))
token = os.urandom(16)
s.sendto(token, (sys.argv[2], int(sys.argv[3])))
data, peer = s.recvfrom(2048)
sys.exit(0 if data == token and peer[0] == sys.argv[2] else 3)
"""


def udp_echo(server_ns, server_addr, client_ns, client_addr, port=7777, timeout=3.0, python=None):
    """One UDP datagram from client_addr to server_addr and its echo back (no ping needed); True if it came back."""
    python = python or sys.executable
    server = subprocess.Popen(server_ns.exec_args(python, "-c", _ECHO_SERVER, server_addr, str(port), str(timeout)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"echo server did not start: {server.stderr.read()}")
        client = client_ns.run(python, "-c", _ECHO_CLIENT, client_addr, server_addr, port, timeout, check=False,
                               timeout=timeout + 10)
        return client.returncode == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        server.stdout.close()
        server.stderr.close()
