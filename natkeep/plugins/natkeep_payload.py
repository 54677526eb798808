"""
Built-in heartbeat payloads: C{raw} (the default), C{crlf} and C{options}.
"""

from __future__ import annotations

from typing import Optional

import attrs
from zope.interface import implementer

from natkeep.bindings import DEAD, Binding
from natkeep.interfaces import IPayload
from natkeep.sip import Response, parseCSeq, renderRequest
from natkeep.strategies import StrategyMaker


@implementer(IPayload)
@attrs.frozen
class FixedPayload:
    """
    The same bytes to every binding: SS_SIP_NAT_KEEP_ALIVE_MESSAGE as a raw
    UDP datagram (C{raw}, as VOS3000 sends it), or a double CRLF (C{crlf},
    the RFC 5626 §4.4.1 ping every SIP stack ignores).
    """

    fixed: bytes
    name: str = "raw"

    def payloadFor(self, binding: Binding) -> bytes:
        return self.fixed

    def responseReceived(self, response: Response, source: tuple[str, int]) -> None:
        return None

    def cycleStarted(self, now: float) -> None:
        pass


@implementer(IPayload)
@attrs.define(slots=True)
class OptionsPayload:
    """
    A SIP OPTIONS request to each binding's Contact, sent to its public
    address.  The device's answer proves it alive, and, leaving the NAT from
    the inside, refreshes even mappings that only outbound traffic renews.

    Each binding has its own Call-ID, so an answer is matched to its binding
    by Call-ID alone; the CSeq rises with each heartbeat.

    @ivar token: a per-run prefix keeping Call-IDs unique across restarts.
    """

    token: str
    fixed: Optional[bytes] = None
    name = "options"
    _outstanding: dict[str, Binding] = attrs.field(factory=dict)
    _cseq: int = 0

    def callIdFor(self, binding: Binding) -> str:
        return f"{self.token}-{binding.phase}@natkeep"

    def payloadFor(self, binding: Binding) -> bytes:
        self._cseq += 1
        callId = self.callIdFor(binding)
        self._outstanding[callId] = binding
        host = binding.listener.address.rpartition(":")[0]
        return renderRequest(
            "OPTIONS",
            binding.uri,
            [
                (
                    "Via",
                    f"SIP/2.0/UDP {binding.listener.address};"
                    f"branch=z9hG4bK{self.token}.{self._cseq};rport",
                ),
                ("Max-Forwards", "70"),
                ("From", f"<sip:natkeep@{host}>;tag={self.token}"),
                ("To", f"<{binding.uri}>"),
                ("Call-ID", callId),
                ("CSeq", f"{self._cseq} OPTIONS"),
                ("User-Agent", "natkeep"),
            ],
        )

    def responseReceived(self, response: Response, source: tuple[str, int]) -> Optional[Binding]:
        callId = response.header("call-id")
        cseq = response.header("cseq")
        if callId is None or cseq is None:
            return None
        try:
            if parseCSeq(cseq)[1] != "OPTIONS":
                return None
        except Exception:
            return None
        binding = self._outstanding.get(callId)
        if binding is None or binding.expiresAt == DEAD:
            return None
        return binding

    def cycleStarted(self, now: float) -> None:
        dead = [k for k, b in self._outstanding.items() if b.expiresAt == DEAD]
        for key in dead:
            del self._outstanding[key]


def _token() -> str:
    import os

    return os.urandom(4).hex()


raw = StrategyMaker(
    "raw",
    IPayload,
    "SS_SIP_NAT_KEEP_ALIVE_MESSAGE as a raw UDP datagram (default)",
    lambda s: FixedPayload(s.message, "raw"),
)
crlf = StrategyMaker(
    "crlf", IPayload, "a double CRLF (RFC 5626 ping)", lambda s: FixedPayload(b"\r\n\r\n", "crlf")
)
options = StrategyMaker(
    "options",
    IPayload,
    "a SIP OPTIONS per binding; answers prove the device alive",
    lambda s: OptionsPayload(_token()),
)
