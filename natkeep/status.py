"""
The window: an HTTP status endpoint (off unless C{--status} is given).

C{/status} is JSON for people and scripts: bindings, NATed bindings, the
last heartbeat cycle and every counter.  C{/metrics} is the Prometheus
text its caller renders (L{natkeep.metrics}), and C{/bindings} the admin
resource its caller gives (L{natkeep.admin}); this module knows neither.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

#: Connections the endpoint serves at once; more are closed at once.
MAX_CONNECTIONS = 32

#: Seconds a connection may last in all, however it trickles: a client
#: sending one byte at a time is cut when this runs out.
CONNECTION_DEADLINE = 10.0

#: What the endpoint shows, as plain data made fresh for each request:
#: C{bindings}, C{nat_bindings}, C{settings}, C{last_cycle} and C{counters}.
Snapshot = Callable[[], dict[str, Any]]


#: The Prometheus text exposition format's content type.
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class _Page(Resource):
    isLeaf = True

    def __init__(
        self, snapshot: Snapshot, kind: str, metrics: Optional[Callable[[], bytes]] = None
    ) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.kind = kind
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        if request.postpath:
            # Only the page's own path: /status/anything is not a page.
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        if self.kind == "metrics" and self.metrics is not None:
            request.setHeader(b"content-type", METRICS_TYPE)
            return self.metrics()
        data = self.snapshot()
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(data, indent=2).encode("utf-8") + b"\n"


def statusResource(
    snapshot: Snapshot,
    metrics: Optional[Callable[[], bytes]] = None,
    admin: Optional[Resource] = None,
) -> Resource:
    """
    The resource tree: C{/status}, C{/metrics} when C{metrics} renders
    them, C{/bindings} when C{admin} is given; C{/} is C{/status}.
    """
    root = _Page(snapshot, "status")
    root.isLeaf = False
    root.putChild(b"", _Page(snapshot, "status"))
    root.putChild(b"status", _Page(snapshot, "status"))
    if metrics is not None:
        root.putChild(b"metrics", _Page(snapshot, "metrics", metrics))
    if admin is not None:
        root.putChild(b"bindings", admin)
    return root


class _Deadline(ProtocolWrapper):
    """
    One connection, cut when its deadline passes.
    """

    factory: GuardedFactory
    _call: Optional[IDelayedCall] = None

    def makeConnection(self, transport: Any) -> None:
        self._call = self.factory.clock.callLater(self.factory.deadline, self._expired)
        super().makeConnection(transport)

    def _expired(self) -> None:
        self._call = None
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        super().connectionLost(reason)


class GuardedFactory(WrappingFactory):
    """
    The status endpoint's guard: at most C{limit} connections at once (one
    more is closed as it arrives), each cut C{deadline} seconds after it
    opened.
    """

    protocol = _Deadline

    def __init__(
        self,
        wrapped: Factory[Any],
        clock: IReactorTime,
        limit: int = MAX_CONNECTIONS,
        deadline: float = CONNECTION_DEADLINE,
    ) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.limit = limit
        self.deadline = deadline
        self.refused = 0

    def buildProtocol(self, addr: Optional[IAddress]) -> ProtocolWrapper:
        if len(self.protocols) >= self.limit:
            self.refused += 1
            # No protocol: the transport closes the connection at once.
            return None  # type: ignore[return-value]
        return super().buildProtocol(addr)
