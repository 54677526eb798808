"""
Shared test helpers: real loopback devices, free ports, and a reactor that
does real UDP but takes its time from a L{Clock}.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock


def freePort(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """
    A UDP port free on C{host} right now.
    """
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ClockedUDPReactor:
    """
    Real UDP sockets from the global reactor, time from a L{Clock}: the
    service's datagrams cross the real loopback, its schedule is the test's.
    Calls for the end of the current turn (delay 0) go to the real reactor.
    """

    def __init__(self, clock: Optional[Clock] = None) -> None:
        self.clock = clock or Clock()

    def listenUDP(self, *args: Any, **kwargs: Any) -> Any:
        return reactor.listenUDP(*args, **kwargs)  # type: ignore[attr-defined]

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay: float, *args: Any, **kwargs: Any) -> Any:
        if delay == 0:
            # "At the end of this reactor turn" belongs to the reactor that
            # does the I/O.
            return reactor.callLater(0, *args, **kwargs)  # type: ignore[attr-defined]
        return self.clock.callLater(delay, *args, **kwargs)

    def getDelayedCalls(self) -> Any:
        return self.clock.getDelayedCalls()

    def __getattr__(self, name: str) -> Any:
        # The rest of the I/O reactor (addReader, removeReader, ...), for
        # the ports natkeep makes itself.
        return getattr(reactor, name)


class Device(DatagramProtocol):
    """
    A phone on a real loopback socket: sends what it is told, queues what
    arrives, and can wait for it.
    """

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self._waiting: list[defer.Deferred[tuple[bytes, tuple[str, int]]]] = []
        self.answer: Any = None

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.answer is not None:
            reply = self.answer(data)
            if reply:
                assert self.transport is not None
                self.transport.write(reply, addr)
        if self._waiting:
            self._waiting.pop(0).callback((data, addr[:2]))
        else:
            self.received.append((data, addr[:2]))

    def next(self, timeout: float = 5.0) -> defer.Deferred[tuple[bytes, tuple[str, int]]]:
        """
        The next datagram to arrive; fails after C{timeout} seconds.
        """
        if self.received:
            return defer.succeed(self.received.pop(0))
        d: defer.Deferred[tuple[bytes, tuple[str, int]]] = defer.Deferred()
        self._waiting.append(d)
        return d.addTimeout(timeout, reactor)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.getHost().port)


def startDevice(testCase: Any, host: str = "127.0.0.1") -> Device:
    """
    A L{Device} listening on C{host}, closed when the test ends.
    """
    device = Device()
    port = reactor.listenUDP(0, device, interface=host)  # type: ignore[attr-defined]
    testCase.addCleanup(port.stopListening)
    return device


class MemoryEdgeTestCase:
    """
    A mixin for L{twisted.trial.unittest.SynchronousTestCase}: natkeep's
    relay in front of its registrar on one in-memory socket, with a fake
    clock.  C{protocol} is the socket, C{wire.written} what it sent.
    """

    def setUpEdge(self, now: float = 1000) -> None:
        from natkeep.bindings import BindingTable
        from natkeep.counts import Counts
        from natkeep.outbox import Outbox
        from natkeep.plugins.natkeep_expiry import CapExpiry
        from natkeep.registrar import Registrar
        from natkeep.relay import Relay
        from natkeep.testing import fakeSocket

        self.clock = Clock()
        self.clock.advance(now)
        self.stats: Counts = Counts()
        self.table = BindingTable()
        self.outbox = Outbox(self.clock, None, self.stats)
        registrar = Registrar(self.table, self.clock, self.outbox, CapExpiry(3600, 300))
        self.relay = Relay(registrar, self.table, self.clock, self.outbox, [], self.stats)
        self.protocol, self.wire = fakeSocket(self.relay, self.outbox, self.clock, self.stats)
        self.relay.listeners = [self.protocol]
