"""Fixtures of the gateway tests: the fake OpenAI-compatible upstream as a real process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway.support import UpstreamProcess

# One RabbitMQ user per role, made by `modelfleet permissions --apply` (for test_cancel.py).
from tests.integration.test_security import users  # noqa: F401


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamProcess]:
    """One fake upstream shared by a module's tests (it keeps no state a test depends on,
    except its health, which the test that changes it restores)."""
    server = UpstreamProcess(tmp_path_factory.mktemp("upstream")).start()
    try:
        yield server
    finally:
        server.stop()
