"""
Steering: which worker process a device's datagrams reach.

With C{workers} above one, every listening address is bound N times with
C{SO_REUSEPORT}, one socket per worker, and a classic BPF program attached
to the group (C{SO_ATTACH_REUSEPORT_CBPF}) picks the socket for each
datagram from its source IP alone:

    index = ((ip32 * 0x9E3779B1) mod 2**32 >> 16) mod N

where C{ip32} is the IPv4 source address, or the last 32 bits of an IPv6
one, read from the packet's network header.  L{workerOf} is the same
function in Python: a worker restores, and answers for, exactly the devices
whose datagrams the kernel hands it.  The port is left out on purpose: a
NAT that gives a device a new public port keeps it on its worker.

The parent process binds the sockets, in index order, and keeps them open
for the life of the service: the group's order (which the index is into)
never changes when a worker dies, and what arrives for a worker while it is
restarted waits in its socket.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

from natkeep.config import parseListenAddress
from natkeep.owner import bindAhead

#: Linux C{SO_ATTACH_REUSEPORT_CBPF} (asm-generic/socket.h).
SO_ATTACH_REUSEPORT_CBPF = 51

#: The multiplier of the hash (Knuth's, 2**32 over the golden ratio).
MULTIPLIER = 0x9E3779B1

#: Classic BPF: loads relative to the network header (C{SKF_NET_OFF}).
_NET = 0xFFF00000

# Opcodes (linux/filter.h, linux/bpf_common.h).
_LDB_ABS = 0x30
_LDW_ABS = 0x20
_RSH_K = 0x74
_MUL_K = 0x24
_MOD_K = 0x94
_JEQ_K = 0x15
_JA = 0x05
_RET_A = 0x16


def sourceKey(host: str) -> int:
    """
    The 32 bits of C{host} the kernel program reads: an IPv4 address, or
    the last 32 bits of an IPv6 one (so an IPv4-mapped address gives its
    IPv4 address's).
    """
    packed = ipaddress.ip_address(host.partition("%")[0]).packed
    return int.from_bytes(packed[-4:], "big")


def workerOf(host: str, count: int) -> int:
    """
    The worker, of C{count}, that datagrams from C{host} reach.
    """
    if count <= 1:
        return 0
    try:
        key = sourceKey(host)
    except ValueError:
        return 0
    return (((key * MULTIPLIER) & 0xFFFFFFFF) >> 16) % count


def steeringProgram(count: int) -> list[tuple[int, int, int, int]]:
    """
    The classic BPF program, as C{(code, jt, jf, k)} instructions.
    """
    return [
        (_LDB_ABS, 0, 0, _NET + 0),  # A = first byte of the IP header
        (_RSH_K, 0, 0, 4),  # A = IP version
        (_JEQ_K, 2, 0, 6),  # IPv6: go to 5
        (_LDW_ABS, 0, 0, _NET + 12),  # A = IPv4 source address
        (_JA, 0, 0, 1),  # go to 6
        (_LDW_ABS, 0, 0, _NET + 20),  # A = last 32 bits of the IPv6 source
        (_MUL_K, 0, 0, MULTIPLIER),
        (_RSH_K, 0, 0, 16),
        (_MOD_K, 0, 0, count),
        (_RET_A, 0, 0, 0),
    ]


def attachSteering(sock: socket.socket, count: int) -> None:
    """
    Attach the steering program for C{count} workers to C{sock}'s
    C{SO_REUSEPORT} group.

    @raise OSError: when the kernel refuses it.
    """
    program = steeringProgram(count)
    instructions = b"".join(struct.pack("=HBBI", *step) for step in program)
    buffer = ctypes.create_string_buffer(instructions, len(instructions))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def sharedSockets(address: str, count: int) -> list[socket.socket]:
    """
    C{count} UDP sockets bound to the listening C{address} in one
    C{SO_REUSEPORT} group, in index order, steered by L{workerOf}.

    @raise OSError: when one cannot be bound or steered; the message names
        the address.
    """
    host, port = parseListenAddress(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            bindAhead(sock, host)
            sock.setblocking(False)
            sock.bind((host, port))
            if port == 0:
                # The first socket's port is the group's.
                port = sock.getsockname()[1]
        attachSteering(sockets[0], count)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise OSError(e.errno, f"{address}: {e.strerror}")
    return sockets
