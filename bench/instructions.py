"""
Instructions per REGISTER, counted by callgrind: fresh devices' REGISTERs
fed in-process to a listening socket (L{natkeep.protocol.SIPProtocol}) on an
in-memory transport, the registrar behind it, a reactor turn (commit and
answers) every 50 REGISTERs, with the SQLite store on or off.  Instruction
counts are repeatable where timings on a shared machine are not.

    python bench/instructions.py            # both, under valgrind
    python bench/instructions.py --store off

With C{--what options}: instructions per OPTIONS heartbeat with 10 000
NATed bindings, in two parts: the answer (a device's 200 OK handed to the
listening socket, sorted, matched to its binding), and the heartbeat
(rendered and sent by the sender's batch loop, the send itself a no-op).

With C{--what relay}: instructions per relayed message, each new call's
INVITE from the upstream to a registered device and the device's 180 back.
With C{--what call}: the same over whole calls written as sipp writes them
(INVITE, 180, 200 with SDP, ACK and BYE along the Record-Route, 200), the
answers' Vias and Record-Routes each one comma-separated line.  These two
count only inside the compiled socket's C{datagramReceived}, so that making
the messages is not counted; they need the mypyc build.

With C{--what service}: the REGISTERs go to the relay in front of the
registrar, with its default settings, as in the service.

The figure is the difference between a run of 3 000 and one of 1 000
REGISTERs (30 000 and 10 000 answers or heartbeats, 18 000 and 6 000
relayed messages), divided by the difference, so start-up and imports
cancel out.  Loops are bounded by the count; nothing touches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Final


def drive(count: int, storeOn: bool, relayed: bool = False) -> None:
    """
    Feed C{count} REGISTERs of fresh devices through one listening socket,
    to the registrar, or with C{relayed} to the relay in front of it with
    its default settings, as the service sets them up.
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
    if relayed:
        from natkeep.config import Settings
        from natkeep.relay import Relay

        relay = Relay(registrar, table, clock, outbox, [protocol], Counts(), secret=b"k" * 32)
        relay.configure(Settings())
        protocol.controller = relay
    for n, data in enumerate(datagrams):
        protocol.datagramReceived(data, ("203.0.113.7", 40000 + n % 20000))
        if n % 50 == 49:
            clock.advance(0)
            transport.written.clear()
    clock.advance(0)
    if len(table) != count:
        raise SystemExit(f"only {len(table)} of {count} registered")


OPTIONS_BINDINGS = 10_000


def driveOptions(count: int, part: str) -> None:
    """
    Hand C{count} OPTIONS answers to a listening socket (C{part} is
    C{answer}), or send C{count} OPTIONS heartbeats (C{send}), over
    L{OPTIONS_BINDINGS} NATed bindings.
    """
    import attrs
    from heartbeat import answerOptions
    from twisted.internet.task import Clock

    from natkeep.bindings import Binding, BindingTable
    from natkeep.config import Settings
    from natkeep.counts import Counts
    from natkeep.outbox import Outbox
    from natkeep.sender import CycleReport, HeartbeatSender
    from natkeep.strategies import makeStrategies
    from natkeep.testing import fakeSocket

    clock = Clock()
    clock.advance(1000)
    settings = attrs.evolve(Settings(), payload="options")
    strategies = makeStrategies(settings)
    stats = Counts()
    sender = HeartbeatSender(BindingTable(), clock, settings, strategies, stats)
    outbox = Outbox(clock, None, stats)
    protocol, _ = fakeSocket(
        None,  # no requests arrive: answers go to the sender
        outbox,
        clock,
        stats,
        onResponseDatagram=sender.responseDatagram,
    )
    protocol.sendto = lambda data, address: len(data)
    try:
        from natkeep.protocol import FirstMatch
    except ImportError:
        pass  # a build from before the relay matched answers unparsed
    else:
        # As a relaying service wires it: the heartbeats' matcher is asked first.
        from natkeep.relay import Relay

        relay = Relay(None, sender.table, clock, outbox, [protocol], stats, secret=b"k" * 32)
        relay.configure(attrs.evolve(settings, upstream="sip:203.0.113.50:5060"))
        protocol.onResponseDatagram = FirstMatch(sender.responseDatagram, relay.responseDatagram)
    bindings = []
    for n in range(OPTIONS_BINDINGS):
        host = f"127.64.{n >> 8}.{n & 255}"
        binding = Binding(
            f"sip:u{n}@example.com",
            f"sip:u{n}@{host}:47000",
            "",
            (host, 47000),
            protocol,
            True,
            clock.seconds() + 3600,
            f"c{n}",
            1,
            phase=n,
        )
        sender.table.add(binding)
        bindings.append(binding)
    payload = strategies.payload
    answers = [(answerOptions(payload.payloadFor(b)), b.source) for b in bindings]
    report = CycleReport(started=clock.seconds(), due=len(bindings))
    rounds = max(1, count // OPTIONS_BINDINGS)
    for _ in range(rounds):
        if part == "answer":
            for data, source in answers:
                protocol.datagramReceived(data, source)
        else:
            sender._send(bindings, report)
    if part == "answer" and stats["heartbeats.answered"] != rounds * OPTIONS_BINDINGS:
        raise SystemExit(f"only {stats['heartbeats.answered']} answers matched")


def relayInvite(n: int) -> bytes:
    """
    Call C{n}'s INVITE from the upstream, as sipp's caller writes it: each
    call its own branch, tag and Call-ID.
    """
    sdp = b"v=0\r\no=- 1 1 IN IP4 203.0.113.50\r\n"
    return (
        b"INVITE sip:1001@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bK-%d-1-0\r\n"
        b"From: <sip:caller@example.com>;tag=%dc1\r\n"
        b"To: <sip:1001@example.com>\r\n"
        b"Call-ID: %d-1@203.0.113.50\r\n"
        b"CSeq: 1 INVITE\r\n"
        b"Contact: <sip:caller@203.0.113.50:5060>\r\n"
        b"Max-Forwards: 70\r\n"
        b"Content-Type: application/sdp\r\n"
        b"Content-Length: %d\r\n\r\n%s"
    ) % (n, n, n, len(sdp), sdp)


UPSTREAM = ("203.0.113.50", 5060)
PHONE = ("192.0.2.77", 40000)


def relayService() -> tuple[Any, Any, Any]:
    """
    A listening socket on an in-memory transport with the stateless relay
    behind it, toward the upstream, and a device registered from L{PHONE}.

    @return: the socket's protocol, its transport, the service's counts.
    """
    from twisted.internet.task import Clock

    from natkeep.bindings import BindingTable
    from natkeep.config import Settings
    from natkeep.counts import Counts
    from natkeep.outbox import Outbox
    from natkeep.plugins.natkeep_expiry import CapExpiry
    from natkeep.registrar import Registrar
    from natkeep.relay import Relay
    from natkeep.testing import fakeSocket, register

    clock = Clock()
    clock.advance(1000)
    stats = Counts()
    table = BindingTable()
    outbox = Outbox(clock, None, stats)
    registrar = Registrar(table, clock, outbox, CapExpiry(3600, 300))
    protocol, wire = fakeSocket(registrar, outbox, clock, stats, address="198.51.100.10:5060")
    relay = Relay(registrar, table, clock, outbox, [protocol], stats, secret=b"k" * 32)
    relay.configure(Settings(upstream="sip:203.0.113.50:5060"))
    protocol.controller = relay
    protocol.onResponse = relay.responseReceived
    try:
        from natkeep.protocol import FirstMatch
    except ImportError:
        pass  # a build from before the relay matched answers unparsed
    else:
        # As the service wires it, its heartbeats' matcher first (off: the
        # payload is raw).
        from natkeep.sender import HeartbeatSender
        from natkeep.strategies import makeStrategies

        settings = Settings()
        sender = HeartbeatSender(table, clock, settings, makeStrategies(settings), stats)
        protocol.onResponseDatagram = FirstMatch(sender.responseDatagram, relay.responseDatagram)
    protocol.datagramReceived(register(contacts=["<sip:1001@10.0.0.7:5060>"]), PHONE)
    del wire.written[:]
    return protocol, wire, stats


def answer(request: Any, status: str, body: bytes = b"", tag: str = "") -> bytes:
    """
    The device's answer to C{request} as sipp's phone writes it: the Vias
    and the Record-Routes each as one comma-separated line.
    """
    from natkeep.sip import splitValues

    headers = request.headers
    lines = [f"SIP/2.0 {status}", f"Via: {', '.join(splitValues(headers['via']))}"]
    lines.append(f"From: {headers['from'][0]}")
    lines.append(f"To: {headers['to'][0]}{tag}")
    lines.append(f"Call-ID: {headers['call-id'][0]}")
    lines.append(f"CSeq: {headers['cseq'][0]}")
    if "record-route" in headers:
        lines.append(f"Record-Route: {', '.join(splitValues(headers['record-route']))}")
        lines.append("Contact: <sip:1001@10.0.0.7:5060>")
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def driveRelay(count: int) -> None:
    """
    Relay C{count} messages through the stateless relay: an INVITE from the
    upstream to a registered device, and the device's 180 back, in turn,
    each INVITE a new call's.
    """
    from natkeep.sip import Request, parseMessage

    protocol, wire, stats = relayService()
    for n in range(max(1, count // 2)):
        protocol.datagramReceived(relayInvite(n), UPSTREAM)
        request = parseMessage(wire.written[-1][0])
        assert isinstance(request, Request)
        protocol.datagramReceived(answer(request, "180 Ringing", tag=";tag=p1"), PHONE)
        del wire.written[:]
    relayed = stats["relay.requests"] + stats["relay.responses"]
    if relayed < count:
        raise SystemExit(f"only {relayed} of {count} messages relayed: {dict(stats)}")


def driveCall(count: int) -> None:
    """
    Relay C{count} messages as whole calls, the six messages of each the
    way sipp's caller and phone write them: the upstream's INVITE, the
    device's 180 and 200 (with SDP), the upstream's ACK and BYE along the
    Record-Route, and the device's 200 to the BYE.
    """
    from natkeep.sip import Request, parseMessage, splitValues

    protocol, wire, stats = relayService()
    sdp = b"v=0\r\no=phone 1 1 IN IP4 10.0.0.7\r\n"
    for n in range(max(1, count // 6)):
        protocol.datagramReceived(relayInvite(n), UPSTREAM)
        invite = parseMessage(wire.written[-1][0])
        assert isinstance(invite, Request)
        protocol.datagramReceived(answer(invite, "180 Ringing", tag=";tag=p1"), PHONE)
        protocol.datagramReceived(answer(invite, "200 OK", sdp, tag=";tag=p1"), PHONE)
        routes = ", ".join(splitValues(invite.headers["record-route"]))
        for cseq, method in ((1, "ACK"), (2, "BYE")):
            request = (
                f"{method} sip:1001@10.0.0.7:5060 SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bK-{n}-{cseq}-{method}\r\n"
                f"From: <sip:caller@example.com>;tag={n}c1\r\n"
                f"To: <sip:1001@example.com>;tag=p1\r\n"
                f"Call-ID: {n}-1@203.0.113.50\r\n"
                f"CSeq: {cseq} {method}\r\n"
                f"Route: {routes}\r\n"
                f"Max-Forwards: 70\r\n"
                f"Content-Length: 0\r\n\r\n"
            ).encode()
            protocol.datagramReceived(request, UPSTREAM)
        bye = parseMessage(wire.written[-1][0])
        assert isinstance(bye, Request)
        protocol.datagramReceived(answer(bye, "200 OK"), PHONE)
        del wire.written[:]
    relayed = stats["relay.requests"] + stats["relay.responses"]
    if relayed < count:
        raise SystemExit(f"only {relayed} of {count} messages relayed: {dict(stats)}")


#: Where C{--what relay} and C{call} count: inside the compiled socket's
#: C{datagramReceived}, so that making the messages is not counted.
RECEIVED: Final = "CPyPy_protocol___SIPProtocol___datagramReceived"


def counted(count: int, store: str, what: str = "register") -> int:
    """
    Instructions callgrind counts for a whole run of C{count} REGISTERs,
    or OPTIONS answers or heartbeats.
    """
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={folder}/out",
                *([f"--toggle-collect={RECEIVED}"] if what in ("relay", "call") else []),
                sys.executable,
                os.path.abspath(__file__),
                "--drive",
                str(count),
                "--store",
                store,
                "--what",
                what,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise SystemExit(f"callgrind printed no total:\n{result.stderr}")
    if int(match.group(1)) == 0:
        raise SystemExit(f"nothing ran inside {RECEIVED}: --what {what} counts the mypyc build")
    return int(match.group(1))


def perItem(small: int, large: int, store: str, what: str) -> int:
    """
    Instructions per item: a run of C{large} items less one of C{small},
    over the difference, so that start-up and imports cancel out.
    """
    return (counted(large, store, what) - counted(small, store, what)) // (large - small)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", choices=["on", "off", "both"], default="both")
    parser.add_argument(
        "--what",
        choices=["register", "service", "options", "answer", "send", "relay", "call"],
        default="register",
    )
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive is not None:
        if args.what == "relay":
            driveRelay(min(args.drive, 100_000))
        elif args.what == "call":
            driveCall(min(args.drive, 100_000))
        elif args.what in ("answer", "send"):
            driveOptions(min(args.drive, 100_000), args.what)
        else:
            drive(min(args.drive, 100_000), args.store == "on", args.what == "service")
        return
    if args.what in ("relay", "call"):
        runs = [
            (
                args.what,
                f"{args.what}: {{}} instructions per relayed message",
                6_000,
                18_000,
                "off",
                args.what,
            )
        ]
    elif args.what not in ("register", "service"):
        runs = [
            (
                f"options_{part}",
                f"OPTIONS {part:>6}: {{}} instructions each",
                OPTIONS_BINDINGS,
                3 * OPTIONS_BINDINGS,
                "off",
                part,
            )
            for part in (("answer", "send") if args.what == "options" else (args.what,))
        ]
    else:
        runs = [
            (
                f"{'relayed_' if args.what == 'service' else ''}store_{store}",
                f"store {store:>3}: {{}} instructions per REGISTER"
                + (" through the relay" if args.what == "service" else ""),
                1000,
                3000,
                store,
                args.what,
            )
            for store in (("off", "on") if args.store == "both" else (args.store,))
        ]
    results = {}
    for key, line, small, large, store, what in runs:
        results[key] = perItem(small, large, store, what)
        print(line.format(results[key]))
    print(json.dumps({"benchmark": "instructions", **results}))


if __name__ == "__main__":
    main()
