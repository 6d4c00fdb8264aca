"""``autogpt-ws publish``: put events on Redis exactly as AutoGPT's executors do.

    autogpt-ws publish [--redis-url URL] [--config FILE] [--set key=value] [--sharded] FORM ...

    FORM
      node          one node_execution_update   (--graph --exec --node-exec --status ...)
      graph         one graph_execution_update  (--graph --exec --status ...)
      notification  one notification           (--type --event [--extra JSON])
      raw           CHANNEL JSON: publish that envelope as given ("-" reads stdin)
      run           a whole simulated run (the --demo executor's run)

Redis settings come from the server's loader (config.yaml < environment <
``--set`` / ``--redis-url``).  Each publish prints ``<channel> <receivers>``.
Exit status: 0 published, 1 Redis refused or unreachable, 2 bad usage or
configuration.
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import IO, Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import react
from twisted.python import usage

from .. import __version__
from ..bus.cluster_publish import ClusterPublisher
from ..bus.redis_client import RedisPublisher
from ..config import DEFAULT_USER_ID, ConfigError, Settings, config_file_from, load
from ..core.channels import Layout
from . import publish

STATUSES = ("INCOMPLETE", "QUEUED", "RUNNING", "COMPLETED", "TERMINATED", "FAILED", "REVIEW")


def _json(text: str, what: str, kind: type = dict) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        raise usage.UsageError(f"{what} is not valid JSON: {text[:60]!r}") from None
    if not isinstance(value, kind):
        raise usage.UsageError(f"{what} must be a JSON {kind.__name__ if kind is not dict else 'object'}")
    return value


def _check_ids(options: usage.Options, *names: str) -> None:
    """Ids become parts of channel names: an empty one, or one holding a
    delimiter, names a channel no consumer reads (``notification_event/``)."""
    for name in names:
        value = options[name]
        if not value or any(mark in value for mark in "/{}"):
            raise usage.UsageError(f"--{name} must be a non-empty id without '/', '{{' or '}}', not {value!r}")


class _Common(usage.Options):
    """Options accepted before or after the form."""

    optParameters = [
        ["config", "c", None, "config.yaml to read (default: $AUTOGPT_WS_CONFIG, else ./config.yaml if present)"],
        ["redis-url", None, None, "redis:// or rediss:// URL (overrides REDIS_URL and redis_*)"],
    ]
    optFlags = [["sharded", None, "SPUBLISH to the sharded channels (the redis-cluster bus)"]]

    def __init__(self) -> None:
        super().__init__()
        self.sets: dict[str, str] = {}

    def opt_set(self, assignment: str) -> None:
        """any setting, as key=value (repeatable), e.g. --set redis_db=2"""
        key, sep, value = assignment.partition("=")
        if not sep:
            raise usage.UsageError(f"--set takes key=value, not {assignment!r}")
        self.sets[key.strip()] = value


class _Execution(_Common):
    optParameters = [
        ["user", "u", DEFAULT_USER_ID, "user id"],
        ["graph", "g", "graph-1", "graph id"],
        ["exec", "e", None, "graph execution id (default: a fresh one)"],
        ["status", "s", "RUNNING", "one of " + ", ".join(STATUSES)],
        ["graph-version", None, "1", "graph version"],
    ]

    def postOptions(self) -> None:
        self["exec"] = self["exec"] or f"exec-{uuid.uuid4().hex[:12]}"
        _check_ids(self, "user", "graph", "exec")
        if self["status"] not in STATUSES:
            raise usage.UsageError(f"--status must be one of {', '.join(STATUSES)}")
        try:
            self["graph-version"] = int(self["graph-version"])
        except ValueError:
            raise usage.UsageError("--graph-version must be an integer") from None


class NodeOptions(_Execution):
    synopsis = "[options]"
    optParameters = [
        ["node-exec", None, None, "node execution id (default: a fresh one)"],
        ["node-id", None, "node-1", "node id"],
        ["block-id", None, "block-1", "block id"],
        ["input", None, "{}", "input_data, a JSON object"],
        ["output", None, "{}", "output_data, a JSON object of arrays"],
    ]

    def event(self) -> dict[str, Any]:
        return publish.node_event(
            self["user"], self["graph"], self["exec"], self["node-exec"] or f"node-exec-{uuid.uuid4().hex[:12]}",
            self["status"], graph_version=self["graph-version"], node_id=self["node-id"], block_id=self["block-id"],
            input_data=_json(self["input"], "--input"), output_data=_json(self["output"], "--output"))


class GraphOptions(_Execution):
    synopsis = "[options]"
    optParameters = [
        ["outputs", None, "{}", "outputs, a JSON object of arrays"],
        ["stats", None, None, "stats, a JSON object"],
    ]

    def event(self) -> dict[str, Any]:
        stats = _json(self["stats"], "--stats") if self["stats"] is not None else None
        return publish.graph_event(self["user"], self["graph"], self["exec"], self["status"],
                                   graph_version=self["graph-version"], outputs=_json(self["outputs"], "--outputs"),
                                   stats=stats)


class NotificationOptions(_Common):
    synopsis = "[options]"
    optParameters = [
        ["user", "u", DEFAULT_USER_ID, "user id"],
        ["type", "t", "execution_completed", "payload type"],
        ["event", None, "Execution finished", "payload event text"],
        ["extra", None, "{}", "more payload keys, a JSON object"],
    ]

    def postOptions(self) -> None:
        _check_ids(self, "user")

    def event(self) -> dict[str, Any]:
        return publish.notification(self["user"], self["type"], self["event"], **_json(self["extra"], "--extra"))


class RawOptions(_Common):
    synopsis = "[options] CHANNEL JSON   (options before CHANNEL)"
    optFlags = [["no-check", None, "publish the data even when it is not JSON (to test consumers)"]]

    def parseArgs(self, channel: str, data: str) -> None:
        self["channel"] = channel
        self["data"] = sys.stdin.read() if data == "-" else data

    def postOptions(self) -> None:
        if not self["no-check"]:
            _json(self["data"], "the envelope", object)


class RunOptions(_Common):
    synopsis = "[options]"
    optParameters = [
        ["user", "u", DEFAULT_USER_ID, "user id"],
        ["exec", "e", None, "graph execution id (default: a fresh one)"],
        ["step", None, "0.1", "seconds between events"],
    ]

    def postOptions(self) -> None:
        self["exec"] = self["exec"] or f"demo-exec-{uuid.uuid4().hex[:12]}"
        _check_ids(self, "user", "exec")
        try:
            self["step"] = float(self["step"])
        except ValueError:
            raise usage.UsageError("--step must be a number of seconds") from None


class PublishOptions(_Common):
    synopsis = "Usage: autogpt-ws publish [options] node|graph|notification|raw|run [form options]"

    def getSynopsis(self) -> str:
        if self.subCommand is not None:  # a form's usage: "... publish [options] node [options]"
            return "Usage: autogpt-ws publish [options]"
        return self.synopsis

    def opt_version(self) -> None:
        """print the version and exit"""
        sys.stdout.write(f"autogpt-ws {__version__}\n")
        raise SystemExit(0)

    longdesc = ("Publish events on Redis exactly as AutoGPT's executors do. "
                "`autogpt-ws publish FORM --help` lists a form's options.")
    subCommands = [
        ["node", None, NodeOptions, "publish one node_execution_update"],
        ["graph", None, GraphOptions, "publish one graph_execution_update"],
        ["notification", None, NotificationOptions, "publish one notification"],
        ["raw", None, RawOptions, "publish CHANNEL JSON as given"],
        ["run", None, RunOptions, "publish a whole simulated graph run"],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name what to publish: node, graph, notification, raw or run")

    def common(self, key: str) -> Any:
        """A common option, given after the form or before it."""
        sub = self.subOptions
        if sub is not None and sub[key] not in (None, 0):
            return sub[key]
        return self[key]

    def overrides(self) -> dict[str, Any]:
        values: dict[str, Any] = {**self.sets, **(self.subOptions.sets if self.subOptions is not None else {})}
        if self.common("redis-url"):
            values["redis_url"] = self.common("redis-url")
        # the publisher needs no token verification: do not demand its settings
        values["enable_auth"] = "false"
        return values


class _Printing:
    """A publisher that reports each publish on ``out``."""

    def __init__(self, publisher: RedisPublisher | ClusterPublisher, out: IO[str]) -> None:
        self.publisher = publisher
        self.out = out
        self.sent: list[Deferred[int]] = []

    def publish(self, channel: str, data: bytes) -> Deferred[int]:
        def report(receivers: int) -> int:
            self.out.write(f"{channel} {receivers}\n")
            self.out.flush()
            return receivers

        sent = self.publisher.publish(channel, data).addCallback(report)
        self.sent.append(sent)
        return sent

    def settle(self) -> None:
        """A failed publish was reported once; gatherResults (publish.py)
        leaves the failure in the Deferred too: consume it there."""
        for sent in self.sent:
            sent.addErrback(lambda _: None)


@inlineCallbacks
def run(reactor: Any, options: PublishOptions, settings: Settings, out: IO[str] = sys.stdout,
        err: IO[str] = sys.stderr) -> Any:
    """Publish what ``options`` asks for; fires with the exit status."""
    from .demo import DemoExecutor

    sharded = bool(options.common("sharded"))
    layout = Layout(settings.execution_event_bus_name, settings.notification_event_bus_name)
    redis: RedisPublisher | ClusterPublisher
    if sharded:
        redis = ClusterPublisher.from_settings(settings, reactor)  # to each slot's owner, from the seed
    else:
        redis = RedisPublisher.from_settings(settings, reactor, sharded=sharded)
    publisher = _Printing(redis, out)
    form, sub = options.subCommand, options.subOptions
    limit = settings.max_message_size_limit
    try:
        if form in ("node", "graph"):
            event = sub.event()
            data = publish.envelope(event, limit)
            for channel in publish.execution_channels(layout, event, sharded):
                yield publisher.publish(channel, data)
        elif form == "notification":
            yield publish.publish_notification(publisher, layout, sub.event(), limit)
        elif form == "raw":
            yield publisher.publish(sub["channel"], sub["data"].encode("utf-8"))
        else:
            demo = DemoExecutor(lambda: (publisher, sharded), layout, reactor, user_id=sub["user"], step=sub["step"])
            yield demo.run(sub["exec"])
        return 0
    except Exception as exc:
        cause = getattr(exc, "subFailure", None)  # gatherResults wraps the first failure
        err.write(f"autogpt-ws publish: {cause.getErrorMessage() if cause is not None else exc}\n")
        return 1
    finally:
        publisher.settle()
        yield redis.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = PublishOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        sys.stderr.write(f"autogpt-ws publish: {exc} (see autogpt-ws publish --help)\n")
        return 2
    try:
        settings = load(config_file_from(options.common("config")), None, options.overrides())
    except ConfigError as exc:
        sys.stderr.write(f"autogpt-ws publish: {exc}\n")
        return 2
    status: list[int] = []
    try:
        react(lambda reactor: run(reactor, options, settings).addCallback(status.append))
    except SystemExit as exc:
        if status:
            return status[0]
        return exc.code if isinstance(exc.code, int) else 1
    return status[0] if status else 1
