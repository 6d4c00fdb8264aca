"""Logging through twisted.logger: text (default) or one JSON object per
line, filtered by level.  Every line passes a last redaction of ``token=``
values, whatever logged it (our code never logs tokens; this guards
libraries)."""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from typing import IO, Any

import txaio
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogBeginner,
)
from zope.interface import implementer

_TOKEN = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)
_LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "error": "error", "critical": "critical"}


def redact(text: str) -> str:
    return _TOKEN.sub(r"\1***", text)


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one line, text or JSON, redacted."""

    def __init__(self, stream: IO[str], fmt: str = "text") -> None:
        self._stream = stream
        self._json = fmt == "json"

    def __call__(self, event: dict[str, Any]) -> None:
        if self._json:
            record: dict[str, Any] = {
                "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
                "level": getattr(event.get("log_level"), "name", "info"),
                "namespace": event.get("log_namespace", ""),
                "message": formatEvent(event),
            }
            for key, value in event.items():
                if not key.startswith("log_") and key not in record and key not in ("format", "isError", "message", "system", "time"):
                    record[key] = _plain(value)
            failure = event.get("log_failure")
            if failure is not None:
                record["traceback"] = failure.getTraceback()
            line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        else:
            line = formatEventAsClassicLogText(event)
            if not line:
                return
        try:
            self._stream.write(redact(line))
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stream must not take the server down


def make_observer(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> ILogObserver:
    txaio.use_twisted()
    txaio.set_global_log_level(_LEVELS.get(level, "info"))
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(LineObserver(stream or sys.stdout, fmt), [predicate])


def start(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Begin logging for a foreground run (ws.py, autogpt-ws)."""
    globalLogBeginner.beginLoggingTo([make_observer(level, fmt, stream)], redirectStandardIO=False)
