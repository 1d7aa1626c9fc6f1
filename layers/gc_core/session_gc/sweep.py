"""sweep: find sessions that died without being collected, and collect them, safely.

Two phases, a grace period apart. A session seen with keys but no heartbeat becomes a
candidate, stamped with the time it was first seen (in a hash outside the session
namespace). Only a later sweep, at least the grace period on, that still finds it without
a heartbeat collects it; the heartbeat is checked again for each page of deletions, one
round trip before its UNLINK. Liveness is judged by the heartbeat key alone: OBJECT
IDLETIME is shared by small integers and unavailable under LFU eviction, so it is never
consulted.

Blast-radius guards stop a sweep that would collect too large a share of what it saw, or
that sees session keys but no heartbeat at all (a platform whose heartbeats broke looks
exactly like one whose sessions all died).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit

from session_gc.collect import collect_sessions
from session_gc.observability import logger, metrics
from session_gc.results import SweepResult
from session_gc.runs import Cursors, Deadline, exclusive
from session_gc.runtime import Runtime
from session_gc.stores.valkey import key_text, translate_errors

OVERRIDE_BLAST_RADIUS = "blast-radius"
# SendMessageBatch takes at most 10 entries; a failed entry is retried this many times.
SQS_BATCH = 10
SQS_ATTEMPTS = 3


def sweep(
    rt: Runtime,
    *,
    dry_run: bool = False,
    override: str | None = None,
    deadline: Deadline | None = None,
) -> SweepResult:
    deadline = deadline or Deadline()
    started = time.monotonic()
    result = SweepResult(dry_run=dry_run)
    with exclusive(rt) as held:
        if not held:
            logger.warning("sweep skipped: another sweep or full gc holds the lock")
            result.stopped = "locked"
            return result
        _sweep(rt, result, dry_run=dry_run, override=override, deadline=deadline)
        # Finished jobs age out by time alone, whatever the guards said about sessions.
        _purge_jobs(rt, result, dry_run=dry_run, deadline=deadline)
    result.duration_ms = int((time.monotonic() - started) * 1000)
    logger.info(
        "sweep finished",
        orphaned_sessions=result.orphaned_sessions,
        sessions_seen=result.sessions_seen,
        live_sessions=result.live_sessions,
        new_candidates=len(result.new_candidates),
        due=len(result.due),
        enqueued=result.enqueued,
        complete=result.complete,
        stopped=result.stopped,
        dry_run=dry_run,
        duration_ms=result.duration_ms,
    )
    return result


def _sweep(
    rt: Runtime, result: SweepResult, *, dry_run: bool, override: str | None, deadline: Deadline
) -> None:
    now = rt.clock()
    dead, live, whole_keyspace = _observe(rt, result, dry_run=dry_run, deadline=deadline)

    first_seen = _load_candidates(rt)
    grace = rt.settings.sweep_grace_seconds
    due = {sid for sid in dead if sid in first_seen and now - first_seen[sid] >= grace}
    new = dead - first_seen.keys()
    # Entries whose session has no keys left are dropped, so the list cannot grow without
    # bound; only a pass over the whole keyspace can tell that a session is gone.
    # NOTE: a pass split over several invocations (resumed from a cursor) prunes nothing,
    # so a keyspace too large for one invocation keeps its stale entries until one fits.
    gone = set()
    if whole_keyspace and result.complete:
        gone = first_seen.keys() - dead - live
    result.new_candidates = sorted(new)
    result.waiting_candidates = len((dead & first_seen.keys()) - due)
    result.due = sorted(due)
    result.kept_live = sorted(live)
    if not dry_run:
        _update_candidates(rt, add=new, now=now, drop=(live & first_seen.keys()) | gone)

    # NOTE: a pass resumed from a cursor judges the guards on the part of the keyspace this
    # invocation saw; a part holding no live session trips the "no heartbeat" guard.
    stop = _blast_radius(due, dead, live, rt.settings.sweep_max_collect_ratio)
    if stop and override == OVERRIDE_BLAST_RADIUS:
        logger.warning("sweep blast-radius guard overridden by the invoke", reason=stop)
        stop = None
    if not dry_run:
        metrics.add_metric("SweepBlastRadiusStop", MetricUnit.Count, 1 if stop else 0)
    if stop:
        result.stopped = f"blast-radius: {stop}"
        logger.error(
            "sweep deleted nothing: blast-radius guard",
            reason=stop,
            check=(
                "Are the platform's heartbeats being written (KEY_PREFIX right, heartbeat TTL "
                "refreshed)? If this many sessions really are dead, invoke the sweep once "
                f'with {{"override": "{OVERRIDE_BLAST_RADIUS}"}}.'
            ),
        )
        return
    result.orphaned_sessions = len(due)
    if due and not dry_run:
        _collect_due(rt, result, sorted(due), now)


def _observe(
    rt: Runtime, result: SweepResult, *, dry_run: bool, deadline: Deadline
) -> tuple[set[str], set[str], bool]:
    """Phase one: which sessions have keys and no heartbeat, and which are live."""
    cursors = Cursors(rt, "sweep")
    positions: dict[str, int] = {} if dry_run else dict(cursors.load().get("valkey", {}))
    whole_keyspace = not positions
    logger.info("sweep observe started", resume=not whole_keyspace, dry_run=dry_run)
    dead: set[str] = set()
    live: set[str] = set()
    for page in rt.valkey.pages(dry_run=True, spare_live=True, start=dict(positions)):
        dead |= page.removed.keys()
        live |= page.live
        positions[page.node] = page.cursor if page.cursor else -1
        if page.cursor and deadline.passed():
            result.complete = False
            break
    # A heartbeat seen on any page wins over a page that saw none.
    dead -= live
    if result.complete and rt.temp is not None:
        _observe_temp(rt, dead, live)
    result.sessions_seen = len(dead | live)
    result.live_sessions = len(live)
    logger.info("sweep observe finished", dead=len(dead), live=len(live), complete=result.complete)
    if not dry_run:
        if result.complete:
            cursors.clear()
        else:
            cursors.save({"valkey": positions})
    return dead, live, whole_keyspace


def _observe_temp(rt: Runtime, dead: set[str], live: set[str]) -> None:
    """Temp folders of sessions with no keys left are orphans too: they join the same
    two-phase candidate list, judged by the same heartbeat."""
    assert rt.temp is not None
    unseen = [sid for sid in rt.temp.session_ids() if sid not in dead and sid not in live]
    alive = rt.valkey.live_sessions(unseen)
    live |= alive
    dead.update(sid for sid in unseen if sid not in alive)
    logger.info("sweep observed temp folders", orphan_folders=len(unseen))


def _purge_jobs(rt: Runtime, result: SweepResult, *, dry_run: bool, deadline: Deadline) -> None:
    result.jobs_purged = rt.jobs.purge_finished(
        rt.settings.job_retention_ms, dry_run=dry_run, stop=deadline.passed
    )
    if not dry_run:
        metrics.add_metric("JobsPurged", MetricUnit.Count, result.jobs_purged)
    logger.info("sweep jobs purged", jobs=result.jobs_purged, dry_run=dry_run)


def _collect_due(rt: Runtime, result: SweepResult, due: list[str], now: float) -> None:
    """Phase two: hand due sessions to the collect queue, or collect them right here."""
    if rt.settings.collect_queue_url:
        result.enqueued = _enqueue(rt, due)
        return
    collected = collect_sessions(rt, due)
    result.total_cleaned = list(collected.values())
    # One found live here came back to life: it leaves the list too, so that if it dies again
    # it waits a whole grace period from then. Only a session that failed stays, for a retry.
    settled = [sid for sid, r in collected.items() if not r.error]
    _update_candidates(rt, add=(), now=now, drop=settled)


def _blast_radius(due: set[str], dead: set[str], live: set[str], ratio: float) -> str | None:
    seen = len(dead | live)
    if seen and not live:
        return f"saw {seen} sessions and not one heartbeat"
    if due and len(due) > ratio * seen:
        return (
            f"would collect {len(due)} of {seen} sessions seen "
            f"({len(due) / seen:.0%}), above the {ratio:.0%} limit"
        )
    return None


def _load_candidates(rt: Runtime) -> dict[str, float]:
    with translate_errors("read sweep candidates"):
        raw = rt.valkey.client.hgetall(rt.keys.gc_key("candidates"))
    first_seen: dict[str, float] = {}
    for key, value in raw.items():
        try:
            first_seen[key_text(key)] = float(value)
        except ValueError:
            continue  # unreadable entry: treated as not yet seen, re-stamped on this sweep
    return first_seen


def _update_candidates(rt: Runtime, *, add: Iterable[str], now: float, drop: Iterable[str]) -> None:
    key = rt.keys.gc_key("candidates")
    add, drop = list(add), list(drop)
    with translate_errors("update sweep candidates"):
        pipe = rt.valkey.client.pipeline(transaction=False)
        for i in range(0, len(add), 1000):
            # HSETNX keeps the earliest stamp if two sweeps ever raced past the lock.
            for sid in add[i : i + 1000]:
                pipe.hsetnx(key, sid, repr(now))
        for i in range(0, len(drop), 1000):
            pipe.hdel(key, *drop[i : i + 1000])
        pipe.execute()


def _enqueue(rt: Runtime, session_ids: list[str]) -> int:
    """Send each session to the collect queue (fan-out); returns how many were accepted."""
    sent = 0
    failed: list[tuple[str, str]] = []
    for i in range(0, len(session_ids), SQS_BATCH):
        entries = {
            f"m{n}": {"Id": f"m{n}", "MessageBody": _body(sid)}
            for n, sid in enumerate(session_ids[i : i + SQS_BATCH])
        }
        for attempt in range(1, SQS_ATTEMPTS + 1):
            reply: dict[str, Any] = rt.sqs.send_message_batch(
                QueueUrl=rt.settings.collect_queue_url, Entries=list(entries.values())
            )
            for ok in reply.get("Successful", []):
                entries.pop(ok["Id"], None)
                sent += 1
            errors = reply.get("Failed", [])
            # A sender fault (bad message) will fail again; only the rest is worth a retry.
            retryable = {e["Id"] for e in errors if not e.get("SenderFault")}
            for e in errors:
                if e["Id"] not in retryable or attempt == SQS_ATTEMPTS:
                    failed.append((entries.pop(e["Id"])["MessageBody"], e.get("Code", "?")))
            if not entries:
                break
    if failed:
        metrics.add_metric("EnqueueFailures", MetricUnit.Count, len(failed))
        logger.error("sessions not enqueued for collect", count=len(failed), first=failed[:5])
    metrics.add_metric("SessionsEnqueued", MetricUnit.Count, sent)
    logger.info("sweep enqueued sessions", sent=sent, failed=len(failed))
    return sent


def _body(session_id: str) -> str:
    return json.dumps({"sessionId": session_id})
