#!/usr/bin/env python3
"""Probe latency of the metrics endpoint while clients hold connections to it (README
"Observability", issue 20 item 1).

    scripts/metrics-probe-latency.py target/release/smtpgw HOLDERS ADDRESSES

starts the gateway on loopback with port 0, runs HOLDERS threads that connect from
127.0.0.2 .. 127.0.0.(1+ADDRESSES), read until closed and reconnect, then, once they
have made HOLDERS connections, sends 40 probes from 127.0.0.1, `/healthz` and `/readyz`
in turn (5 s timeout each), and prints how many were answered (`ok`, `ready`) and the
median and maximum latency. Exit status 1 unless all were. The gateway is stopped by
its PID. tests/e2e/test_operations.py runs it."""

import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def main() -> None:
    binary, holders, addresses = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with tempfile.TemporaryDirectory() as spool:
        p = subprocess.Popen(
            # The endpoint runs on its own thread whatever the backend; epoll on one
            # reactor keeps the run clear of io_uring's locked-memory limit.
            [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--spool-dir", spool,
             "--io-backend", "epoll", "--reactors", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            addr = None
            deadline = time.monotonic() + 10
            while not addr and time.monotonic() < deadline and p.poll() is None:
                match = re.search(r"metrics_addr=(\S+)", p.stderr.readline().decode())
                addr = match and match.group(1)
            if not addr:
                sys.exit(f"the gateway did not start (exit status {p.poll()})")
            host, _, port = addr.rpartition(":")
            stop = threading.Event()
            held = [0]

            def hold(source: str) -> None:
                while not stop.is_set():
                    try:
                        with socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0)) as s:
                            held[0] += 1
                            while s.recv(4096):
                                pass
                    except OSError:
                        time.sleep(0.01)

            threads = [threading.Thread(target=hold, args=(f"127.0.0.{2 + i % addresses}",), daemon=True)
                       for i in range(holders)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 20
            while held[0] < holders and time.monotonic() < deadline:
                time.sleep(0.05)
            if held[0] < holders:
                sys.exit(f"only {held[0]} of {holders} holders connected")
            latencies = []
            for path, want in [("/healthz", b"ok\n"), ("/readyz", b"ready\n")] * 20:
                started = time.monotonic()
                try:
                    if urllib.request.urlopen(f"http://{addr}{path}", timeout=5).read() == want:
                        latencies.append(time.monotonic() - started)
                except OSError:
                    pass
                time.sleep(0.1)
            stop.set()
            for t in threads:
                t.join(10)
        finally:
            p.terminate()
            p.wait(10)
    if latencies:
        print(f"holders={holders} addresses={addresses} answered={len(latencies)}/40 "
              f"median={statistics.median(latencies) * 1000:.0f}ms max={max(latencies) * 1000:.0f}ms")
    else:
        print(f"holders={holders} addresses={addresses} answered=0/40")
    sys.exit(0 if len(latencies) == 40 else 1)


if __name__ == "__main__":
    main()
