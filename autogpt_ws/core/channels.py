"""Channel names of AutoGPT's event buses (PROTOCOL.md section 5).

One place knows how producers name channels, for both directions: the
publisher builds names with it, the buses parse them back.

Classic bus (PUBLISH / PSUBSCRIBE):
    <exec_bus>/<user_id>/<graph_id>/<graph_exec_id>
    <notif_bus>/<user_id>
Sharded bus (SPUBLISH / SSUBSCRIBE; braces are a cluster hash tag):
    <exec_bus>/{<user_id>/<graph_id>}/exec/<graph_exec_id>
    <exec_bus>/{<user_id>/<graph_id>}/all
    <notif_bus>/<user_id>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Parsed(NamedTuple):
    """kind is "exec" (one execution), "all" (a graph's every execution,
    sharded bus only) or "notification"."""

    kind: str
    user_id: str
    graph_id: str = ""
    graph_exec_id: str = ""


@dataclass(frozen=True)
class Layout:
    exec_bus: str = "execution_event"
    notif_bus: str = "notification_event"

    # -- building -----------------------------------------------------------

    def classic_exec(self, user_id: str, graph_id: str, graph_exec_id: str) -> str:
        return f"{self.exec_bus}/{user_id}/{graph_id}/{graph_exec_id}"

    def notification(self, user_id: str) -> str:
        return f"{self.notif_bus}/{user_id}"

    def sharded_exec(self, user_id: str, graph_id: str, graph_exec_id: str) -> str:
        return f"{self.exec_bus}/{{{user_id}/{graph_id}}}/exec/{graph_exec_id}"

    def sharded_all(self, user_id: str, graph_id: str) -> str:
        return f"{self.exec_bus}/{{{user_id}/{graph_id}}}/all"

    def classic_patterns(self) -> tuple[str, str]:
        return f"{self.exec_bus}/*/*/*", f"{self.notif_bus}/*"

    # -- parsing ------------------------------------------------------------

    def parse_classic(self, channel: str) -> Parsed | None:
        head, sep, rest = channel.partition("/")
        if not sep:
            return None
        parts = rest.split("/")
        if head == self.exec_bus and len(parts) == 3 and all(parts):
            return Parsed("exec", parts[0], parts[1], parts[2])
        if head == self.notif_bus and len(parts) == 1 and parts[0]:
            return Parsed("notification", parts[0])
        return None

    def parse_sharded(self, channel: str) -> Parsed | None:
        head, sep, rest = channel.partition("/")
        if not sep:
            return None
        if head == self.notif_bus:
            return Parsed("notification", rest) if rest and "/" not in rest else None
        if head != self.exec_bus or not rest.startswith("{"):
            return None
        tag, brace, tail = rest[1:].partition("}")
        user_id, slash, graph_id = tag.partition("/")
        if not (brace and slash and user_id and graph_id) or "/" in graph_id:
            return None
        if tail == "/all":
            return Parsed("all", user_id, graph_id)
        if tail.startswith("/exec/") and len(tail) > 6 and "/" not in tail[6:]:
            return Parsed("exec", user_id, graph_id, tail[6:])
        return None
