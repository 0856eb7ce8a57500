"""The soak's own judgements, without a broker: a stream is spliced when its chunks and result
come from two executions; executions are counted per key and per worker process."""

from __future__ import annotations

from pathlib import Path

from tests.chaos.handlers import STREAM_CHUNKS
from tests.chaos.soak import deaths_between, executed_runs, judge_stream


def _chunks(key: str, nonce: str, indexes: range) -> list[dict[str, object]]:
    return [{"k": key, "i": i, "n": nonce} for i in indexes]


def test_a_stream_from_one_execution_is_ok() -> None:
    chunks = _chunks("s1", "a", range(STREAM_CHUNKS))
    assert judge_stream("s1", chunks, {"k": "s1", "n": "a", "chunks": STREAM_CHUNKS}) == "ok"


def test_chunks_of_two_executions_are_a_splice() -> None:
    # What a client that drops repeated seqs of a redelivered stream hands its caller: the first
    # chunks of attempt 1, then the rest and the result of attempt 2.
    chunks = _chunks("s1", "a", range(2)) + _chunks("s1", "b", range(2, STREAM_CHUNKS))
    assert judge_stream("s1", chunks, {"k": "s1", "n": "b", "chunks": STREAM_CHUNKS}) == "SPLICED"


def test_a_result_from_another_execution_than_the_chunks_is_a_splice() -> None:
    chunks = _chunks("s1", "a", range(STREAM_CHUNKS))
    assert judge_stream("s1", chunks, {"k": "s1", "n": "b", "chunks": STREAM_CHUNKS}) == "SPLICED"


def test_a_missing_or_repeated_chunk_is_a_wrong_answer() -> None:
    result = {"k": "s1", "n": "a", "chunks": STREAM_CHUNKS}
    missing = _chunks("s1", "a", range(1, STREAM_CHUNKS))
    repeated = _chunks("s1", "a", range(STREAM_CHUNKS)) + _chunks("s1", "a", range(1))
    assert judge_stream("s1", missing, result) == "wrong"
    assert judge_stream("s1", repeated, result) == "wrong"


def test_executions_are_counted_per_key_and_process(tmp_path: Path) -> None:
    (tmp_path / "executed-101.log").write_text("j1\ns2\nend s2\n")
    (tmp_path / "executed-202.log").write_text("j1\n")
    runs = executed_runs(tmp_path)
    assert sorted(runs["j1"]) == [101, 202]
    assert runs["s2"] == [101]
    assert "end s2" not in runs


def test_deaths_between_counts_distinct_moments_within_a_jobs_life() -> None:
    # Three workers killed at once are one moment: one job is held by one worker at a time.
    deaths = [10.0, 10.1, 10.2, 20.0, 30.0, 45.0]
    assert deaths_between(deaths, 9.0, 31.0) == 3
    assert deaths_between(deaths, 10.5, 31.0) == 2
    assert deaths_between(deaths, 31.0, 40.0) == 0
    assert deaths_between([], 0.0, 100.0) == 0
