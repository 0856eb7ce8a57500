"""The OpenAI-compatible gateway, driven by the official ``openai`` client, in front of a real
controller and real fake_llm workers on the real broker."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from modelfleet.handlers import fail, fake_llm
from modelfleet.jobs import Job
from modelfleet.openai_shapes import fake_embedding
from tests.conftest import Namespace
from tests.gateway.support import sse_lines, stack
from tests.helpers import wait_for

USER = "user"


def chat(text: str) -> list[Any]:
    return [{"role": "system", "content": "be brief"}, {"role": USER, "content": text}]


# -- models ---------------------------------------------------------------------------------------


async def test_models_lists_only_routable_models(ns: Namespace) -> None:
    live, gone, never = ns.model("live"), ns.model("gone"), ns.model("never")
    async with stack(ns) as s:
        await s.add_worker(fake_llm, live)
        leaving = await s.add_worker(fake_llm, gone)
        client = s.openai()
        listed = await client.models.list()
        assert sorted(m.id for m in listed.data) == sorted([live, gone])
        assert all(m.object == "model" and m.owned_by == "modelfleet" for m in listed.data)

        await leaving.stop()  # its model becomes unroutable after the grace
        await s.wait_routable(gone, routable=False)
        listed = await client.models.list()
        assert [m.id for m in listed.data] == [live]

        assert (await client.models.retrieve(live)).id == live
        # Known to the controller, no live worker: 503, like a chat request for it would get.
        with pytest.raises(openai.InternalServerError) as down:
            await client.models.retrieve(gone)
        assert down.value.status_code == 503
        assert gone in down.value.message
        assert down.value.body["code"] == 50005  # type: ignore[index]
        assert down.value.response.headers["x-should-retry"] == "false"
        assert down.value.response.headers["retry-after"] == "10"
        # Never served: 404 model_not_found.
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve(never)
        assert never in info.value.message
        assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


async def test_models_says_so_when_the_controller_is_down(ns: Namespace) -> None:
    async with stack(ns) as s:
        await s.controller_service.server.stop()  # the status API goes away
        with pytest.raises(openai.InternalServerError) as info:
            await s.openai().models.list()
        assert info.value.status_code == 503
        assert s.controller_service.server.url in info.value.message


# -- chat and completions ---------------------------------------------------------------------


async def test_chat_completion(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        reply = await s.openai().chat.completions.create(
            model=model, messages=chat("hello from the fleet")
        )
    assert reply.object == "chat.completion"
    assert reply.model == model
    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "hello from the fleet"
    assert choice.finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 4
    assert reply.usage.prompt_tokens == 6  # "be brief" + the four words


async def test_chat_completion_streamed(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        stream = await s.openai().chat.completions.create(
            model=model,
            messages=chat("one two three"),
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == "one two three"
    assert pieces[1:4] == ["one", " two", " three"]  # chunk by chunk, one word each
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


async def test_stream_is_server_sent_events_ending_with_done(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        response = await s.http().post(
            "/v1/chat/completions",
            json={"model": model, "messages": chat("a b"), "stream": True},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "\n\n" in response.text
    events = sse_lines(response.text)
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert "".join(b["choices"][0]["delta"].get("content", "") for b in bodies) == "a b"


async def test_max_tokens_cuts_the_answer(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        reply = await s.openai().chat.completions.create(
            model=model, messages=chat("one two three four"), max_tokens=2
        )
    assert reply.choices[0].message.content == "one two"
    assert reply.choices[0].finish_reason == "length"


async def test_completion_and_streamed_completion(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        client = s.openai()
        reply = await client.completions.create(model=model, prompt="the quick brown fox")
        stream = await client.completions.create(model=model, prompt="jumps over", stream=True)
        chunks = [chunk async for chunk in stream]
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "the quick brown fox"
    assert reply.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks) == "jumps over"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_a_prompt_list_is_one_prompt_or_refused(ns: Namespace) -> None:
    """A request is one job with one answer: a list of one prompt is that prompt; a list of
    several is refused naming ``prompt`` (never answered for its first prompt only), whatever
    the handler."""
    model, plain = ns.model(), ns.model("plain")

    async def plain_text(job: Job) -> str:
        return "plain answer"

    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        await s.add_worker(plain_text, plain)
        client = s.openai()
        one = await client.completions.create(model=model, prompt=["one two"])
        refused: list[openai.BadRequestError] = []
        for served in (model, plain):
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as info:
                    await client.completions.create(
                        model=served, prompt=["one two", "three"], stream=stream
                    )
                refused.append(info.value)
    assert [c.text for c in one.choices] == ["one two"]
    for error in refused:
        body: Any = error.body
        assert body["param"] == "prompt"
        assert body["code"] == 40001
        assert "2 prompts" in body["message"]
        assert error.response.headers["x-should-retry"] == "false"


async def test_plain_handler_answers_are_wrapped_in_openai_shapes(ns: Namespace) -> None:
    """Any handler can sit behind the gateway: modelfleet's plain {"text": ...} is wrapped."""
    model = ns.model()

    async def plain(job: Job) -> AsyncIterator[dict[str, str]]:
        assert job.payload["endpoint"] == "chat.completions"
        for word in ("plain", " text"):
            yield {"text": word}

    async with stack(ns) as s:
        await s.add_worker(plain, model)
        client = s.openai()
        stream = await client.chat.completions.create(model=model, messages=chat("x"), stream=True)
        chunks = [c async for c in stream]
        whole = await client.chat.completions.create(model=model, messages=chat("x"))
    assert [c.choices[0].delta.content for c in chunks] == ["plain", " text", None]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "stop"]
    # Not streamed, the generator's chunks are its result: their text, joined.
    assert whole.choices[0].message.content == "plain text"
    assert whole.choices[0].finish_reason == "stop"


# -- embeddings -------------------------------------------------------------------------------


async def test_embeddings(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        client = s.openai()
        # The openai client asks for base64 by default and decodes it.
        first = await client.embeddings.create(model=model, input=["alpha", "beta", "alpha"])
        as_floats = await client.embeddings.create(
            model=model, input="alpha", encoding_format="float", dimensions=8
        )
    vectors = [d.embedding for d in first.data]
    assert [d.index for d in first.data] == [0, 1, 2]
    assert len(vectors[0]) == 16
    assert vectors[0] == vectors[2] != vectors[1]  # deterministic, and depends on the input
    assert math.isclose(math.fsum(x * x for x in vectors[0]), 1.0, rel_tol=1e-5)
    assert vectors[0] == pytest.approx(fake_embedding("alpha"), rel=1e-6)
    assert as_floats.data[0].embedding == pytest.approx(fake_embedding("alpha", 8), rel=1e-6)
    assert first.model == model
    assert first.usage.prompt_tokens == 3


# -- errors -----------------------------------------------------------------------------------


async def test_no_worker_for_an_unknown_model_is_404_model_not_found(ns: Namespace) -> None:
    model = ns.model("nobody")
    async with stack(ns) as s:
        client = s.openai()
        for stream in (False, True):
            with pytest.raises(openai.NotFoundError) as info:
                await client.chat.completions.create(
                    model=model, messages=chat("anyone?"), stream=stream
                )
            assert info.value.status_code == 404
            assert info.value.response.headers["x-should-retry"] == "false"
            body: Any = info.value.body
            assert body["code"] == "model_not_found"
            assert body["param"] == "model"
            assert body["type"] == "not_found_error"
            assert model in body["message"]
            assert "NO_WORKER" in body["message"]
            assert "job=" in body["message"]


async def test_no_worker_for_a_known_model_is_503_with_retry_after(ns: Namespace) -> None:
    model = ns.model("gone")
    async with stack(ns) as s:
        leaving = await s.add_worker(fake_llm, model)
        await leaving.stop()
        await s.wait_routable(model, routable=False)
        client = s.openai()
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                await client.chat.completions.create(
                    model=model, messages=chat("anyone?"), stream=stream
                )
            assert info.value.status_code == 503
            headers = info.value.response.headers
            assert headers["x-should-retry"] == "false"
            assert headers["retry-after"] == "10"
            body: Any = info.value.body
            assert body["code"] == 50005
            assert body["type"] == "service_unavailable_error"
            assert model in body["message"]
            assert "NO_WORKER" in body["message"]


async def test_invalid_requests_are_400(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        client, http = s.openai(), s.http()

        # The gateway's own validation: no messages.
        response = await http.post("/v1/chat/completions", json={"model": model})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "messages"
        assert error["code"] == 40001
        assert error["type"] == "invalid_request_error"
        assert "messages" in error["message"]

        # Not JSON at all.
        response = await http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == 40001
        assert error["param"] is None
        assert error["message"] == (
            "request body is not valid JSON: Expecting property name enclosed in double quotes "
            "at line 1, column 2"
        )
        assert response.headers["x-should-retry"] == "false"

        # A model name modelfleet cannot route (InvalidModelError).
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="no such model!", messages=chat("x"))
        assert info.value.body["code"] == 40301  # type: ignore[index]
        assert "no such model!" in info.value.message

        # The worker refuses the job (InvalidJobError from the handler).
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model=model, messages=chat("x"), extra_body={"delay": -1}
            )
        body: Any = info.value.body
        assert body["code"] == 40001
        assert "'delay'" in body["message"]
        assert body["param"] == "delay"
        assert model in body["message"]
        assert info.value.response.headers["x-should-retry"] == "false"


async def test_api_keys_are_required_when_configured(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns, gateway={"api_keys": ["sk-one", "sk-two"]}) as s:
        await s.add_worker(fake_llm, model)
        with pytest.raises(openai.AuthenticationError) as info:
            await s.openai(api_key="sk-wrong").models.list()
        assert info.value.status_code == 401
        assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]

        http = s.http()
        missing = await http.post("/v1/chat/completions", json={"model": model})
        assert missing.status_code == 401  # before validation: nothing is parsed unauthorised
        assert missing.headers["www-authenticate"] == "Bearer"

        reply = await s.openai(api_key="sk-two").chat.completions.create(
            model=model, messages=chat("let me in")
        )
        assert reply.choices[0].message.content == "let me in"
        # Health and docs stay open.
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/docs")).status_code == 200


async def test_too_large_request_is_413(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns, gateway={"max_body_bytes": 4096}) as s:
        await s.add_worker(fake_llm, model)
        client = s.openai()
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model=model, messages=chat("word " * 2000))
        assert info.value.status_code == 413
        body: Any = info.value.body
        assert body["code"] == "request_too_large"
        assert "4096" in body["message"]
        # Chunked (no Content-Length): counted as it comes.
        chunks = [
            b'{"model": "m", "messages": [{"role": "user", "content": "',
            b"x" * 5000,
            b'"}]}',
        ]

        async def chunked() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        response = await s.http().post("/v1/chat/completions", content=chunked())
        assert response.status_code == 413
        # Within the limit all is well.
        reply = await client.chat.completions.create(model=model, messages=chat("small"))
        assert reply.choices[0].message.content == "small"


async def test_timeout_is_504_with_code_50006(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns, gateway={"timeout_s": 1.0}) as s:
        worker = await s.add_worker(fake_llm, model)
        with pytest.raises(openai.APIStatusError) as info:
            await s.openai().chat.completions.create(
                model=model, messages=chat("too slow " * 5), extra_body={"delay": 0.5}
            )
        assert info.value.status_code == 504
        assert info.value.response.headers["x-should-retry"] == "false"
        body: Any = info.value.body
        assert body["code"] == 50006
        assert model in body["message"]
        await wait_for(lambda: worker.in_flight == 0, timeout=5, what="the worker free again")


async def test_worker_error_is_500_with_code_50001(ns: Namespace) -> None:
    model = ns.model("failing")
    async with stack(ns) as s:
        await s.add_worker(fail, model)
        with pytest.raises(openai.InternalServerError) as info:
            await s.openai().chat.completions.create(model=model, messages=chat("x"))
    assert info.value.status_code == 500
    assert info.value.response.headers["x-should-retry"] == "false"
    body: Any = info.value.body
    assert body["code"] == 50001
    assert "this handler always fails" in body["message"]
    assert model in body["message"]


async def test_error_mid_stream_is_an_error_event(ns: Namespace) -> None:
    model = ns.model()

    async def breaks(job: Job) -> AsyncIterator[dict[str, str]]:
        yield {"text": "fine"}
        raise RuntimeError("the GPU caught fire")

    async with stack(ns) as s:
        await s.add_worker(breaks, model)
        stream = await s.openai().chat.completions.create(
            model=model, messages=chat("x"), stream=True
        )
        received: list[str | None] = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
        raw = await s.http().post(
            "/v1/chat/completions", json={"model": model, "messages": chat("x"), "stream": True}
        )
    assert received == ["fine"]
    assert "the GPU caught fire" in info.value.message
    events = sse_lines(raw.text)
    assert json.loads(events[-1])["error"]["code"] == 50001
    assert "[DONE]" not in events


async def test_overloaded_queue_is_429(ns: Namespace) -> None:
    """A model queue at routing.max_queue_length refuses jobs: OVERLOADED, 429."""
    model = ns.model()
    async with stack(ns, routing={"max_queue_length": 1}) as s:
        worker = await s.add_worker(fake_llm, model, concurrency=1)
        client = s.openai()

        async def call(text: str) -> Any:
            return await client.chat.completions.create(
                model=model, messages=chat(text), extra_body={"delay": 0.5}
            )

        waiting = [asyncio.create_task(call("busy " * 30))]  # held by the only worker
        await wait_for(lambda: worker.in_flight == 1, timeout=5, what="the first job running")
        try:
            # Quorum queues apply the cap a little late: send until one is refused.
            for attempt in range(10):
                task = asyncio.create_task(call(f"queued {attempt}"))
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    break
                waiting.append(task)
            else:
                pytest.fail("the full queue never refused a job")
            with pytest.raises(openai.RateLimitError) as info:
                await task
            assert info.value.status_code == 429
            assert info.value.response.headers["x-should-retry"] == "true"
            assert info.value.response.headers["retry-after"] == "2"
            body: Any = info.value.body
            assert body["code"] == 42903
            assert "full" in body["message"]
            assert model in body["message"]
        finally:
            for pending in waiting:
                pending.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)


# -- docs -------------------------------------------------------------------------------------


async def test_openapi_docs(ns: Namespace) -> None:
    async with stack(ns) as s:
        http = s.http()
        docs = await http.get("/docs")
        spec = (await http.get("/openapi.json")).json()
        health = (await http.get("/healthz")).json()
        unknown = await http.get("/v1/nothing-here")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"} <= set(
        spec["paths"]
    )
    assert health == {"healthy": True, "namespace": ns.name, "controller": s.service.server.url}  # type: ignore[union-attr]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found_error"
