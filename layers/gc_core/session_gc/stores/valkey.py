"""Valkey: find session keys page by page and unlink them, never spanning hash slots.

Two ways to work through one SCAN page, with the same meaning:

- standalone: a Lua script runs SCAN, reads each key's session id, checks that session's
  heartbeat and UNLINKs, all inside the server. Keys never travel to the client, and the
  heartbeat check and the deletion of a page are atomic (no heartbeat can appear between
  them). One call does one SCAN page, so the server is never held for long.
- cluster (or ``use_script=False``): SCAN each primary from the client, check heartbeats in a
  pipeline, and UNLINK grouped by (session, hash slot) so that no command spans slots.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from session_gc.errors import StoreUnavailable
from session_gc.ids import MAX_ID_LENGTH, KeySpace

# KEYS: none (standalone only: the keys are found by the script's own SCAN).
# ARGV[1] cursor, ARGV[2] MATCH pattern (the escaped session root + "*", so every key found
# starts with the root), ARGV[3] COUNT, ARGV[4] session root ("mosaic:session:"),
# ARGV[5] "1" = dry run, ARGV[6] "1" = spare sessions whose heartbeat exists,
# ARGV[7] max id length, ARGV[8] UNLINK batch size, ARGV[9] "1" = report counts per session,
# ARGV[10..] only these session ids (none = all).
# Returns {next cursor, {id, count, id, count, ...} of deleted (or would-be) keys (empty unless
# asked for), {live ids}, total deleted (or would-be) keys}.
# The id rules mirror ids.validate_session_id, so a key Python would not parse is never touched.
# Cost notes (measured, see BENCHMARKS.md): each session is judged once per page, and its
# heartbeat is looked up with one EXISTS for 16 sessions at a time; only a group holding a
# live session is looked at one by one. Deleting is then the bulk of the work.
PAGE_SCRIPT = """
local root = ARGV[4]
local dry = ARGV[5] == '1'
local respect = ARGV[6] == '1'
local maxlen = tonumber(ARGV[7])
local batch_size = tonumber(ARGV[8])
local per_session = ARGV[9] == '1'
local only = nil
if #ARGV > 9 then
  only = {}
  for i = 10, #ARGV do only[ARGV[i]] = true end
end
local sub, find, byte = string.sub, string.find, string.byte
local page = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local keys = page[2]
local at = #root + 1
local brace = byte('{')

-- Which session each key belongs to; a session is judged once: 'skip' or 'dead' (so far).
local sids, state, pending = {}, {}, {}
for i = 1, #keys do
  local key = keys[i]
  local sid = nil
  if byte(key, at) == brace then
    local e = find(key, '}:', at + 1, true)
    if e then sid = sub(key, at + 1, e - 1) end
  else
    local e = find(key, ':', at, true)
    if e then sid = sub(key, at, e - 1) end
  end
  if sid then
    local st = state[sid]
    if st == nil then
      if #sid == 0 or #sid > maxlen or not find(sid, '^[%w%._@%+=%-]+$')
          or (only ~= nil and not only[sid]) then
        st = 'skip'
      else
        st = 'dead'
        pending[#pending + 1] = sid
      end
      state[sid] = st
    end
    if st == 'dead' then sids[i] = sid end
  end
end

-- Heartbeats, both spellings, checked in this same script so none can appear in between.
local live_list = {}
if respect then
  for first = 1, #pending, 16 do
    local last = math.min(first + 15, #pending)
    local beats = {}
    for j = first, last do
      beats[#beats + 1] = root .. pending[j] .. ':heartbeat'
      beats[#beats + 1] = root .. '{' .. pending[j] .. '}:heartbeat'
    end
    if redis.call('EXISTS', unpack(beats)) > 0 then
      for j = first, last do
        local sid = pending[j]
        if redis.call('EXISTS', root .. sid .. ':heartbeat',
                      root .. '{' .. sid .. '}:heartbeat') > 0 then
          state[sid] = 'live'
          live_list[#live_list + 1] = sid
        end
      end
    end
  end
end

-- SCAN only returns keys that exist and nothing else runs while the script does, so every
-- key batched here is really removed.
local counts, order, batch, total = {}, {}, {}, 0
for i = 1, #keys do
  local sid = sids[i]
  if sid and state[sid] == 'dead' then
    total = total + 1
    if per_session then
      local n = counts[sid]
      if n == nil then
        n = 0
        order[#order + 1] = sid
      end
      counts[sid] = n + 1
    end
    if not dry then
      batch[#batch + 1] = keys[i]
      if #batch >= batch_size then
        redis.call('UNLINK', unpack(batch))
        batch = {}
      end
    end
  end
end
if #batch > 0 then redis.call('UNLINK', unpack(batch)) end
local flat = {}
for _, sid in ipairs(order) do
  flat[#flat + 1] = sid
  flat[#flat + 1] = counts[sid]
end
return {page[1], flat, live_list, total}
"""

STANDALONE = "standalone"
# Sessions whose heartbeats share one pipeline round trip.
HEARTBEAT_CHUNK = 500
# Lua's unpack() fails with "too many results to unpack" past its C stack limit (8,000
# values in Valkey's Lua 5.1), so the script never batches more keys than this per UNLINK.
SCRIPT_UNLINK_MAX = 4096


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
        use_script: bool | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.scan_count = scan_count
        self.unlink_batch = unlink_batch
        self.cluster = isinstance(client, RedisCluster)
        # The script reads undeclared keys, which a cluster node refuses; cluster uses the client.
        self.use_script = (not self.cluster) if use_script is None else use_script
        if self.use_script and self.cluster:
            raise ValueError("the page script cannot run against a cluster")
        self._script = self.client.register_script(PAGE_SCRIPT) if self.use_script else None
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
    ) -> Iterator[Page]:
        """Walk every session key once, removing those of the selected sessions page by page.

        ``only`` limits the walk's deletions to those sessions (None = every session);
        ``spare_live`` leaves every session with a heartbeat alone; ``dry_run`` only counts.
        ``start`` resumes from saved cursors (node -> cursor); a node absent from it starts at
        0, a node mapped to -1 is finished. The caller may stop between pages: each Page
        carries the cursor to resume from. ``per_session=False`` reports only totals, which
        spares a large walk the cost of shipping every session id back to the client.
        """
        if only is not None and not only:
            return
        start = start or {}
        for node in self.nodes():
            cursor = start.get(node, 0)
            if cursor < 0:
                continue
            while True:
                if self._script is not None:
                    page = self._script_page(cursor, only, spare_live, dry_run, per_session)
                else:
                    page = self._client_page(node, cursor, only, spare_live, dry_run)
                if self.on_page is not None:
                    self.on_page(page)
                yield page
                cursor = page.cursor
                if cursor == 0:
                    break

    def _script_page(
        self,
        cursor: int,
        only: frozenset[str] | None,
        spare_live: bool,
        dry_run: bool,
        per_session: bool,
    ) -> Page:
        assert self._script is not None
        args: list[str | int] = [
            cursor,
            self.keys.all_sessions_pattern,
            self.scan_count,
            self.keys.session_root,
            "1" if dry_run else "0",
            "1" if spare_live else "0",
            MAX_ID_LENGTH,
            min(self.unlink_batch, SCRIPT_UNLINK_MAX),
            "1" if per_session else "0",
        ]
        if only is not None:
            args.extend(sorted(only))
        with translate_errors("scan a page of session keys"):
            next_cursor, flat, live, total = self._script(keys=[], args=args)
        removed = {key_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return Page(STANDALONE, int(next_cursor), removed, {key_text(s) for s in live}, int(total))

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
            sid = self.keys.session_of(key_text(key))
            if sid is not None and (only is None or sid in only):
                by_session[sid].append(key if isinstance(key, bytes) else key.encode())
        # NOTE: here the heartbeat check and the UNLINK are two round trips, so a heartbeat
        # written in the milliseconds between them is not seen. Cluster mode has no atomic
        # alternative (a script may not read keys of other slots); standalone uses the script.
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
