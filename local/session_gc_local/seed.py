"""Realistic platform state for the demo, the tests and the benchmark.

A session keeps several keys of different types; a live one also has a heartbeat with a
TTL, as the platform writes it. Channel keys and other prefixes sit beside them and must
survive every run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pg8000.native
import redis

from session_gc.settings import parse_database_url
from session_gc.stores.logs import schema_sql

# Suffixes of one session's keys, by type (what an agent platform keeps per session).
SESSION_PARTS = ("meta", "history", "context", "tools", "events")
HEARTBEAT_TTL_S = 120


def write_session(
    client: redis.Redis,
    prefix: str,
    session_id: str,
    *,
    live: bool,
    tagged: bool = False,
    pipe: Any = None,
) -> list[str]:
    """Write one session's keys (hash, list, set, string, stream); returns the key names."""
    root = f"{prefix}:session:{{{session_id}}}:" if tagged else f"{prefix}:session:{session_id}:"
    p = pipe if pipe is not None else client.pipeline(transaction=False)
    keys = [root + part for part in SESSION_PARTS]
    p.hset(keys[0], mapping={"user": f"user-{session_id}", "model": "gpt-x", "turns": "7"})
    p.rpush(keys[1], "hello", "hi, how can I help?", "summarise this")
    p.set(keys[2], json.dumps({"window": 8192, "sessionId": session_id}))
    p.sadd(keys[3], "search", "code")
    p.xadd(keys[4], {"type": "turn", "n": "1"})
    if live:
        heartbeat = root + "heartbeat"
        p.set(heartbeat, "1", ex=HEARTBEAT_TTL_S)
        keys.append(heartbeat)
    if pipe is None:
        p.execute()
    return keys


def write_bystanders(client: redis.Redis, prefix: str, count: int = 20) -> list[str]:
    """Keys the GC must never touch: channel keys, other prefixes, look-alikes."""
    keys: list[str] = []
    p = client.pipeline(transaction=False)
    for i in range(count):
        for key in (
            f"{prefix}:channel:slack-{i}:cursor",
            f"{prefix}:channel:discord-{i}:state",
            f"other:session:sess-{i}:meta",
            f"{prefix}:sessions:index-{i}",
            f"{prefix}:user:{i}:profile",
        ):
            p.set(key, "keep")
            keys.append(key)
    p.execute()
    return keys


def connect_pg(url: str) -> pg8000.native.Connection:
    """A plain pg8000 connection for seeding and inspecting (not the GC's own store)."""
    target = parse_database_url(url)
    return pg8000.native.Connection(
        user=target.user,
        password=target.password,
        host=target.host or "localhost",
        port=target.port,
        database=target.database,
        unix_sock=target.unix_sock,
    )


def apply_schema(conn: pg8000.native.Connection) -> None:
    conn.run(schema_sql())  # no parameters: the simple protocol runs the whole script


def add_logs(
    conn: pg8000.native.Connection,
    session_id: str,
    *,
    count: int,
    age_hours: float = 1.0,
    tier: str = "hot",
) -> None:
    """Insert ``count`` log rows for a session, created ``age_hours`` ago."""
    created = datetime.now(UTC) - timedelta(hours=age_hours)
    conn.run(
        "INSERT INTO agent_logs (session_id, tier, created_at, message) "
        "SELECT :sid, :tier, CAST(:created AS timestamptz), 'turn ' || g "
        "FROM generate_series(1, :n) AS g",
        sid=session_id,
        tier=tier,
        created=created,
        n=count,
    )


def session_ids(count: int, *, label: str = "sess") -> list[str]:
    """Deterministic, realistic-looking ids (uuid-shaped) so runs are reproducible."""
    out = []
    for i in range(count):
        digest = hashlib.sha1(f"{label}-{i}".encode()).hexdigest()  # noqa: S324 - not security
        out.append(f"{label}-{uuid.UUID(digest[:32])}")
    return out


def sqs_event(bodies: Sequence[str], *, queue: str = "session-gc-collect") -> dict[str, Any]:
    """An SQS event exactly as Lambda delivers it, one record per body."""
    arn = f"arn:aws:sqs:eu-west-1:123456789012:{queue}"
    records = []
    for i, body in enumerate(bodies):
        records.append(
            {
                "messageId": str(uuid.UUID(int=i + 1)),
                "receiptHandle": f"AQEB{i:04d}handle",
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "1764763200000",
                    "SenderId": "AIDAEXAMPLE",
                    "ApproximateFirstReceiveTimestamp": "1764763200001",
                },
                "messageAttributes": {},
                "md5OfBody": hashlib.md5(body.encode()).hexdigest(),  # noqa: S324 - SQS's own
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": "eu-west-1",
            }
        )
    return {"Records": records}


def session_bodies(ids: Iterable[str]) -> list[str]:
    return [json.dumps({"sessionId": sid}) for sid in ids]


async def seed_jobs(
    url: str,
    *,
    queue_name: str = "summarization",
    prefix: str = "bull",
    completed: int = 0,
    failed: int = 0,
    waiting: int = 0,
    delayed: int = 0,
) -> dict[str, int]:
    """Make real BullMQ jobs with the bullmq package: a Worker completes or fails them, the
    way the platform's Node workers would. Returns bullmq's own counts afterwards."""
    from bullmq import Queue, Worker

    queue = Queue(queue_name, {"connection": url, "prefix": prefix})
    try:
        before = await queue.getJobCounts("completed", "failed")
        finished = completed + failed + before["completed"] + before["failed"]
        if completed + failed:
            await queue.addBulk(
                [
                    {"name": "summarize", "data": {"fail": i >= completed, "n": i}}
                    for i in range(completed + failed)
                ]
            )

            async def process(job: Any, token: str) -> str:
                if job.data.get("fail"):
                    raise RuntimeError("model timed out")
                return "summary"

            worker = Worker(
                queue_name,
                process,
                {"connection": url, "prefix": prefix, "concurrency": 20},
            )
            try:
                for _ in range(600):
                    counts = await queue.getJobCounts("completed", "failed")
                    if counts["completed"] + counts["failed"] >= finished:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError("bullmq worker did not finish the seeded jobs in 30 s")
            finally:
                await worker.close()
        if delayed:
            await queue.addBulk(
                [
                    {"name": "summarize", "data": {"n": i}, "opts": {"delay": 3_600_000}}
                    for i in range(delayed)
                ]
            )
        if waiting:
            await queue.addBulk([{"name": "summarize", "data": {"n": i}} for i in range(waiting)])
        counts = await queue.getJobCounts("completed", "failed", "waiting", "delayed", "active")
        return {name: int(value) for name, value in counts.items()}
    finally:
        await queue.close()
