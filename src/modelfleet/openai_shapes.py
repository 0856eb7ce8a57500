"""OpenAI API shapes: request models, responses, chunks, errors and server-sent events.

Everything here is pure (no I/O) and shared by the gateway (:mod:`modelfleet.gateway`), the
upstream adapter (:mod:`modelfleet.upstream`) and the fake LLM (:func:`fake_openai`, which
``modelfleet.handlers:fake_llm`` runs for payloads with an ``"endpoint"``).

A gateway job's payload is the OpenAI request body plus ``"endpoint"``: one of
:data:`ENDPOINTS`. Its answer is the OpenAI response object; a streamed job's chunks are the
OpenAI chunk objects (``chat.completion.chunk``, ``text_completion``). Handlers that answer in
modelfleet's plain shapes (``{"text": ...}`` or a string) are wrapped by :func:`as_response` and
:func:`as_chunk`, so any handler can sit behind the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import struct
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modelfleet.jobs import Final, Job

__all__ = [
    "DONE",
    "ENDPOINTS",
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "as_chunk",
    "as_response",
    "chat_prompt",
    "endpoint_of",
    "error_body",
    "fake_embedding",
    "fake_openai",
    "model_list",
    "parse_sse_data",
    "sse",
]

Endpoint = Literal["chat.completions", "completions", "embeddings"]
ENDPOINTS: tuple[Endpoint, ...] = ("chat.completions", "completions", "embeddings")
# The URL path of each endpoint under an OpenAI base URL (".../v1").
ENDPOINT_PATHS: dict[str, str] = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
DONE = "[DONE]"
# Dimensions of a fake embedding when the request does not ask for `dimensions`.
FAKE_EMBEDDING_DIMS = 16
_MAX_FAKE_DIMS = 4096


# -- requests (documented in /docs; unknown fields are kept and forwarded) ----------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="a model the fleet serves (GET /v1/models)")
    user: str | None = None


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``; any other OpenAI field is forwarded to the worker."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)


class CompletionRequest(_Request):
    """``POST /v1/completions``; any other OpenAI field is forwarded to the worker."""

    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``; any other OpenAI field is forwarded to the worker."""

    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=_MAX_FAKE_DIMS)


def endpoint_of(payload: Any) -> str | None:
    """The endpoint a job payload is for: its ``"endpoint"``, else guessed from its fields."""
    if not isinstance(payload, dict):
        return None
    named = payload.get("endpoint")
    if isinstance(named, str):
        return named if named in ENDPOINTS else None
    if "messages" in payload:
        return "chat.completions"
    if "input" in payload:
        return "embeddings"
    if "prompt" in payload:
        return "completions"
    return None


# -- responses ---------------------------------------------------------------------------------


def error_body(
    message: str, type_: str, *, param: str | None = None, code: int | str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_list(names: list[str], *, created: int = 0) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "modelfleet"}
            for name in names
        ],
    }


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_completion(
    *,
    id_: str,
    model: str,
    text: str,
    finish_reason: str = "stop",
    created: int | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id_,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def chat_chunk(
    *,
    id_: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def text_completion(
    *,
    id_: str,
    model: str,
    text: str,
    finish_reason: str | None = "stop",
    created: int | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``text_completion`` object; streamed chunks use the same shape."""
    body: dict[str, Any] = {
        "id": id_,
        "object": "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def _is_openai_object(value: Any) -> bool:
    return isinstance(value, dict) and ("choices" in value or "object" in value or "data" in value)


def _plain_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return str(value["text"])
    return None


def as_response(endpoint: str, result: Any, *, model: str, id_: str) -> dict[str, Any] | None:
    """The OpenAI response for a job's result: as is when it already is one, wrapped when it
    is modelfleet's plain ``{"text": ...}`` or a string; None when it is neither."""
    if _is_openai_object(result):
        return dict(result)
    text = _plain_text(result)
    if text is None:
        return None
    if endpoint == "chat.completions":
        return chat_completion(id_=f"chatcmpl-{id_}", model=model, text=text)
    if endpoint == "completions":
        return text_completion(id_=f"cmpl-{id_}", model=model, text=text)
    return None


def as_chunk(
    endpoint: str, chunk: Any, *, model: str, id_: str, created: int
) -> dict[str, Any] | None:
    """The OpenAI chunk for a streamed job's chunk (see :func:`as_response`)."""
    if _is_openai_object(chunk):
        return dict(chunk)
    text = _plain_text(chunk)
    if text is None:
        return None
    if endpoint == "completions":
        return text_completion(
            id_=f"cmpl-{id_}", model=model, text=text, finish_reason=None, created=created
        )
    return chat_chunk(id_=f"chatcmpl-{id_}", model=model, created=created, delta={"content": text})


# -- server-sent events ------------------------------------------------------------------------


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` (JSON, or the literal ``[DONE]``)."""
    text = data if data == DONE else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def parse_sse_data(line: str) -> Any:
    """The payload of one SSE line: the parsed JSON of a ``data:`` line, :data:`DONE`, or None
    for anything else (comments, ``event:``/``id:`` lines, blank separators).

    Raises ``ValueError`` for a ``data:`` line that is not JSON.
    """
    if not line.startswith("data:"):
        return None
    text = line[5:].strip()
    if not text:
        return None
    if text == DONE:
        return DONE
    return json.loads(text)


# -- the fake LLM ------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def chat_prompt(messages: Any) -> str:
    """The text of the last user message (what the fake LLM answers with)."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _all_words(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(
        len(_content_text(m.get("content")).split()) for m in messages if isinstance(m, dict)
    )


def _embedding_text(item: Any) -> str:
    return item if isinstance(item, str) else json.dumps(item)


def fake_embedding(text: str, dims: int = FAKE_EMBEDDING_DIMS) -> list[float]:
    """A deterministic unit vector for ``text``: the same text always gives the same vector."""
    raw: list[float] = []
    block = 0
    while len(raw) < dims:
        digest = hashlib.sha256(f"{block}\0{text}".encode()).digest()
        for offset in range(0, len(digest), 4):
            (number,) = struct.unpack_from("<I", digest, offset)
            raw.append(number / 2**31 - 1.0)
        block += 1
    raw = raw[:dims]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    # Rounded to float32, so the base64 encoding gives back exactly these numbers.
    return [struct.unpack("<f", struct.pack("<f", x / norm))[0] for x in raw]


def _encode_embedding(vector: list[float], encoding_format: Any) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def _fake_embeddings(job: Job, payload: dict[str, Any], model: str) -> dict[str, Any]:
    inputs = payload.get("input")
    if isinstance(inputs, str) or (
        isinstance(inputs, list) and inputs and all(isinstance(i, int) for i in inputs)
    ):
        items: list[Any] = [inputs]
    elif isinstance(inputs, list) and inputs:
        items = inputs
    else:
        raise job.invalid("embeddings: 'input' must be a string, a list of strings or tokens")
    dims = payload.get("dimensions")
    if dims is None:
        dims = FAKE_EMBEDDING_DIMS
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= _MAX_FAKE_DIMS:
        raise job.invalid(f"embeddings: 'dimensions' must be an integer in 1..{_MAX_FAKE_DIMS}")
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise job.invalid("embeddings: 'encoding_format' must be 'float' or 'base64'")
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": _encode_embedding(fake_embedding(_embedding_text(item), dims), encoding),
        }
        for index, item in enumerate(items)
    ]
    tokens = sum(len(_embedding_text(item).split()) for item in items)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def fake_openai(job: Job) -> AsyncIterator[Any]:
    """Answer an OpenAI request payload like a (very predictable) LLM.

    Chat: the words of the last user message; completions: the words of the prompt; both cut
    to ``max_tokens`` words (finish reason ``length``), streamed as OpenAI chunks when the job
    is streamed, each after ``delay`` seconds (a payload field, for tests and demos); the job's
    result is the whole OpenAI response. Embeddings: a deterministic unit vector per input
    (:func:`fake_embedding`), ``dimensions`` long (default 16), float or base64.
    """
    payload: dict[str, Any] = job.payload
    endpoint = endpoint_of(payload)
    if endpoint is None:
        raise job.invalid(f"fake_llm: 'endpoint' must be one of {', '.join(ENDPOINTS)}")
    model = payload.get("model") if isinstance(payload.get("model"), str) else job.model
    assert isinstance(model, str)
    if endpoint == "embeddings":
        yield Final(_fake_embeddings(job, payload, model))
        return
    delay = payload.get("delay", 0)
    if (
        not isinstance(delay, (int, float))
        or isinstance(delay, bool)
        or not math.isfinite(delay)
        or delay < 0
    ):
        raise job.invalid("fake_llm: 'delay' must be a non-negative number of seconds")
    max_tokens = payload.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise job.invalid("fake_llm: 'max_tokens' must be a positive integer")
    if endpoint == "chat.completions":
        if not isinstance(payload.get("messages"), list) or not payload["messages"]:
            raise job.invalid("fake_llm: chat needs a non-empty 'messages' list")
        words = chat_prompt(payload["messages"]).split()
        prompt_tokens = _all_words(payload["messages"])
    else:
        prompt = payload.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else json.dumps(prompt)
        if not isinstance(prompt, str):
            raise job.invalid("fake_llm: completions need a 'prompt' string")
        words = prompt.split()
        prompt_tokens = len(words)
    finish = "stop"
    if max_tokens is not None and len(words) > max_tokens:
        words, finish = words[:max_tokens], "length"
    pieces = [word if index == 0 else f" {word}" for index, word in enumerate(words)]
    text = "".join(pieces)
    created = int(time.time())
    usage = _usage(prompt_tokens, len(words))
    chat = endpoint == "chat.completions"
    id_ = f"chatcmpl-{job.job_id}" if chat else f"cmpl-{job.job_id}"
    options = payload.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True

    def chunk(piece: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {} if piece is None else {"content": piece}
            body = chat_chunk(
                id_=id_, model=model, created=created, delta=delta, finish_reason=finish_reason
            )
        else:
            body = text_completion(
                id_=id_,
                model=model,
                text=piece or "",
                finish_reason=finish_reason,
                created=created,
            )
        if include_usage:
            body["usage"] = None
        return body

    if job.stream and chat:
        yield chunk(None) | {
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        }
    for piece in pieces:
        if delay:
            await asyncio.sleep(delay)
        if job.stream:
            yield chunk(piece)
    if job.stream:
        yield chunk(None, finish)
        if include_usage:
            yield chunk(None) | {"choices": [], "usage": usage}
    if chat:
        result = chat_completion(
            id_=id_, model=model, text=text, finish_reason=finish, created=created, usage=usage
        )
    else:
        result = text_completion(
            id_=id_, model=model, text=text, finish_reason=finish, created=created, usage=usage
        )
    yield Final(result)
