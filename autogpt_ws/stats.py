"""What the server counts: plain integers on the hot path.

Incrementing a ``prometheus_client`` counter takes a lock; doing that once
per frame per socket would cost more than the send.  So every layer bumps
attributes of :class:`Stats`, and the HTTP side's metrics collector
(:mod:`autogpt_ws.web.metrics`) turns them into metric families when
``/metrics`` is read.
"""

from __future__ import annotations

from collections import Counter

# the close codes of docs/operations.md's table: any other code a client sends is
# counted as "other", so clients cannot grow the label set
CLOSE_CODES = {code: str(code) for code in (1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 1013,
                                            4001, 4002, 4003)}


def close_code_label(code: int | None) -> str:
    """The ``code`` label of ``autogpt_ws_sockets_closed_total`` (1006: no
    close frame, or a client's close frame without a status code)."""
    return CLOSE_CODES.get(code, "other") if code else "1006"


class Stats:
    """Everything the server counts. Plain attributes; cheap to bump."""

    def __init__(self) -> None:
        self.open_sockets = 0
        self.sockets_opened = 0
        self.sockets_closed: Counter[str] = Counter()  # by close code
        self.auth_failures: Counter[str] = Counter()  # by reason
        self.handshakes_refused: Counter[str] = Counter()  # by reason (capacity, origin)
        self.http_refused: Counter[str] = Counter()  # by bound (heads.Refusal.label)
        self.frames_in: Counter[str] = Counter()  # by method ("invalid" for bad frames)
        self.replies_out = 0  # replies to client frames (pushed frames are counted by the hub)
        self.events_ignored = 0  # nobody on this server subscribed: not decoded
        self.events_handled = 0  # the other events received: decoded, then delivered or dropped
        self.events_forwarded = 0
        self.events_dropped: Counter[str] = Counter()  # by reason
        self.bus_reconnects = 0
        self.slow_consumer_closes = 0
        self.rate_limited = 0
        self.catchup_hits = 0
        self.catchup_misses = 0
        self.catchup_evictions = 0
        self.catchup_store_writes = 0  # graph events written to the cluster store
        self.catchup_store_reads = 0  # store reads made for a subscribe
        self.catchup_store_commands = 0  # Redis commands those took
        self.catchup_store_errors = 0  # store writes and reads that failed (the replay fell back on this server)
        self.catchup_store_skipped = 0  # events over catchup_store_max_event, not written
        self.handler_errors = 0
        # permessage-deflate: pushed frames compressed (once per frame,
        # window size and form), their bytes before and after; how many of
        # them primed with the previous frame of their key
        self.deflate_frames = 0
        self.deflate_primed = 0
        self.deflate_bytes_in = 0
        self.deflate_bytes_out = 0

    @property
    def events_received(self) -> int:
        """Events received from the bus: each is counted once, as ignored
        or as handled (one increment on the hot path, not two)."""
        return self.events_ignored + self.events_handled
