#!/usr/bin/env python3
"""Times AUTH PLAIN against a private gateway (loopback, plaintext allowed): a right
password, a wrong one and an unknown user, 20 attempts each, from the AUTH line to its
reply. The three kinds take turns: the first ~20 verifications after start are slower
whatever their kind, so a kind timed in a block of its own, first, came out up to
twice as slow as the others.
Usage: scripts/auth_timing.py target/release/smtpgw"""
import base64, socket, statistics, subprocess, sys, time, os, re, tempfile
binary = sys.argv[1]
d = tempfile.mkdtemp()
h = subprocess.run([binary, "auth", "hash"], input=b"secret\n", capture_output=True).stdout.decode().strip()
open(f"{d}/users", "w").write(f"alice:{h}\n")
p = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--spool-dir", f"{d}/spool",
    "--auth-users", f"{d}/users", "--auth-allow-plaintext", "--max-auth-failures-per-ip", "0", "--io-backend", "epoll"],
    stderr=subprocess.PIPE)
port = None
for line in p.stderr:
    m = re.search(rb"listening addr=127.0.0.1:(\d+)", line)
    if m:
        port = int(m.group(1)); break
def attempt(user, pw):
    s = socket.create_connection(("127.0.0.1", port)); f = s.makefile("rb")
    f.readline(); s.sendall(b"EHLO c\r\n")
    while not f.readline().startswith(b"250 "): pass
    t = time.perf_counter()
    s.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + pw) + b"\r\n")
    r = f.readline(); took = time.perf_counter() - t
    s.close(); return took, r[:3]
attempt(b"alice", b"secret")
kinds = [("right password", b"alice", b"secret"), ("wrong password", b"alice", b"x"), ("unknown user", b"nobody", b"x")]
got = {k[0]: [] for k in kinds}
for _ in range(20):
    for name, user, pw in kinds:
        got[name].append(attempt(user, pw))
for name, ts in got.items():
    print(f"{name}: code {ts[0][1].decode()} median {statistics.median(t for t,_ in ts)*1000:.1f} ms, min {min(t for t,_ in ts)*1000:.1f}, max {max(t for t,_ in ts)*1000:.1f}")
p.terminate(); p.wait()
