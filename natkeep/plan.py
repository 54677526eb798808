"""
The capacity plan that C{twistd natkeep --check} prints: what the settings
mean for a deployment of a given size.
"""

from __future__ import annotations

import math
import time
from typing import Optional, TextIO

from natkeep.config import Settings, splitListen
from natkeep.interfaces import IPacer, IPayload
from natkeep.protocol import sentByFor
from natkeep.store import StoreError
from natkeep.stores import storedCount
from natkeep.strategies import adviceFor, chosenMakers, installedStrategies

#: IPv4 + UDP headers on the wire, for the bandwidth estimate.
UDP_OVERHEAD = 28


def printPlan(settings: Settings, devices: Optional[str], out: TextIO) -> int:
    """
    Write the capacity plan to C{out}.  The chosen payload gives the size
    of a heartbeat, and every installed pacing how often it reaches a
    device.

    @param devices: the C{--devices} value; when L{None}, the NATed bindings
        in the store are counted.
    @return: the exit status: 0, or 1 when the store cannot be read.
    """
    source = "--devices"
    if devices is None:
        try:
            count = storedCount(settings.db, time.time(), not settings.pingAll)
        except StoreError as e:
            out.write(f"natkeep: error: {e}\n")
            return 1
        if count is None:
            count, source = 0, f"no store at {settings.db}"
        else:
            source = f"store {settings.db}"
    else:
        count = int(devices)
    chosen = chosenMakers(settings)
    size = chosen[IPayload].heartbeatSize(settings) or 0
    paced = chosen[IPacer].pace(settings, count)
    perPeriod = count if paced is None else paced[0]
    rate = perPeriod / settings.period if size else 0.0
    batches = settings.batchesPerCycle
    lines = [
        "natkeep capacity plan (config is valid)",
        f"  SS_SIP_NAT_KEEP_ALIVE_MESSAGE        {settings.message!r} ({len(settings.message)} bytes), payload {settings.payload}",
        f"  SS_SIP_NAT_KEEP_ALIVE_PERIOD         {settings.period} s",
        f"  SS_SIP_NAT_KEEP_ALIVE_SEND_INTERVAL  {settings.sendInterval} ms",
        f"  SS_SIP_NAT_KEEP_ALIVE_SEND_ONE_TIME  {settings.sendOneTime} per batch",
        f"  SS_ENDPOINT_EXPIRE / _NAT_EXPIRE     {settings.endpointExpire} s / {settings.endpointNatExpire} s",
        f"  batches per cycle   ceil({settings.period}*1000/{settings.sendInterval}) = {batches}",
        f"  capacity per cycle  {batches} * {settings.sendOneTime} = {settings.capacity} devices",
        f"  devices             {count} ({source})",
        f"  heartbeat rate      {rate:.1f} /s average, bursts of up to "
        f"{min(count, settings.sendOneTime)} every {settings.sendInterval} ms",
        f"  bandwidth           {rate * (size + UDP_OVERHEAD) * 8 / 1000:.1f} kbit/s "
        f"({size} + {UDP_OVERHEAD} bytes per heartbeat)",
        "  per-device interval:",
    ]
    for name, maker in sorted(installedStrategies(IPacer).items()):
        marker = "*" if name == settings.pacing else " "
        described = maker.pace(settings, count)
        interval = "depends on the strategy" if described is None else described[1]
        lines.append(f"   {marker} {name:<8} {interval}")
    lines.append("  sockets (written into messages as):")
    for entry in settings.listen:
        address, advertise = splitListen(entry)
        lines.append(f"    {address:<24} {sentByFor(address, advertise)}")
    if settings.upstream is None:
        lines.append("  relay               off (no upstream): registrar only")
    else:
        lines.append(f"  relay               stateless proxy to upstream {settings.upstream}")
        domains = ", ".join(sorted(settings.domains)) or "any (no domains set)"
        lines.append(f"  domains served      {domains}")
        trusted = ", ".join(settings.trusted) or "none"
        lines.append(f"  trusted networks    {trusted}")
    if settings.registerMode == "forward":
        lines.extend(forwardLoad(settings, count))
    else:
        lines.append("  registration        local: natkeep is the registrar")
    if settings.rateLimit:
        exempt = ", ".join(settings.rateExempt) or "none"
        lines.append(
            f"  rate limit          {settings.rateLimit}/s per source IP, burst "
            f"{settings.rateBurst} (exempt: {exempt})"
        )
    else:
        lines.append("  rate limit          off")
    perSource = settings.maxBindingsPerSource or "no limit"
    total = settings.maxBindings or "no limit"
    lines.append(
        f"  binding caps        {settings.maxContacts} per AOR ({settings.contactsFull} past it), "
        f"{perSource} per source IP, {total} in all"
    )
    if settings.auth == "off":
        lines.append("  authentication      off: anyone may register any AOR")
    else:
        realm = settings.authRealm or "the host in To"
        lines.append(
            f"  authentication      {settings.auth} (digest {', '.join(settings.authAlgorithms)}, "
            f"realm {realm}, credentials {settings.credentials or 'none'})"
        )
    if settings.allow or settings.deny:
        lines.append(
            f"  may register        allow {', '.join(settings.allow) or 'any'}; "
            f"deny {', '.join(settings.deny) or 'none'}"
        )
    warnings = adviceFor(settings, count)
    for warning in warnings:
        lines.append(f"  warning: {warning}")
    if not warnings:
        lines.append("  no warnings")
    out.write("\n".join(lines) + "\n")
    return 0


def forwardLoad(settings: Settings, count: int) -> list[str]:
    """
    What forward mode spares the upstream: C{count} NATed devices each
    refreshing every SS_ENDPOINT_NAT_EXPIRE, of which natkeep forwards the
    one that finds the upstream's registration nearly out.
    """
    from natkeep.forward import MARGIN

    every = settings.endpointNatExpire
    # Refreshes until one finds less than its own grant and the margin left.
    oneIn = max(1, math.ceil((settings.upstreamExpires - every - MARGIN) / every))
    local = count / every
    return [
        f"  registration        forward to {settings.upstream} with Path; asks "
        f"{settings.upstreamExpires} s of it",
        f"  upstream load       {count} devices refreshing every {every} s: "
        f"{local:.1f} REGISTER/s at natkeep, {local / oneIn:.2f}/s upstream "
        f"(1 refresh in {oneIn}; {3600 / (oneIn * every):.2f} per device per hour)",
    ]
