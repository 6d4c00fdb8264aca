"""The three runners as real processes: ``python ws.py``, ``twistd
[-n] autogpt-ws`` and the ``autogpt-ws`` console script; plugin discovery;
and what a built wheel ships.

Each server process runs in a temporary directory (so no config.yaml is
read), with ENABLE_AUTH=false and PYTHONPATH set to this checkout, on a free
loopback port.

Exit statuses, as documented in docs/operations.md:
- ``python ws.py`` / ``autogpt-ws``: 0 after SIGTERM or SIGINT, 1 when the
  port is in use, 2 for a bad setting, 128+N on a second signal N;
- ``twistd``: re-raises the signal after a clean stop, so it dies of SIGTERM
  (``returncode == -15`` here, 143 in a shell).
"""

from __future__ import annotations

import base64
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase

from autogpt_ws import __version__
from autogpt_ws.config import FIELDS
from tests.helpers import free_port
from tests.test_web import http_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STARTUP = 30.0  # seconds allowed to start (2 shared cores, 7 engineers)
EXIT = 15.0


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any setting of ours, plus
    ``extra``; imports come from this checkout."""
    names = {name for field in FIELDS for name in field.env} | {"AUTOGPT_WS_CONFIG"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["ENABLE_AUTH"] = "false"
    env.update(extra)
    return env


def http_get(port: int, path: str = "/health", timeout: float = 2.0) -> tuple[int, bytes]:
    """A blocking HTTP/1.0 GET (this test's own process, not the reactor)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def ws_open(port: int, path: str) -> tuple[socket.socket, bytes]:
    """A blocking WebSocket upgrade; returns the socket and what came back
    within a short while (the 101 and maybe frames)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    data = b""
    deadline = time.monotonic() + 5
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        data += sock.recv(4096)
    return sock, data


def wait_healthy(port: int, timeout: float = STARTUP, check: Any = lambda: None) -> None:
    """Poll GET /health until it answers 200 with the exact body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        try:
            status, body = http_get(port)
            if status == 200 and body == b'{"status":"healthy"}':
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no /health on port {port} after {timeout}s")


class Process:
    """A server process with its output in files, killed at cleanup."""

    def __init__(self, test: TestCase, argv: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.cwd = cwd or tempfile.mkdtemp(prefix="autogpt-ws-run-")
        test.addCleanup(shutil.rmtree, self.cwd, True)
        self.out_path = os.path.join(self.cwd, "stdout.txt")
        self.err_path = os.path.join(self.cwd, "stderr.txt")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(argv, cwd=self.cwd, env=env or clean_env(),
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        test.addCleanup(self.kill)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(EXIT)

    @property
    def stdout(self) -> str:
        with open(self.out_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    @property
    def stderr(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait(self, timeout: float = EXIT) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}") from None

    def wait_healthy(self, port: int, timeout: float = STARTUP) -> None:
        def died() -> None:
            if self.popen.poll() is not None:
                raise AssertionError(f"exited {self.popen.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}")

        wait_healthy(port, timeout, died)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        started = time.monotonic()
        self.popen.send_signal(signum)
        code = self.wait()
        self.stop_seconds = time.monotonic() - started
        return code


def ws_py(*args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "ws.py"), *args]


def twistd(*args: str) -> list[str]:
    script = os.path.join(BIN, "twistd")
    if os.path.exists(script):
        return [script, *args]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()", *args]


def console_script(*args: str) -> list[str]:
    script = os.path.join(BIN, "autogpt-ws")
    if not os.path.exists(script):
        raise SkipTest("the autogpt-ws console script is not installed (pip install -e .)")
    return [script, *args]


def listening_socket() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


class ForegroundRunner(TestCase):
    """python ws.py, and the autogpt-ws console script (the same main())."""

    timeout = 120

    def test_serves_and_exits_0_on_sigterm(self) -> None:
        port = free_port()
        proc = Process(self, ws_py("--host", "127.0.0.1", "--port", str(port)))
        proc.wait_healthy(port)
        self.assertEqual(http_get(port, "/ready"), (200, b'{"status":"ready"}'))
        self.assertEqual(proc.stop(signal.SIGTERM), 0, proc.stderr)
        self.assertLess(proc.stop_seconds, 10.0)
        out = proc.stdout
        startup = [line for line in out.splitlines() if "listening on" in line]
        self.assertEqual(len(startup), 1, out)
        self.assertIn(f"autogpt-ws {__version__}", startup[0])
        self.assertIn(f"127.0.0.1:{port}", startup[0])
        self.assertIn("event bus memory", startup[0])
        self.assertIn("received SIGTERM, shutting down", out)
        self.assertIn("autogpt-ws stopped", out)
        self.assertEqual(proc.stderr, "")

    def test_console_script_exits_0_on_sigint(self) -> None:
        port = free_port()
        proc = Process(self, console_script("--host", "127.0.0.1", "--port", str(port), "--log-format", "json"))
        proc.wait_healthy(port)
        self.assertEqual(proc.stop(signal.SIGINT), 0, proc.stderr)
        self.assertIn('"message": "received SIGINT, shutting down"', proc.stdout)
        self.assertIn(f'"address": "127.0.0.1:{port}"', proc.stdout)

    def test_open_socket_closed_1001_then_exit_0(self) -> None:
        port = free_port()
        proc = Process(self, ws_py("--host", "127.0.0.1", "--port", str(port)))
        proc.wait_healthy(port)
        sock, head = ws_open(port, "/ws")
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
        with sock:
            proc.popen.send_signal(signal.SIGTERM)
            frame = sock.recv(4096)
            self.assertEqual(frame[0], 0x88)  # close
            self.assertEqual(int.from_bytes(frame[2:4], "big"), 1001)
            sock.sendall(b"\x88\x82\x00\x00\x00\x00" + frame[2:4])  # answer the close
            self.assertEqual(proc.wait(), 0, proc.stderr)

    def test_second_signal_exits_at_once(self) -> None:
        port = free_port()
        proc = Process(self, ws_py("--host", "127.0.0.1", "--port", str(port)),
                       env=clean_env(AUTOGPT_WS_SHUTDOWN_TIMEOUT="60"))
        proc.wait_healthy(port)
        # a client that never answers the close keeps the shutdown waiting
        sock, head = ws_open(port, "/ws")
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
        with sock:
            proc.popen.send_signal(signal.SIGTERM)
            self.assertEqual(sock.recv(2)[:1], b"\x88")  # shutting down: the close came
            self.assertIsNone(proc.popen.poll())
            started = time.monotonic()
            proc.popen.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(5), 128 + signal.SIGTERM)
            self.assertLess(time.monotonic() - started, 2.0)
        self.assertIn("second signal, exiting now", proc.stderr)

    def test_bad_settings_exit_2_with_one_line(self) -> None:
        config = os.path.join(tempfile.mkdtemp(prefix="autogpt-ws-conf-"), "config.yaml")
        self.addCleanup(shutil.rmtree, os.path.dirname(config), True)
        with open(config, "w") as handle:
            handle.write("port: 8001\nshutdown_timout: 3\n")
        cases = [
            (ws_py("--port", "abc"), {}, "port (from command line): 'abc' is not an integer"),
            (ws_py(), {"WEBSOCKET_SERVER_PORT": "70000"}, "port (from $WEBSOCKET_SERVER_PORT)"),
            (ws_py("--config", config), {}, "shutdown_timout: unknown setting"),
            (ws_py("--listen", "ssl:8443:privateKey=/nonexistent/k.pem"), {}, "listen"),
            (ws_py(), {"ENABLE_AUTH": "true"}, "jwt_verify_key"),
            (twistd("-n", "autogpt-ws", "--port", "abc"), {}, "port (from command line): 'abc' is not an integer"),
        ]
        for argv, env, expected in cases:
            proc = Process(self, argv, env=clean_env(**env))
            self.assertEqual(proc.wait(), 2, (argv, proc.stdout, proc.stderr))
            lines = proc.stderr.splitlines()
            self.assertEqual(len(lines), 1, (argv, proc.stderr))
            self.assertTrue(lines[0].startswith("autogpt-ws: configuration error: "), lines[0])
            self.assertIn(expected, lines[0])
            self.assertNotIn("Traceback", proc.stdout + proc.stderr)

    def test_port_in_use_exits_1_with_one_line(self) -> None:
        sock, port = listening_socket()
        with sock:
            proc = Process(self, ws_py("--host", "127.0.0.1", "--port", str(port)))
            self.assertEqual(proc.wait(), 1, proc.stdout + proc.stderr)
        lines = proc.stderr.splitlines()
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertIn(f"autogpt-ws: cannot listen on tcp:{port}:interface=127.0.0.1", lines[0])
        self.assertIn("Address already in use", lines[0])
        self.assertNotIn("listening on", proc.stdout)

    def test_token_never_logged(self) -> None:
        port = free_port()
        proc = Process(self, ws_py("--host", "127.0.0.1", "--port", str(port), "--log-level", "debug"),
                       env=clean_env(ENABLE_AUTH="true", JWT_VERIFY_KEY="k" * 40, AUTH_FAILURE="close"))
        proc.wait_healthy(port)
        self.assertEqual(http_get(port, "/health?token=SECRETXYZ&x=1")[0], 200)
        sock, data = ws_open(port, "/ws?token=SECRETXYZ")
        with sock:
            while len(data) < data.find(b"\r\n\r\n") + 6:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        self.assertTrue(data.startswith(b"HTTP/1.1 101"), data)
        close = data[data.find(b"\r\n\r\n") + 4:]
        self.assertEqual((close[0], int.from_bytes(close[2:4], "big")), (0x88, 4003))  # an invalid token
        self.assertEqual(proc.stop(), 0)
        out = proc.stdout + proc.stderr
        self.assertIn("GET /health?token=***&x=1 200", out)  # the access log is on
        self.assertIn("authentication failed", out)
        self.assertNotIn("SECRETXYZ", out)


class CommandLine(TestCase):
    """What a newcomer types first: --help, --version, a typo in --set."""

    timeout = 120

    def run_cli(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=60,
                              cwd=tempfile.gettempdir())

    def test_help_names_the_program_its_command_and_runners(self) -> None:
        for argv in (console_script("--help"), ws_py("--help")):
            out = self.run_cli(argv).stdout
            self.assertTrue(out.startswith("Usage: autogpt-ws [options]\n"
                                           "       autogpt-ws publish [options] node|graph|notification|raw|run"), out)
            self.assertIn("\nCommands:\n  publish   ", out)
            for runner in ("autogpt-ws [options]", "python ws.py [options]", "twistd [-n] autogpt-ws [options]"):
                self.assertIn(runner, out.split("Runners")[1])
        out = self.run_cli(twistd("autogpt-ws", "--help")).stdout
        self.assertTrue(out.startswith("Usage: twistd [options] autogpt-ws [options]\n"), out)

    def test_publish_usage_reads_as_one_command(self) -> None:
        out = self.run_cli(console_script("publish", "--help")).stdout
        self.assertTrue(out.startswith("Usage: autogpt-ws publish [options] node|graph|notification|raw|run "
                                       "[form options]\n"), out)
        out = self.run_cli(console_script("publish", "node", "--help")).stdout
        self.assertTrue(out.startswith("Usage: autogpt-ws publish [options] node [options]\n"), out)

    def test_one_version_everywhere(self) -> None:
        for argv in (console_script("--version"), ws_py("--version"), twistd("autogpt-ws", "--version"),
                     console_script("publish", "--version"),
                     [sys.executable, "-m", "autogpt_ws.running.worker", "--version"]):
            done = self.run_cli(argv)
            self.assertEqual((done.returncode, done.stdout), (0, f"autogpt-ws {__version__}\n"), argv)

    def test_a_typo_in_set_suggests_the_setting(self) -> None:
        done = self.run_cli(console_script("--set", "rate_limt=5"))
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stderr, "autogpt-ws: configuration error: rate_limt (from command line): "
                                      "unknown setting (did you mean rate_limit?)\n")

    def test_a_password_that_breaks_a_url_is_one_line(self) -> None:
        """Not a traceback at connect time: one line naming the setting, exit 2."""
        for name, env in (("redis_url", {"REDIS_URL": "redis://:p#ss@127.0.0.1:6379"}),
                          ("database_url", {"EVENT_BUS": "redis-cluster", "REDIS_CLUSTER_HOST": "127.0.0.1",
                                            "REDIS_CLUSTER_PORT": "9",
                                            "DATABASE_URL": "postgresql://u:pa#ss@127.0.0.1:5432/x?schema=platform"})):
            done = subprocess.run(ws_py(), env=clean_env(**env), capture_output=True, text=True, timeout=60,
                                  cwd=tempfile.gettempdir())
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertTrue(done.stderr.startswith(f"autogpt-ws: configuration error: {name}: "), done.stderr)
            self.assertEqual(done.stderr.count("\n"), 1, done.stderr)
            self.assertIn("percent-encode", done.stderr)

    def test_startup_line_names_the_address_and_the_worker(self) -> None:
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

        from autogpt_ws.running.service import format_listen_address

        self.assertEqual(format_listen_address(IPv4Address("TCP", "0.0.0.0", 8001)), "0.0.0.0:8001")
        self.assertEqual(format_listen_address(IPv6Address("TCP", "::1", 8001)), "[::1]:8001")
        self.assertEqual(format_listen_address(UNIXAddress(b"/run/autogpt-ws.sock")), "/run/autogpt-ws.sock")
        path = os.path.join(tempfile.mkdtemp(prefix="autogpt-ws-unix-"), "ws.sock")
        self.addCleanup(shutil.rmtree, os.path.dirname(path), True)
        proc = Process(self, ws_py("--listen", f"unix:{path}"))
        deadline = time.monotonic() + STARTUP
        while "listening on" not in proc.stdout and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(proc.stop(), 0)
        self.assertIn(f"autogpt-ws {__version__} listening on {path} (pid {proc.popen.pid})", proc.stdout)
        port = free_port()
        worker = Process(self, [sys.executable, "-m", "autogpt_ws.running.worker", "--host", "127.0.0.1"],
                         env=clean_env(AUTOGPT_WS_WORKER_INDEX="3", AUTOGPT_WS_WORKER_PORT=str(port)))
        worker.wait_healthy(port)
        self.assertEqual(worker.stop(), 0)
        self.assertIn(f"autogpt-ws {__version__} worker 3 listening on 127.0.0.1:{port} (pid {worker.popen.pid})",
                      worker.stdout)


class TwistdRunner(TestCase):
    timeout = 120

    def test_foreground_serves_and_stops_on_sigterm(self) -> None:
        port = free_port()
        proc = Process(self, twistd("-n", "--pidfile=", "autogpt-ws", "--host", "127.0.0.1", "--port", str(port)))
        proc.wait_healthy(port)
        code = proc.stop(signal.SIGTERM)
        # twistd stops cleanly, then re-raises SIGTERM: status 143 in a shell
        self.assertEqual(code, -signal.SIGTERM, proc.stdout + proc.stderr)
        self.assertIn(f"autogpt-ws {__version__} listening on 127.0.0.1:{port}", proc.stdout)
        self.assertIn("autogpt-ws stopped", proc.stdout)

    def test_port_in_use_exits_1_with_one_line(self) -> None:
        sock, port = listening_socket()
        with sock:
            proc = Process(self, twistd("-n", "--pidfile=", "autogpt-ws", "--host", "127.0.0.1", "--port", str(port)))
            code = proc.wait()
        self.assertEqual(code, 1, proc.stdout + proc.stderr)
        lines = proc.stderr.splitlines()
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertIn(f"autogpt-ws: cannot listen on tcp:{port}:interface=127.0.0.1", lines[0])
        self.assertIn("Address already in use", lines[0])
        out = proc.stdout + proc.stderr
        self.assertNotIn("Traceback", out)
        self.assertNotIn("listening on", out)

    def test_daemon_with_pidfile_and_logfile(self) -> None:
        port = free_port()
        cwd = tempfile.mkdtemp(prefix="autogpt-ws-daemon-")
        pidfile, logfile = os.path.join(cwd, "autogpt-ws.pid"), os.path.join(cwd, "autogpt-ws.log")
        proc = Process(self, twistd(f"--pidfile={pidfile}", f"--logfile={logfile}", "autogpt-ws",
                                    "--host", "127.0.0.1", "--port", str(port), "--log-format", "json"), cwd=cwd)
        self.assertEqual(proc.wait(STARTUP), 0, proc.stdout + proc.stderr)  # the parent, once the child runs
        with open(pidfile) as handle:
            pid = int(handle.read())
        self.addCleanup(_kill_quietly, pid)
        wait_healthy(port)
        os.kill(pid, signal.SIGTERM)
        self.assertTrue(removed(pidfile), "pidfile left behind")
        with open(logfile) as handle:
            log = handle.read()
        self.assertIn(f'"address": "127.0.0.1:{port}"', log)
        self.assertIn("autogpt-ws stopped", log)

    def test_daemon_port_in_use_one_line_and_logged(self) -> None:
        """Daemonized, a start-up failure reaches the shell as one clear
        line (twistd's own report cuts it to a bytes repr of 100 bytes)
        and the log file has it too."""
        cwd = tempfile.mkdtemp(prefix="autogpt-ws-daemon-")
        pidfile, logfile = os.path.join(cwd, "autogpt-ws.pid"), os.path.join(cwd, "autogpt-ws.log")
        sock, port = listening_socket()
        with sock:
            proc = Process(self, twistd(f"--pidfile={pidfile}", f"--logfile={logfile}", "autogpt-ws",
                                        "--host", "127.0.0.1", "--port", str(port)), cwd=cwd)
            code = proc.wait(STARTUP)
        expected = f"autogpt-ws: cannot listen on tcp:{port}:interface=127.0.0.1:backlog=4096: [Errno 98] Address already in use"
        self.assertEqual((code, proc.stderr, proc.stdout), (1, expected + "\n", ""))
        self.assertTrue(removed(pidfile), "pidfile left behind")  # the daemon removes it after telling the parent
        with open(logfile) as handle:
            log = handle.read()
        self.assertIn(f"[autogpt_ws.running.tap#critical] cannot listen on tcp:{port}:interface=127.0.0.1", log)
        self.assertIn("Address already in use", log)


def removed(path: str, timeout: float = EXIT) -> bool:
    """Wait up to ``timeout`` seconds for ``path`` to be gone; is it?"""
    deadline = time.monotonic() + timeout
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.exists(path)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


class Plugin(TestCase):
    timeout = 60

    def options(self, *args: str) -> Any:
        from autogpt_ws.running.tap import Options

        options = Options(env={"ENABLE_AUTH": "false"})
        options.parseOptions(list(args))
        return options

    def test_discovered(self) -> None:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        import twisted.plugins

        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker, twisted.plugins)}
        self.assertIn("autogpt-ws", makers)
        maker = makers["autogpt-ws"]
        self.assertEqual(maker.module, "autogpt_ws.running.tap")

    @inlineCallbacks
    def test_make_service_serves(self) -> Any:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        import twisted.plugins
        from autogpt_ws.running.service import WebsocketServer

        maker = next(m for m in getPlugins(IServiceMaker, twisted.plugins) if m.tapname == "autogpt-ws")
        options = maker.options()
        options.env = {"ENABLE_AUTH": "false"}
        options.parseOptions(["--host", "127.0.0.1", "--port", "0", "--set", "shutdown_timeout=1"])
        self.patch(sys, "excepthook", sys.excepthook)  # makeService installs its own
        service = maker.makeService(options)
        self.assertIsInstance(service, WebsocketServer)
        self.assertEqual(service.settings.shutdown_timeout, 1.0)
        gc.unfreeze()
        self.addCleanup(gc.unfreeze)
        service.privilegedStartService()
        service.startService()
        self.assertGreater(gc.get_freeze_count(), 0)  # startup objects out of the collector's sight
        self.addCleanup(lambda: service.stopService() if service.running else None)
        response = yield http_request(service.port, "GET", "/health")
        self.assertEqual(response.body, b'{"status":"healthy"}')
        yield service.stopService()

    def test_options(self) -> None:
        options = self.options("--listen", "tcp:0:interface=127.0.0.1", "--log-level", "debug",
                               "--log-format", "json", "-o", "rate_limit=5", "--event-bus", "memory")
        settings = options.settings
        self.assertEqual((settings.endpoint, settings.log_level, settings.log_format, settings.rate_limit),
                         ("tcp:0:interface=127.0.0.1", "debug", "json", 5.0))

    def test_bad_option_value_exits_2(self) -> None:
        import io

        from autogpt_ws.running.tap import Options

        stderr = io.StringIO()
        with self.assertRaises(SystemExit) as caught:
            Options(env={"ENABLE_AUTH": "false"}, stderr=stderr).parseOptions(["--port", "abc"])
        self.assertEqual(caught.exception.code, 2)
        self.assertEqual(stderr.getvalue(), "autogpt-ws: configuration error: port (from command line): 'abc' is not an integer\n")


class Signals(TestCase):
    """app.Signals without a real signal: the first stops the reactor, the
    second exits at once."""

    def test_first_stops_second_exits(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from autogpt_ws.running.app import Signals as AppSignals

        reactor = MemoryReactorClock()
        reactor.running = True
        calls: list[Any] = []
        reactor.callFromThread = lambda f, *a: calls.append((f, a))  # type: ignore[method-assign]
        stopped: list[bool] = []
        reactor.stop = lambda: stopped.append(True)  # type: ignore[method-assign]
        exits: list[int] = []
        signals = AppSignals(reactor, exit=exits.append)
        signals.handle(signal.SIGTERM)
        self.assertEqual(exits, [])
        for function, args in calls:
            function(*args)
        self.assertEqual(stopped, [True])
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # the "second signal" line goes to fd 2
        try:
            signals.handle(signal.SIGINT)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
        self.assertEqual(exits, [128 + signal.SIGINT])


class Packaging(TestCase):
    """What ``pip install .`` ships. Builds a wheel (about 5-10 s)."""

    timeout = 300

    def test_wheel_ships_plugin_and_twistd_finds_it(self) -> None:
        work = tempfile.mkdtemp(prefix="autogpt-ws-wheel-")
        self.addCleanup(shutil.rmtree, work, True)
        source = os.path.join(work, "src")
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
        os.makedirs(os.path.join(source, "twisted"))
        shutil.copytree(os.path.join(ROOT, "autogpt_ws"), os.path.join(source, "autogpt_ws"), ignore=ignore)
        shutil.copytree(os.path.join(ROOT, "twisted", "plugins"), os.path.join(source, "twisted", "plugins"), ignore=ignore)
        for name in ("setup.cfg", "setup.py", "README.md", "ws.py"):
            shutil.copy(os.path.join(ROOT, name), source)
        dist = os.path.join(work, "dist")
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source],
                               capture_output=True, text=True, timeout=240, env=clean_env())
        self.assertEqual(build.returncode, 0, build.stdout + build.stderr)
        wheels = [name for name in os.listdir(dist) if name.endswith(".whl")]
        self.assertEqual(len(wheels), 1, wheels)
        with zipfile.ZipFile(os.path.join(dist, wheels[0])) as wheel:
            names = wheel.namelist()
            entry_points = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
            installed = os.path.join(work, "site")
            wheel.extractall(installed)
        self.assertIn("twisted/plugins/autogpt_ws_plugin.py", names)
        self.assertIn("autogpt_ws/running/tap.py", names)
        self.assertIn("autogpt_ws/bus/memory.py", names)
        self.assertEqual([n for n in names if n.startswith("twisted/") and n.endswith("__init__.py")], [])
        self.assertEqual([n for n in names if "dropin.cache" in n or "/tests/" in n or n.startswith("tests/")], [])
        self.assertIn("autogpt-ws = autogpt_ws.running.cli:main", entry_points)
        # twistd --help, importing only the unpacked wheel and the
        # dependencies (-S: no .pth, so no editable checkout on the path)
        paths = [installed, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        script = ("import sys; sys.argv = ['twistd', '--help']; import autogpt_ws; print(autogpt_ws.__file__); "
                  "from twisted.scripts.twistd import run; run()")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(paths)}
        run = subprocess.run([sys.executable, "-S", "-c", script], cwd=work, env=env,
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        self.assertTrue(run.stdout.startswith(os.path.join(installed, "autogpt_ws")), run.stdout[:300])
        self.assertIn("autogpt-ws", run.stdout)
        self.assertIn("The AutoGPT real-time WebSocket server.", run.stdout)
