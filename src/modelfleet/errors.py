"""Errors a modelfleet user can see, and the numeric codes they travel with.

The hierarchy::

    ModelfleetError
    ├── ConfigError            bad settings; raised at start, one line naming the key
    ├── BrokerError            the broker could not be reached or refused an operation
    └── JobError               one job failed; carries .code, .model, .job_id
        ├── NoWorkerError      50005  no live worker serves the model
        ├── JobTimeoutError    50006  no answer before the producer's deadline
        ├── WorkerError        50001  the handler raised
        ├── OverloadedError    42903  the model's queue is full
        ├── ExpiredError       50007  the job's deadline passed while it waited
        ├── ConnectionLostError 50008 the broker connection dropped before the answer came
        ├── StreamRestartedError 50009 a stream's job restarted on another worker after
        │                      chunks were already received (they cannot be taken back)
        ├── JobCancelledError  49900  the producer cancelled the job (Client.cancel)
        └── InvalidJobError    40001  the job could not be understood
            └── InvalidModelError 40301  the model name is not acceptable

Codes are FastChat's ``ErrorCode`` numbers where FastChat has one, so clients that map
FastChat's codes keep working. Every message names the model, the job id and the cause.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "BrokerError",
    "ConfigError",
    "ConnectionLostError",
    "ErrorCode",
    "ExpiredError",
    "InvalidJobError",
    "InvalidModelError",
    "JobCancelledError",
    "JobError",
    "JobTimeoutError",
    "ModelfleetError",
    "NoWorkerError",
    "OverloadedError",
    "StreamRestartedError",
    "WorkerError",
    "error_for_code",
]


class ErrorCode(IntEnum):
    INVALID_JOB = 40001  # FastChat VALIDATION_TYPE_ERROR
    INVALID_MODEL = 40301
    OVERLOADED = 42903  # FastChat ENGINE_OVERLOADED
    WORKER_ERROR = 50001  # FastChat INTERNAL_ERROR
    NO_WORKER = 50005  # FastChat CONTROLLER_NO_WORKER
    WORKER_TIMEOUT = 50006  # FastChat CONTROLLER_WORKER_TIMEOUT
    EXPIRED = 50007  # modelfleet: deadline passed in the queue (FastChat has no such state)
    CONNECTION_LOST = 50008  # modelfleet: the reply path died with the producer's connection
    # modelfleet: a streamed job restarted on another worker (its first worker died) after the
    # caller had received chunks of the first attempt; the chunks cannot be spliced.
    STREAM_RESTARTED = 50009
    CANCELLED = 49900  # modelfleet: the producer cancelled the job (like nginx's 499)


class ModelfleetError(Exception):
    """Base of every error modelfleet raises on purpose."""


class ConfigError(ModelfleetError):
    """A setting is missing or invalid; the message is one line naming the key."""


class BrokerError(ModelfleetError):
    """RabbitMQ could not be reached, or refused what we asked."""


class JobError(ModelfleetError):
    """A job failed. ``code``, ``model`` and ``job_id`` say which and why."""

    code: ErrorCode = ErrorCode.WORKER_ERROR

    def __init__(self, message: str, *, model: str, job_id: str) -> None:
        self.model = model
        self.job_id = job_id
        self.message = message
        super().__init__(
            f"[{int(self.code)} {self.code.name}] model={model!r} job={job_id}: {message}"
        )

    def to_dict(self) -> dict[str, object]:
        """The JSON shape the CLI prints and the gateway will return."""
        return {
            "code": int(self.code),
            "error": self.code.name,
            "model": self.model,
            "job_id": self.job_id,
            "message": self.message,
        }


class NoWorkerError(JobError):
    code = ErrorCode.NO_WORKER


class JobTimeoutError(JobError):
    code = ErrorCode.WORKER_TIMEOUT


class WorkerError(JobError):
    code = ErrorCode.WORKER_ERROR


class OverloadedError(JobError):
    code = ErrorCode.OVERLOADED


class ExpiredError(JobError):
    code = ErrorCode.EXPIRED


class ConnectionLostError(JobError):
    """The producer's connection to RabbitMQ dropped while it waited: the answer cannot arrive
    (direct reply-to is tied to the channel). The job may still run; retry if it is idempotent."""

    code = ErrorCode.CONNECTION_LOST


class StreamRestartedError(JobError):
    """A streamed job was redelivered to another worker (the first one died or lost its
    connection) after chunks of the first attempt had reached the caller. The new attempt may
    produce a different text, so modelfleet never splices the two: the stream ends with this
    error and the new attempt is cancelled. Retry the job if you want a whole answer."""

    code = ErrorCode.STREAM_RESTARTED


class JobCancelledError(JobError):
    """The producer cancelled the job (:meth:`Client.cancel`) before its answer came."""

    code = ErrorCode.CANCELLED


class InvalidJobError(JobError):
    code = ErrorCode.INVALID_JOB


class InvalidModelError(InvalidJobError):
    code = ErrorCode.INVALID_MODEL


_BY_CODE: dict[int, type[JobError]] = {
    cls.code: cls
    for cls in (
        NoWorkerError,
        JobTimeoutError,
        WorkerError,
        OverloadedError,
        ExpiredError,
        ConnectionLostError,
        StreamRestartedError,
        JobCancelledError,
        InvalidJobError,
        InvalidModelError,
    )
}


def error_for_code(code: int, message: str, *, model: str, job_id: str) -> JobError:
    """Build the exception named for ``code`` (unknown codes become :class:`WorkerError`)."""
    cls = _BY_CODE.get(code, WorkerError)
    return cls(message, model=model, job_id=job_id)
