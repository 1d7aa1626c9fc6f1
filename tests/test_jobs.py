"""Jobs: finished BullMQ jobs past their retention are purged through bullmq; nothing else is."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis
from bullmq import Queue
from conftest import PREFIX, keys_of

from session_gc.errors import StoreUnavailable
from session_gc.full import full_gc
from session_gc.observability import metrics
from session_gc.runtime import Runtime
from session_gc.stores.jobs import JobStore
from session_gc_local import seed

QUEUE = "summarization"
RETENTION_MS = 1000
# Old jobs finish this long before the recent ones: well past the retention, while the
# recent ones stay well inside it for the second or so a test needs.
AGE_GAP_S = 1.2


@dataclass
class Jobs:
    old_finished: set[str]
    recent_finished: set[str]
    waiting: set[str]
    delayed: set[str]


async def job_ids(url: str, *types: str) -> set[str]:
    queue = Queue(QUEUE, {"connection": url, "prefix": "bull"})
    try:
        return {str(job.id) for job in await queue.getJobs(list(types))}
    finally:
        await queue.close()


async def job_counts(url: str) -> dict[str, int]:
    queue = Queue(QUEUE, {"connection": url, "prefix": "bull"})
    try:
        counts = await queue.getJobCounts("completed", "failed", "waiting", "delayed", "active")
        return {name: int(value) for name, value in counts.items()}
    finally:
        await queue.close()


def seed_old_and_recent_jobs(url: str) -> Jobs:
    """8 jobs finished long ago, 3 just now, 4 waiting and 2 delayed."""
    asyncio.run(seed.seed_jobs(url, completed=5, failed=3))
    old = asyncio.run(job_ids(url, "completed", "failed"))
    time.sleep(AGE_GAP_S)
    asyncio.run(seed.seed_jobs(url, completed=2, failed=1, waiting=4, delayed=2))
    return Jobs(
        old_finished=old,
        recent_finished=asyncio.run(job_ids(url, "completed", "failed")) - old,
        waiting=asyncio.run(job_ids(url, "waiting")),
        delayed=asyncio.run(job_ids(url, "delayed")),
    )


def job_hashes_left(valkey: redis.Redis, ids: set[str]) -> set[str]:
    return {i for i in ids if valkey.exists(f"bull:{QUEUE}:{i}")}


def not_bullmq(keys: set[str]) -> set[str]:
    return {k for k in keys if not k.startswith("bull:")}


@pytest.fixture(autouse=True)
def no_metrics_left_behind() -> Iterator[None]:
    # Core calls made without a handler record metrics nobody flushes; drop them.
    yield
    metrics.clear_metrics()


@pytest.mark.parametrize("chunk", [1000, 3], ids=["one-call-a-set", "chunks-of-3"])
def test_purge_removes_exactly_the_finished_jobs_past_retention(
    valkey_url: str, valkey: redis.Redis, chunk: int
) -> None:
    for sid in ("s1", "s2"):
        seed.write_session(valkey, PREFIX, sid, live=sid == "s2")
    seed.write_bystanders(valkey, PREFIX, count=2)
    jobs = seed_old_and_recent_jobs(valkey_url)
    assert (len(jobs.old_finished), len(jobs.recent_finished)) == (8, 3)
    others = not_bullmq(keys_of(valkey))

    removed = JobStore(valkey_url, chunk=chunk).purge_finished(retention_ms=RETENTION_MS)

    assert removed == len(jobs.old_finished)
    assert asyncio.run(job_counts(valkey_url)) == {
        "completed": 2,
        "failed": 1,
        "waiting": 4,
        "delayed": 2,
        "active": 0,
    }
    assert job_hashes_left(valkey, jobs.old_finished) == set()
    survivors = jobs.recent_finished | jobs.waiting | jobs.delayed
    assert job_hashes_left(valkey, survivors) == survivors
    assert not_bullmq(keys_of(valkey)) == others


def test_purge_dry_run_counts_the_same_jobs_and_removes_nothing(
    valkey_url: str, valkey: redis.Redis
) -> None:
    jobs = seed_old_and_recent_jobs(valkey_url)
    keys_before, counts_before = keys_of(valkey), asyncio.run(job_counts(valkey_url))
    store = JobStore(valkey_url)

    would = store.purge_finished(retention_ms=RETENTION_MS, dry_run=True)

    assert would == len(jobs.old_finished)
    assert keys_of(valkey) == keys_before
    assert asyncio.run(job_counts(valkey_url)) == counts_before
    assert store.purge_finished(retention_ms=RETENTION_MS) == would


def test_purge_of_a_queue_that_does_not_exist_removes_nothing_and_creates_no_key(
    valkey_url: str, valkey: redis.Redis
) -> None:
    seed.write_session(valkey, PREFIX, "s1", live=False)
    keys_before = keys_of(valkey)

    removed = JobStore(valkey_url, queue_name="no-such-queue").purge_finished(RETENTION_MS)

    assert removed == 0
    assert keys_of(valkey) == keys_before


def test_purge_with_valkey_unreachable_raises_store_unavailable() -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = JobStore(f"redis://127.0.0.1:{port}/0", connect_timeout_s=1)

    with pytest.raises(StoreUnavailable, match=QUEUE):
        store.purge_finished(RETENTION_MS)


def test_full_gc_reports_the_number_of_jobs_it_purged(
    make_runtime: Callable[..., Runtime], valkey_url: str, valkey: redis.Redis
) -> None:
    jobs = seed_old_and_recent_jobs(valkey_url)
    rt = make_runtime(job_retention_hours=RETENTION_MS / 3_600_000)

    result = full_gc(rt)

    assert result.jobs_purged == len(jobs.old_finished)
    counts = asyncio.run(job_counts(valkey_url))
    assert (counts["completed"], counts["failed"]) == (2, 1)
