"""Keyed history (issue 15, 3x target): a pushed frame compressed with the
previous frame of its subscription key as preset dictionary, for the
sockets whose client's inflater window ends with that frame; every other
socket, and every other case, gets the frame compressed on its own.

What is checked: browser-like clients (one inflater kept for the socket's
life; Autobahn's client with context takeover) read thousands of frames
exactly as a plain socket does, with frames of two keys interleaved,
notifications, replies, catch-up replays after re-subscribes, frames under
the threshold, huge frames, sockets joining a key late, both browser
offers, a 9-bit window and a client that asks server_no_context_takeover;
primed frames decode with a plain raw inflater whose window holds the
history; the hub's history is bounded per key and dropped for removed and
idle keys; a socket keeps no zlib object."""

from __future__ import annotations

import json
import os
import random
import zlib
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from autogpt_ws.core import wire
from autogpt_ws.core.hub import HISTORY_IDLE, HISTORY_SWEEP, Hub
from autogpt_ws.producing import publish
from autogpt_ws.running.service import WebsocketServer
from autogpt_ws.sockets.deflate import Deflater
from autogpt_ws.stats import Stats
from tests.helpers import (RawClient, U, connect, extensions_answer, make_settings, raw_connect, server_side, sleep,
                           start_server, wait_for)
from tests.test_deflate import CHROMIUM, FIREFOX, PING, PONG, alone, event_of, payload_of, subscribe
from tests.test_slow_consumer import small_kernel_buffer

KEYED = "permessage-deflate; client_no_context_takeover"
STANDALONE_OFFER = f"{FIREFOX}; server_no_context_takeover"
H = 8192  # deflate_history's default


class Model:
    """A compressing socket as the hub sees it, writing what the server's
    socket writes (:meth:`Deflater.wire` with its window, a reply resetting
    it), read by a browser's inflater kept for the socket's life."""

    def __init__(self, deflater: Deflater, user_id: str = U) -> None:
        self.user_id = user_id
        self.keys: set[str] = set()
        self.deflater = deflater
        self.window: wire.Link | None = None
        self.inflater = zlib.decompressobj(-deflater.window_bits)
        self.messages: list[bytes] = []
        self.compressed: list[bool] = []
        self.alone: list[bool] = []  # compressed and readable on its own

    def push(self, frame: wire.OutFrame) -> None:
        data, self.window = self.deflater.wire(frame, self.window)
        self.receive(data)

    def reply(self, payload: bytes) -> None:
        self.window = None  # what Outbound.sendData does for a data frame
        self.receive(wire.ws_text_frame(payload))

    def receive(self, data: bytes) -> None:
        payload = payload_of(data)
        compressed = bool(data[0] & 0x40)
        self.compressed.append(compressed)
        if compressed:
            self.alone.append(alone(payload, self.deflater.window_bits) is not None)
            payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
        self.messages.append(payload)


def texts(rng: random.Random, count: int) -> list[str]:
    words = ["agent", "graph", "node", "output", "résumé", "数据", "🚀", "prompt", "token", "value"]
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.1:
            out.append("")  # under the threshold
        elif kind < 0.2:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(4000, 12000))))  # over the history
        elif kind < 0.3:
            out.append("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(100, 3000))))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(50, 1500))))
    return out


class Priming(TestCase):
    """Deflater and hub, with real ISA-L output read by real zlib inflaters."""

    def test_primed_frames_decode_with_the_window_a_browser_holds(self) -> None:
        """Two keys interleaved on a socket, replies between, any window
        size, a history smaller or larger than the window: every message
        reads right with one inflater, and the frames that follow the
        previous frame of their key are primed."""
        rng = random.Random(5)
        for bits in (9, 10, 12, 15):
            for history in (512, H, 32768):
                stats = Stats()
                hub = Hub(keyed_history=True)
                deflater = Deflater(bits, 1, 512, stats, history)
                sink = Model(deflater)
                hub.attach(sink)
                for key in ("k1", "k2"):
                    hub.subscribe(sink, key)
                expected = []
                for number, text in enumerate(texts(rng, 300)):
                    payload = json.dumps({"n": number, "out": text}, ensure_ascii=False).encode()
                    if rng.random() < 0.05:
                        sink.reply(payload)
                    else:
                        key = "k1" if rng.random() < 0.7 else "k2"
                        hub.publish(key, wire.OutFrame(payload))
                    expected.append(payload)
                self.assertEqual(sink.messages, expected, (bits, history))
                self.assertGreater(stats.deflate_primed, 50, (bits, history))
                self.assertGreater(sink.alone.count(False), 50, (bits, history))  # primed: not readable alone

    def test_only_the_previous_frame_of_the_same_key(self) -> None:
        """A frame is primed only for a socket whose last frame was the
        previous frame of the key, sent compressed; a frame of another key,
        a reply, a notification or a catch-up frame, a frame under the
        threshold or one that does not shrink, in between: on its own."""
        stats = Stats()
        hub = Hub(keyed_history=True)
        sink = Model(Deflater(15, 1, 512, stats, H))
        hub.attach(sink)
        hub.subscribe(sink, "k1")
        hub.subscribe(sink, "k2")
        big = b'{"text":"' + b"agent graph node output " * 100 + b'"}'

        def publish(key: str, payload: bytes = big) -> bool:
            """Whether the frame went primed (compressed, not readable alone)."""
            hub.publish(key, wire.OutFrame(payload))
            return sink.compressed[-1] and not sink.alone[-1]

        self.assertFalse(publish("k1"))  # the first of its key
        self.assertTrue(publish("k1"))
        self.assertTrue(publish("k1"))
        self.assertFalse(publish("k2"))  # the first of k2; the window now ends with it
        self.assertFalse(publish("k1"))  # k1's previous frame is not what the window ends with
        self.assertTrue(publish("k1"))
        sink.reply(PONG)
        self.assertFalse(publish("k1"))
        hub.notify(U, wire.OutFrame(big))  # outside any key's stream
        self.assertFalse(publish("k1"))
        sink.push(wire.OutFrame(big))  # a catch-up frame
        self.assertFalse(publish("k1"))
        self.assertTrue(publish("k1"))
        publish("k1", b'{"small":1}')  # under the threshold: plain, the window resets
        self.assertFalse(sink.compressed[-1])
        self.assertFalse(publish("k1"))
        random_bytes = os.urandom(3000)  # cannot shrink: plain
        publish("k1", random_bytes)
        self.assertFalse(sink.compressed[-1])
        self.assertIsNone(hub.history("k1"))  # nobody can refer back to it
        self.assertFalse(publish("k1"))
        self.assertTrue(publish("k1"))
        self.assertEqual(sink.messages[-1], big)

    def test_no_context_takeover_set_never_primes(self) -> None:
        stats = Stats()
        hub = Hub(keyed_history=True)
        sink = Model(Deflater(15, 1, 0, stats, history=0))
        hub.attach(sink)
        hub.subscribe(sink, "k1")
        for _ in range(5):
            hub.publish("k1", wire.OutFrame(b"agent graph node output " * 100))
        self.assertEqual(sink.alone, [True] * 5)
        self.assertEqual(stats.deflate_primed, 0)
        self.assertIsNone(hub.history("k1"))

    def test_one_compression_per_window_size_and_form(self) -> None:
        """Sockets in step share the primed form; a socket out of step (it
        was sent a reply) gets the form on its own, made once for all such."""
        stats = Stats()
        hub = Hub(keyed_history=True)
        deflater = Deflater(15, 1, 0, stats, H)
        sinks = [Model(deflater) for _ in range(6)]
        for sink in sinks:
            hub.attach(sink)
            hub.subscribe(sink, "k1")
        hub.publish("k1", wire.OutFrame(b"agent graph node output " * 100))
        self.assertEqual(stats.deflate_frames, 1)
        for sink in sinks[:3]:
            sink.reply(PONG)
        hub.publish("k1", wire.OutFrame(b"agent graph node output " * 101))
        self.assertEqual((stats.deflate_frames, stats.deflate_primed), (3, 1))
        self.assertEqual([s.alone[-1] for s in sinks], [True] * 3 + [False] * 3)
        self.assertEqual(len({s.messages[-1] for s in sinks}), 1)


class History(TestCase):
    """What the hub holds: the end of each key's last compressed frame, at
    most ``deflate_history`` bytes, while the key has subscribers and has
    had a frame within HISTORY_IDLE seconds."""

    def setUp(self) -> None:
        self.hub = Hub(keyed_history=True)
        self.sink = Model(Deflater(15, 1, 0, Stats(), 1000))
        self.hub.attach(self.sink)

    def test_bounded_per_key(self) -> None:
        self.hub.subscribe(self.sink, "k1")
        self.hub.subscribe(self.sink, "k2")
        small = b"agent graph " * 50
        huge = b"agent graph node output " * 5000
        self.hub.publish("k1", wire.OutFrame(small))
        self.hub.publish("k2", wire.OutFrame(huge))
        self.assertIs(self.hub.history("k1"), small)  # shared with the frame, not copied
        self.assertEqual(self.hub.history("k2"), huge[-1000:])
        self.assertEqual(self.hub.history_bytes(), len(small) + 1000)

    def test_dropped_when_the_key_goes(self) -> None:
        self.hub.subscribe(self.sink, "k1")
        self.hub.publish("k1", wire.OutFrame(b"agent graph " * 50))
        window = self.sink.window
        self.assertIsNotNone(window.history)  # type: ignore[union-attr]
        self.hub.unsubscribe(self.sink, "k1")
        self.assertIsNone(self.hub.history("k1"))
        self.assertIsNone(window.history)  # type: ignore[union-attr]  # freed though a socket names it
        self.assertEqual(self.hub.history_bytes(), 0)

    def test_dropped_when_the_key_is_idle(self) -> None:
        self.hub.subscribe(self.sink, "k1")
        self.hub.subscribe(self.sink, "k2")
        self.hub.publish("k1", wire.OutFrame(b"agent graph " * 50))
        for _ in range(int(HISTORY_IDLE // HISTORY_SWEEP)):  # HISTORY_IDLE seconds of sweeps: kept
            self.hub.sweep()
            self.hub.publish("k2", wire.OutFrame(b"node output " * 50))
        self.assertIsNotNone(self.hub.history("k1"))
        self.hub.sweep()  # one more: gone
        self.hub.publish("k2", wire.OutFrame(b"node output " * 50))
        self.assertIsNone(self.hub.history("k1"))
        self.assertIsNotNone(self.hub.history("k2"))

    def test_the_server_sweeps_on_its_clock(self) -> None:
        """The service sweeps every HISTORY_SWEEP seconds of its reactor's
        clock: a key's history lasts HISTORY_IDLE seconds after its last
        frame, and is gone one sweep later at most."""
        clock = MemoryReactorClock()
        server = WebsocketServer(make_settings(), reactor=clock)
        server.privilegedStartService()
        server.startService()
        self.addCleanup(server.stopService)
        hub = server.hub
        sink = Model(Deflater(15, 1, 0, Stats(), H))
        hub.attach(sink)
        hub.subscribe(sink, "k1")
        clock.pump([1.0] * int(HISTORY_SWEEP / 2))
        hub.publish("k1", wire.OutFrame(b"agent graph " * 50))
        clock.pump([1.0] * int(HISTORY_IDLE - 1))
        self.assertIsNotNone(hub.history("k1"))
        clock.pump([1.0] * int(HISTORY_SWEEP + 1))
        self.assertIsNone(hub.history("k1"))

    def test_off(self) -> None:
        hub = Hub()
        sink = Model(Deflater(15, 1, 0, Stats(), H))
        hub.attach(sink)
        hub.subscribe(sink, "k1")
        for _ in range(3):
            hub.publish("k1", wire.OutFrame(b"agent graph " * 50))
        self.assertEqual(sink.alone, [True] * 3)
        self.assertIsNone(hub.history("k1"))


class Negotiation(TestCase):
    @inlineCallbacks
    def test_the_client_keeps_its_window_unless_it_asks_not_to(self) -> None:
        server = start_server(self)
        answers = {CHROMIUM: KEYED, FIREFOX: KEYED,
                   f"{FIREFOX}; server_max_window_bits=9": f"{KEYED}; server_max_window_bits=9",
                   STANDALONE_OFFER: f"{FIREFOX}; server_no_context_takeover; client_no_context_takeover"}
        for offer, answer in answers.items():
            client = yield raw_connect(server.port, deflate=offer, test=self)
            self.assertEqual(extensions_answer(client.head), answer, offer)
            keyed = server_side(server, client)._deflater.history
            self.assertEqual(keyed, 0 if offer == STANDALONE_OFFER else H, offer)

    @inlineCallbacks
    def test_history_off_answers_server_no_context_takeover(self) -> None:
        """deflate_history 0: every frame on its own, and the answer says so."""
        server = start_server(self, deflate_history=0)
        client = yield raw_connect(server.port, deflate=CHROMIUM, test=self)
        self.assertEqual(extensions_answer(client.head),
                         "permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        client.send_compressed(subscribe("e1"))
        yield wait_for(lambda: len(client.messages) == 1)
        for number in range(3):
            event = event_of("e1", f"compressible {number} " * 500)
            yield server.bus.publish(server.layout.classic_exec(U, "g1", "e1"), publish.envelope(event))
        yield wait_for(lambda: len(client.messages) == 4)
        self.assertEqual(client.compressed, [False, True, True, True])
        self.assertTrue(all(alone(payload_of(f)) is not None for f in client.wire[1:]))
        self.assertEqual((server.stats.deflate_primed, server.hub.history_bytes()), (0, 0))


class BrowserLike(TestCase):
    """Thousands of frames to every kind of client, each compared with
    what a plain socket receives."""

    timeout = 300
    OFFERS = {"plain": None, "chromium": CHROMIUM, "firefox": FIREFOX,
              "window 9": f"{FIREFOX}; server_max_window_bits=9", "no takeover": STANDALONE_OFFER}

    @inlineCallbacks
    def group(self, port: int, keys: list[str]) -> Any:
        """One client of each kind (and Autobahn's, offering deflate),
        subscribed to ``keys`` (exec ids, or graph:<id>)."""
        clients: dict[str, Any] = {}
        for name, offer in self.OFFERS.items():
            clients[name] = yield raw_connect(port, deflate=offer or False, test=self)
        clients["autobahn"] = yield connect(port, compress=True, test=self)
        self.assertIsNotNone(clients["autobahn"]._perMessageCompress)
        for key in keys:
            yield self.act(clients, self.subscribe_frame(key))
        return clients

    @staticmethod
    def subscribe_frame(key: str) -> str:
        if key.startswith("graph:"):
            return json.dumps({"method": "subscribe_graph_executions", "data": {"graph_id": key[6:]}})
        return subscribe(key)

    @inlineCallbacks
    def act(self, clients: dict[str, Any], *frames: str) -> Any:
        """Every client sends ``frames`` (compressed, if it compresses) and
        a heartbeat; returns once each has the pong (everything before it)."""
        before = {name: len(c.messages) for name, c in clients.items()}
        for client in clients.values():
            for frame in frames + (PING,):
                if isinstance(client, RawClient) and client.inflater is not None:
                    client.send_compressed(frame)
                else:
                    client.send(frame)
        yield wait_for(lambda: all(len(c.messages) > before[n] and c.messages[-1] == PONG
                                   for n, c in clients.items()), timeout=60)

    @inlineCallbacks
    def test_thousands_of_frames_read_as_a_plain_socket_reads_them(self) -> Any:
        server = start_server(self, rate_limit=0, max_send_buffer="64MiB")
        port, layout = server.port, server.layout
        early = yield self.group(port, ["e1", "graph:g1"])  # graph events of e1 come on both keys
        late: dict[str, Any] = {}
        rng = random.Random(11)
        prompt = " ".join(rng.choice(["agent", "graph", "summary", "the", "of", "数据"]) for _ in range(400))
        for number, text in enumerate(texts(rng, 2000)):
            kind = rng.random()
            if kind < 0.55:
                event = event_of("e1", text)
                if text:  # else a frame under the threshold
                    event["input_data"] = {"prompt": prompt}  # what a node's events repeat
                channel = layout.classic_exec(U, "g1", "e1")
            elif kind < 0.75:
                event = publish.graph_event(U, "g1", "e1", "RUNNING", outputs={"out": [text[:3000]]})
                channel = layout.classic_exec(U, "g1", "e1")
            elif kind < 0.9:
                event = publish.graph_event(U, "g1", "e2", "RUNNING", inputs={"prompt": prompt})  # the graph key only
                channel = layout.classic_exec(U, "g1", "e2")
            else:
                event = publish.notification(U, "agent_run", text[:2000])
                channel = layout.notification(U)
            yield server.bus.publish(channel, publish.envelope(event))
            if number == 600:  # sockets joining e1 late
                late = yield self.group(port, ["e1"])
            if number % 97 == 96:
                yield self.act(early)
            if number % 251 == 250:  # re-subscribe: the reply, then the catch-up replay of e1's graph event
                yield self.act(early, json.dumps({"method": "unsubscribe", "data": {"graph_exec_id": "e1"}}),
                               subscribe("e1"))
            if late and number % 313 == 312:
                yield self.act(late, subscribe("e1"))
        yield self.act(early)
        yield self.act(late)
        stats = server.stats
        # the share of compressed messages that read on their own: all of
        # them without context takeover; with it, the others are primed (on
        # two interleaved keys, a frame following a frame of the other key
        # goes on its own, as do those after replies and notifications)
        for clients, most_alone in ((early, 0.75), (late, 0.35)):
            plain = clients["plain"].messages
            self.assertGreater(len(plain), 900)
            for name, client in clients.items():
                self.assertEqual(client.messages, plain, name)
            for name in ("chromium", "firefox", "window 9", "no takeover"):
                client = clients[name]
                bits = 9 if name == "window 9" else 15
                compressed = [payload_of(f) for f, c in zip(client.wire, client.compressed) if c]
                self.assertGreater(len(compressed), len(plain) / 2, name)
                small = [m for m, c in zip(plain, client.compressed) if not c and b'"success":null' in m]
                self.assertGreater(len(small), 20, name)  # pushed frames under the threshold, between the others
                read_alone = sum(alone(p, bits) is not None for p in compressed) / len(compressed)
                if name == "no takeover":
                    self.assertEqual(read_alone, 1.0)
                else:
                    self.assertLess(read_alone, most_alone, name)
        self.assertGreater(stats.deflate_primed, 500)
        self.assertGreater(server.hub.history_bytes(), 0)


class SlowConsumer(TestCase):
    @inlineCallbacks
    def test_a_compressing_client_closed_1013_reads_right_up_to_the_close(self) -> Any:
        """The frames dropped for a client that stopped reading never leave
        it a frame its window cannot read: what it gets before the close
        frame inflates to what a plain client got, and nothing follows."""
        server = start_server(self, max_send_buffer="64KiB", rate_limit=0)
        plain = yield raw_connect(server.port, test=self)
        slow: RawClient = yield raw_connect(server.port, deflate=CHROMIUM, rcvbuf=4096, test=self)
        for client in (plain, slow):
            client.send(subscribe("e1"))
        yield wait_for(lambda: len(plain.messages) == 1 and len(slow.messages) == 1)
        small_kernel_buffer(server_side(server, slow))
        rng = random.Random(3)
        words = ["agent", "graph", "node", "output", "prompt", "数据"]
        channel = server.layout.classic_exec(U, "g1", "e1")
        # twenty read while it still reads (primed frames among them, how
        # many it gets once it stops reading depends on the kernel's buffers)
        for _ in range(20):
            yield server.bus.publish(channel, publish.envelope(event_of("e1", " ".join(
                rng.choice(words) for _ in range(rng.randint(100, 2000))))))
        yield wait_for(lambda: len(slow.messages) == 21 and len(plain.messages) == 21)
        slow.transport.pauseProducing()  # stops reading
        published = 20
        while not server.stats.slow_consumer_closes:
            self.assertLess(published, 50_000, "the slow consumer was never closed")
            event = event_of("e1", " ".join(rng.choice(words) for _ in range(rng.randint(100, 2000))))
            yield server.bus.publish(channel, publish.envelope(event))
            published += 1
            if published % 20 == 0:
                yield sleep(0.001)  # the server writes what it can
        slow.transport.resumeProducing()
        yield wait_for(lambda: slow.close_code is not None, timeout=30)
        yield wait_for(lambda: len(plain.messages) == published + 1, timeout=30)
        self.assertEqual(slow.close_code, 1013)
        self.assertGreater(len(slow.messages), 10)
        self.assertEqual(slow.messages, plain.messages[:len(slow.messages)])
        primed = [alone(payload_of(f)) is None for f, c in zip(slow.wire, slow.compressed) if c]
        self.assertGreater(sum(primed), 5)
