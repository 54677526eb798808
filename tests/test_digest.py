"""
Tests for L{natkeep.digest} and digest authentication of REGISTER.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from natkeep.config import ConfigError, Settings, buildSettings
from natkeep.digest import (
    NONCE_LIFETIME,
    CredentialsFile,
    Digest,
    credentialsLine,
    expectedResponse,
    ha1Of,
    parseAuthorization,
)
from natkeep.sip import Request, SIPError, parseMessage
from natkeep.testing import register, sippCounts

from .helpers import MemoryEdgeTestCase, freePort
from .processes import SIPP_FOLDER, NatkeepProcess, haveSipp, sipp

REALM = "example.com"
PHONE = ("192.0.2.50", 5060)


class VectorTests(SynchronousTestCase):
    """
    The response computation against RFC 7616 §3.9.1's examples.
    """

    def test_rfc7616(self) -> None:
        ha1 = {
            algorithm: ha1Of("Mufasa", "http-auth@example.org", "Circle of Life", algorithm)
            for algorithm in ("MD5", "SHA-256")
        }
        args = dict(
            nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            method="GET",
            uri="/dir/index.html",
            qop="auth",
            nc="00000001",
            cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
        )
        self.assertEqual(
            expectedResponse("MD5", ha1["MD5"], **args), "8ca523f5e9506fed4657c9700eebdbec"
        )
        self.assertEqual(
            expectedResponse("SHA-256", ha1["SHA-256"], **args),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
        )

    def test_parseAuthorization(self) -> None:
        params = parseAuthorization(
            'Digest username="a\\"b", realm="r", nonce=abc, uri="sip:x", qop=auth, nc=00000001'
        )
        self.assertEqual(params["username"], 'a"b')
        self.assertEqual(params["nonce"], "abc")
        self.assertEqual(params["qop"], "auth")
        self.assertRaises(SIPError, parseAuthorization, "Basic dXNlcg==")
        self.assertRaises(SIPError, parseAuthorization, 'Digest username="open')


class CredentialsTests(SynchronousTestCase):
    """
    L{CredentialsFile} and C{natkeep passwd}.
    """

    def test_fileAndReload(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(
            (
                "# users\n"
                + credentialsLine("1001", REALM, "secret", "SHA-256")
                + "\n"
                + credentialsLine("1001", REALM, "secret", "MD5")
                + "\n"
            ).encode()
        )
        credentials = CredentialsFile(path.path)
        self.assertEqual(
            credentials.ha1("1001", REALM, "MD5"), ha1Of("1001", REALM, "secret", "MD5")
        )
        self.assertIsNone(credentials.ha1("1002", REALM, "MD5"))
        path.setContent(b"1001:example.com:SHA-999:xyz\n")
        error = self.assertRaises(ValueError, credentials.reload)
        self.assertIn(":1:", str(error))
        # The old hashes stay.
        self.assertIsNotNone(credentials.ha1("1001", REALM, "MD5"))
        self.assertRaises(ValueError, credentialsLine, "a:b", REALM, "x", "MD5")

    def test_passwdCommand(self) -> None:
        """
        C{natkeep passwd} reads the password from standard input and prints
        the line, never the password.
        """
        result = subprocess.run(
            [sys.executable, "-m", "natkeep", "passwd", "1001", "--realm", REALM],
            input="s3cr3t\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), credentialsLine("1001", REALM, "s3cr3t", "SHA-256"))
        self.assertNotIn("s3cr3t", result.stdout)

    def test_config(self) -> None:
        """
        Auth on needs a credentials file; a bad one is named at start.
        """
        error = self.assertRaises(ConfigError, buildSettings, {"auth": "register"}, {})
        self.assertIn("credentials", str(error))
        for key, value in (("auth", "maybe"), ("auth_algorithms", "SHA-1")):
            error = self.assertRaises(ConfigError, buildSettings, {key: value}, {})
            self.assertIn(key, str(error))


def answer(
    challenge: str,
    request: bytes,
    user: str,
    password: str,
    nc: str = "00000001",
    method: str = "REGISTER",
    uri: str = "sip:example.com",
    realm: Optional[str] = None,
) -> bytes:
    """
    C{request} with an Authorization answering C{challenge} (one
    WWW-Authenticate value).
    """
    params = parseAuthorization(challenge)
    algorithm = params["algorithm"]
    realm = realm or params["realm"]
    ha1 = ha1Of(user, realm, password, algorithm)
    response = expectedResponse(algorithm, ha1, params["nonce"], method, uri, "auth", nc, "c0ffee")
    header = (
        f'Authorization: Digest username="{user}", realm="{realm}", nonce="{params["nonce"]}", '
        f'uri="{uri}", response="{response}", algorithm={algorithm}, qop=auth, nc={nc}, '
        'cnonce="c0ffee"\r\n'
    )
    head, _, rest = request.partition(b"\r\n")
    return head + b"\r\n" + header.encode() + rest


class AuthTestCase(MemoryEdgeTestCase, SynchronousTestCase):
    """
    natkeep's guard with C{auth = register}, on an in-memory socket.
    """

    def setUp(self) -> None:
        self.setUpEdge()
        path = FilePath(self.mktemp())
        path.setContent(
            "\n".join(
                credentialsLine(user, REALM, password, algorithm)
                for user, password in (("1001", "secret"), ("1002", "other"))
                for algorithm in ("SHA-256", "MD5")
            ).encode()
        )
        self.relay.configure(Settings(auth="register", credentials=path.path))

    def send(self, data: bytes) -> tuple[int, Request | object, bytes]:
        self.protocol.datagramReceived(data, PHONE)
        out, _ = self.wire.written.pop()
        response = parseMessage(out)
        return response.code, response, out  # type: ignore[union-attr]

    def challenges(self, request: bytes) -> list[str]:
        code, response, _ = self.send(request)
        self.assertEqual(code, 401)
        values = response.headers["www-authenticate"]  # type: ignore[attr-defined]
        self.assertEqual([parseAuthorization(v)["algorithm"] for v in values], ["SHA-256", "MD5"])
        return list(values)


class RegisterAuthTests(AuthTestCase):
    """
    REGISTER through the guard with C{auth = register}.
    """

    def test_challengeThenRegister(self) -> None:
        """
        A REGISTER without credentials is 401 with one challenge per
        algorithm (SHA-256 first) and stores nothing; answered with either,
        it is 200 and stored.
        """
        request = register(user="1001")
        for index, cseq in ((0, 2), (1, 3)):
            challenge = self.challenges(request)[index]
            self.assertEqual(len(self.table), 0 if cseq == 2 else 1)
            code, _, _ = self.send(
                answer(challenge, register(user="1001", cseq=cseq), "1001", "secret")
            )
            self.assertEqual(code, 200)
        self.assertEqual(len(self.table), 1)

    def test_spoofedSourceGetsOneSmallAnswer(self) -> None:
        """
        All a REGISTER without credentials draws, from whatever source it
        claims, is one 401 under twice its size: no binding, so nothing
        for heartbeats to aim at that address.  (The request is the
        smallest a phone sends, the worst case for the ratio.)
        """
        request = register(user="1001")
        self.protocol.datagramReceived(request, ("198.51.100.99", 5060))
        [(out, address)] = self.wire.written
        self.assertEqual(address, ("198.51.100.99", 5060))
        self.assertTrue(out.startswith(b"SIP/2.0 401 "))
        self.assertLess(len(out), 2 * len(request))
        self.assertEqual(len(self.table), 0)

    def test_wrongPasswordAndUnknownUser(self) -> None:
        """
        A wrong password and an unknown user get the same answer: a fresh
        401 challenge.
        """
        challenge = self.challenges(register(user="1001"))[0]
        wrong = self.send(answer(challenge, register(user="1001", cseq=2), "1001", "nope"))
        unknown = self.send(answer(challenge, register(user="1001", cseq=3), "9999", "nope"))
        self.assertEqual((wrong[0], unknown[0]), (401, 401))
        shape = lambda out: re.sub(rb'nonce="[^"]+"', b"", out.split(b"\r\n\r\n")[0])  # noqa: E731
        self.assertEqual(
            [line for line in shape(wrong[2]).split(b"\r\n") if b"Authenticate" in line],
            [line for line in shape(unknown[2]).split(b"\r\n") if b"Authenticate" in line],
        )
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.stats["auth.failures"], 2)

    def test_otherUsersAOR(self) -> None:
        """
        1002 authenticated, registering 1001's AOR: 403.
        """
        challenge = self.challenges(register(user="1001"))[0]
        code, _, _ = self.send(answer(challenge, register(user="1001", cseq=2), "1002", "other"))
        self.assertEqual(code, 403)
        self.assertEqual(len(self.table), 0)

    def test_queryAndWildcardNeedCredentials(self) -> None:
        """
        A query REGISTER and a C{*} removal are challenged like any other.
        """
        self.assertEqual(self.send(register(user="1001", contacts=()))[0], 401)
        wildcard = register(user="1001", contacts=["*"], expires=0)
        self.assertEqual(self.send(wildcard)[0], 401)

    def test_staleAndReplay(self) -> None:
        """
        A right answer to an expired nonce gets 401 with C{stale=true}; the
        same nonce-count twice is refused, a higher one accepted.
        """
        challenge = self.challenges(register(user="1001"))[0]
        first = answer(challenge, register(user="1001", cseq=2), "1001", "secret")
        self.assertEqual(self.send(first)[0], 200)
        self.assertEqual(self.send(first.replace(b"CSeq: 2", b"CSeq: 3"))[0], 401)
        self.assertEqual(self.stats["auth.replays"], 1)
        again = answer(challenge, register(user="1001", cseq=4), "1001", "secret", nc="00000002")
        self.assertEqual(self.send(again)[0], 200)
        self.clock.advance(NONCE_LIFETIME + 1)
        late = answer(challenge, register(user="1001", cseq=5), "1001", "secret", nc="00000003")
        code, _, out = self.send(late)
        self.assertEqual(code, 401)
        self.assertIn(b"stale=true", out)

    def test_forgedNonce(self) -> None:
        """
        A nonce this run did not sign is refused whatever the answer.
        """
        forged = Digest(self.clock, CredentialsFile.__new__(CredentialsFile)).nonce()
        challenge = f'Digest realm="{REALM}", nonce="{forged}", algorithm=MD5, qop="auth"'
        self.assertEqual(
            self.send(answer(challenge, register(user="1001"), "1001", "secret"))[0], 401
        )

    @settings(max_examples=300, deadline=None)
    @given(
        header=st.one_of(
            st.text(max_size=200),
            st.builds(
                lambda user, nonce, response, nc, extra: (
                    f'Digest username="{user}", realm="{REALM}", nonce="{nonce}", '
                    f'uri="sip:example.com", response="{response}", qop=auth, nc={nc}, '
                    f'cnonce="x"{extra}'
                ),
                st.sampled_from(["1001", "1002", "", "x" * 300]),
                st.text(max_size=40),
                st.text(alphabet="0123456789abcdef", max_size=64),
                st.text(max_size=10),
                st.sampled_from(["", ", algorithm=MD5", ", algorithm=SHA-512", ",,,", ', a="']),
            ),
        )
    )
    def test_hostileAuthorization(self, header: str) -> None:
        """
        Made-up Authorization headers never get a 2xx and never raise.
        """
        header = header.replace("\r", " ").replace("\n", " ")
        request = register(user="1001", extra=[f"Authorization: {header}"])
        try:
            request.decode("utf-8")
        except UnicodeDecodeError:
            return
        self.protocol.datagramReceived(request, PHONE)
        for out, _ in self.wire.written:
            self.assertFalse(out.startswith(b"SIP/2.0 2"), out[:60])
        del self.wire.written[:]
        self.assertEqual(self.stats["internal.errors"], 0)
        self.assertEqual(len(self.table), 0)


class SippAuthTests(SynchronousTestCase):
    """
    sipp's own digest answers against a running natkeep with
    C{auth = register} (sipp speaks MD5 only).
    """

    def setUp(self) -> None:
        if not haveSipp():
            raise SkipTest("sipp is not installed (Debian's sip-tester; .ci/run installs it)")
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()
        credentials = self.cwd.child("users")
        credentials.setContent(
            "\n".join(
                credentialsLine(f"u{n}", REALM, f"pw{n}", "MD5") for n in range(1, 6)
            ).encode()
        )
        self.port = freePort()
        process = NatkeepProcess(
            [
                "--listen",
                f"127.0.0.1:{self.port}",
                "--db",
                "natkeep.sqlite",
                "--auth",
                "register",
                "--credentials",
                credentials.path,
                "--realm",
                REALM,
                "--auth-algorithms",
                "MD5",
            ],
            self.cwd.path,
        )
        self.addCleanup(process.stop)
        process.waitReady("127.0.0.1", self.port)
        self.process = process

    def registerWith(
        self, user: str, password: str, authUser: Optional[str] = None, final: int = 200
    ) -> tuple[int, int]:
        """
        Run C{register_auth.xml} once as C{user}, answering the challenge
        as C{authUser} (default C{user}) with C{password}, and expecting
        C{final} to the answered REGISTER.

        @return: sipp's (successful, failed) calls.
        """
        scenario = FilePath(os.path.join(SIPP_FOLDER, "register_auth.xml")).getContent()
        expected = self.cwd.child(f"register_{final}.xml")
        expected.setContent(
            scenario.replace(b'<recv response="200" />', f'<recv response="{final}" />'.encode())
        )
        result = sipp(
            expected.path,
            f"127.0.0.1:{self.port}",
            calls=1,
            rate=1,
            localPort=freePort(),
            timeout=20,
            extra=["-s", user, "-au", authUser or user, "-ap", password],
            cwd=self.cwd.path,
        )
        return sippCounts(result.stdout)

    def test_registerWithSippCredentials(self) -> None:
        """
        Users registering with sipp's [authentication]: 401, then 200 for
        each.  With a wrong password the answer is 401 again, and a
        stranger gets the same; a user answering for another user's AOR
        gets 403.
        """
        for n in (1, 2, 3):
            self.assertEqual(self.registerWith(f"u{n}", f"pw{n}"), (1, 0))
        self.assertEqual(self.registerWith("u1", "wrong"), (0, 1))
        self.assertEqual(self.registerWith("u1", "wrong", final=401), (1, 0))
        self.assertEqual(self.registerWith("nobody", "pw1", final=401), (1, 0))
        self.assertEqual(self.registerWith("u1", "pw2", authUser="u2", final=403), (1, 0))


class RelayAuthTests(AuthTestCase):
    """
    C{auth = all}: a device's relayed requests must authenticate too (407).
    """

    def test_inviteChallenged(self) -> None:
        """
        An INVITE from a registered device without Proxy-Authorization is
        407, with one challenge per algorithm; answered, it is relayed to
        the upstream.
        """
        self.relay.configure(
            Settings(
                auth="all",
                credentials=self.relay.digest.credentials.path,  # type: ignore[union-attr]
                upstream="sip:203.0.113.9:5060",
            )
        )
        challenge = self.challenges(register(user="1001"))[0]
        self.assertEqual(
            self.send(answer(challenge, register(user="1001", cseq=2), "1001", "secret"))[0], 200
        )
        invite = (
            "INVITE sip:2000@pstn.example SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-i1\r\n"
            "From: <sip:1001@example.com>;tag=a\r\nTo: <sip:2000@pstn.example>\r\n"
            "Call-ID: inv-1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        code, response, _ = self.send(invite)
        self.assertEqual(code, 407)
        proxyChallenge = response.headers["proxy-authenticate"][1]  # type: ignore[attr-defined]
        answered = answer(
            proxyChallenge, invite, "1001", "secret", method="INVITE", uri="sip:2000@pstn.example"
        ).replace(b"Authorization:", b"Proxy-Authorization:")
        self.protocol.datagramReceived(answered, PHONE)
        [(_, address)] = self.wire.written
        self.assertEqual(address, ("203.0.113.9", 5060))
