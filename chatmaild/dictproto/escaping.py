"""Dovecot's tab-escaping of fields (``str_append_tabescaped`` / ``str_tabunescape``).

Split a line on raw TAB first, then unescape each field; never strip anything
(an empty value arrives as a trailing TAB).
"""

from __future__ import annotations

_NEEDS_ESCAPE = b"\x01\t\n\r\x00"
_UNESCAPES = {ord("1"): 0x01, ord("t"): 0x09, ord("n"): 0x0A, ord("r"): 0x0D, ord("0"): 0x00}


def tabescape(data: bytes) -> bytes:
    """Escape one field the way Dovecot's ``str_append_tabescaped_n`` does."""
    if len(data.translate(None, _NEEDS_ESCAPE)) == len(data):  # one C pass: the common case
        return data
    return (
        data.replace(b"\x01", b"\x011")
        .replace(b"\t", b"\x01t")
        .replace(b"\n", b"\x01n")
        .replace(b"\r", b"\x01r")
        .replace(b"\x00", b"\x010")
    )


def tabunescape(field: bytes) -> bytes:
    """Undo :func:`tabescape`; ``\\x01`` followed by any other byte yields that byte."""
    if b"\x01" not in field:
        return field
    out = bytearray()
    i = 0
    n = len(field)
    while i < n:
        b = field[i]
        if b == 0x01 and i + 1 < n:
            nxt = field[i + 1]
            out.append(_UNESCAPES.get(nxt, nxt))
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def split_fields(body: bytes) -> list[bytes]:
    """Split on raw TAB first, then unescape each field (never strip anything)."""
    if b"\x01" not in body:  # nothing escaped anywhere: skip the per-field pass
        return body.split(b"\t")
    return [tabunescape(f) for f in body.split(b"\t")]
