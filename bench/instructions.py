"""
Instructions per REGISTER, counted by callgrind: fresh devices' REGISTERs
fed in-process to a listening socket (L{natkeep.protocol.SIPProtocol}) on an
in-memory transport, the registrar behind it, a reactor turn (commit and
answers) every 50 REGISTERs, with the SQLite store on or off.  Instruction
counts are repeatable where timings on a shared machine are not.

    python bench/instructions.py            # both, under valgrind
    python bench/instructions.py --store off

The figure is the difference between a run of 3 000 and one of 1 000
REGISTERs, divided by 2 000, so start-up and imports cancel out.  Loops are
bounded by the count; nothing touches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


def drive(count: int, storeOn: bool) -> None:
    """
    Feed C{count} REGISTERs of fresh devices through one listening socket.
    """
    from twisted.internet.task import Clock

    from natkeep.bindings import BindingTable
    from natkeep.counts import Counts
    from natkeep.outbox import Outbox
    from natkeep.plugins.natkeep_expiry import CapExpiry
    from natkeep.registrar import Registrar
    from natkeep.store import SQLiteStore
    from natkeep.testing import fakeSocket, register

    datagrams = [
        register(user=f"{n}", callId=f"c{n}", contacts=[f"<sip:{n}@192.168.1.20:5060>"])
        for n in range(count)
    ]
    clock = Clock()
    clock.advance(1000)
    store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "s.sqlite")) if storeOn else None
    table = BindingTable(removed=store.delete) if store else BindingTable()
    outbox = Outbox(clock, store, Counts())
    registrar = Registrar(table, clock, outbox, CapExpiry(3600, 300), store=store)
    protocol, transport = fakeSocket(registrar, outbox, clock)
    for n, data in enumerate(datagrams):
        protocol.datagramReceived(data, ("203.0.113.7", 40000 + n % 20000))
        if n % 50 == 49:
            clock.advance(0)
            transport.written.clear()
    clock.advance(0)
    if len(table) != count:
        raise SystemExit(f"only {len(table)} of {count} registered")


def counted(count: int, store: str) -> int:
    """
    Instructions callgrind counts for a whole run of C{count} REGISTERs.
    """
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={folder}/out",
                sys.executable,
                os.path.abspath(__file__),
                "--drive",
                str(count),
                "--store",
                store,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise SystemExit(f"callgrind printed no total:\n{result.stderr}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", choices=["on", "off", "both"], default="both")
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive is not None:
        drive(min(args.drive, 100_000), args.store == "on")
        return
    results = {}
    for store in ("off", "on") if args.store == "both" else (args.store,):
        small, large = counted(1000, store), counted(3000, store)
        results[f"store_{store}"] = (large - small) // 2000
        print(f"store {store:>3}: {results[f'store_{store}']} instructions per REGISTER")
    print(json.dumps({"benchmark": "instructions", **results}))


if __name__ == "__main__":
    main()
