#!/usr/bin/env python3
"""The autogpt-ws benchmark suite: one command, tables of ratios.

    python benchmarks/run.py [--quick] [--peer] [--runs N]
        [--only fanout,ignored,setup,storm,memory,deflate,cluster,workers]

Starts our server (and with ``--peer`` the reference peers of
benchmarks/peers, in venvs it makes under benchmarks/), each pinned to core 0
with ``taskset -c 0`` and each with its own Redis on free loopback ports and
its own load client (benchmarks/client/load.mjs, plain Node, no
dependencies), the clients and Redis pinned to core 1.  Each scenario has
one warm-up run, then ``--runs`` measured runs, ours and the peer
alternating run by run; the tables show medians, and the ratio ours/peer.

Three tables: today's rows (plain clients, the classic bus, against
peer_upstream.py); clients offering permessage-deflate as Chromium does
(``deflate``, the classic bus, AutoGPT-like events, against the same peer);
AutoGPT's Redis Cluster bus (``cluster``: three masters, a PostgreSQL
database of our own, against peer_upstream_sharded.py).  Then the issue 15
targets, met or not.  Results also go to benchmarks/results/<time>.json.
See docs/performance.md for what each row means.

Nothing here ever points load at anything but 127.0.0.1, or uses the
machine's own Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from typing import Any

import procs
import scenarios
from procs import (Client, Database, Redis, RedisCluster, Server, can_cap_cpu, ensure_peer_venv,
                   ensure_sharded_peer_venv, free_port, ours, ours_cluster, peer, peer_sharded, raise_nofile)
from scenarios import QUICK, Sizes, Steps

RESULTS = procs.RESULTS

# -- the tables ----------------------------------------------------------------

# key, label, unit, better ("high"/"low"), format; {rate}, {conns}, ... are
# filled in from the sizes (the rate: each table's own)
BURST = [
    ("burst_msgs_per_s", "fan-out burst, delivered msgs/s", "msg/s", "high", "{:,.0f}"),
    ("burst_deliveries_per_cpu_s", "fan-out burst, deliveries per server CPU-s", "msg/cpu-s", "high", "{:,.0f}"),
    ("burst_server_cpu_pct", "  server core busy during burst", "%", "", "{:.0f}"),
    ("burst_client_cpu_pct", "  client core busy during burst (client+redis)", "%", "", "{:.0f}"),
    ("burst_client_capacity", "  client core capacity (deliveries per client+redis CPU-s)", "msg/cpu-s", "", "{:,.0f}"),
]
RATE = [
    ("rate_p50_ms", "steady {rate} deliveries/s: p50 publish->delivery", "ms", "low", "{:.2f}"),
    ("rate_p99_ms", "steady {rate} deliveries/s: p99 publish->delivery", "ms", "low", "{:.2f}"),
    ("rate_server_cpu_pct", "  server core busy at {rate}/s", "%", "low", "{:.0f}"),
    ("rate_client_cpu_pct", "  client core busy at {rate}/s", "%", "", "{:.0f}"),
]
IDLE = [("idle_kb_per_socket", "memory per idle subscribed socket", "KiB", "low", "{:.1f}")]
SETUP = [
    ("setup_per_cpu_s", "connection setup (handshake+subscribe) per server CPU-s", "conn/cpu-s", "high", "{:,.0f}"),
    ("setup_per_s", "  connection setup rate, wall clock", "conn/s", "high", "{:,.0f}"),
    ("setup_client_cpu_pct", "  client core busy during setup", "%", "", "{:.0f}"),
]


def prefixed(prefix: str, rows: list[Any]) -> list[Any]:
    return [(prefix + key, *rest) for key, *rest in rows]


ROWS = [
    *BURST, *RATE, *IDLE,
    ("ignored_us_per_event", "CPU per ignored event", "us", "low", "{:.2f}"),
    ("ignored_client_cpu_pct", "  client core busy while publishing them", "%", "", "{:.0f}"),
    *SETUP,
    ("storm_all_back_s", "reconnect storm: all back and subscribed after", "s", "low", "{:.2f}"),
    ("w1_msgs_per_s", "workers: 1 worker, burst msgs/s", "msg/s", "high", "{:,.0f}"),
    ("w2_msgs_per_s", "workers: 2 workers, burst msgs/s", "msg/s", "high", "{:,.0f}"),
    ("workers_scaling", "workers: 2 workers / 1 worker, msgs/s", "x", "high", "{:.2f}"),
    ("workers_efficiency", "workers: 2 / 1, deliveries per server CPU-s", "x", "high", "{:.2f}"),
]

DEFLATE_ROWS = [
    *prefixed("deflate_", BURST),
    ("deflate_burst_client_us", "  load client CPU per delivery (inflating every frame)", "us", "", "{:.1f}"),
    ("deflate_plain_burst_deliveries_per_cpu_s", "  same events, plain clients: deliveries per server CPU-s",
     "msg/cpu-s", "high", "{:,.0f}"),
    ("deflate_plain_burst_client_us", "  same events, plain clients: load client CPU per delivery", "us", "", "{:.1f}"),
    ("deflate_cpu_vs_plain", "  server CPU per delivery, deflate / plain clients", "x", "low", "{:.2f}"),
    ("deflate_wire_bytes", "bytes on the wire per delivery", "B", "low", "{:,.0f}"),
    ("deflate_plain_wire_bytes", "  same events, plain clients", "B", "low", "{:,.0f}"),
    ("deflate_wire_vs_plain", "  compression: plain / deflate bytes on the wire", "x", "high", "{:.2f}"),
    *prefixed("deflate_", RATE),
    *prefixed("deflate_", IDLE),
    ("deflate_idle_vs_plain", "  deflate / plain clients (memory row of the first table)", "x", "low", "{:.2f}"),
    ("deflate_history_kb_per_socket", "memory per socket after {history} events of {history_kb} KB", "KiB", "low",
     "{:.1f}"),
    *prefixed("deflate_", SETUP),
]

CLUSTER_ROWS = [
    *prefixed("cluster_", BURST), *prefixed("cluster_", RATE), *prefixed("cluster_", IDLE),
    *prefixed("cluster_", SETUP),
    ("cluster_redis_conns", "Redis connections held at {conns} sockets", "conns", "low", "{:,.0f}"),
]

CATCHUP_ROWS = [
    ("catchup_us_per_event", "server CPU per graph event, catch-up on ({catchup_execs} sockets, as many executions)",
     "us", "low", "{:.1f}"),
    ("catchup_off_us_per_event", "  the same, catch-up off (catchup_enabled=false)", "us", "low", "{:.1f}"),
    ("catchup_cost_us", "  what catch-up costs per graph event (on - off)", "us", "low", "{:.1f}"),
    ("catchup_commands_per_event", "catch-up store: Redis commands per graph event", "cmds", "low", "{:.2f}"),
]

# title, rows, the steady rate of that table (a Sizes field)
TABLES = [
    ("Plain clients, classic bus (peer: peer_upstream.py)", ROWS, "rate_deliveries"),
    ("Deflate clients (Chromium's offer), classic bus, AutoGPT-like events (peer: peer_upstream.py)", DEFLATE_ROWS,
     "deflate_rate_deliveries"),
    ("Cluster bus (SPUBLISH, a database lookup per execution subscribe), plain clients "
     "(peer: peer_upstream_sharded.py)", CLUSTER_ROWS, "cluster_rate_deliveries"),
    ("Catch-up on the cluster bus: ours with it (the default) and without (catchup_enabled=false)", CATCHUP_ROWS,
     "cluster_rate_deliveries"),
]

# derived rows: one server's ratio of two of its own medians
DERIVED = {
    "deflate_cpu_vs_plain": ("deflate_plain_burst_deliveries_per_cpu_s", "deflate_burst_deliveries_per_cpu_s"),
    "deflate_wire_vs_plain": ("deflate_plain_wire_bytes", "deflate_wire_bytes"),
    "deflate_idle_vs_plain": ("deflate_idle_kb_per_socket", "idle_kb_per_socket"),
}

# the targets of issue 15: (text, key, whose, bound); whose "peer": ours/peer
# of the key, "ours": our own value; bound (">=" or "<=", number)
TARGETS = [
    ("deflate clients: deliveries per server CPU-s >= 8x the peer's", "deflate_burst_deliveries_per_cpu_s", "peer", (">=", 8)),
    ("deflate clients: memory per idle socket <= 1/5 of the peer's", "deflate_idle_kb_per_socket", "peer", ("<=", 0.2)),
    ("deflate clients: memory per socket after events <= 1/5 of the peer's", "deflate_history_kb_per_socket", "peer",
     ("<=", 0.2)),
    ("cluster bus: fan-out deliveries per server CPU-s >= 5x the sharded peer's", "cluster_burst_deliveries_per_cpu_s",
     "peer", (">=", 5)),
    ("cluster bus: fan-out delivered msgs/s >= 5x the sharded peer's", "cluster_burst_msgs_per_s", "peer", (">=", 5)),
    ("cluster bus: >= 10x fewer Redis connections than the sharded peer", "cluster_redis_conns", "peer", ("<=", 0.1)),
    ("item 1: memory per idle socket, deflate within 1.5x of plain", "deflate_idle_vs_plain", "ours", ("<=", 1.5)),
    ("item 1: server CPU per delivery, deflate within 1.5x of plain", "deflate_cpu_vs_plain", "ours", ("<=", 1.5)),
    ("item 1: AutoGPT-like events >= 3x smaller on the wire", "deflate_wire_vs_plain", "ours", (">=", 3)),
]


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(x: float) -> str:
    """Below 1, three decimals: 0.102x and 0.095x, never both a rounded 0.10x."""
    return f"{x:.2f}x" if x >= 1 else f"{x:.3f}x"


def derive(results: dict[str, dict[str, list[float]]]) -> None:
    for result in results.values():
        for key, (top, bottom) in DERIVED.items():
            a, b = median(result.get(top, [])), median(result.get(bottom, []))
            if a is not None and b:
                result[key] = [a / b]
        on, off = median(result.get("catchup_us_per_event", [])), median(result.get("catchup_off_us_per_event", []))
        if on is not None and off is not None:
            result["catchup_cost_us"] = [on - off]


def table(results: dict[str, dict[str, list[float]]], sizes: Sizes, rows: list[Any], rate: str) -> str:
    names = list(results)
    mine = [n for n in names if n != "peer"] if "peer" in results else []
    head = ["metric", "unit"] + names + [f"{n}/peer" for n in mine]
    fill = {"rate": f"{getattr(sizes, rate) // 1000}k", "conns": f"{sizes.conns:,}", "catchup_execs": sizes.catchup_execs,
            "history": sizes.history_events, "history_kb": f"{(sizes.history_size * 1.34) / 1000:.0f}"}
    lines = []
    for key, label, unit, better, fmt in rows:
        if not any(key in results[n] for n in names):
            continue
        row = [label.format(**fill), unit]
        meds = {}
        for n in names:
            m = median(results[n].get(key, []))
            meds[n] = m
            row.append(fmt.format(m) if m is not None else "-")
        for n in mine:
            a, b = meds.get(n), meds.get("peer")
            row.append(ratio(a / b) if a is not None and b else "-")
        lines.append(row)
    if not lines:
        return ""
    widths = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in lines:
        out.append("| " + " | ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                                     for i, (c, w) in enumerate(zip(r, widths))) + " |")
    return "\n".join(out)


def targets(results: dict[str, dict[str, list[float]]]) -> str:
    lines = []
    for text, key, whose, (op, bound) in TARGETS:
        mine = median(results.get("ours", {}).get(key, []))
        if mine is None:
            continue
        if whose == "peer":
            theirs = median(results.get("peer", {}).get(key, []))
            if not theirs:
                continue
            value = mine / theirs
        else:
            value = mine
        met = value >= bound if op == ">=" else value <= bound
        lines.append(f"| {text} | {ratio(value) if whose == 'peer' else f'{value:.2f}'} | {'yes' if met else 'NO'} |")
    if not lines:
        return ""
    return "| issue 15 target | measured | met |\n|---|---|---|\n" + "\n".join(lines)


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


SCENARIOS = ("fanout", "ignored", "setup", "storm", "memory", "deflate", "cluster", "catchup", "workers")
DEFAULT_SCENARIOS = ("fanout", "ignored", "setup", "storm", "memory", "deflate", "cluster", "catchup")
CLASSIC = ("fanout", "ignored", "setup", "storm", "deflate")  # on one server and client each, in this order


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, 2 runs")
    p.add_argument("--peer", action="store_true", help="also run the reference peers (benchmarks/peers)")
    p.add_argument("--runs", type=int, help="measured runs per scenario (after one warm-up)")
    p.add_argument("--only", default=",".join(DEFAULT_SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all but workers)")
    p.add_argument("--server-core", default=procs.SERVER_CORE, help="core(s) for the server under test (taskset -c)")
    p.add_argument("--client-core", default=procs.CLIENT_CORE, help="core(s) for the load client and Redis")
    p.add_argument("--workers-cores", default=None,
                   help="cores for the workers scenario (default: every core but the client's)")
    p.add_argument("--workers-quota", type=float, default=0.0,
                   help="workers scenario: give each worker this percent of one core of its own "
                        "(worker i on core i, a cgroup CPU quota; needs root), e.g. 33")
    p.add_argument("--ours-arg", action="append", default=[], help="extra argument for our server (repeatable), "
                                                                      "e.g. --ours-arg=--set --ours-arg=catchup_enabled=false")
    p.add_argument("--no-ours", action="store_true", help="skip our server as it is")
    p.add_argument("--inflate-cache", action="store_true",
                   help="deflate clients do not inflate again a frame equal to one of the last 32 they inflated "
                        "without context (exact, but not what a browser does): is inflating what limits a burst?")
    for f in Sizes.__dataclass_fields__:
        if f != "runs":
            p.add_argument("--" + f.replace("_", "-"), type=type(getattr(Sizes(), f)), help=f"(default {getattr(Sizes(), f)})")
    args = p.parse_args(argv)

    procs.SERVER_CORE, procs.CLIENT_CORE = args.server_core, args.client_core
    if args.inflate_cache:
        Client.extra_args = ["--inflate-cache", "1"]
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
    for tool in ("node", "redis-server") + (("redis-cli",) if "cluster" in only else ()):
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
        if "cluster" in only:
            ensure_sharded_peer_venv()

    os.makedirs(RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = os.path.join(RESULTS, f"logs-{stamp}")
    os.makedirs(logdir, exist_ok=True)
    load_before = os.getloadavg()
    started = time.time()

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"autogpt-ws benchmarks: {'quick' if args.quick else 'full'}, {sizes.runs} runs + 1 warm-up, "
        f"cores: server {procs.SERVER_CORE}, client+redis {procs.CLIENT_CORE}, load average {load_before[0]:.2f} "
        f"{load_before[1]:.2f} {load_before[2]:.2f}")
    names = ([] if args.no_ours else ["ours"]) + (["peer"] if args.peer else [])
    results: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    logs = {name: (lambda msg, name=name: log(f"{name}{msg}")) for name in names}
    # each server gets its own Redis, so that both can stay up while only one
    # is driven: the runs alternate (ours, peer, ours, ...), and slow spells of
    # the machine hit both alike
    redises = {name: Redis(logdir) for name in names}
    clusters: dict[str, RedisCluster] = {}
    database: Database | None = None
    makers = {
        "ours": lambda: ours(free_port(), redises["ours"], logdir, args.ours_arg),
        "peer": lambda: peer(free_port(), redises["peer"], logdir),
    }
    servers: dict[str, Server] = {}
    clients: dict[str, Client] = {}

    def close_all() -> None:
        for name in list(clients):
            clients.pop(name).close()
        for name in list(servers):
            servers.pop(name).stop()

    try:
        if any(x in only for x in CLASSIC):
            for name in names:
                servers[name] = makers[name]()
                clients[name] = Client(servers[name], redises[name])
            for scenario in CLASSIC:
                if scenario not in only:
                    continue
                log(f"== {scenario}")
                if scenario == "ignored" and "fanout" not in only:
                    for c in clients.values():
                        c.run(cmd="open", n=1, channels=1, conc=1)
                run_steps = getattr(scenarios, scenario)
                alternate({name: run_steps(clients[name], sizes, logs[name]) for name in names}, results)
            close_all()
        if "memory" in only:
            log("== memory")
            alternate({name: scenarios.memory(makers[name], redises[name], sizes, logs[name]) for name in names}, results)
        if "deflate" in only:
            log("== deflate memory")
            alternate({name: scenarios.deflate_memory(makers[name], redises[name], sizes, logs[name]) for name in names},
                      results)
        if "cluster" in only:
            log("== cluster: 3 masters each, a PostgreSQL database with the platform schema")
            database = Database()
            database.add("exec-", sizes.channels, procs.DEFAULT_USER)
            for i in range(sizes.runs + 1):
                database.add(f"setup-{i}-", sizes.setup_conns, procs.DEFAULT_USER)
            for name in names:
                clusters[name] = RedisCluster(maxclients=18000)
            assert database is not None
            db = database
            cluster_makers = {
                "ours": lambda: ours_cluster(free_port(), clusters["ours"], db, logdir, args.ours_arg),
                "peer": lambda: peer_sharded(free_port(), clusters["peer"], db, logdir),
            }
            for name in names:
                servers[name] = cluster_makers[name]()
                clients[name] = Client(servers[name], clusters[name])
            alternate({name: scenarios.cluster(clients[name], sizes, logs[name]) for name in names}, results)
            close_all()
            log("== cluster memory")
            alternate({name: scenarios.cluster_memory(cluster_makers[name], clusters[name], sizes, logs[name])
                       for name in names}, results)
        if "catchup" in only and "ours" in names:
            log("== catch-up on the cluster bus: ours with catch-up, and without")
            if database is None:
                database = Database()
            database.add(scenarios.PREFIX, sizes.catchup_execs, procs.DEFAULT_USER)
            db = database
            variants = {"ours": [], "ours, catch-up off": ["--set", "catchup_enabled=false"]}
            for name in variants:
                clusters[f"catchup {name}"] = RedisCluster(maxclients=18000)
            for name, more in variants.items():
                servers[name] = ours_cluster(free_port(), clusters[f"catchup {name}"], db, logdir,
                                             [*args.ours_arg, "--set", "enable_metrics=true", *more])
                clients[name] = Client(servers[name], clusters[f"catchup {name}"], probe={"prefix": scenarios.PREFIX})
            got: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
            alternate({name: scenarios.catchup(clients[name], sizes, log) for name in variants}, got)
            close_all()
            results["ours"].update(got["ours"])
            results["ours"].update({key.replace("catchup_", "catchup_off_", 1): values
                                    for key, values in got["ours, catch-up off"].items()})
        if "workers" in only and "ours" in names:
            log("== workers")
            if args.workers_quota:
                cores = "0,1"  # each worker is then pinned to its own core
                log(f"  workers: each worker capped at {args.workers_quota:g}% of its own core "
                    "(worker i on core i); the client and Redis on core 1")
            else:
                cores = args.workers_cores or ",".join(
                    str(c) for c in sorted(os.sched_getaffinity(0)) if str(c) != procs.CLIENT_CORE) or procs.SERVER_CORE
                if len(cores.split(",")) < 2:
                    log(f"  workers: only core {cores} is free for the server: 1 and 2 workers share it, "
                        "so compare efficiency, not throughput (or see --workers-quota)")
            redis = redises["ours"]
            results["ours"].update(scenarios.workers(
                lambda n: ours(free_port(), redis, logdir, args.ours_arg, workers=n, cores=cores),
                redis, sizes, log, args.workers_quota))
    finally:
        close_all()
        for bus in [*redises.values(), *clusters.values()]:
            bus.stop()
        if database is not None:
            database.drop()
    load_after = os.getloadavg()
    derive(results)
    text = "\n\n".join(f"{title}\n\n{body}" for title, rows, rate in TABLES if (body := table(results, sizes, rows, rate)))
    goals = targets(results)
    log("")
    log(text)
    if goals:
        log("\n" + goals)
    log(f"\nload average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
        f"{os.cpu_count()} cores; took {time.time() - started:.0f}s")
    report = {
        "when": stamp, "argv": sys.argv, "sizes": sizes.__dict__, "load_before": load_before,
        "load_after": load_after, "cores": os.cpu_count(), "results": results,
        "medians": {n: {k: median(v) for k, v in r.items()} for n, r in results.items()}, "table": text,
        "targets": goals,
    }
    path = os.path.join(RESULTS, f"{stamp}.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    log(f"results: {os.path.relpath(path, procs.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
