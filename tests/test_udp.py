"""
The registrar and sender over real UDP sockets on loopback.
"""

from __future__ import annotations

from functools import partial

import attrs
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from natkeep.config import Settings
from natkeep.protocol import FirstMatch
from natkeep.sip import Response, parseMessage, parseVia
from natkeep.tap import Natkeep
from natkeep.testing import register

from .helpers import ClockedUDPReactor, Device, freePort, startDevice


class ServiceTestCase(TestCase):
    """
    The whole of natkeep (L{Natkeep}'s service tree) on real loopback
    sockets with a fake clock.
    """

    host = "127.0.0.1"

    def startService(self, **kw: object) -> Natkeep:
        port = freePort(host=self.host) if ":" not in self.host else freePort(10, self.host)
        address = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        self.server = (self.host, port)
        # Time is the test's clock, so a read pause would last until the
        # test advanced it; only the tests of that pause ask for one.
        kw.setdefault("readPause", 0)
        settings = Settings(listen=(address,), db=self.mktemp(), **kw)  # type: ignore[arg-type]
        self.reactor = ClockedUDPReactor()
        self.reactor.clock.advance(1_000_000)
        natkeep = Natkeep(settings, self.reactor)
        natkeep.service.startService()
        self.addCleanup(natkeep.service.stopService)
        return natkeep

    @defer.inlineCallbacks
    def registerDevice(self, device: Device, user: str, **kw: object):  # type: ignore[no-untyped-def]
        device.transport.write(register(user=user, **kw), self.server)  # type: ignore[union-attr,arg-type]
        data, source = yield device.next()
        self.assertEqual(source, self.server)
        response = parseMessage(data)
        assert isinstance(response, Response)
        return response


class RegistrarUDPTests(ServiceTestCase):
    """
    REGISTER over a real socket.
    """

    @defer.inlineCallbacks
    def test_registerAnswered(self):  # type: ignore[no-untyped-def]
        """
        A REGISTER over UDP is answered 200 OK from the listening socket,
        with rport filled with the real source port, and the NATed binding
        is recorded with its real source.
        """
        service = self.startService()
        device = startDevice(self)
        response = yield self.registerDevice(device, "2001")
        self.assertEqual(response.code, 200)
        self.assertEqual(parseVia(response.headers["via"][0]).param("rport"), str(device.port))
        [binding] = service.table.lookup("sip:2001@example.com")
        self.assertEqual(binding.source, (self.host, device.port))
        self.assertTrue(binding.nat)

    @defer.inlineCallbacks
    def test_oversizedDatagram(self):  # type: ignore[no-untyped-def]
        """
        A 60 KB datagram is read whole and dropped, and the registrar keeps
        answering.
        """
        service = self.startService()
        device = startDevice(self)
        device.transport.write(
            b"REGISTER sip:x SIP/2.0\r\nX: " + b"a" * 60000 + b"\r\n\r\n", self.server
        )
        response = yield self.registerDevice(device, "2002")
        self.assertEqual(response.code, 200)
        self.assertEqual(service.stats["dropped.malformed"], 1)


class ReadPauseTests(ServiceTestCase):
    """
    After a turn that empties the socket, reading waits C{read_pause}.
    """

    def reading(self, service: Natkeep) -> bool:
        [protocol] = service.protocols.values()
        port = protocol.transport
        return port in reactor.getReaders()  # type: ignore[attr-defined]

    def resumeCalls(self, service: Natkeep) -> list[object]:
        [protocol] = service.protocols.values()
        return [
            call
            for call in self.reactor.clock.getDelayedCalls()
            if call.active() and call.func == protocol._resume
        ]

    @defer.inlineCallbacks
    def test_pausedUntilDue(self):  # type: ignore[no-untyped-def]
        """
        A datagram arriving during the pause waits in the socket until the
        pause is over, then is answered.
        """
        service = self.startService(readPause=50)
        device = startDevice(self)
        response = yield self.registerDevice(device, "3001")
        self.assertEqual(response.code, 200)
        self.assertFalse(self.reading(service))
        device.transport.write(register(user="3002"), self.server)
        self.reactor.clock.advance(0.049)
        self.assertFalse(self.reading(service))
        self.reactor.clock.advance(0.001)
        self.assertTrue(self.reading(service))
        data, _ = yield device.next()
        self.assertIn(b"3002", data)

    @defer.inlineCallbacks
    def test_noPause(self):  # type: ignore[no-untyped-def]
        """
        With C{read_pause} 0 every datagram is read at once.
        """
        service = self.startService(readPause=0)
        device = startDevice(self)
        for user in ("3003", "3004", "3005"):
            response = yield self.registerDevice(device, user)
            self.assertEqual(response.code, 200)
        self.assertEqual(self.resumeCalls(service), [])
        self.assertTrue(self.reading(service))

    @defer.inlineCallbacks
    def test_backlogReadOnAtOnce(self):  # type: ignore[no-untyped-def]
        """
        A turn that stopped on the transport's read limit left datagrams
        waiting: no pause follows it.
        """
        service = self.startService(readPause=50)
        [protocol] = service.protocols.values()
        port = protocol.transport
        port.maxThroughput = 1
        device = startDevice(self)
        for user in ("3006", "3007"):
            response = yield self.registerDevice(device, user)
            self.assertEqual(response.code, 200)
        self.assertEqual(self.resumeCalls(service), [])
        self.assertTrue(self.reading(service))

    @defer.inlineCallbacks
    def test_stopCancelsPause(self):  # type: ignore[no-untyped-def]
        """
        Stopping the service cancels a pending resume, which would read from
        a closed socket.
        """
        service = self.startService(readPause=50)
        device = startDevice(self)
        yield self.registerDevice(device, "3008")
        self.assertEqual(len(self.resumeCalls(service)), 1)
        [protocol] = service.protocols.values()
        resume = protocol._resumeCall
        yield service.service.stopService()
        self.assertFalse(resume.active())


class IPv6Tests(ServiceTestCase):
    """
    The registrar on IPv6 loopback.
    """

    host = "::1"

    @defer.inlineCallbacks
    def test_registerIPv6(self):  # type: ignore[no-untyped-def]
        """
        A REGISTER over IPv6 is answered and remembered with its v6 source.
        """
        service = self.startService()
        device = startDevice(self, "::1")
        response = yield self.registerDevice(
            device, "6001", via="SIP/2.0/UDP [fd00::5]:5060;branch=z9hG4bK6;rport"
        )
        self.assertEqual(response.code, 200)
        [binding] = service.table.lookup("sip:6001@example.com")
        self.assertEqual(binding.source, ("::1", device.port))
        self.assertTrue(binding.nat)


def answerOptions(data: bytes) -> bytes | None:
    """
    What a live phone says to an OPTIONS: 200 OK with the dialog headers.
    """
    message = parseMessage(data)
    if getattr(message, "method", None) != "OPTIONS":
        return None
    lines = ["SIP/2.0 200 OK"]
    for name in ("via", "from", "to", "call-id", "cseq"):
        lines.extend(f"{name}: {value}" for value in message.headers[name])
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


class HeartbeatUDPTests(ServiceTestCase):
    """
    Heartbeats over real sockets, paced by the (fake) clock.
    """

    @defer.inlineCallbacks
    def test_paced(self):  # type: ignore[no-untyped-def]
        """
        Three NATed devices registered over UDP each receive the configured
        payload from the server's socket, one per send interval (ONE_TIME
        1), in registration order, and again the next period.
        """
        service = self.startService(
            message=b"KEEP\r\n", period=10, sendInterval=1000, sendOneTime=1
        )
        devices = [startDevice(self) for _ in range(3)]
        for n, device in enumerate(devices):
            yield self.registerDevice(device, f"50{n}")
        clock = self.reactor.clock
        clock.advance(10 - clock.seconds() % 10)  # the next period begins
        for cycle in range(2):
            for device in devices:
                data, source = yield device.next()
                self.assertEqual((data, source), (b"KEEP\r\n", self.server))
                for other in devices:
                    self.assertEqual(other.received, [])
                clock.advance(1)
            if cycle == 0:
                clock.advance(7)
        self.assertEqual(service.stats["heartbeats.sent"], 6)

    @defer.inlineCallbacks
    def test_optionsAnsweredStays(self):  # type: ignore[no-untyped-def]
        """
        With the C{options} payload and C{liveness}, a device that answers
        stays registered, and a silent one is removed after N unanswered
        heartbeats.
        """
        service = self.startService(
            payload="options",
            expiry="liveness",
            livenessMisses=2,
            period=10,
            sendInterval=1000,
        )
        talker, silent = startDevice(self), startDevice(self)
        talker.answer = answerOptions
        yield self.registerDevice(talker, "7001")
        yield self.registerDevice(silent, "7002")
        clock = self.reactor.clock
        for _ in range(3):
            clock.advance(10)
            data, _ = yield talker.next()
            self.assertTrue(data.startswith(b"OPTIONS sip:1001@192.168.1.20:5060 SIP/2.0"), data)
            if service.table.lookup("sip:7002@example.com"):
                data, _ = yield silent.next()
                self.assertTrue(data.startswith(b"OPTIONS "))
            # The answer crosses loopback; let the registrar read it.
            yield deferLater(0.05)
        self.assertEqual(service.table.lookup("sip:7002@example.com"), [])
        self.assertEqual(len(service.table.lookup("sip:7001@example.com")), 1)
        self.assertGreaterEqual(service.stats["heartbeats.answered"], 3)
        self.assertEqual(service.stats["bindings.dead"], 1)


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)


class ReloadTests(ServiceTestCase):
    """
    Re-reading the settings while running.
    """

    def test_answerMatchersFollowUpstream(self) -> None:
        """
        While natkeep relays (an upstream is set), its sockets offer each
        answer unparsed to the heartbeats' matcher and then to the relay's;
        while it does not, to the heartbeats' matcher alone.  A reload that
        sets or clears the upstream switches them.
        """
        service = self.startService()
        [protocol] = service.protocols.values()
        self.assertEqual(protocol.onResponseDatagram, service.sender.responseDatagram)
        for upstream in ("sip:127.0.0.1:5999", None):
            service.reloadSettings = partial(attrs.evolve, service.settings, upstream=upstream)
            self.assertTrue(service.reload())
            if upstream is None:
                self.assertEqual(protocol.onResponseDatagram, service.sender.responseDatagram)
            else:
                matcher = protocol.onResponseDatagram
                assert isinstance(matcher, FirstMatch)
                self.assertEqual(
                    matcher.matchers,
                    (service.sender.responseDatagram, service.relay.responseDatagram),
                )

    @defer.inlineCallbacks
    def test_reloadKeepsBindings(self):  # type: ignore[no-untyped-def]
        """
        A reload applies new keep-alive settings, strategies and read pause,
        keeps every binding, and the next heartbeat carries the new payload.
        """
        from natkeep.config import ConfigError, Settings

        service = self.startService(message=b"OLD", period=10)
        device = startDevice(self)
        yield self.registerDevice(device, "8001")
        offered: list[object] = [
            Settings(
                listen=service.settings.listen,
                db=service.settings.db,
                message=b"NEW",
                period=20,
                pacing="spread",
                readPause=7,
            ),
        ]

        def provide() -> Settings:
            value = offered.pop(0)
            if isinstance(value, Exception):
                raise value
            return value  # type: ignore[return-value]

        service.reloadSettings = provide
        self.assertTrue(service.reload())
        self.assertEqual((service.sender.period, service.sender.pacer.name), (20, "spread"))
        [protocol] = service.protocols.values()
        self.assertEqual(protocol.readPause, 0.007)
        self.assertEqual(len(service.table.lookup("sip:8001@example.com")), 1)
        data, _ = yield device.next()
        self.assertEqual(data, b"NEW")
        offered.append(ConfigError("SS_SIP_NAT_KEEP_ALIVE_PERIOD = '5' is invalid"))
        self.assertFalse(service.reload())
        self.assertEqual(service.settings.message, b"NEW")
