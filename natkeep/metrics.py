"""
The gauges: natkeep's Prometheus metrics, through C{prometheus_client}.

natkeep's parts count into one plain counter table (C{stats}, keys such as
C{requests.REGISTER} or C{dropped.malformed}); this module turns it, at
each scrape, into metric families with HELP text and labels (method, code,
reason), every family present from start-up.  Beside them: gauges of the
binding table and the last cycle, a histogram of cycle durations, build
info, and the process and platform collectors of the library.
"""

from __future__ import annotations

import platform
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

#: Counters that are one series each: counter key, metric name (without
#: C{natkeep_} and C{_total}), HELP text.
PLAIN_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("datagrams", "datagrams_received", "UDP datagrams read from the listening sockets."),
    ("keepalives", "keepalives_received", "CRLF keep-alives (and empty datagrams) received."),
    ("stun", "stun_requests", "STUN Binding requests answered."),
    ("responses.received", "responses_received", "SIP responses received."),
    ("bindings.added", "bindings_added", "Bindings created by REGISTER."),
    ("bindings.refreshed", "bindings_refreshed", "Bindings refreshed by REGISTER."),
    ("bindings.removed", "bindings_removed", "Bindings removed by REGISTER (expires 0, *)."),
    (
        "bindings.replaced",
        "bindings_replaced",
        "Bindings replaced by a new Contact of an AOR at max_contacts.",
    ),
    ("admin.removed", "admin_removed", "Bindings removed through the admin API."),
    ("bindings.dead", "bindings_dead", "Bindings removed for unanswered heartbeats."),
    (
        "bindings.unreachable",
        "bindings_unreachable",
        "Bindings removed for ICMP errors their heartbeats drew.",
    ),
    ("heartbeats.sent", "heartbeats_sent", "Heartbeats sent."),
    ("heartbeats.errors", "heartbeats_errors", "Heartbeats the kernel refused to send."),
    ("heartbeats.missed", "heartbeats_missed", "Heartbeats due that a cycle did not reach."),
    ("heartbeats.answered", "heartbeats_answered", "Heartbeats a device answered."),
    (
        "heartbeats.unreachable",
        "heartbeats_unreachable",
        "Heartbeats that drew an ICMP error (port, host or network unreachable).",
    ),
    ("cycles", "cycles", "Heartbeat cycles begun."),
    ("icmp.errors", "icmp_errors", "ICMP errors read from the sockets' error queues."),
    (
        "icmp.unreachable",
        "icmp_unreachable",
        "ICMP errors saying a destination cannot be reached.",
    ),
    ("relay.requests", "relay_requests", "Requests relayed (to a device or the upstream)."),
    ("relay.responses", "relay_responses", "Responses relayed back along their Vias."),
    (
        "relay.refused",
        "relay_refused",
        "Requests refused (403) from sources that are no device, upstream or trusted network.",
    ),
    (
        "relay.responses.unknown",
        "relay_responses_unknown",
        "Responses with natkeep's relay Via that natkeep did not cause, dropped.",
    ),
    (
        "forward.sent",
        "register_forwarded",
        "REGISTERs sent on to the upstream (register_mode = forward).",
    ),
    (
        "forward.absorbed",
        "register_absorbed",
        "Refreshes natkeep answered without the upstream (register_mode = forward).",
    ),
    (
        "forward.timeouts",
        "upstream_timeouts",
        "REGISTERs the upstream did not answer in time (503, or the held binding's 200).",
    ),
    ("media.ng.commands", "media_ng_commands", "rtpengine ng commands answered."),
    ("media.ng.retries", "media_ng_retries", "rtpengine ng commands sent again after a timeout."),
    (
        "media.ng.failures",
        "media_ng_failures",
        "rtpengine ng commands that failed (no answer, or an error result).",
    ),
    (
        "media.refused",
        "media_refused",
        "Calls answered 503, or answers dropped, because rtpengine gave no SDP.",
    ),
    ("register.denied", "register_denied", "REGISTERs refused (403) by the allow/deny lists."),
    ("store.errors", "store_errors", "Failed commits of the binding store."),
    (
        "store.rewrites",
        "store_rewrites",
        "Times the database was found deleted or replaced and written anew from memory.",
    ),
    ("send.errors", "send_errors", "SIP responses the kernel refused to send."),
    ("internal.errors", "internal_errors", "Datagrams lost to an unexpected error."),
)

#: Counters with a label: key prefix, metric name, label, HELP text, label
#: values shown (at 0) from start-up.
LABELLED_COUNTERS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    (
        "requests.",
        "requests",
        "method",
        "SIP requests received, by method (other: any method not served).",
        ("REGISTER", "OPTIONS", "ACK", "other"),
    ),
    (
        "responses.sent.",
        "responses_sent",
        "code",
        "SIP responses sent, by status code.",
        ("200",),
    ),
    (
        "errors.",
        "request_faults",
        "code",
        "Requests refused for a fault in the message, by the status code answered.",
        ("400",),
    ),
    (
        "dropped.",
        "dropped",
        "reason",
        "Datagrams dropped without an answer, by reason.",
        ("malformed", "unanswerable", "ack", "stun-malformed", "rate-limited"),
    ),
    (
        "refused.",
        "refused",
        "cap",
        "New bindings refused by a cap: max-contacts (403), per-source (403), "
        "registrar-full (503).",
        ("max-contacts", "per-source", "registrar-full"),
    ),
    (
        "auth.",
        "auth",
        "result",
        "Digest authentication: challenges sent; ok; failures (wrong or unknown "
        "credentials); replays (a nonce-count used again); wrong-aor (another user's AOR).",
        ("challenges", "ok", "failures", "replays", "wrong-aor"),
    ),
)

#: Counter keys that are sums of a labelled family, not shown twice.
_SUMS = frozenset({"dropped"})

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")

#: Buckets of the cycle duration histogram, in seconds: a cycle lasts up to
#: one PERIOD (10 s to a day).
NG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 2, 3, float("inf"))

CYCLE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


class CounterCollector(Collector):
    """
    natkeep's counters and gauges, read from a snapshot at each scrape.

    @ivar snapshot: returns what C{/status} shows (C{bindings},
        C{nat_bindings}, C{settings}, C{last_cycle}, C{counters}).
    """

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        data = self.snapshot()
        counters: Mapping[str, int] = data.get("counters", {})
        yield from _counterFamilies(counters)
        yield from _gauges(data)


def _counterFamilies(counters: Mapping[str, int]) -> Iterable[Metric]:
    known = set(_SUMS)
    for key, name, help in PLAIN_COUNTERS:
        known.add(key)
        family = CounterMetricFamily(f"natkeep_{name}", help)
        family.add_metric([], counters.get(key, 0))
        yield family
    for prefix, name, label, help, initial in LABELLED_COUNTERS:
        values = {value: 0 for value in initial}
        for key, count in counters.items():
            if key.startswith(prefix):
                known.add(key)
                values[key[len(prefix) :]] = count
        family = CounterMetricFamily(f"natkeep_{name}", help, labels=[label])
        for value, count in sorted(values.items()):
            family.add_metric([value], count)
        yield family
    for key in sorted(set(counters) - known):
        # A counter this table does not know yet still shows.
        family = CounterMetricFamily("natkeep_" + _UNSAFE.sub("_", key), f"natkeep counter {key}.")
        family.add_metric([], counters[key])
        yield family


def _gauges(data: Mapping[str, Any]) -> Iterable[Metric]:
    yield GaugeMetricFamily("natkeep_bindings", "Bindings in the table.", data.get("bindings", 0))
    yield GaugeMetricFamily(
        "natkeep_nat_bindings", "Bindings behind NAT.", data.get("nat_bindings", 0)
    )
    media = data.get("media") or {}
    yield GaugeMetricFamily(
        "natkeep_media_sessions",
        "Calls whose media rtpengine relays (an offer made, no delete yet).",
        media.get("sessions", 0),
    )
    store = data.get("store") or {}
    yield GaugeMetricFamily(
        "natkeep_store_queue",
        "REGISTER answers waiting for a commit of the binding store.",
        store.get("queue", 0),
    )
    yield GaugeMetricFamily(
        "natkeep_store_lag_seconds",
        "How long the oldest answer waiting for a commit has waited.",
        store.get("lag_seconds", 0.0),
    )
    yield GaugeMetricFamily(
        "natkeep_store_failing",
        "1 while the last commit of the binding store failed, else 0.",
        1 if store.get("last_error") else 0,
    )
    settings = data.get("settings", {})
    yield GaugeMetricFamily(
        "natkeep_cycle_capacity",
        "Most devices one heartbeat cycle reaches (batches per period times SEND_ONE_TIME).",
        settings.get("capacity", 0),
    )
    cycle = data.get("last_cycle") or {}
    for key, help in (
        ("due", "Devices the last finished cycle meant to reach."),
        ("sent", "Heartbeats the last finished cycle sent."),
        ("missed", "Devices the last finished cycle did not reach."),
        ("errors", "Heartbeats of the last finished cycle the kernel refused."),
        ("skipped", "Bindings the last finished cycle found expired or gone."),
        ("removed", "Bindings the last finished cycle removed as dead."),
    ):
        yield GaugeMetricFamily(f"natkeep_last_cycle_{key}", help, cycle.get(key, 0))
    yield GaugeMetricFamily(
        "natkeep_last_cycle_duration_seconds",
        "Seconds from the start of the last finished cycle to its last batch.",
        cycle.get("duration_s") or 0,
    )


class BuildInfo(Collector):
    """
    C{natkeep_build_info}: the version of natkeep and of Python.
    """

    def __init__(self, version: str) -> None:
        self.version = version

    def collect(self) -> Iterator[Metric]:
        family = InfoMetricFamily("natkeep_build", "natkeep's version and Python's.")
        family.add_metric(
            [],
            {
                "version": self.version,
                "python": platform.python_version(),
                "implementation": platform.python_implementation(),
            },
        )
        yield family


#: The histograms: name, HELP text, buckets.
HISTOGRAMS: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    (
        "natkeep_cycle_duration_seconds",
        "Seconds each finished heartbeat cycle took, start to last batch.",
        CYCLE_BUCKETS,
    ),
    (
        "natkeep_media_ng_latency_seconds",
        "Seconds from an rtpengine ng command to its answer (with its retries).",
        NG_BUCKETS,
    ),
)


def histogramData(histogram: Histogram) -> dict[str, Any]:
    """
    What C{histogram} holds, as JSON: its cumulative bucket counts in
    bucket order, and the sum of what it observed.
    """
    buckets: list[float] = []
    total = 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                buckets.append(sample.value)
            elif sample.name.endswith("_sum"):
                total = sample.value
    return {"buckets": buckets, "sum": total}


def mergeHistograms(reports: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """
    The histograms of several processes (each a L{Metrics.histograms}) as
    one: bucket counts and sums added.  A report whose buckets do not match
    the known ones (another version mid-upgrade) is left out.
    """
    reports = list(reports)
    merged: dict[str, dict[str, Any]] = {}
    for name, _, bounds in HISTOGRAMS:
        buckets = [0.0] * len(bounds)
        total = 0.0
        for report in reports:
            data = report.get(name)
            if not isinstance(data, dict):
                continue
            counts = data.get("buckets")
            if not isinstance(counts, list) or len(counts) != len(bounds):
                continue
            buckets = [a + float(b) for a, b in zip(buckets, counts, strict=True)]
            total += float(data.get("sum") or 0.0)
        merged[name] = {"buckets": buckets, "sum": total}
    return merged


def _bound(bound: float) -> str:
    # A bucket's le label as prometheus_client writes it.
    return "+Inf" if bound == float("inf") else repr(float(bound))


class MergedHistograms(Collector):
    """
    The histograms of all the workers, summed by the parent: read at each
    scrape from C{snapshot()["histograms"]} (L{mergeHistograms}), and
    present, empty, before the first report.
    """

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        histograms = self.snapshot().get("histograms") or {}
        for name, help, bounds in HISTOGRAMS:
            data = histograms.get(name) or {}
            counts = data.get("buckets") or [0.0] * len(bounds)
            yield HistogramMetricFamily(
                name,
                help,
                buckets=[
                    (_bound(bound), count) for bound, count in zip(bounds, counts, strict=True)
                ],
                sum_value=data.get("sum", 0.0),
            )


class Metrics:
    """
    One registry for one natkeep: its counters, the cycle and ng latency
    histograms, build info and the process collector.

    @ivar registry: what C{/metrics} renders.
    @ivar cycleDuration: observed at the end of each heartbeat cycle.
    """

    def __init__(
        self, snapshot: Callable[[], Mapping[str, Any]], version: str, merged: bool = False
    ) -> None:
        """
        @param merged: for the parent of workers: the histograms are the
            workers', summed from C{snapshot()["histograms"]}, rather than
            observed here.
        """
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(CounterCollector(snapshot))
        self.registry.register(BuildInfo(version))
        ProcessCollector(registry=self.registry)
        registry = self.registry
        if merged:
            self.registry.register(MergedHistograms(snapshot))
            # Observed nowhere: kept off the registry.
            registry = CollectorRegistry()
        self._histograms = {
            name: Histogram(name, help, buckets=buckets, registry=registry)
            for name, help, buckets in HISTOGRAMS
        }
        self.cycleDuration = self._histograms["natkeep_cycle_duration_seconds"]
        self.ngLatency = self._histograms["natkeep_media_ng_latency_seconds"]

    def ngAnswered(self, latency: float) -> None:
        """
        An rtpengine ng command was answered after C{latency} seconds.
        """
        self.ngLatency.observe(latency)

    def cycleFinished(self, duration: float) -> None:
        """
        A heartbeat cycle finished in C{duration} seconds.
        """
        self.cycleDuration.observe(duration)

    def histograms(self) -> dict[str, dict[str, Any]]:
        """
        The histograms as JSON, for a worker's report to its parent.
        """
        return {name: histogramData(h) for name, h in self._histograms.items()}

    def render(self) -> bytes:
        """
        The registry in the Prometheus text format.
        """
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
