"""Real servers for the suite: embedded Valkey and PostgreSQL by default, or the ones
TEST_VALKEY_URL / TEST_DATABASE_URL name. Every test starts from an empty keyspace and an
empty log table."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pg8000.native
import pytest
import redis

from session_gc.observability import logger, metrics
from session_gc.runtime import Runtime
from session_gc.settings import Settings, load_settings
from session_gc_local import seed, servers
from session_gc_local.invoke import LambdaContext, load_handler
from session_gc_local.seed import connect_pg

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
os.environ.setdefault("AWS_DEFAULT_REGION", "eu-west-1")

PREFIX = "mosaic"


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TEST_VALKEY_URL")
    if external:
        yield external
        return
    server = servers.start_valkey(tmp_path_factory.mktemp("valkey"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        url = external
        server = None
    else:
        # Not under pytest's own tmp: a second pytest run resets that tree to mode 0700, which
        # locks pgserver's system user out of a data directory still in use.
        pgdir = Path(tempfile.mkdtemp(prefix="session-gc-test-pg-"))
        server = servers.start_postgres(pgdir)
        url = server.url
    conn = connect_pg(url)
    seed.apply_schema(conn)
    conn.close()
    try:
        yield url
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(pgdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_metrics() -> Iterator[None]:
    # Core functions record metrics on the shared Metrics object; only a handler flushes it.
    # Tests that call the core directly must not leak their metrics into a later handler's.
    metrics.clear_metrics()
    yield
    metrics.clear_metrics()


@pytest.fixture
def valkey(valkey_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(valkey_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def pg(database_url: str) -> Iterator[pg8000.native.Connection]:
    conn = connect_pg(database_url)
    conn.run("TRUNCATE agent_logs RESTART IDENTITY")
    yield conn
    conn.close()


@pytest.fixture
def settings(valkey_url: str, database_url: str) -> Settings:
    return load_settings({}, valkey_url=valkey_url, database_url=database_url, key_prefix=PREFIX)


@pytest.fixture
def make_runtime(
    settings: Settings, valkey: redis.Redis, pg: pg8000.native.Connection
) -> Iterator[Callable[..., Runtime]]:
    """Build Runtimes on the clean servers; ``overrides`` replace settings fields."""
    made: list[Runtime] = []

    def make(**overrides: object) -> Runtime:
        values = {**settings.__dict__, **overrides}
        clock = values.pop("clock", None)
        rt = Runtime(Settings(**values), **({"clock": clock} if clock else {}))  # type: ignore[arg-type]
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


@pytest.fixture
def rt(make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime()


@pytest.fixture
def handler_env(
    monkeypatch: pytest.MonkeyPatch, valkey_url: str, database_url: str
) -> dict[str, str]:
    env = {
        "VALKEY_URL": valkey_url,
        "DATABASE_URL": database_url,
        "KEY_PREFIX": PREFIX,
        "POWERTOOLS_METRICS_NAMESPACE": "SessionGC",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("TEMP_STORE_URL", "COLLECT_QUEUE_URL", "DRY_RUN", "DATABASE_SECRET_ARN"):
        monkeypatch.delenv(name, raising=False)
    return env


@pytest.fixture
def handler(
    handler_env: dict[str, str], valkey: redis.Redis, pg: pg8000.native.Connection
) -> Iterator[Callable[[str], ModuleType]]:
    """Load a real handler module (a cold start) against the clean test servers."""
    loaded: list[ModuleType] = []

    def load(name: str) -> ModuleType:
        module = load_handler(name)
        loaded.append(module)
        return module

    yield load
    for module in loaded:
        module.RUNTIME.close()


@pytest.fixture
def context() -> LambdaContext:
    return LambdaContext()


def keys_of(client: redis.Redis) -> set[str]:
    return {k.decode() for k in client.scan_iter(count=1000)}


EVENTS = Path(__file__).resolve().parents[1] / "events"


@pytest.fixture
def restore_cli_logging() -> Iterator[None]:
    """The CLI's main() points the logger at stderr and sets its level; both are put back."""
    streams = [(h, h.stream) for h in logger.handlers if isinstance(h, logging.StreamHandler)]
    level = logger.log_level
    yield
    for handler, stream in streams:
        # Not setStream: it would flush the capture stream pytest has already closed.
        handler.stream = stream
    logger.setLevel(level)
