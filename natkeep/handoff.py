"""
Handoff: with several workers, every message about a device is handled by
the device's worker (the one its source IP steers to, which holds its
bindings and sends its heartbeats).

The kernel steers what the device itself sends.  What others send about
it arrives at their own worker: a call from the softswitch to the device's
AOR, a request along a dialog's Record-Route toward the device, a response
to a request the device's worker relayed.  That worker passes the datagram
on, whole, over a Unix datagram socket, and the device's worker handles it
as if it had arrived there: from the same source, on the same listening
address (all workers send from the same address and port, so what it
sends on is indistinguishable on the wire).

Which worker: a flow token names the device's address; a relayed
request's Via carries the worker's index (C{nkw}); an AOR not in this
worker's table is looked up in the shared store.  A datagram is handed off
once at most: the worker it reaches handles it, whatever it finds.

The same socket carries one notice: a worker that adds a binding tells the
others, and one that held the same AOR and Contact (the device registered
from another address, now steered elsewhere) drops its copy, so that no
device is heartbeated by two workers.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from natkeep.counts import Counts
from natkeep.interfaces import IBindingReader
from natkeep.steering import workerOf

log = Logger(namespace="natkeep.handoff")

#: The most bytes one handoff carries (a datagram and its header).
MAX_HANDOFF = 70_000


def socketName(group: str, index: int) -> str:
    """
    The abstract Unix socket name of worker C{index} of the C{group} (the
    parent's process id).
    """
    return f"\0natkeep-{group}-{index}"


class StoreDirectory:
    """
    Where an AOR's devices are, read from the shared store: the source
    hosts of its live bindings, through a reader the store opens for it
    (L{IBindingReader}) at the first lookup and again after a failure.

    @ivar open: opens the store's reader (L{IBindingStore.reader}).
    """

    def __init__(self, open: Callable[[], IBindingReader]) -> None:
        self.open = open
        self._reader: Optional[IBindingReader] = None

    def hosts(self, aor: str, now: float) -> list[str]:
        """
        The source hosts of C{aor}'s bindings that have not expired; none
        when the store cannot be read (logged).
        """
        try:
            if self._reader is None:
                self._reader = self.open()
            return self._reader.hosts(aor, now)
        except Exception as e:
            log.warn("Looking up {aor} in the store failed: {error}", aor=aor, error=str(e))
            self.close()
            return []

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception:
                pass


class Handoff(DatagramProtocol):
    """
    This worker's end of the handoff: it sends datagrams on to the
    device's worker, and handles those handed to it.

    @ivar index: this worker's index; C{count} workers in all.
    @ivar active: whether a handed-off datagram is being handled now (it
        is not handed off again).
    @ivar deliver: handles a handed-off datagram: listener index, data,
        source.
    """

    def __init__(
        self,
        index: int,
        count: int,
        group: str,
        directory: Optional[StoreDirectory],
        clock: Any,
        stats: Counts,
    ) -> None:
        self.index = index
        self.count = count
        self.group = group
        self.directory = directory
        self.clock = clock
        self.stats = stats
        self.active = False
        self.deliver: Optional[Callable[[int, bytes, tuple[str, int]], None]] = None
        #: Drops this worker's copy of an AOR and Contact another took.
        self.forget: Optional[Callable[[str, str], None]] = None
        #: A Unix datagram port (its C{write} takes a socket name).
        self.unix: Any = None

    def workerOf(self, host: str) -> int:
        return workerOf(host, self.count)

    def holder(self, aor: str) -> Optional[int]:
        """
        The worker that holds C{aor}'s bindings by the store, when it is
        another one.
        """
        if self.directory is None:
            return None
        for host in self.directory.hosts(aor, self.clock.seconds()):
            index = workerOf(host, self.count)
            if index != self.index:
                return index
        return None

    def send(self, worker: int, listener: int, source: tuple[str, int], data: bytes) -> None:
        """
        Hand C{data}, which arrived from C{source} on listener number
        C{listener}, to C{worker}.
        """
        header = f"{listener} {source[0]} {source[1]}\n".encode()
        try:
            self.unix.write(header + data, socketName(self.group, worker))
            self.stats["workers.handoff.sent"] += 1
        except OSError as e:
            # The worker is restarting: the sender retransmits.
            self.stats["workers.handoff.failed"] += 1
            log.debug("Handoff to worker {worker} failed: {error}", worker=worker, error=str(e))

    def added(self, aor: str, uri: str) -> None:
        """
        Tell every other worker that this one now holds C{aor}'s binding
        of C{uri}.
        """
        notice = f"F\n{aor}\n{uri}".encode("utf-8", "surrogateescape")
        for worker in range(self.count):
            if worker == self.index:
                continue
            try:
                self.unix.write(notice, socketName(self.group, worker))
            except OSError:
                # Restarting: it restores from the store, which is current.
                self.stats["workers.handoff.failed"] += 1

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        header, sep, data = datagram.partition(b"\n")
        if header == b"F":
            aor, _, uri = data.decode("utf-8", "surrogateescape").partition("\n")
            if self.forget is not None:
                self.forget(aor, uri)
            return
        try:
            listener, host, port = header.decode().split(" ")
            source = (host, int(port))
            index = int(listener)
        except ValueError:
            self.stats["workers.handoff.malformed"] += 1
            return
        if self.deliver is None or not sep:
            return
        self.stats["workers.handoff.received"] += 1
        self.active = True
        try:
            self.deliver(index, data, source)
        finally:
            self.active = False


def listenHandoff(
    reactor: Any,
    index: int,
    count: int,
    group: str,
    directory: Optional[StoreDirectory],
    stats: Counts,
    deliver: Callable[[int, bytes, tuple[str, int]], None],
) -> Handoff:
    """
    Bind this worker's handoff socket and return its end.
    """
    handoff = Handoff(index, count, group, directory, reactor, stats)
    handoff.deliver = deliver
    handoff.unix = reactor.listenUNIXDatagram(
        socketName(group, index), handoff, maxPacketSize=MAX_HANDOFF
    )
    return handoff


def groupName() -> str:
    """
    The handoff group of this worker: its parent's process id.
    """
    return str(os.getppid())


__all__: Sequence[str] = ["Handoff", "StoreDirectory", "listenHandoff", "socketName"]
