"""
Tests for L{natkeep.guard}: the per-source rate limit, the allow/deny
lists, the binding caps and the Server header, in-process and over real sockets.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from natkeep.config import ConfigError, Settings, buildSettings
from natkeep.counts import Counts
from natkeep.digest import credentialsLine
from natkeep.guard import SourceFilter, SourceLimiter
from natkeep.sip import Response
from natkeep.strategies import makeStrategies
from natkeep.testing import register

from .helpers import MemoryEdgeTestCase, freePort, startDevice
from .processes import NatkeepProcess
from .test_registrar import PHONE, RegistrarTestCase
from .test_udp import ServiceTestCase


class LimiterTests(SynchronousTestCase):
    """
    L{SourceLimiter}: a token bucket per source IP.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.stats: Counts = Counts()

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


class CapsTests(RegistrarTestCase):
    """
    The binding caps: per AOR (replace or refuse), per source IP, in all.
    """

    def assertAnswered(
        self, data: bytes, code: int, reason: str, source: tuple[str, int] = PHONE
    ) -> Response:
        response = self.send(data, source)
        assert response is not None
        self.assertEqual((response.code, response.reason), (code, reason))
        return response

    def fill(self, count: int, user: str = "1001", source: tuple[str, int] = PHONE) -> None:
        for n in range(count):
            # Each registered a second later, so that expiry orders them.
            self.clock.advance(1)
            self.assertAnswered(
                register(user, callId=f"c{n}", contacts=[f"<sip:{n}@10.0.0.9>"]),
                200,
                "OK",
                source,
            )

    def test_replaceNearestExpiry(self) -> None:
        """
        Past C{max_contacts}, a new Contact replaces the binding nearest to
        expiry; a refreshed one is kept, and the 200 OK lists the AOR's
        bindings as they now are.
        """
        self.registrar.caps.configure(3, True, 0, 0)
        self.fill(3)
        self.clock.advance(1)
        # Refreshing the first makes the second the nearest to expiry.
        self.assertAnswered(register(callId="c0", contacts=["<sip:0@10.0.0.9>"]), 200, "OK")
        response = self.assertAnswered(
            register(callId="new", contacts=["<sip:new@10.0.0.9>"]), 200, "OK"
        )
        self.assertEqual(
            sorted(self.contacts(response)),
            ["sip:0@10.0.0.9", "sip:2@10.0.0.9", "sip:new@10.0.0.9"],
        )
        self.assertEqual(self.stats["bindings.replaced"], 1)
        self.assertEqual(sorted(uri for _, uri in self.store.rows), sorted(self.contacts(response)))

    def test_refuse(self) -> None:
        """
        With replacing off, past C{max_contacts} is 403 and changes
        nothing; more new Contacts in one REGISTER than the cap is 403
        even when replacing.
        """
        self.registrar.caps.configure(2, False, 0, 0)
        self.fill(2)
        self.assertAnswered(
            register(callId="x", contacts=["<sip:x@10.0.0.9>"]), 403, "Too Many Contacts For AOR"
        )
        self.assertEqual(len(self.table), 2)
        self.assertEqual(self.stats["refused.max-contacts"], 1)
        self.registrar.caps.replace = True
        three = [f"<sip:n{n}@10.0.0.9>" for n in range(3)]
        self.assertAnswered(register(callId="x", contacts=three), 403, "Too Many Contacts For AOR")
        self.assertEqual({b.uri for b in self.table}, {"sip:0@10.0.0.9", "sip:1@10.0.0.9"})

    def test_perSource(self) -> None:
        """
        One source IP holds at most C{max_bindings_per_source} bindings,
        whatever its ports and AORs: past it 403.  Another source still
        registers; a source's own refreshes pass; removing one makes room;
        an exempt source is not counted.
        """
        self.registrar.caps.configure(16, True, 3, 0, ["198.51.100.0/24"])
        for n in range(3):
            self.fill(1, user=f"u{n}", source=("192.0.2.9", 5000 + n))
        refused = register("u9", contacts=["<sip:u9@10.0.0.9>"])
        self.assertAnswered(refused, 403, "Too Many Bindings From Source", ("192.0.2.9", 6000))
        self.assertEqual(self.stats["refused.per-source"], 1)
        self.fill(1, user="u9", source=("192.0.2.10", 5000))
        self.assertAnswered(
            register("u0", callId="c0", cseq=2, contacts=["<sip:0@10.0.0.9>"]),
            200,
            "OK",
            ("192.0.2.9", 5000),
        )
        # A binding moving to the full source is a new one for it.
        self.assertAnswered(
            register("u9", callId="c0", cseq=2, contacts=["<sip:0@10.0.0.9>"]),
            403,
            "Too Many Bindings From Source",
            ("192.0.2.9", 5009),
        )
        self.assertAnswered(
            register("u1", callId="c0", cseq=2, contacts=["<sip:0@10.0.0.9>;expires=0"]),
            200,
            "OK",
            ("192.0.2.9", 5001),
        )
        self.assertAnswered(refused, 200, "OK", ("192.0.2.9", 6000))
        self.assertEqual(self.table.countFrom("192.0.2.9"), 3)
        for n in range(5):
            self.fill(1, user=f"e{n}", source=("198.51.100.1", 5000))
        self.assertEqual(self.table.countFrom("198.51.100.1"), 5)

    def test_registrarFull(self) -> None:
        """
        Past C{max_bindings} a new binding is 503 with Retry-After, while
        the bindings already held still refresh; a replacement within a
        full AOR does not grow the table, so it passes.
        """
        self.registrar.caps.configure(2, True, 0, 3)
        self.fill(2, user="a")
        self.fill(1, user="b")
        response = self.assertAnswered(
            register("c", contacts=["<sip:c@10.0.0.9>"]), 503, "Registrar Full"
        )
        self.assertEqual(response.headers["retry-after"], ["60"])
        self.assertEqual(self.stats["refused.registrar-full"], 1)
        self.assertAnswered(
            register("b", callId="c0", cseq=2, contacts=["<sip:0@10.0.0.9>"]), 200, "OK"
        )
        self.assertAnswered(register("a", callId="z", contacts=["<sip:z@10.0.0.9>"]), 200, "OK")
        self.assertEqual(len(self.table), 3)

    def test_perSourceCountFollowsTable(self) -> None:
        """
        The per-source count follows every way a binding leaves or moves:
        removal, expiry and a refresh from elsewhere.
        """
        self.fill(2, source=("192.0.2.9", 5000))
        self.assertEqual(self.table.countFrom("192.0.2.9"), 2)
        self.assertAnswered(
            register(callId="c0", cseq=2, contacts=["<sip:0@10.0.0.9>"]),
            200,
            "OK",
            ("192.0.2.77", 5000),
        )
        self.assertEqual(
            (self.table.countFrom("192.0.2.9"), self.table.countFrom("192.0.2.77")), (1, 1)
        )
        self.table.sweep(self.clock.seconds() + 10_000)
        self.assertEqual(
            (self.table.countFrom("192.0.2.9"), self.table.countFrom("192.0.2.77")), (0, 0)
        )

    def test_config(self) -> None:
        """
        The caps come from settings; bad values name the key and range.
        """
        settings = buildSettings(
            {
                "max_contacts": "4",
                "contacts_full": "refuse",
                "max_bindings_per_source": "10",
                "max_bindings": "0",
            },
            {},
        )
        self.registrar.configure(settings, makeStrategies(settings))
        caps = self.registrar.caps
        self.assertEqual((caps.perAOR, caps.replace, caps.perSource, caps.total), (4, False, 10, 0))
        for key, value, allowed in (
            ("max_contacts", "17", "1..16"),
            ("contacts_full", "drop", "replace, refuse"),
            ("max_bindings", "-1", "0..100000000"),
        ):
            with self.assertRaises(ConfigError) as raised:
                buildSettings({key: value}, {})
            self.assertIn(key, str(raised.exception))
            self.assertIn(allowed, str(raised.exception))


def haveSipvicious() -> bool:
    return shutil.which("svwar") is not None and shutil.which("svcrack") is not None


class SipviciousTests(SynchronousTestCase):
    """
    Debian's sipvicious against a natkeep with C{auth = register} on
    loopback: the scanner finds no extension, and the cracker is cut by
    the rate limit, where the same run with the limit reloaded away (the
    control) cracks the same password.  (svcrack 0.3.3 ignores C{-b}, so
    the tools send from 127.0.0.1, which the limit here does not exempt.)
    """

    PASSWORD = "1190"

    def setUp(self) -> None:
        if not haveSipvicious():
            raise SkipTest("sipvicious is not installed (Debian's sipvicious; .ci/run installs it)")
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()
        users = self.cwd.child("users")
        # svcrack answers MD5 challenges only.
        users.setContent(credentialsLine("1050", "example.com", self.PASSWORD, "MD5").encode())
        self.config = self.cwd.child("natkeep.conf")
        self.limit("rate_limit = 20\nrate_burst = 40\n")
        self.port = freePort(host="127.0.0.42")
        # A free UDP port number is as good a guess for TCP as any.
        self.web = freePort(host="127.0.0.42")
        self.process = NatkeepProcess(
            [
                "--config",
                self.config.path,
                "--listen",
                f"127.0.0.42:{self.port}",
                "--status",
                f"127.0.0.42:{self.web}",
                "--db",
                ":memory:",
                "--auth",
                "register",
                "--credentials",
                users.path,
                "--realm",
                "example.com",
                "--auth-algorithms",
                "MD5",
            ],
            self.cwd.path,
        )
        self.addCleanup(self.process.stop)
        self.process.waitReady("127.0.0.42", self.port)

    def limit(self, lines: str) -> None:
        self.config.setContent(f"rate_exempt =\n{lines}".encode())

    def counters(self) -> dict[str, int]:
        url = f"http://127.0.0.42:{self.web}/status"
        with urllib.request.urlopen(url, timeout=5) as page:
            status = json.loads(page.read())
        counters: dict[str, int] = status["counters"]
        counters["bindings"] = status["bindings"]
        return counters

    def attack(self, tool: str, *args: str) -> str:
        result = subprocess.run(
            [tool, "-p", str(self.port), "--domain", "example.com", *args, "127.0.0.42"],
            capture_output=True,
            text=True,
            timeout=90,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd.path,
        )
        return result.stdout + result.stderr

    def test_svwarFindsNothing(self) -> None:
        """
        C{svwar --force} over a range holding the one real user reports no
        extension: every REGISTER, for a user or not, gets the same 401.
        """
        output = self.attack("svwar", "--force", "-e1000-1100", "--maximumtime", "5")
        self.assertIn("found nothing", output)
        self.assertNotIn("1050", output)
        counters = self.counters()
        self.assertEqual(counters["bindings"], 0)
        self.assertGreater(counters["responses.sent.401"], 0)
        self.assertEqual(counters.get("auth.ok", 0), 0)

    def test_svcrackCutByRateLimit(self) -> None:
        """
        C{svcrack} over 1000..1300 gets no more answers than the burst and
        20 a second allow, most of what it sends is dropped, and it gives up
        without the password (at 1190).  With the limit off (reloaded), the
        same run finds it: the limit is what stopped the first.
        """
        started = time.monotonic()
        output = self.attack("svcrack", "-u", "1050", "-r", "1000-1300", "--maximumtime", "3")
        elapsed = time.monotonic() - started
        self.assertIn("found nothing", output)
        self.assertNotIn(self.PASSWORD, output)
        counters = self.counters()
        answered = counters["responses.sent.401"]
        self.assertLessEqual(answered, 40 + 20 * elapsed + 5)
        self.assertGreater(counters["dropped.rate-limited"], answered)
        self.assertEqual((counters["bindings"], counters.get("auth.ok", 0)), (0, 0))
        self.limit("rate_limit = 0\n")
        self.process.process.send_signal(signal.SIGHUP)
        self.process.waitLog("Reloaded settings")
        control = self.attack("svcrack", "-u", "1050", "-r", "1000-1300", "--maximumtime", "3")
        self.assertRegex(control, r"\|\s*1050\s*\|\s*1190\s*\|")
        self.assertEqual(self.counters()["bindings"], 1)
