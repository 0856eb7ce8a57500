"""The commands' event loop: uvloop when installed, asyncio's own when asked or when absent."""

from __future__ import annotations

import asyncio
import sys

import pytest

from modelfleet import runtime


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_when_installed() -> None:
    assert runtime.run(_loop_module(), "auto").startswith("uvloop")


def test_asyncio_is_asyncio_s_own_loop() -> None:
    assert runtime.loop_factory("asyncio") is None
    assert runtime.run(_loop_module(), "asyncio").startswith("asyncio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert runtime.loop_factory("auto") is None
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        runtime.loop_factory("uvloop")
