"""Text from requests, made safe before it is stored, logged or echoed."""

from __future__ import annotations

import pytest

from integrations_service.untrusted import bounded, controls_escaped


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("org_demo", "org_demo"),
        ("a\r\nX: forged", "a\\x0d\\x0aX: forged"),
        ("nul\x00byte", "nul\\x00byte"),
        ("del\x7f c1\x85", "del\\x7f c1\\x85"),
        ("line\u2028sep", "line\\u2028sep"),
        ("lone\ud800surrogate", "lone\\ud800surrogate"),
        ("back\\slash", "back\\\\slash"),
        ("café", "café"),
    ],
)
def test_control_characters_are_escaped(raw: str, safe: str) -> None:
    assert bounded(raw) == safe
    assert bounded(raw).encode("utf-8")  # always storable UTF-8


def test_long_text_is_cut_with_a_marker() -> None:
    result = bounded("x" * 1_000_000, limit=10)
    assert result == "x" * 10 + "…[+999990 chars]"


def test_text_at_the_limit_is_kept_whole() -> None:
    assert bounded("y" * 10, limit=10) == "y" * 10


@pytest.mark.parametrize("code", [*range(0x300), 0x2028, 0x2029, 0xD800, 0xDFFF, 0xFEFF, 0x1F600])
def test_a_character_is_escaped_exactly_when_it_is_unsafe_or_a_backslash(code: int) -> None:
    char = chr(code)
    text = f"a{char}b"
    # C0 controls, DEL, C1 controls, lone surrogates, the line and paragraph separators.
    unsafe = code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF or code in (0x2028, 0x2029)
    assert (bounded(text) == text) is (not unsafe and char != "\\")
    assert (controls_escaped(text) == text) is (not unsafe)
