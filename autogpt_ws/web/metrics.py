"""The Prometheus exposition of :class:`~autogpt_ws.stats.Stats`, built at
scrape time.  Each server has its own registry, so several servers can live
in one process (tests, workers)."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..stats import Stats

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def _labelled(name: str, doc: str, label: str, counts: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


class StatsCollector(Collector):
    def __init__(self, stats: Stats, frames_out: Callable[[], int],
                 bus_up: Callable[[], bool], catchup_bytes: Callable[[], int],
                 history_bytes: Callable[[], int]) -> None:
        self._stats = stats
        self._frames_out = frames_out
        self._bus_up = bus_up
        self._catchup_bytes = catchup_bytes
        self._history_bytes = history_bytes

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        yield GaugeMetricFamily("autogpt_websocket_connections_total", "Open WebSocket connections", value=s.open_sockets)
        yield CounterMetricFamily("autogpt_ws_sockets_opened", "WebSocket handshakes completed", value=s.sockets_opened)
        yield _labelled("autogpt_ws_sockets_closed", "WebSocket connections closed, by close code", "code", s.sockets_closed)
        yield _labelled("autogpt_ws_auth_failures", "Handshakes refused by authentication, by reason", "reason", s.auth_failures)
        yield _labelled("autogpt_ws_handshakes_refused", "Handshakes refused before authentication, by reason", "reason", s.handshakes_refused)
        yield _labelled("autogpt_ws_http_refused", "HTTP requests and connections refused by a bound, by bound", "reason", s.http_refused)
        yield _labelled("autogpt_ws_frames_in", "Client frames received, by method", "method", s.frames_in)
        yield CounterMetricFamily("autogpt_ws_frames_out", "Event and notification frames written to sockets", value=self._frames_out())
        yield CounterMetricFamily("autogpt_ws_replies_out", "Replies written to sockets for client frames", value=s.replies_out)
        yield CounterMetricFamily("autogpt_ws_events_received", "Messages received from the event bus", value=s.events_received)
        yield CounterMetricFamily("autogpt_ws_events_ignored", "Bus messages nobody here subscribed to (not decoded)", value=s.events_ignored)
        yield CounterMetricFamily("autogpt_ws_events_forwarded", "Bus messages forwarded to at least one socket", value=s.events_forwarded)
        yield _labelled("autogpt_ws_events_dropped", "Bus messages dropped, by reason", "reason", s.events_dropped)
        yield CounterMetricFamily("autogpt_ws_bus_reconnects", "Event bus reconnections", value=s.bus_reconnects)
        yield GaugeMetricFamily("autogpt_ws_bus_up", "1 when the event bus is connected and subscribed", value=1 if self._bus_up() else 0)
        yield CounterMetricFamily("autogpt_ws_slow_consumer_closes", "Sockets closed 1013 for not reading", value=s.slow_consumer_closes)
        yield CounterMetricFamily("autogpt_ws_rate_limited_frames", "Client frames refused by the rate limit", value=s.rate_limited)
        yield CounterMetricFamily("autogpt_ws_handler_errors", "Client frames whose handling failed inside the server", value=s.handler_errors)
        yield CounterMetricFamily("autogpt_ws_deflate_frames", "Pushed frames compressed, once per frame, window size and form whatever the sockets", value=s.deflate_frames)
        yield CounterMetricFamily("autogpt_ws_deflate_primed_frames", "Of those, frames compressed with the previous frame of their key as history", value=s.deflate_primed)
        yield GaugeMetricFamily("autogpt_ws_deflate_history_bytes", "Bytes of frames kept for the next frame of their key to refer back to", value=self._history_bytes())
        yield CounterMetricFamily("autogpt_ws_deflate_bytes_in", "Bytes of pushed frames before compressing", value=s.deflate_bytes_in)
        yield CounterMetricFamily("autogpt_ws_deflate_bytes_out", "Bytes of pushed frames after compressing", value=s.deflate_bytes_out)
        yield CounterMetricFamily("autogpt_ws_catchup_hits", "Subscribes answered with a cached latest event", value=s.catchup_hits)
        yield CounterMetricFamily("autogpt_ws_catchup_misses", "Subscribes with no cached event", value=s.catchup_misses)
        yield CounterMetricFamily("autogpt_ws_catchup_evictions", "Cached executions evicted (bytes or age)", value=s.catchup_evictions)
        yield GaugeMetricFamily("autogpt_ws_catchup_bytes", "Bytes of events held for catch-up", value=self._catchup_bytes())
        yield CounterMetricFamily("autogpt_ws_catchup_store_writes", "Graph events written to the cluster's catch-up store", value=s.catchup_store_writes)
        yield CounterMetricFamily("autogpt_ws_catchup_store_reads", "Catch-up store reads made for a subscribe", value=s.catchup_store_reads)
        yield CounterMetricFamily("autogpt_ws_catchup_store_commands", "Redis commands sent to the catch-up store", value=s.catchup_store_commands)
        yield CounterMetricFamily("autogpt_ws_catchup_store_errors", "Catch-up store writes and reads that failed", value=s.catchup_store_errors)
        yield CounterMetricFamily("autogpt_ws_catchup_store_skipped", "Graph events too large for the catch-up store", value=s.catchup_store_skipped)


class Metrics:
    """The registry of one server: the stats collector and the latency histogram."""

    def __init__(self, stats: Stats, frames_out: Callable[[], int],
                 bus_up: Callable[[], bool], catchup_bytes: Callable[[], int] = lambda: 0,
                 history_bytes: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(stats, frames_out, bus_up, catchup_bytes, history_bytes))
        self.fanout_latency = Histogram(
            "autogpt_ws_fanout_latency_seconds",
            "From receipt of an event on the bus to its last write to a socket",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
