"""Errors: codes kept from FastChat, and every message naming model, job and cause."""

from __future__ import annotations

import pytest

from modelfleet.errors import (
    ErrorCode,
    ExpiredError,
    InvalidJobError,
    InvalidModelError,
    JobError,
    JobTimeoutError,
    ModelfleetError,
    NoWorkerError,
    OverloadedError,
    WorkerError,
    error_for_code,
)

CODES = [
    (NoWorkerError, ErrorCode.NO_WORKER, 50005),
    (JobTimeoutError, ErrorCode.WORKER_TIMEOUT, 50006),
    (WorkerError, ErrorCode.WORKER_ERROR, 50001),
    (InvalidJobError, ErrorCode.INVALID_JOB, 40001),
    (InvalidModelError, ErrorCode.INVALID_MODEL, 40301),
    (OverloadedError, ErrorCode.OVERLOADED, 42903),
    (ExpiredError, ErrorCode.EXPIRED, 50007),
]


@pytest.mark.parametrize(("cls", "code", "number"), CODES)
def test_each_error_has_its_code(cls: type[JobError], code: ErrorCode, number: int) -> None:
    assert cls.code is code
    assert int(code) == number
    error = cls("cause", model="m", job_id="j")
    assert error.code == number
    assert isinstance(error, JobError)
    assert isinstance(error, ModelfleetError)


@pytest.mark.parametrize(("cls", "code", "number"), CODES)
def test_error_names_model_job_and_cause(cls: type[JobError], code: ErrorCode, number: int) -> None:
    error = cls("no live worker for 3.0s", model="llama-3-8b", job_id="job-42")
    assert error.model == "llama-3-8b"
    assert error.job_id == "job-42"
    assert error.message == "no live worker for 3.0s"
    text = str(error)
    assert "llama-3-8b" in text
    assert "job-42" in text
    assert "no live worker for 3.0s" in text
    assert str(number) in text
    assert code.name in text


def test_invalid_model_is_an_invalid_job() -> None:
    assert issubclass(InvalidModelError, InvalidJobError)
    with pytest.raises(InvalidJobError):
        raise InvalidModelError("bad name", model="a*b", job_id="j")


@pytest.mark.parametrize(("cls", "code", "number"), CODES)
def test_error_for_code_maps_each_code(cls: type[JobError], code: ErrorCode, number: int) -> None:
    error = error_for_code(number, "why", model="m", job_id="j")
    assert type(error) is cls
    assert (error.model, error.job_id, error.message) == ("m", "j", "why")


@pytest.mark.parametrize("number", [0, 12345, 50000, -1])
def test_error_for_unknown_code_is_a_worker_error(number: int) -> None:
    error = error_for_code(number, "strange reply", model="m", job_id="j")
    assert type(error) is WorkerError
    assert error.message == "strange reply"


def test_to_dict() -> None:
    error = OverloadedError("queue holds 100000 jobs", model="llama", job_id="j-7")
    assert error.to_dict() == {
        "code": 42903,
        "error": "OVERLOADED",
        "model": "llama",
        "job_id": "j-7",
        "message": "queue holds 100000 jobs",
    }
