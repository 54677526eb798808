"""
The binding store under faults, on a real process: a database locked by
another process, a full disk, files deleted underneath, a read-only
filesystem.  The reactor keeps working while a commit waits, no 200 OK
claims what is not on disk, and nothing answered 200 OK is lost.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from natkeep.testing import register, request

from .helpers import freePort
from .processes import NatkeepProcess, cleanEnv, runTwistd

PERIOD = 10


def answerOf(device: socket.socket) -> tuple[bytes, float]:
    """
    The next SIP answer C{device} gets (heartbeats skipped), and when.
    """
    while True:
        data, _ = device.recvfrom(65536)
        if data.startswith(b"SIP/2.0"):
            return data, time.monotonic()


def storedRows(path: str) -> set[str]:
    """
    The AORs in the database at C{path}, as a fresh reader sees them.
    """
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT aor FROM bindings")}


class StoreFaultTestCase(SynchronousTestCase):
    def startNatkeep(self, db: str, *extra: str) -> tuple[NatkeepProcess, tuple[str, int], int]:
        port = freePort()
        web = freePort()
        process = NatkeepProcess(
            [
                "--listen",
                f"127.0.0.1:{port}",
                "--db",
                db,
                "--period",
                str(PERIOD),
                "--send-interval",
                "100",
                "--status",
                f"127.0.0.1:{web}",
                *extra,
            ],
            self.cwd.path,
        )
        self.addCleanup(process.stop)
        process.waitReady("127.0.0.1", port)
        return process, ("127.0.0.1", port), web

    def device(self) -> socket.socket:
        device = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        device.bind(("127.0.0.1", 0))
        device.settimeout(30)
        self.addCleanup(device.close)
        return device

    def status(self, web: int) -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/status", timeout=5) as page:
            result: dict[str, object] = json.loads(page.read())
        return result

    def setUp(self) -> None:
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()


class LockedFileTests(StoreFaultTestCase):
    """
    Another process holds the database's write lock for 8 s.
    """

    def test_lockedEightSeconds(self) -> None:
        """
        While the lock is held, OPTIONS is answered at once every time,
        heartbeats keep their schedule (no gap beyond PERIOD and one batch
        interval), and a REGISTER sent meanwhile is answered 200 OK only
        after the lock is gone, when its commit could be made.
        """
        db = self.cwd.child("natkeep.sqlite").path
        process, server, _ = self.startNatkeep(db)
        phone = self.device()
        phone.sendto(register(user="held", contacts=["<sip:held@10.0.0.1:5060>"]), server)
        data, _ = answerOf(phone)
        self.assertTrue(data.startswith(b"SIP/2.0 200 OK"))
        heartbeats: list[float] = []
        stop = threading.Event()

        def listen() -> None:
            phone.settimeout(0.2)
            while not stop.is_set():
                try:
                    data, source = phone.recvfrom(65536)
                except OSError:
                    continue
                if data == b"HELLO" and source == server:
                    heartbeats.append(time.monotonic())

        listener = threading.Thread(target=listen)
        listener.start()
        self.addCleanup(listener.join)
        self.addCleanup(stop.set)
        # Until a heartbeat has been seen, so the gaps start from one.
        deadline = time.monotonic() + PERIOD + 5
        while not heartbeats and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertTrue(heartbeats, process.log())

        locker = sqlite3.connect(db, isolation_level=None, timeout=5)
        locker.execute("BEGIN IMMEDIATE")
        locked = time.monotonic()
        latecomer = self.device()
        latecomer.sendto(
            register(user="late", contacts=["<sip:late@10.0.0.2:5060>"], callId="late"), server
        )
        probe = self.device()
        probe.settimeout(1)
        delays = []
        while time.monotonic() - locked < 8:
            sent = time.monotonic()
            probe.sendto(request("OPTIONS"), server)
            data, _ = probe.recvfrom(65536)
            self.assertTrue(data.startswith(b"SIP/2.0 200"), data[:40])
            delays.append(time.monotonic() - sent)
            time.sleep(0.3)
        locker.execute("ROLLBACK")
        released = time.monotonic()
        locker.close()
        latecomer.settimeout(10)
        data, answered = answerOf(latecomer)
        self.assertTrue(data.startswith(b"SIP/2.0 200 OK"), data[:40])
        self.assertGreaterEqual(answered, released - 0.05)
        self.assertLess(max(delays), 0.5)
        # Heartbeats on through the lock and after it.
        deadline = released + PERIOD + 1
        while time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        during = [t for t in heartbeats if t > locked - PERIOD]
        self.assertGreaterEqual(len(during), 2)
        gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
        self.assertLess(max(gaps), PERIOD + 0.1 + 0.5, gaps)
        self.assertIn("late", " ".join(storedRows(db)))


class TmpfsTestCase(StoreFaultTestCase):
    """
    A small tmpfs the test mounts for the database, and unmounts after.
    """

    def setUp(self) -> None:
        super().setUp()
        if os.geteuid() != 0:
            raise SkipTest("mounting a tmpfs needs root; .ci/run runs as root")
        self.mount = self.cwd.child("disk")
        self.mount.makedirs()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "natkeep-test", self.mount.path],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", self.mount.path], capture_output=True)


class FullDiskTests(TmpfsTestCase):
    """
    The database's filesystem fills up while natkeep runs.
    """

    def test_fullDiskLosesNothing(self) -> None:
        """
        With the disk full, REGISTERs are answered 500, not 200; the fault
        is logged with its cause and counted.  When space returns, the
        writes kept are committed, and after a C{kill -9} every binding
        answered 200 OK at any time, and the ones refused meanwhile, are on
        disk.
        """
        db = self.mount.child("natkeep.sqlite").path
        process, server, web = self.startNatkeep(db)
        phones = [self.device() for _ in range(10)]
        for n, phone in enumerate(phones[:5]):
            phone.sendto(register(user=f"f{n}", callId=f"f{n}"), server)
            self.assertTrue(answerOf(phone)[0].startswith(b"SIP/2.0 200 OK"))
        filler = self.mount.child("filler")
        with open(filler.path, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                self.assertEqual(e.errno, errno.ENOSPC)
        answers = []
        for n, phone in enumerate(phones[5:], 5):
            phone.sendto(register(user=f"f{n}", callId=f"f{n}"), server)
            answers.append(answerOf(phone)[0].split(b"\r\n", 1)[0])
        self.assertEqual(set(answers), {b"SIP/2.0 500 Binding Not Stored"})
        status = self.status(web)
        store = status["store"]
        assert isinstance(store, dict)
        self.assertIn("full", str(store["last_error"]))
        counters = status["counters"]
        assert isinstance(counters, dict)
        self.assertGreater(counters["store.errors"], 0)
        self.assertIn("database or disk is full", process.log())
        os.unlink(filler.path)
        deadline = time.monotonic() + 10
        while self.status(web)["store"]["last_error"] is not None:  # type: ignore[index]
            self.assertLess(time.monotonic(), deadline, process.log()[-2000:])
            time.sleep(0.2)
        process.stop(signal.SIGKILL)
        self.assertEqual(
            storedRows(db), {f"sip:f{n}@example.com" for n in range(10)}, process.log()[-2000:]
        )


class DeletedFileTests(StoreFaultTestCase):
    """
    The database files are deleted while natkeep runs.
    """

    def test_deletedRewritten(self) -> None:
        """
        Deleting the database, its WAL and shared-memory files is noticed
        within a sweep, logged and counted, and the file is written anew
        from memory; after a C{kill -9} it holds every binding.
        """
        db = self.cwd.child("natkeep.sqlite").path
        process, server, web = self.startNatkeep(db)
        phone = self.device()
        for n in range(3):
            phone.sendto(register(user=f"d{n}", callId=f"d{n}"), server)
            self.assertTrue(answerOf(phone)[0].startswith(b"SIP/2.0 200 OK"))
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
        process.waitLog("was deleted while natkeep ran", timeout=10)
        phone.sendto(register(user="d3", callId="d3"), server)
        self.assertTrue(answerOf(phone)[0].startswith(b"SIP/2.0 200 OK"))
        counters = self.status(web)["counters"]
        assert isinstance(counters, dict)
        self.assertEqual(counters["store.rewrites"], 1)
        process.stop(signal.SIGKILL)
        self.assertEqual(storedRows(db), {f"sip:d{n}@example.com" for n in range(4)})


class ReadOnlyTests(TmpfsTestCase):
    """
    A database on a filesystem natkeep cannot write.
    """

    def test_readOnlyOneLine(self) -> None:
        """
        Start-up stops with one line naming the file and the reason.
        """
        db = self.mount.child("natkeep.sqlite").path
        made = sqlite3.connect(db)
        made.execute("CREATE TABLE t (x)")
        made.commit()
        made.close()
        remounted = subprocess.run(
            ["mount", "-o", "remount,ro", self.mount.path], capture_output=True, text=True
        )
        self.assertEqual(remounted.returncode, 0, remounted.stderr)
        result = runTwistd(["-n", "--pidfile=", "natkeep", "--db", db], self.cwd.path, cleanEnv())
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith(f"natkeep: error: cannot use binding database {db}: "))
        self.assertIn("readonly", lines[0])
