"""The ``autogpt-ws`` console script and ``python ws.py``.

``autogpt-ws [options]`` runs the server in the foreground;
``autogpt-ws publish ...`` publishes events the way AutoGPT's executors do.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from . import logs
from .app import run_processes
from .tap import Options, build


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "publish":
        from .publish_cli import main as publish_main

        return publish_main(argv[1:])
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        sys.stderr.write(f"autogpt-ws: {exc}\n{options}")
        return 2
    settings = options.settings
    assert settings is not None
    logs.start(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from .workers import run_workers

        return run_workers(settings, argv)
    return run_processes(build(settings, demo=bool(options["demo"])))
