"""
In-memory fakes for testing natkeep and code built on it: a listener that
records what it sends, a store that keeps bindings in a dict (it passes the
same contract tests as the real stores), and builders for the SIP requests
a phone sends.
"""

from __future__ import annotations

import errno
from typing import Callable, Iterable, Optional, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import FakeDatagramTransport
from zope.interface import implementer

from natkeep.bindings import StoredBinding
from natkeep.counts import Counts
from natkeep.interfaces import IBindingReader, IBindingStore, IListener, ISIPController
from natkeep.outbox import Outbox
from natkeep.protocol import SIPProtocol
from natkeep.sip import Response
from natkeep.store import Deletes, Row, WriteBuffer


@implementer(IListener)
@attrs.define
class FakeListener:
    """
    A listener that records each datagram instead of sending it.

    @ivar sent: C{(data, address)} pairs, in order.
    @ivar failures: how many of the next sends raise C{ENOBUFS}.
    @ivar clock: when set, each send is also recorded in C{timeline} as
        C{(time, data, address)}.
    """

    address: str = "127.0.0.1:5060"
    sentBy: str = "127.0.0.1:5060"
    sent: list[tuple[bytes, tuple[str, int]]] = attrs.field(factory=list)
    failures: int = 0
    clock: Optional[IReactorTime] = None
    timeline: list[tuple[float, bytes, tuple[str, int]]] = attrs.field(factory=list)

    def sentByNow(self) -> str:
        return self.sentBy

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOBUFS, "No buffer space available")
        self.sent.append((data, address))
        if self.clock is not None:
            self.timeline.append((self.clock.seconds(), data, address))
        return len(data)

    def clear(self) -> list[tuple[bytes, tuple[str, int]]]:
        """
        Return what was sent so far and forget it.
        """
        sent, self.sent = self.sent, []
        return sent


@implementer(IBindingStore)
class MemoryStore(WriteBuffer):
    """
    A store that keeps committed bindings in a dict.

    @ivar rows: the committed bindings by C{(aor, uri)}, in the order they
        were first stored; pass the rows of a closed store to open it again.
    @ivar commits: how many commits were made.
    @ivar failures: how many of the next commits raise L{OSError}, keeping
        their writes pending.
    """

    location = "memory"

    def __init__(self, rows: Optional[dict[tuple[str, str], StoredBinding]] = None) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], StoredBinding] = {} if rows is None else rows
        self.commits = 0
        self.failures = 0

    def load(self, now: float) -> Iterable[StoredBinding]:
        for key in [k for k, row in self.rows.items() if row.expiresAt <= now]:
            del self.rows[key]
        return list(self.rows.values())

    def write(self, rows: Sequence[Row], deletes: Deletes) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("commit failed")
        # Each only over an older row, as the real stores do.
        for key, modified in deletes.items():
            stored = self.rows.get(key)
            if stored is not None and stored.modified <= modified:
                del self.rows[key]
        for row in rows:
            key = (row[0], row[1])
            stored = self.rows.get(key)
            if stored is None or row[10] >= stored.modified:
                self.rows[key] = StoredBinding._make(row)
        self.commits += 1

    def verify(self) -> Optional[str]:
        return None

    def reopen(self) -> None:
        pass

    def count(self, now: float, natOnly: bool = False) -> int:
        return sum(
            1 for row in self.rows.values() if row.expiresAt > now and (row.nat or not natOnly)
        )

    def reader(self) -> MemoryReader:
        return MemoryReader(self.rows)

    def close(self) -> None:
        self.commit()


@implementer(IBindingReader)
class MemoryReader:
    """
    Lookups in a L{MemoryStore}'s committed rows.
    """

    def __init__(self, rows: dict[tuple[str, str], StoredBinding]) -> None:
        self.rows = rows

    def hosts(self, aor: str, now: float) -> list[str]:
        return [row.host for row in self.rows.values() if row.aor == aor and row.expiresAt > now]

    def close(self) -> None:
        pass


def fakeSocket(
    controller: ISIPController,
    outbox: Outbox,
    clock: IReactorTime,
    stats: Optional[Counts] = None,
    onResponse: Optional[Callable[[Response, tuple[str, int]], None]] = None,
    address: str = "127.0.0.1:5060",
    onResponseDatagram: Optional[Callable[[bytes, tuple[str, int]], bool]] = None,
) -> tuple[SIPProtocol, FakeDatagramTransport]:
    """
    A listening protocol for C{controller} on an in-memory transport, which
    keeps what is sent in its C{written} list of C{(data, address)}.
    """
    protocol = SIPProtocol(
        address,
        controller,
        outbox,
        clock,
        outbox.stats if stats is None else stats,
        onResponse,
        onResponseDatagram,
    )
    transport = FakeDatagramTransport()  # type: ignore[no-untyped-call]
    protocol.makeConnection(transport)
    return protocol, transport


def register(
    user: str = "1001",
    domain: str = "example.com",
    *,
    contacts: Iterable[str] = ("<sip:1001@192.168.1.20:5060>",),
    via: str = "SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK-1;rport",
    callId: str = "call-1@phone",
    cseq: int = 1,
    expires: Optional[int] = None,
    extra: Iterable[str] = (),
) -> bytes:
    """
    A REGISTER as a phone sends it.  Pass C{contacts=()} for a query.
    """
    lines = [
        f"REGISTER sip:{domain} SIP/2.0",
        f"Via: {via}",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{domain}>;tag=f{cseq}",
        f"To: <sip:{user}@{domain}>",
        f"Call-ID: {callId}",
        f"CSeq: {cseq} REGISTER",
    ]
    lines.extend(f"Contact: {c}" for c in contacts)
    if expires is not None:
        lines.append(f"Expires: {expires}")
    lines.extend(extra)
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def request(method: str, *, callId: str = "call-9@phone", cseq: int = 1) -> bytes:
    """
    A minimal well-formed request of any method.
    """
    return (
        f"{method} sip:natkeep@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK-{method}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:1001@example.com>;tag=x\r\n"
        "To: <sip:natkeep@example.com>\r\n"
        f"Call-ID: {callId}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode("utf-8")


def sippCounts(output: str) -> tuple[int, int]:
    """
    The successful and failed call totals from sipp's final statistics
    (-1 each when sipp printed none).
    """
    successful = failed = -1
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if cells[0] == "Successful call":
            successful = int(cells[-1])
        elif cells[0] == "Failed call":
            failed = int(cells[-1])
    return successful, failed
