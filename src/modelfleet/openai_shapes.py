"""OpenAI API shapes: request models, responses, chunks, errors and server-sent events.

Everything here is pure (no I/O) and shared by the gateway (:mod:`modelfleet.gateway`), the
upstream adapter (:mod:`modelfleet.upstream`) and the fake LLM (:func:`fake_openai`, which
``modelfleet.handlers:fake_llm`` runs for payloads with an ``"endpoint"``).

A gateway job's payload is the OpenAI request body plus ``"endpoint"``: one of
:data:`ENDPOINTS`. Its answer is the OpenAI response object; a streamed job's chunks are the
OpenAI chunk objects (``chat.completion.chunk``, ``text_completion``). Answers in any other
shape (a string, modelfleet's plain ``{"text": ...}``, any JSON value) are wrapped by
:func:`as_response` and :class:`StreamShaper`, so any handler can sit behind the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
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
    "StopCutter",
    "StreamShaper",
    "as_chunk",
    "as_response",
    "as_text",
    "chat_chunk",
    "chat_completion",
    "chat_prompt",
    "chunk_has_text",
    "cut_at_stop",
    "endpoint_of",
    "error_body",
    "fake_embedding",
    "fake_openai",
    "invalid_param",
    "is_openai_chunk",
    "is_openai_response",
    "model_list",
    "parse_sse_data",
    "prompt_count",
    "refused_param",
    "sse",
    "stop_sequences",
    "text_completion",
    "text_of",
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
    """``POST /v1/chat/completions``; any other OpenAI field is forwarded to the worker.

    ``n`` above 1 is refused (:func:`refused_param`); ``stop`` is forwarded, and honoured by
    the gateway itself when the handler answers in a plain shape (:class:`StreamShaper`)."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    n: int | None = Field(None, ge=1, description="only 1: a request is one job, one answer")
    stop: str | list[str] | None = None


class CompletionRequest(_Request):
    """``POST /v1/completions``; any other OpenAI field is forwarded to the worker (``n`` and
    ``best_of`` above 1 are refused, and so is a ``prompt`` list of several prompts; ``stop``
    as for chat)."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="one prompt: a string or token ids (a list of several prompts is refused: "
        "a request is one job, one answer)"
    )
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    n: int | None = Field(None, ge=1, description="only 1: a request is one job, one answer")
    best_of: int | None = Field(None, ge=1, description="only 1")
    stop: str | list[str] | None = None


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


# -- wrapping any handler's answer in OpenAI's shapes --------------------------------------------
#
# A handler behind the gateway may answer in OpenAI's shapes (fake_llm, the upstream adapter) or
# not: a string, modelfleet's plain {"text": ...}, a generator's list of such chunks, or any JSON
# value (echo returns its payload). Chat and completions answers that are not OpenAI objects
# become the message (or text) of one choice: their text when they have one, else their JSON.
# Embeddings must be vectors: OpenAI's list object, one vector, or a list of vectors.


def _dicts(value: Any) -> list[dict[str, Any]] | None:
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return value
    return None


def is_openai_response(endpoint: str, value: Any) -> bool:
    """Is ``value`` already a whole OpenAI response for ``endpoint``?"""
    if not isinstance(value, dict):
        return False
    kind = value.get("object")
    if endpoint == "embeddings":
        data = _dicts(value.get("data"))
        return kind == "list" and data is not None and all("embedding" in d for d in data)
    choices = _dicts(value.get("choices"))
    if endpoint == "chat.completions":
        return kind == "chat.completion" or bool(choices and all("message" in c for c in choices))
    if endpoint == "completions":
        return kind == "text_completion" or bool(
            choices and all("text" in c and "delta" not in c for c in choices)
        )
    return False


def is_openai_chunk(endpoint: str, value: Any) -> bool:
    """Is ``value`` already an OpenAI stream chunk for ``endpoint``?"""
    if not isinstance(value, dict):
        return False
    kind = value.get("object")
    choices = _dicts(value.get("choices"))
    if endpoint == "chat.completions":
        if kind == "chat.completion.chunk":
            return True
        if choices == [] and "usage" in value:  # the closing usage chunk
            return True
        return bool(choices and all("delta" in c for c in choices))
    if endpoint == "completions":
        return kind == "text_completion" or bool(choices and all("text" in c for c in choices))
    return False


def text_of(value: Any) -> str | None:
    """The text a handler's answer (or chunk) carries, when it carries one: a string, plain
    ``{"text": ...}``, an OpenAI response or chunk (its first choice), or a list of such
    chunks (what a generator handler returns when it was not streamed); None otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return str(value["text"])
        choices = _dicts(value.get("choices"))
        if choices:
            first = choices[0]
            for key in ("message", "delta"):
                part = first.get(key)
                if isinstance(part, dict):
                    content = part.get("content")
                    return _content_text(content) if content is not None else ""
            if isinstance(first.get("text"), str):
                return str(first["text"])
        return None
    if isinstance(value, list):
        pieces = [text_of(item) for item in value]
        if all(piece is not None for piece in pieces):
            return "".join(piece for piece in pieces if piece is not None)
    return None


def as_text(value: Any) -> str:
    """:func:`text_of`, else the value's JSON (None: the empty string)."""
    if value is None:
        return ""
    text = text_of(value)
    if text is not None:
        return text
    return json.dumps(value, ensure_ascii=False)


def stop_sequences(value: Any) -> list[str]:
    """The request's ``stop``: a string or a list of strings (empty ones are ignored)."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str) and item]
    return []


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop sequence (excluded), and whether one was found."""
    found = [at for stop in stops if (at := text.find(stop)) >= 0]
    if not found:
        return text, False
    return text[: min(found)], True


class StopCutter:
    """Applies stop sequences to text that arrives in pieces: a piece is passed on at once
    except its tail that could begin a stop sequence, held until the next piece decides.

    >>> cutter = StopCutter(["END"])
    >>> cutter.feed("one E"), cutter.feed("ND two"), cutter.stopped
    ('one ', '', True)
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        cut, found = cut_at_stop(buffer, self.stops)
        if found:
            self.stopped = True
            self._held = ""
            return cut
        hold = 0
        for size in range(min(max(map(len, self.stops)) - 1, len(buffer)), 0, -1):
            tail = buffer[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                hold = size
                break
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """What is held back, at the end of the text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def as_response(
    endpoint: str, result: Any, *, model: str, id_: str, stop: list[str] | None = None
) -> dict[str, Any] | None:
    """The OpenAI response for a job's result: as is when it already is one; for chat and
    completions, otherwise, one choice whose text is the result's (:func:`as_text`), cut at
    the first of ``stop``; for embeddings, vectors wrapped in the list object. None: the
    result cannot be an answer to ``endpoint`` (embeddings that are not vectors)."""
    if is_openai_response(endpoint, result):
        return dict(result)
    if endpoint == "embeddings":
        return _as_embeddings(result, model)
    text, _ = cut_at_stop(as_text(result), stop or [])
    if endpoint == "chat.completions":
        return chat_completion(id_=f"chatcmpl-{id_}", model=model, text=text)
    if endpoint == "completions":
        return text_completion(id_=f"cmpl-{id_}", model=model, text=text)
    return None


def _is_vector(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    )


def _as_embeddings(result: Any, model: str) -> dict[str, Any] | None:
    if _is_vector(result):
        vectors = [result]
    elif isinstance(result, list) and result and all(_is_vector(v) for v in result):
        vectors = result
    else:
        return None
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": [float(x) for x in vector]}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


def as_chunk(
    endpoint: str, chunk: Any, *, model: str, id_: str, created: int
) -> dict[str, Any] | None:
    """The OpenAI chunk for one streamed chunk of a job: as is when it already is one, else a
    chunk carrying its text (:func:`as_text`); None for a None chunk. See :class:`StreamShaper`
    for a whole stream (role, stop sequences, the closing chunk)."""
    if is_openai_chunk(endpoint, chunk):
        return dict(chunk)
    if chunk is None:
        return None
    return _text_chunk(endpoint, as_text(chunk), model=model, id_=id_, created=created)


def _text_chunk(
    endpoint: str,
    text: str | None,
    *,
    model: str,
    id_: str,
    created: int,
    role: bool = False,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    if endpoint == "completions":
        return text_completion(
            id_=f"cmpl-{id_}",
            model=model,
            text=text or "",
            finish_reason=finish_reason,
            created=created,
        )
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text is not None:
        delta["content"] = text
    return chat_chunk(
        id_=f"chatcmpl-{id_}",
        model=model,
        created=created,
        delta=delta,
        finish_reason=finish_reason,
    )


def chunk_has_text(chunk: dict[str, Any]) -> bool:
    """Does an OpenAI chunk carry generated text (what time to first token waits for)?"""
    text = text_of(chunk)
    return bool(text)


class StreamShaper:
    """Turns a streamed job into OpenAI chunks (chat or completions), whatever its handler
    streams.

    OpenAI chunks pass as they are. Anything else (a string, ``{"text": ...}``, any JSON value)
    becomes a chunk carrying its text (:func:`as_text`): the first one with the assistant role,
    cut at the request's stop sequences (:class:`StopCutter`; after a stop, :attr:`stopped` is
    true and the rest is dropped), and :meth:`end` closes such a stream with a chunk whose
    ``finish_reason`` is ``stop``. A job that streamed nothing (a coroutine handler) is
    answered with its result, sent as chunks the same way.
    """

    def __init__(
        self, endpoint: str, *, model: str, id_: str, created: int, stop: list[str] | None = None
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.id_ = id_
        self.created = created
        self._cutter = StopCutter(stop or [])
        self._sent = 0  # chunks given out
        self._wrapped = False  # some were made here: end() closes the stream

    @property
    def stopped(self) -> bool:
        return self._cutter.stopped

    def feed(self, item: Any) -> list[dict[str, Any]]:
        """The chunks to send for one item the job streamed."""
        if is_openai_chunk(self.endpoint, item):
            self._sent += 1
            return [dict(item)]
        if item is None or self.stopped:
            return []
        return self._text(self._cutter.feed(as_text(item)))

    def _text(self, text: str) -> list[dict[str, Any]]:
        first = not self._wrapped
        if not text and not first:
            return []
        self._wrapped = True
        self._sent += 1
        return [self._chunk(text, role=first)]

    def _chunk(
        self, text: str | None, *, role: bool = False, finish_reason: str | None = None
    ) -> dict[str, Any]:
        return _text_chunk(
            self.endpoint,
            text,
            model=self.model,
            id_=self.id_,
            created=self.created,
            role=role,
            finish_reason=finish_reason,
        )

    def end(self, result: Any = None) -> list[dict[str, Any]]:
        """The closing chunks, once the job ended; ``result`` is the job's result."""
        chunks: list[dict[str, Any]] = []
        if self._sent == 0:
            finish = "stop"
            if is_openai_response(self.endpoint, result):
                choices = _dicts(result.get("choices")) or [{}]
                finish = str(choices[0].get("finish_reason") or "stop")
            chunks += self._text(self._cutter.feed(as_text(result)))
            chunks += self._text(self._cutter.flush())
            self._wrapped = True
            return [*chunks, self._chunk(None, finish_reason=finish)]
        if self._wrapped:
            chunks += self._text(self._cutter.flush())
            chunks.append(self._chunk(None, finish_reason="stop"))
        return chunks


def prompt_count(prompt: Any) -> int:
    """How many prompts a completions ``prompt`` holds: a string or a list of token ids is one;
    a list of strings or of token-id lists is a batch, one prompt per item."""
    if isinstance(prompt, list):
        if not prompt:
            return 0
        if all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
            return 1  # one prompt, as tokens
        return len(prompt)
    return 1


def refused_param(endpoint: str, payload: dict[str, Any]) -> tuple[str, str] | None:
    """A request parameter the gateway refuses for every handler: ``(param, message)``.

    A request is one job and a job has one answer, so ``n`` (and ``best_of``) above 1 cannot
    be honoured, nor a completions ``prompt`` list of several prompts (OpenAI answers one
    choice per prompt); everything else goes to the handler."""
    names = ("n", "best_of") if endpoint == "completions" else ("n",)
    for name in names:
        value = payload.get(name)
        if value is not None and value != 1:
            return name, (
                f"{name}={value} is not supported: a request is one job with one answer, so "
                f"only {name}=1 is; send {value} requests instead"
            )
    if endpoint == "completions" and "prompt" in payload:
        return _refused_prompt(payload["prompt"])
    return None


def _refused_prompt(prompt: Any) -> tuple[str, str] | None:
    count = prompt_count(prompt)
    if count == 1:
        return None
    if count == 0:
        return "prompt", "prompt is an empty list: send one prompt (a string)"
    return "prompt", (
        f"prompt is a list of {count} prompts, which is not supported: a request is one job "
        f"with one answer, so only one prompt is; send {count} requests instead"
    )


_QUOTED_PARAM = re.compile(r"^(?:[\w.-]+: )?'([A-Za-z_][\w.]*)'")


def invalid_param(message: str) -> str | None:
    """The request parameter an INVALID_JOB message names first, as ``'name'`` at its start
    (after an optional ``"handler: "`` prefix): ``"fake_llm: 'stop' must be ..."`` → ``stop``.
    Handlers that refuse a parameter this way get it in the error's ``param``."""
    match = _QUOTED_PARAM.match(message)
    return match.group(1) if match else None


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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _max_tokens(job: Job, payload: dict[str, Any], endpoint: str) -> int | None:
    """``max_completion_tokens`` (chat's newer name), else ``max_tokens``."""
    chat = endpoint == "chat.completions"
    for name in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",):
        value = payload.get(name)
        if value is not None:
            if not _positive_int(value):
                raise job.invalid(f"fake_llm: '{name}' must be a positive integer")
            return int(value)
    return None


def _stops(job: Job, payload: dict[str, Any]) -> list[str]:
    stop = payload.get("stop")
    if stop is not None and not (
        isinstance(stop, str)
        or (isinstance(stop, list) and all(isinstance(item, str) for item in stop))
    ):
        raise job.invalid("fake_llm: 'stop' must be a string or a list of strings")
    return stop_sequences(stop)


def _unsupported(job: Job, name: str, why: str) -> Exception:
    return job.invalid(f"fake_llm: '{name}' is not supported: {why}")


def _refuse_unsupported(job: Job, payload: dict[str, Any], endpoint: str) -> None:
    """Parameters that would change the answer and that the fake LLM cannot honour; those it
    may ignore (sampling: temperature, top_p, seed, penalties, logit_bias; bookkeeping: user,
    metadata, store) are ignored, as a deterministic model would."""
    for name in ("n", "best_of"):
        value = payload.get(name)
        if value is not None and value != 1:
            raise _unsupported(job, name, "the fake LLM gives one answer per job")
    if endpoint == "chat.completions":
        for name in ("logprobs", "top_logprobs"):
            if payload.get(name) not in (None, False):
                raise _unsupported(job, name, "the fake LLM has no token probabilities")
        response_format = payload.get("response_format")
        if response_format is not None and (
            not isinstance(response_format, dict) or response_format.get("type") != "text"
        ):
            raise _unsupported(job, "response_format", "the fake LLM answers plain text only")
        for name in ("tool_choice", "function_call"):
            choice = payload.get(name)
            if choice is not None and choice not in ("auto", "none"):
                raise _unsupported(job, name, "the fake LLM never calls tools")
        modalities = payload.get("modalities")
        if isinstance(modalities, list) and any(m != "text" for m in modalities):
            raise _unsupported(job, "modalities", "the fake LLM answers text only")
        if payload.get("audio") is not None:
            raise _unsupported(job, "audio", "the fake LLM answers text only")
    else:
        if payload.get("logprobs") is not None:
            raise _unsupported(job, "logprobs", "the fake LLM has no token probabilities")
        if payload.get("echo") not in (None, False):
            raise _unsupported(job, "echo", "the fake LLM does not echo the prompt")
        if payload.get("suffix"):
            raise _unsupported(job, "suffix", "the fake LLM cannot insert text")


def _generate(words: list[str], stops: list[str], max_tokens: int | None) -> tuple[list[str], str]:
    """The fake completion: the words as tokens (" word"), cut before the first stop sequence
    (finish ``stop``) and to ``max_tokens`` tokens (finish ``length``)."""
    pieces = [word if index == 0 else f" {word}" for index, word in enumerate(words)]
    text, _ = cut_at_stop("".join(pieces), stops)
    kept: list[str] = []
    size = 0
    for piece in pieces:
        if size + len(piece) > len(text):
            if text[size:]:
                kept.append(text[size:])
            break
        kept.append(piece)
        size += len(piece)
    if max_tokens is not None and len(kept) > max_tokens:
        return kept[:max_tokens], "length"
    return kept, "stop"


async def fake_openai(job: Job) -> AsyncIterator[Any]:
    """Answer an OpenAI request payload like a (very predictable) LLM.

    Chat: the words of the last user message; completions: the words of the prompt; both cut
    before the first ``stop`` sequence (finish reason ``stop``) and to ``max_tokens`` (chat:
    ``max_completion_tokens`` first) words (finish reason ``length``), streamed as OpenAI
    chunks when the job is streamed, each after ``delay`` seconds (a payload field, for tests
    and demos); the job's result is the whole OpenAI response. Embeddings: a deterministic unit
    vector per input (:func:`fake_embedding`), ``dimensions`` long (default 16), float or
    base64. Parameters it cannot honour (``n`` above 1, a ``prompt`` list of several prompts,
    ``logprobs``, a JSON ``response_format``, a forced ``tool_choice``, audio, ``echo``,
    ``suffix``) are refused
    with INVALID_JOB naming them (see :func:`invalid_param`); sampling parameters are ignored.
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
    max_tokens = _max_tokens(job, payload, endpoint)
    _refuse_unsupported(job, payload, endpoint)
    stops = _stops(job, payload)
    if endpoint == "chat.completions":
        if not isinstance(payload.get("messages"), list) or not payload["messages"]:
            raise job.invalid("fake_llm: 'messages' must be a non-empty list")
        words = chat_prompt(payload["messages"]).split()
        prompt_tokens = _all_words(payload["messages"])
    else:
        prompt = payload.get("prompt")
        count = prompt_count(prompt)
        if count != 1:
            raise job.invalid(
                f"fake_llm: 'prompt' must be one prompt (a job has one answer), not a list of "
                f"{count} prompts"
            )
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list):
            prompt = json.dumps(prompt)  # token ids: the fake LLM answers with their text
        if not isinstance(prompt, str):
            raise job.invalid("fake_llm: 'prompt' must be a string (or a list of one string)")
        words = prompt.split()
        prompt_tokens = len(words)
    pieces, finish = _generate(words, stops, max_tokens)
    text = "".join(pieces)
    created = int(time.time())
    usage = _usage(prompt_tokens, len(pieces))
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
