"""
Every core: C{workers = N} runs N natkeep processes behind one parent.

The parent binds each listening address N times in one C{SO_REUSEPORT}
group, steered by source IP (L{natkeep.steering}), and starts worker I with
socket I of each address.  A worker is a whole natkeep (registrar, relay,
sender, store) that restores and serves only the devices the kernel steers
to it; they all share the one binding store.

Each worker's file descriptors:

  - 0: the parent's control pipe: JSON lines asking the worker something
    (an admin API request, answered on the report pipe).  When it closes,
    the parent is gone and the worker stops (no orphans).
  - 1, 2: pipes to the parent.  A worker logs JSON lines (natkeep's JSON
    observer) to standard output, and the parent logs each event again,
    through its own observer, as "worker I: ..." under the event's own
    namespace and level: one log, in the parent's format, written by one
    process.  Lines on standard error (start-up failures) are logged as
    errors.
  - 3: the worker's report pipe: a JSON line of its status snapshot every
    second, which the parent merges for C{/status} and C{/metrics}.
  - 4 on: the worker's socket of each listening address, in C{listen} order.

The parent restarts a worker that ends while the service runs (after a
second, then longer if it keeps ending), sends SIGHUP on to every worker,
and stops them all, SIGTERM and then SIGKILL, when it stops.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from typing import Any, Callable, Mapping, Optional

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel
from twisted.python.failure import Failure

from natkeep.config import Settings, splitListen
from natkeep.logs import JSON_LOGGER
from natkeep.metrics import mergeHistograms
from natkeep.steering import sharedSockets

log = Logger(namespace="natkeep.workers")

#: The environment variables that make a natkeep process a worker.
WORKER_ENV = "NATKEEP_WORKER"
SOCKETS_ENV = "NATKEEP_WORKER_SOCKETS"
SECRET_ENV = "NATKEEP_WORKER_SECRET"

#: The descriptor of a worker's report pipe, and of its first socket.
REPORT_FD = 3
FIRST_SOCKET_FD = 4

#: Seconds between a worker's reports.
REPORT_INTERVAL = 1.0

#: Restart delays: the first, and the most a worker that keeps ending waits.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0

#: A worker that ran this long before it ended is restarted at once again.
STABLE_AFTER = 60.0

#: Seconds a stopping worker has before it is killed.
STOP_TIMEOUT = 15.0

#: Report lines longer than this are not a snapshot: dropped, logged.
MAX_REPORT = 1 << 20

#: Seconds the parent waits for the workers' answers to a question.
ASK_TIMEOUT = 5.0


class WorkerIdentity:
    """
    What makes this process worker C{index} of C{count}: read from the
    environment the parent started it with.

    @ivar sockets: the inherited socket descriptor of each listening
        address.
    """

    def __init__(
        self, index: int, count: int, sockets: Mapping[str, int], secret: Optional[bytes] = None
    ) -> None:
        self.index = index
        self.count = count
        self.sockets = dict(sockets)
        #: The secret of flow tokens and relayed Vias, the same in every
        #: worker (one worker reads what another wrote) and across a
        #: worker's restarts.
        self.secret = secret

    @classmethod
    def fromEnvironment(cls, environ: Mapping[str, str]) -> Optional[WorkerIdentity]:
        """
        The identity in C{environ}, or L{None} for a process that is no
        worker.

        @raise ValueError: when the variables are malformed.
        """
        value = environ.get(WORKER_ENV)
        if not value:
            return None
        index, _, count = value.partition("/")
        sockets: dict[str, int] = {}
        for item in filter(None, environ.get(SOCKETS_ENV, "").split(",")):
            address, _, fd = item.rpartition("=")
            sockets[address] = int(fd)
        secret = environ.get(SECRET_ENV)
        identity = cls(int(index), int(count), sockets, bytes.fromhex(secret) if secret else None)
        if not 0 <= identity.index < identity.count:
            raise ValueError(f"{WORKER_ENV}={value}")
        return identity

    def workerSettings(self, settings: Settings) -> Settings:
        """
        The settings this worker runs: its share of SEND_ONE_TIME (so that
        the workers together send at the configured pace), and no status
        endpoint (the parent serves it).
        """
        return attrs.evolve(
            settings,
            sendOneTime=max(1, math.ceil(settings.sendOneTime / self.count)),
            status=None,
        )


class _Reports(Protocol):
    """
    The worker's end of the control pipe (read: questions; its end means
    the parent is gone) and of the report pipe (written).
    """

    def __init__(
        self,
        parentGone: Callable[[], None],
        answer: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> None:
        self.parentGone = parentGone
        self.answer = answer
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            try:
                question = json.loads(line)
                reply = {"reply": question["id"], **self.answer(question)}
            except Exception:
                log.failure("Answering the parent failed")
                continue
            transport: Any = self.transport
            transport.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        self._buffer = self._buffer[-MAX_REPORT:]

    def connectionLost(self, reason: Failure = Failure(Exception("closed"))) -> None:
        self.parentGone()


class WorkerReporter(Service):
    """
    In a worker: write the status snapshot to the parent every second, and
    stop the process when the parent goes.
    """

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        reactor: Any,
        answer: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None,
    ) -> None:
        self.snapshot = snapshot
        self.reactor = reactor
        self.answer = answer or (lambda question: {"status": 404, "body": {}})
        self._call: Any = None
        self._stdio: Any = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import stdio

        standardIO: Any = stdio.StandardIO
        self._stdio = standardIO(
            _Reports(self._parentGone, self.answer),
            stdin=0,
            stdout=REPORT_FD,
            reactor=self.reactor,
        )
        self._report()

    def _report(self) -> None:
        try:
            line = json.dumps(self.snapshot(), separators=(",", ":")).encode() + b"\n"
            self._stdio.write(line)
        except Exception:
            log.failure("Reporting to the parent failed")
        self._call = self.reactor.callLater(REPORT_INTERVAL, self._report)

    def _parentGone(self) -> None:
        if self.running:
            log.warn("The parent process is gone: this worker stops")
            self.reactor.stop()

    def stopService(self) -> Any:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        return None


class _WorkerProcess(ProcessProtocol):
    transport: Any

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self._buffer = b""
        self._lines: dict[int, bytes] = {1: b"", 2: b""}

    def _logged(self, childFD: int, data: bytes) -> None:
        buffered = self._lines[childFD] + data
        *lines, rest = buffered.split(b"\n")
        self._lines[childFD] = rest[-MAX_REPORT:]
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip()
            if not text:
                continue
            if childFD == 2:
                log.error("worker {worker}: {text}", worker=self.index, text=text)
                continue
            try:
                record = json.loads(text)
                level = LogLevel.levelWithName(str(record.get("level", "info")))
                namespace = str(record.get("namespace") or "natkeep")
                message = str(record.get("message", ""))
                if record.get("failure"):
                    message += "\n" + str(record["failure"])
            except (ValueError, AttributeError, InvalidLogLevelError):
                level, namespace, message = LogLevel.info, "natkeep", text
            Logger(namespace=namespace).emit(
                level, "worker {worker}: {text}", worker=self.index, text=message
            )

    def connectionMade(self) -> None:
        self.supervisor._started(self.index, self)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD in (1, 2):
            self._logged(childFD, data)
            return
        if childFD != REPORT_FD:
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            try:
                report = json.loads(line)
            except ValueError:
                log.warn("Worker {index} sent a report that is not JSON", index=self.index)
                continue
            if isinstance(report, dict) and "reply" in report:
                self.supervisor._answered(self.index, report)
            elif isinstance(report, dict):
                self.supervisor.reports[self.index] = report
        if len(self._buffer) > MAX_REPORT:
            log.warn("Worker {index} sent an overlong report line", index=self.index)
            self._buffer = b""

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._ended(self.index, self, reason)


class Supervisor(Service):
    """
    The parent of C{settings.workers} worker processes (see the module
    docstring).

    @ivar reports: each worker's latest status snapshot, by index.
    @ivar restarts: how often each worker was restarted.
    """

    def __init__(
        self,
        settings: Settings,
        argv: list[str],
        reactor: Any,
    ) -> None:
        self.settings = settings
        self.count = settings.workers
        self.argv = list(argv)
        self.reactor = reactor
        self.sockets: dict[str, list[Any]] = {}
        self.processes: dict[int, _WorkerProcess] = {}
        self.reports: dict[int, dict[str, Any]] = {}
        self.restarts = [0] * self.count
        self._startedAt = [0.0] * self.count
        self._delay = [RESTART_DELAY] * self.count
        self._pending: dict[int, Any] = {}
        self._stopped: Optional[defer.Deferred[None]] = None
        self.secret = os.urandom(32)
        self._questions = 0
        self._asked: dict[int, tuple[set[int], list[dict[str, Any]], Any]] = {}

    def bind(self) -> None:
        """
        Bind every listening address's socket group.

        @raise SystemExit: with one line naming the address that failed.
        """
        for entry in self.settings.listen:
            address, _ = splitListen(entry)
            try:
                self.sockets[address] = sharedSockets(address, self.count)
            except OSError as e:
                raise SystemExit(f"natkeep: cannot listen on {address}: {e.strerror}")

    def startService(self) -> None:
        super().startService()
        if not self.sockets:
            self.bind()
        log.info(
            "natkeep starting {count} workers on {addresses}, steered by source IP",
            count=self.count,
            addresses=", ".join(self.sockets),
        )
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: "r", REPORT_FD: "r"}
        mapping = []
        for offset, (address, group) in enumerate(self.sockets.items()):
            fd = FIRST_SOCKET_FD + offset
            childFDs[fd] = group[index].fileno()
            mapping.append(f"{address}={fd}")
        env = dict(os.environ)
        env[WORKER_ENV] = f"{index}/{self.count}"
        env[SOCKETS_ENV] = ",".join(mapping)
        env[SECRET_ENV] = self.secret.hex()
        args = [
            sys.executable,
            "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "-n",
            "--pidfile=",
            "--logger",
            JSON_LOGGER,
            "natkeep",
            *self.argv,
        ]
        self._startedAt[index] = self.reactor.seconds()
        self.reactor.spawnProcess(
            _WorkerProcess(self, index), sys.executable, args, env=env, childFDs=childFDs
        )

    def _started(self, index: int, process: _WorkerProcess) -> None:
        self.processes[index] = process
        log.info("Worker {index} started (pid {pid})", index=index, pid=process.transport.pid)

    def _ended(self, index: int, process: _WorkerProcess, reason: Failure) -> None:
        if self.processes.get(index) is process:
            del self.processes[index]
        self.reports.pop(index, None)
        if self._stopped is not None:
            if not self.processes:
                self._stopped.callback(None)
            return
        if not self.running:
            return
        ran = self.reactor.seconds() - self._startedAt[index]
        if ran >= STABLE_AFTER:
            self._delay[index] = RESTART_DELAY
        delay = self._delay[index]
        self._delay[index] = min(MAX_RESTART_DELAY, delay * 2)
        self.restarts[index] += 1
        log.error(
            "Worker {index} ended ({reason}) after {ran:.1f} s; restarting it in {delay:.0f} s",
            index=index,
            reason=reason.getErrorMessage(),
            ran=ran,
            delay=delay,
        )
        self._pending[index] = self.reactor.callLater(delay, self._spawn, index)

    def ask(self, question: dict[str, Any]) -> defer.Deferred[list[dict[str, Any]]]:
        """
        Ask every running worker C{question}; fire with the answers that
        came within L{ASK_TIMEOUT}.
        """
        self._questions += 1
        number = self._questions
        waiting = set(self.processes)
        answers: list[dict[str, Any]] = []
        d: defer.Deferred[list[dict[str, Any]]] = defer.Deferred()
        timer = self.reactor.callLater(ASK_TIMEOUT, self._askedDone, number)
        self._asked[number] = (waiting, answers, (d, timer))
        line = json.dumps({"id": number, **question}, separators=(",", ":")).encode() + b"\n"
        for index in sorted(waiting):
            try:
                self.processes[index].transport.writeToChild(0, line)
            except Exception:
                waiting.discard(index)
        if not waiting:
            self._askedDone(number)
        return d

    def _answered(self, index: int, reply: dict[str, Any]) -> None:
        asked = self._asked.get(reply.get("reply", -1))
        if asked is None:
            return
        waiting, answers, _ = asked
        if index in waiting:
            waiting.discard(index)
            answers.append(reply)
        if not waiting:
            self._askedDone(reply["reply"])

    def _askedDone(self, number: int) -> None:
        asked = self._asked.pop(number, None)
        if asked is None:
            return
        _, answers, (d, timer) = asked
        if timer.active():
            timer.cancel()
        d.callback(answers)

    def signalAll(self, signum: int) -> None:
        """
        Send C{signum} to every running worker.
        """
        for process in list(self.processes.values()):
            try:
                process.transport.signalProcess(signum)
            except Exception as e:
                log.warn("Signalling a worker failed: {error}", error=str(e))

    def reload(self) -> None:
        """
        SIGHUP: every worker reloads its settings (each logs its outcome).
        """
        log.info("Reload: SIGHUP sent on to {n} workers", n=len(self.processes))
        self.signalAll(signal.SIGHUP)

    def stopService(self) -> Any:
        super().stopService()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        if not self.processes:
            self._close()
            return None
        self._stopped = defer.Deferred()
        self.signalAll(signal.SIGTERM)
        kill = self.reactor.callLater(STOP_TIMEOUT, self.signalAll, signal.SIGKILL)

        def done(_: object) -> None:
            if kill.active():
                kill.cancel()
            self._close()

        return self._stopped.addCallback(done)

    def _close(self) -> None:
        for group in self.sockets.values():
            for sock in group:
                sock.close()

    def snapshot(self) -> dict[str, Any]:
        """
        The workers' snapshots merged: counts and counters summed, the
        settings of one, and each worker's own figures under C{workers}.
        """
        return mergeSnapshots(
            [self.reports.get(i) for i in range(self.count)],
            [
                {
                    "index": i,
                    "pid": self.processes[i].transport.pid if i in self.processes else None,
                    "restarts": self.restarts[i],
                }
                for i in range(self.count)
            ],
            self.settings.sendOneTime,
        )


#: Fields of the last cycle that are a count (summed over the workers).
_CYCLE_COUNTS = ("due", "sent", "missed", "errors", "skipped", "removed")


def mergeSnapshots(
    reports: list[Optional[dict[str, Any]]],
    workers: list[dict[str, Any]],
    sendOneTime: int,
) -> dict[str, Any]:
    """
    One status snapshot of all the workers, from each one's (L{None} for a
    worker that has not reported since it started).
    """
    merged: dict[str, Any] = {
        "bindings": 0,
        "nat_bindings": 0,
        "counters": {},
        "workers": [],
        "histograms": mergeHistograms(
            report.get("histograms") or {} for report in reports if report is not None
        ),
    }
    counters: dict[str, int] = merged["counters"]
    cycle: Optional[dict[str, Any]] = None
    queue = 0
    lag = 0.0
    errors: list[str] = []
    sessions = 0
    for report, worker in zip(reports, workers, strict=True):
        entry = dict(worker)
        entry["alive"] = report is not None
        merged["workers"].append(entry)
        if report is None:
            continue
        merged.setdefault("build", report.get("build"))
        merged.setdefault("settings", dict(report.get("settings") or {}))
        entry["bindings"] = report.get("bindings", 0)
        entry["nat_bindings"] = report.get("nat_bindings", 0)
        entry["store"] = report.get("store")
        entry["last_cycle"] = report.get("last_cycle")
        entry["counters"] = report.get("counters") or {}
        merged["bindings"] += entry["bindings"]
        merged["nat_bindings"] += entry["nat_bindings"]
        for key, value in (report.get("counters") or {}).items():
            if isinstance(value, int):
                counters[key] = counters.get(key, 0) + value
        store = report.get("store") or {}
        queue += store.get("queue", 0)
        lag = max(lag, store.get("lag_seconds", 0.0))
        if store.get("last_error"):
            errors.append(f"worker {worker['index']}: {store['last_error']}")
        media = report.get("media")
        if media:
            sessions += media.get("sessions", 0)
            merged["media"] = {**media, "sessions": sessions}
        last = report.get("last_cycle")
        if last:
            if cycle is None:
                cycle = dict(last)
            else:
                for key in _CYCLE_COUNTS:
                    cycle[key] = cycle.get(key, 0) + last.get(key, 0)
                cycle["started"] = min(cycle.get("started", 0), last.get("started", 0))
                cycle["duration_s"] = max(cycle.get("duration_s") or 0, last.get("duration_s") or 0)
    merged["counters"] = dict(sorted(counters.items()))
    merged["store"] = {
        "queue": queue,
        "lag_seconds": lag,
        "last_error": "; ".join(errors) or None,
    }
    merged["last_cycle"] = cycle
    if "settings" in merged:
        settings = merged["settings"]
        count = len(workers)
        settings["workers"] = count
        settings["capacity"] = settings.get("capacity", 0) * count
        settings["send_one_time"] = sendOneTime
    return merged
