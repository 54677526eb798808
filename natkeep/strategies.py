"""
Finding strategies: every L{IStrategyMaker} in L{natkeep.plugins}, chosen by
name.  Third-party packages add theirs as drop-in modules; nothing here
names a built-in.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import attrs
from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer
from zope.interface.interface import InterfaceClass

from natkeep.config import ConfigError, Settings, sanityWarnings
from natkeep.interfaces import IExpiryPolicy, IPacer, IPayload, IStrategyMaker

#: The config key of each strategy interface.
KINDS: dict[InterfaceClass, str] = {
    IPayload: "payload",
    IPacer: "pacing",
    IExpiryPolicy: "expiry",
}


def _noAdvice(settings: Settings, devices: Optional[int]) -> Sequence[str]:
    return ()


@implementer(IPlugin, IStrategyMaker)
@attrs.frozen
class StrategyMaker:
    """
    A named way to build one strategy from the settings, and to describe
    it for the capacity plan.  A plugin module exposes instances of this at
    module level.

    @ivar factory: builds the strategy from the settings.
    @ivar size: for a payload, the bytes of one heartbeat.
    @ivar pacing: for a pacing, the heartbeats one period sends to a number
        of devices, and how often one device gets one, in words.
    @ivar advice: warnings about the settings, for a number of devices.
    """

    name: str
    provides: InterfaceClass
    description: str
    factory: Callable[[Settings], Any]
    size: Optional[Callable[[Settings], int]] = None
    pacing: Optional[Callable[[Settings, int], tuple[int, str]]] = None
    advice: Callable[[Settings, Optional[int]], Sequence[str]] = _noAdvice

    def __call__(self, settings: Settings) -> Any:
        return self.factory(settings)

    def heartbeatSize(self, settings: Settings) -> Optional[int]:
        return None if self.size is None else self.size(settings)

    def pace(self, settings: Settings, devices: int) -> Optional[tuple[int, str]]:
        return None if self.pacing is None else self.pacing(settings, devices)

    def warnings(self, settings: Settings, devices: Optional[int]) -> Sequence[str]:
        return self.advice(settings, devices)


@attrs.frozen
class Strategies:
    """
    The three strategies the settings choose, built together so that a
    reload applies all of them or none.
    """

    expiry: IExpiryPolicy
    payload: IPayload
    pacer: IPacer


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


def chosenMakers(settings: Settings) -> dict[InterfaceClass, IStrategyMaker]:
    """
    The maker of each strategy the settings choose, by interface.

    @raise ConfigError: when one is not installed; the message lists the
        installed ones.
    """
    return {
        interface: findMaker(interface, getattr(settings, kind))
        for interface, kind in KINDS.items()
    }


def findMaker(interface: InterfaceClass, name: str) -> IStrategyMaker:
    """
    The installed maker called C{name} for C{interface}.

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
    return maker


def adviceFor(settings: Settings, devices: Optional[int] = None) -> list[str]:
    """
    Every warning about C{settings} for C{devices} devices: the core's
    sanity advice, then what each chosen strategy says of itself.
    """
    warnings: list[str] = []
    for maker in chosenMakers(settings).values():
        warnings.extend(maker.warnings(settings, devices))
    return warnings + sanityWarnings(settings, devices)


def makeStrategies(settings: Settings) -> Strategies:
    """
    Build the expiry policy, payload and pacer the settings name.

    @raise ConfigError: when one is not installed, or its maker fails.
    """
    return Strategies(
        makeStrategy(IExpiryPolicy, settings.expiry, settings),
        makeStrategy(IPayload, settings.payload, settings),
        makeStrategy(IPacer, settings.pacing, settings),
    )


def makeStrategy(interface: InterfaceClass, name: str, settings: Settings) -> Any:
    """
    Build the strategy called C{name} for C{interface}.

    @raise ConfigError: when none is installed by that name (the message
        lists the installed ones), or its maker builds the wrong thing.
    """
    strategy = findMaker(interface, name)(settings)
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
