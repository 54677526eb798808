"""
Heartbeat cost: N NATed bindings (one loopback address each, 127.64.0.1
upwards, port 47000) restored into a real C{twistd natkeep} pinned to one
core, PERIOD 10 s, measured over a window by a meter process that receives
every heartbeat:

- heartbeats/s, and natkeep's CPU microseconds per heartbeat (/proc);
- the largest gap between two heartbeats to one device;
- the fraction of devices reached in every period of the window;
- beside it, in the same run, a bare Python loop calling socket.sendto on
  the same destinations: the floor for a Python sender.

With C{--payload options} every heartbeat is a SIP OPTIONS, and the meter
answers each with a 200 OK sent from the device's own address, so natkeep's
CPU per heartbeat includes reading and matching the answer.  C{--pacing}
picks the pacing strategy (C{restart} by default).

    python bench/heartbeat.py --devices 10000 [--window 60] [--payload options] [--pacing spread]

Prints text and one JSON line.  Everything goes to 127.0.0.0/8; the loops
are bounded by the device count and the window.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import METER_PORT, Natkeep, bigReceiveBuffer, deviceAddress, fillStore, freePort, pin  # noqa: E402

PERIOD = 10

#: Linux's IP_PKTINFO, which Python 3.11's socket module does not export.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def socketDrops(port: int) -> int:
    """
    Datagrams the kernel dropped for the UDP socket bound to C{port}.
    """
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                return int(fields[-1])
    return -1


def answerOptions(data: bytes) -> bytes:
    """
    The 200 OK a phone sends to an OPTIONS: Via, From, To, Call-ID and
    CSeq copied, a To tag added.
    """
    lines = [b"SIP/2.0 200 OK"]
    for line in data.split(b"\r\n"):
        name = line.split(b":", 1)[0].lower()
        if name in (b"via", b"from", b"call-id", b"cseq"):
            lines.append(line)
        elif name == b"to":
            lines.append(line + b";tag=meter")
    lines.append(b"Content-Length: 0\r\n\r\n")
    return b"\r\n".join(lines)


def meter(devices: int, start: float, end: float, period: float, out: str) -> None:
    """
    Receive heartbeats until C{end} (monotonic); write per-window figures.
    An OPTIONS heartbeat is answered from the address it was sent to.
    """
    pin(1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bigReceiveBuffer(s, 256 << 20)
    s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    s.bind(("0.0.0.0", METER_PORT))
    with open(out + ".ready", "w"):
        pass
    last = [-1.0] * devices
    firstAt = [0.0] * devices
    maxGap = [0.0] * devices
    counts = [0] * devices
    received = floor = 0
    cmsgSpace = socket.CMSG_SPACE(12)
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data, ancillary, _, source = s.recvmsg(2048, cmsgSpace)
        except socket.timeout:
            break
        now = time.monotonic()
        options = data.startswith(b"OPTIONS ")
        if data not in (b"HELLO", b"\0\0\0\0") and not options:
            floor += 1
            continue
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                a, b, c, d = value[8:12]
                n = (((b - 64) << 16) | (c << 8) | d) - 1
                break
        else:
            continue
        if options:
            # Answer from the device's own address, as a phone would.
            info = struct.pack("I4s4s", 0, value[8:12], b"\0\0\0\0")
            try:
                s.sendmsg([answerOptions(data)], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, source)
            except OSError:
                pass
        if not 0 <= n < devices:
            continue
        previous = last[n]
        last[n] = now
        if now < start:
            continue
        received += 1
        if not counts[n]:
            firstAt[n] = now
        counts[n] += 1
        gap = now - (previous if previous >= start else start)
        if gap > maxGap[n]:
            maxGap[n] = gap
    # The stretch from the last heartbeat to the end of the window counts too.
    for n in range(devices):
        tail = end - max(last[n], start)
        if tail > maxGap[n]:
            maxGap[n] = tail
    window = end - start
    reachedEvery = sum(1 for gap in maxGap if gap <= period * 1.05)
    with open(out, "w") as f:
        json.dump(
            {
                "received": received,
                "window": window,
                "per_s": received / window,
                "max_gap_s": max(maxGap),
                "max_gap_ratio": max(maxGap) / period,
                "reached_every_period": reachedEvery / devices,
                "never_reached": sum(1 for c in counts if c == 0),
                "floor_datagrams": floor,
                "meter_drops": socketDrops(METER_PORT),
                "first_heartbeat_at": min((t for t in firstAt if t), default=None),
                "all_reached_at": max(firstAt) if all(counts) else None,
            },
            f,
        )


def readCounters(status: str) -> dict[str, int]:
    """
    natkeep's counters from its C{/status} endpoint on loopback.
    """
    from urllib.request import urlopen

    with urlopen(f"http://{status}/status", timeout=10) as response:
        return dict(json.load(response)["counters"])


def startMeter(
    devices: int, start: float, end: float, period: float, report: str
) -> subprocess.Popen[bytes]:
    """
    Run L{meter} in a process of its own (on core 1) and wait until it
    listens; it writes its figures to C{report} after C{end}.
    """
    process = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--devices",
            str(devices),
            "--meter",
            str(start),
            str(end),
            str(period),
            report,
        ],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not os.path.exists(report + ".ready"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the meter did not start")
        time.sleep(0.01)
    return process


def bareLoopFloor(devices: int, passes: int) -> float:
    """
    CPU microseconds per datagram of a bare Python sendto loop.
    """
    pin(0)
    addresses = [deviceAddress(n) for n in range(devices)]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    sent = 0
    start = time.process_time()
    for _ in range(passes):
        for address in addresses:
            try:
                s.sendto(b"FLOOR", address)
                sent += 1
            except OSError:
                pass
    elapsed = time.process_time() - start
    s.close()
    return elapsed / max(sent, 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--payload", default="raw", help="payload strategy (raw or options)")
    parser.add_argument("--pacing", default="restart", help="pacing strategy")
    parser.add_argument(
        "--meter", nargs=4, metavar=("START", "END", "PERIOD", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    devices = max(1, min(args.devices, 1_000_000))
    if args.meter:
        start, end, period, out = args.meter
        meter(devices, float(start), float(end), float(period), out)
        return
    window = max(PERIOD * 2, min(args.window, 600.0))
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    port = freePort()
    listen = f"127.0.0.1:{port}"
    status = f"127.0.0.1:{freePort()}"
    fillStore(os.path.join(workdir, "natkeep.sqlite"), devices, listen)
    batches = 20
    oneTime = max(1, math.ceil(devices * 1.25 / batches))
    warmup = 5 + devices / 50000 + PERIOD
    began = time.monotonic()
    # Start and end are fixed ahead; natkeep must be flowing by then.
    start = began + warmup + 3
    end = start + window
    report = os.path.join(workdir, "meter.json")
    meterProcess = startMeter(devices, start, end, PERIOD, report)
    floor = bareLoopFloor(devices, passes=max(1, 300000 // devices))
    natkeep = Natkeep(
        workdir,
        [
            "--listen",
            listen,
            "--db",
            "natkeep.sqlite",
            "--period",
            str(PERIOD),
            "--send-interval",
            str(PERIOD * 1000 // batches),
            "--send-one-time",
            str(oneTime),
            "--endpoint-nat-expire",
            "3600",
            "--payload",
            args.payload,
            "--pacing",
            args.pacing,
            "--status",
            status,
        ],
    )
    try:
        natkeep.waitLog("Restored", 120)
        while time.monotonic() < start:
            time.sleep(0.01)
        cpuBefore = natkeep.cpuSeconds()
        rss = natkeep.rssBytes()
        while time.monotonic() < end:
            time.sleep(0.05)
        cpu = natkeep.cpuSeconds() - cpuBefore
        counters = readCounters(status)
    finally:
        meterProcess.wait(window + 60)
        natkeep.stop()
    with open(report) as f:
        figures = json.load(f)
    figures.update(
        {
            "devices": devices,
            "payload": args.payload,
            "pacing": args.pacing,
            "period_s": PERIOD,
            "send_interval_ms": PERIOD * 1000 // batches,
            "send_one_time": oneTime,
            "natkeep_cpu_s": cpu,
            "natkeep_cpu_us_per_heartbeat": cpu / max(figures["received"], 1) * 1e6,
            "bare_loop_cpu_us_per_datagram": floor,
            "natkeep_rss_bytes": rss,
            "answers_matched": counters.get("heartbeats.answered", 0),
        }
    )
    figures["ratio_to_bare_loop"] = figures["natkeep_cpu_us_per_heartbeat"] / floor
    print(
        f"devices {devices}, PERIOD {PERIOD} s, window {window:.0f} s, "
        f"payload {args.payload}, pacing {args.pacing}"
    )
    print(f"  heartbeats/s                 {figures['per_s']:.0f}")
    print(f"  natkeep CPU per heartbeat    {figures['natkeep_cpu_us_per_heartbeat']:.2f} us")
    print(f"  bare sendto loop (floor)     {floor:.2f} us per datagram")
    print(f"  ratio to floor               {figures['ratio_to_bare_loop']:.2f}")
    print(
        f"  max gap to one device        {figures['max_gap_s']:.3f} s "
        f"({figures['max_gap_ratio']:.3f} x PERIOD)"
    )
    print(f"  reached every period         {figures['reached_every_period'] * 100:.2f} %")
    print(f"  answers matched (options)    {figures['answers_matched']}")
    print(json.dumps({"benchmark": "heartbeat", **figures}))


if __name__ == "__main__":
    main()
