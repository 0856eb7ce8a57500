"""Reading dashboards/modelfleet.json: its panels, their PromQL expressions and the metric names
they use. Pure functions, shared by the static and the live observability tests."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "modelfleet.json"

METRIC_RE = re.compile(r"\b(?:modelfleet|rabbitmq)_[A-Za-z0-9_]+")


@dataclass(frozen=True)
class Query:
    row: str
    panel: str
    panel_id: int
    ref_id: str
    expr: str

    def __str__(self) -> str:
        return f"[{self.row} / {self.panel} / {self.ref_id}] {self.expr}"


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every panel with the title of the row it sits in (rows included, as their own row)."""
    out: list[tuple[str, dict[str, Any]]] = []
    row = ""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            row = panel["title"]
            out.append((row, panel))
            # a collapsed row keeps its panels inside itself
            out.extend((row, inner) for inner in panel.get("panels", []))
        else:
            out.append((row, panel))
    return out


def graph_panels(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(row, p) for row, p in all_panels(dashboard) if p.get("type") != "row"]


def queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(row, panel["title"], panel["id"], target["refId"], target["expr"])
        for row, panel in graph_panels(dashboard)
        for target in panel.get("targets", [])
        if not target.get("hide")
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        out.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return out


def substitute(expr: str, *, model: str, rate_interval: str = "1m") -> str:
    """The expression as Grafana would send it: ``$model`` and ``$__rate_interval`` filled in."""
    text = expr
    for name, value in (("__rate_interval", rate_interval), ("model", model)):
        text = text.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in text, f"unexpected Grafana variable left in {text!r}"
    return text


def metric_names(texts: list[str]) -> set[str]:
    return {name for text in texts for name in METRIC_RE.findall(text)}


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    return metric_names([q.expr for q in queries(dashboard)] + variable_queries(dashboard))


def require_tool(name: str) -> str:
    """Path of a Prometheus tool; fails (never skips) saying how to install it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin")
    if path is None:
        pytest.fail(
            f"`{name}` is not installed: run `make prometheus` (scripts/ensure-prometheus installs "
            "Debian's prometheus package) or put the Prometheus release binaries on PATH"
        )
    return path


def sample_names(exposition: str) -> set[str]:
    """Names of the samples in a Prometheus text exposition (not the # TYPE/# HELP lines, so a
    labelled metric that has never been incremented does not count)."""
    names = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
