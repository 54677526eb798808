"""
NAT detection: whether a registering device sits behind a NAT router, from
what its REGISTER says against where its datagram really came from.

Three tests, each optional (the C{nat_detect} setting): C{via}, the source
differs from the top Via's sent-by; C{private}, the Contact host is an
address that cannot be reached from outside its own network; C{contact},
the Contact differs from the source.
"""

from __future__ import annotations

import ipaddress
from typing import Final, Optional

#: Every NAT test, in the order the documentation names them.
NAT_TESTS: Final = ("via", "private", "contact")

#: The port a URI or Via without one means (RFC 3261 §19.1.2).
DEFAULT_PORT: Final = 5060

_PRIVATE_NETWORKS: Final = tuple(
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
    )
)


def isPrivateAddress(host: str) -> bool:
    """
    Whether C{host} is a literal address that cannot be reached from outside
    its own network: RFC 1918 private, RFC 6598 shared, link-local or
    unique-local.  Host names are not private.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in _PRIVATE_NETWORKS)


class NatDetector:
    """
    The NAT tests in force.

    @ivar tests: the names of the tests that apply (a subset of
        L{NAT_TESTS}).
    """

    __slots__ = ("tests",)

    def __init__(self, tests: frozenset[str] = frozenset(NAT_TESTS)) -> None:
        self.tests = tests

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NatDetector) and other.tests == self.tests

    def __hash__(self) -> int:
        return hash(self.tests)

    def __repr__(self) -> str:
        return f"NatDetector(tests={sorted(self.tests)!r})"

    def viaDiffers(self, host: str, port: Optional[int], source: tuple[str, int]) -> bool:
        """
        The C{via} test: the top Via's sent-by (C{host}, C{port}) is not
        where the datagram came from.  It holds for every Contact of a
        REGISTER, so it is asked once.
        """
        return "via" in self.tests and (host != source[0] or (port or DEFAULT_PORT) != source[1])

    def contactBehindNat(self, host: str, port: Optional[int], source: tuple[str, int]) -> bool:
        """
        The C{private} and C{contact} tests for one Contact (C{host},
        C{port}).
        """
        tests = self.tests
        if "private" in tests and isPrivateAddress(host):
            return True
        if "contact" in tests:
            return host != source[0] or (port or DEFAULT_PORT) != source[1]
        return False
