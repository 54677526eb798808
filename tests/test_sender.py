"""
Tests for L{natkeep.sender}: the exact heartbeat schedule of each pacing,
driven by a fake clock.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natkeep.bindings import Binding, BindingTable
from natkeep.config import Settings
from natkeep.interfaces import IDatagramMatcher, IExpiryPolicy, IPacer, IPayload
from natkeep.outbox import Outbox
from natkeep.plugins.natkeep_expiry import CapExpiry, LivenessExpiry
from natkeep.plugins.natkeep_pacing import RestartPacer, ResumePacer, SpreadPacer
from natkeep.plugins.natkeep_payload import FixedPayload, OptionsPayload
from natkeep.registrar import Registrar
from natkeep.sender import HeartbeatSender
from natkeep.sip import Request, Response, parseMessage
from natkeep.strategies import Strategies, makeStrategy
from natkeep.testing import FakeListener, fakeSocket

START = 1000.0


class SenderTestCase(SynchronousTestCase):
    """
    PERIOD 10 s, INTERVAL 1000 ms, ONE_TIME 3: 10 batches, capacity 30.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.listener = FakeListener()
        self.table = BindingTable()
        self.sends: list[tuple[float, int]] = []

    def addDevices(self, count: int, nat: bool = True, expiresIn: float = 3600) -> list[Binding]:
        devices = []
        for n in range(count):
            b = Binding(
                f"sip:{n}@example.com",
                f"sip:{n}@10.0.0.1",
                "",
                ("198.51.100.1", 10000 + n),
                self.listener,
                nat,
                self.clock.seconds() + expiresIn,
                f"c{n}",
                1,
            )
            self.table.add(b)
            devices.append(b)
        return devices

    def makeSender(
        self,
        pacer: Optional[IPacer] = None,
        payload: Optional[IPayload] = None,
        expiry: Optional[IExpiryPolicy] = None,
        **kw: object,
    ) -> HeartbeatSender:
        sender = HeartbeatSender(
            self.table,
            self.clock,
            Settings(period=10, sendInterval=1000, sendOneTime=3, **kw),  # type: ignore[arg-type]
            Strategies(
                expiry or CapExpiry(3600, 300),
                payload or FixedPayload(b"HELLO"),
                pacer or RestartPacer(),
            ),
        )
        self.addCleanup(sender.stopService)
        return sender

    def runFor(self, sender: HeartbeatSender, seconds: int) -> list[tuple[float, int]]:
        """
        Start the sender and run the clock up to just before C{seconds};
        return (time since start, device number) of every heartbeat.
        """
        sender.startService()
        # Half-second steps are exact in binary floating point, so the
        # instants below are exact too.
        for _ in range(seconds * 2 - 1):
            self.clock.advance(0.5)
        return self.heartbeats()

    def heartbeats(self) -> list[tuple[float, int]]:
        # The device number is its source port's offset.
        return [(t - START, address[1] - 10000) for t, _, address in self.listener.timeline]

    def response(self, data: bytes, code: int = 200) -> Response:
        """
        The response a device sends to the heartbeat C{data}.
        """
        request = parseMessage(data)
        return Response(
            code,
            "OK",
            {
                k: v
                for k, v in request.headers.items()
                if k in ("via", "from", "to", "call-id", "cseq")
            },
            b"",
        )

    def record(self) -> None:
        self.listener.clock = self.clock


class RestartTests(SenderTestCase):
    """
    C{restart}: VOS3000 exactly.
    """

    def test_belowCapacity(self) -> None:
        """
        20 devices: batch k at k seconds carries devices 3k..3k+2; every
        device once per period; the cycle ends early and misses nobody.
        """
        self.record()
        self.addDevices(20)
        sender = self.makeSender()
        sends = self.runFor(sender, 20)
        expected = [(float(k), n) for k in range(7) for n in range(3 * k, min(3 * k + 3, 20))]
        self.assertEqual(sends, expected + [(10 + t, n) for t, n in expected])
        assert sender.lastCycle is not None
        self.assertEqual((sender.lastCycle.sent, sender.lastCycle.missed), (20, 0))
        self.assertEqual(sender.lastCycle.duration, 6.0)

    def test_atCapacity(self) -> None:
        """
        30 devices fill all 10 batches exactly.
        """
        self.record()
        self.addDevices(30)
        sender = self.makeSender()
        sends = self.runFor(sender, 10)
        self.assertEqual(sends, [(float(k), n) for k in range(10) for n in range(3 * k, 3 * k + 3)])
        self.assertEqual(sender.stats["heartbeats.sent"], 30)

    def test_overCapacity(self) -> None:
        """
        40 devices: each period starts over, so devices 30..39 never get a
        heartbeat; each cycle counts them as missed and warns.
        """
        self.record()
        self.addDevices(40)
        sender = self.makeSender()
        sends = self.runFor(sender, 30)
        oneCycle = [(float(k), n) for k in range(10) for n in range(3 * k, 3 * k + 3)]
        self.assertEqual(sends, [(t + 10 * c, n) for c in range(3) for t, n in oneCycle])
        self.assertEqual(sender.stats["heartbeats.missed"], 20)
        assert sender.lastCycle is not None
        self.assertEqual((sender.lastCycle.due, sender.lastCycle.missed), (40, 10))


class ResumeTests(SenderTestCase):
    """
    C{resume}: nobody starves past capacity.
    """

    def test_overCapacity(self) -> None:
        """
        40 devices: the second cycle continues with devices 30..39, so all
        40 are reached within ceil(40/30) = 2 cycles; the third starts over.
        """
        self.record()
        self.addDevices(40)
        sender = self.makeSender(pacer=ResumePacer())
        sends = self.runFor(sender, 30)
        first = [(float(k), n) for k in range(10) for n in range(3 * k, 3 * k + 3)]
        second = [(10.0 + k, n) for k in range(4) for n in range(30 + 3 * k, min(33 + 3 * k, 40))]
        third = [(20 + t, n) for t, n in first]
        self.assertEqual(sends, first + second + third)
        self.assertEqual({n for _, n in first + second}, set(range(40)))

    def test_belowCapacity(self) -> None:
        """
        Within capacity, resume behaves as restart.
        """
        self.record()
        self.addDevices(10)
        sends = self.runFor(self.makeSender(pacer=ResumePacer()), 20)
        self.assertEqual([n for _, n in sends], list(range(10)) * 2)


class SpreadTests(SenderTestCase):
    """
    C{spread}: a stable phase per binding.
    """

    def test_onePerPeriod(self) -> None:
        """
        40 devices: each gets exactly one heartbeat per period, always at
        the same offset in the period, 4 per batch.
        """
        self.record()
        self.addDevices(40)
        sends = self.runFor(self.makeSender(pacer=SpreadPacer()), 30)
        for cycle in range(3):
            inCycle = [(t, n) for t, n in sends if 10 * cycle <= t < 10 * cycle + 10]
            self.assertEqual(sorted(n for _, n in inCycle), list(range(40)))
            for t, n in inCycle:
                self.assertEqual(t - 10 * cycle, float(n % 10))
        perBatch = {t: 0 for t, _ in sends}
        for t, _ in sends:
            perBatch[t] += 1
        self.assertEqual(set(perBatch.values()), {4})

    def test_blocksOfConsecutivePhases(self) -> None:
        """
        With a large batch size, runs of consecutive phases share a slot
        (64 at most, a 64th of the batch size at most); every binding is
        still in exactly one slot, the same every cycle, and no slot holds
        more than a batch while the devices fit the capacity.
        """
        self.assertEqual(
            [SpreadPacer.blockSize(n) for n in (3, 63, 64, 640, 6400, 10**6)],
            [1, 1, 1, 10, 64, 64],
        )
        devices = self.addDevices(1000)
        pacer = SpreadPacer()

        def plan() -> list[list[int]]:
            cycle = pacer.startCycle(self.table.natBindings(), 10, 640)
            batches = []
            while (batch := cycle.nextBatch()) is not None:
                batches.append([b.phase for b in batch])
            return batches

        first = plan()
        self.assertEqual(len(first), 10)
        self.assertEqual(first[0][:11], list(range(10)) + [100])
        self.assertEqual(first[1][:10], list(range(10, 20)))
        self.assertEqual(sorted(p for batch in first for p in batch), [d.phase for d in devices])
        self.assertLessEqual(max(len(batch) for batch in first), 640)
        self.assertEqual(plan(), first)


class SendingTests(SenderTestCase):
    """
    What leaves, where from, and what stops it.
    """

    def test_payloadFromRegisteredSocket(self) -> None:
        """
        The payload bytes go to the binding's source address from the
        listener it registered on.
        """
        [device] = self.addDevices(1)
        self.runFor(self.makeSender(payload=FixedPayload(b"PING\r\n")), 1)
        self.assertEqual(self.listener.sent, [(b"PING\r\n", device.source)])

    def test_crlf(self) -> None:
        """
        The C{crlf} payload is a double CRLF.
        """
        self.addDevices(1)
        self.runFor(self.makeSender(payload=FixedPayload(b"\r\n\r\n", "crlf")), 1)
        self.assertEqual([d for d, _ in self.listener.sent], [b"\r\n\r\n"])

    def test_onlyNATed(self) -> None:
        """
        Devices not behind NAT get no heartbeat, unless ping-all.
        """
        self.addDevices(2, nat=False)
        self.runFor(self.makeSender(), 10)
        self.assertEqual(self.listener.sent, [])
        self.runFor(self.makeSender(pingAll=True), 5)
        self.assertEqual(len(self.listener.sent), 2)

    def test_emptyMessageSendsNothing(self) -> None:
        """
        An empty MESSAGE is the master switch: nothing at all is sent.
        """
        self.addDevices(5)
        sender = self.makeSender(payload=FixedPayload(b""))
        self.runFor(sender, 30)
        self.assertEqual(self.listener.sent, [])
        self.assertEqual(sender.stats["cycles"], 0)

    def test_expiredMidCycle(self) -> None:
        """
        A binding that expires while its cycle is under way gets no
        heartbeat, and one unregistered from a batch already planned none.
        """
        self.record()
        devices = self.addDevices(30)
        for device in devices[3:6]:
            device.expiresAt = self.clock.seconds() + 0.5
        sender = self.makeSender()
        sender.startService()
        self.table.remove(devices[6])
        for _ in range(20):
            self.clock.advance(0.5)
        sent = {n for _, n in self.heartbeats()}
        self.assertEqual(sent, set(range(30)) - {3, 4, 5, 6})
        assert sender.lastCycle is not None
        self.assertEqual(sender.lastCycle.skipped, 4)

    def test_sendErrorsCounted(self) -> None:
        """
        Datagrams the kernel refuses are counted, and the cycle goes on.
        """
        self.addDevices(9)
        self.listener.failures = 4
        sender = self.makeSender()
        self.runFor(sender, 5)
        assert sender.current is not None or sender.lastCycle is not None
        self.assertEqual(len(self.listener.sent), 5)
        self.assertEqual(sender.stats["heartbeats.errors"], 4)

    def test_failureNeverKillsLoop(self) -> None:
        """
        An exception inside a cycle is logged, and the next period runs.
        """

        class Flaky(RestartPacer):
            calls = 0

            def startCycle(self, *args: object) -> object:  # type: ignore[override]
                Flaky.calls += 1
                if Flaky.calls == 1:
                    raise RuntimeError("pacer bug")
                return super().startCycle(*args)  # type: ignore[arg-type]

        self.addDevices(3)
        self.runFor(self.makeSender(pacer=Flaky()), 15)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.listener.sent), 3)


class OptionsPayloadTests(SenderTestCase):
    """
    The C{options} payload and the C{liveness} policy.
    """

    def test_wellFormed(self) -> None:
        """
        Each heartbeat is an OPTIONS to the binding's Contact with Via
        branch, From tag, To, Call-ID, CSeq, Max-Forwards, Content-Length.
        """
        [device] = self.addDevices(1)
        self.runFor(self.makeSender(payload=OptionsPayload("tok")), 1)
        [(data, address)] = self.listener.sent
        self.assertEqual(address, device.source)
        message = parseMessage(data)
        assert isinstance(message, Request)
        self.assertEqual((message.method, message.uri), ("OPTIONS", device.uri))
        self.assertTrue((message.header("via") or "").split("branch=")[1].startswith("z9hG4bK"))
        self.assertIn(";tag=", message.header("from") or "")
        self.assertEqual(message.header("to"), f"<{device.uri}>")
        self.assertEqual(message.header("cseq"), "1 OPTIONS")
        self.assertEqual(message.header("max-forwards"), "70")
        self.assertEqual(message.header("content-length"), "0")
        self.assertTrue(message.header("call-id"))

    def answer(self, payload: OptionsPayload, data: bytes, code: int = 200) -> object:
        return payload.responseReceived(self.response(data, code), ("198.51.100.1", 10000))

    def test_responseMatched(self) -> None:
        """
        A response with the heartbeat's Call-ID is matched to its binding;
        an unknown Call-ID to none.
        """
        [device] = self.addDevices(1)
        payload = OptionsPayload("tok")
        self.runFor(self.makeSender(payload=payload), 1)
        [(data, _)] = self.listener.sent
        self.assertIs(self.answer(payload, data), device)
        self.assertIs(self.answer(payload, data, code=404), device)
        self.assertIsNone(self.answer(payload, data.replace(b"Call-ID: tok", b"Call-ID: xx")))
        self.assertIsNone(self.answer(payload, data.replace(b"1 OPTIONS", b"1 REGISTER")))
        for other in self.otherPhases(data, device.phase):
            self.assertIsNone(self.answer(payload, other), other)
        response = self.response(data)
        del response.headers["cseq"]
        self.assertIsNone(payload.responseReceived(response, device.source))

    def rawAnswer(self, data: bytes) -> bytes:
        """
        The 200 OK a phone sends to the heartbeat C{data}, echoing its
        headers as written.
        """
        lines = [b"SIP/2.0 200 OK"]
        for line in data.split(b"\r\n"):
            if line.split(b":")[0] in (b"Via", b"From", b"To", b"Call-ID", b"CSeq"):
                lines.append(line + (b";tag=ph" if line.startswith(b"To:") else b""))
        return b"\r\n".join(lines) + b"\r\nContent-Length: 0\r\n\r\n"

    def otherPhases(self, data: bytes, phase: int) -> tuple[bytes, ...]:
        """
        C{data} with the Call-ID of the heartbeat to C{phase} changed into
        ones no heartbeat was sent with: a leading zero, a digit more, no
        digits, a letter, another host.
        """
        callId = b"tok-%d@natkeep" % (phase,)
        self.assertIn(callId, data)
        return tuple(
            data.replace(callId, changed)
            for changed in (
                b"tok-0%d@natkeep" % (phase,),
                b"tok-%d0@natkeep" % (phase,),
                b"tok-@natkeep",
                b"tok-%dx@natkeep" % (phase,),
                b"tok-%d@natkeeper" % (phase,),
                b"tok-%d@other" % (phase,),
            )
        )

    def test_matchedUnparsed(self) -> None:
        """
        An answer that echoes the Call-ID line as sent is matched from its
        bytes; one whose Call-ID is unknown, whose CSeq is not OPTIONS, or
        that is not a response, is left to the parser.
        """
        [device] = self.addDevices(1)
        payload = OptionsPayload("tok")
        self.assertTrue(verifyObject(IDatagramMatcher, payload))
        self.runFor(self.makeSender(payload=payload), 1)
        [(data, _)] = self.listener.sent
        answer = self.rawAnswer(data)
        self.assertIs(payload.matchDatagram(answer, device.source), device)
        for other in (
            answer.replace(b"Call-ID: tok-", b"Call-ID: tik-"),
            answer.replace(b"1 OPTIONS", b"1 REGISTER"),
            answer.replace(b"SIP/2.0 200", b"SIP/2.0 OK"),
            answer.replace(b"Call-ID:", b"i:"),
        ) + self.otherPhases(answer, device.phase):
            self.assertIsNone(payload.matchDatagram(other, device.source), other)
        self.table.remove(device)
        self.assertIsNone(payload.matchDatagram(answer, device.source))

    def test_answersThroughSocket(self) -> None:
        """
        Through a listening socket, an answer matched unparsed and one in
        compact form (parsed) both count as answered; a stranger's does not.
        """
        [device] = self.addDevices(1)
        payload = OptionsPayload("tok")
        sender = self.makeSender(payload=payload, expiry=LivenessExpiry(3600, 300, misses=3))
        outbox = Outbox(self.clock, None, sender.stats)
        protocol, _ = fakeSocket(
            Registrar(self.table, self.clock, outbox, CapExpiry(3600, 300)),
            outbox,
            self.clock,
            onResponse=sender.responseReceived,
            onResponseDatagram=sender.responseDatagram,
        )
        sender.startService()
        [(data, _)] = self.listener.clear()
        self.assertEqual(sender.unanswered(device), 1)
        protocol.datagramReceived(self.rawAnswer(data), device.source)
        self.assertEqual(sender.unanswered(device), 0)
        protocol.datagramReceived(self.rawAnswer(data).replace(b"Call-ID:", b"i:"), device.source)
        protocol.datagramReceived(
            self.rawAnswer(data).replace(b"Call-ID: tok", b"Call-ID: xx"), device.source
        )
        self.assertEqual(sender.stats["heartbeats.answered"], 2)
        self.assertEqual(sender.stats["responses.received"], 3)

    def test_livenessRemovesSilent(self) -> None:
        """
        With C{liveness}, a device that leaves 2 heartbeats unanswered is
        removed at the third, while one that answers stays.
        """
        silent, talker = self.addDevices(2)
        payload = OptionsPayload("tok")
        policy = LivenessExpiry(3600, 300, misses=2)
        sender = self.makeSender(payload=payload, expiry=policy)
        sender.startService()
        for _ in range(3):
            for data, address in self.listener.clear():
                if address == talker.source:
                    sender.responseReceived(self.response(data), address)
            self.clock.advance(10)
        self.assertEqual(self.table.lookup(silent.aor), [])
        self.assertEqual(self.table.lookup(talker.aor), [talker])
        self.assertEqual(sender.stats["bindings.dead"], 1)
        self.assertEqual(sender.stats["heartbeats.answered"], 3)
        self.assertEqual(sender.unanswered(talker), 1)

    def test_registerStartsCountAgain(self) -> None:
        """
        A REGISTER that changes the binding (new CSeq) proves the device
        alive as an answer does: the unanswered count starts again.
        """
        [device] = self.addDevices(1)
        sender = self.makeSender(
            payload=OptionsPayload("tok"), expiry=LivenessExpiry(3600, 300, misses=2)
        )
        sender.startService()
        self.clock.advance(10)
        self.assertEqual(sender.unanswered(device), 2)
        device.cseq += 1
        self.assertEqual(sender.unanswered(device), 0)
        self.clock.advance(10)
        self.assertEqual(self.table.lookup(device.aor), [device])
        self.assertEqual(sender.unanswered(device), 1)


class UnreachableTests(SenderTestCase):
    """
    ICMP errors drawn by heartbeats count per binding, and the expiry
    policy removes a binding after its limit.
    """

    def test_removedAtLimit(self) -> None:
        """
        With the default limit of 3, a binding whose heartbeats drew three
        ICMP errors is removed at the third; its neighbours are untouched
        and the errors are counted.
        """
        dead, live = self.addDevices(2)
        sender = self.makeSender()
        sender.startService()
        for n in (1, 2):
            sender.unreachable(self.listener, dead.source)
            self.assertEqual(sender.unreachableCount(dead), n)
            self.clock.advance(10)
        self.assertEqual(self.table.lookup(dead.aor), [dead])
        sender.unreachable(self.listener, dead.source)
        self.assertEqual(self.table.lookup(dead.aor), [])
        self.assertEqual(self.table.lookup(live.aor), [live])
        self.assertEqual(sender.stats["heartbeats.unreachable"], 3)
        self.assertEqual(sender.stats["bindings.unreachable"], 1)
        # Gone means no more heartbeats to it.
        self.listener.clear()
        self.clock.advance(10)
        self.assertEqual([a for _, a in self.listener.clear()], [live.source])

    def test_limitZeroKeeps(self) -> None:
        """
        C{unreachableLimit=0} counts the errors and removes nothing.
        """
        [dead] = self.addDevices(1)
        sender = self.makeSender(expiry=CapExpiry(3600, 300, unreachableLimit=0))
        sender.startService()
        for _ in range(10):
            sender.unreachable(self.listener, dead.source)
        self.assertEqual(self.table.lookup(dead.aor), [dead])
        self.assertEqual(sender.unreachableCount(dead), 10)

    def test_registerStartsOver(self) -> None:
        """
        A REGISTER that changes the binding (new CSeq) starts the count
        again, as does an answered heartbeat.
        """
        [device] = self.addDevices(1)
        sender = self.makeSender(payload=OptionsPayload("tok"))
        sender.startService()
        sender.unreachable(self.listener, device.source)
        sender.unreachable(self.listener, device.source)
        device.cseq += 1
        self.assertEqual(sender.unreachableCount(device), 0)
        sender.unreachable(self.listener, device.source)
        sender.unreachable(self.listener, device.source)
        [(data, address)] = self.listener.clear()
        sender.responseReceived(self.response(data), address)
        self.assertEqual(sender.unreachableCount(device), 0)
        sender.unreachable(self.listener, device.source)
        self.assertEqual(self.table.lookup(device.aor), [device])

    def test_onlyRecentHeartbeatsOfThatSocket(self) -> None:
        """
        An error counts only against a binding a recent heartbeat went to
        from the socket that heard the error: one for an address nothing was
        sent to, or from another socket, or before any heartbeat, is not
        counted against a binding.
        """
        [device] = self.addDevices(1)
        sender = self.makeSender()
        sender.unreachable(self.listener, device.source)
        sender.startService()
        sender.unreachable(FakeListener(), device.source)
        sender.unreachable(self.listener, ("198.51.100.1", 9))
        self.assertEqual(sender.unreachableCount(device), 0)
        self.assertEqual(sender.stats["heartbeats.unreachable"], 0)
        # Far more batches later than the window holds, without a
        # heartbeat to it, an error is no longer matched to it.
        self.table.remove(device)
        for n in range(30):
            self.table.add(
                Binding(
                    f"sip:o{n}@example.com",
                    "sip:o@10.0.0.1",
                    "",
                    ("198.51.100.2", n),
                    self.listener,
                    True,
                    START + 3600,
                    "o",
                    1,
                )
            )
        self.clock.advance(10)
        self.assertEqual(len(sender._recent), 2)
        sender.unreachable(self.listener, device.source)
        self.assertEqual(sender.stats["heartbeats.unreachable"], 0)

    def test_deadForgotten(self) -> None:
        """
        Counts of removed bindings are forgotten at the next cycle.
        """
        [device] = self.addDevices(1)
        sender = self.makeSender()
        sender.startService()
        sender.unreachable(self.listener, device.source)
        self.table.remove(device)
        self.clock.advance(10)
        self.assertEqual(sender._unreachable, {})


class WiringTests(SynchronousTestCase):
    """
    Strategies built from settings by name.
    """

    def test_rawFromMessage(self) -> None:
        """
        The C{raw} payload carries the decoded MESSAGE.
        """
        payload = makeStrategy(IPayload, "raw", Settings(message=b"\x00\r\n"))
        self.assertEqual(payload.fixed, b"\x00\r\n")
