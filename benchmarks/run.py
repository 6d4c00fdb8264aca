#!/usr/bin/env python3
"""The autogpt-ws benchmark suite: one command, a table of ratios.

    python benchmarks/run.py [--quick] [--peer] [--runs N] [--only fanout,ignored,setup,storm,memory,workers]

Starts our server (and with ``--peer`` the reference peer of
../shared/bench, in a venv it makes under benchmarks/.peer-venv), each
pinned to core 0 with ``taskset -c 0`` and each with its own redis-server on
a free loopback port and its own load client (benchmarks/client/load.mjs,
plain Node, no dependencies), the clients and Redis pinned to core 1.  Each
scenario has one warm-up run, then ``--runs`` measured runs, ours and the
peer alternating run by run; the table shows medians, and the ratio
ours/peer.  Results also go to benchmarks/results/<time>.json.  See
benchmarks/RESULTS.md for what each row means.

Nothing here ever points load at anything but 127.0.0.1, or uses the
machine's own Redis.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Generator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED_BENCH = os.path.normpath(os.path.join(ROOT, "..", "shared", "bench"))
PEER_VENV = os.path.join(HERE, ".peer-venv")
CLIENT = os.path.join(HERE, "client", "load.mjs")
RESULTS = os.path.join(HERE, "results")
HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

SERVER_CORE = "0"
CLIENT_CORE = "1"

# a scenario: one measured run per step, its results when done
Steps = Generator[None, None, "dict[str, list[float]]"]


# -- sizes ---------------------------------------------------------------------


@dataclass
class Sizes:
    conns: int = 1000          # fan-out sockets
    channels: int = 10         # executions they subscribe to
    burst_events: int = 1000   # events per burst
    rate_deliveries: int = 20000  # steady deliveries/s
    rate_secs: float = 10.0
    ignored_events: int = 100000
    setup_conns: int = 2000    # sockets opened to measure setup cost
    setup_conc: int = 100      # handshakes in flight
    storm_conns: int = 5000
    storm_spread_ms: int = 1000
    idle_conns: int = 10000    # memory per idle subscribed socket
    runs: int = 5


QUICK = dict(rate_secs=3.0, ignored_events=20000, setup_conns=1000, storm_conns=2000, idle_conns=2000, runs=2)


# -- processes -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") and os.cpu_count() and os.cpu_count() >= 2 else argv


def cpu_ticks(pid: int) -> float:
    """CPU time of a process in clock ticks (1/HZ s): nanosecond run time
    summed over its threads (/proc/PID/task/*/schedstat), else utime+stime
    from /proc/PID/stat (cpuof.sh's measure, 10 ms resolution)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                total += int(handle.read().split()[0])
        return total * HZ / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def children_of(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, ValueError):
                pass
    return found


CGROUP_CPU = "/sys/fs/cgroup/cpu"  # cgroup v1 cpu controller (needs root)
CAP_PERIOD_US = 10000  # short periods keep the throttling smooth


class CpuCap:
    """A share of one core for one process: a cgroup-v1 CFS quota of
    ``percent``% per 10 ms, and every thread pinned to ``core``."""

    def __init__(self, name: str, percent: float) -> None:
        self.path = os.path.join(CGROUP_CPU, f"autogpt-ws-bench-{os.getpid()}-{name}")
        os.makedirs(self.path, exist_ok=True)
        self._write("cpu.cfs_period_us", CAP_PERIOD_US)
        self._write("cpu.cfs_quota_us", int(CAP_PERIOD_US * percent / 100))

    def _write(self, name: str, value: int) -> None:
        with open(os.path.join(self.path, name), "w") as handle:
            handle.write(str(value))

    def add(self, pid: int, core: int) -> None:
        self._write("cgroup.procs", pid)
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {core})

    def close(self) -> None:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as handle:
                left = [int(x) for x in handle.read().split()]
            for pid in left:  # processes still alive go back to the root group
                with open(os.path.join(CGROUP_CPU, "cgroup.procs"), "w") as handle:
                    handle.write(str(pid))
            os.rmdir(self.path)
        except OSError:
            pass


def can_cap_cpu() -> str:
    """Why CPU caps are unavailable here, or "" when they are."""
    if not os.path.isfile(os.path.join(CGROUP_CPU, "cpu.cfs_quota_us")):
        return f"no cgroup-v1 cpu controller at {CGROUP_CPU}"
    if not os.access(CGROUP_CPU, os.W_OK):
        return f"{CGROUP_CPU} is not writable (run as root)"
    return ""


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def wait_port(port: int, timeout: float = 30.0, path: bytes = b"/") -> None:
    """Wait for an HTTP 200 on path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"GET " + path + b" HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                head = sock.recv(64)
                if head.startswith(b"HTTP/1.") and head[9:12] == b"200":
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port} within {timeout}s")


def wait_redis(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def redis_subscribers(port: int) -> int:
    """Connections holding a pattern subscription (a server's bus)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"*2\r\n$6\r\nCLIENT\r\n$4\r\nLIST\r\n")
        data = b""
        while b"\r\n" not in data:
            data += sock.recv(65536)
        head, _, data = data.partition(b"\r\n")
        size = int(head[1:])
        while len(data) < size:
            data += sock.recv(65536)
    return sum(1 for line in data.split(b"\n") if b" psub=" in line and b" psub=0 " not in line)


class Redis:
    def __init__(self, logdir: str) -> None:
        self.port = free_port()
        self.dir = logdir
        self.proc = subprocess.Popen(
            pinned(CLIENT_CORE, ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", logdir, "--client-output-buffer-limit", "pubsub 0 0 0",
                                 "--maxclients", "1000"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_redis(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Server:
    """One server process pinned to the server core."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, redis: Redis, logdir: str,
                 processes: int = 1, cores: str | None = None) -> None:
        self.name = name
        self.processes = processes
        self.port = port
        self.log_path = os.path.join(logdir, f"{name}-{port}.log")
        self.log = open(self.log_path, "wb")
        subs_before = redis_subscribers(redis.port)
        self.proc = subprocess.Popen(pinned(cores or SERVER_CORE, argv), env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True)
        wait_port(port)
        deadline = time.monotonic() + 20
        while redis_subscribers(redis.port) < subs_before + processes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} never subscribed to Redis (see {self.log_path})")
            time.sleep(0.05)

        self.pids = [self.proc.pid] + (children_of(self.proc.pid) if processes > 1 else [])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        """CPU ticks of the server: its process, and its workers if any."""
        total = 0.0
        for pid in self.pids:
            try:
                total += cpu_ticks(pid)
            except OSError:
                pass
        return total

    def settle(self, quiet_ms: int = 200, cap: float = 10.0) -> None:
        """Wait until the server spends less than a tick per quiet_ms."""
        deadline = time.monotonic() + cap
        last = self.cpu()
        while time.monotonic() < deadline:
            time.sleep(quiet_ms / 1000)
            now = self.cpu()
            if now - last <= 1:
                return
            last = now

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def ours(port: int, redis: Redis, logdir: str, extra: list[str], workers: int = 1,
         cores: str | None = None) -> Server:
    """Our server (ws.py)."""
    env = dict(os.environ)
    env.update({
        "ENABLE_AUTH": "false", "EVENT_BUS": "redis", "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis.port),
        "LOG_LEVEL": "warn",
        # all bench sockets are the one default user: lift the per-user cap
        "WS_MAX_CONNECTIONS_PER_USER": "0", "WS_MAX_CONNECTIONS": "0",
    })
    for key in ("AUTOGPT_WS_CONFIG", "AUTOGPT_WS_LISTEN", "WEBSOCKET_SERVER_PORT", "WEBSOCKET_SERVER_HOST"):
        env.pop(key, None)
    python = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(python):
        python = sys.executable
    argv = [python, os.path.join(ROOT, "ws.py"), "--host", "127.0.0.1", "--port", str(port), *extra]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return Server("ours" if workers == 1 else f"ours-{workers}w", argv, env, port, redis, logdir, workers, cores)


def peer(port: int, redis: Redis, logdir: str) -> Server:
    env = dict(os.environ, REDIS_PORT=str(redis.port))
    argv = [os.path.join(PEER_VENV, "bin", "python"), os.path.join(SHARED_BENCH, "peer_upstream.py"), str(port)]
    return Server("peer", argv, env, port, redis, logdir)


def ensure_peer_venv() -> None:
    req = os.path.join(SHARED_BENCH, "requirements-peer.txt")
    with open(req, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    marker = os.path.join(PEER_VENV, ".requirements-sha256")
    if os.path.exists(marker) and open(marker).read().strip() == digest:
        return
    print(f"creating the peer's venv in {PEER_VENV} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", PEER_VENV], check=True)
    subprocess.run([os.path.join(PEER_VENV, "bin", "pip"), "install", "-q", "-r", req], check=True,
                   stderr=subprocess.DEVNULL)
    with open(marker, "w") as handle:
        handle.write(digest)


class Client:
    """The load agent, pinned to the client core; one JSON line per command."""

    def __init__(self, server: Server, redis: Redis) -> None:
        self.server = server
        self.redis = redis
        self.proc = subprocess.Popen(pinned(CLIENT_CORE, ["node", CLIENT, "--port", str(server.port),
                                                          "--redis", str(redis.port)]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self._read()
        assert ready.get("ready"), ready
        # one socket must open and subscribe, or nothing below means anything
        probe = self.run(cmd="open", n=1, channels=1, conc=1, attempts=1)
        self.run(cmd="closeall")
        if probe["acked"] != 1:
            self.close()
            raise RuntimeError(f"{server.name} does not accept a subscription (see {server.log_path})")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("load client exited")
        return json.loads(line)

    def run(self, **cmd: Any) -> dict[str, Any]:
        """Send one command; return its answer plus the server's CPU
        seconds, wall seconds and RSS change over it."""
        assert self.proc.stdin is not None
        t0, c0, r0 = time.monotonic(), self.server.cpu(), cpu_ticks(self.redis.proc.pid)
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        out["server_cpu_s"] = (self.server.cpu() - c0) / HZ
        out["redis_cpu_s"] = (cpu_ticks(self.redis.proc.pid) - r0) / HZ
        out["server_wall_s"] = time.monotonic() - t0
        if "error" in out:
            raise RuntimeError(f"client: {out['error']}")
        return out

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)


# -- scenarios -----------------------------------------------------------------


def util(out: dict[str, Any]) -> tuple[float, float]:
    """(server core busy %, client core busy %) over a step; the client
    core runs the load client and Redis."""
    wall = max(out["server_wall_s"], 1e-9)
    return 100 * out["server_cpu_s"] / wall, 100 * (out["cpu_ms"] / 1000 + out["redis_cpu_s"]) / wall


def fanout(c: Client, s: Sizes, log: Any) -> Steps:
    """Burst throughput, deliveries per server CPU-second; then steady-rate
    latency on the same sockets."""
    res: dict[str, list[float]] = {k: [] for k in (
        "burst_msgs_per_s", "burst_deliveries_per_cpu_s", "burst_server_cpu_pct", "burst_client_cpu_pct",
        "burst_client_capacity",
        "rate_p50_ms", "rate_p99_ms", "rate_achieved", "rate_server_cpu_pct", "rate_client_cpu_pct")}
    opened = c.run(cmd="open", n=s.conns, channels=s.channels, conc=200)
    log(f"  opened {opened['acked']}/{s.conns} sockets in {opened['secs']}s")
    c.server.settle()
    for i in range(s.runs + 1):
        out = c.run(cmd="burst", events=s.burst_events, channels=s.channels)
        if not out["complete"]:
            log(f"  burst incomplete: {out['received']}/{out['expected']}")
        scpu, ccpu = util(out)
        log(f"  burst {'warm-up' if i == 0 else i}: {out['msgs_per_s']} msgs/s, server {out['server_cpu_s']:.2f} cpu-s "
            f"({scpu:.0f}% core), client {ccpu:.0f}% core")
        if i:
            res["burst_msgs_per_s"].append(out["msgs_per_s"])
            res["burst_deliveries_per_cpu_s"].append(out["received"] / max(out["server_cpu_s"], 1 / HZ))
            res["burst_server_cpu_pct"].append(scpu)
            res["burst_client_cpu_pct"].append(ccpu)
            # what the client core could absorb if it did nothing else: its
            # own and Redis's CPU per delivery, publishing included
            res["burst_client_capacity"].append(out["received"] / max(out["cpu_ms"] / 1000 + out["redis_cpu_s"], 1e-3))
        c.server.settle()
        yield
    rate = s.rate_deliveries / (s.conns / s.channels)  # events/s
    for i in range(s.runs + 1):
        secs = 1.0 if i == 0 else s.rate_secs
        out = c.run(cmd="burst", events=int(rate * secs), channels=s.channels, rate=rate)
        scpu, ccpu = util(out)
        log(f"  steady {s.rate_deliveries}/s {'warm-up' if i == 0 else i}: p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, "
            f"max {out['max_ms']} ms, achieved {out['msgs_per_s']}/s, server {scpu:.0f}%, client {ccpu:.0f}%")
        if i:
            res["rate_p50_ms"].append(out["p50_ms"])
            res["rate_p99_ms"].append(out["p99_ms"])
            res["rate_achieved"].append(out["msgs_per_s"])
            res["rate_server_cpu_pct"].append(scpu)
            res["rate_client_cpu_pct"].append(ccpu)
        c.server.settle()
        yield
    return res


def ignored(c: Client, s: Sizes, log: Any) -> Steps:
    res: dict[str, list[float]] = {"ignored_us_per_event": [], "ignored_client_cpu_pct": []}
    for i in range(s.runs + 1):
        events = s.ignored_events if i else s.ignored_events // 5
        out = c.run(cmd="ignore", events=events)
        us = out["server_cpu_s"] / events * 1e6
        _, ccpu = util(out)
        log(f"  ignored {'warm-up' if i == 0 else i}: {events} events, {us:.2f} us server CPU each, "
            f"handled in {out['handled_s']}s, client {ccpu:.0f}%")
        if i:
            res["ignored_us_per_event"].append(us)
            res["ignored_client_cpu_pct"].append(ccpu)
        c.server.settle()
        yield
    return res


def setup(c: Client, s: Sizes, log: Any) -> Steps:
    res: dict[str, list[float]] = {k: [] for k in (
        "setup_per_cpu_s", "setup_per_s", "setup_retries", "setup_client_cpu_pct")}
    c.run(cmd="closeall")
    c.server.settle()
    for i in range(s.runs + 1):
        n = s.setup_conns if i else s.setup_conns // 4
        out = c.run(cmd="open", n=n, channels=s.channels, conc=s.setup_conc)
        _, ccpu = util(out)
        per_cpu = out["acked"] / max(out["server_cpu_s"], 1 / HZ)
        log(f"  setup {'warm-up' if i == 0 else i}: {out['acked']}/{n} in {out['secs']}s "
            f"({out['acked'] / max(out['secs'], 1e-9):.0f}/s), {per_cpu:.0f} per server cpu-s, "
            f"{out['retries']} retries, client {ccpu:.0f}%")
        if i:
            res["setup_per_cpu_s"].append(per_cpu)
            res["setup_per_s"].append(out["acked"] / max(out["secs"], 1e-9))
            res["setup_retries"].append(out["retries"])
            res["setup_client_cpu_pct"].append(ccpu)
        c.run(cmd="closeall")
        c.server.settle()
        yield
    return res


def storm(c: Client, s: Sizes, log: Any) -> Steps:
    res: dict[str, list[float]] = {"storm_all_back_s": [], "storm_retries": []}
    c.run(cmd="closeall")
    c.server.settle()
    opened = c.run(cmd="open", n=s.storm_conns, channels=s.channels, conc=200)
    log(f"  storm: {opened['acked']}/{s.storm_conns} sockets open")
    c.server.settle()
    for i in range(s.runs + 1):
        out = c.run(cmd="drop", spread=s.storm_spread_ms)
        log(f"  storm {'warm-up' if i == 0 else i}: {out['acked']}/{out['sockets']} back and subscribed "
            f"{out['all_back_s']}s after the drop, {out['retries']} retries, {out['failed']} failed")
        if i:
            res["storm_all_back_s"].append(out["all_back_s"] if not out["failed"] else float("inf"))
            res["storm_retries"].append(out["retries"])
        c.server.settle()
        yield
    c.run(cmd="closeall")
    return res


def memory(make: Any, redis: Redis, s: Sizes, log: Any) -> Steps:
    """A fresh server per run: warm up with a few sockets, then RSS before
    and after idle_conns subscribed sockets."""
    res: dict[str, list[float]] = {"idle_kb_per_socket": []}
    for i in range(max(1, min(s.runs, 3))):
        server = make()
        c = Client(server, redis)
        try:
            c.run(cmd="open", n=200, channels=s.channels, conc=100)
            c.run(cmd="closeall")
            server.settle()
            time.sleep(0.5)
            before = rss_bytes(server.pid)
            out = c.run(cmd="open", n=s.idle_conns, channels=s.channels, conc=200)
            server.settle()
            time.sleep(2.0)
            after = rss_bytes(server.pid)
            kb = (after - before) / max(out["acked"], 1) / 1024
            log(f"  memory {i + 1}: {out['acked']} idle sockets, RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, "
                f"{kb:.1f} KiB per socket")
            res["idle_kb_per_socket"].append(kb)
        finally:
            c.close()
            server.stop()
        yield
    return res


def workers(make: Any, redis: Redis, s: Sizes, log: Any, quota: float = 0.0) -> dict[str, list[float]]:
    """Fan-out burst with 1 and with 2 workers (SO_REUSEPORT) on the
    workers' cores.  Throughput scaling needs a core per worker plus the
    client's: on a 2-core machine both runs share one core, and what
    stays meaningful is the efficiency (deliveries per server CPU-second,
    all workers summed).

    With ``quota`` (percent of a core), every worker instead gets that
    share of its own core: the single worker on core 0, the two workers on
    cores 0 and 1 (a CFS quota each, see CpuCap).  This emulates "a core
    per worker" with cores slower than the client's, so that the client and
    Redis keep enough CPU on a 2-core machine; what it checks is whether a
    second worker doubles the capacity."""
    res: dict[str, list[float]] = {k: [] for k in (
        "w1_msgs_per_s", "w2_msgs_per_s", "w1_per_cpu_s", "w2_per_cpu_s", "workers_scaling", "workers_efficiency")}
    for n in (1, 2):
        server = make(n)
        caps: list[CpuCap] = []
        c = Client(server, redis)
        try:
            if quota:
                processes = [server.pid] if n == 1 else sorted(children_of(server.pid))
                assert len(processes) == n, processes
                for core, pid in enumerate(processes):
                    cap = CpuCap(f"w{core}", quota)
                    caps.append(cap)
                    cap.add(pid, core)
            c.run(cmd="open", n=s.conns, channels=s.channels, conc=200)
            server.settle()
            for i in range(s.runs + 1):
                out = c.run(cmd="burst", events=s.burst_events, channels=s.channels)
                per_cpu = out["received"] / max(out["server_cpu_s"], 1 / HZ)
                scpu, ccpu = util(out)
                log(f"  {n} worker{'s' if n > 1 else ''} burst {'warm-up' if i == 0 else i}: {out['msgs_per_s']} msgs/s, "
                    f"{per_cpu:,.0f} per server cpu-s, server {scpu:.0f}% of a core, client {ccpu:.0f}%")
                if i:
                    res[f"w{n}_msgs_per_s"].append(out["msgs_per_s"])
                    res[f"w{n}_per_cpu_s"].append(per_cpu)
                server.settle()
        finally:
            c.close()
            server.stop()
            for cap in caps:
                cap.close()
    for a, b in zip(res["w1_msgs_per_s"], res["w2_msgs_per_s"]):
        res["workers_scaling"].append(b / a)
    for a, b in zip(res["w1_per_cpu_s"], res["w2_per_cpu_s"]):
        res["workers_efficiency"].append(b / a)
    return res


# -- the table -----------------------------------------------------------------

ROWS = [
    # key, label, unit, better ("high"/"low"), format
    ("burst_msgs_per_s", "fan-out burst, delivered msgs/s", "msg/s", "high", "{:,.0f}"),
    ("burst_deliveries_per_cpu_s", "fan-out burst, deliveries per server CPU-s", "msg/cpu-s", "high", "{:,.0f}"),
    ("burst_server_cpu_pct", "  server core busy during burst", "%", "", "{:.0f}"),
    ("burst_client_cpu_pct", "  client core busy during burst (client+redis)", "%", "", "{:.0f}"),
    ("burst_client_capacity", "  client core capacity (deliveries per client+redis CPU-s)", "msg/cpu-s", "", "{:,.0f}"),
    ("rate_p50_ms", "steady 20k deliveries/s: p50 publish->delivery", "ms", "low", "{:.2f}"),
    ("rate_p99_ms", "steady 20k deliveries/s: p99 publish->delivery", "ms", "low", "{:.2f}"),
    ("rate_server_cpu_pct", "  server core busy at 20k/s", "%", "low", "{:.0f}"),
    ("rate_client_cpu_pct", "  client core busy at 20k/s", "%", "", "{:.0f}"),
    ("idle_kb_per_socket", "memory per idle subscribed socket", "KiB", "low", "{:.1f}"),
    ("ignored_us_per_event", "CPU per ignored event", "us", "low", "{:.2f}"),
    ("ignored_client_cpu_pct", "  client core busy while publishing them", "%", "", "{:.0f}"),
    ("setup_per_cpu_s", "connection setup (handshake+subscribe) per server CPU-s", "conn/cpu-s", "high", "{:,.0f}"),
    ("setup_per_s", "  connection setup rate, wall clock", "conn/s", "high", "{:,.0f}"),
    ("setup_client_cpu_pct", "  client core busy during setup", "%", "", "{:.0f}"),
    ("storm_all_back_s", "reconnect storm: all back and subscribed after", "s", "low", "{:.2f}"),
    ("w1_msgs_per_s", "workers: 1 worker, burst msgs/s", "msg/s", "high", "{:,.0f}"),
    ("w2_msgs_per_s", "workers: 2 workers, burst msgs/s", "msg/s", "high", "{:,.0f}"),
    ("workers_scaling", "workers: 2 workers / 1 worker, msgs/s", "x", "high", "{:.2f}"),
    ("workers_efficiency", "workers: 2 / 1, deliveries per server CPU-s", "x", "high", "{:.2f}"),
]


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(x: float) -> str:
    """Below 1, three decimals: 0.102x and 0.095x, never both a rounded 0.10x."""
    return f"{x:.2f}x" if x >= 1 else f"{x:.3f}x"


def table(results: dict[str, dict[str, list[float]]], sizes: Sizes) -> str:
    names = list(results)
    mine = [n for n in names if n != "peer"] if "peer" in results else []
    head = ["metric", "unit"] + names + [f"{n}/peer" for n in mine]
    lines = []
    for key, label, unit, better, fmt in ROWS:
        if not any(key in results[n] for n in names):
            continue
        row = [label.replace("20k", f"{sizes.rate_deliveries // 1000}k"), unit]
        meds = {}
        for n in names:
            m = median(results[n].get(key, []))
            meds[n] = m
            row.append(fmt.format(m) if m is not None else "-")
        for n in mine:
            a, b = meds.get(n), meds.get("peer")
            row.append(ratio(a / b) if a is not None and b else "-")
        lines.append(row)
    widths = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in lines:
        out.append("| " + " | ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                                     for i, (c, w) in enumerate(zip(r, widths))) + " |")
    return "\n".join(out)


# -- main ----------------------------------------------------------------------


def alternate(steps: dict[str, Steps], results: dict[str, dict[str, list[float]]]) -> None:
    """Advance each server's scenario one run at a time, in turn, and file
    each one's results when it is done."""
    pending = dict(steps)
    while pending:
        for name, gen in list(pending.items()):
            try:
                next(gen)
            except StopIteration as done:
                results[name].update(done.value)
                del pending[name]

SCENARIOS = ("fanout", "ignored", "setup", "storm", "memory", "workers")
DEFAULT_SCENARIOS = ("fanout", "ignored", "setup", "storm", "memory")


def main(argv: list[str] | None = None) -> int:
    global SERVER_CORE, CLIENT_CORE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, 2 runs: about 1-2 minutes")
    p.add_argument("--peer", action="store_true", help="also run the reference peer (../shared/bench)")
    p.add_argument("--runs", type=int, help="measured runs per scenario (after one warm-up)")
    p.add_argument("--only", default=",".join(DEFAULT_SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all but workers)")
    p.add_argument("--server-core", default=SERVER_CORE, help="core(s) for the server under test (taskset -c)")
    p.add_argument("--client-core", default=CLIENT_CORE, help="core(s) for the load client and Redis")
    p.add_argument("--workers-cores", default=None,
                   help="cores for the workers scenario (default: every core but the client's)")
    p.add_argument("--workers-quota", type=float, default=0.0,
                   help="workers scenario: give each worker this percent of one core of its own "
                        "(worker i on core i, a cgroup CPU quota; needs root), e.g. 33")
    p.add_argument("--ours-arg", action="append", default=[], help="extra argument for our server (repeatable), "
                                                                      "e.g. --ours-arg=--set --ours-arg=catchup_enabled=false")
    p.add_argument("--no-ours", action="store_true", help="skip our server as it is")
    for f in Sizes.__dataclass_fields__:
        if f != "runs":
            p.add_argument("--" + f.replace("_", "-"), type=type(getattr(Sizes(), f)), help=f"(default {getattr(Sizes(), f)})")
    args = p.parse_args(argv)

    SERVER_CORE, CLIENT_CORE = args.server_core, args.client_core
    if args.workers_quota:
        why = can_cap_cpu()
        if why:
            p.error(f"--workers-quota: {why}")
        if not 0 < args.workers_quota <= 100:
            p.error("--workers-quota: a percent of one core, above 0 and at most 100")
    sizes = Sizes(**(QUICK if args.quick else {}))
    for f in Sizes.__dataclass_fields__:
        value = getattr(args, f, None)
        if value is not None:
            setattr(sizes, f, value)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    for name in only:
        if name not in SCENARIOS:
            p.error(f"unknown scenario {name!r}")
    for tool in ("node", "redis-server"):
        if not shutil.which(tool):
            p.error(f"{tool} is required")
    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks: stop servers, Redis

    signal.signal(signal.SIGTERM, terminated)
    nofile = raise_nofile()
    if nofile < sizes.idle_conns + 1000:
        print(f"warning: RLIMIT_NOFILE is {nofile}, below {sizes.idle_conns + 1000}", file=sys.stderr)
    if args.peer:
        ensure_peer_venv()

    os.makedirs(RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = os.path.join(RESULTS, f"logs-{stamp}")
    os.makedirs(logdir, exist_ok=True)
    load_before = os.getloadavg()
    started = time.time()

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"autogpt-ws benchmarks: {'quick' if args.quick else 'full'}, {sizes.runs} runs + 1 warm-up, "
        f"cores: server {SERVER_CORE}, client+redis {CLIENT_CORE}, load average {load_before[0]:.2f} "
        f"{load_before[1]:.2f} {load_before[2]:.2f}")
    names = ([] if args.no_ours else ["ours"]) + (["peer"] if args.peer else [])
    # each server gets its own Redis, so that both can stay up while only one
    # is driven: the runs alternate (ours, peer, ours, ...), and slow spells of
    # the machine hit both alike
    redises = {name: Redis(logdir) for name in names}
    makers = {
        "ours": lambda: ours(free_port(), redises["ours"], logdir, args.ours_arg),
        "peer": lambda: peer(free_port(), redises["peer"], logdir),
    }
    results: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    logs = {name: (lambda msg, name=name: log(f"{name}{msg}")) for name in names}
    servers: dict[str, Server] = {}
    clients: dict[str, Client] = {}
    try:
        if any(x in only for x in ("fanout", "ignored", "setup", "storm")):
            for name in names:
                servers[name] = makers[name]()
                clients[name] = Client(servers[name], redises[name])
            for scenario in ("fanout", "ignored", "setup", "storm"):
                if scenario not in only:
                    continue
                log(f"== {scenario}")
                if scenario == "ignored" and "fanout" not in only:
                    for c in clients.values():
                        c.run(cmd="open", n=1, channels=1, conc=1)
                run_steps = {"fanout": fanout, "ignored": ignored, "setup": setup, "storm": storm}[scenario]
                alternate({name: run_steps(clients[name], sizes, logs[name]) for name in names}, results)
            for name in names:
                clients.pop(name).close()
                servers.pop(name).stop()
        if "memory" in only:
            log("== memory")
            alternate({name: memory(makers[name], redises[name], sizes, logs[name]) for name in names}, results)
        if "workers" in only and "ours" in names:
            log("== workers")
            if args.workers_quota:
                cores = "0,1"  # each worker is then pinned to its own core
                log(f"  workers: each worker capped at {args.workers_quota:g}% of its own core "
                    "(worker i on core i); the client and Redis on core 1")
            else:
                cores = args.workers_cores or ",".join(
                    str(c) for c in sorted(os.sched_getaffinity(0)) if str(c) != CLIENT_CORE) or SERVER_CORE
                if len(cores.split(",")) < 2:
                    log(f"  workers: only core {cores} is free for the server: 1 and 2 workers share it, "
                        "so compare efficiency, not throughput (or see --workers-quota)")
            redis = redises["ours"]
            results["ours"].update(workers(
                lambda n: ours(free_port(), redis, logdir, args.ours_arg, workers=n, cores=cores),
                redis, sizes, log, args.workers_quota))
    finally:
        for c in clients.values():
            c.close()
        for server in servers.values():
            server.stop()
        for r in redises.values():
            r.stop()
    load_after = os.getloadavg()
    text = table(results, sizes)
    log("")
    log(text)
    log(f"\nload average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
        f"{os.cpu_count()} cores; took {time.time() - started:.0f}s")
    report = {
        "when": stamp, "argv": sys.argv, "sizes": sizes.__dict__, "load_before": load_before,
        "load_after": load_after, "cores": os.cpu_count(), "results": results,
        "medians": {n: {k: median(v) for k, v in r.items()} for n, r in results.items()}, "table": text,
    }
    path = os.path.join(RESULTS, f"{stamp}.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    log(f"results: {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
