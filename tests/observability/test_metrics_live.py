"""The controller's /metrics, scraped from real processes under load: ``promtool check metrics``
accepts it, and every metric name a dashboard panel uses is exported. Also: RabbitMQ exports every
``rabbitmq_*`` name the dashboard uses."""

from __future__ import annotations

import asyncio
import subprocess

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Namespace
from tests.observability.conftest import http_get, start_fleet_under_load
from tests.observability.dashboard import (
    dashboard_metric_names,
    load_dashboard,
    require_tool,
    sample_names,
)
from tests.process.conftest import Fleet

pytestmark = pytest.mark.process


async def scrape(fleet: Fleet) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{fleet.status_url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


async def scrape_until_complete(fleet: Fleet, names: set[str], within: float = 15) -> str:
    """Scrape until every name has a sample (figures travel in heartbeats: allow a few)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        text = await scrape(fleet)
        if names <= sample_names(text) or loop.time() > deadline:
            return text
        await asyncio.sleep(0.25)


async def test_promtool_accepts_the_controller_scrape(ns: Namespace, fleet: Fleet) -> None:
    promtool = require_tool("promtool")
    await start_fleet_under_load(fleet, ns)
    wanted = {n for n in dashboard_metric_names(load_dashboard()) if n.startswith("modelfleet_")}
    text = await scrape_until_complete(fleet, wanted)
    done = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert done.returncode == 0, f"promtool check metrics:\n{done.stdout}{done.stderr}\n---\n{text}"


async def test_every_dashboard_metric_is_exported(ns: Namespace, fleet: Fleet) -> None:
    load = await start_fleet_under_load(fleet, ns)
    wanted = {n for n in dashboard_metric_names(load_dashboard()) if n.startswith("modelfleet_")}
    text = await scrape_until_complete(fleet, wanted)
    missing = sorted(wanted - sample_names(text))
    assert missing == [], (
        f"metrics used by dashboard panels but not exported by the controller: {missing}\n"
        f"---\n{fleet.log_tail()}"
    )
    # the per-model series are there for the model under load, labelled with it
    workers = {
        sample.labels.get("model"): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "modelfleet_model_workers"
    }
    assert workers.get(load.model) == 2, workers


def test_rabbitmq_exports_every_dashboard_name(rabbitmq_metrics_url: str) -> None:
    wanted = {n for n in dashboard_metric_names(load_dashboard()) if n.startswith("rabbitmq_")}
    exported = sample_names(http_get(rabbitmq_metrics_url))
    assert sorted(wanted - exported) == []
