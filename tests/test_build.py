"""
Which natkeep the suite tests: the installed copy, built from this source
tree, compiled or pure as the install made it.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from importlib.util import find_spec

from twisted.trial.unittest import SynchronousTestCase

import natkeep
import tests

#: The modules setup.py compiles when it can.
HOT = [
    "sip",
    "registrar",
    "relay",
    "forward",
    "bindings",
    "protocol",
    "outbox",
    "sender",
    "guard",
    "nat",
    "stun",
    "options",
]


class BuildTests(SynchronousTestCase):
    def test_installedIsThisSource(self) -> None:
        """
        The natkeep under test has the same Python sources as this tree, so
        a stale install cannot pass for the code being changed.
        """
        installed = os.path.dirname(os.path.abspath(natkeep.__file__))
        source = os.path.join(tests.SOURCE, "natkeep")
        names = sorted(n for n in os.listdir(source) if n.endswith(".py"))
        self.assertIn("sip.py", names)
        _, mismatch, missing = filecmp.cmpfiles(source, installed, names, shallow=False)
        self.assertEqual(
            (mismatch, missing), ([], []), "the installed natkeep is stale: pip install ."
        )

    def test_buildNamed(self) -> None:
        """
        L{natkeep.build} says what the modules are: C{mypyc} when every hot
        module is an extension, C{python} when none is.  With
        C{NATKEEP_EXPECT_BUILD} set (CI sets it for each pass), the build
        must be that one: a compile that silently fell back fails here.
        """
        origins = []
        for name in HOT:
            spec = find_spec(f"natkeep.{name}")
            assert spec is not None and spec.origin is not None
            origins.append(spec.origin)
        compiled = [not origin.endswith(".py") for origin in origins]
        build = natkeep.build()
        self.assertEqual(compiled, [build == "mypyc"] * len(HOT), origins)
        expected = os.environ.get("NATKEEP_EXPECT_BUILD")
        if expected:
            self.assertEqual(build, expected)

    def test_versionNamesBuild(self) -> None:
        """
        C{natkeep --version}, run as its own process on the same copy of
        natkeep, names the build.
        """
        here = os.path.dirname(os.path.dirname(os.path.abspath(natkeep.__file__)))
        out = subprocess.run(
            [sys.executable, "-m", "natkeep", "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            env={**os.environ, "PYTHONPATH": here},
        ).stdout
        self.assertEqual(out.strip(), f"natkeep {natkeep.__version__} ({natkeep.build()} build)")
