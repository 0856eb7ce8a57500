"""The chaos soak at CI size (`make chaos` runs 5,000 jobs): every fault class once, nothing lost,
nobody overdue, no stream spliced, no false failure, every component serving again.

The soak restarts the broker of ``amqp_url`` (MODELFLEET_TEST_AMQP_URL): rabbitmqctl reaches it
as $CHAOS_NODE, else as rabbitmqctl's default node (CI's single broker); the soak
refuses to run when that node does not listen on the URL's port."""

from __future__ import annotations

import pytest

from tests.chaos.soak import FAULT_CLASSES, run_soak

pytestmark = [pytest.mark.process, pytest.mark.chaos, pytest.mark.timeout(300)]


async def test_chaos_soak_accounts_for_every_job(
    amqp_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = await run_soak(amqp_url, jobs=400, duration_s=30, broker_restart=True)
    with capsys.disabled():
        print("\n" + ledger.render())
    assert ledger.lost == []
    assert ledger.overdue == []
    assert ledger.wrong_answers == []
    assert not [k for k in ledger.failed if k.startswith(("EXC", "MISSING"))], ledger.failed
    assert ledger.spliced == []
    assert ledger.false_failures == []
    assert ledger.never_recovered == {}
    assert ledger.fault_checks == []
    assert [name for name in FAULT_CLASSES if not ledger.classes[name]] == []
    # Faults cost some jobs a clear error; most are still answered.
    assert ledger.answered >= ledger.submitted * 0.7
