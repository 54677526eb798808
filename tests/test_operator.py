"""
The operator's surface against a running C{twistd natkeep}: the admin API,
the C{natkeep} command, the Prometheus metrics (with C{promtool}), JSON
logs, the systemd unit (with C{systemd-analyze}), and the admin API refusing
a client off loopback (inside a network namespace lab).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

import natkeep
from natkeep.admin import AdminError, BindingsAdmin, canonicalAOR, isLoopback
from natkeep.bindings import Binding, BindingTable
from natkeep.logs import eventAsLine
from natkeep.testing import FakeListener, register

from .helpers import freePort
from .natlab import SERVER, NatLab, labUnavailable
from .processes import NatkeepProcess, cleanEnv, runTwistd

#: The source tree's etc/ folder.
ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")

TOKEN = "s3cret-token-of-some-length"


def freeTCPPort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def natkeepCommand(
    *args: str, cwd: Optional[str] = None, env: Optional[dict[str, str]] = None
) -> subprocess.CompletedProcess[str]:
    """
    Run the installed C{natkeep} command (as C{python -m natkeep}, the same
    entry point as the console script) to completion.
    """
    return subprocess.run(
        [sys.executable, "-m", "natkeep", *args],
        cwd=cwd,
        env=env if env is not None else cleanEnv(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


class Phone:
    """
    A loopback UDP socket that registers and collects what it receives.
    """

    def __init__(self, user: str, server: tuple[str, int]) -> None:
        self.user = user
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.contact = f"sip:{user}@192.168.1.20:5060"

    def register(self, cseq: int = 1) -> bytes:
        self.sock.sendto(
            register(
                user=self.user,
                contacts=[f"<{self.contact}>"],
                callId=f"call-{self.user}",
                cseq=cseq,
            ),
            self.server,
        )
        return self.receive(5.0) or b""

    def receive(self, timeout: float) -> Optional[bytes]:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except socket.timeout:
            return None

    def close(self) -> None:
        self.sock.close()


class RunningNatkeepTestCase(SynchronousTestCase):
    """
    A C{twistd natkeep} with a status listener, on loopback.
    """

    def startNatkeep(self, *args: str) -> NatkeepProcess:
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()
        self.sipPort = freePort()
        self.statusPort = freeTCPPort()
        process = NatkeepProcess(
            [
                "--listen",
                f"127.0.0.1:{self.sipPort}",
                "--status",
                f"127.0.0.1:{self.statusPort}",
                "--db",
                "natkeep.sqlite",
                *args,
            ],
            self.cwd.path,
        )
        self.addCleanup(process.stop)
        process.waitReady("127.0.0.1", self.sipPort)
        return process

    def phone(self, user: str) -> Phone:
        phone = Phone(user, ("127.0.0.1", self.sipPort))
        self.addCleanup(phone.close)
        answer = phone.register()
        self.assertTrue(answer.startswith(b"SIP/2.0 200 OK"), answer[:60])
        return phone

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return natkeepCommand("--status", f"127.0.0.1:{self.statusPort}", *args, cwd=self.cwd.path)

    def http(
        self, method: str, path: str, token: Optional[str] = None
    ) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.statusPort}{path}", method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


class AdminCommandTests(RunningNatkeepTestCase):
    """
    C{natkeep bindings|status} against the live table.
    """

    def test_listShowRemove(self) -> None:
        """
        The command lists, filters and shows live bindings; C{rm} removes
        them from the table and the store at once, and the removed device
        gets no heartbeat in the next cycle while the others do.
        """
        self.startNatkeep("--period", "10", "--send-interval", "100")
        alice, bob, carol = self.phone("7001"), self.phone("7002"), self.phone("7003")

        listed = self.command("bindings", "list")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        for user in ("7001", "7002", "7003"):
            self.assertIn(f"sip:{user}@example.com", listed.stdout)
        self.assertIn("3 of 3 bindings", listed.stdout)
        self.assertIn(f"127.0.0.1:{bob.port}", listed.stdout)

        filtered = json.loads(
            self.command("--json", "bindings", "list", "--aor", "7001@example.com").stdout
        )
        self.assertEqual(filtered["total"], 1)
        [shown] = filtered["bindings"]
        self.assertEqual(
            (shown["aor"], shown["contact"], shown["nat"]),
            ("sip:7001@example.com", alice.contact, True),
        )
        bySource = json.loads(
            self.command("--json", "bindings", "list", "--source", f"127.0.0.1:{bob.port}").stdout
        )
        self.assertEqual([b["aor"] for b in bySource["bindings"]], ["sip:7002@example.com"])
        notNat = json.loads(self.command("--json", "bindings", "list", "--nat", "no").stdout)
        self.assertEqual(notNat["total"], 0)
        paged = json.loads(
            self.command("--json", "bindings", "list", "--limit", "1", "--offset", "1").stdout
        )
        self.assertEqual(
            (paged["total"], [b["aor"] for b in paged["bindings"]]), (3, ["sip:7002@example.com"])
        )

        show = self.command("bindings", "show", "sip:7002@example.com")
        self.assertEqual(show.returncode, 0, show.stderr)
        self.assertIn(bob.contact, show.stdout)
        missing = self.command("bindings", "show", "sip:9999@example.com")
        self.assertEqual(missing.returncode, 1)
        self.assertIn("404", missing.stderr)

        status = self.command("status")
        self.assertIn("bindings      3 (3 behind NAT)", status.stdout)

        # Everyone is in the next cycle's batch; then alice is removed.
        for phone in (alice, bob, carol):
            self.assertIsNotNone(phone.receive(15.0), f"{phone.user} got no heartbeat")
        removed = self.command("bindings", "rm", "7001@example.com")
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.assertIn(f"removed sip:7001@example.com {alice.contact}", removed.stdout)
        one = self.command("bindings", "rm", "sip:7003@example.com", "--contact", carol.contact)
        self.assertEqual(one.returncode, 0, one.stderr)
        # The store has lost them already: what a restart would restore.
        with sqlite3.connect(self.cwd.child("natkeep.sqlite").path) as db:
            stored = sorted(row[0] for row in db.execute("SELECT aor FROM bindings"))
        self.assertEqual(stored, ["sip:7002@example.com"])
        # Bob's next heartbeat comes with the next cycle; the removed
        # devices, in the same batch before, get none.
        self.assertIsNotNone(bob.receive(15.0))
        self.assertIsNone(alice.receive(0.5))
        self.assertIsNone(carol.receive(0.1))
        self.assertEqual(json.loads(self.command("--json", "status").stdout)["bindings"], 1)
        counters = json.loads(self.command("--json", "status").stdout)["counters"]
        self.assertEqual(counters["admin.removed"], 2)

    def test_badRequests(self) -> None:
        """
        Wrong filters are 400 naming them; a method other than GET and
        DELETE is 405; DELETE of the collection is refused.
        """
        self.startNatkeep()
        status, body = self.http("GET", "/bindings?limit=lots")
        self.assertEqual(status, 400)
        self.assertIn("limit", body["error"])
        status, body = self.http("GET", "/bindings?source=nowhere")
        self.assertEqual(status, 400)
        status, body = self.http("GET", "/bindings?nat=maybe")
        self.assertEqual(status, 400)
        status, _ = self.http("POST", "/bindings")
        self.assertEqual(status, 405)
        status, _ = self.http("DELETE", "/bindings")
        self.assertEqual(status, 405)
        status, _ = self.http("DELETE", "/bindings/sip:nobody@example.com")
        self.assertEqual(status, 404)

    def test_token(self) -> None:
        """
        With an admin token, a call without it (even from loopback) is
        401, with it the call goes through; the command finds status and
        token in a config file.
        """
        self.startNatkeep("--admin-token", TOKEN)
        self.phone("7101")
        status, _ = self.http("GET", "/bindings")
        self.assertEqual(status, 401)
        status, _ = self.http("GET", "/bindings", token=TOKEN + "x")
        self.assertEqual(status, 401)
        status, body = self.http("GET", "/bindings", token=TOKEN)
        self.assertEqual((status, body["total"]), (200, 1))
        refused = self.command("bindings", "list")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("401", refused.stderr)
        config = self.cwd.child("admin.conf")
        config.setContent(f"status = 127.0.0.1:{self.statusPort}\nadmin_token = {TOKEN}\n".encode())
        listed = natkeepCommand("--config", config.path, "bindings", "list", cwd=self.cwd.path)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("sip:7101@example.com", listed.stdout)

    def test_unreachable(self) -> None:
        """
        Nothing listening: the command says where it tried, and exits 1.
        """
        port = freeTCPPort()
        result = natkeepCommand("--status", f"127.0.0.1:{port}", "status")
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"cannot reach natkeep at http://127.0.0.1:{port}", result.stderr)
        result = natkeepCommand("status")
        self.assertEqual(result.returncode, 1)
        self.assertIn("no status listener", result.stderr)


class MetricsTests(RunningNatkeepTestCase):
    """
    C{/metrics} of a running natkeep.
    """

    def scrape(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.statusPort}/metrics", timeout=10
        ) as answer:
            self.assertTrue(answer.headers["content-type"].startswith("text/plain"))
            return str(answer.read().decode("utf-8"))

    def test_parsedAndChecked(self) -> None:
        """
        The exposition parses with prometheus_client's parser, every family
        has HELP text, a REGISTER shows as a method label, and C{promtool
        check metrics} finds nothing to complain about.
        """
        from prometheus_client.parser import text_string_to_metric_families

        self.startNatkeep()
        self.phone("7201")
        text = self.scrape()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for family in families.values():
            self.assertTrue(family.documentation, family.name)
        registers = [
            s.value
            for s in families["natkeep_requests"].samples
            if s.labels.get("method") == "REGISTER"
        ]
        self.assertEqual(registers, [1.0])
        self.assertEqual(families["natkeep_bindings"].samples[0].value, 1.0)
        self.assertEqual(
            families["natkeep_build_info"].samples[0].labels["version"], natkeep.__version__
        )
        self.assertIn("process_cpu_seconds", families)
        self.assertIn("natkeep_heartbeats_unreachable", families)
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool is not installed (Debian's prometheus; .ci/run installs it)")
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(
            (checked.returncode, checked.stdout + checked.stderr), (0, ""), "promtool complained"
        )


class CommandTests(SynchronousTestCase):
    """
    The parts of the C{natkeep} command that need no running service.
    """

    def test_version(self) -> None:
        """
        C{natkeep --version} names natkeep's version and build, not
        Twisted's version.
        """
        expected = f"natkeep {natkeep.__version__} ({natkeep.build()} build)"
        result = natkeepCommand("--version")
        self.assertEqual(result.stdout.strip(), expected)
        script = shutil.which("natkeep")
        self.assertIsNotNone(script, "the console script is installed")
        assert script is not None
        viaScript = subprocess.run([script, "--version"], capture_output=True, text=True)
        self.assertEqual(viaScript.stdout.strip(), expected)
        cwd = FilePath(self.mktemp())
        cwd.makedirs()
        viaTwistd = runTwistd(["natkeep", "--version"], cwd.path, cleanEnv())
        self.assertEqual(viaTwistd.stdout.strip(), expected)

    def test_check(self) -> None:
        """
        C{natkeep check} prints the capacity plan of C{twistd natkeep
        --check}, and names a wrong value in the config.
        """
        cwd = FilePath(self.mktemp())
        cwd.makedirs()
        result = natkeepCommand(
            "--config", os.path.join(ETC, "natkeep.conf"), "check", "--devices", "1000"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        twistd = runTwistd(
            [
                "natkeep",
                "--config",
                os.path.join(ETC, "natkeep.conf"),
                "--check",
                "--devices",
                "1000",
            ],
            cwd.path,
            cleanEnv(),
        )
        self.assertEqual(result.stdout, twistd.stdout)
        self.assertIn("1000", result.stdout)
        # The guard's limits are part of the plan.
        self.assertIn("rate limit          200/s per source IP, burst 400", result.stdout)
        self.assertIn(
            "binding caps        16 per AOR (replace past it), 1000 per source IP, 1000000 in all",
            result.stdout,
        )
        self.assertIn("authentication      off", result.stdout)
        bad = cwd.child("bad.conf")
        bad.setContent(b"SS_SIP_NAT_KEEP_ALIVE_PERIOD = 5\n")
        refused = natkeepCommand("--config", bad.path, "check")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("SS_SIP_NAT_KEEP_ALIVE_PERIOD", refused.stderr)

    def test_shippedFiles(self) -> None:
        """
        The annotated config and the systemd unit are installed with the
        package's data, and py.typed marks it typed.
        """
        share = os.path.join(sys.prefix, "share", "natkeep")
        for name in ("natkeep.conf", "natkeep.service"):
            with (
                open(os.path.join(share, name), encoding="utf-8") as installed,
                open(os.path.join(ETC, name), encoding="utf-8") as source,
            ):
                self.assertEqual(installed.read(), source.read())
        self.assertTrue(os.path.exists(os.path.join(os.path.dirname(natkeep.__file__), "py.typed")))


class JSONLogTests(SynchronousTestCase):
    """
    C{natkeep run --log-format json}: one JSON object per line.
    """

    def test_runJSON(self) -> None:
        cwd = FilePath(self.mktemp())
        cwd.makedirs()
        port = freePort()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "natkeep",
                "run",
                "--log-format",
                "json",
                "--",
                "--listen",
                f"127.0.0.1:{port}",
                "--db",
                "natkeep.sqlite",
            ],
            cwd=cwd.path,
            env=cleanEnv(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            lines: list[dict[str, Any]] = []
            deadline = time.monotonic() + 20
            assert process.stdout is not None
            while time.monotonic() < deadline:
                line = process.stdout.readline()
                if not line:
                    break
                lines.append(json.loads(line))
                if "Registrar listening" in lines[-1]["message"]:
                    break
        finally:
            process.terminate()
            process.wait(20)
        [listening] = [r for r in lines if "Registrar listening" in r["message"]]
        self.assertEqual(listening["level"], "info")
        self.assertEqual(listening["address"], f"127.0.0.1:{port}")
        self.assertEqual(listening["namespace"], "natkeep.protocol")
        self.assertRegex(listening["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")

    def test_twistdWithoutJSONLogger(self) -> None:
        """
        C{twistd natkeep --log-format json} without natkeep's JSON logger
        stops with one line saying how to start it.
        """
        cwd = FilePath(self.mktemp())
        cwd.makedirs()
        result = runTwistd(
            ["-n", "natkeep", "--log-format", "json", "--listen", f"127.0.0.1:{freePort()}"],
            cwd.path,
            cleanEnv(),
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            "log_format = json needs twistd --logger natkeep.logs.jsonLogger", result.stderr
        )

    def test_eventAsLine(self) -> None:
        """
        An event becomes one line of JSON with its formatted message and
        its fields; what JSON cannot hold is given as text.
        """
        from twisted.logger import LogLevel

        line = eventAsLine(
            {
                "log_format": "Removed {aor}",
                "log_level": LogLevel.warn,
                "log_namespace": "natkeep.sender",
                "log_time": 0.0,
                "aor": "sip:a@b",
                "source": ("1.2.3.4", 5),
                "odd": object(),
            }
        )
        assert line is not None
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(record["message"], "Removed sip:a@b")
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["time"], "1970-01-01T00:00:00.000+00:00")
        self.assertEqual(record["source"], ["1.2.3.4", 5])
        self.assertTrue(record["odd"].startswith("<object"))


class SystemdUnitTests(SynchronousTestCase):
    """
    C{etc/natkeep.service}.
    """

    def test_verify(self) -> None:
        """
        C{systemd-analyze verify} accepts the unit without a word, with
        ExecStart pointed at the installed command; the unit runs as its
        own user, may bind port 5060, reloads with HUP and restarts on
        failure.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest(
                "systemd-analyze is not installed (Debian's systemd; .ci/run installs it)"
            )
        with open(os.path.join(ETC, "natkeep.service"), encoding="utf-8") as f:
            unit = f.read()
        for line in (
            "DynamicUser=yes",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "StateDirectory=natkeep",
        ):
            self.assertIn(line + "\n", unit)
        script = shutil.which("natkeep")
        assert script is not None
        folder = FilePath(self.mktemp())
        folder.makedirs()
        local = folder.child("natkeep.service")
        local.setContent(
            unit.replace("/opt/natkeep/bin/natkeep", os.path.realpath(script)).encode("utf-8")
        )
        local.chmod(0o644)
        result = subprocess.run(
            [analyze, "verify", local.path], capture_output=True, text=True, timeout=60
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))


class AdminUnitTests(SynchronousTestCase):
    """
    L{BindingsAdmin} and its helpers, without a network.
    """

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.table = BindingTable()
        self.commits = 0
        self.table.add(
            Binding(
                "sip:1@example.com",
                "sip:1@10.0.0.1",
                "",
                ("198.51.100.1", 5060),
                FakeListener(),
                True,
                3600,
                "c",
                1,
            )
        )

    def commit(self) -> None:
        self.commits += 1

    def render(self, admin: BindingsAdmin, request: DummyRequest) -> dict[str, Any]:
        body = admin.render(request)  # type: ignore[arg-type]
        return dict(json.loads(body))

    def test_offLoopbackRefused(self) -> None:
        """
        Without a token, a client off loopback gets 403 and nothing is
        removed; IPv4 and IPv6 loopback (and IPv4-mapped loopback) pass.
        """
        admin = BindingsAdmin(self.table, self.clock, self.commit)
        request = DummyRequest([b"sip:1@example.com"])
        request.method = b"DELETE"
        request.client = IPv4Address("TCP", "198.18.0.3", 40000)
        self.assertIn("loopback", self.render(admin, request)["error"])
        self.assertEqual(request.responseCode, 403)
        self.assertEqual(len(self.table), 1)
        for address in (
            IPv4Address("TCP", "127.0.0.9", 1),
            IPv6Address("TCP", "::1", 1),
            IPv6Address("TCP", "::ffff:127.0.0.1", 1),
        ):
            request = DummyRequest([])
            request.client = address
            self.assertEqual(self.render(admin, request)["total"], 1)
        self.assertFalse(isLoopback("::ffff:10.0.0.1"))
        self.assertFalse(isLoopback("not an address"))

    def test_removeCommits(self) -> None:
        """
        A DELETE removes from the live table (the binding is dead at once)
        and commits before it answers.
        """
        [binding] = self.table.lookup("sip:1@example.com")
        admin = BindingsAdmin(self.table, self.clock, self.commit)
        request = DummyRequest([b"1@EXAMPLE.com"])
        request.method = b"DELETE"
        request.client = IPv4Address("TCP", "127.0.0.1", 1)
        self.assertEqual(self.render(admin, request)["removed"], ["sip:1@10.0.0.1"])
        self.assertEqual(self.commits, 1)
        self.assertEqual(len(self.table), 0)
        self.assertLess(binding.expiresAt, 0)
        self.assertEqual(admin.stats["admin.removed"], 1)

    def test_canonicalAOR(self) -> None:
        """
        An AOR given with or without scheme, in any host case, is the
        table's form; something else is a 400.
        """
        self.assertEqual(canonicalAOR("1001@Example.COM"), "sip:1001@example.com")
        self.assertEqual(canonicalAOR(" sip:1001@example.com "), "sip:1001@example.com")
        self.assertEqual(canonicalAOR("sips:a@b;transport=tls"), "sips:a@b")
        error = self.assertRaises(AdminError, canonicalAOR, "sip:")
        self.assertEqual(error.status, 400)


class RemoteAdminTests(SynchronousTestCase):
    """
    The admin API seen from another host, inside a network namespace lab.
    """

    def test_offLoopbackNeedsToken(self) -> None:
        """
        natkeep listens for status on the lab's server address; from the
        lab's public host, C{/status} answers but C{/bindings} is 403
        without a token configured.  With one, the same call without it is
        401 and with it 200.
        """
        reason = labUnavailable()
        if reason:
            raise SkipTest(reason)
        lab = NatLab("adm", 30)
        self.addCleanup(lab.destroy)
        lab.build()
        for tokenArgs, expected in (
            ([], (200, 403, 403)),
            (["--admin-token", TOKEN], (200, 401, 200)),
        ):
            cwd = FilePath(self.mktemp())
            cwd.makedirs()
            process = NatkeepProcess(
                ["--listen", f"{SERVER}:5060", "--status", f"{SERVER}:8080", "--db", "x.sqlite"]
                + tokenArgs,
                cwd.path,
                netns=lab.server,
            )
            try:
                process.waitLog("Restored 0 bindings")
                process.waitLog("starting on 8080")
                probe = (
                    "import sys, urllib.request, urllib.error\n"
                    "def get(path, token=None):\n"
                    f"    r = urllib.request.Request('http://{SERVER}:8080' + path)\n"
                    "    if token: r.add_header('Authorization', 'Bearer ' + token)\n"
                    "    try:\n"
                    "        return urllib.request.urlopen(r, timeout=10).status\n"
                    "    except urllib.error.HTTPError as e:\n"
                    "        return e.code\n"
                    f"print(get('/status'), get('/bindings'), get('/bindings', {TOKEN!r}))\n"
                )
                seen = lab.run(sys.executable, "-c", probe, ns=lab.public)
                self.assertEqual(tuple(int(n) for n in seen.split()), expected, process.log())
            finally:
                process.stop()
