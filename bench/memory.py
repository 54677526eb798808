"""
Memory: the RSS of a real C{twistd natkeep} per binding, after it restored
N bindings from its store, against the same process with an empty store.

    python bench/memory.py [--devices 100000 1000000]

Prints text and one JSON line.  The process listens on loopback only, with
heartbeats off, so it sends nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Natkeep, fillStore, freePort  # noqa: E402


def rssAfterRestore(devices: int) -> tuple[int, float]:
    """
    RSS in bytes of natkeep once it restored C{devices} bindings, and the
    seconds it took from start to restored.
    """
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    port = freePort()
    listen = f"127.0.0.1:{port}"
    if devices:
        fillStore(os.path.join(workdir, "natkeep.sqlite"), devices, listen)
    natkeep = Natkeep(
        workdir,
        [
            "--listen",
            listen,
            "--db",
            "natkeep.sqlite",
            "--period",
            "86400",
            "--endpoint-nat-expire",
            "3600",
            "--message",
            "",
        ],
    )
    try:
        started = time.monotonic()
        natkeep.waitLog("Restored", 600)
        restored = time.monotonic() - started
        time.sleep(1.0)
        return natkeep.rssBytes(), restored
    finally:
        natkeep.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    baseline, _ = rssAfterRestore(0)
    print(f"empty store: RSS {baseline / 2**20:.1f} MiB")
    results: dict = {"baseline_rss_bytes": baseline, "runs": []}
    for devices in args.devices:
        devices = max(1, min(devices, 2_000_000))
        rss, restored = rssAfterRestore(devices)
        perBinding = (rss - baseline) / devices
        results["runs"].append(
            {
                "devices": devices,
                "rss_bytes": rss,
                "restore_s": restored,
                "bytes_per_binding": perBinding,
            }
        )
        print(
            f"{devices:>9} bindings: RSS {rss / 2**20:8.1f} MiB, {perBinding:6.0f} bytes per "
            f"binding, restored in {restored:.1f} s",
            flush=True,
        )
    print(json.dumps({"benchmark": "memory", **results}))


if __name__ == "__main__":
    main()
