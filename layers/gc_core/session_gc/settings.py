"""Settings: read once from the environment at cold start into one frozen object.

The environment variable names live here and nowhere else. A keyword argument given to
``load_settings`` beats the environment, so tests and the CLI can say what they mean.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from session_gc.errors import ConfigError
from session_gc.ids import validate_session_id

T = TypeVar("T")

_VALKEY_SCHEMES = ("redis", "rediss", "unix")
_PG_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class DatabaseTarget:
    """Where PostgreSQL is and who to log in as (pg8000 connection arguments)."""

    user: str
    password: str | None
    database: str
    host: str | None = None
    port: int = 5432
    unix_sock: str | None = None
    # "require"/"verify-full" turn TLS on; anything else leaves it to the server.
    sslmode: str | None = None

    def __repr__(self) -> str:
        # Never let the password reach a log line through a repr.
        where = self.unix_sock or f"{self.host}:{self.port}"
        return f"DatabaseTarget(user={self.user!r}, database={self.database!r}, at={where!r})"


@dataclass(frozen=True)
class Settings:
    valkey_url: str
    valkey_cluster: bool = False
    valkey_auth_secret_arn: str | None = None
    database_url: str | None = None
    database_secret_arn: str | None = None
    key_prefix: str = "mosaic"
    sweep_grace_seconds: int = 3600
    sweep_max_collect_ratio: float = 0.5
    hot_log_max_age_hours: float = 24.0
    job_retention_hours: float = 168.0
    job_queue_name: str = "summarization"
    job_queue_prefix: str = "bull"
    temp_store_url: str | None = None
    collect_queue_url: str | None = None
    dry_run: bool = False
    # Tuning, measured on a 2-core box (see BENCHMARKS.md). A full GC of a million keys ran
    # as fast with SCAN pages of 500 as of 1,000 or 2,000; smaller pages keep each command short.
    scan_count: int = 500
    unlink_batch: int = 500
    log_batch_size: int = 5000
    statement_timeout_ms: int = 30_000
    connect_timeout_s: float = 5.0
    # CA bundles for TLS; unset means the system trust store. TLS is never optional once
    # asked for: a rediss:// URL or a verifying sslmode fails closed when the peer cannot
    # be verified.
    valkey_ca_file: str | None = None
    database_ca_file: str | None = None

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["database_url"] = "<set>" if self.database_url else None
        shown["valkey_url"] = _redact_url(self.valkey_url)
        return f"Settings({shown})"

    @property
    def database_target(self) -> DatabaseTarget | None:
        return parse_database_url(self.database_url) if self.database_url else None

    @property
    def job_retention_ms(self) -> int:
        return int(self.job_retention_hours * 3600 * 1000)


# env var name -> (field, parser)
ENV: dict[str, tuple[str, Callable[[str, str], Any]]] = {}


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        url = url.replace(f":{parts.password}@", ":***@")
    # redis-py also takes the password as a query parameter (redis://host/0?password=...).
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _number(kind: Callable[[str], T], low: float, high: float) -> Callable[[str, str], T]:
    def parse(name: str, raw: str) -> T:
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a {kind.__name__}, got {raw!r}") from None
        if not low <= value <= high:  # type: ignore[operator]
            raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw!r}")
        return value

    return parse


def _optional(name: str, raw: str) -> str | None:
    return raw.strip() or None


def _valkey_url(name: str, raw: str) -> str:
    url = raw.strip()
    parts = urlsplit(url)
    if parts.scheme not in _VALKEY_SCHEMES:
        raise ConfigError(
            f"{name} must start with redis://, rediss:// or unix://, got {_redact_url(url)!r}"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"{name} has no socket path: {_redact_url(url)!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{name} has no host: {_redact_url(url)!r}")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port lazily
    except ValueError:
        raise ConfigError(f"{name} has a bad port: {_redact_url(url)!r}") from None
    return url


def _database_url(name: str, raw: str) -> str | None:
    url = raw.strip()
    if not url:
        return None
    try:
        parse_database_url(url)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return url


def _prefix(name: str, raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ConfigError(f"{name} must not be empty")
    for part in value.split(":"):
        try:
            validate_session_id(part)
        except ValueError as exc:
            raise ConfigError(f"{name} {value!r} is not a usable key prefix: {exc}") from None
        if part == "session":
            # "mosaic:session:t1" would put this deployment, its lock and its bookkeeping
            # inside another deployment's session namespace, where that GC would collect it.
            raise ConfigError(
                f"{name} {value!r} must not contain a 'session' segment: it would nest this "
                "deployment inside another one's session keys"
            )
    return value


def _temp_store_url(name: str, raw: str) -> str | None:
    url = raw.strip()
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme == "s3" and parts.netloc:
        return url
    if parts.scheme == "file" and parts.path.startswith("/") and not parts.netloc:
        return url
    raise ConfigError(f"{name} must be s3://bucket/prefix or file:///absolute/dir, got {url!r}")


def _ca_file(name: str, raw: str) -> str | None:
    path = raw.strip()
    if not path:
        return None
    if not os.path.isfile(path):
        raise ConfigError(f"{name} names {path!r}, which is not a readable file")
    return path


def _name(name: str, raw: str) -> str:
    value = raw.strip()
    if not value or any(ch.isspace() for ch in value):
        raise ConfigError(f"{name} must be a non-empty name without spaces, got {raw!r}")
    return value


ENV.update(
    {
        "VALKEY_URL": ("valkey_url", _valkey_url),
        "VALKEY_CLUSTER": ("valkey_cluster", _parse_bool),
        "VALKEY_AUTH_SECRET_ARN": ("valkey_auth_secret_arn", _optional),
        "DATABASE_URL": ("database_url", _database_url),
        "DATABASE_SECRET_ARN": ("database_secret_arn", _optional),
        "KEY_PREFIX": ("key_prefix", _prefix),
        "SWEEP_GRACE_SECONDS": ("sweep_grace_seconds", _number(int, 0, 30 * 86400)),
        "SWEEP_MAX_COLLECT_RATIO": ("sweep_max_collect_ratio", _number(float, 0.0, 1.0)),
        "HOT_LOG_MAX_AGE_HOURS": ("hot_log_max_age_hours", _number(float, 0.0, 24 * 3650)),
        "JOB_RETENTION_HOURS": ("job_retention_hours", _number(float, 0.0, 24 * 3650)),
        "JOB_QUEUE_NAME": ("job_queue_name", _name),
        "JOB_QUEUE_PREFIX": ("job_queue_prefix", _name),
        "TEMP_STORE_URL": ("temp_store_url", _temp_store_url),
        "COLLECT_QUEUE_URL": ("collect_queue_url", _optional),
        "DRY_RUN": ("dry_run", _parse_bool),
        "VALKEY_CA_FILE": ("valkey_ca_file", _ca_file),
        "DATABASE_CA_FILE": ("database_ca_file", _ca_file),
        "GC_SCAN_COUNT": ("scan_count", _number(int, 10, 100_000)),
        "GC_UNLINK_BATCH": ("unlink_batch", _number(int, 1, 10_000)),
        "GC_LOG_BATCH_SIZE": ("log_batch_size", _number(int, 1, 1_000_000)),
        "GC_STATEMENT_TIMEOUT_MS": ("statement_timeout_ms", _number(int, 100, 900_000)),
    }
)


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from ``env`` (default: os.environ); keyword overrides win.

    Raises ConfigError naming the variable for anything missing or malformed.
    """
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for var, (field, parse) in ENV.items():
        raw = source.get(var)
        if raw is not None and field not in overrides:
            values[field] = parse(var, raw)
    values.update(overrides)
    if not values.get("valkey_url"):
        raise ConfigError("VALKEY_URL is not set (e.g. redis://localhost:6379/0)")
    if not values.get("database_url") and not values.get("database_secret_arn"):
        raise ConfigError(
            "neither DATABASE_URL nor DATABASE_SECRET_ARN is set; one of them must say "
            "where PostgreSQL is"
        )
    return Settings(**values)


def parse_database_url(url: str) -> DatabaseTarget:
    """Parse ``postgresql://user:pass@host:port/db`` or ``postgresql://user@/db?host=/dir``."""
    parts = urlsplit(url)
    if parts.scheme not in _PG_SCHEMES:
        raise ConfigError("database URL must start with postgresql://")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    try:
        port = parts.port or int(query.get("port", "5432"))
    except ValueError:
        raise ConfigError("database URL has a bad port") from None
    database = unquote(parts.path.lstrip("/")) or "postgres"
    user = unquote(parts.username or query.get("user", "")) or "postgres"
    password = unquote(parts.password) if parts.password else query.get("password") or None
    socket_dir = query.get("host", "")
    if socket_dir.startswith("/"):
        return DatabaseTarget(
            user=user,
            password=password,
            database=database,
            port=port,
            unix_sock=f"{socket_dir.rstrip('/')}/.s.PGSQL.{port}",
            sslmode=query.get("sslmode"),
        )
    host = parts.hostname or socket_dir
    if not host:
        raise ConfigError("database URL has neither a host nor ?host=/socket/dir")
    return DatabaseTarget(
        user=user,
        password=password,
        database=database,
        host=host,
        port=port,
        sslmode=query.get("sslmode"),
    )
