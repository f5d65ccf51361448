#!/usr/bin/env python3
"""Plots of a run.sh result directory: msgs/s and p99 latency per cell, the gateway
next to its peer. Needs matplotlib (run.sh --plots installs it into a venv)."""

import json
import os
import sys


def main(out):
    # Imported here so that --help works without matplotlib installed.
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    rows = summary["rows"]
    names = {k for r in rows for k, v in r.items() if isinstance(v, dict) and "client" in v}
    servers = sorted(names, key=lambda s: (s != "smtpgw", s))
    labels = [
        f"{r['size']}\n{r['connections']}c\n{'pipe' if r['pipelining'] else 'lock'}"
        for r in rows
    ]
    metrics = [
        ("msgs_per_s", "messages/s (log; higher is better)", "throughput.png", True),
        ("p99", "p99 latency, µs (log; lower is better)", "p99.png", True),
    ]
    for key, title, name, log in metrics:
        fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.55), 4.5))
        width = 0.8 / max(1, len(servers))
        for i, s in enumerate(servers):
            vals = []
            for r in rows:
                c = r.get(s, {}).get("client", {})
                vals.append(c.get("latency_us", {}).get("p99", 0) if key == "p99" else c.get(key, 0))
            xs = [x + i * width for x in range(len(rows))]
            ax.bar(xs, vals, width, label=s)
        ax.set_xticks([x + width * (len(servers) - 1) / 2 for x in range(len(rows))])
        ax.set_xticklabels(labels, fontsize=7)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{title} — {summary['mode']} run, sink {summary['sink']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        print(os.path.join(out, name))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip() if __doc__ else "")
        print("\nusage: plot.py RESULTS_DIR   (reads RESULTS_DIR/summary.json; run.sh --plots calls it)")
        sys.exit(0 if len(sys.argv) == 2 else 2)
    main(sys.argv[1])
