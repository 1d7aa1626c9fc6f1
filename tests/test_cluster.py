"""Cluster mode against a real 3-primary cluster started from the embedded valkey-server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from session_gc.collect import collect_sessions
from session_gc.full import full_gc
from session_gc.ids import KeySpace
from session_gc.runs import Deadline
from session_gc.runtime import Runtime
from session_gc.stores.valkey import ValkeyStore
from session_gc_local import seed, servers

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = servers.start_valkey_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def cluster(cluster_url: str) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(cluster_url)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.close()


@pytest.fixture
def cluster_rt(
    cluster_url: str, cluster: RedisCluster, make_runtime: Callable[..., Runtime]
) -> Runtime:
    rt = make_runtime(valkey_url=cluster_url, valkey_cluster=True, scan_count=50)
    return rt


def _all_keys(client: RedisCluster) -> set[str]:
    return {k.decode() for k in client.scan_iter(count=1000)}


def _primary_of(client: RedisCluster, key: str) -> str:
    return str(client.get_node_from_key(key).name)


def test_collect_removes_a_session_spread_over_all_three_primaries(
    cluster: RedisCluster, cluster_rt: Runtime
) -> None:
    # GIVEN a session whose plain keys land on every primary, and neighbours that must stay
    keys = seed.write_session(cluster, "mosaic", "spread", live=False)
    extra = [f"mosaic:session:spread:part-{i}" for i in range(60)]
    for key in extra:
        cluster.set(key, "x")
    assert len({_primary_of(cluster, k) for k in keys + extra}) == 3
    keep = seed.write_session(cluster, "mosaic", "spreadx", live=False)
    keep += seed.write_session(cluster, "mosaic", "alive", live=True)
    keep += ["mosaic:channel:ops:cursor", "other:session:spread:meta"]
    for key in keep[-2:]:
        cluster.set(key, "keep")

    # WHEN it is collected
    result = collect_sessions(cluster_rt, ["spread", "alive"])

    # THEN exactly its keys are gone, across all slots, and the live session is skipped
    assert result["spread"].cleaned.valkey_keys == len(keys) + len(extra)
    assert result["alive"].skipped == "live"
    assert _all_keys(cluster) == set(keep)


def test_hash_tagged_sessions_are_collected_like_plain_ones(
    cluster: RedisCluster, cluster_rt: Runtime
) -> None:
    tagged = seed.write_session(cluster, "mosaic", "tagged", live=False, tagged=True)
    assert len({key_slot(k.encode()) for k in tagged}) == 1
    plain = seed.write_session(cluster, "mosaic", "plain", live=False)

    result = collect_sessions(cluster_rt, ["tagged"])

    assert result["tagged"].cleaned.valkey_keys == len(tagged)
    assert _all_keys(cluster) == set(plain)


def test_full_gc_resumes_with_one_cursor_per_primary(
    cluster: RedisCluster, cluster_rt: Runtime
) -> None:
    dead = seed.session_ids(120, label="dead")
    live = seed.session_ids(20, label="live")
    for sid in dead:
        seed.write_session(cluster, "mosaic", sid, live=False)
    survivors: set[str] = set()
    for sid in live:
        survivors |= set(seed.write_session(cluster, "mosaic", sid, live=True))
    runs = 0
    while True:
        runs += 1
        result = full_gc(cluster_rt, deadline=Deadline.after(0))
        if result.complete:
            break
        saved = cluster.get("mosaic:gc:cursor:full")
        assert saved is not None and b"valkey" in saved
        assert runs < 500
    assert runs > 3  # it really stopped and resumed
    remaining = _all_keys(cluster)
    assert {k for k in remaining if k.startswith("mosaic:session:")} == survivors
    assert "mosaic:gc:cursor:full" not in remaining


def test_store_lists_every_primary(cluster_url: str, cluster: RedisCluster) -> None:
    store = ValkeyStore.connect(cluster_url, KeySpace("mosaic"), cluster=True)
    assert len(store.nodes()) == 3
    assert not store.pipelined
