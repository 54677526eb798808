"""
Ownership: which bindings this node heartbeats, when several nodes share
one store.

A binding belongs to the listening address it registered on (its
C{listener}), and a node owns the bindings of the addresses it holds now: a
wildcard socket holds its bindings always; a socket bound to one address
holds them while that address is configured on this host.  A standby bound
to a floating address (natkeep binds with C{IP_FREEBIND}, so it starts
before the address comes) leaves the address's bindings in the store until
the address is local; then it restores them and heartbeats resume.  When
the address leaves, its bindings leave the table (not the store).  So no
binding is heartbeated by two nodes at once while one address is on one
host.
"""

from __future__ import annotations

import errno
import socket
from typing import Callable, Iterable

from natkeep.config import isWildcard, parseListenAddress

#: Linux C{IP_FREEBIND}: bind an address not (yet) on this host.
_IP_FREEBIND = 15


def bindAhead(sock: socket.socket, host: str) -> None:
    """
    Let C{sock} bind C{host} before the address is on this host (a
    standby binds a floating address before it comes); a typo is then
    reported as an address not held.  Nothing for a wildcard, or where the
    option is missing.
    """
    if isWildcard(host):
        return
    try:
        sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
    except OSError:
        pass


def isLocal(host: str) -> bool:
    """
    Whether the address C{host} is configured on this host now (a socket
    can bind to it without C{IP_FREEBIND}).
    """
    if isWildcard(host):
        return True
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            # Another failure is no sign the address went away.
            return True
    return True


class Ownership:
    """
    The listening addresses (C{host:port} as configured) this node holds,
    checked again on demand.

    @ivar held: the addresses held at the last check.
    """

    def __init__(self, addresses: Iterable[str], local: Callable[[str], bool] = isLocal) -> None:
        self.addresses = list(addresses)
        self.local = local
        self.held: set[str] = set()

    def check(self) -> tuple[set[str], set[str]]:
        """
        Look again.

        @return: the addresses gained and lost since the last check.
        """
        now = {a for a in self.addresses if self.local(parseListenAddress(a)[0])}
        gained, lost = now - self.held, self.held - now
        self.held = now
        return gained, lost
