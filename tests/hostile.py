"""
Hostile datagrams: REGISTERs bent in the ways an outside probe bent them
(huge numbers, repeated headers, duplicate and oversized Contacts, LWS in
the Via's sent-protocol, control characters, Require, other schemes and
versions, bit flips, truncation).  The property tests draw them through
hypothesis; the replay test draws 100 000 from a seeded generator.

Users and Contacts come from small sets, so that what is accepted makes a
bounded number of bindings.
"""

from __future__ import annotations

import random
from typing import Callable

from natkeep.testing import register

Mutation = Callable[[bytes, random.Random], bytes]

_CONTROLS = [b"\x00", b"\x1b[2J", b"\r", b"\xc2\x85", b"\xe2\x80\xa8", b"\x7f", b"\x01"]


def _hugeCSeq(data: bytes, rng: random.Random) -> bytes:
    return data.replace(b"CSeq: 1 ", b"CSeq: " + b"9" * rng.randint(11, 6000) + b" ")


def _hugeExpires(data: bytes, rng: random.Random) -> bytes:
    return data.replace(
        b"Content-Length", b"Expires: " + b"7" * rng.randint(11, 6000) + b"\r\nContent-Length"
    )


def _repeatHeader(data: bytes, rng: random.Random) -> bytes:
    lines = data.split(b"\r\n")
    if len(lines) < 4:
        return data
    index = rng.randrange(1, len(lines) - 2)
    return b"\r\n".join(lines[: index + 1] + [lines[index]] + lines[index + 1 :])


def _duplicateContact(data: bytes, rng: random.Random) -> bytes:
    contact = f"<sip:dup{rng.randrange(4)}@10.0.0.9>".encode()
    return data.replace(b"Contact: ", b"Contact: " + contact + b", " + contact + b", ", 1)


def _lwsVia(data: bytes, rng: random.Random) -> bytes:
    return data.replace(b"Via: SIP/2.0/UDP", b"Via: SIP  /  2.0 / UDP", 1)


def _controls(data: bytes, rng: random.Random) -> bytes:
    lines = data.split(b"\r\n")
    if len(lines) < 4:
        return data
    index = rng.randrange(1, len(lines) - 2)
    lines[index] += rng.choice(_CONTROLS) + b"x"
    return b"\r\n".join(lines)


def _require(data: bytes, rng: random.Random) -> bytes:
    return data.replace(b"Content-Length", b"Require: foo\r\nContent-Length")


def _scheme(data: bytes, rng: random.Random) -> bytes:
    return data.replace(b"REGISTER sip:", b"REGISTER " + rng.choice([b"tel:", b"http:", b"x:"]))


def _version(data: bytes, rng: random.Random) -> bytes:
    return data.replace(b"SIP/2.0\r\n", rng.choice([b"SIP/3.0\r\n", b"SIP/2.1\r\n", b"XYZ\r\n"]), 1)


def _manyContacts(data: bytes, rng: random.Random) -> bytes:
    contacts = b", ".join(f"<sip:m{n}@10.0.0.9>".encode() for n in range(rng.randint(2, 40)))
    return data.replace(b"Contact: ", b"Contact: " + contacts + b", ", 1)


def _longContact(data: bytes, rng: random.Random) -> bytes:
    long = b"<sip:" + b"L" * rng.randint(400, 15000) + b"@10.0.0.9>"
    return data.replace(b"Contact: ", b"Contact: " + long + b", ", 1)


def _flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        buffer[rng.randrange(len(buffer))] = rng.randrange(256)
    return bytes(buffer)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


MUTATIONS: tuple[Mutation, ...] = (
    _hugeCSeq,
    _hugeExpires,
    _repeatHeader,
    _duplicateContact,
    _lwsVia,
    _controls,
    _require,
    _scheme,
    _version,
    _manyContacts,
    _longContact,
    _flip,
    _truncate,
)


def hostileRegister(rng: random.Random) -> bytes:
    """
    A REGISTER from a small set of users, bent by one to three mutations.
    """
    user = f"h{rng.randrange(50)}"
    data = register(
        user=user,
        callId=f"{user}-{rng.randrange(8)}",
        cseq=rng.randint(1, 100),
        contacts=[f"<sip:{user}@192.168.1.{rng.randrange(4)}:5060>"],
        expires=rng.choice([None, 0, 60, 3600]),
    )
    for mutation in rng.sample(MUTATIONS, rng.randint(1, 3)):
        data = mutation(data, rng)
    return data
