"""
Media through rtpengine: the ng client and bencoding in memory, and a call
with audio both ways across the lab's real NAT with Debian's rtpengine
(userspace only) in the server's namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from natkeep.counts import Counts
from natkeep.media import BencodeError, MediaError, NGClient, bdecode, bencode
from natkeep.sip import splitValues

from .natlab import DEVICE, PUBLIC, SERVER, NatLab, labUnavailable, startServer
from .test_relay import PHONE, UPSTREAM, RelayTestCase, invite

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "media_agent.py")


class BencodeTests(SynchronousTestCase):
    """
    natkeep's bencoding, as rtpengine's ng protocol uses it.
    """

    def test_roundTrip(self) -> None:
        """
        Integers, strings, lists and dictionaries (keys sorted) encode as
        the ng protocol's examples do, and decode back.
        """
        value = {"command": "offer", "flags": ["a", "b"], "n": 3}
        encoded = bencode(value)
        self.assertEqual(encoded, b"d7:command5:offer5:flagsl1:a1:be1:ni3ee")
        self.assertEqual(bdecode(encoded), {b"command": b"offer", b"flags": [b"a", b"b"], b"n": 3})

    @given(st.binary(max_size=64))
    def test_garbage(self, data: bytes) -> None:
        """
        Any bytes decode or raise L{BencodeError}; nothing else.
        """
        try:
            bdecode(data)
        except BencodeError:
            pass

    def test_tooDeep(self) -> None:
        self.assertRaises(BencodeError, bdecode, b"l" * 100 + b"e" * 100)


class NGClientTests(SynchronousTestCase):
    """
    The ng client on an in-memory transport and a fake clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.stats: Counts = Counts()
        self.client = NGClient(self.clock, self.stats)
        self.transport = FakeDatagramTransport()
        self.client.makeConnection(self.transport)  # type: ignore[arg-type]

    def test_answerMatchedByCookie(self) -> None:
        """
        A command goes out as cookie and bencoded dictionary; the answer
        with that cookie fires it.
        """
        results: list[Any] = []
        self.client.command(("127.0.0.1", 2223), {"command": "ping"}).addCallback(results.append)
        [(data, address)] = self.transport.written
        cookie, _, body = data.partition(b" ")
        self.assertEqual(bdecode(body), {b"command": b"ping"})
        self.client.datagramReceived(b"other " + bencode({"result": "ok"}), address)
        self.assertEqual(results, [])
        self.client.datagramReceived(cookie + b" " + bencode({"result": "pong"}), address)
        self.assertEqual(results, [])  # "pong" is no "ok": an error
        self.assertEqual(self.stats["media.ng.failures"], 1)
        self.flushLoggedErrors(MediaError)

    def test_retryThenFail(self) -> None:
        """
        Unanswered, a command is sent once more after the timeout, then
        fails with L{MediaError}.
        """
        failures: list[Any] = []
        self.client.command(("127.0.0.1", 2223), {"command": "ping"}).addErrback(failures.append)
        self.clock.advance(1)
        self.assertEqual(len(self.transport.written), 2)
        self.clock.advance(1)
        [failure] = failures
        self.assertIsInstance(failure.value, MediaError)
        self.assertEqual(self.stats["media.ng.retries"], 1)


def rtpengineBinary() -> str | None:
    return shutil.which("rtpengine")


class MediaLabTests(SynchronousTestCase):
    """
    A caller on the public host calls the phone behind the lab's NAT
    through natkeep (the caller is natkeep's upstream), with rtpengine in
    the server's namespace.
    """

    def setUp(self) -> None:
        reason = labUnavailable()
        if reason:
            raise SkipTest(reason)
        if rtpengineBinary() is None:
            raise SkipTest(
                "rtpengine is not installed (Debian's rtpengine-daemon; .ci/run installs it)"
            )
        self.lab = NatLab("med", 30)
        self.addCleanup(self.lab.destroy)
        self.lab.build()
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()

    def startRtpengine(self) -> subprocess.Popen[bytes]:
        log = open(self.cwd.child("rtpengine.log").path, "ab")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.lab.server,
                "rtpengine",
                f"--interface={SERVER}",
                "--listen-ng=127.0.0.1:2223",
                "--foreground",
                "--table=-1",
                "--port-min=30000",
                "--port-max=30200",
                "--log-stderr",
                "--no-fallback",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            if process.poll() is None:
                process.terminate()
                process.wait(10)

        self.addCleanup(stop)
        deadline = time.monotonic() + 10
        while b"Startup complete" not in self.cwd.child("rtpengine.log").getContent():
            self.assertLess(time.monotonic(), deadline, "rtpengine did not start")
            time.sleep(0.05)
        return process

    def call(self, rtpPort: int, duration: int = 20) -> tuple[dict[str, Any], dict[str, Any]]:
        """
        One call with audio both ways; what the phone and the caller saw.
        """
        phone = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.lab.device,
                sys.executable,
                AGENT,
                "phone",
                "--host",
                DEVICE,
                "--server",
                f"{SERVER}:5060",
                "--rtp-port",
                str(rtpPort + 2),
                "--duration",
                str(duration),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert phone.stdout is not None
            ready = json.loads(phone.stdout.readline() or "{}")
            if not ready.get("ready"):
                self.fail(phone.stderr.read() if phone.stderr else "the phone did not start")
            caller = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.lab.public,
                    sys.executable,
                    AGENT,
                    "caller",
                    "--host",
                    PUBLIC,
                    "--server",
                    f"{SERVER}:5060",
                    "--rtp-port",
                    str(rtpPort),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            heard = json.loads(caller.stdout or "{}")
            out, err = phone.communicate(timeout=60)
        finally:
            if phone.poll() is None:
                phone.kill()
                phone.wait()
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        return lines[-1], heard

    def test_audioBothWays(self) -> None:
        """
        Media on: RTP from the caller reaches the phone and RTP from the
        phone reaches the caller, while the phone's own SDP names its
        private address; both SDPs natkeep relayed name rtpengine.
        Control, media off (reloaded): the caller is given the phone's
        private address and none of its RTP reaches the phone.  rtpengine
        stopped, media on: a new call gets 503, natkeep stays up, and the
        phone's heartbeats go on.
        """
        self.startRtpengine()
        config = self.cwd.child("natkeep.conf")
        config.setContent(b"SS_MEDIA_PROXY_BEHIND_NAT = on\n")
        natkeep = startServer(
            self,
            self.lab,
            self.cwd,
            "--config",
            config.path,
            "--upstream",
            f"sip:{PUBLIC}:5070",
            "--period",
            "10",
            "--rtpengine",
            "udp:127.0.0.1:2223",
            "--status",
            "127.0.0.1:8080",
        )

        phone, caller = self.call(40000)
        self.assertEqual(caller["final"], 200, caller)
        self.assertEqual(caller["answer"][0], SERVER)
        self.assertEqual(phone["offer"][0], SERVER)
        self.assertGreater(phone["received"], 40, phone)
        self.assertGreater(caller["received"], 40, caller)
        self.assertEqual(caller["bye"], 200)
        status = self.status()
        self.assertEqual(status["media"]["sessions"], 0)
        self.assertGreaterEqual(status["counters"]["media.ng.commands"], 3)
        self.assertGreater(status["media"]["ng_p99_ms"], 0)

        config.setContent(b"SS_MEDIA_PROXY_BEHIND_NAT = off\n")
        natkeep.process.send_signal(signal.SIGHUP)
        natkeep.waitLog("Reloaded settings")
        phone, caller = self.call(41000)
        self.assertEqual(caller["final"], 200, caller)
        self.assertEqual(caller["answer"][0], DEVICE)
        self.assertEqual(phone["received"], 0, phone)

        config.setContent(b"SS_MEDIA_PROXY_BEHIND_NAT = on\n")
        natkeep.process.send_signal(signal.SIGHUP)
        time.sleep(1)
        subprocess.run(
            ["ip", "netns", "exec", self.lab.server, "pkill", "-f", "rtpengine --interface"]
        )
        phone, caller = self.call(42000, duration=12)
        self.assertEqual(caller["final"], 503, caller)
        self.assertGreaterEqual(phone["heartbeats"], 1, phone)
        self.assertNotIn("Traceback", natkeep.log())
        self.assertIn("No media for call", natkeep.log())
        counters = self.status()["counters"]
        self.assertGreaterEqual(counters["media.refused"], 1)
        self.assertGreaterEqual(counters["media.ng.failures"], 1)

    def status(self) -> dict[str, Any]:
        """
        natkeep's /status, read inside the server's namespace.
        """
        out = self.lab.run(
            sys.executable,
            "-c",
            "import urllib.request; "
            "print(urllib.request.urlopen('http://127.0.0.1:8080/status', timeout=5).read().decode())",
            ns=self.lab.server,
        )
        result: dict[str, Any] = json.loads(out)
        return result


class FakeEngine(NGClient):
    """
    An ng client whose rtpengine answers at once: the SDP it was given,
    its connection line naming the relay; or, when C{down}, nothing.
    """

    def __init__(self) -> None:
        super().__init__(Clock())
        self.commands: list[dict[str, Any]] = []
        self.down = False

    def command(self, address: tuple[str, int], message: dict[str, Any]) -> Any:
        from twisted.internet import defer

        self.commands.append(message)
        if self.down:
            return defer.fail(MediaError("rtpengine did not answer"))
        sdp = message.get("sdp", b"").replace(b"IN IP4 203.0.113.50", b"IN IP4 198.51.100.99")
        sdp = sdp.replace(b"IN IP4 10.0.0.7", b"IN IP4 198.51.100.99")
        return defer.succeed({b"result": b"ok", b"sdp": sdp})


class RelayMediaTests(RelayTestCase):
    """
    The relay's use of rtpengine, on in-memory sockets.
    """

    def setUp(self) -> None:
        super().setUp()
        self.engine = FakeEngine()
        self.relay.mediaClient = self.engine
        self.relay.configure(self.settings(mediaProxy=True))
        self.registerPhone()

    def test_offerAnswerDelete(self) -> None:
        """
        The INVITE to a NATed phone carries rtpengine's SDP (an offer);
        the phone's 200 carries rtpengine's SDP back (an answer, with the
        phone's public address as received-from); the BYE deletes.
        """
        out, address, _ = self.forwarded(invite(), UPSTREAM)
        self.assertEqual(address, PHONE)
        self.assertIn(b"IN IP4 198.51.100.99", out.body)
        [offer] = self.engine.commands
        self.assertEqual(
            (offer["command"], offer["call-id"], offer["from-tag"]),
            ("offer", "call-relay-1", "f1"),
        )
        self.assertEqual(offer["replace"], ["origin", "session-connection"])
        self.assertNotIn("received-from", offer)
        body = b"v=0\r\nc=IN IP4 10.0.0.7\r\nm=audio 4000 RTP/AVP 0\r\n"
        vias = "".join(f"Via: {v}\r\n" for v in splitValues(out.headers["via"]))
        ok = (
            f"SIP/2.0 200 OK\r\n{vias}From: {out.headers['from'][0]}\r\n"
            f"To: {out.headers['to'][0]};tag=t9\r\nCall-ID: call-relay-1\r\nCSeq: 1 INVITE\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        [(data, back, _)] = self.send(ok, PHONE)
        self.assertEqual(back, UPSTREAM)
        self.assertIn(b"IN IP4 198.51.100.99", data)
        self.assertNotIn(b"10.0.0.7", data)
        answer = self.engine.commands[1]
        self.assertEqual((answer["command"], answer["to-tag"]), ("answer", "t9"))
        self.assertEqual(answer["received-from"], ["IP4", PHONE[0]])
        [recorded] = out.headers["record-route"]
        self.forwarded(invite(toTag=";tag=t9", method="BYE", body=b"", route=recorded), UPSTREAM)
        self.assertEqual(self.engine.commands[2]["command"], "delete")
        self.assertEqual(len(self.relay.media.sessions), 0)  # type: ignore[union-attr]

    def test_noMedia503(self) -> None:
        """
        rtpengine down: the INVITE is answered 503 and not relayed.
        """
        self.engine.down = True
        response = self.answered(invite(), UPSTREAM)
        self.assertEqual((response.code, response.reason), (503, "Media Unavailable"))
        self.assertEqual(self.stats["media.refused"], 1)
        self.flushLoggedErrors(MediaError)

    def test_publicPhoneUntouched(self) -> None:
        """
        A call between the upstream and a phone not behind NAT keeps its SDP.
        """
        self.table.get("sip:1001@example.com", "sip:1001@10.0.0.7:5060").nat = False  # type: ignore[union-attr]
        out, _, _ = self.forwarded(invite(), UPSTREAM)
        self.assertIn(b"203.0.113.50", out.body)
        self.assertEqual(self.engine.commands, [])


class EngineChoiceTests(SynchronousTestCase):
    """
    Several rtpengines share the calls by Call-ID.
    """

    def test_byCallId(self) -> None:
        """
        Every command of one call goes to the same rtpengine, and calls
        spread over all of them.
        """
        from natkeep.media import MediaProxy

        engine = FakeEngine()
        engines = [("127.0.0.1", 2223), ("127.0.0.2", 2223), ("127.0.0.3", 2223)]
        proxy = MediaProxy(engine, engines)
        chosen = {proxy._engine(f"call-{n}") for n in range(300)}
        self.assertEqual(chosen, set(engines))
        self.assertEqual(len({proxy._engine("same") for _ in range(10)}), 1)


class OfferInFlightTests(RelayTestCase):
    """
    An INVITE retransmitted while rtpengine has its offer.
    """

    def test_retransmissionWaits(self) -> None:
        """
        The copy that arrives while the offer is out sends no second offer
        and relays nothing; the first copy is relayed when rtpengine
        answers, and a copy after that makes a new offer.
        """
        from twisted.internet import defer

        class SlowEngine(FakeEngine):
            def command(self, address: tuple[str, int], message: dict[str, Any]) -> Any:
                self.commands.append(message)
                self.waiting: defer.Deferred[Any] = defer.Deferred()
                return self.waiting

        engine = SlowEngine()
        self.relay.mediaClient = engine
        self.relay.configure(self.settings(mediaProxy=True))
        self.registerPhone()
        self.assertEqual(self.send(invite(), UPSTREAM), [])
        self.assertEqual(self.send(invite(), UPSTREAM), [])
        self.assertEqual(len(engine.commands), 1)
        self.assertEqual(self.stats["media.retransmissions"], 1)
        engine.waiting.callback({b"result": b"ok", b"sdp": b"v=0\r\n"})
        [(data, address, _)] = self.send(b"", PHONE)
        self.assertEqual(address, PHONE)
        self.assertTrue(data.endswith(b"\r\n\r\nv=0\r\n"))
        self.send(invite(), UPSTREAM)
        self.assertEqual(len(engine.commands), 2)
