"""modelfleet: run a fleet of LLM model workers behind RabbitMQ.

The public API is what ``__all__`` lists; everything else is private and may change.

>>> async with Client(url="amqp://guest:guest@127.0.0.1/") as client:
...     print(await client.submit("llama", {"prompt": "hello"}, timeout=30))

Without an event loop (scripts, notebooks, WSGI apps), the blocking, thread-safe client:

>>> with SyncClient(url="amqp://guest:guest@127.0.0.1/") as client:
...     print(client.submit("llama", {"prompt": "hello"}, timeout=30))
"""

__version__ = "0.1.0"

from modelfleet.client import Client, JobStream
from modelfleet.config import Settings, load_settings
from modelfleet.errors import (
    BrokerError,
    ConfigError,
    ConnectionLostError,
    ErrorCode,
    ExpiredError,
    InvalidJobError,
    InvalidModelError,
    JobCancelledError,
    JobError,
    JobTimeoutError,
    ModelfleetError,
    NoWorkerError,
    OverloadedError,
    StreamRestartedError,
    WorkerError,
)
from modelfleet.jobs import Final, Job
from modelfleet.sync_client import SyncClient
from modelfleet.worker import Worker

__all__ = [
    "BrokerError",
    "Client",
    "ConfigError",
    "ConnectionLostError",
    "ErrorCode",
    "ExpiredError",
    "Final",
    "InvalidJobError",
    "InvalidModelError",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobStream",
    "JobTimeoutError",
    "ModelfleetError",
    "NoWorkerError",
    "OverloadedError",
    "Settings",
    "StreamRestartedError",
    "SyncClient",
    "Worker",
    "WorkerError",
    "__version__",
    "load_settings",
]
