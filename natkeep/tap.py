"""
The face: C{twistd natkeep} options and the service maker.
"""

from __future__ import annotations

import sys
from typing import Optional

from twisted.application.service import IService
from twisted.python import usage

from natkeep.config import (
    BY_OPTION,
    ConfigError,
    Settings,
    buildSettings,
    iterOptionHelp,
    readConfigFile,
)
from natkeep.strategies import describeStrategies

#: Parameters that are switches on the command line.
_FLAGS = ("sip-trace", "ping-all")


class Options(usage.Options):
    """
    C{twistd natkeep} options.  Values given here override the config file,
    which overrides the defaults.
    """

    synopsis = "[options]"
    longdesc = (
        "A SIP registrar that keeps its NATed devices reachable with paced "
        "UDP heartbeats (VOS3000 SS_SIP_NAT_KEEP_ALIVE_* semantics)."
    )

    optParameters = [
        ["config", "c", None, "INI file of settings, VOS3000 key names (etc/natkeep.conf)."],
        [
            "devices",
            None,
            None,
            "With --check: plan for this many NATed devices (default: the bindings in the store).",
        ],
    ] + [
        [option, None, None, help]
        for option, help in iterOptionHelp()
        if option not in _FLAGS and option != "listen"
    ]

    optFlags = [
        ["check", None, "Validate the config, print the capacity plan and exit."],
        ["list-strategies", None, "List the installed strategies and exit."],
    ] + [[option, None, help] for option, help in iterOptionHelp() if option in _FLAGS]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, address: str) -> None:
        """
        UDP HOST:PORT to listen on; repeat for several ([::]:5060 for IPv6). [file key listen; default 0.0.0.0:5060]
        """
        self["listen"].append(address)

    def postOptions(self) -> None:
        if self["list-strategies"]:
            print(describeStrategies())
            raise SystemExit(0)
        if self["devices"] is not None:
            try:
                if int(self["devices"]) < 0:
                    raise ValueError
            except ValueError:
                raise usage.UsageError("--devices takes a whole number of devices")

    def settings(self) -> Settings:
        """
        The checked settings these options and their config file give.

        @raise ConfigError: naming the key, the value and what is allowed.
        """
        fileValues: dict[str, str] = {}
        self.warnings: list[str] = []
        if self["config"]:
            fileValues, self.warnings = readConfigFile(self["config"])
        cli: dict[str, Optional[object]] = {}
        for option in BY_OPTION:
            if option == "listen":
                cli[option] = self["listen"] or None
            elif option in _FLAGS:
                cli[option] = True if self[option] else None
            else:
                cli[option] = self[option]
        return buildSettings(fileValues, cli)


def makeService(options: Options) -> IService:
    """
    Build the natkeep service, or exit with one line naming what is wrong.
    """
    from twisted.internet import reactor

    from natkeep.service import NatkeepService

    try:
        settings = options.settings()
        for warning in options.warnings:
            sys.stderr.write(f"natkeep: warning: {warning}\n")
        if options["check"]:
            from natkeep.plan import printPlan

            raise SystemExit(printPlan(settings, options["devices"], sys.stdout))
        return NatkeepService(settings, reactor, reloadSettings=options.settings)
    except ConfigError as e:
        raise SystemExit(f"natkeep: error: {e}")
