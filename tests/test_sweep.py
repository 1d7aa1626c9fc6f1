"""sweep: two phases a grace period apart, heartbeat re-checks, blast-radius guards, fan-out
to SQS and resumable passes, against real Valkey and PostgreSQL (SQS from moto)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import boto3
import pg8000.native
import pytest
import redis
from conftest import EVENTS, PREFIX, keys_of
from moto import mock_aws

from session_gc.collect import collect_sessions
from session_gc.observability import metrics
from session_gc.runs import Deadline
from session_gc.runtime import Runtime
from session_gc.sweep import sweep
from session_gc_local import seed
from session_gc_local.invoke import LambdaContext

GRACE = 3600
CANDIDATES = f"{PREFIX}:gc:candidates"
CURSOR = f"{PREFIX}:gc:cursor:sweep"
LOG_ROWS = 3


class Clock:
    """A wall clock the test moves by hand (the sweep reads it through ``rt.clock()``)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    live: list[str]
    dead: list[str]
    keys: dict[str, list[str]] = field(default_factory=dict)
    bystanders: list[str] = field(default_factory=list)

    def keys_of_sessions(self, ids: list[str]) -> set[str]:
        return {k for sid in ids for k in self.keys[sid]}


def seed_world(
    client: redis.Redis, conn: pg8000.native.Connection, *, live: int, dead: int
) -> World:
    """``live`` sessions with a heartbeat (one is ``abcd``), ``dead`` without (one is ``abc``),
    a third of them hash-tagged, hot logs for every dead session and for ``abcd``, and
    bystanders the sweep must never touch."""
    world = World(
        live=["abcd", *seed.session_ids(live - 1, label="live")],
        dead=["abc", *seed.session_ids(dead - 1, label="dead")],
    )
    pipe = client.pipeline(transaction=False)
    for i, sid in enumerate(world.live + world.dead):
        world.keys[sid] = seed.write_session(
            client, PREFIX, sid, live=sid in world.live, tagged=i % 3 == 2, pipe=pipe
        )
    pipe.execute()
    world.bystanders = [
        *seed.write_bystanders(client, PREFIX, count=3),
        f"{PREFIX}:session:abc",  # no part after the id: not a session key
        f"{PREFIX}:gc:unrelated",
    ]
    client.set(f"{PREFIX}:session:abc", "keep")
    client.set(f"{PREFIX}:gc:unrelated", "keep")
    for sid in [*world.dead, "abcd"]:
        seed.add_logs(conn, sid, count=LOG_ROWS)
    return world


def hot_rows(conn: pg8000.native.Connection) -> dict[str, int]:
    rows = conn.run("SELECT session_id, count(*) FROM agent_logs WHERE tier = 'hot' GROUP BY 1")
    return {sid: int(n) for sid, n in rows}


def candidates(client: redis.Redis) -> dict[str, float]:
    return {text(k): float(v) for k, v in client.hgetall(CANDIDATES).items()}


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def emitted_metrics(stdout: str) -> list[dict[str, Any]]:
    """The EMF documents Powertools printed (one JSON object a line, with an ``_aws`` key)."""
    docs = []
    for line in stdout.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            docs.append(json.loads(line))
    return docs


def metric_values(name: str) -> list[float]:
    return list(metrics.metric_set.get(name, {}).get("Value", []))


@pytest.fixture(autouse=True)
def fresh_metrics() -> Iterator[None]:
    # Metrics is a module-wide singleton: values added by direct sweep() calls would
    # otherwise pile up until some handler flushes them.
    metrics.clear_metrics()
    yield
    metrics.clear_metrics()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sweeper(make_runtime: Callable[..., Runtime], clock: Clock) -> Runtime:
    return make_runtime(clock=clock, sweep_grace_seconds=GRACE)


@pytest.fixture
def sweep_handler(
    handler: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., ModuleType]:
    """The real sweep handler, cold-started with extra environment variables."""

    def load(**env: str) -> ModuleType:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return handler("sweep")

    return load


def scheduled_event() -> dict[str, Any]:
    return dict(json.loads((EVENTS / "sweep.json").read_text()))


# -- the two phases --------------------------------------------------------------------------


def test_sweep_collects_dead_sessions_only_after_the_grace(
    valkey: redis.Redis, pg: pg8000.native.Connection, sweeper: Runtime, clock: Clock
) -> None:
    world = seed_world(valkey, pg, live=27, dead=3)
    before = keys_of(valkey)
    marked_at = clock.now

    first = sweep(sweeper)

    assert first.new_candidates == sorted(world.dead)
    assert first.orphaned_sessions == 0 and first.total_cleaned == []
    assert candidates(valkey) == dict.fromkeys(world.dead, marked_at)
    assert keys_of(valkey) - {CANDIDATES} == before

    clock.now += GRACE - 1
    second = sweep(sweeper)

    assert second.due == [] and second.waiting_candidates == 3 and second.new_candidates == []
    assert keys_of(valkey) - {CANDIDATES} == before
    assert hot_rows(pg) == dict.fromkeys([*world.dead, "abcd"], LOG_ROWS)

    clock.now += 1
    third = sweep(sweeper)

    assert third.stopped is None
    assert third.orphaned_sessions == 3
    assert {r.session_id: r.cleaned.valkey_keys for r in third.total_cleaned} == dict.fromkeys(
        world.dead, len(seed.SESSION_PARTS)
    )
    assert keys_of(valkey) == before - world.keys_of_sessions(world.dead)
    assert world.keys_of_sessions(world.live) | set(world.bystanders) <= keys_of(valkey)
    assert hot_rows(pg) == {"abcd": LOG_ROWS}
    assert candidates(valkey) == {}


def test_sweep_heartbeat_between_the_phases_saves_the_session_and_drops_it(
    valkey: redis.Redis, pg: pg8000.native.Connection, sweeper: Runtime, clock: Clock
) -> None:
    world = seed_world(valkey, pg, live=27, dead=3)
    revived, *others = world.dead
    sweep(sweeper)
    assert revived in candidates(valkey)

    valkey.set(f"{PREFIX}:session:{revived}:heartbeat", "1", ex=120)
    clock.now += GRACE
    result = sweep(sweeper)

    assert revived in result.kept_live and revived not in result.due
    assert sorted(r.session_id for r in result.total_cleaned) == sorted(others)
    assert set(world.keys[revived]) <= keys_of(valkey)
    assert not keys_of(valkey) & world.keys_of_sessions(others)
    assert hot_rows(pg)[revived] == LOG_ROWS
    assert candidates(valkey) == {}


def test_sweep_heartbeat_appearing_right_before_deletion_saves_the_session(
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    sweeper: Runtime,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN due candidates, and a heartbeat for one of them that the platform writes just
    # after the collect step's up-front liveness check (the worst moment)
    world = seed_world(valkey, pg, live=27, dead=3)
    revived, *others = world.dead
    sweep(sweeper)
    clock.now += GRACE
    store = sweeper.valkey
    real_check = store.live_sessions

    def check_then_revive(ids: Any) -> set[str]:
        answer = real_check(ids)
        valkey.set(f"{PREFIX}:session:{revived}:heartbeat", "1", ex=120)
        return answer

    monkeypatch.setattr(store, "live_sessions", check_then_revive)

    # WHEN the collecting sweep runs
    result = sweep(sweeper)

    # THEN the page engine's own heartbeat check spares it, and it leaves the candidates
    by_id = {r.session_id: r for r in result.total_cleaned}
    assert by_id[revived].skipped == "live" and by_id[revived].cleaned.valkey_keys == 0
    assert all(by_id[sid].cleaned.valkey_keys == len(seed.SESSION_PARTS) for sid in others)
    assert set(world.keys[revived]) <= keys_of(valkey)
    assert hot_rows(pg)[revived] == LOG_ROWS
    assert revived not in candidates(valkey)

    # AND when its heartbeat lapses again, it starts a fresh grace period
    monkeypatch.undo()
    valkey.delete(f"{PREFIX}:session:{revived}:heartbeat")
    clock.now += 1
    again = sweep(sweeper)
    assert again.new_candidates == [revived] and again.total_cleaned == []
    assert set(world.keys[revived]) <= keys_of(valkey)


def test_collect_after_a_heartbeat_appeared_skips_the_session(
    valkey: redis.Redis, pg: pg8000.native.Connection, sweeper: Runtime
) -> None:
    world = seed_world(valkey, pg, live=3, dead=2)
    revived, other = world.dead
    valkey.set(f"{PREFIX}:session:{revived}:heartbeat", "1", ex=120)
    before = keys_of(valkey)

    results = collect_sessions(sweeper, world.dead)

    assert results[revived].skipped == "live" and results[revived].cleaned.valkey_keys == 0
    assert results[other].cleaned.valkey_keys == len(seed.SESSION_PARTS)
    assert keys_of(valkey) == before - set(world.keys[other])


def test_sweep_drops_a_candidate_whose_keys_someone_else_deleted(
    valkey: redis.Redis, pg: pg8000.native.Connection, sweeper: Runtime, clock: Clock
) -> None:
    world = seed_world(valkey, pg, live=27, dead=3)
    gone, *waiting = world.dead
    sweep(sweeper)
    valkey.delete(*world.keys[gone])  # the collect handler got there first

    clock.now += 60
    result = sweep(sweeper)

    assert result.complete
    assert set(candidates(valkey)) == set(waiting)


# -- blast-radius guards -----------------------------------------------------------------------


def test_sweep_seeing_no_heartbeat_at_all_deletes_nothing_and_raises_the_metric(
    valkey: redis.Redis,
    sweep_handler: Callable[..., ModuleType],
    context: LambdaContext,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN sessions that all lack a heartbeat (what broken heartbeats look like), and no
    # grace, so that the second sweep would collect them all
    for sid in seed.session_ids(8, label="quiet"):
        seed.write_session(valkey, PREFIX, sid, live=False)
    app = sweep_handler(SWEEP_GRACE_SECONDS="0")

    first = app.lambda_handler(scheduled_event(), context)
    marked = keys_of(valkey)
    second = app.lambda_handler(scheduled_event(), context)

    assert first["candidates"]["new"] == 8
    assert second["candidates"]["due"] == 8
    assert second["stopped"].startswith("blast-radius")
    assert second["orphanedSessions"] == 0 and second["totalCleaned"] == []
    assert keys_of(valkey) == marked
    docs = emitted_metrics(capsys.readouterr().out)
    assert [d["SweepBlastRadiusStop"] for d in docs] == [[1.0], [1.0]]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and all("not one heartbeat" in r.__dict__["reason"] for r in errors)


@pytest.mark.parametrize(
    ("dead", "live", "stopped"),
    [(6, 4, True), (5, 5, False), (1, 9, False)],
    ids=["60%-dead-stops", "50%-dead-at-the-limit-collects", "10%-dead-collects"],
)
def test_sweep_guard_stops_only_above_the_collect_ratio(  # noqa: PLR0917 - pytest fixtures
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    sweeper: Runtime,
    clock: Clock,
    dead: int,
    live: int,
    stopped: bool,
) -> None:
    world = seed_world(valkey, pg, live=live, dead=dead)
    sweep(sweeper)
    before = keys_of(valkey)
    clock.now += GRACE

    result = sweep(sweeper)

    assert result.due == sorted(world.dead)
    assert metric_values("SweepBlastRadiusStop") == [0.0, 1.0 if stopped else 0.0]
    if stopped:
        assert result.stopped == (
            f"blast-radius: would collect {dead} of {dead + live} sessions seen "
            f"({dead / (dead + live):.0%}), above the 50% limit"
        )
        assert result.orphaned_sessions == 0 and result.total_cleaned == []
        assert keys_of(valkey) == before
        assert hot_rows(pg) == dict.fromkeys([*world.dead, "abcd"], LOG_ROWS)
    else:
        assert result.stopped is None
        assert result.orphaned_sessions == dead
        assert keys_of(valkey) == before - world.keys_of_sessions(world.dead) - {CANDIDATES}


def test_sweep_override_lets_a_stopped_sweep_collect(
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    sweep_handler: Callable[..., ModuleType],
    context: LambdaContext,
) -> None:
    world = seed_world(valkey, pg, live=4, dead=6)
    app = sweep_handler(SWEEP_GRACE_SECONDS="0")
    app.lambda_handler(scheduled_event(), context)
    before = keys_of(valkey)

    refused = app.lambda_handler(scheduled_event(), context)
    assert refused["stopped"].startswith("blast-radius: would collect 6 of 10")
    assert keys_of(valkey) == before

    forced = app.lambda_handler({"override": "blast-radius"}, context)

    assert "stopped" not in forced
    assert forced["orphanedSessions"] == 6
    assert keys_of(valkey) == before - world.keys_of_sessions(world.dead) - {CANDIDATES}
    assert set(world.bystanders) | world.keys_of_sessions(world.live) <= keys_of(valkey)


def test_sweep_of_a_keyspace_without_sessions_is_not_stopped(
    valkey: redis.Redis, sweeper: Runtime
) -> None:
    bystanders = set(seed.write_bystanders(valkey, PREFIX, count=3))

    result = sweep(sweeper)

    assert result.stopped is None and result.sessions_seen == 0
    assert metric_values("SweepBlastRadiusStop") == [0.0]
    assert keys_of(valkey) == bystanders


# -- the handler ---------------------------------------------------------------------------------


def test_sweep_handler_with_the_scheduled_event_returns_the_design_shape(
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    sweep_handler: Callable[..., ModuleType],
    context: LambdaContext,
) -> None:
    world = seed_world(valkey, pg, live=9, dead=1)
    app = sweep_handler(SWEEP_GRACE_SECONDS="0")
    app.lambda_handler(scheduled_event(), context)

    result = app.lambda_handler(scheduled_event(), context)

    assert {"orphanedSessions", "totalCleaned", "duration"} <= result.keys()
    assert result["orphanedSessions"] == 1
    assert result["totalCleaned"] == [
        {"sessionId": "abc", "cleaned": {"valkeyKeys": 5, "logsDemoted": LOG_ROWS}}
    ]
    assert isinstance(result["duration"], int) and result["duration"] >= 0
    assert not keys_of(valkey) & set(world.keys["abc"])


@pytest.mark.filterwarnings("ignore:No application metrics to publish")
def test_sweep_dry_run_changes_nothing_and_lists_what_it_would_do(
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    sweep_handler: Callable[..., ModuleType],
    context: LambdaContext,
) -> None:
    # GIVEN one due candidate, one dead session not yet marked, a candidate whose keys are
    # gone, and live sessions
    world = seed_world(valkey, pg, live=6, dead=2)
    due, new = world.dead
    valkey.hset(CANDIDATES, mapping={due: 1_000_000_000.0, "vanished": 1_000_000_000.0})
    before = (valkey.dbsize(), keys_of(valkey), candidates(valkey), hot_rows(pg))
    app = sweep_handler()

    result = app.lambda_handler({"dryRun": True}, context)

    assert (valkey.dbsize(), keys_of(valkey), candidates(valkey), hot_rows(pg)) == before
    assert result["dryRun"] is True
    assert result["candidates"]["newIds"] == [new]
    assert result["candidates"]["dueIds"] == [due]
    assert result["keptLive"] == dict.fromkeys(sorted(world.live), "heartbeat")
    assert result["orphanedSessions"] == 1 and result["totalCleaned"] == []


# -- fan-out to the collect queue --------------------------------------------------------------


@pytest.fixture
def collect_queue() -> Iterator[str]:
    with mock_aws():
        sqs = boto3.client("sqs", region_name="eu-west-1")
        yield sqs.create_queue(QueueName="session-gc-collect")["QueueUrl"]


def drain(sqs: Any, url: str) -> list[str]:
    bodies: list[str] = []
    while True:
        reply = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        if not reply.get("Messages"):
            return bodies
        bodies += [m["Body"] for m in reply["Messages"]]


def fan_out_world(
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    make_runtime: Callable[..., Runtime],
    url: str,
) -> tuple[World, Runtime, list[int]]:
    """25 due sessions (and 25 live ones), a sweeper sending to ``url``, and a call counter."""
    world = seed_world(valkey, pg, live=25, dead=25)
    clock = Clock()
    rt = make_runtime(clock=clock, collect_queue_url=url)
    sweep(rt)
    clock.now += rt.settings.sweep_grace_seconds
    calls: list[int] = []
    rt.sqs.meta.events.register(
        "before-call.sqs.SendMessageBatch",
        lambda params, **_: calls.append(len(json.loads(params["body"])["Entries"])),
    )
    return world, rt, calls


def test_sweep_with_a_collect_queue_enqueues_due_sessions_in_batches_of_ten(
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    make_runtime: Callable[..., Runtime],
    collect_queue: str,
) -> None:
    world, rt, calls = fan_out_world(valkey, pg, make_runtime, collect_queue)
    before = keys_of(valkey)

    result = sweep(rt)

    assert result.enqueued == 25 and result.total_cleaned == []
    assert calls == [10, 10, 5]
    bodies = drain(rt.sqs, collect_queue)
    assert sorted(json.loads(b)["sessionId"] for b in bodies) == sorted(world.dead)
    assert all(json.loads(b) == {"sessionId": json.loads(b)["sessionId"]} for b in bodies)
    assert keys_of(valkey) == before
    assert hot_rows(pg) == dict.fromkeys([*world.dead, "abcd"], LOG_ROWS)


@pytest.mark.parametrize(
    ("sender_fault", "enqueued"),
    [(False, 25), (True, 24)],
    ids=["transient-failure-retried", "sender-fault-not-retried"],
)
def test_sweep_fan_out_retries_only_transient_entry_failures(  # noqa: PLR0917 - pytest fixtures
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    make_runtime: Callable[..., Runtime],
    collect_queue: str,
    caplog: pytest.LogCaptureFixture,
    sender_fault: bool,
    enqueued: int,
) -> None:
    # GIVEN SQS that refuses one entry of the first batch: the entry never reaches the queue
    # and the reply lists it under Failed, as a partially failed SendMessageBatch does
    world, rt, calls = fan_out_world(valkey, pg, make_runtime, collect_queue)
    refused: list[str] = []

    def withhold_one(params: dict[str, Any], **_: Any) -> None:
        if not refused:
            refused.append(params["Entries"].pop(3)["Id"])

    def report_it(parsed: dict[str, Any], **_: Any) -> None:
        if len(calls) == 1:
            parsed.setdefault("Failed", []).append(
                {"Id": refused[0], "SenderFault": sender_fault, "Code": "InternalError"}
            )

    rt.sqs.meta.events.register("before-parameter-build.sqs.SendMessageBatch", withhold_one)
    rt.sqs.meta.events.register("after-call.sqs.SendMessageBatch", report_it)

    result = sweep(rt)

    assert result.enqueued == enqueued
    bodies = sorted(json.loads(b)["sessionId"] for b in drain(rt.sqs, collect_queue))
    withheld = sorted(world.dead)[3]
    if sender_fault:
        assert calls == [9, 10, 5]
        assert bodies == sorted(set(world.dead) - {withheld})
        assert any(r.getMessage() == "sessions not enqueued for collect" for r in caplog.records)
        assert metric_values("EnqueueFailures") == [1.0]
    else:
        assert calls == [9, 1, 10, 5]
        assert bodies == sorted(world.dead)


# -- resuming a long pass ----------------------------------------------------------------------


def test_sweep_out_of_time_saves_its_cursor_and_the_next_one_resumes(
    valkey: redis.Redis, pg: pg8000.native.Connection, make_runtime: Callable[..., Runtime]
) -> None:
    world = seed_world(valkey, pg, live=30, dead=3)
    valkey.hset(CANDIDATES, "vanished", 1.0)  # a candidate with no keys left
    clock = Clock()
    rt = make_runtime(clock=clock, scan_count=10)

    cut = sweep(rt, deadline=Deadline.after(0))

    assert cut.complete is False
    cursor = json.loads(valkey.get(CURSOR) or "{}")["valkey"]["standalone"]
    assert cursor > 0
    assert "vanished" in candidates(valkey)
    # What SCAN still holds from the saved cursor on is exactly what the next sweep must see.
    rest: set[str] = set()
    position = cursor
    while True:
        position, page = valkey.scan(position, match=f"{PREFIX}:session:*", count=10)
        rest |= {rt.keys.session_of(text(k)) or "" for k in page}
        if position == 0:
            break

    resumed = sweep(rt)

    assert resumed.complete is True and valkey.get(CURSOR) is None
    assert resumed.kept_live == sorted(rest & set(world.live))
    assert set(cut.new_candidates) | set(resumed.new_candidates) == set(world.dead)
    assert "vanished" in candidates(valkey)  # a resumed pass did not cover the whole keyspace

    clock.now += 1
    whole = sweep(rt)

    assert whole.complete is True
    assert set(candidates(valkey)) == set(world.dead)
