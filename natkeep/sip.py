"""
The wire: parsing and rendering the SIP messages a registrar meets
(RFC 3261 §7, §8.2, §20, §25; RFC 3581 for C{rport}).

The parser is deliberately narrow.  It splits a datagram into a start line,
header fields and a body, and parses in depth only what a registrar acts on
(Via, Contact, CSeq, Expires, the To/From URIs).  Everything it rejects raises
L{SIPError} carrying the status code and a reason phrase that names the fault,
so the caller can answer with it; what cannot be answered at all raises
L{Unanswerable}.  Responses are rendered here too (L{renderResponse}).
"""

from __future__ import annotations

import re
import zlib
from typing import Container, Final, Iterable, Iterator, Optional, Union

#: RFC 3261 §7.3.3 compact header forms, mapped to the lower-case full name.
COMPACT_FORMS: Final = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
    "s": "subject",
    "e": "content-encoding",
    "o": "event",
    "r": "refer-to",
    "u": "allow-events",
    "x": "session-expires",
}

#: The largest datagram we try to read as SIP; anything longer is answered
#: C{513 Message Too Large} if its Via can be found, otherwise dropped.
MAX_MESSAGE_SIZE: Final = 16384

#: More header lines than this is not a phone talking.
MAX_HEADER_LINES: Final = 128

#: RFC 3261 §20.19: a delta-seconds value above 2**32-1 is taken as that.
MAX_DELTA_SECONDS: Final = 2**32 - 1

#: RFC 3261 §8.1.1.5: CSeq is a 32-bit unsigned integer below 2**31.
MAX_CSEQ: Final = 2**31 - 1

_TOKEN: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z")

_STATUS_LINE_PREFIX: Final = "SIP/2.0 "

_VERSION: Final = re.compile(r"SIP/[0-9]+\.[0-9]+\Z")

#: RFC 3261 §25.1: LWS may surround the slashes of a Via's sent-protocol.
_SENT_PROTOCOL: Final = re.compile(
    r"\s*SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9.!%*_+`'~-]+)\s+(.*)\Z", re.S | re.I
)

#: Longer header names are looked up but not remembered, so the cache of
#: canonical names stays small in bytes whatever arrives.
_CANONICAL_NAME_LIMIT: Final = 64

#: Methods known to be tokens, spared the pattern match.
_METHODS: Final = frozenset(
    ["REGISTER", "OPTIONS", "INVITE", "ACK", "BYE", "CANCEL", "SUBSCRIBE", "NOTIFY"]
    + ["MESSAGE", "INFO", "PRACK", "UPDATE", "REFER", "PUBLISH"]
)

#: Header names as written mapped to their canonical form; phones repeat
#: the same few spellings, so this saves a strip and lower per line.
_CANONICAL: Final[dict[str, str]] = {}
_CANONICAL_LIMIT: Final = 4096


class Unanswerable(Exception):
    """
    A request so broken that no response can be addressed (no usable Via):
    it is dropped.
    """


class SIPError(Exception):
    """
    A message that cannot be handled.

    @ivar status: the SIP status code to answer with.
    @ivar reason: a reason phrase that names the fault.
    @ivar partial: the message as far as it was parsed, when its start line
        and headers were sound, so that the fault can be answered.
    @ivar extra: header lines the answer adds, each ending in CRLF.
    """

    def __init__(self, reason: str, status: int = 400, extra: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.extra = extra
        self.partial: Optional[Union[Request, Response]] = None


class _HeaderFields:
    """
    What requests and responses share: header values by lower-case full
    header name, each a list of the field values in the order they appeared.
    """

    __slots__ = ()
    headers: dict[str, list[str]]

    def header(self, name: str) -> Optional[str]:
        """
        @return: the first value of header C{name} (lower-case full name), or
            L{None} when it is absent.
        """
        values = self.headers.get(name)
        return values[0] if values else None


class Request(_HeaderFields):
    """
    A parsed SIP request.
    """

    __slots__ = ("method", "uri", "headers", "body")

    def __init__(self, method: str, uri: str, headers: dict[str, list[str]], body: bytes) -> None:
        self.method = method
        self.uri = uri
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Request(method={self.method!r}, uri={self.uri!r}, headers={self.headers!r})"


class Response(_HeaderFields):
    """
    A parsed SIP response.
    """

    __slots__ = ("code", "reason", "headers", "body", "data")

    def __init__(
        self,
        code: int,
        reason: str,
        headers: dict[str, list[str]],
        body: bytes,
        data: bytes = b"",
    ) -> None:
        self.code = code
        self.reason = reason
        self.headers = headers
        self.body = body
        #: The datagram it was parsed from (L{withoutTopVia}).
        self.data = data

    def __repr__(self) -> str:
        return f"Response(code={self.code}, reason={self.reason!r}, headers={self.headers!r})"


Message = Union[Request, Response]


def parseMessage(data: bytes) -> Message:
    """
    Parse one datagram as a SIP message.

    @raise SIPError: when the datagram is not a SIP message we can handle;
        the error's reason names the fault.
    """
    # A fault found before the headers are read is raised once they are,
    # so that it can be answered (513, 505).
    deferred: Optional[SIPError] = None
    if len(data) > MAX_MESSAGE_SIZE:
        deferred = SIPError("Message Too Large", 513)
        data = data[:MAX_MESSAGE_SIZE]
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        head = data[:end]
        body = data[end + 4 :]
    else:
        end = data.find(b"\n\n")
        if end < 0:
            raise deferred or SIPError("Truncated Message")
        head = data[:end]
        body = data[end + 2 :]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SIPError("Header Not UTF-8")
    # A line ends at LF, with or without a CR before it (a stray bare LF
    # among CRLFs still ends a line); each value is stripped of the CR with
    # the rest of its surrounding white space.
    lines = text.split("\n")
    if len(lines) > MAX_HEADER_LINES:
        deferred = deferred or SIPError("Too Many Header Lines", 513)
    first = lines[0]
    if first.endswith("\r"):
        first = first[:-1]
    headers = _fields(lines)
    if headers is None:
        headers = _fields(_unfold(lines))
        if headers is None:
            raise SIPError("Malformed Header Line")
    message: Message
    if first.startswith(_STATUS_LINE_PREFIX):
        parts = first.split(" ", 2)
        try:
            code = int(parts[1])
        except ValueError:
            raise SIPError("Malformed Status Line")
        if not 100 <= code <= 699:
            raise SIPError("Malformed Status Line")
        message = Response(code, parts[2] if len(parts) > 2 else "", headers, body, data)
    else:
        parts = first.split(" ")
        if len(parts) != 3:
            raise SIPError("Malformed Request Line")
        method = parts[0]
        if method not in _METHODS and not _TOKEN.match(method):
            raise SIPError("Malformed Request Line")
        version = parts[2].upper()
        if version != "SIP/2.0":
            if not _VERSION.match(version):
                raise SIPError("Malformed Request Line")
            deferred = deferred or SIPError("Version Not Supported", 505)
        message = Request(method, parts[1], headers, body)
    try:
        if deferred is not None:
            raise deferred
        message.body = _checkBody(headers, body)
    except SIPError as e:
        # The headers are sound, so the fault can still be answered.
        e.partial = message
        raise
    return message


def _fields(lines: list[str]) -> Optional[dict[str, list[str]]]:
    """
    The header fields of C{lines} (the start line first, skipped), or
    L{None} when a line continues another (RFC 3261 §7.3.1 folding) or
    has no colon: the caller unfolds the lines and asks again, and what
    still has no colon then is malformed.
    """
    headers: dict[str, list[str]] = {}
    canonical = _CANONICAL
    for line in lines[1:]:
        colon = line.find(":")
        if colon < 0:
            # A continuation line, or no header at all.
            return None
        raw = line[:colon]
        name = canonical.get(raw)
        if name is None:
            # A name as first written (the cache never holds one starting
            # with white space), or a continuation line.
            if line[:1] in (" ", "\t"):
                return None
            name = _headerName(raw)
        value = line[colon + 1 :]
        values = headers.get(name)
        if values is None:
            headers[name] = [value.strip()]
        else:
            values.append(value.strip())
    return headers


def _unfold(lines: list[str]) -> list[str]:
    """
    Join folded header lines (RFC 3261 §7.3.1: a line starting with white
    space continues the previous one) with a single space.
    """
    unfolded = [lines[0]]
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if len(unfolded) < 2:
                raise SIPError("Malformed Header Folding")
            unfolded[-1] = unfolded[-1].rstrip() + " " + line.strip()
        else:
            unfolded.append(line)
    return unfolded


def _headerName(raw: str) -> str:
    """
    The lower-case full name of a header written as C{raw}, remembered for
    the next message.
    """
    name = raw.strip().lower()
    if not name:
        raise SIPError("Malformed Header Line")
    name = COMPACT_FORMS.get(name, name)
    if len(_CANONICAL) < _CANONICAL_LIMIT and len(raw) <= _CANONICAL_NAME_LIMIT:
        _CANONICAL[raw] = name
    return name


def _checkBody(headers: dict[str, list[str]], body: bytes) -> bytes:
    values = headers.get("content-length")
    if not values:
        return body
    if len(values) > 1 and len(set(values)) > 1:
        raise SIPError("Conflicting Content-Length")
    try:
        length = int(values[0])
    except ValueError:
        raise SIPError("Invalid Content-Length")
    if length < 0:
        raise SIPError("Invalid Content-Length")
    if length > len(body):
        # RFC 3261 §18.3: over UDP this is a 400.
        raise SIPError("Content-Length Exceeds Body")
    if length < len(body) and body[length:].strip(b"\r\n"):
        # More than line-end padding after the body: the message and the
        # datagram disagree, and which of them is wrong cannot be told.
        # (RFC 3261 §18.3 would discard the rest; a registrar at the edge
        # answers 400 rather than act on a message that may have been cut
        # or smuggled.)
        raise SIPError("Body Exceeds Content-Length")
    return body[:length]


def splitCommas(values: list[str]) -> Iterator[str]:
    """
    Split header values at the commas that separate field values, not those
    inside quoted strings or angle brackets (RFC 3261 §7.3.1).
    """
    return iter(splitValues(values))


def splitValues(values: list[str]) -> list[str]:
    """
    L{splitCommas} as a list: C{values} itself in the common case of one
    value holding no comma.
    """
    if len(values) == 1 and "," not in values[0]:
        return values
    split: list[str] = []
    for value in values:
        if "," not in value:
            split.append(value)
        elif '"' in value:
            _splitQuoted(value, split)
        else:
            _splitUnquoted(value, split)
    return split


def _splitUnquoted(value: str, split: list[str]) -> None:
    """
    Append the comma-separated parts of C{value}, which holds no quoted
    string, to C{split}: a comma splits unless more C{<} than C{>} come
    before it.  It jumps from one of those three characters to the next,
    where L{_splitQuoted} reads every character, and splits the same.
    """
    start = 0
    depth = 0
    opening = value.find("<")
    closing = value.find(">")
    comma = value.find(",")
    while comma >= 0:
        while 0 <= opening < comma or 0 <= closing < comma:
            if closing < 0 or 0 <= opening < closing:
                depth += 1
                opening = value.find("<", opening + 1)
            else:
                depth -= 1
                closing = value.find(">", closing + 1)
        if depth == 0:
            split.append(value[start:comma].strip())
            start = comma + 1
        comma = value.find(",", comma + 1)
    split.append(value[start:].strip())


def _splitQuoted(value: str, split: list[str]) -> None:
    """
    Append the comma-separated parts of C{value} to C{split}, reading it a
    character at a time for its quoted strings and their escapes.
    """
    depth = 0
    quoted = False
    escaped = False
    start = 0
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            split.append(value[start:i].strip())
            start = i + 1
    split.append(value[start:].strip())


def parseParams(text: str) -> list[tuple[str, Optional[str]]]:
    """
    Parse C{;name=value;flag} parameters (the leading C{;} already removed).
    Names are lower-cased; values are kept as written.
    """
    params: list[tuple[str, Optional[str]]] = []
    if not text:
        return params
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if name:
            params.append((name.lower(), value.strip() if sep else None))
    return params


def renderParams(params: Iterable[tuple[str, Optional[str]]], skip: Container[str] = ()) -> str:
    """
    Render parameters back as C{;name=value;flag}, leaving out C{skip}.
    """
    if not params:
        return ""
    return "".join(
        [
            f";{key}" if value is None else f";{key}={value}"
            for key, value in params
            if key not in skip
        ]
    )


def findParam(params: Iterable[tuple[str, Optional[str]]], name: str) -> Optional[str]:
    """
    The value of parameter C{name} (lower-case) among parsed C{params}, or
    L{None} when it is absent or a flag.
    """
    for key, value in params:
        if key == name:
            return value
    return None


def splitHostPort(text: str) -> tuple[str, Optional[int]]:
    """
    Split C{host}, C{host:port}, C{[v6]} or C{[v6]:port}.

    @raise ValueError: on a malformed host or port.
    """
    portText: Optional[str]
    if "[" not in text:
        host, sep, digits = text.partition(":")
        if not sep:
            if not host:
                raise ValueError("empty host")
            return host, None
        if not host or not digits.isdigit():
            raise ValueError("bad host or port")
        number = int(digits)
        if not 0 < number < 65536:
            raise ValueError("bad port")
        return host, number
    close = text.find("]")
    if close < 0:
        raise ValueError("unclosed IPv6 reference")
    host = text[1:close]
    rest = text[close + 1 :]
    if rest and not rest.startswith(":"):
        raise ValueError("junk after IPv6 reference")
    portText = rest[1:] if rest else None
    if not host or not text.startswith("["):
        raise ValueError("empty host")
    port: Optional[int] = None
    if portText is not None:
        if not portText.isdigit():
            raise ValueError("bad port")
        port = int(portText)
        if not 0 < port < 65536:
            raise ValueError("bad port")
    return host, port


class Via:
    """
    One Via field value (RFC 3261 §20.42).

    @ivar sentBy: the host and port as written, for echoing back.
    """

    __slots__ = ("protocol", "host", "port", "params", "sentBy")

    def __init__(
        self,
        protocol: str,
        host: str,
        port: Optional[int],
        params: list[tuple[str, Optional[str]]],
        sentBy: str,
    ) -> None:
        self.protocol = protocol
        self.host = host
        self.port = port
        self.params = params
        self.sentBy = sentBy

    def __repr__(self) -> str:
        return f"Via({self.render()!r})"

    def param(self, name: str) -> Optional[str]:
        return findParam(self.params, name)

    def hasParam(self, name: str) -> bool:
        for key, _ in self.params:
            if key == name:
                return True
        return False

    def render(self, skip: Container[str] = (), add: str = "") -> str:
        """
        The value as parsed, leaving out the parameters named in C{skip}
        and ending with C{add} (rendered parameters).
        """
        return f"{self.protocol} {self.sentBy}{renderParams(self.params, skip)}{add}"


def parseVia(value: str) -> Via:
    """
    Parse one Via field value.

    @raise SIPError: when it is malformed.
    """
    protocol, _, rest = value.partition(" ")
    if protocol.upper().startswith("SIP/2.0/") and "/" not in protocol[8:]:
        rest = rest.strip()
    else:
        # The sent-protocol written with LWS around its slashes.
        match = _SENT_PROTOCOL.match(value)
        if match is None:
            raise SIPError("Malformed Via")
        protocol, rest = f"SIP/2.0/{match.group(1)}", match.group(2).strip()
    if not rest:
        raise SIPError("Malformed Via")
    sentBy, _, paramText = rest.partition(";")
    sentBy = sentBy.strip()
    try:
        host, port = splitHostPort(sentBy)
    except ValueError:
        raise SIPError("Malformed Via")
    return Via(protocol, host, port, parseParams(paramText), sentBy)


class URI:
    """
    The parts of a SIP URI that a registrar needs (RFC 3261 §19.1).

    @ivar text: the URI exactly as written.
    """

    __slots__ = ("text", "scheme", "user", "host", "port")

    def __init__(
        self, text: str, scheme: str, user: Optional[str], host: str, port: Optional[int]
    ) -> None:
        self.text = text
        self.scheme = scheme
        self.user = user
        self.host = host
        self.port = port

    def __eq__(self, other: object) -> bool:
        return isinstance(other, URI) and (
            self.text,
            self.scheme,
            self.user,
            self.host,
            self.port,
        ) == (other.text, other.scheme, other.user, other.host, other.port)

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"URI({self.text!r})"

    def addressOfRecord(self) -> str:
        """
        The canonical address-of-record form (RFC 3261 §10.3 step 5): scheme,
        user and host, without parameters or headers; host lower-cased.
        """
        host = self.host.lower()
        if ":" in host:
            host = f"[{host}]"
        if self.port is not None:
            host = f"{host}:{self.port}"
        if self.user is None:
            return f"{self.scheme}:{host}"
        return f"{self.scheme}:{self.user}@{host}"


def parseURI(text: str) -> URI:
    """
    Parse a C{sip:} or C{sips:} URI.

    @raise SIPError: when it is not one.
    """
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("sip", "sips"):
        raise SIPError("Unsupported URI Scheme")
    # Headers after '?', then parameters after ';' of the host part.
    if "?" in rest:
        rest = rest.partition("?")[0]
    user: Optional[str] = None
    at = rest.rfind("@")
    if at >= 0:
        user = rest[:at]
        if ":" in user:
            user = user.partition(":")[0]
        rest = rest[at + 1 :]
    if ";" in rest:
        rest = rest.partition(";")[0]
    try:
        host, port = splitHostPort(rest)
    except ValueError:
        raise SIPError("Malformed URI")
    return URI(text, scheme, user, host, port)


class NameAddr:
    """
    A From, To or Contact field value: an optional display name, a URI and
    header parameters.

    @ivar uri: the URI text; C{"*"} for the wildcard Contact.
    @ivar params: the header parameters, names lower-cased.
    """

    __slots__ = ("display", "uri", "params")

    def __init__(
        self, display: str, uri: str, params: tuple[tuple[str, Optional[str]], ...]
    ) -> None:
        self.display = display
        self.uri = uri
        self.params = params

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NameAddr) and (self.display, self.uri, self.params) == (
            other.display,
            other.uri,
            other.params,
        )

    def __hash__(self) -> int:
        return hash((self.display, self.uri, self.params))

    def __repr__(self) -> str:
        return f"NameAddr({self.display!r}, {self.uri!r}, {self.params!r})"

    def param(self, name: str) -> Optional[str]:
        return findParam(self.params, name)


def parseNameAddr(value: str) -> NameAddr:
    """
    Parse C{"Name" <uri>;params} or C{uri;params} (RFC 3261 §20.10).

    @raise SIPError: when it is malformed.
    """
    value = value.strip()
    lt = value.find("<")
    if lt >= 0:
        gt = value.find(">", lt)
        if gt < 0:
            raise SIPError("Unclosed Angle Bracket")
        display = value[:lt].strip() if lt else ""
        uri = value[lt + 1 : gt].strip()
        paramText = value[gt + 1 :]
        if paramText:
            paramText = paramText.strip()
            if paramText and not paramText.startswith(";"):
                raise SIPError("Junk After Address")
            paramText = paramText[1:]
    else:
        display = ""
        uri, _, paramText = value.partition(";")
        uri = uri.strip()
    if not uri:
        raise SIPError("Empty Address")
    return NameAddr(display, uri, tuple(parseParams(paramText)) if paramText else ())


def parseDeltaSeconds(text: str) -> int:
    """
    Parse an RFC 3261 delta-seconds value, clamping huge ones.

    @raise ValueError: when C{text} is not a non-negative integer.
    """
    text = text.strip()
    if not text.isdigit() or not text.isascii():
        raise ValueError(text)
    if len(text) > 10:
        # Past 2**32-1 whatever it is; int() of thousands of digits would
        # cost time, or fail on Python's conversion limit.
        return MAX_DELTA_SECONDS
    return min(int(text), MAX_DELTA_SECONDS)


def parseCSeq(value: str) -> tuple[int, str]:
    """
    Parse a CSeq value into its number and method.

    @raise SIPError: when it is malformed.
    """
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or not parts[0].isascii() or len(parts[0]) > 10:
        raise SIPError("Invalid CSeq")
    number = int(parts[0])
    if number > MAX_CSEQ:
        raise SIPError("Invalid CSeq")
    return number, parts[1]


#: Characters a trace escapes: C0 controls but tab, DEL, C1 controls (NEL
#: among them) and the Unicode line and paragraph separators, any of which
#: could forge a log line or drive the operator's terminal.
_TRACE_ESCAPES: Final = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
    if code != 0x09
}


def traceText(data: bytes) -> str:
    """
    A datagram as a SIP trace logs it: its lines (split at CRLF or LF)
    joined by newlines, every other control character escaped.
    """
    text = data.decode("utf-8", "replace")
    return "\n".join(line.translate(_TRACE_ESCAPES) for line in re.split(r"\r?\n", text))


#: Via parameters a response fills in (RFC 3581 §4).
_FILLED: Final = ("rport", "received")
_RECEIVED: Final = ("received",)

#: Headers a response copies from its request, in order.
_COPIED: Final = (("from", "From"), ("to", "To"), ("call-id", "Call-ID"), ("cseq", "CSeq"))


def topVia(request: Request) -> Via:
    """
    The top Via of C{request}, where its responses go.

    @raise Unanswerable: when there is none, or it is malformed.
    """
    values = request.headers.get("via")
    if not values:
        raise Unanswerable("no Via header")
    value = values[0]
    if "," in value:
        value = splitValues([value])[0]
    try:
        return parseVia(value)
    except SIPError as e:
        raise Unanswerable(e.reason)


def checkRequest(request: Request) -> tuple[Via, int]:
    """
    The checks every request must pass before anything acts on it
    (RFC 3261 §8.2): a usable top Via, the mandatory headers, and a CSeq
    whose method is the request's.

    @return: the top Via and the CSeq number.
    @raise Unanswerable: when no response could be addressed.
    @raise SIPError: naming the fault, to be answered: 400, 416 for a
        Request-URI scheme other than sip/sips, 420 for any Require.
    """
    via = topVia(request)
    headers = request.headers
    for name in ("from", "to", "call-id", "cseq"):
        values = headers.get(name)
        if not values:
            raise SIPError(f"Missing {name.title()} Header")
        if len(values) > 1:
            raise SIPError(f"Multiple {name.title()} Headers")
    number, method = parseCSeq(headers["cseq"][0])
    if method != request.method:
        raise SIPError("CSeq Method Mismatch")
    uri = request.uri
    if not uri.startswith(("sip:", "sips:")) and uri.partition(":")[0].lower() not in (
        "sip",
        "sips",
    ):
        # RFC 3261 §8.2.2.1.
        raise SIPError("Unsupported URI Scheme", 416)
    require = headers.get("require")
    if require and method not in ("ACK", "CANCEL"):
        # RFC 3261 §8.2.2.3: no extension is supported here.
        raise SIPError("Bad Extension", 420, f"Unsupported: {', '.join(splitCommas(require))}\r\n")
    return via, number


def _tagged(to: str, callId: Optional[str], cseq: Optional[str]) -> str:
    """
    The To value of a response: the request's, with a tag added when it
    has none.
    """
    # Header parameters follow the closing bracket (or the whole value
    # in the addr-spec form, whose URI cannot hold ';').
    params = to[to.rfind(">") + 1 :]
    if "=" in params and ";tag=" in params.lower().replace(" ", ""):
        return to
    # Deterministic, so a retransmission gets the same tag; in decimal, as
    # str() of an int is a native call where a hex format is not.
    return f"{to};tag={zlib.crc32(f'{callId}|{cseq}'.encode('utf-8', 'surrogateescape'))}"


def _copiedHeaders(fields: dict[str, list[str]]) -> str:
    """
    From, To, Call-ID and CSeq as a response copies them, leaving out any
    the request lacks.
    """
    callId = fields["call-id"][0] if "call-id" in fields else None
    cseq = fields["cseq"][0] if "cseq" in fields else None
    lines = []
    for name, title in _COPIED:
        values = fields.get(name)
        if values:
            value = values[0]
            if name == "to":
                value = _tagged(value, callId, cseq)
            lines.append(f"{title}: {value}\r\n")
    return "".join(lines)


def renderResponse(
    request: Request,
    via: Via,
    source: tuple[str, int],
    code: int,
    reason: str,
    extra: str = "",
    trailer: str = "Content-Length: 0\r\n\r\n",
) -> bytes:
    """
    The response to C{request}, which came from C{source}: every Via, the
    top one with C{received}/C{rport} filled in (RFC 3581 §4), From, To
    (tagged), Call-ID and CSeq copied.

    @param via: the parsed top Via (L{topVia}).
    @param extra: header lines to add, each ending in CRLF.
    @param trailer: the last header lines and the blank line (no body).
    """
    host = source[0]
    if via.hasParam("rport"):
        # RFC 3581 §4: fill rport, and always add received with it.
        top = via.render(_FILLED, f";received={host};rport={source[1]}")
    elif via.host != host:
        top = via.render(_RECEIVED, f";received={host}")
    else:
        top = via.render()
    fields = request.headers
    vias = fields["via"]
    others = ""
    if len(vias) > 1 or "," in vias[0]:
        others = "".join([f"Via: {value}\r\n" for value in splitValues(vias)[1:]])
    try:
        # One string build for the usual case, where all are present.
        callId = fields["call-id"][0]
        cseq = fields["cseq"][0]
        copied = (
            f"From: {fields['from'][0]}\r\nTo: {_tagged(fields['to'][0], callId, cseq)}\r\n"
            f"Call-ID: {callId}\r\nCSeq: {cseq}\r\n"
        )
    except KeyError:
        copied = _copiedHeaders(fields)
    text = f"SIP/2.0 {code} {reason}\r\nVia: {top}\r\n{others}{copied}{extra}{trailer}"
    return text.encode("utf-8")


_VIA_LINE: Final = b"\r\nVia: "


def withoutTopVia(response: Response, top: str) -> Optional[bytes]:
    """
    The datagram C{response} came in without its first Via field value,
    C{top}, and with every other byte as it came: all a proxy changes in a
    response it passes on (RFC 3261 §16.7 step 3).

    @return: L{None} unless the first header line is C{Via: } and its
        value C{top} alone or C{top} and a comma (not another spelling, the
        compact form, white space before the comma or a folded line): the
        caller renders the response instead.
    """
    data = response.data
    # The status line's end: its first LF, with a CR before it (a CRLF
    # found further on could be the body's).
    lineEnd = data.find(b"\n") - 1
    valueStart = lineEnd + len(_VIA_LINE)
    if lineEnd < 1 or data[lineEnd:valueStart] != _VIA_LINE:
        return None
    valueEnd = data.find(b"\r\n", valueStart)
    ours = top.encode("utf-8")
    end = valueStart + len(ours)
    if valueEnd < end or data[valueStart:end] != ours:
        return None
    if end == valueEnd:
        # natkeep's Via alone on its line: the line goes.
        return data[:lineEnd] + data[valueEnd:]
    if data[end : end + 1] != b",":
        return None
    rest = end + 1
    while data[rest : rest + 1] in (b" ", b"\t"):
        rest += 1
    if rest == valueEnd:
        return None
    return data[:valueStart] + data[rest:]


_VIA_TEXT: Final = "\r\nVia: "

#: Characters as numbers, for the scan of L{splitTopVia}.
_SPACE: Final = 0x20
_TAB: Final = 0x09
_CR: Final = 0x0D
_ONE: Final = 0x31
_SIX: Final = 0x36
_CASE_BIT: Final = 0x20
_LOWER_C: Final = 0x63
_LOWER_L: Final = 0x6C


def splitTopVia(data: bytes, mark: str = "") -> Optional[tuple[str, str, bytes]]:
    """
    Read a response datagram as a proxy passing it on needs it, without
    parsing it into a L{Response}: its first two Via field values, and the
    datagram without the first (as L{withoutTopVia} cuts it).

    It answers only where L{parseMessage} would accept the datagram and
    L{withoutTopVia} would cut the same bytes, and only for the common
    layout: an ASCII datagram with CRLF line ends, C{Via: } the first
    header line, the second Via value after a comma on that line or alone
    at the start of the next C{Via: } line, no quoted string in either, at
    most one Content-Length.  Whatever else, it declines, and the caller
    parses.  It declines, too, when the first Via value lacks C{mark}, which
    it learns before it reads the rest of the header block.

    @return: C{(first Via value, second Via value, datagram without the
        first)}, or L{None}.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        return None
    try:
        # Read with the native string methods, where bytes methods are
        # generic calls; in ASCII a character's index is its byte's.
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    headEnd = text.find("\r\n\r\n")
    # The status code: three digits from 100 to 699, then a space.
    if headEnd < 13 or not text.startswith("SIP/2.0 ") or ord(text[11]) != _SPACE:
        return None
    if not (_ONE <= ord(text[8]) <= _SIX and _isDigit(text, 9) and _isDigit(text, 10)):
        return None
    firstEnd = text.find("\n")
    if firstEnd < 12 or ord(text[firstEnd - 1]) != _CR:
        return None
    lineEnd = firstEnd - 1
    valueStart = lineEnd + len(_VIA_TEXT)
    if text[lineEnd:valueStart] != _VIA_TEXT:
        return None
    nextLine = text.find("\n", valueStart, headEnd)
    if nextLine < 0 or ord(text[nextLine - 1]) != _CR:
        return None
    valueEnd = nextLine - 1
    comma = text.find(",", valueStart, valueEnd)
    if comma >= 0:
        ours = text[valueStart:comma]
        rest = comma + 1
        while rest < valueEnd and ord(text[rest]) in (_SPACE, _TAB):
            rest += 1
        if rest == valueEnd:
            return None
        secondStart = rest
        secondLineEnd = valueEnd
        spliced = data[:valueStart] + data[rest:]
    else:
        ours = text[valueStart:valueEnd]
        secondStart = nextLine + 6
        if text[nextLine + 1 : secondStart] != "Via: ":
            return None
        secondLineEnd = text.find("\n", secondStart, headEnd)
        if secondLineEnd < 0:
            secondLineEnd = headEnd
        spliced = data[:lineEnd] + data[valueEnd:]
    if not ours or ours != ours.strip() or '"' in ours or mark not in ours:
        return None
    secondEnd = text.find(",", secondStart, secondLineEnd)
    second = text[secondStart : secondEnd if secondEnd >= 0 else secondLineEnd].strip()
    if not second or '"' in second:
        return None
    if not _wellFormed(text, firstEnd + 1, headEnd):
        return None
    return ours, second, spliced


def _isDigit(text: str, index: int) -> bool:
    return 0x30 <= ord(text[index]) <= 0x39


def _wellFormed(text: str, start: int, headEnd: int) -> bool:
    """
    Whether the header lines of C{text} from C{start} to C{headEnd}, and
    the body after them, pass what L{parseMessage} checks: each line a
    name and a colon, not too many lines, and at most one Content-Length,
    a number the body agrees with.  Stricter than the parser where that
    is cheaper: no name may start or end with white space or a control
    character (folding, or a name that may be empty).
    """
    lines = 1
    length = -1
    pos = start
    while pos <= headEnd:
        lineEnd = text.find("\n", pos, headEnd)
        if lineEnd < 0:
            lineEnd = headEnd
        lines += 1
        colon = text.find(":", pos, lineEnd)
        if colon <= pos or ord(text[pos]) <= _SPACE or ord(text[colon - 1]) <= _SPACE:
            return False
        size = colon - pos
        if size == 14 or size == 1:
            first = ord(text[pos]) | _CASE_BIT
            if (first == _LOWER_C and text[pos:colon].lower() == "content-length") or (
                size == 1 and first == _LOWER_L
            ):
                value = text[colon + 1 : lineEnd].strip()
                if length >= 0 or not value.isdigit():
                    return False
                length = int(value)
        pos = lineEnd + 1
    if lines > MAX_HEADER_LINES:
        return False
    if length >= 0:
        bodyStart = headEnd + 4
        body = len(text) - bodyStart
        if length > body:
            return False
        if length < body and text[bodyStart + length :].strip("\r\n"):
            return False
    return True


#: How header names are written when natkeep renders a message it relays;
#: any other is written with each dash-separated word capitalised.
_WRITTEN_NAMES: Final = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version",
    "rseq": "RSeq",
    "rack": "RAck",
    "sip-etag": "SIP-ETag",
    "sip-if-match": "SIP-If-Match",
}


def writtenName(name: str) -> str:
    """
    The conventional spelling of the lower-case header name C{name}.
    """
    written = _WRITTEN_NAMES.get(name)
    if written is None:
        written = "-".join(part.capitalize() for part in name.split("-"))
        # Remembered within the same bounds as the parser's name cache.
        if len(_WRITTEN_NAMES) < _CANONICAL_LIMIT and len(name) <= _CANONICAL_NAME_LIMIT:
            _WRITTEN_NAMES[name] = written
    return written


def renderMessage(startLine: str, headers: dict[str, list[str]], body: bytes) -> bytes:
    """
    A message from its start line, headers (lower-case names, values in
    order) and body.  C{Content-Length} is written from the body, whatever
    C{headers} says.
    """
    parts = [startLine, "\r\n"]
    known = _WRITTEN_NAMES
    for name, values in headers.items():
        if name == "content-length":
            continue
        written = known.get(name) or writtenName(name)
        for value in values:
            # Four appends: a native call each, where adding a tuple is a
            # generic one.
            parts.append(written)
            parts.append(": ")
            parts.append(value)
            parts.append("\r\n")
    parts.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(parts).encode("utf-8") + body
