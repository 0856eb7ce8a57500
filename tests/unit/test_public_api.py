"""The public API is exactly what ``modelfleet.__all__`` lists; changing it is deliberate."""

from __future__ import annotations

import pytest

import modelfleet

PUBLIC = [
    "BrokerError",
    "Client",
    "ConfigError",
    "ConnectionLostError",
    "ErrorCode",
    "ExpiredError",
    "Final",
    "InvalidJobError",
    "InvalidModelError",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobStream",
    "JobTimeoutError",
    "ModelfleetError",
    "NoWorkerError",
    "OverloadedError",
    "Settings",
    "StreamRestartedError",
    "SyncClient",
    "Worker",
    "WorkerError",
    "__version__",
    "load_settings",
]


def test_all_is_pinned() -> None:
    assert modelfleet.__all__ == PUBLIC


def test_all_is_sorted() -> None:
    assert modelfleet.__all__ == sorted(modelfleet.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from modelfleet import {name}", namespace)
    assert namespace[name] is getattr(modelfleet, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from modelfleet import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC


def test_version_is_a_string() -> None:
    assert isinstance(modelfleet.__version__, str)
    assert modelfleet.__version__.count(".") == 2
