"""How modelfleet's commands run their event loop.

``event_loop = "auto"`` (the default) runs them on uvloop when it is installed (it is a
dependency on Linux and macOS) and on asyncio's own loop otherwise; ``"uvloop"`` insists on it and
``"asyncio"`` never uses it.  Only the process's own commands are affected: an application that
embeds :class:`modelfleet.Client` or :class:`modelfleet.Worker` runs them on whatever loop it runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["EventLoopName", "loop_factory", "run"]

T = TypeVar("T")
EventLoopName = Literal["auto", "uvloop", "asyncio"]


def loop_factory(choice: EventLoopName = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``choice``; None means asyncio's default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError(
                'event_loop = "uvloop" but uvloop is not installed (pip install uvloop)'
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], choice: EventLoopName = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
