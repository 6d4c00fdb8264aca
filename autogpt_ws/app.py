"""Public entry point, kept where it always was: ``from autogpt_ws.app
import run_processes``.  It lives in :mod:`autogpt_ws.running.app`."""

from .running.app import HeapFreezer, Signals, run_processes

__all__ = ["HeapFreezer", "Signals", "run_processes"]
