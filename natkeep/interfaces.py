"""
The choices: interfaces between natkeep's rooms.

Three strategy interfaces (L{IExpiryPolicy}, L{IPayload}, L{IPacer}) are
chosen by name in config; L{IStrategyMaker} is what a plugin module offers so
that natkeep can find, build and describe them.  L{IListener} is a socket
bindings remember (L{natkeep.bindings.Binding} holds one); L{IBindingStore} is the durable shadow of the binding table.

This module names value types (the binding, the parsed message, the
settings) and no room that provides or uses these contracts.  Methods are
declared without C{self}, as zope.interface wants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection, Iterable, Optional, Sequence

from zope.interface import Attribute, Interface

from natkeep.listener import IListener

if TYPE_CHECKING:
    from natkeep.bindings import Binding, StoredBinding
    from natkeep.config import Settings
    from natkeep.sip import Request, Response, Via

__all__ = [
    "IBindingReader",
    "IBindingStore",
    "ICycle",
    "IDatagramMatcher",
    "IExpiryPolicy",
    "IListener",
    "IPacer",
    "IPayload",
    "ISIPController",
    "IStrategyMaker",
]

# Signatures below are documentation for zope.interface; mypy-zope reads them.
# mypy: disable-error-code="misc"


class ISIPController(Interface):
    """
    What acts on the SIP requests a listening socket receives, once the
    wire has parsed them and found the headers every request must carry
    (the registrar; a relay beside it).
    """

    def requestReceived(
        request: Request,
        via: Via,
        cseq: int,
        source: tuple[str, int],
        listener: IListener,
    ) -> None:
        """
        Act on C{request}, which came from C{source} to C{listener}, and
        answer it (or not, for ACK).

        @param via: its parsed top Via, where answers go.
        @param cseq: its CSeq number; the CSeq method is the request's.
        @raise natkeep.sip.SIPError: for a fault the listener should answer
            with the error's status and reason.
        """


class IExpiryPolicy(Interface):
    """
    What registration time a device is granted, and when a binding dies
    besides its expiry.
    """

    name = Attribute("The name config uses to choose this policy.")

    tracksHeartbeats = Attribute(
        "C{True} when L{alive} must be asked before every heartbeat; "
        "C{False} lets the sender skip the count of unanswered heartbeats."
    )

    def grant(requested: int, nat: bool) -> int:
        """
        The registration time to grant.

        @param requested: seconds the device asked for, never 0 (a removal
            does not reach the policy) and never below the minimum.
        @param nat: whether the device is behind NAT.
        @return: seconds, at least 1.
        """

    def alive(unanswered: int) -> bool:
        """
        Whether a binding is still alive when a heartbeat is due for it.

        @param unanswered: heartbeats sent to the binding in a row that its
            device did not answer, counted by the sender since the last
            answer or REGISTER.
        @return: C{True} to send the heartbeat; C{False} when the binding
            must be removed instead.
        """

    def reachable(unreachable: int) -> bool:
        """
        Whether a binding is still alive after an ICMP error (port, host or
        network unreachable) answered one of its heartbeats.

        @param unreachable: ICMP errors its heartbeats drew, this one
            included, counted by the sender since the binding's last
            REGISTER or answered heartbeat.
        @return: C{False} when the binding must be removed.
        """


class IPayload(Interface):
    """
    What a heartbeat carries, and what to make of an answer.
    """

    name = Attribute("The name config uses to choose this payload.")

    enabled = Attribute(
        "Whether heartbeats are sent at all; C{False} is the master switch "
        "(an empty SS_SIP_NAT_KEEP_ALIVE_MESSAGE)."
    )

    fixed = Attribute(
        "The bytes every heartbeat carries when they are the same for every "
        "binding (the sender then takes its fast path), else C{None}."
    )

    def payloadFor(binding: Binding) -> bytes:
        """
        The datagram to send to C{binding} now.
        """

    def responseReceived(response: Response, source: tuple[str, int]) -> Optional[Binding]:
        """
        A SIP response arrived from C{source}.

        @param response: a L{natkeep.sip.Response}.
        @return: the live binding whose heartbeat it answers, or C{None}.
        """

    def cycleStarted(now: float) -> None:
        """
        A heartbeat cycle begins: a chance to drop state about bindings
        that are gone.
        """


class IDatagramMatcher(Interface):
    """
    An optional companion of L{IPayload}: match an answer to a heartbeat
    from the raw datagram, without parsing it.  A payload that sends many
    heartbeats and gets as many answers provides it, because a full parse
    costs more than the rest of the answer's handling.
    """

    def matchDatagram(data: bytes, source: tuple[str, int]) -> Optional[Binding]:
        """
        A datagram that starts like a SIP response arrived from C{source}.

        @return: the live binding whose heartbeat it answers, when that is
            certain from the bytes alone; else C{None}, and the datagram is
            parsed and given to L{IPayload.responseReceived}.
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
        The sender keeps it a while (to match ICMP errors to heartbeats):
        never change a sequence once handed out.
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

    def heartbeatSize(settings: Settings) -> Optional[int]:
        """
        For a payload: the bytes one heartbeat carries with C{settings}
        (typical, where it varies), for the capacity plan; else C{None}.
        """

    def pace(settings: Settings, devices: int) -> Optional[tuple[int, str]]:
        """
        For a pacing: how many heartbeats one period sends to C{devices}
        devices, and how often one device gets one, in words (for the
        capacity plan); else C{None}.
        """

    def warnings(settings: Settings, devices: Optional[int]) -> Sequence[str]:
        """
        Advice (not errors) about using this strategy with C{settings} for
        C{devices} devices (C{None} when not known).
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
        The stored bindings that are still alive at C{now}, in the order
        they were first stored, as L{natkeep.bindings.StoredBinding}s;
        expired ones are deleted.
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
        Make every buffered write durable.  When it raises, the writes stay
        buffered for the next commit.
        """

    def takeWrites() -> tuple[dict[tuple[str, str], Binding], dict[tuple[str, str], float]]:
        """
        Hand over the buffered writes (puts by key; deleted keys, each with
        the deleting copy's L{Binding.modified}), for a commit made
        elsewhere (on the writer thread), and start a new buffer.
        """

    def restoreWrites(
        puts: dict[tuple[str, str], Binding], deletes: dict[tuple[str, str], float]
    ) -> None:
        """
        Put back writes a failed commit took, under any made since.
        """

    def write(rows: Sequence[tuple[Any, ...]], deletes: dict[tuple[str, str], float]) -> None:
        """
        Delete C{deletes} and upsert C{rows} (L{StoredBinding} field order)
        in one transaction.  A row replaces, and a delete removes, only a
        stored row whose C{modified} is not later than its own: a late
        commit from a worker or node the device has left changes nothing.
        The only call that may run off the reactor thread (one at a time);
        it touches no binding.

        @raise Exception: when nothing of it was written.
        """

    def verify() -> Optional[str]:
        """
        L{None} while the store is the one opened; else what happened to it
        (a database file deleted or replaced underneath), for a log line.
        """

    def reopen() -> None:
        """
        Open the store afresh after L{verify} found it gone; the caller
        writes every binding again.
        """

    def count(now: float, natOnly: bool = False) -> int:
        """
        How many committed bindings are alive at C{now} (only those behind
        NAT with C{natOnly}).
        """

    def reader() -> "IBindingReader":
        """
        A reader of what is committed, on a connection of its own (the
        store's belongs to its writer), for lookups from the reactor's
        thread.  Opening it may fail as opening the store may.
        """

    def close() -> None:
        """
        Commit and release the store.
        """


class IBindingReader(Interface):
    """
    Lookups in a store's committed bindings, beside its writer: what the
    other workers sharing the store have committed shows here.
    """

    def hosts(aor: str, now: float) -> list[str]:
        """
        The source hosts of C{aor}'s committed bindings alive at C{now}.

        @raise Exception: whatever the database raises.
        """

    def close() -> None:
        """
        Release the reader's connection.
        """
