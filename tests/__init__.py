"""
natkeep's tests.

They test natkeep as installed (C{pip install .}), in whichever build the
install made, compiled or pure Python: the source tree beside this package
is taken off the import path here, so that the tests run in this process
and the twistd processes they start run the same code.  Set
C{NATKEEP_TEST_SOURCE=1} to test the source tree instead (a quick loop
while editing; it is always pure Python).  L{tests.test_build} checks that
the installed copy is the source tree's.
"""

import os
import sys
from importlib.util import find_spec

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installedFirst() -> None:
    if os.environ.get("NATKEEP_TEST_SOURCE", "") not in ("", "0") or "natkeep" in sys.modules:
        return
    kept = [p for p in sys.path if os.path.abspath(p or os.curdir) != SOURCE]
    saved = sys.path[:]
    sys.path[:] = kept
    if find_spec("natkeep") is None:
        # Not installed: the source tree it is.
        sys.path[:] = saved


_installedFirst()
