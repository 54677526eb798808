"""
A third-party strategy drop-in, as another package would ship it: test
fixtures write this module into a C{natkeep/plugins/} folder of their own.
"""

DROPIN_SOURCE = '''
"""Third-party natkeep strategies, shipped outside natkeep."""
from zope.interface import implementer

from natkeep.interfaces import IExpiryPolicy, IPacer, IPayload
from natkeep.plugins.natkeep_pacing import RestartPacer
from natkeep.strategies import StrategyMaker


@implementer(IExpiryPolicy)
class HalfExpiry:
    name = "half"
    tracksHeartbeats = False

    def grant(self, requested, nat):
        return max(1, requested // 2)

    def alive(self, unanswered):
        return True

    def reachable(self, unreachable):
        return True


@implementer(IPayload)
class ShoutPayload:
    name = "shout"
    enabled = True

    def __init__(self, message):
        self.fixed = message.upper() + b"!"

    def payloadFor(self, binding):
        return self.fixed

    def responseReceived(self, response, source):
        return None

    def cycleStarted(self, now):
        pass


@implementer(IPacer)
class ReversePacer(RestartPacer):
    name = "reverse"

    def startCycle(self, bindings, batches, batchSize):
        return super().startCycle(list(bindings)[::-1], batches, batchSize)


half = StrategyMaker("half", IExpiryPolicy, "grant half of what is asked", lambda s: HalfExpiry())
shout = StrategyMaker("shout", IPayload, "MESSAGE upper-cased", lambda s: ShoutPayload(s.message))
reverse = StrategyMaker(
    "reverse",
    IPacer,
    "newest first",
    lambda s: ReversePacer(),
    pacing=lambda s, n: (min(n, s.capacity), f"newest first, every {s.period} s"),
    advice=lambda s, n: ["reverse pacing is a test drop-in"],
)
'''


def installDropin(testCase, name="thirdparty_strategies"):
    """
    Write the drop-in under a fresh C{natkeep/plugins/} folder (no
    C{__init__.py}, as a third-party package installs it), put that folder
    on the plugin path for the test, and return the folder above
    C{natkeep/} so a subprocess can get it on its C{PYTHONPATH}.
    """
    from twisted.python.filepath import FilePath

    import natkeep.plugins

    top = FilePath(testCase.mktemp())
    folder = top.child("natkeep").child("plugins")
    folder.makedirs()
    folder.child(name + ".py").setContent(DROPIN_SOURCE.encode("utf-8"))
    natkeep.plugins.__path__.append(folder.path)

    def remove():
        natkeep.plugins.__path__.remove(folder.path)
        import sys

        sys.modules.pop("natkeep.plugins." + name, None)

    testCase.addCleanup(remove)
    return top
