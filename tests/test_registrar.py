"""
Tests for L{natkeep.registrar} behind its listening socket (L{natkeep.protocol}):
RFC 3261 §10.3 and RFC 3581, rule by rule.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from natkeep.bindings import BindingTable
from natkeep.counts import Counts
from natkeep.interfaces import IListener, ISIPController
from natkeep.nat import NatDetector
from natkeep.outbox import Outbox
from natkeep.plugins.natkeep_expiry import CapExpiry, FixedExpiry
from natkeep.protocol import FirstMatch, SIPProtocol
from natkeep.registrar import Registrar
from natkeep.sip import Response, parseMessage, parseNameAddr, parseVia
from natkeep.stun import MAGIC_COOKIE
from natkeep.testing import MemoryStore, fakeSocket, register, request

PHONE = ("203.0.113.7", 40001)


class RegistrarTestCase(SynchronousTestCase):
    """
    A registrar behind a listening socket, on a fake clock, transport and
    store.
    """

    natTests = ("via", "private", "contact")

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryStore()
        self.table = BindingTable(removed=self.store.delete)
        self.stats: Counts = Counts()
        self.outbox = Outbox(self.clock, self.store, self.stats)
        self.registrar = Registrar(
            self.table,
            self.clock,
            self.outbox,
            CapExpiry(3600, 300),
            minExpires=60,
            nat=NatDetector(frozenset(self.natTests)),
            store=self.store,
        )
        self.responses: list[tuple[Response, tuple[str, int]]] = []
        self.listener, self.transport = fakeSocket(
            self.registrar,
            self.outbox,
            self.clock,
            onResponse=lambda response, source: self.responses.append((response, source)),
        )

    def deliver(self, data: bytes, source: tuple[str, int] = PHONE) -> None:
        """
        One datagram arrives at the listening socket.
        """
        self.listener.datagramReceived(data, source)

    def takeSent(self) -> list[tuple[bytes, tuple[str, int]]]:
        """
        What the socket sent so far, forgotten.
        """
        sent, self.transport.written = self.transport.written, []
        return sent  # type: ignore[return-value]

    def send(self, data: bytes, source: tuple[str, int] = PHONE) -> Optional[Response]:
        """
        Deliver a datagram, let the reactor turn end, and return the one
        response sent, if any.
        """
        self.deliver(data, source)
        self.clock.advance(0)
        sent = self.takeSent()
        self.assertLessEqual(len(sent), 1)
        if not sent:
            return None
        data, address = sent[0]
        self.assertEqual(address, source)
        message = parseMessage(data)
        assert isinstance(message, Response)
        return message

    def contacts(self, response: Response) -> dict[str, int]:
        result = {}
        for value in response.headers.get("contact", []):
            contact = parseNameAddr(value)
            result[contact.uri] = int(contact.param("expires") or -1)
        return result


class RegisterTests(RegistrarTestCase):
    """
    REGISTER adds, refreshes and removes bindings (RFC 3261 §10.3).
    """

    def test_add(self) -> None:
        """
        A REGISTER adds a binding that remembers the source address and the
        socket it came in on, and the 200 OK lists it.
        """
        response = self.send(register(expires=600))
        assert response is not None
        self.assertEqual(response.code, 200)
        [binding] = self.table.lookup("sip:1001@example.com")
        self.assertEqual(binding.source, PHONE)
        self.assertIs(binding.listener, self.listener)
        self.assertEqual(self.contacts(response), {"sip:1001@192.168.1.20:5060": 300})

    def test_copiesHeaders(self) -> None:
        """
        The 200 OK copies Via, From, Call-ID and CSeq, and adds a To tag.
        """
        response = self.send(register())
        assert response is not None
        self.assertEqual(response.header("call-id"), "call-1@phone")
        self.assertEqual(response.header("cseq"), "1 REGISTER")
        self.assertEqual(response.header("from"), "<sip:1001@example.com>;tag=f1")
        to = parseNameAddr(response.header("to") or "")
        self.assertEqual(to.uri, "sip:1001@example.com")
        self.assertTrue(to.param("tag"))
        self.assertIsNotNone(response.header("date"))

    def test_toTag(self) -> None:
        """
        The To tag added is the same for a retransmission and differs for
        the next CSeq; a To that carries a tag is copied as it is.
        """
        tags = []
        for cseq in (1, 1, 2):
            response = self.send(register(cseq=cseq))
            assert response is not None
            tags.append(parseNameAddr(response.header("to") or "").param("tag"))
        self.assertEqual(tags[0], tags[1])
        self.assertNotEqual(tags[0], tags[2])
        tagged = register(cseq=3).replace(
            b"To: <sip:1001@example.com>", b"To: <sip:1001@example.com> ; TAG=abc"
        )
        response = self.send(tagged)
        assert response is not None
        self.assertEqual(response.header("to"), "<sip:1001@example.com> ; TAG=abc")

    def test_copiesWhatIsThere(self) -> None:
        """
        An error response to a request missing one of From, To, Call-ID or
        CSeq copies the others, in order.
        """
        response = self.send(register().replace(b"Call-ID: call-1@phone\r\n", b""))
        assert response is not None
        self.assertEqual(response.code, 400)
        self.assertEqual(list(response.headers)[:4], ["via", "from", "to", "cseq"])
        self.assertNotIn("call-id", response.headers)
        self.assertTrue(parseNameAddr(response.header("to") or "").param("tag"))

    def test_receivedAndRport(self) -> None:
        """
        Via gets C{received} and C{rport} from the datagram's source
        (RFC 3581), the other Vias are copied unchanged.
        """
        data = register().replace(
            b"Max-Forwards", b"Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp\r\nMax-Forwards"
        )
        response = self.send(data)
        assert response is not None
        vias = response.headers["via"]
        top = parseVia(vias[0])
        self.assertEqual(top.param("received"), PHONE[0])
        self.assertEqual(top.param("rport"), str(PHONE[1]))
        self.assertEqual(vias[1], "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp")

    def test_receivedWithoutRport(self) -> None:
        """
        Without C{rport}, C{received} is added only when the source address
        differs from the sent-by host.
        """
        via = "SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK-2"
        response = self.send(register(via=via))
        assert response is not None
        top = parseVia(response.headers["via"][0])
        self.assertEqual(top.param("received"), PHONE[0])
        self.assertFalse(top.hasParam("rport"))
        response = self.send(register(via=f"SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=b", cseq=2))
        assert response is not None
        self.assertFalse(parseVia(response.headers["via"][0]).hasParam("received"))

    def test_severalContacts(self) -> None:
        """
        Several Contacts in one request, in one header or several, each
        become a binding.
        """
        response = self.send(
            register(
                contacts=[
                    "<sip:a@192.168.1.20:5060>, <sip:b@192.168.1.20:5062>",
                    "sip:c@192.168.1.20:5064",
                ]
            )
        )
        assert response is not None
        self.assertEqual(
            set(self.contacts(response)),
            {"sip:a@192.168.1.20:5060", "sip:b@192.168.1.20:5062", "sip:c@192.168.1.20:5064"},
        )
        self.assertEqual(len(self.table), 3)

    def test_expiresPrecedence(self) -> None:
        """
        The contact C{expires} parameter wins over the Expires header, which
        wins over the default.
        """
        self.registrar.expiry = CapExpiry(86400, 86400)
        response = self.send(register(contacts=["<sip:a@h>;expires=120", "<sip:b@h>"], expires=240))
        assert response is not None
        self.assertEqual(self.contacts(response), {"sip:a@h": 120, "sip:b@h": 240})
        response = self.send(register(contacts=["<sip:c@h>"], cseq=2, callId="other"))
        assert response is not None
        self.assertEqual(self.contacts(response)["sip:c@h"], 3600)

    def test_capByPolicy(self) -> None:
        """
        The granted time is capped by the expiry policy: SS_ENDPOINT_EXPIRE
        for a device not behind NAT.
        """
        via = f"SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=z9hG4bK-3"
        contact = f"<sip:1001@{PHONE[0]}:{PHONE[1]}>"
        response = self.send(register(via=via, contacts=[contact], expires=7200))
        assert response is not None
        self.assertEqual(self.contacts(response), {f"sip:1001@{PHONE[0]}:{PHONE[1]}": 3600})

    def test_fixedPolicy(self) -> None:
        """
        With the C{fixed} policy, the configured time is granted whatever
        was asked.
        """
        self.registrar.expiry = FixedExpiry(3600, 300)
        response = self.send(register(expires=90))
        assert response is not None
        self.assertEqual(list(self.contacts(response).values()), [300])

    def test_refresh(self) -> None:
        """
        A second REGISTER for the same Contact refreshes the binding in
        place with the new source.
        """
        self.send(register(expires=100))
        [binding] = self.table.lookup("sip:1001@example.com")
        self.clock.advance(50)
        self.send(register(expires=100, cseq=2), source=("203.0.113.7", 40002))
        self.assertEqual(self.table.lookup("sip:1001@example.com"), [binding])
        self.assertEqual(binding.source, ("203.0.113.7", 40002))
        self.assertEqual(binding.expiresAt, self.clock.seconds() + 100)

    def test_removeWithZero(self) -> None:
        """
        C{expires=0} removes that binding only.
        """
        self.send(register(contacts=["<sip:a@h>", "<sip:b@h>"]))
        response = self.send(register(contacts=["<sip:a@h>;expires=0"], cseq=2))
        assert response is not None
        self.assertEqual(set(self.contacts(response)), {"sip:b@h"})

    def test_wildcardRemovesAll(self) -> None:
        """
        C{Contact: *} with C{Expires: 0} removes every binding of the AOR.
        """
        self.send(register(contacts=["<sip:a@h>", "<sip:b@h>"]))
        response = self.send(register(contacts=["*"], expires=0, cseq=2))
        assert response is not None
        self.assertEqual(response.code, 200)
        self.assertEqual(self.contacts(response), {})
        self.assertEqual(len(self.table), 0)

    def test_wildcardMisuse(self) -> None:
        """
        Any other use of C{*} is a 400 and changes nothing.
        """
        self.send(register(contacts=["<sip:a@h>"]))
        for contacts, expires in [(["*"], None), (["*"], 60), (["*", "<sip:b@h>"], 0)]:
            response = self.send(register(contacts=contacts, expires=expires, cseq=5))
            assert response is not None
            self.assertEqual((response.code, response.reason), (400, "Invalid Wildcard Contact"))
        self.assertEqual(len(self.table), 1)

    def test_query(self) -> None:
        """
        A REGISTER without Contact is a query: 200 listing the bindings,
        changing nothing.
        """
        self.send(register(contacts=["<sip:a@h>"], expires=600))
        self.clock.advance(100)
        response = self.send(register(contacts=(), cseq=2))
        assert response is not None
        self.assertEqual(response.code, 200)
        self.assertEqual(self.contacts(response), {"sip:a@h": 200})

    def test_intervalTooBrief(self) -> None:
        """
        An expiry below the minimum is a 423 with Min-Expires.
        """
        response = self.send(register(expires=30))
        assert response is not None
        self.assertEqual(response.code, 423)
        self.assertEqual(response.header("min-expires"), "60")
        self.assertEqual(len(self.table), 0)

    def test_outOfOrderCSeq(self) -> None:
        """
        With the same Call-ID, a lower CSeq than the binding's is refused
        and changes nothing (RFC 3261 §10.3 step 7).
        """
        self.send(register(cseq=5, expires=600))
        response = self.send(register(cseq=4, expires=0))
        assert response is not None
        self.assertEqual((response.code, response.reason), (400, "Out of Order CSeq"))
        self.assertEqual(len(self.table), 1)

    def test_retransmission(self) -> None:
        """
        The same Call-ID and CSeq again is a retransmission: answered 200
        again, so a phone whose first answer was lost stays registered.
        """
        first = self.send(register(cseq=5))
        again = self.send(register(cseq=5))
        assert first is not None and again is not None
        self.assertEqual(again.code, 200)
        self.assertEqual(again.header("to"), first.header("to"))

    def test_otherCallIdUpdates(self) -> None:
        """
        A different Call-ID updates the binding whatever its CSeq.
        """
        self.send(register(cseq=50))
        response = self.send(register(cseq=1, callId="rebooted", expires=0))
        assert response is not None
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.table), 0)

    def test_contactParamsKept(self) -> None:
        """
        Contact parameters other than expires are repeated in the 200 OK.
        """
        response = self.send(
            register(contacts=['<sip:a@h>;+sip.instance="<urn:uuid:1>";expires=90'])
        )
        assert response is not None
        self.assertEqual(
            response.headers["contact"], ['<sip:a@h>;+sip.instance="<urn:uuid:1>";expires=90']
        )

    def test_require(self) -> None:
        """
        A Require header names an extension we do not support: 420.
        """
        response = self.send(register(extra=["Require: gruu"]))
        assert response is not None
        self.assertEqual(response.code, 420)
        self.assertEqual(response.header("unsupported"), "gruu")

    def test_expiry(self) -> None:
        """
        A binding disappears when it expires, driven by the clock.
        """
        self.send(register(expires=90))
        self.clock.advance(89)
        self.table.sweep(self.clock.seconds())
        self.assertEqual(len(self.table), 1)
        self.clock.advance(1)
        self.table.sweep(self.clock.seconds())
        self.assertEqual(len(self.table), 0)
        response = self.send(register(contacts=(), cseq=2))
        assert response is not None
        self.assertEqual(self.contacts(response), {})


class DurabilityTests(RegistrarTestCase):
    """
    An answer about a change leaves only after the change is committed.
    """

    def test_answerAfterCommit(self) -> None:
        """
        The 200 OK is held until the end of the reactor turn, when one
        commit covers every REGISTER of the turn.
        """
        self.deliver(register(user="a", contacts=["<sip:a@h>"]))
        self.deliver(register(user="b", contacts=["<sip:b@h>"]))
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.store.rows, {})
        self.clock.advance(0)
        self.assertEqual(len(self.transport.written), 2)
        self.assertEqual(self.store.commits, 1)
        self.assertEqual(
            set(self.store.rows),
            {("sip:a@example.com", "sip:a@h"), ("sip:b@example.com", "sip:b@h")},
        )

    def test_failedCommitWithholdsAnswers(self) -> None:
        """
        When the commit fails, no 200 OK claims what is not on disk: the
        REGISTER is answered 500, its write is kept and retried a second
        later; the refresh after that is answered 200 once both are on disk.
        """
        self.store.failures = 1
        self.deliver(register())
        self.clock.advance(0)
        [(data, _)] = self.takeSent()
        self.assertTrue(data.startswith(b"SIP/2.0 500 Binding Not Stored"), data[:40])
        self.assertEqual(self.stats["store.errors"], 1)
        self.assertTrue(self.store.pending())
        self.assertEqual(self.store.rows, {})
        self.assertIsNotNone(self.outbox.status()["last_error"])
        self.clock.advance(1)
        self.assertEqual(len(self.store.rows), 1)
        self.assertIsNone(self.outbox.status()["last_error"])
        response = self.send(register(cseq=2))
        assert response is not None
        self.assertEqual(response.code, 200)

    def test_commitUnderWay(self) -> None:
        """
        While a commit is under way (on the writer thread in the service),
        OPTIONS is answered at once and REGISTER answers wait, shown in
        the status; past the queue's bound a REGISTER gets 503 at once and
        changes nothing; when the commit ends the waiting answers leave,
        in order.
        """
        from twisted.internet import defer

        from natkeep import outbox

        self.patch(outbox, "MAX_HELD", 3)
        commits: list[defer.Deferred[None]] = []

        def writer(rows: object, deletes: object) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            commits.append(d)
            return d

        self.outbox.writer = writer
        self.deliver(register(user="w0"))
        self.clock.advance(0)
        self.assertEqual(len(commits), 1)
        for n in (1, 2):
            self.deliver(register(user=f"w{n}"))
        self.clock.advance(2)
        self.assertEqual(self.takeSent(), [])
        status = self.outbox.status()
        self.assertEqual((status["queue"], status["committing"]), (3, True))
        self.assertEqual(status["lag_seconds"], 2.0)
        response = self.send(request("OPTIONS"))
        assert response is not None
        self.assertEqual(response.code, 200)
        response = self.send(register(user="w3"))
        assert response is not None
        self.assertEqual((response.code, response.reason), (503, "Store Busy"))
        self.assertEqual(response.headers["retry-after"], ["5"])
        self.assertEqual(len(self.table), 3)
        commits.pop().callback(None)
        self.clock.advance(0)
        self.assertEqual(len(commits), 1)
        commits.pop().callback(None)
        sent = [parseMessage(data) for data, _ in self.takeSent()]
        self.assertEqual([m.code for m in sent], [200, 200, 200])  # type: ignore[union-attr]
        self.assertEqual(self.outbox.status()["queue"], 0)

    def test_removalsStored(self) -> None:
        """
        Unregistering deletes the stored row.
        """
        self.send(register())
        self.send(register(cseq=2, expires=0))
        self.assertEqual(self.store.rows, {})

    def test_modifiedStored(self) -> None:
        """
        A binding and its row carry the clock time of the REGISTER that
        last changed it, and that time never goes back, even when the
        clock does: the store orders one copy's writes by it.
        """
        start = self.clock.seconds()
        self.send(register())
        self.clock.advance(0)
        [binding] = self.table.lookup("sip:1001@example.com")
        [row] = self.store.rows.values()
        self.assertEqual((binding.modified, row.modified), (start, start))
        self.clock.advance(20)
        self.send(register(cseq=2))
        self.clock.advance(0)
        [row] = self.store.rows.values()
        self.assertEqual((binding.modified, row.modified, row.cseq), (start + 20, start + 20, 2))
        self.clock.rightNow -= 10
        self.send(register(cseq=3))
        self.clock.advance(0)
        [row] = self.store.rows.values()
        self.assertEqual((binding.modified, row.modified, row.cseq), (start + 20, start + 20, 3))


class NATDetectionTests(RegistrarTestCase):
    """
    NAT detection is recorded per binding.
    """

    def publicRegister(self, **kw: object) -> bytes:
        host, port = PHONE
        defaults: dict = dict(
            via=f"SIP/2.0/UDP {host}:{port};branch=z9hG4bK-p",
            contacts=[f"<sip:1001@{host}:{port}>"],
        )
        defaults.update(kw)
        return register(**defaults)

    def natOf(self) -> bool:
        [binding] = self.table.lookup("sip:1001@example.com")
        return binding.nat

    def test_notNATed(self) -> None:
        """
        Via and Contact equal to the source: not behind NAT.
        """
        self.send(self.publicRegister())
        self.assertFalse(self.natOf())
        self.assertEqual(self.table.natCount(), 0)

    def test_viaDiffers(self) -> None:
        """
        A Via sent-by that differs from the source means NAT.
        """
        self.send(self.publicRegister(via="SIP/2.0/UDP 198.51.100.1:5060;branch=x"))
        self.assertTrue(self.natOf())

    def test_viaPortDiffers(self) -> None:
        """
        The same host on another port means NAT too.
        """
        self.send(self.publicRegister(via=f"SIP/2.0/UDP {PHONE[0]};branch=x"))
        self.assertTrue(self.natOf())

    def test_privateContact(self) -> None:
        """
        A private Contact host means NAT.
        """
        self.send(self.publicRegister(contacts=[f"<sip:1001@10.0.0.5:{PHONE[1]}>"]))
        self.assertTrue(self.natOf())

    def test_contactDiffers(self) -> None:
        """
        A public Contact other than the source means NAT.
        """
        self.send(self.publicRegister(contacts=["<sip:1001@198.51.100.9:5060>"]))
        self.assertTrue(self.natOf())

    def test_refreshChangesNAT(self) -> None:
        """
        A refresh from behind a NAT moves the binding into the NATed set.
        """
        self.send(self.publicRegister())
        self.send(self.publicRegister(via="SIP/2.0/UDP 10.0.0.5;branch=y", cseq=2))
        self.assertTrue(self.natOf())
        self.assertEqual(list(self.table.natBindings()), self.table.lookup("sip:1001@example.com"))


class ConfiguredNATTestsTests(RegistrarTestCase):
    """
    Only the configured NAT tests apply.
    """

    natTests = ("private",)

    def test_onlyPrivate(self) -> None:
        """
        With only the C{private} test, a Via that differs is not NAT, but a
        private Contact is.
        """
        self.send(
            register(via="SIP/2.0/UDP 198.51.100.1;branch=x", contacts=["<sip:a@198.51.100.1>"])
        )
        self.send(register(user="b", contacts=["<sip:b@192.168.0.2>"]))
        self.assertFalse(self.table.lookup("sip:1001@example.com")[0].nat)
        self.assertTrue(self.table.lookup("sip:b@example.com")[0].nat)


class OtherRequestTests(RegistrarTestCase):
    """
    Requests other than REGISTER.
    """

    def test_options(self) -> None:
        """
        OPTIONS to the server is answered 200 OK with Allow.
        """
        response = self.send(request("OPTIONS"))
        assert response is not None
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header("allow"), "REGISTER, OPTIONS")

    def test_methodNotAllowed(self) -> None:
        """
        Any other request is a 405 with Allow.
        """
        for method in ["INVITE", "SUBSCRIBE", "FOOBAR"]:
            response = self.send(request(method))
            assert response is not None
            self.assertEqual(response.code, 405)
            self.assertEqual(response.header("allow"), "REGISTER, OPTIONS")

    def test_ack(self) -> None:
        """
        ACK gets nothing.
        """
        self.assertIsNone(self.send(request("ACK")))

    def test_responseGoesToItsHandler(self) -> None:
        """
        A response that arrives is not answered; it goes, with its source,
        to the socket's response handler (the heartbeat sender), and not to
        the registrar.
        """
        self.assertIsNone(self.send(b"SIP/2.0 200 OK\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n\r\n"))
        [(response, source)] = self.responses
        self.assertEqual((response.code, response.header("call-id"), source), (200, "x", PHONE))
        self.assertEqual(self.stats["responses.received"], 1)
        self.assertNotIn("requests.REGISTER", self.stats)


class BadInputTests(RegistrarTestCase):
    """
    Bad input gets a 400 naming the fault, or is dropped and counted.
    """

    def assertAnswered(self, data: bytes, code: int, reason: str) -> None:
        response = self.send(data)
        assert response is not None
        self.assertEqual((response.code, response.reason), (code, reason))

    def test_brokenValues(self) -> None:
        """
        Broken values in mandatory headers are named in the reason phrase.
        """
        self.assertAnswered(register().replace(b"CSeq: 1", b"CSeq: x"), 400, "Invalid CSeq")
        self.assertAnswered(
            register(expires=0).replace(b"Expires: 0", b"Expires: soon"), 400, "Invalid Expires"
        )
        self.assertAnswered(
            register(contacts=["<sip:a@h>;expires=never"]), 400, "Invalid Contact Expires"
        )
        self.assertAnswered(register(contacts=["<http://a>"]), 400, "Invalid Contact URI")
        self.assertAnswered(register().replace(b"To: <sip:", b"To: <tel:"), 400, "Invalid To URI")
        self.assertAnswered(
            register().replace(b"1 REGISTER", b"1 INVITE"), 400, "CSeq Method Mismatch"
        )
        self.assertAnswered(
            register().replace(b"Call-ID: call-1@phone\r\n", b""), 400, "Missing Call-Id Header"
        )
        self.assertAnswered(
            register().replace(b"Content-Length: 0", b"Content-Length: 500"),
            400,
            "Content-Length Exceeds Body",
        )
        self.assertAnswered(register() + b"junk", 400, "Body Exceeds Content-Length")

    def test_unanswerableDropped(self) -> None:
        """
        What cannot be answered (no Via, garbage) is dropped and counted.
        """
        self.assertIsNone(self.send(b"\x00\x01garbage"))
        self.assertIsNone(self.send(register().replace(b"Via:", b"X-Via:")))
        self.assertIsNone(self.send(register().replace(b"SIP/2.0/UDP", b"SIP/9/UDP")))
        self.assertEqual(self.stats["dropped"], 3)

    def test_keepalives(self) -> None:
        """
        Bare CRLF keep-alives are accepted silently.
        """
        self.assertIsNone(self.send(b"\r\n\r\n"))
        self.assertIsNone(self.send(b"\r\n"))
        self.assertEqual(self.stats["keepalives"], 2)
        self.assertEqual(self.stats["dropped"], 0)

    def test_stun(self) -> None:
        """
        A STUN Binding request is answered with the source address XORed
        into XOR-MAPPED-ADDRESS (RFC 5389).
        """
        transaction = b"0123456789ab"
        data = b"\x00\x01\x00\x00" + MAGIC_COOKIE.to_bytes(4, "big") + transaction
        self.deliver(data)
        [(answer, address)] = self.takeSent()
        self.assertEqual(address, PHONE)
        self.assertEqual(answer[:2], b"\x01\x01")
        self.assertEqual(answer[8:20], transaction)
        xport = int.from_bytes(answer[26:28], "big") ^ (MAGIC_COOKIE >> 16)
        xaddr = int.from_bytes(answer[28:32], "big") ^ MAGIC_COOKIE
        self.assertEqual((xaddr.to_bytes(4, "big"), xport), (bytes([203, 0, 113, 7]), PHONE[1]))

    def test_bindingSurvivesBadInput(self) -> None:
        """
        A broken request about an existing binding leaves it intact.
        """
        self.send(register(expires=600))
        [binding] = self.table.lookup("sip:1001@example.com")
        before = (binding.source, binding.expiresAt, binding.cseq)
        self.send(register(cseq=2, contacts=["<sip:1001@192.168.1.20:5060>;expires=x"]))
        self.send(register(cseq=3, expires=0).replace(b"Expires: 0", b"Expires: -5"))
        self.assertEqual(self.table.lookup("sip:1001@example.com"), [binding])
        self.assertEqual((binding.source, binding.expiresAt, binding.cseq), before)


class ProtocolTests(SynchronousTestCase):
    """
    L{SIPProtocol} never lets an exception out.
    """

    def test_provides(self) -> None:
        """
        The protocol is a listener, the registrar a controller.
        """
        clock = Clock()
        outbox = Outbox(clock, None, Counts())
        registrar = Registrar(BindingTable(), clock, outbox, CapExpiry(3600, 300))
        protocol, _ = fakeSocket(registrar, outbox, clock)
        self.assertTrue(verifyObject(IListener, protocol))
        self.assertTrue(verifyObject(ISIPController, registrar))

    def test_internalErrorContained(self) -> None:
        """
        Even a bug in the controller costs one datagram, counted.
        """

        @implementer(ISIPController)
        class Broken:
            def requestReceived(self, *a: object) -> None:
                raise RuntimeError("bug")

        clock = Clock()
        outbox = Outbox(clock, None, Counts())
        protocol, _ = fakeSocket(Broken(), outbox, clock)
        protocol.datagramReceived(request("OPTIONS"), ("127.0.0.1", 1))
        self.assertEqual(outbox.stats["internal.errors"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class FirstMatchTests(SynchronousTestCase):
    """
    L{FirstMatch} offers a response datagram to its matchers in turn.
    """

    def test_inTurnUntilTaken(self) -> None:
        """
        Each matcher is asked in the order given, with the datagram and its
        source, until one takes it; those after it are not asked.
        """
        asked: list[tuple[str, bytes, tuple[str, int]]] = []

        def matcher(name: str, takes: bool) -> Callable[[bytes, tuple[str, int]], bool]:
            def match(data: bytes, source: tuple[str, int]) -> bool:
                asked.append((name, data, source))
                return takes

            return match

        first = FirstMatch(matcher("a", False), matcher("b", True), matcher("c", True))
        self.assertTrue(first(b"SIP/2.0 200 OK", PHONE))
        self.assertEqual(asked, [("a", b"SIP/2.0 200 OK", PHONE), ("b", b"SIP/2.0 200 OK", PHONE)])

    def test_noneTakes(self) -> None:
        """
        When no matcher takes the datagram, the socket is told so and
        parses it.
        """
        self.assertFalse(FirstMatch(lambda d, s: False, lambda d, s: False)(b"x", PHONE))
        self.assertFalse(FirstMatch()(b"x", PHONE))


class ReadingTransport:
    """
    The reading side of a UDP port: whether it reads, and its per-turn
    read limit.
    """

    maxThroughput = 256 * 1024

    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class ReadPauseTests(SynchronousTestCase):
    """
    L{SIPProtocol} starts a read at most every C{readPause} seconds.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        outbox = Outbox(self.clock, None, Counts())
        registrar = Registrar(BindingTable(), self.clock, outbox, CapExpiry(3600, 300))
        self.protocol = SIPProtocol(
            "127.0.0.1:5060", registrar, outbox, self.clock, outbox.stats, readPause=0.001
        )
        self.transport = ReadingTransport()
        self.protocol.transport = self.transport  # type: ignore[assignment]

    def test_pauseIsWhatTheTurnLeft(self) -> None:
        """
        The pause after a turn is C{readPause} less the time the turn took,
        so reads start C{readPause} apart.
        """
        self.protocol.datagramReceived(b"\r\n\r\n", ("127.0.0.1", 1))
        self.clock.advance(0.0004)
        self.assertFalse(self.transport.reading)
        self.clock.advance(0.0005)
        self.assertFalse(self.transport.reading)
        self.clock.advance(0.0001)
        self.assertTrue(self.transport.reading)

    def test_longTurnNoPause(self) -> None:
        """
        A turn that took longer than C{readPause} is followed by a read at
        once.
        """
        self.protocol.datagramReceived(b"\r\n\r\n", ("127.0.0.1", 1))
        self.clock.advance(0.002)
        self.assertTrue(self.transport.reading)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_readLimitNoPause(self) -> None:
        """
        A turn that read up to the transport's limit left datagrams waiting:
        reading goes on.
        """
        self.transport.maxThroughput = 8
        self.protocol.datagramReceived(b"\r\n\r\n", ("127.0.0.1", 1))
        self.protocol.datagramReceived(b"\r\n\r\n", ("127.0.0.1", 1))
        self.clock.advance(0)
        self.assertTrue(self.transport.reading)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oneTurnOneCall(self) -> None:
        """
        However many datagrams a turn reads, it schedules one end-of-turn
        call.
        """
        for _ in range(5):
            self.protocol.datagramReceived(b"\r\n\r\n", ("127.0.0.1", 1))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
