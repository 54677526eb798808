"""
The clock: the heartbeat sender.

Every SS_SIP_NAT_KEEP_ALIVE_PERIOD seconds a cycle begins.  The pacer plans
it as batches; a batch leaves every SS_SIP_NAT_KEEP_ALIVE_SEND_INTERVAL
milliseconds, at most C{ceil(PERIOD*1000/INTERVAL)} batches a cycle, each
heartbeat from the socket the binding registered on to the binding's public
source address.

Nothing escapes a tick: a send error is counted and the batch goes on, and
any other failure is logged, because an exception out of a L{LoopingCall}
would stop heartbeats for good.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Collection, Optional, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from natkeep.bindings import Binding, BindingTable
from natkeep.interfaces import ICycle, IExpiryPolicy, IPacer, IPayload

log = Logger()


@attrs.define(slots=True)
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

    started: float
    due: int = 0
    sent: int = 0
    missed: int = 0
    errors: int = 0
    skipped: int = 0
    removed: int = 0
    batches: int = 0
    duration: Optional[float] = None


class HeartbeatSender(Service):
    """
    Sends heartbeats to the bindings of a table, paced by a pacer.

    @ivar lastCycle: the report of the last finished cycle.
    @ivar current: the report of the cycle under way.
    @ivar removeBinding: called to remove a binding the expiry policy gave
        up on; removes it from the table by default.
    """

    def __init__(
        self,
        table: BindingTable,
        clock: IReactorTime,
        payload: IPayload,
        pacer: IPacer,
        expiry: IExpiryPolicy,
        *,
        period: float,
        sendInterval: float,
        sendOneTime: int,
        batches: int,
        pingAll: bool = False,
        stats: Optional[Counter[str]] = None,
        removeBinding: Optional[Callable[[Binding], None]] = None,
    ) -> None:
        self.table = table
        self.clock = clock
        self.reconfigure(
            payload,
            pacer,
            expiry,
            period=period,
            sendInterval=sendInterval,
            sendOneTime=sendOneTime,
            batches=batches,
            pingAll=pingAll,
        )
        self.stats: Counter[str] = Counter() if stats is None else stats
        self.removeBinding = removeBinding or table.remove
        self.lastCycle: Optional[CycleReport] = None
        self.current: Optional[CycleReport] = None
        self._cycle: Optional[ICycle] = None
        self._periodLoop: Optional[LoopingCall] = None
        self._batchLoop: Optional[LoopingCall] = None

    def reconfigure(
        self,
        payload: IPayload,
        pacer: IPacer,
        expiry: IExpiryPolicy,
        *,
        period: float,
        sendInterval: float,
        sendOneTime: int,
        batches: int,
        pingAll: bool,
    ) -> None:
        """
        Take new strategies and timing; a running sender starts a fresh
        cycle with them at once.
        """
        running = self.running
        if running:
            self.stopService()
        self.payload: IPayload = payload
        self.pacer: IPacer = pacer
        self.expiry: IExpiryPolicy = expiry
        self.period = period
        self.sendInterval = sendInterval
        self.sendOneTime = sendOneTime
        self.batches = batches
        self.pingAll = pingAll
        if running:
            self.startService()

    @property
    def enabled(self) -> bool:
        """
        Whether heartbeats are on: an empty payload is the master switch.
        """
        return bool(self.payload.fixed != b"")

    def startService(self) -> None:
        super().startService()
        if not self.enabled:
            log.warn("SS_SIP_NAT_KEEP_ALIVE_MESSAGE is empty: heartbeats are off")
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
            self._cycle = self.pacer.startCycle(self.targets(), self.batches, self.sendOneTime)
            self.current = CycleReport(started=now, due=self._cycle.due)
            self.stats["cycles"] += 1
            loop = self._batchLoop = LoopingCall(self._tick)
            loop.clock = self.clock
            loop.start(self.sendInterval, now=True).addErrback(
                lambda f: log.failure("Heartbeat batch loop stopped", f)
            )
        except Exception:
            log.failure("Starting a heartbeat cycle failed")

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
        self.stats["heartbeats.missed"] += report.missed
        if report.missed:
            log.warn(
                "Heartbeat cycle overran: {missed} of {due} devices missed "
                "(sent {sent}, errors {errors}); raise SEND_ONE_TIME or PERIOD, "
                "lower SEND_INTERVAL, or use pacing resume or spread",
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
            if report.batches >= self.batches:
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
            expiry = self.expiry
            for binding in batch:
                if binding.expiresAt <= now:
                    skipped += 1
                    continue
                if not expiry.heartbeatDue(binding):
                    self.removeBinding(binding)
                    removed += 1
                    log.info(
                        "Removed {aor} {uri}: {n} heartbeats unanswered",
                        aor=binding.aor,
                        uri=binding.uri,
                        n=binding.unanswered,
                    )
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
