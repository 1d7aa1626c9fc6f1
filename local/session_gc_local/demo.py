"""`make demo`: the three real handlers against embedded Valkey and PostgreSQL.

Seeds a platform's worth of state (live sessions, ended ones, orphans, channel keys, hot
and warm logs, BullMQ jobs, temp folders), then plays a short story: an SQS batch of ended
sessions is collected, a scheduled sweep marks orphans, one orphan comes back to life,
some live sessions die, a second sweep collects the orphans that stayed dead, and a full
GC (dry run first) collects the rest. Prints every result and a before/after table.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pg8000.native
import redis

from session_gc.ids import KeySpace
from session_gc.observability import logger
from session_gc_local import seed
from session_gc_local.invoke import REPO_ROOT, LambdaContext, load_handler
from session_gc_local.servers import local_servers

PREFIX = "mosaic"
KEYS = KeySpace(PREFIX)
GRACE_S = 2  # the sweep's grace period, shortened from an hour so the story fits a minute
JOB_RETENTION_S = 2  # likewise for finished jobs (7 days in production)


@dataclass
class Cast:
    """Which seeded session plays which part."""

    live: list[str]
    ended: list[str]  # their SQS "session ended" messages arrive in the first step
    orphans: list[str]  # died without a message: the sweep's business
    revived: str  # an orphan whose heartbeat comes back between the two sweeps
    dying: list[str]  # live at first, their heartbeat lapses before the second sweep


def run_demo() -> int:
    # The story is told by the results; logs show only what needs attention.
    logger.setLevel("WARNING")
    with tempfile.TemporaryDirectory(prefix="session-gc-demo-") as tmp:
        work = Path(tmp)
        print("starting embedded Valkey and PostgreSQL ...")
        with local_servers(work / "servers") as (valkey_server, pg_server):
            _configure_env(valkey_server.url, pg_server.url, work / "temp")
            client = redis.Redis.from_url(valkey_server.url)
            conn = seed.connect_pg(pg_server.url)
            try:
                cast = _seed(client, conn, valkey_server.url, work / "temp")
                before = _snapshot(client, conn, valkey_server.url, work / "temp", cast)
                _story(client, valkey_server.url, cast)
                after = _snapshot(client, conn, valkey_server.url, work / "temp", cast)
                _print_table(before, after)
                failures = _check(after, cast)
            finally:
                conn.close()
                client.close()
        print("servers stopped")
    if failures:
        print("demo: something survived that should not have, or vice versa:")
        for line in failures:
            print(f"  - {line}")
        return 1
    print("demo: every ended or dead session was collected; live sessions, channel keys and")
    print("other prefixes are intact.")
    return 0


def _configure_env(valkey_url: str, database_url: str, temp_dir: Path) -> None:
    os.environ.update(
        {
            "VALKEY_URL": valkey_url,
            "DATABASE_URL": database_url,
            "KEY_PREFIX": PREFIX,
            "TEMP_STORE_URL": f"file://{temp_dir}",
            "SWEEP_GRACE_SECONDS": str(GRACE_S),
            "JOB_RETENTION_HOURS": str(JOB_RETENTION_S / 3600),
            # Keep the story readable: warnings and errors only, no EMF blobs, no X-Ray.
            "POWERTOOLS_LOG_LEVEL": "WARNING",
            "POWERTOOLS_METRICS_DISABLED": "true",
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_METRICS_NAMESPACE": "SessionGC",
        }
    )
    for name in ("COLLECT_QUEUE_URL", "DATABASE_SECRET_ARN", "DRY_RUN"):
        os.environ.pop(name, None)


def _seed(client: redis.Redis, conn: pg8000.native.Connection, url: str, temp: Path) -> Cast:
    ids = seed.session_ids(300, label="sess")
    cast = Cast(
        live=ids[:220], ended=ids[220:250], orphans=ids[250:300], revived=ids[260], dying=[]
    )
    cast.dying = cast.live[:12]
    pipe = client.pipeline(transaction=False)
    for i, sid in enumerate(ids):
        # Every tenth session uses a hash tag, as a cluster-mode platform writes them.
        seed.write_session(
            client, PREFIX, sid, live=sid in cast.live, tagged=i % 10 == 3, pipe=pipe
        )
    pipe.execute()
    seed.write_bystanders(client, PREFIX, count=20)
    seed.apply_schema(conn)
    for sid in ids:
        seed.add_logs(conn, sid, count=8, age_hours=2)
        seed.add_logs(conn, sid, count=4, age_hours=30)
        seed.add_logs(conn, sid, count=3, age_hours=60, tier="warm")
    for sid in ids:
        folder = temp / sid / "uploads"
        folder.mkdir(parents=True)
        for name in ("draft.md", "scratch.json"):
            (temp / sid / name).write_text("temp\n")
        (folder / "image.png").write_bytes(b"\x89PNG")
    asyncio.run(seed.seed_jobs(url, completed=40, failed=10, delayed=5))
    print(
        f"seeded {len(cast.live)} live sessions, {len(cast.ended)} ended, "
        f"{len(cast.orphans)} orphaned; channel keys; {len(ids) * 15} log rows; "
        "55 jobs; temp folders"
    )
    return cast


def _story(client: redis.Redis, url: str, cast: Cast) -> None:
    handlers = {name: load_handler(name) for name in ("collect", "sweep", "full_gc")}

    def invoke(name: str, event: Any, title: str) -> dict[str, Any]:
        print(f"\n== {title}")
        result: dict[str, Any] = handlers[name].lambda_handler(
            event, LambdaContext(function_name=name)
        )
        print(_shorten(result))
        return result

    bodies = [*seed.session_bodies(cast.ended), "not-json", '{"sessionId": "*"}']
    invoke(
        "collect",
        seed.sqs_event(bodies),
        "collect: SQS batch of 30 ended sessions, 2 bad messages",
    )

    scheduled = json.loads((REPO_ROOT / "events" / "sweep.json").read_text())
    invoke("sweep", scheduled, "sweep #1 (scheduled): orphans become candidates")

    print(f"\n.. meanwhile {cast.revived} comes back (heartbeat written) and")
    print(
        f"   {len(cast.dying)} live sessions die (their heartbeats lapse); waiting {GRACE_S}s grace"
    )
    _revive(client, cast.revived)
    for sid in cast.dying:
        client.delete(*KEYS.heartbeat_keys(sid))
    time.sleep(GRACE_S + 0.5)

    invoke("sweep", scheduled, "sweep #2 (scheduled): candidates still dead after the grace go")

    print("\n.. workers finish 5 more summarization jobs (recent: kept) and 8 wait in line")
    asyncio.run(seed.seed_jobs(url, completed=5, waiting=8))

    invoke("full_gc", {"dryRun": True, "force": False}, "full GC, dry run: what would go")
    invoke("full_gc", {}, "full GC: collect everything no live session owns")


def _revive(client: redis.Redis, sid: str) -> None:
    plain, _tagged = KEYS.heartbeat_keys(sid)
    client.set(plain, "1", ex=seed.HEARTBEAT_TTL_S)


def _shorten(result: dict[str, Any]) -> str:
    shown = dict(result)
    items = shown.get("totalCleaned")
    if isinstance(items, list) and len(items) > 3:
        shown["totalCleaned"] = [*items[:3], f"... {len(items) - 3} more"]
    return json.dumps(shown, indent=2)


Snapshot = dict[str, int]


def _snapshot(
    client: redis.Redis, conn: pg8000.native.Connection, url: str, temp: Path, cast: Cast
) -> Snapshot:
    counts: dict[str, int] = {}
    still_live = set(cast.live) - set(cast.dying) | {cast.revived}
    gone = set(cast.ended) | set(cast.orphans) | set(cast.dying)
    gone.discard(cast.revived)

    def count(label: str, match: Callable[[str], bool]) -> None:
        counts[label] = counts.get(label, 0) + sum(1 for k in keys if match(k))

    keys = [k.decode() for k in client.scan_iter(count=1000)]
    count("valkey: keys of sessions that stay live", lambda k: KEYS.session_of(k) in still_live)
    count("valkey: keys of ended/dead sessions", lambda k: KEYS.session_of(k) in gone)
    count("valkey: channel keys", lambda k: k.startswith(f"{PREFIX}:channel:"))
    count(
        "valkey: other prefixes",
        lambda k: (
            not k.startswith(f"{PREFIX}:session:")
            and not k.startswith(f"{PREFIX}:channel:")
            and not k.startswith("bull:")
            and not k.startswith(f"{PREFIX}:gc:")
        ),
    )
    for tier in ("hot", "warm"):
        counts[f"postgres: {tier} log rows"] = int(
            conn.run("SELECT count(*) FROM agent_logs WHERE tier = :t", t=tier)[0][0]
        )
    jobs = asyncio.run(_job_counts(url))
    for state in ("completed", "failed", "waiting", "delayed"):
        counts[f"bullmq: {state} jobs"] = jobs.get(state, 0)
    folders = {p.name for p in temp.iterdir()} if temp.exists() else set()
    counts["temp: folders of live sessions"] = len(folders & still_live)
    counts["temp: folders of ended/dead sessions"] = len(folders & gone)
    return counts


async def _job_counts(url: str) -> dict[str, int]:
    from bullmq import Queue

    queue = Queue("summarization", {"connection": url})
    try:
        counts = await queue.getJobCounts("completed", "failed", "waiting", "delayed")
        return {k: int(v) for k, v in counts.items()}
    finally:
        await queue.close()


def _print_table(before: Snapshot, after: Snapshot) -> None:
    print("\n== before / after")
    width = max(len(label) for label in before)
    print(f"{'':{width}}  {'before':>8}  {'after':>8}")
    for label, value in before.items():
        print(f"{label:{width}}  {value:>8}  {after[label]:>8}")


def _check(after: Snapshot, cast: Cast) -> list[str]:
    problems = []
    if after["valkey: keys of ended/dead sessions"]:
        problems.append("keys of ended or dead sessions remain")
    if after["temp: folders of ended/dead sessions"]:
        problems.append("temp folders of ended or dead sessions remain")
    if after["valkey: channel keys"] != 40 or after["valkey: other prefixes"] != 60:
        problems.append("channel keys or other prefixes were touched")
    live_keys = (len(cast.live) - len(cast.dying)) * 6 + 6
    if after["valkey: keys of sessions that stay live"] != live_keys:
        problems.append("keys of live sessions were touched")
    if after["bullmq: waiting jobs"] != 8 or after["bullmq: delayed jobs"] != 5:
        problems.append("waiting or delayed jobs were touched")
    if after["bullmq: completed jobs"] != 5 or after["bullmq: failed jobs"]:
        problems.append("finished jobs past retention remain, or recent ones went")
    return problems
