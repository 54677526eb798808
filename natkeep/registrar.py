"""
The registrar: what natkeep does with a request for itself (RFC 3261 §10.3
REGISTER, and OPTIONS).

L{Registrar} is a controller: a listening socket (L{natkeep.protocol})
hands it requests already parsed and checked, and it answers through the
L{natkeep.outbox.Outbox}, which holds each answer until its changes are
committed.  It is independent of sockets and of the global reactor.
"""

from __future__ import annotations

import email.utils
import math
from typing import Callable, Final, Optional

from twisted.internet.interfaces import IReactorTime
from zope.interface import classImplements

from natkeep.bindings import Binding, BindingTable
from natkeep.config import Settings
from natkeep.counts import Counts
from natkeep.guard import BindingCaps
from natkeep.interfaces import IBindingStore, IExpiryPolicy, IListener, ISIPController
from natkeep.nat import NatDetector
from natkeep.outbox import Outbox
from natkeep.sip import (
    NameAddr,
    Request,
    SIPError,
    Via,
    parseDeltaSeconds,
    parseNameAddr,
    parseURI,
    renderParams,
    splitValues,
)
from natkeep.strategies import Strategies

ALLOW: Final = "REGISTER, OPTIONS"

#: RFC 3261 §10.2.1.1: the registrar's default when the request says nothing.
DEFAULT_EXPIRES: Final = 3600

#: Bounds that keep every 200 OK, which lists all of an AOR's Contacts,
#: within one datagram: at most this many Contacts in one REGISTER (400
#: past it), bindings per AOR (the most C{max_contacts} may say), and characters of one Contact's URI
#: and parameters (400).  With a request of at most 16 KiB echoed, a 200 OK
#: stays under 26 KiB, well inside UDP's 65 507 bytes.
MAX_CONTACTS_PER_REQUEST: Final = 16
MAX_CONTACTS_PER_AOR: Final = 16
MAX_CONTACT_LENGTH: Final = 512


class Registrar:
    """
    The registrar's logic, shared by every listening socket.

    @ivar expiry: the expiry policy, asked what registration time to grant.
    @ivar nat: the NAT tests in force.
    @ivar stats: counters by name, for logs and the status endpoint.
    """

    def __init__(
        self,
        table: BindingTable,
        clock: IReactorTime,
        outbox: Outbox,
        expiry: IExpiryPolicy,
        *,
        minExpires: int = 60,
        nat: NatDetector = NatDetector(),
        store: Optional[IBindingStore] = None,
        stats: Optional[Counts] = None,
        caps: Optional[BindingCaps] = None,
    ) -> None:
        self.table = table
        self.caps = BindingCaps() if caps is None else caps
        self.clock = clock
        self.outbox = outbox
        self.expiry = expiry
        self.minExpires = minExpires
        self.nat = nat
        self.store = store
        self.stats: Counts = outbox.stats if stats is None else stats
        self._dateSecond = -1
        self._date = ""
        #: Told of each binding a REGISTER adds (with several workers: the
        #: others drop their copy of a device that moved here).
        self.onAdded: Optional[Callable[[Binding], None]] = None

    def configure(self, settings: Settings, strategies: Strategies) -> None:
        """
        Take the expiry policy, the shortest registration and the NAT tests
        of C{settings}.
        """
        self.expiry = strategies.expiry
        self.minExpires = settings.minExpires
        self.nat = NatDetector(settings.natDetect)
        self.caps.configure(
            settings.maxContacts,
            settings.contactsFull == "replace",
            settings.maxBindingsPerSource,
            settings.maxBindings,
            settings.rateExempt,
        )

    def requestReceived(
        self,
        request: Request,
        via: Via,
        cseq: int,
        source: tuple[str, int],
        listener: IListener,
    ) -> None:
        method = request.method
        if method == "REGISTER":
            self.stats["requests.REGISTER"] += 1
            self._register(request, via, cseq, source, listener)
        elif method == "OPTIONS":
            self.stats["requests.OPTIONS"] += 1
            self.outbox.answer(
                request,
                via,
                source,
                listener,
                200,
                "OK",
                f"Allow: {ALLOW}\r\nAccept: application/sdp\r\n",
            )
        elif method == "ACK":
            # Nothing answers an ACK (RFC 3261 §17.2.1).
            self.stats["requests.ACK"] += 1
        else:
            self.stats["requests.other"] += 1
            self.outbox.answer(
                request, via, source, listener, 405, "Method Not Allowed", f"Allow: {ALLOW}\r\n"
            )

    # REGISTER (RFC 3261 §10.3)

    def _register(
        self,
        request: Request,
        via: Via,
        cseq: int,
        source: tuple[str, int],
        listener: IListener,
    ) -> None:
        if self.outbox.congested():
            # The store is far behind: turn away rather than queue.
            raise SIPError("Store Busy", 503, "Retry-After: 5\r\n")
        headers = request.headers
        to = parseNameAddr(headers["to"][0])
        try:
            aor = parseURI(to.uri).addressOfRecord()
        except SIPError:
            raise SIPError("Invalid To URI")
        callId = headers["call-id"][0]
        if not callId:
            raise SIPError("Invalid Call-ID")
        defaultExpires = DEFAULT_EXPIRES
        expiresHeader = request.header("expires")
        if expiresHeader is not None:
            try:
                defaultExpires = parseDeltaSeconds(expiresHeader)
            except ValueError:
                raise SIPError("Invalid Expires")
        now = self.clock.seconds()
        contactValues = headers.get("contact")
        if not contactValues:
            self._registered(request, via, aor, source, listener, now)
            return
        contacts = [parseNameAddr(value) for value in splitValues(contactValues)]
        wildcard = False
        for contact in contacts:
            if contact.uri == "*":
                wildcard = True
        if wildcard:
            if len(contacts) != 1 or expiresHeader is None or defaultExpires != 0:
                raise SIPError("Invalid Wildcard Contact")
            self._removeAll(aor, callId, cseq)
            self._registered(request, via, aor, source, listener, now)
            return
        if len(contacts) > MAX_CONTACTS_PER_REQUEST:
            raise SIPError("Too Many Contacts")
        changes: dict[str, tuple[NameAddr, int, bool, Optional[Binding]]] = {}
        detector = self.nat
        viaNat = detector.viaDiffers(via.host, via.port, source)
        for contact in contacts:
            try:
                uri = parseURI(contact.uri)
            except SIPError:
                raise SIPError("Invalid Contact URI")
            expires = defaultExpires
            param = contact.param("expires")
            if param is not None:
                try:
                    expires = parseDeltaSeconds(param)
                except ValueError:
                    raise SIPError("Invalid Contact Expires")
            if 0 < expires < self.minExpires:
                self.outbox.answer(
                    request,
                    via,
                    source,
                    listener,
                    423,
                    "Interval Too Brief",
                    f"Min-Expires: {self.minExpires}\r\n",
                )
                return
            existing = self.table.get(aor, contact.uri)
            if existing is not None and existing.callId == callId and cseq < existing.cseq:
                # RFC 3261 §10.3 step 7: an older request must not undo a
                # newer one.  An equal CSeq is a retransmission, answered
                # again below as if new.
                raise SIPError("Out of Order CSeq")
            nat = viaNat or detector.contactBehindNat(uri.host, uri.port, source)
            changes[contact.uri] = (contact, expires, nat, existing)
        # The same Contact twice in one request: the last one says it.
        for binding in self._checkFits(aor, source[0], changes):
            self.table.remove(binding)
            self.stats["bindings.replaced"] += 1
        for contact, expires, nat, existing in changes.values():
            if expires == 0:
                if existing is not None:
                    self.table.remove(existing)
                    self._forget(existing)
                continue
            granted = self.expiry.grant(expires, nat)
            params = renderParams(contact.params, skip=("expires",))
            if existing is None:
                binding = Binding(
                    aor,
                    contact.uri,
                    params,
                    source,
                    listener,
                    nat,
                    now + granted,
                    callId,
                    cseq,
                    modified=now,
                )
                self.table.add(binding)
                self.stats["bindings.added"] += 1
                if self.onAdded is not None:
                    self.onAdded(binding)
            else:
                binding = existing
                self.table.refresh(
                    binding,
                    source=source,
                    listener=listener,
                    nat=nat,
                    expiresAt=now + granted,
                    callId=callId,
                    cseq=cseq,
                    params=params,
                    modified=now,
                )
                self.stats["bindings.refreshed"] += 1
            if self.store is not None:
                self.store.put(binding)
        self._registered(request, via, aor, source, listener, now)

    def _checkFits(
        self,
        aor: str,
        host: str,
        changes: dict[str, tuple[NameAddr, int, bool, Optional[Binding]]],
    ) -> list[Binding]:
        """
        Refuse changes that would break a cap: a Contact too long for the
        AOR's 200 OK to fit a datagram, more bindings than the AOR, the
        source IP C{host} or the whole table may hold.

        @return: the AOR's bindings the changes replace (the AOR is full,
            and the caps say to replace), nearest to expiry first.
        @raise SIPError: 400, 403 or 503, naming the limit.
        """
        caps = self.caps
        added = 0
        fromHost = 0
        for contact, expires, _, existing in changes.values():
            if expires == 0:
                if existing is not None:
                    added -= 1
                    fromHost -= existing.source[0] == host
                continue
            length = len(contact.uri)
            if contact.params:
                length += sum(len(k) + len(v or "") + 2 for k, v in contact.params)
            if length > MAX_CONTACT_LENGTH:
                raise SIPError("Contact Too Long")
            if existing is None:
                added += 1
                fromHost += 1
            elif existing.source[0] != host:
                fromHost += 1
        table = self.table
        replaced: list[Binding] = []
        if added > 0:
            over = table.countOf(aor) + added - min(caps.perAOR, MAX_CONTACTS_PER_AOR)
            if over > 0:
                kept = [b for b in table.lookup(aor) if b.uri not in changes]
                if not caps.replace or over > len(kept):
                    self.stats["refused.max-contacts"] += 1
                    raise SIPError("Too Many Contacts For AOR", 403)
                kept.sort(key=lambda b: b.expiresAt)
                replaced = kept[:over]
                fromHost -= sum(b.source[0] == host for b in replaced)
        if (
            fromHost > 0
            and caps.perSource
            and table.countFrom(host) + fromHost > caps.perSource
            and caps.countsSource(host)
        ):
            self.stats["refused.per-source"] += 1
            raise SIPError("Too Many Bindings From Source", 403)
        grows = added - len(replaced)
        if grows > 0 and caps.total and len(table) + grows > caps.total:
            self.stats["refused.registrar-full"] += 1
            raise SIPError("Registrar Full", 503, f"Retry-After: {caps.retryAfter}\r\n")
        return replaced

    def _removeAll(self, aor: str, callId: str, cseq: int) -> None:
        bindings = self.table.lookup(aor)
        for binding in bindings:
            if binding.callId == callId and cseq < binding.cseq:
                raise SIPError("Out of Order CSeq")
        for binding in bindings:
            self.table.remove(binding)
            self._forget(binding)

    def _forget(self, binding: Binding) -> None:
        # The table tells the store; this only counts.
        self.stats["bindings.removed"] += 1

    def _registered(
        self,
        request: Request,
        via: Via,
        aor: str,
        source: tuple[str, int],
        listener: IListener,
        now: float,
    ) -> None:
        contacts = "".join(
            [
                f"Contact: <{b.uri}>{b.params};expires={max(1, math.ceil(b.expiresAt - now))}\r\n"
                for b in self.table.lookup(aor)
                if b.expiresAt > now
            ]
        )
        self.outbox.answer(
            request, via, source, listener, 200, "OK", f"{contacts}Date: {self._httpDate(now)}\r\n"
        )

    def _httpDate(self, now: float) -> str:
        second = int(now)
        if second != self._dateSecond:
            self._dateSecond = second
            self._date = email.utils.formatdate(second, usegmt=True)
        return self._date


# A zope class decorator would make the class a plain Python one when
# compiled; declared here, the class stays native.
classImplements(Registrar, ISIPController)
