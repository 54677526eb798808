"""
The outbox: where natkeep's answers leave, never before the commit that
makes what they say durable.

An answer to a REGISTER sent while the store holds uncommitted writes, or
while a commit is under way, is held; at the end of the reactor turn one
commit covers every REGISTER of that turn, then the held answers leave in
order.  The commit itself runs where the outbox's C{writer} runs it: on the
store's own thread in the service (L{natkeep.store.ThreadedWriter}), so
the reactor goes on reading, answering OPTIONS and STUN, relaying and
sending heartbeats while the disk is slow; in place in unit tests.  One
commit runs at a time; the turns that end meanwhile share the next one.

A commit that fails keeps its writes for the next one (tried a second
later) and answers the REGISTERs it held with 500: an answer must not
claim what is not on disk.  The failure is logged once with its cause
(again only when the cause changes), counted, and shown by L{status}.
Past L{MAX_HELD} answers waiting, the registrar answers 503 at once.
"""

from __future__ import annotations

from typing import Any, Callable, Final, Optional, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from natkeep import stun
from natkeep.bindings import Binding, storedRow
from natkeep.config import Settings
from natkeep.counts import Counts
from natkeep.interfaces import IBindingStore, IListener
from natkeep.sip import Request, Via, renderResponse, traceText

log = Logger(namespace="natkeep.outbox")

#: How every response ends (natkeep's responses carry no body), until
#: C{server_header} says otherwise.
TRAILER: Final = "Server: natkeep\r\nContent-Length: 0\r\n\r\n"

#: REGISTER answers that may wait for commits at once; past it the
#: registrar answers 503 with Retry-After without touching the table.
MAX_HELD = 20000

#: Seconds between a failed commit and the next try.
RETRY_DELAY: Final = 1.0

_SENT_KEYS: Final[dict[int, str]] = {}

#: A message waiting for a commit: socket, bytes, destination.
Held = tuple[IListener, bytes, tuple[str, int]]

#: Header lines of a held 2xx that a 500 in its place leaves out.
_NOT_IN_500: Final = (b"contact:", b"m:", b"date:")


def failedAnswer(data: bytes) -> bytes:
    """
    The 500 that replaces the held 2xx C{data} when its commit failed: the
    same Via, From, To, Call-ID and CSeq, no Contact (nothing is bound).
    """
    head, _, _ = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    kept = [b"SIP/2.0 500 Binding Not Stored"] + [
        line for line in lines[1:] if not line.lower().startswith(_NOT_IN_500)
    ]
    return b"\r\n".join(kept) + b"\r\n\r\n"


Writer = Callable[[Sequence[tuple[Any, ...]], dict[tuple[str, str], float]], "defer.Deferred[None]"]


class Outbox:
    """
    Sends answers from the socket a request arrived on, after the commit
    that holds their changes.

    @ivar stats: counters by name (C{responses.sent.CODE}, C{send.errors},
        C{store.errors}).
    @ivar sipTrace: whether every message out is logged.
    @ivar writer: writes a commit's rows; returns a Deferred.  By default
        the store's own C{write}, in place.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: Optional[IBindingStore],
        stats: Counts,
        sipTrace: bool = False,
        writer: Optional[Writer] = None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.stats = stats
        self.sipTrace = sipTrace
        self.trailer = TRAILER
        self.writer: Optional[Writer] = writer
        self._held: list[Held] = []
        self._heldSince = 0.0
        self._inFlight: Optional[list[Held]] = None
        self._inFlightSince = 0.0
        self._flushCall: Optional[IDelayedCall] = None
        self._retryCall: Optional[IDelayedCall] = None
        self._drained: list[defer.Deferred[None]] = []
        self.lastError: Optional[str] = None

    def configure(self, settings: Settings) -> None:
        """
        Take the SIP trace switch and the Server header of C{settings}.
        """
        self.sipTrace = settings.sipTrace
        server = settings.serverHeader
        self.trailer = (
            f"Server: {server}\r\nContent-Length: 0\r\n\r\n"
            if server
            else "Content-Length: 0\r\n\r\n"
        )

    def answer(
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
        Answer C{request}, which came from C{source} to C{listener}; a 2xx
        to a REGISTER waits for the commits before it.

        @param via: its parsed top Via.
        @param extra: header lines to add, each ending in CRLF.
        """
        key = _SENT_KEYS.get(code)
        if key is None:
            key = _SENT_KEYS[code] = f"responses.sent.{code}"
        self.stats[key] += 1
        data = renderResponse(request, via, source, code, reason, extra, self.trailer)
        # What a 2xx to a REGISTER lists must be on disk first; a refusal
        # claims nothing.
        self.send(listener, data, source, code < 300 and request.method == "REGISTER")

    def send(
        self,
        listener: IListener,
        data: bytes,
        address: tuple[str, int],
        durable: bool = False,
    ) -> None:
        """
        Send C{data} to C{address} from C{listener}: at once, or, for a 2xx
        to a REGISTER (C{durable}), once every write made so far is
        committed, in the order given.
        """
        if self.sipTrace and not stun.looksLikeSTUN(data):
            log.info(
                "SIP out to {address}:\n{text}",
                address=address,
                text=traceText(data),
            )
        if durable:
            store = self.store
            if (store is not None and store.pending()) or self._held or self._inFlight:
                # Durability first: the answer leaves after the commit that
                # holds its changes (and every change before them), shared
                # by everything in this reactor turn.
                if not self._held:
                    self._heldSince = self.clock.seconds()
                self._held.append((listener, data, address))
                self.commitSoon()
                return
        self._transmit(listener, data, address)

    def congested(self) -> bool:
        """
        Whether so many answers wait for commits that a new REGISTER should
        be turned away (503) rather than queued.
        """
        return len(self._held) + len(self._inFlight or ()) >= MAX_HELD

    def idle(self) -> bool:
        """
        Whether no commit is under way or waiting.
        """
        return self._inFlight is None and not self._held and self._retryCall is None

    def status(self) -> dict[str, Any]:
        """
        The store's state for C{/status}: answers waiting, seconds the
        oldest has waited, the last commit error (L{None} once a commit
        succeeded again).
        """
        now = self.clock.seconds()
        since = [
            t
            for t, w in ((self._inFlightSince, self._inFlight), (self._heldSince, self._held))
            if w
        ]
        return {
            "queue": len(self._held) + len(self._inFlight or ()),
            "lag_seconds": round(now - min(since), 3) if since else 0.0,
            "committing": self._inFlight is not None,
            "last_error": self.lastError,
        }

    def commitSoon(self) -> None:
        """
        Commit what is written at the end of this reactor turn, unless a
        commit is under way or a failed one waits for its retry (either
        takes these writes along).
        """
        if self._flushCall is None and self._inFlight is None and self._retryCall is None:
            self._flushCall = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """
        Commit pending store writes, then send the answers held for them.
        While a commit is under way this waits: the next one starts when it
        ends.
        """
        call, self._flushCall = self._flushCall, None
        if call is not None and call.active():
            call.cancel()
        if self._inFlight is not None:
            return
        store = self.store
        held, self._held = self._held, []
        if store is None or not store.pending():
            for listener, data, address in held:
                self._transmit(listener, data, address)
            self._notifyDrained()
            return
        puts, deletes = store.takeWrites()
        # Values are read now, on the reactor thread.
        rows = [storedRow(b) for b in puts.values()]
        self._inFlight = held
        self._inFlightSince = self._heldSince if held else self.clock.seconds()
        writer = self.writer or store.write
        d = defer.maybeDeferred(writer, rows, deletes)
        d.addCallbacks(self._committed, self._failed, errbackArgs=(puts, deletes))

    def _committed(self, _: object) -> None:
        held, self._inFlight = self._inFlight or [], None
        if self.lastError is not None:
            log.info("Committing bindings works again; the kept writes are on disk")
            self.lastError = None
        for listener, data, address in held:
            self._transmit(listener, data, address)
        self._next()

    def _failed(
        self,
        failure: Failure,
        puts: dict[tuple[str, str], Binding],
        deletes: dict[tuple[str, str], float],
    ) -> None:
        held, self._inFlight = self._inFlight or [], None
        store = self.store
        assert store is not None
        store.restoreWrites(puts, deletes)
        self.stats["store.errors"] += 1
        error = failure.getErrorMessage() or repr(failure.value)
        if error != self.lastError:
            log.error(
                "Committing bindings to {location} failed: {error}; {n} REGISTERs answered "
                "500, the writes kept and retried every second",
                location=store.location,
                error=error,
                n=len(held),
            )
        self.lastError = error
        # Counted as 200s when they were made; they leave as 500s.
        self.stats["responses.sent.200"] -= len(held)
        self.stats["responses.sent.500"] += len(held)
        for listener, data, address in held:
            self._transmit(listener, failedAnswer(data), address)
        if self._drained:
            # Stopping: the writes stay unwritten, and the log says so.
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)
            return
        self._retryCall = self.clock.callLater(RETRY_DELAY, self._retry)

    def _retry(self) -> None:
        self._retryCall = None
        self.flush()

    def _next(self) -> None:
        store = self.store
        if self._held or (store is not None and store.pending()):
            self.commitSoon()
        else:
            self._notifyDrained()

    def drain(self) -> defer.Deferred[None]:
        """
        Commit everything written so far and send what waits for it; fires
        when nothing is left (for a clean stop).  A commit that keeps
        failing is given up after the one try this makes.
        """
        if self._retryCall is not None and self._retryCall.active():
            self._retryCall.cancel()
            self._retryCall = None
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        self.flush()
        return d

    def _notifyDrained(self) -> None:
        if self._inFlight is None and not self._held:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def _transmit(self, listener: IListener, data: bytes, address: tuple[str, int]) -> None:
        try:
            listener.sendto(data, address)
        except OSError as e:
            self.stats["send.errors"] += 1
            log.debug("Sending to {address} failed: {e}", address=address, e=e)
