"""
Media through rtpengine (C{SS_MEDIA_PROXY_BEHIND_NAT}): a phone behind NAT
writes its private address into its SDP, so the far end's audio never
reaches it.  natkeep has rtpengine, the media relay Kamailio and OpenSIPS
operators run, anchor the RTP of every relayed call with a NATed device:
an C{offer} with the INVITE's SDP, an C{answer} with the reply's, and a
C{delete} when the call ends, each over rtpengine's C{ng} control
protocol (bencoded dictionaries over UDP, a cookie before each).

rtpengine latches onto the address RTP really comes from (symmetric RTP),
and is told the NATed device's public address (C{received-from}); the SDP
it hands back names rtpengine, whose ports every NAT lets the answers in.

The bencoding is natkeep's own (L{bencode}, L{bdecode}): the few lines the
protocol needs, bounded, with nothing to install.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from typing import Any, Callable, Optional, Union

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from natkeep.counts import Counts

log = Logger(namespace="natkeep.media")

BValue = Union[int, bytes, str, list[Any], dict[Any, Any]]

#: Seconds one ng command waits for its answer before it is sent again.
TIMEOUT = 1.0

#: Times a command is sent again after a timeout before it fails.
RETRIES = 1

#: Calls whose media natkeep tracks at once (the oldest are forgotten).
MAX_SESSIONS = 100_000

#: The flags of an offer or answer, as operators give Kamailio's
#: rtpengine_manage for NATed phones: rtpengine's address everywhere in the
#: SDP, ICE removed (its candidates would name private addresses), the
#: address to use the SIP source (C{received-from}), not the SDP's.
FLAGS = {
    "replace": ["origin", "session-connection"],
    "ICE": "remove",
}


class BencodeError(ValueError):
    """
    Bytes that are not a bencoded value (or too deep).
    """


def bencode(value: BValue) -> bytes:
    """
    The bencoding of C{value}: integers, byte and text strings, lists, and
    dictionaries with string keys (sorted).
    """
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(item) for item in value) + b"e"
    if isinstance(value, dict):
        items = sorted(
            (k.encode("utf-8") if isinstance(k, str) else k, v) for k, v in value.items()
        )
        return b"d" + b"".join(bencode(k) + bencode(v) for k, v in items) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")


def bdecode(data: bytes) -> Any:
    """
    The value C{data} bencodes, strings as bytes.

    @raise BencodeError: when it is not exactly one bencoded value.
    """
    value, end = _decode(data, 0, 0)
    if end != len(data):
        raise BencodeError("trailing bytes")
    return value


def _decode(data: bytes, at: int, depth: int) -> tuple[Any, int]:
    if depth > 32:
        raise BencodeError("nested too deep")
    try:
        kind = data[at : at + 1]
        if kind == b"i":
            end = data.index(b"e", at)
            return int(data[at + 1 : end]), end + 1
        if kind in (b"l", b"d"):
            at += 1
            items = []
            while data[at : at + 1] != b"e":
                item, at = _decode(data, at, depth + 1)
                items.append(item)
            if kind == b"l":
                return items, at + 1
            if len(items) % 2:
                raise BencodeError("a key without a value")
            return dict(zip(items[::2], items[1::2], strict=True)), at + 1
        colon = data.index(b":", at)
        length = int(data[at:colon])
        if length < 0 or colon + 1 + length > len(data):
            raise BencodeError("string past the end")
        return data[colon + 1 : colon + 1 + length], colon + 1 + length
    except (ValueError, IndexError) as e:
        if isinstance(e, BencodeError):
            raise
        raise BencodeError(f"malformed at byte {at}")


class MediaError(Exception):
    """
    rtpengine did not do what was asked (no answer, or an error result).
    """


@attrs.define(eq=False)
class _Command:
    """
    An ng command on its way: its cookie, bytes, rtpengine, and the
    Deferred of its answer.
    """

    cookie: bytes
    data: bytes
    address: tuple[str, int]
    result: defer.Deferred[dict[bytes, Any]]
    started: float = attrs.field(factory=time.monotonic)
    timer: Optional[IDelayedCall] = None


class NGClient(DatagramProtocol):
    """
    rtpengine's ng protocol over one UDP socket: a command is a cookie and
    a bencoded dictionary; the answer carries the same cookie.  A command
    unanswered after L{TIMEOUT} is sent again, L{RETRIES} times.
    """

    def __init__(self, clock: IReactorTime, stats: Optional[Counts] = None) -> None:
        self.clock = clock
        self.stats: Counts = Counts() if stats is None else stats
        self._waiting: dict[bytes, _Command] = {}
        self._prefix = os.urandom(4).hex()
        self._counter = 0
        #: Latencies of answered commands, in seconds (the latest ones).
        self.latencies: list[float] = []
        #: Told each answered command's latency (the metrics' histogram).
        self.onLatency: Optional[Callable[[float], None]] = None

    def command(
        self, address: tuple[str, int], message: dict[str, Any]
    ) -> defer.Deferred[dict[bytes, Any]]:
        """
        Send C{message} to the rtpengine at C{address}.

        @return: a Deferred of the answer's dictionary (C{result} C{ok});
            it fails with L{MediaError} when rtpengine answers an error or
            never answers.
        """
        self._counter += 1
        cookie = f"{self._prefix}_{self._counter}".encode()
        sent = _Command(cookie, cookie + b" " + bencode(message), address, defer.Deferred())
        self._send(sent, RETRIES)
        return sent.result

    def _send(self, sent: _Command, retries: int) -> None:
        try:
            assert self.transport is not None
            self.transport.write(sent.data, sent.address)
        except OSError as e:
            self.stats["media.ng.failures"] += 1
            sent.result.errback(MediaError(f"cannot reach rtpengine at {sent.address}: {e}"))
            return
        sent.timer = self.clock.callLater(TIMEOUT, self._timedOut, sent, retries)
        self._waiting[sent.cookie] = sent

    def _timedOut(self, sent: _Command, retries: int) -> None:
        self._waiting.pop(sent.cookie, None)
        if retries > 0:
            self.stats["media.ng.retries"] += 1
            self._send(sent, retries - 1)
            return
        self.stats["media.ng.failures"] += 1
        host, port = sent.address
        sent.result.errback(MediaError(f"rtpengine at {host}:{port} did not answer"))

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        cookie, _, body = data.partition(b" ")
        sent = self._waiting.pop(cookie, None)
        if sent is None:
            # A late answer to a retried command, or a stranger.
            return
        if sent.timer is not None and sent.timer.active():
            sent.timer.cancel()
        d = sent.result
        latency = time.monotonic() - sent.started
        self.latencies.append(latency)
        if len(self.latencies) > 10000:
            del self.latencies[:5000]
        if self.onLatency is not None:
            self.onLatency(latency)
        self.stats["media.ng.commands"] += 1
        try:
            answer = bdecode(body)
        except BencodeError as e:
            self.stats["media.ng.failures"] += 1
            d.errback(MediaError(f"rtpengine answered something not bencoded: {e}"))
            return
        if not isinstance(answer, dict) or answer.get(b"result") != b"ok":
            self.stats["media.ng.failures"] += 1
            reason = answer.get(b"error-reason", b"?") if isinstance(answer, dict) else b"?"
            d.errback(MediaError(f"rtpengine refused: {reason.decode('utf-8', 'replace')}"))
            return
        d.callback(answer)


def quantile(values: list[float], q: float) -> float:
    """
    The C{q} quantile of C{values} (0 when empty).
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class MediaProxy:
    """
    The calls whose media rtpengine anchors, and the commands for them.

    @ivar engines: the rtpengine control addresses; a call goes to the one
        its Call-ID hashes to, so that its commands meet the same relay.
    @ivar sessions: Call-IDs with an offer made, not yet deleted.
    """

    def __init__(
        self,
        client: NGClient,
        engines: list[tuple[str, int]],
        stats: Optional[Counts] = None,
    ) -> None:
        self.client = client
        self.engines = engines
        self.stats: Counts = Counts() if stats is None else stats
        self.sessions: OrderedDict[str, None] = OrderedDict()

    def status(self) -> dict[str, Any]:
        """
        For C{/status}: calls whose media rtpengine holds, and the latency
        of the latest ng commands.
        """
        latencies = self.client.latencies
        return {
            "sessions": len(self.sessions),
            "ng_p50_ms": round(quantile(latencies, 0.5) * 1000, 3),
            "ng_p99_ms": round(quantile(latencies, 0.99) * 1000, 3),
        }

    def _engine(self, callId: str) -> tuple[str, int]:
        digest = hashlib.blake2b(callId.encode("utf-8", "surrogateescape"), digest_size=4)
        return self.engines[int.from_bytes(digest.digest(), "big") % len(self.engines)]

    def offer(
        self, callId: str, fromTag: str, sdp: bytes, source: Optional[str]
    ) -> defer.Deferred[bytes]:
        """
        The SDP to relay in place of the offer C{sdp}.

        @param source: the sender's public IP when it is a NATed device
            (rtpengine sends its media there, not to the SDP's address).
        """
        self.sessions[callId] = None
        self.sessions.move_to_end(callId)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return self._exchange(
            {"command": "offer", "call-id": callId, "from-tag": fromTag}, sdp, source
        )

    def answer(
        self, callId: str, fromTag: str, toTag: str, sdp: bytes, source: Optional[str]
    ) -> defer.Deferred[bytes]:
        """
        The SDP to relay in place of the answer C{sdp}.
        """
        message = {"command": "answer", "call-id": callId, "from-tag": fromTag, "to-tag": toTag}
        return self._exchange(message, sdp, source)

    def _exchange(
        self, message: dict[str, Any], sdp: bytes, source: Optional[str]
    ) -> defer.Deferred[bytes]:
        message.update(FLAGS, sdp=sdp)
        if source is not None:
            message["received-from"] = ["IP6" if ":" in source else "IP4", source]
        engine = self._engine(message["call-id"])
        return self.client.command(engine, message).addCallback(_sdpOf)

    def delete(self, callId: str, fromTag: str) -> None:
        """
        End the call's media; a failure is only logged.
        """
        if self.sessions.pop(callId, "absent") == "absent":
            return
        d = self.client.command(
            self._engine(callId), {"command": "delete", "call-id": callId, "from-tag": fromTag}
        )
        d.addErrback(
            lambda f: log.warn(
                "rtpengine delete for {callId} failed: {error}",
                callId=callId,
                error=f.getErrorMessage(),
            )
        )


def _sdpOf(answer: dict[bytes, Any]) -> bytes:
    sdp = answer.get(b"sdp")
    if not isinstance(sdp, bytes):
        raise MediaError("rtpengine answered without SDP")
    return sdp


def startClient(reactor: IReactorUDP, clock: IReactorTime, stats: Counts) -> NGClient:
    """
    An L{NGClient} on an ephemeral loopback-or-any UDP port.
    """
    client = NGClient(clock, stats)
    reactor.listenUDP(0, client, interface="", maxPacketSize=65536)
    return client
