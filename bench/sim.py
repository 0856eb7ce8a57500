"""A simulated fleet: heartbeat bodies of many worker identities, as real workers encode them.

Each simulated worker serves one model and has done some jobs, so its heartbeat carries the same
per-model statistics (three histograms) a real worker's does; the body is
``Heartbeat.model_dump_json()``, exactly what :meth:`modelfleet.worker.Worker._send_heartbeat`
publishes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from modelfleet import __version__
from modelfleet.messages import Heartbeat, JobCounters
from modelfleet.stats import Outcome, WorkerStats

__all__ = ["SimulatedFleet"]


class SimulatedFleet:
    """``workers`` identities spread round-robin over ``models`` model names.

    Nothing per worker is kept: each heartbeat is built when asked for, so a process holding a
    simulated fleet of 10,000 is not itself 10,000 workers heavier.
    """

    def __init__(self, workers: int, models: int, *, prefix: str = "sim") -> None:
        self.workers = workers
        self.prefix = prefix
        self.model_names = [f"{prefix}-model-{i:04d}" for i in range(models)]

    def worker_id(self, index: int) -> str:
        return f"{self.prefix}-host-{index // 8:04d}-{index:05d}"

    def heartbeat(self, index: int, seq: int) -> Heartbeat:
        """Worker ``index``'s heartbeat number ``seq``."""
        model = self.model_names[index % len(self.model_names)]
        stats = WorkerStats((model,))
        for j in range(1 + index % 7):  # a few jobs each, so histograms are not all zero
            stats.job_started(model, 0.001 * j)
            stats.job_done(model, Outcome.OK, 0.01 * (j + 1))
        return Heartbeat(
            worker_id=self.worker_id(index),
            models=(model,),
            concurrency=4,
            in_flight=index % 4,
            oldest_job_age_s=0.5,
            host=f"{self.prefix}-host-{index // 8:04d}",
            pid=10_000 + index,
            version=__version__,
            sent_at=time.time(),
            interval_s=2.0,
            seq=seq,
            counters=JobCounters(ok=1 + index % 7),
            stats=stats.snapshot(),
        )

    def body(self, index: int, seq: int) -> bytes:
        """The same, encoded as a worker publishes it."""
        return self.heartbeat(index, seq).model_dump_json().encode()

    def bodies(self, indexes: range, beats: int) -> Iterator[tuple[int, int, bytes]]:
        """``beats`` rounds over the workers in ``indexes``: round 1 (seq 1) introduces every
        worker, the rest are the steady state. Yields (index, seq, body) in sending order."""
        for seq in range(1, beats + 1):
            for index in indexes:
                yield index, seq, self.body(index, seq)
