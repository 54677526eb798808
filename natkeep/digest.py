"""
Digest authentication (RFC 3261 §22, RFC 8760 algorithms, C{qop=auth}).

L{Digest} challenges and checks requests.  Its nonces carry their own
expiry and an HMAC with a per-run secret, so a nonce costs no memory until
it is used; a used nonce's highest nonce-count is remembered in a bounded
table, so a replayed answer is refused.  Credentials are HA1 hashes,
never passwords, from an L{ICredentials} provider (L{CredentialsFile}
reads them from a file; a SQL table can stand behind the same interface).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from collections import OrderedDict
from typing import Callable, Iterable, Optional

from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from natkeep.counts import Counts
from natkeep.sip import Request, SIPError, parseNameAddr, parseURI

#: Algorithms by their RFC 8760 names, as hash functions.
ALGORITHMS: dict[str, Callable[[bytes], "hashlib._Hash"]] = {
    "SHA-256": hashlib.sha256,
    "MD5": hashlib.md5,
}

#: Seconds a nonce is good for; an answer with an older one gets a fresh
#: challenge with C{stale=true}.
NONCE_LIFETIME = 300

#: Nonces whose nonce-count is remembered at once.
MAX_NONCES = 65536


class ICredentials(Interface):
    """
    Where HA1 hashes come from.
    """

    def ha1(user: str, realm: str, algorithm: str) -> Optional[str]:
        """
        The hex HA1 (H(user:realm:password)) of C{user} in C{realm} for
        C{algorithm}, or C{None} when there is none.
        """


def ha1Of(user: str, realm: str, password: str, algorithm: str) -> str:
    """
    H(user:realm:password) in hex, for C{algorithm}.
    """
    return ALGORITHMS[algorithm](f"{user}:{realm}:{password}".encode("utf-8")).hexdigest()


def expectedResponse(
    algorithm: str,
    ha1: str,
    nonce: str,
    method: str,
    uri: str,
    qop: Optional[str] = None,
    nc: str = "",
    cnonce: str = "",
) -> str:
    """
    The C{response} a client must send (RFC 3261 §22.4, RFC 7616 §3.4.1):
    with C{qop=auth}, H(HA1:nonce:nc:cnonce:auth:HA2); without,
    H(HA1:nonce:HA2); HA2 = H(method:uri).
    """
    hash = ALGORITHMS[algorithm]
    ha2 = hash(f"{method}:{uri}".encode("utf-8")).hexdigest()
    if qop:
        text = f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}"
    else:
        text = f"{ha1}:{nonce}:{ha2}"
    return hash(text.encode("utf-8")).hexdigest()


def credentialsLine(user: str, realm: str, password: str, algorithm: str) -> str:
    """
    One line of a credentials file: C{user:realm:algorithm:ha1}.
    """
    for part in (user, realm):
        if ":" in part or not part or not part.isprintable():
            raise ValueError(f"{part!r} may not be empty or hold ':'")
    return f"{user}:{realm}:{algorithm}:{ha1Of(user, realm, password, algorithm)}"


@implementer(ICredentials)
class CredentialsFile:
    """
    HA1 hashes from a file of C{user:realm:algorithm:ha1} lines (C{#}
    starts a comment), read at start and on L{reload}.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._hashes: dict[tuple[str, str, str], str] = {}
        self.reload()

    def reload(self) -> None:
        """
        Read the file again.

        @raise ValueError: naming the line that is wrong, or the file when
            it cannot be read; the old hashes stay.
        """
        hashes: dict[tuple[str, str, str], str] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise ValueError(f"cannot read {self.path}: {e.strerror}")
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split(":")
            if len(parts) != 4 or parts[2].upper() not in ALGORITHMS:
                raise ValueError(f"{self.path}:{number}: expected user:realm:algorithm:ha1")
            user, realm, algorithm, digest = parts
            hashes[(user, realm, algorithm.upper())] = digest.lower()
        self._hashes = hashes

    def ha1(self, user: str, realm: str, algorithm: str) -> Optional[str]:
        return self._hashes.get((user, realm, algorithm))


def parseAuthorization(value: str) -> dict[str, str]:
    """
    The parameters of a C{Digest} credentials value, names lower-cased.

    @raise SIPError: 400 when it is not Digest or is malformed.
    """
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise SIPError("Unsupported Authorization Scheme")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        if eq < 0:
            raise SIPError("Malformed Authorization")
        name = rest[i:eq].strip().lower()
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            end = i + 1
            chars = []
            while end < n and rest[end] != '"':
                if rest[end] == "\\" and end + 1 < n:
                    end += 1
                chars.append(rest[end])
                end += 1
            if end >= n:
                raise SIPError("Malformed Authorization")
            params[name] = "".join(chars)
            i = end + 1
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[name] = rest[i:end].strip()
            i = end
        if len(params) > 20 or len(name) > 32:
            raise SIPError("Malformed Authorization")
    return params


class Digest:
    """
    Challenges and checks for one realm policy.

    @ivar algorithms: offered in this order (RFC 8760: the strongest
        first).
    @ivar realmFor: the realm for a request (the configured one, or the
        host its To names).
    """

    def __init__(
        self,
        clock: IReactorTime,
        credentials: ICredentials,
        algorithms: Iterable[str] = ("SHA-256", "MD5"),
        realm: Optional[str] = None,
        stats: Optional[Counts] = None,
        secret: Optional[bytes] = None,
    ) -> None:
        self.clock = clock
        self.credentials = credentials
        self.algorithms = tuple(algorithms)
        self.realm = realm
        self.stats: Counts = Counts() if stats is None else stats
        self._secret = secret or os.urandom(32)
        self._counts: OrderedDict[str, int] = OrderedDict()

    def adopt(self, previous: Digest) -> None:
        """
        Keep the nonces and nonce-counts of C{previous} good (a reload).
        """
        self._secret = previous._secret
        self._counts = previous._counts

    # Nonces

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._secret, data, hashlib.sha256).digest()[:12]

    def nonce(self) -> str:
        """
        A fresh nonce: its expiry time and some randomness, signed.
        """
        data = struct.pack("!d", self.clock.seconds() + NONCE_LIFETIME) + os.urandom(8)
        return base64.urlsafe_b64encode(data + self._mac(data)).decode("ascii").rstrip("=")

    def _nonceState(self, nonce: str) -> str:
        """
        C{"good"}, C{"stale"} (signed by this run but expired) or C{"bad"}.
        """
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return "bad"
        if len(raw) != 28 or not hmac.compare_digest(raw[16:], self._mac(raw[:16])):
            return "bad"
        (expires,) = struct.unpack("!d", raw[:8])
        return "good" if self.clock.seconds() <= expires else "stale"

    # Challenge and check

    def realmFor(self, request: Request, proxy: bool = False) -> str:
        """
        The configured realm, else the domain of the user who must
        authenticate: To's for a REGISTER, From's for a proxied request.
        """
        if self.realm:
            return self.realm
        try:
            header = "from" if proxy else "to"
            return parseURI(parseNameAddr(request.headers[header][0]).uri).host.lower()
        except (SIPError, KeyError):
            return "natkeep"

    def challenge(self, request: Request, proxy: bool, stale: bool = False) -> SIPError:
        """
        The 401 (or 407 for C{proxy}) that asks for credentials, one
        challenge header per algorithm.
        """
        realm = self.realmFor(request, proxy)
        nonce = self.nonce()
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        lines = "".join(
            f'{name}: Digest realm="{realm}", nonce="{nonce}", algorithm={algorithm}, '
            f'qop="auth"{", stale=true" if stale else ""}\r\n'
            for algorithm in self.algorithms
        )
        self.stats["auth.challenges"] += 1
        if proxy:
            return SIPError("Proxy Authentication Required", 407, lines)
        return SIPError("Unauthorized", 401, lines)

    def check(self, request: Request, proxy: bool = False) -> str:
        """
        The user C{request} authenticates as.

        @raise SIPError: a 401/407 challenge when it carries no valid
            answer (a wrong one, an unknown user and a replay alike), with
            C{stale=true} for a good answer to an expired nonce.
        """
        header = "proxy-authorization" if proxy else "authorization"
        realm = self.realmFor(request, proxy)
        values = request.headers.get(header, [])
        for value in values:
            try:
                params = parseAuthorization(value)
            except SIPError:
                continue
            if params.get("realm") != realm:
                continue
            user, stale = self._verify(request, params, realm)
            if stale:
                raise self.challenge(request, proxy, stale=True)
            if user is not None:
                self.stats["auth.ok"] += 1
                return user
        if values:
            self.stats["auth.failures"] += 1
        raise self.challenge(request, proxy)

    def _verify(
        self, request: Request, params: dict[str, str], realm: str
    ) -> tuple[Optional[str], bool]:
        """
        The user a right answer authenticates (or C{None}), and whether it
        was a right answer to an expired nonce.
        """
        algorithm = params.get("algorithm", "MD5").upper()
        if algorithm not in self.algorithms:
            return None, False
        user = params.get("username", "")
        nonce = params.get("nonce", "")
        response = params.get("response", "").lower()
        uri = params.get("uri", "")
        qop = params.get("qop")
        if not user or not nonce or not response or not uri:
            return None, False
        state = self._nonceState(nonce)
        if state == "bad":
            return None, False
        # The user's HA1, or a stand-in so an unknown user costs the same.
        known = self.credentials.ha1(user, realm, algorithm)
        ha1 = known or ALGORITHMS[algorithm](os.urandom(16)).hexdigest()
        nc = params.get("nc", "")
        cnonce = params.get("cnonce", "")
        count = 0
        if qop is not None:
            if qop.lower() != "auth" or len(nc) != 8 or not cnonce:
                return None, False
            try:
                count = int(nc, 16)
            except ValueError:
                return None, False
        expected = expectedResponse(
            algorithm, ha1, nonce, request.method, uri, qop and "auth", nc, cnonce
        )
        if not hmac.compare_digest(expected.encode("ascii"), response.encode("ascii", "replace")):
            return None, False
        if known is None:
            return None, False
        if state == "stale":
            return None, True
        if qop is not None:
            last = self._counts.get(nonce, 0)
            if count <= last:
                self.stats["auth.replays"] += 1
                return None, False
            self._counts[nonce] = count
            self._counts.move_to_end(nonce)
            while len(self._counts) > MAX_NONCES:
                self._counts.popitem(last=False)
        return user, False
