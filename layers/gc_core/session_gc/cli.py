"""session-gc: the operator's command line over the same core the Lambda handlers use.

Reads the same environment variables as the functions (VALKEY_URL, DATABASE_URL, ...).
Results go to stdout as JSON; logs go to stderr. Exit codes, for scripts:
  0  the run finished and everything asked for was done
  1  the run finished, but some sessions failed (see "error" in the result)
  2  bad arguments, a bad session id or bad configuration: nothing was done
  3  a store was unreachable or its schema is missing
  4  the run did not act: another run holds the lock, or a blast-radius guard stopped it
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from session_gc.errors import BadEvent, ConfigError, InvalidSessionId, SessionGcError
from session_gc.observability import logger, metrics

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_STORE, EXIT_NOT_ACTED = 0, 1, 2, 3, 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="session-gc",
        description=(
            "Collect what ended agent sessions leave behind: Valkey session keys, hot log "
            "rows, finished summarization jobs and temp files. Configured by the same "
            "environment variables as the Lambda functions (VALKEY_URL, DATABASE_URL, ...)."
        ),
        epilog=__doc__.split("Exit codes, for scripts:")[1].join(["Exit codes:", ""]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _output_options(parser, default=False)
    # The same options after the command (`session-gc full --dry-run --json`); SUPPRESS keeps
    # a command that does not repeat them from resetting what was given before it.
    after = argparse.ArgumentParser(add_help=False)
    _output_options(after, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    collect = commands.add_parser(
        "collect",
        parents=[after],
        help="collect the given ended sessions now",
        description="Collect these sessions in one pass: their Valkey keys, hot log rows "
        "(demoted to warm) and temp files. A session with a live heartbeat is skipped.",
    )
    collect.add_argument("session_ids", nargs="+", metavar="ID")
    collect.add_argument("--dry-run", action="store_true", help="count, change nothing")
    collect.add_argument(
        "--force", action="store_true", help="collect even sessions whose heartbeat exists"
    )

    sweep = commands.add_parser(
        "sweep",
        parents=[after],
        help="run one two-phase sweep for sessions that died uncollected",
        description="Mark sessions without a heartbeat as candidates; collect candidates "
        "still dead after the grace period (SWEEP_GRACE_SECONDS).",
    )
    sweep.add_argument("--dry-run", action="store_true", help="report, change nothing")
    sweep.add_argument(
        "--override-blast-radius",
        action="store_true",
        help="collect even if the blast-radius guard would stop this sweep",
    )

    full = commands.add_parser(
        "full",
        parents=[after],
        help="collect everything no live session owns (after a deployment)",
        description="Delete every session key whose session has no heartbeat, demote hot "
        "logs older than HOT_LOG_MAX_AGE_HOURS, purge finished jobs older than "
        "JOB_RETENTION_HOURS, remove temp folders of sessions without a heartbeat.",
    )
    full.add_argument("--dry-run", action="store_true", help="count, change nothing")
    full.add_argument(
        "--force", action="store_true", help="also collect sessions whose heartbeat exists"
    )

    schema = commands.add_parser(
        "schema",
        parents=[after],
        help="print (or apply) the SQL that creates the log table and indexes",
    )
    schema.add_argument("--apply", action="store_true", help="run it against DATABASE_URL")

    commands.add_parser(
        "demo",
        help="run the whole GC on embedded Valkey and PostgreSQL with seeded sessions",
        description="Needs the development install (make demo does it).",
    )
    return parser


def _output_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        default=default,
        help="print the result as one compact JSON line",
    )
    parser.add_argument(
        "--quiet", action="store_true", default=default, help="log only warnings and errors"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logs_to_stderr(logging.WARNING if args.quiet else logging.INFO)
    if args.command == "demo":
        try:
            from session_gc_local.demo import run_demo
        except ImportError:
            print("session-gc demo needs the development install: run `make demo`", file=sys.stderr)
            return EXIT_USAGE
        return run_demo()
    try:
        result, code = _run(args)
    except (ConfigError, InvalidSessionId, BadEvent) as exc:
        print(f"session-gc: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SessionGcError as exc:
        print(f"session-gc: {exc}", file=sys.stderr)
        return EXIT_STORE
    finally:
        # The CLI publishes no metrics; drop what the run recorded instead of printing it.
        metrics.clear_metrics()
    if isinstance(result, str):
        print(result)
    else:
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return code


def _run(args: argparse.Namespace) -> tuple[Any, int]:
    from session_gc.runtime import Runtime

    if args.command == "schema":
        return _schema(args.apply)
    rt = Runtime.from_env()
    # DRY_RUN=true in the environment makes every run a dry run, as it does for the handlers.
    dry_run = bool(getattr(args, "dry_run", False)) or rt.settings.dry_run
    progress = _progress_bar(rt)
    try:
        if args.command == "collect":
            from session_gc.collect import collect_sessions
            from session_gc.ids import validate_session_id

            ids = [validate_session_id(sid) for sid in args.session_ids]
            results = collect_sessions(rt, ids, dry_run=dry_run, force=args.force)
            failed = any(r.error for r in results.values())
            return [r.to_json() for r in results.values()], EXIT_PARTIAL if failed else EXIT_OK
        if args.command == "sweep":
            from session_gc.sweep import OVERRIDE_BLAST_RADIUS, sweep

            override = OVERRIDE_BLAST_RADIUS if args.override_blast_radius else None
            swept = sweep(rt, dry_run=dry_run, override=override)
            failed = any(r.error for r in swept.total_cleaned)
            code = EXIT_NOT_ACTED if swept.stopped else EXIT_PARTIAL if failed else EXIT_OK
            return swept.to_json(), code
        from session_gc.full import full_gc

        done = full_gc(rt, dry_run=dry_run, force=args.force)
        return done.to_json(), EXIT_NOT_ACTED if done.stopped else EXIT_OK
    finally:
        if progress is not None:
            progress.close()
        rt.close()


def _schema(apply: bool) -> tuple[str, int]:
    from session_gc.stores.logs import schema_sql

    sql = schema_sql()
    if not apply:
        return sql, EXIT_OK
    from session_gc.settings import load_settings
    from session_gc.stores.logs import LogStore

    settings = load_settings()
    target = settings.database_target
    if target is None:
        raise ConfigError("schema --apply needs DATABASE_URL")
    LogStore(target).apply_schema()
    return "schema applied", EXIT_OK


def _progress_bar(rt: Any) -> Any:
    """A live count of pages walked and keys collected, on a terminal only (tqdm)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the layer does not ship tqdm; the CLI works without it
        return None
    bar = tqdm(desc="valkey", unit=" pages", file=sys.stderr, leave=False)
    keys = 0

    def on_page(page: Any) -> None:
        nonlocal keys
        keys += page.total
        bar.update(1)
        bar.set_postfix(keys=keys, refresh=False)

    rt.valkey.on_page = on_page
    return bar


def _logs_to_stderr(level: int) -> None:
    # Powertools logs to stdout (where Lambda expects it); here stdout carries the result.
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
