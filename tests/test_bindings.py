"""
Tests for L{natkeep.bindings}.
"""

from twisted.trial.unittest import SynchronousTestCase

from natkeep.bindings import DEAD, Binding, BindingTable
from natkeep.testing import FakeListener


def binding(uri: str, expiresAt: float, nat: bool = True, aor: str = "sip:a@h") -> Binding:
    return Binding(aor, uri, "", ("198.51.100.1", 5060), FakeListener(), nat, expiresAt, "c", 1)


class BindingTableTests(SynchronousTestCase):
    """
    The table keeps bindings by AOR and URI, NATed ones in order.
    """

    def test_addLookup(self) -> None:
        """
        Added bindings are found by AOR and URI, with unique phases.
        """
        table = BindingTable()
        a, b = binding("sip:1", 10), binding("sip:2", 10, nat=False)
        table.add(a)
        table.add(b)
        self.assertEqual(table.lookup("sip:a@h"), [a, b])
        self.assertIs(table.get("sip:a@h", "sip:2"), b)
        self.assertEqual(list(table.natBindings()), [a])
        self.assertNotEqual(a.phase, b.phase)
        self.assertEqual(len(table), 2)

    def test_removeMarksDead(self) -> None:
        """
        A removed binding is marked dead and reported.
        """
        removed = []
        table = BindingTable(removed=removed.append)
        a = binding("sip:1", 10)
        table.add(a)
        table.remove(a)
        self.assertEqual(a.expiresAt, DEAD)
        self.assertEqual(a.expiresAt, DEAD)
        self.assertEqual((len(table), table.natCount(), removed), (0, 0, [a]))
        table.remove(a)
        self.assertEqual(removed, [a])

    def test_sweep(self) -> None:
        """
        A sweep removes exactly what has expired by then.
        """
        table = BindingTable()
        early, late = binding("sip:1", 10.5), binding("sip:2", 20)
        table.add(early)
        table.add(late)
        self.assertEqual(table.sweep(10.4), 0)
        self.assertEqual(table.sweep(11), 1)
        self.assertEqual(table.lookup("sip:a@h"), [late])
        self.assertEqual(table.sweep(19.9), 0)
        self.assertEqual(table.sweep(20), 1)

    def test_sweepAfterRefresh(self) -> None:
        """
        A refreshed binding is not swept at its old expiry.
        """
        table = BindingTable()
        a = binding("sip:1", 10)
        table.add(a)
        table.refresh(
            a,
            source=a.source,
            listener=a.listener,
            nat=True,
            expiresAt=30,
            callId="c",
            cseq=2,
            params="",
        )
        self.assertEqual(table.sweep(15), 0)
        self.assertEqual(table.sweep(30), 1)

    def test_sweepLongJump(self) -> None:
        """
        A sweep after a long pause visits only the buckets it holds.
        """
        table = BindingTable()
        table.add(binding("sip:1", 10))
        table.sweep(5)
        self.assertEqual(table.sweep(10**9), 1)

    def test_wheelHoldsOnlyLiveBindings(self) -> None:
        """
        Bindings removed or refreshed leave their old second at once: after
        any churn the wheel holds each live binding exactly once, and
        nothing of the removed ones.
        """
        table = BindingTable()
        live = []
        for n in range(300):
            b = binding(f"sip:{n}", 100 + n % 7)
            table.add(b)
            if n % 3 == 0:
                table.remove(b)
                continue
            if n % 3 == 1:
                table.refresh(
                    b,
                    source=b.source,
                    listener=b.listener,
                    nat=True,
                    expiresAt=500 + n,
                    callId="c",
                    cseq=2,
                    params="",
                )
            live.append(b)
        held = [b for bucket in table._wheel.values() for b in bucket]
        self.assertEqual(sorted(b.uri for b in held), sorted(b.uri for b in live))
        self.assertEqual(table.sweep(1000), len(live))
        self.assertEqual(table._wheel, {})
