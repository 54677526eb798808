"""
A locked database: another process holds the SQLite write lock for
C{--lock} seconds (8 by default) while natkeep heartbeats C{--devices}
devices and a prober sends REGISTERs and OPTIONS.  Prints the worst
heartbeat gap to any device (against PERIOD), the slowest OPTIONS answer
during the lock, and when the REGISTER sent during the lock was answered
(against the lock's end).

    python bench/locked.py [--devices 10000] [--period 10] [--lock 8]

Traffic goes to 127.0.0.0/8 only, for a bounded time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Natkeep, fillStore, freePort  # noqa: E402
from heartbeat import startMeter  # noqa: E402

from natkeep.testing import register, request  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--period", type=int, default=10)
    parser.add_argument("--lock", type=float, default=8.0)
    args = parser.parse_args()
    devices = max(1, min(args.devices, 100_000))
    period = max(10, min(args.period, 60))
    hold = max(1.0, min(args.lock, 30.0))
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    port = freePort()
    listen = f"127.0.0.1:{port}"
    db = os.path.join(workdir, "natkeep.sqlite")
    fillStore(db, devices, listen)
    report = os.path.join(workdir, "meter.json")
    began = time.monotonic()
    end = began + 10 + 3 * period
    meter = startMeter(devices, began, end, period, report)
    natkeep = Natkeep(
        workdir,
        ["--listen", listen, "--db", db, "--period", str(period), "--send-interval", "100"],
    )
    prober = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    prober.bind(("127.0.0.2", 0))
    prober.settimeout(30)
    try:
        natkeep.waitLog("Restored", 120)
        time.sleep(period)
        locker = sqlite3.connect(db, isolation_level=None, timeout=5)
        locker.execute("BEGIN IMMEDIATE")
        locked = time.monotonic()
        prober.sendto(register(user="late", callId="late"), ("127.0.0.1", port))
        slowest = 0.0
        while time.monotonic() - locked < hold:
            sent = time.monotonic()
            prober.sendto(request("OPTIONS"), ("127.0.0.1", port))
            while True:
                data = prober.recv(65536)
                if b"CSeq: 1 OPTIONS" in data:
                    break
            slowest = max(slowest, time.monotonic() - sent)
            time.sleep(0.2)
        locker.execute("ROLLBACK")
        released = time.monotonic()
        locker.close()
        while True:
            data = prober.recv(65536)
            if b"Call-ID: late" in data:
                answered = time.monotonic()
                status = data.split(b"\r\n", 1)[0].decode()
                break
        meter.wait(end - time.monotonic() + 60)
    finally:
        natkeep.stop()
        prober.close()
    with open(report) as f:
        figures = json.load(f)
    result = {
        "devices": devices,
        "period_s": period,
        "lock_s": hold,
        "max_gap_s": figures["max_gap_s"],
        "max_gap_ratio": figures["max_gap_ratio"],
        "slowest_options_s": slowest,
        "register_answer": status,
        "register_answered_after_release_s": answered - released,
    }
    print(f"{devices} devices, PERIOD {period} s, database locked for {hold:.0f} s")
    print(
        f"  worst heartbeat gap          {figures['max_gap_s']:.3f} s "
        f"({figures['max_gap_ratio']:.3f} x PERIOD)"
    )
    print(f"  slowest OPTIONS answer       {slowest * 1000:.1f} ms")
    print(f"  REGISTER sent in the lock    {status}, {answered - released:.3f} s after it ended")
    print(json.dumps({"benchmark": "locked", **result}))


if __name__ == "__main__":
    main()
