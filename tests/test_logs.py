"""Logging: text or one JSON object per line, a level filter, and redaction
of tokens whatever logged them."""

from __future__ import annotations

import io
import json

import txaio
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from autogpt_ws.running import logs


class Observers(TestCase):
    def setUp(self) -> None:
        # make_observer sets Autobahn's (global) level: put it back
        txaio.use_twisted()
        level = txaio.get_global_log_level()
        self.addCleanup(txaio.set_global_log_level, level)

    def logger(self, level: str = "info", fmt: str = "text") -> tuple[Logger, io.StringIO, ILogObserver]:
        stream = io.StringIO()
        observer = logs.make_observer(level, fmt, stream)
        publisher = LogPublisher(observer)
        return Logger(namespace="autogpt_ws.test", observer=publisher), stream, observer

    def test_text_one_line_per_event(self) -> None:
        log, stream, _ = self.logger()
        log.info("socket of user {user_id} opened", user_id="u-1")
        log.warn("slow consumer {buffered}", buffered=123)
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertRegex(lines[0], r"^\d{4}-\d\d-\d\dT\S+ \[autogpt_ws\.test#info\] socket of user u-1 opened$")
        self.assertIn("[autogpt_ws.test#warn] slow consumer 123", lines[1])

    def test_json_one_object_per_line_with_fields(self) -> None:
        log, stream, _ = self.logger(fmt="json")
        log.info("subscribed {user_id} to {key}", user_id="u-1", key="u-1|graph_exec#e1",
                 count=3, tags=["a", "b"], detail={"bus": "memory"})
        log.error("naïve ✓ {n}", n=1)
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        first = json.loads(lines[0])
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["namespace"], "autogpt_ws.test")
        self.assertEqual(first["message"], "subscribed u-1 to u-1|graph_exec#e1")
        self.assertEqual(first["user_id"], "u-1")
        self.assertEqual(first["key"], "u-1|graph_exec#e1")
        self.assertEqual(first["count"], 3)
        self.assertEqual(first["tags"], ["a", "b"])
        self.assertEqual(first["detail"], {"bus": "memory"})
        self.assertRegex(first["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        self.assertFalse(any(key.startswith("log_") for key in first), first)
        second = json.loads(lines[1])
        self.assertEqual((second["level"], second["message"]), ("error", "naïve ✓ 1"))
        self.assertIn("naïve ✓", lines[1])  # UTF-8 written raw

    def test_json_failure_has_traceback(self) -> None:
        log, stream, _ = self.logger(fmt="json")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("handling a frame failed", Failure(), user_id="u-1")
        record = json.loads(stream.getvalue())
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertEqual(record["user_id"], "u-1")

    def test_level_filter(self) -> None:
        for level, expected in (("debug", ["d", "i", "w", "e"]), ("info", ["i", "w", "e"]),
                                ("warn", ["w", "e"]), ("error", ["e"])):
            log, stream, _ = self.logger(level, "json")
            log.debug("d")
            log.info("i")
            log.warn("w")
            log.error("e")
            messages = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
            self.assertEqual(messages, expected, level)

    def test_tokens_redacted_in_both_formats(self) -> None:
        for fmt in ("text", "json"):
            log, stream, _ = self.logger("debug", fmt)
            log.debug("GET {uri}", uri="/ws?token=SECRETXYZ&x=1")
            log.info("params {params}", params={"token": ["SECRETXYZ"]}, password="hunter2")
            log.info("raw line: GET /ws?access_token=SECRETXYZ HTTP/1.1")
            out = stream.getvalue()
            self.assertNotIn("SECRETXYZ", out, fmt)
            self.assertNotIn("hunter2", out, fmt)
            self.assertIn("token=***&x=1", out, fmt)

    def test_control_characters_escaped(self) -> None:
        """Client input (a request line, a header, an id) never writes
        control characters or ANSI escapes to the log, nor forges a line."""
        hostile = "/x\x1b[31mred\x1b[0m\r\nFORGED [autogpt_ws#info] line\x00\x07\x7f\x9b2J"
        log, stream, _ = self.logger()
        log.info("GET {uri}", uri=hostile)
        log.info("next")
        text = stream.getvalue()
        lines = text.splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("GET /x\\x1b[31mred\\x1b[0m\\x0d\\x0aFORGED [autogpt_ws#info] line\\x00\\x07\\x7f\\x9b2J",
                      lines[0])
        self.assertEqual([c for c in text if ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) < 0xA0], [])
        log, stream, _ = self.logger(fmt="json")
        log.info("GET {uri}", uri=hostile)
        line = stream.getvalue()
        self.assertEqual(len(line.splitlines()), 1)
        self.assertEqual([c for c in line if ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) < 0xA0], [])
        self.assertEqual(json.loads(line)["uri"], hostile)  # escaped, not lost

    def test_traceback_keeps_its_lines(self) -> None:
        log, stream, _ = self.logger()
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("handling a frame failed")
        self.assertIn("\n\tTraceback (most recent call last):\n", stream.getvalue())

    def test_lone_surrogate_does_not_lose_the_line(self) -> None:
        """A string that cannot be encoded (a lone surrogate, as
        ``surrogateescape`` makes of bad bytes) is written escaped."""
        for fmt in ("text", "json"):
            raw = io.BytesIO()
            stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
            publisher = LogPublisher(logs.make_observer("info", fmt, stream))
            log = Logger(namespace="autogpt_ws.test", observer=publisher)
            log.info("id {ident} é", ident="a\udcffb")
            log.info("after")
            lines = raw.getvalue().decode("utf-8").splitlines()
            self.assertEqual(len(lines), 2, (fmt, lines))
            self.assertIn("a\\udcffb", lines[0])
            self.assertIn("é", lines[0])
            if fmt == "json":
                self.assertEqual(json.loads(lines[0])["ident"], "a\udcffb")

    def test_closed_stream_does_not_raise(self) -> None:
        stream = io.StringIO()
        observer = logs.LineObserver(stream, "text")
        stream.close()
        observer({"log_format": "hello", "log_level": LogLevel.info, "log_time": 0.0,
                  "log_namespace": "x"})

    def test_autobahn_kept_quiet(self) -> None:
        """Autobahn logs per connection, and at debug dumps raw upgrade
        requests (tokens): errors only, or info when we debug."""
        logs.make_observer("debug", "text", io.StringIO())
        self.assertEqual(txaio.get_global_log_level(), "info")
        logs.make_observer("warn", "text", io.StringIO())
        self.assertEqual(txaio.get_global_log_level(), "error")
