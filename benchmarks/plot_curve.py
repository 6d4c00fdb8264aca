"""Draw the cost curve (benchmarks/curve.py's JSON) as a PNG: six panels
against the number of subscribed sockets, one line per kind of client;
every panel is per socket or per delivery, so linear growth is a flat line.

    python plot_curve.py results/curve-<time>.json curve.png

Runs in benchmarks/.plot-venv (matplotlib), which curve.py makes.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (title, [(row key, line label, style)]); a flat line is linear growth
PANELS = [
    ("memory per idle subscribed socket (KiB)", [("kib_per_socket", "", "-")]),
    ("server CPU per delivery (µs)", [("burst_us_per_delivery", "burst", "-"), ("rate_us_per_delivery", "steady", "--")]),
    ("steady rate: p99 publish->delivery (ms)",
     [("rate_p99_ms", "", "-"), ("client_lag_max_ms", "the load client's longest stall", ":")]),
    ("idle server CPU per 1,000 sockets (% of a core)", [("idle_cpu_per_1k", "", "-")]),
    ("longest full garbage collection (ms)", [("gc_full_max_ms", "", "-")]),
    ("full garbage collections per point", [("gc_full_count", "", "-")]),
]


def main(source: str, target: str) -> None:
    with open(source) as handle:
        report = json.load(handle)
    rows = report["rows"]
    for r in rows:
        r["idle_cpu_per_1k"] = r["idle_cpu_pct"] * 1000 / r["sockets"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (title, series) in zip(axes.flat, PANELS):
        for color, kind in enumerate(dict.fromkeys(r["client"] for r in rows)):
            rate = next(r["rate_deliveries_per_s"] for r in rows if r["client"] == kind)
            for key, what, style in series:
                mine = sorted((r["sockets"], r[key]) for r in rows if r["client"] == kind and r.get(key) is not None)
                if not mine:
                    continue
                label = f"{kind} clients" + (f", {what}" if what else "")
                if key.startswith("rate_"):
                    label += f" ({rate:,.0f} deliveries/s)"
                ax.plot([x for x, _ in mine], [y for _, y in mine], style, color=f"C{color}", marker="o", label=label)
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
