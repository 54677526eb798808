"""
100 000 hostile datagrams replayed at a running C{twistd natkeep} on
loopback: no traceback, bounded memory, and every registered device still
answered.
"""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.request
from typing import Any

from natkeep.sip import Response, parseMessage
from natkeep.testing import register

from .helpers import freePort
from .hostile import hostileRegister
from .test_twistd import ProcessTestCase

#: How many hostile datagrams the replay sends, after a warm-up of WARMUP.
#: The warm-up brings the allocator's arenas and SQLite's page cache to
#: their working size (about 20 MB here); what the replay measures after it
#: is what stays: on this machine under 1 MB for 100 000.
COUNT = 100_000
WARMUP = 25_000

#: Datagrams sent at once; the next burst waits until natkeep has read
#: these, so that the kernel drops none (some are 15 KB long).
BURST = 1000


def rssBytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class ReplayTests(ProcessTestCase):
    """
    A flood of hostile REGISTERs against the installed service.
    """

    def counters(self, web: int) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/status", timeout=5) as page:
            return dict(json.load(page)["counters"])

    def send(self, target: tuple[str, int], datagrams: list[bytes], web: int) -> None:
        """
        Send C{datagrams} in bursts, each once natkeep has read the last.
        """
        read = self.counters(web).get("datagrams", 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for start in range(0, len(datagrams), BURST):
                burst = datagrams[start : start + BURST]
                for data in burst:
                    sender.sendto(data, target)
                read += len(burst)
                deadline = time.monotonic() + 10
                while self.counters(web).get("datagrams", 0) < read:
                    if time.monotonic() > deadline:
                        self.fail(f"natkeep did not read burst {start // BURST}")
                    time.sleep(0.005)

    def test_hundredThousandHostile(self) -> None:
        """
        After 100 000 hostile REGISTERs, all read by natkeep: no traceback in
        its log, its RSS grew by less than 10 MB, and each device registered
        before the flood is answered 200 OK with its binding.
        """
        web = freePort()
        process, port = self.start("--status", f"127.0.0.1:{web}")
        target = ("127.0.0.1", port)
        devices = []
        for n in range(10):
            device = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(device.close)
            device.settimeout(5)
            device.sendto(register(user=f"good{n}", callId=f"good{n}"), target)
            self.assertTrue(device.recv(65536).startswith(b"SIP/2.0 200 OK"))
            devices.append(device)
        rng = random.Random(3261)
        self.send(target, [hostileRegister(rng) for _ in range(WARMUP)], web)
        before = rssBytes(process.process.pid)
        self.send(target, [hostileRegister(rng) for _ in range(COUNT)], web)
        grown = rssBytes(process.process.pid) - before
        log = process.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unexpected error", log)
        self.assertLess(grown, 10 * 1024 * 1024, f"RSS grew by {grown} bytes")
        for n, device in enumerate(devices):
            device.sendto(register(user=f"good{n}", callId=f"good{n}", cseq=2), target)
            response = parseMessage(device.recv(65536))
            assert isinstance(response, Response)
            self.assertEqual(response.code, 200)
            self.assertIn("<sip:1001@192.168.1.20:5060>", response.header("contact") or "")
        self.assertEqual(self.counters(web).get("internal.errors", 0), 0)
