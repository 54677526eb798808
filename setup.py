"""
natkeep's build: setup.cfg holds the metadata; this file adds the compiled
hot path.

Where mypyc and a C compiler are at hand, the modules in L{HOT} are compiled
to C extensions; the pure-Python sources are installed beside them, and
Python prefers the extension.  Where either is missing, or
C{NATKEEP_PURE=1} is set, or the compile fails, the same package installs
as pure Python and says so.  C{natkeep --version} names the build.
"""

import os
import shutil
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: The modules every datagram passes through: the wire, the controllers,
#: the table, the socket protocol, the outbox and the sender's batch loop.
HOT = [
    "natkeep/sip.py",
    "natkeep/registrar.py",
    "natkeep/relay.py",
    "natkeep/forward.py",
    "natkeep/bindings.py",
    "natkeep/protocol.py",
    "natkeep/outbox.py",
    "natkeep/sender.py",
    "natkeep/guard.py",
    "natkeep/nat.py",
    "natkeep/stun.py",
    "natkeep/options.py",
]


def note(text):
    print(f"natkeep build: {text}", file=sys.stderr)


def compilerFound():
    command = (sysconfig.get_config_var("CC") or "cc").split()
    return bool(command) and shutil.which(command[0]) is not None


def compiled():
    """
    The extension modules to build, or none for a pure-Python build.
    """
    if os.environ.get("NATKEEP_PURE", "") not in ("", "0"):
        note("NATKEEP_PURE is set; pure Python")
        return []
    if not compilerFound():
        note("no C compiler; pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        note("mypyc is not installed; pure Python")
        return []
    try:
        return mypycify(HOT, opt_level="3")
    except (Exception, SystemExit) as e:
        note(f"mypyc could not compile the hot path ({e!r}); pure Python")
        return []


class OptionalBuildExt(build_ext):
    """
    Build the extensions, or leave the package pure Python when the C
    compiler fails.
    """

    def run(self):
        try:
            super().run()
        except Exception as e:
            note(f"the C compile failed ({e!r}); pure Python")
            self.extensions = []


setup(ext_modules=compiled(), cmdclass={"build_ext": OptionalBuildExt})
