"""Start-up: bad flags fail at once with one line naming the flag; good ones serve."""

import json
import socket
import urllib.request

import pytest

from conftest import run_binary
from smtpwire import make_message

BAD_FLAGS = [
    ("--no-such-flag",),
    ("--max-message-size", "lots"),
    ("--max-recipients", "many"),
    ("--max-connections", "none"),
    ("--idle-timeout", "soon"),
    ("--bare-lf", "maybe"),
    ("--log-format", "xml"),
    ("--sink", "tape"),
    ("--reactors", "all"),
]


@pytest.mark.parametrize("flag", BAD_FLAGS, ids=lambda f: f[0])
def test_bad_flag_exits_2_with_one_line_naming_it(tmp_path, flag):
    result = run_binary("--listen", "127.0.0.1:0", "--spool-dir", str(tmp_path / "spool"), *flag, timeout=10)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, f"exit code {result.returncode}, stderr: {stderr!r}"
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert flag[0] in lines[0], f"{lines[0]!r} does not name {flag[0]}"


def test_bad_listen_address_exits_2(tmp_path):
    result = run_binary("--listen", "not-an-address", "--spool-dir", str(tmp_path / "spool"), timeout=10)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert len(stderr.splitlines()) == 1 and "--listen" in stderr, stderr


def test_gateway_serves_on_the_logged_loopback_port(gateway):
    assert gateway.port > 0
    with gateway.session() as wire:
        wire.expect("QUIT", "221 2.0.0")
        assert wire.closed_by_server()
    assert gateway.spool_ids() == []


def test_spool_cat_of_unknown_id_fails(gateway):
    result = run_binary("spool", "cat", "--spool-dir", str(gateway.spool_dir), "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert result.returncode != 0
    assert result.stderr.strip(), "a failing spool cat should say why"


def test_json_log_format_writes_one_json_object_per_line(start_gateway):
    gateway = start_gateway("--log-format", "json")
    with gateway.session() as wire:
        wire.deliver(make_message("json-logs"))
        wire.expect("QUIT", "221 2.0.0")
    assert gateway.stop() == 0
    assert gateway.log and all(isinstance(json.loads(line), dict) for line in gateway.log), gateway.log


def test_metrics_port_in_use_fails_naming_the_flag(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_binary(
            *("--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{port}"),
            *("--spool-dir", str(tmp_path / "spool")),
            timeout=10,
        )
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1, stderr
    last = stderr.splitlines()[-1]
    assert last.startswith("error: --metrics-listen ") and "in use" in last, stderr


def test_metrics_endpoint_of_a_running_gateway(gateway):
    assert gateway.metrics_addr, "no metrics_addr= in the log"
    with gateway.session() as wire:
        wire.deliver(make_message("metrics"))
        wire.expect("QUIT", "221 2.0.0")
    with urllib.request.urlopen(f"http://{gateway.metrics_addr}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert "smtpgw_messages_accepted_total" in resp.read().decode()
    with urllib.request.urlopen(f"http://{gateway.metrics_addr}/healthz", timeout=10) as resp:
        assert (resp.status, resp.read()) == (200, b"ok\n")
