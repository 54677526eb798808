"""
The OPTIONS heartbeat's hot path: each heartbeat rendered, each answer
matched to its binding.  The C{options} payload strategy
(L{natkeep.plugins.natkeep_payload}) is this class; it lives among the
compiled modules because it runs once per heartbeat and once per answer.
"""

from __future__ import annotations

from typing import Final, Optional

from natkeep.bindings import DEAD, Binding
from natkeep.sip import Response

#: What follows the phase in a heartbeat's Call-ID.
_HOST: Final = "@natkeep"
_LINE_END: Final = _HOST.encode("ascii") + b"\r\n"
_LINE_END_LENGTH: Final = len(_LINE_END)

#: The most digits a phase is read with (a binding table never gets near).
_MAX_DIGITS: Final = 18


def _isDigit(byte: int) -> bool:
    return 0x30 <= byte <= 0x39


def _phaseOf(data: bytes, start: int) -> Optional[tuple[int, int]]:
    """
    The phase written in C{data} from C{start}, as a heartbeat writes it
    (decimal, no sign, no leading zero), and where its digits end; C{None}
    when there is none there.
    """
    end = start
    length = len(data)
    phase = 0
    while end < length and end - start < _MAX_DIGITS:
        byte = data[end]
        if not _isDigit(byte):
            break
        phase = phase * 10 + byte - 0x30
        end += 1
    if end == start or (data[start] == 0x30 and end - start > 1):
        return None
    if end < length and _isDigit(data[end]):
        return None
    return phase, end


class OptionsHeartbeats:
    """
    A SIP OPTIONS request to each binding's Contact, sent to its public
    address.  The device's answer proves it alive, and, leaving the NAT from
    the inside, refreshes even mappings that only outbound traffic renews.

    Each binding has its own Call-ID, so an answer is matched to its binding
    by Call-ID alone; the CSeq rises with each heartbeat.  An answer that
    echoes the Call-ID header as it was sent is matched from its bytes,
    unparsed (L{matchDatagram}); any other goes through the parser.

    @ivar token: a per-run prefix keeping Call-IDs unique across restarts.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.name = "options"
        self.enabled = True
        self.fixed: Optional[bytes] = None
        #: The bindings heartbeats went to, by phase: the number in their
        #: Call-ID (C{token-phase@natkeep}).
        self._outstanding: dict[int, Binding] = {}
        self._heads: dict[str, tuple[str, str]] = {}
        self._cseq = 0
        self._prefix = token + "-"
        self._marker = b"\r\nCall-ID: " + self._prefix.encode("ascii")

    def __repr__(self) -> str:
        return f"OptionsHeartbeats(token={self.token!r})"

    def _head(self, address: str) -> tuple[str, str]:
        """
        The parts of every heartbeat from the socket at C{address} that do
        not change: the Via up to its branch, and the From.
        """
        host = address.rpartition(":")[0]
        head = self._heads[address] = (
            f"Via: SIP/2.0/UDP {address};rport;branch=z9hG4bK{self.token}.",
            f"From: <sip:natkeep@{host}>;tag={self.token}\r\n",
        )
        return head

    def payloadFor(self, binding: Binding) -> bytes:
        self._cseq = cseq = self._cseq + 1
        phase = binding.phase
        callId = f"{self._prefix}{phase}{_HOST}"
        self._outstanding[phase] = binding
        address = binding.listener.sentBy
        head = self._heads.get(address)
        via, sender = head if head is not None else self._head(address)
        uri = binding.uri
        return (
            f"OPTIONS {uri} SIP/2.0\r\n{via}{cseq}\r\nMax-Forwards: 70\r\n{sender}"
            f"To: <{uri}>\r\nCall-ID: {callId}\r\nCSeq: {cseq} OPTIONS\r\n"
            "User-Agent: natkeep\r\nContent-Length: 0\r\n\r\n"
        ).encode("utf-8")

    def responseReceived(self, response: Response, source: tuple[str, int]) -> Optional[Binding]:
        headers = response.headers
        callIds = headers.get("call-id")
        if not callIds:
            return None
        callId = callIds[0]
        prefix = self._prefix
        if not (callId.startswith(prefix) and callId.endswith(_HOST)):
            return None
        digits = callId[len(prefix) : -len(_HOST)].encode("ascii", "replace")
        found = _phaseOf(digits, 0)
        if found is None or found[1] != len(digits):
            return None
        binding = self._outstanding.get(found[0])
        if binding is None or binding.expiresAt == DEAD:
            return None
        # The Call-ID, which holds this run's random token, is the match;
        # the CSeq only has to be an OPTIONS one.
        cseqs = headers.get("cseq")
        if not cseqs or not cseqs[0].endswith(" OPTIONS"):
            return None
        return binding

    def matchDatagram(self, data: bytes, source: tuple[str, int]) -> Optional[Binding]:
        # The Call-ID line as sent: this run's token makes it unique.  Its
        # phase is read where it stands, digit by digit.
        start = data.find(self._marker)
        if start < 0 or not (_isDigit(data[8]) and _isDigit(data[9]) and _isDigit(data[10])):
            return None
        found = _phaseOf(data, start + len(self._marker))
        if found is None:
            return None
        phase, end = found
        if data[end : end + _LINE_END_LENGTH] != _LINE_END or data.find(b" OPTIONS\r\n", end) < 0:
            return None
        binding = self._outstanding.get(phase)
        if binding is None or binding.expiresAt == DEAD:
            return None
        return binding

    def cycleStarted(self, now: float) -> None:
        dead = [k for k, b in self._outstanding.items() if b.expiresAt == DEAD]
        for key in dead:
            del self._outstanding[key]
