"""
REGISTER throughput: a bounded load generator ramps REGISTERs from fresh
devices at a real C{twistd natkeep} (store on, pinned to one core) until
fewer than 99.9 % get 200 OK, or natkeep no longer keeps up (median latency
over 10 ms: a queue is growing in its socket buffer, which would only delay
the losses past the end of a step).

    python bench/register_load.py [--start 4000] [--step 2000] [--max 30000] [--seconds 3]

For each rate: sent, answered 200 OK, success ratio, p50/p99 latency, and
natkeep's CPU microseconds per REGISTER (from /proc).  Prints text and one
JSON line.  Traffic goes to 127.0.0.1 only; every loop is bounded in count
and time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    KEEPS_UP_P50_MS,
    Natkeep,
    freePort,
    pin,
    ramp,
    registerStep,
)


def registerBytes(user: str, port: int) -> bytes:
    return (
        f"REGISTER sip:bench.test SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 100.64.0.9:5060;branch=z9hG4bK{user};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@bench.test>;tag={user}\r\n"
        f"To: <sip:{user}@bench.test>\r\n"
        f"Call-ID: {user}\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:{user}@100.64.0.9:5060>\r\n"
        "Expires: 300\r\n"
        "User-Agent: natkeep-bench\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def step(
    server: tuple[str, int], rate: int, seconds: float, tag: str, natkeep: Natkeep
) -> dict[str, float]:
    count = int(rate * seconds)
    datagrams = [registerBytes(f"{tag}x{n}", server[1]) for n in range(count)]
    return registerStep(server, datagrams, rate, seconds, natkeep)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--start", type=int, default=4000)
    parser.add_argument("--step", type=int, default=2000)
    parser.add_argument("--max", type=int, default=30000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--db", default="natkeep.sqlite", help="the store file; :memory: for no disk store"
    )
    parser.add_argument(
        "--read-pause", default="1", help="natkeep's read_pause in ms (its default is 1)"
    )
    args = parser.parse_args()
    maximum = min(args.max, 50000)
    seconds = min(args.seconds, 10.0)
    pin(1)
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    port = freePort()
    natkeep = Natkeep(
        workdir,
        [
            "--listen",
            f"127.0.0.1:{port}",
            "--db",
            args.db,
            "--period",
            "30",
            "--read-pause",
            args.read_pause,
        ],
    )
    best, results = ramp(
        natkeep,
        range(args.start, maximum + 1, args.step),
        lambda rate: step(("127.0.0.1", port), rate, seconds, f"r{rate}", natkeep),
        lambda rate, result: (
            f"rate {rate:6d}/s: {result['ok']:6d}/{result['sent']:6d} ok "
            f"({result['success'] * 100:6.2f} %), p50 {result['p50_ms']:6.2f} ms, "
            f"p99 {result['p99_ms']:7.2f} ms, {result['cpu_us_per_register']:6.1f} CPU us/REGISTER"
        ),
    )
    if best:
        print(
            f"highest sustained rate (>= 99.9 % 200 OK, p50 <= {KEEPS_UP_P50_MS:g} ms): "
            f"{best['rate']} REGISTER/s (p50 {best['p50_ms']:.2f} ms, "
            f"p99 {best['p99_ms']:.2f} ms, {best['cpu_us_per_register']:.1f} CPU us per REGISTER)"
        )
    print(json.dumps({"benchmark": "register_load", "best": best, "steps": results}))


if __name__ == "__main__":
    main()
