"""Summarization jobs: purge finished BullMQ jobs past their retention, through bullmq itself.

BullMQ's key layout and its Lua scripts belong to BullMQ; cleaning goes through
``Queue.clean`` so that job hashes, logs and events stay consistent with what the Node
workers expect. Only the "completed" and "failed" sets are ever named; waiting, active,
delayed and prioritized jobs are out of reach by construction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio
import redis.exceptions

from session_gc.errors import StoreUnavailable

FINISHED_SETS = ("completed", "failed")


class JobStore:
    def __init__(
        self,
        url: str,
        *,
        queue_name: str = "summarization",
        prefix: str = "bull",
        password: str | None = None,
        cluster: bool = False,
        ca_file: str | None = None,
        chunk: int = 1000,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.queue_name = queue_name
        self.prefix = prefix
        self.password = password
        self.cluster = cluster
        self.ca_file = ca_file
        # Each clean call runs one Lua script on the server; a capped limit keeps every call
        # short (about a millisecond per hundred jobs) however many jobs have piled up.
        self.chunk = chunk
        self.connect_timeout_s = connect_timeout_s

    def purge_finished(
        self,
        retention_ms: int,
        *,
        dry_run: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> int:
        """Remove completed and failed jobs that finished more than ``retention_ms`` ago.

        Returns the number removed (or, for a dry run, that would be). ``stop`` is asked
        between chunks; a purge stopped early is simply run again later. The handlers are
        synchronous and bullmq is asyncio-only, so each call runs its own event loop with a
        client created inside it (a client reused across loops fails on a warm start).
        """
        return asyncio.run(self._purge(max(0, int(retention_ms)), dry_run, stop))

    async def _purge(
        self, retention_ms: int, dry_run: bool, stop: Callable[[], bool] | None
    ) -> int:
        from bullmq import Queue  # only sweep and full GC purge; collect never loads it

        conn = self._client()
        queue = Queue(self.queue_name, {"connection": conn, "prefix": self.prefix})
        try:
            # The same selection clean makes: each finished set is scored by finishedOn.
            cutoff = int(time.time() * 1000) - retention_ms
            due = {s: int(await conn.zcount(queue.toKey(s), 0, cutoff)) for s in FINISHED_SETS}
            if dry_run:
                return sum(due.values())
            total = 0
            # Skipping empty sets also keeps clean from writing a "cleaned" event into the
            # stream of a queue that has nothing to clean (or does not exist).
            for kind in (s for s in FINISHED_SETS if due[s]):
                while True:
                    removed = await queue.clean(retention_ms, self.chunk, kind)
                    total += len(removed)
                    if len(removed) < self.chunk or (stop is not None and stop()):
                        break
            return total
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise StoreUnavailable(
                f"Valkey unreachable while purging jobs of queue {self.queue_name!r}: {exc}"
            ) from exc
        finally:
            await queue.close()

    def _client(self) -> Any:
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": self.connect_timeout_s,
            "socket_timeout": 30.0,
        }
        if self.password is not None:
            options["password"] = self.password
        if self.url.startswith("rediss://"):
            options["ssl_cert_reqs"] = "required"
            if self.ca_file:
                options["ssl_ca_certs"] = self.ca_file
        if self.cluster:
            return redis.asyncio.RedisCluster.from_url(self.url, **options)
        return redis.asyncio.Redis.from_url(self.url, **options)
