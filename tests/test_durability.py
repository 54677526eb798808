"""
Durable bindings, shown on a real process: nothing answered 200 OK is lost
to a C{kill -9}, and heartbeats resume within one period of a restart.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import threading
import time

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from natkeep.bindings import Binding
from natkeep.sip import parseMessage
from natkeep.store import SQLiteStore
from natkeep.testing import FakeListener, register

from .helpers import freePort
from .processes import NatkeepProcess

PERIOD = 10


def registerOver(device: socket.socket, server: tuple[str, int], user: str, **kw: object) -> str:
    """
    Register C{user} from C{device} and return the status line's code.
    """
    device.sendto(register(user=user, callId=f"dur-{user}", **kw), server)  # type: ignore[arg-type]
    data, _ = device.recvfrom(4096)
    return data.split(b" ", 2)[1].decode()


class KillNineTests(SynchronousTestCase):
    """
    C{kill -9} and a restart on the same C{--db}.
    """

    def test_bindingsSurviveKill(self) -> None:
        """
        Every binding answered 200 OK is back after C{kill -9} and a
        restart, none that was removed is, and the restored devices get a
        heartbeat within one PERIOD of the restart.
        """
        cwd = FilePath(self.mktemp())
        cwd.makedirs()
        port = freePort()
        server = ("127.0.0.1", port)
        args = [
            "--listen",
            f"127.0.0.1:{port}",
            "--db",
            "natkeep.sqlite",
            "--period",
            str(PERIOD),
            "--send-interval",
            "100",
        ]
        first = NatkeepProcess(args, cwd.path)
        self.addCleanup(first.stop)
        first.waitReady(*server)
        devices = []
        for n in range(30):
            device = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            device.bind(("127.0.0.1", 0))
            device.settimeout(5)
            self.addCleanup(device.close)
            self.assertEqual(registerOver(device, server, f"k{n}", expires=300), "200")
            devices.append(device)
        for n in range(20, 30):
            self.assertEqual(registerOver(devices[n], server, f"k{n}", cseq=2, expires=0), "200")
        first.stop(signal.SIGKILL)
        self.assertEqual(first.process.returncode, -signal.SIGKILL)

        # Drain anything the first process sent before it died.
        for device in devices:
            device.setblocking(False)
            try:
                while True:
                    device.recvfrom(4096)
            except BlockingIOError:
                pass
            device.settimeout(5)

        second = NatkeepProcess(args, cwd.path)
        restarted = time.monotonic()
        self.addCleanup(second.stop)
        second.waitReady(*server)
        # Every kept device hears a heartbeat within one period.
        for n in range(20):
            devices[n].settimeout(max(0.1, restarted + PERIOD + 2 - time.monotonic()))
            data, source = devices[n].recvfrom(4096)
            self.assertEqual((data, source), (b"HELLO", server))
        self.assertLess(time.monotonic() - restarted, PERIOD + 2)
        # The registrar lists exactly the kept bindings.
        for n in range(30):
            devices[n].settimeout(5)
            devices[n].sendto(register(user=f"k{n}", callId="query", contacts=()), server)
            while True:
                data, _ = devices[n].recvfrom(4096)
                if data.startswith(b"SIP/2.0"):
                    break
            contacts = parseMessage(data).headers.get("contact", [])
            self.assertEqual(len(contacts), 1 if n < 20 else 0, f"k{n}")
        # None of the removed devices hears anything.
        for n in range(20, 30):
            devices[n].settimeout(0.2)
            self.assertRaises(socket.timeout, devices[n].recvfrom, 4096)


class LargeStoreTests(SynchronousTestCase):
    """
    100 000 stored bindings, and bursts of REGISTERs on top.
    """

    COUNT = 100_000

    def test_restoreAndBursts(self) -> None:
        """
        A process restores 100 000 bindings (the time is printed, not
        asserted), then takes concurrent REGISTER bursts; after C{kill -9}
        every REGISTER answered 200 OK is in the file with the 100 000.
        """
        cwd = FilePath(self.mktemp())
        cwd.makedirs()
        db = cwd.child("natkeep.sqlite").path
        port = freePort()
        server = ("127.0.0.1", port)
        listener = FakeListener(f"127.0.0.1:{port}")
        store = SQLiteStore(db)
        expires = time.time() + 3600
        for n in range(self.COUNT):
            store.put(
                Binding(
                    f"sip:big{n}@example.com",
                    f"sip:big{n}@10.1.{n // 250 % 250}.{n % 250}",
                    "",
                    (f"127.64.{n // 250 % 250}.{n % 250 + 1}", 5060),
                    listener,
                    True,
                    expires,
                    f"c{n}",
                    1,
                )
            )
        store.commit()
        store.close()

        started = time.monotonic()
        process = NatkeepProcess(
            ["--listen", f"127.0.0.1:{port}", "--db", "natkeep.sqlite", "--period", "60"], cwd.path
        )
        self.addCleanup(process.stop)
        process.waitReady(*server, timeout=120)
        print(
            f"\n  restore of {self.COUNT} bindings: ready after {time.monotonic() - started:.2f} s"
        )
        self.assertIn(f"Restored {self.COUNT} bindings", process.log())

        answered: list[set[str]] = [set() for _ in range(4)]

        def burst(index: int) -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.bind(("127.0.0.1", 0))
                for n in range(2000):
                    user = f"burst{index}-{n}"
                    s.sendto(register(user=user, callId=user), server)
                s.settimeout(3)
                try:
                    while True:
                        data, _ = s.recvfrom(4096)
                        if data.startswith(b"SIP/2.0 200"):
                            answered[index].add(parseMessage(data).header("call-id") or "")
                except socket.timeout:
                    pass

        threads = [threading.Thread(target=burst, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        total = sum(len(a) for a in answered)
        print(f"  concurrent bursts: {total} of 8000 REGISTERs answered 200 OK")
        self.assertGreater(total, 0)
        process.stop(signal.SIGKILL)
        with sqlite3.connect(db) as conn:
            stored = {row[0] for row in conn.execute("SELECT call_id FROM bindings")}
        self.assertEqual(len([c for c in stored if c.startswith("c")]), self.COUNT)
        for index in range(4):
            self.assertEqual(answered[index] - stored, set())
