"""The scenarios of the benchmark suite (run.py), one generator each: every
``yield`` ends one measured run, so that run.py can alternate the servers
run by run; the generator's return value is the rows it measured.

Three row sets, each under its own prefix:

- today's (no prefix): plain clients, the classic bus, small node events;
- ``deflate_``: clients offering permessage-deflate exactly as Chromium
  does, the classic bus, AutoGPT-like node events of some KB of text;
- ``cluster_``: plain clients, AutoGPT's Redis Cluster bus (SPUBLISH to
  both channels of an event, a database lookup per execution subscribe).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generator

from procs import HZ, Client, CpuCap, Redis, RedisCluster, Server, children_of, rss_bytes

# a scenario: one measured run per step, its results when done
Steps = Generator[None, None, "dict[str, list[float]]"]
Log = Callable[[str], None]


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
    # deflate clients
    event_size: int = 2000     # bytes of text in an AutoGPT-like node event (about 3.4 KB in all)
    deflate_burst_events: int = 300
    deflate_rate_deliveries: int = 5000
    deflate_idle_conns: int = 2000
    history_events: int = 20   # events each idle socket then receives ...
    history_size: int = 10000  # ... of this much text (about 13 KB each)
    # cluster bus
    cluster_rate_deliveries: int = 20000
    cluster_idle_conns: int = 5000
    # catch-up on the cluster bus: graph events, each execution one socket
    catchup_execs: int = 200
    catchup_events: int = 4000
    runs: int = 5


QUICK = dict(rate_secs=3.0, ignored_events=20000, setup_conns=1000, storm_conns=2000, idle_conns=2000,
             deflate_burst_events=100, deflate_idle_conns=1000, cluster_idle_conns=1000, catchup_events=1000, runs=2)

AUTOGPT = {"event": "autogpt"}  # the load client's AutoGPT-like node event


def util(out: dict[str, Any]) -> tuple[float, float]:
    """(server core busy %, client core busy %) over a step; the client
    core runs the load client and Redis."""
    wall = max(out["server_wall_s"], 1e-9)
    return 100 * out["server_cpu_s"] / wall, 100 * (out["cpu_ms"] / 1000 + out["redis_cpu_s"]) / wall


def rows(prefix: str, *names: str) -> dict[str, list[float]]:
    return {prefix + name: [] for name in names}


def open_sockets(c: Client, n: int, s: Sizes, log: Log, what: str = "", **cmd: Any) -> dict[str, Any]:
    opened = c.run(cmd="open", n=n, channels=s.channels, conc=200, **cmd)
    agreed = ", ".join(f"{k!r} x{v}" for k, v in opened.get("extensions", {}).items())
    log(f"  opened {opened['acked']}/{n} {what}sockets in {opened['secs']}s; Sec-WebSocket-Extensions answered: {agreed}")
    if opened["acked"] != n:
        raise RuntimeError(f"{c.server.name}: only {opened['acked']} of {n} sockets subscribed")
    c.server.settle()
    return opened


def verified(c: Client, s: Sizes, log: Log, events: int = 100, **event: Any) -> None:
    """Every delivery of one burst parsed as JSON and compared with what was
    published (the client raises on a mismatch or a frame that does not
    inflate); before any measured run."""
    out = c.run(cmd="burst", events=events, channels=s.channels, verify=True, **event)
    if not out["complete"] or out["verified"] != out["expected"]:
        raise RuntimeError(f"{c.server.name}: verified {out['verified']} of {out['expected']} deliveries: {out}")
    log(f"  verified: all {out['verified']} deliveries parsed (inflated if compressed) and equal to what was published")
    c.server.settle()


def bursts(c: Client, s: Sizes, log: Log, res: dict[str, list[float]], prefix: str, events: int,
           **event: Any) -> Generator[None, None, None]:
    """A warm-up and s.runs bursts of ``events`` events, published at once."""
    for i in range(s.runs + 1):
        out = c.run(cmd="burst", events=events, channels=s.channels, **event)
        if not out["complete"]:
            log(f"  burst incomplete: {out['received']}/{out['expected']}")
        scpu, ccpu = util(out)
        got = max(out["received"], 1)
        log(f"  {prefix}burst {'warm-up' if i == 0 else i}: {out['msgs_per_s']} msgs/s, server {out['server_cpu_s']:.2f} "
            f"cpu-s ({scpu:.0f}% core), client {ccpu:.0f}% core ({out['cpu_ms'] * 1000 / got:.1f} us per delivery), "
            f"{out['wire_bytes'] / got:,.0f} bytes on the wire "
            f"per delivery ({out['payload_bytes'] / got:,.0f} of payload)")
        if i:
            res[prefix + "burst_msgs_per_s"].append(out["msgs_per_s"])
            res[prefix + "burst_deliveries_per_cpu_s"].append(out["received"] / max(out["server_cpu_s"], 1 / HZ))
            res[prefix + "burst_server_cpu_pct"].append(scpu)
            res[prefix + "burst_client_cpu_pct"].append(ccpu)
            # what the client core could absorb if it did nothing else: its
            # own and Redis's CPU per delivery, publishing included
            res[prefix + "burst_client_capacity"].append(out["received"] / max(out["cpu_ms"] / 1000 + out["redis_cpu_s"], 1e-3))
            res[prefix + "burst_client_us"].append(out["cpu_ms"] * 1000 / got)
            res[prefix + "wire_bytes"].append(out["wire_bytes"] / got)
            res[prefix + "payload_bytes"].append(out["payload_bytes"] / got)
        c.server.settle()
        yield


BURST_ROWS = ("burst_msgs_per_s", "burst_deliveries_per_cpu_s", "burst_server_cpu_pct", "burst_client_cpu_pct",
              "burst_client_capacity", "burst_client_us", "wire_bytes", "payload_bytes")
RATE_ROWS = ("rate_p50_ms", "rate_p99_ms", "rate_achieved", "rate_server_cpu_pct", "rate_client_cpu_pct")
SETUP_ROWS = ("setup_per_cpu_s", "setup_per_s", "setup_retries", "setup_client_cpu_pct")


def steady(c: Client, s: Sizes, log: Log, res: dict[str, list[float]], prefix: str, deliveries: int,
           **event: Any) -> Generator[None, None, None]:
    """A warm-up second and s.runs spells of s.rate_secs at ``deliveries``
    per second, on the open sockets."""
    rate = deliveries / (s.conns / s.channels)  # events/s
    for i in range(s.runs + 1):
        secs = 1.0 if i == 0 else s.rate_secs
        out = c.run(cmd="burst", events=int(rate * secs), channels=s.channels, rate=rate, **event)
        scpu, ccpu = util(out)
        log(f"  {prefix}steady {deliveries}/s {'warm-up' if i == 0 else i}: p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, "
            f"max {out['max_ms']} ms, achieved {out['msgs_per_s']}/s, server {scpu:.0f}%, client {ccpu:.0f}%")
        if i:
            res[prefix + "rate_p50_ms"].append(out["p50_ms"])
            res[prefix + "rate_p99_ms"].append(out["p99_ms"])
            res[prefix + "rate_achieved"].append(out["msgs_per_s"])
            res[prefix + "rate_server_cpu_pct"].append(scpu)
            res[prefix + "rate_client_cpu_pct"].append(ccpu)
        c.server.settle()
        yield


def setups(c: Client, s: Sizes, log: Log, res: dict[str, list[float]], prefix: str,
           prefix_of_run: Callable[[int], str] | None = None, **cmd: Any) -> Generator[None, None, None]:
    """A warm-up and s.runs of s.setup_conns new sockets, s.setup_conc in
    flight, each upgrading, subscribing once and waiting for the reply.
    With ``prefix_of_run``, every socket of run i subscribes to its own
    execution <prefix_of_run(i)><k>: a lookup no cache has seen."""
    c.run(cmd="closeall")
    c.server.settle()
    for i in range(s.runs + 1):
        n = s.setup_conns if i else s.setup_conns // 4
        own = dict(channels=n, prefix=prefix_of_run(i)) if prefix_of_run else dict(channels=s.channels)
        out = c.run(cmd="open", n=n, conc=s.setup_conc, **own, **cmd)
        _, ccpu = util(out)
        per_cpu = out["acked"] / max(out["server_cpu_s"], 1 / HZ)
        log(f"  {prefix}setup {'warm-up' if i == 0 else i}: {out['acked']}/{n} in {out['secs']}s "
            f"({out['acked'] / max(out['secs'], 1e-9):.0f}/s), {per_cpu:.0f} per server cpu-s, "
            f"{out['retries']} retries, client {ccpu:.0f}%")
        if i:
            res[prefix + "setup_per_cpu_s"].append(per_cpu)
            res[prefix + "setup_per_s"].append(out["acked"] / max(out["secs"], 1e-9))
            res[prefix + "setup_retries"].append(out["retries"])
            res[prefix + "setup_client_cpu_pct"].append(ccpu)
        c.run(cmd="closeall")
        c.server.settle()
        yield


# -- today's rows: plain clients, classic bus ------------------------------------


def fanout(c: Client, s: Sizes, log: Log) -> Steps:
    """Burst throughput, deliveries per server CPU-second; then steady-rate
    latency on the same sockets."""
    res = rows("", *BURST_ROWS, *RATE_ROWS)
    open_sockets(c, s.conns, s, log)
    verified(c, s, log)
    yield from bursts(c, s, log, res, "", s.burst_events)
    yield from steady(c, s, log, res, "", s.rate_deliveries)
    return res


def ignored(c: Client, s: Sizes, log: Log) -> Steps:
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


def setup(c: Client, s: Sizes, log: Log) -> Steps:
    res = rows("", *SETUP_ROWS)
    yield from setups(c, s, log, res, "")
    return res


def storm(c: Client, s: Sizes, log: Log) -> Steps:
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


def memory(make: Callable[[], Server], bus: Redis | RedisCluster, s: Sizes, log: Log, prefix: str = "",
           conns: int | None = None, deflate: bool = False, history: bool = False) -> Steps:
    """A fresh server per run: warm up with a few sockets, then RSS before
    and after ``conns`` subscribed sockets, idle.  With ``history``, each of
    them then receives s.history_events AutoGPT-like events of
    s.history_size bytes of text, and the RSS is read again (a socket that
    compresses keeps state that grows with use)."""
    conns = conns or s.idle_conns
    res = rows(prefix, "idle_kb_per_socket", *(["history_kb_per_socket"] if history else []))
    for i in range(max(1, min(s.runs, 3))):
        server = make()
        c = Client(server, bus)
        try:
            c.run(cmd="open", n=200, channels=s.channels, conc=100, deflate=deflate)
            c.run(cmd="closeall")
            server.settle()
            time.sleep(0.5)
            before = rss_bytes(server.pid)
            out = c.run(cmd="open", n=conns, channels=s.channels, conc=200, deflate=deflate)
            server.settle()
            time.sleep(2.0)
            after = rss_bytes(server.pid)
            n = max(out["acked"], 1)
            kb = (after - before) / n / 1024
            log(f"  {prefix}memory {i + 1}: {out['acked']} idle sockets, RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, "
                f"{kb:.1f} KiB per socket")
            res[prefix + "idle_kb_per_socket"].append(kb)
            if history:
                # one event per execution at a time: a server slow to
                # compress is never handed a backlog of many seconds (behind
                # which its bus connection's PING reply would wait)
                got = size = 0
                for _ in range(s.history_events):
                    sent = c.run(cmd="burst", events=s.channels, channels=s.channels, size=s.history_size,
                                 timeout=600, **AUTOGPT)
                    got += sent["received"]
                    size = sent["payload_bytes"] // max(sent["received"], 1)
                server.settle()
                time.sleep(2.0)
                later = rss_bytes(server.pid)
                kb = (later - before) / n / 1024
                log(f"  {prefix}memory {i + 1}: after {got / n:.0f} events of {size:,} bytes each, "
                    f"RSS {later / 2**20:.1f} MiB, {kb:.1f} KiB per socket")
                res[prefix + "history_kb_per_socket"].append(kb)
        finally:
            c.close()
            server.stop()
        yield
    return res


def workers(make: Any, redis: Redis, s: Sizes, log: Log, quota: float = 0.0) -> dict[str, list[float]]:
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


# -- deflate clients (Chromium's offer), classic bus, AutoGPT-like events --------


def deflate(c: Client, s: Sizes, log: Log) -> Steps:
    """With clients offering permessage-deflate as Chromium does: a burst
    and a steady rate of AutoGPT-like events (every compressed frame
    inflated by the client), then the same bursts to plain clients (the
    same events without deflate: what compression costs this server), then
    connection setup with the offer."""
    res = rows("deflate_", *BURST_ROWS, *RATE_ROWS, *SETUP_ROWS)
    res.update(rows("deflate_plain_", *BURST_ROWS))
    event = dict(size=s.event_size, **AUTOGPT)
    c.run(cmd="closeall")
    open_sockets(c, s.conns, s, log, "deflate ", deflate=True)
    verified(c, s, log, **event)
    yield from bursts(c, s, log, res, "deflate_", s.deflate_burst_events, **event)
    yield from steady(c, s, log, res, "deflate_", s.deflate_rate_deliveries, **event)
    c.run(cmd="closeall")
    open_sockets(c, s.conns, s, log, "plain ")
    yield from bursts(c, s, log, res, "deflate_plain_", s.deflate_burst_events, **event)
    yield from setups(c, s, log, res, "deflate_", deflate=True)
    return res


def deflate_memory(make: Callable[[], Server], bus: Redis, s: Sizes, log: Log) -> Steps:
    return memory(make, bus, s, log, "deflate_", s.deflate_idle_conns, deflate=True, history=True)


# -- the cluster bus: SPUBLISH, a lookup per execution subscribe -------------------


def cluster(c: Client, s: Sizes, log: Log) -> Steps:
    """On AutoGPT's cluster bus: the Redis connections the server holds for
    s.conns subscribed sockets; a fan-out burst and a steady rate on them;
    then connection setup, every socket subscribing to an execution of its
    own (a database lookup each)."""
    res = rows("cluster_", *BURST_ROWS, *RATE_ROWS, *SETUP_ROWS, "redis_conns")
    cluster_bus = c.redis
    assert isinstance(cluster_bus, RedisCluster)
    open_sockets(c, s.conns, s, log)
    held = cluster_bus.connections_from(c.server.pid)
    log(f"  Redis connections held with {s.conns} subscribed sockets: {sum(held.values())} "
        f"({', '.join(f'{n} on :{p}' for p, n in held.items())})")
    res["cluster_redis_conns"].append(sum(held.values()))
    verified(c, s, log)
    yield from bursts(c, s, log, res, "cluster_", s.burst_events)
    yield from steady(c, s, log, res, "cluster_", s.cluster_rate_deliveries)
    yield from setups(c, s, log, res, "cluster_", prefix_of_run=lambda i: f"setup-{i}-")
    return res


def cluster_memory(make: Callable[[], Server], bus: RedisCluster, s: Sizes, log: Log) -> Steps:
    return memory(make, bus, s, log, "cluster_", s.cluster_idle_conns)


PREFIX = "catchup-exec-"  # the executions of run.py's catch-up rows in the database


def catchup(c: Client, s: Sizes, log: Log) -> Steps:
    """What catch-up costs per graph event on the cluster bus: s.catchup_execs
    sockets, each on an execution of its own, and bursts of graph events
    (the events catch-up records, and writes to the store in the cluster):
    server CPU per graph event, and, from /metrics, the store's Redis
    commands per event.  run.py runs it for our server with catch-up on
    and off (catchup_enabled=false), in turn."""
    res = rows("catchup_", "us_per_event", "commands_per_event")
    c.run(cmd="open", n=s.catchup_execs, channels=s.catchup_execs, conc=200, prefix=PREFIX)
    c.server.settle()
    for i in range(s.runs + 1):
        before = metric(c.server.port, "autogpt_ws_catchup_store_commands_total")
        out = c.run(cmd="burst", events=s.catchup_events, channels=s.catchup_execs, event="graph",
                    size=s.event_size, prefix=PREFIX)
        after = metric(c.server.port, "autogpt_ws_catchup_store_commands_total")
        if not out["complete"]:
            log(f"  catch-up burst incomplete: {out['received']}/{out['expected']}")
        us = out["server_cpu_s"] * 1e6 / s.catchup_events
        commands = (after - before) / s.catchup_events
        log(f"  catchup burst {'warm-up' if i == 0 else i}: {s.catchup_events} graph events, server "
            f"{us:.1f} us per event, {commands:.2f} store commands per event")
        if i:
            res["catchup_us_per_event"].append(us)
            res["catchup_commands_per_event"].append(commands)
        c.server.settle()
        yield
    return res


def metric(port: int, name: str) -> float:
    """One value of the server's /metrics (0 when it has none)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
