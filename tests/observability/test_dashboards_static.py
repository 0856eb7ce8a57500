"""The dashboard, the Grafana provisioning, the Prometheus config and docker-compose.yml, checked
without a broker: the JSON is well formed, every panel query parses (promtool), every metric it uses
is one the controller (or RabbitMQ) exports, and every file, port and service name that the stack's
files refer to exists."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.observability.dashboard import (
    DASHBOARD,
    REPO,
    Query,
    all_panels,
    dashboard_metric_names,
    graph_panels,
    load_dashboard,
    queries,
    require_tool,
    substitute,
    variable_queries,
)

COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS_CONFIG = REPO / "config" / "prometheus.yml"
DATASOURCES = REPO / "dashboards" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = REPO / "dashboards" / "provisioning" / "dashboards" / "modelfleet.yml"

# The controller's metric contract (issue 3): per-model gauges, job/dead-letter/eviction counters,
# histograms, fleet gauges and per-worker gauges.
PER_MODEL = {
    "modelfleet_model_workers",
    "modelfleet_model_capacity",
    "modelfleet_model_in_flight",
    "modelfleet_queue_ready_messages",
    "modelfleet_queue_consumers",
    "modelfleet_model_routable",
    "modelfleet_jobs_total",
    "modelfleet_job_duration_seconds_bucket",
    "modelfleet_job_queue_wait_seconds_bucket",
    "modelfleet_job_first_chunk_seconds_bucket",
    "modelfleet_dead_letters_total",
}
FLEET = {
    "modelfleet_evictions_total",
    "modelfleet_heartbeats_received_total",
    "modelfleet_heartbeats_invalid_total",
    "modelfleet_heartbeat_lag_seconds_bucket",
    "modelfleet_workers",
    "modelfleet_controller_listen_only",
    "modelfleet_controller_suspect_broker",
    "modelfleet_routing_changes_total",
    "modelfleet_sweep_duration_seconds_bucket",
    "modelfleet_worker_in_flight",
    "modelfleet_worker_concurrency",
    "modelfleet_worker_heartbeat_age_seconds",
    "modelfleet_worker_stuck_jobs",
}
CONTRACT = PER_MODEL | FLEET

# rabbitmq_prometheus (3.10+, aggregated /metrics endpoint) names the dashboard may use; each was
# read from a live RabbitMQ 3.10.8's 127.0.0.1:15692/metrics, and test_metrics_live.py checks
# them against the running broker.
RABBITMQ = {
    "rabbitmq_alarms_memory_used_watermark",
    "rabbitmq_alarms_free_disk_space_watermark",
    "rabbitmq_alarms_file_descriptor_limit",
    "rabbitmq_connections",
    "rabbitmq_channels",
    "rabbitmq_consumers",
    "rabbitmq_queues",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_process_resident_memory_bytes",
    "rabbitmq_resident_memory_limit_bytes",
    "rabbitmq_disk_space_available_bytes",
    "rabbitmq_disk_space_available_limit_bytes",
    "rabbitmq_global_messages_received_total",
    "rabbitmq_global_messages_received_confirm_total",
    "rabbitmq_global_messages_routed_total",
    "rabbitmq_global_messages_delivered_total",
    "rabbitmq_global_messages_acknowledged_total",
    "rabbitmq_global_messages_confirmed_total",
    "rabbitmq_global_messages_redelivered_total",
    "rabbitmq_global_messages_unroutable_dropped_total",
    "rabbitmq_global_messages_unroutable_returned_total",
    "rabbitmq_global_messages_dead_lettered_expired_total",
    "rabbitmq_global_messages_dead_lettered_delivery_limit_total",
    "rabbitmq_global_messages_dead_lettered_rejected_total",
    "rabbitmq_global_messages_dead_lettered_maxlen_total",
}

# Ports of the stack: service -> {container port: host port}.
PORTS = {
    "rabbitmq": {5672: 5672, 15672: 15672, 15692: 15692},
    "controller": {21001: 21001},
    "prometheus": {9090: 9090},
    "grafana": {3000: 3000},
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# -- the dashboard ----------------------------------------------------------------------------


def test_dashboard_identity_and_model_variable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "modelfleet"
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query"
    assert model["datasource"]["uid"] == "prometheus"
    assert variable_queries({"templating": {"list": [model]}}) == [
        "label_values(modelfleet_model_workers, model)"
    ]
    assert model["multi"] is True and model["includeAll"] is True


def test_rows_fleet_model_rabbitmq(dashboard: dict[str, Any]) -> None:
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ["Fleet overview", "Model $model", "RabbitMQ"]
    assert rows[1].get("repeat") == "model", "the per-model row must repeat over $model"
    assert dashboard["panels"][0]["type"] == "row", "every panel belongs to a row"
    titles: dict[str, set[str]] = {}
    for row, panel in graph_panels(dashboard):
        titles.setdefault(row, set()).add(panel["title"])
    per_model = " | ".join(sorted(titles["Model $model"])).lower()
    for needed in (
        "workers", "routable", "capacity vs in-flight", "queue depth", "throughput by outcome",
        "job duration p50 / p95 / p99", "queue wait", "first chunk", "dead letters by reason",
        "heartbeat lag p95",
    ):  # fmt: skip
        assert needed in per_model, f"per-model row lacks a {needed!r} panel"


def test_every_panel_has_the_datasource_and_a_target(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for _, p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for _, panel in graph_panels(dashboard):
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel.get("datasource", {}).get("uid") == "prometheus", where
        assert panel.get("datasource", {}).get("type") == "prometheus", where
        assert panel.get("targets"), f"{where} has no target"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: duplicate refId"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{where} {target['refId']}: empty expr"
            assert target.get("datasource", {}).get("uid", "prometheus") == "prometheus", where
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, f"{where}: bad gridPos {grid}"


def test_metric_names_are_the_exported_ones(dashboard: dict[str, Any]) -> None:
    names = dashboard_metric_names(dashboard)
    ours = {n for n in names if n.startswith("modelfleet_")}
    broker = {n for n in names if n.startswith("rabbitmq_")}
    assert ours - CONTRACT == set(), "dashboard uses names the controller does not export"
    assert CONTRACT - ours == set(), "controller metrics no panel shows"
    assert broker - RABBITMQ == set(), "rabbitmq_* names not checked against RabbitMQ 3.10"
    assert broker, "the RabbitMQ row uses no rabbitmq_* metric"


def test_rates_only_over_counters_and_controllers_never_summed(dashboard: dict[str, Any]) -> None:
    for query in queries(dashboard):
        for name in re.findall(r"\b(?:rate|increase|irate)\(\s*([A-Za-z_:][\w:]*)", query.expr):
            assert name.endswith(("_total", "_bucket")), f"rate() over a non-counter: {query}"
        for name in re.findall(r"\bhistogram_quantile\([^,]+,\s*(\w+)", query.expr):
            assert name == "max", (
                f"histogram_quantile must take max by (le, ...) across controllers: {query}"
            )


def test_model_row_filters_by_model(dashboard: dict[str, Any]) -> None:
    model_labelled = {n for n in PER_MODEL}
    for query in queries(dashboard):
        selectors = re.findall(r"\b(modelfleet_\w+)(\{[^}]*\})?", query.expr)
        for name, selector in selectors:
            if query.row == "Model $model" and name in model_labelled:
                assert 'model=~"$model"' in selector, (
                    f"per-model panel not filtered by $model: {query}"
                )
            if query.row != "Model $model":
                assert "$model" not in query.expr, f"fleet panel filtered by $model: {query}"


def test_every_expression_parses_with_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    exprs: list[Query] = queries(dashboard)
    assert exprs
    rules = [
        {
            "record": f"dashboard:panel_{q.panel_id}_{q.ref_id}",
            "expr": substitute(q.expr, model=".*"),
        }
        for q in exprs
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "modelfleet-dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"promtool check rules:\n{done.stdout}\n{done.stderr}"
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_substitution_leaves_no_variable() -> None:
    assert substitute('rate(x{model=~"$model"}[$__rate_interval])', model="m-1") == (
        'rate(x{model=~"m-1"}[1m])'
    )
    with pytest.raises(AssertionError):
        substitute("x[$__interval]", model="m")


# -- Prometheus configuration ------------------------------------------------------------------


def test_prometheus_config_is_valid_and_scrapes_the_stack(compose: dict[str, Any]) -> None:
    promtool = require_tool("promtool")
    done = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"promtool check config:\n{done.stdout}\n{done.stderr}"

    config = _yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    targets = {
        target: job.get("metrics_path", "/metrics")
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets == {"controller:21001": "/metrics", "rabbitmq:15692": "/metrics"}
    for target in targets:
        service, port = target.rsplit(":", 1)
        assert service in compose["services"], f"scrape target {target}: no such service"
        assert int(port) in _container_ports(compose, service), (
            f"{service} does not listen on {port}"
        )


# -- Grafana provisioning ----------------------------------------------------------------------


def test_datasource_matches_dashboard_and_points_at_prometheus(
    dashboard: dict[str, Any], compose: dict[str, Any]
) -> None:
    (source,) = _yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    uids = {p["datasource"]["uid"] for _, p in graph_panels(dashboard)}
    assert uids == {source["uid"]} == {"prometheus"}
    url = urlsplit(source["url"])
    assert (url.scheme, url.hostname, url.port) == ("http", "prometheus", 9090)
    assert url.hostname in compose["services"]
    assert url.port in _container_ports(compose, "prometheus")


def test_dashboard_provider_path_is_mounted_with_the_dashboard(compose: dict[str, Any]) -> None:
    (provider,) = _yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    mounts = _bind_mounts(compose, "grafana")
    container_dir = PurePosixPath(provider["options"]["path"])
    host_dir = _host_path(mounts, container_dir)
    assert host_dir is not None, f"grafana has no mount covering {container_dir}"
    assert (host_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    provisioning = _host_path(mounts, PurePosixPath("/etc/grafana/provisioning"))
    assert provisioning is not None
    assert (provisioning / "datasources" / DATASOURCES.name).resolve() == DATASOURCES.resolve()
    assert (provisioning / "dashboards" / DASHBOARD_PROVIDERS.name).resolve() == (
        DASHBOARD_PROVIDERS.resolve()
    )


# -- docker-compose.yml and the Dockerfile -----------------------------------------------------


def _container_ports(compose: dict[str, Any], service: str) -> set[int]:
    """Ports the service listens on inside its container: published ones, plus the controller's
    status port (MODELFLEET_HTTP__PORT, else the default in config/settings.toml)."""
    spec = compose["services"][service]
    ports = {int(str(p).split("/")[0].rsplit(":", 1)[-1]) for p in spec.get("ports", [])}
    if "controller" in spec.get("command", []):
        env = _environment(spec)
        default = tomllib.loads((REPO / "config" / "settings.toml").read_text())["http"]["port"]
        ports.add(int(env.get("MODELFLEET_HTTP__PORT", default)))
    return ports


def _environment(spec: dict[str, Any]) -> dict[str, str]:
    env = spec.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _bind_mounts(compose: dict[str, Any], service: str) -> dict[PurePosixPath, Path]:
    """Container path -> host path of the service's bind mounts (named volumes left out)."""
    out = {}
    for volume in compose["services"][service].get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume["target"]
        else:
            source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            out[PurePosixPath(target)] = (REPO / source).resolve()
    return out


def _host_path(mounts: dict[PurePosixPath, Path], container: PurePosixPath) -> Path | None:
    for target, source in mounts.items():
        if container == target or target in container.parents:
            return source / container.relative_to(target)
    return None


def test_compose_services_images_and_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"rabbitmq", "controller", "prometheus", "grafana", "loadgen"} <= set(services)
    for name, spec in services.items():
        if "image" in spec and "build" not in spec:
            image = spec["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (
                f"{name}: image {image!r} is not pinned"
            )
    assert services["rabbitmq"]["image"] == "rabbitmq:3.13.7-management"
    for service, expected in PORTS.items():
        published = {}
        for port in services[service].get("ports", []):
            host, container = str(port).split("/")[0].rsplit(":", 1)
            published[int(container)] = int(host.rsplit(":", 1)[-1])
        assert published == expected, f"{service} ports"
    assert _container_ports(compose, "controller") == {21001}
    assert _environment(services["controller"])["MODELFLEET_HTTP__HOST"] == "0.0.0.0"


def test_compose_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    workers = [s["command"] for s in services.values() if s.get("command", [None])[0] == "worker"]
    assert (
        workers
        == [["worker", "--model", "demo-llm", "--handler", "modelfleet.handlers:fake_llm"]] * 2
    )
    assert services["controller"]["command"] == ["controller"]
    assert services["loadgen"]["command"][:3] == ["loadgen", "--model", "demo-llm"]
    grafana = _environment(services["grafana"])
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_references_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    for name, spec in services.items():
        build = spec.get("build")
        if build is not None:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
        for volume in spec.get("volumes", []):
            source = str(volume).split(":")[0] if not isinstance(volume, dict) else volume["source"]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: mounts {source}, which does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        for env_file in spec.get("env_file", []) if isinstance(spec.get("env_file"), list) else []:
            assert (REPO / env_file).is_file(), f"{name}: env_file {env_file} missing"
        depends = spec.get("depends_on", {})
        for other in depends if isinstance(depends, list) else depends.keys():
            assert other in services, f"{name} depends on unknown service {other}"
        for key, value in _environment(spec).items():
            if "://" in value:
                host = urlsplit(value).hostname
                assert host in services, f"{name}: {key} points at {host}, not a service"
                port = urlsplit(value).port
                if port is not None:
                    assert port in _container_ports(compose, str(host)), (
                        f"{name}: {key} port {port}"
                    )
    for name in ("controller", "worker-1", "worker-2", "loadgen"):
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert services["rabbitmq"]["healthcheck"]["test"]


def test_rabbitmq_enables_management_and_prometheus(compose: dict[str, Any]) -> None:
    mounts = _bind_mounts(compose, "rabbitmq")
    plugins_file = mounts[PurePosixPath("/etc/rabbitmq/enabled_plugins")]
    text = plugins_file.read_text().strip()
    assert re.fullmatch(r"\[[\w,\s]*\]\.", text), f"not an Erlang list term: {text!r}"
    plugins = {p.strip() for p in text[1:-2].split(",")}
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= plugins


def test_dockerfile_installs_the_package() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["modelfleet"\]\s*$', text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    ignored = (REPO / ".dockerignore").read_text().split()
    for needed in ("src", "pyproject.toml", "README.md", "config"):
        assert needed not in ignored, f".dockerignore drops {needed}, which the image needs"
