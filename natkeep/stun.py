"""
STUN keep-alives (RFC 5389, as used by RFC 5626 §4.4.2 over UDP).

A phone that keeps its own NAT mapping open sends STUN Binding requests to
the port it registered with.  We answer each with a Binding success response
carrying XOR-MAPPED-ADDRESS, so the phone learns its public address too.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final, Optional

MAGIC_COOKIE: Final = 0x2112A442
BINDING_REQUEST: Final = 0x0001
BINDING_SUCCESS: Final = 0x0101
XOR_MAPPED_ADDRESS: Final = 0x0020

_HEADER: Final = struct.Struct("!HHI12s")


def looksLikeSTUN(data: bytes) -> bool:
    """
    Whether a datagram is a STUN message: the two top bits of the first byte
    are zero (a SIP message starts with a letter) and the magic cookie is in
    place (RFC 5389 §6).
    """
    return len(data) >= 20 and data[0] < 0x40 and data[4:8] == b"\x21\x12\xa4\x42"


def bindingResponse(data: bytes, host: str, port: int) -> Optional[bytes]:
    """
    The Binding success response to a Binding request, or L{None} when
    C{data} is not a well-formed Binding request.
    """
    if not looksLikeSTUN(data):
        return None
    messageType, length, cookie, transaction = _HEADER.unpack_from(data)
    if messageType != BINDING_REQUEST or length % 4 or 20 + length != len(data):
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    xport = port ^ (MAGIC_COOKIE >> 16)
    if address.version == 4:
        xaddr = (int(address) ^ MAGIC_COOKIE).to_bytes(4, "big")
        family = 0x01
    else:
        key = int.from_bytes(struct.pack("!I12s", MAGIC_COOKIE, transaction), "big")
        xaddr = (int(address) ^ key).to_bytes(16, "big")
        family = 0x02
    value = struct.pack("!BBH", 0, family, xport) + xaddr
    attribute = struct.pack("!HH", XOR_MAPPED_ADDRESS, len(value)) + value
    return _HEADER.pack(BINDING_SUCCESS, len(attribute), MAGIC_COOKIE, transaction) + attribute
