"""
Tests for L{natkeep.guard}: the per-source rate limit, the allow/deny
lists and the Server header, in-process and over real sockets.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natkeep.config import ConfigError, Settings, buildSettings
from natkeep.guard import SourceFilter, SourceLimiter
from natkeep.testing import register

from .helpers import MemoryEdgeTestCase, startDevice
from .test_udp import ServiceTestCase


class LimiterTests(SynchronousTestCase):
    """
    L{SourceLimiter}: a token bucket per source IP.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.stats: Counter[str] = Counter()

    def test_burstThenRate(self) -> None:
        """
        A source gets C{burst} datagrams at once, then C{rate} a second;
        another source has a bucket of its own.
        """
        limiter = SourceLimiter(self.clock, 10, 5, stats=self.stats)
        self.assertEqual([limiter.admit("192.0.2.1") for _ in range(7)], [True] * 5 + [False] * 2)
        self.assertTrue(limiter.admit("192.0.2.2"))
        # A little over a tenth of a second: one token (and a half).
        self.clock.advance(0.15)
        self.assertEqual([limiter.admit("192.0.2.1") for _ in range(2)], [True, False])
        self.clock.advance(10)
        self.assertEqual(sum(limiter.admit("192.0.2.1") for _ in range(10)), 5)
        self.assertEqual(self.stats["dropped.rate-limited"], 8)

    def test_exemptAndOff(self) -> None:
        """
        Exempt networks are never limited; rate 0 is off (the socket does
        not ask).
        """
        limiter = SourceLimiter(self.clock, 1, 1, exempt=("127.0.0.0/8", "::1"))
        self.assertTrue(all(limiter.admit("127.0.0.5") for _ in range(100)))
        self.assertTrue(all(limiter.admit("::1") for _ in range(100)))
        self.assertFalse(SourceLimiter(self.clock, 0, 1).enabled)

    def test_bounded(self) -> None:
        """
        The table holds at most C{capacity} sources; the least recently
        seen leaves first (and comes back with a full bucket).
        """
        limiter = SourceLimiter(self.clock, 1, 2, capacity=3)
        for n in range(1, 4):
            limiter.admit(f"192.0.2.{n}")
        limiter.admit("192.0.2.1")
        limiter.admit("192.0.2.4")
        self.assertEqual(list(limiter._buckets), ["192.0.2.3", "192.0.2.1", "192.0.2.4"])
        self.assertLessEqual(len(limiter._buckets), 3)

    def test_loggedOncePerMinute(self) -> None:
        """
        A limited source is logged once a minute, however much it sends.
        """
        events: list[dict[str, object]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        limiter = SourceLimiter(self.clock, 1, 1)
        for _ in range(100):
            limiter.admit("192.0.2.9")
        self.clock.advance(30)
        for _ in range(100):
            limiter.admit("192.0.2.9")
        self.clock.advance(31)
        for _ in range(100):
            limiter.admit("192.0.2.9")
        reports = [e for e in events if "Rate limit" in str(e.get("log_format", ""))]
        self.assertEqual(len(reports), 2)


class FilterTests(SynchronousTestCase):
    """
    L{SourceFilter}: who may register.
    """

    def test_allowDeny(self) -> None:
        sources = SourceFilter(allow=("192.0.2.0/24", "2001:db8::/32"), deny=("192.0.2.66",))
        self.assertTrue(sources.allowed("192.0.2.1"))
        self.assertFalse(sources.allowed("192.0.2.66"))
        self.assertFalse(sources.allowed("198.51.100.1"))
        self.assertTrue(sources.allowed("2001:db8::5"))
        self.assertTrue(sources.allowed("::ffff:192.0.2.7"))
        self.assertTrue(SourceFilter().allowed("203.0.113.1"))
        self.assertFalse(SourceFilter(deny=("0.0.0.0/0",)).allowed("203.0.113.1"))

    def test_config(self) -> None:
        """
        Bad networks and Server headers stop start-up naming the key.
        """
        for key, value in (
            ("allow", "192.0.2.0/33"),
            ("deny", "nowhere"),
            ("rate_exempt", "x"),
            ("server_header", "a\x1bb"),
            ("rate_limit", "-1"),
        ):
            error = self.assertRaises(ConfigError, buildSettings, {key: value}, {})
            self.assertIn(key, str(error))


class SocketGuardTests(MemoryEdgeTestCase, SynchronousTestCase):
    """
    The limit, the lists and the Server header on an in-memory socket.
    """

    def setUp(self) -> None:
        self.setUpEdge(100)
        self.protocol.limiter = SourceLimiter(self.clock, 5, 10, stats=self.stats)

    def test_floodDroppedUnanswered(self) -> None:
        """
        Past the burst, one source's datagrams are dropped without an
        answer and counted; another source is still answered.
        """
        for n in range(100):
            self.protocol.datagramReceived(register(user=f"9{n}", cseq=n + 1), ("192.0.2.1", 5060))
        self.assertEqual(len(self.wire.written), 10)
        self.assertEqual(self.stats["dropped.rate-limited"], 90)
        self.protocol.datagramReceived(register(user="7"), ("192.0.2.2", 5060))
        self.assertEqual(len(self.wire.written), 11)

    def test_denied(self) -> None:
        """
        A REGISTER from a denied network is 403 and stores nothing.
        """
        self.relay.configure(Settings(deny=("192.0.2.0/24",)))
        self.protocol.datagramReceived(register(), ("192.0.2.1", 5060))
        [(data, _)] = self.wire.written
        self.assertTrue(data.startswith(b"SIP/2.0 403 Source Not Allowed"), data[:50])
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.stats["register.denied"], 1)

    def test_serverHeader(self) -> None:
        """
        The Server header is C{server_header}; empty sends none.
        """
        self.outbox.configure(Settings(serverHeader="Acme SBC"))
        self.protocol.datagramReceived(register(), ("192.0.2.1", 5060))
        self.outbox.configure(Settings(serverHeader=""))
        self.protocol.datagramReceived(register(cseq=2), ("192.0.2.1", 5060))
        first, second = [data for data, _ in self.wire.written]
        self.assertIn(b"\r\nServer: Acme SBC\r\n", first)
        self.assertNotIn(b"Server:", second)


class FloodTests(ServiceTestCase):
    """
    A flood from one source over real sockets.
    """

    @defer.inlineCallbacks
    def test_floodOneSource(self):  # type: ignore[no-untyped-def]
        """
        3 000 REGISTERs from one source (no exemption) are mostly dropped
        and counted; a second source still registers, and a device
        registered before keeps its heartbeats on time.
        """
        service = self.startService(rateLimit=100, rateBurst=50, rateExempt=(), period=10)
        existing = startDevice(self, "127.0.0.31")
        existing.transport.write(register(user="8000"), self.server)  # type: ignore[union-attr]
        data, _ = yield existing.next()
        self.assertTrue(data.startswith(b"SIP/2.0 200 OK"))
        flood = startDevice(self, "127.0.0.32")
        for n in range(3000):
            flood.transport.write(register(user=f"f{n}"), self.server)  # type: ignore[union-attr]
        other = startDevice(self, "127.0.0.33")
        other.transport.write(register(user="8001"), self.server)  # type: ignore[union-attr]
        data, _ = yield other.next()
        self.assertTrue(data.startswith(b"SIP/2.0 200 OK"))
        # The clock did not move: the flood got its burst, no more.
        self.assertEqual(len(flood.received), 50)
        self.assertGreaterEqual(service.stats["dropped.rate-limited"], 2900)
        clock = self.reactor.clock
        clock.advance(10 - clock.seconds() % 10)
        data, _ = yield existing.next()
        self.assertEqual(data, b"HELLO")
