"""
REGISTER parse cost: natkeep's focused parser against the maintained
pure-Python parser sipmessage (when installed), and the full registrar
handling of one REGISTER through its listening socket (parse, bind,
answer; store off).

    python bench/parser.py [--count N]

Prints text and a JSON line.  Loops are bounded by --count.
"""

from __future__ import annotations

import argparse
import json
import time

from twisted.internet.task import Clock

from natkeep.bindings import BindingTable
from natkeep.counts import Counts
from natkeep.outbox import Outbox
from natkeep.plugins.natkeep_expiry import CapExpiry
from natkeep.registrar import Registrar
from natkeep.sip import parseMessage, parseNameAddr, parseVia
from natkeep.testing import fakeSocket, register


def perCall(fn, items, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    count = min(args.count, 200000)
    datagrams = [
        register(user=f"{n}", callId=f"c{n}", contacts=[f"<sip:{n}@192.168.1.20:5060>"])
        for n in range(count)
    ]

    def natkeepParse(data: bytes) -> None:
        m = parseMessage(data)
        parseVia(m.headers["via"][0])
        parseNameAddr(m.headers["contact"][0])
        parseNameAddr(m.headers["to"][0])

    results = {"count": count, "natkeep_parse_us": perCall(natkeepParse, datagrams)}
    try:
        import sipmessage
    except ImportError:
        results["sipmessage_parse_us"] = None
    else:

        def sipmessageParse(data: bytes) -> None:
            m = sipmessage.Message.parse(data)
            m.via  # noqa: B018 - parse the headers the registrar needs
            m.contact  # noqa: B018
            m.to_address  # noqa: B018

        results["sipmessage_parse_us"] = perCall(sipmessageParse, datagrams[:5000])

    clock = Clock()
    outbox = Outbox(clock, None, Counts())
    registrar = Registrar(BindingTable(), clock, outbox, CapExpiry(3600, 300))
    protocol, transport = fakeSocket(registrar, outbox, clock)
    source = ("203.0.113.7", 40000)

    def handle(data: bytes) -> None:
        protocol.datagramReceived(data, source)
        transport.written.clear()

    results["registrar_handle_us"] = perCall(handle, datagrams, repeat=1)
    for key, value in results.items():
        print(f"{key:>22}: {value if value is None or key == 'count' else f'{value:.1f}'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
