"""`smtpgw check-config` and `smtpgw print-config`: the configuration checked exactly as a
start checks it, and the effective configuration with where each value came from."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from conftest import run_binary
from edge_support import make_certificate

# Listeners on free loopback ports and a private spool, so that a start that does get
# past its configuration binds nothing fixed (and is stopped by the timeout below).
SAFE = ("--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")


def first_error_line(stderr: bytes) -> str:
    return stderr.decode("utf-8", "replace").splitlines()[0]


def test_a_valid_configuration_checks_ok(tmp_path):
    cert, key = make_certificate(tmp_path)
    config = tmp_path / "smtpgw.toml"
    config.write_text(f'tls-cert = "{cert}"\ntls-key = "{key}"\naccept-domain = ["a.example"]\nreactors = 2\n')
    result = run_binary("check-config", "--config", str(config), *SAFE, "--spool-dir", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"configuration ok\n"
    assert result.stderr == b""
    # A check starts nothing: no spool was created.
    assert not (tmp_path / "s").exists()


def invalid_cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each kind of bad input a start refuses: (arguments, environment)."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    cert, key = make_certificate(tmp_path)
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text('lisen = "127.0.0.1:2525"\n')
    bad_value = tmp_path / "value.toml"
    bad_value.write_text("reactors = 0\n")
    not_toml = tmp_path / "broken.toml"
    not_toml.write_text("reactors = = 2\n")
    kafka = ["--sink", "kafka", "--kafka-brokers", "127.0.0.1:9"]
    return {
        "flag value": (["--reactors", "0"], {}),
        "flag syntax": (["--listen", "not-an-address"], {}),
        "environment": ([], {"SMTPGW_MAX_RECIPIENTS": "0"}),
        "file key": (["--config", str(bad_key)], {}),
        "file value": (["--config", str(bad_value)], {}),
        "file syntax": (["--config", str(not_toml)], {}),
        "missing file": (["--config", str(tmp_path / "nowhere.toml")], {}),
        "certificate": (["--tls-cert", str(garbage), "--tls-key", str(key)], {}),
        "certificate without key": (["--tls-cert", str(cert)], {}),
        "log filter": (["--log-level", "smtpgw=loud"], {}),
        "kafka setting name": ([*kafka, "--kafka-config", "no.such.property=1"], {}),
        "kafka setting value": ([*kafka, "--kafka-config", "linger.ms=forever"], {}),
        "kafka reserved setting": ([*kafka, "--kafka-config", "acks=0"], {}),
        "kafka without brokers": (["--sink", "kafka"], {}),
    }


CASE_NAMES = [
    "flag value", "flag syntax", "environment", "file key", "file value", "file syntax", "missing file",
    "certificate", "certificate without key", "log filter", "kafka setting name", "kafka setting value",
    "kafka reserved setting", "kafka without brokers",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_check_config_refuses_what_a_start_refuses_with_the_same_error(tmp_path, case):
    args, env = invalid_cases(tmp_path)[case]
    spool = ["--spool-dir", str(tmp_path / "spool")]
    checked = run_binary("check-config", *SAFE, *spool, *args, env=env, timeout=30)
    started = run_binary(*SAFE, *spool, *args, env=env, timeout=30)
    assert checked.returncode == 2, (checked.returncode, checked.stderr)
    assert started.returncode != 0, started.stderr
    assert checked.stdout == b""
    line = first_error_line(checked.stderr)
    assert line.startswith("error:"), line
    # The same error line a start gives (after any log lines it wrote before it got
    # there), naming the flag, variable or file key.
    start_errors = [l for l in started.stderr.decode("utf-8", "replace").splitlines() if l.startswith("error:")]
    assert start_errors[:1] == [line], (checked.stderr, started.stderr)


def settings(output: str) -> dict[str, tuple[object, str]]:
    """print-config's lines as key -> (value, origin)."""
    out = {}
    for line in output.splitlines():
        match = re.fullmatch(r"(.+?)  # (.+)", line)
        if line.startswith("#") or not match:
            continue
        (key, value), = tomllib.loads(match.group(1)).items()
        out[key] = (value, match.group(2))
    return out


def test_print_config_names_each_source(tmp_path):
    config = tmp_path / "smtpgw.toml"
    config.write_text(
        'reactors = 2\naccept-domain = ["a.example", "b.example"]\nidle-timeout = "2m"\n'
        'kafka-config = ["sasl.password=hunter2", "linger.ms=5"]\nmax-recipients = 7\n'
    )
    result = run_binary(
        "print-config", "--config", str(config), "--max-recipients", "9", "--listen", "127.0.0.1:0",
        env={"SMTPGW_IDLE_TIMEOUT": "90", "SMTPGW_ERROR_BUDGET": "3"},
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    got = settings(text)
    assert got["listen"] == ("127.0.0.1:0", "flag")
    assert got["max-recipients"] == (9, "flag")  # the flag wins over the file
    assert got["idle-timeout"] == ("90s", "environment SMTPGW_IDLE_TIMEOUT")  # the variable too
    assert got["error-budget"] == (3, "environment SMTPGW_ERROR_BUDGET")
    assert got["reactors"] == (2, "file")
    assert got["accept-domain"] == (["a.example", "b.example"], "file")
    assert got["max-connections"] == (10000, "default")
    assert got["trusted-cidr"] == (["127.0.0.0/8", "::1/128"], "default")
    # A credential is never printed.
    assert "hunter2" not in text
    assert got["kafka-config"] == (["sasl.password=(redacted)", "linger.ms=5"], "file")
    assert "# tls-cert (unset)  # default" in text.splitlines()
    # Every setting of `smtpgw --help` is listed once.
    help_text = run_binary("--help").stdout.decode()
    flags = set(re.findall(r"^\s+--([a-z0-9-]+)", help_text, re.M)) - {"help", "version", "config"}
    listed = set(got) | set(re.findall(r"^# ([a-z0-9-]+) \(unset\)", text, re.M))
    assert listed == flags, (flags - listed, listed - flags)


@pytest.mark.parametrize("domains", [[], ["--accept-domain", "x.example,y.example"]], ids=["defaults", "given"])
def test_print_config_output_is_a_config_file_that_gives_the_same_configuration(tmp_path, domains):
    first = run_binary("print-config", "--reactors", "3", *domains,
                       "--min-data-rate", "2K/10s", "--max-message-size", "20MiB", "--bare-lf", "normalize")
    assert first.returncode == 0, first.stderr
    config = tmp_path / "printed.toml"
    config.write_text(first.stdout.decode())
    second = run_binary("print-config", "--config", str(config))
    assert second.returncode == 0, second.stderr
    before, after = settings(first.stdout.decode()), settings(second.stdout.decode())
    assert {k: v for k, (v, _) in before.items()} == {k: v for k, (v, _) in after.items()}
    assert all(origin == "file" for _, origin in after.values())
    assert before["min-data-rate"][0] == "2048/10s" and before["max-message-size"][0] == "20971520"
    # And the checked file passes check-config.
    assert run_binary("check-config", "--config", str(config)).returncode == 0


def test_print_config_refuses_a_bad_configuration_like_a_start(tmp_path):
    result = run_binary("print-config", "--reactors", "0")
    assert result.returncode == 2
    assert first_error_line(result.stderr) == "error: --reactors: must be between 1 and 1024 (got 0)"
