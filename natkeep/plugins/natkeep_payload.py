"""
Built-in heartbeat payloads: C{raw} (the default), C{crlf} and C{options}.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import attrs
from zope.interface import classImplements, implementer

from natkeep.bindings import Binding
from natkeep.config import Settings
from natkeep.interfaces import IDatagramMatcher, IPayload
from natkeep.options import OptionsHeartbeats
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


#: The OPTIONS payload: compiled with the hot path where natkeep was built
#: with mypyc (L{natkeep.options}).
OptionsPayload = OptionsHeartbeats
classImplements(OptionsHeartbeats, IPayload, IDatagramMatcher)


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
