"""
The socket: one listening UDP port of natkeep.

L{SIPProtocol} sorts what arrives (CRLF keep-alives, STUN, SIP), parses it,
checks what every request must carry, traces it, and hands a request to its
controller (the registrar) and a response to whoever waits for responses
(the heartbeat sender).  Faults the wire names are answered here; nothing a
datagram holds can raise out of it.  It also paces its reads and tunes its
socket, and offers the socket to bindings for heartbeats (L{IListener}).

L{ListeningPort} is the Twisted UDP port under it, which also reads the
ICMP errors the heartbeats draw (see L{natkeep.icmp}) and hands each to
the protocol instead of closing on them.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any, Callable, Final, Optional

from twisted.internet import udp
from twisted.internet.interfaces import IDelayedCall, ILoggingContext, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplements

from natkeep import icmp, stun
from natkeep.config import Settings, isWildcard
from natkeep.counts import Counts
from natkeep.guard import SourceLimiter
from natkeep.interfaces import IListener, ISIPController
from natkeep.outbox import Outbox
from natkeep.owner import bindAhead
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

log = Logger(namespace="natkeep.protocol")

#: One byte more than the largest message we parse: a longer datagram is
#: read truncated but still recognised as too large, and each read does not
#: have to allocate the 64 KiB a whole UDP datagram could need.
MAX_DATAGRAM: Final = MAX_MESSAGE_SIZE + 1

#: Socket buffers asked for; the kernel caps them at its rmem_max/wmem_max.
SOCKET_BUFFER: Final = 4 * 1024 * 1024

#: Linux's SO_SNDBUFFORCE and SO_RCVBUFFORCE, which Python's socket module
#: does not export; with CAP_NET_ADMIN they pass net.core.*mem_max.
SO_SNDBUFFORCE: Final = getattr(
    socket, "SO_SNDBUFFORCE", 32 if sys.platform.startswith("linux") else None
)
SO_RCVBUFFORCE: Final = getattr(
    socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None
)


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


#: What a non-blocking receive says when nothing is left to read.
_NOTHING_LEFT: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})

#: First bytes of a datagram, as numbers: white space may be a CRLF
#: keep-alive, a STUN message starts below "@", a response with "S".
_SPACE: Final = 0x20
_CR: Final = 0x0D
_LF: Final = 0x0A
_TAB: Final = 0x09
_AT: Final = 0x40
_S: Final = 0x53

#: Bytes of a turn's read budget one ICMP error counts for.
_ERROR_COST: Final = 64

#: Linux's options for the local address a datagram arrived on.
_IP_PKTINFO: Final = 8
_IPV6_RECVPKTINFO: Final = 49
_IPV6_PKTINFO: Final = 50
_PKTINFO_SPACE: Final = socket.CMSG_SPACE(20)


class ListeningPort(udp.Port):
    """
    A Twisted UDP port that asks for ICMP errors (C{IP_RECVERR}) and reads
    them from the socket's error queue, handing each to its protocol's
    C{icmpErrorReceived}.

    A plain L{udp.Port} with that option set would close itself on the
    first error: a receive reports a pending error in place of a datagram
    (raised unless it is C{ECONNREFUSED}), and a socket whose error queue
    holds something while no datagram waits polls as an error without
    input, which the reactor takes for the end of the connection.  Here a
    receive error means "drain the queue and read on", and that end of the
    connection drains the queue and reads on.

    @ivar reportsErrors: whether the kernel queues ICMP errors on this
        socket (Linux only).
    """

    reportsErrors = False
    _drainCall: Optional[IDelayedCall] = None

    #: Whether to learn the local address each datagram arrived on
    #: (C{IP_PKTINFO}); set before listening.  It costs about a microsecond
    #: a datagram, so only a wildcard socket that relays asks for it.
    recordLocal = False

    #: The local address the datagram being handled arrived on, when
    #: C{recordLocal} is on and the socket is bound to a wildcard.
    localAddress: Optional[str] = None

    _pktinfo = False

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = super().createInternetSocket()
        bindAhead(sock, self.interface)
        return sock

    def _bindSocket(self) -> None:
        super()._bindSocket()  # type: ignore[no-untyped-call]
        self.reportsErrors = icmp.enableErrors(self.socket)
        if self.recordLocal and isWildcard(self.interface):
            try:
                if self.addressFamily == socket.AF_INET6:
                    self.socket.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
                else:
                    self.socket.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
                self._pktinfo = True
            except OSError:
                self._pktinfo = False

    def _receive(self, sock: socket.socket, size: int) -> tuple[bytes, Any]:
        """
        One datagram, noting the local address it arrived on.
        """
        data, ancillary, _, addr = sock.recvmsg(size, _PKTINFO_SPACE)
        for level, kind, info in ancillary:
            if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(info) >= 12:
                self.localAddress = socket.inet_ntop(socket.AF_INET, info[8:12])
            elif level == socket.IPPROTO_IPV6 and kind == _IPV6_PKTINFO and len(info) >= 16:
                self.localAddress = socket.inet_ntop(socket.AF_INET6, info[:16])
        return data, addr

    def doRead(self) -> None:
        sock = self.socket
        size = self.maxPacketSize
        # Looked up once a turn, not once a datagram.
        received = self.protocol.datagramReceived
        receive = sock.recvfrom
        limit = self.maxThroughput
        six = self.addressFamily == socket.AF_INET6
        pktinfo = self._pktinfo
        read = 0
        while read < limit:
            try:
                if pktinfo:
                    data, addr = self._receive(sock, size)
                else:
                    data, addr = receive(size)
            except OSError as e:
                if e.errno in _NOTHING_LEFT:
                    return
                if self.reportsErrors and e.errno in icmp.ICMP_ERRNOS:
                    read += _ERROR_COST * (1 + self.drainErrors())
                    continue
                raise
            read += len(data)
            if six:
                # Twisted's (host, port), without flow and scope.
                addr = addr[:2]
            try:
                received(data, addr)
            except BaseException:
                log.failure("Unhandled error in datagramReceived")

    def readConnectionLost(self, reason: Failure) -> None:
        """
        The reactor saw an error on the socket and no input: queued ICMP
        errors.  Read them and go on reading, where a stock port would
        close.
        """
        if not (self.reportsErrors and self.connected):
            super().readConnectionLost(reason)
            return
        if (
            self.drainErrors() == 0
            and self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        ):
            # Not the error queue after all: stop a busy loop on a socket
            # that keeps polling as an error, but do not give up the port.
            log.warn(
                "UDP socket {address} reports an error without one",
                address=self.getHost(),  # type: ignore[no-untyped-call]
            )
            reactor: Any = self.reactor
            reactor.callLater(1, self._resumeReading)
            return
        self.startReading()  # type: ignore[no-untyped-call]

    def _resumeReading(self) -> None:
        if self.connected:
            self.startReading()  # type: ignore[no-untyped-call]

    def errorsPending(self) -> None:
        """
        A send on this socket reported a pending ICMP error: read the queue
        in the next reactor turn (not now, in the middle of the sender's
        loop).
        """
        if self._drainCall is None and self.reportsErrors:
            reactor: Any = self.reactor
            self._drainCall = reactor.callLater(0, self._drainSoon)

    def _drainSoon(self) -> None:
        self._drainCall = None
        if self.connected:
            self.drainErrors()

    def drainErrors(self) -> int:
        """
        Take the ICMP errors queued on the socket to the protocol.

        @return: how many were taken.
        """
        errors = icmp.drainErrors(self.socket)
        received = getattr(self.protocol, "icmpErrorReceived", None)
        if received is not None:
            for found in errors:
                try:
                    received(found)
                except Exception:
                    log.failure("Unhandled error in icmpErrorReceived")
        return len(errors)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        call, self._drainCall = self._drainCall, None
        if call is not None and call.active():
            call.cancel()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


#: What matches a response datagram unparsed (L{SIPProtocol.onResponseDatagram}).
DatagramMatcher = Callable[[bytes, tuple[str, int]], bool]


class FirstMatch:
    """
    Offers a response datagram to each of several matchers in turn, until
    one takes it: a socket's C{onResponseDatagram} where more than one
    party (the relay, the heartbeat sender) matches answers unparsed.
    """

    def __init__(self, *matchers: DatagramMatcher) -> None:
        self.matchers = matchers

    def __call__(self, data: bytes, source: tuple[str, int]) -> bool:
        return self.match(data, source)

    def match(self, data: bytes, source: tuple[str, int]) -> bool:
        """
        Offer C{data} from C{source} to each matcher in turn.

        @return: whether one took it.
        """
        for matcher in self.matchers:
            if matcher(data, source):
                return True
        return False


#: What sends one datagram from a socket: C{socket.sendto}'s signature.
SendTo = Callable[[bytes, tuple[str, int]], object]


def _retryingSend(
    send: Callable[[bytes, tuple[str, int]], int], transport: ListeningPort
) -> SendTo:
    """
    C{send}, tried once more when it reports an ICMP error that an earlier
    datagram drew (the kernel reports a pending error on the next send,
    whatever its destination), and the error queue read soon after.
    """

    def sendto(data: bytes, address: tuple[str, int]) -> int:
        try:
            return send(data, address)
        except OSError as e:
            if e.errno not in icmp.ICMP_ERRNOS:
                raise
            transport.errorsPending()
            return send(data, address)

    return sendto


#: Addresses a routing lookup is made toward to find the host's own address
#: for each family (documentation ranges: a UDP connect sends nothing).
_ROUTE_PROBES: Final[dict[int, tuple[str, int]]] = {
    socket.AF_INET: ("192.0.2.1", 9),
    socket.AF_INET6: ("2001:db8::1", 9),
}


def hostAddress(family: int) -> str:
    """
    The address the host sends from by default for C{family}: what a
    wildcard listener writes into messages when no C{advertise} is set.
    Loopback when there is no route at all.
    """
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(_ROUTE_PROBES[family])
            return str(probe.getsockname()[0])
    except OSError:
        return "::1" if family == socket.AF_INET6 else "127.0.0.1"


def sentByFor(address: str, advertise: Optional[str] = None) -> str:
    """
    What a listener bound to C{address} (C{host:port}, C{[v6]:port}) writes
    as its own address: C{advertise} when given, else C{address} unless its
    host is a wildcard, else the host's default address on that port.
    """
    if advertise:
        return advertise
    host, _, port = address.rpartition(":")
    if not isWildcard(host):
        return address
    if ":" in host:
        return f"[{hostAddress(socket.AF_INET6)}]:{port}"
    return f"{hostAddress(socket.AF_INET)}:{port}"


class SIPProtocol:
    """
    One listening UDP socket.

    It is a Twisted datagram protocol (what C{listenUDP} takes: it answers
    C{makeConnection}, C{doStop} and C{datagramReceived}) written without
    L{DatagramProtocol<twisted.internet.protocol.DatagramProtocol>} as its
    base, so that it compiles to a native class: every datagram passes
    through it, and a native class reaches its own attributes and methods
    without looking them up by name.

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
    @ivar sentBy: the address written into messages (L{IListener.sentBy}).
    @ivar controller: what requests go to.
    @ivar onResponse: what responses go to, with their source.
    @ivar onResponseDatagram: offered each datagram that starts like a
        response, unparsed; when it returns C{True} it has dealt with it
        (an answer to one of natkeep's own requests, matched cheaply).
    @ivar onUnreachable: told of each ICMP error saying a destination
        cannot be reached, with this socket and the destination.
    @ivar readPause: the shortest time between the starts of two reads, in
        seconds; 0 reads at once.
    @ivar sipTrace: whether every message in is logged.
    @ivar transport: the port, while connected.
    @ivar sendto: sends one datagram from this socket (L{IListener.sendto}):
        when the protocol starts, the fastest way its transport offers.
    """

    def __init__(
        self,
        address: str,
        controller: ISIPController,
        outbox: Outbox,
        clock: IReactorTime,
        stats: Counts,
        onResponse: Optional[Callable[[Response, tuple[str, int]], None]] = None,
        onResponseDatagram: Optional[DatagramMatcher] = None,
        readPause: float = 0.0,
        sipTrace: bool = False,
        onUnreachable: Optional[Callable[[IListener, tuple[str, int]], None]] = None,
        advertise: Optional[str] = None,
    ) -> None:
        self.address = address
        self.sentBy = sentByFor(address, advertise)
        self._wildcard = advertise is None and isWildcard(address.rpartition(":")[0])
        self.controller = controller
        self.outbox = outbox
        self.clock = clock
        self._icmpLogged: dict[tuple[str, int], float] = {}
        self.stats = stats
        self.onResponse = onResponse
        self.onResponseDatagram = onResponseDatagram
        self.readPause = readPause
        self.sipTrace = sipTrace
        self.onUnreachable = onUnreachable
        #: The per-source rate limit every datagram passes first, if any.
        self.limiter: Optional[SourceLimiter] = None
        self._turnBytes = 0
        self._turnStarted = 0.0
        self._turnCall: Optional[IDelayedCall] = None
        self._resumeCall: Optional[IDelayedCall] = None
        self.transport: Any = None
        self.sendto: SendTo = self._write

    def sentByNow(self) -> str:
        """
        What to write as this socket's address in a message made for the
        datagram being handled: on a wildcard socket without C{advertise},
        the local address that datagram arrived on, when the port learns it;
        else L{sentBy}.
        """
        if not self._wildcard:
            return self.sentBy
        local = getattr(self.transport, "localAddress", None)
        if local is None:
            return self.sentBy
        port = self.address.rpartition(":")[2]
        return f"[{local}]:{port}" if ":" in local else f"{local}:{port}"

    def configure(self, settings: Settings) -> None:
        """
        Take the read pause and SIP trace switch of C{settings}.
        """
        self.readPause = settings.readPause / 1000
        self.sipTrace = settings.sipTrace

    # The socket

    def makeConnection(self, transport: Any) -> None:
        """
        The port C{transport} opened: start.
        """
        assert self.transport is None, "one port per listening protocol"
        self.transport = transport
        self.startProtocol()

    def doStop(self) -> None:
        """
        The port closed: stop.
        """
        self.transport = None
        self.stopProtocol()

    def logPrefix(self) -> str:
        return "SIPProtocol"

    def connectionRefused(self) -> None:
        """
        Only a connected UDP port reports refusals; a listening one never
        is connected.
        """

    def startProtocol(self) -> None:
        # Heartbeats are the hot path: send on the socket itself, skipping
        # the per-call address validation of the Twisted transport, which
        # costs more than the send.  Fakes without a socket use write().
        transport = self.transport
        sock = getattr(transport, "socket", None)
        if sock is not None:
            tuneSocket(sock)
            if isinstance(transport, ListeningPort) and transport.reportsErrors:
                self.sendto = _retryingSend(sock.sendto, transport)
            else:
                self.sendto = sock.sendto
        else:
            self.sendto = self._write
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

    # Input

    def icmpErrorReceived(self, error: icmp.ICMPError) -> None:
        """
        The socket's error queue held C{error}: count it, and tell
        whoever watches for unreachable destinations.
        """
        self.stats["icmp.errors"] += 1
        if not error.unreachable:
            return
        self.stats["icmp.unreachable"] += 1
        # Logged once a minute per destination: an unreachable upstream
        # under load draws one ICMP error per datagram sent to it.
        now = self.clock.seconds()
        last = self._icmpLogged.get(error.destination)
        if last is None or now - last >= 60:
            if len(self._icmpLogged) >= 1024:
                self._icmpLogged.clear()
            self._icmpLogged[error.destination] = now
            log.debug(
                "ICMP error {errno} (type {type} code {code}) for {destination}; "
                "more for it counted, not logged, for a minute",
                errno=error.errno,
                type=error.type,
                code=error.code,
                destination=error.destination,
            )
        if self.onUnreachable is not None:
            self.onUnreachable(self, error.destination)

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
        limiter = self.limiter
        if limiter is not None and limiter.rate and not limiter.admit(source[0]):
            # Unanswered: an answer would reflect the flood.
            stats["dropped"] += 1
            return
        # A SIP message starts with a letter; only then is it worth asking
        # whether this is a keep-alive or STUN.  The first byte is read as
        # a number: a test of a one-byte slice costs more than the rest.
        first = data[0] if data else _SPACE
        if first in (_SPACE, _CR, _LF, _TAB) and not data.strip(b"\r\n\t "):
            # RFC 5626 CRLF keep-alive (or an empty datagram): nothing to say.
            stats["keepalives"] += 1
            return
        if first < _AT and stun.looksLikeSTUN(data):
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
        matcher = self.onResponseDatagram
        if first == _S and matcher is not None and data.startswith(b"SIP/2.0 "):
            # A FirstMatch is called natively; any other matcher generically.
            if (
                matcher.match(data, source)
                if isinstance(matcher, FirstMatch)
                else matcher(data, source)
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
        except Unanswerable as unanswerable:
            self._drop("unanswerable", source, str(unanswerable))

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


classImplements(SIPProtocol, IListener, ILoggingContext)
