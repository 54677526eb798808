"""
Built-in expiry policies: C{cap} (the default), C{fixed} and C{liveness}.
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from natkeep.interfaces import IExpiryPolicy
from natkeep.strategies import StrategyMaker


@implementer(IExpiryPolicy)
@attrs.frozen
class CapExpiry:
    """
    Grant what the device asks for, capped at SS_ENDPOINT_EXPIRE, or at
    SS_ENDPOINT_NAT_EXPIRE behind NAT; remove a binding whose heartbeats
    drew C{unreachableLimit} ICMP errors since its last REGISTER or answer
    (0: never).
    """

    endpointExpire: int
    endpointNatExpire: int
    unreachableLimit: int = attrs.field(default=3, kw_only=True)
    name = "cap"
    tracksHeartbeats = False

    def grant(self, requested: int, nat: bool) -> int:
        return min(requested, self.endpointNatExpire if nat else self.endpointExpire)

    def alive(self, unanswered: int) -> bool:
        return True

    def reachable(self, unreachable: int) -> bool:
        return self.unreachableLimit == 0 or unreachable < self.unreachableLimit


@implementer(IExpiryPolicy)
@attrs.frozen
class FixedExpiry(CapExpiry):
    """
    Always grant SS_ENDPOINT_EXPIRE, or SS_ENDPOINT_NAT_EXPIRE behind NAT,
    whatever the device asked for, as VOS3000 does.
    """

    name = "fixed"

    def grant(self, requested: int, nat: bool) -> int:
        return self.endpointNatExpire if nat else self.endpointExpire


@implementer(IExpiryPolicy)
@attrs.frozen
class LivenessExpiry(CapExpiry):
    """
    Grant as C{cap} does, and remove a binding whose device left C{misses}
    heartbeats in a row unanswered.  Meant for the C{options} payload, whose
    heartbeats a live device answers.
    """

    misses: int
    name = "liveness"
    tracksHeartbeats = True

    def alive(self, unanswered: int) -> bool:
        return unanswered < self.misses


cap = StrategyMaker(
    "cap",
    IExpiryPolicy,
    "grant min(requested, SS_ENDPOINT[_NAT]_EXPIRE) (default)",
    lambda s: CapExpiry(s.endpointExpire, s.endpointNatExpire, unreachableLimit=s.unreachableLimit),
)
fixed = StrategyMaker(
    "fixed",
    IExpiryPolicy,
    "always grant SS_ENDPOINT[_NAT]_EXPIRE, as VOS3000 does",
    lambda s: FixedExpiry(
        s.endpointExpire, s.endpointNatExpire, unreachableLimit=s.unreachableLimit
    ),
)
liveness = StrategyMaker(
    "liveness",
    IExpiryPolicy,
    "as cap, and remove a binding after liveness_misses unanswered heartbeats",
    lambda s: LivenessExpiry(
        s.endpointExpire,
        s.endpointNatExpire,
        s.livenessMisses,
        unreachableLimit=s.unreachableLimit,
    ),
)
