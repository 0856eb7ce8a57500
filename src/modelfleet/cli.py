"""The ``modelfleet`` command.

    modelfleet controller
    modelfleet worker --model NAME [--model NAME ...] --handler MODULE:ATTR [--concurrency N]
    modelfleet worker --model NAME --upstream URL     (an OpenAI-compatible server as a worker)
    modelfleet gateway [--host H] [--port P] [--controller-url URL]   (the OpenAI API)
    modelfleet submit --model NAME [--stream] [--timeout S] [PAYLOAD_JSON | -]
    modelfleet status [--json] [--watch] [--url URL]
    modelfleet loadgen --model NAME [--rate R] [--duration S]
    modelfleet demo
    modelfleet errors list|show|replay|purge ...   (the error queue; see `errors --help`)
    modelfleet permissions [--apply] [--vhost V] [--prefix P]

Every command takes ``--config FILE``. Exit codes: 0 success, 1 the job failed (its error is
printed to stderr as one JSON line with its numeric code), 2 bad usage or configuration,
3 RabbitMQ or the controller could not be reached.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from modelfleet import __version__, runtime
from modelfleet.config import Settings, load_settings
from modelfleet.errors import BrokerError, ConfigError, JobError
from modelfleet.errors_admin import add_errors_parser
from modelfleet.permissions import add_permissions_parser

__all__ = ["main"]

_T = TypeVar("_T")

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="settings TOML file (default: $MODELFLEET_CONFIG or ./config/settings.toml)",
    )
    parser = argparse.ArgumentParser(
        prog="modelfleet",
        description="Run a fleet of LLM model workers behind RabbitMQ.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"modelfleet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser(
        "controller",
        parents=[common],
        help="run the controller: registry, sweeper, routing, no-worker handler, status API",
    )

    worker = commands.add_parser("worker", parents=[common], help="serve models with a handler")
    worker.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME",
        help="model to serve (repeatable)",
    )
    worker.add_argument(
        "--handler",
        default="modelfleet.handlers:echo",
        metavar="MODULE:ATTR",
        help="handler to run (default: modelfleet.handlers:echo; try modelfleet.handlers:fake_llm)",
    )
    worker.add_argument(
        "--concurrency", type=int, metavar="N", help="jobs at once (default: settings)"
    )
    worker.add_argument(
        "--worker-id", metavar="ID", help="identity in the registry (default: host-pid-random)"
    )
    worker.add_argument(
        "--upstream",
        metavar="URL",
        help="forward jobs to this OpenAI-compatible server instead of a handler "
        "(e.g. http://127.0.0.1:8000/v1; see modelfleet.upstream)",
    )
    worker.add_argument(
        "--upstream-model", metavar="NAME", help="model name the upstream expects (default: same)"
    )
    worker.add_argument(
        "--upstream-api-key", metavar="KEY", help="Bearer key for the upstream ($OPENAI_API_KEY)"
    )

    submit = commands.add_parser(
        "submit", parents=[common], help="send one job and print its answer"
    )
    submit.add_argument("--model", required=True, metavar="NAME")
    submit.add_argument("--stream", action="store_true", help="print chunks as they arrive")
    submit.add_argument(
        "--timeout", type=float, metavar="S", help="deadline in seconds (default: settings)"
    )
    submit.add_argument(
        "payload",
        nargs="?",
        default="null",
        metavar="PAYLOAD_JSON",
        help="JSON payload, or - for stdin",
    )

    status = commands.add_parser("status", parents=[common], help="show models and workers")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.add_argument(
        "--url", metavar="URL", help="controller status API (default: http.host:http.port)"
    )
    status.add_argument(
        "--watch", action="store_true", help="refresh every second until Ctrl-C (a live view)"
    )
    status.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="--watch refresh period (default 1)",
    )

    load = commands.add_parser(
        "loadgen", parents=[common], help="send a steady stream of fake_llm jobs (for dashboards)"
    )
    load.add_argument("--model", required=True, metavar="NAME")
    load.add_argument("--rate", type=float, default=10.0, metavar="JOBS_PER_S", help="default 10")
    load.add_argument(
        "--duration", type=float, metavar="S", help="stop after S seconds (default: never)"
    )
    load.add_argument(
        "--stream-share",
        type=float,
        default=0.2,
        metavar="F",
        help="share of streamed jobs (default 0.2)",
    )

    demo = commands.add_parser("demo", parents=[common], help="run a short self-contained demo")
    demo.add_argument(
        "--jobs", type=int, default=200, metavar="N", help="jobs in the burst (default 200)"
    )
    gateway = commands.add_parser(
        "gateway", parents=[common], help="serve the OpenAI API (chat, completions, embeddings)"
    )
    gateway.add_argument("--host", metavar="H", help="interface (default: gateway.host)")
    gateway.add_argument("--port", type=int, metavar="P", help="TCP port (default: gateway.port)")
    gateway.add_argument(
        "--controller-url",
        metavar="URL",
        help="controller status API, for /v1/models (default: http.host:http.port)",
    )
    add_errors_parser(commands, common)
    add_permissions_parser(commands, common)
    return parser


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aio-pika logs every reconnect attempt at length; our own lines say what matters.
    logging.getLogger("aio_pika").setLevel(
        max(logging.WARNING, logging.getLevelName(settings.log_level))
    )
    logging.getLogger("aiormq").setLevel(
        max(logging.WARNING, logging.getLevelName(settings.log_level))
    )


def _load_handler(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--handler {spec!r}: expected MODULE:ATTR, e.g. modelfleet.handlers:echo")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--handler {spec!r}: cannot import {module_name!r}: {exc}") from None
    try:
        handler = getattr(module, attr)
    except AttributeError:
        raise UsageError(f"--handler {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(handler):
        raise UsageError(f"--handler {spec!r} is not callable")
    return handler


def _read_payload(text: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"payload is not valid JSON: {exc}") from None


async def _run_controller(settings: Settings) -> int:
    from modelfleet.service import build_controller

    await build_controller(settings).run()
    return EXIT_OK


async def _run_worker(settings: Settings, args: argparse.Namespace) -> int:
    from modelfleet.worker import Worker

    if args.upstream is not None:
        return await _run_upstream_worker(settings, args)
    handler = _load_handler(args.handler)
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    try:
        worker = Worker(
            handler,
            args.model,
            settings=settings,
            concurrency=args.concurrency,
            worker_id=args.worker_id,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    await worker.run()
    return EXIT_OK


async def _run_upstream_worker(settings: Settings, args: argparse.Namespace) -> int:
    import os

    from modelfleet.upstream import UpstreamWorker, check_upstream_url

    if args.handler != "modelfleet.handlers:echo":
        raise UsageError("--upstream and --handler exclude each other")
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    try:
        check_upstream_url(args.upstream)
        await UpstreamWorker(
            settings,
            args.model,
            args.upstream,
            upstream_model=args.upstream_model,
            api_key=args.upstream_api_key or os.environ.get("OPENAI_API_KEY"),
            concurrency=args.concurrency,
            worker_id=args.worker_id,
        ).run()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


async def _run_submit(settings: Settings, args: argparse.Namespace) -> int:
    from modelfleet.client import Client

    payload = _read_payload(args.payload)
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    async with Client(settings, timeout=args.timeout) as client:
        if args.stream:
            stream = client.stream(args.model, payload)
            async for chunk in stream:
                print(json.dumps(chunk), flush=True)
            print(json.dumps(stream.result), flush=True)
        else:
            result = await client.submit(args.model, payload)
            print(json.dumps(result), flush=True)
    return EXIT_OK


def _fetch(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BrokerError(f"controller status API at {url} did not answer: {reason}") from None


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def render_status(models: list[dict[str, Any]], workers: list[dict[str, Any]]) -> str:
    """The human-readable status tables (models, then workers)."""
    model_rows = [
        [
            m["name"],
            str(m["workers"]),
            str(m["capacity"]),
            str(m["in_flight"]),
            "-" if m["queue_depth"] is None else str(m["queue_depth"]),
            "yes" if m["routable"] else "NO",
        ]
        for m in models
    ]
    worker_rows = [
        [
            w["worker_id"],
            ",".join(w["models"]),
            w["state"] + (" STUCK" if w.get("stuck") else ""),
            f"{w['in_flight']}/{w['concurrency']}",
            f"{w['last_heartbeat_age_s']:.1f}s",
            f"{w['host']}:{w['pid']}",
        ]
        for w in workers
    ]
    return "\n".join(
        [
            _table(model_rows, ["MODEL", "WORKERS", "CAPACITY", "IN_FLIGHT", "QUEUED", "ROUTABLE"]),
            "",
            _table(
                worker_rows, ["WORKER", "MODELS", "STATE", "BUSY", "LAST_HEARTBEAT", "HOST:PID"]
            ),
        ]
    )


def _run_status(settings: Settings, args: argparse.Namespace) -> int:
    base = (args.url or f"http://{settings.http.host}:{settings.http.port}").rstrip("/")
    if args.watch:
        return _watch_status(base, args.interval)
    models = _fetch(f"{base}/v1/models")["models"]
    workers = _fetch(f"{base}/v1/workers")["workers"]
    if args.json:
        print(json.dumps({"models": models, "workers": workers}, indent=2))
    else:
        print(render_status(models, workers))
    return EXIT_OK


def _watch_status(base: str, interval: float) -> int:
    """Redraw the status tables every ``interval`` seconds until Ctrl-C."""
    if interval <= 0:
        raise UsageError("--interval must be positive")
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            stamp = time.strftime("%H:%M:%S")
            try:
                models = _fetch(f"{base}/v1/models")["models"]
                workers = _fetch(f"{base}/v1/workers")["workers"]
                body = render_status(models, workers)
            except BrokerError as exc:
                body = f"(controller unreachable: {exc}; retrying)"
            header = f"modelfleet status - {base} - {stamp} (Ctrl-C to quit)"
            print(f"{clear}{header}\n\n{body}\n", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _run(settings: Settings, main: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's coroutine on the event loop ``settings.event_loop`` names."""
    return runtime.run(main, settings.event_loop)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"modelfleet: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(settings)
    try:
        if args.command == "controller":
            return _run(settings, _run_controller(settings))
        if args.command == "worker":
            return _run(settings, _run_worker(settings, args))
        if args.command == "gateway":
            from modelfleet.gateway import run_gateway

            if args.port is not None and not 0 <= args.port <= 65535:
                raise UsageError("--port must be in 0..65535")
            return _run(
                settings,
                run_gateway(
                    settings, host=args.host, port=args.port, controller_url=args.controller_url
                ),
            )
        if args.command == "submit":
            return _run(settings, _run_submit(settings, args))
        if args.command == "status":
            return _run_status(settings, args)
        if args.command == "loadgen":
            from modelfleet.loadgen import run_load

            if args.rate <= 0:
                raise UsageError("--rate must be positive")
            if not 0 <= args.stream_share <= 1:
                raise UsageError("--stream-share must be between 0 and 1")
            _run(
                settings,
                run_load(
                    settings,
                    model=args.model,
                    rate=args.rate,
                    duration_s=args.duration,
                    stream_share=args.stream_share,
                ),
            )
            return EXIT_OK
        if args.command == "demo":
            from modelfleet.demo import run_demo

            return _run(settings, run_demo(settings, jobs=args.jobs))
        if args.command == "errors":
            from modelfleet.errors_admin import run_errors

            return _run(settings, run_errors(settings, args))
        if args.command == "permissions":
            from modelfleet.permissions import run_permissions

            return run_permissions(settings, args)
    except UsageError as exc:
        print(f"modelfleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JobError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return EXIT_JOB_FAILED
    except BrokerError as exc:
        # Unreachable, or reachable and refusing (a user without permission): the message says.
        print(json.dumps({"error": "BROKER_ERROR", "message": str(exc)}), file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")
