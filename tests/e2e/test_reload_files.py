"""The files the gateway reads (the --config file, the TLS certificate and key), at start
and on SIGHUP: a FIFO or a device in their place is a one-line error, never a hang or an
abort; a file one byte over its size cap (16 MiB for the config, 1 MiB for a PEM file)
is refused and one at the cap is read; a certificate chain with an unparseable member
is refused before it replaces the running one; a reload that is refused still lets
SIGTERM drain; a 300,000-domain accept list reloads and its log line stays short
(issue 20, items 3 and 4)."""

from __future__ import annotations

import base64
import os
import signal
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest

from conftest import run_binary
from edge_support import client_context, make_certificate
from smtpwire import IO_TIMEOUT
from test_operations import procs, write_config  # noqa: F401 (procs is a fixture)

# A SIGTERM after a refused reload must end the process within this (a hung signal
# thread would never end it).
EXIT_TIMEOUT = 15.0


def special(kind: str, where: Path) -> Path:
    """A path to a special file: a FIFO nobody writes, or a link to /dev/zero."""
    path = where / f"special-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)
    return path


def put_in_place(source: Path, target: Path) -> None:
    """`target` becomes `source` (a FIFO or a link) in one rename, as a deploy would."""
    os.rename(source, target)


def garbage_intermediate(leaf: Path, out: Path) -> Path:
    """The leaf followed by a CERTIFICATE block that is not X.509: a DER SEQUENCE whose
    length runs past its end (what the audit saw as `asn1 ... too long`)."""
    bogus = b"\x30\x82\xff\xff" + bytes(range(256)) * 2
    block = base64.encodebytes(bogus).decode()
    out.write_text(leaf.read_text() + f"-----BEGIN CERTIFICATE-----\n{block}-----END CERTIFICATE-----\n")
    return out


def handshake(port: int, cafile: Path) -> bytes:
    """The DER certificate a STARTTLS handshake presents, verified against `cafile`."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=IO_TIMEOUT) as client:
        client.ehlo()
        client.starttls(context=client_context(cafile))
        der = client.sock.getpeercert(binary_form=True)
        client.quit()
    return der


def stop_and_expect_clean_exit(p) -> None:
    p.signal(signal.SIGTERM)
    try:
        p.proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SIGTERM did not drain within {EXIT_TIMEOUT}s:\n{p.text}") from None
    assert p.proc.returncode == 0, p.text


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_special_file_as_config_at_start_is_a_one_line_error(tmp_path, kind):
    path = special(kind, tmp_path)
    result = run_binary("--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--config", str(path),
                        timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: --config {path}: "), lines
    assert "not a regular file" in lines[0], lines


@pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key"])
@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_special_file_as_certificate_or_key_at_start_is_a_one_line_error(tmp_path, kind, flag):
    crt, key = make_certificate(tmp_path)
    path = special(kind, tmp_path)
    files = {"--tls-cert": crt, "--tls-key": key} | {flag: path}
    result = run_binary("--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                        "--spool-dir", str(tmp_path / "spool"),
                        "--tls-cert", str(files["--tls-cert"]), "--tls-key", str(files["--tls-key"]), timeout=30)
    assert result.returncode == 2, result.stderr
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"error: {flag} {path}: "), last
    assert "not a regular file" in last, last


# The caps README "Reloading" states: 16 MiB for --config, 1 MiB for each PEM file.
CONFIG_CAP = 16 * 1024 * 1024
PEM_CAP = 1024 * 1024


@pytest.mark.parametrize("flag", ["--config", "--tls-cert", "--tls-key"])
def test_a_file_over_its_size_cap_is_refused_at_start(tmp_path, flag):
    """One byte over the cap is refused, in one line naming the flag and the cap; at the
    cap the file is read (a valid file padded to exactly its cap). `check-config` reads
    the files exactly as a start does (the same function as on SIGHUP), without
    binding anything."""
    crt, key = make_certificate(tmp_path)
    config = tmp_path / "smtpgw.toml"
    write_config(config, 'accept-domain = ["a.example"]\n')
    path, cap = {"--config": (config, CONFIG_CAP), "--tls-cert": (crt, PEM_CAP), "--tls-key": (key, PEM_CAP)}[flag]
    # Padding a parser skips: a TOML comment, text outside the PEM blocks.
    pad = b"#" if flag == "--config" else b"x"

    def run() -> subprocess.CompletedProcess:
        return run_binary("check-config", "--config", str(config), "--spool-dir", str(tmp_path / "spool"),
                          "--tls-cert", str(crt), "--tls-key", str(key), timeout=60)

    content = path.read_bytes()
    path.write_bytes(content + b"\n" + pad * (cap - len(content) - 2) + b"\n")
    assert path.stat().st_size == cap
    at_cap = run()
    assert at_cap.returncode == 0, at_cap.stderr
    with path.open("ab") as f:
        f.write(b"\n")
    over = run()
    assert over.returncode == 2, over.stderr
    last = over.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"error: {flag} {path}: "), last
    assert f"larger than {cap} bytes" in last, last


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["config", "tls-cert", "tls-key"])
@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_special_file_on_reload_is_refused_and_sigterm_still_drains(procs, tmp_path, kind, target):
    (tmp_path / "pki").mkdir()
    crt, key = make_certificate(tmp_path / "pki")
    config = tmp_path / "smtpgw.toml"
    write_config(config, f'accept-domain = ["a.example"]\ntls-cert = "{crt}"\ntls-key = "{key}"\n')
    p = procs("--config", str(config), "--spool-dir", str(tmp_path / "spool"))
    # The client trusts a copy: the certificate's own path is about to be replaced.
    ca = tmp_path / "ca.crt"
    ca.write_bytes(crt.read_bytes())
    served = handshake(p.port, ca)

    mark = len(p.lines)
    path = {"config": config, "tls-cert": crt, "tls-key": key}[target]
    put_in_place(special(kind, tmp_path), path)
    p.signal(signal.SIGHUP)
    refusal = "configuration refused" if target == "config" else "TLS certificate refused"
    line = p.wait_for_log(refusal, after=mark)
    assert "not a regular file" in line, line
    assert p.proc.poll() is None, p.text

    # The running configuration and certificate stay in use.
    with p.session() as wire:
        wire.expect("MAIL FROM:<s@x.example>", "250")
        wire.expect("RCPT TO:<u@a.example>", "250 2.1.5")
    assert handshake(p.port, ca) == served
    stop_and_expect_clean_exit(p)


@pytest.mark.timeout(60)
def test_garbage_intermediate_is_refused_on_reload_and_the_old_certificate_serves(procs, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old_crt, old_key = make_certificate(tmp_path / "old")
    new_crt, new_key = make_certificate(tmp_path / "new")
    live_crt, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_crt.write_bytes(old_crt.read_bytes())
    live_key.write_bytes(old_key.read_bytes())
    p = procs("--tls-cert", str(live_crt), "--tls-key", str(live_key), "--listen-tls", "127.0.0.1:0",
              "--spool-dir", str(tmp_path / "spool"))
    old_der = handshake(p.port, old_crt)

    mark = len(p.lines)
    chain = garbage_intermediate(new_crt, tmp_path / "chain.new")
    os.rename(chain, live_crt)
    os.rename(new_key, live_key)
    p.signal(signal.SIGHUP)
    line = p.wait_for_log("TLS certificate refused", after=mark)
    assert "certificate 2 of 2" in line, line
    assert "TLS certificate reloaded" not in "".join(p.lines[mark:]), p.text
    # Every new handshake still gets the old certificate, and completes.
    for _ in range(5):
        assert handshake(p.port, old_crt) == old_der
    stop_and_expect_clean_exit(p)


def test_garbage_intermediate_is_refused_at_start(tmp_path):
    crt, key = make_certificate(tmp_path)
    chain = garbage_intermediate(crt, tmp_path / "chain.pem")
    result = run_binary("--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                        "--spool-dir", str(tmp_path / "spool"), "--tls-cert", str(chain), "--tls-key", str(key),
                        timeout=30)
    assert result.returncode == 2, result.stderr
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"error: --tls-cert {chain}: certificate 2 of 2 in the chain is not valid X.509"), last


@pytest.mark.timeout(120)
def test_a_300000_domain_accept_list_reloads_and_logs_a_summary(procs, tmp_path):
    config = tmp_path / "smtpgw.toml"
    write_config(config, 'accept-domain = ["a.example"]\n')
    p = procs("--config", str(config), "--spool-dir", str(tmp_path / "spool"))

    n = 300_000
    # Every domain twice: the duplicates go, in linear time.
    domains = ",".join(f'"d{i}.example"' for i in list(range(n)) * 2)
    write_config(config, f"accept-domain = [{domains}]\n")
    mark = len(p.lines)
    p.signal(signal.SIGHUP)
    # Generous: the audit's quadratic deduplication took 99 s of CPU for this.
    line = p.wait_for_log("configuration reloaded", after=mark, timeout=60)
    assert f"({n} in all)" in line, line[:500]
    assert len(line) < 2000, f"{len(line)}-byte log line"
    with p.session() as wire:
        wire.expect("MAIL FROM:<s@x.example>", "250")
        wire.expect(f"RCPT TO:<u@d{n - 1}.example>", "250 2.1.5")
        wire.expect("RCPT TO:<u@d0.example>", "250 2.1.5")
        wire.expect("RCPT TO:<u@a.example>", "550 5.7.1")
    stop_and_expect_clean_exit(p)
