"""What the long runs (sweep, full GC) share: one-at-a-time locking, deadlines, saved cursors."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from redis.exceptions import LockError

from session_gc.observability import logger
from session_gc.runtime import Runtime
from session_gc.stores.valkey import translate_errors

# Longer than the 900 s Lambda limit, so a live holder never loses the lock to expiry; a
# crashed holder's lock frees itself a minute after the longest possible run.
LOCK_TTL_S = 960
# A saved cursor older than this describes a keyspace that has moved on; start afresh.
CURSOR_TTL_S = 24 * 3600
# Stop when less than this remains: longer than the slowest page or batch ever measured
# (about 1 s), with room for the final bookkeeping writes and the response.
DEFAULT_MARGIN_MS = 20_000


@dataclass(frozen=True)
class Deadline:
    """When a run must stop taking new pages (monotonic seconds); None = no limit."""

    at: float | None = None

    @classmethod
    def from_context(cls, context: Any, margin_ms: int = DEFAULT_MARGIN_MS) -> Deadline:
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        if remaining is None:
            return cls()
        return cls(time.monotonic() + (int(remaining()) - margin_ms) / 1000)

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


@contextmanager
def exclusive(rt: Runtime) -> Iterator[bool]:
    """Hold the GC's run lock for the block; yields False (and holds nothing) if taken.

    redis-py's Lock gives a random token, an expiry, and a release that deletes the key only
    while it still holds our token (a compare-and-delete script), so a run never frees a
    lock that expired and was taken by another run.
    """
    lock = rt.valkey.client.lock(
        rt.keys.gc_key("lock"), timeout=LOCK_TTL_S, blocking=False, thread_local=False
    )
    with translate_errors("take the run lock"):
        acquired = bool(lock.acquire())
    try:
        yield acquired
    finally:
        if acquired:
            try:
                with translate_errors("release the run lock"):
                    lock.release()
            except LockError:
                logger.warning("run lock expired before release; another run may have started")


class Cursors:
    """A run's saved position, kept outside the session namespace."""

    def __init__(self, rt: Runtime, run: str) -> None:
        self.rt = rt
        self.key = rt.keys.gc_key(f"cursor:{run}")

    def load(self) -> dict[str, Any]:
        with translate_errors("read the saved cursor"):
            raw = self.rt.valkey.client.get(self.key)
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            logger.warning("saved cursor unreadable, starting afresh", key=self.key)
            return {}
        return value if isinstance(value, dict) else {}

    def save(self, state: dict[str, Any]) -> None:
        with translate_errors("save the cursor"):
            self.rt.valkey.client.set(self.key, json.dumps(state), ex=CURSOR_TTL_S)

    def clear(self) -> None:
        with translate_errors("clear the cursor"):
            self.rt.valkey.client.delete(self.key)
