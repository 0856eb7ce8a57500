"""The benchmark's short mode must run: every scenario, a table row each, nothing left behind.

Times are never asserted (CI machines are noisy); only that ``bench/run.py --quick`` exits 0,
prints a row for every scenario, writes its JSON, and deletes every namespace it made.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aio_pika
import aiormq
import pytest
from bench.run import ROW_NAMES, SCENARIOS

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
async def test_quick_bench_runs_every_scenario_and_cleans_up(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "bench/run.py", "--quick", "--url", amqp_url, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    for key in SCENARIOS:
        for scenario, metric in ROW_NAMES[key]:
            assert any(line.startswith(scenario) and metric in line for line in lines), (
                f"no table row for {scenario} / {metric}:\n{done.stdout[-3000:]}"
            )

    document = json.loads(out.read_text())
    assert {"machine", "plan", "rows", "table"} <= set(document)
    assert document["plan"]["quick"] is True
    assert all(not row["error"] for row in document["rows"])
    assert {row["result"] for row in document["rows"]} <= {"PASS", "MISS", "-", ""}

    namespaces = set(re.findall(r"namespace (bench-[0-9a-f]+)", done.stdout))
    assert len(namespaces) == len(SCENARIOS)
    connection = await aio_pika.connect(amqp_url)
    try:
        for ns in sorted(namespaces):
            for queue in (f"{ns}.errors", f"{ns}.unroutable", f"{ns}.catalog"):
                channel = await connection.channel()
                with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                    await channel.declare_queue(queue, passive=True)
    finally:
        await connection.close()
