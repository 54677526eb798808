"""
The registrar: what natkeep does with each datagram that arrives.

L{Registrar} holds the logic of RFC 3261 §10.3 (REGISTER), RFC 3581
(C{received}/C{rport}) and NAT detection; it is independent of sockets and
of the global reactor.  L{RegistrarProtocol} is one listening UDP socket: it
hands datagrams to the registrar, and offers the socket to bindings for
heartbeats (L{IListener}).
"""

from __future__ import annotations

import email.utils
import math
import zlib
from collections import Counter
from typing import Any, Iterable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from natkeep import __version__, stun
from natkeep.bindings import Binding, BindingTable
from natkeep.config import NAT_TESTS
from natkeep.interfaces import IBindingStore, IExpiryPolicy, IListener, IPayload
from natkeep.sip import (
    Request,
    Response,
    SIPError,
    Via,
    isPrivateAddress,
    parseCSeq,
    parseDeltaSeconds,
    parseMessage,
    parseNameAddr,
    parseURI,
    parseVia,
    renderParams,
    splitCommas,
    splitValues,
)

log = Logger()

ALLOW = "REGISTER, OPTIONS"

#: RFC 3261 §10.2.1.1: the registrar's default when the request says nothing.
DEFAULT_EXPIRES = 3600

SERVER = f"natkeep/{__version__}"

#: Headers a response copies from its request, in order.
_COPIED = (("from", "From"), ("to", "To"), ("call-id", "Call-ID"), ("cseq", "CSeq"))

_SENT_KEYS: dict[int, str] = {}

#: How every response ends: natkeep's responses carry no body.
_TRAILER = f"Server: {SERVER}\r\nContent-Length: 0\r\n\r\n"


#: Via parameters a response fills in (RFC 3581 §4).
_FILLED = ("rport", "received")
_RECEIVED = ("received",)


def _tagged(to: str, callId: Optional[str], cseq: Optional[str]) -> str:
    """
    The To value of a response: the request's, with a tag added when it
    has none.
    """
    # Header parameters follow the closing bracket (or the whole value
    # in the addr-spec form, whose URI cannot hold ';').
    params = to[to.rfind(">") + 1 :]
    if "=" in params and ";tag=" in params.lower().replace(" ", ""):
        return to
    # Deterministic, so a retransmission gets the same tag.
    return f"{to};tag={zlib.crc32(f'{callId}|{cseq}'.encode()):08x}"


def _copiedHeaders(fields: dict[str, list[str]]) -> str:
    """
    From, To, Call-ID and CSeq as a response copies them, leaving out any
    the request lacks.
    """
    callId = fields["call-id"][0] if "call-id" in fields else None
    cseq = fields["cseq"][0] if "cseq" in fields else None
    lines = []
    for name, title in _COPIED:
        values = fields.get(name)
        if values:
            value = values[0]
            if name == "to":
                value = _tagged(value, callId, cseq)
            lines.append(f"{title}: {value}\r\n")
    return "".join(lines)


class _Unanswerable(Exception):
    """
    A request so broken that no response can be addressed: dropped.
    """


class Registrar:
    """
    The registrar's logic, shared by every listening socket.

    @ivar stats: counters by name, for logs and the status endpoint.
    @ivar payload: the active payload strategy, which gets any SIP response
        that arrives (answers to C{options} heartbeats).
    """

    def __init__(
        self,
        table: BindingTable,
        clock: IReactorTime,
        expiry: IExpiryPolicy,
        *,
        minExpires: int = 60,
        natTests: Iterable[str] = NAT_TESTS,
        store: Optional[IBindingStore] = None,
        payload: Optional[IPayload] = None,
        sipTrace: bool = False,
        stats: Optional[Counter[str]] = None,
    ) -> None:
        self.table = table
        self.clock = clock
        self.expiry = expiry
        self.minExpires = minExpires
        self.natTests = frozenset(natTests)
        self.store = store
        self.payload = payload
        self.sipTrace = sipTrace
        self.stats: Counter[str] = Counter() if stats is None else stats
        self._held: list[tuple[IListener, bytes, tuple[str, int]]] = []
        self._flushCall: Optional[object] = None
        self._dateSecond = -1
        self._date = ""

    # Input

    def datagramReceived(self, data: bytes, source: tuple[str, int], listener: IListener) -> None:
        """
        Handle one datagram from C{source} that arrived on C{listener}.
        Never raises for anything a datagram can hold.
        """
        self.stats["datagrams"] += 1
        # A SIP message starts with a letter; only then is it worth asking
        # whether this is a keep-alive or STUN.
        first = data[:1]
        if first in b"\r\n\t " and not data.strip(b"\r\n\t "):
            # RFC 5626 CRLF keep-alive (or an empty datagram): nothing to say.
            self.stats["keepalives"] += 1
            return
        if first < b"@" and stun.looksLikeSTUN(data):
            answer = stun.bindingResponse(data, source[0], source[1])
            if answer is None:
                self._drop("stun-malformed", source, "malformed STUN message")
            else:
                self.stats["stun"] += 1
                self._send(listener, answer, source)
            return
        if self.sipTrace:
            log.info(
                "SIP in from {source}:\n{text}",
                source=source,
                text=data.decode("utf-8", "replace"),
            )
        try:
            message = parseMessage(data)
        except SIPError as e:
            partial = e.partial
            if isinstance(partial, Request):
                self._answerError(partial, source, listener, e)
            else:
                self._drop("malformed", source, e.reason)
            return
        if isinstance(message, Response):
            self._responseReceived(message, source)
            return
        try:
            self._handleRequest(message, source, listener)
        except SIPError as e:
            self._answerError(message, source, listener, e)
        except _Unanswerable as e:
            self._drop("unanswerable", source, str(e))

    def _drop(self, reason: str, source: tuple[str, int], detail: str) -> None:
        self.stats["dropped"] += 1
        self.stats[f"dropped.{reason}"] += 1
        log.debug("Dropped datagram from {source}: {detail}", source=source, detail=detail)

    def _responseReceived(self, response: Response, source: tuple[str, int]) -> None:
        self.stats["responses.received"] += 1
        if self.payload is None:
            return
        binding = self.payload.responseReceived(response, source)
        if binding is not None:
            self.stats["heartbeats.answered"] += 1
            self.expiry.heartbeatAnswered(binding)

    def _answerError(
        self,
        request: Request,
        source: tuple[str, int],
        listener: IListener,
        error: SIPError,
    ) -> None:
        if request.method == "ACK":
            self._drop("ack", source, error.reason)
            return
        try:
            via = self._topVia(request)
            self._respond(request, via, source, listener, error.status, error.reason)
        except (SIPError, _Unanswerable) as e:
            self._drop("unanswerable", source, f"{error.reason}; {e}")
            return
        self.stats[f"errors.{error.status}"] += 1
        log.debug(
            "Answered {status} {reason} to {source}",
            status=error.status,
            reason=error.reason,
            source=source,
        )

    def _handleRequest(
        self, request: Request, source: tuple[str, int], listener: IListener
    ) -> None:
        method = request.method
        if method == "ACK":
            # Nothing answers an ACK (RFC 3261 §17.2.1).
            self.stats["requests.ACK"] += 1
            return
        via = self._topVia(request)
        headers = request.headers
        for name in ("from", "to", "call-id", "cseq"):
            if name not in headers:
                raise SIPError(f"Missing {name.title()} Header")
        number, cseqMethod = parseCSeq(headers["cseq"][0])
        if cseqMethod != method:
            raise SIPError("CSeq Method Mismatch")
        if method == "REGISTER":
            self.stats["requests.REGISTER"] += 1
            self._register(request, via, number, source, listener)
        elif method == "OPTIONS":
            self.stats["requests.OPTIONS"] += 1
            self._respond(
                request,
                via,
                source,
                listener,
                200,
                "OK",
                f"Allow: {ALLOW}\r\nAccept: application/sdp\r\n",
            )
        else:
            self.stats["requests.other"] += 1
            self._respond(
                request,
                via,
                source,
                listener,
                405,
                "Method Not Allowed",
                f"Allow: {ALLOW}\r\n",
            )

    # REGISTER (RFC 3261 §10.3)

    def _register(
        self,
        request: Request,
        via: Via,
        cseq: int,
        source: tuple[str, int],
        listener: IListener,
    ) -> None:
        headers = request.headers
        require = headers.get("require")
        if require:
            # RFC 3261 §8.2.2.3: no extension is supported here.
            unsupported = ", ".join(splitCommas(require))
            self._respond(
                request,
                via,
                source,
                listener,
                420,
                "Bad Extension",
                f"Unsupported: {unsupported}\r\n",
            )
            return
        to = parseNameAddr(headers["to"][0])
        try:
            aor = parseURI(to.uri).addressOfRecord()
        except SIPError:
            raise SIPError("Invalid To URI")
        callId = headers["call-id"][0]
        if not callId:
            raise SIPError("Invalid Call-ID")
        defaultExpires = DEFAULT_EXPIRES
        expiresHeader = request.header("expires")
        if expiresHeader is not None:
            try:
                defaultExpires = parseDeltaSeconds(expiresHeader)
            except ValueError:
                raise SIPError("Invalid Expires")
        now = self.clock.seconds()
        contactValues = headers.get("contact")
        if not contactValues:
            self._registered(request, via, aor, source, listener, now)
            return
        contacts = [parseNameAddr(value) for value in splitValues(contactValues)]
        wildcard = False
        for contact in contacts:
            if contact.uri == "*":
                wildcard = True
        if wildcard:
            if len(contacts) != 1 or expiresHeader is None or defaultExpires != 0:
                raise SIPError("Invalid Wildcard Contact")
            self._removeAll(aor, callId, cseq)
            self._registered(request, via, aor, source, listener, now)
            return
        changes = []
        viaNat = "via" in self.natTests and (
            via.host != source[0] or (via.port or 5060) != source[1]
        )
        for contact in contacts:
            try:
                uri = parseURI(contact.uri)
            except SIPError:
                raise SIPError("Invalid Contact URI")
            expires = defaultExpires
            param = contact.param("expires")
            if param is not None:
                try:
                    expires = parseDeltaSeconds(param)
                except ValueError:
                    raise SIPError("Invalid Contact Expires")
            if 0 < expires < self.minExpires:
                self._respond(
                    request,
                    via,
                    source,
                    listener,
                    423,
                    "Interval Too Brief",
                    f"Min-Expires: {self.minExpires}\r\n",
                )
                return
            existing = self.table.get(aor, contact.uri)
            if existing is not None and existing.callId == callId and cseq < existing.cseq:
                # RFC 3261 §10.3 step 7: an older request must not undo a
                # newer one.  An equal CSeq is a retransmission, answered
                # again below as if new.
                raise SIPError("Out of Order CSeq")
            nat = viaNat or self._contactNat(uri.host, uri.port, source)
            changes.append((contact, expires, nat, existing))
        for contact, expires, nat, existing in changes:
            if expires == 0:
                if existing is not None:
                    self.table.remove(existing)
                    self._forget(existing)
                continue
            granted = self.expiry.grant(expires, nat)
            params = renderParams(contact.params, skip=("expires",))
            if existing is None:
                binding = Binding(
                    aor,
                    contact.uri,
                    params,
                    source,
                    listener,
                    nat,
                    now + granted,
                    callId,
                    cseq,
                )
                self.table.add(binding)
                self.stats["bindings.added"] += 1
            else:
                binding = existing
                self.table.refresh(
                    binding,
                    source=source,
                    listener=listener,
                    nat=nat,
                    expiresAt=now + granted,
                    callId=callId,
                    cseq=cseq,
                    params=params,
                )
                self.stats["bindings.refreshed"] += 1
            if self.store is not None:
                self.store.put(binding)
        self._registered(request, via, aor, source, listener, now)

    def _removeAll(self, aor: str, callId: str, cseq: int) -> None:
        bindings = self.table.lookup(aor)
        for binding in bindings:
            if binding.callId == callId and cseq < binding.cseq:
                raise SIPError("Out of Order CSeq")
        for binding in bindings:
            self.table.remove(binding)
            self._forget(binding)

    def _forget(self, binding: Binding) -> None:
        # The table tells the store; this only counts.
        self.stats["bindings.removed"] += 1

    def _registered(
        self,
        request: Request,
        via: Via,
        aor: str,
        source: tuple[str, int],
        listener: IListener,
        now: float,
    ) -> None:
        contacts = "".join(
            [
                f"Contact: <{b.uri}>{b.params};expires={max(1, math.ceil(b.expiresAt - now))}\r\n"
                for b in self.table.lookup(aor)
                if b.expiresAt > now
            ]
        )
        self._respond(
            request, via, source, listener, 200, "OK", f"{contacts}Date: {self._httpDate(now)}\r\n"
        )

    # NAT detection

    def _contactNat(self, host: str, port: Optional[int], source: tuple[str, int]) -> bool:
        if "private" in self.natTests and isPrivateAddress(host):
            return True
        if "contact" in self.natTests:
            return host != source[0] or (port or 5060) != source[1]
        return False

    # Output

    def _topVia(self, request: Request) -> Via:
        values = request.headers.get("via")
        if not values:
            raise _Unanswerable("no Via header")
        value = values[0]
        if "," in value:
            value = next(splitCommas([value]))
        try:
            return parseVia(value)
        except SIPError as e:
            raise _Unanswerable(e.reason)

    def _respond(
        self,
        request: Request,
        via: Via,
        source: tuple[str, int],
        listener: IListener,
        code: int,
        reason: str,
        extra: str = "",
    ) -> None:
        """
        Answer C{request}.

        @param extra: header lines to add, each ending in CRLF.
        """
        host = source[0]
        if via.hasParam("rport"):
            # RFC 3581 §4: fill rport, and always add received with it.
            top = via.render(_FILLED, f";received={host};rport={source[1]}")
        elif via.host != host:
            top = via.render(_RECEIVED, f";received={host}")
        else:
            top = via.render()
        fields = request.headers
        vias = fields["via"]
        others = ""
        if len(vias) > 1 or "," in vias[0]:
            others = "".join([f"Via: {value}\r\n" for value in splitValues(vias)[1:]])
        try:
            # One string build for the usual case, where all are present.
            callId = fields["call-id"][0]
            cseq = fields["cseq"][0]
            copied = (
                f"From: {fields['from'][0]}\r\nTo: {_tagged(fields['to'][0], callId, cseq)}\r\n"
                f"Call-ID: {callId}\r\nCSeq: {cseq}\r\n"
            )
        except KeyError:
            copied = _copiedHeaders(fields)
        key = _SENT_KEYS.get(code)
        if key is None:
            key = _SENT_KEYS[code] = f"responses.sent.{code}"
        self.stats[key] += 1
        text = f"SIP/2.0 {code} {reason}\r\nVia: {top}\r\n{others}{copied}{extra}{_TRAILER}"
        self._send(listener, text.encode("utf-8"), source)

    def _httpDate(self, now: float) -> str:
        second = int(now)
        if second != self._dateSecond:
            self._dateSecond = second
            self._date = email.utils.formatdate(second, usegmt=True)
        return self._date

    def _send(self, listener: IListener, data: bytes, address: tuple[str, int]) -> None:
        if self.sipTrace and not stun.looksLikeSTUN(data):
            log.info(
                "SIP out to {address}:\n{text}",
                address=address,
                text=data.decode("utf-8", "replace"),
            )
        if self.store is not None and self.store.pending():
            # Durability first: the answer leaves after the commit that
            # holds its changes, shared by everything in this reactor turn.
            self._held.append((listener, data, address))
            if self._flushCall is None:
                self._flushCall = self.clock.callLater(0, self.flush)
            return
        if self._held:
            self._held.append((listener, data, address))
            return
        self._transmit(listener, data, address)

    def flush(self) -> None:
        """
        Commit pending store writes, then send the answers held for them.
        """
        self._flushCall = None
        held, self._held = self._held, []
        if self.store is not None and self.store.pending():
            try:
                self.store.commit()
            except Exception:
                # An answer must not claim what is not on disk.
                self.stats["store.errors"] += 1
                log.failure("Committing bindings failed; {n} answers withheld", n=len(held))
                return
        for listener, data, address in held:
            self._transmit(listener, data, address)

    def _transmit(self, listener: IListener, data: bytes, address: tuple[str, int]) -> None:
        try:
            listener.sendto(data, address)
        except OSError as e:
            self.stats["send.errors"] += 1
            log.debug("Sending to {address} failed: {e}", address=address, e=e)


@implementer(IListener)
class RegistrarProtocol(DatagramProtocol):
    """
    One listening UDP socket of the registrar.

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
    @ivar readPause: the shortest time between the starts of two reads, in
        seconds; 0 reads at once.
    """

    def __init__(self, registrar: Registrar, address: str, readPause: float = 0.0) -> None:
        self.registrar = registrar
        self.address = address
        self.readPause = readPause
        self._turnBytes = 0
        self._turnStarted = 0.0
        self._turnCall: Optional[IDelayedCall] = None
        self._resumeCall: Optional[IDelayedCall] = None

    def startProtocol(self) -> None:
        # Heartbeats are the hot path: send on the socket itself, skipping
        # the per-call address validation of the Twisted transport, which
        # costs more than the send.  Fakes without a socket use write().
        sock = getattr(self.transport, "socket", None)
        self.sendto = sock.sendto if sock is not None else self._write  # type: ignore[method-assign]

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

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._turnCall is None and self.readPause > 0:
            self._turnStarted = self.registrar.clock.seconds()
            self._turnCall = self.registrar.clock.callLater(0, self._turnEnded)
        self._turnBytes += len(data)
        # Twisted hands IPv6 sources as (host, port) already.
        try:
            self.registrar.datagramReceived(data, addr, self)
        except Exception:
            # A bug must cost one datagram, not the service.
            self.registrar.stats["internal.errors"] += 1
            log.failure("Unexpected error handling a datagram from {addr}", addr=addr)

    def _turnEnded(self) -> None:
        self._turnCall = None
        turnBytes, self._turnBytes = self._turnBytes, 0
        transport: Any = self.transport
        if turnBytes >= transport.maxThroughput:
            # Stopped on the read limit: more is waiting.
            return
        clock = self.registrar.clock
        pause = self.readPause - (clock.seconds() - self._turnStarted)
        if pause > 0 and self._resumeCall is None:
            transport.stopReading()
            self._resumeCall = clock.callLater(pause, self._resume)

    def _resume(self) -> None:
        # Stopping the protocol cancels this call, so the port is open.
        self._resumeCall = None
        transport: Any = self.transport
        transport.startReading()
