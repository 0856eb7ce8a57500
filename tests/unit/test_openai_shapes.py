"""OpenAI shapes, the fake LLM's OpenAI answers, SSE, and error mappings (pure, no broker)."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import pytest

from modelfleet.errors import (
    ConnectionLostError,
    ExpiredError,
    InvalidJobError,
    InvalidModelError,
    JobCancelledError,
    JobError,
    JobTimeoutError,
    NoWorkerError,
    OverloadedError,
    WorkerError,
)
from modelfleet.gateway import default_controller_url, status_of
from modelfleet.handlers import fake_llm
from modelfleet.jobs import Final, Job
from modelfleet.openai_shapes import (
    DONE,
    as_chunk,
    as_response,
    chat_prompt,
    endpoint_of,
    error_body,
    fake_embedding,
    parse_sse_data,
    sse,
)
from modelfleet.upstream import check_upstream_url, error_for_status


def job(payload: Any, *, stream: bool = False) -> Job:
    return Job(job_id="j1", model="m", payload=payload, deadline=None, stream=stream)


async def run(payload: Any, *, stream: bool = False) -> tuple[list[Any], Any]:
    chunks: list[Any] = []
    final: Any = None
    async for item in fake_llm(job(payload, stream=stream)):
        if isinstance(item, Final):
            final = item.value
        else:
            chunks.append(item)
    return chunks, final


# -- fake_llm in OpenAI shapes ------------------------------------------------------------------


async def test_fake_chat_answers_a_chat_completion() -> None:
    payload = {
        "endpoint": "chat.completions",
        "model": "m",
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "text", "text": "second one"}]},
        ],
    }
    chunks, final = await run(payload)
    assert chunks == []  # not streamed: only the result
    assert final["object"] == "chat.completion"
    assert final["id"] == "chatcmpl-j1"
    assert final["choices"][0]["message"] == {"role": "assistant", "content": "second one"}
    assert final["usage"] == {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}


async def test_fake_chat_streams_chunks() -> None:
    payload = {
        "endpoint": "chat.completions",
        "model": "m",
        "messages": [{"role": "user", "content": "a b c"}],
        "max_tokens": 2,
        "stream_options": {"include_usage": True},
    }
    chunks, final = await run(payload, stream=True)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["a", " b"]
    assert chunks[3]["choices"][0]["finish_reason"] == "length"
    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"]["completion_tokens"] == 2
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert final["choices"][0]["message"]["content"] == "a b"


async def test_fake_completion_streams_text_chunks() -> None:
    payload = {"endpoint": "completions", "model": "m", "prompt": ["hello world"]}
    chunks, final = await run(payload, stream=True)
    assert [c["choices"][0]["text"] for c in chunks] == ["hello", " world", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert final["object"] == "text_completion"
    assert final["choices"][0]["text"] == "hello world"


async def test_fake_embeddings_are_deterministic_unit_vectors() -> None:
    _, first = await run({"endpoint": "embeddings", "model": "m", "input": ["x", "y"]})
    _, again = await run({"endpoint": "embeddings", "model": "m", "input": "x"})
    x, y = (d["embedding"] for d in first["data"])
    assert again["data"][0]["embedding"] == x != y
    assert len(x) == 16
    assert math.isclose(math.fsum(v * v for v in x), 1.0, rel_tol=1e-6)
    _, encoded = await run(
        {"endpoint": "embeddings", "model": "m", "input": "x", "encoding_format": "base64"}
    )
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == x
    _, short = await run({"endpoint": "embeddings", "model": "m", "input": [1, 2], "dimensions": 4})
    assert len(short["data"]) == 1  # one token array is one input
    assert len(short["data"][0]["embedding"]) == 4
    assert fake_embedding("x", 40)[:16] != x  # another length is another vector, still unit
    assert math.isclose(math.fsum(v * v for v in fake_embedding("x", 40)), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"endpoint": "nope"}, "'endpoint'"),
        ({"endpoint": "chat.completions", "messages": []}, "'messages'"),
        ({"endpoint": "completions", "prompt": 3}, "'prompt'"),
        ({"endpoint": "completions", "prompt": "x", "delay": -1}, "'delay'"),
        ({"endpoint": "completions", "prompt": "x", "max_tokens": 0}, "'max_tokens'"),
        ({"endpoint": "embeddings", "input": []}, "'input'"),
        ({"endpoint": "embeddings", "input": "x", "dimensions": 0}, "'dimensions'"),
        ({"endpoint": "embeddings", "input": "x", "encoding_format": "hex"}, "'encoding_format'"),
    ],
)
async def test_fake_llm_refuses_bad_openai_payloads(payload: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidJobError, match=says):
        await run(payload)


async def test_plain_fake_llm_is_unchanged() -> None:
    chunks, final = await run({"prompt": "two words"}, stream=True)
    assert chunks == [{"text": "two"}, {"text": " words"}]
    assert final == {"text": "two words", "words": 2}


# -- shapes -------------------------------------------------------------------------------------


def test_endpoint_of() -> None:
    assert endpoint_of({"endpoint": "embeddings", "messages": []}) == "embeddings"
    assert endpoint_of({"endpoint": "bogus"}) is None
    assert endpoint_of({"messages": []}) == "chat.completions"
    assert endpoint_of({"input": "x"}) == "embeddings"
    assert endpoint_of({"prompt": "x"}) == "completions"
    assert endpoint_of({"other": 1}) is None
    assert endpoint_of("text") is None


def test_chat_prompt_is_the_last_user_message() -> None:
    assert (
        chat_prompt([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]) == "a"
    )
    assert chat_prompt("not a list") == ""
    assert chat_prompt([{"role": "assistant", "content": "x"}]) == ""


def test_as_response_passes_openai_objects_and_wraps_plain_text() -> None:
    openai_object = {"object": "chat.completion", "choices": []}
    assert as_response("chat.completions", openai_object, model="m", id_="1") == openai_object
    wrapped = as_response("chat.completions", {"text": "hi"}, model="m", id_="1")
    assert wrapped is not None
    assert wrapped["choices"][0]["message"]["content"] == "hi"
    text = as_response("completions", "hi", model="m", id_="1")
    assert text is not None
    assert text["choices"][0]["text"] == "hi"
    assert as_response("chat.completions", [1, 2], model="m", id_="1") is None
    assert as_response("embeddings", "hi", model="m", id_="1") is None


def test_as_chunk() -> None:
    chunk = as_chunk("chat.completions", {"text": "x"}, model="m", id_="1", created=5)
    assert chunk is not None
    assert chunk["choices"][0]["delta"] == {"content": "x"}
    assert chunk["created"] == 5
    text = as_chunk("completions", "x", model="m", id_="1", created=5)
    assert text is not None
    assert text["choices"][0]["text"] == "x"
    assert as_chunk("completions", 42, model="m", id_="1", created=5) is None


def test_sse_round_trip() -> None:
    event = sse({"a": 1})
    assert event == b'data: {"a":1}\n\n'
    assert parse_sse_data(event.decode().splitlines()[0]) == {"a": 1}
    assert sse(DONE) == b"data: [DONE]\n\n"
    assert parse_sse_data("data: [DONE]") == DONE
    assert parse_sse_data("data:{}") == {}
    for ignored in ("", ": keep-alive", "event: message", "id: 3", "data: "):
        assert parse_sse_data(ignored) is None
    with pytest.raises(ValueError):
        parse_sse_data("data: {broken")


def test_error_body_is_openais_shape() -> None:
    assert error_body("m", "t", param="p", code=1) == {
        "error": {"message": "m", "type": "t", "param": "p", "code": 1}
    }


# -- error mappings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (NoWorkerError, 503),
        (OverloadedError, 429),
        (InvalidJobError, 400),
        (InvalidModelError, 400),
        (JobTimeoutError, 504),
        (ExpiredError, 504),
        (WorkerError, 500),
        (ConnectionLostError, 502),
        (JobCancelledError, 499),
    ],
)
def test_gateway_status_of_each_job_error(cls: type[JobError], status: int) -> None:
    assert status_of(cls("why", model="m", job_id="j"))[0] == status


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidJobError),
        (404, InvalidJobError),
        (422, InvalidJobError),
        (429, OverloadedError),
        (503, OverloadedError),
        (500, WorkerError),
        (502, WorkerError),
    ],
)
def test_upstream_status_maps_to_modelfleet_errors(status: int, cls: type[JobError]) -> None:
    error = error_for_status(status, "cause", model="m", job_id="j")
    assert type(error) is cls
    assert error.message == "cause"


def test_upstream_url_must_be_http() -> None:
    assert check_upstream_url("http://h:8000/v1/") == "http://h:8000/v1"
    for bad in ("ftp://h/v1", "h:8000", "http:///v1"):
        with pytest.raises(ValueError, match="http://host:port/v1"):
            check_upstream_url(bad)


def test_default_controller_url() -> None:
    from modelfleet.config import settings_from_mapping

    assert default_controller_url(settings_from_mapping({})) == "http://127.0.0.1:21001"
    wildcard = settings_from_mapping({"http": {"host": "0.0.0.0", "port": 9}})
    assert default_controller_url(wildcard) == "http://127.0.0.1:9"
    ipv6 = settings_from_mapping({"http": {"host": "::1", "port": 9}})
    assert default_controller_url(ipv6) == "http://[::1]:9"
