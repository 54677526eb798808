"""
The edge: natkeep relays SIP between its devices and an upstream
softswitch, as an RFC 3261 §16.11 stateless proxy.

A NAT that filters by address and port lets in only what comes from the
socket a device's heartbeats leave from, so every request to a device must
leave from the listener it registered on.  L{Relay} is the controller in
front of the registrar: REGISTER and requests for natkeep itself go to the
registrar, anything else is proxied.

- A request for an AOR natkeep serves goes to that AOR's binding: the
  Request-URI becomes the Contact and the datagram goes to the binding's
  public address from its listener.  A request from a registered device for
  anything else goes to C{upstream}.  Other sources (not a device, not the
  upstream, not C{trusted}) are refused with 403.
- Dialog-creating requests get a Record-Route naming natkeep, whose user
  part is a signed flow token: the device's public address and listener.
  In-dialog requests come back with it as their Route, and the token says
  where the device is, whatever its Contact claims (RFC 5626's edge proxy
  idea, without the extension).
- natkeep's own Via carries a branch that hashes the request's previous top
  Via with a per-run secret: a response is forwarded only when that hash
  holds (it answers a request natkeep relayed), to the next Via's
  C{received}/C{rport}, from the listener the request came in on.

Bodies pass untouched; media is not relayed here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import socket
import struct
import zlib
from typing import Any, Callable, Final, NamedTuple, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplements

from natkeep.bindings import Binding, BindingTable
from natkeep.config import Settings, isWildcard
from natkeep.counts import Counts
from natkeep.digest import CredentialsFile, Digest
from natkeep.forward import RegisterForwarder
from natkeep.guard import SourceFilter
from natkeep.handoff import Handoff
from natkeep.interfaces import IListener, ISIPController
from natkeep.media import MediaProxy, NGClient
from natkeep.outbox import Outbox
from natkeep.registrar import Registrar
from natkeep.sip import (
    URI,
    Request,
    Response,
    SIPError,
    Via,
    findParam,
    parseNameAddr,
    parseParams,
    parseURI,
    parseVia,
    renderMessage,
    splitHostPort,
    splitTopVia,
    splitValues,
    withoutTopVia,
)

log = Logger(namespace="natkeep.relay")

#: The branch prefix of natkeep's relay Via (RFC 3261 magic cookie first).
BRANCH_PREFIX: Final = "z9hG4bK-nk"

#: How natkeep's relay Via writes its branch parameter.
_BRANCH_PARAM: Final = "branch=" + BRANCH_PREFIX

#: What natkeep's relay Via holds, and so the first Via of a response that
#: answers a request it relayed: other responses are told apart by it
#: before their header block is read.
_BRANCH_MARK: Final = ";" + _BRANCH_PARAM

#: The user part prefix of a flow token in natkeep's Record-Route.
FLOW_PREFIX: Final = "nkf-"

#: The Max-Forwards a request without one is given (RFC 3261 §16.6 step 3).
MAX_FORWARDS: Final = 70

#: The most addresses natkeep counts as its own (its sockets' bound,
#: advertised and learnt local addresses).
_MAX_OWN: Final = 256


#: Methods that get no Record-Route: they create no dialog.
_NO_RECORD_ROUTE: Final = frozenset({"ACK", "CANCEL", "REGISTER"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FlowTokens:
    """
    Signed tokens naming a device's flow: the listener it registered on
    and its public address.  A token this run did not sign decodes to
    nothing, so a Route cannot aim natkeep at an address of someone's
    choosing.

    Every call to or from a device carries the same token, so the tokens
    made and the tokens verified are remembered (at most
    L{_TOKENS_REMEMBERED} of each; only signed ones are).
    """

    def __init__(self, secret: bytes) -> None:
        self.secret = secret[:64]
        self._made: dict[tuple[int, tuple[str, int]], str] = {}
        self._verified: dict[str, tuple[int, tuple[str, int]]] = {}

    def _mac(self, data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=8, key=self.secret).digest()

    def encode(self, listener: int, address: tuple[str, int]) -> str:
        key = (listener, address)
        token = self._made.get(key)
        if token is None:
            host = address[0]
            packed = struct.pack("!BH", listener, address[1]) + socket.inet_pton(
                _family(host), host
            )
            token = FLOW_PREFIX + _b64(packed + self._mac(packed))
            _keepBounded(self._made, key, token)
        return token

    def decode(self, token: str) -> Optional[tuple[int, tuple[str, int]]]:
        known = self._verified.get(token)
        if known is not None:
            return known
        if not token.startswith(FLOW_PREFIX):
            return None
        try:
            data = _unb64(token[len(FLOW_PREFIX) :])
        except ValueError:
            return None
        packed, mac = data[:-8], data[-8:]
        if len(packed) not in (7, 19) or not hmac.compare_digest(mac, self._mac(packed)):
            return None
        listener, port = struct.unpack("!BH", packed[:3])
        family = socket.AF_INET if len(packed) == 7 else socket.AF_INET6
        flow = (listener, (socket.inet_ntop(family, packed[3:]), port))
        _keepBounded(self._verified, token, flow)
        return flow


#: The most flow tokens L{FlowTokens} remembers made, and verified.
_TOKENS_REMEMBERED: Final = 4096


#: The most branch hashes a relay remembers: about two seconds of relaying
#: at 1 500 calls a second, each call's INVITE, ACK and BYE (about 500
#: bytes each with the Via it is kept by: 4 MB at most).
_BRANCHES_REMEMBERED: Final = 8192


def _keepBounded(memory: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memory) >= _TOKENS_REMEMBERED:
        memory.clear()
    memory[key] = value


class RelayPlan(NamedTuple):
    """
    The parts of the relay's settings that take I/O to make (L{Relay.prepare}).
    """

    upstream: Optional[tuple[str, int]]
    digest: Optional[Digest]


def makeDigest(
    settings: Settings,
    clock: IReactorTime,
    stats: Counts,
    previous: Optional[Digest] = None,
) -> Optional[Digest]:
    """
    The digest checker C{settings} ask for, its credentials file read now
    (nonces a previous checker issued stay good).

    @raise natkeep.config.ConfigError: naming the credentials file's fault.
    """
    from natkeep.config import ConfigError

    if settings.auth == "off" or settings.credentials is None:
        return None
    try:
        credentials = CredentialsFile(settings.credentials)
    except ValueError as e:
        raise ConfigError(f"credentials = {settings.credentials!r} is invalid: {e}")
    digest = Digest(clock, credentials, settings.authAlgorithms, settings.authRealm, stats)
    if previous is not None:
        digest.adopt(previous)
    return digest


def resolveUpstream(settings: Settings) -> Optional[tuple[str, int]]:
    """
    The address of C{settings.upstream}, its host name resolved once (at
    start and on reload, never per request).

    @raise natkeep.config.ConfigError: when it cannot be resolved.
    """
    from natkeep.config import ConfigError

    if settings.upstream is None:
        return None
    uri = parseURI(settings.upstream)
    host = uri.host
    if not _isAddress(host):
        try:
            host = str(socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][4][0])
        except OSError as e:
            raise ConfigError(f"upstream = {settings.upstream!r} is invalid: {e}")
    return host, uri.port or 5060


def _isAddress(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Relay:
    """
    The controller in front of the registrar: it serves the domain check,
    hands the registrar what is for natkeep, and proxies the rest.

    @ivar listeners: every listening socket, in C{listen} order (flow tokens
        and Via name them by position).
    @ivar upstream: C{(host, port)} requests from devices go to, or L{None}
        when relaying is off.
    @ivar domains: the domains served; empty serves any.
    @ivar trusted: networks whose requests are relayed besides devices and
        the upstream.
    """

    def __init__(
        self,
        registrar: ISIPController,
        table: BindingTable,
        clock: IReactorTime,
        outbox: Outbox,
        listeners: Sequence[IListener],
        stats: Optional[Counts] = None,
        secret: Optional[bytes] = None,
    ) -> None:
        self.registrar = registrar
        self.table = table
        self.clock = clock
        self.outbox = outbox
        self.listeners = list(listeners)
        self.stats: Counts = Counts() if stats is None else stats
        self.secret = secret or os.urandom(32)
        self.tokens = FlowTokens(self.secret)
        # Keyed once: each branch hash copies it rather than key a new one.
        self._branchMac = hashlib.blake2b(digest_size=8, key=self.secret[:64])
        #: Branch hashes made, by listener and the Via below natkeep's, each
        #: with where the responses go (the received and rport natkeep
        #: wrote into that Via): a request's responses (a 180, a 200, their
        #: retransmissions) find both here rather than hash and parse again
        #: (at most L{_BRANCHES_REMEMBERED}).
        self._branches: dict[tuple[int, str], tuple[str, tuple[str, int]]] = {}
        #: Who may register (C{allow}, C{deny}).
        self.sources = SourceFilter()
        #: Digest authentication, when C{auth} is on.
        self.digest: Optional[Digest] = None
        self.authAll = False
        #: rtpengine's ng client, made by the service when media is on.
        self.mediaClient: Optional[NGClient] = None
        #: The media relay, when C{SS_MEDIA_PROXY_BEHIND_NAT} is on.
        self.media: Optional[MediaProxy] = None
        #: Offers rtpengine has now: (Call-ID, CSeq, the sender's branch).
        self._offering: set[tuple[str, str, str]] = set()
        #: Forward mode's state, when C{register_mode = forward}.
        self.forwarder: Optional[RegisterForwarder] = None
        #: With several workers: passes on what is another worker's.
        self.handoff: Optional[Handoff] = None
        self.upstream: Optional[tuple[str, int]] = None
        self.upstreamHost: Optional[str] = None
        self.domains: frozenset[str] = frozenset()
        self.trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        self._own: set[tuple[str, int]] = set()
        #: The sent-bys already counted in C{_own}, as written.
        self._sentBys: set[str] = set()
        for listener in self.listeners:
            for address in (listener.sentBy, listener.address):
                host, port = splitHostPort(address)
                if not isWildcard(host):
                    self._own.add((host.lower(), port or 5060))

    def prepare(self, settings: Settings) -> RelayPlan:
        """
        What C{settings} ask of the relay that can fail: the upstream's
        address (its host name resolved, once) and the digest checker (its
        credentials file read).  A reload prepares first and applies only
        when this succeeds.

        @raise natkeep.config.ConfigError: naming what is wrong.
        """
        return RelayPlan(
            resolveUpstream(settings), makeDigest(settings, self.clock, self.stats, self.digest)
        )

    def configure(self, settings: Settings, plan: Optional[RelayPlan] = None) -> None:
        """
        Take C{upstream}, C{domains}, C{trusted}, C{allow}/C{deny} and the
        authentication settings of C{settings}, with C{plan} when it was
        prepared already.

        @raise natkeep.config.ConfigError: as L{prepare}.
        """
        if plan is None:
            plan = self.prepare(settings)
        self.domains = settings.domains
        self.sources.configure(settings.allow, settings.deny)
        self.digest = plan.digest
        self.authAll = settings.auth == "all"
        self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in settings.trusted)
        self.upstream = plan.upstream
        self.upstreamHost = (
            parseURI(settings.upstream).host.lower() if settings.upstream is not None else None
        )
        if settings.mediaProxy and self.mediaClient is not None:
            engines = [splitHostPort(e[len("udp:") :]) for e in settings.rtpengine]
            addresses = [(host, port or 2223) for host, port in engines]
            if self.media is None:
                self.media = MediaProxy(self.mediaClient, addresses, self.stats)
            self.media.engines = addresses
        else:
            self.media = None
        if settings.registerMode == "forward" and self.upstream is not None:
            if self.forwarder is None:
                assert isinstance(self.registrar, Registrar)
                self.forwarder = RegisterForwarder(
                    self.registrar, self.table, self.clock, self.outbox, self.stats
                )
            self.forwarder.upstreamExpires = settings.upstreamExpires
        else:
            self.forwarder = None

    # Who is who

    def _remember(self, sentBy: str) -> None:
        """
        Count C{sentBy} among natkeep's own addresses (a wildcard socket's
        local addresses are learnt as datagrams arrive on them).
        """
        if sentBy in self._sentBys:
            return
        host, port = splitHostPort(sentBy)
        key = (host.lower(), port or 5060)
        if len(self._own) < _MAX_OWN and len(self._sentBys) < _MAX_OWN:
            self._own.add(key)
            self._sentBys.add(sentBy)

    def _ours(self, uri: URI) -> bool:
        return (uri.host.lower(), uri.port or 5060) in self._own

    def _served(self, uri: URI) -> bool:
        """
        Whether C{uri} names an AOR natkeep serves.
        """
        if self._ours(uri):
            return True
        if self.domains:
            return uri.host.lower() in self.domains
        return bool(self.table.lookup(uri.addressOfRecord()))

    def _isDevice(self, request: Request, source: tuple[str, int]) -> bool:
        if not self.table.countFrom(source[0]):
            # No binding came from this host: nothing to parse.
            return False
        try:
            sender = parseURI(parseNameAddr(request.headers["from"][0]).uri)
        except SIPError:
            return False
        return any(b.source == source for b in self.table.lookup(sender.addressOfRecord()))

    def _handOff(
        self, host: str, request: Request, source: tuple[str, int], arrived: IListener
    ) -> bool:
        """
        With several workers: pass C{request} on to the worker of the
        device at C{host}, unless that is this one.

        @return: whether it was passed on.
        """
        handoff = self.handoff
        if handoff is None or handoff.active:
            return False
        worker = handoff.workerOf(host)
        if worker == handoff.index:
            return False
        self._passOn(handoff, worker, request, source, arrived)
        return True

    def _heldElsewhere(
        self, uri: URI, request: Request, source: tuple[str, int], arrived: IListener
    ) -> bool:
        """
        With several workers: when C{uri}'s AOR has no binding here but one
        at another worker by the store, pass C{request} on to that worker.

        @return: whether it was passed on.
        """
        handoff = self.handoff
        if handoff is None or handoff.active:
            return False
        aor = uri.addressOfRecord()
        if self.table.lookup(aor):
            return False
        worker = handoff.holder(aor)
        if worker is None:
            return False
        self._passOn(handoff, worker, request, source, arrived)
        return True

    def _passOn(
        self,
        handoff: Handoff,
        worker: int,
        request: Request,
        source: tuple[str, int],
        arrived: IListener,
    ) -> None:
        data = renderMessage(
            f"{request.method} {request.uri} SIP/2.0", request.headers, request.body
        )
        handoff.send(worker, self.listeners.index(arrived), source, data)

    def _isPeer(self, source: tuple[str, int]) -> bool:
        if self.upstream is not None and source[0] == self.upstream[0]:
            return True
        if self.trusted:
            try:
                address = ipaddress.ip_address(source[0])
            except ValueError:
                return False
            return any(address in network for network in self.trusted)
        return False

    def _listenerFor(self, host: str) -> IListener:
        """
        The socket to send to C{host} from: the first of its family.
        """
        family = _family(host)
        for listener in self.listeners:
            if _family(listener.sentBy.rpartition(":")[0].strip("[]")) == family:
                return listener
        raise SIPError("No Route To Destination", 503)

    # Requests

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
            if not self.sources.allowed(source[0]):
                self.stats["register.denied"] += 1
                raise SIPError("Source Not Allowed", 403)
            forwarder = self.forwarder
            if self.domains or self.digest is not None or forwarder is not None:
                # Else the registrar reads the To itself, and nothing here
                # needs it.
                self._checkRegister(request)
            if forwarder is not None and not forwarder.absorbs(request, source, listener):
                self._forwardRegister(request, via, cseq, source, listener)
                return
            self.registrar.requestReceived(request, via, cseq, source, listener)
            return
        if self.upstream is None:
            self.registrar.requestReceived(request, via, cseq, source, listener)
            return
        uri = parseURI(request.uri)
        if uri.user is None and self._ours(uri) and not request.headers.get("route"):
            # For natkeep itself: OPTIONS pings, and 405 for the rest.
            self.registrar.requestReceived(request, via, cseq, source, listener)
            return
        self._relay(request, uri, via, cseq, source, listener)

    def _checkRegister(self, request: Request) -> None:
        """
        A REGISTER's To is for a domain served, and its credentials are the
        AOR owner's.

        @raise SIPError: 400 for a malformed To, 401 or 403.
        """
        to = parseURI(parseNameAddr(request.headers["to"][0]).uri)
        if self.domains:
            if to.host.lower() not in self.domains and not self._ours(to):
                raise SIPError("Domain Not Served", 403)
        if self.digest is not None:
            user = self.digest.check(request)
            if user != to.user:
                # Authenticated, but not as the AOR's owner.
                self.stats["auth.wrong-aor"] += 1
                raise SIPError("Forbidden", 403)

    def _relay(
        self,
        request: Request,
        uri: URI,
        via: Via,
        cseq: int,
        source: tuple[str, int],
        arrived: IListener,
    ) -> None:
        """
        Proxy C{request}, whose Request-URI parsed is C{uri}.
        """
        headers = request.headers
        method = request.method
        forwards = _maxForwards(request)
        vias = splitValues(headers["via"])
        loopKey = self._loopKey(request, cseq)
        mark = "." + loopKey
        for value in vias:
            if mark not in value or BRANCH_PREFIX not in value:
                # Not one of ours with this key: no need to parse it.
                continue
            try:
                other = parseVia(value)
            except SIPError:
                continue
            branch = other.param("branch") or ""
            if branch.startswith(BRANCH_PREFIX) and branch.endswith(mark):
                raise SIPError("Loop Detected", 482)

        # A copy: the request stays as it came (a worker may hand it on).
        routes = list(splitValues(headers.get("route", [])))
        flow: Optional[tuple[int, tuple[str, int]]] = None
        if routes:
            first = parseURI(parseNameAddr(routes[0]).uri)
            if self._ours(first):
                routes.pop(0)
                if first.user:
                    flow = self.tokens.decode(first.user)
        target = request.uri
        if self._ours(uri) and uri.user and uri.user.startswith(FLOW_PREFIX) and routes:
            # A strict router before us put our Record-Route in the
            # Request-URI (RFC 3261 §16.4).
            flow = self.tokens.decode(uri.user)
            target = parseNameAddr(routes.pop()).uri
            uri = parseURI(target)

        initial = _toTag(request) is None
        recordFlow: Optional[str] = None
        destination: tuple[IListener, tuple[str, int]]
        if flow is not None and flow[1] != source:
            # In a dialog natkeep recorded, toward the device of the token.
            index, address = flow
            if self._handOff(address[0], request, source, arrived):
                return
            if not 0 <= index < len(self.listeners):
                raise SIPError("Unknown Flow", 400)
            destination = (self.listeners[index], address)
            if initial:
                # Along a Path (forward mode): the dialog must come back
                # through the same flow.
                recordFlow = self.tokens.encode(index, address)
        elif flow is not None or self._isDevice(request, source):
            # From a device: to another device of ours, else onward by the
            # Route set, else to the upstream.
            if self.authAll and initial and method not in ("ACK", "CANCEL"):
                assert self.digest is not None
                self.digest.check(request, proxy=True)
            if initial and not routes and self._heldElsewhere(uri, request, source, arrived):
                return
            if initial and not routes and self._served(uri):
                binding = self._target(uri)
                target = binding.uri
                destination = (binding.listener, binding.source)
                recordFlow = self.tokens.encode(self.listeners.index(binding.listener), source)
            else:
                destination = self._nextHop(routes)
                recordFlow = self.tokens.encode(self.listeners.index(arrived), source)
        elif self._isPeer(source):
            if routes:
                destination = self._nextHop(routes)
            elif initial and self._heldElsewhere(uri, request, source, arrived):
                return
            elif initial and self._served(uri):
                binding = self._target(uri)
                target = binding.uri
                destination = (binding.listener, binding.source)
                recordFlow = self.tokens.encode(
                    self.listeners.index(binding.listener), binding.source
                )
            else:
                raise SIPError("Not Found", 404)
        elif method == "OPTIONS" and not routes:
            # A stranger's OPTIONS is a probe or a keep-alive: natkeep
            # answers it itself, and relays nothing.
            self.registrar.requestReceived(request, via, cseq, source, arrived)
            return
        else:
            self.stats["relay.refused"] += 1
            raise SIPError("Forbidden", 403)

        out, address = destination
        forwarded, _, sentBy = self._outgoing(
            request, via, source, arrived, out, vias, loopKey, forwards, routes
        )
        if initial and method not in _NO_RECORD_ROUTE:
            user = f"{recordFlow}@" if recordFlow else ""
            recorded = f"<sip:{user}{sentBy};lr>"
            forwarded["record-route"] = [recorded] + headers.get("record-route", [])
        startLine = f"{method} {target} SIP/2.0"
        self.stats["relay.requests"] += 1
        media = self.media
        if media is not None:
            callId = headers["call-id"][0]
            if method in ("BYE", "CANCEL"):
                media.delete(callId, "")
            elif method in _OFFERS and _hasSDP(request):
                senderNat = self._natDevice(headers.get("from"), source)
                if senderNat or self._natDevice(headers.get("to"), address):
                    key = (callId, headers["cseq"][0], via.param("branch") or "")
                    if key in self._offering:
                        # A retransmission while rtpengine has the offer:
                        # the first copy is relayed when it answers.
                        self.stats["media.retransmissions"] += 1
                        return
                    self._offering.add(key)
                    sdp = media.offer(
                        callId,
                        _tag(headers.get("from")),
                        request.body,
                        source[0] if senderNat else None,
                    )
                    sdp.addBoth(_passing(self._offering.discard, key))
                    self._withMedia(
                        sdp, startLine, forwarded, out, address, (request, via, source, arrived)
                    )
                    return
        self.outbox.send(out, renderMessage(startLine, forwarded, request.body), address)

    def _natDevice(self, header: Optional[list[str]], address: tuple[str, int]) -> bool:
        """
        Whether C{address} is a NATed device of the AOR the From or To
        C{header} names.
        """
        if not header:
            return False
        try:
            aor = parseURI(parseNameAddr(header[0]).uri).addressOfRecord()
        except SIPError:
            return False
        return any(b.nat and b.source == address for b in self.table.lookup(aor))

    def _withMedia(
        self,
        sdp: Deferred[bytes],
        startLine: str,
        headers: dict[str, list[str]],
        out: IListener,
        address: tuple[str, int],
        refuse: Optional[tuple[Request, Via, tuple[str, int], IListener]],
    ) -> None:
        """
        Send the message once rtpengine gave the SDP to carry; when it did
        not, answer the request 503 (C{refuse}) or drop the response.
        """

        sdp.addCallbacks(
            self._sendWithMedia,
            self._noMedia,
            callbackArgs=(startLine, headers, out, address),
            errbackArgs=(headers, refuse),
        )

    def _sendWithMedia(
        self,
        body: bytes,
        startLine: str,
        headers: dict[str, list[str]],
        out: IListener,
        address: tuple[str, int],
    ) -> None:
        self.outbox.send(out, renderMessage(startLine, headers, body), address)

    def _noMedia(
        self,
        failure: Failure,
        headers: dict[str, list[str]],
        refuse: Optional[tuple[Request, Via, tuple[str, int], IListener]],
    ) -> None:
        self.stats["media.refused"] += 1
        log.warn(
            "No media for call {callId}: {error}",
            callId=headers["call-id"][0],
            error=failure.getErrorMessage(),
        )
        if refuse is not None:
            request, via, source, arrived = refuse
            self.outbox.answer(
                request, via, source, arrived, 503, "Media Unavailable", "Retry-After: 30\r\n"
            )

    def _outgoing(
        self,
        request: Request,
        via: Via,
        source: tuple[str, int],
        arrived: IListener,
        out: IListener,
        vias: list[str],
        loopKey: str,
        forwards: int,
        routes: list[str],
    ) -> tuple[dict[str, list[str]], str, str]:
        """
        The headers of C{request} as natkeep sends it on from C{out}: its
        Via on top (the branch a hash of the one below, which gets
        received and rport), Max-Forwards one less, the Route set left.

        @return: the headers, natkeep's branch, and the sent-by written.
        """
        inIndex = self.listeners.index(arrived)
        sentBy = out.sentByNow() if out is arrived else out.sentBy
        self._remember(sentBy)
        # Symmetric responses (RFC 3581), whether or not rport was asked.
        top = via.render(("received", "rport"), f";received={source[0]};rport={source[1]}")
        branch = f"{BRANCH_PREFIX}{self._branchFor(top, inIndex, source)}.{loopKey}"
        forwarded = dict(request.headers)
        worker = "" if self.handoff is None else f";nkw={self.handoff.index}"
        forwarded["via"] = [
            f"SIP/2.0/UDP {sentBy};branch={branch};nki={inIndex}{worker}",
            top,
        ] + vias[1:]
        forwarded["max-forwards"] = [str(forwards - 1)]
        if routes:
            forwarded["route"] = routes
        else:
            forwarded.pop("route", None)
        return forwarded, branch, sentBy

    def _forwardRegister(
        self, request: Request, via: Via, cseq: int, source: tuple[str, int], arrived: IListener
    ) -> None:
        """
        Send a device's REGISTER on to the upstream (forward mode), with a
        Path whose flow token leads back to the device through the socket
        it came in on (RFC 3327; C{ob} when the device asked for outbound,
        RFC 5626), and each Contact asking for C{upstream_expires}.
        """
        forwarder = self.forwarder
        assert forwarder is not None and self.upstream is not None
        headers = request.headers
        forwards = _maxForwards(request)
        contacts = forwarder.upstreamContacts(request)
        routes = splitValues(headers.get("route", []))
        if routes and self._ours(parseURI(parseNameAddr(routes[0]).uri)):
            routes.pop(0)
        out = self._listenerFor(self.upstream[0])
        forwarded, branch, sentBy = self._outgoing(
            request,
            via,
            source,
            arrived,
            out,
            splitValues(headers["via"]),
            self._loopKey(request, cseq),
            forwards,
            routes,
        )
        token = self.tokens.encode(self.listeners.index(arrived), source)
        outbound = any(
            "reg-id=" in value.lower() for value in splitValues(headers.get("contact", []))
        )
        path = f"<sip:{token}@{sentBy};lr{';ob' if outbound else ''}>"
        forwarded["path"] = [path] + headers.get("path", [])
        supported = splitValues(headers.get("supported", []))
        if "path" not in (value.lower() for value in supported):
            forwarded["supported"] = supported + ["path"]
        if contacts is not None:
            forwarded["contact"] = contacts
            forwarded.pop("expires", None)
        forwarder.sent(branch, request, via, cseq, source, arrived)
        data = renderMessage(f"REGISTER {request.uri} SIP/2.0", forwarded, request.body)
        self.outbox.send(out, data, self.upstream)

    def _target(self, uri: URI) -> Binding:
        """
        The binding a request for C{uri} goes to: the highest q, then the
        most recently refreshed.

        @raise SIPError: 404 when the AOR has no binding, 480 when none is
            alive.
        """
        bindings = self.table.lookup(uri.addressOfRecord())
        if not bindings:
            raise SIPError("Not Found", 404)
        now = self.clock.seconds()
        alive = [b for b in bindings if b.expiresAt > now]
        if not alive:
            raise SIPError("Temporarily Unavailable", 480)
        if len(alive) == 1:
            return alive[0]
        return max(alive, key=lambda b: (_quality(b.params), b.expiresAt))

    def _nextHop(self, routes: list[str]) -> tuple[IListener, tuple[str, int]]:
        """
        Where a request goes onward: the first Route when it names an
        address (a hop the upstream recorded), else the upstream.
        """
        address: Optional[tuple[str, int]] = None
        if routes:
            uri = parseURI(parseNameAddr(routes[0]).uri)
            if _isAddress(uri.host):
                address = (uri.host, uri.port or 5060)
        if address is None:
            if self.upstream is None:
                raise SIPError("No Route To Destination", 503)
            address = self.upstream
        return self._listenerFor(address[0]), address

    def _loopKey(self, request: Request, cseq: int) -> str:
        """
        A checksum of what stays the same when a request comes back around
        a loop (RFC 3261 §16.6 step 8): Request-URI, Call-ID, CSeq number
        and From.  Not the CSeq method: a CANCEL (and the ACK of an error)
        must carry its INVITE's branch.  C{cseq} is the number the request
        checks read.  It proves nothing (anyone can
        compute it), so a CRC serves: a spiral, back with another
        Request-URI, is taken for a loop once in 2**32.
        """
        headers = request.headers
        text = "|".join((request.uri, headers["call-id"][0], str(cseq), headers["from"][0]))
        # In decimal: str() of an int is a native call, a hex format is not.
        return str(zlib.crc32(text.encode("utf-8", "surrogateescape")))

    def _branchHash(self, previous: str, listener: int) -> str:
        digest = self._branchMac.copy()
        digest.update(f"{listener}|{previous}".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def _branchFor(self, previous: str, listener: int, back: tuple[str, int]) -> str:
        """
        The branch hash of a request relayed from C{listener} with
        C{previous} the Via below natkeep's, remembered with C{back}, where
        that Via sends the responses.
        """
        branch = self._branchHash(previous, listener)
        if len(self._branches) >= _BRANCHES_REMEMBERED:
            self._branches.clear()
        self._branches[(listener, previous)] = (branch, back)
        return branch

    # Responses

    def responseDatagram(self, data: bytes, source: tuple[str, int]) -> bool:
        """
        A datagram that starts like a response arrived: when it answers a
        request natkeep relayed lately (its branch is remembered) and the
        relay has nothing to do to it but take its own Via off, pass it on
        so, unparsed.

        @return: whether it was passed on; if not, the caller parses it
            and L{responseReceived} decides, as for any response.
        """
        if self.upstream is None or self.media is not None or self.forwarder is not None:
            return False
        split = splitTopVia(data, _BRANCH_MARK)
        if split is None:
            return False
        ours, below, spliced = split
        # natkeep's Via exactly as it writes one; any other shape is parsed.
        parts = ours.split(";")
        count = len(parts)
        if count < 3 or count > 4:
            return False
        branch, nki = parts[1], parts[2]
        if not branch.startswith(_BRANCH_PARAM) or not nki.startswith("nki="):
            return False
        if not nki[4:].isdigit():
            return False
        index = int(nki[4:])
        if count == 4:
            worker = parts[3]
            if not worker.startswith("nkw="):
                return False
            handoff = self.handoff
            if handoff is not None and not handoff.active and worker[4:] != str(handoff.index):
                # Another worker's: parsed and handed on.
                return False
        known = self._branches.get((index, below))
        if known is None or index >= len(self.listeners):
            return False
        expected, back = known
        digest = branch[len(_BRANCH_PARAM) :].partition(".")[0]
        if not hmac.compare_digest(digest, expected):
            # Parsed, and counted as unknown there.
            return False
        self.stats["relay.responses"] += 1
        self.outbox.send(self.listeners[index], spliced, back)
        return True

    def responseReceived(self, response: Response, source: tuple[str, int]) -> bool:
        """
        A response arrived: when it answers a request natkeep relayed, pop
        natkeep's Via and send it on to the next.

        @return: whether it was one.
        """
        vias = splitValues(response.headers.get("via", []))
        if len(vias) < 2 or BRANCH_PREFIX not in vias[0]:
            return False
        try:
            # natkeep's own Via: only its parameters matter, and the hash
            # below proves them.
            ours = parseParams(vias[0].partition(";")[2])
            branch = findParam(ours, "branch") or ""
            index = int(findParam(ours, "nki") or "-1")
            digest = branch[len(BRANCH_PREFIX) :].partition(".")[0]
            if not 0 <= index < len(self.listeners):
                self.stats["relay.responses.unknown"] += 1
                return True
            known = self._branches.get((index, vias[1]))
            back: Optional[tuple[str, int]] = None
            if known is not None:
                expected, back = known
            else:
                expected = self._branchHash(vias[1], index)
            if not hmac.compare_digest(digest, expected):
                self.stats["relay.responses.unknown"] += 1
                return True
            if back is None:
                # Not remembered (long ago, or another run's): the next
                # Via says where, with the received and rport natkeep wrote.
                nextVia = parseVia(vias[1])
                rport = nextVia.param("rport")
                back = (
                    nextVia.param("received") or nextVia.host,
                    int(rport) if rport and rport.isdigit() else (nextVia.port or 5060),
                )
        except (SIPError, ValueError):
            self.stats["relay.responses.unknown"] += 1
            return True
        handoff = self.handoff
        if handoff is not None and not handoff.active:
            worker = findParam(ours, "nkw")
            if worker is not None and worker.isdigit() and int(worker) != handoff.index:
                data = renderMessage(
                    f"SIP/2.0 {response.code} {response.reason}", response.headers, response.body
                )
                handoff.send(int(worker), index, source, data)
                return True
        if self.forwarder is not None and self.forwarder.responseReceived(response, branch):
            return True
        self.stats["relay.responses"] += 1
        media = self.media
        callId = response.header("call-id") or ""
        inSession = media is not None and callId in media.sessions
        if not inSession:
            # Passed on as it came, less natkeep's Via, where that can be cut.
            spliced = withoutTopVia(response, vias[0])
            if spliced is not None:
                self.outbox.send(self.listeners[index], spliced, back)
                return True
        headers = dict(response.headers)
        headers["via"] = vias[1:]
        startLine = f"SIP/2.0 {response.code} {response.reason}"
        if media is not None and inSession:
            method = (headers.get("cseq") or [""])[0].rpartition(" ")[2]
            if response.code >= 300 and method == "INVITE" and not _tag(headers.get("to")):
                media.delete(callId, "")
            elif response.code < 300 and method in _OFFERS and _hasSDP(response):
                nat = self._natDevice(headers.get("to"), source)
                self._withMedia(
                    media.answer(
                        callId,
                        _tag(headers.get("from")),
                        _tag(headers.get("to")),
                        response.body,
                        source[0] if nat else None,
                    ),
                    startLine,
                    headers,
                    self.listeners[index],
                    back,
                    None,
                )
                return True
        data = renderMessage(startLine, headers, response.body)
        self.outbox.send(self.listeners[index], data, back)
        return True


#: Methods whose SDP is an offer natkeep has rtpengine rewrite.
_OFFERS: Final = ("INVITE", "UPDATE")


# A zope class decorator would make the class a plain Python one when
# compiled; declared here, the class stays native.
classImplements(Relay, ISIPController)


def _passing(call: Callable[[Any], object], argument: Any) -> Callable[[Any], Any]:
    """
    A Deferred callback that calls C{call(argument)} and passes the result
    on, whatever it is.
    """

    def passing(result: Any) -> Any:
        call(argument)
        return result

    return passing


def _hasSDP(message: Request | Response) -> bool:
    if not message.body:
        return False
    kind = (message.headers.get("content-type") or [""])[0]
    return kind.split(";", 1)[0].strip().lower() == "application/sdp"


def _tag(header: Optional[list[str]]) -> str:
    if not header:
        return ""
    try:
        return parseNameAddr(header[0]).param("tag") or ""
    except SIPError:
        return ""


def _maxForwards(request: Request) -> int:
    """
    The Max-Forwards of C{request} (L{MAX_FORWARDS} when absent).

    @raise SIPError: 400 when it is no number of 0..255, 483 when it is 0.
    """
    values = request.headers.get("max-forwards")
    if not values:
        return MAX_FORWARDS
    try:
        forwards = int(values[0])
        if not 0 <= forwards <= 255:
            raise ValueError
    except ValueError:
        raise SIPError("Invalid Max-Forwards")
    if forwards == 0:
        raise SIPError("Too Many Hops", 483)
    return forwards


def _toTag(request: Request) -> Optional[str]:
    value = request.headers["to"][0]
    if "=" not in value:
        # No parameter with a value, so no tag: most initial requests.
        return None
    try:
        return parseNameAddr(value).param("tag")
    except SIPError:
        return None


def _quality(params: str) -> float:
    """
    The C{q} of a binding's Contact parameters: 1 when absent, 0 when not
    a number.
    """
    for name, value in parseParams(params):
        if name == "q":
            try:
                return float(value or "")
            except ValueError:
                return 0.0
    return 1.0
