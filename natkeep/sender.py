"""
The clock: the heartbeat sender.

Every SS_SIP_NAT_KEEP_ALIVE_PERIOD seconds a cycle begins.  The pacer plans
it as batches; a batch leaves every SS_SIP_NAT_KEEP_ALIVE_SEND_INTERVAL
milliseconds, at most C{ceil(PERIOD*1000/INTERVAL)} batches a cycle, each
heartbeat from the socket the binding registered on to the binding's public
source address.

The sender owns the payload and expiry strategies' view of heartbeats: SIP
responses that arrive go to it (L{HeartbeatSender.responseReceived}), it
asks the payload which binding they answer, and it keeps each binding's
count of unanswered heartbeats, which the expiry policy judges.  It also
hears of the ICMP errors heartbeats draw (L{HeartbeatSender.unreachable}),
matches them to the bindings of its last few batches, and counts them per
binding for the policy to judge in the same way.

Nothing escapes a tick: a send error is counted and the batch goes on, and
any other failure is logged, because an exception out of a L{LoopingCall}
would stop heartbeats for good.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Collection, Final, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from natkeep.bindings import DEAD, Binding, BindingTable
from natkeep.config import Settings
from natkeep.counts import Counts
from natkeep.interfaces import (
    ICycle,
    IDatagramMatcher,
    IExpiryPolicy,
    IListener,
    IPacer,
    IPayload,
)
from natkeep.sip import Response
from natkeep.strategies import Strategies

log = Logger(namespace="natkeep.sender")

#: Seconds after a heartbeat batch during which an ICMP error is matched to
#: its bindings: far more than any round trip, and short enough to keep the
#: recent batches few.
ICMP_WINDOW: Final = 2.0

#: Per binding: a count, and the Call-ID and CSeq of the REGISTER it counts
#: since (a new REGISTER starts it over).
_Tally = dict[Binding, tuple[int, str, int]]


def _countOf(tally: _Tally, binding: Binding) -> int:
    count, callId, cseq = tally.get(binding, (0, "", 0))
    if (callId, cseq) != (binding.callId, binding.cseq):
        return 0
    return count


class CycleReport:
    """
    What one cycle did.

    @ivar started: clock time the cycle began.
    @ivar duration: seconds from the start to the last batch sent; C{None}
        while the cycle is still running or when it was cut short.
    @ivar due: bindings the cycle meant to reach.
    @ivar sent: heartbeats that left.
    @ivar missed: bindings due that the cycle never reached before the next
        period began.
    @ivar errors: heartbeats the kernel refused.
    @ivar skipped: bindings handed out that had expired or gone meanwhile.
    @ivar removed: bindings the expiry policy removed (liveness).
    """

    __slots__ = (
        "started",
        "due",
        "sent",
        "missed",
        "errors",
        "skipped",
        "removed",
        "batches",
        "duration",
    )

    def __init__(
        self,
        started: float,
        due: int = 0,
        sent: int = 0,
        missed: int = 0,
        errors: int = 0,
        skipped: int = 0,
        removed: int = 0,
        batches: int = 0,
        duration: Optional[float] = None,
    ) -> None:
        self.started = started
        self.due = due
        self.sent = sent
        self.missed = missed
        self.errors = errors
        self.skipped = skipped
        self.removed = removed
        self.batches = batches
        self.duration = duration

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"CycleReport({fields})"


class HeartbeatSender(Service):
    """
    Sends heartbeats to the bindings of a table, paced by a pacer.

    @ivar lastCycle: the report of the last finished cycle.
    @ivar current: the report of the cycle under way.
    @ivar batchesPerCycle: send intervals in one period (the most batches a cycle
        sends).
    @ivar batchSize: SS_SIP_NAT_KEEP_ALIVE_SEND_ONE_TIME, heartbeats per
        batch.
    """

    def __init__(
        self,
        table: BindingTable,
        clock: IReactorTime,
        settings: Settings,
        strategies: Strategies,
        stats: Optional[Counts] = None,
    ) -> None:
        self.table = table
        self.clock = clock
        self.stats: Counts = Counts() if stats is None else stats
        self.lastCycle: Optional[CycleReport] = None
        self.current: Optional[CycleReport] = None
        self._cycle: Optional[ICycle] = None
        self._periodLoop: Optional[LoopingCall] = None
        self._batchLoop: Optional[LoopingCall] = None
        #: Per binding: heartbeats unanswered in a row.
        self._unanswered: _Tally = {}
        #: Per binding: ICMP errors its heartbeats drew.
        self._unreachable: _Tally = {}
        #: The batches sent in the last ICMP_WINDOW seconds, newest last,
        #: and their bindings by destination, made when an error needs it.
        self._recent: deque[Sequence[Binding]] = deque()
        self._recentIndex: Optional[dict[tuple[str, int], list[Binding]]] = None
        #: Told the duration of each cycle that finished (metrics).
        self.onCycle: Optional[Callable[[float], None]] = None
        self.configure(settings, strategies)

    def configure(self, settings: Settings, strategies: Strategies) -> None:
        """
        Take new strategies and timing; a running sender starts a fresh
        cycle with them at once.
        """
        running = self.running
        if running:
            self.stopService()
        self.payload: IPayload = strategies.payload
        self._matcher = (
            strategies.payload if IDatagramMatcher.providedBy(strategies.payload) else None
        )
        self.pacer: IPacer = strategies.pacer
        self.expiry: IExpiryPolicy = strategies.expiry
        self.period: float = float(settings.period)
        self.sendInterval = settings.sendInterval / 1000
        self.batchSize = settings.sendOneTime
        self.batchesPerCycle = settings.batchesPerCycle
        self.pingAll = settings.pingAll
        window = max(1, math.ceil(ICMP_WINDOW / self.sendInterval)) if self.sendInterval else 1
        self._recent = deque(self._recent, maxlen=window)
        self._recentIndex = None
        if running:
            self.startService()

    @property
    def enabled(self) -> bool:
        """
        Whether heartbeats are on (the payload's master switch).
        """
        return bool(self.payload.enabled)

    def responseDatagram(self, data: bytes, source: tuple[str, int]) -> bool:
        """
        A datagram that starts like a SIP response arrived from C{source}:
        match it unparsed, where the payload can (L{IDatagramMatcher}).

        @return: whether it was matched; if not, the caller parses it and
            calls L{responseReceived}.
        """
        matcher = self._matcher
        if matcher is None:
            return False
        binding = matcher.matchDatagram(data, source)
        if binding is None:
            return False
        self._answered(binding)
        return True

    def responseReceived(self, response: Response, source: tuple[str, int]) -> None:
        """
        A SIP response arrived from C{source}: if the payload matches it to
        a heartbeat, that binding's device is alive.
        """
        binding = self.payload.responseReceived(response, source)
        if binding is not None:
            self._answered(binding)

    def _answered(self, binding: Binding) -> None:
        self.stats["heartbeats.answered"] += 1
        self._unanswered.pop(binding, None)
        self._unreachable.pop(binding, None)

    def unanswered(self, binding: Binding) -> int:
        """
        Heartbeats sent to C{binding} in a row that its device has not
        answered, since its last answer or REGISTER.
        """
        return _countOf(self._unanswered, binding)

    def unreachableCount(self, binding: Binding) -> int:
        """
        ICMP errors heartbeats to C{binding} drew since its last answer or
        REGISTER.
        """
        return _countOf(self._unreachable, binding)

    def unreachable(self, listener: IListener, destination: tuple[str, int]) -> None:
        """
        An ICMP error said C{destination} cannot be reached from
        C{listener}: count it against the bindings a recent heartbeat went
        to there, and remove those the expiry policy gives up on.
        """
        index = self._recentIndex
        if index is None:
            index = self._recentIndex = {}
            for batch in self._recent:
                for binding in batch:
                    found = index.setdefault(binding.source, [])
                    # Once each, though two recent batches may hold it.
                    if binding not in found:
                        found.append(binding)
        stats = self.stats
        matched = False
        for binding in index.get(destination, ()):
            if binding.listener is not listener or binding.expiresAt == DEAD:
                continue
            matched = True
            count = _countOf(self._unreachable, binding) + 1
            if self.expiry.reachable(count):
                self._unreachable[binding] = (count, binding.callId, binding.cseq)
                continue
            self._unreachable.pop(binding, None)
            self._unanswered.pop(binding, None)
            self.table.remove(binding)
            stats["bindings.unreachable"] += 1
            log.info(
                "Removed {aor} {uri}: {n} heartbeats to {destination} drew ICMP errors",
                aor=binding.aor,
                uri=binding.uri,
                n=count,
                destination=destination,
            )
        if matched:
            stats["heartbeats.unreachable"] += 1

    def startService(self) -> None:
        super().startService()
        if not self.enabled:
            return
        loop = self._periodLoop = LoopingCall(self._startCycle)
        loop.clock = self.clock
        loop.start(self.period, now=True).addErrback(
            lambda f: log.failure("Heartbeat cycle loop stopped", f)
        )

    def stopService(self) -> Any:
        super().stopService()
        for loop in (self._batchLoop, self._periodLoop):
            if loop is not None and loop.running:
                loop.stop()
        self._batchLoop = self._periodLoop = None

    def targets(self) -> Collection[Binding]:
        """
        The bindings heartbeats go to: the NATed ones, or all with ping-all.
        """
        if self.pingAll:
            return list(self.table)
        return self.table.natBindings()  # type: ignore[return-value]

    def _startCycle(self) -> None:
        try:
            self._closeCycle()
            now = self.clock.seconds()
            self.payload.cycleStarted(now)
            self._forgetDead()
            self._cycle = self.pacer.startCycle(
                self.targets(), self.batchesPerCycle, self.batchSize
            )
            self.current = CycleReport(started=now, due=self._cycle.due)
            self.stats["cycles"] += 1
            loop = self._batchLoop = LoopingCall(self._tick)
            loop.clock = self.clock
            loop.start(self.sendInterval, now=True).addErrback(
                lambda f: log.failure("Heartbeat batch loop stopped", f)
            )
        except Exception:
            log.failure("Starting a heartbeat cycle failed")

    def _forgetDead(self) -> None:
        for tally in (self._unanswered, self._unreachable):
            if tally:
                for binding in [b for b in tally if b.expiresAt == DEAD]:
                    del tally[binding]

    def _closeCycle(self) -> None:
        self._stopBatches()
        self._batchLoop = None
        report, cycle = self.current, self._cycle
        self.current = self._cycle = None
        if report is None or cycle is None or report.duration is not None:
            # Nothing under way, or a finished cycle, reported when it ended.
            return
        report.missed = cycle.unreached()
        self._report(report)

    def _report(self, report: CycleReport) -> None:
        self.lastCycle = report
        if self.onCycle is not None and report.duration is not None:
            self.onCycle(report.duration)
        self.stats["heartbeats.missed"] += report.missed
        if report.missed:
            log.warn(
                "Heartbeat cycle overran: {missed} of {due} devices missed "
                "(sent {sent}, errors {errors}); raise SEND_ONE_TIME or PERIOD, "
                "lower SEND_INTERVAL, or choose a pacing that reaches every device "
                "(twistd natkeep --check compares them)",
                missed=report.missed,
                due=report.due,
                sent=report.sent,
                errors=report.errors,
            )
        else:
            log.info(
                "Heartbeat cycle: {sent} sent to {due} devices in {duration:.3f} s "
                "({errors} errors, {skipped} skipped, {removed} removed)",
                sent=report.sent,
                due=report.due,
                duration=report.duration or 0.0,
                errors=report.errors,
                skipped=report.skipped,
                removed=report.removed,
            )

    def _tick(self) -> None:
        try:
            report, cycle = self.current, self._cycle
            if report is None or cycle is None:
                return
            if report.batches >= self.batchesPerCycle:
                # The period's send intervals are used up; what is left is
                # counted as missed when the next period begins.
                self._stopBatches()
                return
            batch = cycle.nextBatch()
            if batch is None:
                self._finish(report)
                return
            report.batches += 1
            self._send(batch, report)
            if cycle.unreached() == 0:
                self._finish(report)
        except Exception:
            log.failure("Sending a heartbeat batch failed")

    def _stopBatches(self) -> None:
        if self._batchLoop is not None and self._batchLoop.running:
            self._batchLoop.stop()

    def _finish(self, report: CycleReport) -> None:
        self._stopBatches()
        if report.duration is None:
            report.duration = self.clock.seconds() - report.started
            self._report(report)

    def _send(self, batch: Sequence[Binding], report: CycleReport) -> None:
        now = self.clock.seconds()
        if batch:
            # Kept (not copied) for ICMP errors to find; a cycle hands each
            # batch out once and never changes it.
            self._recent.append(batch)
            self._recentIndex = None
        sent = errors = skipped = removed = 0
        fixed = self.payload.fixed
        if fixed is not None and not self.expiry.tracksHeartbeats:
            # The fast path: the same bytes for every binding.
            for binding in batch:
                if binding.expiresAt > now:
                    try:
                        binding.listener.sendto(fixed, binding.source)
                        sent += 1
                    except OSError:
                        errors += 1
                else:
                    skipped += 1
        else:
            payloadFor = self.payload.payloadFor
            tracks = self.expiry.tracksHeartbeats
            for binding in batch:
                if binding.expiresAt <= now:
                    skipped += 1
                    continue
                if tracks and not self._stillAlive(binding):
                    removed += 1
                    continue
                try:
                    binding.listener.sendto(payloadFor(binding), binding.source)
                    sent += 1
                except OSError:
                    errors += 1
        report.sent += sent
        report.errors += errors
        report.skipped += skipped
        report.removed += removed
        stats = self.stats
        stats["heartbeats.sent"] += sent
        if errors:
            stats["heartbeats.errors"] += errors
            log.debug("{n} heartbeats refused by the kernel", n=errors)
        if removed:
            stats["bindings.dead"] += removed

    def _stillAlive(self, binding: Binding) -> bool:
        """
        Ask the expiry policy whether C{binding} lives, counting the
        heartbeat about to be sent; remove it if not.
        """
        count = self.unanswered(binding)
        if not self.expiry.alive(count):
            self._unanswered.pop(binding, None)
            self.table.remove(binding)
            log.info(
                "Removed {aor} {uri}: {n} heartbeats unanswered",
                aor=binding.aor,
                uri=binding.uri,
                n=count,
            )
            return False
        self._unanswered[binding] = (count + 1, binding.callId, binding.cseq)
        return True
