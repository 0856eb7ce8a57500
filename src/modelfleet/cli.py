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
import os
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

from modelfleet import __version__, console, runtime
from modelfleet.config import Settings, load_settings, settings_from_mapping
from modelfleet.console import report_error, report_job_error
from modelfleet.errors import BrokerError, ConfigError, JobError
from modelfleet.errors_admin import add_errors_parser
from modelfleet.permissions import add_permissions_parser

__all__ = ["main"]

_T = TypeVar("_T")

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


SETTINGS_EPILOG = """\
settings, lowest precedence first: the defaults; the TOML file (--config, $MODELFLEET_CONFIG or
./config/settings.toml, which lists every setting); the secrets file ($MODELFLEET_SECRETS_FILE or
./config/.secrets.toml); MODELFLEET_<SECTION>__<KEY> environment variables (MODELFLEET_NAMESPACE,
MODELFLEET_AMQP__URL, MODELFLEET_HEARTBEAT__TIMEOUT_S, ...); then --namespace and --amqp-url.
exit codes: 0 done, 1 the job failed, 2 bad usage or settings, 3 RabbitMQ or the controller
unreachable or refusing."""

# What each command does, shown by `modelfleet COMMAND --help`.
DESCRIPTIONS = {
    "controller": "Run the controller: it keeps the registry of workers from their heartbeats, "
    "evicts silent ones, binds each model's queue while it has live workers, answers jobs no "
    "worker can take with NO_WORKER at once, and serves the status API (/v1/models, "
    "/v1/workers, /healthz, /metrics) on http.host:http.port. Run one or more per namespace; "
    "they share nothing but the broker.",
    "worker": "Serve one or more models: consume their queues, run the handler (a Python "
    "callable MODULE:ATTR, looked up from the current directory and the installed packages) "
    "or forward to an OpenAI-compatible server (--upstream), and reply to the producer. "
    "Publishes a heartbeat every heartbeat.interval_s; SIGTERM drains (worker.stop_grace_s).",
    "submit": "Send one job to a model and print its answer as JSON on stdout; a failure is one "
    "line on stderr with its code (exit 1).",
    "status": "Show the models and workers one controller knows (its status API), with the "
    "namespace and controller they come from.",
    "loadgen": "Send a steady stream of jobs (for dashboards and soak tests) until Ctrl-C or "
    "--duration.",
    "demo": "Run a short self-contained demo on the local broker: a controller, workers, a burst "
    "of jobs, a NO_WORKER answer, a worker killed mid-job.",
    "gateway": "Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/embeddings, "
    "/v1/models) over modelfleet jobs, with /healthz and /metrics.",
}


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="settings TOML file (default: $MODELFLEET_CONFIG or ./config/settings.toml)",
    )
    common.add_argument(
        "--namespace",
        metavar="NS",
        default=argparse.SUPPRESS,
        help="namespace to work in (overrides the namespace setting and $MODELFLEET_NAMESPACE)",
    )
    common.add_argument(
        "--amqp-url",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="RabbitMQ URL, amqp://user:password@host:5672/vhost (overrides amqp.url and "
        "$MODELFLEET_AMQP__URL; prefer the variable for passwords)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print output and failures as JSON (failures are JSON anyway when stderr is "
        "not a terminal)",
    )
    parser = _Parser(
        prog="modelfleet",
        description="Run a fleet of LLM model workers behind RabbitMQ. "
        "`modelfleet COMMAND --help` tells more of each command.",
        epilog=SETTINGS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"modelfleet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    controller = commands.add_parser(
        "controller",
        parents=[common],
        help="run the controller: registry, sweeper, routing, no-worker handler, status API",
    )
    controller.add_argument(
        "--host", metavar="H", help="interface of the status API (default: http.host, 127.0.0.1)"
    )
    controller.add_argument(
        "--port",
        type=int,
        metavar="P",
        help="TCP port of the status API (default: http.port, 21001; 0 picks a free one)",
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
    submit.add_argument("--model", required=True, metavar="NAME", help="model to run the job on")
    submit.add_argument(
        "--stream",
        action="store_true",
        help='stream the answer: one {"chunk": ...} line per chunk as it arrives, then one '
        '{"result": ...} line',
    )
    submit.add_argument(
        "--timeout", type=float, metavar="S", help="deadline in seconds (default: settings)"
    )
    submit.add_argument(
        "payload",
        metavar="PAYLOAD_JSON",
        help='the job\'s payload as JSON (e.g. \'{"prompt": "hi"}\'), or - to read it from stdin',
    )

    status = commands.add_parser("status", parents=[common], help="show models and workers")
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
    load.add_argument("--model", required=True, metavar="NAME", help="model to send jobs to")
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
    _describe(parser)
    return parser


def _describe(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command its description (its own, or the help line it is listed with)
    and the settings epilog, all the way down."""
    for action in parser._actions:  # argparse keeps subcommands only here
        if not isinstance(action, argparse._SubParsersAction):
            continue
        listed = {choice.dest: choice.help for choice in action._choices_actions}
        for name, sub in action.choices.items():
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
            text = sub.description or DESCRIPTIONS.get(name) or listed.get(name)
            if text:
                sub.description = textwrap.fill(text[0].upper() + text[1:], width=96)
            if sub.epilog is None:
                sub.epilog = SETTINGS_EPILOG
            elif SETTINGS_EPILOG not in sub.epilog:
                sub.epilog = f"{sub.epilog}\n\n{SETTINGS_EPILOG}"
            _describe(sub)


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
    # aiormq logs a failed connection attempt as an ERROR with the raw exception; the command
    # reports the same failure once, in its own words (BROKER_ERROR), so that line is debug.
    logging.getLogger("aiormq.connection").addFilter(_demote_connect_errors)


def _demote_connect_errors(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and record.msg == "error when creating transport: %r":
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


class _Parser(argparse.ArgumentParser):
    """argparse with modelfleet's failure format for bad usage (exit 2)."""

    def error(self, message: str) -> NoReturn:
        if not console.wants_json("--json" in sys.argv):
            self.print_usage(sys.stderr)
        report_error(console.USAGE, f"{self.prog}: {message}", json_mode="--json" in sys.argv)
        raise SystemExit(EXIT_USAGE)


def _load_handler(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--handler {spec!r}: expected MODULE:ATTR, e.g. modelfleet.handlers:echo")
    # A handler file in the current directory imports as it would with `python -m`: the
    # console script's sys.path does not hold the current directory by itself.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = (
            f" (looked in the current directory {cwd} and the installed packages; run from the "
            "folder that holds the module, or add its folder to PYTHONPATH)"
            if getattr(exc, "name", None) == module_name.split(".")[0]
            else ""
        )
        raise UsageError(
            f"--handler {spec!r}: cannot import {module_name!r}: {exc}{hint}"
        ) from None
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
                print(json.dumps({"chunk": chunk}), flush=True)
            print(json.dumps({"result": stream.result}), flush=True)
        else:
            result = await client.submit(args.model, payload)
            print(json.dumps(result), flush=True)
    return EXIT_OK


def _fetch(url: str, ok_statuses: tuple[int, ...] = (200,)) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in ok_statuses:
            return json.loads(exc.read())
        raise BrokerError(f"controller status API at {url} answered {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BrokerError(
            f"the controller status API at {url} did not answer ({reason}): is `modelfleet "
            "controller` running, and is --url (or http.host/http.port) its address?"
        ) from None


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


def _controller_header(base: str, settings: Settings) -> tuple[str, dict[str, Any]]:
    """The line that says which namespace and controller the tables come from."""
    health = _fetch(f"{base}/healthz", ok_statuses=(200, 503))
    namespace = health.get("namespace", "?")
    if health.get("healthy"):
        state = "healthy"
    elif health.get("listen_only") and health.get("connected"):
        state = "starting (listening before it evicts or unbinds)"
    else:
        state = "NOT HEALTHY (see its /healthz)"
    line = f"namespace {namespace} - controller {health.get('instance', '?')} at {base} - {state}"
    if namespace != settings.namespace:
        line += (
            f"\nnote: this controller serves namespace {namespace!r}, not {settings.namespace!r} "
            "(your settings): use --url to read another controller"
        )
    return line, health


def _run_status(settings: Settings, args: argparse.Namespace) -> int:
    base = (args.url or f"http://{settings.http.host}:{settings.http.port}").rstrip("/")
    if args.watch:
        return _watch_status(base, args.interval, settings)
    header, health = _controller_header(base, settings)
    models = _fetch(f"{base}/v1/models")["models"]
    workers = _fetch(f"{base}/v1/workers")["workers"]
    if getattr(args, "json", False):
        document = {
            "namespace": health.get("namespace"),
            # False: the controller at this address serves another namespace than the settings.
            "namespace_matches": health.get("namespace") == settings.namespace,
            "controller": {"url": base, **health},
            "models": models,
            "workers": workers,
        }
        print(json.dumps(document, indent=2))
    else:
        print(header + "\n\n" + render_status(models, workers))
    return EXIT_OK


def _watch_status(base: str, interval: float, settings: Settings) -> int:
    """Redraw the status tables every ``interval`` seconds until Ctrl-C."""
    if interval <= 0:
        raise UsageError("--interval must be positive")
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            stamp = time.strftime("%H:%M:%S")
            try:
                header, _ = _controller_header(base, settings)
                models = _fetch(f"{base}/v1/models")["models"]
                workers = _fetch(f"{base}/v1/workers")["workers"]
                body = header + "\n\n" + render_status(models, workers)
            except BrokerError as exc:
                body = f"(controller unreachable: {exc}; retrying)"
            print(f"{clear}modelfleet status - {stamp} (Ctrl-C to quit)\n\n{body}\n", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _run(settings: Settings, main: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's coroutine on the event loop ``settings.event_loop`` names."""
    return runtime.run(main, settings.event_loop)


def _with_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    """``--namespace`` and ``--amqp-url`` over the settings, validated like any setting."""
    namespace = getattr(args, "namespace", None)
    url = getattr(args, "amqp_url", None)
    if namespace is None and url is None:
        return settings
    data = settings.model_dump()
    if namespace is not None:
        data["namespace"] = namespace
    if url is not None:
        data["amqp"]["url"] = url
    return settings_from_mapping(data)


def _with_http(settings: Settings, host: str | None, port: int | None) -> Settings:
    """The controller's ``--host``/``--port`` over ``http.host``/``http.port``."""
    update = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if not update:
        return settings
    return settings.model_copy(update={"http": settings.http.model_copy(update=update)})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    json_mode = bool(getattr(args, "json", False))
    try:
        settings = _with_overrides(load_settings(getattr(args, "config", None)), args)
    except ConfigError as exc:
        report_error(console.CONFIG_ERROR, str(exc), json_mode=json_mode)
        return EXIT_USAGE
    _setup_logging(settings)
    try:
        if args.command == "controller":
            if args.port is not None and not 0 <= args.port <= 65535:
                raise UsageError("--port must be in 0..65535")
            settings = _with_http(settings, args.host, args.port)
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
        report_error(console.USAGE, str(exc), json_mode=json_mode)
        return EXIT_USAGE
    except ConfigError as exc:
        report_error(console.CONFIG_ERROR, str(exc), json_mode=json_mode)
        return EXIT_USAGE
    except JobError as exc:
        report_job_error(exc, json_mode=json_mode)
        return EXIT_JOB_FAILED
    except BrokerError as exc:
        # Unreachable, or reachable and refusing (a user without permission): the message says.
        report_error(console.BROKER_ERROR, str(exc), json_mode=json_mode)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")
