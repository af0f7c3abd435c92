"""The INI configuration, parsed into frozen dataclasses (layer 1: the text comes in, no file access here).

Every key documented in etc/getcertd.ini is known here; an unknown section or key is an error, so a typo
is reported at start instead of being silently ignored.
"""
import configparser
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Mapping, Tuple
from urllib.parse import urlsplit

from getcertd.ca import parse_name
from getcertd.errors import ConfigError

KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "ec-p256", "ec-p384")
DEFAULT_EKU = ("ipsecIKE", "clientAuth")


@dataclass(frozen=True)
class ProfileConfig:
    name: str
    lifetime: int  # seconds
    subject: str  # template, e.g. "CN={user}, OU=remote-access, O=getcertd"
    san: str  # template, e.g. "email:{user}@example.com"; empty for none
    eku: Tuple[str, ...]


EKU_NAMES = ("ipsecIKE", "clientAuth", "serverAuth", "emailProtection")  # getcertd.ca.EKU_BY_NAME
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def crl_margin(interval: int) -> int:
    """How much longer than the interval a CRL's lifetime must be: a tick may run late and a big CRL takes a
    moment to build, and the next regular CRL must come before this one's nextUpdate (RFC 5280 5.1.2.5)."""
    return min(interval, 60)


@dataclass(frozen=True)
class RadiusConfig:
    servers: Tuple[Tuple[str, int], ...] = ()
    secret: bytes = field(default=b"", repr=False)  # never in logs
    timeout: float = 3.0
    retries: int = 2
    nas_identifier: str = "getcertd"
    require_message_authenticator: bool = True
    dead_time: float = 30.0
    profile_attribute: str = "Class"


@dataclass(frozen=True)
class Config:
    state_dir: str
    server_name: str
    key_helpers: int  # 0: one per CPU
    https_listen: str
    https_certificate: str
    https_key: str
    max_connections: int
    max_connections_per_address: int
    request_timeout: int
    idle_timeout: int
    http_listen: str
    scep_paths: Tuple[str, ...]
    allow_legacy_des: bool
    renewal_without_auth: bool
    ca_certificate: str
    ca_key: str
    ca_key_passphrase_file: str
    ca_key_type: str
    ca_subject: str
    ca_lifetime: int
    ra: bool
    auth_backend: str
    users_file: str
    challenge_user: str
    radius: RadiusConfig
    skew: int
    max_valid_per_user: int
    max_per_user_per_hour: int
    default_profile: str
    profiles: Mapping[str, ProfileConfig]
    profile_map: Mapping[str, str]
    crl_interval: int
    crl_lifetime: int
    crl_url: str
    log_retain: int
    log_checkpoint_records: int
    manhole_listen: str
    manhole_authorized_keys: str
    metrics_listen: str
    manhole_allow_remote: bool = False
    metrics_allow_remote: bool = False
    source: str = field(default="", compare=False)


_DURATION = re.compile(r"^\s*([0-9]{1,12})\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION = 100 * 366 * 86400  # beyond this a datetime computed at start would overflow sooner or later


def parse_duration(text: str) -> int:
    """'90' or '90s', '10m', '8h', '2d', '1w' to seconds (at most MAX_DURATION)."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration (use e.g. 30s, 10m, 8h, 2d): {text[:40]!r}")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION:
        raise ValueError(f"duration longer than 100 years: {text[:40]!r}")
    return seconds


# section -> {key: default}; "profile NAME" sections are handled apart.
_SCHEMA = {
    "getcertd": {"state_dir": "/var/lib/getcertd", "server_name": "localhost", "key_helpers": "auto"},
    "https": {"listen": "tcp:8443:interface=127.0.0.1", "certificate": "", "key": "", "max_connections": "1000",
              "max_connections_per_address": "100",
              "request_timeout": "30s", "idle_timeout": "60s"},
    "http": {"listen": ""},
    "scep": {"paths": "/cgi-bin/pkiclient.exe /scep", "allow_legacy_des": "no", "renewal_without_auth": "no"},
    "ca": {"certificate": "", "key": "", "key_passphrase_file": "", "key_type": "rsa2048", "subject": "CN=getcertd CA", "lifetime": "3650d",
           "ra": "yes"},
    "auth": {"backend": "local", "users": "", "challenge_user": "cn"},
    "radius": {"servers": "", "secret": "", "secret_file": "", "timeout": "3s", "retries": "2",
               "nas_identifier": "getcertd", "require_message_authenticator": "yes", "dead_time": "30s",
               "profile_attribute": "Class"},
    "policy": {"subject": "CN={user}, OU=remote-access, O=getcertd", "san": "", "lifetime": "8h",
               "eku": " ".join(DEFAULT_EKU), "skew": "2m", "max_valid_per_user": "5",
               "max_per_user_per_hour": "60", "default_profile": "default", "profile_map": ""},
    "crl": {"interval": "1h", "lifetime": "1d", "url": ""},
    "log": {"retain": "30d", "checkpoint_records": "50000"},
    "manhole": {"listen": "tcp:2222:interface=127.0.0.1", "authorized_keys": "", "allow_remote": "no"},
    "metrics": {"listen": "", "allow_remote": "no"},
}
_PROFILE_KEYS = {"lifetime", "subject", "san", "eku"}


def _bool(section, key, value):
    v = value.strip().lower()
    if v in ("yes", "true", "on", "1"):
        return True
    if v in ("no", "false", "off", "0"):
        return False
    raise ConfigError(f"[{section}] {key}: expected yes or no, got {value!r}")


def _int(section, key, value, minimum=0):
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"[{section}] {key}: expected a whole number, got {value!r}") from None
    if n < minimum:
        raise ConfigError(f"[{section}] {key}: must be at least {minimum}")
    return n


def _dur(section, key, value):
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ConfigError(f"[{section}] {key}: {e}") from None


def _positive_dur(section, key, value):
    """A duration that must be at least a second (0 would not mean 'no limit': say so instead of clamping)."""
    seconds = _dur(section, key, value)
    if seconds < 1:
        raise ConfigError(f"[{section}] {key}: at least 1s")
    return seconds


def _skew(value):
    skew = _dur("policy", "skew", value)
    if skew > 86400:  # it only backdates notBefore, but a certificate valid long before it was issued is no help
        raise ConfigError("[policy] skew: at most 1d (it backdates notBefore for clients whose clocks are behind)")
    return skew


def _hostport(text):
    text = text.strip()
    if text.startswith("["):  # [::1]:1812
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    # [0-9], not isdigit(): that also takes "²", which int() then refuses (found writing tests/test_properties.py)
    if not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise ConfigError(f"[radius] servers: expected host:port with a port from 1 to 65535, got {text[:80]!r}")
    return host, int(port)


def _endpoint_parts(description: str):
    """(kind, positional args, keyword args) of a Twisted server endpoint string (``\\:`` escapes a colon)."""
    parts, current, chars = [], "", iter(description)
    for c in chars:
        if c == "\\":
            current += next(chars, "")
        elif c == ":":
            parts.append(current)
            current = ""
        else:
            current += c
    parts.append(current)
    if parts[0].isdigit():  # the old strports form: a bare port is TCP on every interface
        parts.insert(0, "tcp")
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return parts[0], args, kwargs


_LISTEN_KINDS = ("tcp", "tcp6", "ssl", "unix", "systemd")


def _listen(section: str, description: str, required: bool = False) -> str:
    """A [section] listen value checked here, where the mistake can be named: a kind Twisted has (tcp, tcp6,
    unix, systemd...) and, for TCP, a port from 0 to 65535."""
    if not description:
        if required:
            raise ConfigError(f"[{section}] listen: required")
        return description
    kind, args, kwargs = _endpoint_parts(description)
    example = "e.g. tcp:8443:interface=127.0.0.1"
    if kind not in _LISTEN_KINDS:
        raise ConfigError(f"[{section}] listen: {description!r}: unknown kind {kind!r} (one of "
                          f"{', '.join(_LISTEN_KINDS)}; {example})")
    if kind in ("tcp", "tcp6", "ssl"):
        port = args[0] if args else kwargs.get("port", "")
        if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
            raise ConfigError(f"[{section}] listen: {description!r}: the port must be a number from 0 to 65535 "
                              f"({example})")
    return description


def listen_port(description: str):
    """The TCP port of a listen value, or None (a UNIX or systemd socket: reached through something else)."""
    kind, args, kwargs = _endpoint_parts(description)
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    return int(args[0] if args else kwargs["port"])


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _server_name(name: str) -> str:
    """[getcertd] server_name: the DNS name or IP address clients use (in URLs and the TLS certificate)."""
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    if not 0 < len(name) <= 64 or not all(_DNS_LABEL.fullmatch(label) for label in name.rstrip(".").split(".")):
        raise ConfigError(f"[getcertd] server_name: {name[:80]!r} is not a DNS name (letters, digits and hyphens, "
                          "dot-separated, at most 64 characters: it is the TLS certificate's CN) or an IP address")
    return name


def _name_text(section: str, key: str, text: str) -> str:
    """A distinguished name written as RFC 4514 text (``CN=getcertd CA, O=Example``), checked here."""
    try:
        name = parse_name(text)
    except ValueError as e:
        raise ConfigError(f"[{section}] {key}: {text[:80]!r} is not a distinguished name like 'CN=getcertd CA, "
                          f"O=Example' ({str(e) or 'unreadable'})") from None
    if not len(name):
        raise ConfigError(f"[{section}] {key}: must not be empty")
    if any(not attribute.value for attribute in name):  # a DirectoryString has at least one character
        raise ConfigError(f"[{section}] {key}: {text[:80]!r} has an attribute with no value")
    return text


def _url(section: str, key: str, url: str) -> str:
    """An http(s) URL with a host (a CRL distribution point that clients fetch)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as e:
        raise ConfigError(f"[{section}] {key}: {url[:80]!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise ConfigError(f"[{section}] {key}: {url[:80]!r} is not an http:// or https:// URL with a host")
    return url


def loopback_only(description: str) -> bool:
    """Whether a server endpoint string can only be reached from this machine (loopback TCP or a UNIX socket)."""
    kind, _args, kwargs = _endpoint_parts(description.strip())
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6"):
        return False  # systemd sockets and the like: can't tell
    interface = kwargs.get("interface", "")
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False  # no interface: every interface


def _local_listener(section, v):
    """[manhole]/[metrics] listen: loopback unless allow_remote = yes says the admin means it."""
    listen = _listen(section, v[section]["listen"])
    allow_remote = _bool(section, "allow_remote", v[section]["allow_remote"])
    if listen and not allow_remote and not loopback_only(listen):
        raise ConfigError(f"[{section}] listen: {listen!r} is reachable from other machines; listen on loopback "
                          "(e.g. tcp:PORT:interface=127.0.0.1), or set allow_remote = yes to mean it")
    return listen, allow_remote


def parse_config(text: str, source: str = "<config>", read_file=None) -> Config:
    """Parse the INI text. ``read_file(path) -> bytes`` is used only for [radius] secret_file."""
    cp = configparser.ConfigParser(interpolation=None, empty_lines_in_values=False)
    cp.optionxform = str
    try:
        cp.read_string(text, source=source)
    except configparser.Error as e:
        raise ConfigError(f"{source}: {str(e).splitlines()[0]}") from None
    values = {s: dict(d) for s, d in _SCHEMA.items()}
    raw_profiles = {}
    for section in cp.sections():
        if section.startswith("profile "):
            name = section[len("profile "):].strip()
            unknown = set(cp[section]) - _PROFILE_KEYS
            if not name or unknown:
                raise ConfigError(f"{source}: [{section}]: unknown key(s) {', '.join(sorted(unknown))}"
                                  if unknown else f"{source}: [{section}]: profile needs a name")
            raw_profiles[name] = dict(cp[section])
            continue
        if section not in _SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section}]")
        for key, value in cp[section].items():
            if key not in _SCHEMA[section]:
                raise ConfigError(f"{source}: [{section}] unknown key {key!r}")
            values[section][key] = value.strip()
    try:
        return _build(values, raw_profiles, source, read_file)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _build(v, raw_profiles, source, read_file) -> Config:
    g, ca, auth, pol, rad = v["getcertd"], v["ca"], v["auth"], v["policy"], v["radius"]
    if ca["key_type"] not in KEY_TYPES:
        raise ConfigError(f"[ca] key_type: one of {', '.join(KEY_TYPES)}, got {ca['key_type']!r}")
    if bool(ca["certificate"]) != bool(ca["key"]):
        raise ConfigError("[ca] certificate and key: give both or neither")
    https = v["https"]
    if bool(https["certificate"]) != bool(https["key"]):
        raise ConfigError("[https] certificate and key: give both or neither")
    paths = tuple(p for p in v["scep"]["paths"].split() if p)
    if not paths or any(not p.startswith("/") for p in paths):
        raise ConfigError("[scep] paths: one or more absolute paths, e.g. /cgi-bin/pkiclient.exe /scep")
    if auth["backend"] not in ("local", "radius"):
        raise ConfigError(f"[auth] backend: local or radius, got {auth['backend']!r}")
    if auth["backend"] == "local" and not auth["users"]:
        raise ConfigError("[auth] users: the local accounts file is required with backend = local")
    if auth["challenge_user"] not in ("cn", "email"):
        raise ConfigError("[auth] challenge_user: cn or email")

    radius = RadiusConfig()
    if auth["backend"] == "radius":
        servers = tuple(_hostport(s) for s in rad["servers"].replace(",", " ").split())
        if not servers:
            raise ConfigError("[radius] servers: at least one host:port with backend = radius")
        if rad["secret"] and rad["secret_file"]:
            raise ConfigError("[radius] secret and secret_file: give one, not both")
        if rad["secret_file"]:
            if read_file is None:
                raise ConfigError("[radius] secret_file: can't be read here")
            secret = read_file(rad["secret_file"]).strip()
        else:
            secret = rad["secret"].encode()
        if not secret:
            raise ConfigError("[radius] secret or secret_file is required")
        if not rad["nas_identifier"].strip():
            raise ConfigError("[radius] nas_identifier: must not be empty (RFC 2865 section 4.1: an Access-Request "
                              "names its NAS, and some servers refuse one that does not)")
        if rad["profile_attribute"] not in ("Class", "Filter-Id"):
            raise ConfigError("[radius] profile_attribute: Class or Filter-Id")
        radius = RadiusConfig(
            servers=servers, secret=secret, timeout=_positive_dur("radius", "timeout", rad["timeout"]),
            retries=_int("radius", "retries", rad["retries"]), nas_identifier=rad["nas_identifier"],
            require_message_authenticator=_bool("radius", "require_message_authenticator",
                                                rad["require_message_authenticator"]),
            dead_time=_dur("radius", "dead_time", rad["dead_time"]), profile_attribute=rad["profile_attribute"])

    profiles = {"default": ProfileConfig("default", _dur("policy", "lifetime", pol["lifetime"]), pol["subject"],
                                         pol["san"], tuple(pol["eku"].split()))}
    for name, p in raw_profiles.items():
        sec = f"profile {name}"
        profiles[name] = ProfileConfig(
            name, _dur(sec, "lifetime", p["lifetime"]) if "lifetime" in p else profiles["default"].lifetime,
            p.get("subject", pol["subject"]), p.get("san", pol["san"]), tuple(p.get("eku", pol["eku"]).split()))
    for p in profiles.values():
        section = "policy" if p.name == "default" else f"profile {p.name}"
        if p.lifetime < 60:
            raise ConfigError(f"[{section}] lifetime: at least 1m")
        for eku in p.eku:  # found here, not by every enrollment on the profile failing
            if eku not in EKU_NAMES and not _OID.fullmatch(eku):
                raise ConfigError(f"[{section}] eku: {eku!r} is neither one of {', '.join(EKU_NAMES)} nor a dotted "
                                  "OID")
    profile_map = {}
    for item in pol["profile_map"].replace(",", " ").split():
        hint, sep, name = item.partition("=")
        if not sep or name not in profiles:
            raise ConfigError(f"[policy] profile_map: expected VALUE=PROFILE with a defined profile, got {item!r}")
        profile_map[hint] = name
    if pol["default_profile"] not in profiles:
        raise ConfigError(f"[policy] default_profile: no profile named {pol['default_profile']!r}")
    crl_interval = _positive_dur("crl", "interval", v["crl"]["interval"])
    crl_lifetime = _dur("crl", "lifetime", v["crl"]["lifetime"])
    if crl_lifetime < crl_interval + crl_margin(crl_interval):
        raise ConfigError(f"[crl] lifetime: must exceed [crl] interval by at least {crl_margin(crl_interval)} s (a "
                          "CRL must stay valid until the next one is out)")
    log_retain = _dur("log", "retain", v["log"]["retain"])
    if log_retain < crl_lifetime:
        raise ConfigError("[log] retain: must be at least [crl] lifetime (an expired revoked certificate must stay "
                          "on the CRL until a regular CRL issued after it expired has listed it)")
    manhole_listen, manhole_allow_remote = _local_listener("manhole", v)
    metrics_listen, metrics_allow_remote = _local_listener("metrics", v)

    return Config(
        state_dir=g["state_dir"], server_name=_server_name(g["server_name"]),
        key_helpers=0 if g["key_helpers"].strip() == "auto" else _int("getcertd", "key_helpers", g["key_helpers"], 1),
        https_listen=_listen("https", https["listen"], required=True),
        https_certificate=https["certificate"], https_key=https["key"],
        max_connections=_int("https", "max_connections", https["max_connections"], 1),
        max_connections_per_address=_int("https", "max_connections_per_address",
                                         https["max_connections_per_address"], 1),
        request_timeout=_positive_dur("https", "request_timeout", https["request_timeout"]),
        idle_timeout=_positive_dur("https", "idle_timeout", https["idle_timeout"]),
        http_listen=_listen("http", v["http"]["listen"]), scep_paths=paths,
        allow_legacy_des=_bool("scep", "allow_legacy_des", v["scep"]["allow_legacy_des"]),
        renewal_without_auth=_bool("scep", "renewal_without_auth", v["scep"]["renewal_without_auth"]),
        ca_certificate=ca["certificate"], ca_key=ca["key"], ca_key_passphrase_file=ca["key_passphrase_file"],
        ca_key_type=ca["key_type"], ca_subject=_name_text("ca", "subject", ca["subject"]),
        ca_lifetime=_dur("ca", "lifetime", ca["lifetime"]), ra=_bool("ca", "ra", ca["ra"]),
        auth_backend=auth["backend"], users_file=auth["users"], challenge_user=auth["challenge_user"],
        radius=radius, skew=_skew(pol["skew"]),
        max_valid_per_user=_int("policy", "max_valid_per_user", pol["max_valid_per_user"]),
        max_per_user_per_hour=_int("policy", "max_per_user_per_hour", pol["max_per_user_per_hour"]),
        default_profile=pol["default_profile"], profiles=profiles, profile_map=profile_map,
        crl_interval=crl_interval, crl_lifetime=crl_lifetime, crl_url=_url("crl", "url", v["crl"]["url"]),
        log_retain=log_retain,
        log_checkpoint_records=_int("log", "checkpoint_records", v["log"]["checkpoint_records"]),
        manhole_listen=manhole_listen, manhole_authorized_keys=v["manhole"]["authorized_keys"],
        metrics_listen=metrics_listen, manhole_allow_remote=manhole_allow_remote,
        metrics_allow_remote=metrics_allow_remote, source=source)
