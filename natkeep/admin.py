"""
The desk: live binding admin over HTTP, on the status listener.

C{GET /bindings} lists bindings (filters C{aor}, C{source}, C{nat}; paged by
C{offset} and C{limit}); C{GET /bindings/<aor>} shows one AOR's bindings;
C{DELETE /bindings/<aor>} removes them (C{?contact=<uri>} just one).  It
acts on the live table, so heartbeats stop at once, and commits the
removal to the store before answering.

Who may call it: without an C{admin_token}, clients on loopback only; with
one, any client that sends it as C{Authorization: Bearer <token>} (checked
in constant time), and no one without it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from natkeep.bindings import Binding, BindingTable
from natkeep.counts import Counts
from natkeep.guard import inNetworks, networks
from natkeep.sip import SIPError, parseURI

#: Bindings one page lists unless C{limit} asks for fewer (or more, up to
#: L{MAX_LIMIT}).
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000


#: The methods the admin API takes.
_METHODS = (b"GET", b"HEAD", b"DELETE")


class AdminError(Exception):
    """
    A request the admin API refuses, with its HTTP status.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


#: The loopback networks, where the admin API is open without a token.
LOOPBACK = networks(("127.0.0.0/8", "::1"))


def isLoopback(host: str) -> bool:
    """
    Whether C{host} (a client address) is a loopback address, IPv4-mapped
    IPv6 included.
    """
    return inNetworks(LOOPBACK, host)


def canonicalAOR(text: str) -> str:
    """
    An AOR as an operator gives it (C{sip:1001@example.com}, or without the
    scheme) in the table's canonical form.

    @raise AdminError: 400 when it is not a SIP URI.
    """
    text = text.strip()
    if not text.lower().startswith(("sip:", "sips:")):
        text = "sip:" + text
    try:
        return parseURI(text).addressOfRecord()
    except SIPError as e:
        raise AdminError(400, f"not an AOR: {text!r} ({e.reason})")


def describe(binding: Binding, now: float) -> dict[str, Any]:
    """
    One binding as the admin API shows it.
    """
    host, port = binding.source
    return {
        "aor": binding.aor,
        "contact": binding.uri,
        "params": binding.params,
        "source": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "listener": binding.listener.address,
        "nat": binding.nat,
        "expires_in": max(0, round(binding.expiresAt - now)),
        "call_id": binding.callId,
        "cseq": binding.cseq,
    }


def _sourceMatcher(text: str) -> Callable[[tuple[str, int]], bool]:
    """
    A test of a binding's source against C{HOST} or C{HOST:PORT}
    (C{[v6]:PORT} for IPv6).
    """
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        wanted = ipaddress.ip_address(host)
        number = int(port) if port else None
    except ValueError:
        raise AdminError(400, f"source must be HOST or HOST:PORT, not {text!r}")

    def matches(source: tuple[str, int]) -> bool:
        try:
            if ipaddress.ip_address(source[0]) != wanted:
                return False
        except ValueError:
            return False
        return number is None or source[1] == number

    return matches


def _argument(request: Request, name: str) -> Optional[str]:
    values: list[bytes] = (request.args or {}).get(name.encode("ascii")) or []
    if not values:
        return None
    return values[-1].decode("utf-8", "replace")


def _number(request: Request, name: str, default: int, high: int) -> int:
    text = _argument(request, name)
    if text is None:
        return default
    try:
        value = int(text)
        if not 0 <= value <= high:
            raise ValueError
    except ValueError:
        raise AdminError(400, f"{name} must be a whole number 0..{high}, not {text!r}")
    return value


class BindingsAdmin(Resource):
    """
    C{/bindings}: the admin API.

    @ivar table: the live binding table.
    @ivar clock: for remaining expiry.
    @ivar commit: makes removals durable (the store's commit, with the
        answers held for it).
    @ivar token: the bearer token callers must send, or C{None} for
        loopback callers only.
    @ivar stats: counts C{admin.removed}.
    """

    isLeaf = True

    def __init__(
        self,
        table: BindingTable,
        clock: IReactorTime,
        commit: Callable[[], None],
        token: Optional[str] = None,
        stats: Optional[Counts] = None,
    ) -> None:
        super().__init__()
        self.table = table
        self.clock = clock
        self.commit = commit
        self.token = token or None
        self.stats: Counts = Counts() if stats is None else stats

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        try:
            self._authorise(request)
            if request.method not in _METHODS:
                request.setHeader(b"allow", b"GET, HEAD, DELETE")
            result = self._dispatch(request)
        except AdminError as e:
            request.setResponseCode(e.status)
            result = {"error": str(e)}
        body = json.dumps(result, indent=2).encode("utf-8") + b"\n"
        return b"" if request.method == b"HEAD" else body

    def _authorise(self, request: Request) -> None:
        authorise(request, self.token)

    def answer(
        self, method: bytes, postpath: list[bytes], args: dict[bytes, list[bytes]]
    ) -> tuple[int, dict[str, Any]]:
        """
        The status and body of an admin request already authorised (a
        worker answering for its parent, which checked the caller).
        """
        request: Any = _Forwarded(method, postpath, args)
        try:
            return 200, self._dispatch(request)
        except AdminError as e:
            return e.status, {"error": str(e)}

    def _dispatch(self, request: Request) -> dict[str, Any]:
        if request.method in (b"GET", b"HEAD"):
            return self._get(request)
        if request.method == b"DELETE":
            return self._delete(request)
        raise AdminError(405, "only GET and DELETE")

    def _path(self, request: Request) -> Optional[str]:
        parts = [part for part in request.postpath or [] if part]
        if not parts:
            return None
        if len(parts) > 1:
            raise AdminError(404, "no such resource")
        return canonicalAOR(parts[0].decode("utf-8", "replace"))

    def _get(self, request: Request) -> dict[str, Any]:
        now = self.clock.seconds()
        aor = self._path(request)
        if aor is not None:
            bindings = self._live(aor)
            if not bindings:
                raise AdminError(404, f"no bindings for {aor}")
            return {"aor": aor, "bindings": [describe(b, now) for b in bindings]}
        return self._list(request, now)

    def _live(self, aor: str) -> list[Binding]:
        now = self.clock.seconds()
        return [b for b in self.table.lookup(aor) if b.expiresAt > now]

    def _list(self, request: Request, now: float) -> dict[str, Any]:
        offset = _number(request, "offset", 0, 2**31)
        limit = _number(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        tests: list[Callable[[Binding], bool]] = []
        aor = _argument(request, "aor")
        if aor is not None:
            wanted = canonicalAOR(aor)
            tests.append(lambda b: b.aor == wanted)
        source = _argument(request, "source")
        if source is not None:
            matches = _sourceMatcher(source)
            tests.append(lambda b: matches(b.source))
        nat = _argument(request, "nat")
        if nat is not None:
            flag = nat.strip().lower()
            if flag not in ("yes", "no", "true", "false", "1", "0"):
                raise AdminError(400, f"nat must be yes or no, not {nat!r}")
            natOnly = flag in ("yes", "true", "1")
            tests.append(lambda b: b.nat == natOnly)
        chosen = [b for b in self.table if b.expiresAt > now and all(test(b) for test in tests)]
        chosen.sort(key=lambda b: (b.aor, b.uri))
        return {
            "total": len(chosen),
            "offset": offset,
            "limit": limit,
            "bindings": [describe(b, now) for b in chosen[offset : offset + limit]],
        }

    def _delete(self, request: Request) -> dict[str, Any]:
        aor = self._path(request)
        if aor is None:
            raise AdminError(405, "DELETE names an AOR: /bindings/<aor>")
        bindings = self._live(aor)
        contact = _argument(request, "contact")
        if contact is not None:
            bindings = [b for b in bindings if b.uri == contact.strip()]
        if not bindings:
            raise AdminError(404, f"no bindings for {aor}" + (f" {contact}" if contact else ""))
        for binding in bindings:
            self.table.remove(binding)
        self.commit()
        self.stats["admin.removed"] += len(bindings)
        return {"aor": aor, "removed": [b.uri for b in bindings]}


class _Forwarded:
    """
    What L{BindingsAdmin} reads of a request, for one a parent forwarded.
    """

    def __init__(
        self, method: bytes, postpath: list[bytes], args: dict[bytes, list[bytes]]
    ) -> None:
        self.method = method
        self.postpath = postpath
        self.args = args


def authorise(request: Request, token: Optional[str]) -> None:
    """
    Refuse C{request} unless it may use the admin API: a loopback client
    when there is no C{token}, else one that sends it as a bearer token.

    @raise AdminError: 403 or 401.
    """
    if token is None:
        peer: Any = request.getClientAddress()
        if not isLoopback(getattr(peer, "host", "")):
            raise AdminError(403, "admin API is for loopback clients unless admin_token is set")
        return
    raw = request.getHeader(b"authorization") or b""
    given = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    scheme, _, credential = given.partition(" ")
    if not (
        scheme.lower() == "bearer"
        and hmac.compare_digest(credential.strip().encode("utf-8"), token.encode("utf-8"))
    ):
        request.setHeader(b"www-authenticate", b'Bearer realm="natkeep"')
        raise AdminError(401, "a valid admin token is required")


class WorkersAdmin(Resource):
    """
    C{/bindings} on the parent of several workers: each request, once
    authorised here, is asked of every worker (each answers for its own
    table), and the answers are merged: the listings into one, sorted and
    paged as one table would be; an AOR's bindings, or their removal, from
    whichever workers hold them.

    @ivar ask: sends a request to every running worker and fires with
        their answers (C{{"status": ..., "body": ...}} each).
    """

    isLeaf = True

    def __init__(
        self,
        ask: Callable[[dict[str, Any]], Deferred[list[dict[str, Any]]]],
        token: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.ask = ask
        self.token = token or None

    def render(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        method = request.method
        try:
            authorise(request, self.token)
            if method not in _METHODS:
                request.setHeader(b"allow", b"GET, HEAD, DELETE")
                raise AdminError(405, "only GET and DELETE")
            postpath = [part for part in request.postpath or [] if part]
            args = dict(request.args or {})
            page: Optional[tuple[int, int]] = None
            if method != b"DELETE" and not postpath:
                page = (
                    _number(request, "offset", 0, 2**31),
                    _number(request, "limit", DEFAULT_LIMIT, MAX_LIMIT),
                )
                # Every worker's first offset+limit, merged, give the page.
                args[b"offset"] = [b"0"]
                args[b"limit"] = [str(min(MAX_LIMIT, page[0] + page[1])).encode()]
        except AdminError as e:
            return self._finish(request, e.status, {"error": str(e)}, immediate=True)
        question = {
            "admin": {
                "method": method.decode("ascii"),
                "postpath": [p.decode("utf-8", "surrogateescape") for p in postpath],
                "args": {
                    k.decode("utf-8", "surrogateescape"): [
                        v.decode("utf-8", "surrogateescape") for v in values
                    ]
                    for k, values in args.items()
                },
            }
        }

        def merged(answers: list[dict[str, Any]]) -> None:
            status, body = _merge(answers, method, page)
            self._finish(request, status, body)

        def failed(failure: Any) -> None:
            self._finish(request, 503, {"error": failure.getErrorMessage()})

        self.ask(question).addCallbacks(merged, failed)
        return NOT_DONE_YET

    def _finish(
        self, request: Request, status: int, body: dict[str, Any], immediate: bool = False
    ) -> bytes:
        data = b"" if request.method == b"HEAD" else json.dumps(body, indent=2).encode() + b"\n"
        request.setResponseCode(status)
        if immediate:
            return data
        if not request.finished and not getattr(request, "_disconnected", False):
            request.write(data)
            request.finish()
        return b""


def _merge(
    answers: list[dict[str, Any]], method: bytes, page: Optional[tuple[int, int]]
) -> tuple[int, dict[str, Any]]:
    """
    One answer from the workers' C{answers}.
    """
    if not answers:
        return 503, {"error": "no worker is running"}
    for answer in answers:
        if answer.get("status") in (400, 405):
            return int(answer["status"]), answer.get("body") or {}
    found = [a.get("body") or {} for a in answers if a.get("status") == 200]
    if page is not None:
        offset, limit = page
        bindings = sorted(
            (b for body in found for b in body.get("bindings", [])),
            key=lambda b: (b.get("aor", ""), b.get("contact", "")),
        )
        return 200, {
            "total": sum(body.get("total", 0) for body in found),
            "offset": offset,
            "limit": limit,
            "bindings": bindings[offset : offset + limit],
        }
    if not found:
        first = answers[0]
        return int(first.get("status", 404)), first.get("body") or {}
    merged: dict[str, Any] = {"aor": found[0].get("aor")}
    key = "removed" if method == b"DELETE" else "bindings"
    merged[key] = [item for body in found for item in body.get(key, [])]
    return 200, merged
