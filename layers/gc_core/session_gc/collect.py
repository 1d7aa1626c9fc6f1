"""collect: clean up sessions that ended, a whole SQS batch in one pass over the keyspace."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit

from session_gc.errors import BadEvent, SessionGcError, TempStoreError
from session_gc.ids import validate_session_id
from session_gc.observability import logger, metrics
from session_gc.results import SessionResult
from session_gc.runtime import Runtime


def parse_message(body: object) -> str:
    """The session id in an SQS message body ``{"sessionId": "..."}``; raises on anything else."""
    if not isinstance(body, str):
        raise BadEvent(f"message body must be a JSON string, got {type(body).__name__}")
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        raise BadEvent(f"message body is not JSON ({exc.msg}): {body[:80]!r}") from None
    if not isinstance(payload, dict) or "sessionId" not in payload:
        raise BadEvent(f'message body must be an object with "sessionId": {body[:80]!r}')
    return validate_session_id(payload["sessionId"])


def collect_sessions(
    rt: Runtime, session_ids: Iterable[str], *, dry_run: bool = False, force: bool = False
) -> dict[str, SessionResult]:
    """Collect these sessions together: one keyspace pass, one log query, their temp folders.

    A session whose heartbeat exists is live and left alone (``skipped: "live"``) unless
    ``force``; the heartbeat is checked once up front and again for every page, just before
    its deletion, so one that appears mid-run stops the deletion from then on.
    """
    ids = [validate_session_id(sid) for sid in dict.fromkeys(session_ids)]
    results = {sid: SessionResult(sid) for sid in ids}
    if not ids:
        return results
    started = time.monotonic()
    logger.info("collect started", sessions=len(ids), dry_run=dry_run, force=force)

    live = set() if force else rt.valkey.live_sessions(ids)
    targets = frozenset(ids) - live
    for page in rt.valkey.pages(only=targets, spare_live=not force, dry_run=dry_run):
        for sid, count in page.removed.items():
            results[sid].cleaned.valkey_keys += count
        live |= page.live & targets

    dead = [sid for sid in ids if sid not in live]
    for sid, rows in rt.logs.demote_sessions(dead, dry_run=dry_run).items():
        results[sid].cleaned.logs_demoted = rows

    if rt.temp is not None:
        for sid in dead:
            removal = rt.temp.remove_session(sid, dry_run=dry_run)
            results[sid].cleaned.temp_files_removed = removal.removed
            if removal.failed:
                results[sid].error = removal.describe_failures()
                metrics.add_metric("TempFileFailures", MetricUnit.Count, len(removal.failed))
                logger.error("temp files not removed", session_id=sid, failed=removal.failed[:5])

    for sid in live:
        results[sid].skipped = "live"
    _record(results.values(), dry_run)
    logger.info(
        "collect finished",
        sessions=len(ids),
        skipped_live=len(live),
        valkey_keys=sum(r.cleaned.valkey_keys for r in results.values()),
        logs_demoted=sum(r.cleaned.logs_demoted for r in results.values()),
        temp_files_removed=sum(r.cleaned.temp_files_removed for r in results.values()),
        dry_run=dry_run,
        elapsed_ms=int((time.monotonic() - started) * 1000),
    )
    return results


def _record(results: Iterable[SessionResult], dry_run: bool) -> None:
    if dry_run:
        return
    done = list(results)
    metrics.add_metric("SessionsCollected", MetricUnit.Count, sum(not r.skipped for r in done))
    metrics.add_metric("SessionsSkippedLive", MetricUnit.Count, sum(bool(r.skipped) for r in done))
    metrics.add_metric(
        "ValkeyKeysDeleted", MetricUnit.Count, sum(r.cleaned.valkey_keys for r in done)
    )
    metrics.add_metric("LogsDemoted", MetricUnit.Count, sum(r.cleaned.logs_demoted for r in done))
    metrics.add_metric(
        "TempFilesRemoved", MetricUnit.Count, sum(r.cleaned.temp_files_removed for r in done)
    )


@dataclass
class CollectBatch:
    """Outcome of one SQS batch, per message, for Powertools' partial-failure reporting."""

    results: dict[str, SessionResult] = field(default_factory=dict)
    errors: dict[str, Exception] = field(default_factory=dict)

    def settle(self, record: Any) -> dict[str, Any]:
        """Record handler for BatchProcessor: return this message's result or raise its error."""
        message_id = record.message_id
        if message_id in self.errors:
            raise self.errors[message_id]
        result = self.results[message_id]
        if result.error:
            raise TempStoreError(f"session {result.session_id}: {result.error}")
        return result.to_json()


def collect_records(
    rt: Runtime, records: Sequence[Mapping[str, Any]], *, dry_run: bool = False
) -> CollectBatch:
    """Parse every record, collect all valid sessions together, and map outcomes back.

    A malformed record fails alone (its reason logged, nothing deleted for it). If the
    stores fail, every valid record fails with that error, so SQS retries them.
    """
    batch = CollectBatch()
    wanted: dict[str, str] = {}
    for record in records:
        message_id = str(record.get("messageId", ""))
        try:
            wanted[message_id] = parse_message(record.get("body"))
        except SessionGcError as exc:
            batch.errors[message_id] = exc
            logger.error("collect message rejected", message_id=message_id, reason=str(exc))
    if batch.errors:
        metrics.add_metric("CollectFailures", MetricUnit.Count, len(batch.errors))
    if not wanted:
        return batch
    try:
        by_session = collect_sessions(rt, wanted.values(), dry_run=dry_run)
    except SessionGcError as exc:
        logger.exception("collect batch failed", sessions=len(set(wanted.values())))
        metrics.add_metric("CollectFailures", MetricUnit.Count, len(wanted))
        batch.errors.update(dict.fromkeys(wanted, exc))
        return batch
    for message_id, sid in wanted.items():
        batch.results[message_id] = by_session[sid]
    # SQS only hears about failures; the per-session outcome lives in the log.
    logger.info("collect results", results=[r.to_json() for r in by_session.values()])
    return batch
