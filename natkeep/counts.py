"""
The service's event counts.
"""

from __future__ import annotations


class Counts(dict[str, int]):
    """
    Event counts by name, zero until first counted, as
    L{collections.Counter} reads them: C{counts["datagrams"] += 1} needs no
    setup, and reading a name never counted gives 0.

    Not a L{collections.Counter}: that class defines C{__delitem__} in
    Python, and a dict subclass that does pays a Python-level call on every
    store, several times the cost of the count itself, and the hot paths
    count several events per datagram.  Only C{__missing__} is defined
    here, so storing a count is the dict's own.
    """

    __slots__ = ()

    def __missing__(self, key: str) -> int:
        return 0
