"""The upstream adapter: an OpenAI-compatible server (the fake one in fake_upstream.py, run as a
real process) becomes a fleet worker; driven through the gateway with the official client."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest

from modelfleet.messages import WorkerState
from tests.conftest import Namespace
from tests.gateway.support import UpstreamProcess, stack
from tests.helpers import wait_for


def chat(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_chat_and_completions_are_forwarded(ns: Namespace, upstream: UpstreamProcess) -> None:
    model = ns.model("up")
    async with stack(ns) as s:
        await s.add_upstream_worker(upstream.url, model, upstream_model="served-name")
        await s.wait_routable(model)
        client = s.openai()
        before = len((await upstream.stats())["requests"])

        reply = await client.chat.completions.create(model=model, messages=chat("hi there"))
        assert reply.choices[0].message.content == "hi there"
        assert reply.object == "chat.completion"

        stream = await client.chat.completions.create(
            model=model, messages=chat("streamed all the way"), stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream]
        assert pieces[:4] == ["streamed", " all", " the", " way"]  # chunk by chunk

        text = await client.completions.create(model=model, prompt="plain prompt")
        assert text.choices[0].text == "plain prompt"

        embedded = await client.embeddings.create(
            model=model, input=["ab", "abcd"], encoding_format="float"
        )
        assert [d.embedding for d in embedded.data] == [[0.5, -0.5, 2.0], [0.5, -0.5, 4.0]]

        seen = (await upstream.stats())["requests"][before:]
    # What the server got: the OpenAI body, its own model name, no modelfleet fields.
    assert [r["model"] for r in seen] == ["served-name"] * 4
    assert all("endpoint" not in r for r in seen)
    assert [r.get("stream") for r in seen] == [False, True, False, None]
    assert seen[0]["messages"] == chat("hi there")


@pytest.mark.parametrize(
    ("status", "http_status", "code"),
    [(400, 400, 40001), (404, 400, 40001), (429, 429, 42903), (503, 429, 42903), (500, 500, 50001)],
)
async def test_upstream_errors_map_to_modelfleet_codes(
    ns: Namespace, upstream: UpstreamProcess, status: int, http_status: int, code: int
) -> None:
    model = ns.model("up")
    async with stack(ns) as s:
        await s.add_upstream_worker(upstream.url, model)
        await s.wait_routable(model)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as info:
                await s.openai().chat.completions.create(
                    model=model, messages=chat(f"status:{status}"), stream=stream
                )
            assert info.value.status_code == http_status
            body: Any = info.value.body
            assert body["code"] == code
            assert f"answered HTTP {status}" in body["message"]
            assert f"fake upstream refuses with {status}" in body["message"]
            assert model in body["message"]


async def test_upstream_timeout_is_504(ns: Namespace, upstream: UpstreamProcess) -> None:
    model = ns.model("up")
    async with stack(ns, gateway={"timeout_s": 1.0}) as s:
        served = await s.add_upstream_worker(upstream.url, model)
        await s.wait_routable(model)
        with pytest.raises(openai.APIStatusError) as info:
            await s.openai().chat.completions.create(model=model, messages=chat("sleep:3"))
        assert info.value.status_code == 504
        assert info.value.body["code"] == 50006  # type: ignore[index]
        await wait_for(lambda: served.worker.in_flight == 0, timeout=5, what="the slot freed")


async def test_upstream_error_mid_stream(ns: Namespace, upstream: UpstreamProcess) -> None:
    model = ns.model("up")
    async with stack(ns) as s:
        await s.add_upstream_worker(upstream.url, model)
        await s.wait_routable(model)
        stream = await s.openai().chat.completions.create(
            model=model, messages=chat("midstream-error"), stream=True
        )
        pieces: list[str | None] = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                pieces.append(chunk.choices[0].delta.content)
    assert pieces == ["one", " two"]
    assert "fake upstream broke mid-stream" in info.value.message
    assert "after 2 chunk(s)" in info.value.message


async def test_disconnect_reaches_the_upstream(ns: Namespace, upstream: UpstreamProcess) -> None:
    model = ns.model("up")
    async with stack(ns) as s:
        served = await s.add_upstream_worker(upstream.url, model, concurrency=1)
        await s.wait_routable(model)
        cancelled_before = (await upstream.stats())["streams_cancelled"]
        stream = await s.openai().chat.completions.create(
            model=model,
            messages=chat(" ".join(["word"] * 40)),
            stream=True,
            extra_body={"delay": 0.25},
        )
        async for _ in stream:
            break
        await stream.close()
        await wait_for(lambda: served.worker.in_flight == 0, timeout=3, what="the slot freed")
        assert served.worker.counters["cancelled"] == 1

        async def upstream_saw_it() -> bool:
            return bool((await upstream.stats())["streams_cancelled"] == cancelled_before + 1)

        await wait_for(upstream_saw_it, timeout=5, what="the upstream's stream cancelled")


def _state(s: Any, worker_id: str) -> str | None:
    info = s.controller_service.controller.registry.get(worker_id)
    return None if info is None else str(info.state.value)


async def test_an_unhealthy_upstream_stops_the_worker_taking_jobs(
    ns: Namespace, upstream: UpstreamProcess
) -> None:
    model = ns.model("up")
    async with stack(ns) as s:
        served = await s.add_upstream_worker(upstream.url, model)
        worker = served.worker
        await s.wait_routable(model)
        client = s.openai()
        try:
            await upstream.set_healthy(False)
            await wait_for(lambda: worker.state is WorkerState.DRAINING, timeout=5, what="paused")
            # Heartbeats say so: the controller sees it draining and unroutes the model.
            await wait_for(
                lambda: _state(s, worker.worker_id) == "draining", timeout=5, what="draining"
            )
            await s.wait_routable(model, routable=False)
            with pytest.raises(openai.InternalServerError) as info:
                await client.chat.completions.create(model=model, messages=chat("x"))
            assert info.value.status_code == 503
            assert info.value.body["code"] == 50005  # type: ignore[index]
        finally:
            await upstream.set_healthy(True)
        await wait_for(lambda: worker.state is WorkerState.READY, timeout=5, what="resumed")
        await s.wait_routable(model)
        reply = await client.chat.completions.create(model=model, messages=chat("back again"))
        assert reply.choices[0].message.content == "back again"


async def test_upstream_dying_mid_stream(ns: Namespace, tmp_path: Path) -> None:
    """SIGKILL the upstream while it streams: the client gets an error naming the cause, the
    worker stops taking jobs (draining, model unrouted: NO_WORKER at once), and takes them
    again when the upstream is back."""
    server = UpstreamProcess(tmp_path).start()
    processes = [server]
    model = ns.model("up")
    try:
        async with stack(ns) as s:
            served = await s.add_upstream_worker(server.url, model)
            worker = served.worker
            await s.wait_routable(model)
            client = s.openai()
            stream = await client.chat.completions.create(
                model=model,
                messages=chat(" ".join(f"w{i}" for i in range(40))),
                stream=True,
                extra_body={"delay": 0.2},
            )
            pieces: list[str | None] = []
            with pytest.raises(openai.APIError) as info:
                async for chunk in stream:
                    pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 2:
                        server.kill()
            assert pieces[:2] == ["w0", " w1"]
            assert len(pieces) < 10
            message = info.value.message
            assert "upstream" in message
            assert server.url in message
            assert "mid-stream" in message
            assert info.value.body["code"] == 50001  # type: ignore[index]

            await wait_for(lambda: worker.state is WorkerState.DRAINING, timeout=5, what="paused")
            await s.wait_routable(model, routable=False)
            began = time.monotonic()
            with pytest.raises(openai.InternalServerError) as no_worker:
                await client.chat.completions.create(model=model, messages=chat("anyone?"))
            assert no_worker.value.status_code == 503
            assert time.monotonic() - began < 1.0

            processes.append(UpstreamProcess(tmp_path, port=server.port).start())
            await wait_for(lambda: worker.state is WorkerState.READY, timeout=10, what="resumed")
            await s.wait_routable(model)
            reply = await client.chat.completions.create(model=model, messages=chat("alive"))
            assert reply.choices[0].message.content == "alive"
    finally:
        for process in processes:
            process.stop()
