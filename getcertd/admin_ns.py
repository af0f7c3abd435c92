"""The manhole's namespace: documented, friendly objects over the running appliance's parts.

Everything here runs on the reactor thread (the manhole evaluates each line there), so it reads the live
issuance log directly; actions that must wait (a revocation is fsynced, then a CRL is signed) return a
Deferred, which the manhole prints when it fires. Testable without SSH: :func:`namespace` builds the dict.

Objects::

    log        the issuance log: log.recent(20), log.user("alice"), log.serial("3F2A..."),
               log.query(user=, since=, until=), log.revoked(), log.pem(serial)
    revoke     revoke(serial_or_user, reason="unspecified")
    crl        crl.info(), crl.publish(), crl.pem
    radius     RADIUS servers: state, in flight, counters (or a note with the local backend)
    throttled  user names and addresses that must wait after failed logins; throttled.clear("alice")
    stats()    issued, refused by failInfo, auth results, RADIUS timeouts, uptime (= /metrics)
    config     the configuration in effect (secrets hidden)
    help       this text; help(obj) for one object
"""
import datetime
import re
import textwrap

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from getcertd.auth import throttle_key
from getcertd.config import parse_duration
from getcertd.issuance import CRL_REASONS
from getcertd.operations import NothingToRevoke, format_serial, parse_serial, revoke as _revoke

_UTC = datetime.timezone.utc


def _when(t) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, _UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


class Text(str):
    """A string the prompt shows as itself (not quoted)."""

    def __repr__(self):
        return str(self)


class Records(list):
    """Issuance records, shown as a table; still a list (``r[0].serial``, ``len(r)``)."""

    def __init__(self, records, now):
        super().__init__(records)
        self._now = now

    def state(self, r) -> str:
        if r.revoked_at is not None:
            return f"revoked {_when(r.revoked_at)} ({CRL_REASONS.get(r.revocation_reason, r.revocation_reason)})"
        if r.not_after <= self._now:
            return "expired"
        if r.not_before > self._now:
            return "not yet valid"
        return "valid"

    def __repr__(self):
        if not self:
            return "(no records)"
        head = ("serial", "user", "profile", "issued (UTC)", "not after (UTC)", "auth", "client", "state")
        rows = [(format_serial(r.serial), r.user, r.profile, _when(r.issued_at), _when(r.not_after), r.auth_method,
                 r.client, self.state(r)) for r in self]
        widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head) - 1)]
        lines = []
        for row in [head] + rows:
            lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + str(row[-1]))
        lines.append(f"({len(rows)} record{'s' if len(rows) != 1 else ''})")
        return "\n".join(lines)

    __str__ = __repr__


def _epoch(value, now):
    """A point in time: a datetime, epoch seconds, an ISO 8601 string, or a duration ago ("2h", "3d")."""
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return int((value if value.tzinfo else value.replace(tzinfo=_UTC)).timestamp())
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip()
    if re.fullmatch(r"[0-9]+\s*[smhdw]", text):
        return int(now - parse_duration(text))
    try:
        return _epoch(datetime.datetime.fromisoformat(text.replace("Z", "+00:00")), now)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (a datetime, epoch seconds, ISO 8601, or '2h' for 2 hours ago)") \
            from None


class LogView:
    """The issuance log (every certificate issued and not yet pruned).

    log.recent(20)                  the 20 latest records, newest first, as a table
    log.user("alice")               a user's records
    log.serial("3F2A...")           one record (hex as openssl prints it, or an int), or None
    log.query(user=None, since=None, until=None)
                                    records issued in [since, until): datetimes, epoch seconds,
                                    ISO 8601 strings or "2h" (two hours ago)
    log.revoked()                   revoked certificates not yet expired (those on the CRL)
    log.pem(serial)                 the certificate (a Deferred of its PEM)
    len(log)                        how many records
    """

    def __init__(self, issuance_log, journal, clock):
        self._log = issuance_log
        self._journal = journal
        self._clock = clock

    def _now(self):
        return int(self._clock.seconds())

    def recent(self, n: int = 20) -> Records:
        return Records(self._log.recent(n), self._now())

    def user(self, user: str) -> Records:
        return Records(self._log.by_user(user), self._now())

    def serial(self, serial):
        return self._log.get(parse_serial(serial))

    def query(self, user: str = None, since=None, until=None, serial=None) -> Records:
        now = self._now()
        return Records(self._log.query(user=user, serial=None if serial is None else parse_serial(serial),
                                       since=_epoch(since, now), until=_epoch(until, now)), now)

    def revoked(self) -> Records:
        now = self._now()
        return Records(self._log.revoked_unexpired(now), now)

    def pem(self, serial):
        serial = parse_serial(serial)

        def to_pem(der):
            if der is None:
                return Text(f"no certificate with serial {format_serial(serial)}")
            return Text(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode())
        return self._journal.certificate(serial).addCallback(to_pem)

    def __len__(self):
        return len(self._log)

    def __iter__(self):
        return iter(self._log)

    def __repr__(self):
        return f"<issuance log: {len(self._log)} records; try log.recent(20), log.user('NAME'), help(log)>"


class Revoked(list):
    """The outcome of revoke(): the records, and the CRL published after."""

    def __init__(self, records, crl_info):
        super().__init__(records)
        self.crl = crl_info

    def __repr__(self):
        lines = []
        for r in self:
            reason = CRL_REASONS.get(r.revocation_reason, r.revocation_reason)
            lines.append(f"revoked {format_serial(r.serial)} ({r.user}, {reason}, at {_when(r.revoked_at)})")
        if self.crl:
            n = self.crl["entries"]
            lines.append(f"CRL {self.crl['number']} published: {n} entr{'ies' if n != 1 else 'y'}, next update "
                         f"{self.crl['next_update']:%Y-%m-%d %H:%M:%S} UTC")
        return "\n".join(lines)


class Revoker:
    """revoke(serial_or_user, reason="unspecified")

    Revoke one certificate by serial (an int such as 0x3F2A..., or hex text as openssl prints it), or every
    valid certificate of a user (a name). It is journalled (fsynced) first, then a new CRL is published; the
    result (a Deferred) is shown when that is done. Use revoke(serial=...) or revoke(user=...) when a user
    name looks like a serial. Reasons, by name or RFC 5280 code: REASONS.
    """

    def __init__(self, journal, crl, clock):
        self._journal = journal
        self._crl = crl
        self._clock = clock

    def __call__(self, serial_or_user=None, reason="unspecified", *, serial=None, user=None):
        """A Deferred of the outcome; or, when there is nothing to do, a message saying why."""
        if serial_or_user is not None:
            if serial is not None or user is not None:
                raise TypeError("revoke: give one of serial_or_user, serial=, user=")
            try:
                serial, user = self._resolve(serial_or_user)
            except (ValueError, NothingToRevoke) as e:
                return Text(f"nothing revoked: {e}")
        elif serial is None and user is None:
            raise TypeError("revoke: give a serial or a user, e.g. revoke('3F2A...', 'keyCompromise')")
        if serial is not None:
            serial = parse_serial(serial)
        d = _revoke(self._journal, self._crl, int(self._clock.seconds()), serial=serial, user=user, reason=reason)
        d.addCallback(lambda result: Revoked(result[0], result[1]))
        d.addErrback(lambda f: Text(f"nothing revoked: {f.value}") if f.check(NothingToRevoke, ValueError) else f)
        done = []
        d.addBoth(lambda r: (done.append(r), r)[1])
        if done and isinstance(done[0], Text):
            return done[0]  # refused at once: say so plainly, not as a Deferred
        return d

    def _resolve(self, value):
        log = self._journal.log
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        value = str(value)
        is_user = bool(log.by_user(value))
        try:
            serial = parse_serial(value)
        except ValueError:
            serial = None
        is_serial = serial is not None and serial in log
        if is_user and is_serial:
            raise ValueError(f"{value!r} is both a user and a serial: say revoke(user=...) or revoke(serial=...)")
        if is_serial:
            return serial, None
        if is_user:
            return None, value
        raise ValueError(f"no user and no serial {value!r} in the issuance log")

    def __repr__(self):
        return "<revoke(serial_or_user, reason='unspecified'); help(revoke) lists the reasons>"


Revoker.__doc__ = Revoker.__doc__.replace("REASONS", ", ".join(f"{name} ({code})"
                                                                for code, name in CRL_REASONS.items()))


class CrlView:
    """The CRL being served (also at /crl, /crl.pem and by SCEP GetCRL).

    crl.info()      number, thisUpdate, nextUpdate, entries
    crl.publish()   sign and serve a new CRL now (a Deferred of its info)
    crl.pem         the current CRL in PEM
    """

    def __init__(self, publisher):
        self._publisher = publisher

    def info(self):
        return CrlInfo(self._publisher.info())

    def publish(self):
        return self._publisher.publish().addCallback(CrlInfo)

    @property
    def pem(self):
        pem = self._publisher.pem
        return Text(pem.decode("ascii")) if pem else Text("(no CRL yet)")

    def __repr__(self):
        return repr(self.info())


class CrlInfo(dict):
    def __repr__(self):
        if self.get("number") is None:
            return "<CRL: none published yet>"
        n = self["entries"]
        return (f"<CRL {self['number']}: {n} entr{'ies' if n != 1 else 'y'}, thisUpdate "
                f"{self['this_update']:%Y-%m-%d %H:%M:%S} UTC, nextUpdate {self['next_update']:%Y-%m-%d %H:%M:%S} UTC>")


class RadiusView:
    """The RADIUS client: per server its state (up, or dead and skipped for a while), requests in flight and
    queued, and counters (requests, retransmissions, accepts, rejects, challenges, timeouts, dropped replies,
    last round-trip time). radius.status() gives the raw numbers; radius.servers the per-server list.
    """

    def __init__(self, protocol=None, backend="local", users_file=""):
        self._protocol = protocol
        self._backend = backend
        self._users_file = users_file

    def status(self):
        if self._protocol is None:
            return {"servers": [], "unknown_source_dropped": 0}
        return self._protocol.status()

    @property
    def servers(self):
        return self.status()["servers"]

    def __repr__(self):
        if self._protocol is None:
            return (f"<no RADIUS: [auth] backend = {self._backend}, accounts in {self._users_file or '(none)'}; "
                    "manage them with getcertd-users>")
        status = self.status()
        head = ("server", "state", "in flight", "queued", "requests", "retrans", "accept", "reject", "challenge",
                "timeouts", "dropped", "last rtt")
        rows = []
        for s in status["servers"]:
            state = s["state"] if s["state"] == "up" else f"dead ({s['dead_for']:.0f} s more)"
            rtt = "-" if s["last_rtt"] is None else f"{s['last_rtt'] * 1000:.1f} ms"
            rows.append((s["server"], state, s["in_flight"], s["queued"], s["requests"], s["retransmissions"],
                         s["accepts"], s["rejects"], s["challenges"], s["timeouts"], s["dropped"], rtt))
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head] + rows]
        if status["unknown_source_dropped"]:
            lines.append(f"datagrams from unknown sources dropped: {status['unknown_source_dropped']}")
        return "\n".join(lines)


class ThrottleView:
    """User names and client addresses that must wait before their next login, after failed ones (HTTP 429),
    with the seconds left. throttled.clear(name) forgets the failures of a user name (in any spelling) or of
    an address: a user locked out by someone else's guesses can log in again at once."""

    def __init__(self, users, addresses, clock, key):
        self._users, self._addresses, self._clock, self._key = users, addresses, clock, key

    def waiting(self) -> dict:
        now = self._clock.seconds()
        return {"users": self._users.waiting(now), "addresses": self._addresses.waiting(now)}

    def clear(self, name: str) -> Text:
        cleared = [what for what, done in (("user name", self._users.clear(self._key(name))),
                                           ("address", self._addresses.clear(name))) if done]
        return Text(f"{name!r}: failures of the {' and '.join(cleared)} forgotten" if cleared
                    else f"{name!r}: no failed logins on record")

    def __repr__(self):
        waiting = self.waiting()
        lines = [f"{label} {key!r} must wait {seconds:.0f} s"
                 for kind, label in (("users", "user"), ("addresses", "address"))
                 for key, seconds in sorted(waiting[kind].items())]
        return "\n".join(lines) or "no user name or address must wait"


class StatsReport(dict):
    def __repr__(self):
        refused = ", ".join(f"{k} {v}" for k, v in sorted(self["refused"].items())) or "none"
        profiles = ", ".join(f"{k} {v}" for k, v in sorted(self["issued_by_profile"].items()))
        auth = "; ".join(f"{backend}: " + ", ".join(f"{k} {v}" for k, v in sorted(results.items()))
                         for backend, results in sorted(self["auth"].items())) or "none"
        lines = [
            f"uptime           {_duration(self['uptime'])}",
            f"issued           {self['issued']}" + (f" ({profiles})" if profiles else ""),
            f"refused          {refused}",
            f"authentications  {auth}",
            f"auth failures    {self['auth_failures']} (throttled: {self['throttled']})",
        ]
        if self["radius"]:
            lines.append(f"RADIUS timeouts  {self['radius_timeouts']}")
        if self["crl_number"] is not None:
            lines.append(f"CRL              number {int(self['crl_number'])}, entries {int(self['crl_entries'])}, "
                         f"age {_duration(self['crl_age'])}")
        if self["log_records"] is not None:
            lines.append(f"issuance log     {int(self['log_records'])} records")
        return "\n".join(lines)


class ConfigView:
    """The configuration in effect (read at start): config.crl_interval, config.radius.servers, ...
    The RADIUS secret is not shown."""

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._config, name)
        if name == "radius":
            return _RadiusConfigView(value)
        return value

    def __dir__(self):
        return [f for f in self._config.__dataclass_fields__ if f != "source"]

    def __repr__(self):
        lines = [f"# {self._config.source}"] if self._config.source else []
        for name in self.__dir__():
            value = getattr(self._config, name)
            if name == "radius":
                value = _RadiusConfigView(value)
            elif name == "profiles":
                value = {k: f"lifetime {_duration(p.lifetime)}, subject {p.subject}" for k, p in value.items()}
            lines.append(f"{name} = {value!r}")
        return "\n".join(lines)


class _RadiusConfigView:
    def __init__(self, radius):
        self._radius = radius

    def __getattr__(self, name):
        if name == "secret":
            return "(hidden)"
        return getattr(self._radius, name)

    def __repr__(self):
        fields = ", ".join(f"{f}={getattr(self._radius, f)!r}" for f in self._radius.__dataclass_fields__
                           if f != "secret")
        return f"RadiusConfig({fields}, secret=(hidden))"


class Help:
    """help: this overview; help(obj) describes one object."""

    def __init__(self, text):
        self._text = text

    def __call__(self, obj=None):
        if obj is None:
            return Text(self._text)
        doc = obj.__doc__ or ""
        first, _, rest = doc.partition("\n")
        return Text((first.strip() + "\n" + textwrap.dedent(rest)).strip() or "no documentation")

    def __repr__(self):
        return self._text


def _stats_function(stats):
    def stats_():
        """stats(): issued certificates (by profile), refusals by failInfo, authentication results by backend,
        auth failures, RADIUS timeouts, the CRL, uptime. The same numbers as /metrics; the result is a dict."""
        return StatsReport(stats.snapshot())
    stats_.__name__ = stats_.__qualname__ = "stats"
    return stats_


OVERVIEW = textwrap.dedent(__doc__.split("Objects::", 1)[1]).strip("\n")


def namespace(*, issuance_log, journal, crl, clock, stats, config, radius=None, enrollment=None) -> dict:
    """The manhole's globals. ``radius`` is the RadiusClientProtocol (None with the local backend);
    ``enrollment`` the EnrollmentService whose login throttles ``throttled`` shows."""
    extra = {} if enrollment is None else {"throttled": ThrottleView(
        enrollment.throttle, enrollment.address_throttle, clock, throttle_key)}
    return {**extra,
        "log": LogView(issuance_log, journal, clock),
        "revoke": Revoker(journal, crl, clock),
        "crl": CrlView(crl),
        "radius": RadiusView(radius, config.auth_backend, config.users_file),
        "stats": _stats_function(stats),
        "config": ConfigView(config),
        "help": Help("getcertd manhole: a Python prompt inside the running appliance (Ctrl-D leaves).\n\n"
                     + OVERVIEW),
    }
