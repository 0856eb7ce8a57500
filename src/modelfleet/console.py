"""How the commands report a failure: one format for every command.

A failure is one line on stderr. On a terminal it is written for a person::

    modelfleet: NO_WORKER: no worker serves model 'ghost' (model ghost, job 5140ee86...)

Under ``--json``, or when stderr is not a terminal (a pipe, a log collector, a test), it is one
JSON object with the code name in ``error``, and for a job failure its numeric ``code``, its
``model`` and ``job_id``::

    {"error": "NO_WORKER", "code": 50005, "model": "ghost", "job_id": "5140...", "message": "..."}

The code names besides the job error codes (:class:`~modelfleet.errors.ErrorCode`):
``USAGE`` (bad command-line input, exit 2), ``CONFIG_ERROR`` (bad settings, exit 2),
``BROKER_ERROR`` (RabbitMQ or the controller unreachable or refusing, exit 3),
``NOT_FOUND`` (nothing matched what was asked for, exit 1), ``REPLAY_FAILED`` (``errors
replay`` sent a job that was not replayed, failed again or got no answer, exit 1) and
``PURGE_SKIPPED`` (``errors purge --all`` left broken entries alone, exit 1).
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from modelfleet.errors import JobError

__all__ = ["error_document", "error_text", "report_error", "report_job_error", "wants_json"]

USAGE = "USAGE"
CONFIG_ERROR = "CONFIG_ERROR"
BROKER_ERROR = "BROKER_ERROR"
NOT_FOUND = "NOT_FOUND"


def wants_json(explicit: bool = False, stream: TextIO | None = None) -> bool:
    """JSON when asked for, or when ``stream`` (default stderr) is not a terminal."""
    if explicit:
        return True
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())


def error_document(error: str, message: str, **fields: Any) -> dict[str, Any]:
    """The JSON form: ``error`` (the code name), then the fields given, then ``message``."""
    document: dict[str, Any] = {"error": error}
    document.update({k: v for k, v in fields.items() if v is not None})
    document["message"] = message
    return document


def error_text(error: str, message: str, **fields: Any) -> str:
    """The form a person reads: ``modelfleet: CODE: message (model m, job j)``."""
    where = [
        f"{k.replace('_id', '')} {v}" for k, v in fields.items() if v is not None and k != "code"
    ]
    suffix = f" ({', '.join(where)})" if where else ""
    return f"modelfleet: {error}: {message}{suffix}"


def report_error(
    error: str,
    message: str,
    *,
    json_mode: bool = False,
    stream: TextIO | None = None,
    **fields: Any,
) -> None:
    """Print one failure line to ``stream`` (default stderr) in the format the caller wants."""
    out = stream if stream is not None else sys.stderr
    if wants_json(json_mode, out):
        print(json.dumps(error_document(error, message, **fields)), file=out, flush=True)
    else:
        print(error_text(error, message, **fields), file=out, flush=True)


def report_job_error(
    exc: JobError, *, json_mode: bool = False, stream: TextIO | None = None
) -> None:
    """A failed job: its code name, numeric code, model, job id and message."""
    report_error(
        exc.code.name,
        exc.message,
        json_mode=json_mode,
        stream=stream,
        code=int(exc.code),
        model=exc.model,
        job_id=exc.job_id,
    )
