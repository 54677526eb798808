"""
The socket: one listening UDP port of natkeep.

L{SIPProtocol} sorts what arrives (CRLF keep-alives, STUN, SIP), parses it,
checks what every request must carry, traces it, and hands a request to its
controller (the registrar) and a response to whoever waits for responses
(the heartbeat sender).  Faults the wire names are answered here; nothing a
datagram holds can raise out of it.  It also paces its reads and tunes its
socket, and offers the socket to bindings for heartbeats (L{IListener}).
"""

from __future__ import annotations

import socket
import sys
from collections import Counter
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from natkeep import stun
from natkeep.config import Settings
from natkeep.interfaces import IListener, ISIPController
from natkeep.outbox import Outbox
from natkeep.sip import (
    MAX_MESSAGE_SIZE,
    Request,
    Response,
    SIPError,
    Unanswerable,
    checkRequest,
    parseMessage,
    topVia,
    traceText,
)

log = Logger()

#: One byte more than the largest message we parse: a longer datagram is
#: read truncated but still recognised as too large, and each read does not
#: have to allocate the 64 KiB a whole UDP datagram could need.
MAX_DATAGRAM = MAX_MESSAGE_SIZE + 1

#: Socket buffers asked for; the kernel caps them at its rmem_max/wmem_max.
SOCKET_BUFFER = 4 * 1024 * 1024

#: Linux's SO_SNDBUFFORCE and SO_RCVBUFFORCE, which Python's socket module
#: does not export; with CAP_NET_ADMIN they pass net.core.*mem_max.
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32 if sys.platform.startswith("linux") else None)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)


def tuneSocket(sock: socket.socket) -> None:
    """
    Ask for large socket buffers, so that REGISTER bursts and heartbeat
    batches are not dropped by the kernel.  With CAP_NET_ADMIN (root) the
    FORCE options pass net.core.rmem_max/wmem_max; otherwise those cap it.
    """
    for force, plain in (
        (SO_SNDBUFFORCE, socket.SO_SNDBUF),
        (SO_RCVBUFFORCE, socket.SO_RCVBUF),
    ):
        for option in (force, plain):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                break
            except OSError:
                continue


@implementer(IListener)
class SIPProtocol(DatagramProtocol):
    """
    One listening UDP socket.

    Reads are coalesced: a turn that emptied the socket is followed by a
    pause, so that a read starts at most every C{readPause} seconds and
    under load one wake-up takes a batch of datagrams instead of one each
    (a wake-up costs about as much as handling a REGISTER).  The pause is
    what is left of C{readPause} after the turn's own work, so a busy
    socket is never left waiting longer than that.  A turn that stopped on
    Twisted's per-turn read limit left datagrams waiting: reading goes on
    at once.  Pausing needs a transport that can stop reading (a Twisted
    UDP port); with C{readPause} 0 any transport will do.

    @ivar address: the listening address as configured.
    @ivar controller: what requests go to.
    @ivar onResponse: what responses go to, with their source.
    @ivar onResponseDatagram: offered each datagram that starts like a
        response, unparsed; when it returns C{True} it has dealt with it
        (an answer to one of natkeep's own requests, matched cheaply).
    @ivar readPause: the shortest time between the starts of two reads, in
        seconds; 0 reads at once.
    @ivar sipTrace: whether every message in is logged.
    """

    def __init__(
        self,
        address: str,
        controller: ISIPController,
        outbox: Outbox,
        clock: IReactorTime,
        stats: Counter[str],
        onResponse: Optional[Callable[[Response, tuple[str, int]], None]] = None,
        onResponseDatagram: Optional[Callable[[bytes, tuple[str, int]], bool]] = None,
        readPause: float = 0.0,
        sipTrace: bool = False,
    ) -> None:
        self.address = address
        self.controller = controller
        self.outbox = outbox
        self.clock = clock
        self.stats = stats
        self.onResponse = onResponse
        self.onResponseDatagram = onResponseDatagram
        self.readPause = readPause
        self.sipTrace = sipTrace
        self._turnBytes = 0
        self._turnStarted = 0.0
        self._turnCall: Optional[IDelayedCall] = None
        self._resumeCall: Optional[IDelayedCall] = None

    def configure(self, settings: Settings) -> None:
        """
        Take the read pause and SIP trace switch of C{settings}.
        """
        self.readPause = settings.readPause / 1000
        self.sipTrace = settings.sipTrace

    # The socket

    def startProtocol(self) -> None:
        # Heartbeats are the hot path: send on the socket itself, skipping
        # the per-call address validation of the Twisted transport, which
        # costs more than the send.  Fakes without a socket use write().
        sock = getattr(self.transport, "socket", None)
        if sock is not None:
            tuneSocket(sock)
            self.sendto = sock.sendto  # type: ignore[method-assign]
        else:
            self.sendto = self._write  # type: ignore[method-assign]
        log.info("Registrar listening on UDP {address}", address=self.address)

    def stopProtocol(self) -> None:
        for call in (self._turnCall, self._resumeCall):
            if call is not None and call.active():
                call.cancel()
        self._turnCall = self._resumeCall = None

    def _write(self, data: bytes, address: tuple[str, int]) -> object:
        assert self.transport is not None
        self.transport.write(data, address)
        return len(data)

    def sendto(self, data: bytes, address: tuple[str, int]) -> object:
        """
        Send one datagram from this socket (replaced when the protocol
        starts by the fastest way its transport offers).
        """
        return self._write(data, address)

    # Input

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._turnCall is None and self.readPause > 0:
            self._turnStarted = self.clock.seconds()
            self._turnCall = self.clock.callLater(0, self._turnEnded)
        self._turnBytes += len(data)
        # Twisted hands IPv6 sources as (host, port) already.
        try:
            self._sort(data, addr)
        except Exception:
            # A bug must cost one datagram, not the service.
            self.stats["internal.errors"] += 1
            log.failure("Unexpected error handling a datagram from {addr}", addr=addr)

    def _sort(self, data: bytes, source: tuple[str, int]) -> None:
        stats = self.stats
        stats["datagrams"] += 1
        # A SIP message starts with a letter; only then is it worth asking
        # whether this is a keep-alive or STUN.
        first = data[:1]
        if first in b"\r\n\t " and not data.strip(b"\r\n\t "):
            # RFC 5626 CRLF keep-alive (or an empty datagram): nothing to say.
            stats["keepalives"] += 1
            return
        if first < b"@" and stun.looksLikeSTUN(data):
            answer = stun.bindingResponse(data, source[0], source[1])
            if answer is None:
                self._drop("stun-malformed", source, "malformed STUN message")
            else:
                stats["stun"] += 1
                self.outbox.send(self, answer, source)
            return
        if self.sipTrace:
            log.info(
                "SIP in from {source}:\n{text}",
                source=source,
                text=traceText(data),
            )
        if (
            first == b"S"
            and self.onResponseDatagram is not None
            and data.startswith(b"SIP/2.0 ")
            and self.onResponseDatagram(data, source)
        ):
            stats["responses.received"] += 1
            return
        try:
            message = parseMessage(data)
        except SIPError as e:
            partial = e.partial
            if isinstance(partial, Request):
                self._answerError(partial, source, e)
            else:
                self._drop("malformed", source, e.reason)
            return
        if isinstance(message, Response):
            stats["responses.received"] += 1
            if self.onResponse is not None:
                self.onResponse(message, source)
            return
        try:
            via, cseq = checkRequest(message)
            self.controller.requestReceived(message, via, cseq, source, self)
        except SIPError as e:
            self._answerError(message, source, e)
        except Unanswerable as e:
            self._drop("unanswerable", source, str(e))

    def _drop(self, reason: str, source: tuple[str, int], detail: str) -> None:
        self.stats["dropped"] += 1
        self.stats[f"dropped.{reason}"] += 1
        log.debug("Dropped datagram from {source}: {detail}", source=source, detail=detail)

    def _answerError(self, request: Request, source: tuple[str, int], error: SIPError) -> None:
        if request.method == "ACK":
            # Nothing answers an ACK (RFC 3261 §17.2.1).
            self._drop("ack", source, error.reason)
            return
        try:
            via = topVia(request)
        except Unanswerable as e:
            self._drop("unanswerable", source, f"{error.reason}; {e}")
            return
        self.outbox.answer(request, via, source, self, error.status, error.reason, error.extra)
        self.stats[f"errors.{error.status}"] += 1
        log.debug(
            "Answered {status} {reason} to {source}",
            status=error.status,
            reason=error.reason,
            source=source,
        )

    # Read pacing

    def _turnEnded(self) -> None:
        self._turnCall = None
        turnBytes, self._turnBytes = self._turnBytes, 0
        transport: Any = self.transport
        if turnBytes >= transport.maxThroughput:
            # Stopped on the read limit: more is waiting.
            return
        pause = self.readPause - (self.clock.seconds() - self._turnStarted)
        if pause > 0 and self._resumeCall is None:
            transport.stopReading()
            self._resumeCall = self.clock.callLater(pause, self._resume)

    def _resume(self) -> None:
        # Stopping the protocol cancels this call, so the port is open.
        self._resumeCall = None
        transport: Any = self.transport
        transport.startReading()
