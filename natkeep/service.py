"""
The wiring: one L{NatkeepService} that owns the listening sockets, the
binding table and its expiry sweep, the store and the heartbeat sender.
"""

from __future__ import annotations

import gc
import signal
import socket
import sys
from collections import Counter
from typing import Any, Callable, Optional

from twisted.application.service import MultiService, Service
from twisted.internet import defer, error
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from natkeep.bindings import Binding, BindingTable
from natkeep.config import ConfigError, Settings, parseListenAddress, sanityWarnings
from natkeep.interfaces import IBindingStore, IExpiryPolicy, IPacer, IPayload
from natkeep.registrar import Registrar, RegistrarProtocol
from natkeep.sender import HeartbeatSender
from natkeep.sip import MAX_MESSAGE_SIZE
from natkeep.store import SQLiteStore, StoreError
from natkeep.strategies import makeStrategy

log = Logger()

#: One byte more than the largest message we parse: a longer datagram is
#: read truncated but still recognised as too large, and each read does not
#: have to allocate the 64 KiB a whole UDP datagram could need.
MAX_DATAGRAM = MAX_MESSAGE_SIZE + 1

#: Socket buffers asked for; the kernel caps them at its rmem_max/wmem_max.
SOCKET_BUFFER = 4 * 1024 * 1024

#: Cyclic garbage collection thresholds.  Bindings are long-lived and form
#: no garbage cycles, yet a full collection walks every one of them: with
#: the default thresholds that costs REGISTER throughput and, with a million
#: bindings, pauses long enough to disturb the heartbeat schedule.
GC_THRESHOLDS = (50_000, 50, 100)

#: Linux's SO_SNDBUFFORCE and SO_RCVBUFFORCE, which Python's socket module
#: does not export; with CAP_NET_ADMIN they pass net.core.*mem_max.
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32 if sys.platform.startswith("linux") else None)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)

#: How often expired bindings are swept out.  Heartbeats stop at expiry
#: whatever this is; it bounds how long a dead binding holds memory.
SWEEP_INTERVAL = 1.0


class ListenerService(Service):
    """
    The registrar's UDP sockets, bound before privileges are dropped.

    @ivar listeners: the L{RegistrarProtocol} of each listening address.
    """

    def __init__(
        self,
        registrar: Registrar,
        addresses: tuple[str, ...],
        reactor: Any,
        readPause: float = 0.0,
    ) -> None:
        self.registrar = registrar
        self.addresses = addresses
        self.reactor = reactor
        self.readPause = readPause
        self.listeners: dict[str, RegistrarProtocol] = {}
        self._ports: list[Any] = []

    def privilegedStartService(self) -> None:
        self._bind()
        super().privilegedStartService()

    def startService(self) -> None:
        if not self._ports:
            self._bind()
        super().startService()

    def _bind(self) -> None:
        for address in self.addresses:
            host, port = parseListenAddress(address)
            protocol = RegistrarProtocol(self.registrar, address, self.readPause)
            try:
                listening = self.reactor.listenUDP(
                    port, protocol, interface=host, maxPacketSize=MAX_DATAGRAM
                )
            except error.CannotListenError as e:
                raise SystemExit(f"natkeep: cannot listen on {address}: {e.socketError}")
            _tuneSocket(listening)
            self.listeners[address] = protocol
            self._ports.append(listening)
            log.info("Registrar listening on UDP {address}", address=address)

    def setReadPause(self, seconds: float) -> None:
        """
        Change the read pause of every socket, and of sockets bound later.
        """
        self.readPause = seconds
        for protocol in self.listeners.values():
            protocol.readPause = seconds

    def stopService(self) -> Any:
        super().stopService()
        ports, self._ports = self._ports, []
        closed = [defer.maybeDeferred(port.stopListening) for port in ports]
        self.listeners.clear()
        return defer.gatherResults(closed)


def _tuneSocket(port: Any) -> None:
    """
    Ask for large socket buffers, so that REGISTER bursts and heartbeat
    batches are not dropped by the kernel.  With CAP_NET_ADMIN (root) the
    FORCE options pass net.core.rmem_max/wmem_max; otherwise those cap it.
    """
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    for force, plain in (
        (SO_SNDBUFFORCE, socket.SO_SNDBUF),
        (SO_RCVBUFFORCE, socket.SO_RCVBUF),
    ):
        for option in (force, plain):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                break
            except OSError:
                continue


class SweepService(Service):
    """
    Removes expired bindings every L{SWEEP_INTERVAL} seconds, and commits
    removals to the store.
    """

    def __init__(self, table: BindingTable, store: IBindingStore, clock: Any) -> None:
        self.table = table
        self.store = store
        self.clock = clock
        self._loop: Optional[LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self.clock
        self._loop.start(SWEEP_INTERVAL, now=True)

    def sweep(self) -> None:
        try:
            removed = self.table.sweep(self.clock.seconds())
            if self.store.pending():
                self.store.commit()
        except Exception:
            log.failure("Sweeping expired bindings failed")
            return
        if removed:
            log.debug("{n} bindings expired", n=removed)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class RestoreService(Service):
    """
    Loads the stored bindings into the table when natkeep starts, once the
    sockets they name are listening.
    """

    def __init__(
        self,
        store: IBindingStore,
        table: BindingTable,
        listeners: ListenerService,
        clock: Any,
    ) -> None:
        self.store = store
        self.table = table
        self.listeners = listeners
        self.clock = clock

    def startService(self) -> None:
        super().startService()
        restored = 0
        orphans: Counter[str] = Counter()
        started = self.clock.seconds()
        for row in self.store.load(started):
            listener = self.listeners.listeners.get(row.listener)
            if listener is None:
                orphans[row.listener] += 1
                continue
            self.table.add(
                Binding(
                    row.aor,
                    row.uri,
                    row.params,
                    row.source,
                    listener,
                    row.nat,
                    row.expiresAt,
                    row.callId,
                    row.cseq,
                )
            )
            restored += 1
        # What was just restored lives as long as the process: keep the
        # collector from walking it again and again.
        gc.collect()
        gc.freeze()
        for address, count in orphans.items():
            log.warn(
                "Skipped {count} stored bindings of {address}, which natkeep no "
                "longer listens on; they stay in the store until they expire",
                count=count,
                address=address,
            )
        log.info(
            "Restored {restored} bindings ({nat} behind NAT) from {path}",
            restored=restored,
            nat=self.table.natCount(),
            path=self.store.location,
        )


def _strategies(settings: Settings) -> tuple[IExpiryPolicy, IPayload, IPacer]:
    """
    The expiry policy, payload and pacer the settings name.

    @raise ConfigError: when one is not installed.
    """
    return (
        makeStrategy(IExpiryPolicy, settings.expiry, settings),
        makeStrategy(IPayload, settings.payload, settings),
        makeStrategy(IPacer, settings.pacing, settings),
    )


def _senderTiming(settings: Settings) -> dict[str, Any]:
    """
    The L{HeartbeatSender} parameters the settings give.
    """
    return {
        "period": settings.period,
        "sendInterval": settings.sendInterval / 1000,
        "sendOneTime": settings.sendOneTime,
        "batches": settings.batchesPerCycle,
        "pingAll": settings.pingAll,
    }


def _registrarOptions(settings: Settings) -> dict[str, Any]:
    """
    The L{Registrar} parameters the settings give.
    """
    return {
        "minExpires": settings.minExpires,
        "natTests": settings.natDetect,
        "sipTrace": settings.sipTrace,
    }


class NatkeepService(MultiService):
    """
    The whole of natkeep as one service.

    @ivar table: the binding table.
    @ivar registrar: the registrar logic.
    @ivar listeners: the L{ListenerService} with the sockets.
    @ivar stats: counters by name, shared by every part.
    """

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        reloadSettings: Optional[Callable[[], Settings]] = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.reloadSettings = reloadSettings
        self.stats: Counter[str] = Counter()
        self.expiry, self.payload, self.pacer = _strategies(settings)
        try:
            self.store = SQLiteStore(settings.db)
        except StoreError as e:
            raise ConfigError(str(e))
        self.table = BindingTable(removed=self.store.delete)
        self.registrar = Registrar(
            self.table,
            reactor,
            self.expiry,
            store=self.store,
            payload=self.payload,
            stats=self.stats,
            **_registrarOptions(settings),
        )
        self.listeners = ListenerService(
            self.registrar, settings.listen, reactor, settings.readPause / 1000
        )
        self.listeners.setServiceParent(self)
        RestoreService(self.store, self.table, self.listeners, reactor).setServiceParent(self)
        SweepService(self.table, self.store, reactor).setServiceParent(self)
        self.sender = HeartbeatSender(
            self.table,
            reactor,
            self.payload,
            self.pacer,
            self.expiry,
            stats=self.stats,
            **_senderTiming(settings),
        )
        self.sender.setServiceParent(self)
        if settings.status:
            from twisted.application.internet import TCPServer
            from twisted.web.server import Site

            from natkeep.status import statusResource

            host, port = parseListenAddress(settings.status)
            TCPServer(
                port, Site(statusResource(self)), interface=host, reactor=reactor
            ).setServiceParent(self)

    def reload(self) -> bool:
        """
        Re-read the settings and apply the keep-alive ones (heartbeat
        parameters, strategies, expiry limits) without touching a binding.
        A wrong config is refused and the running settings stay.

        @return: whether new settings were applied.
        """
        if self.reloadSettings is None:
            return False
        try:
            new = self.reloadSettings()
            expiry, payload, pacer = _strategies(new)
        except ConfigError as e:
            log.error("Reload refused, settings unchanged: {error}", error=str(e))
            return False
        for name in ("listen", "db", "status"):
            if getattr(new, name) != getattr(self.settings, name):
                log.warn("Reload: {name} changes only on restart", name=name)
        self.settings = new
        self.expiry = self.registrar.expiry = expiry
        self.payload = self.registrar.payload = payload
        self.pacer = pacer
        for name, value in _registrarOptions(new).items():
            setattr(self.registrar, name, value)
        self.listeners.setReadPause(new.readPause / 1000)
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
        self.sender.reconfigure(payload, pacer, expiry, **_senderTiming(new))
        return True

    def _installReloadSignal(self) -> None:
        if self.reloadSettings is None or not hasattr(signal, "SIGHUP"):
            return
        callFromThread = getattr(self.reactor, "callFromThread", None)
        if callFromThread is None:
            return
        # The handler only schedules: the reload runs in the reactor.
        signal.signal(signal.SIGHUP, lambda signum, frame: callFromThread(self.reload))

    def startService(self) -> None:
        gc.set_threshold(*GC_THRESHOLDS)
        self._installReloadSignal()
        for warning in sanityWarnings(self.settings):
            log.warn("{warning}", warning=warning)
        log.info(
            "natkeep starting: payload {payload}, pacing {pacing}, expiry "
            "{expiry}; capacity {capacity} devices per {period} s cycle",
            payload=self.settings.payload,
            pacing=self.settings.pacing,
            expiry=self.settings.expiry,
            capacity=self.settings.capacity,
            period=self.settings.period,
        )
        super().startService()

    def stopService(self) -> Any:
        # Answers held for this turn's commit leave while the sockets are open.
        self.registrar.flush()
        d = super().stopService()

        def close(result: Any) -> Any:
            self.store.close()
            return result

        return d.addBoth(close)
