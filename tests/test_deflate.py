"""permessage-deflate (issue 15, item 1): negotiated with no context
takeover from the client (the server's own frames: tests/test_deflate_keyed.py),
each pushed frame compressed once per parameter set and form and shared,
small frames and replies sent plain, no zlib object kept per socket, and
every frame read right by browser-like clients."""

from __future__ import annotations

import json
import os
import random
import zlib
from typing import Any

from isal import isal_zlib
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.core import wire
from autogpt_ws.producing import publish
from autogpt_ws.sockets.deflate import Deflater, Inflate
from autogpt_ws.stats import Stats
from tests.helpers import (RawClient, U, connect, extensions_answer, free_port, http_fetch, raw_connect, redis_server,
                           server_side, sleep, start_server, wait_for)
from tests.test_metrics import Scrape
from tests.test_runners import Process, clean_env, http_get, ws_py

PING = '{"method":"heartbeat","data":"ping","success":true}'
PONG = b'{"method":"heartbeat","data":"pong","success":true}'
CHROMIUM = "permessage-deflate; client_max_window_bits"
FIREFOX = "permessage-deflate"  # Safari (NSURLSession) sends the same
ANSWER = "permessage-deflate; client_no_context_takeover"  # the client keeps its window: keyed history
ZLIB_OBJECTS = (type(zlib.compressobj()), type(zlib.decompressobj()), type(isal_zlib.compressobj()))


def payload_of(frame: bytes) -> bytes:
    """The payload of one unmasked server frame."""
    size = frame[1] & 0x7F
    return frame[2 + (2 if size == 126 else 8 if size == 127 else 0):]


def alone(payload: bytes, bits: int = 15) -> bytes | None:
    """A compressed message inflated on its own (a fresh window), or None
    when it does not inflate so: it refers back to an earlier message."""
    try:
        return zlib.decompressobj(-bits).decompress(payload + b"\x00\x00\xff\xff")
    except zlib.error:
        return None


def subscribe(exec_id: str) -> str:
    return json.dumps({"method": "subscribe_graph_execution", "data": {"graph_exec_id": exec_id}})


def extensions(client: RawClient) -> str | None:
    return extensions_answer(client.head)


def event_of(exec_id: str, output: str) -> dict[str, Any]:
    return publish.node_event(U, "g1", exec_id, "ne1", "RUNNING", output_data={"out": [output]})


def pushed(exec_id: str, event: dict[str, Any]) -> bytes:
    """The frame a subscriber of ``exec_id`` receives for ``event``."""
    return wire.push(wire.NODE_EVENT, wire.exec_key(U, exec_id), publish.envelope(event)[len(b'{"payload":'):-1])


def outputs(count: int, seed: int = 1) -> list[str]:
    """Texts of every kind: tiny, around the threshold, non-ASCII, large
    (over 64 KiB: the long length form), repetitive and noisy."""
    rng = random.Random(seed)
    words = ["node", "graph", "agent", "résumé", "数据", "🚀", "output", "token", "naïve", "Ωmega"]
    fixed = ["", "x", "y" * 300, "é" * 200, "z" * 460, "🚀" * 30, "a" * 70_000, os.urandom(40_000).hex()]
    texts = fixed[:]
    while len(texts) < count:
        kind = rng.random()
        if kind < 0.5:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 120))))
        elif kind < 0.8:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(100, 3000))))
        elif kind < 0.95:
            texts.append("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(10, 2000))))
        else:
            texts.append(os.urandom(rng.randint(100, 20_000)).hex())
    return texts


class Negotiation(TestCase):
    @inlineCallbacks
    def test_browser_offers_get_no_context_takeover_from_the_client(self) -> Any:
        server = start_server(self)
        for offer in (CHROMIUM, FIREFOX, "permessage-deflate; client_no_context_takeover; client_max_window_bits",
                      "permessage-deflate; server_no_context_takeover"):
            client = yield raw_connect(server.port, deflate=offer, test=self)
            # a client that asks the server not to keep its context is answered so
            answer = ANSWER.replace("; client", "; server_no_context_takeover; client") if "server_" in offer else ANSWER
            self.assertEqual(extensions(client), answer, offer)
            self.assertIsInstance(server_side(server, client)._perMessageCompress, Inflate)

    @inlineCallbacks
    def test_server_max_window_bits_is_honoured(self) -> Any:
        server = start_server(self)
        for bits in (9, 12, 15):
            client = yield raw_connect(server.port, deflate=f"{FIREFOX}; server_max_window_bits={bits}", test=self)
            self.assertEqual(extensions(client), f"{ANSWER}; server_max_window_bits={bits}")
            self.assertEqual(server_side(server, client)._deflater.window_bits, bits)

    @inlineCallbacks
    def test_offers_not_honoured_fall_back_to_no_compression(self) -> Any:
        """Declined, not refused: Autobahn answered these 400."""
        server = start_server(self)
        for offer in ("permessage-deflate; server_max_window_bits=8", "permessage-deflate; unknown_parameter",
                      "permessage-deflate; client_no_context_takeover=1", "permessage-deflate; client_max_window_bits=16",
                      "permessage-deflate; server_max_window_bits=10; server_max_window_bits=11",
                      "permessage-bzip2; bad=1", "x-webkit-deflate-frame"):
            client = yield raw_connect(server.port, deflate=offer, test=self)
            self.assertIsNone(extensions(client), offer)
            self.assertIsNone(server_side(server, client)._perMessageCompress, offer)
            self.assertEqual((yield client.request(PING)), PONG)
        # the next offer is taken when the first is declined
        client = yield raw_connect(server.port, deflate="permessage-deflate; server_max_window_bits=8, permessage-deflate",
                                   test=self)
        self.assertEqual(extensions(client), ANSWER)

    @inlineCallbacks
    def test_off(self) -> Any:
        server = start_server(self, permessage_deflate=False)
        client = yield raw_connect(server.port, deflate=CHROMIUM, test=self)
        self.assertIsNone(extensions(client))


class BrowserLike(TestCase):
    """Clients that inflate as browsers do, with one inflater for the
    socket's life, read every frame right."""

    timeout = 240

    @inlineCallbacks
    def test_thousands_of_frames_of_every_size(self) -> Any:
        server = start_server(self, rate_limit=0, max_send_buffer="64MiB")
        offers = [None, CHROMIUM, FIREFOX, f"{FIREFOX}; server_max_window_bits=9"]
        raw = []
        for offer in offers:
            client = yield raw_connect(server.port, deflate=offer or False, test=self)
            (client.send_compressed if offer else client.send)(subscribe("e1"))  # browsers compress what they send
            raw.append(client)
        autobahn = yield connect(server.port, compress=True, test=self)  # Autobahn's client, deflate offered
        autobahn.send(subscribe("e1"))
        clients: list[Any] = raw + [autobahn]
        yield wait_for(lambda: all(len(c.messages) == 1 for c in clients))
        self.assertIsNotNone(autobahn._perMessageCompress)
        expected = [clients[0].messages[0]]
        channel = server.layout.classic_exec(U, "g1", "e1")
        for number, text in enumerate(outputs(2000)):
            event = event_of("e1", text)
            expected.append(pushed("e1", event))
            yield server.bus.publish(channel, publish.envelope(event))
            if number % 100 == 99:  # a heartbeat now and then, compressed by those that compress
                for client in raw:
                    (client.send_compressed if client.inflater else client.send)(PING)
                autobahn.send(PING)
                expected.append(PONG)
                yield wait_for(lambda: all(len(c.messages) == len(expected) for c in clients), timeout=60)
        yield wait_for(lambda: all(len(c.messages) == len(expected) for c in clients), timeout=60)
        for offer, client in zip(offers + ["autobahn"], clients):
            self.assertEqual(client.messages, expected, offer)
        threshold = server.settings.deflate_threshold
        for offer, client in zip(offers, raw):
            for message, compressed in zip(expected, client.compressed):
                # pushed frames from the threshold on go compressed (unless that saves nothing); replies never
                if offer is None or message == PONG or len(message) < threshold:
                    self.assertFalse(compressed, (offer, message[:80]))
            if offer:
                self.assertGreater(sum(client.compressed), 1900, offer)
        self.assertEqual(server.stats.deflate_frames, 2 * sum(len(m) >= threshold for m in expected[1:] if m != PONG))

    @inlineCallbacks
    def test_a_client_keeping_its_context_is_closed_1007(self) -> Any:
        """A client that ignores client_no_context_takeover: its second
        message refers back to its first, does not inflate, and its socket
        is closed 1007 (invalid payload); the server goes on."""
        server = start_server(self, rate_limit=0)
        client = yield raw_connect(server.port, deflate=CHROMIUM, test=self)
        other = yield raw_connect(server.port, deflate=CHROMIUM, test=self)
        context = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        client.send_compressed(PING, context)
        self.assertEqual((yield client.message(0)), PONG)
        client.send_compressed(PING, context)  # all of it a reference to the first
        yield client.lost
        self.assertEqual(client.close_code, 1007)
        self.assertIn("cannot be decompressed", client.close_reason or "")
        self.assertEqual(client.messages, [PONG])
        yield wait_for(lambda: server.stats.sockets_closed["1007"] == 1)
        other.send_compressed(PING)
        self.assertEqual((yield other.message(0)), PONG)


class OncePerParameterSet(TestCase):
    @inlineCallbacks
    def test_sockets_of_one_window_share_one_compressed_frame(self) -> Any:
        server = start_server(self, enable_metrics=True)
        sets = {15: [CHROMIUM, FIREFOX, CHROMIUM], 10: [f"{FIREFOX}; server_max_window_bits=10"] * 3, 0: [None] * 2}
        clients: dict[int, list[RawClient]] = {}
        for bits, offers in sets.items():
            clients[bits] = []
            for offer in offers:
                client = yield raw_connect(server.port, deflate=offer or False, test=self)
                client.send(subscribe("e1"))
                clients[bits].append(client)
        everyone = [c for group in clients.values() for c in group]
        yield wait_for(lambda: all(len(c.messages) == 1 for c in everyone))
        texts = [" ".join(["compressible"] * 400), "é" * 5000]
        for number, text in enumerate(texts, 1):
            event = event_of("e1", text)
            yield server.bus.publish(server.layout.classic_exec(U, "g1", "e1"), publish.envelope(event))
            yield wait_for(lambda: all(len(c.messages) == 1 + number for c in everyone))
            for client in everyone:
                self.assertEqual(client.messages[number], pushed("e1", event))
            for bits, group in clients.items():
                frames = {c.wire[number] for c in group}
                self.assertEqual(len(frames), 1, bits)  # the same bytes for the whole set
                self.assertEqual([c.compressed[number] for c in group], [bits != 0] * len(group))
            # one compression per parameter set, whatever the number of sockets
            self.assertEqual(server.stats.deflate_frames, 2 * number)
        self.assertNotEqual(clients[15][0].wire[1], clients[10][0].wire[1])
        sent = sum(len(pushed("e1", event_of("e1", t))) for t in texts)
        status, _, body = yield http_fetch(server.port, "/metrics")
        scrape = Scrape(body.decode())
        self.assertEqual(scrape("autogpt_ws_deflate_frames_total"), 4)
        self.assertEqual(scrape("autogpt_ws_deflate_bytes_in_total"), 2 * sent)
        out = scrape("autogpt_ws_deflate_bytes_out_total")
        self.assertEqual(out, sum(len(payload_of(c.wire[n])) for c in (clients[15][0], clients[10][0]) for n in (1, 2)))
        self.assertLess(out, sent / 2)

    def test_a_frame_compressing_cannot_shrink_goes_plain(self) -> None:
        stats = Stats()
        deflater = Deflater(15, 1, 0, stats)
        frame = wire.OutFrame(os.urandom(3000))
        self.assertEqual(deflater.wire(frame), (frame.wire, None))
        self.assertEqual(deflater.wire(frame), (frame.wire, None))
        self.assertEqual((stats.deflate_frames, stats.deflate_bytes_in, stats.deflate_bytes_out), (1, 3000, 3000))


class Threshold(TestCase):
    @inlineCallbacks
    def check(self, threshold: int, sizes: list[int]) -> Any:
        server = start_server(self, deflate_threshold=threshold, rate_limit=0)
        client = yield raw_connect(server.port, deflate=CHROMIUM, test=self)
        client.send_compressed(subscribe("e1"))
        client.send_compressed(PING)
        client.send('{"method":"subscribe_graph_execution","data":{}}')
        yield wait_for(lambda: len(client.messages) == 3)
        expected = []
        for size in sizes:
            base = len(pushed("e1", event_of("e1", "")))
            event = event_of("e1", "x" * (size - base))
            expected.append(pushed("e1", event))
            self.assertEqual(len(expected[-1]), size)
            yield server.bus.publish(server.layout.classic_exec(U, "g1", "e1"), publish.envelope(event))
        yield wait_for(lambda: len(client.messages) == 3 + len(sizes))
        self.assertEqual(client.messages[3:], expected)
        return client.compressed

    @inlineCallbacks
    def test_frames_under_the_threshold_go_plain(self) -> Any:
        compressed = yield self.check(600, [599, 600, 4000])
        # the subscribe reply, the pong and the error reply: plain; then the pushed frames
        self.assertEqual(compressed, [False, False, False, False, True, True])

    @inlineCallbacks
    def test_replies_go_plain_whatever_the_threshold(self) -> Any:
        compressed = yield self.check(0, [600, 4000])
        self.assertEqual(compressed, [False, False, False, True, True])


class NothingKeptPerSocket(TestCase):
    @inlineCallbacks
    def test_no_zlib_object_between_messages(self) -> Any:
        """A compressing socket keeps no zlib object, only which pushed
        frame its client's inflater window ends with (the frame's link,
        which keyed history primes the next frame of that key with)."""
        server = start_server(self, rate_limit=0)
        client = yield raw_connect(server.port, deflate=CHROMIUM, test=self)
        proto = server_side(server, client)
        client.send_compressed(subscribe("e1"))
        for _ in range(3):
            client.send_compressed(PING)
        yield wait_for(lambda: len(client.messages) == 4)
        for number in range(3):
            event = event_of("e1", f"compressible {number} " * 500)
            yield server.bus.publish(server.layout.classic_exec(U, "g1", "e1"), publish.envelope(event))
        yield wait_for(lambda: len(client.messages) == 7)
        self.assertEqual(client.compressed, [False] * 4 + [True] * 3)
        # the first on its own, the next two primed with the one before
        self.assertEqual([alone(payload_of(f)) is not None for f in client.wire[4:]], [True, False, False])
        pmce = proto._perMessageCompress
        self.assertIsInstance(pmce, Inflate)
        self.assertIsNone(pmce._decompressor)
        self.assertIsNone(pmce._compressor)
        link = proto._window
        self.assertIsInstance(link, wire.Link)
        self.assertEqual(link.history, client.messages[-1])
        for holder in (proto, pmce):
            for name, value in vars(holder).items():
                self.assertFalse(isinstance(value, ZLIB_OBJECTS), name)
        self.assertNotIn("websocket_extensions_in_use", vars(proto))  # it held Autobahn's own object
        client.send_compressed(PING)
        yield wait_for(lambda: len(client.messages) == 8)
        self.assertIsNone(proto._window)  # a reply: the window no longer ends with a pushed frame


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class MemoryPerSocket(TestCase):
    """In a server process: an idle subscribed socket that compresses,
    after twenty ~10 KB events, costs at most 1.5x a plain one."""

    timeout = 180
    SOCKETS = 300

    @inlineCallbacks
    def open(self, port: int, count: int, offer: str | None, exec_id: str) -> Any:
        clients = []
        for _ in range(count):
            client = yield raw_connect(port, deflate=offer or False, keep_messages=False, test=self)
            (client.send_compressed if offer else client.send)(subscribe(exec_id))
            clients.append(client)
        yield wait_for(lambda: all(c.message_count == 1 for c in clients), timeout=60)
        return clients

    @inlineCallbacks
    def cost(self, server: Any, redis: Any, port: int, count: int, offer: str | None, exec_id: str) -> Any:
        """RSS growth per socket for ``count`` more sockets, each subscribed
        and sent twenty events."""
        before = rss(server.popen.pid)
        clients = yield self.open(port, count, offer, exec_id)
        rng = random.Random(2)
        words = ["agent", "graph", "node", "output", "the", "of", "a", "result", "token", "value", "é"]
        for number in range(20):
            text = " ".join(rng.choice(words) for _ in range(1700))  # ~10 KB
            event = event_of(exec_id, text)
            redis.command("PUBLISH", f"execution_event/{U}/g1/{exec_id}", publish.envelope(event))
            yield wait_for(lambda: all(c.message_count == 2 + number for c in clients), timeout=60)
        yield sleep(0.5)  # the server done writing
        return (rss(server.popen.pid) - before) / count

    @inlineCallbacks
    def per_socket(self, offer: str | None) -> Any:
        """In a fresh server: what ``SOCKETS`` more sockets cost, after a
        few of the same kind went through the same (its one-off costs)."""
        redis = redis_server(self)
        port = free_port()
        env = clean_env(WEBSOCKET_SERVER_HOST="127.0.0.1", WEBSOCKET_SERVER_PORT=str(port), EVENT_BUS="redis",
                        REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis.port), WS_MAX_CONNECTIONS_PER_USER="0",
                        WS_RATE_LIMIT="0", WS_PING_INTERVAL="0", LOG_LEVEL="warn")
        server = Process(self, ws_py(), env=env)
        server.wait_healthy(port)
        yield wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=30)  # subscribed to Redis
        yield self.cost(server, redis, port, 20, offer, "warm-up")
        cost = yield self.cost(server, redis, port, self.SOCKETS, offer, "measured")
        server.kill()
        return cost

    @inlineCallbacks
    def test_a_compressing_socket_costs_about_what_a_plain_one_does(self) -> Any:
        plain = yield self.per_socket(None)
        deflate = yield self.per_socket(CHROMIUM)
        self.assertLessEqual(deflate, 1.5 * plain, f"{deflate / 1024:.1f} KiB per compressing socket, "
                                                    f"{plain / 1024:.1f} KiB per plain one")
