"""Temp files: one session's folder goes, in S3 (moto) or a directory; nothing beside it does."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
import redis
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from conftest import PREFIX, keys_of
from moto import mock_aws
from moto.backends import get_backend
from moto.core import DEFAULT_ACCOUNT_ID

from session_gc.collect import collect_sessions
from session_gc.errors import BadEvent, StoreUnavailable
from session_gc.full import full_gc
from session_gc.observability import metrics
from session_gc.runtime import Runtime
from session_gc.stores.temp import DirTempStore, Removal, S3TempStore
from session_gc_local import seed
from session_gc_local.invoke import LambdaContext

BUCKET = "session-gc-temp"
ROOT = "tmp"
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@pytest.fixture(autouse=True)
def no_metrics_left_behind() -> Iterator[None]:
    # Core calls made without a handler record metrics nobody flushes; drop them.
    yield
    metrics.clear_metrics()


# -- S3 ----------------------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    with mock_aws():
        client = boto3.client("s3", region_name="eu-west-1")
        client.create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        yield client


def put(keys: list[str]) -> None:
    # Straight into moto's S3: 2,500 PutObject calls through a client take 5-10 s here, and
    # what is under test (listing and deleting) goes through the store's real client anyway.
    backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
    for key in keys:
        backend.put_object(BUCKET, key, b"x")


def stored(client: Any) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def count_delete_calls(client: Any) -> list[int]:
    """Keys per DeleteObjects request, read from the request body as it goes on the wire."""
    calls: list[int] = []

    def count(params: dict[str, Any], **_: Any) -> None:
        body = ET.fromstring(params["body"])
        calls.append(len(body.findall(f"{S3_NS}Object")))

    client.meta.events.register("before-call.s3.DeleteObjects", count)
    return calls


def deny_deletion_of(client: Any, denied: str) -> None:
    """Make S3 refuse one key the way a bucket policy would: the key is left out of the real
    request (so moto keeps it) and reported under Errors, as S3 reports a partial failure.
    moto enforces no bucket policy, and an object lock does not help: DeleteObjects without
    a version id only adds a delete marker, which a lock allows."""

    def drop(params: dict[str, Any], **_: Any) -> None:
        objects = params["Delete"]["Objects"]
        params["Delete"]["Objects"] = [o for o in objects if o["Key"] != denied]
        if len(objects) != len(params["Delete"]["Objects"]):
            asked.append(denied)

    def report(parsed: dict[str, Any], **_: Any) -> None:
        while asked:
            error = {"Key": asked.pop(), "Code": "AccessDenied", "Message": "Access Denied"}
            parsed.setdefault("Errors", []).append(error)

    asked: list[str] = []
    client.meta.events.register("provide-client-params.s3.DeleteObjects", drop)
    client.meta.events.register("after-call.s3.DeleteObjects", report)


def test_s3_session_of_2500_files_goes_in_three_delete_calls_of_at_most_1000_keys(
    s3: Any,
) -> None:
    put([f"{ROOT}/s1/part-{i:04d}.bin" for i in range(2500)])
    calls = count_delete_calls(s3)

    removal = S3TempStore(BUCKET, ROOT, client=s3).remove_session("s1")

    assert removal == Removal(removed=2500)
    assert calls == [1000, 1000, 500]
    assert stored(s3) == set()


def test_s3_removal_of_1001_files_spares_sessions_whose_id_extends_it(s3: Any) -> None:
    mine = [f"{ROOT}/s1/{i // 100}/f-{i}.txt" for i in range(1001)]
    others = [
        f"{ROOT}/s10/a.txt",
        f"{ROOT}/s1x/a.txt",
        f"{ROOT}/s1",
        f"{ROOT}/s1.txt",
        "other/s1/a.txt",
        "s1/a.txt",
    ]
    put(mine + others)

    removal = S3TempStore(BUCKET, ROOT, client=s3).remove_session("s1")

    assert removal == Removal(removed=1001)
    assert stored(s3) == set(others)


def test_s3_dry_run_counts_the_session_files_and_deletes_nothing(s3: Any) -> None:
    put([f"{ROOT}/s1/{d}/f-{i}" for d in "ab" for i in range(7)] + [f"{ROOT}/s10/f"])
    before = stored(s3)
    calls = count_delete_calls(s3)

    removal = S3TempStore(BUCKET, ROOT, client=s3).remove_session("s1", dry_run=True)

    assert removal == Removal(removed=14)
    assert calls == []
    assert stored(s3) == before


def test_s3_session_ids_lists_the_session_folders_with_valid_ids(s3: Any) -> None:
    put(
        [
            f"{ROOT}/s1/a",
            f"{ROOT}/s1/b/c",
            f"{ROOT}/s10/a",
            f"{ROOT}/sess-{'9' * 8}/a",
            f"{ROOT}/loose-file.txt",
            f"{ROOT}/bad*id/a",
            f"{ROOT}/with space/a",
            "elsewhere/s2/a",
        ],
    )

    assert sorted(S3TempStore(BUCKET, ROOT, client=s3).session_ids()) == [
        "s1",
        "s10",
        "sess-99999999",
    ]


def test_s3_key_denied_by_s3_is_reported_failed_and_not_counted_removed(s3: Any) -> None:
    keys = [f"{ROOT}/s1/f-{i}" for i in range(5)]
    put(keys)
    deny_deletion_of(s3, keys[2])

    removal = S3TempStore(BUCKET, ROOT, client=s3).remove_session("s1")

    assert removal.removed == 4
    assert removal.failed == [(keys[2], "AccessDenied: Access Denied")]
    assert stored(s3) == {keys[2]}


def test_collect_with_a_denied_temp_file_puts_an_error_on_that_session_only(
    s3: Any, make_runtime: Callable[..., Runtime], valkey: redis.Redis
) -> None:
    put([f"{ROOT}/s1/a", f"{ROOT}/s1/b", f"{ROOT}/s2/a"])
    deny_deletion_of(s3, f"{ROOT}/s1/b")
    for sid in ("s1", "s2"):
        seed.write_session(valkey, PREFIX, sid, live=False)
    rt = make_runtime()
    rt.__dict__["temp"] = S3TempStore(BUCKET, ROOT, client=s3)

    results = collect_sessions(rt, ["s1", "s2"])

    assert results["s1"].error is not None
    assert f"{ROOT}/s1/b" in results["s1"].error
    assert "AccessDenied" in results["s1"].error
    assert results["s1"].cleaned.temp_files_removed == 1
    assert results["s2"].error is None
    assert results["s2"].cleaned.temp_files_removed == 1
    assert keys_of(valkey) == set()


def test_collect_handler_fails_the_record_of_a_session_with_a_denied_temp_file(
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
    handler: Callable[[str], ModuleType],
    context: LambdaContext,
) -> None:
    put([f"{ROOT}/s1/a", f"{ROOT}/s1/b", f"{ROOT}/s2/a"])
    monkeypatch.setenv("TEMP_STORE_URL", f"s3://{BUCKET}/{ROOT}")
    collect = handler("collect")
    deny_deletion_of(collect.RUNTIME.temp.client, f"{ROOT}/s1/b")
    event = seed.sqs_event(seed.session_bodies(["s1", "s2"]))

    response = collect.lambda_handler(event, context)

    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}
    assert stored(s3) == {f"{ROOT}/s1/b"}


# -- directory -----------------------------------------------------------------------------------


def make_files(root: Path, *relative: str) -> list[Path]:
    paths = []
    for rel in relative:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
        paths.append(path)
    return paths


def tree(root: Path) -> set[str]:
    return {
        str(Path(dirpath, name).relative_to(root))
        for dirpath, dirnames, filenames in os.walk(root)
        for name in dirnames + filenames
    }


def test_dir_removal_takes_the_whole_session_folder_and_spares_its_neighbours(
    tmp_path: Path,
) -> None:
    make_files(tmp_path, "s1/a.txt", "s1/deep/er/b.txt", "s1/deep/c.txt", "s1/empty/.keep")
    (tmp_path / "s1" / "empty-dir").mkdir()
    make_files(tmp_path, "s10/a.txt", "s1x/a.txt", "s1.txt")
    before = tree(tmp_path)

    removal = DirTempStore(tmp_path).remove_session("s1")

    assert removal == Removal(removed=4)
    assert tree(tmp_path) == {p for p in before if not p.startswith("s1/") and p != "s1"}


def test_dir_dry_run_counts_the_files_and_deletes_nothing(tmp_path: Path) -> None:
    make_files(tmp_path, "s1/a.txt", "s1/deep/er/b.txt", "s1/deep/c.txt", "s10/a.txt")
    before = tree(tmp_path)

    removal = DirTempStore(tmp_path).remove_session("s1", dry_run=True)

    assert removal == Removal(removed=3)
    assert tree(tmp_path) == before


def test_dir_session_folder_that_is_a_symlink_is_not_followed_and_is_reported(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    targets = make_files(outside, "precious.txt", "sub/more.txt")
    root.mkdir()
    (root / "s1").symlink_to(outside, target_is_directory=True)

    store = DirTempStore(root)
    removal = store.remove_session("s1")

    assert removal.removed == 0
    assert [path for path, _ in removal.failed] == [str(root / "s1")]
    assert all(path.read_text() for path in targets)
    assert (root / "s1").is_symlink()
    assert list(store.session_ids()) == []


def test_dir_symlinks_inside_a_session_folder_go_as_links_and_their_targets_survive(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    precious_file, precious_dir_file = make_files(outside, "precious.txt", "dir/kept.txt")
    make_files(root, "s1/own.txt")
    (root / "s1" / "link-to-file").symlink_to(precious_file)
    (root / "s1" / "link-to-dir").symlink_to(outside / "dir", target_is_directory=True)

    removal = DirTempStore(root).remove_session("s1")

    assert removal == Removal(removed=3)
    assert not (root / "s1").exists()
    assert precious_file.read_text() == "precious.txt"
    assert precious_dir_file.read_text() == "dir/kept.txt"


def test_dir_session_ids_lists_plain_folders_with_valid_ids(tmp_path: Path) -> None:
    make_files(tmp_path, "s1/a", "s10/a", "loose.txt", "bad name/a", "bad*id/a")

    assert sorted(DirTempStore(tmp_path).session_ids()) == ["s1", "s10"]


def test_dir_store_with_a_missing_root_has_no_sessions_and_removes_nothing(
    tmp_path: Path,
) -> None:
    store = DirTempStore(tmp_path / "never-created")

    assert list(store.session_ids()) == []
    assert store.remove_session("s1") == Removal()
    assert not (tmp_path / "never-created").exists()


def test_full_gc_removes_temp_folders_of_dead_sessions_and_keeps_live_ones(
    tmp_path: Path, make_runtime: Callable[..., Runtime], valkey: redis.Redis
) -> None:
    seed.write_session(valkey, PREFIX, "alive", live=True)
    seed.write_session(valkey, PREFIX, "dead", live=False)
    make_files(tmp_path, "alive/a", "alive/b/c", "dead/a", "dead/b/c", "dead/b/d")
    make_files(tmp_path, "no-keys-left/a", "no-keys-left/b")
    rt = make_runtime(temp_store_url=f"file://{tmp_path}")

    result = full_gc(rt)

    assert result.temp_files_removed == 5
    assert tree(tmp_path) == {"alive", "alive/a", "alive/b", "alive/b/c"}


def test_s3_store_whose_bucket_is_missing_raises_store_unavailable_naming_it(s3: Any) -> None:
    store = S3TempStore("no-such-bucket", ROOT, client=s3)

    with pytest.raises(StoreUnavailable, match="no-such-bucket"):
        store.remove_session("s1")
    with pytest.raises(StoreUnavailable, match="no-such-bucket"):
        list(store.session_ids())


def test_collect_handler_with_the_temp_bucket_missing_fails_every_record_with_the_reason(
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
    handler: Callable[[str], ModuleType],
    context: LambdaContext,
) -> None:
    monkeypatch.setenv("TEMP_STORE_URL", f"s3://no-such-bucket/{ROOT}")
    event = seed.sqs_event(["not-json", *seed.session_bodies(["s1", "s2"])])

    with pytest.raises(BatchProcessingError) as failed:
        handler("collect").lambda_handler(event, context)

    kinds = [type(value) for _, value, _ in failed.value.child_exceptions]
    assert kinds == [BadEvent, StoreUnavailable, StoreUnavailable]
    assert "no-such-bucket" in str(failed.value.child_exceptions[1][1])


def test_dir_store_whose_root_is_not_a_directory_raises_store_unavailable(
    tmp_path: Path,
) -> None:
    (tmp_path / "root").write_text("not a directory")
    store = DirTempStore(tmp_path / "root")

    with pytest.raises(StoreUnavailable, match="root"):
        store.remove_session("s1")
    with pytest.raises(StoreUnavailable, match="root"):
        list(store.session_ids())
