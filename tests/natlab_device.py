"""
A phone for the NAT lab, run inside a device namespace:

    python natlab_device.py --server HOST:PORT --user U --port P --duration S [--answer-options]

It registers (Via and Contact name its own, private-side address), then for
DURATION seconds prints one JSON line per datagram received: seconds since
the 200 OK, the first bytes, and the sender.  With --answer-options it
answers each OPTIONS with 200 OK, as a live phone does.  It sends nothing
else, so only the server's heartbeats can keep its NAT mapping open.
"""

import argparse
import json
import socket
import sys
import time


def register(user: str, host: str, port: int, cseq: int) -> bytes:
    return (
        f"REGISTER sip:natkeep.test SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-{user}-{cseq};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@natkeep.test>;tag={user}\r\n"
        f"To: <sip:{user}@natkeep.test>\r\n"
        f"Call-ID: lab-{user}\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Contact: <sip:{user}@{host}:{port}>\r\n"
        "Expires: 300\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def answer(data: bytes) -> bytes:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    keep = [
        line
        for line in head.split("\r\n")[1:]
        if line.split(":", 1)[0].strip().lower() in ("via", "from", "to", "call-id", "cseq")
    ]
    return ("\r\n".join(["SIP/2.0 200 OK", *keep, "Content-Length: 0", "", ""])).encode()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--answer-options", action="store_true")
    args = parser.parse_args()
    host, port = args.server.rsplit(":", 1)
    server = (host, int(port))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((args.host, args.port))
    s.settimeout(1)
    for attempt in range(1, 6):
        s.sendto(register(args.user, args.host, args.port, attempt), server)
        try:
            data, _ = s.recvfrom(4096)
        except socket.timeout:
            continue
        if data.startswith(b"SIP/2.0 200"):
            break
    else:
        print(json.dumps({"error": "no 200 OK to REGISTER"}), flush=True)
        return 1
    registered = time.monotonic()
    # The monotonic clock is the machine's, shared by every namespace.
    print(json.dumps({"registered": True, "at": registered}), flush=True)
    deadline = registered + min(args.duration, 300)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return 0
        s.settimeout(left)
        try:
            data, source = s.recvfrom(4096)
        except socket.timeout:
            return 0
        print(
            json.dumps(
                {
                    "t": round(time.monotonic() - registered, 3),
                    "data": data[:40].decode("latin-1"),
                    "from": list(source),
                }
            ),
            flush=True,
        )
        if args.answer_options and data.startswith(b"OPTIONS "):
            s.sendto(answer(data), source)


if __name__ == "__main__":
    sys.exit(main())
