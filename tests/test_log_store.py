"""LogStore against a real PostgreSQL: exactly the chosen hot rows move to warm, in batches."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pg8000.native
import pytest
from conftest import connect_pg

from session_gc.errors import SchemaMissing, StoreUnavailable
from session_gc.settings import parse_database_url
from session_gc.stores.logs import LogStore
from session_gc_local.seed import add_logs

MakeLogs = Callable[..., LogStore]
Row = tuple[int, str, str, datetime]


@pytest.fixture
def make_logs(database_url: str, pg: pg8000.native.Connection) -> Iterator[MakeLogs]:
    """LogStores on the test database (agent_logs emptied by ``pg``), closed afterwards."""
    made: list[LogStore] = []

    def make(url: str = database_url, **options: Any) -> LogStore:
        store = LogStore(parse_database_url(url), **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def table(pg: pg8000.native.Connection) -> dict[int, Row]:
    rows = pg.run("SELECT id, session_id, tier, created_at FROM agent_logs")
    return {r[0]: (r[0], r[1], r[2], r[3]) for r in rows}


def demoted(before: dict[int, Row], ids: set[int]) -> dict[int, Row]:
    """``before`` with the rows in ``ids`` turned warm: what the table should hold after."""
    return {i: (i, s, "warm" if i in ids else t, c) for i, (_, s, t, c) in before.items()}


def hot_ids(rows: dict[int, Row], *, session: str | None = None) -> set[int]:
    return {i for i, (_, s, t, _) in rows.items() if t == "hot" and session in (None, s)}


def test_demote_sessions_moves_only_that_sessions_hot_rows(
    make_logs: MakeLogs, pg: pg8000.native.Connection
) -> None:
    add_logs(pg, "a", count=5)
    add_logs(pg, "a", count=2, tier="warm")
    add_logs(pg, "a", count=3, tier="cold")
    add_logs(pg, "b", count=4)
    add_logs(pg, "ab", count=2)
    before = table(pg)
    store = make_logs()

    moved = store.demote_sessions(["a"])

    assert moved == Counter({"a": 5})
    assert table(pg) == demoted(before, hot_ids(before, session="a"))
    assert store.demote_sessions(["a"]) == Counter()
    assert table(pg) == demoted(before, hot_ids(before, session="a"))


def test_demote_sessions_in_small_batches_moves_every_row_and_counts_exactly(
    make_logs: MakeLogs, pg: pg8000.native.Connection
) -> None:
    add_logs(pg, "a", count=30)
    add_logs(pg, "b", count=20, age_hours=3)
    add_logs(pg, "c", count=6)
    before = table(pg)

    moved = make_logs(batch_size=7).demote_sessions(["a", "b", "a"])

    assert moved == Counter({"a": 30, "b": 20})
    assert table(pg) == demoted(before, hot_ids(before) - hot_ids(before, session="c"))


def test_demote_sessions_with_70000_ids_is_one_parameter_and_moves_only_listed_ids(
    make_logs: MakeLogs, pg: pg8000.native.Connection
) -> None:
    # pg8000 caps a statement at 65,535 parameters; the ids travel as one array instead.
    ids = [f"s-{i}" for i in range(70_000)]
    for sid in ("s-0", "s-35000", "s-69999"):
        add_logs(pg, sid, count=3)
    add_logs(pg, "s-70000", count=3)
    add_logs(pg, "not-listed", count=2)
    before = table(pg)

    moved = make_logs().demote_sessions(ids)

    assert moved == Counter({"s-0": 3, "s-35000": 3, "s-69999": 3})
    listed = hot_ids(before) - hot_ids(before, session="s-70000")
    assert table(pg) == demoted(before, listed - hot_ids(before, session="not-listed"))


def test_demote_sessions_dry_run_counts_and_changes_nothing(
    make_logs: MakeLogs, pg: pg8000.native.Connection
) -> None:
    add_logs(pg, "a", count=5)
    add_logs(pg, "a", count=2, tier="warm")
    add_logs(pg, "b", count=4)
    add_logs(pg, "c", count=1)
    before = table(pg)

    counted = make_logs(batch_size=2).demote_sessions(["a", "b", "zzz"], dry_run=True)

    assert counted == Counter({"a": 5, "b": 4})
    assert table(pg) == before


def test_demote_sessions_with_no_ids_touches_nothing(
    make_logs: MakeLogs, pg: pg8000.native.Connection
) -> None:
    add_logs(pg, "a", count=2)
    before = table(pg)

    assert make_logs().demote_sessions([]) == Counter()
    assert table(pg) == before


@pytest.fixture
def database_time_zone(
    request: pytest.FixtureRequest, database_url: str, pg: pg8000.native.Connection
) -> Iterator[str]:
    """Give new connections to the test database a far-off TimeZone for one test."""
    zone: str = request.param
    database = parse_database_url(database_url).database
    pg.run(f"ALTER DATABASE {pg8000.native.identifier(database)} SET TimeZone = '{zone}'")
    try:
        yield zone
    finally:
        pg.run(f"ALTER DATABASE {pg8000.native.identifier(database)} RESET TimeZone")


@pytest.mark.parametrize(
    "database_time_zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago"], indirect=True
)
def test_cutoff_in_a_non_utc_session_demotes_only_rows_older_than_max_age(
    make_logs: MakeLogs, pg: pg8000.native.Connection, database_time_zone: str
) -> None:
    add_logs(pg, "recent", count=2, age_hours=20)
    add_logs(pg, "old", count=3, age_hours=25)
    before = table(pg)
    store = make_logs()
    assert store.conn.run("SHOW TimeZone") == [[database_time_zone]]

    cutoff = store.cutoff(24)
    progress = list(store.demote_older_than(cutoff))

    assert cutoff.tzinfo is not None
    assert sum(moved for moved, _ in progress) == 3
    assert table(pg) == demoted(before, hot_ids(before, session="old"))


def test_cutoff_is_aware_and_max_age_before_the_database_clock(
    make_logs: MakeLogs, pg: pg8000.native.Connection
) -> None:
    store = make_logs()
    [[now]] = pg.run("SELECT now()")

    cutoff = store.cutoff(24)

    assert cutoff.tzinfo is not None and cutoff.utcoffset() is not None
    assert abs((now - cutoff).total_seconds() - 24 * 3600) < 60


def seed_old_and_new(pg: pg8000.native.Connection) -> dict[int, Row]:
    """95 hot rows past a 24 h cutoff (in tied-timestamp groups) and 5 recent ones."""
    for sid, count, age in (("x", 40, 30), ("y", 35, 48), ("z", 20, 26), ("new", 5, 2)):
        add_logs(pg, sid, count=count, age_hours=age)
    add_logs(pg, "x", count=4, age_hours=40, tier="warm")
    add_logs(pg, "y", count=3, age_hours=40, tier="cold")
    return table(pg)


def test_demote_older_than_yields_per_batch_and_moves_exactly_the_old_rows(
    make_logs: MakeLogs, pg: pg8000.native.Connection
) -> None:
    before = seed_old_and_new(pg)
    store = make_logs(batch_size=10)
    cutoff = store.cutoff(24)
    assert store.count_older_than(cutoff) == 95

    progress = [moved for moved, _ in store.demote_older_than(cutoff)]

    assert progress == [10] * 9 + [5]
    assert table(pg) == demoted(before, hot_ids(before) - hot_ids(before, session="new"))
    assert store.count_older_than(cutoff) == 0


def test_demote_older_than_resumed_from_a_midway_position_moves_the_rest_once(
    make_logs: MakeLogs, pg: pg8000.native.Connection
) -> None:
    before = seed_old_and_new(pg)
    store = make_logs(batch_size=10)
    cutoff = store.cutoff(24)

    walk = store.demote_older_than(cutoff)
    first = [next(walk) for _ in range(4)]  # then the run stops, as on a Lambda timeout
    assert [moved for moved, _ in first] == [10] * 4
    assert store.count_older_than(cutoff) == 55

    rest = [moved for moved, _ in store.demote_older_than(cutoff, after=first[-1][1])]

    assert sum(rest) == 55
    assert table(pg) == demoted(before, hot_ids(before) - hot_ids(before, session="new"))
    assert [moved for moved, _ in store.demote_older_than(cutoff)] == []


def test_demote_older_than_dry_count_changes_nothing(
    make_logs: MakeLogs, pg: pg8000.native.Connection
) -> None:
    before = seed_old_and_new(pg)
    store = make_logs()

    assert store.count_older_than(store.cutoff(24)) == 95
    assert table(pg) == before


# -- schema checks -------------------------------------------------------------------------


@pytest.fixture
def empty_database(database_url: str, pg: pg8000.native.Connection) -> Iterator[str]:
    """A fresh database on the same server, without agent_logs; its URL."""
    name = f"nologs_{uuid.uuid4().hex[:8]}"
    pg.run(f"CREATE DATABASE {name}")
    parts = database_url.split("?", 1)
    base = parts[0].rsplit("/", 1)[0]
    url = f"{base}/{name}" + (f"?{parts[1]}" if len(parts) > 1 else "")
    try:
        yield url
    finally:
        pg.run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_database_without_agent_logs_raises_schema_missing_until_schema_applied(
    make_logs: MakeLogs, empty_database: str
) -> None:
    store = make_logs(empty_database)

    calls: list[Callable[[], object]] = [
        lambda: store.demote_sessions(["a"]),
        lambda: store.demote_sessions(["a"], dry_run=True),
        lambda: store.cutoff(24),
        lambda: store.count_older_than(datetime.now(UTC)),
        lambda: list(store.demote_older_than(datetime.now(UTC))),
        store.check,
    ]
    for call in calls:
        with pytest.raises(SchemaMissing, match="agent_logs"):
            call()

    store.apply_schema()
    conn = connect_pg(empty_database)
    try:
        add_logs(conn, "a", count=3)
    finally:
        conn.close()
    assert store.demote_sessions(["a"]) == Counter({"a": 3})


def test_table_without_tier_column_raises_schema_missing_naming_it(
    make_logs: MakeLogs, empty_database: str
) -> None:
    conn = connect_pg(empty_database)
    try:
        conn.run(
            "CREATE TABLE agent_logs "
            "(id bigint PRIMARY KEY, session_id text, created_at timestamptz)"
        )
    finally:
        conn.close()
    store = make_logs(empty_database)

    with pytest.raises(SchemaMissing, match="tier"):
        store.demote_sessions(["a"])
    # The shipped SQL creates what is missing but never alters a table it did not create.
    with pytest.raises(SchemaMissing, match="tier"):
        store.apply_schema()


# -- connection failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@/postgres?host=/nonexistent/session-gc-sock",
        "postgresql://u:s3cr3t-pw@127.0.0.1:1/db",
    ],
    ids=["missing-socket-dir", "closed-port"],
)
def test_unreachable_database_raises_store_unavailable_quickly(url: str) -> None:
    store = LogStore(parse_database_url(url), connect_timeout_s=1)
    started = time.monotonic()

    with pytest.raises(StoreUnavailable) as caught:
        store.demote_sessions(["a"])

    assert time.monotonic() - started < 3
    assert "PostgreSQL" in str(caught.value)
    assert "s3cr3t-pw" not in str(caught.value)
    store.close()


def store_backend(pg: pg8000.native.Connection, store: LogStore) -> int:
    [[pid]] = store.conn.run("SELECT pg_backend_pid()")
    named = pg.run(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'session-gc' AND pid = :p",
        p=pid,
    )
    assert named == [[pid]]
    return int(pid)


def terminate(pg: pg8000.native.Connection, pid: int) -> None:
    assert pg.run("SELECT pg_terminate_backend(:p)", p=pid) == [[True]]
    for _ in range(100):
        if not pg.run("SELECT 1 FROM pg_stat_activity WHERE pid = :p", p=pid):
            return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} still there after pg_terminate_backend")


@pytest.mark.parametrize("call", ["demote_sessions", "demote_older_than"])
def test_connection_killed_between_calls_is_reopened_by_the_next_call(
    make_logs: MakeLogs, pg: pg8000.native.Connection, call: str
) -> None:
    store = make_logs()
    add_logs(pg, "a", count=2, age_hours=30)
    assert store.demote_sessions(["a"]) == Counter({"a": 2})
    killed = store_backend(pg, store)
    terminate(pg, killed)
    add_logs(pg, "a", count=3, age_hours=30)

    if call == "demote_sessions":
        assert store.demote_sessions(["a"]) == Counter({"a": 3})
    else:
        assert sum(moved for moved, _ in store.demote_older_than(store.cutoff(24))) == 3

    assert store_backend(pg, store) != killed
    assert hot_ids(table(pg)) == set()
