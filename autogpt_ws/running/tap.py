"""Command-line options shared by every runner, and the twistd makeService.

``twistd -n autogpt-ws [options]``, ``python ws.py [options]`` and
``autogpt-ws [options]`` parse the same :class:`Options` and build the same
service tree with :func:`build`.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any, Callable, Mapping

from twisted.application.service import IService
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.util import untilConcludes

from .. import __version__
from ..config import ConfigError, Settings, config_file_from, load
from . import logs

log = Logger()

# command-line option -> setting key
OVERRIDES = {
    "host": "host", "port": "port", "listen": "listen", "log-level": "log_level",
    "log-format": "log_format", "workers": "workers", "event-bus": "event_bus",
}


class Options(usage.Options):
    synopsis = "[options]"  # under twistd: "twistd [options] autogpt-ws [options]"
    longdesc = (
        "The AutoGPT real-time WebSocket server: browsers of the AutoGPT frontend open /ws?token=<JWT>, "
        "subscribe to graph executions and receive every execution event and notification AutoGPT's "
        "executors publish on Redis. Settings come from config.yaml, then environment variables, then "
        "these options (--set key=value for any setting; docs/operations.md lists them all)."
    )
    more = (
        "\nCommands:\n"
        "  publish   publish events on Redis as AutoGPT's executors do (autogpt-ws publish --help)\n"
        "\nRunners (one server, the same options):\n"
        "  autogpt-ws [options]             foreground; exits 0 after SIGTERM/SIGINT\n"
        "  python ws.py [options]           the same, from a checkout\n"
        "  twistd [-n] autogpt-ws [options] the twistd plugin; without -n it daemonizes\n"
    )
    optParameters = [
        ["config", "c", None, "config.yaml to read (default: $AUTOGPT_WS_CONFIG, else ./config.yaml if present)"],
        ["host", None, None, "interface to bind (WEBSOCKET_SERVER_HOST)"],
        ["port", "p", None, "port to listen on (WEBSOCKET_SERVER_PORT)"],
        ["listen", "l", None, "Twisted endpoint string, e.g. tcp:8001 or ssl:8443:privateKey=key.pem:certKey=cert.pem"],
        ["log-level", None, None, "debug, info, warn, error or critical"],
        ["log-format", None, None, "text or json"],
        ["workers", "w", None, "server processes sharing the port"],
        ["event-bus", None, None, "auto, memory, redis or redis-cluster (EVENT_BUS; auto: ask the Redis named, if any)"],
    ]
    optFlags = [["demo", None, "run a simulated executor publishing graph runs for the default user"]]

    def __init__(self, env: Mapping[str, str] | None = None, stderr: IO[str] | None = None,
                 program: str = "autogpt-ws") -> None:
        super().__init__()
        self.program = program
        self.env = os.environ if env is None else env
        self.stderr = stderr
        self.sets: dict[str, str] = {}
        self.settings: Settings | None = None

    def opt_set(self, assignment: str) -> None:
        """any setting, as key=value (repeatable), e.g. --set rate_limit=50"""
        key, sep, value = assignment.partition("=")
        if not sep:
            raise usage.UsageError(f"--set takes key=value, not {assignment!r}")
        self.sets[key.strip()] = value

    opt_o = opt_set

    def getUsage(self, width: int | None = None) -> str:
        return super().getUsage(width) + self.more

    def getSynopsis(self) -> str:
        if getattr(self, "parent", None) is not None:  # twistd autogpt-ws: twistd's own first
            return super().getSynopsis()
        return (f"Usage: {self.program} [options]\n"
                f"       {self.program} publish [options] node|graph|notification|raw|run [form options]")

    def opt_version(self) -> None:
        """print the version and exit"""
        sys.stdout.write(f"autogpt-ws {__version__}\n")
        raise SystemExit(0)

    def overrides(self) -> dict[str, Any]:
        values: dict[str, Any] = dict(self.sets)
        for option, key in OVERRIDES.items():
            if self[option] is not None:
                values[key] = self[option]
        return values

    def postOptions(self) -> None:
        self.settings = load_or_exit(self["config"], self.overrides(), self.env, self.stderr)
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger") and not parent.get("syslog"):
            # twistd resolves --logger by name, after this method returns
            global _twistd_observer_factory
            _twistd_observer_factory = twistd_logger(parent, self.settings)
            parent["logger"] = f"{__name__}.twistd_observer"


def parse_or_none(argv: list[str], program: str = "autogpt-ws") -> Options | None:
    """Options parsed from ``argv``, or None after one line on stderr
    (the caller exits 2).  A bad setting exits 2 from postOptions."""
    options = Options(program=program)
    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        sys.stderr.write(f"{program}: {exc} (see {program} --help)\n")
        return None
    return options


def load_or_exit(config: str | None, overrides: Mapping[str, Any],
                 env: Mapping[str, str] | None = None, stderr: IO[str] | None = None) -> Settings:
    """Settings, or one line on stderr and exit status 2."""
    try:
        return load(config_file_from(config, env), env, overrides)
    except ConfigError as exc:
        (stderr or sys.stderr).write(f"autogpt-ws: {exc}\n")
        raise SystemExit(2) from None


# The observer factory of this twistd run: twistd takes ``--logger`` as a
# dotted name, so Options.postOptions leaves the real factory here and names
# twistd_observer.  One twistd process parses one command line.
_twistd_observer_factory: Callable[[], ILogObserver] | None = None


def twistd_observer() -> ILogObserver:
    """The ``--logger`` twistd calls: our level and format, twistd's file."""
    if _twistd_observer_factory is None:
        return logs.make_observer()
    return _twistd_observer_factory()


def twistd_logger(parent: Any, settings: Settings) -> Callable[[], ILogObserver]:
    """A twistd ``--logger`` factory that honours --logfile / -n and our
    level and format."""

    def factory() -> ILogObserver:
        name = parent.get("logfile")
        if not name and not parent.get("nodaemon"):
            name = "twistd.log"
        if not name or name == "-":
            stream: Any = sys.stdout
        else:
            from twisted.python.logfile import LogFile

            stream = LogFile.fromFullPath(name, rotateLength=50 * 1024 * 1024, maxRotatedFiles=5)
        return logs.make_observer(settings.log_level, settings.log_format, stream)

    return factory


def build(settings: Settings, demo: bool = False, reactor: Any = None, worker: int | None = None) -> IService:
    """The service tree every runner starts (``worker``: its index under
    ``--workers``)."""
    from .service import WebsocketServer

    server = WebsocketServer(settings, reactor=reactor, worker=worker)
    if demo:
        from ..producing.demo import DemoExecutor

        # the bus says how to publish (an auto bus only once it knows its kind)
        DemoExecutor(server.bus.producer, server.layout, server.reactor).setServiceParent(server)
    return server


def one_line_startup_errors(previous: Callable[..., Any]) -> Callable[..., Any]:
    """A ``sys.excepthook`` for twistd: a StartupError (the port is in use)
    that escapes twistd becomes one line on the real stderr, as with
    ``python ws.py``, instead of a traceback; anything else goes to
    ``previous``.  (Daemonized, twistd reports it to the parent itself.)"""
    from .service import StartupError

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, StartupError):
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"autogpt-ws: {value}\n")
            stream.flush()
        else:
            previous(kind, value, tb)

    return hook


# a status a daemonizing twistd's child sends its parent fits one atomic
# pipe write (PIPE_BUF is at least 512; 4096 on Linux)
STATUS_MAX = 512


def report_daemon_startup(runner: type, logfile: str) -> None:
    """Make a daemonizing twistd report a start-up failure in one line.

    twistd's child writes the failure to its parent over a pipe, cut to
    100 bytes, and the parent prints its bytes repr ("An error has
    occurred: b'autogpt_ws.running.service.StartupError: cannot listen on
    tcp:8001:interface=0.0.0.0:backlog=4096: [Errno '"); the log file gets
    nothing.  Here the child logs the failure (the log file has it) and
    sends the whole line, and the parent prints it as it is, as
    ``python ws.py`` does.  ``runner`` is twistd's UnixApplicationRunner:
    both processes are forks of the one this runs in."""
    from .service import StartupError

    def format_child_exception(self: Any, exception: BaseException) -> bytes:
        if isinstance(exception, StartupError):
            log.critical("{error}", error=str(exception))
            line = f"autogpt-ws: {exception}"
        else:
            log.failure("start-up failed")  # called while handling it: the traceback goes to the log
            line = f"autogpt-ws: start-up failed: {type(exception).__name__}: {exception} (see {logfile})"
        data = b"1 " + line.replace("\n", " ").encode("utf-8", "backslashreplace")
        return data[:STATUS_MAX]

    def wait_for_start(self: Any, read_pipe: int) -> int:
        data = untilConcludes(os.read, read_pipe, STATUS_MAX)
        if data == b"0":
            return 0
        stream = sys.__stderr__ or sys.stderr
        untilConcludes(stream.write, data[2:].decode("utf-8", "replace") + "\n")
        stream.flush()
        return 1

    if hasattr(runner, "_formatChildException") and hasattr(runner, "_waitForStart"):
        runner._formatChildException = format_child_exception  # type: ignore[attr-defined]
        runner._waitForStart = wait_for_start  # type: ignore[attr-defined]


def makeService(options: Options) -> IService:
    """twistd's entry: the same tree as ``python ws.py``."""
    from .app import HeapFreezer

    assert options.settings is not None
    server = build(options.settings, demo=bool(options["demo"]))
    HeapFreezer().setServiceParent(server)
    sys.excepthook = one_line_startup_errors(sys.excepthook)
    parent = getattr(options, "parent", None)
    if parent is not None and not parent.get("nodaemon") and os.name == "posix":
        from twisted.scripts._twistd_unix import UnixApplicationRunner

        report_daemon_startup(UnixApplicationRunner, parent.get("logfile") or "twistd.log")
    return server
