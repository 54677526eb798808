"""
The face and the wiring: C{twistd natkeep} options, and L{makeService},
which builds the whole service tree from stock Twisted services:

    MultiService
     ├─ UDPServer per listening address (a L{natkeep.protocol.SIPProtocol})
     ├─ BindingsService: restores the store on start, commits and closes it
     │   on stop
     ├─ TimerService: sweeps expired bindings every second
     ├─ HeartbeatSender
     └─ TCPServer: the status endpoint (when configured)

Process tuning (garbage collector thresholds) and the SIGHUP handler that
reloads the settings are set up here too.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from collections import Counter
from typing import Any, Callable, Mapping, Optional

import attrs
from twisted.application.internet import TCPServer, TimerService, UDPServer
from twisted.application.service import IService, MultiService, Service
from twisted.internet import error
from twisted.logger import Logger
from twisted.python import usage

from natkeep import __version__, build
from natkeep.admin import BindingsAdmin, WorkersAdmin
from natkeep.bindings import BindingTable
from natkeep.config import (
    BY_OPTION,
    ConfigError,
    Settings,
    buildSettings,
    iterOptionHelp,
    parseListenAddress,
    readConfigFile,
    splitListen,
)
from natkeep.counts import Counts
from natkeep.guard import SourceLimiter
from natkeep.handoff import Handoff, StoreDirectory, groupName, listenHandoff
from natkeep.interfaces import IBindingStore, IListener
from natkeep.media import startClient
from natkeep.metrics import Metrics
from natkeep.outbox import Outbox
from natkeep.owner import Ownership
from natkeep.protocol import MAX_DATAGRAM, FirstMatch, ListeningPort, SIPProtocol
from natkeep.registrar import Registrar
from natkeep.relay import Relay, RelayPlan
from natkeep.sender import HeartbeatSender
from natkeep.sip import Response
from natkeep.steering import workerOf
from natkeep.store import StoreError, ThreadedWriter
from natkeep.stores import openStore
from natkeep.strategies import Strategies, adviceFor, describeStrategies, makeStrategies
from natkeep.workers import Supervisor, WorkerIdentity, WorkerReporter

log = Logger(namespace="natkeep.tap")

#: Cyclic garbage collection thresholds.  Bindings are long-lived and form
#: no garbage cycles, yet a full collection walks every one of them: with
#: the default thresholds that costs REGISTER throughput and, with a million
#: bindings, pauses long enough to disturb the heartbeat schedule.
GC_THRESHOLDS = (50_000, 50, 100)

#: How often expired bindings are swept out.  Heartbeats stop at expiry
#: whatever this is; it bounds how long a dead binding holds memory.
SWEEP_INTERVAL = 1.0


class Options(usage.Options):
    """
    C{twistd natkeep} options.  Values given here override the config file,
    which overrides the defaults.
    """

    synopsis = "[options]"
    longdesc = (
        "A SIP registrar that keeps its NATed devices reachable with paced "
        "UDP heartbeats (VOS3000 SS_SIP_NAT_KEEP_ALIVE_* semantics)."
    )

    optParameters = [
        ["config", "c", None, "INI file of settings, VOS3000 key names (etc/natkeep.conf)."],
        [
            "devices",
            None,
            None,
            "With --check: plan for this many NATed devices (default: the bindings in the store).",
        ],
    ] + [[option, None, None, help] for option, help in iterOptionHelp() if option != "listen"]

    optFlags = [
        ["check", None, "Validate the config, print the capacity plan and exit."],
        ["list-strategies", None, "List the installed strategies and exit."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.argv: list[str] = []

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        # Kept as given: workers are started with the same options.
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_version(self) -> None:
        """
        Print natkeep's version and exit.
        """
        print(f"natkeep {__version__} ({build()} build)")
        raise SystemExit(0)

    def opt_listen(self, address: str) -> None:
        """
        UDP HOST:PORT to listen on; repeat for several ([::]:5060 for IPv6). [file key listen; default 0.0.0.0:5060]
        """
        self["listen"].append(address)

    def postOptions(self) -> None:
        if self["list-strategies"]:
            print(describeStrategies())
            raise SystemExit(0)
        if self["devices"] is not None:
            try:
                if int(self["devices"]) < 0:
                    raise ValueError
            except ValueError:
                raise usage.UsageError("--devices takes a whole number of devices")

    def settings(self) -> Settings:
        """
        The checked settings these options and their config file give.

        @raise ConfigError: naming the key, the value and what is allowed.
        """
        fileValues: dict[str, str] = {}
        self.warnings: list[str] = []
        if self["config"]:
            fileValues, self.warnings = readConfigFile(self["config"])
        cli: dict[str, Optional[object]] = {}
        for option in BY_OPTION:
            if option == "listen":
                cli[option] = self["listen"] or None
            else:
                # Yes/no settings take the file's spellings too.
                cli[option] = self[option]
        return buildSettings(fileValues, cli)


class ListenerServer(UDPServer):
    """
    A L{UDPServer} on a L{ListeningPort} (which reads the ICMP errors the
    heartbeats draw), that ends start-up with one line naming the address
    when it cannot bind.
    """

    def __init__(
        self,
        protocol: SIPProtocol,
        reactor: Any,
        recordLocal: bool = False,
        inherited: Optional[int] = None,
    ) -> None:
        host, port = parseListenAddress(protocol.address)
        super().__init__(
            port, protocol, interface=host, maxPacketSize=MAX_DATAGRAM, reactor=reactor
        )
        self.address = protocol.address
        self.recordLocal = recordLocal
        self.inherited = inherited

    def _getPort(self) -> Any:
        port, protocol = self.args
        listening = ListeningPort(port, protocol, reactor=self.reactor, **self.kwargs)
        if self.inherited is not None:
            # A worker's socket, bound by the parent in its steered group.
            family = socket.AF_INET6 if ":" in self.kwargs["interface"] else socket.AF_INET
            inherited: Any = socket.socket(family, socket.SOCK_DGRAM, fileno=self.inherited)
            listening._preexistingSocket = inherited
        listening.recordLocal = self.recordLocal
        try:
            listening.startListening()
            return listening
        except error.CannotListenError as e:
            raise SystemExit(f"natkeep: cannot listen on {self.address}: {e.socketError}")


class BindingsService(Service):
    """
    The binding store's life: on start, the stored bindings come back into
    the table on the sockets they name (which exist by then); on stop, the
    answers held for this turn's commit leave while the sockets are still
    open, and the store closes.
    """

    def __init__(
        self,
        store: IBindingStore,
        table: BindingTable,
        listeners: Mapping[str, IListener],
        outbox: Outbox,
        clock: Any,
        writer: Optional[ThreadedWriter] = None,
        stats: Optional[Counts] = None,
        ownership: Optional[Ownership] = None,
        share: Optional[Callable[[str], bool]] = None,
    ) -> None:
        #: Whether a device at this host is this process's (a worker's
        #: share of the store); every device when L{None}.
        self.share = share
        self.store = store
        self.table = table
        self.listeners = listeners
        self.ownership = Ownership(listeners) if ownership is None else ownership
        self.outbox = outbox
        self.clock = clock
        self.writer = writer
        self.stats: Counts = Counts() if stats is None else stats

    def startService(self) -> None:
        super().startService()
        self.ownership.check()
        restored = self._restore(self.ownership.held)
        # What was just restored lives as long as the process: keep the
        # collector from walking it again and again.
        gc.collect()
        gc.freeze()
        for address in sorted(set(self.listeners) - self.ownership.held):
            log.warn(
                "{address} is not configured on this host: its bindings stay in the store "
                "until it is (a standby for a floating address)",
                address=address,
            )
        log.info(
            "Restored {restored} bindings ({nat} behind NAT) from {path}",
            restored=restored,
            nat=self.table.natCount(),
            path=self.store.location,
        )
        if self.writer is not None:
            self.writer.start()

    def _restore(self, addresses: set[str]) -> int:
        """
        Bring the stored bindings of the listening C{addresses} into the
        table (those not there already); warn of bindings of addresses
        natkeep does not listen on at all.

        @return: how many came.
        """
        restored = 0
        orphans: Counter[str] = Counter()
        table = self.table
        share = self.share
        for row in self.store.load(self.clock.seconds()):
            if row.listener not in addresses:
                if row.listener not in self.listeners:
                    orphans[row.listener] += 1
                continue
            if share is not None and not share(row.host):
                continue
            if table.get(row.aor, row.uri) is not None:
                continue
            table.add(row.restore(self.listeners[row.listener]))
            restored += 1
        for address, count in orphans.items():
            log.warn(
                "Skipped {count} stored bindings of {address}, which natkeep no "
                "longer listens on; they stay in the store until they expire",
                count=count,
                address=address,
            )
        return restored

    def checkOwnership(self) -> None:
        """
        Take over the bindings of listening addresses that became local
        (restored from the store: heartbeats resume), and let go of those
        of addresses that left (out of the table, kept in the store).
        """
        gained, lost = self.ownership.check()
        if lost:
            leaving = [b for b in self.table if b.listener.address in lost]
            for binding in leaving:
                self.table.remove(binding, durable=False)
            log.warn(
                "{addresses} left this host: {n} bindings left to the node that holds it",
                addresses=", ".join(sorted(lost)),
                n=len(leaving),
            )
        if gained:
            restored = self._restore(gained)
            log.warn(
                "{addresses} came to this host: restored {n} bindings from {path}",
                addresses=", ".join(sorted(gained)),
                n=restored,
                path=self.store.location,
            )

    def stopService(self) -> Any:
        super().stopService()
        d = self.outbox.drain()

        def close(_: object) -> None:
            if self.writer is not None:
                self.writer.stop()
            try:
                self.store.close()
            except Exception as e:
                log.error("Closing the binding store failed: {error}", error=str(e))

        return d.addCallback(close)

    def sweep(self) -> None:
        """
        Remove every expired binding and commit the removals (a failure is
        logged by the outbox, and the writes kept); and check that the
        database is still the one opened, writing it anew from memory when
        it was deleted or replaced underneath.
        """
        try:
            removed = self.table.sweep(self.clock.seconds())
            if removed:
                log.debug("{n} bindings expired", n=removed)
            self.checkOwnership()
            if self.outbox.idle():
                self._verify()
            if self.store.pending():
                self.outbox.commitSoon()
        except Exception:
            log.failure("Sweeping expired bindings failed")

    def _verify(self) -> None:
        problem = self.store.verify()
        if problem is None:
            return
        self.stats["store.rewrites"] += 1
        log.error(
            "Binding database {location} was {problem} while natkeep ran; writing the "
            "{n} bindings in memory to it anew",
            location=self.store.location,
            problem=problem,
            n=len(self.table),
        )
        self.store.reopen()
        for binding in self.table:
            self.store.put(binding)


class Natkeep:
    """
    All of natkeep's parts, wired, and the service tree that runs them.

    @ivar service: the root of the service tree.
    @ivar protocols: the listening socket of each configured address.
    @ivar stats: counters by name, shared by every part.
    """

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        reloadSettings: Optional[Callable[[], Settings]] = None,
        worker: Optional[WorkerIdentity] = None,
    ) -> None:
        """
        @param worker: what makes this process a worker of several, if it
            is one: its sockets are inherited, and it serves its share.

        @raise ConfigError: when a strategy is not installed or the store
            cannot be used.
        """
        self.settings = settings
        self.worker = worker
        self.reactor = reactor
        self.reloadSettings = reloadSettings
        self.stats: Counts = Counts()
        # Shown as 0 from the start, where a scrape expects them.
        for name in ("heartbeats.unreachable", "bindings.unreachable", "icmp.errors"):
            self.stats[name] = 0
        strategies = makeStrategies(settings)
        try:
            self.store = openStore(settings.db)
        except StoreError as e:
            raise ConfigError(str(e))
        self.table = BindingTable(removed=self.store.delete)
        # Commits on the store's own thread where the reactor runs threads.
        self.writer = (
            ThreadedWriter(reactor, self.store) if hasattr(reactor, "callFromThread") else None
        )
        self.outbox = Outbox(reactor, self.store, self.stats, writer=self.writer)
        self.registrar = Registrar(
            self.table, reactor, self.outbox, strategies.expiry, store=self.store
        )
        self.sender = HeartbeatSender(self.table, reactor, settings, strategies, self.stats)
        self.protocols: dict[str, SIPProtocol] = {}
        for entry in settings.listen:
            address, advertise = splitListen(entry)
            self.protocols[address] = SIPProtocol(
                address,
                self.registrar,
                self.outbox,
                reactor,
                self.stats,
                self._responseReceived,
                self.sender.responseDatagram,
                onUnreachable=self.sender.unreachable,
                advertise=advertise,
            )
        self.limiter = SourceLimiter(
            reactor, settings.rateLimit, settings.rateBurst, settings.rateExempt, self.stats
        )
        for protocol in self.protocols.values():
            protocol.limiter = self.limiter
        self.relay = Relay(
            self.registrar,
            self.table,
            reactor,
            self.outbox,
            list(self.protocols.values()),
            self.stats,
            secret=None if worker is None else worker.secret,
        )
        for protocol in self.protocols.values():
            protocol.controller = self.relay
        #: What the sockets offer answers to unparsed while relaying: the
        #: heartbeats' matcher first (no cost unless the payload is
        #: options), then the relay's.
        self._matchAnswers = FirstMatch(self.sender.responseDatagram, self.relay.responseDatagram)
        self.handoff: Optional[Handoff] = None
        if worker is not None and worker.count > 1:
            self.handoff = listenHandoff(
                reactor,
                worker.index,
                worker.count,
                groupName(),
                StoreDirectory(self.store.reader),
                self.stats,
                self._handedOff,
            )
            self.relay.handoff = self.handoff
            self.handoff.forget = self._movedAway
            handoff = self.handoff
            self.registrar.onAdded = lambda binding: handoff.added(binding.aor, binding.uri)
        self.metrics: Optional[Metrics] = None
        self.admin: Optional[BindingsAdmin] = None
        self._apply(settings, strategies)

        self.service = MultiService()
        share: Optional[Callable[[str], bool]] = None
        for protocol in self.protocols.values():
            # A relaying wildcard socket writes the address each datagram
            # arrived on into Via and Record-Route.
            ListenerServer(
                protocol,
                reactor,
                bool(settings.upstream),
                None if worker is None else worker.sockets.get(protocol.address),
            ).setServiceParent(self.service)
        if worker is not None:
            index, count = worker.index, worker.count
            share = lambda host: workerOf(host, count) == index  # noqa: E731
            WorkerReporter(self._workerReport, reactor, self._answerParent).setServiceParent(
                self.service
            )
        self.bindings = BindingsService(
            self.store,
            self.table,
            self.protocols,
            self.outbox,
            reactor,
            self.writer,
            self.stats,
            share=share,
        )
        self.bindings.setServiceParent(self.service)
        sweeper = TimerService(SWEEP_INTERVAL, self.bindings.sweep)
        sweeper.clock = reactor
        sweeper.setServiceParent(self.service)
        self.sender.setServiceParent(self.service)
        if settings.status or worker is not None:
            # A worker answers its parent's admin requests (see _answerParent).
            self.admin = BindingsAdmin(
                self.table, reactor, self.outbox.flush, settings.adminToken, self.stats
            )
        if settings.status or worker is not None:
            # A worker observes its histograms for its parent to sum.
            self.metrics = Metrics(self.snapshot, __version__)
            self.sender.onCycle = self.metrics.cycleFinished
            if self.relay.mediaClient is not None:
                self.relay.mediaClient.onLatency = self.metrics.ngAnswered
        if settings.status:
            assert self.metrics is not None
            _statusServer(
                settings.status, self.snapshot, self.metrics.render, self.admin, reactor
            ).setServiceParent(self.service)

    def _workerReport(self) -> dict[str, Any]:
        # What a worker tells its parent every second: its status, and its
        # histograms for the parent's /metrics.
        report = self.snapshot()
        if self.metrics is not None:
            report["histograms"] = self.metrics.histograms()
        return report

    def _answerParent(self, question: dict[str, Any]) -> dict[str, Any]:
        # An admin request the parent authorised, for this worker's table.
        request = question.get("admin") or {}
        assert self.admin is not None
        status, body = self.admin.answer(
            str(request.get("method", "GET")).encode("ascii"),
            [p.encode("utf-8", "surrogateescape") for p in request.get("postpath", [])],
            {
                k.encode("utf-8", "surrogateescape"): [
                    v.encode("utf-8", "surrogateescape") for v in values
                ]
                for k, values in (request.get("args") or {}).items()
            },
        )
        return {"status": status, "body": body}

    def _movedAway(self, aor: str, uri: str) -> None:
        # Another worker took this device (it registered from an address
        # steered there): drop this copy, and leave the store to the new one.
        binding = self.table.get(aor, uri)
        if binding is not None:
            self.table.remove(binding, durable=False)
            self.stats["workers.moved"] += 1
            log.info("{aor} {uri} registered at another worker; dropped here", aor=aor, uri=uri)

    def _handedOff(self, listener: int, data: bytes, source: tuple[str, int]) -> None:
        # Another worker's datagram about one of this worker's devices.
        protocols = list(self.protocols.values())
        if 0 <= listener < len(protocols):
            protocols[listener].datagramReceived(data, source)

    def _responseReceived(self, response: Response, source: tuple[str, int]) -> None:
        # Answers to relayed requests go on; the rest are heartbeats'.
        if not self.relay.responseReceived(response, source):
            self.sender.responseReceived(response, source)

    def _apply(
        self, settings: Settings, strategies: Strategies, plan: Optional[RelayPlan] = None
    ) -> None:
        self.settings = settings
        if settings.mediaProxy and self.relay.mediaClient is None:
            self.relay.mediaClient = startClient(self.reactor, self.reactor, self.stats)
            if self.metrics is not None:
                self.relay.mediaClient.onLatency = self.metrics.ngAnswered
        self.relay.configure(settings, plan)
        self.limiter.configure(settings.rateLimit, settings.rateBurst, settings.rateExempt)
        self.outbox.configure(settings)
        self.registrar.configure(settings, strategies)
        matcher = (
            self._matchAnswers if self.relay.upstream is not None else self.sender.responseDatagram
        )
        for protocol in self.protocols.values():
            protocol.configure(settings)
            protocol.onResponseDatagram = matcher
        self.sender.configure(settings, strategies)
        if self.admin is not None:
            self.admin.token = settings.adminToken

    def logStart(self) -> None:
        """
        Log what natkeep starts with, and every warning about it.
        """
        settings = self.settings
        for warning in adviceFor(settings):
            log.warn("{warning}", warning=warning)
        log.info(
            "natkeep {version} ({build} build){worker} starting: payload {payload}, pacing "
            "{pacing}, expiry {expiry}; capacity {capacity} devices per {period} s cycle",
            version=__version__,
            build=build(),
            worker=""
            if self.worker is None
            else f" worker {self.worker.index} of {self.worker.count}, pid {os.getpid()},",
            payload=settings.payload,
            pacing=settings.pacing,
            expiry=settings.expiry,
            capacity=settings.capacity,
            period=settings.period,
        )

    def reload(self) -> bool:
        """
        Re-read the settings and apply the keep-alive ones (heartbeat
        parameters, strategies, expiry limits, NAT tests, read pause, SIP
        trace) without touching a binding.  A wrong config is refused and
        the running settings stay.

        @return: whether new settings were applied.
        """
        if self.reloadSettings is None:
            return False
        try:
            new = self.reloadSettings()
            strategies = makeStrategies(new)
            plan = self.relay.prepare(new)
        except ConfigError as e:
            log.error("Reload refused, settings unchanged: {error}", error=str(e))
            return False
        _warnRestartOnly(new, self.settings, RESTART_ONLY)
        for warning in adviceFor(new):
            log.warn("{warning}", warning=warning)
        log.info(
            "Reloaded settings: period {period} s, interval {interval} ms, {oneTime} "
            "per batch, payload {payload}, pacing {pacing}, expiry {expiry}; "
            "{bindings} bindings kept",
            period=new.period,
            interval=new.sendInterval,
            oneTime=new.sendOneTime,
            payload=new.payload,
            pacing=new.pacing,
            expiry=new.expiry,
            bindings=len(self.table),
        )
        self._apply(new, strategies, plan)
        # keepalived's notify script sends SIGHUP when the floating
        # address arrives: take its bindings over now.
        self.bindings.checkOwnership()
        return True

    def snapshot(self) -> dict[str, Any]:
        """
        What the status endpoint shows, as plain data.
        """
        settings = self.settings
        last = self.sender.lastCycle
        return {
            "build": build(),
            "pid": os.getpid(),
            "bindings": len(self.table),
            "nat_bindings": self.table.natCount(),
            "store": self.outbox.status(),
            "media": None if self.relay.media is None else self.relay.media.status(),
            "settings": {
                "period_s": settings.period,
                "send_interval_ms": settings.sendInterval,
                "send_one_time": settings.sendOneTime,
                "capacity": settings.capacity,
                "payload": settings.payload,
                "pacing": settings.pacing,
                "expiry": settings.expiry,
                "heartbeats_enabled": self.sender.enabled,
            },
            "last_cycle": None
            if last is None
            else {
                "started": last.started,
                "duration_s": last.duration,
                "due": last.due,
                "sent": last.sent,
                "missed": last.missed,
                "errors": last.errors,
                "skipped": last.skipped,
                "removed": last.removed,
            },
            "counters": dict(sorted(self.stats.items())),
        }


def _checkLogFormat(settings: Settings, options: Options) -> None:
    """
    twistd picks its log observer before natkeep is built: a JSON log
    format needs twistd's C{--logger} naming natkeep's JSON observer
    (C{natkeep run} passes it).

    @raise ConfigError: when the format asked for is not the one twistd
        was started with.
    """
    from natkeep.logs import JSON_LOGGER, jsonLogger

    parent = getattr(options, "parent", None)
    chosen = parent.get("logger") if parent is not None else None
    if settings.logFormat == "json" and chosen is not jsonLogger:
        raise ConfigError(
            f"log_format = json needs twistd --logger {JSON_LOGGER} "
            "(natkeep run --log-format json passes it)"
        )


def makeService(options: Options) -> IService:
    """
    Build the natkeep service tree, tune the process and install the
    SIGHUP reload, or exit with one line naming what is wrong.
    """
    from twisted.internet import reactor

    try:
        worker = WorkerIdentity.fromEnvironment(os.environ)
    except ValueError as e:
        raise SystemExit(f"natkeep: error: malformed worker environment: {e}")
    try:
        settings = options.settings()
        for warning in options.warnings:
            sys.stderr.write(f"natkeep: warning: {warning}\n")
        if options["check"]:
            from natkeep.plan import printPlan

            raise SystemExit(printPlan(settings, options["devices"], sys.stdout))
        _checkLogFormat(settings, options)
        if worker is None and settings.workers > 1:
            return _supervise(settings, options, reactor)
        reloadSettings = options.settings
        if worker is not None:
            settings = worker.workerSettings(settings)
            reloadSettings = lambda: worker.workerSettings(options.settings())  # noqa: E731
        natkeep = Natkeep(settings, reactor, reloadSettings=reloadSettings, worker=worker)
    except ConfigError as e:
        raise SystemExit(f"natkeep: error: {e}")
    gc.set_threshold(*GC_THRESHOLDS)
    _onHangup(reactor, natkeep.reload)
    natkeep.logStart()
    return natkeep.service


def _onHangup(reactor: Any, action: Callable[[], object]) -> None:
    if hasattr(signal, "SIGHUP"):
        # The handler only schedules: the action runs in the reactor.
        signal.signal(
            signal.SIGHUP,
            lambda signum, frame: reactor.callFromThread(action),
        )


def _supervise(settings: Settings, options: Options, reactor: Any) -> IService:
    """
    The parent of C{settings.workers} workers: their sockets, their lives,
    and the status endpoint that shows them all.

    @raise ConfigError: when the settings cannot be shared out.
    """
    if settings.db == ":memory:":
        raise ConfigError(
            "workers > 1 needs a store the workers share: db = a SQLite file or "
            "postgresql://..., not :memory:"
        )
    # The parent opens the store once, before any worker: it switches an
    # SQLite file to WAL and brings the schema up to date alone, where
    # workers starting together would race for the file's lock (a switch to
    # WAL does not wait for it).  A store that cannot be used stops the
    # start here, once, rather than every worker in turn.
    try:
        openStore(settings.db).close()
    except StoreError as e:
        raise ConfigError(str(e))
    supervisor = Supervisor(settings, options.argv, reactor)
    supervisor.bind()
    service = MultiService()
    supervisor.setServiceParent(service)
    admin = WorkersAdmin(supervisor.ask, settings.adminToken)
    if settings.status:
        metrics = Metrics(supervisor.snapshot, __version__, merged=True)
        _statusServer(
            settings.status, supervisor.snapshot, metrics.render, admin, reactor
        ).setServiceParent(service)

    def reload() -> None:
        _reloadParent(supervisor, admin, options)
        supervisor.reload()

    _onHangup(reactor, reload)
    return service


#: Settings a reload cannot change in a running process.
RESTART_ONLY = ("listen", "db", "status")


def _warnRestartOnly(new: Settings, running: Settings, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(new, name) != getattr(running, name):
            log.warn("Reload: {name} changes only on restart", name=name)


def _reloadParent(supervisor: Supervisor, admin: WorkersAdmin, options: Options) -> None:
    """
    SIGHUP in the parent of workers: take what the parent itself uses from
    the config file again (the admin token, the pace it shares out), and
    say which changes wait for a restart.  Broken settings leave the parent
    as it was; each worker judges them for itself.
    """
    try:
        fresh = options.settings()
    except ConfigError as e:
        log.error("Reload refused by the parent: {error}", error=str(e))
        return
    current = supervisor.settings
    _warnRestartOnly(fresh, current, RESTART_ONLY + ("workers",))
    supervisor.settings = attrs.evolve(
        current, adminToken=fresh.adminToken, sendOneTime=fresh.sendOneTime
    )
    admin.token = fresh.adminToken or None
    log.info("Reloaded the parent's settings (admin token, SEND_ONE_TIME)")


def _statusServer(
    address: str,
    snapshot: Callable[[], dict[str, Any]],
    metrics: Callable[[], bytes],
    admin: Any,
    reactor: Any,
) -> TCPServer:
    """
    The status endpoint (C{/status}, C{/metrics}, C{/bindings}) on the TCP
    C{address}.
    """
    from twisted.web.server import Site

    from natkeep.status import GuardedFactory, statusResource

    host, port = parseListenAddress(address)
    site = GuardedFactory(Site(statusResource(snapshot, metrics, admin), reactor=reactor), reactor)
    return TCPServer(port, site, interface=host, reactor=reactor)
