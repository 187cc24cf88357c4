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
Linear/Conv layers (the MAC convention of :mod:`deepsqueeze.metrics.macs`, times each layer's
density) as one float multiply plus one float add, and reading the file's weight bytes once, in
32-bit words, from DRAM or from SRAM. Activations, instruction fetch and decoding the compressed
form are not counted; it is an order-of-magnitude figure, as in the papers that use it.
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


@torch.inference_mode()
def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, float]]:
    """``{layer: (MACs per sample, weight density)}`` of the Linear/Conv layers ``example``'s
    first sample runs through."""
    out: dict[str, tuple[int, float]] = {}
    handles = []

    def hook_for(name: str) -> Any:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], res: torch.Tensor) -> None:
            w = mod.weight.detach()
            density = float(torch.count_nonzero(w)) / max(w.numel(), 1)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                kernel = 1
                for k in mod.kernel_size:
                    kernel *= k
                macs = res[0].numel() * (mod.in_channels // mod.groups) * kernel
            else:
                assert isinstance(mod, nn.Linear)
                macs = inp[0][0].numel() // mod.in_features * mod.in_features * mod.out_features
            prev = out.get(name, (0, density))
            out[name] = (prev[0] + macs, density)
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            handles.append(mod.register_forward_hook(hook_for(name)))
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
