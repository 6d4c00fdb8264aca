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
from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate, formatEvent,
                            formatEventAsClassicLogText, globalLogBeginner)
from zope.interface import implementer

# token=..., 'token': ['...'], "token": "..." (a query string, a repr, JSON)
_TOKEN = re.compile(r"""(token["']?\s*[=:]\s*\[?\s*["']?)[^&\s"'\],}]+""", re.IGNORECASE)
# structured fields never written as they are, whatever logged them
_SECRET_KEY = re.compile(r"token|password|secret|authorization|api_?key", re.IGNORECASE)
_LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "error": "error", "critical": "critical"}

# Control characters from client input (a request line, a header, an id)
# must not reach a terminal or forge lines: C0 controls, DEL and the C1
# controls (CSI, 0x9b, among them) are written as escapes.  In text, a
# string field loses its newlines and tabs too; the line keeps those it
# was formatted with (a traceback, twisted's tab-indented continuation
# lines).  JSON escapes C0 itself; DEL and C1 get JSON escapes.
_DEL_C1 = (0x7F, *range(0x80, 0xA0))
_TEXT_FIELD = str.maketrans({code: f"\\x{code:02x}" for code in (*range(0x20), *_DEL_C1)})
_TEXT_LINE = str.maketrans({code: f"\\x{code:02x}" for code in (*range(0x20), *_DEL_C1) if code not in (0x09, 0x0A)})
_JSON_LINE = str.maketrans({code: f"\\u{code:04x}" for code in _DEL_C1})


def redact(text: str) -> str:
    return _TOKEN.sub(r"\1***", text)


def _scrub(value: Any, key: str = "") -> Any:
    """``value`` with every secret-named entry replaced by ``***``, for
    formatting; other values are left as they are."""
    if key and _SECRET_KEY.search(key) and value not in (None, "", [], {}):
        return "***"
    if isinstance(value, dict):
        return {name: _scrub(item, name if isinstance(name, str) else "") for name, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_scrub(item) for item in value)
    return value


def _plain(value: Any, key: str = "") -> Any:
    """A structured field as JSON: scalars, lists and string-keyed dicts of
    them kept as they are; anything else as its str(); a field whose name
    says it holds a secret as ``***``."""
    if key and _SECRET_KEY.search(key) and value not in (None, "", [], {}):
        return "***"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict) and all(isinstance(name, str) for name in value):
        return {name: _plain(item, name) for name, item in value.items()}
    return str(value)


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one line, text or JSON, redacted."""

    def __init__(self, stream: IO[str], fmt: str = "text") -> None:
        self._stream = stream
        self._json = fmt == "json"

    def _field(self, key: str, value: Any) -> Any:
        value = _scrub(value, key)
        return value.translate(_TEXT_FIELD) if type(value) is str and not self._json else value

    def __call__(self, event: dict[str, Any]) -> None:
        event = {key: value if key.startswith("log_") else self._field(key, value) for key, value in event.items()}
        if self._json:
            record: dict[str, Any] = {
                "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
                "level": getattr(event.get("log_level"), "name", "info"),
                "namespace": event.get("log_namespace", ""),
                "message": formatEvent(event),
            }
            for key, value in event.items():
                if not key.startswith("log_") and key not in record and key not in ("format", "isError", "message", "system", "time"):
                    record[key] = _plain(value, key)
            failure = event.get("log_failure")
            if failure is not None:
                record["traceback"] = failure.getTraceback()
            line = json.dumps(record, ensure_ascii=False, default=str).translate(_JSON_LINE) + "\n"
        else:
            line = formatEventAsClassicLogText(event)
            if not line:
                return
            line = line[:-1].translate(_TEXT_LINE) + "\n"
        line = redact(line)
        try:
            try:
                self._stream.write(line)
            except UnicodeEncodeError:
                # a lone surrogate (or a character the stream cannot encode):
                # escaped, not lost
                encoding = getattr(self._stream, "encoding", None) or "utf-8"
                self._stream.write(line.encode(encoding, "backslashreplace").decode(encoding))
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stream must not take the server down


def make_observer(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> ILogObserver:
    txaio.use_twisted()
    # Autobahn logs per connection (every client that misbehaves, every
    # socket dropped at shutdown) and, at debug, raw upgrade requests with
    # their tokens: keep it to errors, or info when we debug. Our own lines
    # cover the events an operator cares about.
    txaio.set_global_log_level("info" if level == "debug" else "error")
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(LineObserver(stream or sys.stdout, fmt), [predicate])


def start(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Begin logging for a foreground run (ws.py, autogpt-ws)."""
    globalLogBeginner.beginLoggingTo([make_observer(level, fmt, stream)], redirectStandardIO=False)
