"""PostgreSQL log rows: demote hot rows to warm, in bounded, keyset-ordered batches.

Each batch is its own short transaction under ``statement_timeout`` and ``lock_timeout``,
so no run holds locks on millions of rows, and a run cut short keeps what it finished.
"""

from __future__ import annotations

import socket
import ssl
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar

import pg8000.native
from pg8000.exceptions import DatabaseError, InterfaceError

from session_gc.errors import SchemaMissing, StoreUnavailable
from session_gc.observability import logger
from session_gc.settings import DatabaseTarget

T = TypeVar("T")

TABLE = "agent_logs"
REQUIRED_COLUMNS = frozenset({"id", "session_id", "tier", "created_at"})
EXPECTED_INDEXES = frozenset({"agent_logs_hot_session_idx", "agent_logs_hot_created_idx"})

_SESSION_BATCH = """
WITH batch AS (
    SELECT id FROM agent_logs
    WHERE session_id = ANY(CAST(:ids AS text[])) AND tier = 'hot' AND id > :after
    ORDER BY id LIMIT :size
)
UPDATE agent_logs AS l SET tier = 'warm'
FROM batch WHERE l.id = batch.id AND l.tier = 'hot'
RETURNING l.id, l.session_id
"""

_SESSION_COUNT = """
SELECT session_id, count(*) FROM agent_logs
WHERE session_id = ANY(CAST(:ids AS text[])) AND tier = 'hot'
GROUP BY session_id
"""

# The first batch has no keyset bound; later ones resume after the last (created_at, id)
# seen, so a batch never re-reads the index entries the previous batches left dead.
_OLD_BATCH = """
WITH batch AS (
    SELECT id, created_at FROM agent_logs
    WHERE tier = 'hot' AND created_at < :cutoff {after}
    ORDER BY created_at, id LIMIT :size
),
moved AS (
    UPDATE agent_logs AS l SET tier = 'warm'
    FROM batch WHERE l.id = batch.id AND l.tier = 'hot'
    RETURNING l.id
),
last AS (SELECT created_at, id FROM batch ORDER BY created_at DESC, id DESC LIMIT 1)
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM batch), last.created_at, last.id
FROM last
"""
_AFTER = "AND (created_at, id) > (:after_at, :after_id)"


def schema_sql() -> str:
    """The SQL that creates what the GC needs (shipped inside the package)."""
    return resources.files("session_gc").joinpath("sql/schema.sql").read_text()


class LogStore:
    """The ``agent_logs`` table, reached through one lazily opened pg8000 connection."""

    def __init__(
        self,
        target: DatabaseTarget | Callable[[], DatabaseTarget],
        *,
        batch_size: int = 5000,
        statement_timeout_ms: int = 30_000,
        connect_timeout_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        # A callable target lets credentials come from Secrets Manager at first use.
        self._target = target
        self.batch_size = batch_size
        self.statement_timeout_ms = statement_timeout_ms
        self.connect_timeout_s = connect_timeout_s
        self.ssl_context = ssl_context
        self._conn: pg8000.native.Connection | None = None

    # -- connection --------------------------------------------------------------------------

    def _connect(self, *, check_schema: bool = True) -> pg8000.native.Connection:
        target = self._target() if callable(self._target) else self._target
        ssl_context = self.ssl_context
        if ssl_context is None and target.sslmode in ("require", "verify-ca", "verify-full"):
            # Stricter than libpq on purpose: "require" verifies the certificate too; a
            # process that deletes data should not talk to a server it cannot identify.
            ssl_context = ssl.create_default_context()
            if target.sslmode == "verify-ca":
                ssl_context.check_hostname = False
        # With a context, pg8000 raises when the server declines TLS: never plaintext.
        try:
            sock = _open_socket(target, self.connect_timeout_s)
            # Connecting gets a few seconds; after that a statement may run up to its own
            # timeout, so the socket waits a little longer than the server would.
            sock.settimeout(self.statement_timeout_ms / 1000 + 5)
            conn = pg8000.native.Connection(
                user=target.user,
                password=target.password,
                host=target.host or "localhost",
                database=target.database,
                sock=sock,
                ssl_context=ssl_context,
                application_name="session-gc",
            )
        except (InterfaceError, DatabaseError, OSError) as exc:
            raise StoreUnavailable(f"PostgreSQL unreachable at {target!r}: {exc}") from exc
        try:
            conn.run(f"SET statement_timeout = {int(self.statement_timeout_ms)}")
            conn.run(f"SET lock_timeout = {max(1000, int(self.statement_timeout_ms) // 3)}")
            if check_schema:
                self._check_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def conn(self) -> pg8000.native.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            # A connection the server already dropped has nothing left to release.
            with suppress(InterfaceError, OSError):
                self._conn.close()
            self._conn = None

    def _check_schema(self, conn: pg8000.native.Connection) -> None:
        rows = conn.run(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = :t",
            t=TABLE,
        )
        found = {r[0] for r in rows}
        if not found:
            raise SchemaMissing(
                f"table {TABLE} does not exist in the current schema; create it with "
                "session_gc/sql/schema.sql (`session-gc schema` prints it)"
            )
        missing = REQUIRED_COLUMNS - found
        if missing:
            raise SchemaMissing(f"table {TABLE} lacks column(s) {sorted(missing)}")
        indexes = {
            r[0]
            for r in conn.run(
                "SELECT indexname FROM pg_indexes "
                "WHERE schemaname = current_schema() AND tablename = :t",
                t=TABLE,
            )
        }
        if EXPECTED_INDEXES - indexes:
            logger.warning(
                "log indexes missing, demotion will scan the table",
                missing=sorted(EXPECTED_INDEXES - indexes),
            )

    def apply_schema(self) -> None:
        """Create the table and indexes (idempotent), then check them as a start-up would."""
        conn = self._connect(check_schema=False)
        try:
            with _translate("apply the schema"):
                # Without parameters pg8000 uses the simple protocol, which runs a whole script.
                conn.run(schema_sql())
            self._check_schema(conn)
        finally:
            conn.close()

    def check(self) -> None:
        """Connect (if needed) and verify the schema; raises SchemaMissing/StoreUnavailable."""
        self._with_retry("check the log schema", lambda: self.conn.run("SELECT 1"))

    def _with_retry(self, step: str, work: Callable[[], T]) -> T:
        """Run an idempotent step; a connection lost since the last use is reopened once."""
        for attempt in (1, 2):
            try:
                with _translate(step):
                    return work()
            except StoreUnavailable as exc:
                lost = isinstance(exc.__cause__, InterfaceError | OSError)
                self.close()
                if attempt == 2 or not lost:
                    raise
                logger.info("postgres connection lost, reconnecting", step=step)
        raise AssertionError("unreachable")

    # -- demotion ----------------------------------------------------------------------------

    def demote_sessions(self, session_ids: Sequence[str], *, dry_run: bool = False) -> Counter[str]:
        """Demote the hot rows of these sessions; returns rows moved (or that would be) per id.

        The ids travel as one array parameter, so a list of any length is one parameter.
        """
        ids = sorted(set(session_ids))
        if not ids:
            return Counter()
        if dry_run:
            rows = self._with_retry(
                "count hot log rows", lambda: self.conn.run(_SESSION_COUNT, ids=ids)
            )
            return Counter({sid: int(n) for sid, n in rows})
        moved: Counter[str] = Counter()
        after = 0
        while True:
            params = {"ids": ids, "after": after, "size": self.batch_size}
            rows = self._with_retry(
                "demote session log rows", _runner(self, _SESSION_BATCH, params)
            )
            if not rows:
                return moved
            for row_id, sid in rows:
                moved[sid] += 1
                after = max(after, row_id)

    def cutoff(self, max_age_hours: float) -> datetime:
        """Now minus ``max_age_hours`` by the database clock, as an aware timestamp."""
        rows = self._with_retry(
            "read the database clock",
            lambda: self.conn.run(
                "SELECT now() - make_interval(secs => :s)", s=float(max_age_hours) * 3600
            ),
        )
        value: datetime = rows[0][0]
        return value

    def count_older_than(self, cutoff: datetime) -> int:
        rows = self._with_retry(
            "count old hot log rows",
            lambda: self.conn.run(
                "SELECT count(*) FROM agent_logs WHERE tier = 'hot' AND created_at < :c", c=cutoff
            ),
        )
        return int(rows[0][0])

    def demote_older_than(
        self,
        cutoff: datetime,
        *,
        after: tuple[datetime, int] | None = None,
    ) -> Iterator[tuple[int, tuple[datetime, int]]]:
        """Demote hot rows created before ``cutoff``, one batch per step.

        Yields (rows moved, keyset position) after each batch, so the caller can stop between
        batches and resume later from the position.
        """
        while True:
            sql = _OLD_BATCH.format(after=_AFTER if after else "")
            params: dict[str, Any] = {"cutoff": cutoff, "size": self.batch_size}
            if after:
                params["after_at"], params["after_id"] = after
            rows = self._with_retry("demote old log rows", _runner(self, sql, params))
            if not rows:
                return
            moved, scanned, last_at, last_id = rows[0]
            after = (last_at, int(last_id))
            yield int(moved), after
            if scanned < self.batch_size:
                return


def _runner(store: LogStore, sql: str, params: dict[str, Any]) -> Callable[[], Any]:
    return lambda: store.conn.run(sql, **params)


def _open_socket(target: DatabaseTarget, timeout: float) -> socket.socket:
    if target.unix_sock:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target.unix_sock)
        except OSError:
            sock.close()
            raise
    else:
        sock = socket.create_connection((target.host or "localhost", target.port), timeout)
    # Keepalive lets a connection that died while Lambda was frozen fail fast on thaw.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


@contextmanager
def _translate(step: str) -> Iterator[None]:
    try:
        yield
    except (InterfaceError, OSError) as exc:
        raise StoreUnavailable(
            f"PostgreSQL connection failed while trying to {step}: {exc}"
        ) from exc
    except DatabaseError as exc:
        detail = exc.args[0] if exc.args else {}
        code = detail.get("C") if isinstance(detail, dict) else None
        message = detail.get("M") if isinstance(detail, dict) else str(exc)
        if code in ("42P01", "42703"):
            # Undefined table or column: a schema problem, not worth a retry.
            raise SchemaMissing(
                f"{TABLE} does not match sql/schema.sql while trying to {step}: {message}"
            ) from exc
        if code in ("57014", "55P03"):
            raise StoreUnavailable(f"PostgreSQL timed out trying to {step}: {message}") from exc
        raise StoreUnavailable(f"PostgreSQL failed to {step}: {message} (code {code})") from exc
