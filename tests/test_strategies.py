"""
Tests for the strategy interfaces, the built-ins, and finding strategies by
name through Twisted's plugin system.
"""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natkeep.config import ConfigError, Settings
from natkeep.interfaces import IExpiryPolicy, IPacer, IPayload, IStrategyMaker
from natkeep.plan import printPlan
from natkeep.plugins.natkeep_expiry import CapExpiry, LivenessExpiry
from natkeep.strategies import describeStrategies, installedStrategies, makeStrategy

from .dropin import installDropin

BUILTINS = {
    IExpiryPolicy: {"cap", "fixed", "liveness"},
    IPayload: {"raw", "crlf", "options"},
    IPacer: {"restart", "resume", "spread"},
}


class StrategyTestCase(SynchronousTestCase):
    def assertProvides(self, interface: object, obj: object) -> None:
        """
        C{obj} provides C{interface}, attributes and method signatures
        included.
        """
        self.assertTrue(verifyObject(interface, obj))  # type: ignore[arg-type]


class BuiltinTests(StrategyTestCase):
    """
    natkeep's own strategies are found by name and provide their interface.
    """

    def test_builtinsInstalled(self) -> None:
        """
        Every built-in strategy is installed under its name.
        """
        for interface, names in BUILTINS.items():
            self.assertTrue(names <= set(installedStrategies(interface)))

    def test_verifyObject(self) -> None:
        """
        Each built-in maker provides L{IStrategyMaker}, and what it makes
        provides the strategy interface, with the maker's name.
        """
        settings = Settings()
        for interface in BUILTINS:
            for name, maker in installedStrategies(interface).items():
                self.assertProvides(IStrategyMaker, maker)
                strategy = makeStrategy(interface, name, settings)
                self.assertProvides(interface, strategy)
                self.assertEqual(strategy.name, name)

    def test_unknownName(self) -> None:
        """
        An unknown name is an error listing the installed ones.
        """
        error = self.assertRaises(ConfigError, makeStrategy, IExpiryPolicy, "forever", Settings())
        self.assertEqual(
            str(error), "expiry = 'forever' is invalid: not installed; allowed cap, fixed, liveness"
        )

    def test_describe(self) -> None:
        """
        The listing names every kind and built-in.
        """
        text = describeStrategies()
        for kind in ("payload:", "pacing:", "expiry:"):
            self.assertIn(kind, text)
        for names in BUILTINS.values():
            for name in names:
                self.assertIn(f"  {name} ", text)


class ExpiryPolicyTests(StrategyTestCase):
    """
    The built-in expiry policies grant what their names say.
    """

    def test_cap(self) -> None:
        """
        C{cap} grants the smaller of the request and the configured limit.
        """
        cap = makeStrategy(
            IExpiryPolicy, "cap", Settings(endpointExpire=600, endpointNatExpire=120)
        )
        self.assertEqual((cap.grant(100, True), cap.grant(500, True)), (100, 120))
        self.assertEqual((cap.grant(500, False), cap.grant(5000, False)), (500, 600))

    def test_fixed(self) -> None:
        """
        C{fixed} grants the configured limit whatever was asked.
        """
        fixed = makeStrategy(
            IExpiryPolicy, "fixed", Settings(endpointExpire=600, endpointNatExpire=120)
        )
        self.assertEqual((fixed.grant(60, True), fixed.grant(60, False)), (120, 600))

    def test_liveness(self) -> None:
        """
        C{liveness} keeps a binding while fewer than N heartbeats in a row
        went unanswered; C{cap} keeps it whatever the count.
        """
        policy = LivenessExpiry(3600, 300, misses=2)
        self.assertEqual([policy.alive(n) for n in range(4)], [True, True, False, False])
        self.assertTrue(policy.tracksHeartbeats)
        self.assertEqual([CapExpiry(3600, 300).alive(n) for n in (0, 100)], [True, True])
        self.assertFalse(CapExpiry(3600, 300).tracksHeartbeats)


class DescriptionTests(StrategyTestCase):
    """
    Built-in makers describe their strategies for the capacity plan.
    """

    def test_heartbeatSize(self) -> None:
        """
        Payload makers give the bytes of one heartbeat; others give none.
        """
        settings = Settings(message=b"HELLO")
        sizes = {
            name: maker.heartbeatSize(settings)
            for name, maker in installedStrategies(IPayload).items()
        }
        self.assertEqual((sizes["raw"], sizes["crlf"]), (5, 4))
        self.assertGreater(sizes["options"], 100)
        self.assertIsNone(installedStrategies(IPacer)["restart"].heartbeatSize(settings))

    def test_pace(self) -> None:
        """
        Pacing makers say how many heartbeats a period sends and how often
        a device gets one, past capacity too.
        """
        settings = Settings(period=10, sendInterval=1000, sendOneTime=3)
        pacers = installedStrategies(IPacer)
        self.assertEqual(
            pacers["restart"].pace(settings, 40),
            (30, "every 10 s for the first 30 devices; never for the other 10"),
        )
        self.assertEqual(pacers["resume"].pace(settings, 40), (30, "at least every 20 s"))
        self.assertEqual(pacers["spread"].pace(settings, 40), (40, "every 10 s"))
        self.assertEqual(pacers["restart"].pace(settings, 20), (20, "every 10 s"))
        self.assertIsNone(installedStrategies(IPayload)["raw"].pace(settings, 20))


class ThirdPartyTests(StrategyTestCase):
    """
    A package outside natkeep adds strategies with a drop-in module.
    """

    def test_found(self) -> None:
        """
        Drop-in strategies are found by name beside the built-ins, and
        verify.
        """
        installDropin(self)
        settings = Settings(message=b"hello")
        half = makeStrategy(IExpiryPolicy, "half", settings)
        self.assertProvides(IExpiryPolicy, half)
        self.assertEqual(half.grant(600, True), 300)
        shout = makeStrategy(IPayload, "shout", settings)
        self.assertEqual(shout.fixed, b"HELLO!")
        self.assertProvides(IPacer, makeStrategy(IPacer, "reverse", settings))
        self.assertIn("cap", installedStrategies(IExpiryPolicy))

    def test_describesItselfInPlan(self) -> None:
        """
        The capacity plan lists a drop-in pacing with what its maker says
        of itself, and its advice: no core module needs to know it.
        """
        installDropin(self)
        out = io.StringIO()
        printPlan(Settings(pacing="reverse", period=10), "5", out)
        plan = out.getvalue()
        self.assertIn("   * reverse  newest first, every 10 s\n", plan)
        self.assertIn("  warning: reverse pacing is a test drop-in\n", plan)
        self.assertIn("     restart  every 10 s\n", plan)

    def test_goneWithoutDropin(self) -> None:
        """
        Without the drop-in on the path, its names are unknown.
        """
        self.assertNotIn("half", installedStrategies(IExpiryPolicy))
