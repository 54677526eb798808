"""
The floor of a relay on Twisted: a DatagramProtocol that forwards every
datagram untouched, with no parsing at all, from the phone to the caller
and from anyone else to the phone.  Run under the same reactor natkeep's
twistd uses (epoll), it is what any Twisted relay pays per datagram for
the reactor, the receive and the send before it reads a byte of SIP.
L{bench/relay.py} runs it with C{--floor} between natkeep and Kamailio.

    python bench/floor.py --listen 127.0.0.1:PORT --phone 127.0.0.2:PORT

Serves until it is sent SIGTERM; binds to loopback only.
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=hostPort, required=True)
    parser.add_argument("--phone", type=hostPort, required=True)
    arguments = parser.parse_args()
    host, port = arguments.listen
    reactor.listenUDP(port, Forwarder(arguments.phone), interface=host)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
