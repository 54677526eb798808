"""
The floor of a relay: a forwarder that sends every datagram on untouched,
with no parsing at all, from the phone to the caller and from anyone else
to the phone.  Run under the same reactor natkeep's twistd uses (epoll),
it is what any Twisted relay pays per datagram for the reactor, the
receive and the send before it reads a byte of SIP.  L{bench/relay.py}
runs it with C{--floor} between natkeep and Kamailio.

With C{--loop epoll} the same forwarding is a bare Python loop over
C{select.epoll} and a non-blocking socket read until it is empty, as a
reactor reads (no Twisted); with C{--loop blocking}, a Python loop blocked
in C{recvfrom}, as Kamailio's UDP receivers are.  Between them they show
what the reactor costs and what Python itself costs.

    python bench/floor.py --listen 127.0.0.1:PORT --phone 127.0.0.2:PORT [--loop twisted|epoll|blocking]

Serves until it is sent SIGTERM; binds to loopback only.
"""

from __future__ import annotations

import argparse
import select
import socket
import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import DatagramProtocol  # noqa: E402


class Forwarder(DatagramProtocol):
    def __init__(self, phone: tuple[str, int]) -> None:
        self.phone = phone
        self.caller: tuple[str, int] = phone

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr == self.phone:
            self.transport.write(data, self.caller)
        else:
            self.caller = addr
            self.transport.write(data, self.phone)


def hostPort(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def plainLoop(listen: tuple[str, int], phone: tuple[str, int], blocking: bool) -> None:
    """
    Forward as L{Forwarder} does, in a Python loop without Twisted.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(listen)
    sock.setblocking(blocking)
    receive, send = sock.recvfrom, sock.sendto
    caller = phone
    poller = select.epoll()
    poller.register(sock.fileno(), select.EPOLLIN)
    while True:
        if not blocking:
            poller.poll(1.0, 16)
        while True:
            try:
                data, addr = receive(65536)
            except BlockingIOError:
                break
            if addr == phone:
                send(data, caller)
            else:
                caller = addr
                send(data, phone)
            if blocking:
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=hostPort, required=True)
    parser.add_argument("--phone", type=hostPort, required=True)
    parser.add_argument("--loop", choices=["twisted", "epoll", "blocking"], default="twisted")
    arguments = parser.parse_args()
    if arguments.loop != "twisted":
        plainLoop(arguments.listen, arguments.phone, arguments.loop == "blocking")
        sys.exit(0)
    host, port = arguments.listen
    reactor.listenUDP(port, Forwarder(arguments.phone), interface=host)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
