"""``--workers N``: N real server processes on one port (SO_REUSEPORT),
supervised.  Runs the real ``ws.py`` with a real redis-server; which worker
serves a socket is read from /proc (each worker's established sockets)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, TestCase

from autogpt_ws.running.workers import ReusePortEndpoint, worker_argv
from tests.helpers import PYTHON, U, connect, free_port, redis_server, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WS_PY = os.path.join(ROOT, "ws.py")


# -- /proc: who serves what ------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _established_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    cols = line.split()
                    if cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except OSError:
            continue
    return inodes


def established(pid: int, port: int) -> int:
    """Established TCP sockets of process ``pid`` whose local port is ``port``."""
    inodes = _established_inodes(port)
    count = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


def bus_subscribers(redis: Any) -> int:
    """Connections of autogpt-ws buses holding their two PSUBSCRIBEs."""
    listing = redis.command("CLIENT", "LIST").decode("utf-8", "replace")
    return sum(1 for line in listing.splitlines() if "psub=2" in line)


class Supervised:
    """``python ws.py --workers N`` on a free port, killed at cleanup."""

    def __init__(self, test: TestCase, redis_port: int, workers: int = 2) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("reads /proc")
        self.port = free_port()
        args = [PYTHON, WS_PY, "--workers", str(workers), "--host", "127.0.0.1", "--port", str(self.port),
                "--event-bus", "redis", "--log-level", "warn",
                "--set", "enable_auth=false", "--set", f"redis_port={redis_port}", "--set", "redis_host=127.0.0.1",
                "--set", "max_connections_per_user=0", "--set", "shutdown_timeout=3"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOGPT_WS_", "WEBSOCKET_SERVER_"))}
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        test.addCleanup(self.kill)

    def workers(self) -> list[int]:
        return children_of(self.process.pid)

    def served(self) -> dict[int, int]:
        return {pid: established(pid, self.port) for pid in self.workers()}

    def accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.")
        except OSError:
            return False

    def kill(self) -> None:
        pids = self.workers()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.stderr is not None:
            self.process.stderr.close()


def node_event(graph_exec_id: str, n: int) -> bytes:
    return json.dumps({"payload": {
        "event_type": "node_execution_update", "user_id": U, "graph_id": "g1", "graph_version": 1,
        "graph_exec_id": graph_exec_id, "node_exec_id": f"ne-{n}", "node_id": "n1", "block_id": "b1",
        "status": "RUNNING", "input_data": {}, "output_data": {}, "add_time": None, "queue_time": None,
        "start_time": None, "end_time": None}}, separators=(",", ":")).encode()


class WorkerArgvTests(TestCase):
    def test_workers_option_removed(self) -> None:
        self.assertEqual(worker_argv(["--workers", "4", "-p", "9", "--workers=3", "-w2", "-w", "2", "--demo"]),
                         ["-p", "9", "--demo"])


class ReusePortTests(TestCase):
    @inlineCallbacks
    def test_two_listeners_one_port(self) -> None:
        """The endpoint binds with SO_REUSEPORT: two listen on one port;
        a plain endpoint on that port is refused."""
        first = yield ReusePortEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        self.addCleanup(first.stopListening)
        port = first.getHost().port
        second = yield ReusePortEndpoint(reactor, port, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        self.addCleanup(second.stopListening)
        self.assertEqual(second.getHost().port, port)
        with self.assertRaises(Exception):
            yield TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))


class SupervisorTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def start(self, workers: int = 2) -> Any:
        self.redis = redis_server(self)
        sup = Supervised(self, self.redis.port, workers)
        yield wait_for(lambda: len(sup.workers()) == workers and sup.accepts()
                       and bus_subscribers(self.redis) == workers, timeout=20, interval=0.1)
        return sup

    @inlineCallbacks
    def open(self, sup: Supervised, count: int, graph_exec_id: str = "e1") -> Any:
        clients = yield gatherResults([connect(sup.port, test=self) for _ in range(count)])
        replies = yield gatherResults([c.request(json.dumps(
            {"method": "subscribe_graph_execution", "data": {"graph_exec_id": graph_exec_id}})) for c in clients])
        for reply in replies:
            self.assertIn(b'"success":true', reply)
        return clients

    @inlineCallbacks
    def test_workers_share_the_port_and_each_has_its_bus(self) -> None:
        sup = yield self.start(2)
        clients = yield self.open(sup, 40)
        yield wait_for(lambda: sum(sup.served().values()) == 40, timeout=10)
        served = sup.served()
        self.assertEqual(len(served), 2)
        self.assertTrue(all(count > 0 for count in served.values()), served)
        # each worker has its own bus subscription: one publish reaches all 40
        self.redis.command("PUBLISH", f"execution_event/{U}/g1/e1", node_event("e1", 1))
        yield wait_for(lambda: all(len(c.messages) == 2 for c in clients), timeout=10)
        for c in clients:
            self.assertIn(b'"method":"node_execution_event"', c.messages[1])

    @inlineCallbacks
    def test_dead_worker_restarted_and_sigterm_stops_all(self) -> None:
        sup = yield self.start(2)
        before = sup.workers()
        os.kill(before[0], signal.SIGKILL)
        yield wait_for(lambda: len(sup.workers()) == 2 and before[0] not in sup.workers(), timeout=15, interval=0.1)
        yield wait_for(lambda: bus_subscribers(self.redis) == 2, timeout=15, interval=0.1)
        replacement = [pid for pid in sup.workers() if pid not in before][0]
        clients = yield self.open(sup, 40)
        yield wait_for(lambda: sum(sup.served().values()) == 40, timeout=10)
        self.assertGreater(sup.served()[replacement], 0, "the restarted worker accepts connections")

        workers = sup.workers()
        sup.process.send_signal(signal.SIGTERM)
        closes = yield gatherResults([c.closed for c in clients])
        self.assertEqual({code for code, _ in closes}, {1001})
        yield wait_for(lambda: sup.process.poll() is not None, timeout=20, interval=0.05)
        self.assertEqual(sup.process.returncode, 0)
        yield wait_for(lambda: not any(alive(pid) for pid in workers), timeout=5)

    def test_memory_bus_refused(self) -> None:
        result = subprocess.run([PYTHON, WS_PY, "--workers", "2", "--event-bus", "memory", "--set", "enable_auth=false",
                                 "--port", "0"], cwd=ROOT, capture_output=True, timeout=30)
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"shared event bus", result.stderr)
