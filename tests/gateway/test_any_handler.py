"""Any handler behind the gateway (echo, a string, vectors, a plain stream), the parameters a
job can or cannot honour (``stop``, ``n``), and what the gateway reports about the requests it
serves (``/metrics``, one log line each); a real controller and real workers on the real
broker, driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.handlers import echo, fake_llm
from modelfleet.jobs import Job
from tests.conftest import Namespace
from tests.gateway.support import sse_lines, stack
from tests.helpers import wait_for

USER: Any = [{"role": "user", "content": "say it"}]


async def test_echo_answers_a_chat_completion_with_its_payload(ns: Namespace) -> None:
    model = ns.model("echo")
    async with stack(ns) as s:
        await s.add_worker(echo, model)
        client = s.openai()
        reply = await client.chat.completions.create(model=model, messages=USER)
        stream = await client.chat.completions.create(model=model, messages=USER, stream=True)
        chunks = [chunk async for chunk in stream]
        text = await client.completions.create(model=model, prompt="p")
        with pytest.raises(openai.InternalServerError) as info:
            await client.embeddings.create(model=model, input="x", encoding_format="float")
    assert reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.role == "assistant"
    payload = json.loads(reply.choices[0].message.content or "")
    assert payload == {"model": model, "messages": USER, "endpoint": "chat.completions"}
    # Streamed, a coroutine handler sends only its result: it becomes the stream's text.
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert json.loads(streamed)["stream"] is True
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert json.loads(text.choices[0].text)["prompt"] == "p"
    # Embeddings must be vectors: a clear refusal, not retried.
    assert info.value.status_code == 500
    assert "embeddings must be a vector" in info.value.message
    assert info.value.response.headers["x-should-retry"] == "false"


async def test_strings_and_vectors_are_wrapped(ns: Namespace) -> None:
    model = ns.model("plain")

    async def plain(job: Job) -> Any:
        if job.payload["endpoint"] == "embeddings":
            return [[1.0, 0.0], [0.0, 1.0]]
        return job.job_id  # a plain string

    async with stack(ns) as s:
        await s.add_worker(plain, model)
        client = s.openai()
        reply = await client.chat.completions.create(model=model, messages=USER)
        vectors = await client.embeddings.create(
            model=model, input=["a", "b"], encoding_format="float"
        )
    job_id = reply.choices[0].message.content
    assert job_id
    assert reply.id == f"chatcmpl-{job_id}"  # the response id is the job's
    assert [d.embedding for d in vectors.data] == [[1.0, 0.0], [0.0, 1.0]]


async def test_stop_is_honoured_for_a_plain_stream_and_the_rest_cancelled(ns: Namespace) -> None:
    model = ns.model("talker")
    cancelled = asyncio.Event()

    async def talker(job: Job) -> AsyncIterator[str]:
        try:
            for piece in ("one", " two", ". three", " four"):
                yield piece
            await asyncio.Event().wait()  # would talk forever
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with stack(ns) as s:
        await s.add_worker(talker, model)
        stream = await s.openai().chat.completions.create(
            model=model, messages=USER, stream=True, stop=["."]
        )
        chunks = [chunk async for chunk in stream]
        await asyncio.wait_for(cancelled.wait(), timeout=10)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_fake_llm_honours_stop_and_n_above_one_is_refused(ns: Namespace) -> None:
    model = ns.model()
    words: Any = [{"role": "user", "content": "alpha beta, gamma delta"}]
    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        client = s.openai()
        reply = await client.chat.completions.create(model=model, messages=words, stop=",")
        stream = await client.chat.completions.create(
            model=model, messages=words, stop=["gam", "zzz"], stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=model, messages=words, n=2)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model=model, messages=words, logprobs=True)
    assert reply.choices[0].message.content == "alpha beta"
    assert reply.choices[0].finish_reason == "stop"
    assert streamed == "alpha beta, "
    body: Any = info.value.body
    assert body["param"] == "n"
    assert "n=2" in body["message"]
    assert info.value.response.headers["x-should-retry"] == "false"
    # A parameter the handler cannot honour: it refuses it, and the gateway names it.
    assert refused.value.body["param"] == "logprobs"  # type: ignore[index]


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return 0.0


async def test_metrics_and_one_log_line_per_request(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.gateway")
    model = ns.model()
    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        http = s.http()
        whole = await http.post("/v1/chat/completions", json={"model": model, "messages": USER})
        streamed = await http.post(
            "/v1/chat/completions", json={"model": model, "messages": USER, "stream": True}
        )
        ghost = await http.post("/v1/chat/completions", json={"model": "x-1", "messages": USER})
        metrics = (await http.get("/metrics")).text
    assert (whole.status_code, streamed.status_code, ghost.status_code) == (200, 200, 404)

    endpoint = "/v1/chat/completions"
    name = "modelfleet_gateway_requests_total"
    assert sample(metrics, name, endpoint=endpoint, status="200") == 2
    assert sample(metrics, name, endpoint=endpoint, status="404") == 1
    assert sample(metrics, "modelfleet_gateway_request_duration_seconds_count") == 3
    ttft = "modelfleet_gateway_time_to_first_token_seconds_count"
    assert sample(metrics, ttft, endpoint=endpoint) == 1  # the stream only
    assert sample(metrics, "modelfleet_gateway_requests_in_flight", endpoint=endpoint) == 0

    lines = [r.getMessage() for r in caplog.records if r.name == "modelfleet.gateway"]
    served = [line for line in lines if line.startswith(f"POST {endpoint} ")]
    assert len(served) == 3
    whole_job = whole.json()["id"].removeprefix("chatcmpl-")
    stream_job = json.loads(sse_lines(streamed.text)[0])["id"].removeprefix("chatcmpl-")
    ghost_job = json.loads(ghost.text)["error"]["message"].split("job=")[1][:32]
    expected = [
        ("status=200", f"model={model}", f"job={whole_job}", "stream=false"),
        ("status=200", f"model={model}", f"job={stream_job}", "stream=true", "first_token="),
        ("status=404", "model=x-1", f"job={ghost_job}", "stream=false"),
    ]
    for line, parts in zip(served, expected, strict=True):
        assert all(part in line for part in parts), line
        assert " duration=" in line


def gateway_lines(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "modelfleet.gateway" and r.getMessage().startswith(prefix)
    ]


async def test_a_stream_that_fails_midway_is_logged_and_counted_as_an_error(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.gateway")
    model = ns.model("breaks")

    async def breaks(job: Job) -> AsyncIterator[dict[str, str]]:
        yield {"text": "fine"}
        if "break" in json.dumps(job.payload["messages"]):
            raise RuntimeError("the GPU caught fire")

    endpoint = "/v1/chat/completions"
    prefix = f"POST {endpoint} "
    async with stack(ns) as s:
        await s.add_worker(breaks, model)
        http = s.http()
        body = {"model": model, "stream": True}
        whole = await http.post(endpoint, json={**body, "messages": USER})
        broken = await http.post(
            endpoint, json={**body, "messages": [{"role": "user", "content": "break"}]}
        )
        # The line is written once the answer is complete: wait for both.
        await wait_for(lambda: len(gateway_lines(caplog, prefix)) == 2, timeout=10, what="2 lines")
        metrics = (await http.get("/metrics")).text
    assert (whole.status_code, broken.status_code) == (200, 200)
    assert json.loads(sse_lines(broken.text)[-1])["error"]["code"] == 50001
    ok_line, failed_line = gateway_lines(caplog, prefix)
    assert "status=200" in ok_line
    assert "error=" not in ok_line
    assert "status=200" in failed_line
    assert failed_line.endswith(" error=WORKER_ERROR"), failed_line
    errors = "modelfleet_gateway_stream_errors_total"
    assert sample(metrics, errors, endpoint=endpoint, code="WORKER_ERROR") == 1
    assert sample(metrics, errors) == 1  # the whole stream is no error
    assert sample(metrics, "modelfleet_gateway_requests_total", endpoint=endpoint) == 2


async def test_the_gateway_log_has_its_own_request_lines_only(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx logs each request at INFO ("HTTP Request: GET .../v1/models"): the gateway's calls
    to the controller's status API are not lines of its log."""
    caplog.set_level(logging.INFO)
    model = ns.model()
    async with stack(ns) as s:
        await s.add_worker(fake_llm, model)
        http = s.http()
        listed = await http.get("/v1/models")
        one = await http.get(f"/v1/models/{model}")
        await wait_for(
            lambda: len(gateway_lines(caplog, "GET /v1/models")) == 2, timeout=10, what="2 lines"
        )
    assert (listed.status_code, one.status_code) == (200, 200)
    http_client_lines = [r.getMessage() for r in caplog.records if r.name.startswith("http")]
    assert http_client_lines == []  # httpx, httpcore
    assert f"model={model} " in gateway_lines(caplog, "GET /v1/models/")[0]
