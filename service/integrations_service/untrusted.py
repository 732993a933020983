"""Text that came from a request, made safe to store, log or echo.

Anything a caller sends (organization ids, provider ids, field keys, request
ids) may be huge, or hold control characters that would forge a log line or
make PostgreSQL refuse a row (NUL). `bounded` is applied before such text
goes into an audit record, a log line or an error message: the result is
short, printable, valid UTF-8, and shows plainly that it was changed.
"""

from __future__ import annotations

# Enough for every legitimate identifier (organization ids are at most 128 characters).
DEFAULT_LIMIT = 160


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    code = ord(char)
    # C0 controls, DEL, C1 controls, lone surrogates, and the Unicode line and paragraph separators.
    return code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF or code in (0x2028, 0x2029)


def bounded(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """At most `limit` characters of `text` (plus a marker saying how many were cut), control characters escaped.

    A backslash is escaped too, so an escaped result can never be mistaken for one that was not.
    """
    cut = max(len(text) - limit, 0)
    head = text[:limit] if cut else text
    # Printable ASCII has none of `_unsafe`'s characters (those are C0, DEL or beyond ASCII): no scan needed.
    if head.isprintable() and "\\" not in head and (head.isascii() or not any(map(_unsafe, head))):
        safe = head
    else:
        safe = "".join("\\\\" if c == "\\" else _escape(c) if _unsafe(c) else c for c in head)
    return f"{safe}…[+{cut} chars]" if cut else safe


def controls_escaped(text: str) -> str:
    """`text`, whole, with only its control characters escaped (backslashes stay as they are).

    For text that may already have been through `bounded` (log fields): escaping it again would
    double every backslash `bounded` wrote. It still cannot break a line.
    """
    if text.isprintable() and (text.isascii() or not any(map(_unsafe, text))):
        return text
    return "".join(_escape(c) if _unsafe(c) else c for c in text)
