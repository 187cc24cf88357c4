"""Energy per inference estimated from per-operation energy figures (45 nm, 0.9 V).

Figures: M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014
keynote, as tabulated by Han et al., "Deep Compression", ICLR 2016 (energy table of the
introduction) and used there to argue that weights fitting on-chip SRAM save energy:

=====================================  ========
operation (32 bit)                     energy
=====================================  ========
float add                              0.9 pJ
float multiply                         3.7 pJ
SRAM read (8 KB cache)                 5 pJ
DRAM read                              640 pJ
=====================================  ========

The estimate counts, for one sample: every multiply-accumulate with a nonzero weight of the
Linear/Conv layers and compressed layer kinds (the MAC convention of
:mod:`deepsqueeze.metrics.macs`, times each layer's density) as one float multiply plus one
float add, and reading the file's weight bytes once, in 32-bit words, from DRAM or from SRAM.
Activations, instruction fetch and decoding the compressed form are not counted; it is an
order-of-magnitude figure, as in the papers that use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

PJ_FLOAT_ADD = 0.9
PJ_FLOAT_MULT = 3.7
PJ_SRAM_32 = 5.0
PJ_DRAM_32 = 640.0
SOURCE = ("M. Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014 "
          "(45 nm, 0.9 V): 32-bit float add 0.9 pJ, float multiply 3.7 pJ, 32-bit SRAM read "
          "5 pJ, 32-bit DRAM read 640 pJ; table as used by Han et al., Deep Compression, "
          "ICLR 2016")


@dataclass
class EnergyEstimate:
    """Energy of one inference (picojoules) and what it counts."""

    macs: int
    effective_macs: int
    weight_bytes: int
    compute_pj: float
    weights_sram_pj: float
    weights_dram_pj: float

    @property
    def total_sram_pj(self) -> float:
        return self.compute_pj + self.weights_sram_pj

    @property
    def total_dram_pj(self) -> float:
        return self.compute_pj + self.weights_dram_pj

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_sram_pj": self.total_sram_pj,
                "total_dram_pj": self.total_dram_pj, "source": SOURCE}


def _kind(mod: nn.Module) -> str | None:
    """``conv`` / ``linear`` for a module computing one (``nn.Conv1d/2d``, ``nn.Linear`` and
    any compressed layer kind with their attributes: ``QuantConv2d``, ``HashedLinear``, ...);
    None for containers whose children compute (a low-rank layer's two factors)."""
    if any(_kind(c) is not None for c in mod.children()):
        return None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) or all(
            hasattr(mod, a) for a in ("in_channels", "out_channels", "kernel_size")):
        return "conv"
    if isinstance(mod, nn.Linear) or all(hasattr(mod, a) for a in ("in_features",
                                                                    "out_features")):
        return "linear"
    return None


def _density(mod: nn.Module) -> float:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.numel() == 0:
        return 1.0
    return float(torch.count_nonzero(w.detach())) / w.numel()


@torch.inference_mode()
def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, float]]:
    """``{layer: (MACs per sample, weight density)}`` of the layers ``example``'s first sample
    runs through: convolutions count ``out elements x in_channels/groups x kernel``, linear
    layers ``in x out`` per position (the convention of :mod:`deepsqueeze.metrics.macs`), for
    plain layers and compressed kinds alike (a circulant or hashed layer is counted as the
    dense product it stands for)."""
    out: dict[str, tuple[int, float]] = {}
    handles = []

    def hook_for(name: str, kind: str) -> Any:
        def hook(mod: Any, inp: tuple[torch.Tensor, ...], res: torch.Tensor) -> None:
            if kind == "conv":
                kernel = 1
                for k in (mod.kernel_size if isinstance(mod.kernel_size, tuple)
                          else (mod.kernel_size,)):
                    kernel *= int(k)
                groups = int(getattr(mod, "groups", 1))
                macs = res[0].numel() * (int(mod.in_channels) // groups) * kernel
            else:
                rows = inp[0][0].numel() // int(mod.in_features)
                macs = rows * int(mod.in_features) * int(mod.out_features)
            prev = out.get(name, (0, 1.0))
            out[name] = (prev[0] + macs, _density(mod))
        return hook

    for name, mod in model.named_modules():
        kind = _kind(mod)
        if kind is not None and name:
            handles.append(mod.register_forward_hook(hook_for(name, kind)))
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return out


def estimate(model: nn.Module, example: torch.Tensor, weight_bytes: int) -> EnergyEstimate:
    """Energy of one inference of ``model`` whose weights take ``weight_bytes`` (the file)."""
    per_layer = layer_macs(model, example)
    macs = sum(m for m, _ in per_layer.values())
    effective = round(sum(m * d for m, d in per_layer.values()))
    words = -(-weight_bytes // 4)
    return EnergyEstimate(
        macs=macs, effective_macs=effective, weight_bytes=weight_bytes,
        compute_pj=effective * (PJ_FLOAT_MULT + PJ_FLOAT_ADD),
        weights_sram_pj=words * PJ_SRAM_32, weights_dram_pj=words * PJ_DRAM_32,
    )
