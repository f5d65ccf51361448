#!/usr/bin/env python3
"""Helpers of loadtest/run.sh: attach server-side numbers to a cell, print the table.

`cell`: merges the client's JSON with the server's CPU time and peak RSS for that cell.
`summary`: prints every cell side by side per server (median over the rounds, with the
range), the ratios of every gateway to its own backend's floor, to each peer and, with
both backends, uring to epoll; then the smtp-source cells and the memory figures; writes
summary.json. Ratios are taken round by round (the servers of a round ran back to back)
and then their median and range are reported. Standard library only.
"""

import glob
import json
import os
import statistics
import sys


def client_report(path, client_out):
    """The load client's JSON report, or (it failed) the tail of its output as the error."""
    try:
        with open(path + ".client") as f:
            return json.load(f)
    except (OSError, ValueError):
        with open(client_out, errors="replace") as f:
            return {"error": f.read()[-2000:], "accepted": 0, "msgs_per_s": 0.0, "sessions": 0}


def cell(path, name, size, conns, pipe, ticks, clk_tck, peak_kib, client_out, rnd="1"):
    client = client_report(path, client_out)
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
        "round": int(rnd),
        "client": client,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def session(path, name, ticks, clk_tck, client_out, rnd="1"):
    """A session cell (run.sh --tls): a new connection per message."""
    client = client_report(path, client_out)
    cpu_s = int(ticks) / int(clk_tck)
    sessions = client.get("sessions", 0)
    record = {
        "server": name,
        "round": int(rnd),
        "sessions_per_s": client.get("sessions_per_s", 0.0),
        "server_cpu_s": cpu_s,
        "server_cpu_us_per_session": cpu_s * 1e6 / sessions if sessions else None,
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


def backend_of(server):
    """smtpgw-uring -> uring; smtpgw -> None."""
    return server.split("-", 1)[1] if server.startswith("smtpgw-") else None


def server_order(names):
    def rank(s):
        if s.startswith("smtpgw"):
            return (0, s)
        if s.startswith("floor-"):
            return (1, s)
        return (2, s)
    return sorted(names, key=rank)


def spread(vals):
    """(median, min, max) of the values that exist, or None."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return (statistics.median(vals), min(vals), max(vals))


def fmt_spread(sp, spec, unit=""):
    if sp is None:
        return "-"
    med, lo, hi = sp
    if lo == hi:
        return f"{format(med, spec)}{unit}"
    return f"{format(med, spec)}{unit} ({format(lo, spec)}-{format(hi, spec)})"


def paired_ratios(a_by_round, b_by_round, metric):
    """Per-round a/b of `metric` (a function of a record), for rounds both have."""
    out = []
    for rnd, a in a_by_round.items():
        b = b_by_round.get(rnd)
        if b is None:
            continue
        x, y = metric(a), metric(b)
        if x and y:
            out.append(x / y)
    return spread(out)


def comparisons(servers):
    """(label, a, b) pairs: each gateway against its floor and every peer; uring/epoll."""
    gws = [s for s in servers if s.startswith("smtpgw")]
    peers = [s for s in servers if not s.startswith("smtpgw") and not s.startswith("floor-")]
    pairs = []
    for g in gws:
        if g.endswith("+tls"):
            # The same gateway over STARTTLS against plaintext (run.sh --tls).
            plain = g[: -len("+tls")]
            if plain in servers:
                pairs.append((f"{g}/plaintext", g, plain))
            continue
        b = backend_of(g)
        if b and f"floor-{b}" in servers:
            pairs.append((f"{g}/floor-{b}", g, f"floor-{b}"))
        for p in peers:
            pairs.append((f"{g}/{p}", g, p))
    if "smtpgw-uring" in servers and "smtpgw-epoll" in servers:
        pairs.append(("uring/epoll", "smtpgw-uring", "smtpgw-epoll"))
        if "floor-uring" in servers and "floor-epoll" in servers:
            pairs.append(("floor uring/epoll", "floor-uring", "floor-epoll"))
    return pairs


def add_ratios(row, servers, rounds_of, msgs, cpu):
    """Fills row["ratios"] and prints a line per comparison whose both sides ran."""
    for label, a, b in comparisons(servers):
        ra, rb = rounds_of(a), rounds_of(b)
        if not ra or not rb:
            continue
        mr = paired_ratios(ra, rb, msgs)
        cr = paired_ratios(ra, rb, cpu)
        row["ratios"][label] = {"msgs_per_s": mr, "server_cpu_us_per_msg": cr}
        print(f"  {label:<26} msgs/s {fmt_spread(mr, '.2f', 'x'):>22}   µs/msg {fmt_spread(cr, '.2f', 'x'):>20}")


def summary(out, ceiling, sink, mode, uptime):
    cells = []
    for path in sorted(glob.glob(os.path.join(out, "cells", "*.json"))):
        with open(path) as f:
            cells.append(json.load(f))
    order = {"1k": 0, "10k": 1, "100k": 2, "1m": 3}
    key = lambda c: (order.get(c["size"], 9), c["connections"], c["pipelining"])
    servers = server_order({c["server"] for c in cells})
    by = {}
    for c in cells:
        by.setdefault((c["server"],) + key(c), {})[c.get("round", 1)] = c
    keys = sorted({key(c) for c in cells})
    rows = []
    print()
    print(f"loopback TCP ceiling (iperf3, best of 1 and 4 streams): {ceiling} MB/s   sink: {sink}   mode: {mode}")
    print(f"load: {uptime.strip()}")
    print("median over rounds (min-max); ratio rows: per-round ratio of msgs/s and of server µs/msg, median (min-max)")
    hdr = (
        f"{'server':<13} {'size':>5} {'conns':>5} {'pipe':>4} {'msgs/s':>22} {'MB/s':>8}"
        f" {'p99 µs':>8} {'srv µs/msg':>20} {'RSS MiB':>8} {'cli µs/msg':>10} {'errors':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    msgs = lambda c: c["client"].get("msgs_per_s", 0)
    cpu = lambda c: c["server_cpu_us_per_msg"]
    for k in keys:
        size_idx, conns, pipe = k
        row = {"size": [s for s, i in order.items() if i == size_idx][0],
               "connections": conns, "pipelining": pipe, "servers": {}, "ratios": {}}
        for s in servers:
            rounds = by.get((s,) + k)
            if not rounds:
                continue
            recs = list(rounds.values())
            m = spread([msgs(c) for c in recs])
            u = spread([cpu(c) for c in recs])
            mb = spread([c["client"].get("mb_per_s", 0) for c in recs])
            p99 = spread([c["client"].get("latency_us", {}).get("p99", 0) for c in recs])
            cli = spread([c["client"].get("client_cpu_us_per_msg") for c in recs])
            err = sum(errors(c["client"]) for c in recs)
            rss = max(c["server_peak_rss_kib"] for c in recs)
            print(
                f"{s:<13} {row['size']:>5} {conns:>5} {'on' if pipe else 'off':>4}"
                f" {fmt_spread(m, '.0f'):>22} {fmt(mb and mb[0], '>8.1f')}"
                f" {fmt(p99 and p99[0], '>8.0f')} {fmt_spread(u, '.1f'):>20} {rss / 1024:>8.1f}"
                f" {fmt(cli and cli[0], '>10.1f')} {err:>6}"
            )
            # The round with the median msgs/s stands for the server (plot.py reads it).
            rep = sorted(recs, key=msgs)[len(recs) // 2]
            row[s] = rep
            row["servers"][s] = {"rounds": len(recs), "msgs_per_s": m, "server_cpu_us_per_msg": u,
                                 "mb_per_s": mb, "p99_us": p99, "peak_rss_kib": rss, "errors": err}
        add_ratios(row, servers, lambda name: by.get((name,) + k), msgs, cpu)
        if ceiling and float(ceiling) > 0:
            for s in servers:
                if s.startswith("smtpgw") and s in row:
                    row[f"{s}_fraction_of_ceiling"] = row[s]["client"].get("mb_per_s", 0) / float(ceiling)
        rows.append(row)
    for r in rows:
        if r["size"] != "1m":
            continue
        for s in servers:
            frac = r.get(f"{s}_fraction_of_ceiling")
            if frac is not None:
                print(f"{s} 1m x {r['connections']} conns pipelining {'on' if r['pipelining'] else 'off'}: "
                      f"{frac * 100:.0f}% of the loopback ceiling")

    source_rows = source_summary(out)
    session_rows = session_summary(out)
    memory = memory_summary(out)
    perf = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "perf", "*.txt"))
                  if not p.endswith(".client.txt"))
    if perf:
        print("\nprofiles: " + ", ".join(os.path.join(out, "perf", p) for p in perf))
    info = {}
    try:
        with open(os.path.join(out, "run-info.txt")) as f:
            info = dict(line.rstrip("\n").split(": ", 1) for line in f if ": " in line)
    except OSError:
        pass
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(
            {"loopback_ceiling_mb_per_s": float(ceiling or 0), "sink": sink, "mode": mode,
             "load": uptime.strip(), "run": info, "rows": rows, "smtp_source": source_rows,
             "sessions": session_rows, "memory": memory, "profiles": perf},
            f, indent=2,
        )
    print(f"\nresults: {out}/summary.json, cells/, source/, memory/, perf/")


def records(out, folder):
    """Every JSON record run.sh wrote under OUT/folder, in file-name order."""
    recs = []
    for path in sorted(glob.glob(os.path.join(out, folder, "*.json"))):
        with open(path) as f:
            recs.append(json.load(f))
    return recs


def source_summary(out):
    recs = records(out, "source")
    if not recs:
        return []
    servers = server_order({r["server"] for r in recs})
    by = {}
    for r in recs:
        by.setdefault((r["server"], r["sessions"]), {})[r["round"]] = r
    print("\nPostfix smtp-source, 1 KiB, persistent sessions, lock-step (median over rounds (min-max))")
    hdr = f"{'server':<13} {'sessions':>8} {'msgs/s':>22} {'srv µs/msg':>22} {'failed':>6}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    msgs = lambda r: r["msgs_per_s"]
    cpu = lambda r: r["server_cpu_us_per_msg"]
    for sessions in sorted({r["sessions"] for r in recs}):
        row = {"sessions": sessions, "servers": {}, "ratios": {}}
        for s in servers:
            rounds = by.get((s, sessions))
            if not rounds:
                continue
            m = spread([msgs(r) for r in rounds.values()])
            u = spread([cpu(r) for r in rounds.values()])
            failed = sum(1 for r in rounds.values() if r["exit_status"] != 0)
            row["servers"][s] = {"rounds": len(rounds), "msgs_per_s": m,
                                 "server_cpu_us_per_msg": u, "failed_rounds": failed}
            print(f"{s:<13} {sessions:>8} {fmt_spread(m, '.0f'):>22} {fmt_spread(u, '.1f'):>22} {failed:>6}")
        add_ratios(row, servers, lambda name: by.get((name, sessions)), msgs, cpu)
        rows.append(row)
    return rows


def session_summary(out):
    """Session cells: sessions (with +tls, full handshakes) per second, CPU per session."""
    recs = records(out, "sessions")
    if not recs:
        return {}
    servers = server_order({r["server"] for r in recs})
    by = {}
    for r in recs:
        by.setdefault(r["server"], {})[r["round"]] = r
    print("\nsessions: a new connection per message, 1 KiB, 50 connections (median over rounds (min-max))")
    hdr = f"{'server':<18} {'sessions/s':>22} {'srv µs/session':>24} {'errors':>6}"
    print(hdr)
    print("-" * len(hdr))
    rate = lambda r: r["sessions_per_s"]
    cpu = lambda r: r["server_cpu_us_per_session"]
    row = {"servers": {}, "ratios": {}}
    for s in servers:
        rounds = by.get(s)
        if not rounds:
            continue
        m = spread([rate(r) for r in rounds.values()])
        u = spread([cpu(r) for r in rounds.values()])
        err = sum(errors(r["client"]) for r in rounds.values())
        row["servers"][s] = {"rounds": len(rounds), "sessions_per_s": m,
                             "server_cpu_us_per_session": u, "errors": err}
        print(f"{s:<18} {fmt_spread(m, '.0f'):>22} {fmt_spread(u, '.1f'):>24} {err:>6}")
    for label, a, b in comparisons(servers):
        ra, rb = by.get(a), by.get(b)
        if ra and rb:
            mr, cr = paired_ratios(ra, rb, rate), paired_ratios(ra, rb, cpu)
            row["ratios"][label] = {"sessions_per_s": mr, "server_cpu_us_per_session": cr}
            print(f"  {label:<26} sessions/s {fmt_spread(mr, '.2f', 'x'):>22}   µs/session {fmt_spread(cr, '.2f', 'x'):>20}")
    return row


def memory_summary(out):
    recs = records(out, "memory")
    if recs:
        print("\nmemory of a fresh gateway per measurement: RSS growth / connections held")
        for r in recs:
            per = r["rss_per_connection_kib"]
            print(f"{r['server']:<13} {r['stage']:<9} {r['flags']:<22} held {r['connections_held']:>6}"
                  f"/{r['connections_asked']:<6} RSS {r['rss_before_kib']:>7} -> {r['rss_held_kib']:>8} KiB"
                  f"  {'-' if per is None else f'{per:.1f}':>7} KiB/conn"
                  f"  client wrote {r['client_bytes_written'] / r['connections_held'] / 1024 if r['connections_held'] else 0:.0f} KiB/conn")
    return recs


def table(out):
    """The issue-9 table in Markdown, from summary.json: one column per backend."""
    with open(os.path.join(out, "summary.json")) as f:
        sm = json.load(f)
    # One column per gateway; its STARTTLS figures (NAME+tls) are rows of that column.
    gws = sorted({s for r in sm["rows"] for s in r["servers"] if s.startswith("smtpgw")}
                 | {s for r in sm["smtp_source"] for s in r["servers"] if s.startswith("smtpgw")}
                 | {m["server"] for m in sm["memory"]})
    gws = [g for g in gws if not g.endswith("+tls")]
    num = lambda sp, spec: "-" if not sp else format(sp[0], spec)
    rng = lambda sp, spec: "" if not sp or sp[1] == sp[2] else f" ({format(sp[1], spec)}–{format(sp[2], spec)})"
    ratio = lambda sp: "-" if not sp else f"{sp[0]:.2f}x" + ("" if sp[1] == sp[2] else f" ({sp[1]:.2f}–{sp[2]:.2f})")

    def cell_row(size, conns, pipe):
        return next((r for r in sm["rows"] if r["size"] == size and r["connections"] == conns
                     and r["pipelining"] == pipe), None)

    lines = ["| measured | " + " | ".join(gws) + " | target |", "|---|" + "---|" * (len(gws) + 1)]

    def add(label, fn, target=""):
        lines.append(f"| {label} | " + " | ".join(fn(g) for g in gws) + f" | {target} |")

    def floor_of(g):
        b = backend_of(g)
        return f"floor-{b}" if b else None

    for conns in (100, 1000):
        r = cell_row("1k", conns, True)
        if not r:
            continue

        def msgs(g, r=r):
            sv = r["servers"].get(g, {}).get("msgs_per_s")
            fl = r["servers"].get(floor_of(g), {}).get("msgs_per_s")
            text = f"{num(sv, ',.0f')}{rng(sv, ',.0f')}"
            if fl:
                text += f"; floor {num(fl, ',.0f')}"
            if g == "smtpgw-uring" and "uring/epoll" in r["ratios"]:
                text += f"; uring/epoll {ratio(r['ratios']['uring/epoll']['msgs_per_s'])}"
            return text

        def cpu(g, r=r):
            sv = r["servers"].get(g, {}).get("server_cpu_us_per_msg")
            fr = r["ratios"].get(f"{g}/{floor_of(g)}", {}).get("server_cpu_us_per_msg")
            return f"{num(sv, '.1f')} µs{rng(sv, '.1f')}; {ratio(fr)} floor"

        add(f"own client, 1 KiB, {conns:,} connections, pipelined: msgs/s", msgs,
            "≥ 200k" if conns == 100 else "uring ≥ 1.3x epoll")
        add("same: gateway CPU per message", cpu)

        def tls(g, r=r, field="msgs_per_s", spec=",.0f", unit=""):
            sv = r["servers"].get(f"{g}+tls", {}).get(field)
            if not sv:
                return "-"
            ra = r["ratios"].get(f"{g}+tls/plaintext", {}).get(field)
            return f"{num(sv, spec)}{unit}{rng(sv, spec)}; {ratio(ra)} plaintext"

        if any(f"{g}+tls" in r["servers"] for g in gws):
            add("same over STARTTLS: msgs/s", tls)
            add("same over STARTTLS: gateway CPU per message",
                lambda g, r=r: tls(g, r, "server_cpu_us_per_msg", ".1f", " µs"))
    for row in sm["smtp_source"]:
        n = row["sessions"]

        def src(g, row=row):
            sv = row["servers"].get(g, {}).get("server_cpu_us_per_msg")
            fr = row["ratios"].get(f"{g}/{floor_of(g)}", {}).get("server_cpu_us_per_msg")
            sk = row["ratios"].get(f"{g}/smtp-sink", {}).get("server_cpu_us_per_msg")
            fl = row["servers"].get(floor_of(g), {}).get("server_cpu_us_per_msg")
            return (f"{num(sv, '.1f')} µs{rng(sv, '.1f')}; {ratio(fr)} floor ({num(fl, '.1f')} µs);"
                    f" {ratio(sk)} smtp-sink")

        sink = row["servers"].get("smtp-sink", {}).get("server_cpu_us_per_msg")
        add(f"`smtp-source`, 1 KiB, {n} sessions, lock-step: server CPU per message"
            f" (smtp-sink {num(sink, '.1f')} µs)", src, "≤ 1.1x floor, ≤ 0.7x smtp-sink")
    r = cell_row("1m", 10, False)
    if r and sm.get("loopback_ceiling_mb_per_s"):
        ceil = sm["loopback_ceiling_mb_per_s"]
        def big(g, r=r):
            mb = r["servers"].get(g, {}).get("mb_per_s")
            fr = r["ratios"].get(f"{g}/{floor_of(g)}", {}).get("msgs_per_s")
            return (f"{num(mb, '.0f')}{rng(mb, '.0f')}; {(mb[0] / ceil * 100 if mb else 0):.0f}%"
                    f" of loopback; {ratio(fr)} floor")

        add(f"1 MiB, 10 connections, lock-step: MB/s (loopback iperf3 {ceil:.0f} MB/s)", big,
            "≥ 60% of loopback")

    ses = sm.get("sessions") or {}

    def sessions(g, field="sessions_per_s", spec=",.0f", unit=""):
        def f(g=g, name=None):
            return ses.get("servers", {}).get(name or g, {}).get(field)
        plain, tls = f(), f(name=f"{g}+tls")
        if not plain and not tls:
            return "-"
        ra = ses.get("ratios", {}).get(f"{g}+tls/plaintext", {}).get(field)
        return (f"plaintext {num(plain, spec)}{unit}{rng(plain, spec)};"
                f" TLS {num(tls, spec)}{unit}{rng(tls, spec)} ({ratio(ra)})")

    if ses.get("servers"):
        add("a new session per message, 1 KiB, 50 connections: sessions (TLS: full handshakes)/s",
            sessions)
        add("same: gateway CPU per session",
            lambda g: sessions(g, "server_cpu_us_per_session", ".0f", " µs"))

    def mem(stage, flags=""):
        def f(g):
            m = next((m for m in sm["memory"] if m["server"] == g and m["stage"] == stage
                      and m["flags"] == flags), None)
            if not m or m["rss_per_connection_kib"] is None:
                return "-"
            return (f"{m['rss_per_connection_kib']:.1f} KiB"
                    + ("" if m["connections_held"] == m["connections_asked"]
                       else f" ({m['connections_held']} of {m['connections_asked']} held)"))
        return f

    add("RSS per idle connection, 10,000 connections after the greeting", mem("greeting"), "≤ 8 KiB")
    add("RSS per connection, 10,000 connections in the middle of DATA", mem("data"), "≤ 12 KiB")
    add("40 clients pipelining `HELP` and never reading, 6-octet writes: RSS each",
        mem("no-read", "--write-chunk 6"), "≤ 64 KiB")
    add("same, 64 KiB writes", mem("no-read", "--write-chunk 65536"), "≤ 64 KiB")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: summarize.py cell PATH NAME SIZE CONNS PIPE TICKS CLK_TCK PEAK_KIB CLIENT_OUT")
        print("       summarize.py session PATH NAME TICKS CLK_TCK CLIENT_OUT [ROUND]")
        print("       summarize.py summary OUT_DIR ...   (all called by loadtest/run.sh)")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    if sys.argv[1] == "cell":
        cell(*sys.argv[2:])
    elif sys.argv[1] == "session":
        session(*sys.argv[2:])
    elif sys.argv[1] == "summary":
        summary(*sys.argv[2:])
    elif sys.argv[1] == "table":
        table(*sys.argv[2:])
    else:
        sys.exit("usage: summarize.py cell|summary|table ...")
