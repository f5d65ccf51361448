"""deploy/: the systemd unit, the container image and the Kubernetes manifests, checked
offline against the real tools and against the binary they run.

- systemd: `systemd-analyze verify` (no warning allowed) and `security --offline`, the
  unit's sizes against its sample config, and the gateway started with that config.
- container: hadolint and a structural lint of the Containerfile, its config started,
  the seccomp profile regenerated from Docker's default (`make-seccomp.py --check`), and
  the gateway run under that profile (translated into a seccomp filter by
  examples/seccomp_exec.rs): io_uring with it, epoll without the io_uring syscalls.
- Kubernetes: `kubernetes-validate --strict` at a pinned version for the built-in
  kinds, a structural schema for the Prometheus Operator kinds, the PrometheusRule equal
  to dashboards/alerts.yml, and cross-checks against the binary (flags, ports, probe
  paths, the metric the HPA scales on, the ConfigMap's config accepted and serving PROXY
  v2).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import IO_BACKENDS, REPO, STOP_TIMEOUT, gateway_binary, gateway_env, run_binary, wait_for
from edge_support import make_certificate
from smtpwire import assert_reply, make_message
from test_proxy import v2_tcp4

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "smtpgw.service"
UNIT_CONFIG = DEPLOY / "systemd" / "smtpgw.toml"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
CONTAINER_CONFIG = DEPLOY / "container" / "smtpgw.toml"
SECCOMP = DEPLOY / "container" / "seccomp.json"
KUBE = DEPLOY / "kubernetes"
# The Kubernetes version the manifests are validated against (kubernetes-validate ships
# its schemas, so this runs offline).
KUBERNETES_VERSION = "1.33.0"
IO_URING = ("io_uring_setup", "io_uring_enter", "io_uring_register")


def help_flags() -> set[str]:
    result = run_binary("--help")
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"--[a-z0-9-]+", result.stdout.decode()))


def seconds(value) -> float:
    """A duration as the gateway and systemd write them: `30`, `30s`, `5m`, `1h`, `1min`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)?\s*", str(value))
    assert match, f"not a duration: {value!r}"
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]


# --- systemd ------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> every value it is given, in order."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze is missing (scripts/test.sh installs Debian's systemd package)")
    return tool


def verify_unit(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on `text` as smtpgw.service, its ExecStart pointed at the
    built binary (verify insists that the program exists). Works without systemd as
    PID 1: verify loads the unit into an offline manager."""
    directory = tmp_path / "units"
    directory.mkdir(exist_ok=True)
    unit = directory / "smtpgw.service"
    unit.write_text(text.replace("ExecStart=/usr/local/bin/smtpgw ", f"ExecStart={gateway_binary()} "))
    return subprocess.run(
        [systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=directory
    )


def test_systemd_unit_verifies_without_a_warning(tmp_path):
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/smtpgw " in text
    result = verify_unit(text, tmp_path)
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        f"systemd-analyze verify: exit {result.returncode}\n{result.stdout}{result.stderr}"
    )
    # The check sees what it must: a misspelt directive is reported.
    broken = verify_unit(text.replace("ProtectSystem=strict", "ProtectSystme=strict"), tmp_path)
    assert "ProtectSystme" in broken.stderr, broken.stderr


def test_systemd_unit_exposure_is_low(tmp_path):
    directory = tmp_path / "units"
    directory.mkdir()
    (directory / "smtpgw.service").write_text(UNIT.read_text())
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", "smtpgw.service"],
        capture_output=True, text=True, timeout=60, cwd=directory,
    )
    match = re.search(r"Overall exposure level for smtpgw.service: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}{result.stderr}"
    # 0 is fully locked down, 10 not at all; systemd calls up to 2.9 "OK".
    assert float(match.group(1)) <= 2.0, result.stdout


def test_systemd_unit_matches_its_config_and_the_binary():
    unit = unit_directives(UNIT.read_text())
    config = tomllib.loads(UNIT_CONFIG.read_text())
    flags = help_flags()
    one = lambda key: unit[key][-1]  # noqa: E731 (the last assignment wins in systemd)

    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    exec_start = one("Service.ExecStart").split()
    assert exec_start[0] == "/usr/local/bin/smtpgw"
    assert exec_start[1:] == ["--config", "/etc/smtpgw/smtpgw.toml"]
    assert {a for a in exec_start if a.startswith("--")} <= flags
    assert one("Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Service.ConfigurationDirectory") == "smtpgw"

    assert one("Service.DynamicUser") == "yes" or "Service.User" in unit
    assert "CAP_NET_BIND_SERVICE" in one("Service.AmbientCapabilities").split()
    assert one("Service.ProtectSystem") == "strict"
    assert one("Service.NoNewPrivileges") == "yes"

    # The spool lives in the StateDirectory, the only writable place under strict.
    state = one("Service.StateDirectory")
    assert Path(config["spool-dir"]).is_relative_to(Path("/var/lib") / state), config["spool-dir"]

    # Descriptors for every connection plus the gateway's own 256.
    assert int(one("Service.LimitNOFILE")) >= config["max-connections"] + 256

    # A stop outlasts the drain and the sink's flush after it, so SIGKILL never cuts it.
    stop = seconds(one("Service.TimeoutStopSec"))
    assert stop > seconds(config["drain-timeout"]) + seconds(config.get("publish-timeout", "30s")), stop
    assert seconds(one("Service.WatchdogSec")) >= 2

    # Every key of the sample config is a flag of the binary.
    assert {f"--{key}" for key in config} <= flags, {f"--{key}" for key in config} - flags


def test_systemd_sample_config_starts(start_gateway):
    # The fixture's flags put the listeners and the spool on loopback and a temp dir;
    # everything else comes from the file.
    gateway = start_gateway("--config", str(UNIT_CONFIG))
    with gateway.wire() as wire:
        greeting = wire.reply()
        assert greeting.code == 220 and greeting.lines[0].startswith("220 mx1.example.com "), greeting
    assert gateway.stop() == 0


# --- container ----------------------------------------------------------------------


def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Containerfile ends in a continuation"
    return out


def test_containerfile_lint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(CONTAINERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_containerfile_structure():
    steps = containerfile_instructions()
    stages = [args for word, args in steps if word == "FROM"]
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    build = re.fullmatch(r"(\S+) AS (\S+)", stages[0], re.I)
    assert build, stages[0]
    # The toolchain is at least the crate's rust-version.
    rust_version = re.search(r'rust-version = "(\d+)\.(\d+)"', (REPO / "Cargo.toml").read_text())
    image_version = re.search(r"rust:(\d+)\.(\d+)", build.group(1))
    assert image_version and rust_version
    assert tuple(map(int, image_version.groups())) >= tuple(map(int, rust_version.groups()))

    runtime_start = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    runtime = steps[runtime_start:]
    assert re.match(r"\S*(distroless/cc|-slim)", runtime[0][1]), f"small runtime base: {runtime[0][1]}"
    words = [word for word, _ in runtime]
    assert "RUN" not in words, "the runtime stage adds nothing but files"
    users = [args for word, args in runtime if word == "USER"]
    assert users, "USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"numeric non-root USER: {users[-1]}"

    copies = [args for word, args in runtime if word == "COPY"]
    assert any(f"--from={build.group(2)}" in c and c.endswith("/usr/local/bin/smtpgw") for c in copies), copies
    assert any(c == "deploy/container/smtpgw.toml /etc/smtpgw/smtpgw.toml" for c in copies), copies
    entry = json.loads(dict(runtime)["ENTRYPOINT"])
    cmd = json.loads(dict(runtime)["CMD"])
    assert entry == ["/usr/local/bin/smtpgw"] and cmd == ["--config", "/etc/smtpgw/smtpgw.toml"]
    assert set(cmd[::2]) <= help_flags()

    # The ports the image exposes are the ones its config listens on.
    config = tomllib.loads(CONTAINER_CONFIG.read_text())
    exposed = {int(p.split("/")[0]) for word, args in runtime if word == "EXPOSE" for p in args.split()}
    listens = {int(config[k].rpartition(":")[2]) for k in ("listen", "metrics-listen")}
    assert exposed == listens, (exposed, listens)
    assert all(config[k].startswith("0.0.0.0:") for k in ("listen", "metrics-listen"))
    # No HEALTHCHECK, and the file says why.
    assert "HEALTHCHECK" not in words
    assert "No HEALTHCHECK:" in CONTAINERFILE.read_text()
    # The build context leaves the local build and venv out.
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"target", ".venv", ".git"} <= set(ignored), ignored


# What gcr.io/distroless/cc-debian12 provides: glibc, libgcc, libstdc++, libssl3.
DISTROLESS_CC_LIBS = {
    "linux-vdso.so.1", "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2",
    "librt.so.1", "libgcc_s.so.1", "libstdc++.so.6", "libssl.so.3", "libcrypto.so.3",
}
# Libraries the build links dynamically here and the Containerfile links statically.
STATIC_IN_IMAGE = {"libz.so.1": "ENV LIBZ_SYS_STATIC=1"}


def test_binary_libraries_exist_in_the_runtime_image():
    result = subprocess.run(["ldd", str(gateway_binary())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    libraries = {Path(line.split()[0]).name for line in result.stdout.splitlines() if line.strip()}
    text = CONTAINERFILE.read_text()
    assert "distroless/cc-debian12" in text
    for library in libraries - DISTROLESS_CC_LIBS:
        assert library in STATIC_IN_IMAGE, f"{library} is not in the runtime image and not linked statically"
        assert STATIC_IN_IMAGE[library] in text, f"{library}: the Containerfile lacks {STATIC_IN_IMAGE[library]}"


def test_container_config_starts(start_gateway):
    gateway = start_gateway("--config", str(CONTAINER_CONFIG))
    with gateway.smtplib() as client:
        assert client.noop()[0] == 250
    assert gateway.stop() == 0


def test_seccomp_profile_is_dockers_default_with_io_uring():
    profile = json.loads(SECCOMP.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    unconditional = [
        set(rule["names"])
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and not any(rule.get(k) for k in ("args", "includes", "excludes"))
    ]
    for name in IO_URING:
        assert any(name in names for names in unconditional), f"{name} is not allowed unconditionally"
    base = os.environ.get("SMTPGW_TEST_DOCKER_SECCOMP")
    if not base:
        pytest.skip("SMTPGW_TEST_DOCKER_SECCOMP (Docker's default profile, set by scripts/test.sh) is not set")
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "container" / "make-seccomp.py"), "--base", base, "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def syscall_numbers() -> dict[str, int]:
    """This machine's syscall numbers, from the kernel headers (linux-libc-dev)."""
    if platform.machine() != "x86_64":
        pytest.skip(f"the syscall table is read for x86_64 only, not {platform.machine()}")
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if not header.exists():
        header = Path("/usr/include/asm/unistd_64.h")
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"#define __NR_(\w+) (\d+)", header.read_text())}


# Docker's default capabilities: rules that need others (CAP_SYS_ADMIN, ...) do not apply.
DOCKER_CAPS = {
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}
OPS = {
    "SCMP_CMP_EQ": "eq", "SCMP_CMP_NE": "ne", "SCMP_CMP_LT": "lt", "SCMP_CMP_LE": "le",
    "SCMP_CMP_GT": "gt", "SCMP_CMP_GE": "ge", "SCMP_CMP_MASKED_EQ": "masked_eq",
}


def kernel_at_least(version: str) -> bool:
    have = tuple(int(x) for x in re.findall(r"\d+", platform.release())[:2])
    return have >= tuple(int(x) for x in version.split(".")[:2])


def seccomp_rules(profile: dict) -> str:
    """The profile as seccomp_exec's rule lines, the way Docker applies it to a
    container with its default capabilities on this architecture."""
    numbers = syscall_numbers()
    lines = [f"default-errno {profile.get('defaultErrnoRet', 1)}"]
    for rule in profile["syscalls"]:
        includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
        if not set(includes.get("caps") or []) <= DOCKER_CAPS:
            continue
        if set(excludes.get("caps") or []) & DOCKER_CAPS:
            continue
        if includes.get("arches") and "amd64" not in includes["arches"]:
            continue
        if "amd64" in (excludes.get("arches") or []):
            continue
        if includes.get("minKernel") and not kernel_at_least(includes["minKernel"]):
            continue
        conditions = []
        for arg in rule.get("args") or []:
            condition = f"{arg['index']} {OPS[arg['op']]} {arg['value']}"
            if arg["op"] == "SCMP_CMP_MASKED_EQ":
                condition += f" {arg.get('valueTwo', 0)}"
            conditions.append(condition)
        for name in rule["names"]:
            if name not in numbers:
                continue  # another architecture's syscall
            if rule["action"] == "SCMP_ACT_ALLOW":
                lines.append(" ".join([f"allow {numbers[name]}", *conditions]))
            elif rule["action"] == "SCMP_ACT_ERRNO":
                assert not conditions, rule
                lines.append(f"errno {numbers[name]} {rule.get('errnoRet', 1)}")
            else:
                raise AssertionError(f"action {rule['action']} is not translated")
    return "\n".join(lines) + "\n"


def seccomp_exec() -> Path:
    """The seccomp_exec example, built by `cargo test` next to the binary (or now)."""
    path = gateway_binary().parent / "examples" / "seccomp_exec"
    if not path.exists():
        subprocess.run(
            ["cargo", "build", "--release", "--example", "seccomp_exec"],
            cwd=REPO, check=True, timeout=600, capture_output=True,
        )
    return path


def metrics_text(addr: str) -> str:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as response:
        return response.read().decode()


@pytest.mark.parametrize(
    "profile_case, backend",
    [("seccomp.json", "uring"), ("seccomp.json without io_uring", "epoll")],
)
def test_gateway_under_the_seccomp_profile(tmp_path, profile_case, backend):
    """The gateway under the profile, as a container would run it: with the io_uring
    syscalls it picks io_uring (--io-backend auto); without them (Docker 25+'s default)
    it falls back to epoll and says so. Either way it serves and stores mail."""
    if backend not in IO_BACKENDS:
        pytest.skip(f"the {backend} backend is not under test (SMTPGW_TEST_IO_BACKENDS)")
    profile = json.loads(SECCOMP.read_text())
    if "without" in profile_case:
        for rule in profile["syscalls"]:
            rule["names"] = [n for n in rule["names"] if n not in IO_URING]
    rules = tmp_path / "rules"
    rules.write_text(seccomp_rules(profile))
    spool = tmp_path / "spool"
    proc = subprocess.Popen(
        [str(seccomp_exec()), "--rules", str(rules), str(gateway_binary()),
         "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--accept-domain", "example.com",
         "--sink", "spool", "--spool-dir", str(spool), "--io-backend", "auto"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=gateway_env(),
    )
    log: list[str] = []
    reader = threading.Thread(
        target=lambda: log.extend(line.decode("utf-8", "replace") for line in iter(proc.stderr.readline, b"")),
        daemon=True,
    )
    reader.start()
    try:
        listening = wait_for(
            "the listening line",
            lambda: next((l for l in list(log) if "listening addr=" in l), None) or (proc.poll() is not None and "exited"),
            timeout=15,
        )
        assert listening != "exited", f"the gateway exited {proc.returncode}:\n{''.join(log)}"
        assert f"backend={backend}" in listening, "".join(log)
        fell_back = any("io_uring unavailable" in l and "using the epoll backend" in l for l in log)
        assert fell_back == (backend == "epoll"), "".join(log)
        addr = re.search(r"listening addr=(\S+)", listening).group(1)
        metrics_addr = re.search(r"metrics_addr=(\S+)", "".join(log)).group(1)
        assert f'smtpgw_io_backend_info{{backend="{backend}"}} 1' in metrics_text(metrics_addr)
        import smtplib

        host, _, port = addr.rpartition(":")
        with smtplib.SMTP(host, int(port), local_hostname="client.test", timeout=10) as client:
            refused = client.sendmail("a@client.test", ["x@example.com"], make_message("under seccomp"))
            assert refused == {}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
        reader.join(timeout=5)
    assert "panicked" not in "".join(log)
    stored = run_binary("spool", "ls", "--spool-dir", str(spool))
    assert stored.returncode == 0 and len(stored.stdout.splitlines()) == 1, stored


# --- Kubernetes ---------------------------------------------------------------------


def manifests() -> dict[str, list[dict]]:
    """Every YAML document under deploy/kubernetes but the kustomization, by file."""
    out = {}
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def kind(name: str) -> list[dict]:
    return [d for docs in manifests().values() for d in docs if d["kind"] == name]


def workloads() -> list[dict]:
    return kind("Deployment") + kind("DaemonSet")


def configmap_toml() -> dict:
    (cm,) = kind("ConfigMap")
    return tomllib.loads(cm["data"]["smtpgw.toml"])


def test_kustomization_lists_existing_files():
    listed = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]
    assert all((KUBE / f).exists() for f in listed), listed
    # One workload and one monitor: the variants are alternatives.
    assert "deployment.yaml" in listed and "daemonset.yaml" not in listed
    assert "podmonitor.yaml" in listed and "servicemonitor.yaml" not in listed


def test_builtin_kinds_validate_against_the_kubernetes_schemas():
    checked = 0
    for name, docs in manifests().items():
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {error.message}")
            checked += 1
    assert checked == 9, checked  # every built-in object of every file
    # The validator rejects what it must: a misspelt field.
    (deployment,) = kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def closed(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": required or [], "additionalProperties": False}


STRING = {"type": "string"}
LABELS = {"type": "object", "additionalProperties": STRING}
METADATA = closed({"name": STRING, "namespace": STRING, "labels": LABELS, "annotations": LABELS}, ["name"])
SELECTOR = closed({"matchLabels": LABELS, "matchExpressions": {"type": "array"}})
RELABELINGS = {
    "type": "array",
    "items": closed({
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod", "lowercase", "uppercase", "keepequal", "dropequal"]},
        "sourceLabels": {"type": "array", "items": STRING}, "separator": STRING, "targetLabel": STRING,
        "regex": STRING, "modulus": {"type": "integer"}, "replacement": STRING,
    }),
}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
ENDPOINT = closed({
    "port": STRING, "path": STRING, "interval": DURATION, "scrapeTimeout": DURATION, "scheme": {"enum": ["http", "https"]},
    "relabelings": RELABELINGS, "metricRelabelings": RELABELINGS, "honorLabels": {"type": "boolean"},
}, ["port"])
# The parts of the Prometheus Operator's monitoring.coreos.com/v1 CRDs these manifests
# use, closed against unknown fields so a typo fails as it would with the CRD schema.
OPERATOR_SCHEMAS = {
    "PodMonitor": closed({
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"}, "metadata": METADATA,
        "spec": closed({
            "selector": SELECTOR, "jobLabel": STRING, "namespaceSelector": {"type": "object"},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": ENDPOINT},
        }, ["selector", "podMetricsEndpoints"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
    "ServiceMonitor": closed({
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"}, "metadata": METADATA,
        "spec": closed({
            "selector": SELECTOR, "jobLabel": STRING, "namespaceSelector": {"type": "object"},
            "endpoints": {"type": "array", "minItems": 1, "items": ENDPOINT},
        }, ["selector", "endpoints"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
    "PrometheusRule": closed({
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"}, "metadata": METADATA,
        "spec": closed({
            "groups": {"type": "array", "minItems": 1, "items": closed({
                "name": STRING, "interval": DURATION,
                "rules": {"type": "array", "minItems": 1, "items": {
                    **closed({
                        "alert": STRING, "record": STRING, "expr": {"type": ["string", "integer"]},
                        "for": DURATION, "keep_firing_for": DURATION, "labels": LABELS, "annotations": LABELS,
                    }, ["expr"]),
                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                }},
            }, ["name", "rules"])},
        }, ["groups"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
}


def test_prometheus_operator_kinds_by_structure():
    found = set()
    for name, docs in manifests().items():
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                jsonschema.validate(doc, OPERATOR_SCHEMAS[doc["kind"]])
                found.add(doc["kind"])
    assert found == set(OPERATOR_SCHEMAS), found
    # The structure check rejects a misspelt field.
    (podmonitor,) = kind("PodMonitor")
    podmonitor["spec"]["podMetricEndpoints"] = podmonitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(podmonitor, OPERATOR_SCHEMAS["PodMonitor"])


def test_prometheus_rule_is_exactly_the_alert_rules():
    (rule,) = kind("PrometheusRule")
    alerts = yaml.safe_load((REPO / "dashboards" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], "run python dashboards/generate.py"
    result = subprocess.run(
        [sys.executable, str(REPO / "dashboards" / "generate.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The rules select job="smtpgw": every monitor sets that job label.
    for monitor in kind("PodMonitor") + kind("ServiceMonitor"):
        endpoints = monitor["spec"].get("podMetricsEndpoints") or monitor["spec"]["endpoints"]
        for endpoint in endpoints:
            assert {"action": "replace", "targetLabel": "job", "replacement": "smtpgw"} in endpoint["relabelings"]


def test_manifests_match_each_other_and_the_binary():
    flags = help_flags()
    config = configmap_toml()
    assert {f"--{key}" for key in config} <= flags, {f"--{key}" for key in config} - flags
    smtp_port = int(config["listen"].rpartition(":")[2])
    metrics_port = int(config["metrics-listen"].rpartition(":")[2])
    assert config["proxy-protocol"] == "v2" and config["proxy-trusted-cidr"]

    containerfile = CONTAINERFILE.read_text()
    image_uid = int(re.findall(r"^USER (\d+)", containerfile, re.M)[-1])
    for workload in workloads():
        pod = workload["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == image_uid
        assert spec["securityContext"]["seccompProfile"] == {"type": "Localhost", "localhostProfile": "profiles/smtpgw.json"}
        (container,) = spec["containers"]
        args = container["args"]
        assert {a for a in args if a.startswith("--")} <= flags
        assert args == ["--config", "/etc/smtpgw/smtpgw.toml"]
        # Environment variables are flags too: SMTPGW_ + the flag in upper case, or feed
        # one through $(NAME) (the pod's address into SMTPGW_METRICS_LISTEN).
        feeds = {name for env in container["env"] for name in re.findall(r"\$\((\w+)\)", env.get("value", ""))}
        for env in container["env"]:
            if env["name"] in feeds:
                continue
            assert env["name"].startswith("SMTPGW_")
            assert "--" + env["name"][len("SMTPGW_"):].lower().replace("_", "-") in flags, env["name"]
        # Issue 20 item 1: the endpoint binds the pod's address, not every address.
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["SMTPGW_METRICS_LISTEN"]["value"] == f"$(POD_IP):{metrics_port}"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"smtp": smtp_port, "metrics": metrics_port}
        if spec.get("hostNetwork"):
            assert all(p["hostPort"] == p["containerPort"] for p in container["ports"])
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        # SIGKILL comes after preStop + drain + the sink's flush.
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        budget = pre_stop + seconds(config["drain-timeout"]) + seconds(config.get("publish-timeout", "30s"))
        assert spec["terminationGracePeriodSeconds"] > budget, (spec["terminationGracePeriodSeconds"], budget)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["config"]["configMap"]["name"] == kind("ConfigMap")[0]["metadata"]["name"]
        assert mounts["config"] == "/etc/smtpgw"
        (tls_secret,) = [s for s in kind("Secret") if s["type"] == "kubernetes.io/tls"]
        assert volumes["tls"]["secret"]["secretName"] == tls_secret["metadata"]["name"]
        assert Path(config["tls-cert"]) == Path(mounts["tls"]) / "tls.crt"
        assert Path(config["tls-key"]) == Path(mounts["tls"]) / "tls.key"
        for env in container["env"]:
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                (secret,) = [s for s in kind("Secret") if s["metadata"]["name"] == ref["name"]]
                assert ref["key"] in secret["stringData"]

    (deployment,) = kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector_owner in kind("PodDisruptionBudget") + kind("PodMonitor"):
        assert selector_owner["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    services = {s["metadata"]["name"]: s for s in kind("Service")}
    lb = services["smtpgw"]
    assert lb["spec"]["type"] == "LoadBalancer"
    assert lb["spec"]["selector"].items() <= pod_labels.items()
    assert lb["spec"]["ports"] == [{"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP"}]
    annotations = lb["metadata"]["annotations"]
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"] == "*"
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-healthcheck-path"] == "/readyz"
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-healthcheck-port"] == str(metrics_port)
    (servicemonitor,) = kind("ServiceMonitor")
    metrics_service = services["smtpgw-metrics"]
    assert servicemonitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    assert metrics_service["spec"]["ports"][0]["targetPort"] == "metrics"
    for monitor in kind("PodMonitor") + kind("ServiceMonitor"):
        endpoints = monitor["spec"].get("podMetricsEndpoints") or monitor["spec"]["endpoints"]
        assert [(e["port"], e["path"]) for e in endpoints] == [("metrics", "/metrics")]
    (hpa,) = kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    pods_metric = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    # Scales out well before max-connections.
    assert int(pods_metric["pods"]["target"]["averageValue"]) <= config["max-connections"] * 0.6


def test_configmap_config_serves_proxy_v2_and_the_probe_paths(start_gateway, tmp_path):
    """The ConfigMap's file as the pod runs it, with what only a cluster has replaced by
    flags: the certificate files, the balancer's address (loopback here), the sink (the
    fixture's spool instead of Kafka) and the listeners (loopback, free ports)."""
    config = tmp_path / "smtpgw.toml"
    (cm,) = kind("ConfigMap")
    config.write_text(cm["data"]["smtpgw.toml"])
    cert, key = make_certificate(tmp_path)
    gateway = start_gateway(
        "--config", str(config), "--tls-cert", str(cert), "--tls-key", str(key),
        "--proxy-trusted-cidr", "127.0.0.1/32",
        # The fixture reads the metrics address from text log lines; the file says json.
        "--log-format", "text",
    )
    # The listener expects PROXY v2 (from the file): a header first, then the greeting.
    with gateway.wire() as wire:
        wire.send(v2_tcp4("203.0.113.7", 40002))
        assert_reply(wire.reply(), "220", "greeting after the PROXY v2 header")
        assert "STARTTLS" in wire.hello().text
    # The probe paths the manifests use answer on the metrics port.
    assert gateway.http_get("/healthz")[0] == 200
    assert gateway.http_get("/readyz")[0] == 200
    # The HPA's metric is one the gateway exports.
    (hpa,) = kind("HorizontalPodAutoscaler")
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            gateway.metric(metric["pods"]["metric"]["name"])
    assert gateway.stop() == 0
