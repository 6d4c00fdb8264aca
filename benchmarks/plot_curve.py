"""Draw the cost curve (benchmarks/curve.py's JSON) as a PNG: four panels
against the number of subscribed sockets, one line per kind of client.

    python plot_curve.py results/curve-<time>.json curve.png

Runs in benchmarks/.plot-venv (matplotlib), which curve.py makes.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("kib_per_socket", "memory per idle subscribed socket (KiB)"),
    ("burst_us_per_delivery", "fan-out burst: server CPU per delivery (µs)"),
    ("rate_p99_ms", "steady rate: p99 publish->delivery (ms)"),
    ("idle_cpu_pct", "idle server CPU (% of a core)"),
]


def main(source: str, target: str) -> None:
    with open(source) as handle:
        report = json.load(handle)
    rows = report["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for kind in dict.fromkeys(r["client"] for r in rows):
            mine = sorted((r["sockets"], r[key]) for r in rows if r["client"] == kind and r.get(key) is not None)
            if mine:
                rate = next(r["rate_deliveries_per_s"] for r in rows if r["client"] == kind)
                label = f"{kind} clients" + (f" at {rate:,.0f} deliveries/s" if key == "rate_p99_ms" else "")
                ax.plot([x for x, _ in mine], [y for _, y in mine], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("subscribed sockets (one process)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"autogpt-ws cost curve ({report['when']}, classic bus, 100 sockets per execution)", fontsize=11)
    fig.tight_layout()
    fig.savefig(target, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
