"""Drill d: the spool's disk fills up under load, then space returns.

The drill mounts a tmpfs of its own (8 MiB, root only; skipped otherwise, and a skip
fails under CI=true), puts the spool on it, and once the load runs fills the rest with
a filler file:

- `min-free`: with `--spool-min-free-bytes 1M` (how the gateway is meant to run: it
  refuses before the disk is full), mail gets `452 4.3.1` while the free space is
  below it;
- `enospc`: with the check off, the filler takes every last block and the gateway's
  writes really fail (`451 4.3.0`).

Either way: no corrupt record (`smtpgw spool check`), `/readyz` 503 while full and 200
again once the filler is deleted, `250`s again, and every `250` in the spool.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from drill import Load, account, acked, first_250_after, not_ready, ready, report, require, spool_records
from e2e_conftest import run_binary, wait_for

SIZE = "8m"


@pytest.fixture
def small_fs():
    require(os.geteuid() == 0, "drill d mounts a tmpfs of its own and needs root")
    mount_point = Path(tempfile.mkdtemp(prefix="smtpgw-drill-fs-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        mount_point.rmdir()
        require(False, f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        unmounted = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True, timeout=30)
        if unmounted.returncode != 0:
            # Something still holds it (a gateway the test could not stop): detach it
            # rather than leave a mount behind, and fail.
            subprocess.run(["umount", "-l", str(mount_point)], timeout=30)
        mount_point.rmdir()
        assert unmounted.returncode == 0, f"umount {mount_point}: {unmounted.stderr}"


def fill(path: Path, leave: int) -> int:
    """Writes a file until the file system has at most `leave` bytes free (0: until
    ENOSPC, down to the last block); returns its size."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 64 << 10, 4 << 10, 512, 1):
            block = b"\0" * chunk
            while True:
                if leave:
                    st = os.fstatvfs(fd)
                    if st.f_bavail * st.f_frsize - chunk < leave:
                        break
                try:
                    n = os.write(fd, block)
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    break
                written += n
                if n < chunk:
                    break
    finally:
        os.close(fd)
    return written


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["min-free", "enospc"])
def test_d_disk_full_refuses_then_recovers(small_fs, start_gateway, io_backend, mode, tmp_path):
    min_free = "1M" if mode == "min-free" else "0"
    gateway = start_gateway("--reactors", "2", "--spool-min-free-bytes", min_free, spool_dir=small_fs / "spool")
    try:
        wait_for("/readyz 200", lambda: ready(gateway), timeout=20)
        load = Load(lambda: [(gateway.host, gateway.port)], workers=4, size=2000, pace=0.03).start()
        time.sleep(1.0)
        filler = small_fs / "filler"
        filled = fill(filler, leave=(512 << 10) if mode == "min-free" else 0)
        full = time.monotonic()
        wait_for("/readyz 503 while the disk is full", lambda: not_ready(gateway), timeout=10, interval=0.05)
        refused = 452 if mode == "min-free" else 451
        wait_for(f"a {refused} while full", lambda: any(a.code == refused for a in load.attempts if a.started >= full), timeout=10)
        readyz_503 = gateway.http_get("/readyz")[1].strip()
        time.sleep(1.5)
        filler.unlink()
        freed = time.monotonic()
        wait_for("/readyz 200 once space returns", lambda: ready(gateway), timeout=15, interval=0.05)
        ready_after = time.monotonic() - freed
        wait_for("a 250 once space returns", lambda: first_250_after(load.attempts, freed), timeout=15)
        back = first_250_after(load.attempts, freed) - freed
        time.sleep(1.0)
        attempts = load.stop(finish=10)
    finally:
        # Before the file system goes away.
        if gateway.running():
            assert gateway.stop() == 0

    check = run_binary("spool", "check", "--spool-dir", str(gateway.spool_dir))
    summary = check.stdout.decode(errors="replace").strip()
    records = spool_records(gateway, tmp_path / "export.mbox")
    counts = account(attempts, records)
    while_full = [a for a in attempts if full <= a.ended < freed]
    report(
        f"d disk-full {mode} [{io_backend}]",
        counts,
        filler_bytes=filled,
        **{f"{refused}_while_full": sum(1 for a in while_full if a.code == refused)},
        acked_while_full=sum(1 for a in while_full if a.code == 250),
        ready_after_s=ready_after,
        first_250_after_s=back,
    )
    print(f"  /readyz while full: {readyz_503}\n  spool check: {summary}")
    # Readiness names the cause, whichever write failed.
    assert ("No space left on device" if mode == "enospc" else "--spool-min-free-bytes") in readyz_503, readyz_503
    assert check.returncode == 0, f"spool check after the disk filled: {summary}\n{check.stderr.decode(errors='replace')}"
    assert " 0 corrupt ranges" in summary, summary
    assert counts.lost == 0, f"acknowledged but missing or altered: {counts.lost_ids[:10]}"
    assert counts.perm == 0, [a.reply for a in attempts if a.code and a.code >= 500][:5]
    assert acked(attempts) and not load.unfinished
