"""Message contracts: what travels over RabbitMQ, as pydantic models.

Every body is JSON with a schema version ``v``. A job's identity lives in AMQP properties as well
(``message_id`` = job id, ``correlation_id`` = job id on replies, routing key = model), so the
broker, the error queue and tools can read them without parsing bodies.

Messages are validated once, at the edge where they enter a process: the controller validates
heartbeats, the worker validates jobs, the client validates replies.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from modelfleet.errors import ErrorCode
from modelfleet.stats import ModelStats

__all__ = [
    "SCHEMA_VERSION",
    "ChunkReply",
    "ErrorReply",
    "Heartbeat",
    "JobCounters",
    "JobRequest",
    "Reply",
    "ResultReply",
    "WorkerState",
    "check_model_name",
    "parse_reply",
]

SCHEMA_VERSION: Literal[1] = 1

# Model names become queue names and routing keys. ASCII only (no look-alikes), no AMQP wildcard
# characters, no leading/trailing or doubled dots; '/' and ':' are allowed for names such as
# "meta-llama/Llama-3.1-8B" or "llama3:8b".
MODEL_NAME_MAX = 100
_MODEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_:/-]|\.(?=[A-Za-z0-9_]))*$")

# Bounds on what a heartbeat may carry, so a hostile or broken one cannot grow the registry.
_MAX_MODELS_PER_WORKER = 64
_SHORT = 256


def check_model_name(name: object) -> str:
    """Return ``name`` if it is an acceptable model name, else raise ``ValueError`` saying why."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}")
    if not name:
        raise ValueError("model name is empty")
    if len(name) > MODEL_NAME_MAX:
        raise ValueError(f"model name is longer than {MODEL_NAME_MAX} characters")
    if not _MODEL_RE.fullmatch(name):  # not match: '$' also matches before a final '\n'
        raise ValueError(
            f"model name {name!r} may hold only ASCII letters, digits and _ - : / "
            "and single dots between them"
        )
    return name


ModelName = Annotated[str, Field(min_length=1, max_length=MODEL_NAME_MAX)]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class WorkerState(StrEnum):
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"


class JobCounters(_Message):
    """Cumulative counts since the worker started (the controller turns them into rates)."""

    ok: int = Field(0, ge=0)
    worker_error: int = Field(0, ge=0)
    invalid: int = Field(0, ge=0)
    expired: int = Field(0, ge=0)
    requeued: int = Field(0, ge=0)
    # Jobs the producer cancelled (modelfleet.cancel): skipped before they started, or stopped.
    cancelled: int = Field(0, ge=0)
    # Jobs that never started, handed back by a republish (their delivery limit untouched).
    handed_back: int = Field(0, ge=0)
    # Replies lost with their delivery's channel: the broker redelivers those jobs.
    reply_lost: int = Field(0, ge=0)
    # Jobs refused because their reply_to is not a direct reply-to address.
    reply_refused: int = Field(0, ge=0)


class Heartbeat(_Message):
    """A worker's state, published to ``{ns}.heartbeats`` every ``heartbeat.interval_s``."""

    v: Literal[1] = SCHEMA_VERSION
    worker_id: str = Field(min_length=1, max_length=_SHORT)
    models: tuple[ModelName, ...] = Field(min_length=1, max_length=_MAX_MODELS_PER_WORKER)
    concurrency: int = Field(ge=1, le=100_000)
    in_flight: int = Field(0, ge=0, le=100_000)
    # Age of the oldest running job: a hung handler shows here even while heartbeats flow.
    oldest_job_age_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    stuck_jobs: int = Field(0, ge=0, le=100_000)  # exported as a float: bounded
    state: WorkerState = WorkerState.READY
    speed: float = Field(1.0, gt=0, allow_inf_nan=False)
    host: str = Field("", max_length=_SHORT)
    pid: int = Field(0, ge=0)
    version: str = Field("", max_length=64)
    # Wall-clock send time, for lag metrics only; liveness uses the controller's own clock.
    sent_at: float = Field(allow_inf_nan=False)
    interval_s: float = Field(gt=0, allow_inf_nan=False)
    seq: int = Field(0, ge=0)
    # Wall-clock start time of this worker process (epoch seconds): a worker restarted with the
    # same worker_id starts its seq at 1 again, and (started_at, seq) orders its heartbeats.
    started_at: float = Field(0.0, ge=0, allow_inf_nan=False)
    counters: JobCounters = JobCounters()
    # Cumulative per-model job figures (see modelfleet.stats); the controller sums the fleet's.
    stats: dict[str, ModelStats] = Field(default_factory=dict)
    # Why a `stopping` worker stops: "shutdown" (SIGTERM) or "stuck" (worker.stuck_exit_s).
    stop_reason: Literal["shutdown", "stuck"] | None = None

    @field_validator("models")
    @classmethod
    def _valid_models(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        for name in models:
            check_model_name(name)
        if len(set(models)) != len(models):
            raise ValueError("models are listed twice")
        return models

    @model_validator(mode="after")
    def _stats_for_own_models(self) -> Heartbeat:
        if not set(self.stats) <= set(self.models):
            raise ValueError("stats name a model the worker does not serve")
        return self


class JobRequest(_Message):
    """Body of a job on ``{ns}.jobs``; the routing key is the model."""

    v: Literal[1] = SCHEMA_VERSION
    model: ModelName
    payload: Any = None
    # Wall-clock deadline (epoch seconds); a worker never starts a job past it.
    deadline: float | None = Field(None, allow_inf_nan=False)
    stream: bool = False
    # Wall-clock publish time (epoch seconds), for the queue-wait and first-chunk histograms.
    sent_at: float | None = Field(None, allow_inf_nan=False)

    @field_validator("model")
    @classmethod
    def _valid_model(cls, model: str) -> str:
        return check_model_name(model)


class ResultReply(_Message):
    """The final answer of a job."""

    kind: Literal["result"] = "result"
    v: Literal[1] = SCHEMA_VERSION
    result: Any = None
    worker_id: str = ""
    duration_s: float = 0.0
    chunks: int = 0
    # The delivery (attempt) that produced this answer; see ChunkReply.attempt_id.
    attempt_id: str = Field("", max_length=64)


class ChunkReply(_Message):
    """One piece of a streamed answer; ``seq`` starts at 0 and lets the client drop repeats
    when a job is redelivered after its worker died mid-stream."""

    kind: Literal["chunk"] = "chunk"
    v: Literal[1] = SCHEMA_VERSION
    seq: int = Field(ge=0)
    data: Any = None
    # A token the worker draws for each delivery of the job: a job redelivered after its worker
    # died starts again at seq 0 under a new token, so the client never splices two attempts.
    attempt_id: str = Field("", max_length=64)


class ErrorReply(_Message):
    """A job failed; ``code`` is an :class:`~modelfleet.errors.ErrorCode` number."""

    kind: Literal["error"] = "error"
    v: Literal[1] = SCHEMA_VERSION
    code: int
    error: str
    message: str
    model: str
    job_id: str

    @classmethod
    def build(cls, code: ErrorCode, message: str, *, model: str, job_id: str) -> ErrorReply:
        return cls(code=int(code), error=code.name, message=message, model=model, job_id=job_id)

    @field_validator("message")
    @classmethod
    def _bounded(cls, message: str) -> str:
        return message if len(message) <= 4096 else message[:4093] + "..."


Reply = Annotated[ResultReply | ChunkReply | ErrorReply, Field(discriminator="kind")]
_REPLY_ADAPTER: TypeAdapter[ResultReply | ChunkReply | ErrorReply] = TypeAdapter(Reply)


def parse_reply(body: bytes) -> ResultReply | ChunkReply | ErrorReply:
    """Parse a reply body (raises ``pydantic.ValidationError`` on anything else)."""
    return _REPLY_ADAPTER.validate_json(body)


def finite(value: float) -> float:
    """Clamp NaN/inf to 0 for figures computed from untrusted input."""
    return value if math.isfinite(value) else 0.0
