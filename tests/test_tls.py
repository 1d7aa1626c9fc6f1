"""TLS is verified and never optional: rediss:// against a real TLS server with a throwaway
CA, and a database URL that asks for TLS refusing to fall back to plaintext."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from session_gc.collect import collect_sessions
from session_gc.errors import ConfigError, StoreUnavailable
from session_gc.ids import KeySpace
from session_gc.runtime import Runtime
from session_gc.settings import Settings, load_settings, parse_database_url
from session_gc.stores.logs import LogStore
from session_gc.stores.valkey import ValkeyStore
from session_gc_local import seed, servers
from session_gc_local.servers import RunningTlsServer


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTlsServer]:
    binary = servers.tls_server_binary()
    if binary is None:
        pytest.skip(
            "no valkey/redis server built with TLS on this machine "
            "(scripts/install-tls-server.sh installs one; make test runs it)"
        )
    server = servers.start_valkey_tls(tmp_path_factory.mktemp("tls"), binary=binary)
    try:
        yield server
    finally:
        server.stop()


def test_rediss_with_the_ca_collects_over_tls(
    tls_server: RunningTlsServer, settings: Settings, pg: object
) -> None:
    client = redis.Redis.from_url(tls_server.url, ssl_ca_certs=str(tls_server.ca_file))
    client.flushdb()
    doomed = seed.write_session(client, "mosaic", "tls-dead", live=False)
    kept = seed.write_session(client, "mosaic", "tls-live", live=True)
    rt = Runtime(
        load_settings(
            {"VALKEY_URL": tls_server.url, "VALKEY_CA_FILE": str(tls_server.ca_file)},
            database_url=settings.database_url,
        )
    )
    try:
        result = collect_sessions(rt, ["tls-dead", "tls-live"])
    finally:
        rt.close()

    assert result["tls-dead"].cleaned.valkey_keys == len(doomed)
    assert result["tls-live"].skipped == "live"
    assert {k.decode() for k in client.scan_iter()} == set(kept)
    client.close()


def test_rediss_without_the_ca_fails_closed(tls_server: RunningTlsServer) -> None:
    # The system trust store does not know the throwaway CA: verification must fail,
    # never fall back to an unverified or plaintext connection.
    store = ValkeyStore.connect(tls_server.url, KeySpace("mosaic"), connect_timeout_s=2)
    with pytest.raises(StoreUnavailable, match=r"(?i)certificate verify failed"):
        store.ping()


def test_plain_redis_url_against_a_tls_port_fails(tls_server: RunningTlsServer) -> None:
    plain = tls_server.url.replace("rediss://", "redis://")
    store = ValkeyStore.connect(plain, KeySpace("mosaic"), connect_timeout_s=2)
    with pytest.raises(StoreUnavailable):
        store.ping()


def test_a_ca_file_that_does_not_exist_fails_the_cold_start(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match="VALKEY_CA_FILE"):
        load_settings({"VALKEY_URL": "rediss://x:6379", "VALKEY_CA_FILE": str(missing)})
    with pytest.raises(ConfigError, match="DATABASE_CA_FILE"):
        load_settings(
            {
                "VALKEY_URL": "redis://x",
                "DATABASE_URL": "postgresql://u@h/d",
                "DATABASE_CA_FILE": str(missing),
            }
        )


def test_database_asking_for_tls_never_falls_back_to_plaintext(database_url: str) -> None:
    # The embedded server offers no TLS (unix socket): a verifying sslmode must refuse it.
    sep = "&" if "?" in database_url else "?"
    target = parse_database_url(f"{database_url}{sep}sslmode=verify-full")
    store = LogStore(target, connect_timeout_s=2)
    with pytest.raises(StoreUnavailable, match=r"(?i)ssl"):
        store.check()
    # The same server without TLS asked for works, so the failure above was TLS alone.
    LogStore(parse_database_url(database_url)).check()
