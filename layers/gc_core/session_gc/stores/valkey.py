"""Valkey: find session keys page by page and unlink them, never spanning hash slots.

Two ways to work through the SCAN pages, with the same meaning:

- standalone (pipelined): one connection SCANs while a second one judges and deletes, so
  Valkey finds the next page while the client reads the session ids out of this one. Per
  page: one round trip of EXISTS over the page's heartbeats, then the UNLINKs in one.
- cluster (or ``pipelined=False``): SCAN each primary from the client, check heartbeats in a
  pipeline, and UNLINK grouped by (session, hash slot) so that no command spans slots.

Either way a session's heartbeat is looked at for every page, one round trip before its keys
in that page are unlinked: a session that comes back to life stops losing keys from then on.

NOTE: the check and the UNLINK are not atomic: a heartbeat written in the round trip between
them (well under a millisecond locally) is not seen, and that page's keys of the session go.
The atomic ways measured worse: WATCH of a page's 2,000 heartbeat keys costs Valkey 30 ms
(its watch list is searched per key), and running the page as a Lua script took 7.8 s per
million keys against 4.4 s (each key crosses the Lua bridge twice). A session reviving
during a pass loses the keys already removed from earlier pages in any case; the sweep's
grace period is what keeps revivals away from deletion.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import redis
from redis.cluster import RedisCluster
from redis.connection import Connection
from redis.crc import key_slot

from session_gc.errors import StoreUnavailable
from session_gc.ids import KeySpace, valid_raw_id

STANDALONE = "standalone"
# Sessions whose heartbeats share one pipeline round trip.
HEARTBEAT_CHUNK = 500
# Sessions whose heartbeats share one EXISTS while live sessions are rare in the pages: an
# EXISTS answers with a count, so a group holding a live session is asked again one session
# at a time. Where live sessions are common that second question would be asked of nearly
# every group, so the walk then asks one session per EXISTS from the start. Measured over a
# million keys: all dead, 4.5 s in all with groups against 5.6 s one by one; 90% of sessions
# live, Valkey spent 0.94 s in EXISTS switching to one by one against 1.15 s in groups.
HEARTBEAT_GROUP = 16


@dataclass
class Page:
    """What one SCAN page held: keys removed (or that would be) per session, and live sessions."""

    node: str
    cursor: int
    # Per session only when the walk asked for it; ``total`` always.
    removed: dict[str, int] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)
    total: int = 0


class ValkeyStore:
    """Session keys in one Valkey deployment (standalone or cluster)."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        keys: KeySpace,
        *,
        scan_count: int = 1000,
        unlink_batch: int = 500,
        pipelined: bool | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.scan_count = scan_count
        self.unlink_batch = unlink_batch
        self.cluster = isinstance(client, RedisCluster)
        # In a cluster a session's heartbeat may live on another primary than its keys, so
        # the pipelined engine (one server, two connections) is for standalone only.
        self.pipelined = (not self.cluster) if pipelined is None else pipelined
        if self.pipelined and self.cluster:
            raise ValueError("the pipelined page engine cannot run against a cluster")
        if self.pipelined and self.client.get_connection_kwargs().get("decode_responses"):
            # Keys are bytes on the wire and are handed back to UNLINK exactly as read.
            raise ValueError("the Valkey client must not decode responses (decode_responses)")
        # Told about every page as it is done (the CLI's progress display listens here).
        self.on_page: Callable[[Page], None] | None = None

    @classmethod
    def connect(
        cls,
        url: str,
        keys: KeySpace,
        *,
        cluster: bool = False,
        password: str | None = None,
        ca_file: str | None = None,
        connect_timeout_s: float = 5.0,
        **options: Any,
    ) -> ValkeyStore:
        """Build a client for ``url``; no connection is opened until the first command."""
        conn: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout_s,
            # A page is small; a reply slower than this means the server is in trouble.
            "socket_timeout": 30.0,
            # A Lambda thawed after minutes may hold a connection the server already closed;
            # redis-py pings an idle connection before reuse and reconnects if it is gone.
            "health_check_interval": 30,
        }
        if password is not None:
            conn["password"] = password
        if url.startswith("rediss://"):
            conn["ssl_cert_reqs"] = "required"
            if ca_file:
                conn["ssl_ca_certs"] = ca_file
        client: redis.Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, **conn)
        else:
            client = redis.Redis.from_url(url, **conn)
        return cls(client, keys, **options)

    # -- reading ---------------------------------------------------------------------------

    def ping(self) -> None:
        with translate_errors("ping"):
            self.client.ping()

    def nodes(self) -> list[str]:
        """Where the keyspace lives: every primary in cluster mode, one node otherwise."""
        if not self.cluster:
            return [STANDALONE]
        cluster = cast(RedisCluster, self.client)
        with translate_errors("list cluster primaries"):
            return sorted(node.name for node in cluster.get_primaries())  # type: ignore[no-untyped-call]

    def live_sessions(self, session_ids: Iterable[str]) -> set[str]:
        """The subset of ``session_ids`` whose heartbeat key exists right now."""
        ids = list(dict.fromkeys(session_ids))
        live: set[str] = set()
        # Bounded pipelines: any number of ids, never one giant request and reply.
        for start in range(0, len(ids), HEARTBEAT_CHUNK):
            chunk = ids[start : start + HEARTBEAT_CHUNK]
            with translate_errors("check heartbeats"):
                pipe = self.client.pipeline(transaction=False)
                for sid in chunk:
                    for key in self.keys.heartbeat_keys(sid):
                        # One key per command: the two spellings may live in different slots.
                        pipe.exists(key)
                replies = pipe.execute()
            live.update(sid for i, sid in enumerate(chunk) if replies[2 * i] or replies[2 * i + 1])
        return live

    # -- the page engine ---------------------------------------------------------------------

    def pages(
        self,
        *,
        only: frozenset[str] | None = None,
        spare_live: bool = True,
        dry_run: bool = False,
        start: dict[str, int] | None = None,
        per_session: bool = True,
    ) -> Generator[Page, None, None]:
        """Walk every session key once, removing those of the selected sessions page by page.

        ``only`` limits the walk's deletions to those sessions (None = every session);
        ``spare_live`` leaves every session with a heartbeat alone; ``dry_run`` only counts.
        ``start`` resumes from saved cursors (node -> cursor); a node absent from it starts at
        0, a node mapped to -1 is finished. The caller may stop between pages: each Page
        carries the cursor to resume from. ``per_session=False`` reports only totals, which
        spares a large walk the cost of shipping every session id back to the client.
        A standalone walk holds two connections of the client's pool until it ends or is
        closed.
        """
        if only is not None and not only:
            return
        start = start or {}
        for node in self.nodes():
            cursor = start.get(node, 0)
            if cursor < 0:
                continue
            if self.pipelined:
                walk = self._pipelined_pages(cursor, only, spare_live, dry_run, per_session)
            else:
                walk = self._client_pages(node, cursor, only, spare_live, dry_run)
            for page in walk:
                if self.on_page is not None:
                    self.on_page(page)
                yield page

    def _client_pages(
        self,
        node: str,
        cursor: int,
        only: frozenset[str] | None,
        spare_live: bool,
        dry_run: bool,
    ) -> Iterator[Page]:
        while True:
            page = self._client_page(node, cursor, only, spare_live, dry_run)
            yield page
            cursor = page.cursor
            if cursor == 0:
                return

    def _pipelined_pages(
        self,
        cursor: int,
        only: frozenset[str] | None,
        spare_live: bool,
        dry_run: bool,
        per_session: bool,
    ) -> Iterator[Page]:
        """Standalone walk, with Valkey and the client busy at the same time.

        The scanner connection asks for page N+1 as soon as page N arrives; the worker
        connection sends page N's UNLINKs without waiting, and Valkey runs them while the
        client reads the ids out of page N+1. Page N is yielded once they are answered, and
        only then are page N+1's heartbeats asked, so a heartbeat check is answered one round
        trip before its UNLINKs go out whatever the caller does with a page.

        Two connections of the client's pool are held for the walk. They are raw: replies
        come as hiredis-parsed lists of bytes, with no per-command callback on the way.
        """
        pool = cast(redis.Redis, self.client).connection_pool
        wanted = None if only is None else {sid.encode() for sid in only}
        scanner: _Wire | None = None
        worker: _Wire | None = None
        finished = False
        try:
            with translate_errors("scan a page of session keys"):
                scanner = cast(_Wire, pool.get_connection())
                worker = cast(_Wire, pool.get_connection())
                self._send_scan(scanner, cursor)
            in_flight: _Unlinks | None = None
            group_size = HEARTBEAT_GROUP
            while True:
                cursor, raw = self._read_scan(scanner)
                groups = self._group(raw, wanted)
                if in_flight is not None:
                    # Its UNLINKs ran while the client read this page; the caller's time is
                    # spent before this page's heartbeats are asked, never in between.
                    yield in_flight.finish(worker)
                    in_flight = None
                live = self._live_raw(worker, list(groups), group_size) if spare_live else set()
                # Groups pay while fewer than one session in a group is live.
                group_size = HEARTBEAT_GROUP if len(live) * HEARTBEAT_GROUP < len(groups) else 1
                page = Page(STANDALONE, cursor, live={sid.decode("ascii") for sid in live})
                doomed = {sid: keys for sid, keys in groups.items() if sid not in live}
                if dry_run or not doomed:
                    yield _counted(page, doomed, per_session)
                else:
                    in_flight = _Unlinks(page, doomed, self.unlink_batch, per_session)
                    in_flight.send(worker)
                if not cursor:
                    last = in_flight.finish(worker) if in_flight is not None else None
                    finished = True  # nothing left unread on either connection
                    if last is not None:
                        yield last
                    return
        finally:
            for conn in (scanner, worker):
                if conn is None:
                    continue
                if not finished:
                    # Stopped early or failed: a reply may still be on its way, which the
                    # connection's next user would read as the answer to its own command.
                    conn.disconnect()
                pool.release(cast(Connection, conn))

    def _send_scan(self, conn: _Wire, cursor: int) -> None:
        pattern = self.keys.all_sessions_pattern
        conn.send_command("SCAN", cursor, "MATCH", pattern, "COUNT", self.scan_count)

    def _read_scan(self, conn: _Wire) -> tuple[int, list[bytes]]:
        """The page asked for last; asks for the next one at once, so that Valkey finds it
        while this one is judged and deleted."""
        with translate_errors("scan a page of session keys"):
            raw_cursor, raw = conn.read_response()
            cursor = int(raw_cursor)
            if cursor:
                self._send_scan(conn, cursor)
        return cursor, raw

    def _group(self, raw: list[bytes], wanted: set[bytes] | None) -> dict[bytes, list[bytes]]:
        """A page's keys by session id; keys without a valid id (or unwanted) are left out."""
        groups: dict[bytes, list[bytes]] = {}
        id_part = self.keys.id_part
        for key in raw:
            part = id_part(key)
            if part is None:
                continue
            keys = groups.get(part)
            if keys is None:
                groups[part] = [key]
            else:
                keys.append(key)
        return {
            sid: keys
            for sid, keys in groups.items()
            if valid_raw_id(sid) and (wanted is None or sid in wanted)
        }

    def _heartbeats(self, sids: Sequence[bytes]) -> list[bytes]:
        beats = self.keys.raw_heartbeat_keys
        return [key for sid in sids for key in beats(sid)]

    def _live_raw(self, conn: _Wire, sids: list[bytes], size: int) -> set[bytes]:
        """Which of ``sids`` have a heartbeat, asking ``size`` sessions to an EXISTS."""
        groups = [sids[i : i + size] for i in range(0, len(sids), size)]
        if not groups:
            return set()
        with translate_errors("check heartbeats"):
            counts = _round_trip(conn, [("EXISTS", *self._heartbeats(g)) for g in groups])
            if size == 1:
                return {g[0] for g, n in zip(groups, counts, strict=True) if n}
            # A count of a group: ask its sessions again, one to an EXISTS.
            suspects = [sid for g, n in zip(groups, counts, strict=True) if n for sid in g]
            if not suspects:
                return set()
            answers = _round_trip(conn, [("EXISTS", *self._heartbeats([sid])) for sid in suspects])
        return {sid for sid, n in zip(suspects, answers, strict=True) if n}

    def _client_page(
        self,
        node: str,
        cursor: int,
        only: frozenset[str] | None,
        spare_live: bool,
        dry_run: bool,
    ) -> Page:
        with translate_errors("scan a page of session keys"):
            if self.cluster:
                # Each primary keeps its own cursor; its own connection scans just its slots.
                cluster = cast(RedisCluster, self.client)
                target = cluster.get_node(node_name=node)  # type: ignore[no-untyped-call]
                if target is None:
                    raise StoreUnavailable(f"cluster node {node} is gone; the run will restart")
                next_cursor, raw = cluster.get_redis_connection(target).scan(
                    cursor, match=self.keys.all_sessions_pattern, count=self.scan_count
                )
            else:
                next_cursor, raw = self.client.scan(
                    cursor, match=self.keys.all_sessions_pattern, count=self.scan_count
                )
        by_session: dict[str, list[bytes]] = defaultdict(list)
        for key in raw:
            sid = self.keys.session_of(key)
            if sid is not None and (only is None or sid in only):
                by_session[sid].append(key if isinstance(key, bytes) else key.encode())
        live = self.live_sessions(by_session) if spare_live else set()
        doomed = {sid: ks for sid, ks in by_session.items() if sid not in live}
        page = Page(node, int(next_cursor), live=live)
        if dry_run:
            page.removed = {sid: len(ks) for sid, ks in doomed.items()}
        else:
            page.removed = self._unlink_grouped(doomed)
        page.total = sum(page.removed.values())
        return page

    def _unlink_grouped(self, doomed: dict[str, list[bytes]]) -> dict[str, int]:
        """UNLINK each session's keys, one command per (session, slot) chunk, in one pipeline."""
        if not doomed:
            return {}
        owners: list[str] = []
        with translate_errors("unlink session keys"):
            pipe = self.client.pipeline(transaction=False)
            for sid, keys in doomed.items():
                for chunk in self._slot_chunks(keys):
                    # The raw command: redis-py's cluster pipeline refuses multi-key unlink()
                    # even when, as here, every key of the chunk shares one slot.
                    pipe.execute_command("UNLINK", *chunk)
                    owners.append(sid)
            replies = pipe.execute()
        removed: dict[str, int] = defaultdict(int)
        for sid, count in zip(owners, replies, strict=True):
            removed[sid] += int(count)
        return dict(removed)

    def _slot_chunks(self, keys: Sequence[bytes]) -> Iterator[list[bytes]]:
        if self.cluster:
            by_slot: dict[int, list[bytes]] = defaultdict(list)
            for key in keys:
                by_slot[key_slot(key)].append(key)
            groups: Iterable[list[bytes]] = by_slot.values()
        else:
            groups = [list(keys)]
        for group in groups:
            for i in range(0, len(group), self.unlink_batch):
                yield group[i : i + self.unlink_batch]

    def close(self) -> None:
        self.client.close()


class _Wire(Protocol):
    """The part of a redis-py connection the pipelined engine drives (redis-py leaves it
    untyped)."""

    def send_command(self, *args: Any) -> None: ...
    def send_packed_command(self, command: Any) -> None: ...
    def pack_commands(self, commands: Iterable[Sequence[Any]]) -> Any: ...
    def read_response(self) -> Any: ...
    def disconnect(self) -> None: ...


def _counted(page: Page, doomed: dict[bytes, list[bytes]], per_session: bool) -> Page:
    """Fill a page whose keys are counted, not unlinked (a dry run, or nothing to unlink)."""
    page.total = sum(len(keys) for keys in doomed.values())
    if per_session:
        page.removed = {sid.decode("ascii"): len(keys) for sid, keys in doomed.items()}
    return page


def _send(conn: _Wire, commands: list[tuple[Any, ...]]) -> None:
    """Send ``commands`` in one write; the caller reads the replies, in order.

    Never called while replies are unread: redis-py may put a health-check PING first,
    whose answer must be the next reply on the wire.
    """
    conn.send_packed_command(conn.pack_commands(commands))


def _round_trip(conn: _Wire, commands: list[tuple[Any, ...]]) -> list[Any]:
    _send(conn, commands)
    return [conn.read_response() for _ in commands]


class _Unlinks:
    """One page's UNLINKs, sent but not yet answered."""

    def __init__(
        self, page: Page, doomed: dict[bytes, list[bytes]], batch: int, per_session: bool
    ) -> None:
        self.page = page
        self.owners: list[bytes] = []
        self.commands: list[tuple[Any, ...]] = []
        if per_session:
            for sid, keys in doomed.items():
                for i in range(0, len(keys), batch):
                    self.commands.append(("UNLINK", *keys[i : i + batch]))
                    self.owners.append(sid)
        else:
            # Only the total is wanted: batches run across sessions.
            flat = [key for keys in doomed.values() for key in keys]
            self.commands = [("UNLINK", *flat[i : i + batch]) for i in range(0, len(flat), batch)]

    def send(self, conn: _Wire) -> None:
        with translate_errors("unlink session keys"):
            _send(conn, self.commands)

    def finish(self, conn: _Wire) -> Page:
        with translate_errors("unlink session keys"):
            replies: list[int] = [conn.read_response() for _ in self.commands]
        self.page.total = sum(replies)
        if self.owners:
            removed: dict[str, int] = defaultdict(int)
            for sid, count in zip(self.owners, replies, strict=True):
                removed[sid.decode("ascii")] += count
            self.page.removed = dict(removed)
        return self.page


def key_text(value: bytes | str) -> str:
    # Keys are bytes on the wire; an undecodable id never matches the id rules, so the
    # replacement character keeps such a key out of every deletion.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@contextmanager
def translate_errors(step: str) -> Iterator[None]:
    """Turn redis-py's transport errors into StoreUnavailable naming the step."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise StoreUnavailable(f"Valkey unreachable while trying to {step}: {exc}") from exc
    except redis.exceptions.ResponseError as exc:
        raise StoreUnavailable(f"Valkey refused to {step}: {exc}") from exc
