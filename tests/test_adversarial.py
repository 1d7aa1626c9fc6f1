"""Adversarial inputs: odd ids, odd keys, odd prefixes, odd messages, odd heartbeats, odd files.

Every deletion test proves the exact set of keys (rows, files) that went and that everything
else stayed. Valkey tests run through both page engines, the pipelined one (standalone) and
the plain client path (the one cluster mode uses), which must agree key for key.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pg8000.native
import pytest
import redis
from conftest import EVENTS, PREFIX

from session_gc.cli import main
from session_gc.collect import collect_sessions, parse_message
from session_gc.errors import BadEvent, ConfigError, InvalidSessionId
from session_gc.events import parse_full_gc_event
from session_gc.full import full_gc
from session_gc.ids import KeySpace
from session_gc.runtime import Runtime
from session_gc.settings import Settings, load_settings
from session_gc.stores.temp import DirTempStore
from session_gc.stores.valkey import ValkeyStore
from session_gc.sweep import sweep
from session_gc_local import seed
from session_gc_local.invoke import LambdaContext

ROOT = f"{PREFIX}:session:".encode()

# Keys of well-formed sessions, by the id the docs say owns them (plain and hash-tagged).
OWNED: dict[str, set[bytes]] = {
    "abc": {
        ROOT + b"abc:x",
        ROOT + b"{abc}:y",
        ROOT + b"abc:",  # "{anything}" may be empty
        ROOT + b"{abc}:",
        ROOT + b"abc:\xff\xfe",  # the id is fine; the rest of the key is not UTF-8
    },
    "ab": {ROOT + b"ab:x"},
    "abcd": {ROOT + b"abcd:x"},
    "ABC": {ROOT + b"ABC:x"},
    "a_c": {ROOT + b"a_c:x"},
    "heartbeat": {ROOT + b"heartbeat:x"},
    "l" * 200: {ROOT + b"l" * 200 + b":x"},
}
# Keys under the session root that no valid id owns: no run may ever delete them.
MALFORMED: set[bytes] = {
    ROOT,
    ROOT + b"abc",
    ROOT + b"{abc}",
    ROOT + b":x",
    ROOT + b"{}:x",
    ROOT + b"{abc:x",
    ROOT + b"{abc}x:y",
    ROOT + b"{ab}c}:x",
    ROOT + b"{{abc}}:x",
    ROOT + b"{abc\xe2}:x",
    ROOT + b"\xff:x",
    ROOT + b"abc\xff:x",
    ROOT + b"abc\x00:x",
    ROOT + b"a\rb:x",
    ROOT + b"ab\nc:x",
    ROOT + b"a%b:x",
    ROOT + b"a^b:x",
    ROOT + b"a{b}:x",
    ROOT + b"ab*:x",
    ROOT + b"a?c:x",
    ROOT + b"a[b]c:x",
    ROOT + b"a\\bc:x",
    ROOT + b"m" * 201 + b":x",
    "mosaic:session:straße:x".encode(),
    "mosaic:session:café:x".encode(),
    "mosaic:session:\u0430bc:x".encode(),  # Cyrillic a
    "mosaic:session:ab\u200bc:x".encode(),  # zero-width space
}
BYSTANDERS: set[bytes] = {
    b"mosaic:channel:abc:x",
    b"mosaic:gc:other",
    b"other:session:abc:x",
    b"mosaic:sessions:abc:x",
}


def all_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(count=1000))


def seed_exotic(client: redis.Redis) -> set[bytes]:
    keys = set().union(*OWNED.values(), MALFORMED, BYSTANDERS)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.set(key, "v")
    pipe.execute()
    return keys


@pytest.fixture(params=["pipelined", "plain"])
def path_rt(
    request: pytest.FixtureRequest,
    settings: Settings,
    valkey_url: str,
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
) -> Iterator[Callable[..., Runtime]]:
    """Runtimes whose Valkey store uses one page engine; small pages so a run spans many."""
    made: list[Runtime] = []

    def make(clock: Callable[[], float] = time.time, **overrides: object) -> Runtime:
        store = ValkeyStore(
            redis.Redis.from_url(valkey_url),
            KeySpace(PREFIX),
            pipelined=request.param == "pipelined",
            scan_count=10,
        )
        values = {**settings.__dict__, **overrides}
        rt = Runtime(Settings(**values), valkey=store, clock=clock)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


# -- ids and keys --------------------------------------------------------------------------


@pytest.mark.parametrize("sid", ["abc", "l" * 200, "heartbeat", "ABC", "a_c"])
def test_collect_deletes_exactly_the_keys_of_that_id_in_both_engines(
    path_rt: Callable[..., Runtime], valkey: redis.Redis, sid: str
) -> None:
    before = seed_exotic(valkey)

    results = collect_sessions(path_rt(), [sid])

    assert before - all_keys(valkey) == OWNED[sid]
    assert results[sid].cleaned.valkey_keys == len(OWNED[sid])


def test_full_gc_spares_every_malformed_session_key_in_both_engines(
    path_rt: Callable[..., Runtime], valkey: redis.Redis
) -> None:
    before = seed_exotic(valkey)

    result = full_gc(path_rt())

    owned = set().union(*OWNED.values())
    assert before - all_keys(valkey) == owned
    assert result.valkey_keys == len(owned)


def test_sweep_marks_and_collects_only_well_formed_ids_in_both_engines(
    path_rt: Callable[..., Runtime], valkey: redis.Redis
) -> None:
    before = seed_exotic(valkey)
    valkey.set(b"mosaic:session:alive:heartbeat", "1")
    now = [1000.0]

    sweep(path_rt(clock=lambda: now[0]))
    marked = {k.decode() for k in valkey.hkeys("mosaic:gc:candidates") if isinstance(k, bytes)}
    now[0] += 3600
    second = sweep(path_rt(clock=lambda: now[0], sweep_max_collect_ratio=1.0))

    assert marked == set(OWNED)
    assert set(second.due) == set(OWNED)
    assert before - all_keys(valkey) == set().union(*OWNED.values())


@pytest.mark.parametrize(
    "sid",
    [
        "straße",
        "café",
        "\u0430bc",
        "ab\u200bc",
        "a%b",
        "a^b",
        "{abc}",
        "a{b",
        "a\rb",
        "abc\n",
        "m" * 201,
        "\u212a",  # Kelvin sign: a letter to str.isalpha, not to the id rules
    ],
)
def test_collect_with_exotic_id_is_refused_and_deletes_nothing(
    rt: Runtime, valkey: redis.Redis, sid: str
) -> None:
    before = seed_exotic(valkey)

    with pytest.raises(InvalidSessionId):
        collect_sessions(rt, ["abc", sid])

    assert all_keys(valkey) == before


# -- key prefixes ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["a.b", "a-b", "x:y", "a+b"])
def test_full_gc_under_a_punctuated_prefix_stays_inside_its_own_namespace(
    make_runtime: Callable[..., Runtime], valkey: redis.Redis, prefix: str
) -> None:
    neighbours = ["a.b", "aXb", "a-b", "x:y", "x", "y", "a+b", "aab", "a"]
    for other in neighbours:
        seed.write_session(valkey, other, "s1", live=False)
    seed.write_session(valkey, prefix, "alive", live=True)
    before = all_keys(valkey)
    configured = load_settings(
        {"KEY_PREFIX": prefix}, valkey_url="redis://h", database_url="postgresql://u@h/db"
    )

    full_gc(make_runtime(key_prefix=configured.key_prefix))

    assert before - all_keys(valkey) == {
        k for k in before if k.startswith(f"{prefix}:session:s1:".encode())
    }


def test_key_prefix_nested_in_another_session_namespace_is_refused() -> None:
    with pytest.raises(ConfigError):
        load_settings(
            {"KEY_PREFIX": "mosaic:session:t1"},
            valkey_url="redis://h",
            database_url="postgresql://u@h/db",
        )


# -- SQS messages ----------------------------------------------------------------------------


def test_collect_handler_fails_exactly_the_malformed_messages_and_collects_the_rest(
    handler: Callable[[str], ModuleType], valkey: redis.Redis, context: LambdaContext
) -> None:
    for sid in ("a", "ab", "b", "c"):
        seed.write_session(valkey, PREFIX, sid, live=False)
    bodies = [
        '{"sessionId": "a"}',
        '{"sessionId": "a", "sessionId": "*"}',
        '{"sessionId": ["c"]}',
        '{"sessionId": 123}',
        '{"sessionId": "c\\u0000"}',
        "null",
        "[]",
        '"{\\"sessionId\\": \\"c\\"}"',
        json.dumps({"sessionId": "b", "pad": "x" * 200_000}),
        "placeholder for a record without a body",
    ]
    event = seed.sqs_event(bodies)
    del event["Records"][-1]["body"]
    ids = [r["messageId"] for r in event["Records"]]
    before = all_keys(valkey)

    reply = handler("collect").lambda_handler(event, context)

    failed = [item["itemIdentifier"] for item in reply["batchItemFailures"]]
    assert failed == ids[1:8] + ids[9:]
    assert {k.split(b":")[2] for k in before - all_keys(valkey)} == {b"a", b"b"}


def test_duplicate_session_id_fields_take_the_last_one_like_every_json_parser() -> None:
    assert parse_message('{"sessionId": "*", "sessionId": "a"}') == "a"
    with pytest.raises(InvalidSessionId):
        parse_message('{"sessionId": "a", "sessionId": "*"}')


# -- heartbeats ------------------------------------------------------------------------------


def seed_heartbeat_variants(valkey: redis.Redis) -> set[bytes]:
    """Sessions kept alive by odd heartbeats, plus one dead session; returns the dead keys."""
    seed.write_session(valkey, PREFIX, "plain", live=False)
    valkey.set("mosaic:session:{plain}:heartbeat", "1")
    seed.write_session(valkey, PREFIX, "tagged", live=False, tagged=True)
    valkey.set("mosaic:session:tagged:heartbeat", "1")
    seed.write_session(valkey, PREFIX, "hashed", live=False)
    valkey.hset("mosaic:session:hashed:heartbeat", "at", "1")
    seed.write_session(valkey, PREFIX, "zset", live=False)
    valkey.zadd("mosaic:session:{zset}:heartbeat", {"x": 1})
    return {k.encode() for k in seed.write_session(valkey, PREFIX, "dead", live=False)}


def test_any_heartbeat_spelling_or_type_spares_the_session_in_collect_and_full_gc(
    path_rt: Callable[..., Runtime], valkey: redis.Redis
) -> None:
    dead = seed_heartbeat_variants(valkey)
    live_ids = ["plain", "tagged", "hashed", "zset"]

    results = collect_sessions(path_rt(), [*live_ids, "dead"])
    assert [results[sid].skipped for sid in live_ids] == ["live"] * 4
    full = full_gc(path_rt())

    assert full.live_sessions_skipped == 4
    assert not dead & all_keys(valkey)
    assert {k.split(b":")[2].strip(b"{}") for k in all_keys(valkey)} == {
        s.encode() for s in live_ids
    }


def test_any_heartbeat_spelling_or_type_keeps_the_session_off_the_sweep_list(
    path_rt: Callable[..., Runtime], valkey: redis.Redis
) -> None:
    dead = seed_heartbeat_variants(valkey)
    before = all_keys(valkey)
    now = [1000.0]

    first = sweep(path_rt(clock=lambda: now[0], sweep_max_collect_ratio=1.0))
    now[0] += 3600
    second = sweep(path_rt(clock=lambda: now[0], sweep_max_collect_ratio=1.0))

    assert first.kept_live == second.kept_live == ["hashed", "plain", "tagged", "zset"]
    assert second.due == ["dead"]
    assert before - all_keys(valkey) == dead


def test_heartbeat_expiring_between_sweeps_starts_a_full_grace_period(
    make_runtime: Callable[..., Runtime], valkey: redis.Redis
) -> None:
    owned = {k.encode() for k in seed.write_session(valkey, PREFIX, "fading", live=False)}
    valkey.set("mosaic:session:fading:heartbeat", "1", px=200)
    seed.write_session(valkey, PREFIX, "alive", live=True)
    now = [1000.0]

    first = sweep(make_runtime(clock=lambda: now[0]))
    time.sleep(0.3)
    now[0] += 3000
    second = sweep(make_runtime(clock=lambda: now[0], sweep_max_collect_ratio=1.0))
    kept = owned <= all_keys(valkey)
    now[0] += 3600
    third = sweep(make_runtime(clock=lambda: now[0], sweep_max_collect_ratio=1.0))

    assert "fading" in first.kept_live
    assert (second.new_candidates, second.due, kept) == (["fading"], [], True)
    assert third.due == ["fading"]
    assert not owned & all_keys(valkey)


# -- PostgreSQL ------------------------------------------------------------------------------


def test_demotion_matches_ids_exactly_never_by_case_or_like_wildcards(
    rt: Runtime, pg: pg8000.native.Connection
) -> None:
    lookalikes = ["ABC", "Abc", "abcd", "ab", "abc ", "a%", "a'c", "a_c"]
    for sid in ["abc", *lookalikes]:
        seed.add_logs(pg, sid, count=2)

    collect_sessions(rt, ["abc"])
    moved = rt.logs.demote_sessions(["a%", "a'c"])

    assert moved == {"a%": 2, "a'c": 2}
    tiers = dict(
        pg.run("SELECT session_id, string_agg(DISTINCT tier, ',') FROM agent_logs GROUP BY 1")
    )
    assert tiers == {
        "abc": "warm",
        "a%": "warm",
        "a'c": "warm",
        **{sid: "hot" for sid in lookalikes if sid not in ("a%", "a'c")},
    }


# -- temp files ------------------------------------------------------------------------------


def test_removing_a_session_folder_unlinks_links_and_never_reaches_case_variants(
    tmp_path: Path,
) -> None:
    for name in ("abc", "ABC", "Abc", "abcd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f1").write_text("x")
    folder = tmp_path / "abc"
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "to-dir").symlink_to(tmp_path / "abcd")
    (folder / "to-file").symlink_to(tmp_path / "ABC" / "f1")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..")
    store = DirTempStore(tmp_path)

    removal = store.remove_session("abc")

    assert (removal.removed, removal.failed) == (5, [])
    assert sorted(os.listdir(tmp_path)) == ["ABC", "Abc", "abcd"]
    assert all((tmp_path / name / "f1").read_text() == "x" for name in ("ABC", "Abc", "abcd"))


def test_fifo_socket_or_symlink_named_like_a_session_is_neither_listed_nor_removed(
    tmp_path: Path,
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    os.mkfifo(tmp_path / "fifo1")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock1"))
    (tmp_path / "link1").symlink_to(tmp_path / "real")
    store = DirTempStore(tmp_path)

    listed = list(store.session_ids())
    removals = {name: store.remove_session(name) for name in ("fifo1", "sock1", "link1")}
    sock.close()

    assert listed == ["real"]
    assert all(r.removed == 0 and len(r.failed) == 1 for r in removals.values())
    assert sorted(os.listdir(tmp_path)) == ["fifo1", "link1", "real", "sock1"]
    assert (tmp_path / "real" / "f").exists()


# -- invoke events and dry runs --------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        {"dryRun": True, "dryRun ": False},
        {"dryRun": True, "DryRun": False},
        '{"dryRun": true}',
        {"dryRun": "false"},
        {"dryRun": 0},
    ],
)
def test_full_gc_event_that_could_flip_a_dry_run_is_rejected(event: object) -> None:
    with pytest.raises(BadEvent):
        parse_full_gc_event(event)


def test_scheduled_sweep_event_carrying_dry_run_changes_nothing(
    handler: Callable[[str], ModuleType], valkey: redis.Redis, context: LambdaContext
) -> None:
    seed.write_session(valkey, PREFIX, "dead", live=False)
    seed.write_session(valkey, PREFIX, "alive", live=True)
    before = all_keys(valkey)
    event = {**json.loads((EVENTS / "sweep.json").read_text()), "dryRun": True}

    handler("sweep").lambda_handler(event, context)

    assert all_keys(valkey) == before


def test_cli_collect_with_dry_run_environment_changes_nothing(
    handler_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    restore_cli_logging: None,
) -> None:
    seed.write_session(valkey, PREFIX, "dead", live=False)
    before = all_keys(valkey)
    monkeypatch.setenv("DRY_RUN", "true")

    code = main(["collect", "dead", "--json", "--quiet"])

    assert code == 0
    assert all_keys(valkey) == before
