"""
ICMP errors on real loopback sockets: the kernel's error queue
(L{natkeep.icmp}), the port that reads it (L{natkeep.protocol.ListeningPort})
and the whole service removing a device whose port is closed.
"""

from __future__ import annotations

import errno
import socket
import struct

from twisted.internet import defer, reactor, udp
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from natkeep import icmp
from natkeep.testing import register

from .helpers import freePort, startDevice
from .test_udp import ServiceTestCase, deferLater

if not icmp.SUPPORTED:
    skip = "IP_RECVERR and the socket error queue are Linux's"


def closedPort(host: str = "127.0.0.1") -> tuple[str, int]:
    """
    An address on loopback where nothing listens: datagrams sent there draw
    ICMP port unreachable.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (host, freePort(family, host))


class ErrorQueueTests(SynchronousTestCase):
    """
    L{icmp.enableErrors} and L{icmp.drainErrors} on a real socket.
    """

    def socket(self, host: str = "127.0.0.1") -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind((host, 0))
        sock.setblocking(False)
        return sock

    def test_portUnreachable(self) -> None:
        """
        A datagram to a closed port on an IPv4 socket with errors enabled
        leaves one ICMP port-unreachable error on the queue, naming the
        destination; draining empties the queue.
        """
        sock = self.socket()
        self.assertTrue(icmp.enableErrors(sock))
        dead = closedPort()
        sock.sendto(b"HELLO", dead)
        [found] = icmp.drainErrors(sock)
        self.assertEqual(found.destination, dead)
        self.assertEqual(found.errno, errno.ECONNREFUSED)
        self.assertEqual((found.origin, found.type, found.code), (icmp.SO_EE_ORIGIN_ICMP, 3, 3))
        self.assertTrue(found.unreachable)
        self.assertEqual(icmp.drainErrors(sock), [])

    def test_portUnreachableIPv6(self) -> None:
        """
        The same on IPv6: ICMPv6 destination unreachable, port unreachable
        (type 1 code 4).
        """
        sock = self.socket("::1")
        self.assertTrue(icmp.enableErrors(sock))
        dead = closedPort("::1")
        sock.sendto(b"HELLO", dead)
        [found] = icmp.drainErrors(sock)
        self.assertEqual(found.destination, dead)
        self.assertEqual(found.errno, errno.ECONNREFUSED)
        self.assertEqual((found.origin, found.type, found.code), (icmp.SO_EE_ORIGIN_ICMP6, 1, 4))

    def test_withoutOptionNothing(self) -> None:
        """
        Without the option an unconnected socket hears of no error.
        """
        sock = self.socket()
        sock.sendto(b"HELLO", closedPort())
        self.assertEqual(icmp.drainErrors(sock), [])

    def test_pendingErrorFailsNextSend(self) -> None:
        """
        The hazard the port deals with: with the option set, the error a
        datagram drew makes the next send fail, whatever its destination.
        """
        sock = self.socket()
        icmp.enableErrors(sock)
        sock.sendto(b"HELLO", closedPort())
        live = self.socket()
        with self.assertRaises(ConnectionRefusedError):
            sock.sendto(b"HELLO", live.getsockname())
        sock.sendto(b"HELLO", live.getsockname())
        self.assertEqual(live.recv(100), b"HELLO")

    def test_drainBounded(self) -> None:
        """
        One drain takes at most C{limit} errors; the rest stay queued.
        """
        sock = self.socket()
        icmp.enableErrors(sock)
        dead = closedPort()
        for _ in range(5):
            try:
                sock.sendto(b"x", dead)
            except ConnectionRefusedError:
                sock.sendto(b"x", dead)
        self.assertEqual(len(icmp.drainErrors(sock, limit=2)), 2)
        self.assertEqual(len(icmp.drainErrors(sock)), 3)

    def test_parseExtendedError(self) -> None:
        """
        C{sock_extended_err} is errno, origin, type, code, pad, info, data;
        a short one is refused.
        """
        data = struct.pack("=IBBBBII", errno.EHOSTUNREACH, 2, 3, 1, 0, 0, 0)
        self.assertEqual(icmp.parseExtendedError(data), (errno.EHOSTUNREACH, 2, 3, 1))
        self.assertRaises(ValueError, icmp.parseExtendedError, data[:15])

    def test_localErrorNotUnreachable(self) -> None:
        """
        A local error (a datagram too large) is not taken as the
        destination being unreachable.
        """
        local = icmp.ICMPError(("127.0.0.1", 1), errno.EMSGSIZE, icmp.SO_EE_ORIGIN_LOCAL, 0, 0)
        self.assertFalse(local.unreachable)
        tooBig = icmp.ICMPError(("127.0.0.1", 1), errno.EMSGSIZE, icmp.SO_EE_ORIGIN_ICMP, 3, 4)
        self.assertFalse(tooBig.unreachable)


class Quiet(DatagramProtocol):
    pass


class StockPortTests(TestCase):
    """
    Why natkeep has its own port: a stock Twisted UDP port with
    C{IP_RECVERR} set closes itself on the first ICMP error.
    """

    @defer.inlineCallbacks
    def test_stockPortCloses(self):  # type: ignore[no-untyped-def]
        port = reactor.listenUDP(0, Quiet(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(lambda: port.connected and port.stopListening())
        icmp.enableErrors(port.socket)
        port.write(b"HELLO", closedPort())
        yield deferLater(0.2)
        self.assertFalse(port.connected)


class ListeningPortTests(ServiceTestCase):
    """
    natkeep's port under a flood of ICMP errors.
    """

    @defer.inlineCallbacks
    def test_manyErrorsStillAnswers(self):  # type: ignore[no-untyped-def]
        """
        5 000 datagrams to closed ports from the listening socket (as
        heartbeats to dead devices) draw ICMP errors that the service reads
        and counts; the port stays open and a REGISTER after them is
        answered, as is one sent while they arrive.
        """
        service = self.startService()
        [protocol] = service.protocols.values()
        logged: list[dict[str, object]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        port = protocol.transport
        self.assertIsInstance(port, udp.Port)
        self.assertTrue(port.reportsErrors)
        device = startDevice(self)
        dead = [closedPort() for _ in range(50)]
        for n in range(5000):
            protocol.sendto(b"HELLO", dead[n % len(dead)])
            if n == 2500:
                device.transport.write(register(user="9101"), self.server)
        yield deferLater(0.3)
        self.assertTrue(port.connected)
        self.assertIn(port, reactor.getReaders())  # type: ignore[attr-defined]
        self.assertGreater(service.stats["icmp.errors"], 1000)
        self.assertEqual(service.stats["icmp.errors"], service.stats["icmp.unreachable"])
        # Logged once per destination, not once per error.
        icmpLines = [e for e in logged if "ICMP error" in str(e.get("log_format", ""))]
        self.assertTrue(0 < len(icmpLines) <= len(dead), len(icmpLines))
        answers = [device.next(), device.next()]
        device.transport.write(register(user="9102", cseq=2), self.server)
        for answer in answers:
            data, _ = yield answer
            self.assertTrue(data.startswith(b"SIP/2.0 200 OK"), data[:40])
        self.assertEqual(len(service.table), 2)
        self.flushLoggedErrors()
        self.assertEqual(service.stats["internal.errors"], 0)


class PausedReadsTests(TestCase):
    """
    The same on the real reactor with the default read pause, where the
    port leaves the reactor between turns and errors queue up meanwhile.
    """

    @defer.inlineCallbacks
    def test_errorsDuringPauses(self):  # type: ignore[no-untyped-def]
        from natkeep.config import Settings
        from natkeep.tap import Natkeep

        port = freePort()
        service = Natkeep(Settings(listen=(f"127.0.0.1:{port}",), db=self.mktemp()), reactor)
        self.assertEqual(service.settings.readPause, 1)
        service.service.startService()
        self.addCleanup(service.service.stopService)
        [protocol] = service.protocols.values()
        device = startDevice(self)
        dead = [closedPort() for _ in range(20)]
        for round in range(20):
            for n in range(100):
                protocol.sendto(b"HELLO", dead[n % len(dead)])
            device.transport.write(register(user="9150", cseq=round + 1), ("127.0.0.1", port))
            data, _ = yield device.next()
            self.assertTrue(data.startswith(b"SIP/2.0 200 OK"), data[:40])
        yield deferLater(0.1)
        self.assertTrue(protocol.transport.connected)
        self.assertGreater(service.stats["icmp.errors"], 1000)


class DeadDeviceTests(ServiceTestCase):
    """
    The whole service: a device whose port closed is removed after
    C{unreachable_limit} heartbeats drew ICMP errors, and heartbeats to the
    devices after it in the same batch still leave.
    """

    @defer.inlineCallbacks
    def test_closedPortRemoved(self):  # type: ignore[no-untyped-def]
        service = self.startService(period=10, sendInterval=1000, message=b"HELLO")
        gone, live = startDevice(self), startDevice(self)
        # Registered first, so each batch sends to it just before the live
        # one: the live heartbeat meets the error the dead one drew.
        response = yield self.registerDevice(gone, "9201")
        self.assertEqual(response.code, 200)
        yield self.registerDevice(live, "9202")
        yield gone.transport.stopListening()
        clock = self.reactor.clock
        for cycle in range(1, 5):
            clock.advance(10 - clock.seconds() % 10)
            data, _ = yield live.next()
            self.assertEqual(data, b"HELLO")
            yield deferLater(0.05)
            expected = min(cycle, 3)
            self.assertEqual(service.stats["heartbeats.unreachable"], expected)
        self.assertEqual(service.table.lookup("sip:9201@example.com"), [])
        self.assertEqual(len(service.table.lookup("sip:9202@example.com")), 1)
        self.assertEqual(service.stats["bindings.unreachable"], 1)
        self.assertEqual(service.stats["heartbeats.errors"], 0)
        # The removal reached the store, so a restart does not bring it back.
        self.assertEqual(service.store.count(clock.seconds(), False), 1)

    @defer.inlineCallbacks
    def test_limitZeroKeeps(self):  # type: ignore[no-untyped-def]
        """
        With C{unreachable_limit = 0} the errors are counted and the
        binding stays until it expires.
        """
        service = self.startService(period=10, sendInterval=1000, unreachableLimit=0)
        gone = startDevice(self)
        yield self.registerDevice(gone, "9301")
        yield gone.transport.stopListening()
        clock = self.reactor.clock
        for _ in range(4):
            clock.advance(10 - clock.seconds() % 10)
            yield deferLater(0.05)
        self.assertEqual(service.stats["heartbeats.unreachable"], 4)
        self.assertEqual(len(service.table.lookup("sip:9301@example.com")), 1)
