"""The load generator's scripts as a user meets them: every one answers --help without
building anything, says what needs root and what the defaults are, measures a prebuilt
gateway with --gateway-bin, and the client refuses a non-loopback target unless told."""

from __future__ import annotations

import os
import subprocess
import sys

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
        (["bash", str(LOADTEST / "run.sh")], ["--gateway-bin", "Root:", "3 s", "5 s", "--allow-remote-target"]),
        (["bash", str(LOADTEST / "selftest.sh")], ["--gateway-bin", "root", "--no-build"]),
        ([sys.executable, str(LOADTEST / "summarize.py")], ["usage:"]),
        ([sys.executable, str(LOADTEST / "plot.py")], ["usage:"]),
    ],
    ids=["run.sh", "selftest.sh", "summarize.py", "plot.py"],
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
