"""The load generator's scripts as a user meets them: every one answers --help without
building anything, says what needs root and what the defaults are, measures a prebuilt
gateway with --gateway-bin, and the client refuses a non-loopback target unless told."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, gateway_binary

LOADTEST = REPO / "loadtest"


def no_cargo_env() -> dict[str, str]:
    """PATH without cargo or rustc: a script that tried to build would fail."""
    env = dict(os.environ)
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    return env


@pytest.mark.parametrize(
    ("script", "words"),
    [
        (["bash", str(LOADTEST / "run.sh")], ["--gateway-bin", "Root:", "3 s", "5 s", "--allow-remote-target", "--tls"]),
        (["bash", str(LOADTEST / "selftest.sh")], ["--gateway-bin", "root", "--no-build"]),
        (["bash", str(LOADTEST / "limit_cost.sh")], ["--gateway-bin", "Root is not needed", "callgrind"]),
        ([sys.executable, str(LOADTEST / "summarize.py")], ["usage:"]),
        ([sys.executable, str(LOADTEST / "plot.py")], ["usage:"]),
    ],
    ids=["run.sh", "selftest.sh", "limit_cost.sh", "summarize.py", "plot.py"],
)
def test_every_script_has_help_and_builds_nothing(script, words):
    result = subprocess.run(
        [*script, "--help"], capture_output=True, text=True, timeout=30, env=no_cargo_env(), stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr
    for word in words:
        assert word in result.stdout, (word, result.stdout)
    assert "cargo" not in result.stderr, result.stderr


def loadtest_binary():
    path = gateway_binary().parent / "smtpgw-loadtest"
    if not path.exists():
        pytest.fail(f"{path} is missing: cargo build --release --workspace --bins")
    return path


def test_client_refuses_a_remote_target_unless_told():
    result = subprocess.run(
        [str(loadtest_binary()), "--target", "192.0.2.1:25", "--messages-per-connection", "1"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert "not loopback" in result.stderr and "--allow-remote-target" in result.stderr, result.stderr
    # The flag exists (on a loopback target here: tests never talk to other hosts).
    help_text = subprocess.run(
        [str(loadtest_binary()), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    assert "--allow-remote-target" in help_text


@pytest.mark.timeout(240)
def test_selftest_measures_a_prebuilt_gateway():
    result = subprocess.run(
        ["bash", str(LOADTEST / "selftest.sh"), "--no-build", "--gateway-bin", str(gateway_binary())],
        capture_output=True, text=True, timeout=200, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: 1 passed, 0 failed" in result.stdout


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_client_over_tls_verifies_and_reconnects(start_gateway, tmp_path, mode):
    """`--tls` sessions really are TLS (the gateway counts a handshake for each), every
    message is accepted, `--messages-per-session` reconnects (one handshake per session),
    and a certificate that does not chain to `--tls-ca` is refused, never skipped."""
    from edge_support import make_certificate, metric, tls_port

    crt, key = make_certificate(tmp_path)
    gateway = start_gateway("--tls-cert", str(crt), "--tls-key", str(key), "--listen-tls", "127.0.0.1:0")
    port = gateway.port if mode == "starttls" else tls_port(gateway)
    report = tmp_path / "report.json"
    result = subprocess.run(
        [str(loadtest_binary()), "--target", f"127.0.0.1:{port}", "--connections", "4",
         "--messages-per-connection", "6", "--messages-per-session", "2", "--pipelining",
         "--tls", mode, "--tls-ca", str(crt), "--strict", "--json", str(report)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stats = json.loads(report.read_text())
    assert stats["accepted"] == 24, stats
    assert stats["sessions"] == 12, stats  # 4 connections x 3 sessions of 2 messages
    assert stats["protocol_errors"] == 0 and stats["timeouts"] == 0, stats
    handshakes = sum(
        metric(gateway, f'smtpgw_tls_handshakes_total{{version="{v}"}}', deadline=0.5)
        for v in ("TLSv1.2", "TLSv1.3")
    )
    assert handshakes == 12, handshakes

    (tmp_path / "other").mkdir()
    other_crt, _ = make_certificate(tmp_path / "other")
    refused = subprocess.run(
        [str(loadtest_binary()), "--target", f"127.0.0.1:{port}", "--connections", "1",
         "--messages-per-connection", "1", "--tls", mode, "--tls-ca", str(other_crt), "--strict"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert refused.returncode != 0
    assert "invalid peer certificate" in refused.stdout, refused.stdout


def test_client_tls_flags_are_checked():
    for args, words in [
        (["--tls", "starttls"], "--tls-ca"),
        (["--tls-ca", "/nonexistent.pem"], "--tls starttls"),
        (["--tls", "starttls", "--helo", "--tls-ca", "/nonexistent.pem"], "drop --helo"),
        (["--tls", "implicit", "--tls-ca", "/nonexistent.pem"], "/nonexistent.pem"),
        (["--messages-per-session", "0"], "at least 1"),
    ]:
        result = subprocess.run(
            [str(loadtest_binary()), "--target", "127.0.0.1:9", *args],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
        assert result.returncode != 0 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("mode", ["epoll", "uring"])
def test_floor_serves_on_as_many_loops_as_asked(mode, tmp_path):
    """`floor --threads 3`: three serving threads, each with its own listener on the one
    port (SO_REUSEPORT), and every message of the load client answered."""
    floor = subprocess.Popen(
        [str(loadtest_binary()), "floor", "--mode", mode, "--threads", "3", "--listen", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        line = floor.stderr.readline()
        assert "3 loops" in line and "addr=" in line, line
        addr = line.rsplit("addr=", 1)[1].strip()
        tasks = f"/proc/{floor.pid}/task"
        # A thread names itself once it runs, so its name can lag the line a little.
        deadline = time.monotonic() + 5
        while True:
            names = sorted(open(f"{tasks}/{tid}/comm").read().strip() for tid in os.listdir(tasks))
            loops = [n for n in names if n.startswith("floor-")]
            if len(loops) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert loops == ["floor-0", "floor-1", "floor-2"], names
        out = tmp_path / "result.json"
        result = subprocess.run(
            [str(loadtest_binary()), "--target", addr, "--connections", "12",
             "--messages-per-connection", "50", "--pipelining", "--strict", "--json", str(out)],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(out.read_text())["accepted"] == 600, out.read_text()
    finally:
        floor.kill()
        floor.wait(timeout=10)
