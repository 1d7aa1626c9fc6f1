"""Session ids are checked before they reach a key pattern, and keys parse back to their ids."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from session_gc.errors import InvalidSessionId
from session_gc.ids import MAX_ID_LENGTH, KeySpace, glob_escape, validate_session_id

KEYS = KeySpace("mosaic")
FORBIDDEN = set("*?[]\\:{}")


@pytest.mark.parametrize(
    "bad_char",
    ["*", "?", "[", "]", "\\", ":", "{", "}", " ", "\t", "\n", "\r", "\x00", "\x7f", '"', "'"],
)
def test_validate_rejects_id_with_special_character_and_names_it(bad_char: str) -> None:
    with pytest.raises(InvalidSessionId) as caught:
        validate_session_id(f"sess{bad_char}1")

    assert repr(bad_char) in str(caught.value)


@pytest.mark.parametrize("bad_id", ["*", "?", "[a-z]", "\\", "a:b", "{a}"])
def test_validate_rejects_bare_glob_and_separator_ids(bad_id: str) -> None:
    with pytest.raises(InvalidSessionId, match="not allowed"):
        validate_session_id(bad_id)


def test_validate_rejects_empty_id() -> None:
    with pytest.raises(InvalidSessionId, match="empty"):
        validate_session_id("")


@pytest.mark.parametrize("value", [None, 5, ["abc"], b"abc"])
def test_validate_rejects_non_string_and_names_its_type(value: object) -> None:
    with pytest.raises(InvalidSessionId, match=f"must be a string, got {type(value).__name__}"):
        validate_session_id(value)


def test_validate_rejects_id_one_over_the_length_limit() -> None:
    validate_session_id("a" * MAX_ID_LENGTH)

    with pytest.raises(InvalidSessionId, match=r"201 characters long, the limit is 200"):
        validate_session_id("a" * (MAX_ID_LENGTH + 1))


@pytest.mark.parametrize(
    "good_id",
    [str(uuid.UUID(int=12345)), "sess-1", "a.b_c@d+e=f", "A", "0", "x" * MAX_ID_LENGTH],
)
def test_validate_accepts_realistic_id_unchanged(good_id: str) -> None:
    assert validate_session_id(good_id) == good_id


@hsettings(max_examples=500, deadline=None)
@given(st.text(max_size=MAX_ID_LENGTH + 5))
def test_validate_passes_no_pattern_syntax_for_any_text(text: str) -> None:
    try:
        sid = validate_session_id(text)
    except InvalidSessionId:
        return
    assert not FORBIDDEN & set(sid)
    assert not any(ch.isspace() or not ch.isprintable() for ch in sid)
    assert 0 < len(sid) <= MAX_ID_LENGTH
    # Whatever passes round-trips through both key spellings.
    assert KEYS.session_of(f"mosaic:session:{sid}:meta") == sid
    assert KEYS.session_of(f"mosaic:session:{{{sid}}}:meta") == sid


@pytest.mark.parametrize(
    ("key", "session"),
    [
        ("mosaic:session:abc:meta", "abc"),
        ("mosaic:session:{abc}:meta", "abc"),
        ("mosaic:session:abc:history:2024", "abc"),
        ("mosaic:session:{abc}:tools:{x}", "abc"),
        ("mosaic:session:abc:", "abc"),
        ("mosaic:session:a.b_c@d+e=f:meta", "a.b_c@d+e=f"),
    ],
)
def test_session_of_reads_plain_and_tagged_keys(key: str, session: str) -> None:
    assert KEYS.session_of(key) == session


@pytest.mark.parametrize(
    "key",
    [
        "other:session:abc:meta",
        "mosaic:sessions:x",
        "mosaic:channel:abc:cursor",
        "mosaic:gc:lock",
        "mosaic:session:abc",
        "mosaic:session:{abc}",
        "mosaic:session:{abc}x:meta",
        "mosaic:session:{abc:meta",
        "mosaic:session:*:x",
        "mosaic:session:a b:x",
        "mosaic:session:::x",
        "mosaic:session::x",
        "mosaic:session:{}:x",
        "mosaic:session:{a{b}:x",
        "mosaic:session:abc}:x",
        "mosaic:session:caf\u00e9:x",
        f"mosaic:session:{'a' * (MAX_ID_LENGTH + 1)}:x",
    ],
)
def test_session_of_returns_none_for_foreign_or_malformed_key(key: str) -> None:
    assert KEYS.session_of(key) is None


def test_glob_escape_escapes_every_glob_special() -> None:
    assert glob_escape("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"
    assert glob_escape("mosaic:session:") == "mosaic:session:"


@given(st.text(max_size=30))
def test_glob_escape_leaves_no_special_unescaped(text: str) -> None:
    escaped = glob_escape(text)

    # Reading the escapes back gives the input, and no special stands on its own.
    assert re.sub(r"\\(.)", r"\1", escaped, flags=re.DOTALL) == text
    assert not re.search(r"(?<!\\)(?:\\\\)*[*?\[\]]", escaped)


def test_session_patterns_cover_plain_and_tagged_spellings() -> None:
    assert KEYS.session_patterns("abc") == ("mosaic:session:abc:*", "mosaic:session:{abc}:*")


@pytest.mark.parametrize("bad_id", ["*", "", "a:b", "a b", "ab*", "[abc]"])
def test_session_patterns_refuse_id_that_would_widen_the_match(bad_id: str) -> None:
    with pytest.raises(InvalidSessionId):
        KEYS.session_patterns(bad_id)
