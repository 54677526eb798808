"""
The settings: every parameter natkeep takes, where it comes from (defaults,
then the INI file, then the command line) and how it is checked.

VOS3000 parameters keep their VOS3000 names in the file so that settings
paste across; each also has a lower-case command-line option.  A wrong value
is a L{ConfigError} whose message is one line naming the key, the value and
what is allowed.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import math
import os
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs

from natkeep.nat import NAT_TESTS
from natkeep.sip import SIPError, parseURI, splitHostPort


class ConfigError(ValueError):
    """
    A setting is wrong.  The message is one line meant for the operator.
    """


@attrs.frozen
class Parameter:
    """
    One setting.

    @ivar key: its name in the config file.
    @ivar option: its long command-line option, without dashes.
    @ivar attribute: its attribute on L{Settings}.
    @ivar parse: turns the text from file or command line into the value,
        raising L{ValueError} with a description of what is allowed.
    @ivar allowed: what is allowed, for messages and documentation.
    """

    key: str
    option: str
    attribute: str
    default: Any
    parse: Callable[[str], Any]
    allowed: str
    help: str


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"not a whole number; allowed {low}..{high}")
        if not low <= value <= high:
            raise ValueError(f"out of range; allowed {low}..{high}")
        return value

    return parse


#: The most worker processes natkeep runs.
MAX_WORKERS = 64


def _workers(text: str) -> int:
    """
    C{auto} (one per core) or a count of worker processes.
    """
    if text.strip().lower() == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    return _integer(1, MAX_WORKERS)(text)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off", ""):
        return False
    raise ValueError("not a boolean; allowed yes/no, true/false, on/off, 1/0")


def _name(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("empty; allowed a strategy name (see --list-strategies)")
    return value


def _text(text: str) -> str:
    return text.strip()


def _optionalToken(text: str) -> Optional[str]:
    value = text.strip()
    if not value:
        return None
    if len(value) < 16 or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("at least 16 printable characters without spaces")
    return value


def _engines(text: str) -> tuple[str, ...]:
    values = []
    for part in text.replace(",", " ").split():
        scheme, _, rest = part.partition(":")
        host, _, port = rest.rpartition(":")
        if scheme.lower() != "udp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not udp:HOST:PORT")
        values.append(f"udp:{host}:{int(port)}")
    if not values:
        raise ValueError("no rtpengine given")
    return tuple(values)


def _oneOf(*values: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        value = text.strip().lower()
        if value not in values:
            raise ValueError(f"not one of {', '.join(values)}")
        return value

    return check


MAX_MESSAGE_BYTES = 1200


def decodeMessage(text: str) -> bytes:
    """
    Decode SS_SIP_NAT_KEEP_ALIVE_MESSAGE: the escapes C{\\r \\n \\t \\0 \\xHH
    \\\\} allow CRLF or binary payloads; other characters are UTF-8.

    @raise ValueError: on a bad escape or a payload over 1200 bytes.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        escape = text[i + 1 : i + 2]
        simple = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\"}
        if escape in simple:
            out += simple[escape]
            i += 2
        elif escape == "x":
            digits = text[i + 2 : i + 4]
            try:
                if len(digits) != 2:
                    raise ValueError
                out.append(int(digits, 16))
            except ValueError:
                raise ValueError(f"bad escape \\x{digits}; allowed \\r \\n \\t \\0 \\xHH \\\\")
            i += 4
        else:
            raise ValueError(f"bad escape \\{escape}; allowed \\r \\n \\t \\0 \\xHH \\\\")
    if len(out) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{len(out)} bytes; allowed 0..{MAX_MESSAGE_BYTES} bytes after escapes")
    return bytes(out)


def _message(text: str) -> bytes:
    # A VOS3000 file may quote the value to keep spaces; strip one pair.
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return decodeMessage(text)


def parseListenAddress(text: str) -> tuple[str, int]:
    """
    Parse C{HOST:PORT} or C{[V6]:PORT}.

    @raise ValueError: when it is not one.
    """
    try:
        host, port = splitHostPort(text.strip())
    except ValueError:
        port = None
    if port is None:
        raise ValueError("allowed HOST:PORT or [IPv6]:PORT, port 1..65535")
    return host, port


def isWildcard(host: str) -> bool:
    """
    Whether C{host} (bracketed or not) means every local address.
    """
    return host.strip("[]") in ("", "0.0.0.0", "::")


def _listen(text: str) -> tuple[str, ...]:
    parts = text.replace(",", " ").split()
    if not parts:
        raise ValueError("allowed one or more HOST:PORT")
    entries: list[str] = []
    while parts:
        address = parts.pop(0)
        parseListenAddress(address)
        if parts and parts[0].lower() == "advertise":
            parts.pop(0)
            if not parts:
                raise ValueError("advertise needs HOST:PORT after it")
            advertised = parts.pop(0)
            host, _ = parseListenAddress(advertised)
            if isWildcard(host):
                raise ValueError("advertise needs a routable address, not a wildcard")
            entries.append(f"{address} advertise {advertised}")
        else:
            entries.append(address)
    return tuple(entries)


def splitListen(entry: str) -> tuple[str, Optional[str]]:
    """
    One C{listen} entry as its bound address and its C{advertise} address
    (L{None} when it has none).
    """
    address, _, advertised = entry.partition(" advertise ")
    return address, advertised or None


def _upstream(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    if not text.lower().startswith("sip:"):
        text = "sip:" + text
    try:
        uri = parseURI(text)
    except SIPError:
        raise ValueError("allowed sip:HOST[:PORT] (UDP), or empty")
    if uri.user is not None or not uri.host:
        raise ValueError("allowed sip:HOST[:PORT] (UDP), without a user part")
    return text


def _serverHeader(text: str) -> str:
    value = text.strip()
    if len(value) > 128 or not all(c.isprintable() for c in value):
        raise ValueError("at most 128 printable characters")
    return value


def _algorithms(text: str) -> tuple[str, ...]:
    names = tuple(part.upper() for part in text.replace(",", " ").split())
    if not names or any(name not in ("SHA-256", "MD5") for name in names):
        raise ValueError("not a list of SHA-256, MD5")
    return names


def _optionalPath(text: str) -> Optional[str]:
    return text.strip() or None


def _domains(text: str) -> frozenset[str]:
    names = frozenset(part.lower() for part in text.replace(",", " ").split())
    for name in names:
        if not all(c.isalnum() or c in "-._[]:" for c in name):
            raise ValueError(f"{name!r} is not a domain; allowed domain names or addresses")
    return names


def _networks(text: str) -> tuple[str, ...]:
    parts = text.replace(",", " ").split()
    for part in parts:
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ValueError(f"{part!r} is not a network; allowed CIDR blocks such as 192.0.2.0/24")
    return tuple(parts)


def _optionalAddress(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    parseListenAddress(text)
    return text


def _natTests(text: str) -> frozenset[str]:
    tests = frozenset(text.replace(",", " ").split())
    unknown = tests - set(NAT_TESTS)
    if unknown:
        raise ValueError(
            f"unknown test {sorted(unknown)[0]!r}; allowed any of {', '.join(NAT_TESTS)}"
        )
    return tests


PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "SS_SIP_NAT_KEEP_ALIVE_MESSAGE",
        "message",
        "message",
        b"HELLO",
        _message,
        "0..1200 bytes after escapes",
        "Heartbeat payload, a raw UDP datagram; empty switches heartbeats off. "
        "Escapes \\r \\n \\t \\0 \\xHH \\\\.",
    ),
    Parameter(
        "SS_SIP_NAT_KEEP_ALIVE_PERIOD",
        "period",
        "period",
        30,
        _integer(10, 86400),
        "10..86400 s",
        "Seconds between the starts of two heartbeat cycles.",
    ),
    Parameter(
        "SS_SIP_NAT_KEEP_ALIVE_SEND_INTERVAL",
        "send-interval",
        "sendInterval",
        500,
        _integer(1, 60000),
        "1..60000 ms",
        "Milliseconds between two batches within a cycle.",
    ),
    Parameter(
        "SS_SIP_NAT_KEEP_ALIVE_SEND_ONE_TIME",
        "send-one-time",
        "sendOneTime",
        3000,
        _integer(1, 1000000),
        "1..1000000",
        "Heartbeats per batch.",
    ),
    Parameter(
        "SS_ENDPOINT_EXPIRE",
        "endpoint-expire",
        "endpointExpire",
        3600,
        _integer(60, 86400),
        "60..86400 s",
        "Longest registration granted to a device not behind NAT.",
    ),
    Parameter(
        "SS_ENDPOINT_NAT_EXPIRE",
        "endpoint-nat-expire",
        "endpointNatExpire",
        300,
        _integer(60, 86400),
        "60..86400 s",
        "Longest registration granted to a device behind NAT.",
    ),
    Parameter(
        "min_expires",
        "min-expires",
        "minExpires",
        60,
        _integer(1, 86400),
        "1..86400 s",
        "Shortest registration accepted; shorter gets 423.",
    ),
    Parameter(
        "read_pause",
        "read-pause",
        "readPause",
        1,
        _integer(0, 100),
        "0..100 ms",
        "After a read that empties a socket, wait this long before reading it again, "
        "so that a busy socket is read in batches; 0 reads at once.",
    ),
    Parameter(
        "listen",
        "listen",
        "listen",
        ("0.0.0.0:5060",),
        _listen,
        "HOST:PORT or [IPv6]:PORT, several allowed",
        "UDP address to listen on; repeat for several ([::]:5060 for IPv6).",
    ),
    Parameter(
        "workers",
        "workers",
        "workers",
        1,
        _workers,
        f"1..{MAX_WORKERS} or auto (one per core)",
        "Worker processes sharing the listening sockets (SO_REUSEPORT); each device is "
        "steered by its source IP to one worker, which holds its bindings and sends its "
        "heartbeats.  SEND_ONE_TIME is shared out among them.",
    ),
    Parameter(
        "upstream",
        "upstream",
        "upstream",
        None,
        _upstream,
        "sip:HOST[:PORT] or empty",
        "Softswitch or PBX to relay devices' requests to (UDP); empty: no relay, registrar only.",
    ),
    Parameter(
        "domains",
        "domains",
        "domains",
        frozenset(),
        _domains,
        "domain names, comma-separated, or empty",
        "Domains whose AORs natkeep serves; REGISTER for another gets 403.  Empty: any domain.",
    ),
    Parameter(
        "trusted",
        "trusted",
        "trusted",
        (),
        _networks,
        "CIDR blocks, comma-separated",
        "Sources besides registered devices and the upstream whose requests are relayed.",
    ),
    Parameter(
        "SS_MEDIA_PROXY_BEHIND_NAT",
        "media-proxy-behind-nat",
        "mediaProxy",
        False,
        _boolean,
        "yes or no (on/off, 1/0)",
        "Relay the media of every relayed call with a NATed device through rtpengine "
        "(offer, answer, delete over its ng protocol); off: SDP passes untouched.",
    ),
    Parameter(
        "rtpengine",
        "rtpengine",
        "rtpengine",
        ("udp:127.0.0.1:2223",),
        _engines,
        "udp:HOST:PORT, comma-separated",
        "rtpengine ng control sockets; a call goes to the one its Call-ID hashes to.",
    ),
    Parameter(
        "register_mode",
        "register-mode",
        "registerMode",
        "local",
        _oneOf("local", "forward"),
        "local or forward",
        "local: natkeep is the registrar.  forward: REGISTERs go on to upstream with "
        "Path (the upstream authenticates), and refreshes that change nothing are "
        "answered by natkeep.",
    ),
    Parameter(
        "upstream_expires",
        "upstream-expires",
        "upstreamExpires",
        3600,
        _integer(60, 86400),
        "60..86400 s",
        "With register_mode = forward: the registration natkeep asks of the upstream; "
        "a device's refreshes reach it about once per this.",
    ),
    Parameter(
        "rate_limit",
        "rate-limit",
        "rateLimit",
        200,
        _integer(0, 1_000_000),
        "0..1000000 per second",
        "Datagrams per second one source IP may send (token bucket, as pike); past it "
        "they are dropped unanswered.  0 turns the limit off.",
    ),
    Parameter(
        "rate_burst",
        "rate-burst",
        "rateBurst",
        400,
        _integer(1, 1_000_000),
        "1..1000000",
        "Datagrams one source IP may send at once before rate_limit applies.",
    ),
    Parameter(
        "rate_exempt",
        "rate-exempt",
        "rateExempt",
        ("127.0.0.0/8", "::1"),
        _networks,
        "CIDR blocks, comma-separated, or empty",
        "Sources the rate limit and max_bindings_per_source never apply to (local tools "
        "and monitoring).",
    ),
    Parameter(
        "max_contacts",
        "max-contacts",
        "maxContacts",
        16,
        _integer(1, 16),
        "1..16",
        "Bindings (Contacts) one AOR may hold; past it see contacts_full.",
    ),
    Parameter(
        "contacts_full",
        "contacts-full",
        "contactsFull",
        "replace",
        _oneOf("replace", "refuse"),
        "replace or refuse",
        "A new Contact for an AOR at max_contacts: replace the binding nearest to "
        "expiry, or refuse the REGISTER with 403.",
    ),
    Parameter(
        "max_bindings_per_source",
        "max-bindings-per-source",
        "maxBindingsPerSource",
        1000,
        _integer(0, 100_000_000),
        "0..100000000",
        "Bindings registered from one source IP (403 past it), bounding what a "
        "spoofed source can aim at a victim; 0 for no limit.",
    ),
    Parameter(
        "max_bindings",
        "max-bindings",
        "maxBindings",
        1_000_000,
        _integer(0, 100_000_000),
        "0..100000000",
        "Bindings in all (about 0.9 KB of memory each); past it a new binding "
        "gets 503 with Retry-After; 0 for no limit.",
    ),
    Parameter(
        "allow",
        "allow",
        "allow",
        (),
        _networks,
        "CIDR blocks, comma-separated, or empty",
        "Networks whose devices may register; empty allows any.",
    ),
    Parameter(
        "deny",
        "deny",
        "deny",
        (),
        _networks,
        "CIDR blocks, comma-separated, or empty",
        "Networks whose devices may not register (deny wins over allow).",
    ),
    Parameter(
        "auth",
        "auth",
        "auth",
        "off",
        _oneOf("off", "register", "all"),
        "off, register or all",
        "Digest authentication: off; register (REGISTER, queries and removals "
        "included); all (also the requests devices send through the relay, 407).",
    ),
    Parameter(
        "realm",
        "realm",
        "realm",
        None,
        _optionalPath,
        "a realm, or empty",
        "Digest realm; empty: the first of domains, else the host the request's To names.",
    ),
    Parameter(
        "credentials",
        "credentials",
        "credentials",
        None,
        _optionalPath,
        "a file path, or empty",
        "File of user:realm:algorithm:ha1 lines (natkeep passwd prints them), re-read on SIGHUP.",
    ),
    Parameter(
        "auth_algorithms",
        "auth-algorithms",
        "authAlgorithms",
        ("SHA-256", "MD5"),
        _algorithms,
        "SHA-256 and/or MD5, in order of preference",
        "Digest algorithms offered, one challenge each, strongest first (RFC 8760).",
    ),
    Parameter(
        "server_header",
        "server-header",
        "serverHeader",
        "natkeep",
        _serverHeader,
        "printable text, or empty for none",
        "The Server header of natkeep's responses; empty sends none.",
    ),
    Parameter(
        "db",
        "db",
        "db",
        "natkeep.sqlite",
        _text,
        "an SQLite file path, or a postgresql:// URI",
        "Where bindings are kept: an SQLite file, or a PostgreSQL database that "
        "several nodes may share (postgresql:///natkeep?host=/run/postgresql).",
    ),
    Parameter(
        "status",
        "status",
        "status",
        None,
        _optionalAddress,
        "HOST:PORT or empty",
        "HTTP status and metrics endpoint; off when empty.",
    ),
    Parameter(
        "payload",
        "payload",
        "payload",
        "raw",
        _name,
        "an installed payload name",
        "Heartbeat payload strategy (raw, crlf, options, ...).",
    ),
    Parameter(
        "pacing",
        "pacing",
        "pacing",
        "restart",
        _name,
        "an installed pacing name",
        "Heartbeat pacing strategy (restart, resume, spread, ...).",
    ),
    Parameter(
        "expiry",
        "expiry",
        "expiry",
        "cap",
        _name,
        "an installed expiry policy name",
        "Expiry policy (cap, fixed, liveness, ...).",
    ),
    Parameter(
        "liveness_misses",
        "liveness-misses",
        "livenessMisses",
        3,
        _integer(1, 100),
        "1..100",
        "With the liveness policy: unanswered heartbeats before removal.",
    ),
    Parameter(
        "unreachable_limit",
        "unreachable-limit",
        "unreachableLimit",
        3,
        _integer(0, 100),
        "0..100",
        "ICMP errors (port, host or network unreachable) drawn by a binding's "
        "heartbeats since its last REGISTER before it is removed; 0 never removes.",
    ),
    Parameter(
        "nat_detect",
        "nat-detect",
        "natDetect",
        frozenset(NAT_TESTS),
        _natTests,
        "any of via, private, contact",
        "NAT tests: via (source differs from Via sent-by), private (Contact host "
        "is a private address), contact (Contact differs from source).",
    ),
    Parameter(
        "ping_all",
        "ping-all",
        "pingAll",
        False,
        _boolean,
        "yes or no",
        "Send heartbeats to bindings not behind NAT too.",
    ),
    Parameter(
        "sip_trace",
        "sip-trace",
        "sipTrace",
        False,
        _boolean,
        "yes or no",
        "Log every SIP message in and out.",
    ),
    Parameter(
        "admin_token",
        "admin-token",
        "adminToken",
        None,
        _optionalToken,
        "16 or more printable characters, or empty",
        "Bearer token the /bindings admin API requires; empty: loopback clients only.",
    ),
    Parameter(
        "log_format",
        "log-format",
        "logFormat",
        "text",
        _oneOf("text", "json"),
        "text or json",
        "Log lines as text, or one JSON object per line.",
    ),
)

#: VOS3000 keys natkeep recognises but does not act on: accepted, with a
#: warning, so a VOS3000 file can be pasted whole.
IGNORED_KEYS = frozenset(
    {
        "SS_SIP_TIMEOUT_INVITE",
        "SS_SIP_STOP_SWITCH_AFTER_SDP",
        "SS_SIP_USER_AGENT_STOP_SWITCH_AFTER_INVITE_TIMEOUT",
        "SS_GATEWAY_SWITCH_LIMIT",
        "SS_GATEWAY_SWITCH_STOP_AFTER_RTP_START",
        "SS_SIP_SESSION_TTL",
    }
)

BY_KEY = {p.key: p for p in PARAMETERS}
BY_OPTION = {p.option: p for p in PARAMETERS}


def _normaliseKey(key: str) -> str:
    key = key.strip()
    if key.upper().startswith("SS_"):
        return key.upper()
    return key.lower().replace("-", "_")


#: Each setting's default, declared once, in L{PARAMETERS}.
_DEFAULTS: dict[str, Any] = {p.attribute: p.default for p in PARAMETERS}


@attrs.frozen
class Settings:
    """
    Checked settings, all parameters in their final types; each default is
    its L{Parameter}'s.
    """

    message: bytes = _DEFAULTS["message"]
    period: int = _DEFAULTS["period"]
    sendInterval: int = _DEFAULTS["sendInterval"]
    sendOneTime: int = _DEFAULTS["sendOneTime"]
    endpointExpire: int = _DEFAULTS["endpointExpire"]
    endpointNatExpire: int = _DEFAULTS["endpointNatExpire"]
    minExpires: int = _DEFAULTS["minExpires"]
    readPause: int = _DEFAULTS["readPause"]
    listen: tuple[str, ...] = _DEFAULTS["listen"]
    db: str = _DEFAULTS["db"]
    status: Optional[str] = _DEFAULTS["status"]
    upstream: Optional[str] = _DEFAULTS["upstream"]
    domains: frozenset[str] = _DEFAULTS["domains"]
    trusted: tuple[str, ...] = _DEFAULTS["trusted"]
    mediaProxy: bool = _DEFAULTS["mediaProxy"]
    rtpengine: tuple[str, ...] = _DEFAULTS["rtpengine"]
    registerMode: str = _DEFAULTS["registerMode"]
    upstreamExpires: int = _DEFAULTS["upstreamExpires"]
    rateLimit: int = _DEFAULTS["rateLimit"]
    rateBurst: int = _DEFAULTS["rateBurst"]
    workers: int = _DEFAULTS["workers"]
    rateExempt: tuple[str, ...] = _DEFAULTS["rateExempt"]
    maxContacts: int = _DEFAULTS["maxContacts"]
    contactsFull: str = _DEFAULTS["contactsFull"]
    maxBindingsPerSource: int = _DEFAULTS["maxBindingsPerSource"]
    maxBindings: int = _DEFAULTS["maxBindings"]
    allow: tuple[str, ...] = _DEFAULTS["allow"]
    deny: tuple[str, ...] = _DEFAULTS["deny"]
    serverHeader: str = _DEFAULTS["serverHeader"]
    auth: str = _DEFAULTS["auth"]
    realm: Optional[str] = _DEFAULTS["realm"]
    credentials: Optional[str] = _DEFAULTS["credentials"]
    authAlgorithms: tuple[str, ...] = _DEFAULTS["authAlgorithms"]
    payload: str = _DEFAULTS["payload"]
    pacing: str = _DEFAULTS["pacing"]
    expiry: str = _DEFAULTS["expiry"]
    livenessMisses: int = _DEFAULTS["livenessMisses"]
    unreachableLimit: int = _DEFAULTS["unreachableLimit"]
    adminToken: Optional[str] = attrs.field(default=_DEFAULTS["adminToken"], repr=False)
    logFormat: str = _DEFAULTS["logFormat"]
    natDetect: frozenset[str] = _DEFAULTS["natDetect"]
    pingAll: bool = _DEFAULTS["pingAll"]
    sipTrace: bool = _DEFAULTS["sipTrace"]

    @property
    def batchesPerCycle(self) -> int:
        """
        Send intervals that fit in one period: C{ceil(PERIOD*1000/INTERVAL)}.
        """
        return math.ceil(self.period * 1000 / self.sendInterval)

    @property
    def authRealm(self) -> Optional[str]:
        """
        The digest realm: C{realm}, else the first of C{domains} (sorted);
        C{None} when each request's To (From, proxied) names it.
        """
        return self.realm or (min(self.domains) if self.domains else None)

    @property
    def capacity(self) -> int:
        """
        The most devices one cycle can reach.
        """
        return self.batchesPerCycle * self.sendOneTime


def readConfigFile(path: str) -> tuple[dict[str, str], list[str]]:
    """
    Read an INI file of C{KEY = value} lines, with or without a section
    header.

    @return: the values by normalised key, and warnings to log.
    @raise ConfigError: when the file cannot be read, or holds an unknown key.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}")
    parser = configparser.ConfigParser(
        interpolation=None, strict=False, inline_comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    try:
        parser.read_string("[natkeep]\n" + text, source=path)
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid INI: {first}")
    values: dict[str, str] = {}
    warnings: list[str] = []
    for section in parser.sections():
        for rawKey, value in parser.items(section):
            key = _normaliseKey(rawKey)
            if key in IGNORED_KEYS:
                warnings.append(
                    f"{path}: {key} is a VOS3000 parameter natkeep accepts but does not act on"
                )
                continue
            if key not in BY_KEY:
                raise ConfigError(f"{path}: unknown key {rawKey}{_nearest(key)}")
            values[key] = value
    return values, warnings


def _nearest(key: str) -> str:
    known = list(BY_KEY) + sorted(IGNORED_KEYS)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(key.upper(), known, n=1, cutoff=0.3)
    return f"; did you mean {close[0]}?" if close else ""


def buildSettings(fileValues: Mapping[str, str], cliValues: Mapping[str, object]) -> Settings:
    """
    Merge defaults, file values (by key) and command-line values (by option
    name; text, or a list of text for C{listen}) into checked L{Settings}.

    @raise ConfigError: naming the key, the value and what is allowed.
    """
    chosen: dict[str, Any] = {}
    for parameter in PARAMETERS:
        source: Optional[str] = None
        raw: Any = None
        if parameter.option in cliValues and cliValues[parameter.option] is not None:
            raw = cliValues[parameter.option]
            source = f"--{parameter.option}"
        elif parameter.key in fileValues:
            raw = fileValues[parameter.key]
            source = parameter.key
        if source is None:
            continue
        if isinstance(raw, bool):
            chosen[parameter.attribute] = raw
            continue
        text = " ".join(raw) if isinstance(raw, (list, tuple)) else str(raw)
        try:
            chosen[parameter.attribute] = parameter.parse(text)
        except ValueError as e:
            raise ConfigError(f"{source} = {text!r} is invalid: {e}")
    settings = Settings(**chosen)
    if settings.auth != "off" and not settings.credentials:
        raise ConfigError(
            f"auth = {settings.auth} needs credentials = PATH (natkeep passwd prints its lines)"
        )
    if settings.registerMode == "forward":
        if settings.upstream is None:
            raise ConfigError("register_mode = forward needs upstream = sip:HOST[:PORT]")
        if settings.auth != "off":
            raise ConfigError(
                f"auth = {settings.auth} is invalid with register_mode = forward: the "
                "upstream authenticates (allowed: off)"
            )
    if settings.minExpires > min(settings.endpointExpire, settings.endpointNatExpire):
        raise ConfigError(
            f"min_expires = {settings.minExpires} is invalid: allowed at most "
            f"SS_ENDPOINT_EXPIRE and SS_ENDPOINT_NAT_EXPIRE "
            f"({min(settings.endpointExpire, settings.endpointNatExpire)})"
        )
    return settings


def sanityWarnings(settings: Settings, devices: Optional[int] = None) -> list[str]:
    """
    Advice that is not an error: settings that will work but are likely to
    let NAT mappings die or devices starve.  (Each strategy adds its own:
    L{natkeep.strategies.adviceFor}.)
    """
    warnings = []
    if settings.period * 5 > settings.endpointNatExpire:
        warnings.append(
            f"SS_SIP_NAT_KEEP_ALIVE_PERIOD = {settings.period} is above "
            f"SS_ENDPOINT_NAT_EXPIRE / 5 = {settings.endpointNatExpire / 5:g}"
        )
    if settings.period > 30:
        warnings.append(
            f"SS_SIP_NAT_KEEP_ALIVE_PERIOD = {settings.period} is above 30 s; many "
            f"consumer NATs drop idle UDP mappings sooner"
        )
    if devices is not None and devices > settings.capacity:
        warnings.append(
            f"{devices} devices exceed one cycle's capacity of {settings.capacity} "
            f"(ceil(PERIOD*1000/SEND_INTERVAL)*SEND_ONE_TIME); with pacing "
            f"{settings.pacing!r} some devices miss heartbeats"
        )
    return warnings


def iterOptionHelp() -> Iterable[tuple[str, str]]:
    """
    C{(option, help)} for every parameter, help naming the file key, the
    range and the default.
    """
    for p in PARAMETERS:
        default = p.default
        if isinstance(default, bytes):
            default = default.decode("utf-8", "backslashreplace")
        elif isinstance(default, (tuple, frozenset)):
            default = ",".join(sorted(default) if isinstance(default, frozenset) else default)
        yield p.option, f"{p.help} [file key {p.key}; {p.allowed}; default {default}]"
