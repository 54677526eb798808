"""
The two ends of a call with audio, for the NAT lab, run inside a namespace:

    python media_agent.py phone --host H --server S:P --rtp-port N
    python media_agent.py caller --host H --sip-port P --server S:P --rtp-port N --callee U

The phone registers through natkeep, answers the INVITE with SDP naming
its own (private) address, and after the ACK sends RTP to the address the
INVITE's SDP named, counting the RTP that reaches it, until the BYE.  The
caller sends the INVITE with SDP naming its address, ACKs the 200, sends
RTP to the address the 200's SDP named and counts what reaches it, then
sends BYE.  Each prints one JSON line: packets sent and received, the
SDP connection address it was given, and the final status of the call.
"""

import argparse
import json
import re
import socket
import sys
import time

PACKETS = 60


def sdp(host, port):
    body = (
        f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    return body


def mediaOf(message):
    body = message.split(b"\r\n\r\n", 1)[1].decode("latin-1")
    host = re.search(r"c=IN IP4 (\S+)", body).group(1)
    port = int(re.search(r"m=audio (\d+)", body).group(1))
    return host, port


def header(message, name):
    for line in message.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def headers(message, name):
    found = []
    for line in message.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            found.append(value.strip())
    return found


def talk(rtp, target, deadline):
    """
    Send PACKETS RTP packets to target, 20 ms apart, and count what comes
    in until deadline.
    """
    received = 0
    sent = 0
    rtp.settimeout(0.02)
    seq = 0
    while time.monotonic() < deadline:
        if sent < PACKETS:
            packet = bytes([0x80, 0, seq >> 8 & 255, seq & 255]) + b"\0" * 8 + b"\xff" * 160
            seq += 1
            try:
                rtp.sendto(packet, target)
                sent += 1
            except OSError:
                sent += 1
        try:
            data, _ = rtp.recvfrom(2048)
            if data[:1] == b"\x80":
                received += 1
        except OSError:
            pass
    return sent, received


def phone(args):
    host, port = args.server.rsplit(":", 1)
    server = (host, int(port))
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sip.bind((args.host, 5060))
    sip.settimeout(10)
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind((args.host, args.rtp_port))
    register = (
        f"REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {args.host}:5060;branch=z9hG4bK-mreg;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:1001@example.com>;tag=r1\r\n"
        "To: <sip:1001@example.com>\r\nCall-ID: media-phone\r\nCSeq: 1 REGISTER\r\n"
        f"Contact: <sip:1001@{args.host}:5060>\r\nExpires: 300\r\nContent-Length: 0\r\n\r\n"
    )
    sip.sendto(register.encode(), server)
    answer = sip.recv(65536)
    result = {"registered": answer[:20].decode("latin-1"), "heartbeats": 0}
    print(json.dumps({"ready": True}), flush=True)
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        sip.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data, source = sip.recvfrom(65536)
        except socket.timeout:
            break
        if data == b"HELLO":
            result["heartbeats"] += 1
            continue
        if not data.startswith(b"INVITE "):
            continue
        result["offer"] = mediaOf(data)
        vias = "".join(f"Via: {v}\r\n" for v in headers(data, "via"))
        rr = "".join(f"Record-Route: {v}\r\n" for v in headers(data, "record-route"))
        body = sdp(args.host, args.rtp_port)
        ok = (
            f"SIP/2.0 200 OK\r\n{vias}{rr}From: {header(data, 'from')}\r\n"
            f"To: {header(data, 'to')};tag=p1\r\nCall-ID: {header(data, 'call-id')}\r\n"
            f"CSeq: {header(data, 'cseq')}\r\nContact: <sip:1001@{args.host}:5060>\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        )
        sip.sendto(ok.encode(), source)
        sip.settimeout(10)
        while True:
            data, source = sip.recvfrom(65536)
            if data.startswith(b"ACK "):
                break
        sent, received = talk(rtp, result["offer"], time.monotonic() + 3)
        result.update(sent=sent, received=received)
        while True:
            data, source = sip.recvfrom(65536)
            if data.startswith(b"BYE "):
                vias = "".join(f"Via: {v}\r\n" for v in headers(data, "via"))
                bye = (
                    f"SIP/2.0 200 OK\r\n{vias}From: {header(data, 'from')}\r\n"
                    f"To: {header(data, 'to')}\r\nCall-ID: {header(data, 'call-id')}\r\n"
                    f"CSeq: {header(data, 'cseq')}\r\nContent-Length: 0\r\n\r\n"
                )
                sip.sendto(bye.encode(), source)
                break
        break
    print(json.dumps(result), flush=True)


def caller(args):
    host, port = args.server.rsplit(":", 1)
    server = (host, int(port))
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sip.bind((args.host, args.sip_port))
    sip.settimeout(1)
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind((args.host, args.rtp_port))
    body = sdp(args.host, args.rtp_port)
    call = f"media-{args.rtp_port}-{time.monotonic_ns()}"
    invite = (
        f"INVITE sip:{args.callee}@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {args.host}:{args.sip_port};branch=z9hG4bK-{call}i;rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:far@{args.host}>;tag=c1\r\n"
        f"To: <sip:{args.callee}@example.com>\r\nCall-ID: {call}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:far@{args.host}:{args.sip_port}>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    result = {}
    final = None
    deadline = time.monotonic() + 10
    while final is None and time.monotonic() < deadline:
        sip.sendto(invite.encode(), server)
        try:
            while True:
                data, _ = sip.recvfrom(65536)
                code = int(data.split(b" ", 2)[1])
                if code >= 200:
                    final = data
                    break
        except socket.timeout:
            continue
    if final is None:
        print(json.dumps({"final": None}), flush=True)
        return
    result["final"] = int(final.split(b" ", 2)[1])
    if result["final"] != 200:
        print(json.dumps(result), flush=True)
        return
    result["answer"] = mediaOf(final)
    route = "".join(f"Route: {v}\r\n" for v in headers(final, "record-route"))
    contact = re.search(r"<([^>]+)>", header(final, "contact")).group(1)
    to = header(final, "to")

    def inDialog(method, cseq):
        return (
            f"{method} {contact} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {args.host}:{args.sip_port};branch=z9hG4bK-{call}{method};rport\r\n"
            f"Max-Forwards: 70\r\n{route}From: <sip:far@{args.host}>;tag=c1\r\nTo: {to}\r\n"
            f"Call-ID: {call}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
        ).encode()

    sip.sendto(inDialog("ACK", 1), server)
    sent, received = talk(rtp, result["answer"], time.monotonic() + 3.5)
    result.update(sent=sent, received=received)
    sip.sendto(inDialog("BYE", 2), server)
    try:
        result["bye"] = int(sip.recv(65536).split(b" ", 2)[1])
    except socket.timeout:
        result["bye"] = None
    print(json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("phone", "caller"))
    parser.add_argument("--host", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--sip-port", type=int, default=5070)
    parser.add_argument("--rtp-port", type=int, required=True)
    parser.add_argument("--callee", default="1001")
    parser.add_argument("--duration", type=float, default=30)
    args = parser.parse_args()
    (phone if args.role == "phone" else caller)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
