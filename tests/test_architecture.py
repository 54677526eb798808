"""
The layout's rules, read from the source: which room may import which, and
no import circle anywhere, counting imports under C{TYPE_CHECKING} and
inside functions.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import natkeep

PACKAGE = os.path.dirname(os.path.abspath(natkeep.__file__))


def natkeepModules() -> dict[str, str]:
    """
    Every module of the natkeep package, by dotted name, with its file.
    """
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")]
            dotted = relative.replace(os.sep, ".")
            if dotted.endswith(".__init__"):
                dotted = dotted[: -len(".__init__")]
            modules[dotted] = path
    return modules


def importsOf(path: str, known: set[str]) -> set[str]:
    """
    The natkeep modules the file at C{path} imports, wherever the import
    statement stands.
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from natkeep import stun" imports the module natkeep.stun.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in known:
                found.add(name)
    return found


class ImportRuleTests(SynchronousTestCase):
    """
    The contracts name nothing concrete, and no module depends on itself.
    """

    def setUp(self) -> None:
        modules = natkeepModules()
        known = set(modules)
        self.graph = {name: importsOf(path, known) - {name} for name, path in modules.items()}

    def test_interfacesNameOnlyValues(self) -> None:
        """
        C{natkeep.interfaces} imports only the modules of the value types it
        names (the binding, the settings, the parsed message) and the
        listener contract it re-exports: no store, service, registrar,
        protocol, outbox or sender.
        """
        self.assertLessEqual(
            self.graph["natkeep.interfaces"],
            {"natkeep.bindings", "natkeep.config", "natkeep.sip", "natkeep.listener"},
        )

    def test_statusNamesNoService(self) -> None:
        """
        The status endpoint takes a snapshot callable: it imports no natkeep
        module at all.
        """
        self.assertEqual(self.graph["natkeep.status"], set())

    def test_coreNamesNoBuiltin(self) -> None:
        """
        Only the plugin package knows the built-in strategies; no core
        module imports one.
        """
        for name, imports in self.graph.items():
            if not name.startswith("natkeep.plugins"):
                self.assertEqual(
                    {i for i in imports if i.startswith("natkeep.plugins.")}, set(), name
                )

    def test_noCircles(self) -> None:
        """
        Following imports from any module never leads back to it.
        """
        for start in self.graph:
            seen: set[str] = set()
            stack = list(self.graph[start])
            while stack:
                name = stack.pop()
                self.assertNotEqual(name, start, f"{start} imports itself through {seen}")
                if name not in seen:
                    seen.add(name)
                    stack.extend(self.graph[name])

    def test_graphIsRead(self) -> None:
        """
        The rules above are checked against real edges: the wiring imports
        the rooms it wires.
        """
        self.assertLessEqual(
            {"natkeep.protocol", "natkeep.registrar", "natkeep.sender", "natkeep.store"},
            self.graph["natkeep.tap"],
        )
