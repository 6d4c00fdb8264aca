"""wire.py as bytes: parsing client frames (PROTOCOL.md sections 3 and 7),
the exact layout of every reply and push frame, and reading producers'
envelopes without re-encoding them (section 5)."""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.trial.unittest import TestCase

from autogpt_ws.core import wire
from autogpt_ws.core.wire import ERR_DATA_INVALID, ERR_DATA_MISSING, ERR_FORMAT, ERR_NOT_PROCESSED, FrameError, Request

U = "3e53486c-cf57-477e-ba2a-cb02dc828e1a"


def _frame(**members: Any) -> bytes:
    return json.dumps(members).encode("utf-8")


class ParseTests(TestCase):
    """wire.parse: one text frame -> Request, or the format error."""

    def assertFormatError(self, payload: bytes) -> None:
        with self.assertRaises(FrameError) as caught:
            wire.parse(payload)
        self.assertEqual(caught.exception.message, ERR_FORMAT)

    def test_every_method_parses(self) -> None:
        for method in sorted(wire.METHODS):
            request = wire.parse(_frame(method=method))
            self.assertIsInstance(request, Request)
            self.assertEqual(request.method, method)
            self.assertIsNone(request.data)

    def test_method_set_is_exactly_the_spec(self) -> None:
        self.assertEqual(wire.METHODS, {
            "subscribe_graph_execution", "subscribe_graph_executions", "unsubscribe", "heartbeat",
            "error", "graph_execution_event", "node_execution_event", "notification",
        })

    def test_data_of_every_allowed_type_is_kept(self) -> None:
        for data in ({"graph_exec_id": "e1"}, [1, 2], "ping", None, {}, [], ""):
            self.assertEqual(wire.parse(_frame(method="heartbeat", data=data)).data, data)

    def test_all_five_keys_of_the_right_type(self) -> None:
        request = wire.parse(_frame(method="heartbeat", data="ping", success=True, channel="c", error="e"))
        self.assertEqual((request.method, request.data), ("heartbeat", "ping"))
        request = wire.parse(_frame(method="heartbeat", data=None, success=None, channel=None, error=None))
        self.assertEqual(request.method, "heartbeat")

    def test_unknown_keys_are_ignored(self) -> None:
        request = wire.parse(b'{"method":"heartbeat","data":"ping","extra":{"deep":[1,2]},"n":3}')
        self.assertEqual((request.method, request.data), ("heartbeat", "ping"))

    def test_non_compact_input_is_fine(self) -> None:
        request = wire.parse(b' {\n  "method" : "subscribe_graph_execution",\t"data" : {"graph_exec_id" : "e1"} }\n')
        self.assertEqual(request.data, {"graph_exec_id": "e1"})

    def test_not_json(self) -> None:
        for payload in (b"not json", b"", b"{", b'{"method":"heartbeat"', b"{'method':'heartbeat'}",
                        b'{"method":"heartbeat"} trailing'):
            self.assertFormatError(payload)

    def test_not_an_object(self) -> None:
        for payload in (b"[]", b'["heartbeat"]', b'"heartbeat"', b"1", b"null", b"true"):
            self.assertFormatError(payload)

    def test_method_missing_unknown_or_not_a_string(self) -> None:
        for payload in (b"{}", b'{"data":"ping"}', b'{"method":"ping"}', b'{"method":"Heartbeat"}',
                        b'{"method":"HEARTBEAT"}', b'{"method":" heartbeat"}', b'{"method":null}',
                        b'{"method":1}', b'{"method":["heartbeat"]}', b'{"method":{"name":"heartbeat"}}'):
            self.assertFormatError(payload)

    def test_keys_of_the_wrong_type(self) -> None:
        wrong: dict[str, tuple[Any, ...]] = {
            "data": (1, 1.5, True, False),
            "success": ("true", 1, 0, [], {}),
            "channel": (1, True, [], {}),
            "error": (1, False, [], {}),
        }
        for key, values in wrong.items():
            for value in values:
                self.assertFormatError(_frame(method="heartbeat", **{key: value}))

    def test_bad_utf8(self) -> None:
        self.assertFormatError(b'{"method":"heartbeat","data":"\xff\xfe"}')
        self.assertFormatError(b'{"method":"heartbeat","data":"\xed\xa0\x80"}')  # encoded surrogate

    def test_deeply_nested(self) -> None:
        depth = 100_000
        self.assertFormatError(b'{"method":"heartbeat","data":' + b"[" * depth + b"]" * depth + b"}")
        self.assertFormatError(b'{"method":"heartbeat","x":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}")

    def test_non_ascii_data(self) -> None:
        request = wire.parse('{"method":"heartbeat","data":"héllo ☃ 😀"}'.encode("utf-8"))
        self.assertEqual(request.data, "héllo ☃ 😀")


class SubscriptionTargetTests(TestCase):
    """wire.subscription_target: the data rows of section 3."""

    def target(self, method: str, data: Any) -> tuple[str, str]:
        return wire.subscription_target(Request(method, data))

    def assertTargetError(self, method: str, data: Any, message: str) -> None:
        with self.assertRaises(FrameError) as caught:
            self.target(method, data)
        self.assertEqual(caught.exception.message, message)

    def test_targets(self) -> None:
        self.assertEqual(self.target("subscribe_graph_execution", {"graph_exec_id": "e1"}), ("graph_exec_id", "e1"))
        self.assertEqual(self.target("subscribe_graph_executions", {"graph_id": "g1"}), ("graph_id", "g1"))
        self.assertEqual(self.target("unsubscribe", {"graph_exec_id": "e1"}), ("graph_exec_id", "e1"))
        self.assertEqual(self.target("unsubscribe", {"graph_id": "g1"}), ("graph_id", "g1"))  # extension

    def test_extra_keys_in_data_are_ignored(self) -> None:
        self.assertEqual(self.target("subscribe_graph_execution", {"graph_exec_id": "e1", "graph_id": "g", "x": 1}),
                         ("graph_exec_id", "e1"))

    def test_non_ascii_id(self) -> None:
        self.assertEqual(self.target("subscribe_graph_execution", {"graph_exec_id": "é☃"}), ("graph_exec_id", "é☃"))

    def test_data_missing(self) -> None:
        for method in ("subscribe_graph_execution", "subscribe_graph_executions", "unsubscribe"):
            empty: tuple[Any, ...] = (None, {}, [], "")
            for data in empty:
                self.assertTargetError(method, data, ERR_DATA_MISSING)

    def test_data_of_the_wrong_shape(self) -> None:
        for method, field in (("subscribe_graph_execution", "graph_exec_id"),
                              ("subscribe_graph_executions", "graph_id"),
                              ("unsubscribe", "graph_exec_id")):
            for data in (["e1"], [{field: "e1"}], "e1", {"other": "e1"},
                         {field: 5}, {field: None}, {field: ["e1"]}, {field: {"id": "e1"}}, {field: True}):
                self.assertTargetError(method, data, ERR_DATA_INVALID)

    def test_the_other_methods_field_is_the_wrong_shape(self) -> None:
        self.assertTargetError("subscribe_graph_execution", {"graph_id": "g1"}, ERR_DATA_INVALID)
        self.assertTargetError("subscribe_graph_executions", {"graph_exec_id": "e1"}, ERR_DATA_INVALID)

    def test_lone_surrogate_id_is_invalid(self) -> None:
        # valid JSON ("\ud800"), but it could never be written back as UTF-8
        request = wire.parse(b'{"method":"subscribe_graph_execution","data":{"graph_exec_id":"\\ud800"}}')
        with self.assertRaises(FrameError) as caught:
            wire.subscription_target(request)
        self.assertEqual(caught.exception.message, ERR_DATA_INVALID)


class ReplyTests(TestCase):
    """Every frame the server writes: compact, raw UTF-8, five keys in order."""

    def test_error_strings(self) -> None:
        self.assertEqual(wire.ERR_FORMAT, "Invalid message format. Review the schema and retry")
        self.assertEqual(wire.ERR_DATA_MISSING, "Subscription data missing")
        self.assertEqual(wire.ERR_DATA_INVALID, "Invalid message data. Refer to the API schema")
        self.assertEqual(wire.ERR_NOT_PROCESSED, "Message type is not processed by the server")

    def test_error_frames(self) -> None:
        for message in (ERR_FORMAT, ERR_DATA_MISSING, ERR_DATA_INVALID, ERR_NOT_PROCESSED):
            self.assertEqual(
                wire.error(message),
                b'{"method":"error","data":null,"success":false,"channel":null,"error":"'
                + message.encode() + b'"}')

    def test_heartbeat_reply_has_three_keys(self) -> None:
        self.assertEqual(wire.HEARTBEAT_REPLY, b'{"method":"heartbeat","data":"pong","success":true}')
        self.assertEqual(list(json.loads(wire.HEARTBEAT_REPLY)), ["method", "data", "success"])

    def test_subscribe_replies(self) -> None:
        key = wire.exec_key(U, "e1")
        self.assertEqual(key, U + "|graph_exec#e1")
        self.assertEqual(
            wire.subscribed("subscribe_graph_execution", key),
            b'{"method":"subscribe_graph_execution","data":null,"success":true,"channel":"'
            + U.encode() + b'|graph_exec#e1","error":null}')
        gkey = wire.graph_key(U, "g1")
        self.assertEqual(gkey, U + "|graph#g1|executions")
        self.assertEqual(
            wire.subscribed("subscribe_graph_executions", gkey),
            b'{"method":"subscribe_graph_executions","data":null,"success":true,"channel":"'
            + U.encode() + b'|graph#g1|executions","error":null}')

    def test_unsubscribe_reply_with_null_channel(self) -> None:
        self.assertEqual(wire.subscribed("unsubscribe", None),
                         b'{"method":"unsubscribe","data":null,"success":true,"channel":null,"error":null}')

    def test_key_order_and_nulls(self) -> None:
        frame = wire.reply("x")
        self.assertEqual(frame, b'{"method":"x","data":null,"success":null,"channel":null,"error":null}')
        frame = wire.reply("x", data={"b": 1, "a": [1, None]}, success=False, channel="c", error="e")
        self.assertEqual(frame, b'{"method":"x","data":{"b":1,"a":[1,null]},"success":false,"channel":"c","error":"e"}')

    def test_raw_utf8_not_escaped(self) -> None:
        frame = wire.subscribed("subscribe_graph_execution", wire.exec_key("usér", "é☃😀"))
        self.assertEqual(frame, '{"method":"subscribe_graph_execution","data":null,"success":true,'
                                '"channel":"usér|graph_exec#é☃😀","error":null}'.encode("utf-8"))
        self.assertNotIn(b"\\u", frame)

    def test_json_specials_are_escaped(self) -> None:
        frame = wire.subscribed("subscribe_graph_execution", wire.exec_key(U, 'a"b\\c\n'))
        self.assertIn(b'"channel":"' + U.encode() + b'|graph_exec#a\\"b\\\\c\\n"', frame)
        self.assertEqual(json.loads(frame)["channel"], U + '|graph_exec#a"b\\c\n')

    def test_push_splices_the_event_bytes(self) -> None:
        event = '{ "id" : "e1",  "name":"é☃" , "n":1.50 }'.encode("utf-8")
        frame = wire.push("graph_execution_event", "k|graph_exec#e1", event)
        self.assertEqual(frame, b'{"method":"graph_execution_event","data":' + event
                         + b',"success":null,"channel":"k|graph_exec#e1","error":null}')

    def test_push_with_null_channel(self) -> None:
        frame = wire.push("notification", None, b'{"type":"t","event":"e"}')
        self.assertEqual(frame, b'{"method":"notification","data":{"type":"t","event":"e"},'
                                b'"success":null,"channel":null,"error":null}')

    def test_push_key_raw_utf8(self) -> None:
        frame = wire.push("node_execution_event", "ü|graph_exec#☃", b"{}")
        self.assertIn('"channel":"ü|graph_exec#☃"'.encode("utf-8"), frame)


class FramingTests(TestCase):
    """ws_text_frame / OutFrame: RFC 6455 server-to-client text frames."""

    def test_length_forms(self) -> None:
        for size, header in ((0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
                             (65535, b"\x81\x7e\xff\xff"), (65536, b"\x81\x7f" + struct.pack("!Q", 65536))):
            payload = b"x" * size
            self.assertEqual(wire.ws_text_frame(payload), header + payload, size)

    def test_outframe_builds_framing_once(self) -> None:
        frame = wire.OutFrame(b'{"a":1}')
        first = frame.wire
        self.assertEqual(first, b"\x81\x07" + b'{"a":1}')
        self.assertIs(frame.wire, first)
        self.assertEqual(frame.payload, b'{"a":1}')


class OpenEnvelopeTests(TestCase):
    """open_envelope / inner_payload: the event's exact bytes, or ValueError."""

    def test_compact(self) -> None:
        event, raw = wire.open_envelope(b'{"payload":{"a":1,"b":"x"}}')
        self.assertEqual(event, {"a": 1, "b": "x"})
        self.assertEqual(raw, b'{"a":1,"b":"x"}')

    def test_non_compact_producer_json_is_sliced_exactly(self) -> None:
        inner = '{ "a" : 1 ,\n\t"b":[ 1,2 ] , "é" : "☃" }'.encode("utf-8")
        for data in (b'{"payload":' + inner + b"}",
                     b'{"payload": ' + inner + b" }",
                     b'{ "payload" : ' + inner + b"\n}\n",
                     b'\r\n{\t"payload":' + inner + b"}  "):
            event, raw = wire.open_envelope(data)
            self.assertEqual(raw, inner, data)
            self.assertEqual(event, {"a": 1, "b": [1, 2], "é": "☃"})

    def test_extra_keys_around_payload(self) -> None:
        inner = b'{"event_type":"graph_execution_update","id":"e1"}'
        for data in (b'{"payload":' + inner + b',"extra":{"payload":1}}',
                     b'{"extra":[1,{"payload":{}}],"payload":' + inner + b"}",
                     b'{"a":"}","payload":' + inner + b',"b":"{"}'):
            event, raw = wire.open_envelope(data)
            self.assertEqual(raw, inner, data)
            self.assertEqual(event["id"], "e1")

    def test_duplicate_payload_takes_the_last_like_json(self) -> None:
        data = b'{"payload":{"n":1},"payload":{"n":2}}'
        event, raw = wire.open_envelope(data)
        self.assertEqual((event, raw), ({"n": 2}, b'{"n":2}'))
        self.assertEqual(json.loads(data)["payload"], event)

    def test_escapes_and_raw_utf8_kept_as_published(self) -> None:
        inner = '{"s":"\\u00e9 é \\"q\\" \\ud83d\\ude00 😀"}'.encode("utf-8")
        event, raw = wire.open_envelope(b'{"payload":' + inner + b"}")
        self.assertEqual(raw, inner)
        self.assertEqual(event["s"], 'é é "q" 😀 😀')

    def test_malformed(self) -> None:
        for data in (b"", b"null", b"[]", b'{"payload":[1]}', b'{"payload":"x"}', b'{"payload":null}',
                     b'{"nopayload":{}}', b"{}", b'{"payload":{}', b'{"payload":{}}}', b'{"payload":{}} x',
                     b'{"payload":{"a":1,}}', b'{"payload":{"a":}}', b'{"payload" {}}', b"{'payload':{}}",
                     b'{"payload":{},}', b'{"payload":{}"x":1}', b'{payload:{}}',
                     b'{"payload":{"a":"\x01"}}', b'[{"payload":{}}]'):
            self.assertRaises(ValueError, wire.open_envelope, data)

    def test_non_json_constants_are_refused(self) -> None:
        # NaN/Infinity would reach the browser's JSON.parse and break it
        for data in (b'{"payload":{"a":NaN}}', b'{"payload":{"a":Infinity}}', b'{"payload":{"a":-Infinity}}',
                     b'{"payload":{"a":[NaN]},"x":1}', b'{"payload":{"a":1},"x":NaN}'):
            self.assertRaises(ValueError, wire.open_envelope, data)

    def test_bad_utf8(self) -> None:
        for data in (b'{"payload":{"a":"\xff"}}', b'{"payload":{"a":"\xc3"}}', b'{"payload":{"a":"\xed\xa0\x80"}}',
                     b'{"payload":{"a":1},"x":"\xff"}'):
            self.assertRaises(ValueError, wire.open_envelope, data)

    def test_bom_and_other_encodings_are_refused(self) -> None:
        # json.loads(bytes) would accept these, and the bytes would be
        # forwarded to browsers as they are: not UTF-8 JSON
        for data in (b'{"payload":\xef\xbb\xbf{"a":1}}', b'\xef\xbb\xbf{"payload":{"a":1}}',
                     b'{"payload":{\x00}\x00}', b'{"payload":' + '{"a":1}'.encode("utf-16-le") + b"}"):
            self.assertRaises(ValueError, wire.open_envelope, data)

    def test_deeply_nested(self) -> None:
        depth = 100_000
        for data in (b'{"payload":{"a":' + b"[" * depth + b"]" * depth + b"}}",
                     b'{"payload":{"a":' + b"[" * depth + b"]" * depth + b"},\"x\":1}",
                     b'{"x":' + b"[" * depth + b"]" * depth + b',"payload":{}}'):
            self.assertRaises(ValueError, wire.open_envelope, data)

    def test_moderate_nesting_is_fine(self) -> None:
        inner = b'{"a":' + b"[" * 200 + b"]" * 200 + b"}"
        event, raw = wire.open_envelope(b'{"payload" : ' + inner + b"}")
        self.assertEqual(raw, inner)

    def test_inner_payload_exact_bytes(self) -> None:
        inner = '{ "type" : "agent_run", "event":"done", "extra": {"é":[1, 2]} }'.encode("utf-8")
        for data in (b'{"payload":{"user_id":"u1","payload":' + inner + b"}}",
                     b'{ "payload" : { "payload" : ' + inner + b' , "user_id" : "u1" } }'):
            event, payload, raw = wire.inner_payload(data)
            self.assertEqual(raw, inner, data)
            self.assertEqual(payload, {"type": "agent_run", "event": "done", "extra": {"é": [1, 2]}})
            self.assertEqual(event["user_id"], "u1")

    def test_inner_payload_malformed(self) -> None:
        for data in (b'{"payload":{"user_id":"u1"}}', b'{"payload":{"user_id":"u1","payload":"x"}}',
                     b'{"payload":{"user_id":"u1","payload":[]}}', b'{"payload":{"user_id":"u1","payload":null}}',
                     b'{"payload":{"payload":{"a":NaN}}}', b'{"payload":{"payload":{"a":"\xff"}}}',
                     b"not json"):
            self.assertRaises(ValueError, wire.inner_payload, data)

    def test_inner_payload_deeply_nested(self) -> None:
        depth = 100_000
        data = b'{"payload":{"payload":{"a":' + b"[" * depth + b"]" * depth + b"}}}"
        self.assertRaises(ValueError, wire.inner_payload, data)


class ScanObjectTests(TestCase):
    def test_spans(self) -> None:
        text = ' { "a" : [1, 2] , "b":"x" }'
        members, end = wire.scan_object(text)
        self.assertEqual(end, len(text))
        self.assertEqual({k: text[s:e] for k, (_, s, e) in members.items()}, {"a": "[1, 2]", "b": '"x"'})
        self.assertEqual(members["a"][0], [1, 2])

    def test_empty_object(self) -> None:
        self.assertEqual(wire.scan_object("{ }"), ({}, 3))
