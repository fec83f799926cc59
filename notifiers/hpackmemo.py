"""An HPACK encoder that remembers header representations while its dynamic table is unchanged.

Every APNs request repeats the same eight or nine headers (method, scheme, authority,
topic, push type, priority, content type and length); after the first request each
is a one- or two-byte index into the dynamic table, yet ``hpack`` searched the
tables and re-encoded them per request, a third of the proxy's CPU per push.  A
header's representation depends only on the table's content, so it is looked up
here until the table changes (an insertion, an eviction or a resize), when
everything remembered is forgotten.  Never-indexed headers (the device's ``:path``,
``authorization``) are unique or secret and never remembered.
"""

from __future__ import annotations

import hpack

#: Bound on remembered representations (only indexable headers are remembered, and
#: the table changes whenever a new one is inserted: this is a guard, not a tuning).
MAX_REMEMBERED = 256


class MemoEncoder(hpack.Encoder):
    def __init__(self) -> None:
        super().__init__()
        self._memo: dict[tuple[bytes, bytes, bool], bytes] = {}
        self._version = 0
        table_add = self.header_table.add

        def add_to_table(name: bytes, value: bytes) -> None:
            self._changed()
            table_add(name, value)

        self.header_table.add = add_to_table  # type: ignore[method-assign]

    def _changed(self) -> None:
        self._version += 1
        self._memo.clear()

    @hpack.Encoder.header_table_size.setter  # type: ignore[attr-defined]
    def header_table_size(self, value: int) -> None:
        self._changed()
        hpack.Encoder.header_table_size.fset(self, value)  # type: ignore[attr-defined]

    def add(self, to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
        if sensitive:
            return super().add(to_add, sensitive, huffman)
        key = (to_add[0], to_add[1], huffman)
        encoded = self._memo.get(key)
        if encoded is None:
            version = self._version
            encoded = super().add(to_add, sensitive, huffman)
            if version == self._version and len(self._memo) < MAX_REMEMBERED:
                self._memo[key] = encoded
        return encoded
