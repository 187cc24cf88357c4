"""Reading a .dsq manifest by hand, as the spec says (docs/format.md), for tests that forge
files without the container's reader or writer."""

from __future__ import annotations

import struct
import zlib

from deepsqueeze.codec.container import FLAG_DICTIONARY_1, MANIFEST_DICTIONARY_1


def manifest_text(data: bytes) -> bytes:
    """The manifest JSON text of file ``data``: the stored bytes as they are (flags 0), raw
    deflate (bit 0), or raw deflate with preset dictionary 1 (bits 0 and 2)."""
    flags, stored_len = struct.unpack_from("<II", data, 12)
    stored = data[28 : 28 + stored_len]
    if not flags & 1:
        return stored
    inflater = (zlib.decompressobj(-15, zdict=MANIFEST_DICTIONARY_1)
                if flags & FLAG_DICTIONARY_1 else zlib.decompressobj(-15))
    return inflater.decompress(stored) + inflater.flush()
