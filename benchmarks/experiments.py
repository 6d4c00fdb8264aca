#!/usr/bin/env python3
"""Our server with candidate optimisations applied as monkeypatches, to
measure a proposal before anyone edits the real modules.

    BENCH_PATCHES=pformat,ignore,coalesce python benchmarks/experiments.py [ws.py options]

``run.py --patched pformat,ignore,coalesce`` runs this as a third server
("patched") beside ours and the peer.  Nothing here is imported by the
server itself; each patch is the measured form of a proposal in
benchmarks/RESULTS.md ("Where the time goes").

Status: ``pformat``, ``coalesce`` and ``sniff`` have landed (as
``autogpt_ws/lazylog.py``, ``autogpt_ws/flush.py`` and ``web.FrontDoor``),
so on today's tree those three patches replace the real implementation
with this earlier form: use them only to reproduce the measurements of the
code before.  ``ignore`` landed as ``Router.classic_bytes`` without the
node-event shortcut; the patch here runs first and still measures that
shortcut (see RESULTS.md).

* ``pformat``: Autobahn calls ``pprint.pformat`` eagerly for two debug log
  lines per connection (``_connectionMade``, ``startHandshake``), and
  ``hltype``/``hlval`` (qualified names, ANSI colouring) for debug lines on
  every ``sendData``, handshake and frame, whatever the log level.  Patch:
  lazy versions, formatted only if a debug line is really emitted.
* ``ignore``: drop an execution event whose user has no socket on this
  server from the channel bytes alone (one ``find`` and a set lookup),
  before decoding the channel, parsing it, building keys or scanning the
  payload.  Graph events still go to the catch-up cache: an event is
  skipped only when it certainly is a node event (``event_type`` is the
  envelope's first or last key and says ``node_execution_update``: two
  fixed-size compares) or carries no ``"graph_execution_update"`` at all
  (a scan of the whole payload, the slow case).
* ``coalesce``: ``push`` appends the shared frame to a per-socket list and
  marks the socket dirty; once per reactor turn (``callLater(0)``) each
  dirty socket gets one ``send()`` of everything queued for it, straight on
  the socket when its transport buffer is empty (no ``startWriting``, no
  epoll change, no writable event), the rest (if the kernel took only part)
  through ``transport.write`` as today, so backpressure is unchanged.  Any
  other write on that socket (a reply, a ping, a close) flushes its queue
  first, so order is kept.
"""

from __future__ import annotations

import os
import pprint
import sys
from typing import Any

PATCHES = {p.strip() for p in os.environ.get("BENCH_PATCHES", "").split(",") if p.strip()}


class _LazyFormat:
    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __format__(self, spec: str) -> str:
        return format(pprint.pformat(self.obj), spec)

    def __str__(self) -> str:
        return pprint.pformat(self.obj)

    __repr__ = __str__


class _LazyCall:
    """``f(*args)`` computed only when formatted into an emitted log line."""

    __slots__ = ("f", "args")

    def __init__(self, f: Any, *args: Any) -> None:
        self.f = f
        self.args = args

    def __format__(self, spec: str) -> str:
        return format(self.f(*self.args), spec)

    def __str__(self) -> str:
        return str(self.f(*self.args))

    __repr__ = __str__


def patch_pformat() -> None:
    import autobahn.twisted.websocket as abt
    import autobahn.util as abu
    import autobahn.websocket.protocol as abp

    abp.pformat = _LazyFormat  # type: ignore[assignment]
    for module in (abp, abt):
        module.hltype = lambda obj: _LazyCall(abu.hltype, obj)  # type: ignore[attr-defined]
        module.hlval = lambda *a, **k: _LazyCall(lambda: abu.hlval(*a, **k))  # type: ignore[attr-defined]


def patch_ignore() -> None:
    from autogpt_ws.bus import redis as redis_bus
    from autogpt_ws.router import GRAPH_MARK

    # a node event for sure: event_type is the envelope's first key (as
    # fanout.mjs writes it) or its last (as AutoGPT's pydantic models, and
    # autogpt_ws.publish, write it: the subclass field comes last)
    NODE_HEAD = b'{"payload":{"event_type":"node_execution_update"'
    NODE_TAIL = b'"event_type":"node_execution_update"}}'
    original = redis_bus.RedisBus._message_handler

    class UserSet:
        """A HubWatcher keeping the users with a socket here, as bytes."""

        def __init__(self) -> None:
            self.users: set[bytes] = set()

        def user_added(self, user_id: str) -> None:
            self.users.add(user_id.encode("utf-8"))

        def user_removed(self, user_id: str) -> None:
            self.users.discard(user_id.encode("utf-8"))

        def key_added(self, key: str) -> None:
            pass

        def key_removed(self, key: str) -> None:
            pass

    def _message_handler(self: Any) -> Any:
        slow = original(self)
        router = self.router
        hub = router.hub
        watcher = getattr(hub, "_bench_users", None)
        if watcher is None:
            watcher = hub._bench_users = UserSet()
            for user in hub.users():
                watcher.user_added(user)
            hub.watch(watcher)
        users = watcher.users
        stats = router.stats
        prefix = (router.layout.exec_bus + "/").encode("utf-8")
        start = len(prefix)
        slashes = prefix.count(b"/") + 2
        catchup = router.graph_events is not None

        def on_message(kind: bytes, channel: bytes, data: bytes) -> None:
            # only the exact layout <exec_bus>/<user>/<graph>/<exec> takes
            # the fast path; anything else is the router's to count
            if channel.startswith(prefix) and channel.count(b"/") == slashes:
                end = channel.find(b"/", start)
                if end > start and channel[start:end] not in users and (
                        not catchup or data.startswith(NODE_HEAD) or data.endswith(NODE_TAIL)
                        or GRAPH_MARK not in data):
                    stats.events_received += 1
                    stats.events_ignored += 1
                    return
            slow(kind, channel, data)

        return on_message

    redis_bus.RedisBus._message_handler = _message_handler  # type: ignore[method-assign]


def patch_coalesce() -> None:
    from twisted.internet import reactor

    from autogpt_ws import protocol as proto_mod

    SP = proto_mod.ServerProtocol
    OPEN = proto_mod.STATE_OPEN
    original_push = SP.push
    original_send_data = SP.sendData
    dirty: list[Any] = []
    state = {"scheduled": False}

    def flush_one(p: Any) -> None:
        out = p._bench_out
        p._bench_out = None
        t = p.transport
        if t is None or p.state != OPEN:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        if not t.dataBuffer and not t._tempDataLen and t.connected:
            try:
                sent = t.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # let the transport find the error on its own
            if sent == len(data):
                return
            data = data[sent:]
        t.write(data)

    def flush() -> None:
        state["scheduled"] = False
        batch = dirty[:]
        del dirty[:]
        for p in batch:
            if p._bench_out is not None:
                flush_one(p)

    def push(self: Any, frame: Any) -> None:
        t = self.transport
        if (self._deflate or self._paused or getattr(t, "TLS", True)
                or (self._bench_out is None and (t.dataBuffer or t._tempDataLen))):
            # compressing, TLS, not plain TCP, or a client with output
            # already waiting in the transport: today's path, exactly
            # (bound checks included), after whatever this socket queued
            if self._bench_out is not None:
                flush_one(self)
            original_push(self, frame)
            return
        if self.state != OPEN:
            return
        wire = frame.wire
        out = self._bench_out
        if out is None:
            self._bench_out = [wire]
            self._bench_queued = len(wire)
            dirty.append(self)
            if not state["scheduled"]:
                state["scheduled"] = True
                reactor.callLater(0, flush)
        else:
            out.append(wire)
            self._bench_queued += len(wire)
        if self._bench_queued >= self.transport.bufferSize:
            # a transport buffer's worth: hand it over now, so the transport
            # pauses this producer as it does today
            flush_one(self)

    def sendData(self: Any, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if self._bench_out is not None:
            flush_one(self)
        original_send_data(self, data, sync, chopsize)

    SP._bench_out = None
    SP._bench_queued = 0
    SP.push = push  # type: ignore[method-assign]
    SP.sendData = sendData  # type: ignore[method-assign]


def patch_sniff() -> None:
    """``GET /ws...`` goes straight to the Autobahn factory (which parses
    the request head itself); anything else to twisted.web as today.  Saves
    twisted.web's Request (header objects, content buffer, render, access
    log) and WebSocketResource's re-serialisation of the request."""
    from twisted.internet.protocol import Protocol
    from twisted.internet.tcp import Server as TCPServer

    from autogpt_ws import web

    site_build = web.QuietSite.buildProtocol
    MAX_HEAD_LINE = 8192

    class Sniff(Protocol):
        def __init__(self, site: Any, addr: Any) -> None:
            self.site = site
            self.addr = addr
            self.buf = b""

        deadline: Any = None

        def connectionMade(self) -> None:
            # a client that sends nothing is dropped after the handshake
            # timeout, as HeadDeadlineChannel does today
            timeout = self.site.timeOut
            if timeout:
                self.deadline = self.site.reactor.callLater(timeout, self.transport.abortConnection)

        def dataReceived(self, data: bytes) -> None:
            buf = self.buf + data
            end = buf.find(b"\r\n")
            if end < 0 and len(buf) < MAX_HEAD_LINE:
                self.buf = buf
                return
            if self.deadline is not None and self.deadline.active():
                self.deadline.cancel()
            transport = self.transport
            if buf.startswith((b"GET /ws ", b"GET /ws?")) and isinstance(transport, TCPServer):
                ws_factory = self.site.resource._websocket._factory
                proto = ws_factory.buildProtocol(self.addr)
            else:
                proto = site_build(self.site, self.addr)
            transport.protocol = proto
            proto.makeConnection(transport)
            proto.dataReceived(buf)

        def connectionLost(self, reason: Any = None) -> None:
            if self.deadline is not None and self.deadline.active():
                self.deadline.cancel()

    def buildProtocol(self: Any, addr: Any) -> Any:
        return Sniff(self, addr)

    web.QuietSite.buildProtocol = buildProtocol  # type: ignore[method-assign]


def main() -> int:
    for name in sorted(PATCHES):
        {"pformat": patch_pformat, "ignore": patch_ignore, "coalesce": patch_coalesce,
         "sniff": patch_sniff}[name]()
    from autogpt_ws.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
