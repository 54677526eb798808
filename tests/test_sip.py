"""
Tests for L{natkeep.sip}, the SIP parser and renderer.
"""

import random
from typing import Optional

from twisted.trial.unittest import SynchronousTestCase

from natkeep.nat import isPrivateAddress
from natkeep.sip import (
    MAX_DELTA_SECONDS,
    Request,
    Response,
    SIPError,
    parseCSeq,
    parseDeltaSeconds,
    parseMessage,
    parseNameAddr,
    parseURI,
    parseVia,
    renderParams,
    renderResponse,
    splitCommas,
    splitTopVia,
    splitValues,
    topVia,
    withoutTopVia,
)
from natkeep.testing import register


class ParseMessageTests(SynchronousTestCase):
    """
    L{parseMessage} splits a datagram into start line, headers and body.
    """

    def test_request(self) -> None:
        """
        A REGISTER parses into a L{Request} with lower-case header names.
        """
        message = parseMessage(register())
        self.assertIsInstance(message, Request)
        assert isinstance(message, Request)
        self.assertEqual(message.method, "REGISTER")
        self.assertEqual(message.uri, "sip:example.com")
        self.assertEqual(message.header("call-id"), "call-1@phone")
        self.assertEqual(message.headers["cseq"], ["1 REGISTER"])

    def test_response(self) -> None:
        """
        A status line parses into a L{Response}.
        """
        message = parseMessage(b"SIP/2.0 200 OK\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n\r\n")
        assert isinstance(message, Response)
        self.assertEqual((message.code, message.reason), (200, "OK"))

    def test_compactForms(self) -> None:
        """
        Compact header names (RFC 3261 §7.3.3) map to their full names, and
        names are case-insensitive.
        """
        data = (
            b"REGISTER sip:a SIP/2.0\r\nv: SIP/2.0/UDP h\r\nf: <sip:a@b>\r\n"
            b"t: <sip:a@b>\r\ni: cid\r\nm: <sip:a@h>\r\nl: 0\r\nCSEQ: 1 REGISTER\r\n\r\n"
        )
        message = parseMessage(data)
        self.assertEqual(
            sorted(message.headers),
            ["call-id", "contact", "content-length", "cseq", "from", "to", "via"],
        )

    def test_folding(self) -> None:
        """
        A header line starting with white space continues the previous one.
        """
        data = b"OPTIONS sip:a SIP/2.0\r\nSubject: one\r\n  two\r\n\r\n"
        self.assertEqual(parseMessage(data).header("subject"), "one two")

    def test_foldingAnywhere(self) -> None:
        """
        A continuation line holding a colon is still a continuation, with
        LF or CRLF line ends; a line with no colon that a continuation
        completes is read as the two joined.
        """
        for end in (b"\r\n", b"\n"):
            data = end.join(
                [b"OPTIONS sip:a SIP/2.0", b"Contact: <sip:a@h>,", b"\t<sip:b@h:5070>", b"", b""]
            )
            self.assertEqual(parseMessage(data).header("contact"), "<sip:a@h>, <sip:b@h:5070>")
        data = b"OPTIONS sip:a SIP/2.0\r\nSubject\r\n : hello\r\nCall-ID: x\r\n\r\n"
        message = parseMessage(data)
        self.assertEqual(message.header("subject"), "hello")
        self.assertEqual(message.header("call-id"), "x")

    def test_mixedLineEnds(self) -> None:
        """
        A bare LF among CRLF line ends still ends a line, and no value or
        start line keeps a CR.
        """
        data = b"OPTIONS sip:a SIP/2.0\r\nCall-ID: x\nCSeq: 1 OPTIONS\r\nVia: SIP/2.0/UDP h\r\n\r\n"
        message = parseMessage(data)
        assert isinstance(message, Request)
        self.assertEqual(message.uri, "sip:a")
        self.assertEqual(
            [message.header(n) for n in ("call-id", "cseq", "via")],
            ["x", "1 OPTIONS", "SIP/2.0/UDP h"],
        )

    def test_bareLineFeeds(self) -> None:
        """
        Lines ended by LF alone are accepted.
        """
        data = b"OPTIONS sip:a SIP/2.0\nCall-ID: x\n\n"
        self.assertEqual(parseMessage(data).header("call-id"), "x")

    def test_contentLengthShorterThanBody(self) -> None:
        """
        A datagram carrying more than Content-Length says is a 400 naming
        the fault, with the parsed headers to answer it.
        """
        error = self.assertFault(
            b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 2\r\n\r\nabcdef",
            "Body Exceeds Content-Length",
        )
        self.assertIsInstance(error.partial, Request)
        self.assertFault(
            b"REGISTER sip:a SIP/2.0\r\nContent-Length: 0\r\n\r\nX",
            "Body Exceeds Content-Length",
        )

    def test_contentLengthLineEndPadding(self) -> None:
        """
        Line ends after the body (padding some stacks add) are not a
        disagreement: they are dropped.
        """
        data = b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 2\r\n\r\nab\r\n\r\n"
        self.assertEqual(parseMessage(data).body, b"ab")
        data = b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 0\r\n\r\n\r\n"
        self.assertEqual(parseMessage(data).body, b"")

    def assertFault(self, data: bytes, reason: str, status: int = 400) -> SIPError:
        error = self.assertRaises(SIPError, parseMessage, data)
        self.assertEqual((error.status, error.reason), (status, reason))
        return error

    def test_contentLengthExceedsBody(self) -> None:
        """
        A Content-Length larger than the body is a 400 (RFC 3261 §18.3), and
        the parsed headers come with the error so it can be answered.
        """
        error = self.assertFault(
            b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 99999\r\n\r\nab",
            "Content-Length Exceeds Body",
        )
        self.assertIsInstance(error.partial, Request)

    def test_badContentLength(self) -> None:
        """
        A non-numeric or negative Content-Length is named.
        """
        self.assertFault(b"OPTIONS sip:a SIP/2.0\r\nl: x\r\n\r\n", "Invalid Content-Length")
        self.assertFault(b"OPTIONS sip:a SIP/2.0\r\nl: -1\r\n\r\n", "Invalid Content-Length")

    def test_truncated(self) -> None:
        """
        A datagram without the blank line after the headers is truncated.
        """
        self.assertFault(b"REGISTER sip:a SIP/2.0\r\nVia: x", "Truncated Message")

    def test_garbage(self) -> None:
        """
        Bytes that are not SIP name their fault.
        """
        self.assertFault(b"\xff\xfe\r\n\r\n", "Header Not UTF-8")
        self.assertFault(b"hello world\r\n\r\n", "Malformed Request Line")
        self.assertFault(b"SIP/2.0 abc OK\r\n\r\n", "Malformed Status Line")
        self.assertFault(b"SIP/2.0 99 Low\r\n\r\n", "Malformed Status Line")
        self.assertFault(b"OPTIONS sip:a SIP/2.0\r\nnocolon\r\n\r\n", "Malformed Header Line")
        self.assertFault(b"OPTIONS sip:a SIP/2.0\r\n: v\r\n\r\n", "Malformed Header Line")
        self.assertFault(b"OPTIONS sip:a SIP/2.0\r\n folded\r\n\r\n", "Malformed Header Folding")
        self.assertFault(b"OPT{}IONS sip:a SIP/2.0\r\n\r\n", "Malformed Request Line")

    def test_tooLarge(self) -> None:
        """
        Datagrams over the size limit, or with too many header lines, are
        refused with 513.
        """
        self.assertFault(
            b"OPTIONS sip:a SIP/2.0\r\n" + b"X: y\r\n" * 4000 + b"\r\n", "Message Too Large", 513
        )
        self.assertFault(
            b"OPTIONS sip:a SIP/2.0\r\n" + b"X: y\r\n" * 200 + b"\r\n", "Too Many Header Lines", 513
        )


class RenderResponseTests(SynchronousTestCase):
    """
    L{renderResponse} answers a request from its own headers.
    """

    def answer(self, data: bytes) -> Response:
        request = parseMessage(data)
        assert isinstance(request, Request)
        via = topVia(request)
        response = parseMessage(renderResponse(request, via, ("203.0.113.7", 40000), 200, "OK"))
        assert isinstance(response, Response)
        return response

    def test_toTagged(self) -> None:
        """
        A To without a tag gets one made from the Call-ID and CSeq: the
        same for a retransmission, another for the next request.  A To
        with a tag keeps it.
        """
        first = self.answer(register()).header("to")
        again = self.answer(register()).header("to")
        following = self.answer(register(cseq=2)).header("to")
        assert first is not None and following is not None
        self.assertEqual(first, again)
        self.assertRegex(first, r"^<sip:1001@example.com>;tag=\d+$")
        self.assertNotEqual(first, following)
        tagged = register().replace(
            b"To: <sip:1001@example.com>", b"To: <sip:1001@example.com>;tag=abc"
        )
        self.assertEqual(self.answer(tagged).header("to"), "<sip:1001@example.com>;tag=abc")

    def test_rportFilled(self) -> None:
        """
        The top Via gets received and the rport filled in (RFC 3581).
        """
        response = self.answer(register())
        self.assertEqual(
            response.header("via"),
            "SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK-1;received=203.0.113.7;rport=40000",
        )


class WithoutTopViaTests(SynchronousTestCase):
    """
    L{withoutTopVia} cuts a response's first Via value out of the datagram
    and leaves every other byte, or declines.
    """

    top = "SIP/2.0/UDP 198.51.100.10:5060;branch=z9hG4bK-nk1"

    def cut(self, *lines: str) -> Optional[bytes]:
        data = ("\r\n".join(("SIP/2.0 180 Ringing",) + lines) + "\r\n\r\n").encode()
        response = parseMessage(data)
        assert isinstance(response, Response)
        self.assertEqual(response.data, data)
        return withoutTopVia(response, self.top)

    def test_aloneOnItsLine(self) -> None:
        """
        natkeep's Via alone on the first header line: the line goes, the
        rest stays as written (spelling and order included).
        """
        self.assertEqual(
            self.cut(f"Via: {self.top}", "Via: SIP/2.0/UDP a;branch=z9hG4bK1", "cALL-id: x"),
            b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\ncALL-id: x\r\n\r\n",
        )

    def test_firstOfList(self) -> None:
        """
        natkeep's Via first in a comma-separated line: it and the comma go.
        """
        for separator in (", ", ",", ",\t "):
            self.assertEqual(
                self.cut(f"Via: {self.top}{separator}SIP/2.0/UDP a;branch=z9hG4bK1", "CSeq: 1 X"),
                b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nCSeq: 1 X\r\n\r\n",
            )

    def test_declines(self) -> None:
        """
        Anything else is left to rendering: the compact form, another
        spelling, Via not first, a longer value, white space before the
        comma, nothing after it, another Via first.
        """
        for lines in (
            (f"v: {self.top}",),
            (f"VIA: {self.top}",),
            ("CSeq: 1 X", f"Via: {self.top}"),
            (f"Via: {self.top}x",),
            (f"Via: {self.top} , SIP/2.0/UDP a",),
            (f"Via: {self.top},",),
            ("Via: SIP/2.0/UDP a;branch=z9hG4bK1", f"Via: {self.top}"),
        ):
            self.assertIsNone(self.cut(*lines), lines)

    def test_bodyLeftAlone(self) -> None:
        """
        A response whose header lines end in bare LFs is declined, even
        when its body holds a CRLF and natkeep's Via after it.
        """
        body = f"x\r\nVia: {self.top}, SIP/2.0/UDP a".encode()
        data = (
            f"SIP/2.0 180 Ringing\nVia: {self.top}\nCSeq: 1 X\nContent-Length: {len(body)}\n\n"
        ).encode() + body
        response = parseMessage(data)
        assert isinstance(response, Response)
        self.assertEqual(response.body, body)
        self.assertIsNone(withoutTopVia(response, self.top))


class SplitTopViaTests(SynchronousTestCase):
    """
    L{splitTopVia} reads a response's first two Via values from the
    datagram unparsed, and cuts the first as L{withoutTopVia} does.
    """

    top = "SIP/2.0/UDP 198.51.100.10:5060;branch=z9hG4bK-nk1"
    below = "SIP/2.0/UDP a:5060;branch=z9hG4bK1;received=192.0.2.1;rport=5060"

    def data(self, *lines: str) -> bytes:
        return ("\r\n".join(("SIP/2.0 180 Ringing",) + lines) + "\r\n\r\n").encode()

    def test_bothLayouts(self) -> None:
        """
        The second Via after a comma, or on the next Via line: both values
        as written, and the datagram cut exactly as L{withoutTopVia} cuts
        it.
        """
        for vias in (
            (f"Via: {self.top}, {self.below}",),
            (f"Via: {self.top}", f"Via: {self.below}"),
        ):
            data = self.data(*vias, "CSeq: 1 INVITE", "Content-Length: 0")
            response = parseMessage(data)
            assert isinstance(response, Response)
            self.assertEqual(
                splitTopVia(data, ";branch=z9hG4bK-nk"),
                (self.top, self.below, withoutTopVia(response, self.top)),
            )

    def test_mark(self) -> None:
        """
        A first Via without the mark asked for is declined.
        """
        data = self.data(f"Via: {self.top}, {self.below}", "Content-Length: 0")
        self.assertIsNotNone(splitTopVia(data, "z9hG4bK-nk1"))
        self.assertIsNone(splitTopVia(data, "z9hG4bK-nk2"))

    def test_declinesWhatTheParserRefuses(self) -> None:
        """
        A datagram L{parseMessage} would refuse is declined: a bad status
        code, a line without a colon, a body longer than Content-Length.
        """
        vias = f"Via: {self.top}, {self.below}"
        for data in (
            self.data(vias).replace(b" 180 ", b" 800 "),
            self.data(vias, "Broken", "Content-Length: 0"),
            self.data(vias, "Content-Length: 0") + b"v=0",
        ):
            self.assertRaises(SIPError, parseMessage, data)
            self.assertIsNone(splitTopVia(data))


class HeaderValueTests(SynchronousTestCase):
    """
    Parsers for the header values a registrar acts on.
    """

    def test_splitCommas(self) -> None:
        """
        Commas inside quotes or angle brackets do not split values.
        """
        values = ['"Doe, J" <sip:a@b;x=1,2>;q=1, <sip:c@d>', "sip:e@f"]
        self.assertEqual(
            list(splitCommas(values)),
            ['"Doe, J" <sip:a@b;x=1,2>;q=1', "<sip:c@d>", "sip:e@f"],
        )

    def test_splitUnquotedAsScanned(self) -> None:
        """
        A value without a quoted string is split by jumping between its
        commas and angle brackets, exactly where reading it a character at
        a time splits it: brackets nested, unbalanced or closed before
        they open included.
        """
        from natkeep.sip import _splitQuoted, _splitUnquoted

        rng = random.Random(3261)
        values = ["<sip:a;lr>, <sip:b;lr>", "a, b ,c", ",", "<,>,", "a>,b<,c>,d", "<<a,>b>,c"]
        values += [
            "".join(rng.choice("a,<> ;") for _ in range(rng.randrange(1, 24))) for _ in range(3000)
        ]
        for value in values:
            fast: list[str] = []
            scanned: list[str] = []
            _splitUnquoted(value, fast)
            _splitQuoted(value, scanned)
            self.assertEqual(fast, scanned, value)
        self.assertEqual(splitValues(["<sip:a;lr>, <sip:b;lr>"]), ["<sip:a;lr>", "<sip:b;lr>"])

    def test_topViaOfList(self) -> None:
        """
        The top Via is the first of a comma-separated list.
        """
        request = parseMessage(
            b"OPTIONS sip:a@b SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bK1, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK2\r\n"
            b"\r\n"
        )
        assert isinstance(request, Request)
        via = topVia(request)
        self.assertEqual((via.host, via.param("branch")), ("10.0.0.1", "z9hG4bK1"))

    def test_via(self) -> None:
        """
        A Via gives its protocol, sent-by and parameters, and renders back.
        """
        via = parseVia("SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKx;rport")
        self.assertEqual((via.host, via.port), ("10.0.0.1", 5062))
        self.assertEqual(via.param("branch"), "z9hG4bKx")
        self.assertTrue(via.hasParam("rport"))
        self.assertEqual(via.render(), "SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKx;rport")

    def test_viaIPv6(self) -> None:
        """
        An IPv6 sent-by is bracketed.
        """
        via = parseVia("SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx")
        self.assertEqual((via.host, via.port), ("2001:db8::1", 5060))
        self.assertEqual(via.render(), "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx")

    def test_badVia(self) -> None:
        """
        A Via without a SIP/2.0 protocol or with a bad port is malformed.
        """
        for value in ["HTTP/1.1 host", "SIP/2.0/UDP", "SIP/2.0/UDP h:99999", "SIP/2.0/UDP [::1"]:
            self.assertRaises(SIPError, parseVia, value)

    def test_uri(self) -> None:
        """
        A SIP URI gives user, host and port; the AOR drops parameters.
        """
        uri = parseURI("sip:1001:pw@Example.COM:5070;transport=udp?x=y")
        self.assertEqual((uri.user, uri.host, uri.port), ("1001", "Example.COM", 5070))
        self.assertEqual(uri.addressOfRecord(), "sip:1001@example.com:5070")
        self.assertEqual(parseURI("sips:[::1]").addressOfRecord(), "sips:[::1]")

    def test_badURI(self) -> None:
        """
        Only sip: and sips: URIs with a sound host are accepted.
        """
        for text in ["tel:+123", "http://x", "sip:", "sip:a@h:port", "nonsense"]:
            self.assertRaises(SIPError, parseURI, text)

    def test_nameAddr(self) -> None:
        """
        A name-addr gives display name, URI and header parameters; in the
        addr-spec form parameters belong to the header.
        """
        value = parseNameAddr('"Bob" <sip:b@h;transport=udp>;expires=60;+sip.instance="<urn:x>"')
        self.assertEqual(value.display, '"Bob"')
        self.assertEqual(value.uri, "sip:b@h;transport=udp")
        self.assertEqual(value.param("expires"), "60")
        bare = parseNameAddr("sip:b@h;expires=30")
        self.assertEqual((bare.uri, bare.param("expires")), ("sip:b@h", "30"))
        self.assertRaises(SIPError, parseNameAddr, "<sip:b@h")
        self.assertRaises(SIPError, parseNameAddr, "<sip:b@h> junk")

    def test_deltaSeconds(self) -> None:
        """
        delta-seconds are non-negative integers; huge ones are clamped.
        """
        self.assertEqual(parseDeltaSeconds(" 60 "), 60)
        self.assertEqual(parseDeltaSeconds("9" * 40), MAX_DELTA_SECONDS)
        for bad in ["-1", "1.5", "abc", "", "٣"]:
            self.assertRaises(ValueError, parseDeltaSeconds, bad)

    def test_cseq(self) -> None:
        """
        CSeq is a number below 2**31 and a method.
        """
        self.assertEqual(parseCSeq("42 REGISTER"), (42, "REGISTER"))
        for bad in ["REGISTER", "x REGISTER", "1 2 3", str(2**31) + " REGISTER"]:
            self.assertRaises(SIPError, parseCSeq, bad)

    def test_privateAddresses(self) -> None:
        """
        Private, shared, link-local and unique-local addresses are private;
        public addresses and names are not.
        """
        for host in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.1.1",
            "fd00::1",
            "fe80::1",
            "::ffff:192.168.0.1",
        ]:
            self.assertTrue(isPrivateAddress(host), host)
        for host in ["8.8.8.8", "127.0.0.1", "2001:db8::1", "pbx.example.com", "100.128.0.1"]:
            self.assertFalse(isPrivateAddress(host), host)

    def test_renderParams(self) -> None:
        """
        Parameters render back as written, flags without C{=}, minus any
        skipped.
        """
        params = [("branch", "z9hG4bK1"), ("rport", None), ("expires", "60")]
        self.assertEqual(renderParams(params), ";branch=z9hG4bK1;rport;expires=60")
        self.assertEqual(renderParams(params, skip=("expires",)), ";branch=z9hG4bK1;rport")
