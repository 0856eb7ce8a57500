"""Built-in handlers, so everything can be tried without a GPU.

* ``modelfleet.handlers:echo`` returns the payload (behind the gateway: a chat or completions
  answer whose text is the request's JSON, see :func:`modelfleet.openai_shapes.as_response`).
* ``modelfleet.handlers:fake_llm`` streams the words of ``payload["prompt"]`` as chunks
  ``{"text": " word"}``, sleeping ``payload.get("delay", 0)`` seconds before each, and ends with
  the whole text as its result ``{"text": ..., "words": n}``. A payload with an ``"endpoint"``
  (``chat.completions``, ``completions``, ``embeddings``: what the OpenAI gateway sends) is
  answered in OpenAI's shapes instead (:func:`modelfleet.openai_shapes.fake_openai`), with
  ``stop`` and ``max_tokens`` honoured and what it cannot honour (``n`` above 1, a ``prompt``
  list of several prompts, ``logprobs``, a JSON ``response_format``, a forced
  ``tool_choice``...) refused as an invalid job.
* ``modelfleet.handlers:fail`` raises, to see WORKER_ERROR end to end.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

from modelfleet.jobs import Final, Job
from modelfleet.openai_shapes import fake_openai

__all__ = ["echo", "fail", "fake_llm"]


async def echo(job: Job) -> Any:
    """Return the payload unchanged."""
    return job.payload


async def fake_llm(job: Job) -> AsyncIterator[Any]:
    """Stream the prompt back word by word, like a (very predictable) LLM."""
    payload = job.payload
    if isinstance(payload, dict) and "endpoint" in payload:
        async for item in fake_openai(job):  # an OpenAI request, from the gateway
            yield item
        return
    if not isinstance(payload, dict) or not isinstance(payload.get("prompt"), str):
        raise job.invalid("fake_llm needs a payload object with a 'prompt' string")
    delay = payload.get("delay", 0)
    if (
        not isinstance(delay, (int, float))
        or isinstance(delay, bool)
        or not math.isfinite(delay)
        or delay < 0
    ):
        raise job.invalid("fake_llm: 'delay' must be a non-negative number of seconds")
    words = payload["prompt"].split()
    for index, word in enumerate(words):
        if delay:
            await asyncio.sleep(delay)
        yield {"text": word if index == 0 else f" {word}"}
    yield Final({"text": " ".join(words), "words": len(words)})


async def fail(job: Job) -> Any:
    """Always raise: shows how a handler error reaches the producer and the error queue."""
    raise RuntimeError(f"this handler always fails (job {job.job_id})")
