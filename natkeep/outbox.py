"""
The outbox: where natkeep's answers leave, never before the commit that
makes what they say durable.

An answer sent while the store holds uncommitted writes is held; at the end
of the reactor turn one commit covers every REGISTER of that turn, then the
held answers leave in order.  A commit that fails withholds them: an answer
must not claim what is not on disk.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from natkeep import stun
from natkeep.config import Settings
from natkeep.interfaces import IBindingStore, IListener
from natkeep.sip import Request, Via, renderResponse, traceText

log = Logger()

#: How every response ends (natkeep's responses carry no body), until
#: C{server_header} says otherwise.
TRAILER = "Server: natkeep\r\nContent-Length: 0\r\n\r\n"

_SENT_KEYS: dict[int, str] = {}


class Outbox:
    """
    Sends answers from the socket a request arrived on, after the commit
    that holds their changes.

    @ivar stats: counters by name (C{responses.sent.CODE}, C{send.errors},
        C{store.errors}).
    @ivar sipTrace: whether every message out is logged.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: Optional[IBindingStore],
        stats: Counter[str],
        sipTrace: bool = False,
    ) -> None:
        self.clock = clock
        self.store = store
        self.stats = stats
        self.sipTrace = sipTrace
        self.trailer = TRAILER
        self._held: list[tuple[IListener, bytes, tuple[str, int]]] = []
        self._flushCall: Optional[IDelayedCall] = None

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
        Answer C{request}, which came from C{source} to C{listener}.

        @param via: its parsed top Via.
        @param extra: header lines to add, each ending in CRLF.
        """
        key = _SENT_KEYS.get(code)
        if key is None:
            key = _SENT_KEYS[code] = f"responses.sent.{code}"
        self.stats[key] += 1
        self.send(
            listener,
            renderResponse(request, via, source, code, reason, extra, self.trailer),
            source,
        )

    def send(self, listener: IListener, data: bytes, address: tuple[str, int]) -> None:
        """
        Send C{data} to C{address} from C{listener} once the current turn's
        writes are committed, in the order given.
        """
        if self.sipTrace and not stun.looksLikeSTUN(data):
            log.info(
                "SIP out to {address}:\n{text}",
                address=address,
                text=traceText(data),
            )
        store = self.store
        if store is not None and store.pending():
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
        call, self._flushCall = self._flushCall, None
        if call is not None and call.active():
            call.cancel()
        held, self._held = self._held, []
        store = self.store
        if store is not None and store.pending():
            try:
                store.commit()
            except Exception:
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
