"""
Kamailio from Debian's packages as a peer in tests: written config,
started in the foreground (optionally inside a lab namespace), stopped by
the test's cleanup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

KAMAILIO = "/usr/sbin/kamailio"

#: The start of every Kamailio config the tests write, as a template for
#: C{str.format} (C{host}, C{port}, C{modules}): a stateful proxy's
#: modules, then more C{loadmodule}/C{modparam} lines may follow.
PREAMBLE = """#!KAMAILIO
debug=2
log_stderror=yes
children={children}
auto_aliases=no
listen=udp:{host}:{port}
mpath="{modules}"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "maxfwd.so"
loadmodule "siputils.so"
loadmodule "pv.so"
loadmodule "xlog.so"
loadmodule "textops.so"
"""

#: The start of C{request_route}, in the same template form: Max-Forwards,
#: in-dialog requests by loose routing, CANCEL to its transaction.  What
#: follows handles initial requests and closes the route.
ROUTE_START = """
request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (has_totag()) {{
        if (loose_route()) {{
            t_relay();
            exit;
        }}
        if (is_method("ACK")) {{
            if (t_check_trans()) {{
                t_relay();
            }}
            exit;
        }}
        sl_send_reply("404", "Not here");
        exit;
    }}
    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
"""
KAMAILIO_MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"

#: Sent until Kamailio answers anything: its socket is open and a worker
#: reads it.
_PROBE = """
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 20
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
    probe.bind((sys.argv[3], 0))
    probe.settimeout(0.2)
    while time.monotonic() < deadline:
        local = "%s:%d" % probe.getsockname()
        probe.sendto(
            ("OPTIONS sip:%s SIP/2.0\\r\\nVia: SIP/2.0/UDP %s;rport;branch=z9hG4bKprobe\\r\\n"
             "From: <sip:probe@%s>;tag=1\\r\\nTo: <sip:%s>;tag=2\\r\\nCall-ID: probe\\r\\n"
             "CSeq: 1 OPTIONS\\r\\nMax-Forwards: 5\\r\\nContent-Length: 0\\r\\n\\r\\n"
             % (host, local, host, host)).encode(),
            (host, port),
        )
        try:
            if probe.recv(4096).startswith(b"SIP/2.0"):
                sys.exit(0)
        except OSError:
            continue
sys.exit(1)
"""


def kamailioUnavailable() -> Optional[str]:
    """
    Why Kamailio cannot run here, or L{None}.
    """
    if not (os.path.exists(KAMAILIO) and os.path.isdir(KAMAILIO_MODULES)):
        return "kamailio is not installed (Debian's kamailio; .ci/run installs it)"
    return None


def startKamailio(
    testCase: SynchronousTestCase,
    cwd: FilePath,
    config: str,
    address: tuple[str, int],
    probeFrom: str,
    netns: Optional[str] = None,
) -> subprocess.Popen[str]:
    """
    Start Kamailio with C{config} (its log in C{cwd}/kamailio.log), and
    wait until it answers at C{address} a probe sent from C{probeFrom}.
    It is stopped when the test ends.
    """
    path = cwd.child("kamailio.cfg")
    path.setContent(config.encode("utf-8"))
    runtime = cwd.child("run")
    if not runtime.exists():
        runtime.makedirs()
    log = open(cwd.child("kamailio.log").path, "a")
    testCase.addCleanup(log.close)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    process = subprocess.Popen(
        prefix + [KAMAILIO, "-DD", "-E", "-f", path.path, "-Y", runtime.path],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    testCase.addCleanup(stop)
    probe = subprocess.run(
        prefix + [sys.executable, "-c", _PROBE, address[0], str(address[1]), probeFrom],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        stop()
        raise AssertionError(
            f"kamailio did not answer:\n{cwd.child('kamailio.log').getContent().decode()}"
        )
    return process


def controlSocket(testCase: SynchronousTestCase) -> str:
    """
    A path for Kamailio's control socket (C{ctl}, for C{kamcmd}): short,
    since a Unix socket's path may not pass 104 bytes, and removed with
    the test.
    """
    folder = tempfile.mkdtemp(prefix="nk-kam-")
    testCase.addCleanup(shutil.rmtree, folder, True)
    return os.path.join(folder, "ctl.sock")
