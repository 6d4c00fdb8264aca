"""One worker of ``autogpt-ws --workers N``: ``python -m autogpt_ws.running.worker
[options]``, spawned by :mod:`autogpt_ws.running.workers`.

The same options and settings as ``autogpt-ws``; the server is built the
same way, then listens with SO_REUSEPORT on the port the supervisor chose,
and runs until SIGTERM (a graceful stop: sockets closed with 1001).
"""

from __future__ import annotations

import os
import sys

from . import logs
from .app import run_processes
from .tap import build, parse_or_none
from .workers import ENV_INDEX, ENV_PORT, ENV_SUPERVISOR, detach_from_terminal_group, use_reuse_port


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(ENV_SUPERVISOR):
        detach_from_terminal_group()
    options = parse_or_none(argv, "autogpt-ws worker")
    if options is None:
        return 2
    settings = options.settings
    assert settings is not None
    settings = settings.replace(workers=1)
    port_text = os.environ.get(ENV_PORT)
    port = int(port_text) if port_text else None
    if port is not None and not settings.listen:
        settings = settings.replace(port=port)
    logs.start(settings.log_level, settings.log_format)
    index = int(os.environ.get(ENV_INDEX, "0"))
    server = build(settings, demo=bool(options["demo"]) and index == 0, worker=index)
    use_reuse_port(server, port if settings.listen else None)
    return run_processes(server)


if __name__ == "__main__":
    sys.exit(main())
