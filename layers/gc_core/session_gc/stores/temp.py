"""Session temp files: ``{root}/{sessionId}/...`` in S3 or in a directory (EFS or local).

Both stores answer the same two questions: which session folders exist, and remove one
session's files. A removal reports exactly what went and what did not; nothing is counted
as removed unless the store said it was.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from session_gc.errors import StoreUnavailable
from session_gc.ids import validate_session_id

# S3 DeleteObjects takes at most this many keys a call.
S3_DELETE_LIMIT = 1000


@dataclass
class Removal:
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path or key, reason)

    def describe_failures(self, limit: int = 5) -> str:
        shown = "; ".join(f"{k}: {why}" for k, why in self.failed[:limit])
        more = f" (+{len(self.failed) - limit} more)" if len(self.failed) > limit else ""
        return f"{len(self.failed)} temp file(s) not removed: {shown}{more}"


class TempStore(Protocol):
    def session_ids(self) -> Iterator[str]: ...

    def remove_session(self, session_id: str, *, dry_run: bool = False) -> Removal: ...


def open_temp_store(url: str | None, *, s3_client: Any = None) -> TempStore | None:
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme == "s3":
        return S3TempStore(parts.netloc, parts.path.strip("/"), client=s3_client)
    return DirTempStore(Path(unquote(parts.path)))


class S3TempStore:
    def __init__(self, bucket: str, prefix: str, *, client: Any = None) -> None:
        self.bucket = bucket
        # Always a trailing slash, so session "s1" can never reach "s10/".
        self.root = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3  # only deployments with an S3 temp store pay for this import

            self._client = boto3.client("s3")
        return self._client

    @contextmanager
    def _translate(self, step: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise StoreUnavailable(
                f"S3 temp store s3://{self.bucket}/{self.root} failed to {step}: {exc}"
            ) from exc

    def session_ids(self) -> Iterator[str]:
        with self._translate("list session folders"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.root, Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    name = common["Prefix"][len(self.root) :].rstrip("/")
                    if _valid(name):
                        yield name

    def remove_session(self, session_id: str, *, dry_run: bool = False) -> Removal:
        # An S3 error fails the whole session (its message is retried), including the count of
        # what already went: the retry lists and removes only what is left.
        with self._translate(f"remove the files of session {session_id!r}"):
            return self._remove(session_id, dry_run)

    def _remove(self, session_id: str, dry_run: bool) -> Removal:
        prefix = f"{self.root}{validate_session_id(session_id)}/"
        result = Removal()
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        # Deleting while listing is safe: ListObjectsV2 continues from a key, not an offset.
        for page in pages:
            keys = [obj["Key"] for obj in page.get("Contents", [])]
            for i in range(0, len(keys), S3_DELETE_LIMIT):
                chunk = keys[i : i + S3_DELETE_LIMIT]
                if dry_run:
                    result.removed += len(chunk)
                    continue
                reply = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
                )
                # NOTE: keys S3 refused are reported, not retried here; the session's record
                # fails and SQS redelivery retries what is left.
                errors = reply.get("Errors", [])
                result.failed.extend(
                    (e.get("Key", "?"), f"{e.get('Code')}: {e.get('Message')}") for e in errors
                )
                result.removed += len(chunk) - len(errors)
        return result


class DirTempStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def session_ids(self) -> Iterator[str]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreUnavailable(f"temp directory {self.root} unreadable: {exc}") from exc
        for entry in entries:
            if _valid(entry.name) and entry.is_dir(follow_symlinks=False):
                yield entry.name

    def remove_session(self, session_id: str, *, dry_run: bool = False) -> Removal:
        folder = self.root / validate_session_id(session_id)
        result = Removal()
        try:
            mode = folder.lstat().st_mode
        except FileNotFoundError:
            return result
        except OSError as exc:
            raise StoreUnavailable(f"temp directory {self.root} unreadable: {exc}") from exc
        if not stat.S_ISDIR(mode):
            # A symlink here could point anywhere (another session, /); never follow it.
            result.failed.append((str(folder), "not a plain directory (symlink?); left alone"))
            return result
        # Bottom-up without following links: a link inside is removed as a link, and its
        # target is never visited.
        for dirpath, dirnames, filenames in os.walk(folder, topdown=False, followlinks=False):
            for name in filenames + [
                d for d in dirnames if os.path.islink(os.path.join(dirpath, d))
            ]:
                path = os.path.join(dirpath, name)
                if dry_run:
                    result.removed += 1
                    continue
                try:
                    os.unlink(path)
                    result.removed += 1
                except OSError as exc:
                    result.failed.append((path, exc.strerror or str(exc)))
            if not dry_run:
                try:
                    os.rmdir(dirpath)
                except OSError as exc:
                    if not result.failed:
                        result.failed.append((dirpath, exc.strerror or str(exc)))
        return result


def _valid(name: str) -> bool:
    try:
        validate_session_id(name)
    except ValueError:
        return False
    return True
