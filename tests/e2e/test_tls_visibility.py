"""TLS an operator can see: the certificate's subject and expiry in the log and in
`smtpgw_tls_certificate_expiry_timestamp_seconds`, a renewal picked up from the files
without a signal (certbot's rename, a Kubernetes Secret's link swap), `--tls-min-version`,
and the reload metrics with a line naming only what changed."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import wait_for
from edge_support import client_context, make_certificate, metrics
from smtpwire import IO_TIMEOUT
from test_tls import replace_atomically, served_certificate, wait_for_log


def certificate(directory: Path, name: str, days: int) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", str(days), "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def not_after(cert: Path) -> int:
    text = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(cert)],
                          check=True, capture_output=True, text=True, timeout=30).stdout
    stamp = text.strip().partition("=")[2]
    return int(time.mktime(time.strptime(stamp, "%b %d %H:%M:%S %Y %Z")) - time.timezone)


def expiry_series(gateway) -> dict[str, float]:
    found = re.findall(r'^smtpgw_tls_certificate_expiry_timestamp_seconds\{subject="([^"]*)"\} (\S+)$',
                       metrics(gateway), re.M)
    return {subject: float(value) for subject, value in found}


def reloads(gateway) -> dict[str, float]:
    found = re.findall(r'^smtpgw_config_reloads_total\{result="(\w+)"\} (\S+)$', metrics(gateway), re.M)
    return {result: float(value) for result, value in found}


def test_certificate_subject_and_expiry_in_the_log_and_the_metric(start_gateway, tmp_path):
    cert, key = certificate(tmp_path / "a", "mx.visible.test", days=90)
    gateway = start_gateway("--tls-cert", str(cert), "--tls-key", str(key))
    line = wait_for_log(gateway, r"TLS certificate loaded[^\n]*", after=0)
    # The text format quotes a value that holds `=`.
    assert re.search(r'subject="?CN=mx\.visible\.test"?', line) and re.search(r"days_left=(89|90)\b", line), line
    assert "WARN" not in line
    assert expiry_series(gateway) == {"CN=mx.visible.test": not_after(cert)}
    assert gateway.stop() == 0


def test_a_certificate_about_to_expire_is_a_warning(start_gateway, tmp_path):
    cert, key = certificate(tmp_path / "a", "mx.expiring.test", days=5)
    gateway = start_gateway("--tls-cert", str(cert), "--tls-key", str(key))
    line = wait_for_log(gateway, r"[^\n]*TLS certificate loaded; it expires soon[^\n]*", after=0)
    assert " WARN " in line and re.search(r"days_left=[45]\b", line), line
    assert gateway.stop() == 0


def test_a_renewed_certificate_is_picked_up_without_a_signal(start_gateway, tmp_path):
    """certbot's way: the new files are renamed over the old ones. New handshakes present
    the new certificate, the metric follows, and no SIGHUP was sent."""
    old_cert, old_key = certificate(tmp_path / "old", "mx.test", days=3)
    new_cert, new_key = certificate(tmp_path / "new", "mx.test", days=80)
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    replace_atomically(old_cert, cert)
    replace_atomically(old_key, key)
    gateway = start_gateway("--hostname", "mx.test", "--tls-cert", str(cert), "--tls-key", str(key))
    assert served_certificate(gateway, old_cert) == ssl.PEM_cert_to_DER_cert(old_cert.read_text())
    mark = len(gateway.stderr)
    replace_atomically(new_key, key)
    replace_atomically(new_cert, cert)
    wait_for_log(gateway, r"certificate files changed: TLS certificate reloaded", after=mark)
    assert served_certificate(gateway, new_cert) == ssl.PEM_cert_to_DER_cert(new_cert.read_text())
    assert expiry_series(gateway) == {"CN=mx.test": not_after(new_cert)}
    assert reloads(gateway)["ok"] >= 1 and reloads(gateway)["refused"] == 0
    assert "SIGHUP" not in gateway.stderr[mark:]
    assert gateway.stop() == 0


def test_a_kubernetes_secret_update_is_picked_up(start_gateway, tmp_path):
    """A Secret volume: tls.crt -> ..data/tls.crt, ..data -> ..2026_..., and an update
    writes a new timestamped directory and swaps the ..data link atomically."""
    volume = tmp_path / "secret"
    first = volume / "..2026_12_07_01"
    old_cert, old_key = certificate(first, "old.secret.test", days=30)
    os.symlink(first.name, volume / "..data")
    for name in ("tls.crt", "tls.key"):
        os.symlink(f"..data/{name}", volume / name)
    gateway = start_gateway("--tls-cert", str(volume / "tls.crt"), "--tls-key", str(volume / "tls.key"))
    assert expiry_series(gateway) == {"CN=old.secret.test": not_after(old_cert)}
    mark = len(gateway.stderr)
    second = volume / "..2026_12_07_02"
    new_cert, _ = certificate(second, "new.secret.test", days=60)
    os.symlink(second.name, volume / "..data_tmp")
    os.rename(volume / "..data_tmp", volume / "..data")
    wait_for_log(gateway, r"TLS certificate reloaded[^\n]*new\.secret\.test", after=mark)
    assert expiry_series(gateway) == {"CN=new.secret.test": not_after(new_cert)}
    assert gateway.stop() == 0


def test_a_broken_renewal_keeps_the_running_certificate(start_gateway, tmp_path):
    cert, key = certificate(tmp_path / "live", "mx.test", days=30)
    gateway = start_gateway("--hostname", "mx.test", "--tls-cert", str(cert), "--tls-key", str(key))
    running = ssl.PEM_cert_to_DER_cert(cert.read_text())
    mark = len(gateway.stderr)
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    replace_atomically(garbage, cert)
    wait_for_log(gateway, r"certificate files changed: TLS certificate refused", after=mark)
    wait_for("the refused reload counted", lambda: reloads(gateway).get("refused", 0) >= 1)
    # Handshakes go on with the certificate loaded before (verified against its copy).
    kept = tmp_path / "kept.crt"
    kept.write_text(ssl.DER_cert_to_PEM_cert(running))
    assert served_certificate(gateway, kept) == running
    assert gateway.stop() == 0


@pytest.mark.parametrize("minimum", ["1.2", "1.3"])
def test_tls_min_version(start_gateway, tmp_path, minimum):
    cert, key = make_certificate(tmp_path)
    gateway = start_gateway("--hostname", "mx.test", "--tls-cert", str(cert), "--tls-key", str(key),
                            "--tls-min-version", minimum)
    for version, allowed in ((ssl.TLSVersion.TLSv1_2, minimum == "1.2"), (None, True)):
        with smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT) as client:
            client.ehlo()
            if allowed:
                client.starttls(context=client_context(cert, version))
                assert client.ehlo()[0] == 250
            else:
                with pytest.raises(ssl.SSLError):
                    client.starttls(context=client_context(cert, version))
    assert gateway.stop() == 0


def test_reload_metrics_and_a_line_naming_only_what_changed(start_gateway, tmp_path):
    config = tmp_path / "smtpgw.toml"
    config.write_text('accept-domain = ["a.example"]\nmax-recipients = 10\n')
    gateway = start_gateway("--config", str(config))
    started = float(re.search(r"^smtpgw_config_last_reload_success_timestamp_seconds (\S+)$",
                              metrics(gateway), re.M).group(1))
    assert abs(started - time.time()) < 120
    assert reloads(gateway) == {"ok": 0, "refused": 0}

    mark = len(gateway.stderr)
    gateway.send_signal(signal.SIGHUP)
    line = wait_for_log(gateway, r"SIGHUP: configuration reloaded[^\n]*", after=mark)
    assert "no setting changed" in line, line
    wait_for("the reload counted", lambda: reloads(gateway)["ok"] == 1)

    mark = len(gateway.stderr)
    config.write_text('accept-domain = ["a.example"]\nmax-recipients = 20\n')
    gateway.send_signal(signal.SIGHUP)
    line = wait_for_log(gateway, r"SIGHUP: configuration reloaded[^\n]*", after=mark)
    assert "max-recipients: 10 -> 20" in line and "accept-domain" not in line and "bare-lf" not in line, line
    wait_for("the reload counted", lambda: reloads(gateway)["ok"] == 2)

    mark = len(gateway.stderr)
    before = float(re.search(r"^smtpgw_config_last_reload_success_timestamp_seconds (\S+)$",
                             metrics(gateway), re.M).group(1))
    config.write_text("max-recipients = \"many\"\n")
    gateway.send_signal(signal.SIGHUP)
    wait_for_log(gateway, r"configuration refused", after=mark)
    wait_for("the refusal counted", lambda: reloads(gateway)["refused"] == 1)
    after = float(re.search(r"^smtpgw_config_last_reload_success_timestamp_seconds (\S+)$",
                            metrics(gateway), re.M).group(1))
    assert after == before
    assert gateway.stop() == 0
