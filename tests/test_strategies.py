"""
Tests for the strategy interfaces, the built-ins, and finding strategies by
name through Twisted's plugin system.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natkeep.bindings import Binding
from natkeep.config import ConfigError, Settings
from natkeep.interfaces import IExpiryPolicy, IPacer, IPayload, IStrategyMaker
from natkeep.plugins.natkeep_expiry import LivenessExpiry
from natkeep.strategies import describeStrategies, installedStrategies, makeStrategy
from natkeep.testing import FakeListener

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
        Every built-in of SPEC §4 is installed under its name.
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
    The built-in expiry policies grant as SPEC §4 says.
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
        C{liveness} allows N unanswered heartbeats, then asks for removal;
        an answer starts the count again.
        """
        policy = LivenessExpiry(3600, 300, misses=2)
        b = Binding("a", "u", "", ("h", 1), FakeListener(), True, 100.0, "c", 1)
        self.assertEqual([policy.heartbeatDue(b), policy.heartbeatDue(b)], [True, True])
        policy.heartbeatAnswered(b)
        self.assertEqual(
            [policy.heartbeatDue(b), policy.heartbeatDue(b), policy.heartbeatDue(b)],
            [True, True, False],
        )


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

    def test_goneWithoutDropin(self) -> None:
        """
        Without the drop-in on the path, its names are unknown.
        """
        self.assertNotIn("half", installedStrategies(IExpiryPolicy))
