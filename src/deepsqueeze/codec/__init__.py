"""The .dsq codec: container, canonical Huffman coding, relative sparse index, bit packing.

Every byte of a compressed model goes through this package, and every size deepsqueeze reports
is the size of the file it writes. The codec is written by hand on purpose, with numpy and the
standard library only (no third-party compression or serialization library): knowing exactly
what each byte is, and paying for no byte we do not need, is the point of the project. The
byte-level format is specified in docs/format.md.
"""

from deepsqueeze.codec.bits import (
    decode_uvarint,
    decode_uvarints,
    encode_uvarint,
    encode_uvarints,
    pack_bits,
    packed_size,
    unpack_bits,
    zigzag_decode,
    zigzag_encode,
)
from deepsqueeze.codec.container import (
    DEFAULT_MAX_FILE_SIZE,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    DsqFile,
    dsq_bytes,
    parse_dsq,
    read_dsq,
    write_dsq,
)
from deepsqueeze.codec.huffman import (
    MAX_CODE_LENGTH,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
    huffman_size_bits,
)
from deepsqueeze.codec.sparse import (
    best_index_bits,
    filler_count,
    index_cost_bits,
    relative_index_decode,
    relative_index_encode,
)

__all__ = [
    "DEFAULT_MAX_FILE_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CODE_LENGTH",
    "VERSION",
    "DsqFile",
    "best_index_bits",
    "decode_uvarint",
    "decode_uvarints",
    "dsq_bytes",
    "encode_uvarint",
    "encode_uvarints",
    "filler_count",
    "huffman_code_lengths",
    "huffman_decode",
    "huffman_encode",
    "huffman_size_bits",
    "index_cost_bits",
    "pack_bits",
    "packed_size",
    "parse_dsq",
    "read_dsq",
    "relative_index_decode",
    "relative_index_encode",
    "unpack_bits",
    "write_dsq",
    "zigzag_decode",
    "zigzag_encode",
]
