"""
Running natkeep as a real C{twistd} process from its installed copy, and
sipp against it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from natkeep.testing import request

#: Start twistd through the installed Twisted, whatever PATH holds.
TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
]

SIPP_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp")


def runTwistd(
    args: Sequence[str], cwd: str, env: Optional[dict[str, str]] = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """
    Run C{twistd ARGS} to completion in C{cwd} (outside the source tree, so
    the installed natkeep is the one imported).
    """
    return subprocess.run(
        TWISTD + list(args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def cleanEnv(pythonPath: Optional[str] = None) -> dict[str, str]:
    """
    The environment for a natkeep process: no PYTHONPATH pointing at the
    source tree, optionally one pointing at a drop-in folder.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonPath:
        env["PYTHONPATH"] = pythonPath
    return env


class NatkeepProcess:
    """
    C{twistd -n natkeep} in the foreground of a child process.
    """

    def __init__(
        self,
        args: Sequence[str],
        cwd: str,
        env: Optional[dict[str, str]] = None,
        netns: Optional[str] = None,
    ) -> None:
        self.cwd = cwd
        self.logPath = os.path.join(cwd, "natkeep.log")
        command = TWISTD + ["-n", "--pidfile=", "--logfile", self.logPath, "natkeep"] + list(args)
        if netns:
            command = ["ip", "netns", "exec", netns] + command
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env if env is not None else cleanEnv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def waitReady(self, host: str, port: int, timeout: float = 20.0) -> None:
        """
        Wait until the process answers an OPTIONS on C{host:port}.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        deadline = time.monotonic() + timeout
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"natkeep exited early:\n{self.output()}")
                try:
                    s.sendto(request("OPTIONS"), (host, port))
                    if s.recvfrom(4096)[0].startswith(b"SIP/2.0 200"):
                        return
                except OSError:
                    pass
        raise RuntimeError(f"natkeep did not answer within {timeout} s:\n{self.log()}")

    def waitLog(self, text: str, timeout: float = 20.0) -> None:
        """
        Wait until the log holds C{text} (for a process whose sockets the
        test cannot reach, inside a network namespace).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"natkeep exited early:\n{self.output()}{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"natkeep did not log {text!r} within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def output(self) -> str:
        if self.process.stdout is None:
            return ""
        return self.process.stdout.read().decode("utf-8", "replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """
        Send C{sig} and wait for the process to end.

        @return: its exit status; twistd ends a signalled shutdown by
            re-raising the signal, so a clean stop by SIGTERM is C{-15}.
        """
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def sipp(
    scenario: str,
    target: str,
    *,
    calls: int,
    rate: int,
    localPort: int,
    host: str = "127.0.0.1",
    timeout: int = 60,
    extra: Sequence[str] = (),
    cwd: Any = None,
    netns: Optional[str] = None,
) -> subprocess.CompletedProcess[str]:
    """
    Run one of our sipp scenarios (or the scenario file at a path),
    bounded in calls and time, inside the network namespace C{netns} if
    given.
    """
    command = [
        "sipp",
        "-sf",
        os.path.join(SIPP_FOLDER, scenario),
        "-m",
        str(calls),
        "-r",
        str(rate),
        "-i",
        host,
        "-p",
        str(localPort),
        "-nostdin",
        "-timeout",
        f"{timeout}s",
        "-timeout_error",
        *extra,
        target,
    ]
    if netns:
        command = ["ip", "netns", "exec", netns] + command
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def haveSipp() -> bool:
    return shutil.which("sipp") is not None


def stoppedCleanly(process: NatkeepProcess) -> bool:
    """
    Stop C{process} with SIGTERM and tell whether it shut down in order.
    """
    status = process.stop()
    return status in (0, -signal.SIGTERM) and "Server Shut Down." in process.log()
