"""The run lock: sweep and full GC never overlap, a crashed holder's lock expires, only the
holder frees it, and the GC's bookkeeping keys survive even a forced full GC."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import pg8000.native
import pytest
import redis
from conftest import PREFIX, keys_of
from redis.exceptions import LockNotOwnedError

from session_gc.full import full_gc
from session_gc.runs import LOCK_TTL_S, exclusive
from session_gc.runtime import Runtime
from session_gc.settings import load_settings
from session_gc.sweep import sweep
from session_gc_local import seed

LOCK = f"{PREFIX}:gc:lock"
CANDIDATES = f"{PREFIX}:gc:candidates"
DEAD = 3000


def seed_due_sessions(client: redis.Redis, dead: int, live: int) -> tuple[set[str], set[str]]:
    """``dead`` sessions already due for collection (marked two hours ago) and ``live``
    ones; returns (dead keys, live keys)."""
    dead_ids = seed.session_ids(dead, label="dead")
    live_ids = seed.session_ids(live, label="live")
    dead_keys: set[str] = set()
    live_keys: set[str] = set()
    pipe = client.pipeline(transaction=False)
    for sid in dead_ids:
        dead_keys.update(seed.write_session(client, PREFIX, sid, live=False, pipe=pipe))
    for sid in live_ids:
        live_keys.update(seed.write_session(client, PREFIX, sid, live=True, pipe=pipe))
    marked = time.time() - 7200
    for i in range(0, dead, 1000):
        pipe.hset(CANDIDATES, mapping=dict.fromkeys(dead_ids[i : i + 1000], marked))
    pipe.execute()
    return dead_keys, live_keys


def run(kind: str, rt: Runtime) -> dict[str, Any]:
    if kind == "sweep":
        return sweep(rt).to_json()
    return full_gc(rt).to_json()


def collected_everything(kind: str, result: dict[str, Any]) -> bool:
    if kind == "sweep":
        return result["orphanedSessions"] == DEAD and len(result["totalCleaned"]) == DEAD
    return bool(result["valkeyKeys"] == DEAD * len(seed.SESSION_PARTS))


# -- two runs at once ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pair", [("sweep", "sweep"), ("sweep", "full")], ids=["sweep-vs-sweep", "sweep-vs-full"]
)
def test_two_runs_started_together_in_threads_one_runs_and_one_is_locked(
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    make_runtime: Callable[..., Runtime],
    pair: tuple[str, str],
) -> None:
    dead_keys, live_keys = seed_due_sessions(valkey, DEAD, DEAD)
    runtimes = [make_runtime() for _ in pair]
    start = threading.Barrier(len(pair))
    results: dict[int, dict[str, Any]] = {}

    def go(i: int) -> None:
        start.wait(timeout=30)
        results[i] = run(pair[i], runtimes[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(pair))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    stopped = [results[i].get("stopped") for i in range(len(pair))]
    assert sorted(stopped, key=str) == [None, "locked"]
    winner = stopped.index(None)
    assert collected_everything(pair[winner], results[winner])
    assert not keys_of(valkey) & dead_keys
    assert live_keys <= keys_of(valkey)
    assert not valkey.exists(LOCK)


def run_in_child(kind: str, valkey_url: str, database_url: str, start: Any, out: Any) -> None:
    """Run ``kind`` in a spawned process, with a Runtime of its own, as a second Lambda would."""
    rt = Runtime(load_settings({}, valkey_url=valkey_url, database_url=database_url))
    try:
        start.wait(timeout=30)
        out.put((kind, run(kind, rt)))
    finally:
        rt.close()


def test_sweep_and_full_gc_started_together_in_two_processes_do_not_overlap(
    valkey: redis.Redis, pg: pg8000.native.Connection, valkey_url: str, database_url: str
) -> None:
    dead_keys, live_keys = seed_due_sessions(valkey, DEAD, DEAD)
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(2)
    out = spawn.Queue()
    children = [
        spawn.Process(target=run_in_child, args=(kind, valkey_url, database_url, start, out))
        for kind in ("sweep", "full")
    ]
    for child in children:
        child.start()
    results = dict(out.get(timeout=60) for _ in children)
    for child in children:
        child.join(timeout=30)

    assert [child.exitcode for child in children] == [0, 0]
    stopped = {kind: result.get("stopped") for kind, result in results.items()}
    assert sorted(stopped.values(), key=str) == [None, "locked"]
    winner = next(kind for kind, why in stopped.items() if why is None)
    assert collected_everything(winner, results[winner])
    assert not keys_of(valkey) & dead_keys
    assert live_keys <= keys_of(valkey)
    assert not valkey.exists(LOCK)


# -- the lock's expiry and ownership ------------------------------------------------------------


def test_lock_of_a_crashed_holder_expires_and_the_next_sweep_runs(
    valkey: redis.Redis, pg: pg8000.native.Connection, rt: Runtime
) -> None:
    dead_keys, live_keys = seed_due_sessions(valkey, 1, 3)
    crashed = valkey.lock(LOCK, timeout=1)
    assert crashed.acquire(blocking=False)  # and never released

    refused = sweep(rt)

    assert refused.stopped == "locked" and refused.total_cleaned == []
    assert dead_keys <= keys_of(valkey)

    time.sleep(1.1)
    result = sweep(rt)

    assert result.stopped is None and result.orphaned_sessions == 1
    assert not keys_of(valkey) & dead_keys
    assert live_keys <= keys_of(valkey)


def test_lock_held_by_a_run_outlives_lambda_and_only_its_holder_frees_it(
    valkey: redis.Redis, make_runtime: Callable[..., Runtime]
) -> None:
    holder, other = make_runtime(), make_runtime()
    with exclusive(holder) as held:
        assert held
        token = valkey.get(LOCK)
        assert 900_000 < valkey.pttl(LOCK) <= LOCK_TTL_S * 1000
        intruder = valkey.lock(LOCK, timeout=10)
        intruder.local.token = b"not-the-holder"

        with pytest.raises(LockNotOwnedError):
            intruder.release()

        assert valkey.get(LOCK) == token
        assert sweep(other).stopped == "locked"
    assert not valkey.exists(LOCK)


def test_run_whose_lock_expired_and_was_retaken_leaves_the_new_holder_alone(
    valkey: redis.Redis, rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    with exclusive(rt) as held:
        assert held
        # Our lock expired mid-run and another run took it.
        valkey.set(LOCK, "another-run", ex=60)

    assert valkey.get(LOCK) == b"another-run"
    assert any("run lock expired before release" in r.getMessage() for r in caplog.records)


# -- bookkeeping outside the session namespace --------------------------------------------------


def test_forced_full_gc_never_deletes_the_lock_cursors_or_candidates(
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    rt: Runtime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead_keys, live_keys = seed_due_sessions(valkey, 5, 5)
    bookkeeping = {
        f"{PREFIX}:gc:cursor:sweep": json.dumps({"valkey": {"standalone": 42}}),
        f"{PREFIX}:gc:cursor:other-run": "{}",
    }
    valkey.mset(bookkeeping)
    others = set(seed.write_bystanders(valkey, PREFIX, count=2))
    assert all(not rt.keys.gc_key(n).startswith(rt.keys.session_root) for n in ("lock", "x"))

    result = full_gc(rt, force=True)

    assert result.stopped is None and result.valkey_keys == len(dead_keys | live_keys)
    assert keys_of(valkey) == others | set(bookkeeping) | {CANDIDATES}
    assert valkey.hlen(CANDIDATES) == 5
    # Had the run deleted its own lock key on the way, releasing it would have failed.
    assert not any("run lock expired" in r.getMessage() for r in caplog.records)
    assert not valkey.exists(LOCK)
