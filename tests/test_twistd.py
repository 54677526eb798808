"""
natkeep as an operator runs it: a real C{twistd} process from the
installed copy, configured from the command line and a file, and a real
SIP client (sipp) against it.
"""

from __future__ import annotations

import os
import socket
import sqlite3

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from natkeep.testing import register, sippCounts

from .dropin import installDropin
from .helpers import freePort
from .processes import (
    NatkeepProcess,
    cleanEnv,
    haveSipp,
    runTwistd,
    sipp,
    stoppedCleanly,
)

SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def insideFolder(path: str, folder: str) -> bool:
    """
    Whether C{path} lies in C{folder}, comparing real paths part by part
    (C{x/natkeep-venv} is not inside C{x/natkeep}).
    """
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, top]) == top


class InsideFolderTests(SynchronousTestCase):
    """
    L{insideFolder}, which the installed-copy test relies on.
    """

    def test_siblingWithCommonPrefix(self) -> None:
        self.assertFalse(insideFolder("/x/natkeep-venv/lib/natkeep/__init__.py", "/x/natkeep"))
        self.assertTrue(insideFolder("/x/natkeep/natkeep/__init__.py", "/x/natkeep"))
        self.assertTrue(insideFolder("/x/natkeep/../natkeep/natkeep/tap.py", "/x/natkeep/"))


class ProcessTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()

    def start(self, *args: str, env: dict[str, str] | None = None) -> tuple[NatkeepProcess, int]:
        port = freePort()
        process = NatkeepProcess(["--listen", f"127.0.0.1:{port}", *args], self.cwd.path, env=env)
        self.addCleanup(process.stop)
        process.waitReady("127.0.0.1", port)
        return process, port


class InstalledCopyTests(ProcessTestCase):
    """
    twistd finds natkeep, and third-party strategies, from installed copies.
    """

    def test_pluginFromInstalledCopy(self) -> None:
        """
        Outside the source tree, natkeep and its twistd drop-in are imported
        from the installed copy, and C{twistd --help} lists natkeep.
        """
        probe = runTwistd(["--help"], self.cwd.path, cleanEnv())
        self.assertIn("natkeep", probe.stdout)
        import subprocess
        import sys

        where = subprocess.run(
            [
                sys.executable,
                "-c",
                "import natkeep, twisted.plugins.natkeep_plugin as p; print(natkeep.__file__); print(p.__file__)",
            ],
            cwd=self.cwd.path,
            env=cleanEnv(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        self.assertEqual(len(where), 2)
        for path in where:
            self.assertFalse(insideFolder(path, SOURCE_TREE), f"{path} is in the source tree")

    def test_thirdPartyListed(self) -> None:
        """
        A drop-in from another folder on the path shows in
        C{--list-strategies} beside the built-ins.
        """
        top = installDropin(self)
        result = runTwistd(["natkeep", "--list-strategies"], self.cwd.path, cleanEnv(top.path))
        self.assertEqual(result.returncode, 0, result.stderr)
        for name in ("half", "shout", "reverse", "cap", "raw", "restart"):
            self.assertIn(f"  {name} ", result.stdout)

    def test_thirdPartyPayloadUsed(self) -> None:
        """
        A running service sends a third-party payload, paced by a
        third-party pacer, both chosen by name.
        """
        top = installDropin(self)
        process, port = self.start(
            "--payload",
            "shout",
            "--pacing",
            "reverse",
            "--period",
            "10",
            "--send-interval",
            "100",
            env=cleanEnv(top.path),
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as device:
            device.bind(("127.0.0.1", 0))
            device.settimeout(15)
            device.sendto(register(user="3001"), ("127.0.0.1", port))
            self.assertTrue(device.recvfrom(4096)[0].startswith(b"SIP/2.0 200"))
            data, source = device.recvfrom(4096)
        self.assertEqual((data, source), (b"HELLO!", ("127.0.0.1", port)))
        self.assertIn("pacing reverse", process.log())


class StartupErrorTests(ProcessTestCase):
    """
    A wrong setting stops start-up with one line naming it.
    """

    def assertOneLineError(self, args: list[str], expected: str) -> None:
        result = runTwistd(["-n", "--pidfile=", "natkeep", *args], self.cwd.path, cleanEnv())
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr.strip().splitlines(), [expected])

    def test_badValue(self) -> None:
        """
        An out-of-range option names the option, value and range.
        """
        self.assertOneLineError(
            ["--period", "5"],
            "natkeep: error: --period = '5' is invalid: out of range; allowed 10..86400",
        )

    def test_unknownKey(self) -> None:
        """
        An unknown key in the file names the nearest known key.
        """
        config = self.cwd.child("natkeep.conf")
        config.setContent(b"SS_SIP_NAT_KEEP_ALIVE_PERIDO = 20\n")
        self.assertOneLineError(
            ["--config", config.path],
            f"natkeep: error: {config.path}: unknown key SS_SIP_NAT_KEEP_ALIVE_PERIDO; "
            "did you mean SS_SIP_NAT_KEEP_ALIVE_PERIOD?",
        )

    def test_unknownStrategy(self) -> None:
        """
        An unknown strategy lists the installed ones.
        """
        self.assertOneLineError(
            ["--pacing", "fastest"],
            "natkeep: error: pacing = 'fastest' is invalid: not installed; allowed "
            "restart, resume, spread",
        )

    def test_corruptDatabase(self) -> None:
        """
        A database file that is not SQLite is named.
        """
        db = self.cwd.child("broken.sqlite")
        db.setContent(b"this is not a database" * 100)
        self.assertOneLineError(
            ["--db", db.path],
            f"natkeep: error: cannot use binding database {db.path}: file is not a database",
        )

    def test_portInUse(self) -> None:
        """
        A listening address already taken is named.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            result = runTwistd(
                ["-n", "--pidfile=", "natkeep", "--listen", f"127.0.0.1:{port}"],
                self.cwd.path,
                cleanEnv(),
            )
        self.assertNotEqual(result.returncode, 0)
        # By then twistd logs what goes to stderr.
        self.assertIn(
            f"natkeep: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use",
            result.stdout + result.stderr,
        )


class CheckTests(ProcessTestCase):
    """
    C{--check} validates and prints the capacity plan.
    """

    def test_plan(self) -> None:
        """
        The plan shows the capacity formula with the settings' numbers and
        the advice for the given number of devices.
        """
        result = runTwistd(
            [
                "natkeep",
                "--check",
                "--period",
                "10",
                "--send-interval",
                "1000",
                "--send-one-time",
                "3",
                "--devices",
                "40",
            ],
            self.cwd.path,
            cleanEnv(),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("capacity per cycle  10 * 3 = 30 devices", result.stdout)
        self.assertIn(
            "restart  every 10 s for the first 30 devices; never for the other 10", result.stdout
        )
        self.assertIn("resume   at least every 20 s", result.stdout)
        self.assertIn("40 devices exceed one cycle's capacity of 30", result.stdout)
        self.assertFalse(self.cwd.child("natkeep.sqlite").exists())

    def test_invalid(self) -> None:
        """
        An invalid config fails the check.
        """
        result = runTwistd(
            ["natkeep", "--check", "--send-interval", "0"], self.cwd.path, cleanEnv()
        )
        self.assertEqual(result.returncode, 1)

    def test_devicesFromStore(self) -> None:
        """
        Without C{--devices}, the NATed bindings in the store are counted.
        """
        process, port = self.start("--db", "natkeep.sqlite")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as device:
            device.settimeout(5)
            for n in range(3):
                device.sendto(register(user=f"40{n}"), ("127.0.0.1", port))
                device.recvfrom(4096)
        process.stop()
        result = runTwistd(["natkeep", "--check"], self.cwd.path, cleanEnv())
        self.assertIn("devices             3 (store natkeep.sqlite)", result.stdout)


class SippTests(ProcessTestCase):
    """
    sipp, a real SIP client, against C{twistd natkeep}.
    """

    def setUp(self) -> None:
        if not haveSipp():
            raise SkipTest("sipp is not installed (Debian package sip-tester; .ci/run installs it)")
        super().setUp()

    def runScenario(self, scenario: str) -> None:
        """
        Run sipp C{scenario} for 300 phones against a natkeep that keeps its
        bindings in natkeep.sqlite: every call must pass, and natkeep must
        then stop cleanly.
        """
        process, port = self.start("--db", "natkeep.sqlite")
        result = sipp(
            scenario,
            f"127.0.0.1:{port}",
            calls=300,
            rate=300,
            localPort=freePort(),
            cwd=self.cwd.path,
        )
        self.assertEqual(sippCounts(result.stdout), (300, 0), result.stdout[-2000:])
        self.assertEqual(result.returncode, 0)
        self.assertTrue(stoppedCleanly(process), process.log()[-2000:])

    def test_registrations(self) -> None:
        """
        Every sipp registration is answered 200 OK, and each phone, whose
        Via names a private address, is stored as behind NAT.
        """
        self.runScenario("register.xml")
        with sqlite3.connect(self.cwd.child("natkeep.sqlite").path) as db:
            rows = db.execute(
                "SELECT count(*), sum(nat) FROM bindings WHERE aor LIKE 'sip:u%'"
            ).fetchone()
        self.assertEqual(rows, (300, 300))

    def test_lifecycle(self) -> None:
        """
        A few hundred phones go through a whole registration life (423,
        register, re-register, refresh one Contact, unregister one with
        Expires 0, unregister all with *, query) with every response code
        and Contact list as expected; nothing is left registered.
        """
        self.runScenario("lifecycle.xml")
        with sqlite3.connect(self.cwd.child("natkeep.sqlite").path) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM bindings").fetchone(), (0,))


class StatusTests(ProcessTestCase):
    """
    The HTTP status endpoint of a running process.
    """

    def test_statusAndMetrics(self) -> None:
        """
        C{/status} shows the bindings, NATed bindings and counters as JSON;
        C{/metrics} the same for Prometheus.
        """
        import json
        import urllib.error
        import urllib.request

        web = freePort()
        process, port = self.start("--status", f"127.0.0.1:{web}", "--period", "10")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as device:
            device.settimeout(5)
            for n in range(3):
                device.sendto(register(user=f"60{n}"), ("127.0.0.1", port))
                device.recvfrom(4096)
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/status", timeout=5) as page:
            status = json.load(page)
        self.assertEqual((status["bindings"], status["nat_bindings"]), (3, 3))
        self.assertEqual(status["counters"]["requests.REGISTER"], 3)
        # ceil(10 * 1000 / 500) * 3000
        self.assertEqual(status["settings"]["capacity"], 60000)
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=5) as page:
            metrics = page.read().decode()
        self.assertIn("natkeep_bindings 3.0\n", metrics)
        self.assertIn('natkeep_requests_total{method="REGISTER"} 3.0\n', metrics)
        for path in ("/status/anything", "/nothing"):
            with self.assertRaises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"http://127.0.0.1:{web}{path}", timeout=5)
            self.assertEqual(caught.exception.code, 404)
        # A client that trickles one byte now and then is not served forever.
        with socket.create_connection(("127.0.0.1", web), timeout=15) as slow:
            slow.sendall(b"G")
            try:
                ended = slow.recv(100)
            except ConnectionResetError:
                ended = b""  # aborted: reset rather than closed
            self.assertEqual(ended, b"")


class SighupTests(ProcessTestCase):
    """
    C{SIGHUP} re-reads the config file.
    """

    def test_sighupAppliesNewMessage(self) -> None:
        """
        After the file's MESSAGE changes and the process gets SIGHUP, the
        same registered device receives the new payload.
        """
        import signal

        config = self.cwd.child("natkeep.conf")
        config.setContent(
            b"SS_SIP_NAT_KEEP_ALIVE_MESSAGE = FIRST\nSS_SIP_NAT_KEEP_ALIVE_PERIOD = 10\n"
        )
        process, port = self.start("--config", config.path, "--send-interval", "100")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as device:
            device.bind(("127.0.0.1", 0))
            device.settimeout(15)
            device.sendto(register(user="9001"), ("127.0.0.1", port))
            self.assertTrue(device.recvfrom(4096)[0].startswith(b"SIP/2.0 200"))
            self.assertEqual(device.recvfrom(4096)[0], b"FIRST")
            config.setContent(
                b"SS_SIP_NAT_KEEP_ALIVE_MESSAGE = SECOND\nSS_SIP_NAT_KEEP_ALIVE_PERIOD = 10\n"
            )
            process.process.send_signal(signal.SIGHUP)
            self.assertEqual(device.recvfrom(4096)[0], b"SECOND")
        process.waitLog("Reloaded settings", timeout=10)
        self.assertIn("1 bindings kept", process.log())
