#!/usr/bin/env python3
"""The cost curve: what one process of our server costs as the number of
subscribed sockets grows.

    python benchmarks/curve.py [--points 1000,10000,50000,100000] [--clients plain,deflate] [--quick]

For each point N and each kind of client (plain, or offering
permessage-deflate as Chromium does), a fresh server on the classic bus,
pinned to core 0 as in run.py, gets N sockets, 100 per execution (N/100
executions), and is measured:

- memory per idle subscribed socket: RSS growth / N;
- idle CPU: the server's share of a core over --idle-secs (default 20 s,
  one ping interval) with the N sockets open and no events: protocol pings,
  every 20 s per socket, are the work;
- fan-out CPU per delivery: bursts of 10 events per execution, each
  execution's 10 in a row (so every socket gets its 10 in about as few
  writes at every N), repeated until at least --deliveries deliveries,
  server CPU / deliveries;
- a steady rate of --rate deliveries/s (--deflate-rate for deflate
  clients): p50/p99 publish-to-delivery latency, and the server CPU per
  delivery over it, less the idle CPU of the same time;
- the server's full garbage collections once the sockets are open: how
  many, and the longest pause (the server runs under gclog.py);
- the load client's longest event-loop stall over the steady spell: a
  p99 near it is the client's, not the server's.

Prints a table, writes benchmarks/results/curve-<time>.json and draws
docs/curve.png (matplotlib, in a venv of its own:
benchmarks/.plot-venv).  A point needs N + 200 file descriptors in the
server and in the client: points beyond RLIMIT_NOFILE's hard limit are
skipped and said so.  Above 25,000 sockets the client binds its sockets to
several loopback source addresses (127.0.0.1, .2, ...), each with its own
ephemeral ports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import procs
from procs import HZ, Client, Redis, free_port, ours, raise_nofile, rss_bytes

PER_EXECUTION = 100   # sockets per execution
PER_SOCKET = 10       # events each socket receives in a burst
PORTS_PER_SOURCE = 25000  # of the ~28k ephemeral ports of one source address
PLOT_VENV = os.path.join(procs.HERE, ".plot-venv")


def point(n: int, kind: str, redis: Redis, logdir: str, args: argparse.Namespace,
          log: Any) -> dict[str, Any]:
    deflate = kind == "deflate"
    channels = max(1, n // PER_EXECUTION)
    gc_log = os.path.join(logdir, f"gc-{n}-{kind}.log")
    server = ours(free_port(), redis, logdir, args.ours_arg, gc_log=gc_log)
    client = Client(server, redis, sources=math.ceil(n / PORTS_PER_SOURCE), probe={"deflate": deflate})
    row: dict[str, Any] = {"sockets": n, "client": kind}
    try:
        client.run(cmd="open", n=200, channels=10, conc=100, deflate=deflate)
        client.run(cmd="closeall")
        server.settle()
        time.sleep(0.5)
        before = rss_bytes(server.pid)
        opened = client.run(cmd="open", n=n, channels=channels, conc=500, deflate=deflate)
        if opened["acked"] != n:
            raise RuntimeError(f"only {opened['acked']} of {n} sockets subscribed ({opened})")
        server.settle(cap=60)
        time.sleep(2.0)
        after = rss_bytes(server.pid)
        row["open_s"] = opened["secs"]
        opened_at = time.time()
        row["kib_per_socket"] = (after - before) / n / 1024
        row["rss_mib"] = after / 2**20

        c0, t0 = server.cpu(), time.monotonic()
        time.sleep(args.idle_secs)
        idle_share = (server.cpu() - c0) / HZ / (time.monotonic() - t0)
        row["idle_cpu_pct"] = 100 * idle_share

        cpu = delivered = 0.0
        bursts = 0
        while delivered < args.deliveries or bursts < 2:
            out = client.run(cmd="burst", events=channels * PER_SOCKET, channels=channels, group=PER_SOCKET, timeout=600)
            if not out["complete"]:
                raise RuntimeError(f"burst incomplete: {out['received']}/{out['expected']}")
            cpu += out["server_cpu_s"]
            delivered += out["received"]
            bursts += 1
            row["burst_msgs_per_s"] = out["msgs_per_s"]
            server.settle()
        row["burst_us_per_delivery"] = cpu / delivered * 1e6

        rate = (args.deflate_rate if deflate else args.rate) / PER_EXECUTION  # events/s
        out = client.run(cmd="burst", events=int(rate * args.rate_secs), channels=channels, rate=rate, timeout=600)
        row["rate_deliveries_per_s"] = rate * PER_EXECUTION
        row["rate_p50_ms"], row["rate_p99_ms"] = out["p50_ms"], out["p99_ms"]
        row["rate_server_cpu_pct"] = 100 * out["server_cpu_s"] / out["server_wall_s"]
        busy = out["server_cpu_s"] - idle_share * out["server_wall_s"]
        row["rate_us_per_delivery"] = busy / max(out["received"], 1) * 1e6
        row["client_cpu_pct"] = 100 * out["cpu_ms"] / 1000 / out["server_wall_s"]
        row["client_lag_p99_ms"], row["client_lag_max_ms"] = out["client_lag_p99_ms"], out["client_lag_max_ms"]
        row["client_gc_max_ms"] = out["client_gc_max_ms"]
        full = [float(ms) for at, generation, ms in (line.split() for line in open(gc_log))
                if generation == "2" and float(at) > opened_at]
        row["gc_full_count"], row["gc_full_max_ms"] = len(full), max(full, default=0.0)
        log(f"  {n:>7,} {kind:<7} {row['kib_per_socket']:6.1f} KiB/socket (RSS {row['rss_mib']:,.0f} MiB), "
            f"idle {row['idle_cpu_pct']:4.1f}% core, burst {row['burst_us_per_delivery']:5.2f} us/delivery "
            f"({row['burst_msgs_per_s']:,}/s), steady {row['rate_deliveries_per_s']:,.0f}/s: "
            f"{row['rate_us_per_delivery']:5.2f} us/delivery, p50 {row['rate_p50_ms']} p99 {row['rate_p99_ms']} ms, "
            f"client {row['client_cpu_pct']:.0f}% (its loop late by {row['client_lag_p99_ms']} ms p99, "
            f"{row['client_lag_max_ms']} max; its longest GC {row['client_gc_max_ms']} ms), {len(full)} full collections, the longest {row['gc_full_max_ms']:.0f} ms")
    finally:
        client.close()
        server.stop()
    return row


COLUMNS = [
    ("sockets", "sockets", "{:,}"), ("client", "client", "{}"), ("kib_per_socket", "KiB/socket", "{:.1f}"),
    ("rss_mib", "RSS MiB", "{:,.0f}"), ("idle_cpu_pct", "idle CPU %", "{:.1f}"),
    ("burst_us_per_delivery", "burst us/delivery", "{:.2f}"), ("rate_deliveries_per_s", "steady rate/s", "{:,.0f}"),
    ("rate_us_per_delivery", "steady us/delivery", "{:.2f}"), ("rate_p50_ms", "p50 ms", "{:.2f}"),
    ("rate_p99_ms", "p99 ms", "{:.2f}"), ("gc_full_count", "full GCs", "{}"),
    ("gc_full_max_ms", "longest full GC ms", "{:.0f}"), ("client_lag_max_ms", "client stalled ms", "{:.0f}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    head = [c[1] for c in COLUMNS]
    body = [[fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default="1000,10000,50000,100000", help="subscribed sockets, comma-separated")
    p.add_argument("--clients", default="plain,deflate", help="plain, deflate or both")
    p.add_argument("--rate", type=int, default=20000, help="steady deliveries/s, plain clients")
    p.add_argument("--deflate-rate", type=int, default=20000, help="steady deliveries/s, deflate clients")
    p.add_argument("--rate-secs", type=float, default=10.0)
    p.add_argument("--idle-secs", type=float, default=20.0, help="idle spell (the ping interval is 20 s)")
    p.add_argument("--deliveries", type=int, default=200000, help="at least this many per point in bursts")
    p.add_argument("--quick", action="store_true", help="1k and 10k sockets, short spells")
    p.add_argument("--plot", default=os.path.join(procs.ROOT, "docs", "curve.png"), help="the PNG to write ('' for none)")
    p.add_argument("--ours-arg", action="append", default=[], help="extra argument for our server (repeatable)")
    args = p.parse_args(argv)
    if args.quick:
        args.points, args.rate_secs, args.idle_secs, args.deliveries = "1000,10000", 3.0, 5.0, 50000
    points = [int(x) for x in args.points.split(",") if x.strip()]
    kinds = [x.strip() for x in args.clients.split(",") if x.strip()]
    nofile = raise_nofile(max(points) + 1000)

    os.makedirs(procs.RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = os.path.join(procs.RESULTS, f"logs-curve-{stamp}")
    os.makedirs(logdir, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    load_before = os.getloadavg()
    started = time.time()
    log(f"cost curve: points {points}, clients {kinds}, RLIMIT_NOFILE {nofile}, load average {load_before[0]:.2f}")
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    redis = Redis(logdir)
    try:
        for n in points:
            if n + 200 > nofile:
                why = (f"{n:,} sockets: skipped, RLIMIT_NOFILE is {nofile} here (hard limit) and a point needs "
                       f"{n + 200:,} descriptors in the server and in the client")
                log("  " + why)
                skipped.append(why)
                continue
            for kind in kinds:
                rows.append(point(n, kind, redis, logdir, args, log))
    finally:
        redis.stop()
    text = table(rows)
    load_after = os.getloadavg()
    log("\n" + text)
    for why in skipped:
        log(why)
    log(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; took {time.time() - started:.0f}s")
    path = os.path.join(procs.RESULTS, f"curve-{stamp}.json")
    with open(path, "w") as handle:
        json.dump({"when": stamp, "argv": sys.argv, "rows": rows, "skipped": skipped, "table": text,
                   "load_before": load_before, "load_after": load_after, "nofile": nofile}, handle, indent=1)
    log(f"results: {os.path.relpath(path, procs.ROOT)}")
    if args.plot and rows:
        procs.ensure_venv(PLOT_VENV, os.path.join(procs.HERE, "requirements-plot.txt"))
        subprocess.run([os.path.join(PLOT_VENV, "bin", "python"), os.path.join(procs.HERE, "plot_curve.py"), path,
                        args.plot], check=True)
        log(f"plot: {os.path.relpath(args.plot, procs.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
