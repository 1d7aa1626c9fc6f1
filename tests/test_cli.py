"""The operator CLI: JSON on stdout, logs on stderr, exit codes a script can act on."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pg8000.native
import pytest
import redis
from conftest import PREFIX, keys_of

from session_gc.cli import main
from session_gc_local import seed

SESSION_GC = Path(sys.executable).parent / "session-gc"


@pytest.fixture(autouse=True)
def cli_env(
    handler_env: dict[str, str],
    valkey: redis.Redis,
    pg: pg8000.native.Connection,
    restore_cli_logging: None,
) -> None:
    """The environment the functions get, pointing at the clean test servers."""


def logs(pg: pg8000.native.Connection) -> list[list[object]]:
    return pg.run("SELECT id, session_id, tier, created_at FROM agent_logs ORDER BY id")


def seed_sessions(valkey: redis.Redis, pg: pg8000.native.Connection) -> dict[str, set[str]]:
    owned = {}
    for sid in ("a1", "ab", "abc"):
        owned[sid] = set(seed.write_session(valkey, PREFIX, sid, live=False))
        seed.add_logs(pg, sid, count=3)
    owned["alive"] = set(seed.write_session(valkey, PREFIX, "alive", live=True))
    seed.write_bystanders(valkey, PREFIX, count=2)
    return owned


def closed_port() -> int:
    with socket.socket() as probe:  # nothing listens on it once the probe closes
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_collect_dry_run_prints_the_counts_as_json_and_changes_nothing(
    valkey: redis.Redis, pg: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_sessions(valkey, pg)
    keys_before, logs_before = keys_of(valkey), logs(pg)

    code = main(["collect", "abc", "--dry-run"])

    assert code == 0
    assert json.loads(capsys.readouterr().out) == [
        {"sessionId": "abc", "cleaned": {"valkeyKeys": 5, "logsDemoted": 3}}
    ]
    assert keys_of(valkey) == keys_before
    assert logs(pg) == logs_before


def test_collect_removes_exactly_the_named_sessions_and_exits_zero(
    valkey: redis.Redis, pg: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    owned = seed_sessions(valkey, pg)
    keys_before = keys_of(valkey)

    code = main(["--json", "collect", "ab", "alive"])

    assert code == 0
    assert json.loads(capsys.readouterr().out) == [
        {"sessionId": "ab", "cleaned": {"valkeyKeys": 5, "logsDemoted": 3}},
        {"sessionId": "alive", "cleaned": {}, "skipped": "live"},
    ]
    assert keys_of(valkey) == keys_before - owned["ab"]


def test_collect_with_a_glob_id_exits_2_naming_the_id_and_deletes_nothing(
    valkey: redis.Redis, pg: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_sessions(valkey, pg)
    keys_before, logs_before = keys_of(valkey), logs(pg)

    code = main(["collect", "abc", "a*"])

    assert code == 2
    captured = capsys.readouterr()
    assert "'a*'" in captured.err
    assert captured.out == ""
    assert keys_of(valkey) == keys_before
    assert logs(pg) == logs_before


def test_collect_with_a_temp_folder_that_cannot_go_exits_1_with_the_error_in_the_result(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    valkey: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "abc").symlink_to(tmp_path / "outside", target_is_directory=True)
    monkeypatch.setenv("TEMP_STORE_URL", f"file://{tmp_path / 'root'}")

    code = main(["collect", "abc"])

    assert code == 1
    [result] = json.loads(capsys.readouterr().out)
    assert "symlink" in result["error"]


def test_full_dry_run_json_prints_one_line_with_the_full_result_shape(
    valkey: redis.Redis, pg: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_sessions(valkey, pg)
    size, keys_before, logs_before = valkey.dbsize(), keys_of(valkey), logs(pg)

    code = main(["full", "--dry-run", "--json"])

    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {"valkeyKeys", "logsDemoted", "jobsPurged", "tempFilesRemoved", "duration"} <= set(
        result
    )
    assert (result["valkeyKeys"], result["dryRun"]) == (15, True)
    assert valkey.dbsize() == size
    assert keys_of(valkey) == keys_before
    assert logs(pg) == logs_before


def test_sweep_exits_zero_and_marks_dead_sessions_as_candidates_only(
    valkey: redis.Redis, pg: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    owned = seed_sessions(valkey, pg)
    session_keys = set().union(*owned.values())

    code = main(["sweep", "--json"])

    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["candidates"]["new"] == 3
    assert result["orphanedSessions"] == 0
    assert session_keys <= keys_of(valkey)


def test_full_while_the_lock_is_held_exits_4_and_deletes_nothing(
    valkey: redis.Redis, pg: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_sessions(valkey, pg)
    keys_before = keys_of(valkey)
    lock = valkey.lock(f"{PREFIX}:gc:lock", timeout=60)
    assert lock.acquire(blocking=False)
    try:
        code = main(["full"])
    finally:
        lock.release()

    assert code == 4
    assert json.loads(capsys.readouterr().out)["stopped"] == "locked"
    assert keys_of(valkey) == keys_before


def test_full_with_valkey_unreachable_exits_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VALKEY_URL", f"redis://127.0.0.1:{closed_port()}/0")

    code = main(["full"])

    assert code == 3
    captured = capsys.readouterr()
    assert "Valkey unreachable" in captured.err
    assert captured.out == ""


def test_full_without_valkey_url_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("VALKEY_URL")

    code = main(["full", "--dry-run"])

    assert code == 2
    assert "VALKEY_URL" in capsys.readouterr().err


def test_schema_prints_the_sql_that_creates_the_log_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["schema"])

    assert code == 0
    assert "CREATE TABLE IF NOT EXISTS agent_logs" in capsys.readouterr().out


def test_installed_command_help_exits_zero_and_names_every_command() -> None:
    done = subprocess.run(
        [str(SESSION_GC), "--help"], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0
    for command in ("collect", "sweep", "full", "schema", "demo"):
        assert command in done.stdout
