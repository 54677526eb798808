"""
Forward mode's refreshes: how many REGISTER refreshes a second natkeep
answers on its own in C{register_mode = forward}, against the same
refreshes in local mode, and how many REGISTERs reach the upstream.

    python bench/forward.py [--devices 10000] [--start 4000] [--step 2000] [--max 30000] [--seconds 3]

Kamailio from Debian's packages is the upstream registrar (usrloc in
memory, Path stored, no auth), on core 1 with the load generator.  For each
mode a fresh natkeep (store on, pinned to core 0) takes C{--devices}
devices registering once, then ramps refreshes of those devices (same
Contact, source and Call-ID, CSeq one higher each round) until fewer than
99.9 % get 200 OK or the median latency passes 10 ms.  Kamailio counts the
REGISTERs it received.  Traffic goes to 127.0.0.0/8 only; every loop is
bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    KAMAILIO,
    KAMAILIO_MODULES,
    Natkeep,
    freePort,
    kamailioCommand,
    loadSocket,
    pin,
    ramp,
    registerStep,
)

CORE = "127.0.0.60"
EDGE = "127.0.0.61"

CORE_CONFIG = """#!KAMAILIO
debug=2
log_stderror=yes
children=2
auto_aliases=no
listen=udp:{host}:{port}
mpath="{modules}"
loadmodule "sl.so"
loadmodule "textops.so"
loadmodule "pv.so"
loadmodule "xlog.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
modparam("usrloc", "db_mode", 0)
modparam("registrar", "use_path", 1)
modparam("registrar", "path_mode", 0)
request_route {{
    if (is_method("REGISTER")) {{
        xlog("L_INFO", "core REGISTER\\n");
        save("location");
        exit;
    }}
    sl_send_reply("405", "Method Not Allowed");
}}
"""


def refreshBytes(n: int, cseq: int, port: int) -> bytes:
    user = f"d{n}"
    return (
        f"REGISTER sip:bench.test SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 100.64.0.9:5060;branch=z9hG4bK{user}c{cseq};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@bench.test>;tag={user}\r\n"
        f"To: <sip:{user}@bench.test>\r\n"
        f"Call-ID: {user}\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Contact: <sip:{user}@100.64.0.9:5060>\r\n"
        "Expires: 300\r\n"
        "User-Agent: natkeep-bench\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def startCore(workdir: str) -> tuple[subprocess.Popen[bytes], int, str]:
    port = freePort()
    config = os.path.join(workdir, "core.cfg")
    with open(config, "w") as f:
        f.write(CORE_CONFIG.format(host=CORE, port=port, modules=KAMAILIO_MODULES))
    log = os.path.join(workdir, "core.log")
    command = kamailioCommand(config, os.path.join(workdir, "run"), 1)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    time.sleep(1.5)
    return process, port, log


def coreRegisters(log: str) -> int:
    with open(log, encoding="utf-8", errors="replace") as f:
        return len(re.findall(r"core REGISTER", f.read()))


def runMode(
    mode: str, args: argparse.Namespace, core: tuple[str, int], coreLog: str, workdir: str
) -> dict[str, Any]:
    port = freePort()
    natkeep = Natkeep(
        tempfile.mkdtemp(prefix=f"{mode}-", dir=workdir),
        [
            "--listen",
            f"{EDGE}:{port}",
            "--db",
            "natkeep.sqlite",
            "--period",
            "30",
            "--upstream",
            f"sip:{core[0]}:{core[1]}",
            "--register-mode",
            mode,
        ],
    )
    server = (EDGE, port)
    # One socket for every device: a refresh must come from the same source.
    s = loadSocket()
    devices = args.devices
    cseqs = [1] * devices
    try:
        natkeep.waitLog("Restored", 30)
        first = registerStep(
            server,
            [refreshBytes(n, 1, port) for n in range(devices)],
            2000,
            devices / 2000,
            natkeep,
            s,
        )
    except BaseException:
        natkeep.stop()
        raise
    print(f"{mode:7s} first registrations: {first['ok']}/{first['sent']} 200 OK", flush=True)
    before = coreRegisters(coreLog)

    def refreshes(rate: int) -> dict[str, float]:
        datagrams = []
        for k in range(int(rate * min(args.seconds, 10.0))):
            n = k % devices
            cseqs[n] += 1
            datagrams.append(refreshBytes(n, cseqs[n], port))
        return registerStep(server, datagrams, rate, min(args.seconds, 10.0), natkeep, s)

    best, steps = ramp(
        natkeep,
        range(args.start, min(args.max, 50000) + 1, args.step),
        refreshes,
        lambda rate, r: (
            f"{mode:7s} {rate:6d} refreshes/s: {r['ok']:6d}/{r['sent']:6d} 200 OK "
            f"({r['success'] * 100:6.2f} %), p50 {r['p50_ms']:6.2f} ms, "
            f"p99 {r['p99_ms']:7.2f} ms, {r['cpu_us_per_register']:6.1f} CPU us/REGISTER"
        ),
    )
    s.close()
    refreshed = sum(int(r["sent"]) for r in steps)
    upstream = coreRegisters(coreLog) - before
    print(f"{mode:7s} upstream REGISTERs during {refreshed} refreshes: {upstream}", flush=True)
    return {
        "first": first,
        "best": best,
        "steps": steps,
        "refreshes": refreshed,
        "upstream": upstream,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--start", type=int, default=4000)
    parser.add_argument("--step", type=int, default=2000)
    parser.add_argument("--max", type=int, default=30000)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    args.devices = max(1, min(args.devices, 100_000))
    if not os.path.exists(KAMAILIO):
        sys.exit("kamailio is not installed (Debian's kamailio)")
    pin(1)
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    core, corePort, coreLog = startCore(workdir)
    try:
        results = {
            mode: runMode(mode, args, (CORE, corePort), coreLog, workdir)
            for mode in ("local", "forward")
        }
    finally:
        core.terminate()
        core.wait(10)
    local, forward = results["local"]["best"], results["forward"]["best"]
    if local and forward:
        print(
            f"highest sustained refreshes: {local['rate']}/s local, {forward['rate']}/s "
            f"forward (ratio {forward['rate'] / local['rate']:.2f})"
        )
    from natkeep.config import Settings
    from natkeep.plan import forwardLoad

    defaults = Settings(registerMode="forward", upstream=f"sip:{CORE}")
    print("at the defaults:" + forwardLoad(defaults, args.devices)[1].split(":", 1)[1])
    print(json.dumps({"benchmark": "forward", **results}))


if __name__ == "__main__":
    main()
