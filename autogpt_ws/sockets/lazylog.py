"""Autobahn formats the arguments of its debug log lines eagerly, whatever
the log level: ``pformat`` of ~30 options on every connection, qualified
names and ANSI colouring (``hltype``/``hlval``) on every handshake, every
receive and every send.  That is a large part of the cost of a connection
and of each frame.  :func:`install` swaps those helpers, in Autobahn's
modules only, for lazy ones that format when a debug line is really
written, with the same text."""

from __future__ import annotations

from pprint import pformat
from typing import Any, Callable

import autobahn.twisted.websocket as twisted_websocket
import autobahn.websocket.protocol as websocket_protocol
from autobahn.util import hltype, hlval


class Lazy:
    """``func(*args, **kwargs)``, computed when formatted."""

    __slots__ = ("func", "args", "kwargs")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs

    def __str__(self) -> str:
        return str(self.func(*self.args, **self.kwargs))

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def lazy(func: Callable[..., Any]) -> Callable[..., Lazy]:
    def deferred(*args: Any, **kwargs: Any) -> Lazy:
        return Lazy(func, args, kwargs)

    deferred.__name__ = f"lazy_{func.__name__}"
    return deferred


def install() -> None:
    """Idempotent."""
    for module in (websocket_protocol, twisted_websocket):
        if getattr(module, "_autogpt_ws_lazy", False):
            continue
        module.hltype = lazy(hltype)  # type: ignore[attr-defined]
        module.hlval = lazy(hlval)  # type: ignore[attr-defined]
        if hasattr(module, "pformat"):
            module.pformat = lazy(pformat)  # type: ignore[attr-defined]
        module._autogpt_ws_lazy = True  # type: ignore[attr-defined]
