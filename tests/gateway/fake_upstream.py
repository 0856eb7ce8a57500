"""A tiny OpenAI-compatible server for the upstream adapter's tests (a stand-in for vLLM).

Run as ``python -m tests.gateway.fake_upstream --port P``. It answers like an echo model:

* chat: the words of the last user message; completions: the words of the prompt; streamed as
  ``data: {chunk}`` events ending with ``data: [DONE]`` when ``stream`` is true, each word after
  ``delay`` seconds (a request field);
* a message or prompt ``status:NNN`` answers HTTP NNN with OpenAI's error JSON;
* ``sleep:S`` sleeps S seconds before answering;
* ``midstream-error`` streams two chunks, then an error event;
* embeddings: a fixed 3-vector per input.

``GET /stats`` tells what it saw (requests, streams started, streams whose client went away),
``POST /admin/health`` ``{"healthy": false}`` makes ``GET /v1/models`` answer 503.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

MODEL = "upstream-echo"

app = FastAPI()
state: dict[str, Any] = {
    "healthy": True,
    "requests": [],
    "streams_started": 0,
    "streams_finished": 0,
    "streams_cancelled": 0,
}


def _text_of(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return str(message.get("content", ""))
        return ""
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "fake_error", "param": None, "code": status}},
        status_code=status,
    )


def _chunk(chat: bool, model: str, piece: str | None, finish: str | None) -> dict[str, Any]:
    if chat:
        delta = {} if piece is None else {"content": piece}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish}
        kind = "text_completion"
    return {"id": "up-1", "object": kind, "created": int(time.time()), "model": model,
            "choices": [choice]}  # fmt: skip


async def _answer(body: dict[str, Any], chat: bool) -> Response:
    state["requests"].append(body)
    text = _text_of(body)
    model = str(body.get("model", MODEL))
    if text.startswith("status:"):
        status = int(text.split(":", 1)[1])
        return _error(status, f"fake upstream refuses with {status}")
    if text.startswith("sleep:"):
        await asyncio.sleep(float(text.split(":", 1)[1]))
    words = text.split()
    delay = float(body.get("delay", 0))
    if not body.get("stream"):
        answer = " ".join(words)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop",
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": answer, "finish_reason": "stop"}
            kind = "text_completion"
        return JSONResponse(
            {"id": "up-1", "object": kind, "created": int(time.time()), "model": model,
             "choices": [choice],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        )  # fmt: skip

    async def events() -> AsyncIterator[bytes]:
        state["streams_started"] += 1
        try:
            for index, word in enumerate(words):
                if delay:
                    await asyncio.sleep(delay)
                if text == "midstream-error" and index == 0:
                    for piece in ("one", " two"):
                        data = _chunk(chat, model, piece, None)
                        yield f"data: {json.dumps(data)}\n\n".encode()
                    err = {"error": {"message": "fake upstream broke mid-stream", "code": 500}}
                    yield f"data: {json.dumps(err)}\n\n".encode()
                    return
                piece = word if index == 0 else f" {word}"
                yield f"data: {json.dumps(_chunk(chat, model, piece, None))}\n\n".encode()
            yield f"data: {json.dumps(_chunk(chat, model, None, 'stop'))}\n\n".encode()
            yield b"data: [DONE]\n\n"
            state["streams_finished"] += 1
        except asyncio.CancelledError:
            state["streams_cancelled"] += 1  # the client (the adapter) went away
            raise

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/v1/models")
async def models() -> Response:
    if not state["healthy"]:
        return _error(503, "fake upstream is unhealthy")
    return JSONResponse(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                     "owned_by": "fake"}]}
    )  # fmt: skip


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    return await _answer(await request.json(), chat=True)


@app.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _answer(await request.json(), chat=False)


@app.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    body = await request.json()
    state["requests"].append(body)
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.5, -0.5, float(len(str(item)))]}
        for i, item in enumerate(inputs)
    ]
    return JSONResponse(
        {"object": "list", "data": data, "model": body.get("model", MODEL),
         "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    )  # fmt: skip


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return state


@app.post("/admin/health")
async def set_health(request: Request) -> dict[str, Any]:
    state["healthy"] = bool((await request.json())["healthy"])
    return {"healthy": state["healthy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
