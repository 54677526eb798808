"""
The choices: interfaces between natkeep's rooms.

Three strategy interfaces (L{IExpiryPolicy}, L{IPayload}, L{IPacer}) are
chosen by name in config; L{IStrategyMaker} is what a plugin module offers so
that natkeep can find and build them.  L{IListener} is a socket bindings
remember; L{IBindingStore} is the durable shadow of the binding table.

Methods are declared without C{self}, as zope.interface wants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection, Iterable, Optional, Sequence

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from natkeep.bindings import Binding
    from natkeep.config import Settings
    from natkeep.sip import Response
    from natkeep.store import StoredBinding

# Signatures below are documentation for zope.interface; mypy-zope reads them.
# mypy: disable-error-code="misc"


class IListener(Interface):
    """
    One listening UDP socket of the registrar.
    """

    address = Attribute(
        "The listening address as configured, C{host:port} (C{[v6]:port} for "
        "IPv6).  Stored with each binding, so that a restart can find the "
        "same socket again."
    )

    def sendto(data: bytes, address: tuple[str, int]) -> object:
        """
        Send one datagram from this socket.

        @raise OSError: when the kernel refuses it (C{EAGAIN}, C{ENOBUFS},
            a queued ICMP error); the caller counts it and goes on.
        """


class IExpiryPolicy(Interface):
    """
    What registration time a device is granted, and when a binding dies
    besides its expiry.
    """

    name = Attribute("The name config uses to choose this policy.")

    tracksHeartbeats = Attribute(
        "C{True} when L{heartbeatDue} and L{heartbeatAnswered} must be "
        "called for every heartbeat; C{False} lets the sender skip them."
    )

    def grant(requested: int, nat: bool) -> int:
        """
        The registration time to grant.

        @param requested: seconds the device asked for, never 0 (a removal
            does not reach the policy) and never below the minimum.
        @param nat: whether the device is behind NAT.
        @return: seconds, at least 1.
        """

    def heartbeatDue(binding: Binding) -> bool:
        """
        A heartbeat is about to be sent to C{binding}.

        @return: C{True} to send it; C{False} when the binding must be
            removed instead (for example, too many went unanswered).
        """

    def heartbeatAnswered(binding: Binding) -> None:
        """
        The device of C{binding} answered a heartbeat.
        """


class IPayload(Interface):
    """
    What a heartbeat carries, and what to make of an answer.
    """

    name = Attribute("The name config uses to choose this payload.")

    fixed = Attribute(
        "The bytes every heartbeat carries when they are the same for every "
        "binding (the sender then takes its fast path), else C{None}.  "
        "C{b''} means heartbeats are switched off."
    )

    def payloadFor(binding: Binding) -> bytes:
        """
        The datagram to send to C{binding} now.
        """

    def responseReceived(response: Response, source: tuple[str, int]) -> Optional[Binding]:
        """
        A SIP response arrived at the registrar from C{source}.

        @param response: a L{natkeep.sip.Response}.
        @return: the binding whose heartbeat it answers, or C{None}.
        """

    def cycleStarted(now: float) -> None:
        """
        A heartbeat cycle begins: a chance to drop state about bindings
        that are gone.
        """


class ICycle(Interface):
    """
    One heartbeat cycle as a pacer plans it: a sequence of batches, one per
    send interval, that the sender pulls until the period ends.
    """

    due = Attribute("How many bindings this cycle means to reach.")

    def nextBatch() -> Optional[Sequence[Binding]]:
        """
        The bindings to send to at this send interval: a sequence, empty
        when nothing is due now, or C{None} when the cycle has nothing more.
        """

    def unreached() -> int:
        """
        How many of the bindings due were not yet handed out; called when
        the period ends, to count the devices a cycle missed.
        """


class IPacer(Interface):
    """
    Which bindings get a heartbeat when.
    """

    name = Attribute("The name config uses to choose this pacing.")

    def startCycle(bindings: Collection[Binding], batches: int, batchSize: int) -> ICycle:
        """
        Plan the cycle that starts now.

        @param bindings: the bindings heartbeats go to, as a collection in
            registration order; each has a stable C{phase}.
        @param batches: send intervals that fit in one period,
            C{ceil(PERIOD*1000 / SEND_INTERVAL)}.
        @param batchSize: SS_SIP_NAT_KEEP_ALIVE_SEND_ONE_TIME.
        """


class IStrategyMaker(Interface):
    """
    What a plugin module in L{natkeep.plugins} offers: a named strategy and
    how to build it from the settings.
    """

    name = Attribute("The name config uses, unique for its C{provides}.")
    provides = Attribute(
        "The strategy interface this maker's products provide: "
        "L{IExpiryPolicy}, L{IPayload} or L{IPacer}."
    )
    description = Attribute("One line for C{--list-strategies}.")

    def __call__(settings: Settings) -> Any:
        """
        Build the strategy from a L{natkeep.config.Settings}.
        """


class IBindingStore(Interface):
    """
    The durable shadow of the binding table.  Writes are buffered until
    L{commit}; a REGISTER's answer is sent only after the commit that holds
    its changes.
    """

    location = Attribute("Where the bindings are kept, for log lines.")

    def load(now: float) -> Iterable[StoredBinding]:
        """
        The stored bindings that are still alive at C{now}, as an iterable of
        L{natkeep.store.StoredBinding}; expired ones are deleted.
        """

    def put(binding: Binding) -> None:
        """
        Record a new or changed binding in the current transaction.
        """

    def delete(binding: Binding) -> None:
        """
        Record the removal of a binding in the current transaction.
        """

    def pending() -> bool:
        """
        Whether there are writes not yet committed.
        """

    def commit() -> None:
        """
        Make every buffered write durable.
        """

    def count() -> int:
        """
        How many bindings are stored.
        """

    def close() -> None:
        """
        Commit and release the store.
        """
