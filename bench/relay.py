"""
Calls relayed per second: sipp UAC -> natkeep -> sipp UAS, and the same
through Kamailio as a stateless forwarder (forward() in a minimal config),
each proxy pinned to core 0 while both sipps run on core 1.

A call is INVITE/180/200/ACK/BYE/200: three requests and three responses
cross the proxy (six messages).  For each rate step it
prints the calls completed and failed, and the proxy's CPU microseconds per
relayed message (from /proc).  Loopback only; every step is bounded in
calls and time.

    python bench/relay.py [--rates 100 200 400 800] [--seconds 10] [--media]

With --media, natkeep runs the steps again with SS_MEDIA_PROXY_BEHIND_NAT
on and Debian's rtpengine (userspace, on core 1) taking every call's
offer, answer and delete, and prints the ng command latency.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    KAMAILIO,
    KAMAILIO_MODULES,
    Natkeep,
    freePort,
    kamailioCommand,
    onCore,
    treeCpuSeconds,
)

from natkeep.testing import sippCounts  # noqa: E402

SIPP_FOLDER = os.path.join(os.path.dirname(HERE), "tests", "sipp")

#: Messages a call sends through the proxy: INVITE, 180, 200, ACK, BYE, 200.
MESSAGES_PER_CALL = 6

PHONE = "127.0.0.2"
CALLER = "127.0.0.3"


def scenario(folder: str, name: str, caller: str = "caller@192.0.2.99") -> str:
    with open(os.path.join(SIPP_FOLDER, name), encoding="utf-8") as f:
        text = f.read()
    user, _, domain = caller.partition("@")
    text = text.replace("CALLER_USER", user).replace("CALLER_DOMAIN", domain)
    for nop in (
        '<nop condexec="hangup" next="hangUp" />',
        '<nop condexec="phoneHangsUp" next="waitBye" />',
    ):
        text = text.replace(nop, "")
    text = text.replace('<pause milliseconds="300" />', '<pause milliseconds="50" />')
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def runStep(
    folder: str,
    proxy: str,
    phonePort: int,
    rate: int,
    seconds: int,
    cpu: Callable[[], float],
) -> dict[str, float]:
    calls = rate * seconds
    phone = subprocess.Popen(
        onCore(
            1,
            ["sipp", "-sf", scenario(folder, "phone.xml"), "-i", PHONE, "-p", str(phonePort)]
            + ["-s", "1001", "-nostdin", "-timeout", f"{seconds + 20}s", "-m", str(calls), proxy],
        ),
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(0.5)
    before = cpu()
    started = time.monotonic()
    caller = subprocess.run(
        onCore(
            1,
            ["sipp", "-sf", scenario(folder, "caller.xml"), "-i", CALLER, "-p", str(freePort())]
            + ["-s", "1001", "-nostdin", "-r", str(rate), "-m", str(calls), "-l", str(rate * 4)]
            + ["-timeout", f"{seconds + 20}s", proxy],
        ),
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - started
    used = cpu() - before
    try:
        phone.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        phone.kill()
        phone.communicate()
    done, failed = sippCounts(caller.stdout)
    messages = done * MESSAGES_PER_CALL
    return {
        "rate": rate,
        "calls": done,
        "failed": failed,
        "seconds": round(elapsed, 2),
        "calls_per_s": round(done / elapsed, 1) if elapsed else 0.0,
        "cpu_s": round(used, 3),
        "cpu_us_per_message": round(used / messages * 1e6, 2) if messages else 0.0,
    }


def registerPhone(server: tuple[str, int], port: int) -> None:
    from natkeep.testing import register

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((PHONE, port))
        s.settimeout(5)
        s.sendto(register(user="1001", contacts=[f"<sip:1001@{PHONE}:{port}>"]), server)
        s.recv(4096)


KAMAILIO_CONFIG = """#!KAMAILIO
debug=0
log_stderror=yes
children=1
auto_aliases=no
listen=udp:127.0.0.1:{port}
mpath="{modules}"
request_route {{
    forward("{phone}", {phonePort});
}}
"""


def natkeepSteps(
    folder: str, phonePort: int, arguments: argparse.Namespace, rtpengine: Optional[str]
) -> list[dict[str, float]]:
    """
    The rate steps through natkeep; with C{rtpengine} (its ng socket) the
    media of every call goes through it.
    """
    port = freePort()
    callerPort = freePort()
    web = freePort()
    options = [
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"sip:{CALLER}:{callerPort}",
        "--db",
        ":memory:",
        "--period",
        "600",
        "--status",
        f"127.0.0.1:{web}",
    ]
    if rtpengine:
        options += ["--media-proxy-behind-nat", "yes", "--rtpengine", rtpengine]
    natkeep = Natkeep(folder, options)
    steps = []
    try:
        natkeep.waitLog("Registrar listening", 20)
        registerPhone(("127.0.0.1", port), phonePort)
        print(f"natkeep (stateless relay, one core, media {'on' if rtpengine else 'off'}):")
        for rate in arguments.rates:
            step = runStep(
                folder, f"127.0.0.1:{port}", phonePort, rate, arguments.seconds, natkeep.cpuSeconds
            )
            steps.append(step)
            print(f"  {step}")
        if rtpengine:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{web}/status", timeout=5) as page:
                media = json.load(page)["media"]
            print(f"  ng latency p50 {media['ng_p50_ms']} ms, p99 {media['ng_p99_ms']} ms")
            steps.append({"ng_p50_ms": media["ng_p50_ms"], "ng_p99_ms": media["ng_p99_ms"]})
    finally:
        natkeep.stop()
    return steps


def floorSteps(
    folder: str, phonePort: int, arguments: argparse.Namespace, loop: str = "twisted"
) -> list[dict[str, float]]:
    """
    The rate steps through bench/floor.py (its C{--loop}), pinned to core 0
    like natkeep.
    """
    port = freePort()
    forwarder = subprocess.Popen(
        onCore(
            0,
            [sys.executable, os.path.join(HERE, "floor.py")]
            + ["--listen", f"127.0.0.1:{port}", "--phone", f"{PHONE}:{phonePort}"]
            + ["--loop", loop],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    steps = []
    try:
        time.sleep(1)
        print(
            f"{loop} floor (bench/floor.py --loop {loop}: receive and send, no parsing, one core):"
        )
        for rate in arguments.rates:
            step = runStep(
                folder,
                f"127.0.0.1:{port}",
                phonePort,
                rate,
                arguments.seconds,
                lambda: treeCpuSeconds(forwarder.pid),
            )
            steps.append(step)
            print(f"  {step}")
    finally:
        forwarder.terminate()
        forwarder.wait(10)
    return steps


def startRtpengine(folder: str) -> tuple[subprocess.Popen[bytes], int]:
    """
    Debian's rtpengine on loopback, userspace only, on core 1.
    """
    ng = freePort()
    log = os.path.join(folder, "rtpengine.log")
    command = onCore(
        1,
        [
            "rtpengine",
            "--interface=127.0.0.1",
            f"--listen-ng=127.0.0.1:{ng}",
            "--foreground",
            "--table=-1",
            "--port-min=20000",
            "--port-max=59999",
            # Ports come back at the delete, not 30 s later.
            "--delete-delay=0",
            "--log-stderr",
            "--log-level=4",
            "--no-fallback",
        ],
    )
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            if b"Startup complete" in f.read():
                return process, ng
        time.sleep(0.05)
    # At log level 4 the line may not come: it listens by now.
    return process, ng


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", type=int, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--no-kamailio", action="store_true")
    parser.add_argument(
        "--floor",
        nargs="*",
        choices=["twisted", "epoll", "blocking"],
        help="also bench/floor.py's bare forwarders (alone: twisted, the least a Twisted "
        "relay costs; epoll and blocking: Python loops without Twisted)",
    )
    parser.add_argument(
        "--allocator", default="tlsf", help="kamailio -x, as operators start it for load"
    )
    parser.add_argument(
        "--media", action="store_true", help="natkeep again with media through rtpengine"
    )
    arguments = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"natkeep": [], "kamailio": []}
    if arguments.floor == []:
        arguments.floor = ["twisted"]

    with tempfile.TemporaryDirectory() as folder:
        phonePort = freePort()
        results["natkeep"] = natkeepSteps(folder, phonePort, arguments, None)
        if arguments.media:
            engine = startRtpengine(folder)
            try:
                results["natkeep-media"] = natkeepSteps(
                    folder, phonePort, arguments, f"udp:127.0.0.1:{engine[1]}"
                )
            finally:
                engine[0].terminate()
                engine[0].wait(10)

        for loop in arguments.floor or ():
            key = "floor" if loop == "twisted" else f"floor-{loop}"
            results[key] = floorSteps(folder, phonePort, arguments, loop)

        kamailio: Optional[subprocess.Popen[bytes]] = None
        if not arguments.no_kamailio and os.path.exists(KAMAILIO):
            kport = freePort()
            config = os.path.join(folder, "kamailio.cfg")
            with open(config, "w") as f:
                f.write(
                    KAMAILIO_CONFIG.format(
                        port=kport, modules=KAMAILIO_MODULES, phone=PHONE, phonePort=phonePort
                    )
                )
            allocator = ["-x", arguments.allocator] if arguments.allocator else []
            command = kamailioCommand(config, os.path.join(folder, "run"), 0, *allocator)
            kamailio = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                time.sleep(2)
                print(
                    f"kamailio 5.6 -x {arguments.allocator or 'qm'} "
                    "(forward(), stateless, children=1, one core):"
                )
                for rate in arguments.rates:
                    step = runStep(
                        folder,
                        f"127.0.0.1:{kport}",
                        phonePort,
                        rate,
                        arguments.seconds,
                        lambda: treeCpuSeconds(kamailio.pid),
                    )
                    results["kamailio"].append(step)
                    print(f"  {step}")
            finally:
                kamailio.terminate()
                kamailio.wait(10)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
