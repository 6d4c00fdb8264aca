"""The ``autogpt-ws`` console script and ``python ws.py``.

``autogpt-ws [options]`` runs the server in the foreground;
``autogpt-ws publish ...`` publishes events the way AutoGPT's executors do.

Exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 when the server cannot
start (a port in use), 2 for a bad option or setting (one line on stderr).
"""

from __future__ import annotations

import sys
from typing import Callable

from . import logs
from .app import run_processes
from .tap import build, parse_or_none


def _optional(module: str, name: str) -> Callable[..., int] | None:
    """A command living in a module that may not be part of this build."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "publish":
        publish_main = _optional("autogpt_ws.producing.publish_cli", "main")
        if publish_main is None:
            sys.stderr.write("autogpt-ws: the publish command is not available in this build\n")
            return 2
        return publish_main(argv[1:])
    options = parse_or_none(argv)
    if options is None:
        return 2
    settings = options.settings
    assert settings is not None
    logs.start(settings.log_level, settings.log_format)
    if settings.workers > 1:
        run_workers = _optional("autogpt_ws.running.workers", "run_workers")
        if run_workers is None:
            sys.stderr.write("autogpt-ws: configuration error: workers: more than 1 is not supported by this build\n")
            return 2
        return run_workers(settings, argv)
    return run_processes(build(settings, demo=bool(options["demo"])))
