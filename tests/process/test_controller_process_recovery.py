"""A real ``modelfleet controller`` process that the broker dropped while it was frozen
(SIGSTOP longer than its AMQP heartbeat) serves again on its own after SIGCONT (issue 10)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.process.conftest import Fleet


def broker_lists_controller(pid: int) -> bool:
    """Whether the broker still lists a connection of the controller process ``pid``."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "client_properties"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return f'"modelfleet-controller@{socket.gethostname()}:{pid}"' in out


async def test_a_controller_dropped_by_the_broker_while_stopped_recovers_after_sigcont(
    ns: Namespace, fleet: Fleet
) -> None:
    model = ns.model()
    fleet.env["MODELFLEET_AMQP__HEARTBEAT_S"] = "1"  # the broker drops it after ~2 s frozen
    controller = fleet.controller()
    first = fleet.worker(model)
    await fleet.wait_routable(model, workers=1)
    await fleet.wait("/healthz", lambda d: d["healthy"], what="healthy")

    os.kill(controller.pid, signal.SIGSTOP)
    try:
        await wait_for(
            lambda: not broker_lists_controller(controller.pid),
            timeout=15,
            interval=0.5,
            what="the broker dropping the frozen controller",
        )
    finally:
        os.kill(controller.pid, signal.SIGCONT)

    # It consumes heartbeats again: a worker started now is registered, and it is healthy.
    second = fleet.worker(model)
    await fleet.wait_routable(model, workers=2, timeout=15)
    await fleet.wait("/healthz", lambda d: d["healthy"], timeout=10, what="healthy again")
    # And it evicts again: a worker killed afterwards leaves the registry.
    first.kill()
    await fleet.wait(
        "/v1/workers",
        lambda d: [w["pid"] for w in d["workers"]] == [second.pid],
        timeout=10,
        what="the killed worker evicted",
    )
    assert controller.poll() is None, fleet.log_tail()
