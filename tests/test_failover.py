"""
More than one node: two natkeeps sharing one PostgreSQL, a floating
address moving between them across the lab's real NAT, and C{kill -9}
during a REGISTER burst.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from natkeep.testing import register

from .helpers import freePort
from .natlab import DEVICE, NatLab, labUnavailable
from .postgres import freshDatabase, postgresUnavailable
from .processes import NatkeepProcess

PERIOD = 10
FLOATING = "198.18.0.10"
NODE_A, NODE_B = "198.18.0.11", "198.18.0.12"


class FailoverTests(SynchronousTestCase):
    """
    Nodes A and B in namespaces of their own on the lab's server network,
    one PostgreSQL, the floating address on A; phones behind the NAT
    register through it.
    """

    def setUp(self) -> None:
        reason = labUnavailable() or postgresUnavailable()
        if reason:
            raise SkipTest(reason)
        self.lab = NatLab("fo", 30)
        self.addCleanup(self.lab.destroy)
        self.lab.build()
        self.a = self.lab.addNode("A", NODE_A)
        self.b = self.lab.addNode("B", NODE_B)
        self.lab.moveAddress(FLOATING, None, self.a)
        self.db = freshDatabase()
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()

    def node(self, name: str, ns: str) -> NatkeepProcess:
        folder = self.cwd.child(name)
        folder.makedirs()
        process = NatkeepProcess(
            [
                "--listen",
                f"{FLOATING}:5060",
                "--db",
                self.db,
                "--period",
                str(PERIOD),
                "--send-interval",
                "100",
            ],
            folder.path,
            netns=ns,
        )
        self.addCleanup(process.stop)
        process.waitLog("Restored")
        return process

    def test_takeover(self) -> None:
        """
        While A holds the address, only A heartbeats (B, bound to it with
        IP_FREEBIND, sends none).  After C{kill -9} of A and the address
        moving to B, every phone answered 200 OK hears a heartbeat from the
        floating address within one PERIOD (and the second B needs to see
        the address), with no phone lost.
        """
        a = self.node("a", self.a)
        b = self.node("b", self.b)
        self.assertIn("is not configured on this host", b.log())
        phones = [
            self.lab.startDevice(
                self.lab.device, DEVICE, f"p{n}", 6000 + n, 45, 5060, serverHost=FLOATING
            )
            for n in range(5)
        ]
        for phone in phones:
            self.addCleanup(phone.kill)
            phone.waitRegistered()
        # A heartbeats for a while; then it dies and the address moves.
        time.sleep(PERIOD + 2)
        a.stop(signal.SIGKILL)
        self.lab.moveAddress(FLOATING, self.a, self.b)
        moved = time.monotonic()
        b.waitLog("came to this host", timeout=10)
        before = b.log().split("came to this host")[0]
        sent = [int(n) for n in re.findall(r"Heartbeat cycle: (\d+) sent", before)]
        self.assertEqual(sum(sent), 0, "B heartbeated while A held the address")
        self.assertIn("restored 5 bindings", b.log())
        for phone in phones:
            events = phone.finish(timeout=90)
            heard = [
                phone.registeredAt + e["t"]
                for e in events
                if e["data"] == "HELLO" and e["from"] == [FLOATING, 5060]
            ]
            self.assertTrue([t for t in heard if t < moved], "no heartbeat from A")
            after = [t for t in heard if t > moved]
            self.assertTrue(after, f"no heartbeat after the takeover: {events}")
            self.assertLess(after[0] - moved, PERIOD + 2)
        self.assertNotIn("Traceback", b.log())


class KillNineBurstTests(SynchronousTestCase):
    """
    C{kill -9} during a burst of REGISTERs, with PostgreSQL.
    """

    def test_everyAnsweredBindingStored(self) -> None:
        """
        Every binding answered 200 OK before the kill is in PostgreSQL
        after it, and back in the table after a restart.
        """
        reason = postgresUnavailable()
        if reason:
            raise SkipTest(reason)
        import psycopg

        db = freshDatabase()
        cwd = FilePath(self.mktemp())
        cwd.makedirs()
        port = freePort()
        args = ["--listen", f"127.0.0.1:{port}", "--db", db, "--period", str(PERIOD)]
        process = NatkeepProcess(args, cwd.path)
        self.addCleanup(process.stop)
        process.waitReady("127.0.0.1", port)
        answered: set[str] = set()
        stop = threading.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.5)

        def listen() -> None:
            while not stop.is_set():
                try:
                    data, _ = sock.recvfrom(65536)
                except OSError:
                    continue
                if data.startswith(b"SIP/2.0 200"):
                    found = re.search(rb"\r\nCall-ID: burst-(\d+)\r\n", data)
                    if found:
                        answered.add(found.group(1).decode())

        listener = threading.Thread(target=listen)
        listener.start()
        self.addCleanup(listener.join)
        self.addCleanup(stop.set)
        for n in range(3000):
            sock.sendto(register(user=f"b{n}", callId=f"burst-{n}"), ("127.0.0.1", port))
            if n == 2000:
                process.stop(signal.SIGKILL)
            elif n % 100 == 0:
                time.sleep(0.01)
        time.sleep(1)
        stop.set()
        self.assertGreater(len(answered), 100)
        self.assertLess(len(answered), 3000)
        with psycopg.connect(db) as conn:
            stored = {row[0] for row in conn.execute("SELECT call_id FROM natkeep_bindings")}
        missing = {f"burst-{n}" for n in answered} - stored
        self.assertEqual(missing, set())
        again = NatkeepProcess(args, cwd.path)
        self.addCleanup(again.stop)
        again.waitReady("127.0.0.1", port)
        self.assertIn(f"Restored {len(stored)} bindings", again.log())
