"""
Every address natkeep writes into a message is routable: a wildcard socket
writes the local address a datagram arrived on (or the host's address), an
C{advertise} setting wins over both, and C{0.0.0.0} is never written.
"""

from __future__ import annotations

import socket

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from natkeep.config import ConfigError, Settings, buildSettings
from natkeep.protocol import hostAddress, sentByFor
from natkeep.relay import FlowTokens
from natkeep.sip import Request, parseMessage, parseVia, splitValues
from natkeep.tap import Natkeep
from natkeep.testing import register

from .helpers import ClockedUDPReactor, freePort, startDevice


def invite(user: str = "1001", route: str = "", toTag: str = "", method: str = "INVITE") -> bytes:
    lines = [
        f"{method} sip:{user}@example.com SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.3:5070;branch=z9hG4bK-a1",
        "From: <sip:far@127.0.0.3>;tag=f",
        f"To: <sip:{user}@example.com>{toTag}",
        "Call-ID: addr-1",
        f"CSeq: 1 {method}",
        "Max-Forwards: 70",
    ]
    if route:
        lines.append(f"Route: {route}")
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


class SentByTests(SynchronousTestCase):
    """
    L{sentByFor} and the C{listen ... advertise} setting.
    """

    def test_choices(self) -> None:
        """
        Advertise wins; a specific address is itself; a wildcard becomes
        the host's address for its family, never a wildcard.
        """
        self.assertEqual(sentByFor("0.0.0.0:5060", "203.0.113.5:5080"), "203.0.113.5:5080")
        self.assertEqual(sentByFor("10.1.2.3:5060"), "10.1.2.3:5060")
        self.assertEqual(sentByFor("0.0.0.0:5070"), f"{hostAddress(socket.AF_INET)}:5070")
        self.assertNotIn("0.0.0.0", sentByFor("0.0.0.0:5070"))
        self.assertEqual(sentByFor("[::]:5060"), f"[{hostAddress(socket.AF_INET6)}]:5060")

    def test_listenAdvertise(self) -> None:
        """
        C{listen = A advertise B, C} is read per address; a wildcard or a
        missing address after C{advertise} is named as an error.
        """
        settings = buildSettings(
            {"listen": "10.0.0.5:5060 advertise 203.0.113.5:5060, [::]:5060"}, {}
        )
        self.assertEqual(settings.listen, ("10.0.0.5:5060 advertise 203.0.113.5:5060", "[::]:5060"))
        for bad in ("10.0.0.5:5060 advertise", "10.0.0.5:5060 advertise 0.0.0.0:5060"):
            error = self.assertRaises(ConfigError, buildSettings, {"listen": bad}, {})
            self.assertIn("listen", str(error))

    def test_badUpstream(self) -> None:
        """
        A wrong C{upstream} stops start-up naming it.
        """
        for bad in ("http://x", "sip:user@10.0.0.1", "sip:[::1"):
            error = self.assertRaises(ConfigError, buildSettings, {"upstream": bad}, {})
            self.assertIn("upstream", str(error))
        error = self.assertRaises(ConfigError, buildSettings, {"trusted": "10.0.0.0/33"}, {})
        self.assertIn("trusted", str(error))
        error = self.assertRaises(ConfigError, buildSettings, {"domains": "a.example, b/c"}, {})
        self.assertIn("domains", str(error))

    def test_reloadApplies(self) -> None:
        """
        SIGHUP's reload gives the relay a new upstream, domains and trusted
        networks; an upstream that does not resolve is refused and the old
        one stays.
        """
        first = Settings(
            listen=(f"127.0.0.1:{freePort()}",), db=self.mktemp(), upstream="sip:10.0.0.9"
        )
        offered = [
            Settings(
                listen=first.listen,
                db=first.db,
                upstream="sip:10.0.0.10:5070",
                domains=frozenset({"a.example"}),
                trusted=("192.0.2.0/24",),
            ),
            Settings(listen=first.listen, db=first.db, upstream="sip:no-such-host.invalid"),
        ]
        service = Natkeep(first, ClockedUDPReactor(), reloadSettings=lambda: offered.pop(0))
        self.addCleanup(service.store.close)
        self.assertEqual(service.relay.upstream, ("10.0.0.9", 5060))
        self.assertTrue(service.reload())
        self.assertEqual(service.relay.upstream, ("10.0.0.10", 5070))
        self.assertEqual(service.relay.domains, frozenset({"a.example"}))
        self.assertEqual(len(service.relay.trusted), 1)
        self.assertFalse(service.reload())
        self.assertEqual(service.relay.upstream, ("10.0.0.10", 5070))


class WireAddressTests(TestCase):
    """
    The addresses in relayed requests and heartbeats, over real sockets.
    """

    def start(self, listen: str, **kw: object) -> tuple[Natkeep, tuple[str, int]]:
        settings = Settings(listen=(listen,), db=self.mktemp(), readPause=0, **kw)  # type: ignore[arg-type]
        self.reactor = ClockedUDPReactor()
        self.reactor.clock.advance(1_000_000)
        natkeep = Natkeep(settings, self.reactor)
        natkeep.service.startService()
        self.addCleanup(natkeep.service.stopService)
        port = int(listen.split()[0].rpartition(":")[2])
        return natkeep, ("127.0.0.1", port)

    @defer.inlineCallbacks
    def registerAndCall(self, server: tuple[str, int], route: str = "", toTag: str = ""):  # type: ignore[no-untyped-def]
        phone = startDevice(self)
        phone.transport.write(register(user="1001"), server)  # type: ignore[union-attr]
        data, _ = yield phone.next()
        self.assertTrue(data.startswith(b"SIP/2.0 200 OK"))
        upstream = startDevice(self, "127.0.0.3")
        upstream.transport.write(invite(route=route, toTag=toTag), server)  # type: ignore[union-attr]
        data, _ = yield phone.next()
        request = parseMessage(data)
        assert isinstance(request, Request)
        self.phone, self.upstream = phone, upstream
        return request

    @defer.inlineCallbacks
    def test_wildcardWritesArrivalAddress(self):  # type: ignore[no-untyped-def]
        """
        A relaying socket bound to 0.0.0.0 writes, in Via and
        Record-Route, the address the INVITE arrived on (127.0.0.1).
        """
        port = freePort()
        _, server = self.start(f"0.0.0.0:{port}", upstream="sip:127.0.0.3:5070")
        request = yield self.registerAndCall(server)
        ours = parseVia(splitValues(request.headers["via"])[0])
        self.assertEqual(ours.sentBy, f"127.0.0.1:{port}")
        self.assertTrue(request.headers["record-route"][0].endswith(f"@127.0.0.1:{port};lr>"))

    @defer.inlineCallbacks
    def test_advertise(self):  # type: ignore[no-untyped-def]
        """
        With C{advertise}, Via and Record-Route carry the advertised
        address, and a Route naming it is natkeep's own.
        """
        port = freePort()
        service, server = self.start(
            f"127.0.0.1:{port} advertise 203.0.113.5:5060", upstream="sip:127.0.0.3:5070"
        )
        request = yield self.registerAndCall(server)
        ours = parseVia(splitValues(request.headers["via"])[0])
        self.assertEqual(ours.sentBy, "203.0.113.5:5060")
        recorded = request.headers["record-route"][0]
        self.assertTrue(recorded.endswith("@203.0.113.5:5060;lr>"), recorded)
        token = recorded[len("<sip:") :].partition("@")[0]
        self.assertIsNotNone(service.relay.tokens.decode(token))
        self.assertIsInstance(service.relay.tokens, FlowTokens)
        self.upstream.transport.write(  # type: ignore[union-attr]
            invite(route=recorded, toTag=";tag=p", method="BYE"), server
        )
        data, _ = yield self.phone.next()
        bye = parseMessage(data)
        assert isinstance(bye, Request)
        self.assertEqual(bye.method, "BYE")
        self.assertNotIn("route", bye.headers)

    @defer.inlineCallbacks
    def test_optionsHeartbeatAddress(self):  # type: ignore[no-untyped-def]
        """
        OPTIONS heartbeats from a socket bound to 0.0.0.0 name a routable
        address in Via and From, the host's own.
        """
        port = freePort()
        service, server = self.start(f"0.0.0.0:{port}", payload="options", period=10)
        phone = startDevice(self)
        phone.transport.write(register(user="1001"), server)  # type: ignore[union-attr]
        yield phone.next()
        self.reactor.clock.advance(10)
        data, _ = yield phone.next()
        self.assertTrue(data.startswith(b"OPTIONS "), data[:40])
        self.assertNotIn(b"0.0.0.0", data)
        host = hostAddress(socket.AF_INET)
        self.assertIn(f"Via: SIP/2.0/UDP {host}:{port};".encode(), data)
        self.assertIn(f"From: <sip:natkeep@{host}>".encode(), data)
