"""The nesting check of a shared record's header (proxy.cache.records._depth) against the
byte-by-byte reading it replaced."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.cache.records import _depth


def byte_by_byte(text: bytes) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


@given(st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b"\n", b"\xff"])))
def test_the_depth_is_the_byte_by_byte_reading(parts: list[bytes]) -> None:
    text = b"".join(parts)
    assert _depth(text) == byte_by_byte(text)


def test_brackets_inside_strings_and_escapes_do_not_count() -> None:
    assert _depth(b'{"a": "[[[{{", "b": ["\\"[", 1]}') == 2
    assert _depth(b'["unterminated [[[') == 1
    assert _depth(b"[" * 10_000) == 10_000
