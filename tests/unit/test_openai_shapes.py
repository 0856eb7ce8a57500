"""OpenAI shapes, the fake LLM's OpenAI answers, SSE, and error mappings (pure, no broker)."""

from __future__ import annotations

import base64
import json
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
    StopCutter,
    StreamShaper,
    as_chunk,
    as_response,
    as_text,
    chat_chunk,
    chat_completion,
    chat_prompt,
    chunk_has_text,
    cut_at_stop,
    endpoint_of,
    error_body,
    fake_embedding,
    invalid_param,
    is_openai_chunk,
    is_openai_response,
    parse_sse_data,
    prompt_count,
    refused_param,
    sse,
    stop_sequences,
    text_completion,
    text_of,
)
from modelfleet.upstream import check_upstream_url, error_for_status


def job(payload: Any, *, stream: bool = False) -> Job:
    return Job(job_id="j1", model="m", payload=payload, deadline=None, stream=stream)


CHAT = {
    "endpoint": "chat.completions",
    "model": "m",
    "messages": [{"role": "user", "content": "x"}],
}


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
        ({**CHAT, "max_completion_tokens": 0}, "'max_completion_tokens'"),
        ({**CHAT, "stop": 3}, "'stop'"),
        ({**CHAT, "n": 2}, "'n'"),
        ({**CHAT, "logprobs": True}, "'logprobs'"),
        ({**CHAT, "top_logprobs": 2}, "'top_logprobs'"),
        ({**CHAT, "response_format": {"type": "json_object"}}, "'response_format'"),
        ({**CHAT, "tool_choice": "required"}, "'tool_choice'"),
        ({**CHAT, "modalities": ["text", "audio"]}, "'modalities'"),
        ({"endpoint": "completions", "prompt": "x", "logprobs": 2}, "'logprobs'"),
        ({"endpoint": "completions", "prompt": "x", "echo": True}, "'echo'"),
        ({"endpoint": "completions", "prompt": "x", "suffix": "end"}, "'suffix'"),
        ({"endpoint": "completions", "prompt": "x", "best_of": 3}, "'best_of'"),
        ({"endpoint": "completions", "prompt": ["one two", "three"]}, "'prompt'"),
        ({"endpoint": "completions", "prompt": [[1, 2], [3]]}, "'prompt'"),
        ({"endpoint": "completions", "prompt": []}, "'prompt'"),
    ],
)
async def test_fake_llm_refuses_bad_openai_payloads(payload: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidJobError, match=says) as info:
        await run(payload)
    assert invalid_param(info.value.message) == says.strip("'")  # the gateway's `param`


async def test_fake_llm_answers_a_batch_of_one_prompt_as_that_prompt() -> None:
    _, listed = await run({"endpoint": "completions", "prompt": ["one two"]})
    assert listed["choices"][0]["text"] == "one two"
    assert len(listed["choices"]) == 1
    _, tokens = await run({"endpoint": "completions", "prompt": [[1, 2]]})
    assert tokens["choices"][0]["text"] == "[1, 2]"  # token ids: their JSON text


async def test_fake_llm_ignores_what_a_deterministic_model_may_ignore() -> None:
    payload = {
        **CHAT,
        "temperature": 1.5,
        "seed": 3,
        "n": 1,
        "tool_choice": "auto",
        "response_format": {"type": "text"},
        "logprobs": False,
    }
    _, final = await run(payload)
    assert final["choices"][0]["message"]["content"] == "x"


def chat_payload(text: str, **extra: Any) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": text}], **extra}


async def test_fake_llm_honours_stop() -> None:
    _, final = await run(chat_payload("one two. three four", stop=["."]))
    assert final["choices"][0]["message"]["content"] == "one two"
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] == 2
    chunks, final = await run(chat_payload("alpha beta gamma", stop="ta g"), stream=True)
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert pieces == ["", "alpha", " be", None]
    assert final["choices"][0]["message"]["content"] == "alpha be"
    _, text = await run({"endpoint": "completions", "prompt": "a b c", "stop": ["c", "b"]})
    assert text["choices"][0]["text"] == "a "


async def test_fake_llm_max_tokens_and_stop_together() -> None:
    _, cut_first = await run(chat_payload("a b c d", stop="c", max_tokens=1))
    assert cut_first["choices"][0]["message"]["content"] == "a"
    assert cut_first["choices"][0]["finish_reason"] == "length"
    _, stopped = await run(chat_payload("a b c d", stop="c", max_completion_tokens=3))
    assert stopped["choices"][0]["message"]["content"] == "a b "
    assert stopped["choices"][0]["finish_reason"] == "stop"
    _, newer = await run(chat_payload("a b c d", max_completion_tokens=2, max_tokens=3))
    assert newer["choices"][0]["message"]["content"] == "a b"  # max_completion_tokens first


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
    assert wrapped["id"] == "chatcmpl-1"
    assert wrapped["object"] == "chat.completion"
    assert wrapped["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert wrapped["choices"][0]["finish_reason"] == "stop"
    text = as_response("completions", "hi", model="m", id_="1")
    assert text is not None
    assert text["object"] == "text_completion"
    assert text["choices"][0]["text"] == "hi"


def content(answer: dict[str, Any] | None) -> Any:
    assert answer is not None
    return answer["choices"][0]["message"]["content"]


def test_as_response_wraps_any_json_value_as_its_text() -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hé"}]}
    echoed = as_response("chat.completions", payload, model="m", id_="1")
    assert content(echoed) == json.dumps(payload, ensure_ascii=False)
    assert content(as_response("chat.completions", [1, 2], model="m", id_="1")) == "[1, 2]"
    assert content(as_response("chat.completions", 42, model="m", id_="1")) == "42"
    assert content(as_response("chat.completions", None, model="m", id_="1")) == ""
    # A generator handler's collected chunks (not streamed): their texts, joined.
    chunks = [{"text": "a"}, " b", {"text": " c"}]
    assert content(as_response("chat.completions", chunks, model="m", id_="1")) == "a b c"
    # A chat completion where a text completion is wanted: its text.
    chat = chat_completion(id_="x", model="m", text="from chat")
    text = as_response("completions", chat, model="m", id_="1")
    assert text is not None
    assert text["choices"][0]["text"] == "from chat"


def test_as_response_cuts_plain_text_at_stop() -> None:
    answer = as_response("chat.completions", "one two. three", model="m", id_="1", stop=[".", "x"])
    assert content(answer) == "one two"
    # An OpenAI response is the handler's own: passed as it is.
    done = chat_completion(id_="x", model="m", text="a. b")
    assert as_response("chat.completions", done, model="m", id_="1", stop=["."]) == done


def test_as_response_embeddings_must_be_vectors() -> None:
    one = as_response("embeddings", [0.5, 1], model="m", id_="1")
    assert one is not None
    assert one["object"] == "list"
    assert one["data"] == [{"object": "embedding", "index": 0, "embedding": [0.5, 1.0]}]
    two = as_response("embeddings", [[1.0], [2.0]], model="m", id_="1")
    assert two is not None
    assert [d["index"] for d in two["data"]] == [0, 1]
    for not_vectors in ("hi", {"input": "x"}, [], [True], [[1.0], "x"]):
        assert as_response("embeddings", not_vectors, model="m", id_="1") is None


def test_as_chunk() -> None:
    chunk = as_chunk("chat.completions", {"text": "x"}, model="m", id_="1", created=5)
    assert chunk is not None
    assert chunk["choices"][0]["delta"] == {"content": "x"}
    assert chunk["created"] == 5
    text = as_chunk("completions", "x", model="m", id_="1", created=5)
    assert text is not None
    assert text["choices"][0]["text"] == "x"
    number = as_chunk("completions", 42, model="m", id_="1", created=5)
    assert number is not None
    assert number["choices"][0]["text"] == "42"
    assert as_chunk("completions", None, model="m", id_="1", created=5) is None


def test_openai_shapes_are_recognised() -> None:
    chat = chat_completion(id_="x", model="m", text="t")
    piece = chat_chunk(id_="x", model="m", created=1, delta={"content": "t"})
    text = text_completion(id_="x", model="m", text="t")
    assert is_openai_response("chat.completions", chat)
    assert not is_openai_response("chat.completions", piece)
    assert is_openai_response("completions", text)
    assert not is_openai_response("chat.completions", {"model": "m", "messages": []})
    assert is_openai_chunk("chat.completions", piece)
    assert is_openai_chunk("chat.completions", {"choices": [], "usage": {}})
    assert not is_openai_chunk("chat.completions", {"text": "t"})
    assert is_openai_response("embeddings", {"object": "list", "data": [{"embedding": [1]}]})
    assert not is_openai_response("embeddings", {"object": "list", "data": [{"id": 1}]})
    assert text_of(piece) == "t"
    assert text_of(chat) == "t"
    assert text_of({"other": 1}) is None
    assert as_text({"other": 1}) == '{"other": 1}'


# -- stop sequences -------------------------------------------------------------------------------


def test_stop_sequences_and_cut() -> None:
    assert stop_sequences("x") == ["x"]
    assert stop_sequences(["a", "", "b"]) == ["a", "b"]
    assert stop_sequences(None) == []
    assert stop_sequences("") == []
    assert cut_at_stop("abcabc", ["c", "b"]) == ("a", True)
    assert cut_at_stop("abc", ["z"]) == ("abc", False)


@pytest.mark.parametrize(
    ("pieces", "stops", "sent", "stopped"),
    [
        (["one E", "ND two"], ["END"], "one ", True),
        (["one EN", "X two"], ["END"], "one ENX two", False),
        (["a", "b", "c"], ["bc"], "a", True),
        (["abc"], [], "abc", False),
        (["x", "y"], ["yy", "xyz"], "xy", False),
        (["12", "34", "5"], ["345", "4"], "123", True),
    ],
)
def test_stop_cutter_holds_back_only_what_may_begin_a_stop(
    pieces: list[str], stops: list[str], sent: str, stopped: bool
) -> None:
    cutter = StopCutter(stops)
    out = "".join(cutter.feed(piece) for piece in pieces)
    assert cutter.stopped is stopped
    out += cutter.flush()
    assert out == sent
    if stopped:
        assert cutter.feed("more") == ""


def test_stop_cutter_passes_text_at_once_when_no_stop_can_begin() -> None:
    cutter = StopCutter(["END"])
    assert cutter.feed("hello ") == "hello "
    assert cutter.feed("wor") == "wor"
    assert cutter.feed("ld E") == "ld "  # "E" may begin "END": held
    assert cutter.flush() == "E"


# -- streams of any handler --------------------------------------------------------------------


def shaper(endpoint: str = "chat.completions", stop: list[str] | None = None) -> StreamShaper:
    return StreamShaper(endpoint, model="m", id_="j", created=7, stop=stop)


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks]


def test_shaper_wraps_plain_chunks_with_role_and_finish() -> None:
    shape = shaper()
    chunks = [*shape.feed("one"), *shape.feed({"text": " two"}), *shape.feed({"n": 3})]
    chunks += shape.feed(None)
    chunks += shape.end()
    assert deltas(chunks) == [
        {"role": "assistant", "content": "one"},
        {"content": " two"},
        {"content": '{"n": 3}'},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert {c["id"] for c in chunks} == {"chatcmpl-j"}
    assert all(c["object"] == "chat.completion.chunk" and c["created"] == 7 for c in chunks)


def test_shaper_passes_openai_chunks_as_they_are() -> None:
    shape = shaper()
    piece = chat_chunk(id_="x", model="m", created=1, delta={"content": "hi"})
    last = chat_chunk(id_="x", model="m", created=1, delta={}, finish_reason="length")
    assert shape.feed(piece) == [piece]
    assert shape.feed(last) == [last]
    assert shape.end({"ignored": True}) == []  # the handler closed its own stream


def test_shaper_answers_a_stream_without_chunks_with_the_result() -> None:
    shape = shaper()
    chunks = shape.end({"model": "m", "prompt": "x"})  # echo, streamed: only a result
    assert deltas(chunks) == [{"role": "assistant", "content": '{"model": "m", "prompt": "x"}'}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    whole = shaper().end(chat_completion(id_="x", model="m", text="done", finish_reason="length"))
    assert deltas(whole) == [{"role": "assistant", "content": "done"}, {}]
    assert whole[-1]["choices"][0]["finish_reason"] == "length"
    empty = shaper("completions").end(None)
    assert [c["choices"][0]["text"] for c in empty] == ["", ""]
    assert empty[-1]["choices"][0]["finish_reason"] == "stop"


def test_shaper_applies_stop_to_plain_chunks() -> None:
    shape = shaper("completions", stop=["\n"])
    chunks = [*shape.feed("first line"), *shape.feed(" ends\nsecond")]
    assert shape.stopped
    assert shape.feed("more") == []
    chunks += shape.end()
    assert "".join(c["choices"][0]["text"] for c in chunks) == "first line ends"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "text_completion" for c in chunks)


def test_chunk_has_text() -> None:
    assert chunk_has_text(chat_chunk(id_="x", model="m", created=1, delta={"content": "a"}))
    role = {"role": "assistant", "content": ""}
    assert not chunk_has_text(chat_chunk(id_="x", model="m", created=1, delta=role))
    assert chunk_has_text(text_completion(id_="x", model="m", text="a"))


# -- parameters ---------------------------------------------------------------------------------


def test_refused_params_are_n_and_best_of_above_one() -> None:
    assert refused_param("chat.completions", {"n": 1, "stop": "x"}) is None
    refused = refused_param("chat.completions", {"n": 3})
    assert refused is not None
    assert refused[0] == "n"
    assert "n=3" in refused[1]
    assert refused_param("completions", {"best_of": 2}) is not None
    assert refused_param("chat.completions", {"best_of": 2}) is None  # not a chat parameter


def test_prompt_count() -> None:
    assert prompt_count("one two") == 1
    assert prompt_count(["one two"]) == 1
    assert prompt_count([1, 2, 3]) == 1  # one prompt, as token ids
    assert prompt_count(["one two", "three"]) == 2
    assert prompt_count([[1, 2], [3]]) == 2
    assert prompt_count([[1, 2]]) == 1
    assert prompt_count([]) == 0


def test_a_list_of_several_prompts_is_refused_naming_prompt() -> None:
    refused = refused_param("completions", {"prompt": ["one two", "three"]})
    assert refused is not None
    param, message = refused
    assert param == "prompt"
    assert "2 prompts" in message
    assert "send 2 requests" in message
    assert refused_param("completions", {"prompt": [[1], [2], [3]]}) is not None
    empty = refused_param("completions", {"prompt": []})
    assert empty is not None
    assert empty[0] == "prompt"
    for one in ("one two", ["one two"], [1, 2], [[1, 2]]):
        assert refused_param("completions", {"prompt": one}) is None, one
    # n is named first when both are wrong; chat has no prompt.
    both = refused_param("completions", {"n": 2, "prompt": ["a", "b"]})
    assert both is not None
    assert both[0] == "n"
    assert refused_param("chat.completions", {"prompt": ["a", "b"]}) is None


def test_invalid_param_is_the_quoted_name_a_refusal_starts_with() -> None:
    assert invalid_param("fake_llm: 'stop' must be a string") == "stop"
    assert invalid_param("'max_tokens' must be positive") == "max_tokens"
    assert invalid_param("embeddings: 'input' must be a string") == "input"
    assert invalid_param("payload is not JSON-serialisable: 'x'") is None


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
