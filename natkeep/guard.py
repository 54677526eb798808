"""
The guard: who may talk to natkeep, and how much.

L{SourceLimiter} is a token bucket per source IP over every datagram (as
Kamailio's pike is), in a table of bounded size: past the limit datagrams
are dropped without an answer (an answer would make natkeep a reflector),
counted, and logged once per source per minute.  L{SourceFilter} holds the
C{allow}/C{deny} networks for who may register.  L{BindingCaps} holds
how many bindings one AOR, one source and the whole table may hold; the
registrar applies it.

Both sit in front of the parser and the registrar, and know nothing of
either.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Final, Iterable, Optional, Union

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from natkeep.counts import Counts

log = Logger(namespace="natkeep.guard")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Sources the limiter tracks at once; the least recently seen leaves first.
MAX_SOURCES: Final = 65536

#: Seconds between two log lines about the same limited source.
LOG_EVERY: Final = 60.0


def networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """
    Parse CIDR blocks (an address alone is its own /32 or /128).
    """
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


def inNetworks(blocks: tuple[Network, ...], host: str) -> bool:
    """
    Whether the address C{host} (IPv4-mapped IPv6 read as IPv4) lies in one
    of C{blocks}; a host that is no address lies in none.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in block for block in blocks)


class SourceLimiter:
    """
    A token bucket per source IP: C{rate} datagrams a second, C{burst} at
    once.  C{rate} 0 turns it off.  Sources in C{exempt} are never limited.

    @ivar stats: counts C{dropped.rate-limited}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: float,
        burst: int,
        exempt: Iterable[str] = (),
        stats: Optional[Counts] = None,
        capacity: int = MAX_SOURCES,
    ) -> None:
        self.clock = clock
        self.stats: Counts = Counts() if stats is None else stats
        self.capacity = capacity
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._exemptCache: dict[str, bool] = {}
        self._logged: OrderedDict[str, float] = OrderedDict()
        self.configure(rate, burst, exempt)

    def configure(self, rate: float, burst: int, exempt: Iterable[str] = ()) -> None:
        """
        Take new limits; buckets already filled keep their tokens.
        """
        self.rate = float(rate)
        self.burst = float(max(1, burst))
        self.exempt = networks(exempt)
        self._exemptCache.clear()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def admit(self, host: str) -> bool:
        """
        Whether a datagram from C{host} may be handled now; one token less
        if so.
        """
        buckets = self._buckets
        now = self.clock.seconds()
        bucket = buckets.get(host)
        if bucket is None:
            exempt = self._exemptCache.get(host)
            if exempt is None:
                exempt = inNetworks(self.exempt, host)
                if len(self._exemptCache) < self.capacity:
                    self._exemptCache[host] = exempt
            if exempt:
                return True
            if len(buckets) >= self.capacity:
                buckets.popitem(last=False)
            buckets[host] = [self.burst - 1.0, now]
            return True
        buckets.move_to_end(host)
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        self._limited(host, now)
        return False

    def _limited(self, host: str, now: float) -> None:
        self.stats["dropped.rate-limited"] += 1
        last = self._logged.get(host)
        if last is not None and now - last < LOG_EVERY:
            return
        self._logged[host] = now
        self._logged.move_to_end(host)
        while len(self._logged) > 4096:
            self._logged.popitem(last=False)
        log.warn(
            "Rate limit: dropping datagrams from {host} (over {rate}/s, burst {burst}); "
            "next report in a minute",
            host=host,
            rate=self.rate,
            burst=int(self.burst),
        )


class SourceFilter:
    """
    Who may register: not a C{deny} network, and a C{allow} network when
    any is given.
    """

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.configure(allow, deny)

    def configure(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = networks(allow)
        self.deny = networks(deny)

    def allowed(self, host: str) -> bool:
        if self.deny and inNetworks(self.deny, host):
            return False
        if self.allow:
            return inNetworks(self.allow, host)
        return True


class BindingCaps:
    """
    How many bindings natkeep holds: per AOR, per source IP, in all.

    @ivar perAOR: bindings one AOR may hold.
    @ivar replace: past C{perAOR}, whether a new Contact replaces the AOR's
        binding nearest to expiry (the least recently refreshed) rather
        than being refused with 403.
    @ivar perSource: bindings registered from one source IP, 0 for no
        limit: it bounds how much a spoofed source can aim at one victim.
        Sources in C{exempt} are not counted against it.
    @ivar total: bindings in all, 0 for no limit; past it a new binding
        gets 503 with C{Retry-After: retryAfter}.
    """

    def __init__(
        self,
        perAOR: int = 16,
        replace: bool = True,
        perSource: int = 0,
        total: int = 0,
        exempt: tuple[Network, ...] = (),
        retryAfter: int = 60,
    ) -> None:
        self.perAOR = perAOR
        self.replace = replace
        self.perSource = perSource
        self.total = total
        self.exempt = exempt
        self.retryAfter = retryAfter
        self._exemptCache: dict[str, bool] = {}

    def configure(
        self, perAOR: int, replace: bool, perSource: int, total: int, exempt: Iterable[str] = ()
    ) -> None:
        self.perAOR = perAOR
        self.replace = replace
        self.perSource = perSource
        self.total = total
        self.exempt = networks(exempt)
        self._exemptCache.clear()

    def countsSource(self, host: str) -> bool:
        """
        Whether bindings from C{host} count against C{perSource}.
        """
        if not self.perSource:
            return False
        exempt = self._exemptCache.get(host)
        if exempt is None:
            exempt = inNetworks(self.exempt, host)
            if len(self._exemptCache) < MAX_SOURCES:
                self._exemptCache[host] = exempt
        return not exempt
