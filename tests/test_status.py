"""
Tests for L{natkeep.status}.
"""

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from natkeep.config import Settings
from natkeep.sender import CycleReport
from natkeep.status import prometheus, statusResource
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
        self.assertEqual(data["counters"], {"requests.REGISTER": 7})

    def test_prometheus(self) -> None:
        """
        Counters become C{_total} counters with safe names; the last cycle
        gauges.
        """
        text = prometheus(self.service.snapshot())
        self.assertIn(
            "# TYPE natkeep_requests_REGISTER_total counter\nnatkeep_requests_REGISTER_total 7\n",
            text,
        )
        self.assertIn("natkeep_last_cycle_missed 2\n", text)
        self.assertIn("natkeep_last_cycle_duration_seconds 1.5\n", text)

    def test_resources(self) -> None:
        """
        C{/status} renders JSON and C{/metrics} text.
        """
        root = statusResource(self.service.snapshot)
        for path, kind in ((b"status", b"application/json"), (b"metrics", b"text/plain")):
            request = DummyRequest([path])
            body = root.getChildWithDefault(path, request).render_GET(request)
            self.assertTrue(
                request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(kind)
            )
            if path == b"status":
                self.assertEqual(json.loads(body)["counters"]["requests.REGISTER"], 7)
