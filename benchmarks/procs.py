"""Processes for the benchmark suite: the servers under test, the Redis (or
Redis Cluster) and database they use, the load client, and how to read a
process's CPU time and memory.  Used by run.py, curve.py and profile.py.

Nothing here ever points load at anything but loopback, or uses the
machine's own Redis or databases other than the ones it creates.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers")  # the reference peers (benchmarks/peers/README.md)
PEER_VENV = os.path.join(HERE, ".peer-venv")
SHARDED_PEER_VENV = os.path.join(HERE, ".peer-sharded-venv")
CLIENT = os.path.join(HERE, "client", "load.mjs")
RESULTS = os.path.join(HERE, "results")
HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

DEFAULT_USER = "3e53486c-cf57-477e-ba2a-cb02dc828e1a"  # every socket's user, auth off

# set by run.py's --server-core / --client-core
SERVER_CORE = "0"
CLIENT_CORE = "1"



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile(need: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (children inherit it) to ``need`` or more if
    allowed, else as far as the hard limit goes; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (max(need, 65536), hard):
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


def http_status(port: int, path: bytes = b"/") -> int:
    """The status of an HTTP/1.0 GET on 127.0.0.1:port (0: no answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"GET " + path + b" HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            head = sock.recv(64)
    except OSError:
        return 0
    return int(head[9:12]) if head.startswith(b"HTTP/1.") and head[9:12].isdigit() else 0


def wait_port(port: int, timeout: float = 30.0, path: bytes = b"/") -> None:
    """Wait for an HTTP 200 on path."""
    deadline = time.monotonic() + timeout
    while http_status(port, path) != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answered on 127.0.0.1:{port} within {timeout}s")
        time.sleep(0.1)


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



def redis_argv(port: int, workdir: str, *extra: str) -> list[str]:
    """A redis-server for the suite: loopback, no snapshots, no pub/sub
    output-buffer limit, pinned to the client core."""
    return pinned(CLIENT_CORE, ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", workdir, "--client-output-buffer-limit", "pubsub 0 0 0",
                                *extra])


class Redis:
    """One redis-server: the classic bus."""

    def __init__(self, logdir: str) -> None:
        self.port = free_port()
        self.dir = logdir
        self.proc = subprocess.Popen(redis_argv(self.port, logdir, "--maxclients", "1000"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pids = [self.proc.pid]
        self.client_args = ["--redis", str(self.port)]
        wait_redis(self.port)

    def subscribed(self, before: int, processes: int) -> Callable[[], bool]:
        """A server's readiness: its processes' pattern subscriptions are in."""
        return lambda: redis_subscribers(self.port) >= before + processes

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def redis_call(port: int, *args: str | int) -> Any:
    """One command on a fresh connection, its reply parsed (setup and
    counting only; hiredis from the project's venv)."""
    import hiredis

    reader = hiredis.Reader()
    parts = [str(a).encode() for a in args]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        while True:
            reply = reader.gets()
            if reply is not False:
                return reply
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"redis on {port} closed the connection")
            reader.feed(chunk)


def cluster_port() -> int:
    """A free port below 55536: a cluster node's bus port must fit in 16 bits
    too (port + 10000 unless --cluster-port; each node gets its own here)."""
    while True:
        port = free_port()
        if port < 55536:
            return port


class RedisCluster:
    """Three masters (no replicas) on free loopback ports below 55536, each
    with its own --cluster-port and its own directory, pinned to the client
    core like the classic Redis."""

    def __init__(self, maxclients: int = 10000) -> None:
        self.dir = tempfile.mkdtemp(prefix="autogpt-ws-bench-cluster-")
        self.ports = [cluster_port() for _ in range(3)]
        self.procs = []
        for port in self.ports:
            workdir = os.path.join(self.dir, str(port))
            os.makedirs(workdir)
            self.procs.append(subprocess.Popen(
                redis_argv(port, workdir, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                           "--cluster-port", str(cluster_port()), "--maxclients", str(maxclients)),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_redis(port)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in redis_call(p, "CLUSTER", "INFO") for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark's Redis Cluster did not become ok")
            time.sleep(0.1)
        self.pids = [p.pid for p in self.procs]
        self.port = self.ports[0]  # the seed
        self.client_args = ["--cluster", ",".join(map(str, self.ports))]

    def connections_from(self, pid: int) -> dict[int, int]:
        """Connections each node lists (CLIENT LIST) whose address is one of
        process ``pid``'s own sockets: the Redis connections it holds."""
        mine = local_ports(pid, set(self.ports))
        counts = {}
        for port in self.ports:
            listing = redis_call(port, "CLIENT", "LIST").decode()
            counts[port] = sum(1 for line in listing.splitlines()
                               if int(line.split(" addr=", 1)[1].split(" ", 1)[0].rpartition(":")[2]) in mine)
        return counts

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def local_ports(pid: int, remote_ports: set[int]) -> set[int]:
    """Local ports of process ``pid``'s TCP sockets connected to 127.0.0.1
    on one of ``remote_ports`` (from its fds and /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    with open(f"/proc/{pid}/net/tcp") as handle:
        next(handle)
        for line in handle:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "01" and inode in inodes and int(remote.split(":")[1], 16) in remote_ports:
                found.add(int(local.split(":")[1], 16))
    return found


class Database:
    """A PostgreSQL database of our own on the machine's server
    (127.0.0.1:5432, user postgres), holding AutoGPT's
    "platform"."AgentGraphExecution" with the rows the scenarios subscribe
    to; dropped by :meth:`drop`."""

    ADMIN_URL = os.environ.get("AUTOGPT_WS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
    TABLE = '"platform"."AgentGraphExecution"'

    def __init__(self) -> None:
        import psycopg

        self.psycopg = psycopg
        self.name = "autogpt_ws_bench_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        base = self.ADMIN_URL.rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}?schema=platform"  # as AutoGPT's DATABASE_URL
        self.conn = psycopg.connect(f"{base}/{self.name}", autocommit=True)
        self.conn.execute('CREATE SCHEMA "platform"')
        # the columns the lookups read, as AutoGPT's Prisma schema names them
        self.conn.execute(f'CREATE TABLE {self.TABLE} ("id" text PRIMARY KEY, "agentGraphId" text NOT NULL, '
                          '"userId" text NOT NULL, "isDeleted" boolean NOT NULL DEFAULT false)')

    def add(self, prefix: str, count: int, user_id: str) -> None:
        """Executions <prefix>0 .. <prefix><count-1>, execution <prefix>K of
        graph graph-K (how the load client names them)."""
        with self.conn.cursor().copy(f'COPY {self.TABLE} ("id", "agentGraphId", "userId") FROM STDIN') as copy:
            for k in range(count):
                copy.write_row((f"{prefix}{k}", f"graph-{k}", user_id))

    def drop(self) -> None:
        self.conn.close()
        with self.psycopg.connect(self.ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class Server:
    """One server process pinned to the server core; up once it answers
    HTTP 200 on / and ``ready()`` is true."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, logdir: str,
                 ready: Callable[[], bool] = lambda: True, processes: int = 1, cores: str | None = None) -> None:
        self.name = name
        self.processes = processes
        self.port = port
        self.log_path = os.path.join(logdir, f"{name}-{port}.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(pinned(cores or SERVER_CORE, argv), env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True)
        wait_port(port)
        deadline = time.monotonic() + 20
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not get ready (see {self.log_path})")
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
         cores: str | None = None, gc_log: str = "") -> Server:
    """Our server (ws.py) on the classic bus; with ``gc_log``, its
    collector's pauses are logged there (gclog.py)."""
    before = redis_subscribers(redis.port)
    return _ours(port, {"EVENT_BUS": "redis", "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis.port)},
                 logdir, extra, redis.subscribed(before, workers), workers, cores, gc_log)


def ours_cluster(port: int, cluster: RedisCluster, database: Database, logdir: str, extra: list[str]) -> Server:
    """Our server from AutoGPT's environment for its websocket service: a
    cluster seed in REDIS_HOST/REDIS_PORT, no EVENT_BUS (it asks the Redis
    what it is), DATABASE_URL with ?schema=platform."""
    return _ours(port, {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(cluster.port), "DATABASE_URL": database.url},
                 logdir, extra, lambda: http_status(port, b"/ready") == 200)


def _ours(port: int, bus_env: dict[str, str], logdir: str, extra: list[str], ready: Callable[[], bool],
          workers: int = 1, cores: str | None = None, gc_log: str = "") -> Server:
    env = dict(os.environ)
    for key in ("AUTOGPT_WS_CONFIG", "AUTOGPT_WS_LISTEN", "WEBSOCKET_SERVER_PORT", "WEBSOCKET_SERVER_HOST", "EVENT_BUS",
                "REDIS_URL", "REDIS_CLUSTER_HOST", "REDIS_CLUSTER_PORT", "DATABASE_URL"):
        env.pop(key, None)
    env.update({
        "ENABLE_AUTH": "false", "LOG_LEVEL": "warn",
        # all bench sockets are the one default user: lift the per-user cap
        "WS_MAX_CONNECTIONS_PER_USER": "0", "WS_MAX_CONNECTIONS": "0", **bus_env,
    })
    python = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(python):
        python = sys.executable
    wrapper = [os.path.join(HERE, "gclog.py"), gc_log] if gc_log else []
    argv = [python, *wrapper, os.path.join(ROOT, "ws.py"), "--host", "127.0.0.1", "--port", str(port), *extra]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return Server("ours" if workers == 1 else f"ours-{workers}w", argv, env, port, logdir, ready, workers, cores)


def peer(port: int, redis: Redis, logdir: str) -> Server:
    """The reference peer (peers/peer_upstream.py): classic bus."""
    env = dict(os.environ, REDIS_PORT=str(redis.port))
    argv = [os.path.join(PEER_VENV, "bin", "python"), os.path.join(PEERS, "peer_upstream.py"), str(port)]
    return Server("peer", argv, env, port, logdir, redis.subscribed(redis_subscribers(redis.port), 1))


def peer_sharded(port: int, cluster: RedisCluster, database: Database, logdir: str) -> Server:
    """The second reference peer (peers/peer_upstream_sharded.py):
    today's upstream design on the cluster, from the same environment."""
    env = dict(os.environ, REDIS_HOST="127.0.0.1", REDIS_PORT=str(cluster.port), DATABASE_URL=database.url)
    for key in ("REDIS_CLUSTER_HOST", "REDIS_CLUSTER_PORT"):
        env.pop(key, None)
    argv = [os.path.join(SHARDED_PEER_VENV, "bin", "python"), os.path.join(PEERS, "peer_upstream_sharded.py"),
            str(port)]
    return Server("peer", argv, env, port, logdir)


def ensure_venv(venv: str, requirements: str) -> None:
    """A venv with ``requirements`` installed, (re)built only when that
    file changed."""
    with open(requirements, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    marker = os.path.join(venv, ".requirements-sha256")
    if os.path.exists(marker) and open(marker).read().strip() == digest:
        return
    print(f"creating {venv} from {os.path.relpath(requirements, ROOT)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "-r", requirements], check=True,
                   stderr=subprocess.DEVNULL)
    with open(marker, "w") as handle:
        handle.write(digest)


def ensure_peer_venv() -> None:
    ensure_venv(PEER_VENV, os.path.join(PEERS, "requirements-peer.txt"))


def ensure_sharded_peer_venv() -> None:
    ensure_venv(SHARDED_PEER_VENV, os.path.join(PEERS, "requirements-peer-sharded.txt"))


class Client:
    """The load agent, pinned to the client core; one JSON line per command.
    ``bus`` is the Redis or the Redis Cluster it publishes to."""

    # more arguments for every load client (run.py --inflate-cache)
    extra_args: list[str] = []

    def __init__(self, server: Server, bus: Redis | RedisCluster, sources: int = 1, probe: dict[str, Any] | None = None) -> None:
        self.server = server
        self.redis = bus
        self.proc = subprocess.Popen(pinned(CLIENT_CORE, ["node", CLIENT, "--port", str(server.port), *bus.client_args,
                                                          "--sources", str(sources), *self.extra_args]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self._read()
        assert ready.get("ready"), ready
        # one socket must open and subscribe, or nothing below means anything
        probe = self.run(cmd="open", n=1, channels=1, conc=1, attempts=1, **(probe or {}))
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

    def bus_cpu(self) -> float:
        total = 0.0
        for pid in self.redis.pids:
            total += cpu_ticks(pid)
        return total

    def run(self, **cmd: Any) -> dict[str, Any]:
        """Send one command; return its answer plus the server's CPU
        seconds, wall seconds and RSS change over it."""
        assert self.proc.stdin is not None
        t0, c0, r0 = time.monotonic(), self.server.cpu(), self.bus_cpu()
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        out["server_cpu_s"] = (self.server.cpu() - c0) / HZ
        out["redis_cpu_s"] = (self.bus_cpu() - r0) / HZ
        out["server_wall_s"] = time.monotonic() - t0
        if "error" in out:
            raise RuntimeError(f"client: {out['error']}")
        for key in ("inflate_errors", "publish_errors", "mismatched"):
            if out.get(key):
                raise RuntimeError(f"client: {out[key]} {key.replace('_', ' ')} in {cmd}: {out}")
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
