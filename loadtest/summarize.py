#!/usr/bin/env python3
"""Helpers of loadtest/run.sh: attach server-side numbers to a cell, print the table.

`cell`: merges the client's JSON with the server's CPU time and peak RSS for that cell.
`summary`: prints every cell side by side per server, the gateway/peer ratios, and
writes summary.json. Standard library only, so a fresh machine needs nothing more.
"""

import glob
import json
import os
import sys


def cell(path, name, size, conns, pipe, ticks, clk_tck, peak_kib, client_out):
    try:
        with open(path + ".client") as f:
            client = json.load(f)
    except (OSError, ValueError):
        with open(client_out, errors="replace") as f:
            client = {"error": f.read()[-2000:], "accepted": 0, "msgs_per_s": 0.0}
    cpu_s = int(ticks) / int(clk_tck)
    accepted = client.get("accepted", 0)
    record = {
        "server": name,
        "size": size,
        "connections": int(conns),
        "pipelining": pipe == "1",
        "server_cpu_s": cpu_s,
        "server_cpu_us_per_msg": cpu_s * 1e6 / accepted if accepted else None,
        "server_peak_rss_kib": int(peak_kib or 0),
        "client": client,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def errors(c):
    return (
        c.get("rejected", 0)
        + c.get("protocol_errors", 0)
        + c.get("connect_errors", 0)
        + c.get("timeouts", 0)
        + (1 if "error" in c else 0)
    )


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def summary(out, ceiling, sink, mode, uptime):
    cells = []
    for path in sorted(glob.glob(os.path.join(out, "cells", "*.json"))):
        with open(path) as f:
            cells.append(json.load(f))
    order = {"1k": 0, "10k": 1, "100k": 2, "1m": 3}
    key = lambda c: (order.get(c["size"], 9), c["connections"], c["pipelining"])
    servers = sorted({c["server"] for c in cells}, key=lambda s: s != "smtpgw")
    by = {(c["server"],) + key(c): c for c in cells}
    keys = sorted({key(c) for c in cells})
    rows = []
    print()
    print(f"loopback TCP ceiling (iperf3, best of 1 and 4 streams): {ceiling} MB/s   sink: {sink}   mode: {mode}")
    print(f"load: {uptime.strip()}")
    hdr = (
        f"{'server':<10} {'size':>5} {'conns':>5} {'pipe':>4} {'msgs/s':>9} {'MB/s':>8}"
        f" {'p50 µs':>8} {'p99 µs':>8} {'p999 µs':>8} {'srv µs/msg':>10} {'RSS MiB':>8}"
        f" {'cli µs/msg':>10} {'errors':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    if len(servers) > 1:
        print("(ratio rows: smtpgw/peer for msgs/s and for server µs/msg)")
    for k in keys:
        size_idx, conns, pipe = k
        row = {"size": [s for s, i in order.items() if i == size_idx][0],
               "connections": conns, "pipelining": pipe}
        for s in servers:
            c = by.get((s,) + k)
            if c is None:
                continue
            cl = c["client"]
            lat = cl.get("latency_us", {})
            print(
                f"{s:<10} {c['size']:>5} {conns:>5} {'on' if pipe else 'off':>4}"
                f" {cl.get('msgs_per_s', 0):>9.0f} {cl.get('mb_per_s', 0):>8.1f}"
                f" {lat.get('p50', 0):>8} {lat.get('p99', 0):>8} {lat.get('p999', 0):>8}"
                f" {fmt(c['server_cpu_us_per_msg'], '>10.1f')} {c['server_peak_rss_kib'] / 1024:>8.1f}"
                f" {fmt(cl.get('client_cpu_us_per_msg'), '>10.1f')} {errors(cl):>6}"
            )
            row[s] = c
        for peer_name in servers[1:]:
            gw, peer = row.get(servers[0]), row.get(peer_name)
            if gw and peer:
                g, p = gw["client"].get("msgs_per_s", 0), peer["client"].get("msgs_per_s", 0)
                ratio = g / p if p else None
                gc, pc = gw["server_cpu_us_per_msg"], peer["server_cpu_us_per_msg"]
                cpu_ratio = gc / pc if gc and pc else None
                row[f"ratio_msgs_per_s_vs_{peer_name}"] = ratio
                row[f"ratio_server_cpu_per_msg_vs_{peer_name}"] = cpu_ratio
                label = f"/{peer_name}"[:10]
                print(
                    f"{label:<10} {'':>5} {'':>5} {'':>4} {fmt(ratio, '>8.2f')}x"
                    f" {'':>8} {'':>8} {'':>8} {'':>8} {fmt(cpu_ratio, '>9.2f')}x"
                )
        if row.get("smtpgw") and ceiling and float(ceiling) > 0:
            row["smtpgw_fraction_of_ceiling"] = row["smtpgw"]["client"].get("mb_per_s", 0) / float(ceiling)
        rows.append(row)
    fractions = [
        (r["size"], r["connections"], r["pipelining"], r["smtpgw_fraction_of_ceiling"])
        for r in rows
        if r.get("smtpgw_fraction_of_ceiling") is not None and r["size"] == "1m"
    ]
    for size, conns, pipe, frac in fractions:
        print(f"smtpgw 1m x {conns} conns pipelining {'on' if pipe else 'off'}: "
              f"{frac * 100:.0f}% of the loopback ceiling")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(
            {"loopback_ceiling_mb_per_s": float(ceiling or 0), "sink": sink, "mode": mode,
             "load": uptime.strip(), "rows": rows},
            f, indent=2,
        )
    print(f"\nresults: {out}/summary.json and {out}/cells/")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: summarize.py cell PATH NAME SIZE CONNS PIPE TICKS CLK_TCK PEAK_KIB CLIENT_OUT")
        print("       summarize.py summary OUT_DIR ...   (both called by loadtest/run.sh)")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    if sys.argv[1] == "cell":
        cell(*sys.argv[2:])
    elif sys.argv[1] == "summary":
        summary(*sys.argv[2:])
    else:
        sys.exit("usage: summarize.py cell|summary ...")
