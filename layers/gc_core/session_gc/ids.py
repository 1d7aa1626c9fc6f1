"""Session ids and the key names built from them.

Ids are opaque strings, but they end up inside SCAN MATCH patterns, so anything a glob or
the key layout could read as syntax is refused before use: an id of ``*`` would otherwise
widen ``mosaic:session:*:*`` to every session.
"""

from __future__ import annotations

import re

from session_gc.errors import InvalidSessionId

MAX_ID_LENGTH = 200

# Letters, digits and a few separators. Everything else (glob characters * ? [ ] \, the key
# separator ':', hash-tag braces, whitespace, control characters, quotes) is rejected.
_ID_CHARS = "A-Za-z0-9._@+=-"
_ID_RE = re.compile(f"[{_ID_CHARS}]+")
# The same rule on the raw bytes of a key, length included (keys arrive as bytes).
_RAW_ID_RE = re.compile(f"[{_ID_CHARS}]{{1,{MAX_ID_LENGTH}}}".encode())
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def validate_session_id(value: object) -> str:
    """Return ``value`` if it is a usable session id, else raise InvalidSessionId saying why."""
    if not isinstance(value, str):
        raise InvalidSessionId(f"session id must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidSessionId("session id is empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidSessionId(
            f"session id is {len(value)} characters long, the limit is {MAX_ID_LENGTH}"
        )
    if not _ID_RE.fullmatch(value):
        bad = sorted({ch for ch in value if not _ID_RE.fullmatch(ch)})
        raise InvalidSessionId(
            f"session id {value!r} contains characters that are not allowed: {bad!r} "
            "(ids may hold letters, digits and . _ @ + = -)"
        )
    return value


def glob_escape(text: str) -> str:
    """Escape ``text`` so that a Valkey MATCH pattern reads it literally."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class KeySpace:
    """Names of the keys the GC reads and writes under one prefix.

    Session keys are ``{prefix}:session:{id}:{rest}``; a platform running Valkey in cluster
    mode may write the id as a hash tag, ``{prefix}:session:{{id}}:{rest}``, so that all of a
    session's keys share a slot. Both spellings belong to the same session.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.session_root = f"{prefix}:session:"
        self._raw_root = self.session_root.encode()
        # Bookkeeping lives under its own word, never under session: or channel:.
        self.gc_root = f"{prefix}:gc:"

    @property
    def all_sessions_pattern(self) -> str:
        return f"{glob_escape(self.session_root)}*"

    def session_patterns(self, session_id: str) -> tuple[str, str]:
        """MATCH patterns for one session's keys, plain and hash-tagged; the id is checked."""
        sid = validate_session_id(session_id)
        root = glob_escape(self.session_root)
        return f"{root}{sid}:*", f"{root}{{{sid}}}:*"

    def heartbeat_keys(self, session_id: str) -> tuple[str, str]:
        return (
            f"{self.session_root}{session_id}:heartbeat",
            f"{self.session_root}{{{session_id}}}:heartbeat",
        )

    def raw_heartbeat_keys(self, session_id: bytes) -> tuple[bytes, bytes]:
        """heartbeat_keys for an id as a page engine holds it: bytes read out of a key."""
        root = self._raw_root
        return root + session_id + b":heartbeat", root + b"{" + session_id + b"}:heartbeat"

    def session_of(self, key: bytes | str) -> str | None:
        """The session id a key belongs to, or None if it is not a well-formed session key."""
        raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
        part = self.id_part(raw)
        return part.decode("ascii") if part is not None and valid_raw_id(part) else None

    def id_part(self, key: bytes) -> bytes | None:
        """Where a key's session id sits (``abc`` of ``…:session:abc:x`` or ``…:{abc}:x``).

        Not yet validated: a page engine checks each distinct part once with valid_raw_id,
        instead of once per key.
        """
        root = self._raw_root
        if not key.startswith(root):
            return None
        at = len(root)
        if key[at : at + 1] == b"{":
            end = key.find(b"}:", at + 1)
            return key[at + 1 : end] if end > 0 else None
        end = key.find(b":", at)
        return key[at:end] if end > 0 else None

    def gc_key(self, name: str) -> str:
        return f"{self.gc_root}{name}"


def valid_raw_id(part: bytes) -> bool:
    """validate_session_id's rule for an id read out of a key, without the exception."""
    return _RAW_ID_RE.fullmatch(part) is not None
