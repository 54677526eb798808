"""
The registrar and sender over real UDP sockets on loopback.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from natkeep.config import Settings
from natkeep.service import NatkeepService
from natkeep.sip import Response, parseMessage, parseVia
from natkeep.testing import register

from .helpers import ClockedUDPReactor, Device, freePort, startDevice


class ServiceTestCase(TestCase):
    """
    A whole L{NatkeepService} on real loopback sockets with a fake clock.
    """

    host = "127.0.0.1"

    def startService(self, **kw: object) -> NatkeepService:
        port = freePort(host=self.host) if ":" not in self.host else freePort(10, self.host)
        address = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        self.server = (self.host, port)
        settings = Settings(listen=(address,), db=self.mktemp(), **kw)  # type: ignore[arg-type]
        self.reactor = ClockedUDPReactor()
        self.reactor.clock.advance(1_000_000)
        service = NatkeepService(settings, self.reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

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
