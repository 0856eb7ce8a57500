"""The chaos soak at CI size (`make chaos` runs 5,000 jobs): nothing lost, nobody overdue."""

from __future__ import annotations

import pytest

from tests.chaos.soak import run_soak

pytestmark = [pytest.mark.process, pytest.mark.chaos, pytest.mark.timeout(300)]


async def test_chaos_soak_accounts_for_every_job(
    amqp_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = await run_soak(amqp_url, jobs=400, duration_s=30, broker_restart=True)
    with capsys.disabled():
        print("\n" + ledger.render())
    assert ledger.lost == []
    assert ledger.overdue == []
    assert ledger.wrong_answers == 0
    assert not [k for k in ledger.failed if k.startswith(("EXC", "MISSING"))], ledger.failed
    assert "broker restart (stop_app/start_app)" in ledger.faults
    assert len(ledger.faults) == 8
    # Faults cost some jobs a clear error; most are still answered.
    assert ledger.answered >= ledger.submitted * 0.7
