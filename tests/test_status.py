"""
Tests for L{natkeep.status}.
"""

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import NoResource, getChildForRequest
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from natkeep.config import Settings
from natkeep.metrics import Metrics
from natkeep.sender import CycleReport
from natkeep.status import GuardedFactory, statusResource
from natkeep.tap import Natkeep

from .helpers import ClockedUDPReactor


class StatusTests(SynchronousTestCase):
    """
    What the status endpoint shows.
    """

    def setUp(self) -> None:
        self.service = Natkeep(Settings(db=self.mktemp()), ClockedUDPReactor())
        self.addCleanup(self.service.store.close)
        self.service.stats["requests.REGISTER"] = 7
        self.service.sender.lastCycle = CycleReport(
            started=5.0, due=10, sent=8, missed=2, duration=1.5
        )

    def test_snapshot(self) -> None:
        """
        The snapshot carries counts, the last cycle and the counters.
        """
        data = self.service.snapshot()
        self.assertEqual((data["bindings"], data["nat_bindings"]), (0, 0))
        self.assertEqual(data["last_cycle"]["missed"], 2)
        self.assertEqual(
            data["counters"],
            {
                "requests.REGISTER": 7,
                # Shown from the start, so a scrape finds them at 0.
                "heartbeats.unreachable": 0,
                "bindings.unreachable": 0,
                "icmp.errors": 0,
            },
        )

    def test_prometheus(self) -> None:
        """
        Counters become C{_total} counters with HELP text, the method a
        label; the last cycle shows as gauges; every known counter is there
        at 0 from the start; the text parses with the library's parser.
        """
        from prometheus_client.parser import text_string_to_metric_families

        text = Metrics(self.service.snapshot, "9.9").render().decode("utf-8")
        self.assertIn("# HELP natkeep_requests_total SIP requests received", text)
        self.assertIn('natkeep_requests_total{method="REGISTER"} 7.0\n', text)
        self.assertIn('natkeep_requests_total{method="OPTIONS"} 0.0\n', text)
        self.assertIn("natkeep_heartbeats_unreachable_total 0.0\n", text)
        # The guard's counters, each with its own HELP, from the start.
        self.assertIn('natkeep_dropped_total{reason="rate-limited"} 0.0\n', text)
        self.assertIn('natkeep_refused_total{cap="registrar-full"} 0.0\n', text)
        self.assertIn('natkeep_auth_total{result="failures"} 0.0\n', text)
        self.assertIn("# HELP natkeep_auth_total Digest authentication", text)
        self.assertIn("natkeep_last_cycle_missed 2.0\n", text)
        self.assertIn("natkeep_last_cycle_duration_seconds 1.5\n", text)
        self.assertIn('natkeep_build_info{implementation="CPython"', text)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name, family in families.items():
            self.assertTrue(family.documentation, f"{name} has no HELP")
        self.assertEqual(families["natkeep_build_info"].samples[0].labels["version"], "9.9")
        self.assertIn("process_resident_memory_bytes", families)
        self.assertEqual(families["natkeep_cycle_duration_seconds"].type, "histogram")

    def test_unknownCounterShown(self) -> None:
        """
        A counter the metric table does not know yet is still exported,
        under a safe name; a labelled family takes any new label value.
        """
        self.service.stats["something.new-ish"] = 3
        self.service.stats["dropped.weird"] = 2
        text = Metrics(self.service.snapshot, "1").render().decode("utf-8")
        self.assertIn("natkeep_something_new_ish_total 3.0\n", text)
        self.assertIn('natkeep_dropped_total{reason="weird"} 2.0\n', text)

    def test_cycleHistogram(self) -> None:
        """
        Each finished cycle's duration lands in the histogram.
        """
        metrics = Metrics(self.service.snapshot, "1")
        metrics.cycleFinished(0.3)
        metrics.cycleFinished(7.0)
        text = metrics.render().decode("utf-8")
        self.assertIn('natkeep_cycle_duration_seconds_bucket{le="0.5"} 1.0\n', text)
        self.assertIn('natkeep_cycle_duration_seconds_bucket{le="10.0"} 2.0\n', text)
        self.assertIn("natkeep_cycle_duration_seconds_count 2.0\n", text)

    def test_resources(self) -> None:
        """
        C{/status} renders JSON and C{/metrics} text.
        """
        root = statusResource(self.service.snapshot, Metrics(self.service.snapshot, "1").render)
        for path, kind in ((b"status", b"application/json"), (b"metrics", b"text/plain")):
            request = DummyRequest([path])
            body = getChildForRequest(root, request).render_GET(request)
            self.assertTrue(
                request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(kind)
            )
            if path == b"status":
                self.assertEqual(json.loads(body)["counters"]["requests.REGISTER"], 7)


class NotFoundTests(SynchronousTestCase):
    """
    Only the documented paths are pages.
    """

    def test_unknownPaths(self) -> None:
        """
        C{/status/anything} and C{/metrics/x} are 404; C{/nothing} has no
        page.
        """
        root = statusResource(lambda: {}, lambda: b"")
        for path in ([b"status", b"anything"], [b"metrics", b"x"]):
            request = DummyRequest(path)
            page = getChildForRequest(root, request)
            self.assertEqual(page.render_GET(request), b"not found\n")
            self.assertEqual(request.responseCode, 404)
        request = DummyRequest([b"nothing"])
        self.assertIsInstance(getChildForRequest(root, request), NoResource)


class GuardTests(SynchronousTestCase):
    """
    The endpoint's connections are capped and each has a total deadline.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = GuardedFactory(
            Site(statusResource(lambda: {}), reactor=self.clock), self.clock, limit=3, deadline=10.0
        )

    def connect(self) -> tuple[object, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def test_cap(self) -> None:
        """
        Past the limit a connection gets no protocol (and is closed), and
        is counted; once one closes, the next is served.
        """
        first = [self.connect() for _ in range(3)]
        protocol, _ = self.connect()
        self.assertIsNone(protocol)
        self.assertEqual(self.factory.refused, 1)
        first[0][0].connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
        self.assertIsNotNone(self.connect()[0])

    def test_deadlineIgnoresTrickle(self) -> None:
        """
        A client sending one byte a second is cut when the deadline passes,
        however recently it sent.
        """
        protocol, transport = self.connect()
        for _ in range(9):
            protocol.dataReceived(b"G")  # type: ignore[attr-defined]
            self.clock.advance(1)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"E")  # type: ignore[attr-defined]
        self.clock.advance(1)
        self.assertTrue(transport.disconnected or transport.disconnecting)

    def test_closedCancelsDeadline(self) -> None:
        """
        A connection that ends first leaves no timer behind.
        """
        protocol, _ = self.connect()
        protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
        self.assertEqual(self.clock.getDelayedCalls(), [])
