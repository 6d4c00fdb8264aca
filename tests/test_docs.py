"""The documents are the product's own: every one a user of a clone can
open, every link and file they name there, every module in the design's
map.  (The settings table is checked in test_config.)"""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md", *(os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(ROOT, "docs")))
                            if name.endswith(".md")), os.path.join("benchmarks", "peers", "README.md")]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PATH = re.compile(r"`((?:autogpt_ws|benchmarks|tests|deploy|docs|twisted)/[\w./-]+|[\w/]+\.py)`")


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


class Documents(TestCase):
    def test_the_four_documents_exist(self) -> None:
        for name in ("protocol.md", "operations.md", "design.md", "performance.md"):
            self.assertIn(os.path.join("docs", name), DOCUMENTS)

    def test_links_stay_in_the_repository_and_resolve(self) -> None:
        for name in DOCUMENTS:
            text = read(name)
            self.assertNotIn("../shared", text, name)
            for target in LINK.findall(text):
                if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                    continue
                path = os.path.normpath(os.path.join(ROOT, os.path.dirname(name), target))
                self.assertTrue(path.startswith(ROOT + os.sep), f"{name}: {target} leaves the repository")
                self.assertTrue(os.path.exists(path), f"{name}: {target} does not exist")

    def test_files_named_exist(self) -> None:
        """A path in backquotes (`autogpt_ws/bus/cluster.py`, `sockets/deflate.py`,
        `benchmarks/run.py`) is a file of this repository (from its top or
        from the package's); a bare file name (`curve.py`) is one somewhere
        in it; what the benchmarks make (their venvs, results) is not
        checked."""
        package = os.path.join(ROOT, "autogpt_ws")
        everywhere = set()
        for directory, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_", "node_modules"))]
            everywhere.update(files)
        for name in DOCUMENTS:
            for path in PATH.findall(read(name)):
                path = path.rstrip(".")
                if "/" not in path:
                    self.assertIn(path, everywhere, f"{name} names {path}, which is not here")
                elif not re.match(r"benchmarks/(\.|results/)", path):
                    candidates = [os.path.join(ROOT, path), os.path.join(package, path)]
                    self.assertTrue(any(os.path.exists(c) for c in candidates),
                                    f"{name} names {path}, which is not here")

    def test_the_design_maps_every_module(self) -> None:
        text = read(os.path.join("docs", "design.md"))
        listing = text[text.index("```\nautogpt_ws/"):]
        listing = listing[:listing.index("```", 4)]
        for directory, _, files in os.walk(os.path.join(ROOT, "autogpt_ws")):
            for file in files:
                if file.endswith(".py") and file != "__init__.py":
                    self.assertIn(file, listing, f"docs/design.md's map leaves out {file}")
