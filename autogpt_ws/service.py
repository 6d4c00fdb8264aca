"""Public entry point, kept where it always was: ``from autogpt_ws.service
import WebsocketServer``.  The service tree lives in :mod:`autogpt_ws.running.service`."""

from .running.service import StartupError, WebsocketServer

__all__ = ["StartupError", "WebsocketServer"]
