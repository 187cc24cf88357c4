"""Run compressed models fast, straight from the compressed form.

``load_runtime(path, batch_size=1)`` builds the zoo model of a .dsq file with each compressed
layer replaced by an executor of its compact form (sparse layers as gap-coded rows, shared weights
as codebook + symbols), chosen per layer by measured speed at that batch size (see
``docs/runtime.md``). ``bench`` compares it with dense PyTorch and onnxruntime.
"""

from deepsqueeze.runtime.autotune import LayerChoice
from deepsqueeze.runtime.forms import CompressedMatrix, from_dense, register_form
from deepsqueeze.runtime.layers import IMPLS, Impl, RuntimeLayer, register_impl
from deepsqueeze.runtime.loader import RuntimeInfo, load_runtime, runtime_info
from deepsqueeze.runtime.memory import held_bytes

__all__ = [
    "IMPLS", "CompressedMatrix", "Impl", "LayerChoice", "RuntimeInfo", "RuntimeLayer",
    "from_dense", "held_bytes", "load_runtime", "register_form", "register_impl", "runtime_info",
]
