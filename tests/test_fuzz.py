"""Fuzzing the frame handler (issue 5, point 9).

The expected answer to every frame comes from :class:`Model`, written from
the table of PROTOCOL.md section 3.1 and independent of ``wire.parse``.
In process: ``session.Session.handle`` with a real Hub and a recording
sink, over arbitrary bytes, arbitrary JSON and near-valid envelopes; every
frame gets exactly the documented reply (none for ``error``), the handler
never raises, subscriptions in the hub match the model, and a heartbeat
after the garbage is answered.  Over real sockets: the same, fewer
examples, plus the documented closes (binary 1003, oversize 1009, and 1007
for text that is not UTF-8); a blocking client runs hypothesis in a thread
while the server runs in the reactor.
"""

from __future__ import annotations

import json
import os
import socket
import struct

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.core.hub import Hub
from autogpt_ws.core.session import Session
from autogpt_ws.core.wire import OutFrame
from autogpt_ws.stats import Stats
from tests.helpers import U, raw_upgrade_request, start_server, ws_client_frame

FORMAT = "Invalid message format. Review the schema and retry"
MISSING = "Subscription data missing"
INVALID = "Invalid message data. Refer to the API schema"
NOT_PROCESSED = "Message type is not processed by the server"
LIMIT = "Subscription limit reached"
HEARTBEAT = b'{"method":"heartbeat","data":"ping","success":true}'
PONG = b'{"method":"heartbeat","data":"pong","success":true}'
CLIENT_METHODS = ("subscribe_graph_execution", "subscribe_graph_executions", "unsubscribe", "heartbeat", "error")
SERVER_METHODS = ("graph_execution_event", "node_execution_event", "notification")
KEYS = ("method", "data", "success", "channel", "error")


def error(message: str) -> bytes:
    return ('{"method":"error","data":null,"success":false,"channel":null,"error":%s}'
            % json.dumps(message)).encode()


def answer(method: str, channel: str | None) -> bytes:
    return ('{"method":"%s","data":null,"success":true,"channel":%s,"error":null}'
            % (method, json.dumps(channel, ensure_ascii=False))).encode("utf-8")


class Model:
    """PROTOCOL.md 3.1 for one socket of user ``user``: the reply to a frame
    (None for no reply) and the keys the socket holds."""

    def __init__(self, user: str, limit: int) -> None:
        self.user = user
        self.limit = limit
        self.held: set[str] = set()

    def reply(self, payload: bytes) -> bytes | None:
        try:
            obj = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return error(FORMAT)
        if not isinstance(obj, dict):
            return error(FORMAT)
        method = obj.get("method")
        if method not in CLIENT_METHODS + SERVER_METHODS:
            return error(FORMAT)
        data = obj.get("data")
        wrong_type = (
            (data is not None and not isinstance(data, (dict, list, str)))
            or (obj.get("success") is not None and not isinstance(obj.get("success"), bool))
            or any(obj.get(k) is not None and not isinstance(obj.get(k), str) for k in ("channel", "error"))
        )
        if wrong_type:
            return error(FORMAT)
        if method == "heartbeat":
            return PONG
        if method == "error":
            return None
        if method in SERVER_METHODS:
            return error(NOT_PROCESSED)
        if data is None or len(data) == 0:
            return error(MISSING)
        if not isinstance(data, dict):
            return error(INVALID)
        fields = {"subscribe_graph_execution": ("graph_exec_id",), "subscribe_graph_executions": ("graph_id",),
                  "unsubscribe": ("graph_exec_id", "graph_id")}[method]
        field = next((f for f in fields if f in data), None)
        ident = data.get(field) if field else None
        if not isinstance(ident, str) or not _encodable(ident) or len(ident.encode("utf-8")) > 128:
            # an id that cannot be written back (a lone surrogate) is invalid too, or over 128 bytes
            return error(INVALID)
        key = f"{self.user}|graph_exec#{ident}" if field == "graph_exec_id" else f"{self.user}|graph#{ident}|executions"
        if method == "unsubscribe":
            had = key in self.held
            self.held.discard(key)
            return answer(method, key if had else None)
        if self.limit and key not in self.held and len(self.held) >= self.limit:
            return error(LIMIT)
        self.held.add(key)
        return answer(method, key)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_shape(test: TestCase, frame: bytes) -> None:
    """Compact JSON, raw UTF-8, five keys in order (the pong excepted)."""
    if frame == PONG:
        return
    obj = json.loads(frame)
    test.assertEqual(list(obj), list(KEYS))
    test.assertEqual(frame, json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


# -- strategies ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
ids = (st.sampled_from(["e1", "e2", "e3", "e4", "e5", "", "é", "a|b", "\u2028", "x" * 128, "x" * 129, "é" * 65])
       | st.text(max_size=6) | json_values)
data_values = (
    st.fixed_dictionaries({}, optional={"graph_exec_id": ids, "graph_id": ids, "x": json_values})
    | json_values
)
envelopes = st.fixed_dictionaries(
    {"method": st.sampled_from(CLIENT_METHODS + SERVER_METHODS) | st.sampled_from(CLIENT_METHODS)
     | st.text(max_size=10) | json_values},
    optional={"data": data_values, "success": st.none() | st.booleans() | json_values,
              "channel": st.none() | st.text(max_size=6) | json_values,
              "error": st.none() | st.text(max_size=6) | json_values, "extra": json_values},
)
valid_frames = st.builds(lambda m, i: json.dumps({"method": m, "data": {"graph_exec_id": i}}).encode(),
                         st.sampled_from(CLIENT_METHODS), st.sampled_from(["e1", "e2", "e3"]))
well_formed = st.builds(
    lambda m, f, i: json.dumps({"method": m, "data": {f: i}}).encode(),
    st.sampled_from(("subscribe_graph_execution", "subscribe_graph_executions", "unsubscribe")),
    st.sampled_from(("graph_exec_id", "graph_id")), st.sampled_from(("e1", "e2", "e3")),
)
frames = st.one_of(
    well_formed,
    st.binary(max_size=64),
    st.text(max_size=32).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    envelopes.map(lambda e: json.dumps(e).encode()),
    envelopes.map(lambda e: json.dumps(e, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.tuples(valid_frames, st.integers(0, 80)).map(lambda t: t[0][:t[1]]),  # truncated
    st.just(b"[" * 3000 + b"]" * 3000),  # deeper than the JSON decoder recurses
)
# half the frames well-formed subscriptions, so limits and unsubscribe replies are reached
half_well_formed = st.tuples(st.booleans(), well_formed, frames).map(lambda t: t[1] if t[0] else t[2])
text_frames = half_well_formed.filter(lambda f: _utf8(f))


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class RecordingSink:
    user_id = U

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.pushed: list[OutFrame] = []

    def push(self, frame: OutFrame) -> None:
        self.pushed.append(frame)


class HandlerFuzz(TestCase):
    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(half_well_formed, min_size=1, max_size=12))
    def test_every_frame_gets_the_documented_reply(self, inputs: list[bytes]) -> None:
        hub = Hub()
        sink = RecordingSink()
        replies: list[bytes] = []
        session = Session(sink, hub, Stats(), replies.append, max_subscriptions=2)
        hub.attach(sink)
        model = Model(U, 2)
        for payload in inputs:
            before = len(replies)
            self.assertIsNone(session.handle(payload))  # no resolver: never waits
            expected = model.reply(payload)
            self.assertEqual(replies[before:], [] if expected is None else [expected], payload)
            for reply in replies[before:]:
                check_shape(self, reply)
        self.assertEqual(sink.keys, model.held)
        self.assertEqual(set(hub.keys()), model.held)
        self.assertEqual(sink.pushed, [])
        session.handle(HEARTBEAT)
        self.assertEqual(replies[-1], PONG)


# -- over real sockets ----------------------------------------------------------


class BlockingClient:
    """A WebSocket client on a blocking socket, for use off the reactor thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(raw_upgrade_request("/ws"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        head, _, self.buffer = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head)

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        self.sock.sendall(ws_client_frame(payload, opcode))

    def _read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def frame(self) -> tuple[int, bytes]:
        first, second = self._read(2)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._read(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", self._read(8))[0]
        return first & 0x0F, self._read(size)

    def texts(self, count: int) -> list[bytes]:
        """The next ``count`` text frames (pings skipped)."""
        received: list[bytes] = []
        while len(received) < count:
            opcode, payload = self.frame()
            if opcode == 0x8:
                raise AssertionError(f"closed unexpectedly: {payload!r}")
            if opcode == 0x1:
                received.append(payload)
        return received

    def close_code(self) -> int:
        """Read until the server's close frame; its code."""
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                self.send(payload[:2], opcode=0x8)
                return int(struct.unpack("!H", payload[:2])[0])

    def close(self) -> None:
        self.sock.close()


LIMIT_BYTES = 8192
bad_endings = st.sampled_from(["binary", "not_utf8", "oversize", None])


class SocketFuzz(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_over_real_sockets(self) -> None:
        server = start_server(self, rate_limit=0, max_subscriptions_per_socket=3, max_inbound_frame=LIMIT_BYTES)
        port = server.port
        seen: list[int] = []

        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(st.lists(text_frames, max_size=6), bad_endings)
        def run(inputs: list[bytes], ending: str | None) -> None:
            client = BlockingClient(port)
            try:
                model = Model(U, 3)
                for payload in inputs:
                    client.send(payload)
                    client.send(HEARTBEAT)
                    reply = model.reply(payload)
                    expected = ([] if reply is None else [reply]) + [PONG]
                    got = client.texts(len(expected))
                    assert got == expected, (payload, got)
                client.send(HEARTBEAT)  # nothing extra came after the last reply
                assert client.texts(1) == [PONG]
                if ending == "binary":
                    client.send(os.urandom(8), opcode=0x2)
                    assert client.close_code() == 1003
                elif ending == "not_utf8":
                    client.send(b'{"method":"heartbeat","data":"\xff\xfe"}')
                    assert client.close_code() == 1007
                elif ending == "oversize":
                    client.send(b" " * (LIMIT_BYTES + 1))
                    assert client.close_code() == 1009
                seen.append(len(inputs))
            finally:
                client.close()

        yield threads.deferToThread(run)
        self.assertGreaterEqual(len(seen), 40)
        self.assertGreater(sum(seen), 40)
        # the server is still serving
        last = yield threads.deferToThread(lambda: _heartbeat(port))
        self.assertEqual(last, [PONG])


def _heartbeat(port: int) -> list[bytes]:
    client = BlockingClient(port)
    try:
        client.send(HEARTBEAT)
        return client.texts(1)
    finally:
        client.close()
