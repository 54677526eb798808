"""
The state: registered bindings and the table that holds them.

A L{Binding} is one Contact of one address-of-record, with where the device
really is (the source address of its REGISTER) and which of our sockets it
talked to.  The L{BindingTable} is the in-memory view the registrar and the
sender share; it is the fast path, and the durable store is its shadow.

A L{StoredBinding} is the same binding as a store keeps it, with its
socket named by address; both stores and the restore convert through it.

Expiry is kept on a wheel of one-second buckets rather than one timer per
binding: a binding costs one entry in its second's bucket, which it leaves
when it is removed or refreshed, and a sweep touches only the seconds that
have passed.
"""

from __future__ import annotations

import math
from typing import Callable, Final, Iterable, Iterator, NamedTuple, Optional

from natkeep.listener import IListener

#: A binding's C{expiresAt} once it has been removed: earlier than any clock,
#: so that "still alive" is one comparison anywhere.
DEAD: Final = -math.inf


class Binding:
    """
    One registered Contact.

    @ivar aor: the canonical address-of-record.
    @ivar uri: the Contact URI, which identifies the binding within its AOR.
    @ivar params: the Contact header parameters other than C{expires}, as
        written (with their leading C{;}), repeated in the 200 OK.
    @ivar source: C{(host, port)} the REGISTER came from: the public side of
        any NAT, where heartbeats go.
    @ivar listener: the socket the REGISTER arrived on; heartbeats leave
        from it, because the pinhole is bound to that address and port.
    @ivar nat: whether the device was found to be behind NAT.
    @ivar expiresAt: the clock time the binding expires; L{DEAD} once removed.
    @ivar callId: Call-ID of the REGISTER that last changed it.
    @ivar cseq: CSeq number of that REGISTER.
    @ivar phase: a number unique within the table, stable for the binding's
        life; pacers use it to place the binding in a cycle.
    @ivar upstreamUntil: with C{register_mode = forward}, when the
        upstream's registration of this Contact runs out (0: unknown, as
        after a restart, so the next refresh goes upstream).
    @ivar modified: the clock time of the REGISTER that last changed it,
        never going back.  A store writes or deletes a row only for a copy
        at least as new as the row's, so that a late commit of a worker or
        node the device has left cannot undo the one it moved to.
    """

    __slots__ = (
        "aor",
        "uri",
        "params",
        "source",
        "listener",
        "nat",
        "expiresAt",
        "callId",
        "cseq",
        "phase",
        "upstreamUntil",
        "modified",
    )

    def __init__(
        self,
        aor: str,
        uri: str,
        params: str,
        source: tuple[str, int],
        listener: IListener,
        nat: bool,
        expiresAt: float,
        callId: str,
        cseq: int,
        phase: int = 0,
        upstreamUntil: float = 0.0,
        modified: float = 0.0,
    ) -> None:
        self.aor = aor
        self.uri = uri
        self.params = params
        self.source = source
        self.listener = listener
        self.nat = nat
        self.expiresAt = expiresAt
        self.callId = callId
        self.cseq = cseq
        self.phase = phase
        self.upstreamUntil = upstreamUntil
        self.modified = modified

    def __repr__(self) -> str:
        return (
            f"Binding(aor={self.aor!r}, uri={self.uri!r}, source={self.source!r}, "
            f"nat={self.nat!r}, expiresAt={self.expiresAt!r}, phase={self.phase!r})"
        )


def storedRow(
    binding: Binding,
) -> tuple[str, str, str, str, int, str, bool, float, str, int, float]:
    """
    What a store keeps of C{binding}, as it is now, as a plain tuple in
    L{StoredBinding}'s field order: the cheaper form for a store that
    writes every row of a turn.
    """
    host, port = binding.source
    return (
        binding.aor,
        binding.uri,
        binding.params,
        host,
        port,
        binding.listener.address,
        binding.nat,
        binding.expiresAt,
        binding.callId,
        binding.cseq,
        binding.modified,
    )


class StoredBinding(NamedTuple):
    """
    A binding as a store keeps it: the socket by its listening address, the
    source as host and port.  The fields are a store row, in order.
    """

    aor: str
    uri: str
    params: str
    host: str
    port: int
    listener: str
    #: 0 or 1 as a database returns it (a bool when made from a binding).
    nat: int
    expiresAt: float
    callId: str
    cseq: int
    #: L{Binding.modified}; 0 in rows stored before it was kept.
    modified: float = 0.0

    @classmethod
    def of(cls, binding: Binding) -> StoredBinding:
        """
        What a store keeps of C{binding}, as it is now.
        """
        return cls._make(storedRow(binding))

    @property
    def source(self) -> tuple[str, int]:
        """
        Where the device is: C{(host, port)}.
        """
        return (self.host, self.port)

    def restore(self, listener: IListener) -> Binding:
        """
        The live binding again, on C{listener} (the socket of its address).
        """
        return Binding(
            self.aor,
            self.uri,
            self.params,
            (self.host, self.port),
            listener,
            bool(self.nat),
            float(self.expiresAt),
            self.callId,
            self.cseq,
            modified=float(self.modified),
        )


def _ignore(binding: Binding) -> None:
    pass


class BindingTable:
    """
    All bindings, by address-of-record and Contact URI, with the NATed ones
    also kept in registration order for the sender.

    @ivar removed: called with each binding removed, whatever removed it
        (unregister, expiry, liveness), so that the store forgets it too.
    """

    def __init__(self, removed: Optional[Callable[[Binding], None]] = None) -> None:
        self.removed: Callable[[Binding], None] = _ignore if removed is None else removed
        self._aors: dict[str, dict[str, Binding]] = {}
        self._nat: dict[Binding, None] = {}
        self._wheel: dict[int, dict[Binding, None]] = {}
        self._perHost: dict[str, int] = {}
        self._swept: Optional[int] = None
        self._count = 0
        self._nextPhase = 0

    def __len__(self) -> int:
        return self._count

    def natCount(self) -> int:
        """
        How many bindings are behind NAT.
        """
        return len(self._nat)

    def lookup(self, aor: str) -> list[Binding]:
        """
        The bindings of C{aor}, in registration order.
        """
        contacts = self._aors.get(aor)
        return list(contacts.values()) if contacts else []

    def countOf(self, aor: str) -> int:
        """
        How many bindings C{aor} has.
        """
        contacts = self._aors.get(aor)
        return len(contacts) if contacts else 0

    def countFrom(self, host: str) -> int:
        """
        How many bindings were last registered from the source IP C{host}.
        """
        return self._perHost.get(host, 0)

    def get(self, aor: str, uri: str) -> Optional[Binding]:
        """
        The binding of C{uri} under C{aor}, if any.
        """
        contacts = self._aors.get(aor)
        return contacts.get(uri) if contacts else None

    def add(self, binding: Binding) -> None:
        """
        Add a new binding; one for the same AOR and URI must not exist.
        """
        contacts = self._aors.get(binding.aor)
        if contacts is None:
            contacts = self._aors[binding.aor] = {}
        assert binding.uri not in contacts
        contacts[binding.uri] = binding
        binding.phase = self._nextPhase
        self._nextPhase += 1
        self._count += 1
        host = binding.source[0]
        self._perHost[host] = self._perHost.get(host, 0) + 1
        if binding.nat:
            self._nat[binding] = None
        self._schedule(binding)

    def refresh(
        self,
        binding: Binding,
        *,
        source: tuple[str, int],
        listener: IListener,
        nat: bool,
        expiresAt: float,
        callId: str,
        cseq: int,
        params: str,
        modified: float = 0.0,
    ) -> None:
        """
        Update a binding in place with what a new REGISTER said, at clock
        time C{modified}.
        """
        if nat != binding.nat:
            if nat:
                self._nat[binding] = None
            else:
                del self._nat[binding]
        if source[0] != binding.source[0]:
            self._leave(binding.source[0])
            self._perHost[source[0]] = self._perHost.get(source[0], 0) + 1
        binding.source = source
        binding.listener = listener
        binding.nat = nat
        binding.callId = callId
        binding.cseq = cseq
        binding.params = params
        if modified > binding.modified:
            binding.modified = modified
        if math.ceil(expiresAt) != math.ceil(binding.expiresAt):
            self._unschedule(binding)
            binding.expiresAt = expiresAt
            self._schedule(binding)
        else:
            binding.expiresAt = expiresAt

    def remove(self, binding: Binding, durable: bool = True) -> None:
        """
        Remove a binding now.  It is marked dead, so a heartbeat batch that
        still holds it skips it.  With C{durable} false the store is not
        told: the binding leaves this node's table only (another node owns
        it now).
        """
        contacts = self._aors.get(binding.aor)
        if contacts is None or contacts.get(binding.uri) is not binding:
            return
        del contacts[binding.uri]
        if not contacts:
            del self._aors[binding.aor]
        if binding.nat:
            del self._nat[binding]
        self._unschedule(binding)
        self._leave(binding.source[0])
        binding.expiresAt = DEAD
        self._count -= 1
        if durable:
            self.removed(binding)

    def _leave(self, host: str) -> None:
        left = self._perHost[host] - 1
        if left:
            self._perHost[host] = left
        else:
            del self._perHost[host]

    def natBindings(self) -> Iterable[Binding]:
        """
        The NATed bindings in registration order (a live view).
        """
        return self._nat.keys()

    def __iter__(self) -> Iterator[Binding]:
        for contacts in self._aors.values():
            yield from contacts.values()

    def _schedule(self, binding: Binding) -> None:
        second = math.ceil(binding.expiresAt)
        bucket = self._wheel.get(second)
        if bucket is None:
            bucket = self._wheel[second] = {}
        bucket[binding] = None

    def _unschedule(self, binding: Binding) -> None:
        # A binding leaves its bucket at once when it is removed or moves,
        # so the wheel holds exactly the live bindings: a flood of
        # registrations and removals leaves nothing behind.
        second = math.ceil(binding.expiresAt)
        bucket = self._wheel.get(second)
        if bucket is not None:
            bucket.pop(binding, None)
            if not bucket:
                del self._wheel[second]

    def sweep(self, now: float) -> int:
        """
        Remove every binding that has expired by C{now}.

        @return: how many were removed.
        """
        current = math.floor(now)
        if self._swept is None:
            start = min(self._wheel, default=current + 1)
        else:
            start = self._swept + 1
        if current - start > len(self._wheel):
            # A long jump of the clock: visit the buckets, not the seconds.
            seconds: Iterable[int] = sorted(s for s in self._wheel if s <= current)
        else:
            seconds = range(start, current + 1)
        count = 0
        for second in seconds:
            bucket = self._wheel.pop(second, None)
            if not bucket:
                continue
            for binding in bucket:
                # The bucket holds only bindings that expire in its second.
                if DEAD < binding.expiresAt <= now:
                    self.remove(binding)
                    count += 1
        self._swept = current
        return count
