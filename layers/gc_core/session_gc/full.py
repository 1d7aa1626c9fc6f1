"""full GC: after a deployment, collect everything session-scoped that no live session owns.

Order of work: Valkey session keys, old hot log rows, finished jobs, temp folders. Each
stage is resumable: when the Lambda clock runs short the run saves where it was and the
next invoke carries on from there.
"""

from __future__ import annotations

import time
from contextlib import closing
from datetime import datetime
from itertools import islice
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit

from session_gc.observability import logger, metrics
from session_gc.results import FullResult
from session_gc.runs import Cursors, Deadline, exclusive
from session_gc.runtime import Runtime
from session_gc.stores.valkey import HEARTBEAT_CHUNK

STAGES = ("valkey", "logs", "jobs", "temp")


def full_gc(
    rt: Runtime, *, dry_run: bool = False, force: bool = False, deadline: Deadline | None = None
) -> FullResult:
    deadline = deadline or Deadline()
    started = time.monotonic()
    result = FullResult(dry_run=dry_run, force=force)
    with exclusive(rt) as held:
        if not held:
            logger.warning("full gc skipped: another sweep or full gc holds the lock")
            result.stopped = "locked"
            return result
        cursors = Cursors(rt, "full")
        # A dry run neither resumes nor saves: it reports what a fresh run would do.
        state: dict[str, Any] = {} if dry_run else cursors.load()
        if state:
            logger.info("full gc resuming", stage=state.get("stage"))
        logger.info("full gc started", dry_run=dry_run, force=force)
        for stage in STAGES[STAGES.index(state.get("stage", "valkey")) :]:
            finished = _STAGE_RUNNERS[stage](rt, result, state, deadline)
            if not finished:
                result.complete = False
                if not dry_run:
                    state["stage"] = stage
                    cursors.save(state)
                logger.warning("full gc out of time, will resume", stage=stage)
                break
            state = {}
        else:
            if not dry_run:
                cursors.clear()
    result.duration_ms = int((time.monotonic() - started) * 1000)
    if not dry_run:
        metrics.add_metric("ValkeyKeysDeleted", MetricUnit.Count, result.valkey_keys)
        metrics.add_metric("LogsDemoted", MetricUnit.Count, result.logs_demoted)
        metrics.add_metric("JobsPurged", MetricUnit.Count, result.jobs_purged)
        metrics.add_metric("TempFilesRemoved", MetricUnit.Count, result.temp_files_removed)
    logger.info("full gc finished", **result.to_json())
    return result


def _valkey(rt: Runtime, result: FullResult, state: dict[str, Any], deadline: Deadline) -> bool:
    positions: dict[str, int] = dict(state.get("valkey", {}))
    live: set[str] = set()
    logger.info("full gc valkey started", resume=bool(positions))
    pages = rt.valkey.pages(
        spare_live=not result.force,
        dry_run=result.dry_run,
        start=dict(positions),
        per_session=False,
    )
    # Closed on leaving, early or by an exception: the walk holds two pooled connections.
    with closing(pages):
        for page in pages:
            result.valkey_keys += page.total
            live |= page.live
            positions[page.node] = page.cursor if page.cursor else -1
            if page.cursor and deadline.passed():
                state["valkey"] = positions
                result.live_sessions_skipped = len(live)
                return False
    result.live_sessions_skipped = len(live)
    logger.info("full gc valkey finished", keys=result.valkey_keys, live_sessions_skipped=len(live))
    return True


def _logs(rt: Runtime, result: FullResult, state: dict[str, Any], deadline: Deadline) -> bool:
    saved = state.get("logs", {})
    if saved.get("cutoff"):
        # A resumed run keeps its first cutoff, so one pass means one consistent cut.
        cutoff = datetime.fromisoformat(saved["cutoff"])
    else:
        cutoff = rt.logs.cutoff(rt.settings.hot_log_max_age_hours)
    logger.info("full gc logs started", cutoff=cutoff.isoformat())
    if result.dry_run:
        result.logs_demoted = rt.logs.count_older_than(cutoff)
        logger.info("full gc logs finished", rows=result.logs_demoted, dry_run=True)
        return True
    after = saved.get("after")
    start = (datetime.fromisoformat(after[0]), int(after[1])) if after else None
    for moved, position in rt.logs.demote_older_than(cutoff, after=start):
        result.logs_demoted += moved
        if deadline.passed():
            state["logs"] = {
                "cutoff": cutoff.isoformat(),
                "after": [position[0].isoformat(), position[1]],
            }
            return False
    logger.info("full gc logs finished", rows=result.logs_demoted)
    return True


def _jobs(rt: Runtime, result: FullResult, state: dict[str, Any], deadline: Deadline) -> bool:
    logger.info("full gc jobs started", queue=rt.settings.job_queue_name)
    cut_short = False

    def stop() -> bool:
        # Asked only when a full chunk went, i.e. when more may be left to purge.
        nonlocal cut_short
        cut_short = deadline.passed()
        return cut_short

    result.jobs_purged = rt.jobs.purge_finished(
        rt.settings.job_retention_ms, dry_run=result.dry_run, stop=stop
    )
    logger.info("full gc jobs finished", jobs=result.jobs_purged, dry_run=result.dry_run)
    # Cut short: the stage runs again on resume (what is gone stays gone).
    return not cut_short


def _temp(rt: Runtime, result: FullResult, state: dict[str, Any], deadline: Deadline) -> bool:
    if rt.temp is None:
        return True
    logger.info("full gc temp started")
    failed = 0
    folders = rt.temp.session_ids()
    # Judged and removed a chunk at a time, so the deadline is looked at between chunks.
    while chunk := list(islice(folders, HEARTBEAT_CHUNK)):
        live = set() if result.force else rt.valkey.live_sessions(chunk)
        for sid in chunk:
            if sid in live:
                continue
            removal = rt.temp.remove_session(sid, dry_run=result.dry_run)
            result.temp_files_removed += removal.removed
            if removal.failed:
                failed += len(removal.failed)
                logger.error("temp files not removed", session_id=sid, failed=removal.failed[:5])
        if len(chunk) == HEARTBEAT_CHUNK and deadline.passed():
            return False
    if failed:
        metrics.add_metric("TempFileFailures", MetricUnit.Count, failed)
    logger.info("full gc temp finished", files=result.temp_files_removed, failed=failed)
    return True


_STAGE_RUNNERS = {"valkey": _valkey, "logs": _logs, "jobs": _jobs, "temp": _temp}
