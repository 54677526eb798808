"""
Property tests: nothing a datagram holds escapes the registrar or damages a
binding.
"""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natkeep.bindings import BindingTable
from natkeep.counts import Counts
from natkeep.outbox import Outbox
from natkeep.plugins.natkeep_expiry import CapExpiry
from natkeep.registrar import Registrar
from natkeep.testing import MemoryStore, fakeSocket, register

from .hostile import hostileRegister

PHONE = ("203.0.113.7", 40001)

_LINES = [
    b"REGISTER sip:example.com SIP/2.0",
    b"OPTIONS sip:x SIP/2.0",
    b"SIP/2.0 200 OK",
    b"Via: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK-1;rport",
    b"v: SIP/2.0/UDP [::1",
    b"From: <sip:1001@example.com>;tag=x",
    b"To: <sip:1001@example.com>",
    b"t: <tel:1>",
    b"Call-ID: call-1@phone",
    b"i:",
    b"CSeq: 1 REGISTER",
    b"CSeq: 99999999999 REGISTER",
    b"CSeq: 0 REGISTER",
    b"Contact: *",
    b"m: <sip:1001@192.168.1.20:5060>;expires=x",
    b'Contact: "a,b" <sip:x@[::1]:5060>, sip:y@h;expires=0',
    b"Expires: 0",
    b"Expires: 99999999999999999999",
    b"Content-Length: 99999",
    b"l: -3",
    b" folded",
    b"\xff\xfe",
    b"",
    b"Require: x",
]


class FuzzTests(SynchronousTestCase):
    """
    Random and hostile datagrams.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore()
        self.table = BindingTable(removed=self.store.delete)
        outbox = Outbox(self.clock, self.store, Counts())
        self.registrar = Registrar(
            self.table, self.clock, outbox, CapExpiry(3600, 300), store=self.store
        )
        self.protocol, self.transport = fakeSocket(self.registrar, outbox, self.clock)
        # The existing binding of another AOR that nothing below may touch.
        self.protocol.datagramReceived(
            register(user="keep", contacts=["<sip:keep@192.168.9.9>"], callId="keep"),
            ("198.51.100.1", 5060),
        )
        self.clock.advance(0)
        self.transport.written.clear()
        [self.kept] = self.table.lookup("sip:keep@example.com")
        self.before = (self.kept.source, self.kept.expiresAt, self.kept.cseq, self.kept.callId)

    def deliver(self, data: bytes) -> None:
        self.protocol.datagramReceived(data, PHONE)
        self.clock.advance(0)
        self.assertEqual(self.registrar.stats["internal.errors"], 0)
        self.assertEqual(self.table.lookup("sip:keep@example.com"), [self.kept])
        self.assertEqual(
            (self.kept.source, self.kept.expiresAt, self.kept.cseq, self.kept.callId),
            self.before,
        )

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=2048))
    def test_randomBytes(self, data: bytes) -> None:
        """
        Random bytes never raise out of the protocol.
        """
        self.deliver(data)

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(st.sampled_from(_LINES), max_size=14),
        st.sampled_from([b"\r\n", b"\n"]),
        st.binary(max_size=64),
    )
    def test_sipShapedGarbage(self, lines: list, eol: bytes, body: bytes) -> None:
        """
        SIP-shaped datagrams from broken and hostile pieces never raise and
        never touch another AOR's binding.
        """
        self.deliver(eol.join(lines) + eol + eol + body)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(register()) - 1))
    def test_truncations(self, cut: int) -> None:
        """
        A REGISTER cut anywhere never raises.
        """
        self.deliver(register(user="other")[:cut])

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.randoms(use_true_random=False))
    def test_hostileRegisters(self, rng: random.Random) -> None:
        """
        REGISTERs bent as an outside probe bends them (huge numbers,
        repeated headers, duplicate and long Contacts, LWS in the Via,
        control characters, Require, other schemes and versions) never
        raise, never touch another AOR's binding, and never draw an answer
        larger than a datagram can carry.
        """
        self.deliver(hostileRegister(rng))
        for answer, _ in self.transport.written:
            self.assertLessEqual(len(answer), 65507)
        self.transport.written.clear()

    def test_hugeHeaders(self) -> None:
        """
        60 KB of headers are dropped and counted, not parsed.
        """
        data = register().replace(b"Max-Forwards: 70", b"X-Junk: " + b"a" * 60000)
        self.deliver(data)
        self.assertEqual(self.registrar.stats["dropped.malformed"], 1)
        self.assertEqual(self.transport.written, [])
