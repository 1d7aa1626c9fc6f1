"""collect: the SQS handler cleans exactly the sessions its messages name, and fails per message."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pg8000.native
import pytest
import redis
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from conftest import EVENTS, PREFIX, keys_of
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from session_gc.collect import collect_sessions
from session_gc.observability import metrics
from session_gc.runtime import Runtime
from session_gc_local import seed
from session_gc_local.invoke import LambdaContext

LogRow = tuple[Any, ...]  # id, session_id, tier, created_at


@pytest.fixture(autouse=True)
def no_metrics_left_behind() -> Iterator[None]:
    # Core calls made without a handler record metrics nobody flushes; drop them.
    yield
    metrics.clear_metrics()


def logs(pg: pg8000.native.Connection) -> dict[int, LogRow]:
    rows = pg.run("SELECT id, session_id, tier, created_at FROM agent_logs ORDER BY id")
    return {row[0]: tuple(row) for row in rows}


def failures(response: dict[str, Any]) -> set[str]:
    return {item["itemIdentifier"] for item in response["batchItemFailures"]}


def message_ids(event: dict[str, Any]) -> list[str]:
    return [record["messageId"] for record in event["Records"]]


def seed_world(
    valkey: redis.Redis, pg: pg8000.native.Connection, *dead: str, tagged: tuple[str, ...] = ()
) -> set[str]:
    """``dead`` sessions (those in ``tagged`` with hash-tagged keys) plus everything that must
    outlive their collection; returns the keys of ``dead``."""
    doomed: set[str] = set()
    for sid in dead:
        doomed |= set(seed.write_session(valkey, PREFIX, sid, live=False, tagged=sid in tagged))
        seed.add_logs(pg, sid, count=3)
        seed.add_logs(pg, sid, count=2, tier="cold")
    # Bystanders: a session whose id extends a collected one, an unrelated dead one (plain
    # and hash-tagged), a live one, channel keys, other prefixes and the GC's own keys.
    for sid in [f"{d}x" for d in dead] + ["bystander"]:
        seed.write_session(valkey, PREFIX, sid, live=False)
        seed.add_logs(pg, sid, count=2)
    seed.write_session(valkey, PREFIX, "tagged-bystander", live=False, tagged=True)
    seed.write_session(valkey, PREFIX, "alive", live=True)
    seed.add_logs(pg, "alive", count=2)
    seed.write_bystanders(valkey, PREFIX, count=3)
    valkey.hset(f"{PREFIX}:gc:candidates", "bystander", "1764763200")
    return doomed


def test_contract_batch_fails_exactly_the_bad_messages_and_collects_the_valid_ones(
    handler: Callable[[str], ModuleType],
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    context: LambdaContext,
) -> None:
    doomed = seed_world(valkey, pg, "abc", "s-2", tagged=("s-2",))
    keys_before, logs_before = keys_of(valkey), logs(pg)
    bad = ["not-json", '{"sessionId": null}', '{"sessionId": "*"}']
    event = seed.sqs_event([*bad, *seed.session_bodies(["abc", "s-2"])])

    response = handler("collect").lambda_handler(event, context)

    assert failures(response) == set(message_ids(event)[:3])
    assert keys_of(valkey) == keys_before - doomed
    logs_after = logs(pg)
    assert logs_after.keys() == logs_before.keys()
    for row_id, (_, sid, tier, created) in logs_before.items():
        if sid in ("abc", "s-2") and tier == "hot":
            assert logs_after[row_id] == (row_id, sid, "warm", created)
        else:
            assert logs_after[row_id] == logs_before[row_id]


def test_recollecting_a_session_with_nothing_left_succeeds_with_zero_counts(
    handler: Callable[[str], ModuleType],
    rt: Runtime,
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    context: LambdaContext,
) -> None:
    seed_world(valkey, pg, "gone")
    event = seed.sqs_event(seed.session_bodies(["gone"]))
    collect = handler("collect")
    assert failures(collect.lambda_handler(event, context)) == set()
    keys_before, logs_before = keys_of(valkey), logs(pg)

    again = collect.lambda_handler(event, context)
    results = collect_sessions(rt, ["gone"])

    assert failures(again) == set()
    assert results["gone"].to_json() == {"sessionId": "gone", "cleaned": {}}
    assert keys_of(valkey) == keys_before
    assert logs(pg) == logs_before


def test_collect_of_a_session_with_a_heartbeat_skips_it_and_does_not_fail(
    handler: Callable[[str], ModuleType],
    rt: Runtime,
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    context: LambdaContext,
) -> None:
    seed_world(valkey, pg)
    keys_before, logs_before = keys_of(valkey), logs(pg)
    event = seed.sqs_event(seed.session_bodies(["alive"]))

    response = handler("collect").lambda_handler(event, context)
    results = collect_sessions(rt, ["alive"])

    assert failures(response) == set()
    assert results["alive"].skipped == "live"
    assert results["alive"].to_json()["cleaned"] == {}
    assert keys_of(valkey) == keys_before
    assert logs(pg) == logs_before


def test_batch_of_only_bad_records_raises_and_deletes_nothing(
    handler: Callable[[str], ModuleType],
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    context: LambdaContext,
) -> None:
    seed_world(valkey, pg, "abc")
    keys_before, logs_before = keys_of(valkey), logs(pg)
    event = seed.sqs_event(["not-json", '{"sessionId": "ab*"}', '{"sessionId": "abc:meta"}'])

    # Powertools raises when every record of a batch failed, so SQS retries the whole batch.
    with pytest.raises(BatchProcessingError, match="All records failed"):
        handler("collect").lambda_handler(event, context)

    assert keys_of(valkey) == keys_before
    assert logs(pg) == logs_before


@pytest.fixture
def unreachable_database(
    handler_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DATABASE_URL names a socket directory where no PostgreSQL listens."""
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres:@/postgres?host={tmp_path}/none")


@pytest.mark.usefixtures("unreachable_database")
def test_collect_with_postgres_unreachable_fails_every_valid_record_and_changes_no_log(
    handler: Callable[[str], ModuleType],
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    context: LambdaContext,
) -> None:
    doomed = seed_world(valkey, pg, "abc", "s-2")
    keys_before, logs_before = keys_of(valkey), logs(pg)
    collect = handler("collect")

    with pytest.raises(BatchProcessingError, match="PostgreSQL") as failed:
        collect.lambda_handler(seed.sqs_event(seed.session_bodies(["abc", "s-2"])), context)

    assert len(failed.value.child_exceptions) == 2
    assert logs(pg) == logs_before
    # Valkey goes first and its work stands: the retry finds no keys and demotes the logs.
    assert keys_of(valkey) == keys_before - doomed


@pytest.fixture
def temp_root(handler_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A directory temp store the handlers are configured with (TEMP_STORE_URL=file://...)."""
    root = tmp_path / "temp"
    root.mkdir()
    monkeypatch.setenv("TEMP_STORE_URL", f"file://{root}")
    return root


def test_temp_folder_that_cannot_be_removed_fails_only_that_sessions_record(
    handler: Callable[[str], ModuleType],
    temp_root: Path,
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    context: LambdaContext,
) -> None:
    root, outside = temp_root, temp_root.parent / "outside"
    (root / "good" / "nested").mkdir(parents=True)
    (root / "good" / "nested" / "a.txt").write_text("a")
    (root / "good" / "b.txt").write_text("b")
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    seed_world(valkey, pg, "good", "linked")
    event = seed.sqs_event(seed.session_bodies(["good", "linked"]))

    response = handler("collect").lambda_handler(event, context)

    _, linked_id = message_ids(event)
    assert failures(response) == {linked_id}
    assert not (root / "good").exists()
    assert (root / "linked").is_symlink()
    assert (outside / "precious.txt").read_text() == "keep"


def test_collect_with_dry_run_env_changes_nothing(
    handler: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    context: LambdaContext,
) -> None:
    seed_world(valkey, pg, "abc", "s-2")
    size, keys_before, logs_before = valkey.dbsize(), keys_of(valkey), logs(pg)
    monkeypatch.setenv("DRY_RUN", "true")
    event = seed.sqs_event(seed.session_bodies(["abc", "s-2"]))

    response = handler("collect").lambda_handler(event, context)

    assert failures(response) == set()
    assert valkey.dbsize() == size
    assert keys_of(valkey) == keys_before
    assert logs(pg) == logs_before


def test_sample_collect_event_is_accepted_and_collects_its_sessions(
    handler: Callable[[str], ModuleType],
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    context: LambdaContext,
) -> None:
    event = json.loads((EVENTS / "collect.json").read_text())
    ids = [json.loads(record["body"])["sessionId"] for record in event["Records"]]
    assert ids == ["sess-demo-0001", "sess-demo-0002"]
    doomed = seed_world(valkey, pg, *ids)
    keys_before = keys_of(valkey)

    response = handler("collect").lambda_handler(event, context)

    assert response == {"batchItemFailures": []}
    assert keys_of(valkey) == keys_before - doomed
    hot = pg.run(
        "SELECT count(*) FROM agent_logs WHERE session_id = ANY(:ids) AND tier = 'hot'", ids=ids
    )
    assert hot == [[0]]


# -- any batch ---------------------------------------------------------------------------------

EXISTING = ["h-0", "h-1", "h-2", "h.3", "h@4"]
LIVE = ["live-0", "live-1"]
MISSING = ["ghost-0", "ghost-1"]
BYSTANDERS = ["h-0x", "h-10", "other"]

valid_ids = st.sampled_from(EXISTING + LIVE + MISSING)
invalid_ids = st.one_of(
    st.builds(
        lambda head, glob, tail: f"{head}{glob}{tail}",
        st.sampled_from(["", "h-", "h-0", "live-"]),
        st.sampled_from(["*", "?", "[", "]", "\\", "[a-z]"]),
        st.sampled_from(["", "0", "*", "x"]),
    ),
    st.sampled_from(["h-0:meta", ":", "h-0:", "{h-0}", ""]),
    st.sampled_from([" ", "h-0 ", " h-1", "h\t2", "h-0\n", "\u00a0h-0"]),
    st.integers(201, 400).map(lambda n: "h" * n),
)
malformed_bodies = st.one_of(
    st.sampled_from(
        ["not-json", "", "{}", "[]", '"h-0"', '{"session": "h-0"}', "{'sessionId': 'h-0'}"]
    ),
    st.sampled_from([None, 7, ["h-0"], {"id": "h-0"}, True]).map(
        lambda value: json.dumps({"sessionId": value})
    ),
)
messages = st.one_of(
    valid_ids.map(lambda sid: ("valid", sid)),
    invalid_ids.map(lambda sid: ("bad", json.dumps({"sessionId": sid}))),
    malformed_bodies.map(lambda body: ("bad", body)),
)


@pytest.fixture
def collect_handler(handler: Callable[[str], ModuleType]) -> ModuleType:
    """One cold start shared by every hypothesis example of a test."""
    return handler("collect")


@hsettings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(messages, min_size=1, max_size=10))
def test_any_batch_fails_exactly_the_bad_messages_and_collects_exactly_the_dead_sessions(
    collect_handler: ModuleType,
    valkey: redis.Redis,
    context: LambdaContext,
    batch: list[tuple[str, str]],
) -> None:
    valkey.flushdb()
    owned = {
        sid: set(seed.write_session(valkey, PREFIX, sid, live=False))
        for sid in EXISTING + BYSTANDERS
    }
    for sid in LIVE:
        seed.write_session(valkey, PREFIX, sid, live=True)
    seed.write_bystanders(valkey, PREFIX, count=2)
    keys_before = keys_of(valkey)
    event = seed.sqs_event(
        [value if kind == "bad" else json.dumps({"sessionId": value}) for kind, value in batch]
    )
    bad = {mid for mid, (kind, _) in zip(message_ids(event), batch, strict=True) if kind == "bad"}
    named = {value for kind, value in batch if kind == "valid"}

    if bad == set(message_ids(event)):
        with pytest.raises(BatchProcessingError):
            collect_handler.lambda_handler(event, context)
    else:
        assert failures(collect_handler.lambda_handler(event, context)) == bad

    gone = set().union(*(owned[sid] for sid in named if sid in owned))
    assert keys_of(valkey) == keys_before - gone
