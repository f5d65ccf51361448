#!/usr/bin/env python3
"""Writes deploy/container/seccomp.json: Docker's default seccomp profile with
io_uring_setup, io_uring_enter and io_uring_register allowed.

Docker 25+, containerd 2 and so Kubernetes' `RuntimeDefault` block the io_uring
syscalls; the gateway then falls back to epoll. This profile is the one to give a
container that should run the io_uring backend.

The base is Docker's own profile as Debian 12 ships it (moby 20.10.24,
`profiles/seccomp/default.json` in the package golang-github-docker-docker-dev;
Apache-2.0 like this project). scripts/test.sh extracts that package (without
installing it) and tests/e2e/test_deploy.py runs `make-seccomp.py --check`, so the
checked-in file is always exactly that base plus the three syscalls.

    deploy/container/make-seccomp.py --base DEFAULT_JSON            # rewrite seccomp.json
    deploy/container/make-seccomp.py --base DEFAULT_JSON --check    # exit 1 if it differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "seccomp.json"
IO_URING = ["io_uring_enter", "io_uring_register", "io_uring_setup"]
DEBIAN_BASE = "usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json"


def build(base: dict) -> dict:
    profile = json.loads(json.dumps(base))
    unconditional = next(
        rule
        for rule in profile["syscalls"]
        if rule.get("action") == "SCMP_ACT_ALLOW"
        and not rule.get("args")
        and not rule.get("includes")
        and not rule.get("excludes")
    )
    # Newer Docker profiles drop them from this rule; older ones have them: either
    # way they end up allowed without conditions, once.
    for rule in profile["syscalls"]:
        if rule is not unconditional:
            rule["names"] = [n for n in rule["names"] if n not in IO_URING]
    profile["syscalls"] = [rule for rule in profile["syscalls"] if rule["names"]]
    unconditional["names"] += [n for n in IO_URING if n not in unconditional["names"]]
    return profile


def render(profile: dict) -> str:
    return json.dumps(profile, indent="\t") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, type=Path, help=f"Docker's default.json (or a directory holding {DEBIAN_BASE})")
    parser.add_argument("--check", action="store_true", help="compare with the checked-in file instead of writing it")
    args = parser.parse_args()
    base_path = args.base / DEBIAN_BASE if args.base.is_dir() else args.base
    text = render(build(json.loads(base_path.read_text())))
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} differs from {base_path} plus {', '.join(IO_URING)}: run {sys.argv[0]} --base {args.base}", file=sys.stderr)
            return 1
        print(f"{OUT} is {base_path} plus {', '.join(IO_URING)}")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
