#!/usr/bin/env python3
"""Foreground entry point: ``python ws.py [options]`` (same as ``autogpt-ws``).

main() parses the options into Settings, builds WebsocketServer(settings)
and runs it with run_processes() until SIGTERM or SIGINT.
"""

import sys

from autogpt_ws.running.cli import main

if __name__ == "__main__":
    sys.exit(main())
