#!/usr/bin/env python3
"""Where does our server spend its CPU?  py-spy on the server while the load
client drives one scenario; prints self and inclusive time per function.

    python benchmarks/profile.py burst|rate|ignored|setup|idle [--events N] [--conns N] [--channels N]
                                 [--rate EVENTS_PER_S] [--deflate] [--native] [--idle-secs S]

``idle`` records --idle-secs (default 40 s, two ping intervals) of the
--conns sockets open with no events: the protocol pings are the work.

Needs py-spy (``.venv/bin/pip install py-spy``).  Same pinning as run.py.
Collapsed stacks go to benchmarks/results/profile-<scenario>.txt.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procs  # noqa: E402


def summarize(path: str, top: int) -> None:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as handle:
        for line in handle:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            total += count
            frames = stack.split(";")
            for frame in set(frames):
                incl[frame] += count
            self_t[frames[-1]] += count
    print(f"{total} samples")
    print("\n-- self time --")
    for frame, count in self_t.most_common(top):
        print(f"{100 * count / total:5.1f}%  {frame}")
    print("\n-- inclusive time --")
    for frame, count in incl.most_common(top):
        print(f"{100 * count / total:5.1f}%  {frame}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=("burst", "rate", "ignored", "setup", "idle"))
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--channels", type=int, default=10, help="executions the sockets subscribe to")
    p.add_argument("--rate", type=float, default=200, help="events/s of the rate scenario")
    p.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate as Chromium does")
    p.add_argument("--native", action="store_true")
    p.add_argument("--idle-secs", type=float, default=40.0, help="how long the idle scenario records")

    p.add_argument("--top", type=int, default=40)
    p.add_argument("--ours-arg", action="append", default=[])
    args = p.parse_args()
    spy = shutil.which("py-spy") or os.path.join(procs.ROOT, ".venv", "bin", "py-spy")
    os.makedirs(procs.RESULTS, exist_ok=True)
    logdir = os.path.join(procs.RESULTS, "logs-profile")
    os.makedirs(logdir, exist_ok=True)
    procs.raise_nofile(args.conns + 1000)
    redis = procs.Redis(logdir)
    server = procs.ours(procs.free_port(), redis, logdir, args.ours_arg)
    client = procs.Client(server, redis, sources=-(-args.conns // 25000))
    ch = args.channels
    out_path = os.path.join(procs.RESULTS, f"profile-{args.scenario}.txt")
    try:
        if args.scenario != "setup":
            client.run(cmd="open", n=args.conns, channels=ch, conc=200, deflate=args.deflate)
            client.run(cmd="burst", events=200, channels=ch)  # warm-up
            server.settle()
        spy_cmd = [spy, "record", "--pid", str(server.pid), "--rate", "500", "--format", "raw", "-o", out_path, "--nonblocking"]
        if args.native:
            spy_cmd.append("--native")
        recorder = subprocess.Popen(procs.pinned(procs.CLIENT_CORE, spy_cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        if args.scenario == "burst":
            out = client.run(cmd="burst", events=args.events, channels=ch)
        elif args.scenario == "rate":
            out = client.run(cmd="burst", events=args.events, channels=ch, rate=args.rate)
        elif args.scenario == "idle":
            c0 = server.cpu()
            time.sleep(args.idle_secs)
            out = {"server_cpu_s": (server.cpu() - c0) / procs.HZ, "server_wall_s": args.idle_secs}
        elif args.scenario == "ignored":
            out = client.run(cmd="ignore", events=args.events)
        else:
            out = client.run(cmd="open", n=args.conns, channels=ch, conc=100, deflate=args.deflate)
        print({k: out.get(k) for k in ("msgs_per_s", "received", "p50_ms", "p99_ms", "server_cpu_s", "server_wall_s",
                                       "acked", "handled_s")})
        recorder.send_signal(2)
        recorder.wait(30)
    finally:
        client.close()
        server.stop()
        redis.stop()
    summarize(out_path, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
