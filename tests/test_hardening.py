"""
What an outside probe broke, each case with its exact input: the answer it
must get now, and no traceback.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import globalLogPublisher

from natkeep import registrar, sip
from natkeep.sip import MAX_HEADER_LINES, MAX_MESSAGE_SIZE, traceText
from natkeep.testing import register, request

from .test_registrar import RegistrarTestCase


class HardeningTestCase(RegistrarTestCase):
    """
    A registrar behind its socket; every test ends with no internal error.
    """

    def tearDown(self) -> None:
        self.assertEqual(self.stats["internal.errors"], 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def assertAnswered(self, data: bytes, code: int, reason: str) -> Any:
        response = self.send(data)
        assert response is not None
        self.assertEqual((response.code, response.reason), (code, reason))
        return response


class HugeNumberTests(HardeningTestCase):
    """
    Numbers past Python's integer-conversion limit.
    """

    def test_cseqOfThousandsOfDigits(self) -> None:
        """
        A CSeq of 5 000 digits is a 400 naming it.
        """
        self.assertAnswered(
            register().replace(b"CSeq: 1 ", b"CSeq: " + b"9" * 5000 + b" "), 400, "Invalid CSeq"
        )

    def test_expiresOfThousandsOfDigits(self) -> None:
        """
        An Expires of 5 000 digits is a very large value, capped by the
        expiry policy, not an error.
        """
        data = register(expires=1).replace(b"Expires: 1", b"Expires: " + b"9" * 5000)
        response = self.assertAnswered(data, 200, "OK")
        self.assertEqual(list(self.contacts(response).values()), [300])


class DuplicateTests(HardeningTestCase):
    """
    Repeated headers and Contacts.
    """

    def test_sameContactTwice(self) -> None:
        """
        The same Contact twice in one REGISTER makes one binding, which
        C{Contact: *} removes: nothing is left to get heartbeats.
        """
        contact = "<sip:same@10.0.0.9>"
        self.assertAnswered(register(contacts=[f"{contact}, {contact}"]), 200, "OK")
        self.assertAnswered(register(cseq=2, contacts=[contact, contact]), 200, "OK")
        self.assertEqual(len(self.table), 1)
        self.assertEqual(self.table.natCount(), 1)
        self.assertAnswered(register(cseq=3, contacts=["*"], expires=0), 200, "OK")
        self.assertEqual((len(self.table), self.table.natCount()), (0, 0))
        self.assertEqual(self.store.rows, {})

    def test_mandatoryHeaderTwice(self) -> None:
        """
        Two To, Call-ID or CSeq headers are a 400 naming the header.
        """
        for line, name in (
            (b"To: <sip:1001@example.com>\r\n", "To"),
            (b"Call-ID: call-1@phone\r\n", "Call-Id"),
            (b"CSeq: 1 REGISTER\r\n", "Cseq"),
        ):
            self.assertAnswered(
                register().replace(line, line + line), 400, f"Multiple {name} Headers"
            )
        self.assertEqual(len(self.table), 0)

    def test_conflictingContentLength(self) -> None:
        """
        Two different Content-Length values are a 400.
        """
        self.assertAnswered(
            register().replace(b"Content-Length: 0", b"Content-Length: 0\r\nContent-Length: 5"),
            400,
            "Conflicting Content-Length",
        )


class GrammarTests(HardeningTestCase):
    """
    What RFC 3261's grammar allows, and the answers it requires.
    """

    def test_viaSentProtocolWithLWS(self) -> None:
        """
        LWS around the slashes of the sent-protocol is legal: the REGISTER
        is answered 200, to the same Via.
        """
        data = register(via="SIP  /   2.0 /UDP 192.168.1.20:5060;branch=z9hG4bK-lws;rport")
        response = self.assertAnswered(data, 200, "OK")
        self.assertIn("branch=z9hG4bK-lws", response.header("via"))
        self.assertEqual(len(self.table), 1)

    def test_requireAnyMethod(self) -> None:
        """
        C{Require} with an unknown option-tag is a 420 listing it in
        C{Unsupported}, for OPTIONS as for REGISTER.
        """
        for data in (
            request("OPTIONS").replace(b"Max-Forwards", b"Require: foo, 100rel\r\nMax-Forwards"),
            register(extra=["Require: foo, 100rel"]),
        ):
            response = self.assertAnswered(data, 420, "Bad Extension")
            self.assertEqual(response.header("unsupported"), "foo, 100rel")

    def test_unsupportedScheme(self) -> None:
        """
        A Request-URI scheme other than sip or sips is a 416.
        """
        self.assertAnswered(
            register().replace(b"REGISTER sip:example.com", b"REGISTER tel:+15551234"),
            416,
            "Unsupported URI Scheme",
        )

    def test_otherVersion(self) -> None:
        """
        A SIP version other than 2.0 is a 505.
        """
        self.assertAnswered(
            register().replace(b"sip:example.com SIP/2.0", b"sip:example.com SIP/3.0"),
            505,
            "Version Not Supported",
        )


class SizeTests(HardeningTestCase):
    """
    Requests over the size or line limit are answered 513.
    """

    def test_overSize(self) -> None:
        """
        A REGISTER longer than the limit, with sound headers, is a 513.
        """
        data = register(extra=["Content-Type: text/plain"]).replace(
            b"Content-Length: 0\r\n\r\n", b"Content-Length: 20000\r\n\r\n" + b"x" * 20000
        )
        self.assertGreater(len(data), MAX_MESSAGE_SIZE)
        self.assertAnswered(data, 513, "Message Too Large")

    def test_tooManyLines(self) -> None:
        """
        A REGISTER with more header lines than the limit is a 513.
        """
        extra = [f"X-Filler-{n}: {n}" for n in range(MAX_HEADER_LINES + 1)]
        self.assertAnswered(register(extra=extra), 513, "Too Many Header Lines")
        self.assertEqual(len(self.table), 0)

    def test_headerNameCacheBoundedInBytes(self) -> None:
        """
        Junk datagrams each naming a unique header of about 15 KB do not
        grow the cache of canonical header names.
        """
        before = sum(len(name) for name in sip._CANONICAL)
        for n in range(256):
            name = f"X-{n}-".encode() + b"a" * 15000
            self.send(request("OPTIONS").replace(b"Max-Forwards", name + b": 1\r\nMax-Forwards"))
        self.assertLess(sum(len(name) for name in sip._CANONICAL) - before, 256 * 64)


class TraceTests(HardeningTestCase):
    """
    The SIP trace escapes what could forge a log line or drive a terminal.
    """

    def test_traceText(self) -> None:
        """
        Lines stay lines; CR, ESC, NUL, NEL and U+2028 inside them are
        escaped.
        """
        self.assertEqual(
            traceText(b"X: a\rb\x1b[2J\x00\xc2\x85c\xe2\x80\xa8d\tz\r\nY: 1"),
            "X: a\\x0db\\x1b[2J\\x00\\x85c\\u2028d\tz\nY: 1",
        )

    def test_traceLogged(self) -> None:
        """
        With the trace on, what is logged in and out holds no raw control
        character.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.listener.sipTrace = self.outbox.sipTrace = True
        hostile = "<sip:1001@example.com>;x=\x1b[31m\r2026-01-01 forged\x00\u2028"
        self.send(register().replace(b"<sip:1001@example.com>;tag=f1", hostile.encode()))
        texts = [e["text"] for e in events if "text" in e]
        self.assertEqual(len(texts), 2)
        for text in texts:
            self.assertNotIn("\x1b", text)
            self.assertNotIn("\r", text)
            self.assertNotIn("\x00", text)
            self.assertNotIn("\u2028", text)
            self.assertIn("\\x1b[31m", text)


class ResponseSizeTests(HardeningTestCase):
    """
    No REGISTER can make an AOR's 200 OK outgrow one datagram.
    """

    def sendRaw(self, data: bytes) -> bytes:
        self.deliver(data)
        self.clock.advance(0)
        [(answer, _)] = self.takeSent()
        return answer

    def test_longContactsRefused(self) -> None:
        """
        Five REGISTERs each with a 15 KB Contact are each refused with a
        400, nothing is stored, and the owner's own refresh is still
        answered 200.
        """
        for n in range(5):
            contact = f"<sip:{n}{'a' * 15000}@10.0.0.9>"
            self.assertAnswered(register(cseq=n + 1, contacts=[contact]), 400, "Contact Too Long")
        self.assertEqual(len(self.table), 0)
        self.assertAnswered(register(cseq=9), 200, "OK")

    def test_tooManyInOneRequest(self) -> None:
        """
        More Contacts in one REGISTER than allowed is a 400; nothing of it
        is stored.
        """
        contacts = [f"<sip:{n}@10.0.0.9>" for n in range(registrar.MAX_CONTACTS_PER_REQUEST + 1)]
        self.assertAnswered(register(contacts=contacts), 400, "Too Many Contacts")
        self.assertEqual(len(self.table), 0)

    def test_aorFull(self) -> None:
        """
        With C{contacts_full = refuse}, an AOR holds at most its limit of
        bindings: one more is a 403, a refresh of one it holds is still a
        200, and after one leaves the new one fits.
        """
        self.registrar.caps.replace = False
        limit = registrar.MAX_CONTACTS_PER_AOR
        for n in range(limit):
            self.assertAnswered(register(cseq=n + 1, contacts=[f"<sip:{n}@10.0.0.9>"]), 200, "OK")
        extra = "<sip:extra@10.0.0.9>"
        self.assertAnswered(register(cseq=100, contacts=[extra]), 403, "Too Many Contacts For AOR")
        self.assertAnswered(register(cseq=101, contacts=["<sip:0@10.0.0.9>"]), 200, "OK")
        self.assertAnswered(
            register(cseq=102, contacts=["<sip:1@10.0.0.9>;expires=0", extra]), 200, "OK"
        )
        self.assertEqual(len(self.table), limit)

    def test_largestAnswerFitsDatagram(self) -> None:
        """
        With the AOR full of the longest Contacts allowed, a query is
        answered, and well within a UDP datagram.
        """
        limit = registrar.MAX_CONTACTS_PER_AOR
        length = registrar.MAX_CONTACT_LENGTH
        for n in range(limit):
            uri = f"sip:{n:02d}{'b' * (length - 20)}@10.0.0.9"
            self.assertAnswered(register(cseq=n + 1, contacts=[f"<{uri}>"]), 200, "OK")
        answer = self.sendRaw(register(cseq=99, contacts=()))
        self.assertTrue(answer.startswith(b"SIP/2.0 200 OK"))
        self.assertEqual(answer.count(b"\r\nContact: "), limit)
        self.assertLess(len(answer), 26 * 1024)
