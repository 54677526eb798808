"""
Calls through natkeep on the wire: sipp as caller and phone, a running
C{twistd natkeep} as the edge between them, on loopback and across the
real NAT of the network-namespace lab.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from typing import Optional

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from natkeep.testing import register, sippCounts

from .helpers import freePort
from .kamailio import (
    KAMAILIO_MODULES,
    PREAMBLE,
    ROUTE_START,
    kamailioUnavailable,
    startKamailio,
)
from .natlab import DEVICE, PUBLIC, ROUTER_WAN, SERVER, NatLab, labUnavailable, startServer
from .processes import SIPP_FOLDER, NatkeepProcess, haveSipp

#: The lab NAT's UDP timeout, and how long the phone stays silent before
#: it is called: more than three of them.
NAT_TIMEOUT = 12
SILENCE = 3 * NAT_TIMEOUT + 3


def scenario(
    folder: FilePath, name: str, phoneHangsUp: bool, caller: str = "caller@192.0.2.99"
) -> str:
    """
    One of the relay scenarios, with the choice of who hangs up made and
    the caller's identity (C{user@domain}) filled in.
    """
    with open(os.path.join(SIPP_FOLDER, name), encoding="utf-8") as f:
        text = f.read()
    user, _, domain = caller.partition("@")
    text = text.replace("CALLER_USER", user).replace("CALLER_DOMAIN", domain)
    text = text.replace(
        '<nop condexec="hangup" next="hangUp" />', ('<nop next="hangUp" />' if phoneHangsUp else "")
    )
    text = text.replace(
        '<nop condexec="phoneHangsUp" next="waitBye" />',
        ('<nop next="waitBye" />' if phoneHangsUp else ""),
    )
    path = folder.child(f"{'phone-bye' if phoneHangsUp else 'caller-bye'}-{user}-{name}")
    path.setContent(text.encode("utf-8"))
    return path.path


def sippCommand(
    scenarioPath: str,
    host: str,
    port: int,
    target: str,
    netns: Optional[str] = None,
    service: str = "1001",
) -> list[str]:
    command = [
        "sipp",
        "-sf",
        scenarioPath,
        "-i",
        host,
        "-p",
        str(port),
        "-m",
        "1",
        "-s",
        service,
        "-nostdin",
        "-timeout",
        "30s",
        "-timeout_error",
        "-trace_err",
        target,
    ]
    return (["ip", "netns", "exec", netns] if netns else []) + command


def placeCall(
    testCase: SynchronousTestCase,
    folder: FilePath,
    phoneHangsUp: bool,
    phone: tuple[str, int],
    caller: tuple[str, int],
    natkeep: str,
    phoneNetns: Optional[str] = None,
    callerNetns: Optional[str] = None,
    callee: str = "1001",
    caller_: str = "caller@192.0.2.99",
    callerTarget: Optional[str] = None,
) -> None:
    """
    Run the phone's sipp, then the caller's, both toward natkeep; assert
    both saw a whole call.
    """
    phoneRun = subprocess.Popen(
        sippCommand(
            scenario(folder, "phone.xml", phoneHangsUp),
            *phone,
            natkeep,
            phoneNetns,
            callee,
        ),
        cwd=folder.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        # The phone's sipp binds its port before the caller dials (the
        # caller's INVITE is retransmitted anyway).
        time.sleep(1.0)
        callerRun = subprocess.run(
            sippCommand(
                scenario(folder, "caller.xml", phoneHangsUp, caller_),
                *caller,
                callerTarget or natkeep,
                callerNetns,
                callee,
            ),
            cwd=folder.path,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        phoneOutput, _ = phoneRun.communicate(timeout=60)
    finally:
        if phoneRun.poll() is None:
            phoneRun.kill()
            phoneRun.wait()
    errors = "".join(
        child.getContent().decode("utf-8", "replace")
        for child in folder.children()
        if child.basename().endswith("_errors.log")
    )
    testCase.assertEqual(sippCounts(callerRun.stdout), (1, 0), errors + callerRun.stdout[-1500:])
    testCase.assertEqual(sippCounts(phoneOutput), (1, 0), errors + phoneOutput[-1500:])


def registerPhone(testCase: SynchronousTestCase, host: str, server: tuple[str, int]) -> int:
    """
    Register 1001 from a free port on C{host}, as the sipp phone that will
    take calls there; return the port.
    """
    port = freePort(host=host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        phone.bind((host, port))
        phone.settimeout(5)
        phone.sendto(register(user="1001", contacts=[f"<sip:1001@{host}:{port}>"]), server)
        testCase.assertTrue(phone.recv(4096).startswith(b"SIP/2.0 200 OK"))
    return port


class LoopbackCallTests(SynchronousTestCase):
    """
    A caller at the upstream's address calls a registered phone through
    natkeep, on loopback.
    """

    def setUp(self) -> None:
        if not haveSipp():
            raise SkipTest("sipp is not installed (Debian's sip-tester; .ci/run installs it)")
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()

    def test_callsBothWays(self) -> None:
        """
        INVITE/180/200/ACK and a BYE from the caller, then a second call
        with the BYE from the phone: every request and response crosses
        natkeep, and natkeep counts them.
        """
        port = freePort()
        callerPort = freePort(host="127.0.0.13")
        process = NatkeepProcess(
            [
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                f"sip:127.0.0.13:{callerPort}",
                "--db",
                "natkeep.sqlite",
                "--period",
                "60",
                "--status",
                f"127.0.0.1:{freeTCPPort()}",
            ],
            self.cwd.path,
        )
        self.addCleanup(process.stop)
        process.waitReady("127.0.0.1", port)
        for phoneHangsUp in (False, True):
            phonePort = registerPhone(self, "127.0.0.12", ("127.0.0.1", port))
            placeCall(
                self,
                self.cwd,
                phoneHangsUp,
                ("127.0.0.12", phonePort),
                ("127.0.0.13", callerPort),
                f"127.0.0.1:{port}",
            )
        log = process.log()
        self.assertNotIn("Traceback", log)


def freeTCPPort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Run in the lab's device namespace: register from port 5060, stay
#: silent, and report every datagram that arrived, by kind.
DEVICE_SCRIPT = """
import json, socket, sys, time
sys.path[:0] = [{path!r}]
from natkeep.testing import register
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(({device!r}, 5060))
s.settimeout(5)
s.sendto(register(user="1001", contacts=["<sip:1001@{device}:5060>"]), ({server!r}, 5060))
answer = s.recv(4096)
seen = {{"answer": answer[:20].decode(), "heartbeats": 0, "other": []}}
deadline = time.monotonic() + {silence}
while time.monotonic() < deadline:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        data, source = s.recvfrom(65536)
    except socket.timeout:
        break
    if data == b"HELLO" and source == ({server!r}, 5060):
        seen["heartbeats"] += 1
    else:
        seen["other"].append([data[:30].decode("latin-1"), list(source)])
s.close()
print(json.dumps(seen))
"""


class NatLabCallTests(SynchronousTestCase):
    """
    The phone behind the lab's NAT (address- and port-dependent filtering:
    only established traffic comes in), natkeep on the server, the caller on
    the public host, which is natkeep's upstream.
    """

    def setUp(self) -> None:
        reason = labUnavailable()
        if reason:
            raise SkipTest(reason)
        if not haveSipp():
            raise SkipTest("sipp is not installed (Debian's sip-tester; .ci/run installs it)")
        self.lab = NatLab("call", NAT_TIMEOUT)
        self.addCleanup(self.lab.destroy)
        self.lab.build()
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()

    def test_callAfterSilence(self) -> None:
        """
        After more than three NAT timeouts of silence from the phone, an
        INVITE straight from the caller to the phone's public mapping never
        arrives (the control), while calls through natkeep complete, with
        a BYE from each side in two runs.
        """
        process = startServer(
            self, self.lab, self.cwd, "--upstream", f"sip:{PUBLIC}:5070", "--period", "10"
        )
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        device = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.lab.device,
                sys.executable,
                "-c",
                DEVICE_SCRIPT.format(path=top, device=DEVICE, server=SERVER, silence=SILENCE),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            mapped = self.mappedPort(process)
            time.sleep(SILENCE - 6)
            # The control: straight from the caller to the mapping.
            self.lab.run(
                sys.executable,
                "-c",
                "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                f"s.bind(({PUBLIC!r}, 5070)); "
                f"s.sendto(b'INVITE sip:1001@{DEVICE} SIP/2.0\\r\\n\\r\\n', ({ROUTER_WAN!r}, {mapped}))",
                ns=self.lab.public,
            )
            out, err = device.communicate(timeout=SILENCE + 30)
        finally:
            if device.poll() is None:
                device.kill()
                device.wait()
        seen = json.loads(out or "{}") if out else {}
        self.assertEqual(seen.get("answer"), "SIP/2.0 200 OK\r\nVia:", err)
        self.assertGreaterEqual(seen["heartbeats"], SILENCE // 10 - 1)
        self.assertEqual(seen["other"], [], "the direct INVITE got through the NAT")
        for phoneHangsUp in (False, True):
            placeCall(
                self,
                self.cwd,
                phoneHangsUp,
                (DEVICE, 5060),
                (PUBLIC, 5070),
                f"{SERVER}:5060",
                phoneNetns=self.lab.device,
                callerNetns=self.lab.public,
            )
        self.assertNotIn("Traceback", process.log())

    def mappedPort(self, process: NatkeepProcess) -> int:
        """
        The phone's public port, as natkeep stored it.
        """
        deadline = time.monotonic() + 10
        path = self.cwd.child("natkeep.sqlite").path
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with sqlite3.connect(path) as db:
                    rows = db.execute("SELECT host, port FROM bindings").fetchall()
                if rows:
                    [(host, port)] = rows
                    self.assertEqual(host, ROUTER_WAN)
                    return int(port)
            time.sleep(0.1)
        raise AssertionError(f"the phone never registered:\n{process.log()}")


#: A softswitch as Kamailio's own route script says it: calls from natkeep
#: (devices calling out) go to the far end; calls from anyone else go to
#: natkeep for a user of example.com.  Stateful, Record-Routing, loose
#: routing for in-dialog requests.
KAMAILIO_CONFIG = (
    PREAMBLE
    + ROUTE_START
    + """    record_route();
    if ($si == "{natkeepHost}" && $sp == {natkeepPort}) {{
        xlog("L_INFO", "call out from natkeep: $ru\\n");
        $du = "sip:{farHost}:{farPort}";
    }} else {{
        xlog("L_INFO", "call in for natkeep: $rU\\n");
        $ru = "sip:" + $rU + "@example.com";
        $du = "sip:{natkeepHost}:{natkeepPort}";
    }}
    t_relay();
    exit;
}}
"""
)


class KamailioUpstreamTests(SynchronousTestCase):
    """
    Kamailio from Debian's packages as natkeep's upstream softswitch.
    """

    def setUp(self) -> None:
        if not haveSipp():
            raise SkipTest("sipp is not installed (Debian's sip-tester; .ci/run installs it)")
        reason = kamailioUnavailable()
        if reason:
            raise SkipTest(reason)
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()

    def startKamailio(self, natkeepPort: int, port: int, farPort: int) -> None:
        config = KAMAILIO_CONFIG.format(
            children=1,
            host="127.0.0.24",
            port=port,
            modules=KAMAILIO_MODULES,
            natkeepHost="127.0.0.1",
            natkeepPort=natkeepPort,
            farHost="127.0.0.25",
            farPort=farPort,
        )
        startKamailio(self, self.cwd, config, ("127.0.0.24", port), "127.0.0.26")

    def test_callsBothWays(self) -> None:
        """
        A call from the far end through Kamailio and natkeep reaches the
        registered phone, and a call from the phone through natkeep and
        Kamailio reaches the far end; both complete with ACK and BYE.
        """
        port = freePort()
        kamailioPort = freePort(host="127.0.0.24")
        farPort = freePort(host="127.0.0.25")
        process = NatkeepProcess(
            [
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                f"sip:127.0.0.24:{kamailioPort}",
                "--db",
                "natkeep.sqlite",
                "--period",
                "60",
            ],
            self.cwd.path,
        )
        self.addCleanup(process.stop)
        process.waitReady("127.0.0.1", port)
        self.startKamailio(port, kamailioPort, farPort)
        phonePort = registerPhone(self, "127.0.0.22", ("127.0.0.1", port))
        kamailio = f"127.0.0.24:{kamailioPort}"
        # In: the far end calls 1001 at the softswitch.
        placeCall(
            self,
            self.cwd,
            False,
            ("127.0.0.22", phonePort),
            ("127.0.0.25", farPort),
            f"127.0.0.1:{port}",
            caller_="far@127.0.0.25",
            callerTarget=kamailio,
        )
        # Out: the phone calls 2000, which the softswitch sends to the far end.
        placeCall(
            self,
            self.cwd,
            True,
            ("127.0.0.25", farPort),
            ("127.0.0.22", phonePort),
            kamailio,
            callee="2000",
            caller_="1001@example.com",
            callerTarget=f"127.0.0.1:{port}",
        )
        kamailioLog = self.cwd.child("kamailio.log").getContent().decode("utf-8", "replace")
        self.assertIn("call in for natkeep: 1001", kamailioLog)
        self.assertIn("call out from natkeep: sip:2000@example.com", kamailioLog)
        self.assertNotIn("Traceback", process.log())
