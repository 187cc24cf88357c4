"""How tensors are written into a .dsq file: the options of the codec, checked by pydantic.

They live in the codec layer (the recipe schema re-exports them) so that the file writer
(:mod:`deepsqueeze.dsq`) does not import the pipeline above it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from deepsqueeze.codec.tensor import MAX_INDEX_BITS

__all__ = ["EncodeOptions"]


class EncodeOptions(BaseModel):
    """How tensors are written into the .dsq file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    huffman: bool = Field(True, description="Huffman-code indices and gaps when that is smaller")
    ans: bool = Field(True, description="rANS-code indices and gaps (static model, "
                      "docs/format.md) when that is smaller still; false writes files that "
                      "deepsqueeze versions before it read")
    index_bits: Annotated[int, Field(ge=1, le=MAX_INDEX_BITS)] | Literal["auto"] = Field(
        "auto", description="bits per relative index of sparse positions (1..16; the reader "
        "refuses wider); auto picks the smallest"
    )
    codebook_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    dense_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of tensors stored densely (biases, BatchNorm); float16 "
        "or bfloat16 halve their bytes (lossy: TFLite's float16 quantization analog)"
    )
    manifest: Literal["dictionary", "deflate"] = Field(
        "dictionary", description="how the manifest is stored: dictionary (raw deflate with "
        "preset dictionary 1 where smaller, docs/format.md) or deflate (what deepsqueeze "
        "versions before the dictionary also read)"
    )
