"""
Forward mode (C{register_mode = forward}): natkeep in front of a registrar
that keeps the accounts, as OpenSIPS's mid_registrar is.

A device's REGISTER goes on to the upstream with a Path naming natkeep
(RFC 3327), the device's credentials untouched: the upstream challenges
and authenticates, natkeep holds no passwords.  When the upstream answers
2xx, natkeep's registrar stores the binding as in local mode and answers
the device with the registration natkeep grants.

What keeps the NAT refresh storm off the upstream is L{RegisterForwarder.
absorbs}: a refresh that changes nothing (same Contacts, source, socket and
Call-ID) while the upstream's registration outlasts the one it asks for is
answered by natkeep alone.  The upstream is asked for C{upstream_expires},
so it sees a device about once per that, whatever the device's NAT makes it
do.  The refresh that finds the upstream's registration nearly out goes
upstream, with the device's own credentials, so the upstream can challenge
it as usual.

A REGISTER the upstream does not answer within L{UPSTREAM_TIMEOUT}: a
refresh of a binding natkeep holds, whose upstream registration still runs,
is answered from the binding; anything else gets 503 with Retry-After.
"""

from __future__ import annotations

from typing import Final, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from natkeep.bindings import BindingTable
from natkeep.counts import Counts
from natkeep.interfaces import IListener
from natkeep.outbox import Outbox
from natkeep.registrar import DEFAULT_EXPIRES, Registrar
from natkeep.sip import (
    NameAddr,
    Request,
    Response,
    SIPError,
    Via,
    parseDeltaSeconds,
    parseNameAddr,
    parseURI,
    splitValues,
)

#: Seconds natkeep waits for the upstream's final answer to a REGISTER.
UPSTREAM_TIMEOUT: Final = 5.0

#: Retry-After of the 503 a device gets when the upstream did not answer.
RETRY_AFTER: Final = 30

#: REGISTERs awaiting the upstream at once; past it, 503 at once.
MAX_PENDING: Final = 65536

#: Seconds the upstream's registration must outlast a device's next
#: refresh for natkeep to answer that refresh alone.
MARGIN: Final = 60


class Pending:
    """
    A REGISTER sent upstream, and what natkeep needs to finish it.
    """

    __slots__ = ("request", "via", "cseq", "source", "listener", "timer")

    def __init__(
        self,
        request: Request,
        via: Via,
        cseq: int,
        source: tuple[str, int],
        listener: IListener,
        timer: IDelayedCall,
    ) -> None:
        self.request = request
        self.via = via
        self.cseq = cseq
        self.source = source
        self.listener = listener
        self.timer = timer


def _contacts(message: Request | Response) -> list[NameAddr]:
    return [parseNameAddr(value) for value in splitValues(message.headers.get("contact", []))]


def _expiresOf(contact: NameAddr, default: int) -> int:
    value = contact.param("expires")
    return default if value is None else parseDeltaSeconds(value)


def _defaultExpires(message: Request | Response, default: int) -> int:
    value = message.header("expires")
    return default if value is None else parseDeltaSeconds(value)


class RegisterForwarder:
    """
    The state of forward mode: which REGISTERs await the upstream, and
    whether a refresh needs it at all.

    @ivar upstreamExpires: the registration asked of the upstream.
    """

    def __init__(
        self,
        registrar: Registrar,
        table: BindingTable,
        clock: IReactorTime,
        outbox: Outbox,
        stats: Optional[Counts] = None,
    ) -> None:
        self.registrar = registrar
        self.table = table
        self.clock = clock
        self.outbox = outbox
        self.stats: Counts = Counts() if stats is None else stats
        self.upstreamExpires = 3600
        self.pending: dict[str, Pending] = {}

    def _held(
        self, request: Request, source: tuple[str, int], listener: IListener, ahead: bool
    ) -> bool:
        """
        Whether every Contact of C{request} refreshes a binding natkeep
        holds unchanged (same source, socket and Call-ID, not a removal),
        whose upstream registration runs past the refresh's own expiry and
        L{MARGIN} (C{ahead}) or at least until now.
        """
        try:
            contacts = _contacts(request)
            if not contacts:
                return False
            aor = parseURI(parseNameAddr(request.headers["to"][0]).uri).addressOfRecord()
            default = _defaultExpires(request, DEFAULT_EXPIRES)
            callId = request.headers["call-id"][0]
            now = self.clock.seconds()
            for contact in contacts:
                binding = self.table.get(aor, contact.uri)
                if (
                    binding is None
                    or binding.callId != callId
                    or binding.source != source
                    or binding.listener is not listener
                ):
                    return False
                expires = _expiresOf(contact, default)
                if expires == 0:
                    return False
                needed = now
                if ahead:
                    needed += self.registrar.expiry.grant(expires, binding.nat) + MARGIN
                if binding.upstreamUntil <= needed:
                    return False
        except (SIPError, ValueError, KeyError, IndexError):
            return False
        return True

    def absorbs(self, request: Request, source: tuple[str, int], listener: IListener) -> bool:
        """
        Whether natkeep answers this REGISTER alone: a refresh that changes
        nothing, while the upstream's registration outlasts it.
        """
        if self._held(request, source, listener, ahead=True):
            self.stats["forward.absorbed"] += 1
            return True
        return False

    def upstreamContacts(self, request: Request) -> Optional[list[str]]:
        """
        The Contact header values to send upstream: each asking for
        C{upstream_expires} unless it is a removal (C{None}: send them as
        they are, for a query or C{*}).

        @raise SIPError: 423 when the device asks for less than natkeep's
            C{min_expires}, as the registrar would answer.
        """
        contacts = _contacts(request)
        if not contacts or any(c.uri == "*" for c in contacts):
            return None
        try:
            default = _defaultExpires(request, DEFAULT_EXPIRES)
            values = []
            for contact in contacts:
                expires = _expiresOf(contact, default)
                if 0 < expires < self.registrar.minExpires:
                    raise SIPError(
                        "Interval Too Brief", 423, f"Min-Expires: {self.registrar.minExpires}\r\n"
                    )
                if expires:
                    expires = self.upstreamExpires
                params = "".join(
                    f";{name}" if value is None else f";{name}={value}"
                    for name, value in contact.params
                    if name.lower() != "expires"
                )
                values.append(f"<{contact.uri}>{params};expires={expires}")
        except ValueError:
            return None
        return values

    def sent(
        self,
        branch: str,
        request: Request,
        via: Via,
        cseq: int,
        source: tuple[str, int],
        listener: IListener,
    ) -> None:
        """
        Remember a REGISTER sent upstream under natkeep's C{branch}.  A
        retransmission keeps the first one's deadline.

        @raise SIPError: 503 when too many await the upstream already.
        """
        if branch in self.pending:
            return
        if len(self.pending) >= MAX_PENDING:
            raise SIPError("Upstream Busy", 503, f"Retry-After: {RETRY_AFTER}\r\n")
        timer = self.clock.callLater(UPSTREAM_TIMEOUT, self._timedOut, branch)
        self.pending[branch] = Pending(request, via, cseq, source, listener, timer)
        self.stats["forward.sent"] += 1

    def responseReceived(self, response: Response, branch: str) -> bool:
        """
        The upstream answered the REGISTER sent under C{branch}.  A 2xx is
        finished here: the registrar stores the binding and answers the
        device.  Anything else final is relayed to the device (a 401 to
        answer, a 403).

        @return: whether natkeep took the response (C{False}: relay it).
        """
        pending = self.pending.get(branch)
        if pending is None:
            return False
        if response.code < 200:
            # The upstream's 100 Trying ends at natkeep.
            return True
        del self.pending[branch]
        pending.timer.cancel()
        if response.code >= 300:
            return False
        self._registerLocally(pending)
        self._noteUpstream(pending.request, response)
        return True

    def _noteUpstream(self, request: Request, response: Response) -> None:
        """
        Remember, for each Contact of C{request} natkeep now holds, when the
        upstream's registration of it runs out, as its 2xx says.
        """
        try:
            default = _defaultExpires(response, self.upstreamExpires)
            granted = {c.uri: _expiresOf(c, default) for c in _contacts(response)}
            aor = parseURI(parseNameAddr(request.headers["to"][0]).uri).addressOfRecord()
            contacts = _contacts(request)
        except (SIPError, ValueError, KeyError, IndexError):
            return
        now = self.clock.seconds()
        for contact in contacts:
            binding = self.table.get(aor, contact.uri)
            if binding is not None:
                binding.upstreamUntil = now + granted.get(contact.uri, default)

    def _registerLocally(self, pending: Pending) -> None:
        try:
            self.registrar.requestReceived(
                pending.request, pending.via, pending.cseq, pending.source, pending.listener
            )
        except SIPError as e:
            self.outbox.answer(
                pending.request,
                pending.via,
                pending.source,
                pending.listener,
                e.status,
                e.reason,
                e.extra,
            )

    def _timedOut(self, branch: str) -> None:
        pending = self.pending.pop(branch, None)
        if pending is None:
            return
        self.stats["forward.timeouts"] += 1
        if self._held(pending.request, pending.source, pending.listener, ahead=False):
            # The upstream is away, but its registration still runs.
            self._registerLocally(pending)
            return
        self.outbox.answer(
            pending.request,
            pending.via,
            pending.source,
            pending.listener,
            503,
            "Upstream Unavailable",
            f"Retry-After: {RETRY_AFTER}\r\n",
        )
