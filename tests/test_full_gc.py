"""full GC: after a deployment, everything no live session owns goes; nothing else does."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import pg8000.native
import pytest
import redis
from conftest import EVENTS, PREFIX, keys_of

from session_gc.errors import BadEvent
from session_gc.full import full_gc
from session_gc.observability import metrics
from session_gc.runs import Deadline
from session_gc.runtime import Runtime
from session_gc_local import seed
from session_gc_local.invoke import LambdaContext

CURSOR_KEY = f"{PREFIX}:gc:cursor:full"
HOT_MAX_AGE = timedelta(hours=24)


@dataclass
class World:
    dead: dict[str, set[str]] = field(default_factory=dict)
    live: dict[str, set[str]] = field(default_factory=dict)
    old_hot_rows: int = 0

    @property
    def dead_keys(self) -> set[str]:
        return set().union(*self.dead.values())

    @property
    def live_keys(self) -> set[str]:
        return set().union(*self.live.values())


def seed_world(valkey: redis.Redis, pg: pg8000.native.Connection) -> World:
    world = World()
    for sid in seed.session_ids(6, label="dead"):
        world.dead[sid] = set(seed.write_session(valkey, PREFIX, sid, live=False))
    for sid in ("tagged-dead-0", "tagged-dead-1"):
        world.dead[sid] = set(seed.write_session(valkey, PREFIX, sid, live=False, tagged=True))
    for sid in seed.session_ids(3, label="live"):
        world.live[sid] = set(seed.write_session(valkey, PREFIX, sid, live=True))
    world.live["tagged-live"] = set(
        seed.write_session(valkey, PREFIX, "tagged-live", live=True, tagged=True)
    )
    seed.write_bystanders(valkey, PREFIX, count=3)
    valkey.hset(f"{PREFIX}:gc:candidates", "someone", "1764763200")
    # Not well-formed session keys: no id separator, a glob character in the id.
    valkey.set(f"{PREFIX}:session:no-separator", "keep")
    valkey.set(f"{PREFIX}:session:bad*id:meta", "keep")
    # Every session has old and new hot rows, plus rows already demoted; one session's rows
    # outlive all of its keys.
    for sid in [*world.dead, *world.live, "keys-long-gone"]:
        seed.add_logs(pg, sid, count=2, age_hours=48)
        seed.add_logs(pg, sid, count=1, age_hours=1)
        seed.add_logs(pg, sid, count=1, age_hours=48, tier="warm")
        seed.add_logs(pg, sid, count=1, age_hours=72, tier="cold")
        world.old_hot_rows += 2
    return world


def logs(pg: pg8000.native.Connection) -> dict[int, tuple[str, str, datetime]]:
    rows = pg.run("SELECT id, session_id, tier, created_at FROM agent_logs ORDER BY id")
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def counts(result: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in result.items() if name not in ("duration", "dryRun")}


@pytest.fixture(autouse=True)
def no_metrics_left_behind() -> Iterator[None]:
    # Core calls made without a handler record metrics nobody flushes; drop them.
    yield
    metrics.clear_metrics()


@pytest.fixture
def full(handler: Callable[[str], ModuleType]) -> ModuleType:
    return handler("full_gc")


def test_full_gc_collects_dead_sessions_and_old_hot_logs_and_spares_the_rest(
    full: ModuleType, valkey: redis.Redis, pg: pg8000.native.Connection, context: LambdaContext
) -> None:
    world = seed_world(valkey, pg)
    keys_before, logs_before = keys_of(valkey), logs(pg)

    result = full.lambda_handler({}, context)

    assert isinstance(result.pop("duration"), int)
    assert result == {
        "valkeyKeys": len(world.dead_keys),
        "logsDemoted": world.old_hot_rows,
        "jobsPurged": 0,
        "tempFilesRemoved": 0,
        "dryRun": False,
        "force": False,
        "liveSessionsSkipped": len(world.live),
        "complete": True,
    }
    assert keys_of(valkey) == keys_before - world.dead_keys
    assert world.live_keys <= keys_of(valkey)
    now = datetime.now(UTC)
    for row_id, (sid, tier, created) in logs(pg).items():
        was = logs_before[row_id][1]
        expected = "warm" if was == "hot" and now - created > HOT_MAX_AGE else was
        assert (sid, tier) == (logs_before[row_id][0], expected)


def test_full_gc_dry_run_changes_nothing_and_counts_what_the_real_run_then_does(
    full: ModuleType, valkey: redis.Redis, pg: pg8000.native.Connection, context: LambdaContext
) -> None:
    seed_world(valkey, pg)
    size, keys_before, logs_before = valkey.dbsize(), keys_of(valkey), logs(pg)
    event = json.loads((EVENTS / "full_gc.json").read_text())
    assert event == {"dryRun": True, "force": False}

    dry = full.lambda_handler(event, context)

    assert dry["dryRun"] is True
    assert valkey.dbsize() == size
    assert keys_of(valkey) == keys_before
    assert logs(pg) == logs_before

    real = full.lambda_handler({}, context)

    assert counts(dry) == counts(real)
    assert real["valkeyKeys"] > 0
    assert real["logsDemoted"] > 0


def test_full_gc_with_force_collects_live_sessions_too_but_never_channel_keys(
    full: ModuleType, valkey: redis.Redis, pg: pg8000.native.Connection, context: LambdaContext
) -> None:
    world = seed_world(valkey, pg)
    keys_before = keys_of(valkey)

    result = full.lambda_handler({"force": True}, context)

    gone = world.dead_keys | world.live_keys
    assert result["valkeyKeys"] == len(gone)
    assert result["liveSessionsSkipped"] == 0
    assert keys_of(valkey) == keys_before - gone
    assert {k for k in keys_before if k.startswith(f"{PREFIX}:channel:")} <= keys_of(valkey)


def test_full_gc_event_with_a_misspelt_flag_is_rejected_and_deletes_nothing(
    full: ModuleType, valkey: redis.Redis, pg: pg8000.native.Connection, context: LambdaContext
) -> None:
    seed_world(valkey, pg)
    keys_before, logs_before = keys_of(valkey), logs(pg)

    with pytest.raises(BadEvent, match="dryrun"):
        full.lambda_handler({"dryrun": True}, context)

    assert keys_of(valkey) == keys_before
    assert logs(pg) == logs_before


def test_full_gc_out_of_time_resumes_from_its_cursor_until_everything_is_collected(
    make_runtime: Callable[..., Runtime], valkey: redis.Redis, pg: pg8000.native.Connection
) -> None:
    # GIVEN 500 dead sessions, a few live ones, and more old hot rows than one log batch
    pipe = valkey.pipeline(transaction=False)
    dead: set[str] = set()
    for sid in seed.session_ids(500, label="dead"):
        dead |= set(seed.write_session(valkey, PREFIX, sid, live=False, pipe=pipe))
    live: set[str] = set()
    for sid in seed.session_ids(5, label="live"):
        live |= set(seed.write_session(valkey, PREFIX, sid, live=True, pipe=pipe))
    pipe.execute()
    bystanders = set(seed.write_bystanders(valkey, PREFIX, count=3))
    for sid in ("old-a", "old-b"):
        seed.add_logs(pg, sid, count=7, age_hours=48)
    rt = make_runtime(scan_count=10, log_batch_size=3)

    # WHEN every run finds its deadline already passed
    first = full_gc(rt, deadline=Deadline.after(0))

    # THEN each run stops after one step and saves where it was
    assert first.complete is False
    assert valkey.exists(CURSOR_KEY)
    assert 0 < first.valkey_keys < len(dead)
    totals = {"valkey": first.valkey_keys, "logs": first.logs_demoted}
    runs = 1
    while True:
        assert valkey.exists(*live) == len(live)
        result = full_gc(rt, deadline=Deadline.after(0))
        runs += 1
        totals["valkey"] += result.valkey_keys
        totals["logs"] += result.logs_demoted
        if result.complete:
            break
        assert valkey.exists(CURSOR_KEY)
        assert runs < 5000, "full gc never completed"

    assert runs > 10
    assert totals == {"valkey": len(dead), "logs": 14}
    assert keys_of(valkey) == live | bystanders
    assert pg.run("SELECT count(*) FROM agent_logs WHERE tier = 'hot'") == [[0]]
    assert not valkey.exists(CURSOR_KEY)


def test_full_gc_while_another_run_holds_the_lock_stops_and_deletes_nothing(
    full: ModuleType,
    rt: Runtime,
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    context: LambdaContext,
) -> None:
    seed_world(valkey, pg)
    keys_before, logs_before = keys_of(valkey), logs(pg)
    lock = rt.valkey.client.lock(f"{PREFIX}:gc:lock", timeout=60)
    assert lock.acquire(blocking=False)
    try:
        result = full.lambda_handler({}, context)
    finally:
        lock.release()

    assert result["stopped"] == "locked"
    assert (result["valkeyKeys"], result["logsDemoted"]) == (0, 0)
    assert keys_of(valkey) == keys_before
    assert logs(pg) == logs_before
