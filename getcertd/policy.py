"""Certificate policy (layer 1): authenticated identity + RADIUS attributes + CSR -> profile -> certificate fields.

The subject never comes from the CSR (draft section 5): it is built from the profile's template, and the
user's name is only ever placed inside one attribute value, so no name can add RDNs or SAN entries.
"""
import datetime
import functools
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from getcertd.auth import Identity
from getcertd.ca import key_type_of
from getcertd.config import ProfileConfig
from getcertd.errors import ConfigError, FailInfo, ScepFailure

_ATTRS = {
    "CN": NameOID.COMMON_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "O": NameOID.ORGANIZATION_NAME,
    "L": NameOID.LOCALITY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME, "C": NameOID.COUNTRY_NAME,
    "DC": NameOID.DOMAIN_COMPONENT, "UID": NameOID.USER_ID, "EMAIL": NameOID.EMAIL_ADDRESS,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
}
_SPLIT_RDN = re.compile(r"(?<!\\),")
_PLACEHOLDER = re.compile(r"\{(user|local|domain|profile)\}")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_EMAIL_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
MAX_USER_LENGTH = 64  # ub-common-name


def _template_vars(user: str, profile: str) -> dict:
    local, _, domain = user.partition("@")
    return {"user": user, "local": local, "domain": domain, "profile": profile}


# Attributes whose ASN.1 string type (as cryptography writes them) can't hold any character: an IA5String is
# 7-bit, a PrintableString a small set. A value outside it would be written wrongly or fail at signing.
_IA5_ATTRIBUTES = {NameOID.EMAIL_ADDRESS: "emailAddress", NameOID.DOMAIN_COMPONENT: "DC"}
_PRINTABLE_ATTRIBUTES = {NameOID.COUNTRY_NAME: "C", NameOID.SERIAL_NUMBER: "serialNumber",
                         NameOID.DN_QUALIFIER: "dnQualifier"}
_PRINTABLE_STRING = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]*")
# RFC 5280 appendix A upper bounds (characters) of the attributes that have one.
_UPPER_BOUNDS = {NameOID.COMMON_NAME: ("CN", 64), NameOID.LOCALITY_NAME: ("L", 128),
                 NameOID.STATE_OR_PROVINCE_NAME: ("ST", 128), NameOID.ORGANIZATION_NAME: ("O", 64),
                 NameOID.ORGANIZATIONAL_UNIT_NAME: ("OU", 64), NameOID.TITLE: ("title", 64),
                 NameOID.SERIAL_NUMBER: ("serialNumber", 64), NameOID.EMAIL_ADDRESS: ("emailAddress", 255),
                 NameOID.PSEUDONYM: ("pseudonym", 128), NameOID.POSTAL_CODE: ("postalCode", 40)}


def _subject_value(oid, value: str) -> str:
    name, bound = _UPPER_BOUNDS.get(oid, (None, None))
    if bound is not None and len(value) > bound:
        raise ScepFailure(FailInfo.badRequest, f"the user name does not fit the certificate subject: {name} takes "
                                               f"at most {bound} characters (RFC 5280), this one would have "
                                               f"{len(value)}")
    if oid in _IA5_ATTRIBUTES and not value.isascii() \
            or oid in _PRINTABLE_ATTRIBUTES and not _PRINTABLE_STRING.fullmatch(value):
        name, kind = (_IA5_ATTRIBUTES[oid], "ASCII") if oid in _IA5_ATTRIBUTES else \
            (_PRINTABLE_ATTRIBUTES[oid], "letters, digits, spaces and '()+,-./:=?")
        raise ScepFailure(FailInfo.badRequest, f"the user name does not fit the certificate subject: {name} takes "
                                               f"{kind} only")
    return value


def _fill(template: str, values: dict) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def check_template(template: str, kind: str) -> None:
    """Raise ValueError when a subject or SAN template can't be used (checked once, at start)."""
    for name in re.findall(r"\{([^}]*)\}", template):
        if name not in ("user", "local", "domain", "profile"):
            raise ValueError(f"unknown placeholder {{{name}}} in {kind} template (use user, local, domain, profile)")
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise ValueError(f"a {{ or }} outside a placeholder in {kind} template {template!r}")
    if kind == "subject":
        for rdn in _parse_subject_template(template):
            pass
    else:
        _parse_san_template(template)


@functools.lru_cache(maxsize=64)  # templates come from the configuration: parsed once, not per request
def _parse_subject_template(template: str) -> tuple:
    rdns = []
    for part in _SPLIT_RDN.split(template):
        part = part.strip()
        if not part:
            continue
        attr, sep, value = part.partition("=")
        attr = attr.strip().upper()
        if not sep or attr not in _ATTRS:
            raise ValueError(f"subject template: expected ATTR=value with ATTR one of {', '.join(_ATTRS)}, got {part!r}")
        rdns.append((_ATTRS[attr], value.strip().replace("\\,", ",")))
    if not rdns:
        raise ValueError("subject template is empty")
    return tuple(rdns)


@functools.lru_cache(maxsize=64)
def _parse_san_template(template: str) -> tuple:
    entries = []
    for item in template.split():
        kind, sep, value = item.partition(":")
        if not sep or kind not in ("email", "dns", "uri"):
            raise ValueError(f"san template: expected email:, dns: or uri: entries, got {item!r}")
        entries.append((kind, value))
    return tuple(entries)


def _check_email(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not _EMAIL_LOCAL.match(local) or not all(_DNS_LABEL.match(lbl) for lbl in domain.split(".")):
        raise ScepFailure(FailInfo.badRequest, "the user name does not make a valid e-mail subjectAltName")
    return value


def _check_dns(value: str) -> str:
    if len(value) > 253 or not all(_DNS_LABEL.match(lbl) for lbl in value.split(".")):
        raise ScepFailure(FailInfo.badRequest, "the user name does not make a valid DNS subjectAltName")
    return value


def check_user_name(user: str) -> None:
    """Names with control characters or of absurd length never reach a certificate or a log line."""
    if not user or len(user) > MAX_USER_LENGTH:
        raise ScepFailure(FailInfo.badRequest, f"user names must be 1 to {MAX_USER_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in user):
        raise ScepFailure(FailInfo.badRequest, "user names must not contain control characters")


def check_public_key(public_key) -> str:
    """The accepted client keys: RSA >= 2048 bits, EC P-256/P-384, Ed25519; else FAILURE badAlg."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise ScepFailure(FailInfo.badAlg, f"RSA keys must be at least 2048 bits, this one has {public_key.key_size}")
        if public_key.key_size > 8192:
            raise ScepFailure(FailInfo.badAlg, "RSA keys above 8192 bits are not accepted")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            raise ScepFailure(FailInfo.badAlg, f"EC keys must be on P-256 or P-384, not {public_key.curve.name}")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise ScepFailure(FailInfo.badAlg, "only RSA (2048+), EC P-256/P-384 and Ed25519 keys are accepted")
    return key_type_of(public_key)


# What a profile's templates make of a user name is the same for each of that user's certificates: made once
# (a refusal, raised, is not kept). Keyed by strings only: equal x509.Names may differ in their string types.
@functools.lru_cache(maxsize=4096)
def _names(subject_template: str, san_template: str, user: str, profile: str) -> tuple:
    """(subject Name, subjectAltNames, the subject's RFC 4514 string) of ``user`` in a profile, or ScepFailure
    when the name does not fit."""
    values = _template_vars(user, profile)
    try:
        subject = x509.Name([x509.RelativeDistinguishedName([
            x509.NameAttribute(oid, _subject_value(oid, _fill(v, values)))])
            for oid, v in reversed(_parse_subject_template(subject_template))])
    except ValueError as e:  # e.g. a CN longer than 64 characters
        raise ScepFailure(FailInfo.badRequest, f"the user name does not fit the certificate subject: {e}") from None
    san = []
    for kind, v in _parse_san_template(san_template):
        v = _fill(v, values)
        if kind == "email":
            san.append(x509.RFC822Name(_check_email(v)))
        elif kind == "dns":
            san.append(x509.DNSName(_check_dns(v)))
        else:
            if not v.isascii() or any(c in v for c in " \"<>\\^`{|}"):
                raise ScepFailure(FailInfo.badRequest, "the user name does not make a valid URI subjectAltName")
            san.append(x509.UniformResourceIdentifier(v))
    return subject, tuple(san), subject.rfc4514_string()


@dataclass(frozen=True)
class Decision:
    profile: str
    subject: x509.Name
    san: Tuple[x509.GeneralName, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    eku: Tuple[str, ...]
    key_type: str
    subject_text: str = ""  # RFC 4514, for the issuance log; made from ``subject`` when not given

    def __post_init__(self):
        if not self.subject_text:
            object.__setattr__(self, "subject_text", self.subject.rfc4514_string())


@dataclass(frozen=True)
class Policy:
    profiles: Mapping[str, ProfileConfig]
    default_profile: str = "default"
    profile_map: Mapping[str, str] = None
    skew: int = 120
    max_valid_per_user: int = 5
    max_per_user_per_hour: int = 60

    def __post_init__(self):
        for p in self.profiles.values():
            section = "policy" if p.name == "default" else f"profile {p.name}"
            for kind, template in (("subject", p.subject), ("san", p.san)):
                try:
                    check_template(template, kind)
                except ValueError as e:
                    raise ConfigError(f"[{section}] {kind}: {e}") from None

    def _mapped_hint(self, identity: Identity) -> Optional[str]:
        """The first of the backend's hints that profile_map names (a server may add values of its own, such as
        the Class that Microsoft NPS puts in every Access-Accept)."""
        mapping = self.profile_map or {}
        return next((hint for hint in identity.profile_hints if hint in mapping), None)

    def profile_for(self, identity: Identity) -> ProfileConfig:
        hint = self._mapped_hint(identity)
        return self.profiles[self.profile_map[hint] if hint is not None else self.default_profile]

    def choose_profile(self, identity: Identity, requested: str, granted: Optional[str] = None) -> str:
        """The profile for a request that names one (an EST CA label), or ScepFailure.

        A user whom the backend's attributes map to a profile (profile_map), or who renews a certificate of
        profile ``granted``, gets that profile and no other: a label must not lift anyone out of the profile
        RADIUS put them in. Other users may name any profile that profile_map does not reserve.
        """
        mapping = self.profile_map or {}
        own = granted or self.profile_for(identity).name
        if requested == own:
            return own
        if requested not in self.profiles:
            raise ScepFailure(FailInfo.badRequest, f"there is no profile {requested!r}")
        if granted is not None or self._mapped_hint(identity) is not None or requested in set(mapping.values()):
            raise ScepFailure(FailInfo.badRequest, f"the profile {requested!r} is not granted to this user")
        return requested

    def decide(self, identity: Identity, public_key, now: datetime.datetime, ca_not_after: datetime.datetime,
               valid_count: int = 0, issued_last_hour: int = 0, profile: Optional[str] = None,
               ca_not_before: Optional[datetime.datetime] = None) -> Decision:
        """The certificate fields for this identity and key, or ScepFailure saying why not. The validity nests
        in the CA's (RFC 5280 6.1.3: a certificate valid before or after its issuer does not validate then)."""
        if ca_not_before is not None and now < ca_not_before:
            raise ScepFailure(FailInfo.badTime, f"the CA certificate is not valid before "
                                                f"{ca_not_before:%Y-%m-%d %H:%M:%S} UTC; check this server's clock")
        check_user_name(identity.user)
        key_type = check_public_key(public_key)
        if profile and profile not in self.profiles:  # a renewal of a profile since taken out of the configuration
            raise ScepFailure(FailInfo.badRequest, f"the profile {profile!r} is no longer configured here; "
                                                   "enroll with your credentials")
        prof = self.profiles[profile] if profile else self.profile_for(identity)
        if self.max_valid_per_user and valid_count >= self.max_valid_per_user:
            raise ScepFailure(FailInfo.badRequest, f"{valid_count} certificates of this user are still valid "
                                                   f"(limit {self.max_valid_per_user}); revoke one or wait")
        if self.max_per_user_per_hour and issued_last_hour >= self.max_per_user_per_hour:
            raise ScepFailure(FailInfo.badRequest, f"issuance rate limit reached ({self.max_per_user_per_hour} "
                                                   "per user per hour); try later")
        subject, san, subject_text = _names(prof.subject, prof.san, identity.user, prof.name)
        lifetime = prof.lifetime
        if identity.session_timeout:
            lifetime = min(lifetime, identity.session_timeout)
        not_after = min(now + datetime.timedelta(seconds=lifetime), ca_not_after)
        not_before = now - datetime.timedelta(seconds=self.skew)
        if ca_not_before is not None:
            not_before = max(not_before, ca_not_before)
        if not_after <= now:
            raise ScepFailure(FailInfo.badTime, "the CA certificate has expired; no certificate can be issued")
        return Decision(prof.name, subject, san, not_before, not_after, prof.eku, key_type, subject_text)
