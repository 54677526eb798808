"""
Tests for L{natkeep.config} and the C{twistd natkeep} options.
"""

from __future__ import annotations

import attrs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from natkeep.config import (
    PARAMETERS,
    ConfigError,
    Settings,
    buildSettings,
    decodeMessage,
    readConfigFile,
    sanityWarnings,
)
from natkeep.strategies import adviceFor
from natkeep.tap import Options


class SettingsTests(SynchronousTestCase):
    """
    Defaults, file and command line merge into checked settings.
    """

    def test_defaults(self) -> None:
        """
        With nothing given, the VOS3000 defaults apply, and every
        parameter's documented default is the L{Settings} default.
        """
        settings = buildSettings({}, {})
        self.assertEqual(settings, Settings())
        for parameter in PARAMETERS:
            self.assertEqual(getattr(settings, parameter.attribute), parameter.default)
        self.assertEqual(settings.capacity, 180000)
        self.assertEqual((settings.period, settings.message), (30, b"HELLO"))

    def test_oneFieldPerParameter(self) -> None:
        """
        L{Settings} has exactly one field per parameter, nothing more.
        """
        self.assertEqual(
            {field.name for field in attrs.fields(Settings)},
            {parameter.attribute for parameter in PARAMETERS},
        )

    def test_fileOverridesDefaults(self) -> None:
        """
        File values, by VOS3000 key, override defaults.
        """
        settings = buildSettings({"SS_SIP_NAT_KEEP_ALIVE_PERIOD": "20"}, {})
        self.assertEqual(settings.period, 20)

    def test_cliOverridesFile(self) -> None:
        """
        Command-line values override file values.
        """
        settings = buildSettings({"SS_SIP_NAT_KEEP_ALIVE_PERIOD": "20"}, {"period": "15"})
        self.assertEqual(settings.period, 15)

    def test_outOfRange(self) -> None:
        """
        An out-of-range value names the key, the value and the range.
        """
        error = self.assertRaises(
            ConfigError, buildSettings, {"SS_SIP_NAT_KEEP_ALIVE_PERIOD": "5"}, {}
        )
        self.assertEqual(
            str(error),
            "SS_SIP_NAT_KEEP_ALIVE_PERIOD = '5' is invalid: out of range; allowed 10..86400",
        )
        error = self.assertRaises(ConfigError, buildSettings, {}, {"send-interval": "fast"})
        self.assertIn("--send-interval = 'fast' is invalid: not a whole number", str(error))

    def test_everyRange(self) -> None:
        """
        Each numeric parameter refuses one below and one above its range.
        """
        for key, low, high in [
            ("SS_SIP_NAT_KEEP_ALIVE_PERIOD", 10, 86400),
            ("SS_SIP_NAT_KEEP_ALIVE_SEND_INTERVAL", 1, 60000),
            ("SS_SIP_NAT_KEEP_ALIVE_SEND_ONE_TIME", 1, 1000000),
            ("SS_ENDPOINT_EXPIRE", 60, 86400),
            ("SS_ENDPOINT_NAT_EXPIRE", 60, 86400),
            ("liveness_misses", 1, 100),
            ("read_pause", 0, 100),
        ]:
            buildSettings({key: str(low)}, {})
            buildSettings({key: str(high)}, {})
            for bad in (low - 1, high + 1):
                error = self.assertRaises(ConfigError, buildSettings, {key: str(bad)}, {})
                self.assertIn(f"{key} = '{bad}'", str(error))
                self.assertIn(f"{low}..{high}", str(error))

    def test_minExpiresBelowCaps(self) -> None:
        """
        The minimum registration time may not exceed what is granted.
        """
        error = self.assertRaises(ConfigError, buildSettings, {}, {"min-expires": "400"})
        self.assertIn("min_expires = 400", str(error))

    def test_listen(self) -> None:
        """
        Listen addresses are HOST:PORT, several allowed, IPv6 bracketed.
        """
        settings = buildSettings({}, {"listen": ["127.0.0.1:5070", "[::1]:5070"]})
        self.assertEqual(settings.listen, ("127.0.0.1:5070", "[::1]:5070"))
        for bad in ["127.0.0.1", "host:99999", "[::1"]:
            error = self.assertRaises(ConfigError, buildSettings, {}, {"listen": [bad]})
            self.assertIn("HOST:PORT", str(error))

    def test_natDetect(self) -> None:
        """
        NAT tests are a subset of via, private and contact.
        """
        settings = buildSettings({"nat_detect": "via, private"}, {})
        self.assertEqual(settings.natDetect, frozenset({"via", "private"}))
        error = self.assertRaises(ConfigError, buildSettings, {"nat_detect": "stun"}, {})
        self.assertIn("unknown test 'stun'", str(error))

    def test_booleans(self) -> None:
        """
        Switches take yes/no words; anything else is named.
        """
        self.assertTrue(buildSettings({"ping_all": "yes"}, {}).pingAll)
        self.assertFalse(buildSettings({"ping_all": "off"}, {}).pingAll)
        self.assertRaises(ConfigError, buildSettings, {"sip_trace": "maybe"}, {})


class MessageTests(SynchronousTestCase):
    """
    SS_SIP_NAT_KEEP_ALIVE_MESSAGE escapes.
    """

    def test_escapes(self) -> None:
        """
        \\r \\n \\t \\0 \\xHH \\\\ decode to bytes.
        """
        self.assertEqual(decodeMessage(r"A\r\n\t\0\x7f\\"), b"A\r\n\t\x00\x7f\\")
        self.assertEqual(decodeMessage(""), b"")

    def test_badEscape(self) -> None:
        """
        Unknown or short escapes are named.
        """
        self.assertRaises(ValueError, decodeMessage, r"\q")
        self.assertRaises(ValueError, decodeMessage, r"\x4")
        self.assertRaises(ValueError, decodeMessage, r"\xZZ")

    def test_size(self) -> None:
        """
        At most 1200 bytes after escapes.
        """
        self.assertEqual(len(decodeMessage("a" * 1200)), 1200)
        error = self.assertRaises(
            ConfigError, buildSettings, {"SS_SIP_NAT_KEEP_ALIVE_MESSAGE": r"\x00" * 1201}, {}
        )
        self.assertIn("1201 bytes; allowed 0..1200", str(error))

    def test_quoted(self) -> None:
        """
        A quoted value in the file keeps its spaces; an empty one turns
        heartbeats off.
        """
        self.assertEqual(
            buildSettings({"SS_SIP_NAT_KEEP_ALIVE_MESSAGE": '" hi "'}, {}).message, b" hi "
        )
        self.assertEqual(buildSettings({"SS_SIP_NAT_KEEP_ALIVE_MESSAGE": ""}, {}).message, b"")


class ConfigFileTests(SynchronousTestCase):
    """
    The INI file.
    """

    def write(self, text: str) -> str:
        path = FilePath(self.mktemp())
        path.setContent(text.encode("utf-8"))
        return path.path

    def test_vosKeys(self) -> None:
        """
        A VOS3000-style file without a section header is read, keys in any
        case, comments ignored.
        """
        values, warnings = readConfigFile(
            self.write(
                "# comment\nSS_SIP_NAT_KEEP_ALIVE_PERIOD = 20  ; inline\n"
                "ss_endpoint_nat_expire=120\nmin-expires = 30\n"
            )
        )
        self.assertEqual(
            values,
            {
                "SS_SIP_NAT_KEEP_ALIVE_PERIOD": "20",
                "SS_ENDPOINT_NAT_EXPIRE": "120",
                "min_expires": "30",
            },
        )
        self.assertEqual(warnings, [])

    def test_unknownKeyNearest(self) -> None:
        """
        An unknown key is an error naming the nearest known key.
        """
        error = self.assertRaises(
            ConfigError, readConfigFile, self.write("SS_SIP_NAT_KEEP_ALIVE_PERIODE = 20\n")
        )
        self.assertIn(
            "unknown key SS_SIP_NAT_KEEP_ALIVE_PERIODE; did you mean SS_SIP_NAT_KEEP_ALIVE_PERIOD?",
            str(error),
        )

    def test_ignoredVOSKey(self) -> None:
        """
        A VOS3000 key natkeep does not act on is accepted with a warning.
        """
        values, warnings = readConfigFile(self.write("SS_SIP_TIMEOUT_INVITE = 30\n"))
        self.assertEqual(values, {})
        self.assertEqual(len(warnings), 1)
        self.assertIn("SS_SIP_TIMEOUT_INVITE", warnings[0])
        self.assertIn("does not act on", warnings[0])

    def test_unreadable(self) -> None:
        """
        A missing file is named.
        """
        error = self.assertRaises(ConfigError, readConfigFile, "/nonexistent/natkeep.conf")
        self.assertIn("/nonexistent/natkeep.conf", str(error))

    def test_notINI(self) -> None:
        """
        A file that is not INI is named.
        """
        error = self.assertRaises(ConfigError, readConfigFile, self.write("just words\n"))
        self.assertIn("is not valid INI", str(error))

    def test_exampleFile(self) -> None:
        """
        The shipped example config is valid and documents every key.
        """
        path = FilePath(__file__).parent().parent().child("etc").child("natkeep.conf")
        text = path.getContent().decode("utf-8")
        values, warnings = readConfigFile(path.path)
        buildSettings(values, {})
        for parameter in PARAMETERS:
            self.assertIn(parameter.key, text)


class OptionsTests(SynchronousTestCase):
    """
    C{twistd natkeep} options.
    """

    def settings(self, *argv: str) -> Settings:
        options = Options()
        options.parseOptions(list(argv))
        return options.settings()

    def test_yesNoSpellings(self) -> None:
        """
        Every yes/no setting takes on the command line the spellings the
        config file takes, and a wrong one is named as in the file.
        """
        from natkeep.config import PARAMETERS, _boolean

        switches = [p for p in PARAMETERS if p.parse is _boolean]
        self.assertEqual(
            {p.option for p in switches}, {"ping-all", "sip-trace", "media-proxy-behind-nat"}
        )
        for parameter in switches:
            for spelling, value in (
                ("yes", True),
                ("no", False),
                ("on", True),
                ("off", False),
                ("true", True),
                ("False", False),
                ("1", True),
                ("0", False),
            ):
                settings = self.settings(f"--{parameter.option}", spelling)
                self.assertIs(getattr(settings, parameter.attribute), value)
                fromFile = buildSettings({parameter.key: spelling}, {})
                self.assertIs(getattr(fromFile, parameter.attribute), value)
            error = self.assertRaises(ConfigError, self.settings, f"--{parameter.option}", "maybe")
            self.assertIn(f"--{parameter.option}", str(error))
            self.assertIn("allowed yes/no", str(error))

    def test_everyOption(self) -> None:
        """
        Every parameter has a lower-case option that sets it.
        """
        settings = self.settings(
            "--message",
            r"PING\r\n",
            "--period",
            "20",
            "--send-interval",
            "250",
            "--send-one-time",
            "100",
            "--endpoint-expire",
            "1800",
            "--endpoint-nat-expire",
            "120",
            "--min-expires",
            "30",
            "--listen",
            "127.0.0.1:5070",
            "--listen",
            "[::1]:5070",
            "--db",
            "x.sqlite",
            "--status",
            "127.0.0.1:8080",
            "--payload",
            "crlf",
            "--pacing",
            "spread",
            "--expiry",
            "fixed",
            "--liveness-misses",
            "5",
            "--nat-detect",
            "via",
            "--ping-all",
            "yes",
            "--sip-trace",
            "on",
        )
        self.assertEqual(
            attrs.asdict(settings),
            attrs.asdict(
                Settings(
                    message=b"PING\r\n",
                    period=20,
                    sendInterval=250,
                    sendOneTime=100,
                    endpointExpire=1800,
                    endpointNatExpire=120,
                    minExpires=30,
                    listen=("127.0.0.1:5070", "[::1]:5070"),
                    db="x.sqlite",
                    status="127.0.0.1:8080",
                    payload="crlf",
                    pacing="spread",
                    expiry="fixed",
                    livenessMisses=5,
                    natDetect=frozenset({"via"}),
                    pingAll=True,
                    sipTrace=True,
                )
            ),
        )

    def test_configFile(self) -> None:
        """
        C{--config} reads the file; options given override it.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"SS_SIP_NAT_KEEP_ALIVE_PERIOD = 20\nSS_ENDPOINT_EXPIRE = 600\n")
        settings = self.settings("--config", path.path, "--period", "25")
        self.assertEqual((settings.period, settings.endpointExpire), (25, 600))

    def test_badOption(self) -> None:
        """
        A wrong value on the command line names the option.
        """
        error = self.assertRaises(ConfigError, self.settings, "--send-one-time", "0")
        self.assertIn(
            "--send-one-time = '0' is invalid: out of range; allowed 1..1000000", str(error)
        )

    def test_devices(self) -> None:
        """
        C{--devices} takes a whole number.
        """
        from twisted.python.usage import UsageError

        self.assertRaises(UsageError, Options().parseOptions, ["--devices", "many"])


class SanityTests(SynchronousTestCase):
    """
    Advice about settings that work but are risky.
    """

    def test_defaultsWarnAboutPeriod(self) -> None:
        """
        The VOS3000 defaults (PERIOD 30, NAT_EXPIRE 300) give no warning.
        """
        self.assertEqual(sanityWarnings(Settings()), [])

    def test_warnings(self) -> None:
        """
        Each risky setting gives its warning: PERIOD above a fifth of the
        NAT expiry, PERIOD above 30 s, more devices than one cycle reaches.
        """
        settings = Settings(period=100, endpointNatExpire=300, sendOneTime=1)
        text = "\n".join(sanityWarnings(settings, devices=10**6))
        self.assertIn("above SS_ENDPOINT_NAT_EXPIRE / 5", text)
        self.assertIn("above 30 s", text)
        self.assertIn("exceed one cycle's capacity of 200", text)
        self.assertNotIn("no heartbeats", text)

    def test_strategyAdvice(self) -> None:
        """
        The chosen strategies add their own advice: the C{raw} payload warns
        that an empty MESSAGE sends no heartbeats; C{crlf} sends its own
        bytes and does not.
        """
        self.assertIn("no heartbeats", "\n".join(adviceFor(Settings(message=b""))))
        self.assertEqual(adviceFor(Settings(message=b"", payload="crlf")), [])
