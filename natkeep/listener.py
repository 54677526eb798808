"""
L{IListener}, the socket a binding remembers, re-exported by
L{natkeep.interfaces} with the other contracts.

It has a module of its own because the binding table names it while
L{natkeep.interfaces} names the binding, and because a zope.interface
declaration cannot be compiled: the modules mypyc builds import it from here.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

# Signatures below are documentation for zope.interface; mypy-zope reads them.
# mypy: disable-error-code="misc"


class IListener(Interface):
    """
    One listening UDP socket of natkeep: the socket a binding remembers.
    """

    address = Attribute(
        "The listening address as configured, C{host:port} (C{[v6]:port} for "
        "IPv6).  Stored with each binding, so that a restart can find the "
        "same socket again."
    )

    sentBy = Attribute(
        "C{host:port} natkeep writes for this socket in the messages it makes "
        "(Via, Record-Route, From, Contact): routable, never a wildcard.  The "
        "listener's C{advertise} address, else its own bound address, else "
        "the host's address for its family."
    )

    def sentByNow() -> str:
        """
        What to write as this socket's address in a message made for the
        datagram being handled now: the local address it arrived on, for a
        socket bound to a wildcard that learns it; else C{sentBy}.
        """

    def sendto(data: bytes, address: tuple[str, int]) -> object:
        """
        Send one datagram from this socket.

        @raise OSError: when the kernel refuses it (C{EAGAIN}, C{ENOBUFS},
            a queued ICMP error); the caller counts it and goes on.
        """
