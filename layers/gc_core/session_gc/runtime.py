"""Wires settings to stores. Built once per Lambda container; stores connect on first use.

A handler builds one Runtime at cold start (reading settings there, so a bad variable fails
the cold start) and reuses it for every warm invocation. Tests and the CLI pass their own
stores or settings.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property
from typing import Any

from session_gc.errors import ConfigError
from session_gc.ids import KeySpace
from session_gc.settings import DatabaseTarget, Settings, load_settings
from session_gc.stores.jobs import JobStore
from session_gc.stores.logs import LogStore
from session_gc.stores.temp import TempStore, open_temp_store
from session_gc.stores.valkey import ValkeyStore

# Secrets are fetched through Powertools Parameters and cached this long, so a rotated
# password reaches warm containers within minutes without a call per invocation.
SECRET_MAX_AGE_S = 300


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        valkey: ValkeyStore | None = None,
        logs: LogStore | None = None,
        jobs: JobStore | None = None,
        temp: TempStore | None = None,
        sqs: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        # A store given here takes the place of the cached property that would build it.
        given = {"valkey": valkey, "logs": logs, "jobs": jobs, "temp": temp, "sqs": sqs}
        self.__dict__.update({name: store for name, store in given.items() if store is not None})

    @classmethod
    def from_env(cls, **overrides: Any) -> Runtime:
        return cls(load_settings(**overrides))

    @cached_property
    def keys(self) -> KeySpace:
        return KeySpace(self.settings.key_prefix)

    @cached_property
    def valkey(self) -> ValkeyStore:
        s = self.settings
        return ValkeyStore.connect(
            s.valkey_url,
            self.keys,
            cluster=s.valkey_cluster,
            password=self._valkey_password(),
            ca_file=s.valkey_ca_file,
            connect_timeout_s=s.connect_timeout_s,
            scan_count=s.scan_count,
            unlink_batch=s.unlink_batch,
        )

    @cached_property
    def logs(self) -> LogStore:
        s = self.settings
        target: DatabaseTarget | Callable[[], DatabaseTarget]
        if s.database_secret_arn:
            # Resolved at first connect (and again after a reconnect, so a rotated password
            # is picked up once the cache expires).
            target = self._database_target_from_secret
        else:
            assert s.database_target is not None, "load_settings requires one of the two"
            target = s.database_target
        ssl_context = None
        if s.database_ca_file:
            ssl_context = ssl.create_default_context(cafile=s.database_ca_file)
        return LogStore(
            target,
            batch_size=s.log_batch_size,
            statement_timeout_ms=s.statement_timeout_ms,
            connect_timeout_s=s.connect_timeout_s,
            ssl_context=ssl_context,
        )

    @cached_property
    def jobs(self) -> JobStore:
        s = self.settings
        return JobStore(
            s.valkey_url,
            queue_name=s.job_queue_name,
            prefix=s.job_queue_prefix,
            password=self._valkey_password(),
            cluster=s.valkey_cluster,
            ca_file=s.valkey_ca_file,
        )

    @cached_property
    def temp(self) -> TempStore | None:
        return open_temp_store(self.settings.temp_store_url)

    @cached_property
    def sqs(self) -> Any:
        import boto3  # only the sweep's fan-out needs it; keep it off other cold starts

        return boto3.client("sqs")

    def close(self) -> None:
        for name in ("valkey", "logs"):
            store = self.__dict__.pop(name, None)
            if store is not None:
                store.close()

    # -- secrets -----------------------------------------------------------------------------

    def _valkey_password(self) -> str | None:
        arn = self.settings.valkey_auth_secret_arn
        if not arn:
            return None
        raw = _get_secret(arn)
        try:
            parsed = json.loads(raw)
        except ValueError:
            return raw  # a plain-text auth token
        if isinstance(parsed, dict):
            for field in ("password", "authToken", "token"):
                if isinstance(parsed.get(field), str):
                    return str(parsed[field])
        raise ConfigError(
            "VALKEY_AUTH_SECRET_ARN: the secret is JSON without a password/authToken field"
        )

    def _database_target_from_secret(self) -> DatabaseTarget:
        """Login from the secret; where from DATABASE_URL when set, else from the secret.

        An RDS-managed master secret holds only username and password, so the endpoint
        comes from DATABASE_URL (without credentials); a full RDS-style secret also carries
        host, port and dbname.
        """
        arn = self.settings.database_secret_arn
        assert arn, "only called when DATABASE_SECRET_ARN is set"
        endpoint = self.settings.database_target
        try:
            secret = json.loads(_get_secret(arn))
            if endpoint is not None:
                return replace(endpoint, user=secret["username"], password=secret["password"])
            return DatabaseTarget(
                user=secret["username"],
                password=secret["password"],
                host=secret["host"],
                port=int(secret.get("port", 5432)),
                database=secret.get("dbname") or "postgres",
                # RDS speaks TLS; a secret that names no mode still gets a verified one.
                sslmode=secret.get("sslmode", "verify-full"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                "DATABASE_SECRET_ARN: the secret is not JSON with username and password "
                "(and host, when DATABASE_URL does not say where the database is) "
                f"({type(exc).__name__}: {exc})"
            ) from None


def _get_secret(arn: str) -> str:
    from aws_lambda_powertools.utilities import parameters

    value = parameters.get_secret(arn, max_age=SECRET_MAX_AGE_S)
    return value if isinstance(value, str) else bytes(value).decode()
