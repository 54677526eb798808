"""
Every core: the kernel's steering by source IP, the merged status, and two
real worker processes behind one parent (each device served by one worker,
a killed worker replaced with its bindings, SIGHUP and stop reaching all).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from contextlib import closing
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from natkeep.bindings import Binding
from natkeep.config import ConfigError, buildSettings
from natkeep.handoff import StoreDirectory
from natkeep.metrics import Metrics
from natkeep.sip import Request, parseMessage, parseNameAddr
from natkeep.steering import sharedSockets, workerOf
from natkeep.store import SCHEMA_VERSION, StoreError
from natkeep.tap import Options, makeService
from natkeep.testing import FakeListener, MemoryReader, MemoryStore, register
from natkeep.workers import Supervisor, WorkerIdentity, mergeSnapshots
from tests.helpers import freePort
from tests.processes import NatkeepProcess, haveSipp
from tests.test_edge import freeTCPPort, placeCall, registerPhone


def hostsOf(worker: int, count: int, many: int, start: int = 60) -> list[str]:
    """
    C{many} loopback addresses from 127.0.0.C{start} on that steer to
    C{worker} of C{count}.
    """
    found = [
        f"127.0.0.{last}"
        for last in range(start, 250)
        if workerOf(f"127.0.0.{last}", count) == worker
    ]
    return found[:many]


class SteeringTests(SynchronousTestCase):
    """
    The kernel program and L{workerOf} agree, on real sockets.
    """

    def assertSteered(self, count: int, family: int, host: str, sources: list[str]) -> None:
        port = freePort(family, host)
        group = sharedSockets(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", count)
        self.addCleanup(lambda: [s.close() for s in group])
        for source in sources:
            with socket.socket(family, socket.SOCK_DGRAM) as sender:
                sender.bind((source, 0))
                sender.sendto(b"ping", (host, port))
            deadline = time.monotonic() + 2
            got = []
            while not got and time.monotonic() < deadline:
                for index, sock in enumerate(group):
                    try:
                        sock.recvfrom(64)
                        got.append(index)
                    except BlockingIOError:
                        pass
            self.assertEqual(got, [workerOf(source, count)], source)

    def test_ipv4(self) -> None:
        """
        Datagrams from 40 source addresses reach socket L{workerOf} of the
        group, for two and for three workers; both sockets of two get some.
        """
        sources = [f"127.0.{i % 3}.{i}" for i in range(1, 41)]
        self.assertEqual({workerOf(s, 2) for s in sources}, {0, 1})
        self.assertSteered(2, socket.AF_INET, "127.0.0.1", sources)
        self.assertSteered(3, socket.AF_INET, "127.0.0.1", sources)

    def test_ipv6(self) -> None:
        """
        An IPv6 group is steered by the last 32 bits of the source.
        """
        try:
            self.assertSteered(2, socket.AF_INET6, "::1", ["::1"])
        except OSError as e:
            raise SkipTest(f"no IPv6 loopback here: {e}")

    def test_portLeftOut(self) -> None:
        """
        The worker depends on the source IP only: a NAT that gives a
        device a new port keeps it on its worker.
        """
        self.assertEqual(workerOf("198.51.100.7", 4), workerOf("198.51.100.7", 4))
        self.assertEqual(workerOf("::ffff:198.51.100.7", 4), workerOf("198.51.100.7", 4))
        self.assertEqual(workerOf("not an address", 4), 0)
        self.assertEqual(workerOf("198.51.100.7", 1), 0)


class SettingsTests(SynchronousTestCase):
    def test_workers(self) -> None:
        """
        C{workers} takes 1..64 or C{auto} (the cores); a worker runs its
        share of SEND_ONE_TIME and no status endpoint.
        """
        self.assertEqual(buildSettings({}, {}).workers, 1)
        self.assertEqual(buildSettings({"workers": "auto"}, {}).workers, os.cpu_count() or 1)
        with self.assertRaises(ConfigError) as raised:
            buildSettings({"workers": "65"}, {})
        self.assertIn("workers", str(raised.exception))
        settings = buildSettings(
            {"workers": "3", "SS_SIP_NAT_KEEP_ALIVE_SEND_ONE_TIME": "100", "status": "127.0.0.1:1"},
            {},
        )
        mine = WorkerIdentity(1, 3, {}).workerSettings(settings)
        self.assertEqual((mine.sendOneTime, mine.status), (34, None))

    def test_identity(self) -> None:
        """
        A worker reads its index, sockets and secret from its environment;
        a process without them is no worker; a malformed one is refused.
        """
        self.assertIsNone(WorkerIdentity.fromEnvironment({}))
        identity = WorkerIdentity.fromEnvironment(
            {
                "NATKEEP_WORKER": "1/2",
                "NATKEEP_WORKER_SOCKETS": "0.0.0.0:5060=4,[::]:5060=5",
                "NATKEEP_WORKER_SECRET": "00ff",
            }
        )
        assert identity is not None
        self.assertEqual(
            (identity.index, identity.count, identity.sockets, identity.secret),
            (1, 2, {"0.0.0.0:5060": 4, "[::]:5060": 5}, b"\x00\xff"),
        )
        self.assertRaises(ValueError, WorkerIdentity.fromEnvironment, {"NATKEEP_WORKER": "2/2"})


class MergeTests(SynchronousTestCase):
    def test_sums(self) -> None:
        """
        Counts and counters are summed, a worker not reporting is shown
        as such, and the settings are the whole service's.
        """
        report = {
            "build": "mypyc",
            "bindings": 3,
            "nat_bindings": 2,
            "counters": {"requests.REGISTER": 5},
            "settings": {"capacity": 10, "send_one_time": 50},
            "store": {"queue": 1, "lag_seconds": 0.5, "last_error": None},
            "last_cycle": {"due": 2, "sent": 2, "started": 7.0, "duration_s": 0.1},
        }
        merged = mergeSnapshots(
            [report, dict(report, bindings=4), None],
            [{"index": 0}, {"index": 1}, {"index": 2}],
            100,
        )
        self.assertEqual(merged["bindings"], 7)
        self.assertEqual(merged["counters"], {"requests.REGISTER": 10})
        self.assertEqual(merged["last_cycle"]["due"], 4)
        self.assertEqual(merged["store"]["queue"], 2)
        self.assertEqual([w["alive"] for w in merged["workers"]], [True, True, False])
        self.assertEqual(merged["settings"]["send_one_time"], 100)
        self.assertEqual(merged["settings"]["capacity"], 30)

    def test_histograms(self) -> None:
        """
        The workers' histograms are summed bucket by bucket, and the
        parent's /metrics renders the sum: its count, its sum and its
        buckets, once per family.
        """
        one = Metrics(dict, "0")
        for duration in (0.3, 4.0):
            one.cycleFinished(duration)
        other = Metrics(dict, "0")
        other.cycleFinished(700.0)
        other.ngAnswered(0.004)
        reports: list[Optional[dict[str, Any]]] = [
            {"histograms": one.histograms()},
            {"histograms": other.histograms()},
            None,
        ]
        merged = mergeSnapshots(reports, [{"index": 0}, {"index": 1}, {"index": 2}], 100)
        parent = Metrics(lambda: merged, "0", merged=True)
        families = {
            family.name: {
                (sample.name, sample.labels.get("le")): sample.value for sample in family.samples
            }
            for family in text_string_to_metric_families(parent.render().decode())
        }
        cycles = families["natkeep_cycle_duration_seconds"]
        self.assertEqual(cycles[("natkeep_cycle_duration_seconds_count", None)], 3)
        self.assertAlmostEqual(cycles[("natkeep_cycle_duration_seconds_sum", None)], 704.3)
        self.assertEqual(cycles[("natkeep_cycle_duration_seconds_bucket", "0.5")], 1)
        self.assertEqual(cycles[("natkeep_cycle_duration_seconds_bucket", "5.0")], 2)
        self.assertEqual(cycles[("natkeep_cycle_duration_seconds_bucket", "1800.0")], 3)
        ng = families["natkeep_media_ng_latency_seconds"]
        self.assertEqual(ng[("natkeep_media_ng_latency_seconds_bucket", "0.005")], 1)
        self.assertEqual(ng[("natkeep_media_ng_latency_seconds_bucket", "0.002")], 0)

    def test_histogramsBeforeReports(self) -> None:
        """
        Before any worker reports, and from a worker whose buckets differ
        (another version), the families are there and empty.
        """
        odd = {"natkeep_cycle_duration_seconds": {"buckets": [1.0, 2.0], "sum": 9.0}}
        for reports in ([None, None], [{"histograms": odd}, None]):
            merged = mergeSnapshots(reports, [{"index": 0}, {"index": 1}], 100)
            text = Metrics(lambda m=merged: m, "0", merged=True).render().decode()
            self.assertIn("natkeep_cycle_duration_seconds_count 0.0", text)
            self.assertIn("natkeep_media_ng_latency_seconds_count 0.0", text)


def status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as page:
        result: dict[str, Any] = json.load(page)
        return result


def waitFor(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError:
            last = None
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s (last: {last!r})")


class StoreDirectoryTests(SynchronousTestCase):
    """
    L{StoreDirectory}: which hosts hold an AOR, by the store's reader.
    """

    def test_hostsAndRecovery(self) -> None:
        """
        The reader opens at the first lookup; a failed open or lookup
        answers nothing and the next lookup opens a fresh reader.
        """
        store = MemoryStore()
        store.put(
            Binding(
                "sip:7@example.com",
                "sip:7@10.0.0.7",
                "",
                ("198.51.100.9", 5060),
                FakeListener(),
                True,
                500.0,
                "c",
                1,
            )
        )
        store.commit()
        opened: list[MemoryReader] = []
        failures = [StoreError("cannot read binding database x: gone")]

        def open() -> MemoryReader:
            if failures:
                raise failures.pop()
            reader = store.reader()
            opened.append(reader)
            return reader

        directory = StoreDirectory(open)
        self.assertEqual(directory.hosts("sip:7@example.com", 100.0), [])
        self.assertEqual(directory.hosts("sip:7@example.com", 100.0), ["198.51.100.9"])
        self.assertEqual(directory.hosts("sip:8@example.com", 100.0), [])
        self.assertEqual(len(opened), 1)

        def broken(aor: str, now: float) -> list[str]:
            raise sqlite3.OperationalError("disk I/O error")

        opened[0].hosts = broken  # type: ignore[method-assign]
        self.assertEqual(directory.hosts("sip:7@example.com", 100.0), [])
        self.assertEqual(directory.hosts("sip:7@example.com", 100.0), ["198.51.100.9"])
        self.assertEqual(len(opened), 2)


class ParentStoreTests(SynchronousTestCase):
    """
    The parent of workers opens the store once before it starts any.
    """

    def makeService(self, *argv: str) -> Any:
        """
        The service C{twistd natkeep --workers 2} makes, not started; its
        sockets are closed and SIGHUP's handler restored at cleanup.
        """
        options = Options()
        options.parseOptions(["--workers", "2", "--listen", f"127.0.0.1:{freePort()}", *argv])
        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
        service = makeService(options)
        for child in service:
            if isinstance(child, Supervisor):
                self.addCleanup(child._close)
        return service

    def test_storeReady(self) -> None:
        """
        Before any worker runs, the SQLite file exists in WAL mode with the
        current schema: workers that start together find nothing left to
        switch or migrate, so none meets the file locked by another.
        """
        path = self.mktemp()
        self.makeService("--db", path)
        with closing(sqlite3.connect(path)) as db:
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone(), ("wal",))
            self.assertEqual(db.execute("PRAGMA user_version").fetchone(), (SCHEMA_VERSION,))
            self.assertEqual(db.execute("SELECT count(*) FROM bindings").fetchone(), (0,))

    def test_unusableStore(self) -> None:
        """
        A store that cannot be used stops the start in the parent, with a
        message naming the file, before any socket is bound.
        """
        path = os.path.join(self.mktemp(), "missing", "natkeep.sqlite")
        with self.assertRaises(SystemExit) as raised:
            self.makeService("--db", path)
        self.assertIn(f"cannot use binding database {path}", str(raised.exception))


class TwoWorkerTests(SynchronousTestCase):
    """
    C{--workers 2}: real processes, real sockets, SQLite shared.
    """

    def setUp(self) -> None:
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()
        self.port = freePort()
        self.statusPort = freeTCPPort()
        self.callerHost = hostsOf(1, 2, 1, start=70)[0]
        self.callerPort = freePort(host=self.callerHost)
        # The options say everything; a test may add to the file and SIGHUP.
        self.cwd.child("natkeep.conf").setContent(b"# natkeep test\n")
        self.process = NatkeepProcess(
            [
                "--config",
                "natkeep.conf",
                "--workers",
                "2",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--db",
                "natkeep.sqlite",
                "--period",
                "10",
                "--send-interval",
                "100",
                "--upstream",
                f"sip:{self.callerHost}:{self.callerPort}",
                "--status",
                f"127.0.0.1:{self.statusPort}",
            ],
            self.cwd.path,
        )
        self.addCleanup(self.process.stop)
        self.process.waitReady("127.0.0.1", self.port)
        waitFor(
            "both workers reporting",
            lambda: all(w["alive"] for w in status(self.statusPort)["workers"]),
        )

    def registerDevices(self, hosts: list[str]) -> list[socket.socket]:
        """
        Register a NATed device (private Contact) from each of C{hosts}.
        """
        devices = []
        for n, host in enumerate(hosts):
            device = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(device.close)
            device.bind((host, 0))
            device.settimeout(5)
            user = f"20{n:02d}"
            device.sendto(
                register(
                    user=user,
                    contacts=[f"<sip:{user}@192.168.7.{n + 1}:5060>"],
                    callId=f"reg-{host}",
                ),
                ("127.0.0.1", self.port),
            )
            self.assertTrue(device.recv(4096).startswith(b"SIP/2.0 200 OK"), host)
            devices.append(device)
        return devices

    def reload(self, config: Optional[bytes] = None) -> None:
        """
        Send SIGHUP to the parent (after writing C{config} into its config
        file, if given), and wait until the parent and both workers have
        reloaded.
        """
        if config is not None:
            self.cwd.child("natkeep.conf").setContent(config)

        def reloads() -> tuple[int, int]:
            log = self.process.log()
            return log.count("Reloaded the parent's settings"), log.count("Reloaded settings")

        parent, workers = reloads()
        self.process.process.send_signal(signal.SIGHUP)
        waitFor(
            "the parent and both workers reloaded", lambda: reloads() == (parent + 1, workers + 2)
        )

    def heartbeatsTo(self, devices: list[socket.socket], seconds: float) -> list[list[float]]:
        """
        When each of C{devices} heard a heartbeat in the next C{seconds}.
        """
        heard: list[list[float]] = [[] for _ in devices]
        deadline = time.monotonic() + seconds
        for device in devices:
            device.setblocking(False)
        while time.monotonic() < deadline:
            for i, device in enumerate(devices):
                try:
                    data, source = device.recvfrom(4096)
                except BlockingIOError:
                    continue
                if source == ("127.0.0.1", self.port) and not data.startswith(b"SIP/"):
                    heard[i].append(time.monotonic())
            time.sleep(0.01)
        return heard

    def test_oneWorkerPerDevice(self) -> None:
        """
        Each device's REGISTER, its heartbeats and the calls to and from
        it are handled by the worker its source IP steers to, and only by
        it: that worker holds its binding and counts every relayed
        request and response of its calls; the other worker only hands
        the softswitch's datagrams over.  Every device hears one
        heartbeat per period, not one per worker.
        """
        first = hostsOf(0, 2, 3)
        second = hostsOf(1, 2, 2)
        devices = self.registerDevices(first + second)
        data = waitFor(
            "the bindings shown per worker",
            lambda: (s := status(self.statusPort))["bindings"] == 5 and s,
        )
        self.assertEqual([w["bindings"] for w in data["workers"]], [3, 2])
        registers = [w["counters"].get("requests.REGISTER", 0) for w in data["workers"]]
        self.assertEqual(registers, [3, 2])

        heard = self.heartbeatsTo(devices, 12)
        for host, times in zip(first + second, heard, strict=True):
            # One heartbeat per PERIOD (10 s), from one worker: a second
            # worker's would come at another point of the cycle.
            self.assertGreaterEqual(len(times), 1, host)
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            self.assertTrue(all(gap > 8 for gap in gaps), (host, gaps))
        data = status(self.statusPort)
        self.assertEqual([(w["last_cycle"] or {}).get("due") for w in data["workers"]], [3, 2])
        # The parent's /metrics sums the workers' cycle histograms: each
        # worker has finished a cycle by now, and none finished more than
        # it started.
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.statusPort}/metrics", timeout=5
        ) as page:
            families = {
                family.name: family
                for family in text_string_to_metric_families(page.read().decode())
            }
        cycles = families["natkeep_cycle_duration_seconds"]
        [count] = [s.value for s in cycles.samples if s.name.endswith("_count")]
        started = sum(w["counters"].get("cycles", 0) for w in data["workers"])
        self.assertGreaterEqual(count, 2)
        self.assertLessEqual(count, started)
        self.assertIn("natkeep_media_ng_latency_seconds", families)

        if not haveSipp():
            raise SkipTest("sipp is not installed (Debian's sip-tester; .ci/run installs it)")
        # The phone is worker 0's; the softswitch's address steers to 1.
        phoneHost = first[0]
        before = status(self.statusPort)["workers"]
        for phoneHangsUp in (False, True):
            phonePort = registerPhone(self, phoneHost, ("127.0.0.1", self.port))
            placeCall(
                self,
                self.cwd,
                phoneHangsUp,
                (phoneHost, phonePort),
                (self.callerHost, self.callerPort),
                f"127.0.0.1:{self.port}",
            )
        time.sleep(1.5)
        after = status(self.statusPort)["workers"]

        def grew(worker: int, counter: str) -> int:
            return int(
                after[worker]["counters"].get(counter, 0)
                - before[worker]["counters"].get(counter, 0)
            )

        # Two calls: INVITE, ACK, BYE each way, and their responses.
        self.assertGreaterEqual(grew(0, "relay.requests"), 6)
        self.assertGreaterEqual(grew(0, "relay.responses"), 6)
        self.assertEqual((grew(1, "relay.requests"), grew(1, "relay.responses")), (0, 0))
        self.assertGreater(grew(1, "workers.handoff.sent"), 0)
        self.assertEqual(grew(1, "workers.handoff.sent"), grew(0, "workers.handoff.received"))
        self.assertNotIn("Traceback", self.process.log())

    def test_killedWorkerReplaced(self) -> None:
        """
        A worker killed with SIGKILL is started again by the parent on the
        same socket, restores its devices from the store, and heartbeats
        them again; the other worker is untouched.  SIGHUP to the parent
        reaches both workers, and stopping the parent stops them.
        """
        first = hostsOf(0, 2, 3)
        second = hostsOf(1, 2, 3)
        devices = self.registerDevices(first + second)
        data = waitFor(
            "the bindings shown",
            lambda: (s := status(self.statusPort))["bindings"] == 6 and s,
        )
        victim = data["workers"][1]["pid"]
        survivor = data["workers"][0]["pid"]
        # Neither worker ended at start-up (the parent readied the store).
        self.assertEqual([w["restarts"] for w in data["workers"]], [0, 0])
        os.kill(victim, signal.SIGKILL)
        data = waitFor(
            "worker 1 replaced, its bindings restored",
            lambda: (
                (s := status(self.statusPort))["workers"][1]["restarts"] == 1
                and s["workers"][1]["alive"]
                and s["workers"][1]["bindings"] == 3
                and s
            ),
        )
        self.assertNotEqual(data["workers"][1]["pid"], victim)
        self.assertEqual(data["workers"][0]["pid"], survivor)
        self.assertEqual(data["bindings"], 6)
        heard = self.heartbeatsTo(devices, 11)
        self.assertTrue(all(heard), heard)
        self.assertIn("Worker 1 ended", self.process.log())

        self.reload()
        pids = [w["pid"] for w in status(self.statusPort)["workers"]]
        self.assertEqual(self.process.stop(), -signal.SIGTERM)
        for pid in pids:
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)

    def test_forwardMode(self) -> None:
        """
        With C{register_mode = forward}, a device's REGISTER goes up to the
        upstream from the device's worker.  The upstream's answer arrives at
        the upstream's own worker (the other one), which hands it to the
        device's worker by natkeep's Via; the device gets its 200, and the
        binding is the device worker's alone.
        """
        upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(upstream.close)
        upstream.bind((self.callerHost, self.callerPort))
        upstream.settimeout(5)
        self.reload(b"register_mode = forward\n")
        [host] = hostsOf(0, 2, 1, start=150)
        device = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(device.close)
        device.bind((host, 0))
        device.settimeout(5)
        device.sendto(
            register(user="4001", contacts=["<sip:4001@192.168.9.1:5060>"], callId="fwd-1"),
            ("127.0.0.1", self.port),
        )
        data, source = upstream.recvfrom(4096)
        forwarded = parseMessage(data)
        assert isinstance(forwarded, Request)
        self.assertEqual((forwarded.method, source), ("REGISTER", ("127.0.0.1", self.port)))
        self.assertIn("nkw=0", forwarded.headers["via"][0])
        self.assertTrue(forwarded.headers.get("path"))
        headers = forwarded.headers
        answer = "\r\n".join(
            ["SIP/2.0 200 OK"]
            + [f"Via: {via}" for via in headers["via"]]
            + [
                f"From: {headers['from'][0]}",
                f"To: {headers['to'][0]};tag=up1",
                f"Call-ID: {headers['call-id'][0]}",
                f"CSeq: {headers['cseq'][0]}",
                f"Contact: <{parseNameAddr(headers['contact'][0]).uri}>;expires=120",
                "Content-Length: 0",
                "",
                "",
            ]
        )
        upstream.sendto(answer.encode(), source)
        reply = device.recv(4096)
        self.assertTrue(reply.startswith(b"SIP/2.0 200 OK"), reply[:80])
        data = waitFor(
            "the binding at worker 0",
            lambda: (s := status(self.statusPort))["workers"][0]["bindings"] == 1 and s,
        )
        self.assertEqual(data["workers"][1]["bindings"], 0)
        self.assertGreaterEqual(data["workers"][1]["counters"].get("workers.handoff.sent", 0), 1)
        self.assertNotIn("Traceback", self.process.log())

    def test_deviceMoves(self) -> None:
        """
        A device that registers again from an address steered to the other
        worker (a NAT that gave it a new public address) is that worker's
        from then on: the first worker drops its copy, so the device is not
        heartbeated twice, and the store holds the new address.
        """
        before, after = hostsOf(0, 2, 1)[0], hostsOf(1, 2, 1, start=120)[0]
        for host, cseq in ((before, 1), (after, 2)):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as device:
                device.bind((host, 0))
                device.settimeout(5)
                device.sendto(
                    register(
                        user="3001",
                        contacts=["<sip:3001@192.168.9.9:5060>"],
                        callId="moving",
                        cseq=cseq,
                    ),
                    ("127.0.0.1", self.port),
                )
                self.assertTrue(device.recv(4096).startswith(b"SIP/2.0 200 OK"))
        data = waitFor(
            "the binding moved to worker 1",
            lambda: (
                (s := status(self.statusPort))["workers"][0]["counters"].get("workers.moved")
                and [w["bindings"] for w in s["workers"]] == [0, 1]
                and s
            ),
        )
        self.assertEqual(data["workers"][0]["counters"]["workers.moved"], 1)
        self.assertEqual([w["bindings"] for w in data["workers"]], [0, 1])
        self.assertEqual(data["bindings"], 1)
        # Each 200 left after its commit: the row is the second REGISTER's.
        with closing(sqlite3.connect(self.cwd.child("natkeep.sqlite").path)) as db:
            rows = db.execute("SELECT aor, host, cseq FROM bindings").fetchall()
        self.assertEqual(rows, [("sip:3001@example.com", after, 2)])

    def test_admin(self) -> None:
        """
        The parent's C{/bindings} asks every worker and answers as one
        table: the listing is merged and paged, an AOR is found at the
        worker that holds it, and DELETE removes it there.
        """
        hosts = hostsOf(0, 2, 2) + hostsOf(1, 2, 2)
        self.registerDevices(hosts)
        base = f"http://127.0.0.1:{self.statusPort}/bindings"

        def call(
            path: str, method: str = "GET", token: Optional[str] = None
        ) -> tuple[int, dict[str, Any]]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            request = urllib.request.Request(base + path, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as page:
                    return page.status, json.load(page)
            except urllib.error.HTTPError as e:
                return e.code, json.load(e)

        status_, listing = call("?limit=3&offset=1")
        self.assertEqual((status_, listing["total"], len(listing["bindings"])), (200, 4, 3))
        aors = [b["aor"] for b in listing["bindings"]]
        self.assertEqual(aors, sorted(aors))
        # 2003 registered from a worker-1 address.
        status_, one = call("/sip:2003@example.com")
        self.assertEqual((status_, one["bindings"][0]["source"].split(":")[0]), (200, hosts[3]))
        status_, removed = call("/sip:2003@example.com", "DELETE")
        self.assertEqual((status_, removed["removed"]), (200, ["sip:2003@192.168.7.4:5060"]))
        self.assertEqual(call("/sip:2003@example.com")[0], 404)
        waitFor(
            "worker 1 down to one binding",
            lambda: status(self.statusPort)["workers"][1]["bindings"] == 1,
        )
        self.assertEqual(call("", "POST")[0], 405)

        # SIGHUP: the parent itself takes the admin token its config file
        # now sets, and from then on asks for it.
        token = "natkeep-test-token-0001"
        self.reload(f"admin_token = {token}\n".encode())
        self.assertEqual(call("")[0], 401)
        self.assertEqual(call("", token="wrong-token-wrong-token")[0], 401)
        self.assertEqual(call("", token=token)[0], 200)
