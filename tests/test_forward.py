"""
Tests for L{natkeep.forward}: forward mode (REGISTER on to the upstream
with Path, refreshes absorbed) on in-memory sockets and a fake clock.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections import Counter
from typing import Optional

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from natkeep.config import ConfigError, buildSettings
from natkeep.digest import expectedResponse, ha1Of, parseAuthorization
from natkeep.forward import MARGIN, RETRY_AFTER, UPSTREAM_TIMEOUT
from natkeep.sip import Request, Response, parseMessage, parseNameAddr, splitValues
from natkeep.testing import register, sippCounts

from .helpers import freePort
from .kamailio import (
    KAMAILIO_MODULES,
    PREAMBLE,
    ROUTE_START,
    controlSocket,
    kamailioUnavailable,
    startKamailio,
)
from .natlab import DEVICE, PUBLIC, SERVER, NatLab, labUnavailable, startServer
from .processes import NatkeepProcess, haveSipp, sipp
from .test_edge import NAT_TIMEOUT, SILENCE, placeCall
from .test_relay import PHONE, UPSTREAM, RelayTestCase, invite

CONTACT = "<sip:1001@10.0.0.7:5060>"
URI = "sip:1001@10.0.0.7:5060"


class ForwardTestCase(RelayTestCase):
    """
    natkeep with C{register_mode = forward} in front of the upstream.
    """

    def setUp(self) -> None:
        super().setUp()
        self.relay.configure(self.settings(registerMode="forward"))

    def upward(self, data: bytes, source: tuple[str, int] = PHONE) -> Request:
        """
        Hand the device's REGISTER to natkeep; return it as it went upstream.
        """
        request, address, socket = self.forwarded(data, source)
        self.assertEqual((address, socket), (UPSTREAM, "public"))
        return request

    def upstreamAnswers(
        self,
        request: Request,
        code: int = 200,
        reason: str = "OK",
        extra: str = "",
        contacts: Optional[list[str]] = None,
    ) -> list[tuple[bytes, tuple[str, int], str]]:
        """
        The upstream answers C{request}; return what natkeep sent for it.
        """
        lines = [f"SIP/2.0 {code} {reason}"]
        lines += [f"Via: {v}" for v in splitValues(request.headers["via"])]
        for name in ("From", "To", "Call-ID", "CSeq"):
            lines.append(f"{name}: {request.headers[name.lower()][0]}")
        if contacts is None:
            contacts = request.headers.get("contact", []) if code == 200 else []
        lines += [f"Contact: {c}" for c in contacts]
        data = ("\r\n".join(lines) + "\r\n" + extra + "Content-Length: 0\r\n\r\n").encode()
        out = self.send(data, UPSTREAM)
        self.clock.advance(0)
        return out + self.send(b"", UPSTREAM)

    def registered(self, cseq: int = 1, **kw: object) -> Response:
        """
        A REGISTER through the upstream's 200; the device's answer.
        """
        request = self.upward(register(cseq=cseq, contacts=[CONTACT], **kw))  # type: ignore[arg-type]
        [(data, address, _)] = self.upstreamAnswers(request)
        self.assertEqual(address, PHONE)
        response = parseMessage(data)
        assert isinstance(response, Response)
        return response


class ForwardTests(ForwardTestCase):
    """
    What goes upstream, and what comes back.
    """

    def test_pathAndExpires(self) -> None:
        """
        The REGISTER goes upstream from natkeep's socket with natkeep's
        Via over the device's (received, rport), a Path of natkeep's
        address with a flow token, path in Supported, and each Contact
        asking for upstream_expires; natkeep stores nothing yet.
        """
        request = self.upward(register(contacts=[CONTACT], expires=120))
        vias = splitValues(request.headers["via"])
        self.assertTrue(vias[0].startswith("SIP/2.0/UDP 198.51.100.10:5060;branch=z9hG4bK-nk"))
        self.assertIn(f";received={PHONE[0]};rport={PHONE[1]}", vias[1])
        [path] = request.headers["path"]
        uri = parseNameAddr(path).uri
        self.assertTrue(uri.startswith("sip:nkf-"), path)
        self.assertTrue(uri.endswith("@198.51.100.10:5060;lr"), path)
        self.assertIn("path", request.headers["supported"])
        self.assertEqual(request.headers["contact"], [f"{CONTACT};expires=3600"])
        self.assertNotIn("expires", request.headers)
        self.assertEqual(request.headers["max-forwards"], ["69"])
        self.assertEqual(len(self.table), 0)

    def test_outboundAsksOb(self) -> None:
        """
        A device that asks for outbound (reg-id in its Contact) gets C{ob}
        in the Path.
        """
        request = self.upward(register(contacts=[f'{CONTACT};reg-id=1;+sip.instance="<urn:x>"']))
        self.assertTrue(request.headers["path"][0].endswith(";lr;ob>"))

    def test_challengeRelayed(self) -> None:
        """
        The upstream's 401 reaches the device without natkeep's Via, and
        natkeep stores nothing; the device's answer with credentials goes
        upstream untouched.
        """
        request = self.upward(register(contacts=[CONTACT]))
        challenge = 'WWW-Authenticate: Digest realm="example.com", nonce="n1"\r\n'
        [(data, address, _)] = self.upstreamAnswers(request, 401, "Unauthorized", challenge)
        self.assertEqual(address, PHONE)
        response = parseMessage(data)
        assert isinstance(response, Response)
        self.assertEqual(response.code, 401)
        self.assertEqual(len(splitValues(response.headers["via"])), 1)
        self.assertEqual(len(self.table), 0)
        credentials = 'Authorization: Digest username="1001", realm="example.com", nonce="n1"'
        again = self.upward(register(cseq=2, contacts=[CONTACT], extra=[credentials]))
        self.assertEqual(again.headers["authorization"], [credentials[len("Authorization: ") :]])

    def test_okStoresAndAnswers(self) -> None:
        """
        On the upstream's 200 natkeep stores the binding as in local mode
        and answers the device with the registration natkeep grants (the
        NAT cap, 300 s); the upstream's own answer goes no further.
        """
        response = self.registered()
        self.assertEqual(response.code, 200)
        [contact] = response.headers["contact"]
        self.assertEqual(parseNameAddr(contact).param("expires"), "300")
        binding = self.table.get("sip:1001@example.com", URI)
        assert binding is not None
        self.assertEqual(binding.source, PHONE)
        self.assertEqual(binding.upstreamUntil, self.clock.seconds() + 3600)
        self.assertEqual(self.stats["forward.sent"], 1)

    def test_upstreamGrantsLess(self) -> None:
        """
        The upstream's registration is what its 200 grants, not what natkeep
        asked for.
        """
        request = self.upward(register(contacts=[CONTACT]))
        self.upstreamAnswers(request, contacts=[f"{CONTACT};expires=600"])
        binding = self.table.get("sip:1001@example.com", URI)
        assert binding is not None
        self.assertEqual(binding.upstreamUntil, self.clock.seconds() + 600)

    def test_423Local(self) -> None:
        """
        A registration shorter than min_expires is 423 from natkeep; the
        upstream never sees it.
        """
        [(data, address, _)] = self.send(register(contacts=[CONTACT], expires=30), PHONE)
        self.assertEqual(address, PHONE)
        self.assertTrue(data.startswith(b"SIP/2.0 423 Interval Too Brief"))


class ThrottleTests(ForwardTestCase):
    """
    Refreshes that change nothing stay at natkeep.
    """

    def test_refreshAbsorbed(self) -> None:
        """
        A refresh with the same Contact, source and Call-ID is answered by
        natkeep alone, again and again, until the upstream's registration
        would run out before the device's next refresh: that one goes
        upstream.
        """
        self.registered()
        cseq = 2
        # Refreshing every 60 s until the upstream's 3600 s nearly run out.
        while self.clock.seconds() + 60 < 1000 + 3600 - 300 - MARGIN:
            self.clock.advance(60)
            [(data, address, _)] = self.send(register(cseq=cseq, contacts=[CONTACT]), PHONE)
            self.assertEqual(address, PHONE)
            self.assertTrue(data.startswith(b"SIP/2.0 200 OK"), data[:40])
            cseq += 1
        absorbed = self.stats["forward.absorbed"]
        self.assertGreater(absorbed, 50)
        self.assertEqual(self.stats["forward.sent"], 1)
        self.clock.advance(60)
        self.upward(register(cseq=cseq, contacts=[CONTACT]))
        self.assertEqual(self.stats["forward.sent"], 2)

    def test_changesGoUpstream(self) -> None:
        """
        A new Call-ID, a new source, a new Contact and a removal each go
        upstream; the removal's 200 removes the binding.
        """
        self.registered()
        self.upward(register(cseq=2, contacts=[CONTACT], callId="other@phone"))
        self.upward(register(cseq=2, contacts=[CONTACT]), ("192.0.2.77", 40002))
        self.upward(register(cseq=2, contacts=["<sip:1001@10.0.0.8:5060>"]))
        removal = self.upward(register(cseq=3, contacts=[CONTACT], expires=0))
        self.assertEqual(removal.headers["contact"], [f"{CONTACT};expires=0"])
        [(data, _, _)] = self.upstreamAnswers(removal, contacts=[])
        self.assertTrue(data.startswith(b"SIP/2.0 200 OK"))
        self.assertEqual(len(self.table), 0)

    def test_wildcardAndQueryUntouched(self) -> None:
        """
        A C{*} removal and a query go upstream as the device wrote them.
        """
        self.registered()
        star = self.upward(register(cseq=2, contacts=["*"], expires=0))
        self.assertEqual(star.headers["contact"], ["*"])
        self.assertEqual(star.headers["expires"], ["0"])
        query = self.upward(register(cseq=3, contacts=[]))
        self.assertNotIn("contact", query.headers)

    def test_restartForgetsUpstream(self) -> None:
        """
        A binding whose upstream registration natkeep does not know (after
        a restart) sends its next refresh upstream.
        """
        self.registered()
        binding = self.table.get("sip:1001@example.com", URI)
        assert binding is not None
        binding.upstreamUntil = 0.0
        self.upward(register(cseq=2, contacts=[CONTACT]))


class UpstreamDownTests(ForwardTestCase):
    """
    The upstream does not answer.
    """

    def test_newDevice503(self) -> None:
        """
        A new device's REGISTER unanswered upstream gets 503 with
        Retry-After after the timeout; its retransmissions go upstream
        again meanwhile without moving the deadline.
        """
        request = register(contacts=[CONTACT])
        self.upward(request)
        self.clock.advance(UPSTREAM_TIMEOUT - 1)
        self.upward(request)
        self.clock.advance(1)
        [(data, address, _)] = self.send(b"", PHONE)
        self.assertEqual(address, PHONE)
        response = parseMessage(data)
        assert isinstance(response, Response)
        self.assertEqual((response.code, response.reason), (503, "Upstream Unavailable"))
        self.assertEqual(response.headers["retry-after"], [str(RETRY_AFTER)])
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.stats["forward.timeouts"], 1)

    def test_heldRefreshAnswered(self) -> None:
        """
        A refresh due upstream that the upstream does not answer is
        answered by natkeep from the binding while the upstream's
        registration still runs; after it ran out, 503.
        """
        self.registered()
        self.clock.advance(3600 - 300)
        self.upward(register(cseq=2, contacts=[CONTACT]))
        self.clock.advance(UPSTREAM_TIMEOUT)
        [(data, _, _)] = self.send(b"", PHONE)
        self.assertTrue(data.startswith(b"SIP/2.0 200 OK"), data[:40])
        self.clock.advance(300)
        self.upward(register(cseq=3, contacts=[CONTACT]))
        self.clock.advance(UPSTREAM_TIMEOUT)
        [(data, _, _)] = self.send(b"", PHONE)
        self.assertTrue(data.startswith(b"SIP/2.0 503 Upstream Unavailable"), data[:40])


class PathTests(ForwardTestCase):
    """
    Requests the upstream sends along the Path reach the device.
    """

    def test_callAlongPath(self) -> None:
        """
        An INVITE from the upstream routed by the stored Path, to the
        device's Contact, leaves natkeep's socket for the device's public
        address, Record-Routed with a flow token; a BYE in the dialog
        follows it.
        """
        request = self.upward(register(contacts=[CONTACT]))
        self.upstreamAnswers(request)
        [path] = request.headers["path"]
        out, address, socket = self.forwarded(invite(URI, route=path), UPSTREAM)
        self.assertEqual((address, socket), (PHONE, "public"))
        self.assertEqual(out.uri, URI)
        self.assertNotIn("route", out.headers)
        [recorded] = out.headers["record-route"]
        self.assertTrue(parseNameAddr(recorded).uri.startswith("sip:nkf-"), recorded)
        bye = invite(URI, route=recorded, toTag=";tag=t1", method="BYE")
        _, address, _ = self.forwarded(bye, UPSTREAM)
        self.assertEqual(address, PHONE)


class ForwardConfigTests(RelayTestCase):
    """
    Forward mode's settings.
    """

    def test_config(self) -> None:
        """
        C{register_mode = forward} needs an upstream and refuses natkeep's
        own auth; bad values name the key.
        """
        settings = buildSettings(
            {"register_mode": "forward", "upstream": "sip:203.0.113.50", "upstream_expires": "600"},
            {},
        )
        self.assertEqual((settings.registerMode, settings.upstreamExpires), ("forward", 600))
        for values, words in (
            ({"register_mode": "forward"}, "needs upstream"),
            (
                {
                    "register_mode": "forward",
                    "upstream": "sip:203.0.113.50",
                    "auth": "register",
                    "credentials": "/dev/null",
                },
                "upstream authenticates",
            ),
            ({"register_mode": "proxy"}, "register_mode"),
            ({"upstream_expires": "10"}, "60..86400"),
        ):
            with self.assertRaises(ConfigError) as raised:
                buildSettings(values, {})
            self.assertIn(words, str(raised.exception))

    def test_localModeOff(self) -> None:
        """
        Back in local mode (a reload), REGISTERs are natkeep's again.
        """
        self.relay.configure(self.settings(registerMode="forward"))
        self.relay.configure(self.settings())
        self.registerPhone()


#: A core registrar as Kamailio operators write one: digest authentication
#: from a db_text subscriber table, usrloc in memory, the Path of each
#: REGISTER stored (RFC 3327) and used by lookup() for calls in.  It logs
#: each REGISTER it receives, so that tests count what reaches the core.
CORE_CONFIG = (
    PREAMBLE
    + """loadmodule "db_text.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
loadmodule "auth_db.so"
loadmodule "ctl.so"
modparam("usrloc", "db_mode", 0)
modparam("registrar", "use_path", 1)
modparam("registrar", "path_mode", 0)
modparam("auth_db", "db_url", "text://{db}")
modparam("auth_db", "calculate_ha1", no)
modparam("auth_db", "load_credentials", "")
modparam("ctl", "binrpc", "unix:{ctl}")
"""
    + ROUTE_START
    + """    if (is_method("REGISTER")) {{
        xlog("L_INFO", "core REGISTER user=$fU contact=$ct path=$hdr(Path)\\n");
        if (!auth_check("$fd", "subscriber", "1")) {{
            auth_challenge("$fd", "1");
            exit;
        }}
        if (!save("location")) {{
            sl_reply_error();
        }}
        exit;
    }}
    if (is_method("INVITE")) {{
        record_route();
        if (!lookup("location")) {{
            sl_send_reply("404", "Not Found");
            exit;
        }}
        xlog("L_INFO", "core call for $rU via $du\\n");
        t_relay();
        exit;
    }}
    sl_send_reply("405", "Method Not Allowed");
}}
"""
)


def writeSubscribers(folder: FilePath, users: list[str]) -> None:
    """
    A db_text database in C{folder}: each user's HA1 for the password
    C{pw<user>} in example.com, no plain password.
    """
    folder.makedirs()
    folder.child("version").setContent(
        b"id(int,auto) table_name(string) table_version(int) \n0:subscriber:7\n"
    )
    rows = "".join(
        f"{n}:{user}:example.com::{ha1Of(user, 'example.com', f'pw{user}', 'MD5')}:\n"
        for n, user in enumerate(users, 1)
    )
    folder.child("subscriber").setContent(
        (
            "id(int,auto) username(string) domain(string) password(string,null) "
            "ha1(string) ha1b(string,null) \n" + rows
        ).encode()
    )


class Phone:
    """
    A device on a real socket that registers as phones do: REGISTER, and
    the same again with its digest answer when challenged (MD5, qop=auth).
    """

    def __init__(self, user: str, host: str, server: tuple[str, int]) -> None:
        self.user = user
        self.server = server
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((host, 0))
        self.socket.settimeout(8)
        self.address = self.socket.getsockname()
        self.cseq = 0
        self.callId = f"{user}-{self.address[1]}@phone"

    def close(self) -> None:
        self.socket.close()

    def request(self, expires: int, authorization: Optional[str] = None) -> Response:
        self.cseq += 1
        contact = f"<sip:{self.user}@{self.address[0]}:{self.address[1]}>"
        data = register(
            self.user,
            contacts=[contact],
            via=f"SIP/2.0/UDP {self.address[0]}:{self.address[1]};branch=z9hG4bK{self.callId}{self.cseq};rport",
            callId=self.callId,
            cseq=self.cseq,
            expires=expires,
            extra=[authorization] if authorization else [],
        )
        self.socket.sendto(data, self.server)
        response = parseMessage(self.socket.recv(65536))
        assert isinstance(response, Response)
        return response

    def register(self, expires: int = 60) -> Response:
        response = self.request(expires)
        if response.code != 401:
            return response
        challenge = parseAuthorization(response.headers["www-authenticate"][0])
        realm, nonce = challenge["realm"], challenge["nonce"]
        ha1 = ha1Of(self.user, realm, f"pw{self.user}", "MD5")
        cnonce = f"c{self.cseq}"
        answer = expectedResponse(
            "MD5", ha1, nonce, "REGISTER", "sip:example.com", "auth", "00000001", cnonce
        )
        return self.request(
            expires,
            f'Authorization: Digest username="{self.user}", realm="{realm}", nonce="{nonce}", '
            f'uri="sip:example.com", response="{answer}", algorithm=MD5, qop=auth, '
            f'nc=00000001, cnonce="{cnonce}"',
        )


class KamailioCoreTests(SynchronousTestCase):
    """
    Kamailio from Debian's packages as the core registrar behind natkeep in
    forward mode, on loopback: it authenticates, stores the Path, and
    counts what reaches it.
    """

    def setUp(self) -> None:
        reason = kamailioUnavailable()
        if reason:
            raise SkipTest(reason)
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()

    def startCore(self, users: list[str]) -> tuple[str, int]:
        writeSubscribers(self.cwd.child("db"), users)
        port = freePort(host="127.0.0.52")
        self.ctl = controlSocket(self)
        config = CORE_CONFIG.format(
            children=2,
            host="127.0.0.52",
            port=port,
            modules=KAMAILIO_MODULES,
            db=self.cwd.child("db").path,
            ctl=self.ctl,
        )
        self.core = startKamailio(self, self.cwd, config, ("127.0.0.52", port), "127.0.0.59")
        return ("127.0.0.52", port)

    def coreRegisters(self) -> Counter[str]:
        """
        REGISTERs the core received so far, by user.
        """
        log = self.cwd.child("kamailio.log").getContent().decode("utf-8", "replace")
        return Counter(re.findall(r"core REGISTER user=(\S+) ", log))

    def location(self) -> str:
        result = subprocess.run(
            ["kamcmd", "-s", f"unix:{self.ctl}", "ul.dump"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_throughToCore(self) -> None:
        """
        100 phones register through natkeep, authenticated by the core,
        which stores each with natkeep's Path.  Five rounds of refreshes
        all get 200 OK from natkeep without one more REGISTER at the core.
        An unregister reaches the core at once.  With the core stopped,
        refreshes of held bindings still get 200 OK and a new phone gets
        503 with Retry-After; natkeep logs no traceback.
        """
        users = [f"u{n}" for n in range(101)]
        core = self.startCore(users)
        port = freePort(host="127.0.0.51")
        natkeep = NatkeepProcess(
            [
                "--listen",
                f"127.0.0.51:{port}",
                "--upstream",
                f"sip:{core[0]}:{core[1]}",
                "--register-mode",
                "forward",
                "--db",
                "natkeep.sqlite",
                "--period",
                "60",
            ],
            self.cwd.path,
        )
        self.addCleanup(natkeep.stop)
        natkeep.waitReady("127.0.0.51", port)
        phones = [Phone(user, "127.0.0.53", ("127.0.0.51", port)) for user in users[:100]]
        for phone in phones:
            self.addCleanup(phone.close)
            response = phone.register()
            self.assertEqual((response.code, phone.user), (200, phone.user))
            [contact] = response.headers["contact"]
            self.assertEqual(parseNameAddr(contact).param("expires"), "60")
        first = self.coreRegisters()
        # A challenge and an answer each.
        self.assertEqual(set(first.values()), {2})
        self.assertEqual(len(first), 100)
        location = self.location()
        self.assertEqual(location.count("Path: <sip:nkf-"), 100, location[:2000])
        self.assertIn(f"@127.0.0.51:{port};lr>", location)

        for _ in range(5):
            for phone in phones:
                self.assertEqual(phone.register().code, 200)
        self.assertEqual(self.coreRegisters(), first)

        gone = phones[0]
        self.assertEqual(gone.register(expires=0).code, 200)
        self.assertEqual(self.coreRegisters()[gone.user], 4)
        self.assertNotIn(f"sip:{gone.user}@", self.location())

        self.core.terminate()
        self.core.wait(10)
        self.assertEqual(phones[1].register().code, 200)
        stranger = Phone(users[100], "127.0.0.53", ("127.0.0.51", port))
        self.addCleanup(stranger.close)
        response = stranger.register()
        self.assertEqual((response.code, response.reason), (503, "Upstream Unavailable"))
        self.assertEqual(response.headers["retry-after"], ["30"])
        self.assertNotIn("Traceback", natkeep.log())


#: Run in the lab's device namespace after the phone registered from port
#: 5060: hold the port through the silence, as a phone does, and count the
#: heartbeats that arrive.
HOLD_SCRIPT = """
import json, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(({device!r}, 5060))
seen = {{"heartbeats": 0, "other": 0}}
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
        seen["other"] += 1
s.close()
print(json.dumps(seen))
"""


class NatLabCoreTests(SynchronousTestCase):
    """
    The phone behind the lab's NAT registers with sipp's [authentication]
    through natkeep (forward mode, on the server) at Kamailio (the core
    registrar, on the public host); after more than three NAT timeouts of
    silence a call from the core's side reaches it along the Path.
    """

    def setUp(self) -> None:
        reason = labUnavailable() or kamailioUnavailable()
        if reason:
            raise SkipTest(reason)
        if not haveSipp():
            raise SkipTest("sipp is not installed (Debian's sip-tester; .ci/run installs it)")
        self.lab = NatLab("fwd", NAT_TIMEOUT)
        self.addCleanup(self.lab.destroy)
        self.lab.build()
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()

    def test_callFromCoreAfterSilence(self) -> None:
        """
        sipp registers through natkeep, answering Kamailio's challenge;
        the phone holds its port through more than three NAT timeouts,
        heartbeats arriving; then a call placed at Kamailio goes out by
        the stored Path to natkeep, and through the NAT to the phone, and
        completes with ACK and BYE.
        """
        writeSubscribers(self.cwd.child("db"), ["1001"])
        config = CORE_CONFIG.format(
            children=2,
            host=PUBLIC,
            port=5070,
            modules=KAMAILIO_MODULES,
            db=self.cwd.child("db").path,
            ctl=controlSocket(self),
        )
        startKamailio(self, self.cwd, config, (PUBLIC, 5070), PUBLIC, netns=self.lab.public)
        process = startServer(
            self,
            self.lab,
            self.cwd,
            "--upstream",
            f"sip:{PUBLIC}:5070",
            "--register-mode",
            "forward",
            "--period",
            "10",
        )
        registered = sipp(
            "register_auth.xml",
            f"{SERVER}:5060",
            calls=1,
            rate=1,
            localPort=5060,
            host=DEVICE,
            timeout=20,
            extra=["-s", "1001", "-au", "1001", "-ap", "pw1001"],
            cwd=self.cwd.path,
            netns=self.lab.device,
        )
        self.assertEqual(sippCounts(registered.stdout), (1, 0), registered.stdout[-1500:])
        hold = subprocess.run(
            ["ip", "netns", "exec", self.lab.device, sys.executable, "-c"]
            + [HOLD_SCRIPT.format(device=DEVICE, server=SERVER, silence=SILENCE)],
            capture_output=True,
            text=True,
            timeout=SILENCE + 30,
        )
        seen = json.loads(hold.stdout)
        self.assertGreaterEqual(seen["heartbeats"], SILENCE // 10 - 1)
        placeCall(
            self,
            self.cwd,
            False,
            (DEVICE, 5060),
            (PUBLIC, 5080),
            f"{SERVER}:5060",
            phoneNetns=self.lab.device,
            callerNetns=self.lab.public,
            callerTarget=f"{PUBLIC}:5070",
        )
        log = self.cwd.child("kamailio.log").getContent().decode("utf-8", "replace")
        self.assertRegex(log, r"core call for 1001 via sip:nkf-[^@]+@198\.18\.0\.1:5060;lr")
        self.assertNotIn("Traceback", process.log())


class PlanTests(SynchronousTestCase):
    """
    C{--check} in forward mode says what the upstream is spared.
    """

    def test_forwardLoad(self) -> None:
        """
        10 000 devices refreshing every SS_ENDPOINT_NAT_EXPIRE (300 s)
        are 33.3 REGISTER/s at natkeep; with upstream_expires 3600 one
        refresh in 11 goes upstream (the eleventh finds less than 300 s
        and the margin left), about 1.09 per device per hour.
        """
        from natkeep.plan import forwardLoad

        settings = buildSettings({"register_mode": "forward", "upstream": "sip:10.0.0.9"}, {})
        [mode, load] = forwardLoad(settings, 10_000)
        self.assertIn("forward to sip:10.0.0.9 with Path; asks 3600 s", mode)
        self.assertIn("33.3 REGISTER/s at natkeep, 3.03/s upstream (1 refresh in 11;", load)
        self.assertIn("1.09 per device per hour", load)
        short = buildSettings(
            {"register_mode": "forward", "upstream": "sip:10.0.0.9", "upstream_expires": "300"},
            {},
        )
        self.assertIn("(1 refresh in 1;", forwardLoad(short, 10)[1])
