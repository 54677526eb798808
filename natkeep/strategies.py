"""
Finding strategies: every L{IStrategyMaker} in L{natkeep.plugins}, chosen by
name.  Third-party packages add theirs as drop-in modules; nothing here
names a built-in.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer
from zope.interface.interface import InterfaceClass

from natkeep.config import ConfigError, Settings
from natkeep.interfaces import IExpiryPolicy, IPacer, IPayload, IStrategyMaker

#: The config key of each strategy interface.
KINDS: dict[InterfaceClass, str] = {
    IPayload: "payload",
    IPacer: "pacing",
    IExpiryPolicy: "expiry",
}


@implementer(IPlugin, IStrategyMaker)
@attrs.frozen
class StrategyMaker:
    """
    A named way to build one strategy from the settings.  A plugin module
    exposes instances of this at module level.
    """

    name: str
    provides: InterfaceClass
    description: str
    factory: Callable[[Settings], Any]

    def __call__(self, settings: Settings) -> Any:
        return self.factory(settings)


def installedStrategies(interface: InterfaceClass) -> dict[str, IStrategyMaker]:
    """
    Every installed maker for C{interface}, by name.
    """
    import natkeep.plugins

    found: dict[str, IStrategyMaker] = {}
    for maker in getPlugins(IStrategyMaker, natkeep.plugins):
        if maker.provides is interface:
            found.setdefault(maker.name, maker)
    return found


def makeStrategy(interface: InterfaceClass, name: str, settings: Settings) -> Any:
    """
    Build the strategy called C{name} for C{interface}.

    @raise ConfigError: when none is installed by that name; the message
        lists the installed ones.
    """
    makers = installedStrategies(interface)
    maker = makers.get(name)
    if maker is None:
        raise ConfigError(
            f"{KINDS[interface]} = {name!r} is invalid: not installed; allowed "
            f"{', '.join(sorted(makers))}"
        )
    strategy = maker(settings)
    if not interface.providedBy(strategy):
        raise ConfigError(
            f"{KINDS[interface]} = {name!r} is invalid: its maker built "
            f"{strategy!r}, which does not provide {interface.__name__}"
        )
    return strategy


def describeStrategies() -> str:
    """
    A listing of every installed strategy, for C{--list-strategies}.
    """
    lines = []
    for interface, kind in KINDS.items():
        lines.append(f"{kind}:")
        for name, maker in sorted(installedStrategies(interface).items()):
            lines.append(f"  {name:<12} {maker.description}")
    return "\n".join(lines)
