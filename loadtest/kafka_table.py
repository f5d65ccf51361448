#!/usr/bin/env python3
"""loadtest/kafka_table.py OUT: issue 19's line-rate table from one `run.sh --sinks null,kafka
--producer-anchor` run: the null sink and the Kafka sink side by side per cell, with
the bare producer (examples/bare_producer.rs) as the other anchor. A figure is the
median over the rounds (range in parentheses); a ratio is the median of the per-round
ratios, the two gateways of a round having run back to back. Standard library only.
"""

import glob
import json
import os
import re
import statistics
import sys


def spread(vals, spec):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    med = statistics.median(vals)
    if len(vals) == 1:
        return format(med, spec)
    return f"{format(med, spec)} ({format(min(vals), spec)}–{format(max(vals), spec)})"


def main(out):
    cells = {}
    for f in glob.glob(os.path.join(out, "cells", "*.json")):
        m = re.match(r"(.+)_(\w+)_c(\d+)_p(\d)_r(\d+)\.json$", os.path.basename(f))
        if not m:
            continue
        name, size, conns, pipe, rnd = m.groups()
        sink = name.rsplit("-", 1)[1]
        cells.setdefault((size, int(conns), pipe == "1"), {}).setdefault(sink, {})[int(rnd)] = json.load(open(f))
    anchor = []
    for f in sorted(glob.glob(os.path.join(out, "anchor", "*.json"))):
        try:
            anchor.append(json.load(open(f)))
        except ValueError:
            pass
    ceiling = None
    try:
        ceiling = json.load(open(os.path.join(out, "summary.json"))).get("loopback_ceiling_mb_per_s")
    except (OSError, ValueError):
        pass

    def per_round(cell, sink, get):
        return {r: get(c) for r, c in cell.get(sink, {}).items()}

    def ratio(cell, get):
        a, b = per_round(cell, "kafka", get), per_round(cell, "null", get)
        return [a[r] / b[r] for r in a if r in b and a[r] and b[r]]

    msgs = lambda c: c["client"].get("msgs_per_s")
    cpu = lambda c: c.get("server_cpu_us_per_msg")
    p99 = lambda c: c["client"].get("latency_us", {}).get("p99")
    mb = lambda c: c["client"].get("mb_per_s")

    rows = []
    for key in sorted(cells, key=lambda k: (k[0] != "1k", k[1], not k[2])):
        size, conns, pipe = key
        cell = cells[key]
        label = f"{size}, {conns} connection{'s' if conns > 1 else ''}, {'pipelined' if pipe else 'lock-step'}"
        null_m = spread(per_round(cell, "null", msgs).values(), ",.0f")
        kafka_m = spread(per_round(cell, "kafka", msgs).values(), ",.0f")
        rows.append((f"{label}: msgs/s", null_m, kafka_m, spread(ratio(cell, msgs), ".2f") + "x"))
        rows.append((f"same: gateway CPU per message, µs", spread(per_round(cell, "null", cpu).values(), ".1f"),
                     spread(per_round(cell, "kafka", cpu).values(), ".1f"), spread(ratio(cell, cpu), ".2f") + "x"))
        rows.append((f"same: p99 latency, ms", spread([v / 1000 for v in per_round(cell, "null", p99).values() if v], ".2f"),
                     spread([v / 1000 for v in per_round(cell, "kafka", p99).values() if v], ".2f"),
                     spread(ratio(cell, p99), ".2f") + "x"))
        if size != "1k":
            frac = lambda sink: spread([v / ceiling * 100 for v in per_round(cell, sink, mb).values() if v and ceiling], ".0f")
            rows.append((f"same: MB/s (% of loopback {ceiling:.0f} MB/s)" if ceiling else "same: MB/s",
                         f"{spread(per_round(cell, 'null', mb).values(), '.0f')}; {frac('null')}%",
                         f"{spread(per_round(cell, 'kafka', mb).values(), '.0f')}; {frac('kafka')}%",
                         spread(ratio(cell, mb), ".2f") + "x"))
    print("| measured | null sink | Kafka sink | Kafka / null |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if anchor:
        print()
        print(f"Bare producer (1 KiB, no SMTP, {len(anchor)} rounds): "
              f"{spread([a['msgs_per_s'] for a in anchor], ',.0f')} msgs/s, "
              f"{spread([a['cpu_us_per_msg'] for a in anchor], '.2f')} µs CPU per message.")


if __name__ == "__main__":
    main(sys.argv[1])
