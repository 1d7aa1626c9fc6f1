"""A Lambda container thawed after a pause finds its connections dropped server-side; the
next invocation must reconnect and do its work, not fail."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pg8000.native
import redis
from conftest import PREFIX, keys_of

from session_gc_local import seed
from session_gc_local.invoke import LambdaContext


def _drop_gc_connections(valkey: redis.Redis, pg: pg8000.native.Connection) -> tuple[int, int]:
    """What a NAT timeout or failover does to an idle Lambda: server-side disconnects."""
    killed_valkey = int(valkey.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
    rows = pg.run(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'session-gc' AND pid <> pg_backend_pid()"
    )
    return killed_valkey, int(rows[0][0])


def test_full_gc_survives_connections_killed_between_invocations(
    handler: Callable[[str], ModuleType],
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
) -> None:
    full = handler("full_gc")
    seed.write_session(valkey, PREFIX, "first", live=False)
    seed.add_logs(pg, "first", count=3, age_hours=30)
    assert full.lambda_handler({}, LambdaContext())["valkeyKeys"] == 5

    killed = _drop_gc_connections(valkey, pg)
    assert killed[0] >= 1 and killed[1] == 1  # the warm container really lost both

    seed.write_session(valkey, PREFIX, "second", live=False)
    seed.add_logs(pg, "second", count=4, age_hours=30)
    result = full.lambda_handler({}, LambdaContext())

    assert result["valkeyKeys"] == 5
    assert result["logsDemoted"] == 4
    assert not any(k.startswith(f"{PREFIX}:session:") for k in keys_of(valkey))


def test_collect_survives_connections_killed_between_invocations(
    handler: Callable[[str], ModuleType],
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
) -> None:
    collect = handler("collect")
    for sid in ("a1", "a2"):
        seed.write_session(valkey, PREFIX, sid, live=False)
        seed.add_logs(pg, sid, count=2)
    first = collect.lambda_handler(seed.sqs_event(seed.session_bodies(["a1"])), LambdaContext())
    assert first == {"batchItemFailures": []}

    _drop_gc_connections(valkey, pg)
    second = collect.lambda_handler(seed.sqs_event(seed.session_bodies(["a2"])), LambdaContext())

    assert second == {"batchItemFailures": []}
    assert keys_of(valkey) == set()
    assert pg.run("SELECT count(*) FROM agent_logs WHERE tier = 'hot'") == [[0]]
