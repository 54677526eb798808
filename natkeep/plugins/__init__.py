"""
Strategy drop-ins.  natkeep's own live here; a third-party package adds a
module under its own C{natkeep/plugins/} folder (without C{__init__.py}),
which this package's path picks up.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[no-untyped-call]
__all__: list[str] = []
