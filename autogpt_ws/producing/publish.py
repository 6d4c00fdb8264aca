"""The producing side, as AutoGPT's executors do it: event builders,
envelopes, channel names, and the oversize rule.  Used by the demo, the
``autogpt-ws publish`` command, tests, and Python producers."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Protocol

from twisted.internet.defer import Deferred, gatherResults

from ..config import MiB
from ..core.channels import Layout


class Publisher(Protocol):
    """Anything that can put (channel, envelope) on a bus: the memory bus,
    a Redis connection (PUBLISH or SPUBLISH)."""

    def publish(self, channel: str, data: bytes) -> Deferred[int]: ...


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def node_event(user_id: str, graph_id: str, graph_exec_id: str, node_exec_id: str, status: str,
               *, graph_version: int = 1, node_id: str = "node-1", block_id: str = "block-1",
               input_data: dict[str, Any] | None = None, output_data: dict[str, list[Any]] | None = None,
               **extra: Any) -> dict[str, Any]:
    at = now_iso()
    return {
        "user_id": user_id, "graph_id": graph_id, "graph_version": graph_version,
        "graph_exec_id": graph_exec_id, "node_exec_id": node_exec_id, "node_id": node_id,
        "block_id": block_id, "status": status, "input_data": input_data or {},
        "output_data": output_data or {}, "add_time": at, "queue_time": at,
        "start_time": at if status != "QUEUED" else None,
        "end_time": at if status in ("COMPLETED", "FAILED", "TERMINATED") else None,
        **extra, "event_type": "node_execution_update",
    }


def graph_event(user_id: str, graph_id: str, graph_exec_id: str, status: str, *,
                graph_version: int = 1, inputs: dict[str, Any] | None = None,
                outputs: dict[str, list[Any]] | None = None, stats: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
    at = now_iso()
    return {
        "id": graph_exec_id, "user_id": user_id, "graph_id": graph_id, "graph_version": graph_version,
        "inputs": inputs or {}, "credential_inputs": None, "nodes_input_masks": None, "preset_id": None,
        "status": status, "started_at": at, "ended_at": at if status in ("COMPLETED", "FAILED", "TERMINATED") else None,
        "is_shared": False, "share_token": None, "is_dry_run": False, "stats": stats, "outputs": outputs or {},
        **extra, "event_type": "graph_execution_update",
    }


def envelope(event: dict[str, Any], max_size: int = 16 * MiB) -> bytes:
    """``{"payload": event}`` as compact raw-UTF-8 JSON; over ``max_size``
    the producer's ``error_comms_update`` replacement instead."""
    data = json.dumps({"payload": event}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(data) > max_size:
        data = json.dumps({"payload": {
            "event_type": "error_comms_update",
            "error": "Payload too large for Redis transmission",
            "original_size_bytes": len(data),
            "max_size_bytes": max_size,
        }}, separators=(",", ":")).encode("utf-8")
    return data


def execution_channels(layout: Layout, event: dict[str, Any], sharded: bool = False) -> list[str]:
    """Where an execution event is published: one classic channel, or the
    execution's and the graph's sharded channels."""
    exec_id = event["id"] if event.get("event_type") == "graph_execution_update" else event["graph_exec_id"]
    if sharded:
        return [layout.sharded_exec(event["user_id"], event["graph_id"], exec_id),
                layout.sharded_all(event["user_id"], event["graph_id"])]
    return [layout.classic_exec(event["user_id"], event["graph_id"], exec_id)]


def publish_event(publisher: Publisher, layout: Layout, event: dict[str, Any],
                  sharded: bool = False, max_size: int = 16 * MiB) -> Deferred[list[int]]:
    data = envelope(event, max_size)
    return gatherResults([publisher.publish(c, data) for c in execution_channels(layout, event, sharded)],
                        consumeErrors=True)


def notification(user_id: str, kind: str, event: str, **extra: Any) -> dict[str, Any]:
    """The notification event: ``{"user_id":..,"payload":{"type":..,"event":..}}``."""
    return {"user_id": user_id, "payload": {"type": kind, "event": event, **extra}}


def publish_notification(publisher: Publisher, layout: Layout, event: dict[str, Any],
                         max_size: int = 16 * MiB) -> Deferred[int]:
    return publisher.publish(layout.notification(event["user_id"]), envelope(event, max_size))
