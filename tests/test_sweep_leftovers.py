"""The sweep collects more than keys: orphan temp folders (same two phases, same heartbeat)
and finished jobs past their retention."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pg8000.native
import pytest
import redis
from conftest import PREFIX, keys_of
from test_jobs import job_counts
from test_sweep import Clock

from session_gc.runtime import Runtime
from session_gc.stores.temp import DirTempStore
from session_gc.sweep import sweep
from session_gc_local import seed

GRACE = 600


@pytest.fixture
def sweeper(
    make_runtime: Callable[..., Runtime], pg: pg8000.native.Connection, tmp_path: Path
) -> tuple[Runtime, Clock]:
    """A runtime on a moveable clock with a directory temp store in tmp_path."""
    clock = Clock()
    rt = make_runtime(clock=clock, sweep_grace_seconds=GRACE)
    rt.__dict__["temp"] = DirTempStore(tmp_path)
    return rt, clock


def _folder(root: Path, sid: str) -> Path:
    (root / sid / "uploads").mkdir(parents=True)
    (root / sid / "uploads" / "a.png").write_bytes(b"png")
    (root / sid / "notes.md").write_text("notes")
    return root / sid


def test_orphan_temp_folders_go_after_two_sweeps_and_live_ones_stay(
    valkey: redis.Redis, sweeper: tuple[Runtime, Clock], tmp_path: Path
) -> None:
    # GIVEN live sessions (keys + folder), a session with only a heartbeat and a folder,
    # and orphan folders whose sessions left no keys at all
    rt, clock = sweeper
    for i in range(8):
        seed.write_session(valkey, PREFIX, f"live{i}", live=True)
        _folder(tmp_path, f"live{i}")
    valkey.set(f"{PREFIX}:session:beat-only:heartbeat", "1", ex=600)
    _folder(tmp_path, "beat-only")
    orphans = [_folder(tmp_path, f"gone{i}") for i in range(2)]
    keys_before = keys_of(valkey)

    # WHEN a sweep marks them
    first = sweep(rt)

    # THEN nothing goes yet
    assert sorted(first.new_candidates) == ["gone0", "gone1"]
    assert first.orphaned_sessions == 0
    assert all(p.exists() for p in orphans)

    # WHEN a later sweep past the grace runs
    clock.now += GRACE
    second = sweep(rt)

    # THEN only the orphan folders went
    assert second.orphaned_sessions == 2
    assert {r.session_id: r.cleaned.temp_files_removed for r in second.total_cleaned} == {
        "gone0": 2,
        "gone1": 2,
    }
    assert not any(p.exists() for p in orphans)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"live{i}" for i in range(8)] + ["beat-only"]
    )
    assert keys_of(valkey) - {f"{PREFIX}:gc:candidates"} == keys_before


def test_a_heartbeat_between_the_sweeps_saves_an_orphan_folder(
    valkey: redis.Redis, sweeper: tuple[Runtime, Clock], tmp_path: Path
) -> None:
    rt, clock = sweeper
    for i in range(4):
        seed.write_session(valkey, PREFIX, f"live{i}", live=True)
    folder = _folder(tmp_path, "back")

    sweep(rt)
    valkey.set(f"{PREFIX}:session:{{back}}:heartbeat", "1", ex=600)
    clock.now += GRACE
    second = sweep(rt)

    assert second.orphaned_sessions == 0
    assert folder.exists()
    assert not valkey.hexists(f"{PREFIX}:gc:candidates", "back")


def test_sweep_purges_finished_jobs_past_retention_and_reports_them(
    valkey_url: str,
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    make_runtime: Callable[..., Runtime],
) -> None:
    asyncio.run(seed.seed_jobs(valkey_url, completed=4, failed=2))
    time.sleep(1.2)
    asyncio.run(seed.seed_jobs(valkey_url, completed=1, waiting=3, delayed=2))
    rt = make_runtime(job_retention_hours=1 / 3600)

    dry = sweep(rt, dry_run=True)
    real = sweep(rt)

    assert dry.jobs_purged == 6 and dry.to_json()["jobsPurged"] == 6
    assert real.jobs_purged == 6
    counts = asyncio.run(job_counts(valkey_url))
    assert counts == {"completed": 1, "failed": 0, "waiting": 3, "delayed": 2, "active": 0}
