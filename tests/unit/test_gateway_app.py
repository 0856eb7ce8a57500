"""The gateway app's own checks, in process and without a broker: API keys, body size,
request validation, settings."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from modelfleet.client import Client
from modelfleet.config import GatewaySettings, load_settings, settings_from_mapping
from modelfleet.gateway import build_app


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_from_mapping({"gateway": {"api_keys": ["sk-good"], "max_body_bytes": 2048}})
    app = build_app(Client(settings), settings, controller_url="http://127.0.0.1:1")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


GOOD = {"Authorization": "Bearer sk-good"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-bad"}, {"Authorization": "Basic sk-good"}],
)
async def test_v1_needs_a_good_key(http: httpx.AsyncClient, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        response = await http.request(method, path, headers=headers, json={})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


async def test_health_docs_and_openapi_are_open(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/docs")).status_code == 200
    spec = (await http.get("/openapi.json")).json()
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


async def test_body_over_the_limit_is_413(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/embeddings", headers=GOOD, content=b"x" * 4000)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large"
    assert "2048" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "model"),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        (
            "/v1/embeddings",
            {"model": "m", "input": "x", "encoding_format": "hex"},
            "encoding_format",
        ),
    ],
)
async def test_invalid_bodies_are_400_naming_the_field(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    response = await http.post(path, headers=GOOD, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == 40001
    assert param in error["message"]


async def test_models_without_a_controller_is_503(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/models", headers=GOOD)
    assert response.status_code == 503
    assert "http://127.0.0.1:1" in response.json()["error"]["message"]


def test_gateway_api_keys_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for name in list(os.environ):
        if name.upper().startswith("MODELFLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODELFLEET_GATEWAY__API_KEYS", "sk-a, sk-b")
    assert load_settings().gateway.api_keys == ["sk-a", "sk-b"]
    monkeypatch.setenv("MODELFLEET_GATEWAY__API_KEYS", '["sk-c"]')
    assert load_settings().gateway.api_keys == ["sk-c"]
    monkeypatch.setenv("MODELFLEET_GATEWAY__PORT", "0")
    assert load_settings().gateway.port == 0
    assert GatewaySettings().api_keys == []  # default: no authentication
    hash(load_settings())  # frozen settings stay hashable
