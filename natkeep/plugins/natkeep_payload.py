"""
Built-in heartbeat payloads: C{raw} (the default), C{crlf} and C{options}.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import attrs
from zope.interface import implementer

from natkeep.bindings import DEAD, Binding
from natkeep.config import Settings
from natkeep.interfaces import IDatagramMatcher, IPayload
from natkeep.sip import Response
from natkeep.strategies import StrategyMaker

#: The size of a typical C{options} heartbeat, for the capacity plan.
OPTIONS_SIZE = 330


@implementer(IPayload)
@attrs.frozen
class FixedPayload:
    """
    The same bytes to every binding: SS_SIP_NAT_KEEP_ALIVE_MESSAGE as a raw
    UDP datagram (C{raw}, as VOS3000 sends it), or a double CRLF (C{crlf},
    the RFC 5626 §4.4.1 ping every SIP stack ignores).  No bytes at all
    switch heartbeats off.
    """

    fixed: bytes
    name: str = "raw"

    @property
    def enabled(self) -> bool:
        return bool(self.fixed)

    def payloadFor(self, binding: Binding) -> bytes:
        return self.fixed

    def responseReceived(self, response: Response, source: tuple[str, int]) -> None:
        return None

    def cycleStarted(self, now: float) -> None:
        pass


@implementer(IPayload, IDatagramMatcher)
@attrs.define(slots=True)
class OptionsPayload:
    """
    A SIP OPTIONS request to each binding's Contact, sent to its public
    address.  The device's answer proves it alive, and, leaving the NAT from
    the inside, refreshes even mappings that only outbound traffic renews.

    Each binding has its own Call-ID, so an answer is matched to its binding
    by Call-ID alone; the CSeq rises with each heartbeat.  An answer that
    echoes the Call-ID header as it was sent is matched from its bytes,
    unparsed (L{matchDatagram}); any other goes through the parser.

    @ivar token: a per-run prefix keeping Call-IDs unique across restarts.
    """

    token: str
    name = "options"
    enabled = True
    fixed: Optional[bytes] = None
    _outstanding: dict[str, Binding] = attrs.field(factory=dict)
    _heads: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    _cseq: int = 0

    def _head(self, address: str) -> tuple[str, str]:
        """
        The parts of every heartbeat from the socket at C{address} that do
        not change: the Via up to its branch, and the From.
        """
        host = address.rpartition(":")[0]
        head = self._heads[address] = (
            f"Via: SIP/2.0/UDP {address};rport;branch=z9hG4bK{self.token}.",
            f"From: <sip:natkeep@{host}>;tag={self.token}\r\n",
        )
        return head

    def payloadFor(self, binding: Binding) -> bytes:
        self._cseq = cseq = self._cseq + 1
        callId = f"{self.token}-{binding.phase}@natkeep"
        self._outstanding[callId] = binding
        address = binding.listener.sentBy
        via, sender = self._heads.get(address) or self._head(address)
        uri = binding.uri
        return (
            f"OPTIONS {uri} SIP/2.0\r\n{via}{cseq}\r\nMax-Forwards: 70\r\n{sender}"
            f"To: <{uri}>\r\nCall-ID: {callId}\r\nCSeq: {cseq} OPTIONS\r\n"
            "User-Agent: natkeep\r\nContent-Length: 0\r\n\r\n"
        ).encode("utf-8")

    def responseReceived(self, response: Response, source: tuple[str, int]) -> Optional[Binding]:
        headers = response.headers
        callIds = headers.get("call-id")
        if not callIds:
            return None
        binding = self._outstanding.get(callIds[0])
        if binding is None or binding.expiresAt == DEAD:
            return None
        # The Call-ID, which holds this run's random token, is the match;
        # the CSeq only has to be an OPTIONS one.
        cseqs = headers.get("cseq")
        if not cseqs or not cseqs[0].endswith(" OPTIONS"):
            return None
        return binding

    def matchDatagram(self, data: bytes, source: tuple[str, int]) -> Optional[Binding]:
        # The Call-ID line as sent: this run's token makes it unique.
        start = data.find(b"\r\nCall-ID: " + self.token.encode("ascii") + b"-")
        if start < 0 or not data[8:11].isdigit():
            return None
        start += 11
        end = data.find(b"\r\n", start)
        if end < 0 or data.find(b" OPTIONS\r\n", end) < 0:
            return None
        binding = self._outstanding.get(data[start:end].decode("ascii", "replace"))
        if binding is None or binding.expiresAt == DEAD:
            return None
        return binding

    def cycleStarted(self, now: float) -> None:
        dead = [k for k, b in self._outstanding.items() if b.expiresAt == DEAD]
        for key in dead:
            del self._outstanding[key]


def _token() -> str:
    return os.urandom(4).hex()


def _emptyMessage(settings: Settings, devices: Optional[int]) -> Sequence[str]:
    if settings.message:
        return ()
    return ["SS_SIP_NAT_KEEP_ALIVE_MESSAGE is empty: no heartbeats will be sent"]


raw = StrategyMaker(
    "raw",
    IPayload,
    "SS_SIP_NAT_KEEP_ALIVE_MESSAGE as a raw UDP datagram (default)",
    lambda s: FixedPayload(s.message, "raw"),
    size=lambda s: len(s.message),
    advice=_emptyMessage,
)
crlf = StrategyMaker(
    "crlf",
    IPayload,
    "a double CRLF (RFC 5626 ping)",
    lambda s: FixedPayload(b"\r\n\r\n", "crlf"),
    size=lambda s: 4,
)
options = StrategyMaker(
    "options",
    IPayload,
    "a SIP OPTIONS per binding; answers prove the device alive",
    lambda s: OptionsPayload(_token()),
    size=lambda s: OPTIONS_SIZE,
)
