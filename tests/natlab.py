"""
A real NAT in network namespaces, for tests.

    server ns  198.18.0.1 ──┐ (bridge)
    public ns  198.18.0.3 ──┤
    router ns  198.18.0.2 ──┘ WAN     LAN 100.64.10.1 ── device ns 100.64.10.2

The router masquerades the LAN behind its WAN address, forwards only
LAN-to-WAN and established/related traffic, and forgets an idle UDP mapping
after C{udpTimeout} seconds.  Every address lives in namespaces the lab
creates (the RFC 2544 benchmarking range and the RFC 6598 shared range);
nothing reaches the machine's own network.  The lab is removed by
L{NatLab.destroy}, which tests register as a cleanup before building.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Optional

from .processes import NatkeepProcess

SERVER, ROUTER_WAN, PUBLIC = "198.18.0.1", "198.18.0.2", "198.18.0.3"
ROUTER_LAN, DEVICE = "100.64.10.1", "100.64.10.2"


def startServer(testCase: Any, lab: "NatLab", cwd: Any, *args: str) -> NatkeepProcess:
    """
    natkeep on the lab's server, UDP 5060, its store in C{cwd}, batches
    100 ms apart, with C{args} after; stopped when C{testCase} ends.  It
    returns once natkeep has restored its (empty) store.
    """
    process = NatkeepProcess(
        ["--listen", f"{SERVER}:5060", "--db", "natkeep.sqlite", "--send-interval", "100", *args],
        cwd.path,
        netns=lab.server,
    )
    testCase.addCleanup(process.stop)
    process.waitLog("Restored 0 bindings")
    return process


AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "natlab_device.py")


def labUnavailable() -> Optional[str]:
    """
    Why a lab cannot be built here, or L{None} when it can.
    """
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces); .ci/run runs as root"
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2, nftables, conntrack; .ci/run installs them)"
    probe = f"nk-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NatLab:
    """
    The namespaces, links and NAT rules of one lab.
    """

    def __init__(self, tag: str, udpTimeout: int) -> None:
        suffix = f"{os.getpid() % 10000}{tag}"
        self.server, self.router = f"nks{suffix}", f"nkr{suffix}"
        self.device, self.public = f"nkd{suffix}", f"nkp{suffix}"
        self.udpTimeout = udpTimeout
        self._links = [f"nka{suffix}", f"nkb{suffix}", f"nkc{suffix}"]
        self._extra: list[str] = []
        self._nodeLinks: dict[str, str] = {}

    def run(self, *command: str, ns: Optional[str] = None, check: bool = True) -> str:
        full = (["ip", "netns", "exec", ns] if ns else []) + list(command)
        result = subprocess.run(full, capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(full)} failed: {result.stderr.strip()}")
        return result.stdout

    def build(self) -> None:
        for ns in (self.server, self.router, self.device, self.public):
            self.run("ip", "netns", "add", ns)
            self.run("ip", "link", "set", "lo", "up", ns=ns)
        sr, sp, rd = self._links
        # server <-> router, server <-> public, router <-> device
        for name, a, b in (
            (sr, self.server, self.router),
            (sp, self.server, self.public),
            (rd, self.router, self.device),
        ):
            self.run("ip", "link", "add", f"{name}x", "type", "veth", "peer", "name", f"{name}y")
            self.run("ip", "link", "set", f"{name}x", "netns", a)
            self.run("ip", "link", "set", f"{name}y", "netns", b)
        s = self.server
        self.run("ip", "link", "add", "br0", "type", "bridge", ns=s)
        for port in (f"{sr}x", f"{sp}x"):
            self.run("ip", "link", "set", port, "master", "br0", ns=s)
            self.run("ip", "link", "set", port, "up", ns=s)
        self.run("ip", "addr", "add", f"{SERVER}/24", "dev", "br0", ns=s)
        self.run("ip", "link", "set", "br0", "up", ns=s)
        self.run("ip", "addr", "add", f"{PUBLIC}/24", "dev", f"{sp}y", ns=self.public)
        self.run("ip", "link", "set", f"{sp}y", "up", ns=self.public)
        r = self.router
        self.run("ip", "addr", "add", f"{ROUTER_WAN}/24", "dev", f"{sr}y", ns=r)
        self.run("ip", "addr", "add", f"{ROUTER_LAN}/24", "dev", f"{rd}x", ns=r)
        self.run("ip", "link", "set", f"{sr}y", "up", ns=r)
        self.run("ip", "link", "set", f"{rd}x", "up", ns=r)
        self.run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=r)
        rules = f"""
table ip natlab {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{sr}y" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{rd}x" oifname "{sr}y" accept
    }}
}}
"""
        subprocess.run(
            ["ip", "netns", "exec", r, "nft", "-f", "-"],
            input=rules,
            text=True,
            check=True,
            capture_output=True,
            timeout=30,
        )
        for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
            self.run("sysctl", "-qw", f"net.netfilter.{key}={self.udpTimeout}", ns=r)
        d = self.device
        self.run("ip", "addr", "add", f"{DEVICE}/24", "dev", f"{rd}y", ns=d)
        self.run("ip", "link", "set", f"{rd}y", "up", ns=d)
        self.run("ip", "route", "add", "default", "via", ROUTER_LAN, ns=d)

    def addNode(self, name: str, address: str) -> str:
        """
        One more namespace on the server's bridge, with C{address}: a
        second server host (for failover).  It is removed with the lab.

        @return: the namespace's name.
        """
        ns = f"{self.server}{name}"
        link = f"{self._links[0][:-1]}{name}"
        self.run("ip", "netns", "add", ns)
        self._extra.append(ns)
        self.run("ip", "link", "set", "lo", "up", ns=ns)
        self.run("ip", "link", "add", f"{link}x", "type", "veth", "peer", "name", f"{link}y")
        self.run("ip", "link", "set", f"{link}x", "netns", self.server)
        self.run("ip", "link", "set", f"{link}y", "netns", ns)
        self.run("ip", "link", "set", f"{link}x", "master", "br0", ns=self.server)
        self.run("ip", "link", "set", f"{link}x", "up", ns=self.server)
        self.run("ip", "addr", "add", f"{address}/24", "dev", f"{link}y", ns=ns)
        self.run("ip", "link", "set", f"{link}y", "up", ns=ns)
        self._nodeLinks[ns] = f"{link}y"
        return ns

    def moveAddress(self, address: str, old: Optional[str], new: str) -> None:
        """
        Move C{address} from the node namespace C{old} (if any) to C{new},
        and make the router forget where it was (as a gratuitous ARP would).
        """
        if old is not None:
            self.run("ip", "addr", "del", f"{address}/24", "dev", self._nodeLinks[old], ns=old)
        self.run("ip", "addr", "add", f"{address}/24", "dev", self._nodeLinks[new], ns=new)
        self.run("ip", "neigh", "flush", "to", address, ns=self.router, check=False)
        self.run("ip", "neigh", "flush", "to", address, ns=self.server, check=False)

    def destroy(self) -> None:
        for ns in (self.server, self.router, self.device, self.public, *self._extra):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def udpMappings(self) -> list[str]:
        """
        The router's UDP conntrack entries.
        """
        out = subprocess.run(
            ["ip", "netns", "exec", self.router, "conntrack", "-L", "-p", "udp"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return [line for line in out.splitlines() if line.startswith("udp")]

    def flushMappings(self) -> None:
        """
        Kill every NAT mapping of the router.
        """
        self.run("conntrack", "-F", ns=self.router, check=False)

    def startDevice(
        self,
        ns: str,
        host: str,
        user: str,
        port: int,
        duration: float,
        serverPort: int,
        answerOptions: bool = False,
        serverHost: str = SERVER,
    ) -> "Agent":
        command = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            AGENT,
            "--server",
            f"{serverHost}:{serverPort}",
            "--user",
            user,
            "--host",
            host,
            "--port",
            str(port),
            "--duration",
            str(duration),
        ]
        if answerOptions:
            command.append("--answer-options")
        return Agent(
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        )


class Agent:
    """
    A running lab device and what it reports.
    """

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []

    def waitRegistered(self, timeout: float = 15) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"device agent ended: {self.process.stderr.read() if self.process.stderr else ''}"
            )
        event = json.loads(line)
        if "registered" not in event:
            raise RuntimeError(f"device agent: {event}")
        #: When it was answered 200 OK, on the machine's monotonic clock.
        self.registeredAt: float = event["at"]

    def finish(self, timeout: float = 400) -> list[dict[str, Any]]:
        """
        Wait for the agent to end and return the datagrams it received.
        """
        out, err = self.process.communicate(timeout=timeout)
        self.events = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [e for e in self.events if "t" in e]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
