"""
Shared pieces of the benchmarks: starting natkeep as a real process pinned
to one core, reading its CPU time and memory from /proc, and filling a store.
Everything talks to loopback only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def bigReceiveBuffer(s: socket.socket, size: int) -> None:
    """
    Give C{s} a receive buffer of C{size} bytes, past rmem_max when root,
    so that a meter can queue whole bursts.
    """
    from natkeep.protocol import SO_RCVBUFFORCE

    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            continue


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cpu: int) -> None:
    """
    Pin this process to one core, where the machine has more than one.
    """
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu % os.cpu_count()})  # type: ignore[operator]


class Natkeep:
    """
    C{twistd -n natkeep} in a child process pinned to core 0.
    """

    def __init__(self, workdir: str, args: Sequence[str], pinned: bool = True) -> None:
        self.workdir = workdir
        self.log = os.path.join(workdir, "natkeep.log")
        # Another run in the same folder logged before: only what this one
        # writes counts.
        self._logStart = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        # BENCH_TWISTD: twistd's own options for an A/B run (--reactor=poll).
        extra = os.environ.get("BENCH_TWISTD", "").split()
        command = TWISTD + ["-n", "--pidfile=", "--logfile", self.log, *extra, "natkeep", *args]
        if pinned:
            command = onCore(0, command)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def waitLog(self, text: str, timeout: float) -> float:
        """
        Wait for C{text} in the log; return the seconds waited.
        """
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                with open(self.log, "rb") as f:
                    f.seek(self._logStart)
                    if text.encode("utf-8") in f.read():
                        return time.monotonic() - start
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"natkeep exited; see {self.log}")
            time.sleep(0.02)
        raise RuntimeError(f"natkeep did not log {text!r} in {timeout} s; see {self.log}")

    def cpuSeconds(self) -> float:
        """
        CPU seconds of natkeep and of its worker processes, if any.
        """
        return treeCpuSeconds(self.process.pid)

    def rssBytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


#: Kamailio as Debian installs it.
KAMAILIO = "/usr/sbin/kamailio"
KAMAILIO_MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"


def onCore(core: int, command: list[str]) -> list[str]:
    """
    C{command} pinned to C{core} with C{taskset}, where there is more than
    one core.
    """
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core), *command]
    return command


def kamailioCommand(config: str, runtime: str, core: int, *extra: str) -> list[str]:
    """
    Kamailio in the foreground on C{config}, its runtime files in
    C{runtime} (made here), pinned to C{core}, with C{extra} options.
    """
    os.makedirs(runtime, exist_ok=True)
    return onCore(core, [KAMAILIO, "-DD", "-E", "-f", config, "-Y", runtime, *extra])


def processTree(root: int) -> list[int]:
    """
    C{root} and every process descended from it.
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree = [root]
    for pid in tree:
        tree.extend(child for child, parent in parents.items() if parent == pid)
    return tree


def treeCpuSeconds(root: int) -> float:
    """
    CPU seconds (user and system) of C{root} and its descendants now
    alive.
    """
    total = 0
    for pid in processTree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def deviceAddress(n: int) -> tuple[str, int]:
    """
    The loopback address of device C{n}: 127.64.0.1 upwards, one address
    per device, all on one port where the meter listens.
    """
    n += 1
    return (f"127.{64 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}", METER_PORT)


METER_PORT = 47000


def fillStore(path: str, count: int, listen: str, expiresIn: float = 7200) -> None:
    """
    Write C{count} NATed bindings, one per loopback device address, into
    the store C{path} (an SQLite file or a PostgreSQL URI), as if they had
    registered on C{listen}.
    """
    from natkeep.bindings import Binding
    from natkeep.stores import openStore
    from natkeep.testing import FakeListener

    store = openStore(path)
    listener = FakeListener(listen)
    expires = time.time() + expiresIn
    for start in range(0, count, 50000):
        for n in range(start, min(count, start + 50000)):
            store.put(
                Binding(
                    f"sip:d{n}@bench.test",
                    f"sip:d{n}@100.64.{(n >> 8) & 255}.{n & 255}:5060",
                    "",
                    deviceAddress(n),
                    listener,
                    True,
                    expires,
                    f"c{n}",
                    1,
                )
            )
        store.commit()
    store.close()


def paced(
    count: int, rate: int, seconds: float, sendOne: Callable[[int], None], drain: Callable[[], None]
) -> tuple[int, float]:
    """
    Call C{sendOne(index)} C{count} times at C{rate} a second, draining
    answers between sends, then drain for up to 2 s more until
    C{drain()} returns C{False} (nothing left to wait for).  Bounded in
    time: the sending stops after three times C{seconds}.

    @return: how many were sent, and the seconds it all took.
    """
    began = time.monotonic()
    index = 0
    while index < count:
        due = min(count, int((time.monotonic() - began) * rate) + 1)
        while index < due:
            sendOne(index)
            index += 1
        drain()
        if time.monotonic() - began > seconds * 3:
            break
    deadline = time.monotonic() + 2.0
    while drain() and time.monotonic() < deadline:
        time.sleep(0.001)
    return index, time.monotonic() - began


def percentile(sorted_: Sequence[float], p: float) -> float:
    """
    The C{p} quantile of sorted seconds, in milliseconds (0 when empty).
    """
    if not sorted_:
        return 0.0
    return sorted_[min(len(sorted_) - 1, int(p * len(sorted_)))] * 1000


#: Above this median latency natkeep is not keeping up with the rate.
KEEPS_UP_P50_MS = 10.0


def ramp(
    natkeep: Any,
    rates: range,
    step: Callable[[int], dict[str, float]],
    describe: Callable[[int, dict[str, float]], str],
) -> tuple[Optional[dict[str, float]], list[dict[str, float]]]:
    """
    Run C{step(rate)} for each rate in turn until fewer than 99.9 % get
    their 200 OK or the median latency passes L{KEEPS_UP_P50_MS}; print
    C{describe(rate, result)} for each; stop C{natkeep} at the end.

    @return: the last sustained step's result (if any), and every step's.
    """
    results = []
    best = None
    try:
        natkeep.waitLog("Restored", 30)
        for rate in rates:
            result = step(rate)
            results.append(result)
            print(describe(rate, result), flush=True)
            if result["success"] < 0.999 or result["p50_ms"] > KEEPS_UP_P50_MS:
                break
            best = result
            time.sleep(1.0)
    finally:
        natkeep.stop()
    return best, results


def loadSocket(host: str = "127.0.0.1") -> socket.socket:
    """
    A non-blocking UDP socket on C{host} with a 16 MiB receive buffer,
    for a load generator that reads its answers between sends.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bigReceiveBuffer(s, 16 << 20)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def _transaction(data: bytes) -> bytes:
    """
    The Call-ID and CSeq number of a REGISTER or its answer.
    """
    start = data.find(b"Call-ID: ") + 9
    callId = data[start : data.find(b"\r\n", start)]
    start = data.find(b"CSeq: ") + 6
    return callId + b"|" + data[start : data.find(b" ", start)]


def registerStep(
    server: tuple[str, int],
    datagrams: Sequence[bytes],
    rate: int,
    seconds: float,
    natkeep: Any,
    s: Optional[socket.socket] = None,
    sockets: Sequence[socket.socket] = (),
) -> dict[str, float]:
    """
    Send C{datagrams} (REGISTERs) at C{rate} a second from C{s} (a fresh
    L{loadSocket} when not given), or round the C{sockets} given, and time
    each to its 200 OK.  C{natkeep} is anything with C{cpuSeconds()}.

    @return: the step's figures: sent, 200 OK, success ratio, p50/p99
        latency, natkeep's CPU microseconds per REGISTER.
    """
    own = s is None and not sockets
    socks = list(sockets) or [loadSocket() if s is None else s]
    sentAt: dict[bytes, float] = {}
    latencies: list[float] = []
    ok = 0

    def drain() -> bool:
        nonlocal ok
        for sock in socks:
            while True:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                if data.startswith(b"SIP/2.0 200"):
                    sent = sentAt.pop(_transaction(data), None)
                    if sent is not None:
                        ok += 1
                        latencies.append(time.monotonic() - sent)
        return bool(sentAt)

    def sendOne(index: int) -> None:
        data = datagrams[index]
        sentAt[_transaction(data)] = time.monotonic()
        try:
            socks[index % len(socks)].sendto(data, server)
        except BlockingIOError:
            pass

    cpuBefore = natkeep.cpuSeconds()
    index, elapsed = paced(len(datagrams), rate, seconds, sendOne, drain)
    cpu = natkeep.cpuSeconds() - cpuBefore
    if own:
        socks[0].close()
    latencies.sort()
    return {
        "rate": rate,
        "sent": index,
        "ok": ok,
        "success": ok / max(index, 1),
        "achieved_per_s": index / max(elapsed - 2.0, seconds) if index else 0.0,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "cpu_us_per_register": cpu / max(ok, 1) * 1e6,
    }
