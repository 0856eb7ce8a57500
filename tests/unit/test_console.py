"""One failure format for every command: a sentence on a terminal, JSON otherwise."""

from __future__ import annotations

import io
import json

from modelfleet.console import error_document, error_text, report_error, report_job_error
from modelfleet.errors import NoWorkerError


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_person_at_a_terminal_reads_a_sentence() -> None:
    out = _Terminal()
    report_error("BROKER_ERROR", "cannot connect", stream=out)
    assert out.getvalue() == "modelfleet: BROKER_ERROR: cannot connect\n"


def test_json_when_piped_or_asked() -> None:
    piped = io.StringIO()
    report_error("USAGE", "bad flag", stream=piped)
    assert json.loads(piped.getvalue()) == {"error": "USAGE", "message": "bad flag"}

    asked = _Terminal()
    report_error("USAGE", "bad flag", stream=asked, json_mode=True)
    assert json.loads(asked.getvalue())["error"] == "USAGE"


def test_a_job_failure_carries_its_code_model_and_job() -> None:
    exc = NoWorkerError("nobody", model="llama", job_id="abc123")
    piped = io.StringIO()
    report_job_error(exc, stream=piped)
    assert json.loads(piped.getvalue()) == {
        "error": "NO_WORKER",
        "code": 50005,
        "model": "llama",
        "job_id": "abc123",
        "message": "nobody",
    }
    terminal = _Terminal()
    report_job_error(exc, stream=terminal)
    assert terminal.getvalue() == "modelfleet: NO_WORKER: nobody (model llama, job abc123)\n"


def test_missing_fields_are_left_out() -> None:
    assert error_document("X", "m", model=None) == {"error": "X", "message": "m"}
    assert error_text("X", "m", model=None) == "modelfleet: X: m"
