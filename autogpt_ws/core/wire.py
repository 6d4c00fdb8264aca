"""The wire protocol as bytes (PROTOCOL.md sections 3, 4 and 7). No I/O.

Inbound: :func:`parse` turns one text frame into a :class:`Request` or
raises :class:`FrameError` carrying the exact error string to send back.
Outbound: every reply and push frame is built here, compact JSON with raw
UTF-8 and the five keys in their fixed order.  Pushed events are spliced in
as the producer's bytes, never re-encoded.
"""

from __future__ import annotations

import json
import re
import struct
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any, Protocol

# -- the fixed strings -------------------------------------------------------

ERR_FORMAT = "Invalid message format. Review the schema and retry"
ERR_DATA_MISSING = "Subscription data missing"
ERR_DATA_INVALID = "Invalid message data. Refer to the API schema"
ERR_NOT_PROCESSED = "Message type is not processed by the server"
ERR_SUBSCRIPTION_LIMIT = "Subscription limit reached"
ERR_RATE_LIMITED = "Rate limit exceeded"


def err_execution_not_found(graph_exec_id: str, user_id: str) -> str:
    """The AutoGPT server's reply to a subscribe to an execution that does
    not exist, is deleted, or is another user's (sharded bus)."""
    return f"graph_exec #{graph_exec_id} not found for user #{user_id}"


def err_wildcard(channel: str) -> str:
    """The AutoGPT server's reply to a graph id that would make a wildcard
    shard channel (``channel`` is the whole channel name, quoted as Python's
    repr quotes it, as upstream formats it)."""
    return (f"channel_key {channel!r} contains a wildcard; sharded pub/sub "
            "(SSUBSCRIBE) requires exact channel names.")


def err_lookup_failed(graph_exec_id: str, user_id: str) -> str:
    """Ours: the execution could not be looked up in time (the database is
    down or slow); the AutoGPT server would leave the frame unanswered."""
    return f"graph_exec #{graph_exec_id} could not be looked up for user #{user_id}; try again later"


SUBSCRIBE_EXEC = "subscribe_graph_execution"
SUBSCRIBE_GRAPH = "subscribe_graph_executions"
UNSUBSCRIBE = "unsubscribe"
HEARTBEAT = "heartbeat"
ERROR = "error"
GRAPH_EVENT = "graph_execution_event"
NODE_EVENT = "node_execution_event"
NOTIFICATION = "notification"

CLIENT_METHODS = frozenset((SUBSCRIBE_EXEC, SUBSCRIBE_GRAPH, UNSUBSCRIBE, HEARTBEAT, ERROR))
SERVER_METHODS = frozenset((GRAPH_EVENT, NODE_EVENT, NOTIFICATION))
METHODS = CLIENT_METHODS | SERVER_METHODS

HEARTBEAT_REPLY = b'{"method":"heartbeat","data":"pong","success":true}'

GRAPH_UPDATE = "graph_execution_update"
NODE_UPDATE = "node_execution_update"
EVENT_METHODS = {GRAPH_UPDATE: GRAPH_EVENT, NODE_UPDATE: NODE_EVENT}


class FrameError(Exception):
    """The frame gets ``error(message)`` as its reply."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Request:
    """A well-formed client envelope."""

    __slots__ = ("method", "data")

    def __init__(self, method: str, data: Any) -> None:
        self.method = method
        self.data = data

    def __repr__(self) -> str:
        return f"Request({self.method!r}, {self.data!r})"


# -- channel keys ------------------------------------------------------------


def exec_key(user_id: str, graph_exec_id: str) -> str:
    return f"{user_id}|graph_exec#{graph_exec_id}"


def graph_key(user_id: str, graph_id: str) -> str:
    return f"{user_id}|graph#{graph_id}|executions"


# -- inbound -----------------------------------------------------------------

_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "data": (dict, list, str),
    "success": (bool,),
    "channel": (str,),
    "error": (str,),
}


def parse(payload: bytes) -> Request:
    """One client text frame -> Request, or FrameError(ERR_FORMAT)."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise FrameError(ERR_FORMAT) from None
    if not isinstance(obj, dict):
        raise FrameError(ERR_FORMAT)
    method = obj.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise FrameError(ERR_FORMAT)
    for key, types in _OPTIONAL_TYPES.items():
        value = obj.get(key)
        if value is not None and not isinstance(value, types):
            raise FrameError(ERR_FORMAT)
    return Request(method, obj.get("data"))


# Longest graph or execution id a client may name, in UTF-8 bytes: upstream
# ids are UUIDs (36); a socket's keys stay small.
MAX_ID_BYTES = 128


def _clean_id(value: Any) -> str:
    if not isinstance(value, str):
        raise FrameError(ERR_DATA_INVALID)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate could not be written back
        raise FrameError(ERR_DATA_INVALID) from None
    if size > MAX_ID_BYTES:
        raise FrameError(ERR_DATA_INVALID)
    return value


def subscription_target(request: Request) -> tuple[str, str]:
    """(field, id) named by a subscribe or unsubscribe frame's data.

    field is ``graph_exec_id`` or ``graph_id``.  Raises FrameError with
    ERR_DATA_MISSING or ERR_DATA_INVALID.
    """
    data = request.data
    if data is None or (isinstance(data, (dict, list, str)) and len(data) == 0):
        raise FrameError(ERR_DATA_MISSING)
    if not isinstance(data, dict):
        raise FrameError(ERR_DATA_INVALID)
    if request.method == SUBSCRIBE_GRAPH:
        fields: tuple[str, ...] = ("graph_id",)
    elif request.method == SUBSCRIBE_EXEC:
        fields = ("graph_exec_id",)
    else:  # unsubscribe; graph_id is our extension
        fields = ("graph_exec_id", "graph_id")
    for field in fields:
        if field in data:
            return field, _clean_id(data[field])
    raise FrameError(ERR_DATA_INVALID)


# -- outbound ----------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def reply(method: str, *, data: Any = None, success: bool | None = None,
          channel: str | None = None, error: str | None = None) -> bytes:
    """A five-key server frame."""
    return (
        f'{{"method":{_json(method)},"data":{_json(data)},"success":{_json(success)},'
        f'"channel":{_json(channel)},"error":{_json(error)}}}'
    ).encode("utf-8")


def error(message: str) -> bytes:
    return reply(ERROR, success=False, error=message)


def subscribed(method: str, key: str | None) -> bytes:
    return reply(method, success=True, channel=key)


def push(method: str, key: str | None, event: bytes) -> bytes:
    """A pushed event: the producer's event bytes spliced in as ``data``."""
    channel = _json(key).encode("utf-8") if key is not None else b"null"
    return b"".join((
        b'{"method":"', method.encode("ascii"), b'","data":', event,
        b',"success":null,"channel":', channel, b',"error":null}',
    ))


def ws_text_frame(payload: bytes, compressed: bool = False) -> bytes:
    """RFC 6455 unmasked, unfragmented text frame (server to client);
    ``compressed`` sets RSV1, marking a permessage-deflate message."""
    first = 0xC1 if compressed else 0x81
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", first, 126, size) + payload
    return struct.pack("!BBQ", first, 127, size) + payload


class Compressor(Protocol):
    """A permessage-deflate parameter set (:class:`deflate.Deflater`):
    its window size, and a payload compressed on its own or with the
    previous frame of its key as history."""

    window_bits: int

    def frame(self, payload: bytes, history: bytes | None = None) -> bytes | None: ...


class Link:
    """What a frame pushed to a key leaves for the next frame of that key
    to refer back to: ``history``, the end of its payload, made when the
    frame is first written compressed (:mod:`deflate`).  The hub keeps the
    link of each key's last frame and hands it to the next one
    (:attr:`OutFrame.prior`); ``generation`` is the hub's, to forget idle
    keys."""

    __slots__ = ("history", "generation")

    def __init__(self, history: bytes | None) -> None:
        self.history = history
        self.generation = 0


# The prior of a frame pushed outside a key's stream (notifications,
# catch-up replays): nothing refers back to such a frame.
NO_STREAM = Link(None)


class OutFrame:
    """A frame for many sockets: JSON built once, WebSocket framing built
    once on first use and shared by every socket that writes it raw; and
    compressed at most once per window size and form (on its own, or
    primed with the previous frame of its key), shared likewise.

    ``prior`` is set by the hub when it pushes the frame to a key: the
    :class:`Link` left by the previous frame of that key, or None (none
    known); a frame pushed otherwise (notifications, catch-up replays)
    keeps :data:`NO_STREAM`.  ``link`` is this frame's, once it has been
    written compressed to a socket of a key's stream."""

    __slots__ = ("payload", "_wire", "_deflated", "link", "prior")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._wire: bytes | None = None
        self._deflated: dict[int, bytes] | None = None  # by window bits; primed forms by -bits
        self.link: Link | None = None
        self.prior: Link | None = NO_STREAM

    @property
    def wire(self) -> bytes:
        wire = self._wire
        if wire is None:
            wire = self._wire = ws_text_frame(self.payload)
        return wire

    def is_plain(self, wire: bytes) -> bool:
        """Whether ``wire`` is this frame uncompressed (without building
        the uncompressed frame when nothing has needed it yet)."""
        return wire is self._wire

    def deflated(self, compressor: Compressor, primed: bool = False) -> bytes:
        """The frame for sockets of ``compressor``'s window size: compressed
        on its own, or ``primed`` with the history of :attr:`prior` (for a
        socket whose inflater window ends with the previous frame of this
        key); the plain frame when compressing saved nothing."""
        cache = self._deflated
        if cache is None:
            cache = self._deflated = {}
        form = -compressor.window_bits if primed else compressor.window_bits  # one cache, both forms
        wire = cache.get(form)
        if wire is None:
            history = self.prior.history if primed else None  # type: ignore[union-attr]
            wire = cache[form] = compressor.frame(self.payload, history) or self.wire
        return wire


# -- reading producers' envelopes without re-encoding them -------------------

_WS = re.compile(r"[ \t\n\r]*")


def _reject_constant(name: str) -> Any:
    # NaN, Infinity and -Infinity are Python's, not JSON: forwarded inside a
    # push frame they would break every client's JSON.parse
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SCAN = _DECODER.scan_once


def scan_object(text: str, index: int = 0) -> tuple[dict[str, tuple[Any, int, int]], int]:
    """Parse the JSON object at ``index``; return {key: (value, start, end)}
    with each value's exact span in ``text``, and the index after the object.
    Raises ValueError on anything that is not a well-formed object."""
    index = _WS.match(text, index).end()  # type: ignore[union-attr]
    if text[index:index + 1] != "{":
        raise ValueError("not an object")
    index = _WS.match(text, index + 1).end()  # type: ignore[union-attr]
    members: dict[str, tuple[Any, int, int]] = {}
    if text[index:index + 1] == "}":
        return members, index + 1
    while True:
        if text[index:index + 1] != '"':
            raise ValueError("expected a key")
        key, index = scanstring(text, index + 1)
        index = _WS.match(text, index).end()  # type: ignore[union-attr]
        if text[index:index + 1] != ":":
            raise ValueError("expected ':'")
        start = _WS.match(text, index + 1).end()  # type: ignore[union-attr]
        try:
            value, end = _SCAN(text, start)
        except StopIteration:
            raise ValueError("expected a value") from None
        members[key] = (value, start, end)
        index = _WS.match(text, end).end()  # type: ignore[union-attr]
        char = text[index:index + 1]
        if char == "}":
            return members, index + 1
        if char != ",":
            raise ValueError("expected ',' or '}'")
        index = _WS.match(text, index + 1).end()  # type: ignore[union-attr]


_PREFIX = b'{"payload":'


def open_envelope(data: bytes) -> tuple[dict[str, Any], bytes]:
    """``{"payload": <event object>}`` -> (event as a dict, the event's exact
    bytes).  Raises ValueError for anything else (including RecursionError
    and bad UTF-8, folded into ValueError)."""
    try:
        if data.startswith(_PREFIX) and data.endswith(b"}"):
            raw = data[len(_PREFIX):-1].strip(b" \t\r\n")
            try:
                # decoded as strict UTF-8 here: json.loads(bytes) would also
                # take UTF-16/32 and a BOM, and those bytes are forwarded as is
                event = _DECODER.decode(raw.decode("utf-8"))
            except ValueError:
                event = None  # not the compact form: take the slow path
            if isinstance(event, dict):
                return event, raw
        text = data.decode("utf-8")
        members, end = scan_object(text)
        if text[end:].strip(" \t\r\n"):
            raise ValueError("data after the envelope")
        if "payload" not in members:
            raise ValueError("no payload")
        event, start, stop = members["payload"]
        if not isinstance(event, dict):
            raise ValueError("payload is not an object")
        return event, text[start:stop].encode("utf-8")
    except RecursionError:
        raise ValueError("nested too deeply") from None


def inner_payload(data: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """A notification envelope ``{"payload":{"user_id":..,"payload":{..}}}``
    -> (event, inner payload dict, inner payload's exact bytes)."""
    event, raw = open_envelope(data)
    try:
        text = raw.decode("utf-8")
        members, _ = scan_object(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if "payload" not in members:
        raise ValueError("no inner payload")
    inner, start, stop = members["payload"]
    if not isinstance(inner, dict):
        raise ValueError("inner payload is not an object")
    return event, inner, text[start:stop].encode("utf-8")
