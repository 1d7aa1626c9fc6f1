"""The JSON shapes every run returns (camelCase, as the service this replaces returned)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Listing every session id of a large sweep would make results unreadably long; counts are
# always exact, the lists stop here.
MAX_LISTED = 100


@dataclass
class Cleaned:
    valkey_keys: int = 0
    logs_demoted: int = 0
    temp_files_removed: int = 0

    def to_json(self) -> dict[str, int]:
        shown = {
            "valkeyKeys": self.valkey_keys,
            "logsDemoted": self.logs_demoted,
            "tempFilesRemoved": self.temp_files_removed,
        }
        return {name: value for name, value in shown.items() if value}


@dataclass
class SessionResult:
    session_id: str
    cleaned: Cleaned = field(default_factory=Cleaned)
    # Why nothing (more) was done, e.g. "live": the session's heartbeat exists.
    skipped: str | None = None
    # What could not be done; the session's SQS message fails so that it is retried.
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sessionId": self.session_id, "cleaned": self.cleaned.to_json()}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class SweepResult:
    orphaned_sessions: int = 0
    total_cleaned: list[SessionResult] = field(default_factory=list)
    duration_ms: int = 0
    dry_run: bool = False
    sessions_seen: int = 0
    live_sessions: int = 0
    new_candidates: list[str] = field(default_factory=list)
    waiting_candidates: int = 0
    due: list[str] = field(default_factory=list)
    kept_live: list[str] = field(default_factory=list)
    enqueued: int = 0
    jobs_purged: int = 0
    complete: bool = True
    # Set when the run did not delete: "locked", "blast-radius: ...".
    stopped: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "orphanedSessions": self.orphaned_sessions,
            "totalCleaned": [r.to_json() for r in self.total_cleaned],
            "duration": self.duration_ms,
            "dryRun": self.dry_run,
            "jobsPurged": self.jobs_purged,
            "sessionsSeen": self.sessions_seen,
            "liveSessions": self.live_sessions,
            "candidates": {
                "new": len(self.new_candidates),
                "waiting": self.waiting_candidates,
                "due": len(self.due),
            },
            "complete": self.complete,
        }
        if self.dry_run:
            out["candidates"]["newIds"] = sorted(self.new_candidates)[:MAX_LISTED]
            out["candidates"]["dueIds"] = sorted(self.due)[:MAX_LISTED]
            out["keptLive"] = {sid: "heartbeat" for sid in sorted(self.kept_live)[:MAX_LISTED]}
        if self.enqueued:
            out["enqueued"] = self.enqueued
        if self.stopped:
            out["stopped"] = self.stopped
        return out


@dataclass
class FullResult:
    valkey_keys: int = 0
    logs_demoted: int = 0
    jobs_purged: int = 0
    temp_files_removed: int = 0
    duration_ms: int = 0
    dry_run: bool = False
    force: bool = False
    live_sessions_skipped: int = 0
    complete: bool = True
    stopped: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "valkeyKeys": self.valkey_keys,
            "logsDemoted": self.logs_demoted,
            "jobsPurged": self.jobs_purged,
            "tempFilesRemoved": self.temp_files_removed,
            "duration": self.duration_ms,
            "dryRun": self.dry_run,
            "force": self.force,
            "liveSessionsSkipped": self.live_sessions_skipped,
            "complete": self.complete,
        }
        if self.stopped:
            out["stopped"] = self.stopped
        return out
