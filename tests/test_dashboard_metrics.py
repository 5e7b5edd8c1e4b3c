"""The Grafana dashboard and the alert rules query only metrics that a running server exports."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import yaml

from service.settings import Settings
from tests.conftest import FIXTURES, free_port
from tests.live import live_server
from tests.test_deploy import ALERTS_YML, DASHBOARD, collect_exprs, metric_names

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series(exposition: str) -> set[str]:
    """Every series name a scrape can return, including families that have no samples yet."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            base = family.removesuffix("_total")
            names |= {base + suffix for suffix in SUFFIXES.get(kind, ("",))}
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def test_dashboard_and_alerts_use_only_exported_metrics(tiny_registry: Path, redis_server) -> None:
    settings = Settings(
        registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(), redis_url=redis_server.url
    )
    with live_server(settings, torch_threads=1) as url:
        # Two tiles: the request only has to fill the metrics. No client timeout: the server's own
        # request_timeout_s ends a request, and on a loaded machine it may take long to get there.
        image = (FIXTURES / "service" / "bears.jpg").read_bytes()
        assert httpx.post(f"{url}/v1/upscale", content=image, headers={"Content-Type": "image/jpeg"},
                          timeout=None).status_code == 200
        exposition = httpx.get(f"{url}/metrics", timeout=None).text
    exported = exported_series(exposition)
    exprs = collect_exprs(json.loads(DASHBOARD.read_text()))
    rules = yaml.safe_load(ALERTS_YML.read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = set().union(*(metric_names(e) for e in exprs))
    assert used, "no vpdsr_* metric found in the dashboard"
    assert not used - exported, f"queried but not exported: {sorted(used - exported)}"
