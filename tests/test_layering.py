"""The shape of the house: the folders read as the data flow, and imports go
one way.

Every import in ``autogpt_ws`` (module level, inside functions, and under
``TYPE_CHECKING`` alike) is read from the source with ``ast``, and:

- no module imports another that imports it back, directly or not (no
  cycle anywhere);
- no module imports from a layer above its own.  The layers, lowest first:

  ``shared``     config.py, settings.py, stats.py, origins.py: read by every layer
  ``core``       core/: the protocol as bytes, the hub, the router, sessions, catch-up
  ``edges``      bus/ (events in), sockets/ (the Autobahn side), web/ (the HTTP side);
                 no edge imports another: they meet in core, or in running
  ``producing``  producing/: publishing as AutoGPT's executors do, the demo
  ``running``    running/: the service tree, runners, workers, logs
  ``entry``      service.py, app.py: the public entry points, kept where
                 they always were
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

from twisted.trial.unittest import TestCase

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "autogpt_ws")

LAYERS = {
    "shared": 0, "core": 1, "bus": 2, "sockets": 2, "web": 2, "producing": 3, "running": 4, "entry": 5,
}
EDGES = ("bus", "sockets", "web")
SHARED = ("autogpt_ws", "autogpt_ws.config", "autogpt_ws.settings", "autogpt_ws.stats", "autogpt_ws.origins")
ENTRY = ("autogpt_ws.service", "autogpt_ws.app")


def modules() -> dict[str, str]:
    """Dotted name -> file, for every module of the package."""
    found = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, wherever the import stands."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from . import wire" imports the module wire; "from .x import y" imports x
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer(name: str) -> str:
    if name in SHARED:
        return "shared"
    if name in ENTRY:
        return "entry"
    part = name.split(".")[1]
    assert part in LAYERS, f"{name}: a module outside the layers (add it to a folder, or to SHARED/ENTRY)"
    return part


class Layering(TestCase):
    def setUp(self) -> None:
        self.files = modules()
        known = set(self.files)
        self.graph = {name: imports(name, path, known) for name, path in self.files.items()}

    def test_every_module_has_a_layer(self) -> None:
        for name in self.files:
            layer(name)

    def test_imports_go_down_and_edges_meet_only_below(self) -> None:
        wrong = []
        for name, targets in self.graph.items():
            here = layer(name)
            for target in targets:
                there = layer(target)
                if LAYERS[there] > LAYERS[here] or (here in EDGES and there in EDGES and here != there):
                    wrong.append(f"{name} ({here}) imports {target} ({there})")
        self.assertEqual(wrong, [])

    def test_no_import_cycle(self) -> None:
        """Tarjan's strongly connected components: each must be one module."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        cycles: list[list[str]] = []
        counter = [0]

        def visit(node: str) -> None:
            index[node] = low[node] = counter[0]
            counter[0] += 1
            stack.append(node)
            on_stack.add(node)
            for target in self.graph[node]:
                if target not in index:
                    visit(target)
                    low[node] = min(low[node], low[target])
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))

        for node in self.graph:
            if node not in index:
                visit(node)
        self.assertEqual(cycles, [])

    def test_the_checker_sees_imports(self) -> None:
        """The reader itself: relative, absolute, function-level and
        TYPE_CHECKING imports all count (a checker that saw none would
        pass everything)."""
        self.assertIn("autogpt_ws.core.wire", self.graph["autogpt_ws.core.router"])
        self.assertIn("autogpt_ws.running.service", self.graph["autogpt_ws.running.tap"])  # inside build()
        self.assertTrue(any(targets for targets in self.graph.values()))
        layers = defaultdict(set)
        for name in self.files:
            layers[layer(name)].add(name)
        self.assertEqual(set(layers), set(LAYERS))


class EntryPoints(TestCase):
    """What users import and run keeps working where it always was."""

    def test_public_names(self) -> None:
        from autogpt_ws.app import run_processes
        from autogpt_ws.running import app, service
        from autogpt_ws.service import WebsocketServer

        self.assertIs(WebsocketServer, service.WebsocketServer)
        self.assertIs(run_processes, app.run_processes)

    def test_console_script_and_plugin_name_real_modules(self) -> None:
        import configparser
        import importlib

        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        from twisted import plugins

        parser = configparser.ConfigParser()
        parser.read(os.path.join(os.path.dirname(ROOT), "setup.cfg"))
        target = parser["options.entry_points"]["console_scripts"].split("=", 1)[1].strip()
        module, _, function = target.partition(":")
        self.assertTrue(callable(getattr(importlib.import_module(module), function)))
        [maker] = [p for p in getPlugins(IServiceMaker, plugins) if p.tapname == "autogpt-ws"]
        self.assertTrue(callable(importlib.import_module(maker.module).makeService))
