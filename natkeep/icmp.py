"""
ICMP errors on a UDP socket, as Linux reports them.

A heartbeat to a device that is gone draws an ICMP error (port or host
unreachable) from the device or its NAT.  An unconnected UDP socket hears
of it only with C{IP_RECVERR} (C{IPV6_RECVERR}) set: the kernel then queues
each error, with the destination of the datagram that caused it, on the
socket's error queue, read with C{recvmsg(MSG_ERRQUEUE)}.

Setting it has two side effects the socket's owner must absorb: a pending
error makes the next plain receive or send on the socket fail with that
error (it says nothing about that datagram), and while the queue holds
errors the socket polls as C{EPOLLERR}, which Twisted takes for a closed
connection.  L{natkeep.protocol.ListeningPort} deals with both.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from typing import NamedTuple

#: Linux's socket options, which Python's socket module does not export.
IP_RECVERR = 11
IPV6_RECVERR = 25

#: Where an extended error came from (C{ee_origin}).
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3

#: C{struct sock_extended_err}: errno, origin, type, code, pad, info, data.
_EXTENDED_ERROR = struct.Struct("=IBBBBII")

#: Room for the extended error and the offender's address (IPv6 at most).
_ANCILLARY_SIZE = socket.CMSG_SPACE(_EXTENDED_ERROR.size + 28)

#: The most errors taken from the queue in one drain, so that a flood of
#: them cannot hold the reactor.
MAX_DRAIN = 1024

#: The errors a pending ICMP error makes a plain receive or send report;
#: only these are taken for one and the operation tried again.
ICMP_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EPROTO,
        errno.EMSGSIZE,
        errno.EACCES,
        errno.EPERM,
        errno.ENOPROTOOPT,
        errno.ETIMEDOUT,
        errno.EOPNOTSUPP,
    }
)

SUPPORTED = sys.platform.startswith("linux")


class ICMPError(NamedTuple):
    """
    One error from a socket's error queue.

    @ivar destination: C{(host, port)} of the datagram that drew it.
    @ivar errno: the error it stands for (C{ECONNREFUSED} for port
        unreachable, C{EHOSTUNREACH}, ...).
    @ivar origin: C{SO_EE_ORIGIN_ICMP}, C{SO_EE_ORIGIN_ICMP6} or
        C{SO_EE_ORIGIN_LOCAL}.
    @ivar type: the ICMP type (0 for local errors).
    @ivar code: the ICMP code.
    """

    destination: tuple[str, int]
    errno: int
    origin: int
    type: int
    code: int

    @property
    def unreachable(self) -> bool:
        """
        Whether it says the destination cannot be reached: an ICMP error
        from the network, not a local one such as a too-large datagram.
        """
        return self.origin in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6) and self.errno != (
            errno.EMSGSIZE
        )


def enableErrors(sock: socket.socket) -> bool:
    """
    Ask the kernel to queue ICMP errors on C{sock}.

    @return: whether it was set (only on Linux, and not on sockets that are
        neither IPv4 nor IPv6).
    """
    if not SUPPORTED:
        return False
    options = []
    if sock.family == socket.AF_INET6:
        # An IPv6 socket may also carry IPv4 (mapped addresses).
        options = [(socket.IPPROTO_IPV6, IPV6_RECVERR), (socket.IPPROTO_IP, IP_RECVERR)]
    elif sock.family == socket.AF_INET:
        options = [(socket.IPPROTO_IP, IP_RECVERR)]
    done = False
    for level, option in options:
        try:
            sock.setsockopt(level, option, 1)
            done = True
        except OSError:
            continue
    return done


def parseExtendedError(data: bytes) -> tuple[int, int, int, int]:
    """
    The errno, origin, ICMP type and code of a C{sock_extended_err}.

    @raise ValueError: if C{data} is too short.
    """
    if len(data) < _EXTENDED_ERROR.size:
        raise ValueError(f"extended error of {len(data)} bytes")
    number, origin, icmpType, code, _, _, _ = _EXTENDED_ERROR.unpack_from(data)
    return number, origin, icmpType, code


def drainErrors(sock: socket.socket, limit: int = MAX_DRAIN) -> list[ICMPError]:
    """
    Take the errors queued on C{sock}, at most C{limit}.
    """
    found: list[ICMPError] = []
    for _ in range(limit):
        try:
            _, ancillary, _, address = sock.recvmsg(1, _ANCILLARY_SIZE, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            # Nothing queued on a socket that is not non-blocking, or no
            # error queue at all.
            break
        for level, kind, data in ancillary:
            if (level, kind) not in (
                (socket.IPPROTO_IP, IP_RECVERR),
                (socket.IPPROTO_IPV6, IPV6_RECVERR),
            ):
                continue
            try:
                number, origin, icmpType, code = parseExtendedError(data)
            except ValueError:
                continue
            destination = (address[0], address[1]) if address else ("", 0)
            found.append(ICMPError(destination, number, origin, icmpType, code))
    # Taking the last error off the queue also clears the socket's pending
    # error (the kernel sets it to the next queued one, or none).
    return found
