"""
The NAT lab: natkeep, as a real C{twistd} process, keeps a real NAT mapping
open (Linux namespaces, nftables masquerade, a short conntrack UDP timeout).
Each test builds its own lab and removes it, even when it fails.
"""

from __future__ import annotations

import sqlite3
import time

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .natlab import DEVICE, PUBLIC, ROUTER_WAN, NatLab, labUnavailable, startServer
from .processes import NatkeepProcess

#: The router forgets an idle UDP mapping after this many seconds.
NAT_TIMEOUT = 12
#: The shortest PERIOD natkeep allows, below the NAT timeout.
PERIOD = 10
SIP_PORT = 5060


class NatLabTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        reason = labUnavailable()
        if reason:
            raise SkipTest(reason)
        self.lab = NatLab(self.id().rsplit(".", 1)[-1][-6:], NAT_TIMEOUT)
        self.addCleanup(self.lab.destroy)
        self.lab.build()
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()

    def startNatkeep(self, *args: str) -> NatkeepProcess:
        return startServer(self, self.lab, self.cwd, *args)

    def device(
        self,
        user: str,
        duration: float,
        port: int = 5060,
        public: bool = False,
        answerOptions: bool = False,
    ):  # type: ignore[no-untyped-def]
        ns, host = (self.lab.public, PUBLIC) if public else (self.lab.device, DEVICE)
        agent = self.lab.startDevice(ns, host, user, port, duration, SIP_PORT, answerOptions)
        self.addCleanup(agent.kill)
        agent.waitRegistered()
        return agent

    def storedBindings(self) -> dict[str, tuple[str, int, int]]:
        with sqlite3.connect(self.cwd.child("natkeep.sqlite").path) as db:
            return {
                aor: (host, port, nat)
                for aor, host, port, nat in db.execute("SELECT aor, host, port, nat FROM bindings")
            }


class MappingTests(NatLabTestCase):
    """
    Heartbeats hold a NAT mapping open; without them it dies.
    """

    def test_heldOpen(self) -> None:
        """
        A device behind the NAT registers and then stays silent for more
        than three NAT timeouts, yet receives a heartbeat every PERIOD: the
        heartbeats keep its mapping alive.
        """
        self.startNatkeep("--period", str(PERIOD))
        agent = self.device("held", duration=3.5 * NAT_TIMEOUT + 2)
        times = [e["t"] for e in agent.finish() if e["data"] == "HELLO"]
        self.assertGreaterEqual(len(times), 4, times)
        self.assertLess(times[0], PERIOD + 1)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        self.assertLess(max(gaps), PERIOD + 1, gaps)
        self.assertGreater(times[-1], 3 * NAT_TIMEOUT)
        self.assertEqual(len(self.lab.udpMappings()), 1)
        self.assertEqual(self.storedBindings()["sip:held@natkeep.test"][::2], (ROUTER_WAN, 1))

    def test_controlPeriodBeyondTimeout(self) -> None:
        """
        The control: with PERIOD longer than the NAT timeout, the mapping
        dies before the next heartbeat, which natkeep sends but the device
        never receives.  This is what natkeep prevents.
        """
        process = self.startNatkeep("--period", "30")
        agent = self.device("control", duration=32)
        # The mapping is gone before the second cycle, at 30 s...
        time.sleep(NAT_TIMEOUT + 1)
        self.assertEqual(self.lab.udpMappings(), [])
        # ...which sends the heartbeat that the device, listening past it,
        # never receives.
        process.waitLog("Heartbeat cycle: 1 sent to 1 devices", timeout=30)
        self.assertEqual(agent.finish(), [])


class DetectionTests(NatLabTestCase):
    """
    Devices with and without NAT, and several behind one NAT.
    """

    def test_publicDeviceNoHeartbeat(self) -> None:
        """
        A device on the public side is recognised as not behind NAT and
        gets no heartbeat, while a NATed device in the same run does.
        """
        self.startNatkeep("--period", str(PERIOD))
        public = self.device("public", duration=PERIOD + 2, public=True)
        natted = self.device("natted", duration=PERIOD + 2)
        self.assertEqual(public.finish(), [])
        self.assertGreaterEqual(len(natted.finish()), 1)
        stored = self.storedBindings()
        self.assertEqual(stored["sip:public@natkeep.test"], (PUBLIC, 5060, 0))
        self.assertEqual(stored["sip:natted@natkeep.test"][::2], (ROUTER_WAN, 1))

    def test_twoBehindOneNAT(self) -> None:
        """
        Two devices behind the same NAT share its public address on
        different ports, and each gets its own heartbeats.
        """
        self.startNatkeep("--period", str(PERIOD))
        first = self.device("first", duration=2 * PERIOD + 1, port=5060)
        second = self.device("second", duration=2 * PERIOD + 1, port=5062)
        self.assertGreaterEqual(len(first.finish()), 2)
        self.assertGreaterEqual(len(second.finish()), 2)
        stored = self.storedBindings()
        a, b = stored["sip:first@natkeep.test"], stored["sip:second@natkeep.test"]
        self.assertEqual((a[0], b[0]), (ROUTER_WAN, ROUTER_WAN))
        self.assertNotEqual(a[1], b[1])


class LivenessTests(NatLabTestCase):
    """
    The C{options} payload and the C{liveness} policy through a real NAT.
    """

    def test_answeringStaysSilentRemoved(self) -> None:
        """
        Both devices answer OPTIONS; then one device's NAT mapping is
        killed.  After two unanswered heartbeats it is removed, while the
        one whose mapping lives keeps answering and stays registered.
        """
        self.startNatkeep(
            "--period",
            str(PERIOD),
            "--payload",
            "options",
            "--expiry",
            "liveness",
            "--liveness-misses",
            "2",
        )
        talker = self.device("talker", duration=5 * PERIOD, port=5060, answerOptions=True)
        victim = self.device("victim", duration=5 * PERIOD, port=5062, answerOptions=True)
        victimPort = self.storedBindings()["sip:victim@natkeep.test"][1]
        # Wait for the first OPTIONS to reach the victim, then kill its mapping.
        assert victim.process.stdout is not None
        victim.process.stdout.readline()
        self.lab.run(
            "conntrack",
            "-D",
            "-p",
            "udp",
            "--orig-port-src",
            "5062",
            ns=self.lab.router,
            check=False,
        )
        deadline = time.monotonic() + 4 * PERIOD + 5
        while "sip:victim@natkeep.test" in self.storedBindings() and time.monotonic() < deadline:
            time.sleep(0.5)
        stored = self.storedBindings()
        self.assertNotIn("sip:victim@natkeep.test", stored, f"victim was on port {victimPort}")
        self.assertIn("sip:talker@natkeep.test", stored)
        talker.kill()
        received = [e for e in talker.finish() if e["data"].startswith("OPTIONS")]
        self.assertGreaterEqual(len(received), 3)
