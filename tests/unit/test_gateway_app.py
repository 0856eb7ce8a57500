"""The gateway app's own checks, in process and without a broker: API keys, body size,
request validation, refused parameters, retry headers, /models against a controller status
API, /metrics, the request log, settings, the message for a port that cannot be taken."""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.client import Client
from modelfleet.config import GatewaySettings, load_settings, settings_from_mapping
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
from modelfleet.gateway import bind_error, build_app
from modelfleet.gateway_errors import (
    answer_for,
    answer_for_status,
    is_json_media_type,
    json_error_message,
    no_worker_answer,
    validation_message,
)
from modelfleet.gateway_metrics import GatewayMetrics, RequestRecord, endpoint_label


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
    health = await http.get("/healthz")
    assert health.status_code == 503  # open, and honest: this client never connected
    assert health.json()["healthy"] is False
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
    for path in ("/v1/models", "/v1/models/m"):
        response = await http.get(path, headers=GOOD)
        assert response.status_code == 503
        assert "http://127.0.0.1:1" in response.json()["error"]["message"]
        # It comes back: worth a retry, soon.
        assert response.headers["x-should-retry"] == "true"
        assert response.headers["retry-after"] == "1"


def app_client(settings: Any, controller: httpx.AsyncClient | None = None) -> httpx.AsyncClient:
    app = build_app(Client(settings), settings, controller_url="http://controller", http=controller)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


async def test_one_model_is_200_routable_503_known_404_unknown() -> None:
    """The controller's status API (a real HTTP answer in its shape, in process) decides."""
    models = [
        {"name": "up", "workers": 1, "routable": True},
        {"name": "down", "workers": 0, "routable": False},
    ]

    def status_api(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return httpx.Response(200, json={"models": models})

    settings = settings_from_mapping({})
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(status_api)) as controller,
        app_client(settings, controller) as http,
    ):
        listed = (await http.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == ["up"]
        assert (await http.get("/v1/models/up")).json()["id"] == "up"

        down = await http.get("/v1/models/down")
        assert down.status_code == 503
        assert down.json()["error"]["code"] == 50005
        assert down.headers["x-should-retry"] == "false"
        assert down.headers["retry-after"] == "10"

        ghost = await http.get("/v1/models/ghost")
        assert ghost.status_code == 404
        assert ghost.json()["error"]["code"] == "model_not_found"
        assert ghost.json()["error"]["param"] == "model"
        assert ghost.headers["x-should-retry"] == "false"
        assert "retry-after" not in ghost.headers


# -- bodies a person gets a clear answer about -------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type", "says"),
    [
        (
            b'{"model": "m",\n "messages": [} ',
            "application/json",
            "request body is not valid JSON: Expecting value at line 2, column 15",
        ),
        (b'{"model": "m" "x"}', "application/json", "Expecting ',' delimiter at line 1, column 15"),
        (
            b'{"model": "caf\xe9"}',
            "application/json",
            "request body is not valid JSON: it is not UTF-8",
        ),
        (b"", "application/json", "request body is empty"),
        (b"[1, 2]", "application/json", "request body must be a JSON object, not an array"),
        (b'"hi"', "application/json", "must be a JSON object, not a string"),
        (
            b'{"model": "m"}',
            "text/plain",
            "Content-Type must be application/json, not 'text/plain'",
        ),
        (
            b"model=m",
            "application/x-www-form-urlencoded",
            "Content-Type must be application/json",
        ),
    ],
)
async def test_unreadable_bodies_say_why(
    http: httpx.AsyncClient, content: bytes, content_type: str, says: str
) -> None:
    response = await http.post(
        "/v1/chat/completions", headers={**GOOD, "Content-Type": content_type}, content=content
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert says in error["message"]
    assert error["param"] is None
    assert error["code"] == 40001
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-should-retry"] == "false"


async def test_a_body_without_content_type_is_read_as_json(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions",
        headers=GOOD,
        content=b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}',
    )
    assert response.status_code == 400  # n=2: it was read, and validated as JSON
    assert response.json()["error"]["param"] == "n"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user"}], "n": 2}, "n"),
        ("/v1/completions", {"model": "m", "prompt": "x", "n": 4}, "n"),
        ("/v1/completions", {"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user"}], "n": 0}, "n"),
        ("/v1/chat/completions", {"model": "m", "messages": [{}], "stop": 3}, "stop"),
        ("/v1/completions", {"model": "m", "prompt": ["one two", "three"]}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": [[1, 2], [3]]}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": []}, "prompt"),
    ],
)
async def test_parameters_a_job_cannot_honour_are_refused(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    response = await http.post(path, headers=GOOD, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert param in error["message"]
    assert response.headers["x-should-retry"] == "false"


async def test_4xx_of_the_gateway_itself_say_do_not_retry(http: httpx.AsyncClient) -> None:
    unauthorised = await http.get("/v1/models")
    too_large = await http.post("/v1/embeddings", headers=GOOD, content=b"x" * 4000)
    no_route = await http.get("/v1/nothing", headers=GOOD)
    wrong_method = await http.delete("/v1/models", headers=GOOD)
    for response, status in ((unauthorised, 401), (too_large, 413), (no_route, 404)):
        assert response.status_code == status
        assert response.headers["x-should-retry"] == "false"
    assert wrong_method.status_code == 405
    assert wrong_method.headers["x-should-retry"] == "false"


# -- what each error tells an OpenAI client --------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "status", "retry", "retry_after"),
    [
        (InvalidJobError, 400, "false", None),
        (InvalidModelError, 400, "false", None),
        (OverloadedError, 429, "true", "2"),
        (NoWorkerError, 503, "false", "10"),
        (JobTimeoutError, 504, "false", None),
        (ExpiredError, 504, "false", None),
        (WorkerError, 500, "false", None),
        (ConnectionLostError, 502, "true", "1"),
        (JobCancelledError, 499, "false", None),
    ],
)
def test_retry_headers_of_each_job_error(
    cls: type[JobError], status: int, retry: str, retry_after: str | None
) -> None:
    answer = answer_for(cls("why", model="m", job_id="j"))
    assert answer.status == status
    assert answer.headers["x-should-retry"] == retry
    assert answer.headers.get("retry-after") == retry_after


def test_no_worker_is_404_only_when_the_model_is_unknown() -> None:
    assert no_worker_answer(False).status == 404
    assert no_worker_answer(False).headers == {"x-should-retry": "false"}
    for known in (True, None):  # known, or the controller could not tell
        assert no_worker_answer(known).status == 503
        assert no_worker_answer(known).headers == {"x-should-retry": "false", "retry-after": "10"}


def test_http_level_answers() -> None:
    assert answer_for_status(503).headers == {"x-should-retry": "true", "retry-after": "1"}
    assert answer_for_status(502).headers == {"x-should-retry": "false"}
    assert answer_for_status(404).type == "not_found_error"
    assert answer_for_status(401).type == "authentication_error"
    assert answer_for_status(422).headers == {"x-should-retry": "false"}
    assert answer_for_status(500).type == "server_error"


def test_json_media_types() -> None:
    for json_type in (None, "", "application/json", "application/json; charset=utf-8"):
        assert is_json_media_type(json_type)
    assert is_json_media_type("application/vnd.api+json")
    for other in ("text/plain", "application/x-www-form-urlencoded", "text/json+x"):
        assert not is_json_media_type(other)


def test_json_error_message_points_at_the_place() -> None:
    assert json_error_message("Expecting value", '{\n  "a": }', 9) == (
        "request body is not valid JSON: Expecting value at line 2, column 8"
    )
    assert json_error_message("Expecting value", b"", 0) == (
        "request body is not valid JSON: Expecting value at line 1, column 1"
    )
    assert json_error_message("bad", None, 3) == "request body is not valid JSON: bad"


def test_validation_message_names_the_field() -> None:
    errors = [{"type": "missing", "loc": ("body", "messages"), "msg": "Field required"}]
    assert validation_message(errors, {}, "application/json") == (
        "invalid request: messages: Field required",
        "messages",
    )
    nested = [{"type": "x", "loc": ("body", "messages", 0, "role"), "msg": "bad"}]
    assert validation_message(nested, {"messages": [{}]}, None)[1] == "messages.0.role"
    # A union's member tag ("str" of `str | list[str]`) is no field.
    union = [{"type": "string_type", "loc": ("body", "stop", "str"), "msg": "bad"}]
    assert validation_message(union, {"stop": 3}, None)[1] == "stop"


# -- /metrics and the request log -----------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_every_request_without_a_key(http: httpx.AsyncClient) -> None:
    await http.get("/v1/models")  # 401
    await http.get("/v1/models", headers=GOOD)  # 503: no controller
    await http.get("/v1/models/a/b", headers=GOOD)  # 503
    await http.get("/nowhere")  # 404
    response = await http.get("/metrics")  # no key needed
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = samples(response.text)

    def requests(endpoint: str, status: str) -> float:
        key = ("modelfleet_gateway_requests_total", (("endpoint", endpoint), ("status", status)))
        return values.get(key, 0.0)

    assert requests("/v1/models", "401") == 1
    assert requests("/v1/models", "503") == 1
    assert requests("/v1/models/{model}", "503") == 1
    assert requests("other", "404") == 1
    count = ("modelfleet_gateway_request_duration_seconds_count", (("endpoint", "/v1/models"),))
    assert values[count] == 2
    # This scrape is in flight while it renders; nothing else is.
    in_flight = "modelfleet_gateway_requests_in_flight"
    assert values[(in_flight, (("endpoint", "/metrics"),))] == 1
    assert values[(in_flight, (("endpoint", "/v1/models"),))] == 0
    assert "modelfleet_gateway_time_to_first_token_seconds" in response.text


def test_each_gateway_has_its_own_registry() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.requests.labels("/healthz", "200").inc()
    assert (
        first.registry.get_sample_value(
            "modelfleet_gateway_requests_total", {"endpoint": "/healthz", "status": "200"}
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "modelfleet_gateway_requests_total", {"endpoint": "/healthz", "status": "200"}
        )
        is None
    )


def test_endpoint_labels_are_bounded() -> None:
    assert endpoint_label("/v1/chat/completions") == "/v1/chat/completions"
    assert endpoint_label("/v1/models/org/name") == "/v1/models/{model}"
    assert endpoint_label("/v1/anything-else") == "other"
    assert endpoint_label("/wp-admin.php") == "other"


async def test_each_request_is_logged_once(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.gateway")
    await http.post(
        "/v1/chat/completions",
        headers=GOOD,
        json={"model": "llama", "messages": [{"role": "user", "content": "x"}], "n": 3},
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "modelfleet.gateway"]
    assert len(lines) == 1
    [line] = lines
    assert line.startswith("POST /v1/chat/completions status=400 duration=")
    assert "model=llama" in line
    assert "job=-" in line  # refused before any job
    assert "stream=false" in line


async def test_the_log_line_of_one_model_names_it(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.gateway")
    await http.get("/v1/models/org/llama-3", headers=GOOD)  # 503: no controller
    lines = [r.getMessage() for r in caplog.records if r.name == "modelfleet.gateway"]
    assert len(lines) == 1
    assert lines[0].startswith("GET /v1/models/org/llama-3 status=503 ")
    assert " model=org/llama-3 " in lines[0]


async def test_what_a_caller_sends_cannot_start_a_log_line_of_its_own(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.gateway")
    await http.get("/v1/models/two%0Alines", headers=GOOD)
    body = {"model": "fake\nGET /", "messages": [{"role": "user", "content": "x"}], "n": 2}
    await http.post("/v1/chat/completions", headers=GOOD, json=body)
    lines = [r.getMessage() for r in caplog.records if r.name == "modelfleet.gateway"]
    assert len(lines) == 2
    assert all("\n" not in line for line in lines)
    assert lines[0].startswith("GET /v1/models/two\\nlines status=404 ")
    assert " model=fake\\nGET / " in lines[1]


def test_a_failed_stream_says_so_in_its_log_line() -> None:
    record = RequestRecord(
        method="POST", path="/v1/chat/completions", endpoint="/v1/chat/completions", started=0.0
    )
    record.status, record.model, record.stream = 200, "m", True
    assert "error=" not in record.log_line(0.5)
    record.error = "WORKER_ERROR"
    line = record.log_line(0.5)
    assert line.startswith("POST /v1/chat/completions status=200 duration=0.500s model=m ")
    assert line.endswith(" stream=true error=WORKER_ERROR")


# -- a port or host the gateway cannot take ------------------------------------------------------


def test_a_port_in_use_is_one_line_naming_the_setting_and_the_flag() -> None:
    in_use = OSError(errno.EADDRINUSE, "Address already in use")
    assert bind_error("127.0.0.1", 8090, in_use) == (
        "gateway.port 8090 on 127.0.0.1 is in use (another gateway?): pick another with --port "
        "or gateway.port"
    )


@pytest.mark.parametrize(
    ("exc", "starts", "names"),
    [
        (
            OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"),
            "gateway.host 192.0.2.1 cannot be bound (Cannot assign requested address)",
            "--host or gateway.host",
        ),
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "gateway.host 192.0.2.1 cannot be bound (Name or service not known)",
            "--host or gateway.host",
        ),
        (
            OSError(errno.EACCES, "Permission denied"),
            "gateway.port 80 on 192.0.2.1 cannot be used (Permission denied; ports below 1024",
            "--port or gateway.port",
        ),
    ],
)
def test_a_host_or_port_that_cannot_be_bound_is_one_line(
    exc: OSError, starts: str, names: str
) -> None:
    port = 80 if exc.errno == errno.EACCES else 8090
    message = bind_error("192.0.2.1", port, exc)
    assert message.startswith(starts)
    assert message.endswith(names)
    assert "\n" not in message


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
