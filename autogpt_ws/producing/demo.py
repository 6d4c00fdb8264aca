"""A simulated executor: realistic graph runs for one user, published the
way AutoGPT's executors publish them (``--demo``).

Every ``interval`` seconds a run of graph ``demo-graph`` starts: QUEUED,
RUNNING, then each node QUEUED -> RUNNING -> COMPLETED with outputs, then
the run COMPLETED, a notification at the end.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from ..config import DEFAULT_USER_ID
from ..core.channels import Layout
from .publish import Publisher, graph_event, node_event, notification, publish_event, publish_notification

log = Logger()

# where a run is published: (publisher, whether it takes the sharded channel
# names), or None while that is not known (the bus is still being found out)
Producer = Callable[[], "tuple[Publisher, bool] | None"]

DEMO_GRAPH = "demo-graph"
NODES = (
    ("input", "AgentInputBlock", {"name": "topic", "value": "Twisted"}, {"result": ["Twisted"]}),
    ("llm", "AITextGeneratorBlock", {"prompt": "Write a haiku about Twisted"},
     {"response": ["Deferreds fire late / the reactor never sleeps / callbacks bloom like rain"]}),
    ("output", "AgentOutputBlock", {"name": "haiku"}, {"output": ["done ✓"]}),
)


class DemoExecutor(Service):
    name = "demo"

    def __init__(self, producer: Producer, layout: Layout, clock: Any,
                 user_id: str = DEFAULT_USER_ID, interval: float = 10.0, step: float = 0.5) -> None:
        self.producer = producer
        self.layout = layout
        self.clock = clock
        self.user_id = user_id
        self.interval = interval
        self.step = step
        self.runs = 0
        self._loop: LoopingCall | None = None
        self._first: Any = None
        self._runs: set[Deferred[Any]] = set()

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._start_run)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(lambda f: log.failure("demo stopped", f))
        self._first = self.clock.callLater(1.0, self._start_run)  # a first run at once, after startup
        log.info("demo executor: a run of graph {graph_id} for user {user_id} every {interval}s",
                 graph_id=DEMO_GRAPH, user_id=self.user_id, interval=self.interval)

    def stopService(self) -> Deferred[None] | None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._first is not None and self._first.active():
            self._first.cancel()
        for run in tuple(self._runs):  # a run in flight publishes nothing after stop
            run.cancel()
        return super().stopService()  # type: ignore[no-any-return]

    def _start_run(self) -> None:
        if self.producer() is None:
            log.info("demo executor: the event bus cannot publish yet; skipping a run")
            return
        self.runs += 1
        run = self.run(f"demo-exec-{self.runs}-{uuid.uuid4().hex[:8]}")
        self._runs.add(run)
        run.addErrback(lambda f: None if f.check(CancelledError) else log.failure("demo run failed", f))
        run.addBoth(lambda _: self._runs.discard(run))

    @inlineCallbacks
    def run(self, exec_id: str) -> Any:
        """Publish one whole run, a step apart."""
        produced = self.producer()
        if produced is None:
            raise RuntimeError("the event bus cannot publish yet")
        publisher, sharded = produced
        log.info("demo run {graph_exec_id} of graph {graph_id} started", graph_exec_id=exec_id, graph_id=DEMO_GRAPH)
        user, graph_id = self.user_id, DEMO_GRAPH

        def graph(status: str, **extra: Any) -> Deferred[Any]:
            return publish_event(publisher, self.layout, graph_event(user, graph_id, exec_id, status, **extra), sharded)

        yield graph("QUEUED")
        yield self._pause()
        yield graph("RUNNING")
        outputs: dict[str, list[Any]] = {}
        for index, (node_id, block, inputs, out) in enumerate(NODES):
            node_exec = f"{exec_id}-n{index}"
            for status in ("QUEUED", "RUNNING", "COMPLETED"):
                yield self._pause()
                event = node_event(user, graph_id, exec_id, node_exec, status, node_id=node_id, block_id=block,
                                   input_data=inputs, output_data=out if status == "COMPLETED" else {})
                yield publish_event(publisher, self.layout, event, sharded)
            outputs.update(out)
        yield self._pause()
        yield graph("COMPLETED", outputs=outputs, stats={"node_count": len(NODES)})
        yield publish_notification(publisher, self.layout,
                                   notification(user, "execution_completed", "Demo run finished", graph_exec_id=exec_id))

    def _pause(self) -> Deferred[None]:
        return deferLater(self.clock, self.step, lambda: None)
