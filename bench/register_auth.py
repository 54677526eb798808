"""
REGISTER with digest authentication against without: the same ramp of
fresh devices at two real C{twistd natkeep} processes (store on, pinned to
one core), one with C{auth = off}, one with C{auth = register}, and the
per-source limiter's cost per datagram.

    python bench/register_auth.py [--start 2000] [--step 2000] [--max 30000] [--seconds 3]

With auth on, each device sends a REGISTER, answers the 401's SHA-256
challenge, and must get 200 OK; the challenged and the answered REGISTER
each count as a message handled.  A step is sustained when at least
99.9 % of the devices got 200 OK with a median latency of at most 10 ms
(from the first REGISTER to the 200).  Prints the highest sustained
messages per second of each mode, their ratio, natkeep's CPU microseconds
per message, and one JSON line.  Traffic goes to 127.0.0.1 only; every loop
is bounded in count and time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import timeit
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Natkeep, freePort, loadSocket, paced, percentile, pin, ramp  # noqa: E402

from natkeep.digest import credentialsLine  # noqa: E402

REALM = "bench.test"
USERS = 200_000


def password(user: str) -> str:
    return f"pw-{user}"


def registerBytes(user: str, cseq: int, authorization: str = "") -> bytes:
    return (
        f"REGISTER sip:{REALM} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 100.64.0.9:5060;branch=z9hG4bK{user}c{cseq};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@{REALM}>;tag={user}\r\n"
        f"To: <sip:{user}@{REALM}>\r\n"
        f"Call-ID: {user}\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Contact: <sip:{user}@100.64.0.9:5060>\r\n"
        f"{authorization}"
        "Expires: 300\r\n"
        "User-Agent: natkeep-bench\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def answer(user: str, challenge: bytes) -> str:
    """
    The Authorization header answering the first (SHA-256) challenge.
    """
    start = challenge.find(b'nonce="') + 7
    nonce = challenge[start : challenge.find(b'"', start)].decode()

    def h(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    ha1 = h(f"{user}:{REALM}:{password(user)}")
    ha2 = h(f"REGISTER:sip:{REALM}")
    response = h(f"{ha1}:{nonce}:00000001:c{user}:auth:{ha2}")
    return (
        f'Authorization: Digest username="{user}", realm="{REALM}", nonce="{nonce}", '
        f'uri="sip:{REALM}", response="{response}", algorithm=SHA-256, qop=auth, '
        f'nc=00000001, cnonce="c{user}"\r\n'
    )


def callIdOf(data: bytes) -> bytes:
    start = data.find(b"\r\nCall-ID: ") + 11
    return data[start : data.find(b"\r\n", start)]


def step(
    server: tuple[str, int], rate: int, seconds: float, tag: str, natkeep: Natkeep
) -> dict[str, float]:
    """
    Start C{rate} fresh devices a second for C{seconds}, each carried
    through the challenge when one comes.
    """
    count = int(rate * seconds)
    users = [f"{tag}x{n}" for n in range(count)]
    firstAt: dict[bytes, float] = {}
    latencies: list[float] = []
    s = loadSocket()
    ok = 0
    messages = 0

    def send(data: bytes) -> None:
        nonlocal messages
        try:
            s.sendto(data, server)
            messages += 1
        except BlockingIOError:
            pass

    def drain() -> bool:
        nonlocal ok
        while True:
            try:
                data = s.recv(4096)
            except BlockingIOError:
                return bool(firstAt)
            callId = callIdOf(data)
            if data.startswith(b"SIP/2.0 401"):
                user = callId.decode()
                send(registerBytes(user, 2, answer(user, data)))
            elif data.startswith(b"SIP/2.0 200"):
                sent = firstAt.pop(callId, None)
                if sent is not None:
                    ok += 1
                    latencies.append(time.monotonic() - sent)

    def sendOne(index: int) -> None:
        user = users[index]
        firstAt[user.encode()] = time.monotonic()
        send(registerBytes(user, 1))

    cpuBefore = natkeep.cpuSeconds()
    index, _ = paced(count, rate, seconds, sendOne, drain)
    cpu = natkeep.cpuSeconds() - cpuBefore
    s.close()
    latencies.sort()

    perDevice = messages / max(index, 1)
    return {
        "devices_per_s": rate,
        "messages_per_s": rate * perDevice,
        "devices": index,
        "ok": ok,
        "success": ok / max(index, 1),
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "cpu_us_per_message": cpu / max(messages, 1) * 1e6,
    }


def rampMode(
    auth: bool, args: argparse.Namespace, credentials: str, workdir: str
) -> tuple[Optional[dict[str, float]], list[dict[str, float]]]:
    port = freePort()
    options = ["--listen", f"127.0.0.1:{port}", "--db", os.path.join(workdir, f"auth{auth}.db")]
    if auth:
        options += ["--auth", "register", "--credentials", credentials, "--realm", REALM]
    natkeep = Natkeep(workdir, options)
    mode = "auth" if auth else "noauth"
    seconds = min(args.seconds, 10.0)
    return ramp(
        natkeep,
        range(args.start, min(args.max, 50000) + 1, args.step),
        lambda rate: step(("127.0.0.1", port), rate, seconds, f"{mode}{rate}", natkeep),
        lambda rate, result: (
            f"{mode:6s} {rate:6d} devices/s = {result['messages_per_s']:7.0f} messages/s: "
            f"{result['ok']:6d}/{result['devices']:6d} 200 OK "
            f"({result['success'] * 100:6.2f} %), p50 {result['p50_ms']:6.2f} ms, "
            f"p99 {result['p99_ms']:7.2f} ms, {result['cpu_us_per_message']:6.1f} CPU us/message"
        ),
    )


def limiterCost() -> float:
    """
    Microseconds per L{SourceLimiter.admit} over 10 000 sources, all
    admitted (the common case: the bucket is found and refilled).
    """
    from natkeep.guard import SourceLimiter

    class Clock:
        now = 0.0

        def seconds(self) -> float:
            return self.now

    limiter = SourceLimiter(Clock(), 1_000_000, 1_000_000, ())  # type: ignore[arg-type]
    hosts = [f"198.51.{n >> 8}.{n & 255}" for n in range(10_000)]
    admit = limiter.admit

    def run() -> None:
        for host in hosts:
            admit(host)

    best = min(timeit.repeat(run, number=20, repeat=5))
    return best / (20 * len(hosts)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--start", type=int, default=2000)
    parser.add_argument("--step", type=int, default=2000)
    parser.add_argument("--max", type=int, default=30000)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    pin(1)
    workdir = tempfile.mkdtemp(prefix="natkeep-bench-")
    credentials = os.path.join(workdir, "users")
    # Users for every device a ramp may start, by the names step() gives.
    with open(credentials, "w") as f:
        rate = args.start
        while rate <= min(args.max, 50000):
            for n in range(int(rate * min(args.seconds, 10.0))):
                user = f"auth{rate}x{n}"
                f.write(credentialsLine(user, REALM, password(user), "SHA-256") + "\n")
            rate += args.step
    plain, plainSteps = rampMode(False, args, credentials, workdir)
    authed, authSteps = rampMode(True, args, credentials, workdir)
    cost = limiterCost()
    ratio = None
    if plain and authed:
        ratio = authed["messages_per_s"] / plain["messages_per_s"]
        print(
            f"highest sustained: {plain['messages_per_s']:.0f} REGISTER/s without auth, "
            f"{authed['messages_per_s']:.0f} REGISTER/s with (challenge and answer): "
            f"ratio {ratio:.2f}"
        )
    print(f"per-source limiter: {cost:.2f} us per datagram")
    print(
        json.dumps(
            {
                "benchmark": "register_auth",
                "noauth": plain,
                "auth": authed,
                "ratio": ratio,
                "limiter_us": cost,
                "steps": {"noauth": plainSteps, "auth": authSteps},
            }
        )
    )


if __name__ == "__main__":
    main()
