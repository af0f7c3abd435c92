"""The appliance's counters (layer 2): what ``stats()`` shows in the manhole and ``/metrics`` exports.

One private prometheus_client ``CollectorRegistry`` per appliance (never the global one, so two appliances in a
test process don't share numbers): :meth:`Stats.snapshot` reads its numbers back from that registry, so the
manhole and Prometheus can't disagree. Counters that other parts keep anyway (RADIUS per-server counters from
``RadiusClientProtocol.status()``, the CRL publisher, the issuance log size) are read when collected, not copied.
Times come from the clock passed in.
"""
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.logger import Logger

log = Logger()

RADIUS_RTT_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # 0.02: p99 target
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Stats:
    """Counters and histograms of one appliance.

    :param clock: an IReactorTime (uptime, CRL age).
    :param backend: the authentication backend's name ("local" or "radius").
    Attach, when they exist: ``radius`` (a RadiusClientProtocol), ``crl`` (a CrlPublisher), ``log`` (the
    IssuanceLog).
    """

    def __init__(self, clock, backend: str = "local", radius=None, crl=None, log=None):
        self.clock = clock
        self.started = clock.seconds()
        self.backend = backend
        self.radius = radius
        self.crl = crl
        self.log = log
        self.registry = CollectorRegistry()
        r = self.registry
        self.enrollments = Counter("getcertd_enrollments", "Enrollment outcomes (SCEP and EST): issued by profile, "
                                   "refused by failInfo", ["result", "profile", "fail_info"], registry=r)
        self.authentications = Counter("getcertd_authentications", "Authentication results by backend "
                                       "(accept, reject, challenge, throttled)", ["backend", "result"], registry=r)
        self.radius_rtt = Histogram("getcertd_radius_rtt_seconds", "RADIUS round-trip time per server "
                                    "(first transmission to the verified reply)", ["server"],
                                    buckets=RADIUS_RTT_BUCKETS, registry=r)
        self.request_latency = Histogram("getcertd_http_request_duration_seconds", "HTTP request latency, from the "
                                         "whole request received to the answer written", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.journal_commits = Histogram("getcertd_journal_commit_seconds", "Journal group commits: the write and "
                                         "fsync of one batch of records (every answer in it waits for them)",
                                         buckets=COMMIT_BUCKETS, registry=r)
        self.http_responses = Counter("getcertd_http_responses", "HTTP answers by endpoint and status code",
                                      ["endpoint", "code"], registry=r)
        self.other = Counter("getcertd_events", "Other counted events", ["event"], registry=r)
        r.register(_Live(self))
        self._children = {}  # (metric, label values) -> its child: labels() takes a lock and checks each time

    def _child(self, metric, *labels):
        child = self._children.get((metric, labels))
        if child is None:  # the label values are this code's own words (profiles, failInfo, endpoints, codes)
            child = self._children[(metric, labels)] = metric.labels(*labels)
        return child

    # Counting (called by the enrollment service, the RADIUS client and the web sites)

    def count(self, *key):
        """Count one event: ("issued", profile), ("refused", failInfo name), ("auth", backend, result)."""
        kind = key[0] if key else ""
        if kind == "issued" and len(key) == 2:
            self._child(self.enrollments, "issued", key[1], "").inc()
        elif kind == "refused" and len(key) == 2:
            self._child(self.enrollments, "refused", "", key[1]).inc()
        elif kind == "auth" and len(key) == 3:
            self._child(self.authentications, key[1], key[2]).inc()
        else:
            self._child(self.other, ":".join(str(k) for k in key)).inc()

    def observe_radius_rtt(self, server: str, seconds: float):
        self._child(self.radius_rtt, server).observe(max(seconds, 0.0))

    def observe_journal_commit(self, seconds: float):
        self.journal_commits.observe(max(seconds, 0.0))

    def observe_request(self, endpoint: str, code: int, seconds: float):
        self._child(self.request_latency, endpoint).observe(max(seconds, 0.0))
        self._child(self.http_responses, endpoint, str(code)).inc()

    # Reading

    def uptime(self) -> float:
        return self.clock.seconds() - self.started

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of every number."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """The numbers of :meth:`metrics_text` as plain data (read back from the same registry)."""
        samples = {}
        for family in self.registry.collect():
            for s in family.samples:
                samples.setdefault(s.name, []).append((s.labels, s.value))

        def rows(name):
            return samples.get(name, [])

        issued, refused = {}, {}
        for labels, value in rows("getcertd_enrollments_total"):
            if labels["result"] == "issued":
                issued[labels["profile"]] = int(value)
            else:
                refused[labels["fail_info"]] = int(value)
        auth = {}
        for labels, value in rows("getcertd_authentications_total"):
            auth.setdefault(labels["backend"], {})[labels["result"]] = int(value)
        radius = {}
        for name, field in (("getcertd_radius_requests_total", "requests"),
                            ("getcertd_radius_timeouts_total", "timeouts"),
                            ("getcertd_radius_retransmissions_total", "retransmissions"),
                            ("getcertd_radius_in_flight", "in_flight"), ("getcertd_radius_up", "up")):
            for labels, value in rows(name):
                radius.setdefault(labels["server"], {})[field] = int(value)
        for labels, value in rows("getcertd_radius_replies_total"):
            radius.setdefault(labels["server"], {})[labels["code"]] = int(value)
        for labels, value in rows("getcertd_radius_rtt_seconds_count"):
            radius.setdefault(labels["server"], {})["rtt_count"] = int(value)
        for labels, value in rows("getcertd_radius_rtt_seconds_sum"):
            radius.setdefault(labels["server"], {})["rtt_sum"] = value
        latency = {}
        for labels, value in rows("getcertd_http_request_duration_seconds_count"):
            latency.setdefault(labels["endpoint"], {})["count"] = int(value)
        for labels, value in rows("getcertd_http_request_duration_seconds_sum"):
            latency.setdefault(labels["endpoint"], {})["sum"] = value
        single = {name: values[0][1] for name, values in samples.items() if len(values) == 1 and not values[0][0]}
        return {
            "uptime": single.get("getcertd_uptime_seconds", 0.0),
            "issued": sum(issued.values()),
            "issued_by_profile": issued,
            "refused": refused,
            "auth": auth,
            "auth_failures": sum(r.get("reject", 0) for r in auth.values()),
            "throttled": sum(r.get("throttled", 0) for r in auth.values()),
            "radius": radius,
            "radius_timeouts": sum(r.get("timeouts", 0) for r in radius.values()),
            "http": latency,
            "crl_number": single.get("getcertd_crl_number"),
            "crl_age": single.get("getcertd_crl_age_seconds"),
            "crl_entries": single.get("getcertd_crl_entries"),
            "log_records": single.get("getcertd_issuance_log_records"),
        }


class _Live:
    """Numbers read when collected: uptime, the CRL, the issuance log size, the RADIUS client's counters."""

    def __init__(self, stats: Stats):
        self.stats = stats

    def describe(self):
        return []  # collected live; nothing to check at registration

    def collect(self):
        s = self.stats
        now = s.clock.seconds()
        yield GaugeMetricFamily("getcertd_uptime_seconds", "Seconds since the appliance started", value=now - s.started)
        crl = s.crl
        if crl is not None and crl.this_update is not None:
            yield GaugeMetricFamily("getcertd_crl_number", "CRLNumber of the CRL being served", value=crl.number)
            yield GaugeMetricFamily("getcertd_crl_age_seconds", "Seconds since the served CRL's thisUpdate",
                                    value=now - crl.this_update.timestamp())
            yield GaugeMetricFamily("getcertd_crl_next_update_timestamp_seconds", "The served CRL's nextUpdate",
                                    value=crl.next_update.timestamp())
            yield GaugeMetricFamily("getcertd_crl_entries", "Entries on the served CRL", value=crl.entries)
        if s.log is not None:
            yield GaugeMetricFamily("getcertd_issuance_log_records", "Records in the in-memory issuance log",
                                    value=len(s.log))
        if s.radius is not None:
            yield from _radius_families(s.radius.status())


def _radius_families(status):
    counters = {
        "requests": CounterMetricFamily("getcertd_radius_requests", "Access-Requests sent per server (first "
                                        "transmissions)", labels=["server"]),
        "retransmissions": CounterMetricFamily("getcertd_radius_retransmissions", "Retransmissions per server",
                                               labels=["server"]),
        "timeouts": CounterMetricFamily("getcertd_radius_timeouts", "Requests a server never answered (after the "
                                        "retries; then failed over)", labels=["server"]),
        "dropped": CounterMetricFamily("getcertd_radius_dropped", "Replies dropped (bad authenticator, unknown "
                                       "identifier, ...)", labels=["server"]),
    }
    replies = CounterMetricFamily("getcertd_radius_replies", "Verified replies per server and code",
                                  labels=["server", "code"])
    in_flight = GaugeMetricFamily("getcertd_radius_in_flight", "Requests awaiting a reply", labels=["server"])
    up = GaugeMetricFamily("getcertd_radius_up", "1 if the server is up, 0 while it is skipped as dead",
                           labels=["server"])
    for server in status["servers"]:
        label = [server["server"]]
        for field, family in counters.items():
            family.add_metric(label, server[field])
        for code, field in (("accept", "accepts"), ("reject", "rejects"), ("challenge", "challenges")):
            replies.add_metric(label + [code], server[field])
        in_flight.add_metric(label, server["in_flight"])
        up.add_metric(label, 1 if server["state"] == "up" else 0)
    yield from counters.values()
    yield replies
    yield in_flight
    yield up
    yield CounterMetricFamily("getcertd_radius_unknown_source_dropped", "Datagrams from addresses that are not a "
                              "configured RADIUS server", value=status["unknown_source_dropped"])
