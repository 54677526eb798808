"""
The capacity plan that C{twistd natkeep --check} prints: what the settings
mean for a deployment of a given size.
"""

from __future__ import annotations

import math
import time
from typing import Optional, TextIO

from natkeep.config import Settings, sanityWarnings
from natkeep.store import StoreError, storedCount

#: IPv4 + UDP headers on the wire, for the bandwidth estimate.
UDP_OVERHEAD = 28

#: The size of a typical C{options} heartbeat, for the bandwidth estimate.
OPTIONS_SIZE = 330


def payloadSize(settings: Settings) -> int:
    """
    The bytes one heartbeat carries with these settings.
    """
    if settings.payload == "crlf":
        return 4
    if settings.payload == "options":
        return OPTIONS_SIZE
    return len(settings.message)


def deviceInterval(settings: Settings, pacing: str, devices: int) -> str:
    """
    How often one device gets a heartbeat under C{pacing}, in words.
    """
    period, capacity = settings.period, settings.capacity
    if devices <= capacity or pacing == "spread":
        return f"every {period} s"
    if pacing == "restart":
        return (
            f"every {period} s for the first {capacity} devices; "
            f"never for the other {devices - capacity}"
        )
    if pacing == "resume":
        return f"at least every {period * math.ceil(devices / capacity)} s"
    return "depends on the strategy"


def printPlan(settings: Settings, devices: Optional[str], out: TextIO) -> int:
    """
    Write the capacity plan to C{out}.

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
    size = payloadSize(settings)
    batches = settings.batchesPerCycle
    rate = count / settings.period if settings.message else 0.0
    if settings.pacing == "restart":
        rate = min(count, settings.capacity) / settings.period
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
    for pacing in ("restart", "resume", "spread"):
        marker = "*" if pacing == settings.pacing else " "
        lines.append(f"   {marker} {pacing:<8} {deviceInterval(settings, pacing, count)}")
    warnings = sanityWarnings(settings, count)
    for warning in warnings:
        lines.append(f"  warning: {warning}")
    if not warnings:
        lines.append("  no warnings")
    out.write("\n".join(lines) + "\n")
    return 0
