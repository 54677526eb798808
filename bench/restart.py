"""
Restart: how long after a real C{twistd natkeep} starts on a store of N
bindings (1 000 000 by default) heartbeats flow again: the first one at the
meter, and the moment every device has had one.

    python bench/restart.py [--devices 1000000] [--period 30] [--db postgresql://...]

Settings give one cycle room for every device (SEND_INTERVAL 500 ms,
SEND_ONE_TIME sized to reach all in one PERIOD).  Prints text and one JSON
line.  Traffic goes to 127.0.0.0/8 only, for a bounded time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Natkeep, fillStore, freePort  # noqa: E402
from heartbeat import startMeter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--period", type=int, default=30)
    parser.add_argument(
        "--db", default=None, help="a postgresql:// URI to use instead of an SQLite file"
    )
    args = parser.parse_args()
    devices = max(1, min(args.devices, 1_000_000))
    period = max(10, min(args.period, 300))
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    port = freePort()
    listen = f"127.0.0.1:{port}"
    db = args.db or os.path.join(workdir, "natkeep.sqlite")
    fillStore(db, devices, listen)
    batches = period * 2
    oneTime = math.ceil(devices * 1.2 / batches)
    report = os.path.join(workdir, "meter.json")
    began = time.monotonic()
    end = began + 5 + 2 * period
    meter = startMeter(devices, began, end, period, report)
    started = time.monotonic()
    natkeep = Natkeep(
        workdir,
        [
            "--listen",
            listen,
            "--db",
            db,
            "--period",
            str(period),
            "--send-interval",
            "500",
            "--send-one-time",
            str(oneTime),
            "--endpoint-nat-expire",
            "3600",
        ],
    )
    try:
        restoredAfter = natkeep.waitLog("Restored", 600)
        meter.wait(end - time.monotonic() + 60)
    finally:
        natkeep.stop()
    with open(report) as f:
        figures = json.load(f)
    first = figures["first_heartbeat_at"]
    allAt = figures["all_reached_at"]
    result = {
        "devices": devices,
        "period_s": period,
        "send_one_time": oneTime,
        "restored_after_s": restoredAfter,
        "first_heartbeat_after_s": first - started if first else None,
        "all_reached_after_s": allAt - started if allAt else None,
        "never_reached": figures["never_reached"],
        "meter_drops": figures["meter_drops"],
    }
    print(f"{devices} bindings, PERIOD {period} s")
    print(f"  restored after               {restoredAfter:.1f} s")
    print(f"  first heartbeat after        {result['first_heartbeat_after_s']:.1f} s")
    if allAt:
        print(f"  every device reached after   {result['all_reached_after_s']:.1f} s")
    else:
        print(f"  devices never reached        {figures['never_reached']}")
    print(f"  datagrams the meter dropped  {figures['meter_drops']}")
    print(json.dumps({"benchmark": "restart", **result}))


if __name__ == "__main__":
    main()
