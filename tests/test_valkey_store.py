"""ValkeyStore against a real Valkey: exactly the selected sessions' keys go, nothing else.

Every test runs twice: through the pipelined engine (standalone) and through the plain client
path (what cluster mode uses). Both must delete exactly the same keys.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable

import pytest
import redis
from conftest import PREFIX, keys_of
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from session_gc.errors import StoreUnavailable
from session_gc.ids import KeySpace
from session_gc.stores.valkey import Page, ValkeyStore
from session_gc_local import seed

KEYS = KeySpace(PREFIX)
MakeStore = Callable[..., ValkeyStore]


@pytest.fixture(params=[True, False], ids=["pipelined", "plain"])
def make_store(request: pytest.FixtureRequest, valkey: redis.Redis) -> MakeStore:
    def make(client: redis.Redis | None = None, **options: int) -> ValkeyStore:
        return ValkeyStore(client or valkey, KEYS, pipelined=request.param, **options)

    return make


def drain(pages: Iterable[Page]) -> tuple[Counter[str], set[str]]:
    """Run a walk to the end; returns keys removed per session and every live session seen."""
    removed: Counter[str] = Counter()
    live: set[str] = set()
    for page in pages:
        assert page.total == sum(page.removed.values())
        removed.update(page.removed)
        live |= page.live
    return removed, live


def write_neighbours(client: redis.Redis) -> set[str]:
    """Everything that must survive collecting session ``abc``."""
    keys = set(seed.write_bystanders(client, PREFIX, count=3))
    for lookalike in ("abcd", "ab", "xabc", "abc.1", "abc-"):
        keys |= set(seed.write_session(client, PREFIX, lookalike, live=False))
    keys |= set(seed.write_session(client, PREFIX, "ab", live=False, tagged=True))
    extra = [
        "mosaic:channel:abc:cursor",
        "mosaic:channel:{abc}:state",
        "other:session:abc:meta",
        "other:session:{abc}:meta",
        "mosaic:sessions:abc",
        "mosaic:session:abc",  # no separator after the id: not a session key
        "mosaic:gc:lock",
        "mosaic:gc:candidates",
        "mosaic:gc:cursor:abc",
        "Mosaic:session:abc:meta",
    ]
    for key in extra:
        client.set(key, "keep")
    return keys | set(extra)


def test_pages_only_one_session_deletes_exactly_its_keys(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    doomed = set(seed.write_session(valkey, PREFIX, "abc", live=False))
    doomed |= set(seed.write_session(valkey, PREFIX, "abc", live=False, tagged=True))
    doomed |= {"mosaic:session:abc:history:2024:q1", "mosaic:session:{abc}:x:{y}"}
    for key in ("mosaic:session:abc:history:2024:q1", "mosaic:session:{abc}:x:{y}"):
        valkey.set(key, "1")
    survivors = write_neighbours(valkey)
    before = keys_of(valkey)
    assert before == doomed | survivors
    types = {valkey.type(k) for k in doomed}
    assert types == {b"string", b"hash", b"list", b"set", b"stream"}

    removed, live = drain(make_store().pages(only=frozenset({"abc"})))

    assert removed == {"abc": len(doomed)}
    assert live == set()
    assert keys_of(valkey) == survivors


@pytest.mark.parametrize("tagged_heartbeat", [False, True], ids=["plain", "tagged"])
def test_pages_spare_live_keeps_a_session_with_a_heartbeat(
    make_store: MakeStore, valkey: redis.Redis, tagged_heartbeat: bool
) -> None:
    # The heartbeat may be spelled either way; the session's other keys use both spellings.
    seed.write_session(valkey, PREFIX, "abc", live=False)
    seed.write_session(valkey, PREFIX, "abc", live=False, tagged=True)
    heartbeat = KEYS.heartbeat_keys("abc")[1 if tagged_heartbeat else 0]
    valkey.set(heartbeat, "1", ex=120)
    write_neighbours(valkey)
    before = keys_of(valkey)

    removed, live = drain(make_store().pages(only=frozenset({"abc"}), spare_live=True))

    assert removed == {}
    assert live == {"abc"}
    assert keys_of(valkey) == before


def test_pages_without_spare_live_deletes_a_live_session(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    doomed = set(seed.write_session(valkey, PREFIX, "abc", live=True))
    doomed |= set(seed.write_session(valkey, PREFIX, "abc", live=True, tagged=True))
    survivors = write_neighbours(valkey)

    removed, live = drain(make_store().pages(only=frozenset({"abc"}), spare_live=False))

    assert removed == {"abc": len(doomed)}
    assert live == set()
    assert keys_of(valkey) == survivors


def seed_mixed(
    client: redis.Redis, *, dead: int = 6, live: int = 4
) -> tuple[dict[str, set[str]], set[str]]:
    """Dead sessions (returned with their keys), plus live sessions and bystanders (kept)."""
    pipe = client.pipeline(transaction=False)
    doomed = {
        sid: set(seed.write_session(client, PREFIX, sid, live=False, tagged=i % 2 == 1, pipe=pipe))
        for i, sid in enumerate(seed.session_ids(dead, label="dead"))
    }
    kept = set(seed.write_bystanders(client, PREFIX, count=3))
    for i, sid in enumerate(seed.session_ids(live, label="live")):
        kept |= set(
            seed.write_session(client, PREFIX, sid, live=True, tagged=i % 2 == 1, pipe=pipe)
        )
    pipe.execute()
    return doomed, kept


def test_pages_all_sessions_deletes_every_dead_session_and_nothing_else(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    dead, kept = seed_mixed(valkey)

    removed, live = drain(make_store(scan_count=20).pages(only=None))

    assert removed == {sid: len(keys) for sid, keys in dead.items()}
    assert live == set(seed.session_ids(4, label="live"))
    assert keys_of(valkey) == kept


def test_pages_with_many_sessions_in_one_page_judge_each_heartbeat(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    # Heartbeats are checked for groups of sessions at once; every group boundary must
    # still judge each session on its own.
    dead, kept = seed_mixed(valkey, dead=40, live=40)

    removed, live = drain(make_store(scan_count=5000).pages())

    assert removed == {sid: 5 for sid in dead}
    assert live == set(seed.session_ids(40, label="live"))
    assert keys_of(valkey) == kept


def test_pages_over_a_mostly_live_keyspace_judge_each_session_across_pages(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    # Where live sessions are common the pipelined engine stops grouping heartbeat checks
    # after a page; walking many small pages crosses that switch both ways.
    dead, kept = seed_mixed(valkey, dead=10, live=90)

    removed, live = drain(make_store(scan_count=15).pages())

    assert removed == {sid: 5 for sid in dead}
    assert live == set(seed.session_ids(90, label="live"))
    assert keys_of(valkey) == kept


def test_pages_dry_run_counts_like_a_real_run_and_changes_nothing(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    dead, _ = seed_mixed(valkey)
    before, size = keys_of(valkey), valkey.dbsize()

    removed, live = drain(make_store(scan_count=20).pages(dry_run=True))

    assert removed == {sid: len(keys) for sid, keys in dead.items()}
    assert live == set(seed.session_ids(4, label="live"))
    assert valkey.dbsize() == size
    assert keys_of(valkey) == before


def test_pages_never_delete_keys_whose_id_part_is_invalid(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    malformed = {
        "mosaic:session:*:meta",
        "mosaic:session:?:meta",
        "mosaic:session:[a-z]:meta",
        "mosaic:session:a b:x",
        "mosaic:session::x",
        "mosaic:session:{}:x",
        "mosaic:session:{*}:x",
        "mosaic:session:{abc:x",
        "mosaic:session:{abc}x:meta",
        "mosaic:session:{abc}}:x",
        "mosaic:session:abc}:x",
        "mosaic:session:{a{b}:x",
        "mosaic:session:caf\u00e9:x",
        "mosaic:session:a\\b:x",
        "mosaic:session:" + "a" * 201 + ":x",
    }
    for key in malformed:
        valkey.set(key, "keep")
    doomed = set(seed.write_session(valkey, PREFIX, "abc", live=True))

    removed, _ = drain(make_store().pages(only=None, spare_live=False))

    assert removed == {"abc": len(doomed)}
    assert keys_of(valkey) == malformed


def reset_stats(client: redis.Redis) -> None:
    client.config_resetstat()


def command_stats(client: redis.Redis) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = client.info("commandstats")
    return stats


def test_pages_unlink_thousands_of_keys_in_bounded_batches(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    pipe = valkey.pipeline(transaction=False)
    for i in range(3000):
        pipe.set(f"mosaic:session:{{abc}}:turn:{i}" if i % 3 else f"mosaic:session:abc:{i}", i)
    pipe.execute()
    survivors = write_neighbours(valkey)
    reset_stats(valkey)

    removed, _ = drain(make_store(scan_count=100, unlink_batch=100).pages(only=frozenset({"abc"})))

    stats = command_stats(valkey)
    assert removed == {"abc": 3000}
    assert keys_of(valkey) == survivors
    assert stats["cmdstat_unlink"]["calls"] >= 30
    for name, stat in stats.items():
        assert stat.get("failed_calls", 0) == 0, name
        assert stat.get("rejected_calls", 0) == 0, name


def test_pages_with_the_largest_unlink_batch_still_delete_everything(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    # GC_UNLINK_BATCH allows 10,000 keys in one UNLINK.
    pipe = valkey.pipeline(transaction=False)
    for i in range(9000):
        pipe.set(f"mosaic:session:abc:{i}", i)
    pipe.execute()
    survivors = write_neighbours(valkey)

    store = make_store(scan_count=20_000, unlink_batch=10_000)
    removed, _ = drain(store.pages(only=frozenset({"abc"})))

    assert removed == {"abc": 9000}
    assert keys_of(valkey) == survivors


def test_pages_with_empty_selection_sends_no_command(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    seed.write_session(valkey, PREFIX, "abc", live=False)
    before = keys_of(valkey)
    reset_stats(valkey)

    pages = list(make_store().pages(only=frozenset()))

    stats = command_stats(valkey)
    assert pages == []
    assert "cmdstat_unlink" not in stats
    assert "cmdstat_scan" not in stats
    assert keys_of(valkey) == before


def test_pages_resume_from_a_saved_cursor_finishes_the_session(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    pipe = valkey.pipeline(transaction=False)
    for i in range(400):
        pipe.set(f"mosaic:session:abc:{i}", i)
    pipe.execute()
    survivors = write_neighbours(valkey)
    store = make_store(scan_count=10)

    walk = store.pages(only=frozenset({"abc"}))
    first = next(walk)  # then the run stops, as on a Lambda timeout
    left = {k for k in keys_of(valkey) if k.startswith("mosaic:session:abc:")}
    assert first.cursor != 0
    assert len(left) == 400 - first.removed.get("abc", 0) > 0

    removed, _ = drain(store.pages(only=frozenset({"abc"}), start={first.node: first.cursor}))

    assert removed == {"abc": len(left)}
    assert keys_of(valkey) == survivors


def test_pages_stopped_early_leave_no_reply_behind_for_the_next_command(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    # The pipelined engine asks for the next page before it hands this one over; a caller
    # that stops there must not leave that reply for the next user of the connection.
    pipe = valkey.pipeline(transaction=False)
    for i in range(300):
        pipe.set(f"mosaic:session:abc:{i}", i)
    pipe.execute()
    valkey.set("mosaic:channel:abc:cursor", "still-here")
    store = make_store(scan_count=10)

    walk = store.pages(only=frozenset({"abc"}))
    first = next(walk)
    walk.close()

    assert first.cursor != 0
    for _ in range(3):  # whichever pooled connection comes next answers its own command
        assert valkey.get("mosaic:channel:abc:cursor") == b"still-here"
        assert store.live_sessions(["abc"]) == set()
    removed, _ = drain(store.pages(only=frozenset({"abc"})))
    assert removed["abc"] + first.total == 300
    assert keys_of(valkey) == {"mosaic:channel:abc:cursor"}


def test_pages_after_a_heartbeat_appears_delete_nothing_more_of_that_session(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    # The caller's own time with a page (saving a cursor, logging) must never sit between a
    # heartbeat check and the UNLINKs it allowed.
    ids = seed.session_ids(200, label="dead")
    pipe = valkey.pipeline(transaction=False)
    for sid in ids:
        seed.write_session(valkey, PREFIX, sid, live=False, pipe=pipe)
    pipe.execute()
    walk = make_store(scan_count=50).pages()

    first = next(walk)
    for sid in ids:  # every session comes back to life while the caller holds page one
        valkey.set(f"{PREFIX}:session:{sid}:heartbeat", "1")
    revived = keys_of(valkey)
    rest, live = drain(walk)

    assert first.total > 0
    assert sum(rest.values()) == 0
    assert keys_of(valkey) == revived
    assert live


def test_pages_with_health_checks_due_mid_walk_stay_in_step(
    make_store: MakeStore, valkey: redis.Redis, valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py may PING a connection before a command once it has been idle for the health
    # check interval; that PING must never meet a reply still owed to the walk.
    ids = seed.session_ids(60, label="dead")
    pipe = valkey.pipeline(transaction=False)
    for sid in ids:
        seed.write_session(valkey, PREFIX, sid, live=False, pipe=pipe)
    pipe.execute()
    valkey.set("mosaic:channel:abc:cursor", "still-here")
    client = redis.Redis.from_url(valkey_url, health_check_interval=0.05)
    store = make_store(client, scan_count=20)
    group = store._group

    def slow_group(raw: list[bytes], wanted: set[bytes] | None) -> dict[bytes, list[bytes]]:
        time.sleep(0.08)  # a slow client: every check is due by the next command
        return group(raw, wanted)

    monkeypatch.setattr(store, "_group", slow_group)

    removed, _ = drain(store.pages())

    assert removed == {sid: len(seed.SESSION_PARTS) for sid in ids}
    assert keys_of(valkey) == {"mosaic:channel:abc:cursor"}
    assert store.client.get("mosaic:channel:abc:cursor") == b"still-here"


def test_pipelined_store_refuses_a_client_that_decodes_responses(valkey_url: str) -> None:
    client = redis.Redis.from_url(valkey_url, decode_responses=True)

    with pytest.raises(ValueError, match="decode_responses"):
        ValkeyStore(client, KEYS, pipelined=True)


def test_pages_refused_unlink_names_the_step_and_deletes_nothing(
    make_store: MakeStore, valkey: redis.Redis, valkey_url: str
) -> None:
    doomed = set(seed.write_session(valkey, PREFIX, "abc", live=False))
    before = keys_of(valkey)
    # A real refusal: an ACL user that may look but not delete.
    valkey.acl_setuser(
        "gc-readonly", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-unlink"]
    )
    try:
        # One key per UNLINK: the refusal arrives with more replies still unread behind it.
        store = make_store(
            redis.Redis.from_url(valkey_url, username="gc-readonly", password="pw"),
            scan_count=2,
            unlink_batch=1,
        )

        refused = r"refused to unlink session keys: .* no permissions"
        with pytest.raises(StoreUnavailable, match=refused):
            drain(store.pages(only=frozenset({"abc"})))

        assert keys_of(valkey) == before
        assert doomed <= before
        # The refused connections were not handed back half-read.
        for _ in range(3):
            assert store.client.get(sorted(doomed)[0]) is not None
            assert store.live_sessions(["abc"]) == set()
    finally:
        valkey.acl_deluser("gc-readonly")


def test_pages_skip_a_node_marked_finished(make_store: MakeStore, valkey: redis.Redis) -> None:
    seed.write_session(valkey, PREFIX, "abc", live=False)
    before = keys_of(valkey)
    store = make_store()

    pages = list(store.pages(start={node: -1 for node in store.nodes()}))

    assert pages == []
    assert keys_of(valkey) == before


def test_live_sessions_returns_exactly_the_ids_with_a_heartbeat(
    make_store: MakeStore, valkey: redis.Redis
) -> None:
    seed.write_session(valkey, PREFIX, "plain-live", live=True)
    seed.write_session(valkey, PREFIX, "tagged-live", live=True, tagged=True)
    seed.write_session(valkey, PREFIX, "dead", live=False)
    seed.write_session(valkey, PREFIX, "live", live=False)  # prefix of both live ids
    valkey.set("other:session:foreign:heartbeat", "1")
    valkey.set("mosaic:channel:chan:heartbeat", "1")

    live = make_store().live_sessions(
        ["plain-live", "tagged-live", "dead", "live", "foreign", "chan", "missing", "plain-live"]
    )

    assert live == {"plain-live", "tagged-live"}
    assert make_store().live_sessions([]) == set()


# -- property: random keyspaces ------------------------------------------------------------

# A small alphabet makes ids that are prefixes of each other (a, ab, a.b, a-).
ids = st.text(alphabet="ab.-_@", min_size=1, max_size=3)
parts = st.sampled_from(["meta", "history", "ctx:1", "{x}", "tools:{y}:z", ""])
kinds = st.sampled_from(["string", "hash", "list", "set", "stream"])
sessions = st.dictionaries(
    ids,
    st.tuples(
        st.booleans(),  # live
        # (part, tagged?) -> key type
        st.dictionaries(st.tuples(parts, st.booleans()), kinds, min_size=1, max_size=4),
    ),
    max_size=6,
)
# Keys under the session root that may or may not parse: near misses of both spellings
# ({a}x:meta, a}:meta, {*}:meta, ...) and character soup. The parser must agree either way.
near_miss = st.tuples(
    st.sampled_from(["", "{"]),
    ids | st.sampled_from(["", "*", "a b", "a?", "\u00e9"]),
    st.sampled_from(["", "}", "}}"]),
    st.sampled_from(["", "x", "{"]),
    st.sampled_from([":", "", "}:"]),
    parts,
).map("".join)
soup = st.lists(st.sampled_from(["a", "{", "}", ":", "*", " ", "\\", "\u00e9"]), max_size=6)
bad_id = st.builds(
    "{1}{0}{2}:{3}".format,
    st.sampled_from(["*", "a*", "a b", "a?", "[ab]", "a\\b", "\u00e9", "", "a\x00"]),
    st.sampled_from(["", "{"]),
    st.sampled_from(["", "}"]),
    parts,
)
junk = st.lists(bad_id | near_miss | soup.map("".join), max_size=8)
bystanders = st.lists(
    st.tuples(
        st.sampled_from(["mosaic:channel:{}:c", "other:session:{}:meta", "mosaic:sessions:{}"]),
        ids,
    ),
    max_size=4,
)


def write_key(client: redis.Redis, key: str, kind: str) -> None:
    if kind == "string":
        client.set(key, "v")
    elif kind == "hash":
        client.hset(key, "f", "v")
    elif kind == "list":
        client.rpush(key, "v")
    elif kind == "set":
        client.sadd(key, "v")
    else:
        client.xadd(key, {"f": "v"})


def expected_doomed(keys: set[str], only: frozenset[str] | None, spare_live: bool) -> set[str]:
    """The oracle: keys of selected sessions, bar those with either heartbeat spelling."""
    live = {sid for k in keys if (sid := KEYS.session_of(k)) and k in KEYS.heartbeat_keys(sid)}
    if not spare_live:
        live = set()
    return {
        k
        for k in keys
        if (sid := KEYS.session_of(k)) is not None
        and (only is None or sid in only)
        and sid not in live
    }


@hsettings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sessions=sessions,
    junk=junk,
    bystanders=bystanders,
    pick=st.data(),
    scan_count=st.sampled_from([10, 1000]),
    unlink_batch=st.sampled_from([1, 3, 500]),
    spare_live=st.booleans(),
    per_session=st.booleans(),
)
def test_pages_on_random_keyspace_delete_exactly_the_selected_dead_sessions(
    make_store: MakeStore,
    valkey: redis.Redis,
    *,
    sessions: dict[str, tuple[bool, dict[tuple[str, bool], str]]],
    junk: list[str],
    bystanders: list[tuple[str, str]],
    pick: st.DataObject,
    scan_count: int,
    unlink_batch: int,
    spare_live: bool,
    per_session: bool,
) -> None:
    valkey.flushdb()
    for sid, (live, session_keys) in sessions.items():
        for (part, tagged), kind in session_keys.items():
            root = f"mosaic:session:{{{sid}}}:" if tagged else f"mosaic:session:{sid}:"
            write_key(valkey, root + part, kind)
        if live:
            valkey.set(KEYS.heartbeat_keys(sid)[pick.draw(st.integers(0, 1))], "1", ex=120)
    for text in junk:
        valkey.set(f"mosaic:session:{text}", "j")
    for template, sid in bystanders:
        valkey.set(template.format(sid), "b")
    only = pick.draw(st.none() | st.frozensets(st.sampled_from([*sessions, "zz"])), label="only")
    before = keys_of(valkey)
    doomed = expected_doomed(before, only, spare_live)

    store = make_store(scan_count=scan_count, unlink_batch=unlink_batch)
    walk = list(store.pages(only=only, spare_live=spare_live, per_session=per_session))

    assert keys_of(valkey) == before - doomed
    assert sum(page.total for page in walk) == len(doomed)
    if per_session:
        removed, _ = drain(walk)
        assert removed == Counter(KEYS.session_of(k) for k in doomed)


# -- an unreachable server -------------------------------------------------------------------


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "plain"])
def test_unreachable_server_raises_store_unavailable_naming_the_step(pipelined: bool) -> None:
    store = ValkeyStore.connect(
        "redis://127.0.0.1:1/0", KEYS, connect_timeout_s=0.5, pipelined=pipelined
    )
    started = time.monotonic()

    with pytest.raises(StoreUnavailable, match="scan a page of session keys"):
        list(store.pages(only=frozenset({"abc"})))
    with pytest.raises(StoreUnavailable, match="check heartbeats"):
        store.live_sessions(["abc"])

    assert time.monotonic() - started < 3
    store.close()
