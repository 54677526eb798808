"""
Built-in pacings: C{restart} (VOS3000 exactly; the default), C{resume} and
C{spread}.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Collection, Optional, Sequence

import attrs
from zope.interface import implementer

from natkeep.bindings import Binding
from natkeep.config import Settings
from natkeep.interfaces import ICycle, IPacer
from natkeep.strategies import StrategyMaker


@implementer(ICycle)
@attrs.define(slots=True)
class SequentialCycle:
    """
    A cycle that walks a snapshot of the bindings in order, C{batchSize} at
    a time.

    @ivar position: the index of the next binding to hand out.
    """

    snapshot: Sequence[Binding]
    batchSize: int
    position: int = 0
    due: int = 0

    def nextBatch(self) -> Optional[Sequence[Binding]]:
        start = self.position
        if start >= len(self.snapshot):
            return None
        self.position = start + self.batchSize
        return self.snapshot[start : self.position]

    def unreached(self) -> int:
        return max(0, len(self.snapshot) - self.position)


@implementer(IPacer)
@attrs.define(slots=True)
class RestartPacer:
    """
    VOS3000's pacing: each period starts again from the first binding, so
    an unfinished cycle is abandoned and its tail never gets a heartbeat.
    """

    name = "restart"

    def startCycle(
        self, bindings: Collection[Binding], batches: int, batchSize: int
    ) -> SequentialCycle:
        snapshot = list(bindings)
        return SequentialCycle(snapshot, batchSize, 0, len(snapshot))


@implementer(IPacer)
@attrs.define(slots=True)
class ResumePacer:
    """
    Like C{restart}, but a period that begins before the cycle is done
    continues that cycle where it stopped; a fresh snapshot is taken only
    once every binding of the last one was reached.  Every device is reached
    at least once every C{ceil(N / capacity)} periods.
    """

    name = "resume"
    _current: Optional[SequentialCycle] = None

    def startCycle(
        self, bindings: Collection[Binding], batches: int, batchSize: int
    ) -> SequentialCycle:
        current = self._current
        if current is None or current.unreached() == 0:
            snapshot = list(bindings)
            current = SequentialCycle(snapshot, batchSize, 0, len(snapshot))
        else:
            current = SequentialCycle(
                current.snapshot, batchSize, current.position, current.unreached()
            )
        self._current = current
        return current


@implementer(ICycle)
@attrs.define(slots=True)
class SlottedCycle:
    """
    A cycle whose batches are fixed slots of the period.
    """

    slots: dict[int, list[Binding]]
    batches: int
    due: int
    _next: int = 0
    _handed: int = 0

    def nextBatch(self) -> Optional[Sequence[Binding]]:
        if self._next >= self.batches:
            return None
        batch = self.slots.pop(self._next, [])
        self._next += 1
        self._handed += len(batch)
        return batch

    def unreached(self) -> int:
        return self.due - self._handed


@implementer(IPacer)
@attrs.define(slots=True)
class SpreadPacer:
    """
    Each binding has a stable slot in the period, so the load is flat and
    every device gets exactly one heartbeat per period, however many there
    are.  A slot may hold more than SEND_ONE_TIME bindings when the devices
    outnumber the capacity: spread then exceeds the batch size rather than
    starve anyone.

    The slot is the binding's phase, taken in blocks of L{blockSize}
    consecutive phases, modulo the batches per period.  Bindings made one
    after the other sit near each other in memory, so a batch of whole
    blocks is read nearly as fast as C{restart}'s consecutive run, where one
    phase per slot would read every binding from a different place.  The
    block depends on the settings only, so a binding's slot is stable.
    """

    name = "spread"

    @staticmethod
    def blockSize(batchSize: int) -> int:
        """
        Consecutive phases that share a slot: at most 64 (more gains no
        locality) and at most a 64th of the batch size, so that a slot
        filled one block at a time stays flat against the batch size.
        """
        return max(1, min(64, batchSize // 64))

    def startCycle(
        self, bindings: Collection[Binding], batches: int, batchSize: int
    ) -> SlottedCycle:
        # One pass, as cheap per binding as Python allows: this runs for
        # every NATed binding every period.
        block = self.blockSize(batchSize)
        slots: defaultdict[int, list[Binding]] = defaultdict(list)
        for binding in bindings:
            slots[binding.phase // block % batches].append(binding)
        return SlottedCycle(slots, batches, len(bindings))


def _restartPace(settings: Settings, devices: int) -> tuple[int, str]:
    period, capacity = settings.period, settings.capacity
    if devices <= capacity:
        return devices, f"every {period} s"
    return capacity, (
        f"every {period} s for the first {capacity} devices; "
        f"never for the other {devices - capacity}"
    )


def _resumePace(settings: Settings, devices: int) -> tuple[int, str]:
    period, capacity = settings.period, settings.capacity
    if devices <= capacity:
        return devices, f"every {period} s"
    return capacity, f"at least every {period * math.ceil(devices / capacity)} s"


def _spreadPace(settings: Settings, devices: int) -> tuple[int, str]:
    return devices, f"every {settings.period} s"


restart = StrategyMaker(
    "restart",
    IPacer,
    "VOS3000 exactly: each period starts over; an overrun tail is missed (default)",
    lambda s: RestartPacer(),
    pacing=_restartPace,
)
resume = StrategyMaker(
    "resume",
    IPacer,
    "an unfinished cycle continues next period: nobody starves past capacity",
    lambda s: ResumePacer(),
    pacing=_resumePace,
)
spread = StrategyMaker(
    "spread",
    IPacer,
    "stable per-binding phase: flat load, one heartbeat per PERIOD per device",
    lambda s: SpreadPacer(),
    pacing=_spreadPace,
)
