"""An HPACK encoder that remembers header representations while its dynamic table is unchanged.

Every APNs request repeats the same eight or nine headers (method, scheme, authority,
topic, push type, priority, content type and length); after the first request each
is a one- or two-byte index into the dynamic table, yet ``hpack`` searched the
tables and re-encoded them per request, a third of the proxy's CPU per push.  A
header's representation depends only on the table's content, so it is looked up
here until the table changes (an insertion, an eviction or a resize), when
everything remembered is forgotten.

Never-indexed headers (the device's ``:path``, ``authorization``) are unique or
secret: only their name's index is remembered, never the value.  Their values are
Huffman-coded by :class:`BitStringHuffman`, which gives hpack's bytes without its
loop per byte in Python (that loop was a tenth of the proxy's CPU per push).  The
bytes are exactly hpack's.
"""

from __future__ import annotations

from collections.abc import Iterable

import hpack
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError
from hpack.hpack import INDEX_NEVER, _unicode_if_needed, encode_integer
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.struct import HeaderTuple
from hpack.table import table_entry_size

#: Bound on remembered representations (only indexable headers are remembered, and
#: the table changes whenever a new one is inserted: this is a guard, not a tuning).
MAX_REMEMBERED = 256

#: A never-indexed literal whose name is not in a table: the name follows as a literal.
_LITERAL_NAME = b""


class BitStringHuffman:
    """HPACK's Huffman code (RFC 7541 appendix B) done by C loops: every octet becomes its
    code as a string of ``0``/``1`` (``str.translate``), padded with ones (the EOS
    prefix) to whole octets, and ``int(bits, 2)`` makes the bytes.  Same output as
    ``hpack.huffman.HuffmanEncoder``, a few times faster on a 75-byte ``:path``."""

    #: octet -> its code as a bit string, indexed by the octet (``str.translate`` table)
    _BITS = [
        format(code, f"0{length}b")
        for code, length in zip(REQUEST_CODES[:256], REQUEST_CODES_LENGTH[:256], strict=True)
    ]

    def encode(self, data: bytes | None) -> bytes:
        if not data:
            return b""
        bits = data.decode("latin-1").translate(self._BITS)
        bits += "1" * (-len(bits) % 8)
        return int(bits, 2).to_bytes(len(bits) // 8, "big")


class MemoEncoder(hpack.Encoder):
    def __init__(self) -> None:
        super().__init__()
        self.huffman_coder = BitStringHuffman()  # type: ignore[assignment]
        self._memo: dict[tuple[bytes, bytes, bool], bytes] = {}
        # name -> the never-indexed representation's prefix (name index), while unchanged
        self._never_prefix: dict[bytes, bytes] = {}
        self._version = 0
        table_add = self.header_table.add

        def add_to_table(name: bytes, value: bytes) -> None:
            self._changed()
            table_add(name, value)

        self.header_table.add = add_to_table  # type: ignore[method-assign]

    def _changed(self) -> None:
        self._version += 1
        self._memo.clear()
        self._never_prefix.clear()

    @hpack.Encoder.header_table_size.setter  # type: ignore[attr-defined]
    def header_table_size(self, value: int) -> None:
        self._changed()
        hpack.Encoder.header_table_size.fset(self, value)  # type: ignore[attr-defined]

    def encode(self, headers: Iterable, huffman: bool = True) -> bytes:  # type: ignore[override]
        """hpack's ``encode`` without its per-header conversions when given (bytes, bytes)
        pairs (what h2 passes); anything else goes the general way."""
        if isinstance(headers, dict):
            return super().encode(headers, huffman)
        block = []
        if self.header_table.resized:
            block.append(self._encode_table_size_change())
            self.header_table.resized = False
        memo = self._memo
        for header in headers:
            name, value = header[0], header[1]
            if not (type(name) is bytes and type(value) is bytes):
                name, value = hpack.hpack._to_bytes(name), hpack.hpack._to_bytes(value)
            if isinstance(header, hpack.HeaderTuple):
                sensitive = not header.indexable
            else:
                sensitive = len(header) > 2 and bool(header[2])
            if not sensitive:  # the usual case, looked up here without a call to add()
                encoded = memo.get((name, value, huffman))
                if encoded is not None:
                    block.append(encoded)
                    continue
            block.append(self.add((name, value), sensitive, huffman))
        return b"".join(block)

    def add(self, to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
        if sensitive:
            return self._never_indexed(*to_add, huffman)
        key = (to_add[0], to_add[1], huffman)
        encoded = self._memo.get(key)
        if encoded is None:
            version = self._version
            encoded = super().add(to_add, sensitive, huffman)
            if version == self._version and len(self._memo) < MAX_REMEMBERED:
                self._memo[key] = encoded
        return encoded

    def _never_indexed(self, name: bytes, value: bytes, huffman: bool) -> bytes:
        """A literal never indexed (RFC 7541 section 6.2.3), as hpack encodes it."""
        prefix = self._never_prefix.get(name)
        if prefix is None:
            match = self.header_table.search(name, b"")
            if match is None:
                prefix = _LITERAL_NAME
            else:
                field = encode_integer(match[0], 4)
                field[0] |= INDEX_NEVER[0]
                prefix = bytes(field)
            if len(self._never_prefix) < MAX_REMEMBERED:
                self._never_prefix[name] = prefix
        if prefix is _LITERAL_NAME:
            return self._encode_literal(name, value, INDEX_NEVER, huffman)
        if huffman:
            value = self.huffman_coder.encode(value)
        value_length = encode_integer(len(value), 7)
        if huffman:
            value_length[0] |= 0x80
        return b"".join((prefix, bytes(value_length), value))


class MemoDecoder(hpack.Decoder):
    """hpack's ``Decoder`` that remembers one-byte indexed fields while its table is unchanged.

    Only ``decode(..., raw=True)`` (what h2 calls) takes the remembered way; the headers
    it returns are hpack's (bytes ``HeaderTuple`` pairs), the same objects for the same
    field until the table changes (an insertion or a resize).
    """

    def __init__(
        self, max_header_list_size: int = hpack.hpack.DEFAULT_MAX_HEADER_LIST_SIZE
    ) -> None:
        super().__init__(max_header_list_size)
        # first octet of a one-byte indexed field -> (its header as bytes, its list size)
        self._indexed: dict[int, tuple[HeaderTuple, int]] = {}
        table_add = self.header_table.add

        def add_to_table(name: bytes, value: bytes) -> None:
            self._indexed.clear()
            table_add(name, value)

        self.header_table.add = add_to_table  # type: ignore[method-assign]

    @classmethod
    def replacing(cls, decoder: hpack.Decoder) -> MemoDecoder:
        """A fresh decoder with ``decoder``'s limits (before any header block was decoded)."""
        memo = cls(decoder.max_header_list_size)
        memo.max_allowed_table_size = decoder.max_allowed_table_size
        memo.header_table_size = decoder.header_table_size
        return memo

    @hpack.Decoder.header_table_size.setter  # type: ignore[attr-defined]
    def header_table_size(self, value: int) -> None:
        self._indexed.clear()
        hpack.Decoder.header_table_size.fset(self, value)  # type: ignore[attr-defined]

    def decode(self, data: bytes, raw: bool = False) -> list[HeaderTuple]:  # type: ignore[override]
        if not raw:
            return list(super().decode(data, raw))
        indexed = self._indexed
        view = memoryview(data)
        headers: list[HeaderTuple] = []
        limit = self.max_header_list_size
        inflated = 0
        index = 0
        end = len(data)
        while index < end:
            current = data[index]
            known = indexed.get(current)
            if known is not None:
                header, size = known
                index += 1
            else:
                field, consumed = self._decode_field(view[index:], current, bool(headers))
                index += consumed
                if field is None:
                    continue
                header = _unicode_if_needed(field, True)
                size = table_entry_size(header[0], header[1])
                if consumed == 1 and current & 0x80:  # a one-byte indexed field
                    indexed[current] = (header, size)
            headers.append(header)
            inflated += size
            if inflated > limit:
                msg = f"A header list larger than {limit} has been received"
                raise OversizedHeaderListError(msg)
        self._assert_valid_table_size()
        return headers

    def _decode_field(
        self, data: memoryview, first: int, after_headers: bool
    ) -> tuple[HeaderTuple | None, int]:
        """One field as hpack's ``decode`` takes it (None for a table-size update)."""
        if first & 0x80:
            return self._decode_indexed(data)
        if first & 0x40:
            return self._decode_literal_index(data)
        if first & 0x20:
            if after_headers:
                raise HPACKDecodingError("Table size update not at the start of the block")
            return None, self._update_encoding_context(data)
        return self._decode_literal_no_index(data)
