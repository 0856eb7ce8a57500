"""The scale scenario's child process: one controller holding a large simulated fleet.

Run by bench/run.py in a fresh interpreter (``python -m bench.scale --workers N --models M``) so
the resident-set figures are this controller's alone. It builds a :class:`Controller` (no broker
connection: the registry, fleet statistics, routing table and status API are what grow with the
fleet), starts its :class:`StatusServer` on port 0, feeds it every simulated worker's heartbeat
through ``handle_heartbeat`` (the same path the heartbeat consumer calls), and prints one JSON
line of figures:

* RSS (``VmRSS`` from /proc/self/status) before and after the fleet, and their difference;
* registry fill: new workers per second while the registry grows to N (first heartbeats);
* steady ingestion: heartbeats per second of known workers, the controller's own cost without
  AMQP;
* sweep: ``Controller.sweep()`` (the sweeper's registry work), and sweep plus the routing plan;
* ``GET /v1/models`` and ``GET /v1/workers`` over real HTTP (a keep-alive client in a thread).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import statistics
import time
import uuid
from typing import Any

from bench.sim import SimulatedFleet
from modelfleet.config import settings_from_mapping
from modelfleet.controller import Controller
from modelfleet.http import StatusServer

__all__ = ["main", "vmrss_mb"]


def vmrss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _http_latencies(port: int, path: str, requests: int) -> tuple[list[float], int]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    samples, size = [], 0
    try:
        for _ in range(requests):
            started = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            samples.append(time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {response.status}")
            size = len(body)
    finally:
        connection.close()
    return samples, size


async def measure(workers: int, models: int, sweeps: int, requests: int) -> dict[str, Any]:
    now = [1_000.0]  # an injected clock: the fleet stays fresh however long the fill takes
    settings = settings_from_mapping(
        {
            "namespace": f"bench-{uuid.uuid4().hex[:8]}",
            "routing": {"max_models": max(models, 1)},
            "http": {"port": 0},
        }
    )
    controller = Controller(settings, clock=lambda: now[0])
    server = StatusServer(controller, "127.0.0.1", 0)
    await server.start()
    fleet = SimulatedFleet(workers, models, prefix="scale")
    # The first request builds aiohttp's lazily created parts; measure from a warm server.
    await asyncio.to_thread(_http_latencies, server.port, "/v1/models", 3)
    gc.collect()
    rss_before = vmrss_mb()

    fill_s = 0.0
    for index in range(workers):
        body = fleet.body(index, 1)
        started = time.perf_counter()
        controller.handle_heartbeat(body)
        fill_s += time.perf_counter() - started
    steady_s = 0.0
    for index in range(workers):
        body = fleet.body(index, 2)
        started = time.perf_counter()
        controller.handle_heartbeat(body)
        steady_s += time.perf_counter() - started
    assert len(controller.registry) == workers, "every simulated worker is registered"
    gc.collect()
    rss_after = vmrss_mb()

    sweep_samples = []
    for _ in range(sweeps):
        started = time.perf_counter()
        controller.sweep()
        sweep_samples.append(time.perf_counter() - started)
    assert len(controller.registry) == workers, "a sweep of a fresh fleet evicts nobody"

    plan_samples = []
    for _ in range(sweeps):
        started = time.perf_counter()
        controller.sweep()
        live = controller.registry.live_models()
        for action in controller.routing.plan(now=now[0], live=live, listen_only=False):
            controller.routing.mark_bound(action.model)  # as after a successful bind
        plan_samples.append(time.perf_counter() - started)

    models_http, models_bytes = await asyncio.to_thread(
        _http_latencies, server.port, "/v1/models", requests
    )
    workers_http, workers_bytes = await asyncio.to_thread(
        _http_latencies, server.port, "/v1/workers", max(3, requests // 10)
    )
    await server.stop()

    def ms(values: list[float]) -> dict[str, float]:
        return {
            "median_ms": statistics.median(values) * 1000,
            "p99_ms": _percentile(values, 0.99) * 1000,
        }

    return {
        "workers": workers,
        "models": models,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "rss_delta_mb": rss_after - rss_before,
        "fill_workers_per_s": workers / fill_s if fill_s else 0.0,
        "fill_s": fill_s,
        "steady_heartbeats_per_s": workers / steady_s if steady_s else 0.0,
        "sweep": ms(sweep_samples),
        "sweep_and_plan": ms(plan_samples),
        "models_http": {**ms(models_http), "bytes": models_bytes},
        "workers_http": {**ms(workers_http), "bytes": workers_bytes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="scale scenario child (see bench/run.py)")
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--models", type=int, default=1_000)
    parser.add_argument("--sweeps", type=int, default=200)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(measure(args.workers, args.models, args.sweeps, args.requests))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
