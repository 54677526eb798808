"""
Tests for L{natkeep.relay}: every routing rule of the stateless proxy, on
in-memory sockets.
"""

from __future__ import annotations

from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natkeep.bindings import BindingTable
from natkeep.config import Settings
from natkeep.counts import Counts
from natkeep.outbox import Outbox
from natkeep.plugins.natkeep_expiry import CapExpiry
from natkeep.protocol import SIPProtocol
from natkeep.registrar import Registrar
from natkeep.relay import _TOKENS_REMEMBERED, BRANCH_PREFIX, FLOW_PREFIX, FlowTokens, Relay
from natkeep.sip import Request, Response, parseMessage, parseVia, splitValues
from natkeep.testing import fakeSocket, register

SERVER = ("198.51.100.10", 5060)
UPSTREAM = ("203.0.113.50", 5060)
PHONE = ("192.0.2.77", 40000)


def invite(
    uri: str = "sip:1001@example.com",
    *,
    toTag: str = "",
    route: Optional[str] = None,
    maxForwards: Optional[str] = "70",
    via: str = "SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bK-up1",
    method: str = "INVITE",
    fromUser: str = "caller",
    extra: str = "",
    body: bytes = b"v=0\r\no=- 1 1 IN IP4 203.0.113.50\r\n",
) -> bytes:
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: {via}",
        f"From: <sip:{fromUser}@example.com>;tag=f1",
        f"To: <sip:1001@example.com>{toTag}",
        "Call-ID: call-relay-1",
        f"CSeq: 1 {method}",
        "Contact: <sip:caller@203.0.113.50:5060>",
    ]
    if route is not None:
        lines.append(f"Route: {route}")
    if maxForwards is not None:
        lines.append(f"Max-Forwards: {maxForwards}")
    head = "\r\n".join(lines) + "\r\n" + extra + "Content-Type: application/sdp\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


class RelayTestCase(SynchronousTestCase):
    """
    natkeep on two sockets (a public one and a second one), with relaying
    to an upstream at 203.0.113.50.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.stats: Counts = Counts()
        self.table = BindingTable()
        self.outbox = Outbox(self.clock, None, self.stats)
        self.registrar = Registrar(self.table, self.clock, self.outbox, CapExpiry(3600, 300))
        self.public, self.publicWire = fakeSocket(
            self.registrar, self.outbox, self.clock, self.stats, address="198.51.100.10:5060"
        )
        self.second, self.secondWire = fakeSocket(
            self.registrar, self.outbox, self.clock, self.stats, address="198.51.100.11:5060"
        )
        self.relay = Relay(
            self.registrar,
            self.table,
            self.clock,
            self.outbox,
            [self.public, self.second],
            self.stats,
            secret=b"k" * 32,
        )
        self.relay.configure(self.settings())
        for protocol in (self.public, self.second):
            protocol.controller = self.relay
            protocol.onResponse = self.relay.responseReceived
            # As the service wires it: answers matched unparsed first.
            protocol.onResponseDatagram = self.relay.responseDatagram

    def settings(self, **kw: object) -> Settings:
        kw.setdefault("upstream", "sip:203.0.113.50:5060")
        return Settings(**kw)  # type: ignore[arg-type]

    def registerPhone(
        self,
        user: str = "1001",
        source: tuple[str, int] = PHONE,
        protocol: Optional[SIPProtocol] = None,
        contact: Optional[str] = None,
    ) -> None:
        protocol = protocol or self.public
        wire = self.publicWire if protocol is self.public else self.secondWire
        contact = contact or f"<sip:{user}@10.0.0.7:5060>"
        protocol.datagramReceived(register(user=user, contacts=[contact]), source)
        data, _ = wire.written.pop()
        self.assertTrue(data.startswith(b"SIP/2.0 200 OK"), data[:60])

    def send(
        self, data: bytes, source: tuple[str, int], protocol: Optional[SIPProtocol] = None
    ) -> list[tuple[bytes, tuple[str, int], str]]:
        """
        Hand C{data} to a socket; return what left, on which socket.
        """
        (protocol or self.public).datagramReceived(data, source)
        out = [(d, a, "public") for d, a in self.publicWire.written] + [
            (d, a, "second") for d, a in self.secondWire.written
        ]
        del self.publicWire.written[:]
        del self.secondWire.written[:]
        return out

    def forwarded(
        self, data: bytes, source: tuple[str, int]
    ) -> tuple[Request, tuple[str, int], str]:
        [(out, address, socket)] = self.send(data, source)
        message = parseMessage(out)
        assert isinstance(message, Request), out[:80]
        return message, address, socket

    def answered(self, data: bytes, source: tuple[str, int]) -> Response:
        [(out, address, _)] = self.send(data, source)
        self.assertEqual(address, source)
        message = parseMessage(out)
        assert isinstance(message, Response)
        return message


class InboundTests(RelayTestCase):
    """
    Requests from the upstream for a device.
    """

    def test_toBinding(self) -> None:
        """
        An INVITE for a registered AOR leaves from the socket the device
        registered on, to its public address, with the Request-URI
        rewritten to its Contact, natkeep's Via on top, received/rport on
        the previous one, Max-Forwards decremented, a Record-Route naming
        natkeep with a flow token, and the body untouched.
        """
        self.registerPhone(protocol=self.second)
        body = b"v=0\r\no=- 1 1 IN IP4 203.0.113.50\r\nm=audio 4000 RTP/AVP 0\r\n"
        request, address, socket = self.forwarded(invite(body=body), UPSTREAM)
        self.assertEqual((address, socket), (PHONE, "second"))
        self.assertEqual(request.uri, "sip:1001@10.0.0.7:5060")
        vias = splitValues(request.headers["via"])
        ours = parseVia(vias[0])
        self.assertEqual(ours.sentBy, "198.51.100.11:5060")
        self.assertTrue((ours.param("branch") or "").startswith(BRANCH_PREFIX))
        self.assertEqual(
            vias[1],
            "SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bK-up1;received=203.0.113.50;rport=5060",
        )
        self.assertEqual(request.headers["max-forwards"], ["69"])
        [recorded] = request.headers["record-route"]
        self.assertTrue(recorded.startswith(f"<sip:{FLOW_PREFIX}"), recorded)
        self.assertTrue(recorded.endswith("@198.51.100.11:5060;lr>"), recorded)
        self.assertEqual(request.body, body)
        self.assertEqual(self.stats["relay.requests"], 1)

    def test_missingMaxForwardsAdded(self) -> None:
        """
        A request without Max-Forwards leaves with 69 (70, less this hop).
        """
        self.registerPhone()
        request, _, _ = self.forwarded(invite(maxForwards=None), UPSTREAM)
        self.assertEqual(request.headers["max-forwards"], ["69"])

    def test_unknownAOR(self) -> None:
        """
        An AOR with no binding is 404; with only an expired one, 480.
        """
        self.assertEqual(self.answered(invite(), UPSTREAM).code, 404)
        self.registerPhone()
        [binding] = self.table.lookup("sip:1001@example.com")
        binding.expiresAt = self.clock.seconds() - 1
        response = self.answered(invite(), UPSTREAM)
        self.assertEqual((response.code, response.reason), (480, "Temporarily Unavailable"))

    def test_bestBinding(self) -> None:
        """
        Of several bindings, the highest q wins, then the most recent.
        """
        self.registerPhone(contact="<sip:1001@10.0.0.7:5060>;q=0.5")
        self.clock.advance(10)
        self.registerPhone(source=("192.0.2.78", 1), contact="<sip:1001@10.0.0.8:5060>;q=0.9")
        self.clock.advance(10)
        self.registerPhone(source=("192.0.2.79", 1), contact="<sip:1001@10.0.0.9:5060>;q=0.9")
        _, address, _ = self.forwarded(invite(), UPSTREAM)
        self.assertEqual(address, ("192.0.2.79", 1))

    def test_maxForwards(self) -> None:
        """
        Max-Forwards 0 is 483; a value that is not a number, 400.
        """
        self.registerPhone()
        self.assertEqual(self.answered(invite(maxForwards="0"), UPSTREAM).code, 483)
        response = self.answered(invite(maxForwards="lots"), UPSTREAM)
        self.assertEqual((response.code, response.reason), (400, "Invalid Max-Forwards"))

    def test_loop(self) -> None:
        """
        A request that comes back carrying natkeep's Via for the same
        Request-URI, Call-ID, CSeq and From is 482.
        """
        self.registerPhone()
        request, _, _ = self.forwarded(invite(uri="sip:1001@example.com"), UPSTREAM)
        ours = splitValues(request.headers["via"])[0]
        looped = invite(via=f"{ours}\r\nVia: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bK-up1")
        self.assertEqual(self.answered(looped, UPSTREAM).code, 482)

    def test_spiralNotLoop(self) -> None:
        """
        A request that comes back carrying natkeep's Via with another
        Request-URI is a spiral (RFC 3261 §16.6 step 8): relayed, not 482.
        """
        self.registerPhone()
        other = ("192.0.2.88", 5062)
        self.registerPhone("1002", source=other)
        request, _, _ = self.forwarded(invite(uri="sip:1001@example.com"), UPSTREAM)
        ours = splitValues(request.headers["via"])[0]
        spiral = invite(
            uri="sip:1002@example.com",
            via=f"{ours}\r\nVia: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bK-up1",
        )
        _, address, _ = self.forwarded(spiral, UPSTREAM)
        self.assertEqual(address, other)

    def test_strangerRefused(self) -> None:
        """
        A request from a source that is no device, not the upstream and not
        trusted is 403 and relays nothing; a trusted network is let in.
        """
        self.registerPhone()
        stranger = ("198.18.5.5", 5060)
        response = self.answered(invite(), stranger)
        self.assertEqual(response.code, 403)
        self.assertEqual(self.stats["relay.refused"], 1)
        self.relay.configure(self.settings(trusted=("198.18.0.0/15",)))
        _, address, _ = self.forwarded(invite(), stranger)
        self.assertEqual(address, PHONE)

    def test_cancelFollowsInvite(self) -> None:
        """
        A CANCEL goes where its INVITE went, with the same branch (a
        stateless proxy's branch depends on the previous hop's), and gets
        no Record-Route.
        """
        self.registerPhone()
        first, _, _ = self.forwarded(invite(), UPSTREAM)
        cancel, address, _ = self.forwarded(invite(method="CANCEL", body=b""), UPSTREAM)
        self.assertEqual(address, PHONE)
        self.assertEqual(
            parseVia(splitValues(cancel.headers["via"])[0]).param("branch"),
            parseVia(splitValues(first.headers["via"])[0]).param("branch"),
        )
        self.assertNotIn("record-route", cancel.headers)


class DialogTests(RelayTestCase):
    """
    In-dialog requests along natkeep's Record-Route.
    """

    def recorded(self) -> str:
        self.registerPhone()
        request, _, _ = self.forwarded(invite(), UPSTREAM)
        return request.headers["record-route"][0]

    def test_towardDevice(self) -> None:
        """
        A BYE from the upstream with natkeep's Route goes to the device of
        the flow token (whatever the Request-URI's host), with the Route
        removed and no Record-Route.
        """
        route = self.recorded()
        bye = invite(
            uri="sip:1001@10.0.0.7:5060", toTag=";tag=p1", route=route, method="BYE", body=b""
        )
        request, address, socket = self.forwarded(bye, UPSTREAM)
        self.assertEqual((address, socket), (PHONE, "public"))
        self.assertNotIn("route", request.headers)
        self.assertNotIn("record-route", request.headers)
        self.assertEqual(request.uri, "sip:1001@10.0.0.7:5060")

    def test_fromDevice(self) -> None:
        """
        A BYE from the device along the same route goes to the upstream,
        even when its Request-URI names some other address.
        """
        route = self.recorded()
        bye = invite(
            uri="sip:caller@198.18.9.9:5060",
            toTag=";tag=p1",
            route=route,
            method="BYE",
            via="SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-ph",
            fromUser="1001",
            body=b"",
        )
        request, address, _ = self.forwarded(bye, PHONE)
        self.assertEqual(address, UPSTREAM)
        self.assertEqual(request.uri, "sip:caller@198.18.9.9:5060")

    def test_forgedToken(self) -> None:
        """
        A Route token this run did not sign is no flow: from a stranger the
        request is refused, nothing is sent to the address it names.
        """
        forged = FlowTokens(b"x" * 32).encode(0, ("198.18.66.66", 9))
        bye = invite(
            uri="sip:v@198.18.66.66:9",
            toTag=";tag=p1",
            route=f"<sip:{forged}@198.51.100.10:5060;lr>",
            method="BYE",
            body=b"",
        )
        response = self.answered(bye, ("198.18.7.7", 5060))
        self.assertEqual(response.code, 403)

    def test_tokenRoundTrip(self) -> None:
        """
        A token decodes to the listener and address it was made from, for
        IPv4 and IPv6; a changed one decodes to nothing.
        """
        tokens = FlowTokens(b"s" * 32)
        for address in (("192.0.2.1", 5060), ("2001:db8::5", 40000)):
            token = tokens.encode(1, address)
            self.assertEqual(tokens.decode(token), (1, address))
            self.assertIsNone(tokens.decode(token[:-2] + "AA"))
        self.assertIsNone(tokens.decode("nkf-!!!"))
        self.assertIsNone(tokens.decode("other"))

    def test_tokensRemembered(self) -> None:
        """
        A token made or verified once is remembered: made again it is the
        same string, and a second decode gives the same flow.  Only signed
        tokens are remembered, and no more than the limit.
        """
        tokens = FlowTokens(b"s" * 32)
        token = tokens.encode(0, ("192.0.2.1", 5060))
        self.assertIs(tokens.encode(0, ("192.0.2.1", 5060)), token)
        self.assertEqual(tokens.decode(token), (0, ("192.0.2.1", 5060)))
        self.assertEqual(tokens.decode(token), (0, ("192.0.2.1", 5060)))
        forged = FlowTokens(b"x" * 32).encode(0, ("192.0.2.1", 5060))
        for _ in range(2):
            self.assertIsNone(tokens.decode(forged))
        for n in range(_TOKENS_REMEMBERED + 10):
            address = (f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 5060)
            self.assertEqual(tokens.decode(tokens.encode(0, address)), (0, address))
        self.assertLessEqual(len(tokens._made), _TOKENS_REMEMBERED)
        self.assertLessEqual(len(tokens._verified), _TOKENS_REMEMBERED)
        # Forgotten, still decoded: memory only saves the work.
        self.assertEqual(tokens.decode(token), (0, ("192.0.2.1", 5060)))

    def test_tokenMappedAddress(self) -> None:
        """
        An IPv4-mapped IPv6 source decodes in the form the socket gave it.
        """
        tokens = FlowTokens(b"s" * 32)
        address = ("::ffff:192.0.2.7", 5060)
        self.assertEqual(tokens.decode(tokens.encode(2, address)), (2, address))


class OutboundTests(RelayTestCase):
    """
    Requests from registered devices.
    """

    def test_toUpstream(self) -> None:
        """
        An INVITE from a registered device for another domain goes to the
        upstream, Record-Routed with the device's own flow.
        """
        self.registerPhone()
        request, address, _ = self.forwarded(
            invite(uri="sip:2000@pstn.example", fromUser="1001"), PHONE
        )
        self.assertEqual(address, UPSTREAM)
        token = request.headers["record-route"][0][len("<sip:") :].partition("@")[0]
        self.assertEqual(self.relay.tokens.decode(token), (0, PHONE))

    def test_deviceToDevice(self) -> None:
        """
        A device calling another local AOR reaches it directly.
        """
        self.registerPhone("1001")
        other = ("192.0.2.88", 5062)
        self.registerPhone("1002", source=other)
        request, address, _ = self.forwarded(
            invite(uri="sip:1002@example.com", fromUser="1001"), PHONE
        )
        self.assertEqual(address, other)
        self.assertEqual(request.uri, "sip:1002@10.0.0.7:5060")


class ResponseTests(RelayTestCase):
    """
    Responses back along the Vias.
    """

    def response(
        self, request: Request, code: int = 180, vias: Optional[list[str]] = None
    ) -> bytes:
        lines = [f"SIP/2.0 {code} Ringing"]
        lines += [f"Via: {v}" for v in (vias or splitValues(request.headers["via"]))]
        for name in ("From", "To", "Call-ID", "CSeq"):
            lines.append(f"{name}: {request.headers[name.lower()][0]}")
        return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()

    def test_back(self) -> None:
        """
        The device's answer loses natkeep's Via and goes to the previous
        hop's received/rport, from the socket the request arrived on.
        """
        self.registerPhone(protocol=self.second)
        request, _, _ = self.forwarded(invite(), UPSTREAM)
        out = self.send(self.response(request), PHONE, self.second)
        [(data, address, socket)] = out
        self.assertEqual((address, socket), (UPSTREAM, "public"))
        response = parseMessage(data)
        assert isinstance(response, Response)
        self.assertEqual(
            splitValues(response.headers["via"]),
            ["SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bK-up1;received=203.0.113.50;rport=5060"],
        )
        self.assertEqual(self.stats["relay.responses"], 1)

    def test_backAsWritten(self) -> None:
        """
        A response is passed on byte for byte as the device wrote it, less
        natkeep's Via: its headers' spelling, order and folding of Vias
        into one line stay.
        """
        self.registerPhone()
        request, _, _ = self.forwarded(invite(), UPSTREAM)
        vias = splitValues(request.headers["via"])
        data = (
            f"SIP/2.0 180 Ringing\r\nVia: {vias[0]}, {vias[1]}\r\n"
            f"cseq: 1 INVITE\r\nX-Order: kept\r\ncall-id: call-relay-1\r\n"
            f"From: <sip:caller@example.com>;tag=f1\r\nTo: <sip:1001@example.com>;tag=p\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
        [(out, address, _)] = self.send(data, PHONE)
        self.assertEqual(address, UPSTREAM)
        self.assertEqual(out, data.replace(f"{vias[0]}, ".encode(), b""))

    def test_backCompactRendered(self) -> None:
        """
        A response whose Vias are in the compact form is rendered afresh,
        natkeep's Via taken off all the same.
        """
        self.registerPhone()
        request, _, _ = self.forwarded(invite(), UPSTREAM)
        vias = splitValues(request.headers["via"])
        data = self.response(request).replace(b"\r\nVia: ", b"\r\nv: ")
        self.assertIn(b"\r\nv: ", data)
        [(out, address, _)] = self.send(data, PHONE)
        self.assertEqual(address, UPSTREAM)
        response = parseMessage(out)
        assert isinstance(response, Response)
        self.assertEqual(splitValues(response.headers["via"]), vias[1:])
        self.assertIn(b"\r\nVia: ", out)

    def test_backWithBranchesForgotten(self) -> None:
        """
        The relay remembers the branch hashes it made so that a request's
        responses need not hash again; the memory saves work and decides
        nothing.  With it cleared, or filled past its bound by other
        requests, the device's answers still go back, and they are checked
        against the same hash.
        """
        from natkeep.relay import _BRANCHES_REMEMBERED

        self.registerPhone()
        request, _, _ = self.forwarded(invite(), UPSTREAM)
        top = splitValues(request.headers["via"])[1]
        self.assertEqual(
            self.relay._branches[(0, top)],
            (self.relay._branchHash(top, 0), ("203.0.113.50", 5060)),
        )
        self.relay._branches.clear()
        [(_, address, _)] = self.send(self.response(request), PHONE)
        self.assertEqual(address, UPSTREAM)
        for n in range(_BRANCHES_REMEMBERED + 1):
            self.relay._branchFor(
                f"SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK{n}", 0, ("192.0.2.9", 5060)
            )
        self.assertLessEqual(len(self.relay._branches), _BRANCHES_REMEMBERED)
        self.assertNotIn((0, top), self.relay._branches)
        [(_, address, _)] = self.send(self.response(request, code=200), PHONE)
        self.assertEqual(address, UPSTREAM)
        self.assertEqual(self.stats["relay.responses"], 2)
        self.assertEqual(self.stats["relay.responses.unknown"], 0)

    def test_forgedViaDropped(self) -> None:
        """
        A response whose natkeep Via natkeep did not write (its branch hash
        fails) is dropped: natkeep is no reflector for made-up responses.
        """
        self.registerPhone()
        request, _, _ = self.forwarded(invite(), UPSTREAM)
        vias = splitValues(request.headers["via"])
        vias[1] = "SIP/2.0/UDP 198.18.66.66:9;branch=z9hG4bK-victim"
        self.assertEqual(self.send(self.response(request, vias=vias), PHONE), [])
        self.assertEqual(self.stats["relay.responses.unknown"], 1)

    def test_forgedBranchDropped(self) -> None:
        """
        The Via below natkeep's as natkeep wrote it, which the relay
        remembers, does not vouch for natkeep's own: with another hash in
        its branch, the response is dropped.
        """
        self.registerPhone()
        request, _, _ = self.forwarded(invite(), UPSTREAM)
        vias = splitValues(request.headers["via"])
        self.assertIn((0, vias[1]), self.relay._branches)
        digest = self.relay._branches[(0, vias[1])][0]
        vias[0] = vias[0].replace(digest, "0" * len(digest))
        self.assertNotIn(digest, vias[0])
        self.assertEqual(self.send(self.response(request, vias=vias), PHONE), [])
        self.assertEqual(self.stats["relay.responses.unknown"], 1)

    def test_notOurs(self) -> None:
        """
        A response without natkeep's relay Via is not the relay's (a
        heartbeat's answer): it says so.
        """
        response = parseMessage(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 198.51.100.10:5060;branch=z9hG4bKab.1\r\n"
            b"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        assert isinstance(response, Response)
        self.assertFalse(self.relay.responseReceived(response, PHONE))


def _relayed(hooked: bool) -> tuple[SIPProtocol, list[tuple[bytes, tuple[str, int]]], Counts]:
    """
    A relay on one socket as L{RelayTestCase} sets one up, a device
    registered from L{PHONE} and an INVITE from the upstream relayed to it,
    the relay's secret always the same: two of these made alike remember
    the same branches.  With C{hooked}, the socket offers response
    datagrams to the relay unparsed first, as the service wires it.

    @return: the socket, what it sends from now on, and the counts.
    """
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
    if hooked:
        protocol.onResponseDatagram = relay.responseDatagram
    protocol.datagramReceived(register(contacts=["<sip:1001@10.0.0.7:5060>"]), PHONE)
    protocol.datagramReceived(invite(), UPSTREAM)
    del wire.written[:]
    return protocol, wire.written, stats


def _answers(ours: str, below: str) -> dict[str, bytes]:
    """
    The device's 180 to the INVITE of L{_relayed} whose Vias are C{ours}
    and C{below}, in each layout and with each fault the relay's unparsed
    path must either handle exactly as the parser and the relay would, or
    leave to them.
    """
    rest = (
        "From: <sip:caller@example.com>;tag=f1\r\nTo: <sip:1001@example.com>;tag=p1\r\n"
        "Call-ID: call-relay-1\r\nCSeq: 1 INVITE\r\n"
    )
    comma = f"SIP/2.0 180 Ringing\r\nVia: {ours}, {below}\r\n{rest}Content-Length: 0\r\n\r\n"
    lines = f"SIP/2.0 180 Ringing\r\nVia: {ours}\r\nVia: {below}\r\n{rest}Content-Length: 0\r\n\r\n"
    sdp = "v=0\r\no=phone 1 1 IN IP4 10.0.0.7\r\n"
    cases: dict[str, str] = {}
    for layout, text in (("comma", comma), ("lines", lines)):
        variants = {
            "plain": text,
            "no reason": text.replace(" 180 Ringing", " 180", 1),
            "reason space": text.replace(" 180 Ringing", " 180 ", 1),
            "code 99": text.replace(" 180 ", " 99 ", 1),
            "code 700": text.replace(" 180 ", " 700 ", 1),
            "code 1800": text.replace(" 180 ", " 1800 ", 1),
            "code 18a": text.replace(" 180 ", " 18a ", 1),
            "lower-case via": text.replace("\r\nVia: ", "\r\nvia: ", 1),
            "compact via": text.replace("\r\nVia: ", "\r\nv: ", 1),
            "two spaces": text.replace("\r\nVia: ", "\r\nVia:  ", 1),
            "space before comma": text.replace(f"{ours},", f"{ours} ,"),
            "tab after comma": text.replace(f"{ours}, ", f"{ours},\t"),
            "no space after comma": text.replace(f"{ours}, ", f"{ours},"),
            "comma, nothing": text.replace(f"{ours}, {below}", f"{ours}, "),
            "our Via only": text.replace(f", {below}", "").replace(f"Via: {below}\r\n", ""),
            "header between": text.replace("\r\nVia: " + below, "\r\nX-A: 1\r\nVia: " + below),
            "below altered": text.replace(below, below.replace("5060", "5061")),
            "below quoted": text.replace(below, below + ';x="a,b"'),
            "below spaced": text.replace(below, below + "  "),
            "ours extra param": text.replace(ours, ours + ";received=192.0.2.77"),
            "ours quoted": text.replace(ours, ours + ';x="1"'),
            "ours nkw": text.replace(ours, ours + ";nkw=0"),
            "ours nki 1": text.replace(";nki=0", ";nki=1"),
            "ours nki x": text.replace(";nki=0", ";nki=x"),
            "ours nki 00": text.replace(";nki=0", ";nki=00"),
            "ours upper-case branch": text.replace(";branch=", ";BRANCH="),
            "ours digest altered": text.replace("-nk", "-nk0", 1),
            "no content-length": text.replace("Content-Length: 0\r\n", ""),
            "compact length": text.replace("Content-Length:", "l:"),
            "lower-case length": text.replace("Content-Length:", "content-length:"),
            "length spaced": text.replace("Content-Length: 0", "Content-Length :  0 "),
            "length spaced, too long": text.replace("Content-Length: 0", "Content-Length : 5"),
            "length plus": text.replace("Content-Length: 0", "Content-Length: +0"),
            "length word": text.replace("Content-Length: 0", "Content-Length: x"),
            "length too long": text.replace("Content-Length: 0", "Content-Length: 5"),
            "length twice": text.replace("Content-Length: 0", "Content-Length: 0\r\nl: 0"),
            "length twice, unequal": text.replace(
                "Content-Length: 0", "Content-Length: 0\r\nContent-Length: 1"
            ),
            "body": text.replace("Content-Length: 0\r\n\r\n", f"Content-Length: {len(sdp)}\r\n\r\n")
            + sdp,
            "body beyond length": text + sdp,
            "padding beyond length": text + "\r\n\r\n",
            "folded": text.replace("\r\nCall-ID:", "\r\n Call-ID:"),
            "colon-less line": text.replace("\r\nCall-ID:", "\r\nX-Bad\r\nCall-ID:"),
            "empty name": text.replace("\r\nCall-ID:", "\r\n : x\r\nCall-ID:"),
            "bare LF": text.replace("\r\nCall-ID:", "\nCall-ID:"),
            "bare LF after ours": text.replace(f"{ours}\r\n", f"{ours}\n"),
            "LF header end": text.replace("\r\n\r\n", "\n\n"),
            "truncated": text[: text.index("\r\n\r\n")],
            "too many lines": text.replace("\r\nCall-ID:", "\r\nX-Pad: 1" * 130 + "\r\nCall-ID:"),
            "too large": text.replace("\r\nCall-ID:", "\r\nX-Pad: " + "p" * 17000 + "\r\nCall-ID:"),
            "non-ASCII": text.replace("tag=p1", "tag=p\u00e9"),
            "long reason": text.replace(" Ringing", " " + "R" * 600, 1),
        }
        for name, variant in variants.items():
            if variant != text or name == "plain":
                cases[f"{layout}: {name}"] = variant
    data = {name: text.encode("utf-8") for name, text in cases.items()}
    data["comma: not UTF-8"] = cases["comma: plain"].encode().replace(b"tag=p1", b"tag=p\xff")
    return data


class UnparsedResponseTests(SynchronousTestCase):
    """
    Responses the relay passes on unparsed (L{Relay.responseDatagram}):
    exactly what parsing them would have done, or left to the parser.
    """

    def vias(self) -> tuple[str, str]:
        protocol, written, _ = _relayed(True)
        protocol.datagramReceived(invite(), UPSTREAM)
        [(data, _)] = written
        request = parseMessage(data)
        assert isinstance(request, Request)
        ours, below = splitValues(request.headers["via"])
        return ours, below

    def test_passedOnUnparsed(self) -> None:
        """
        The device's answer to a request natkeep relayed is taken by the
        relay from the datagram itself: it goes back to the previous hop,
        less natkeep's Via and otherwise byte for byte, and is counted.
        """
        ours, below = self.vias()
        for layout in ("comma", "lines"):
            protocol, written, stats = _relayed(True)
            data = _answers(ours, below)[f"{layout}: plain"]
            relay = protocol.controller
            assert isinstance(relay, Relay)
            self.assertTrue(relay.responseDatagram(data, PHONE))
            [(out, address)] = written
            self.assertEqual(address, UPSTREAM)
            cut = f"{ours}, " if layout == "comma" else f"\r\nVia: {ours}"
            self.assertEqual(out, data.replace(cut.encode(), b""))
            self.assertEqual(stats["relay.responses"], 1)

    def test_heartbeatAnswerDeclined(self) -> None:
        """
        An answer to natkeep's own OPTIONS heartbeat is not the relay's: it
        declines it without reading past the status line and the first Via.
        """
        protocol, written, stats = _relayed(True)
        relay = protocol.controller
        assert isinstance(relay, Relay)
        answer = (
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 198.51.100.10:5060;branch=z9hG4bKab.1\r\n"
            b"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        self.assertFalse(relay.responseDatagram(answer, PHONE))
        self.assertEqual((written, stats["relay.responses"]), ([], 0))

    def test_sameAsParsed(self) -> None:
        """
        For every layout and fault of L{_answers}, a relay offered the
        datagram unparsed first sends the same datagrams to the same
        addresses, and counts the same, as one that parses every response.
        The plain layouts are taken unparsed; faults are left to the parser.
        """
        ours, below = self.vias()
        counters = (
            "relay.responses",
            "relay.responses.unknown",
            "responses.received",
            "dropped",
            "dropped.malformed",
        )
        taken = []
        for name, data in sorted(_answers(ours, below).items()):
            outcomes = []
            for hooked in (True, False):
                protocol, written, stats = _relayed(hooked)
                protocol.datagramReceived(data, PHONE)
                outcomes.append((list(written), [stats[c] for c in counters]))
            self.assertEqual(outcomes[0], outcomes[1], name)
            relay = _relayed(True)[0].controller
            assert isinstance(relay, Relay)
            if relay.responseDatagram(data, PHONE):
                taken.append(name)
        self.assertEqual(
            sorted(taken),
            [
                "comma: bare LF",
                "comma: below spaced",
                "comma: body",
                "comma: compact length",
                "comma: long reason",
                "comma: lower-case length",
                "comma: no content-length",
                "comma: no space after comma",
                "comma: ours nki 00",
                "comma: ours nkw",
                "comma: padding beyond length",
                "comma: plain",
                "comma: reason space",
                "comma: tab after comma",
                "lines: bare LF",
                "lines: below spaced",
                "lines: body",
                "lines: compact length",
                "lines: long reason",
                "lines: lower-case length",
                "lines: no content-length",
                "lines: ours nki 00",
                "lines: ours nkw",
                "lines: padding beyond length",
                "lines: plain",
                "lines: reason space",
            ],
        )


class ForNatkeepTests(RelayTestCase):
    """
    What stays with the registrar.
    """

    def test_optionsToServer(self) -> None:
        """
        An OPTIONS for natkeep's own address (no user part) is answered by
        the registrar, not relayed.
        """
        options = invite(uri="sip:198.51.100.10:5060", method="OPTIONS", body=b"")
        self.assertEqual(self.answered(options, UPSTREAM).code, 200)

    def test_strangersOptions(self) -> None:
        """
        An OPTIONS from a stranger, for any URI, is answered by natkeep
        itself (a monitoring probe), and nothing is relayed.
        """
        self.registerPhone()
        options = invite(method="OPTIONS", body=b"")
        self.assertEqual(self.answered(options, ("198.18.3.3", 5060)).code, 200)
        self.assertEqual(self.stats["relay.requests"], 0)

    def test_relayOff(self) -> None:
        """
        Without an upstream nothing is relayed: an INVITE is 405, as
        before.
        """
        self.relay.configure(Settings())
        self.registerPhone()
        self.assertEqual(self.answered(invite(), UPSTREAM).code, 405)

    def test_foreignDomainRegister(self) -> None:
        """
        With C{domains} set, a REGISTER for another domain is 403; one for
        a served domain is registered.
        """
        self.relay.configure(self.settings(domains=frozenset({"example.com"})))
        response = self.answered(register(user="1", domain="elsewhere.example"), PHONE)
        self.assertEqual((response.code, response.reason), (403, "Domain Not Served"))
        self.registerPhone()

    def test_badToRegister(self) -> None:
        """
        A REGISTER whose To is no SIP URI is 400 and binds nothing, whether
        the relay reads the To itself (C{domains} set) or leaves it to the
        registrar (the default).
        """
        bad = register(user="1").replace(b"To: <sip:", b"To: <tel:")
        for domains in (frozenset(), frozenset({"example.com"})):
            self.relay.configure(self.settings(domains=domains))
            response = self.answered(bad, PHONE)
            self.assertEqual(response.code, 400, domains)
        self.assertEqual(len(self.table), 0)


class FuzzTests(RelayTestCase):
    """
    Relayed requests built from hostile pieces never raise out of the
    socket, and nothing that failed a check is relayed.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        uri=st.sampled_from(
            [
                "sip:1001@example.com",
                "sip:1001@10.0.0.7",
                "sip:@",
                "sip:x@[::1",
                "sip:198.51.100.10",
            ]
        ),
        route=st.one_of(
            st.none(),
            st.text(max_size=60),
            st.sampled_from(["<sip:nkf-AAAA@198.51.100.10:5060;lr>", "<sip:198.51.100.10;lr>"]),
        ),
        forwards=st.one_of(st.none(), st.text(max_size=5), st.integers(-3, 300).map(str)),
        toTag=st.sampled_from(["", ";tag=1", ";tag="]),
        source=st.sampled_from([UPSTREAM, PHONE, ("198.18.1.1", 1)]),
        method=st.sampled_from(["INVITE", "BYE", "ACK", "CANCEL", "MESSAGE", "OPTIONS"]),
    )
    def test_hostile(
        self,
        uri: str,
        route: Optional[str],
        forwards: Optional[str],
        toTag: str,
        source: tuple[str, int],
        method: str,
    ) -> None:
        if not self.table.lookup("sip:1001@example.com"):
            self.registerPhone()
        try:
            data = invite(
                uri=uri,
                route=route.replace("\r", "").replace("\n", "") if route else route,
                maxForwards=forwards.replace("\r", "").replace("\n", "") if forwards else forwards,
                toTag=toTag,
                method=method,
                body=b"",
            )
        except UnicodeEncodeError:
            return
        for out, address, _ in self.send(data, source):
            if address == source:
                continue
            message = parseMessage(out)
            assert isinstance(message, Request)
            self.assertGreaterEqual(int(message.headers["max-forwards"][0]), 0)
            self.assertIn(address, (PHONE, UPSTREAM))
        self.assertEqual(self.stats["internal.errors"], 0)
