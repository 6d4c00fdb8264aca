"""Metrics on /metrics (issue 5, point 6): every family is exposed, and
each moves when its event happens, observed through real sockets and a
real HTTP scrape."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.producing import publish
from autogpt_ws.running.service import WebsocketServer
from tests.helpers import (SECRET, HandshakeRefused, RawClient, http_fetch, raw_connect, sleep, start_server, token,
                           wait_for)

HEARTBEAT = '{"method":"heartbeat","data":"ping","success":true}'
SUBSCRIBE = '{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}'

FAMILIES = (
    "autogpt_websocket_connections_total", "autogpt_ws_sockets_opened", "autogpt_ws_sockets_closed",
    "autogpt_ws_auth_failures", "autogpt_ws_handshakes_refused", "autogpt_ws_frames_in", "autogpt_ws_frames_out",
    "autogpt_ws_replies_out", "autogpt_ws_events_received", "autogpt_ws_events_ignored",
    "autogpt_ws_events_forwarded", "autogpt_ws_events_dropped", "autogpt_ws_bus_reconnects", "autogpt_ws_bus_up",
    "autogpt_ws_slow_consumer_closes", "autogpt_ws_rate_limited_frames", "autogpt_ws_fanout_latency_seconds",
)


class Scrape:
    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        """A sample's value; 0 when absent (a labelled counter not yet seen)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


@inlineCallbacks
def scrape(server: WebsocketServer) -> Any:
    status, headers, body = yield http_fetch(server.port, "/metrics")
    assert status == 200, status
    assert headers["content-type"].startswith("text/plain"), headers
    return Scrape(body.decode("utf-8"))


def event(exec_id: str = "e1", user: str = "user-1", event_type: str | None = None) -> bytes:
    body = publish.node_event(user, "g1", exec_id, "ne1", "RUNNING")
    if event_type is not None:
        body["event_type"] = event_type
    return publish.envelope(body)


class Metrics(TestCase):
    @inlineCallbacks
    def test_off_by_default(self) -> None:
        server = start_server(self)
        status, _, _ = yield http_fetch(server.port, "/metrics")
        self.assertEqual(status, 404)

    @inlineCallbacks
    def test_close_codes_outside_the_documented_set_are_other(self) -> None:
        """A client picks its close code: any code outside docs/operations.md's
        table is one label, ``other``, so clients cannot grow the label set."""
        server = start_server(self, enable_metrics=True)
        for code in (1000, 4003, 3000, 4999, 1010, 4321):
            client: RawClient = yield raw_connect(server.port, test=self)
            client.send(code.to_bytes(2, "big"), opcode=0x8)
            yield client.lost
        yield wait_for(lambda: not server.factory.sockets)
        after = yield scrape(server)
        labels = {sample.labels["code"]: sample.value
                  for sample in after.families["autogpt_ws_sockets_closed"].samples if sample.name.endswith("_total")}
        self.assertEqual(labels, {"1000": 1, "4003": 1, "other": 4})

    @inlineCallbacks
    def test_every_family_moves(self) -> None:
        server = start_server(self, enable_metrics=True, enable_auth=True, jwt_verify_key=SECRET, auth_failure="close")
        bus: Any = server.bus
        layout = server.layout
        before = yield scrape(server)
        for family in FAMILIES:
            self.assertIn(family, before.families)
        self.assertEqual(before("autogpt_websocket_connections_total"), 0)
        self.assertEqual(before("autogpt_ws_bus_up"), 1)
        self.assertEqual(before("autogpt_ws_bus_reconnects_total"), 0)
        self.assertEqual(before("autogpt_ws_fanout_latency_seconds_count"), 0)

        # sockets and authentication
        good: RawClient = yield raw_connect(server.port, path=f"/ws?token={token()}", test=self)
        missing: RawClient = yield raw_connect(server.port, path="/ws", test=self)
        forged: RawClient = yield raw_connect(server.port, path=f"/ws?token={token(key='x' * 40)}", test=self)
        yield missing.lost
        yield forged.lost
        # frames in, replies out
        yield good.request(HEARTBEAT)
        yield good.request(HEARTBEAT)
        yield good.request(SUBSCRIBE)
        yield good.request("not json")
        # events: forwarded (3), ignored (nobody subscribed), dropped by reason
        channel = layout.classic_exec("user-1", "g1", "e1")
        for _ in range(3):
            bus.publish(channel, event())
        bus.publish(layout.classic_exec("user-1", "g1", "other"), event("other"))
        bus.publish(channel, b'{"payload":')
        bus.publish(channel, json.dumps({"payload": {"event_type": "error_comms_update"}}).encode())
        bus.publish(channel, event(event_type="something_else"))
        yield good.message(6)
        after = yield scrape(server)

        self.assertEqual(after("autogpt_websocket_connections_total"), 1)
        self.assertEqual(after("autogpt_ws_sockets_opened_total"), 1)
        self.assertEqual(after("autogpt_ws_auth_failures_total", reason="missing"), 1)
        self.assertEqual(after("autogpt_ws_auth_failures_total", reason="signature"), 1)
        self.assertEqual(after("autogpt_ws_frames_in_total", method="heartbeat"), 2)
        self.assertEqual(after("autogpt_ws_frames_in_total", method="subscribe_graph_execution"), 1)
        self.assertEqual(after("autogpt_ws_frames_in_total", method="invalid"), 1)
        self.assertEqual(after("autogpt_ws_replies_out_total"), 4)
        self.assertEqual(after("autogpt_ws_frames_out_total"), 3)
        self.assertEqual(after("autogpt_ws_events_received_total"), 7)
        self.assertEqual(after("autogpt_ws_events_ignored_total"), 1)
        self.assertEqual(after("autogpt_ws_events_forwarded_total"), 3)
        self.assertEqual(after("autogpt_ws_events_dropped_total", reason="malformed"), 1)
        self.assertEqual(after("autogpt_ws_events_dropped_total", reason="oversized"), 1)
        self.assertEqual(after("autogpt_ws_events_dropped_total", reason="unknown_type"), 1)
        self.assertEqual(after("autogpt_ws_fanout_latency_seconds_count"), 3)
        self.assertEqual(after("autogpt_ws_fanout_latency_seconds_bucket", le="+Inf"), 3)

        # closes by code
        good.send(b"\x03\xe8", opcode=0x8)
        yield good.lost
        closed = yield scrape(server)
        self.assertEqual(closed("autogpt_websocket_connections_total"), 0)
        self.assertEqual(closed("autogpt_ws_sockets_closed_total", code="1000"), 1)

        # bus state
        yield bus.stopService()
        self.assertEqual((yield scrape(server))("autogpt_ws_bus_up"), 0)
        bus.startService()
        self.assertEqual((yield scrape(server))("autogpt_ws_bus_up"), 1)

    @inlineCallbacks
    def test_refusals_rate_limit_and_slow_consumer(self) -> None:
        server = start_server(self, enable_metrics=True, max_connections=1, rate_limit=1.0, rate_burst=1,
                              rate_abuse_close=100, max_send_buffer=64 * 1024)
        slow: RawClient = yield raw_connect(server.port, rcvbuf=4096, test=self)
        refused = raw_connect(server.port, test=self)
        yield self.assertFailure(refused, HandshakeRefused)
        yield slow.request(SUBSCRIBE)
        yield slow.request(SUBSCRIBE)  # over the rate: refused
        slow.transport.pauseProducing()  # stop reading
        channel = server.layout.classic_exec("3e53486c-cf57-477e-ba2a-cb02dc828e1a", "g1", "e1")
        big = publish.envelope(publish.node_event("3e53486c-cf57-477e-ba2a-cb02dc828e1a", "g1", "e1", "n", "RUNNING",
                                                  output_data={"out": ["x" * 65536]}))
        for _ in range(2000):
            if server.stats.slow_consumer_closes:
                break
            server.bus.publish(channel, big)  # type: ignore[attr-defined]
            yield sleep(0.002)
        yield wait_for(lambda: not server.factory.sockets)
        after = yield scrape(server)
        self.assertEqual(after("autogpt_ws_handshakes_refused_total", reason="capacity"), 1)
        self.assertEqual(after("autogpt_ws_rate_limited_frames_total"), 1)
        self.assertEqual(after("autogpt_ws_slow_consumer_closes_total"), 1)
        self.assertEqual(after("autogpt_ws_sockets_closed_total", code="1013"), 1)
        self.assertEqual(after("autogpt_websocket_connections_total"), 0)
