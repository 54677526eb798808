"""
Every core: the REGISTER ramp of fresh devices at natkeep with
C{--workers 1} and with C{--workers 2}, neither pinned, the load sent from
four source addresses (two steered to each worker).  Prints each one's
highest sustained rate, their ratio, natkeep's CPU per REGISTER (parent
and workers) and the load generator's own CPU, which shares the two cores.

C{--sipp} sends the load with two sipp processes instead (each from an
address steered to one worker), whose CPU per REGISTER is a fraction of the
Python generator's.

Run as root from the repository, natkeep installed (C{pip install .}).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import (
    KEEPS_UP_P50_MS,
    Natkeep,
    freePort,
    loadSocket,
    ramp,
    registerStep,
    treeCpuSeconds,
)
from register_load import registerBytes

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from natkeep.steering import workerOf  # noqa: E402
from natkeep.testing import sippCounts  # noqa: E402


def sources() -> list[str]:
    """
    Two loopback addresses steered to each of two workers.
    """
    chosen: dict[int, list[str]] = {0: [], 1: []}
    for last in range(100, 250):
        host = f"127.0.2.{last}"
        group = chosen[workerOf(host, 2)]
        if len(group) < 2:
            group.append(host)
    return chosen[0] + chosen[1]


def run(workers: int, rates: range, seconds: float) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    port = freePort()
    natkeep = Natkeep(
        workdir,
        ["--listen", f"127.0.0.1:{port}", "--db", "natkeep.sqlite", "--workers", str(workers)],
        pinned=False,
    )
    socks = [loadSocket(host) for host in sources()]
    loads: list[float] = []

    def step(rate: int) -> dict[str, float]:
        datagrams = [
            registerBytes(f"w{workers}r{rate}x{n}", port) for n in range(int(rate * seconds))
        ]
        before = time.process_time()
        result = registerStep(("127.0.0.1", port), datagrams, rate, seconds, natkeep, sockets=socks)
        result["generator_cpu_s"] = time.process_time() - before
        loads.append(result["generator_cpu_s"])
        return result

    def describe(rate: int, result: dict[str, float]) -> str:
        return (
            f"  rate {rate:6d}/s: {result['ok']:6d}/{result['sent']:6d} ok "
            f"({result['success'] * 100:6.2f} %), p50 {result['p50_ms']:6.2f} ms, "
            f"{result['cpu_us_per_register']:5.1f} natkeep CPU us/REGISTER, "
            f"generator {result['generator_cpu_s']:.1f} CPU s"
        )

    # Both processes log "Restored" only in the workers' lines; wait for one.
    natkeep.waitLog("Restored", 60)
    time.sleep(1.0)
    print(f"--workers {workers}:", flush=True)
    best, steps = ramp(natkeep, rates, step, describe)
    for s in socks:
        s.close()
    return {"best": best, "steps": steps}


SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="fresh devices">
  <send retrans="500">
    <![CDATA[

      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/UDP [local_ip]:[local_port];branch=[branch];rport
      Max-Forwards: 70
      From: <sip:u[pid]n[call_number]@bench.test>;tag=[pid]t[call_number]
      To: <sip:u[pid]n[call_number]@bench.test>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:u[call_number]@192.168.77.1:5060>
      Expires: 300
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" />
</scenario>
"""


def runSipp(workers: int, rates: range, seconds: float) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    scenario = os.path.join(workdir, "register.xml")
    with open(scenario, "w") as f:
        f.write(SCENARIO)
    port = freePort()
    natkeep = Natkeep(
        workdir,
        ["--listen", f"127.0.0.1:{port}", "--db", "natkeep.sqlite", "--workers", str(workers)],
        pinned=False,
    )
    natkeep.waitLog("Restored", 60)
    time.sleep(1.0)
    hosts = sources()
    senders = [hosts[0], hosts[2]]
    print(f"--workers {workers} (two sipps, from {senders[0]} and {senders[1]}):", flush=True)
    steps = []
    best = None
    try:
        for rate in rates:
            each = rate // 2
            count = int(each * seconds)
            cpuBefore = natkeep.cpuSeconds()
            began = time.monotonic()
            runs = [
                subprocess.Popen(
                    [
                        "sipp",
                        f"127.0.0.1:{port}",
                        "-sf",
                        scenario,
                        "-i",
                        host,
                        "-p",
                        "0",
                        "-r",
                        str(each),
                        "-m",
                        str(count),
                        "-l",
                        str(each * 2),
                        "-timeout",
                        f"{int(seconds * 3) + 10}s",
                        "-trace_err",
                        "-nostdin",
                    ],
                    cwd=workdir,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for host in senders
            ]
            sippCpu = 0.0
            ok = failed = 0
            for run in runs:
                deadline = time.monotonic() + seconds * 3 + 30
                cpu = 0.0
                while run.poll() is None and time.monotonic() < deadline:
                    cpu = max(cpu, treeCpuSeconds(run.pid))
                    time.sleep(0.2)
                out, _ = run.communicate(timeout=30)
                a, b = sippCounts(out)
                ok += max(a, 0)
                failed += max(b, 0)
                sippCpu += cpu
            elapsed = time.monotonic() - began
            cpu = natkeep.cpuSeconds() - cpuBefore
            result = {
                "rate": rate,
                "sent": count * 2,
                "ok": ok,
                "failed": failed,
                "success": ok / max(count * 2, 1),
                "elapsed_s": elapsed,
                "cpu_us_per_register": cpu / max(ok, 1) * 1e6,
                "sipp_cpu_us_per_register": sippCpu / max(ok, 1) * 1e6,
            }
            steps.append(result)
            print(
                f"  rate {rate:6d}/s: {ok:6d}/{count * 2:6d} ok in {elapsed:.1f} s, "
                f"{result['cpu_us_per_register']:5.1f} natkeep CPU us/REGISTER, "
                f"sipp {result['sipp_cpu_us_per_register']:5.1f} us/REGISTER",
                flush=True,
            )
            # Sustained: every REGISTER answered, within the step's time.
            if result["success"] < 0.999 or elapsed > seconds * 1.5:
                break
            best = result
            time.sleep(1.0)
    finally:
        natkeep.stop()
    return {"best": best, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--start", type=int, default=10000)
    parser.add_argument("--step", type=int, default=4000)
    parser.add_argument("--max", type=int, default=50000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sipp", action="store_true", help="two sipps send the load")
    arguments = parser.parse_args()
    rates = range(arguments.start, min(arguments.max, 80000) + 1, arguments.step)
    seconds = min(arguments.seconds, 10.0)
    runner = runSipp if arguments.sipp else run
    results = {w: runner(w, rates, seconds) for w in (1, 2)}
    one, two = results[1]["best"], results[2]["best"]
    if one and two:
        print(
            f"highest sustained (>= 99.9 % 200 OK, p50 <= {KEEPS_UP_P50_MS:g} ms): "
            f"1 worker {one['rate']}/s, 2 workers {two['rate']}/s: "
            f"{two['rate'] / one['rate']:.2f} times"
        )
    print(json.dumps({"benchmark": "workers", "results": results}))


if __name__ == "__main__":
    main()
