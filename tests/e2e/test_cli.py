"""Start-up: bad flags fail at once with one line naming the flag; good ones serve."""

import json
import socket
import urllib.request

import pytest

import subprocess

from conftest import gateway_binary, gateway_env, run_binary
from smtpwire import assert_reply, make_message

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
def test_bad_flag_exits_2_with_clap_message_naming_it(tmp_path, flag):
    result = run_binary("--listen", "127.0.0.1:0", "--spool-dir", str(tmp_path / "spool"), *flag, timeout=10)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, f"exit code {result.returncode}, stderr: {stderr!r}"
    lines = stderr.splitlines()
    # The first line names the flag: a value the gateway refuses is that one line; one
    # clap cannot parse is clap's whole message (not cut to its first line).
    assert lines[0].startswith("error:") and flag[0] in lines[0], f"{lines[0]!r} does not name {flag[0]}"
    assert len(lines) == 1 or "--help" in lines[-1], stderr
    assert "panicked" not in stderr


def test_bad_enum_value_lists_the_valid_ones(tmp_path):
    result = run_binary("--sink", "kafak", "--spool-dir", str(tmp_path / "spool"), timeout=10)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "--sink" in stderr.splitlines()[0]
    assert "possible values: spool, null, kafka" in stderr, stderr


def test_missing_spool_argument_is_named():
    result = run_binary("spool", "export", timeout=10)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    # OUT (the mbox file or eml directory), or the older `--mbox FILE`.
    assert "<OUT>" in stderr, stderr


@pytest.mark.parametrize(
    ("sub", "words"),
    [
        ("ls", "List the stored messages"),
        ("cat", "Print one stored message"),
        ("export", "mbox"),
        ("replay", "Publish every stored message to Kafka"),
        ("check", "Verify every record"),
        ("prune", "Delete whole closed segments"),
        ("hold", "Keep a message from forwarding"),
        ("release", "Undo `hold`"),
        ("delete", "Never forward, replay or export a message again"),
        ("stat", "Counts and bytes by state and by age"),
    ],
)
def test_spool_subcommands_have_their_own_help_and_take_config(sub, words):
    result = run_binary("spool", sub, "--help", timeout=10)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert words in out and "--config <FILE>" in out, out
    assert "--max-recipients" not in out and "SMTP ingestion gateway" not in out, out


def env_with(**extra: str) -> dict[str, str]:
    env = gateway_env()
    env.update(extra)
    return env


def test_bad_value_from_the_environment_names_the_variable(tmp_path):
    result = subprocess.run(
        [str(gateway_binary()), "--listen", "127.0.0.1:0", "--spool-dir", str(tmp_path / "spool")],
        capture_output=True, timeout=10, stdin=subprocess.DEVNULL,
        env=env_with(SMTPGW_MAX_RECIPIENTS="0"),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode() == "error: SMTPGW_MAX_RECIPIENTS: must be at least 1 (got 0)\n"


def test_bad_value_from_the_file_names_the_file_and_key(tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text('idle-timeout = "soon"\n')
    result = run_binary("--config", str(config), "--listen", "127.0.0.1:0", timeout=10)
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode() == (
        f"error: --config {config}: `idle-timeout`: not a duration (got \"soon\"); e.g. 300, 30s, 5m, 1h\n"
    )


def test_spool_tools_take_the_spool_dir_from_the_config_file(gateway, tmp_path):
    with gateway.session() as wire:
        message_id = wire.deliver(make_message("via-config"))
    config = tmp_path / "gw.toml"
    config.write_text(f'spool-dir = "{gateway.spool_dir}"\n')
    result = run_binary("spool", "ls", "--config", str(config), timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split()[0] == message_id


def test_bad_listen_address_exits_2(tmp_path):
    result = run_binary("--listen", "not-an-address", "--spool-dir", str(tmp_path / "spool"), timeout=10)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    # A value clap cannot parse is clap's whole message, its first line naming the flag.
    lines = stderr.splitlines()
    assert lines[0].startswith("error:") and "--listen" in lines[0], stderr
    assert "not an IP:PORT address" in lines[0] and "--help" in lines[-1], stderr


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


# --- one configuration model: units, sources, unknown keys ------------------------------


def advertised_size(gateway) -> int:
    with gateway.wire() as wire:
        assert_reply(wire.reply(), "220")
        ehlo = wire.expect("EHLO client.test", "250")
        wire.expect("QUIT", "221")
    sizes = [line[4:].split()[1] for line in ehlo.lines if line[4:].startswith("SIZE ")]
    assert len(sizes) == 1, ehlo.lines
    return int(sizes[0])


def test_sizes_in_si_and_iec_units_differ_from_flag_env_and_file(start_gateway, tmp_path):
    # 10MB is 10^7 bytes, 10MiB (and the old single-letter 10M) 10 * 2^20, from every source.
    assert advertised_size(start_gateway("--max-message-size", "10MB")) == 10_000_000
    assert advertised_size(start_gateway(env={"SMTPGW_MAX_MESSAGE_SIZE": "10MiB"})) == 10 * 1024 * 1024
    config = tmp_path / "gw.toml"
    config.write_text('max-message-size = "10M"\n')
    assert advertised_size(start_gateway("--config", str(config))) == 10 * 1024 * 1024
    config.write_text('max-message-size = "1.5MB"\n')
    assert advertised_size(start_gateway("--config", str(config))) == 1_500_000


def test_unknown_file_key_is_refused_naming_the_file_and_key(tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text('listen = "127.0.0.1:0"\nmax-mesage-size = "10M"\n')
    result = run_binary("--config", str(config), "--spool-dir", str(tmp_path / "spool"), timeout=10)
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode() == (
        f"error: --config {config}: unknown key `max-mesage-size` "
        "(keys are the long flag names, e.g. `listen`, `accept-domain`)\n"
    )
    # The spool tools read the same file and refuse it the same way.
    result = run_binary("spool", "ls", "--config", str(config), timeout=10)
    assert result.returncode != 0
    assert f"--config {config}: unknown key `max-mesage-size`" in result.stderr.decode()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("flag", "error: invalid value '10X' for '--max-message-size <BYTES|auto>': not a size (got \"10X\")"),
        ("env", "error: SMTPGW_MAX_MESSAGE_SIZE: not a size (got \"10X\")"),
        ("file", "error: --config {config}: `max-message-size`: not a size (got \"10X\")"),
    ],
)
def test_a_value_that_does_not_parse_names_its_source(tmp_path, source, expected):
    config = tmp_path / "gw.toml"
    config.write_text('max-message-size = "10X"\n' if source == "file" else "")
    args = ["--config", str(config), "--listen", "127.0.0.1:0", "--spool-dir", str(tmp_path / "spool")]
    if source == "flag":
        args += ["--max-message-size", "10X"]
    env = env_with(SMTPGW_MAX_MESSAGE_SIZE="10X") if source == "env" else gateway_env()
    result = subprocess.run(
        [str(gateway_binary()), *args], capture_output=True, timeout=10, stdin=subprocess.DEVNULL, env=env
    )
    assert result.returncode == 2, result.stderr
    first = result.stderr.decode().splitlines()[0]
    assert first.startswith(expected.format(config=config)), first
