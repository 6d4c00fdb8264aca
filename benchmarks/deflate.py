#!/usr/bin/env python3
"""What permessage-deflate costs, quickly: a check, not the benchmark table.

    python benchmarks/deflate.py levels            # compression level and threshold, on AutoGPT-like frames
    python benchmarks/deflate.py history           # keyed history: bytes and CPU per history size
    python benchmarks/deflate.py server [--sockets N] [--runs N] [--level L] [--threshold B] [--history B]
                                                   # plain sockets vs deflate on its own vs keyed

``levels`` compresses AutoGPT-like push frames (:func:`autogpt_frames`: the
events of simulated graph runs, with some KB of LLM text) as the server
does (:class:`Deflater`), once each, at each ISA-L level (and zlib's 1 and
6 for reference), and prints bytes and CPU per frame, the ratio per kind of
event, then what compressing gains per frame size and per threshold.

``history`` sends the same frames, each run's on its own key, through a
hub with keyed history to one compressing socket (what the server's socket
writes, :meth:`Deflater.wire`), for each history size (0: every frame on
its own), and prints bytes on the wire (frame headers included) per byte
of the messages, CPU per frame and the share of frames sent primed.

``server`` runs ``ws.py`` (pinned to core 0, its own redis-server on core
1, as ``run.py`` does) with browser-like clients in this process (core 1):
each offers ``permessage-deflate; client_max_window_bits`` as Chromium
does, sends its subscribe compressed and inflates what it receives with one
inflater kept for the socket's life, as browsers do; the same number of
plain sockets are the reference.  Three servers take turns: plain clients,
compressing clients with ``deflate_history=0`` (every frame on its own),
and compressing clients with keyed history (``--history``).  It prints, for
each: resident memory per idle subscribed socket, before and after twenty
~10 KB events (each socket on its own execution: one key's history per
socket), and the history the server then holds per socket; server CPU per
delivery with every socket on one execution (fan-out: ten simulated runs)
and with each socket on its own (one delivery per compression, the worst
case); and bytes on the wire (frame headers included) per byte of the
messages, in the fan-out.  Protocol pings are off for the check.
"""

from __future__ import annotations

import argparse
import base64
import inspect
import json
import os
import random
import selectors
import socket
import statistics
import struct
import sys
import tempfile
import time
import uuid
import zlib
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run  # noqa: E402

from autogpt_ws.config import DEFAULT_USER_ID as USER  # noqa: E402
from autogpt_ws.core import wire
from autogpt_ws.core.channels import Layout  # noqa: E402
from autogpt_ws.core.hub import Hub  # noqa: E402
from autogpt_ws.producing import publish
from autogpt_ws.sockets.deflate import Deflater  # noqa: E402
from autogpt_ws.stats import Stats  # noqa: E402

LAYOUT = Layout()
BROWSER_OFFER = "permessage-deflate; client_max_window_bits"  # what Chromium sends


# -- AutoGPT-like events ----------------------------------------------------------


def _prose() -> list[str]:
    """English paragraphs: the standard library's longer docstrings (the
    same on every machine with this Python)."""
    import argparse as a
    import collections as c
    import email.message as e
    import http.client as h
    import json as j
    import logging as lg
    import pathlib as p
    import unittest.case as u
    import zipfile as z
    docs = set()
    for module in (a, c, e, h, j, lg, p, u, z):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                docs.add(doc)
    return sorted(docs)


class Text:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.paragraphs = _prose()

    def __call__(self, size: int) -> str:
        out: list[str] = []
        while sum(map(len, out)) < size:
            out.append(self.rng.choice(self.paragraphs))
        return "\n\n".join(out)[:size]


def _id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def autogpt_run(rng: random.Random, text: Text, graph_id: str, exec_id: str) -> Iterator[dict[str, Any]]:
    """The events of one run of a four-node graph as AutoGPT's executor
    publishes them: the graph QUEUED, RUNNING, COMPLETED; each node QUEUED
    and RUNNING with its inputs, and COMPLETED with its inputs and outputs
    (upstream's executor queues a node with its inputs).  The LLM node
    takes a prompt of 1-3 KB and answers 1-6 KB; its outputs hold the
    prompt it sent, as AutoGPT's LLM blocks do."""
    yield publish.graph_event(USER, graph_id, exec_id, "QUEUED", inputs={"topic": text(80)})
    yield publish.graph_event(USER, graph_id, exec_id, "RUNNING", inputs={"topic": text(80)})
    prompt, system, answer = text(rng.randint(1000, 3000)), text(rng.randint(200, 600)), text(rng.randint(1000, 6000))
    credentials = {"id": _id(rng), "provider": "openai", "type": "api_key", "title": "OpenAI key"}
    nodes = [
        ("AgentInputBlock", {"name": "topic", "value": text(80)}, {"result": [text(80)]}),
        ("AITextGeneratorBlock", {"prompt": prompt, "sys_prompt": system, "model": "gpt-4o", "credentials": credentials,
                                  "retry": 3, "prompt_values": {}, "max_tokens": None},
         {"response": [answer], "prompt": [[{"role": "system", "content": system}, {"role": "user", "content": prompt}]]}),
        ("FillTextTemplateBlock", {"values": {"answer": answer}, "format": "## Summary\n\n{{answer}}\n"},
         {"output": ["## Summary\n\n" + answer + "\n"]}),
        ("AgentOutputBlock", {"name": "summary", "value": answer}, {"output": [answer], "name": ["summary"]}),
    ]
    for block, inputs, outputs in nodes:
        node_exec, node = _id(rng), _id(rng)
        common = {"node_id": node, "block_id": block}
        yield publish.node_event(USER, graph_id, exec_id, node_exec, "QUEUED", input_data=inputs, **common)
        yield publish.node_event(USER, graph_id, exec_id, node_exec, "RUNNING", input_data=inputs, **common)
        yield publish.node_event(USER, graph_id, exec_id, node_exec, "COMPLETED", input_data=inputs,
                                 output_data=outputs, **common)
    stats = {"cost": rng.randint(1, 500), "walltime": rng.random() * 30, "cputime": rng.random() * 3,
             "nodes_walltime": rng.random() * 30, "nodes_cputime": rng.random() * 3, "node_count": 4,
             "node_error_count": 0, "error": None, "activity_status": None, "correctness_score": None}
    yield publish.graph_event(USER, graph_id, exec_id, "COMPLETED", inputs={"topic": text(80)},
                              outputs={"summary": [answer]}, stats=stats)


def autogpt_stream(runs: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """(key, push frame) of ``runs`` simulated runs: what a socket
    subscribed to each execution receives, on that execution's key."""
    rng = random.Random(seed)
    text = Text(rng)
    frames = []
    for _ in range(runs):
        graph_id, exec_id = _id(rng), _id(rng)
        key = wire.exec_key(USER, exec_id)
        for event in autogpt_run(rng, text, graph_id, exec_id):
            method = wire.EVENT_METHODS[event["event_type"]]
            frames.append((key, wire.push(method, key, json.dumps(event, separators=(",", ":")).encode())))
    return frames


def autogpt_frames(runs: int, seed: int = 7) -> list[bytes]:
    """The push frames of ``runs`` simulated runs (:func:`autogpt_stream`)."""
    return [payload for _, payload in autogpt_stream(runs, seed)]


def deflate(payload: bytes, level: int, library: Any = None) -> bytes:
    """``payload`` compressed as the server does (:class:`Deflater`), or
    with ``library`` (stdlib zlib, for reference), unframed."""
    if library is None:
        framed = Deflater(15, level, 0, Stats()).frame(payload)
        return payload if framed is None else framed[2 + (2 if framed[1] == 126 else 8 if framed[1] == 127 else 0):]
    compressor = library.compressobj(level, library.DEFLATED, -15, 8)
    return (compressor.compress(payload) + compressor.flush(library.Z_SYNC_FLUSH))[:-4]


def per_frame_us(frames: list[bytes], level: int, library: Any = None, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for payload in frames:
            deflate(payload, level, library)
        best = min(best, time.perf_counter() - start)
    return best / len(frames) * 1e6


def levels(args: argparse.Namespace) -> None:
    frames = autogpt_frames(args.runs_levels)
    raw = sum(map(len, frames))
    sizes = sorted(map(len, frames))
    print(f"{len(frames)} AutoGPT-like push frames, {raw / len(frames):.0f} bytes on average "
          f"(median {sizes[len(sizes) // 2]}, largest {sizes[-1]})")
    print("compressor  bytes out/in  smaller by  us per frame  us per KB in")
    for name, library, level in [("ISA-L", None, n) for n in range(4)] + [("zlib", zlib, 1), ("zlib", zlib, 6)]:
        out = sum(len(deflate(f, level, library)) for f in frames)
        us = per_frame_us(frames, level, library)
        print(f"{name:>7s} {level}  {out / raw:12.3f}  {raw / out:9.2f}x  {us:12.1f}  {us / (raw / len(frames) / 1024):12.2f}")
    level = args.level
    print(f"\nby kind of frame (ISA-L {level})")
    kinds: dict[str, list[bytes]] = {}
    for payload in frames:
        data = json.loads(payload)["data"]
        kinds.setdefault(f'{data["event_type"].split("_")[0]} {data["status"]}', []).append(payload)
    for kind, group in sorted(kinds.items()):
        size = sum(map(len, group))
        print(f"{kind:20s} {size / len(group):6.0f} bytes  out/in {sum(len(deflate(f, level)) for f in group) / size:.3f}")
    print(f"\nsmall frames (ISA-L {level}): what compressing saves per frame size (the first bytes of real frames)")
    print("bytes      saved  us to compress")
    rng = random.Random(3)
    for low, high in ((64, 128), (128, 256), (256, 384), (384, 512), (512, 768), (768, 1024), (1024, 2048)):
        picked = [f[:rng.randint(low, high - 1)] for f in frames if len(f) >= high]
        saved = statistics.mean(1 - len(deflate(f, level)) / len(f) for f in picked)
        print(f"{low:4d}-{high:<4d} {saved:6.0%}  {per_frame_us(picked, level):6.1f}")
    print(f"\nthreshold  frames compressed  bytes out/in (ISA-L {level})")
    for threshold in (0, 256, 512, 1024, 2048):
        small = [f for f in frames if len(f) < threshold]
        out = sum(map(len, small)) + sum(len(deflate(f, level)) for f in frames if len(f) >= threshold)
        print(f"{threshold:9d}  {1 - len(small) / len(frames):17.0%}  {out / raw:12.3f}")


class Socket:
    """What a compressing socket of the server writes (``Outbound.push``),
    counted rather than sent."""

    def __init__(self, deflater: Deflater) -> None:
        self.user_id = USER
        self.keys: set[str] = set()
        self.deflater = deflater
        self.window: wire.Link | None = None
        self.wire_bytes = 0

    def push(self, frame: wire.OutFrame) -> None:
        data, self.window = self.deflater.wire(frame, self.window)
        self.wire_bytes += len(data)


def history(args: argparse.Namespace) -> None:
    stream = autogpt_stream(args.runs_levels)
    raw = sum(len(wire.ws_text_frame(payload)) for _, payload in stream)
    print(f"{len(stream)} AutoGPT-like push frames of {args.runs_levels} runs, each run on its own key; "
          f"ISA-L level {args.level}, threshold {args.threshold}")
    print("history  bytes out/in  smaller by  us per frame  primed")
    for size in (0, 1024, 2048, 4096, 8192, 16384, 32768):
        best, out, primed = float("inf"), 0, 0
        for _ in range(5):
            stats = Stats()
            hub = Hub(keyed_history=size > 0)
            sock = Socket(Deflater(15, args.level, args.threshold, stats, size))
            hub.attach(sock)
            for key in {key for key, _ in stream}:
                hub.subscribe(sock, key)
            frames = [(key, wire.OutFrame(payload)) for key, payload in stream]
            start = time.perf_counter()
            for key, frame in frames:
                hub.publish(key, frame)
            best = min(best, time.perf_counter() - start)
            out, primed = sock.wire_bytes, stats.deflate_primed
        print(f"{size:7d}  {out / raw:12.3f}  {raw / out:9.2f}x  {best / len(stream) * 1e6:12.1f}  {primed / len(stream):6.0%}")


# -- the server check ----------------------------------------------------------------


class Browser:
    """One raw client socket: upgrade (offering deflate or not), frames in,
    one inflater for the socket's life (as browsers keep one)."""

    def __init__(self, port: int, offer: str | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        extra = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
        self.sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("the server closed the upgrade")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        self.deflate = b"permessage-deflate" in head
        if offer and not self.deflate:
            raise RuntimeError(f"deflate not negotiated: {head!r}")
        self.inflater = zlib.decompressobj(-15)
        self.sock.setblocking(False)
        self.messages = 0
        self.wire_bytes = 0
        self.plain_bytes = 0
        self.last = b""

    def send(self, text: bytes) -> None:
        rsv = 0
        if self.deflate:  # a fresh compressor per message: client_no_context_takeover
            text, rsv = deflate(text, 6, zlib), 0x40
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
        head = bytes((0x81 | rsv, 0x80 | len(text))) if len(text) < 126 else struct.pack("!BBH", 0x81 | rsv, 0xFE, len(text))
        self.sock.setblocking(True)
        self.sock.sendall(head + mask + masked)
        self.sock.setblocking(False)

    def read(self) -> None:
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise RuntimeError("the server closed a socket")
                self.wire_bytes += len(chunk)
                self.buf += chunk
                if len(chunk) < (1 << 20):
                    break
        except BlockingIOError:
            pass
        buf, pos = self.buf, 0
        while len(buf) - pos >= 2:
            first, size = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if size == 126:
                if len(buf) - pos < 4:
                    break
                size, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif size == 127:
                if len(buf) - pos < 10:
                    break
                size, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if len(buf) - pos < head + size:
                break
            payload = buf[pos + head:pos + head + size]
            pos += head + size
            if first & 0x40:
                payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
            self.plain_bytes += len(payload)
            self.messages += 1
            self.last = payload
        self.buf = buf[pos:]


class Clients:
    def __init__(self, port: int, count: int, offer: str | None) -> None:
        self.selector = selectors.DefaultSelector()
        self.all: list[Browser] = []
        for _ in range(count):
            client = Browser(port, offer)
            self.all.append(client)
            self.selector.register(client.sock, selectors.EVENT_READ, client)

    def pump(self, until: int, timeout: float = 120.0) -> None:
        """Read until every socket has ``until`` messages."""
        deadline = time.monotonic() + timeout
        while any(c.messages < until for c in self.all):
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out: {min(c.messages for c in self.all)} of {until} messages")
            for key, _ in self.selector.select(1.0):
                key.data.read()

    def subscribe(self, exec_ids: list[str]) -> None:
        for client, exec_id in zip(self.all, exec_ids):
            client.send(json.dumps({"method": "subscribe_graph_execution", "data": {"graph_exec_id": exec_id}}).encode())
        self.pump(1)
        for client in self.all:
            if b'"success":true' not in client.last:
                raise RuntimeError(f"subscribe refused: {client.last!r}")

    def close(self) -> None:
        for client in self.all:
            client.sock.close()
        self.selector.close()


class RedisPublisher:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))

    def publish(self, items: list[tuple[str, bytes]]) -> None:
        out = []
        for channel, data in items:
            name = channel.encode()
            out.append(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(name), name, len(data), data))
        self.sock.sendall(b"".join(out))
        want, got = len(items), b""
        while got.count(b"\r\n") < want:
            got += self.sock.recv(65536)


def envelopes(runs: int, exec_id: str, seed: int) -> list[bytes]:
    """The events of ``runs`` runs, all addressed to ``exec_id`` of one graph."""
    rng = random.Random(seed)
    text = Text(rng)
    out = []
    for _ in range(runs):
        out += [publish.envelope(e) for e in autogpt_run(rng, text, "graph-1", exec_id)]
    return out


def history_bytes(port: int) -> float:
    """The server's autogpt_ws_deflate_history_bytes (its /metrics)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := sock.recv(65536):
            body += chunk
    for line in body.decode().splitlines():
        if line.startswith("autogpt_ws_deflate_history_bytes "):
            return float(line.split()[1])
    return 0.0


def measure(port: int, redis: run.Redis, server: run.Server, offer: str | None, s: argparse.Namespace) -> dict[str, float]:
    pub = RedisPublisher(redis.port)
    res: dict[str, float] = {}
    # memory: RSS per idle subscribed socket, then after twenty ~10 KB events to each
    warm = Clients(port, 50, offer)
    warm.subscribe(["warm"] * 50)
    warm.close()
    server.settle()
    time.sleep(0.5)
    before = run.rss_bytes(server.pid)
    clients = Clients(port, s.sockets, offer)
    ids = [f"exec-{i}" for i in range(s.sockets)]
    clients.subscribe(ids)
    server.settle()
    time.sleep(1.0)
    res["idle_kib"] = (run.rss_bytes(server.pid) - before) / s.sockets / 1024
    rng = random.Random(11)
    text = Text(rng)
    for n in range(20):
        event = publish.node_event(USER, "graph-1", "", "ne", "COMPLETED", output_data={"response": [text(9500)]})
        batch = []
        for exec_id in ids:
            event["graph_exec_id"] = exec_id
            batch.append((LAYOUT.classic_exec(USER, "graph-1", exec_id), publish.envelope(event)))
        pub.publish(batch)
        clients.pump(2 + n)  # the subscribe reply, then the events
    server.settle()
    time.sleep(1.0)
    res["after_20_events_kib"] = (run.rss_bytes(server.pid) - before) / s.sockets / 1024
    res["history_kib"] = history_bytes(port) / s.sockets / 1024
    # CPU per delivery, fan-out: every socket on one execution
    fan = envelopes(s.event_runs, "exec-fan", seed=5)
    for client in clients.all:
        client.send(json.dumps({"method": "subscribe_graph_execution", "data": {"graph_exec_id": "exec-fan"}}).encode())
    done = 1 + 20 + 1
    clients.pump(done)
    wire0 = sum(c.wire_bytes for c in clients.all)
    plain0 = sum(c.plain_bytes for c in clients.all)
    server.settle()
    cpu0 = server.cpu()
    for start in range(0, len(fan), 10):
        chunk = fan[start:start + 10]
        pub.publish([(LAYOUT.classic_exec(USER, "graph-1", "exec-fan"), data) for data in chunk])
        done += len(chunk)
        clients.pump(done)
    res["fanout_us"] = (server.cpu() - cpu0) / run.HZ / (len(fan) * s.sockets) * 1e6
    res["wire_ratio"] = (sum(c.wire_bytes for c in clients.all) - wire0) / (sum(c.plain_bytes for c in clients.all) - plain0)
    # CPU per delivery, one socket per execution: each frame compressed for one socket
    own = envelopes(max(1, s.event_runs // 5), "", seed=6)
    server.settle()
    cpu0 = server.cpu()
    for data in own:
        event = json.loads(data)["payload"]
        batch = []
        for exec_id in ids:
            event["id" if event["event_type"] == "graph_execution_update" else "graph_exec_id"] = exec_id
            batch.append((LAYOUT.classic_exec(USER, "graph-1", exec_id), publish.envelope(event)))
        pub.publish(batch)
        done += 1
        clients.pump(done)
    res["single_us"] = (server.cpu() - cpu0) / run.HZ / (len(own) * s.sockets) * 1e6
    clients.close()
    pub.sock.close()
    return res


MODES = (("plain", None, None), ("alone", BROWSER_OFFER, 0), ("keyed", BROWSER_OFFER, None))


def server_check(args: argparse.Namespace) -> None:
    run.raise_nofile()
    logdir = tempfile.mkdtemp(prefix="autogpt-ws-deflate-")
    redis = run.Redis(logdir)
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in MODES}
    try:
        for i in range(args.runs):
            for name, offer, size in MODES:  # in turn: a slow spell hits each
                port = run.free_port()
                history = args.history if size is None else size
                server = run.ours(port, redis, logdir, ["--set", f"deflate_level={args.level}",
                                                        "--set", f"deflate_threshold={args.threshold}",
                                                        "--set", f"deflate_history={history}",
                                                        "--set", "enable_metrics=true",
                                                        "--set", "rate_limit=0", "--set", "ping_interval=0"])
                try:
                    res = measure(port, redis, server, offer, args)
                finally:
                    server.stop()
                print(f"run {i + 1} {name:7s} " + "  ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
                results[name].append(res)
    finally:
        redis.stop()
    print(f"\nmedians of {args.runs} runs, {args.sockets} sockets, level {args.level}, threshold {args.threshold}, "
          f"keyed history {args.history} bytes ('alone': deflate_history=0):")
    print(f"{'':36s} {'plain':>8s} {'alone':>8s} {'keyed':>8s} {'alone/plain':>12s} {'keyed/plain':>12s}")
    rows = [("idle_kib", "memory per idle socket, KiB"), ("after_20_events_kib", "  after twenty 10 KB events, KiB"),
            ("history_kib", "  of which history held, KiB"),
            ("fanout_us", "CPU per delivery, fan-out, us"), ("single_us", "CPU per delivery, 1 per frame, us"),
            ("wire_ratio", "bytes on the wire / bytes sent")]
    for key, label in rows:
        plain, alone, keyed = (statistics.median(r[key] for r in results[name]) for name, _, _ in MODES)
        ratios = "".join(f" {v / plain:11.3f}x" if plain else f" {'-':>12s}" for v in (alone, keyed))
        print(f"{label:36s} {plain:8.3f} {alone:8.3f} {keyed:8.3f}{ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("levels", "history", "server"))
    parser.add_argument("--runs-levels", type=int, default=40, help="levels: simulated runs")
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--event-runs", type=int, default=10, help="server: simulated runs published to all sockets")
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--threshold", type=int, default=512)
    parser.add_argument("--history", type=int, default=8192, help="server: deflate_history of the keyed server")
    args = parser.parse_args()
    {"levels": levels, "history": history, "server": server_check}[args.what](args)


if __name__ == "__main__":
    main()
