"""
natkeep against Kamailio 5.6 started for load (C{-x tlsf}), by the same
load and the same meter, in the same run, each server pinned to core 0:

  - C{register}: the REGISTER ramp of fresh devices (L{common.ramp}) at
    natkeep (store in memory, then its SQLite file) and at Kamailio's
    registrar (usrloc in memory, C{db_mode 0}); CPU µs per REGISTER at
    each step, from /proc, over every process of the server.
  - C{heartbeat}: N devices registered at Kamailio as NATed, pinged by
    nathelper every PERIOD (raw four-byte pings, or SIP OPTIONS with
    C{--options}) and counted by C{heartbeat.py}'s meter; Kamailio's CPU
    per heartbeat.  natkeep's is C{heartbeat.py}'s, run beside it.

Run as root from the repository, natkeep installed (C{pip install .}).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
from typing import Any

from common import (
    KAMAILIO,
    KAMAILIO_MODULES,
    METER_PORT,
    Natkeep,
    freePort,
    kamailioCommand,
    loadSocket,
    pin,
    ramp,
    registerStep,
    treeCpuSeconds,
)
from heartbeat import PERIOD, startMeter
from register_load import registerBytes

KAMAILIO_REGISTRAR = """#!KAMAILIO
debug=0
log_stderror=yes
children=1
auto_aliases=no
listen=udp:127.0.0.1:{port}
mpath="{modules}"
loadmodule "kex.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "textops.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "nathelper.so"
modparam("usrloc", "db_mode", 0)
modparam("usrloc", "hash_size", 16)
modparam("usrloc", "nat_bflag", 6)
modparam("nathelper", "natping_interval", {period})
modparam("nathelper", "ping_nated_only", 1)
modparam("nathelper", "sipping_bflag", 7)
modparam("nathelper", "sipping_from", "sip:pinger@127.0.0.1")
request_route {{
    if (is_method("REGISTER")) {{
        setbflag(6);
        {sipping}
        if (!save("location")) sl_reply_error();
        exit;
    }}
    sl_send_reply("404", "Not Here");
}}
"""


class Kamailio:
    """
    Kamailio 5.6 in a child process pinned to core 0, with C{-x tlsf}.
    """

    def __init__(self, workdir: str, port: int, options: bool, allocator: str) -> None:
        config = os.path.join(workdir, "kamailio.cfg")
        with open(config, "w") as f:
            f.write(
                KAMAILIO_REGISTRAR.format(
                    port=port,
                    modules=KAMAILIO_MODULES,
                    period=PERIOD,
                    sipping="setbflag(7);" if options else "",
                )
            )
        options = ["-m", "1024", "-M", "64"] + (["-x", allocator] if allocator else [])
        command = kamailioCommand(config, os.path.join(workdir, "run"), 0, *options)
        self.log = os.path.join(workdir, "kamailio.log")
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=out)
        self.port = port

    def waitLog(self, text: str, timeout: float) -> float:
        """
        Wait until Kamailio answers (C{text} is ignored: Kamailio logs
        nothing at debug 0).
        """
        start = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            while time.monotonic() - start < timeout:
                if self.process.poll() is not None:
                    raise RuntimeError(f"kamailio exited; see {self.log}")
                s.sendto(
                    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK1;rport\r\n"
                    b"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: ready\r\nCSeq: 1 OPTIONS\r\n"
                    b"Content-Length: 0\r\n\r\n",
                    ("127.0.0.1", self.port),
                )
                try:
                    s.recv(4096)
                    return time.monotonic() - start
                except OSError:
                    continue
        raise RuntimeError(f"kamailio did not answer in {timeout} s")

    def cpuSeconds(self) -> float:
        return treeCpuSeconds(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def describe(rate: int, result: dict[str, float]) -> str:
    return (
        f"  rate {rate:6d}/s: {result['ok']:6d}/{result['sent']:6d} ok "
        f"({result['success'] * 100:6.2f} %), p50 {result['p50_ms']:6.2f} ms, "
        f"p99 {result['p99_ms']:7.2f} ms, {result['cpu_us_per_register']:6.1f} CPU us/REGISTER"
    )


def registerRamp(server: Any, port: int, rates: range, seconds: float, tag: str) -> dict[str, Any]:
    def step(rate: int) -> dict[str, float]:
        count = int(rate * seconds)
        datagrams = [registerBytes(f"{tag}{rate}x{n}", port) for n in range(count)]
        return registerStep(("127.0.0.1", port), datagrams, rate, seconds, server)

    best, steps = ramp(server, rates, step, describe)
    return {"best": best, "steps": steps}


def registers(arguments: argparse.Namespace) -> dict[str, Any]:
    rates = range(arguments.start, min(arguments.max, 60000) + 1, arguments.step)
    seconds = min(arguments.seconds, 10.0)
    results: dict[str, Any] = {}
    for name, db in (("natkeep :memory:", ":memory:"), ("natkeep sqlite", "natkeep.sqlite")):
        if arguments.kamailio_only:
            continue
        print(f"{name}:", flush=True)
        workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
        port = freePort()
        natkeep = Natkeep(workdir, ["--listen", f"127.0.0.1:{port}", "--db", db])
        results[name] = registerRamp(natkeep, port, rates, seconds, "n")
    print(f"kamailio 5.6 -x {arguments.allocator} (registrar, usrloc db_mode 0):", flush=True)
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    port = freePort()
    kamailio = Kamailio(workdir, port, False, arguments.allocator)
    results["kamailio"] = registerRamp(kamailio, port, rates, seconds, "k")
    ours = results.get("natkeep :memory:", {}).get("best")
    theirs = results["kamailio"]["best"]
    if ours and theirs:
        ratio = ours["cpu_us_per_register"] / theirs["cpu_us_per_register"]
        print(
            f"at each one's highest sustained rate: natkeep {ours['rate']}/s at "
            f"{ours['cpu_us_per_register']:.1f} us, kamailio {theirs['rate']}/s at "
            f"{theirs['cpu_us_per_register']:.1f} us: {ratio:.2f} times"
        )
        results["ratio_at_best"] = ratio
    return results


def heartbeats(arguments: argparse.Namespace) -> dict[str, Any]:
    devices = max(1, min(arguments.devices, 200_000))
    window = max(PERIOD * 2, min(arguments.window, 600.0))
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    port = freePort()
    kamailio = Kamailio(workdir, port, arguments.options, arguments.allocator)
    try:
        kamailio.waitLog("", 30)
        # Register every device, Contact at its meter address, from one socket.
        sock = loadSocket()
        pending = 0
        for n in range(devices):
            host = f"127.{64 + (n + 1 >> 16)}.{(n + 1) >> 8 & 255}.{(n + 1) & 255}"
            sock.sendto(
                registerBytes(f"hb{n}", port).replace(
                    b"100.64.0.9:5060", f"{host}:{METER_PORT}".encode()
                ),
                ("127.0.0.1", port),
            )
            pending += 1
            if n % 500 == 499:
                time.sleep(0.05)
                while True:
                    try:
                        sock.recv(4096)
                        pending -= 1
                    except BlockingIOError:
                        break
        time.sleep(1)
        start = time.monotonic() + PERIOD + 2
        end = start + window
        report = os.path.join(workdir, "meter.json")
        meter = startMeter(devices, start, end, PERIOD, report)
        while time.monotonic() < start:
            time.sleep(0.01)
        before = kamailio.cpuSeconds()
        while time.monotonic() < end:
            time.sleep(0.05)
        cpu = kamailio.cpuSeconds() - before
        meter.wait(window + 60)
    finally:
        kamailio.stop()
    with open(report) as f:
        figures = json.load(f)
    figures["kamailio_cpu_us_per_heartbeat"] = cpu / max(figures["received"], 1) * 1e6
    kind = "OPTIONS" if arguments.options else "raw"
    print(
        f"kamailio -x {arguments.allocator} nathelper, {devices} devices, PERIOD {PERIOD} s, "
        f"{kind}: {figures['per_s']:.0f} heartbeats/s, "
        f"{figures['kamailio_cpu_us_per_heartbeat']:.2f} CPU us per heartbeat, "
        f"reached every period {figures['reached_every_period'] * 100:.1f} %"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("test", choices=["register", "heartbeat"])
    parser.add_argument("--start", type=int, default=10000)
    parser.add_argument("--step", type=int, default=4000)
    parser.add_argument("--max", type=int, default=42000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--options", action="store_true", help="SIP OPTIONS pings")
    parser.add_argument("--kamailio-only", action="store_true")
    parser.add_argument("--allocator", default="tlsf", help="kamailio -x (empty: its default)")
    arguments = parser.parse_args()
    if not os.path.exists(KAMAILIO):
        raise SystemExit("kamailio is not installed (Debian's kamailio package)")
    pin(1)
    if arguments.test == "register":
        results = registers(arguments)
    else:
        results = heartbeats(arguments)
    print(json.dumps({"benchmark": f"versus-{arguments.test}", **results}))


if __name__ == "__main__":
    main()
