"""int8 / int4 quantization: PTQ, QAT, the file, the runtime executors, int8 ONNX, hostile files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deepsqueeze
from deepsqueeze import models
from deepsqueeze.codec.container import read_dsq
from deepsqueeze.codec.options import EncodeOptions
from deepsqueeze.codec.tensor import decode_tensor, encode_tensor
from deepsqueeze.errors import DsqFormatError, ModelError, RecipeError
from deepsqueeze.methods import create_method, select_layers
from deepsqueeze.methods.quantize import (
    calibrate,
    fold_batchnorm,
    quantize_weight,
    quantized_layers,
    weight_scales,
)
from deepsqueeze.models.quantized import (
    QuantConv2d,
    QuantLinear,
    affine_qparams,
    fake_quantize_input,
)
from deepsqueeze.runtime import load_runtime
from deepsqueeze.runtime.forms import FORM_DECODERS
from tests.conftest import run_cli

torch.manual_seed(0)


def _data(n: int = 128, shape: tuple[int, ...] = (1, 28, 28), seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.zeros(n, dtype=torch.long)


def _ptq(model: nn.Module, bits: int = 8, shape: tuple[int, ...] = (1, 28, 28),
         **params: object) -> nn.Module:
    method = create_method("quantize", bits=bits, **params)
    method.apply(model, select_layers(model, None))
    method.calibrate(model, _data(shape=shape))  # type: ignore[attr-defined]
    method.finalize(model)
    return model


# ---------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_quantization_error_is_at_most_half_a_step(bits: int) -> None:
    w = torch.randn(16, 40)
    w[3, :10] = 0.0  # pruned weights
    s = weight_scales(w, bits)
    q = quantize_weight(w, s, bits)
    qmax = 2 ** (bits - 1) - 1
    assert torch.equal(q, torch.round(q)) and float(q.abs().max()) == qmax
    assert bool((q[3, :10] == 0).all())
    err = (w - q * s.view(-1, 1)).abs()
    assert bool((err <= s.view(-1, 1) / 2 + 1e-7).all())


def test_input_quantization_error_is_at_most_half_a_step_inside_the_range() -> None:
    scale, zp = affine_qparams(-1.5, 3.0)
    assert 0 <= zp <= 255 and abs(scale - 4.5 / 255) < 1e-9
    x = torch.linspace(-1.5, 3.0, 1001)
    y = fake_quantize_input(x, torch.tensor([scale]), torch.tensor([float(zp)]))
    assert float((x - y).abs().max()) <= scale / 2 + 1e-6
    assert float(fake_quantize_input(torch.tensor([0.0]), torch.tensor([scale]),
                                     torch.tensor([float(zp)]))) == 0.0  # 0 is exact
    out = fake_quantize_input(torch.tensor([-10.0, 10.0]), torch.tensor([scale]),
                              torch.tensor([float(zp)]))
    assert float(out[0]) >= -1.5 - scale and float(out[1]) <= 3.0 + scale  # clamped


# ------------------------------------------------------------------------------ calibration


@pytest.mark.parametrize("how", ["minmax", "percentile", "mse"])
def test_calibration_is_deterministic_and_within_minmax(how: str) -> None:
    ranges = []
    for _ in range(2):
        torch.manual_seed(1)
        model = models.create("lenet300")
        method = create_method("quantize", calibration={"method": how, "batches": 2})
        method.apply(model, select_layers(model, None))
        ranges.append(method.calibrate(model, _data()))  # type: ignore[attr-defined]
    assert ranges[0] == ranges[1]
    torch.manual_seed(1)
    ref = models.create("lenet300")
    m = create_method("quantize", calibration={"method": "minmax", "batches": 2})
    m.apply(ref, select_layers(ref, None))
    full = m.calibrate(ref, _data())  # type: ignore[attr-defined]
    for name, (lo, hi) in ranges[0].items():
        assert full[name][0] - 1e-6 <= lo <= hi <= full[name][1] + 1e-6


def test_uncalibrated_inputs_are_refused_at_finalize() -> None:
    model = models.create("lenet300")
    method = create_method("quantize")
    method.apply(model, select_layers(model, None))
    with pytest.raises(ModelError, match="never calibrated"):
        method.finalize(model)


def test_parameters_are_validated() -> None:
    with pytest.raises(RecipeError, match="bits"):
        create_method("quantize", bits=9)
    with pytest.raises(RecipeError, match="method"):
        create_method("quantize", calibration={"method": "kl"})
    with pytest.raises(RecipeError, match="ema"):
        create_method("qat", ema=0)


def test_calibrate_needs_quantized_layers() -> None:
    with pytest.raises(ModelError, match="no quantized layer"):
        calibrate(models.create("lenet300"), _data())


# ------------------------------------------------------------------------- BN folding, QAT


def test_folded_batchnorm_equals_unfolded() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(4))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(5, 3, 9, 9)
    ref = model(x)
    assert fold_batchnorm(model) == ["0", "3"]
    assert model[3].bias is not None
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_qat_gradients_flow_and_finalize_bakes_integers(bits: int) -> None:
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[0, :5] = 0.0  # pruned: stays zero
    method = create_method("qat", bits=bits)
    method.apply(model, select_layers(model, None))
    layer = model[0]
    assert isinstance(layer, QuantLinear)
    latent = layer.parametrizations["weight"].original
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 20)
    loss = model(x).pow(2).mean()
    loss.backward()
    assert latent.grad is not None and float(latent.grad.abs().sum()) > 0
    assert bool(torch.isfinite(latent.grad).all())
    before = latent.detach().clone()
    opt.step()
    assert not torch.equal(before, latent.detach())
    model(x)
    method.finalize(model)
    qmax = 2 ** (bits - 1) - 1
    for mod in quantized_layers(model).values():
        w = mod.weight.detach()
        assert torch.equal(w, torch.round(w)) and float(w.abs().max()) <= qmax
    assert bool((model[0].weight[0, :5] == 0).all())
    assert model[0].observing is False and model[0].input_scale.item() != 1.0


# --------------------------------------------------------------------- file and runtime


@pytest.fixture(scope="module")
def lenet5_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = _ptq(models.create("lenet5")).eval()
    path = tmp_path_factory.mktemp("q") / "lenet5-int8.dsq"
    deepsqueeze.save(model, path)
    return path, model


def test_dsq_round_trip_is_exact_and_about_one_byte_per_weight(
        lenet5_file: tuple[Path, nn.Module]) -> None:
    path, model = lenet5_file
    loaded = deepsqueeze.load(path)
    assert isinstance(loaded.conv1, QuantConv2d) and isinstance(loaded.fc1, QuantLinear)
    x, _ = _data(8, seed=3)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    weights = sum(m.weight.numel() for m in quantized_layers(model).values())
    size = path.stat().st_size
    assert weights <= size <= 1.15 * weights + 4096, (size, weights)


@pytest.mark.parametrize("bits,limit", [(4, 0.62)])
def test_int4_files_take_about_half_a_byte_per_weight(tmp_path: Path, bits: int,
                                                       limit: float) -> None:
    model = _ptq(models.create("lenet300"), bits=bits)
    path = tmp_path / "int4.dsq"
    deepsqueeze.save(model, path)
    weights = sum(m.weight.numel() for m in quantized_layers(model).values())
    assert path.stat().st_size <= limit * weights


def test_pruned_int8_is_stored_sparse(tmp_path: Path) -> None:
    model = models.create("lenet300")
    prune = create_method("prune", sparsity=0.9)
    prune.apply(model, select_layers(model, None))
    prune.finalize(model)
    from deepsqueeze.pipeline.session import bake

    bake(model)
    _ptq(model)
    assert float((model.fc1.weight == 0).float().mean()) >= 0.89
    path, plain = tmp_path / "pruned-int8.dsq", tmp_path / "pruned-int8-huffman.dsq"
    deepsqueeze.save(model, path)
    deepsqueeze.save(model, plain, encode=EncodeOptions(ans=False))
    from deepsqueeze.dsq import read_model_file

    entry = read_model_file(plain).entries["fc1.weight"]
    assert entry["encoding"] == "sparse-codebook" and entry["dtype"] == "int8", entry
    # with rANS the zeros may be cheapest as a codebook symbol (~0.15 bit each); the file is
    # smaller, and the runtime still runs only the kept weights
    entry = read_model_file(path).entries["fc1.weight"]
    assert entry["encoding"] in ("sparse-codebook", "codebook") and entry["dtype"] == "int8"
    assert path.stat().st_size < plain.stat().st_size
    form = FORM_DECODERS[entry["encoding"]](entry, read_dsq(path).sections)
    assert form.nnz == int((model.fc1.weight != 0).sum())
    for stored in (path, plain):
        loaded = deepsqueeze.load(stored)
        torch.testing.assert_close(loaded.fc1.weight, model.fc1.weight, atol=0, rtol=0)


@pytest.mark.parametrize("impl,reduced", [("int8-ort", False), ("dequant", False),
                                          ("int8-ort", True), ("int8-onednn", True),
                                          ("dequant", True)])
def test_runtime_executors_equal_the_dense_decoding(
        lenet5_file: tuple[Path, nn.Module], reduced_file: tuple[Path, nn.Module], impl: str,
        reduced: bool) -> None:
    path, model = reduced_file if reduced else lenet5_file
    names = list(quantized_layers(model))
    fast = load_runtime(path, impls=dict.fromkeys(names, impl), autotune=False)
    for name in names:
        assert getattr(fast.get_submodule(name), "impl", None) == impl
    dense = deepsqueeze.load(path)
    x, _ = _data(16, seed=4)
    with torch.no_grad():
        ref, out = dense(x), fast(x)
    # one input rounded to the neighbouring uint8 level moves an output by a step: compare
    # within a few steps of the last layer and the same decisions
    assert float((out - ref).abs().max()) <= 0.02 * float(ref.abs().max()) + 1e-4
    assert torch.equal(out.argmax(1), ref.argmax(1))
    assert fast(torch.empty(0, 1, 28, 28)).shape == (0, 10)
    with pytest.raises(deepsqueeze.errors.RuntimeInputError):
        fast(torch.randn(2, 3, 28, 28))


@pytest.fixture(scope="module")
def reduced_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """lenet5 quantized with 7-bit inputs (``reduce_range``): the int8-onednn executor runs it."""
    torch.manual_seed(0)
    model = _ptq(models.create("lenet5"), reduce_range=True).eval()
    path = tmp_path_factory.mktemp("q7") / "lenet5-int8-7bit.dsq"
    deepsqueeze.save(model, path)
    return path, model


def test_reduce_range_inputs_take_0_to_127_and_survive_the_file(
        reduced_file: tuple[Path, nn.Module]) -> None:
    path, model = reduced_file
    layer = model.fc1
    assert layer.reduce_range and layer.input_qmax == 127
    s, zp = layer.input_qparams()
    x = torch.linspace(-50, 50, 1001)
    q = torch.round(fake_quantize_input(x, layer.input_scale, layer.input_zero_point, 127) / s)
    assert float(q.max()) + zp <= 127 and float(q.min()) + zp >= 0
    loaded = deepsqueeze.load(path)
    assert loaded.fc1.reduce_range and loaded.conv1.reduce_range
    x, _ = _data(8, seed=3)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_files_written_before_reduce_range_still_load() -> None:
    from deepsqueeze.models.graph import build_module

    old = {"type": "QuantLinear", "config": {"in_features": 4, "out_features": 3, "bias": True,
                                             "bits": 8, "activations": True}}
    assert build_module("fc", old).reduce_range is False
    with pytest.raises(DsqFormatError, match="options must be exactly"):
        build_module("fc", {"type": "QuantLinear", "config": {"in_features": 4}})


def _onednn(layer: nn.Module):  # the executor of one quantized layer, built from its form
    from deepsqueeze.runtime.executors.quantized import (
        OnednnQuantConv2d,
        OnednnQuantLinear,
        QuantForm,
        _geometry,
        _onednn_ok,
    )

    form = QuantForm(layer.weight.detach().numpy().astype(np.int8), layer.weight_scale.numpy(),
                     *layer.input_qparams(), True, layer.bits, layer.input_qmax)
    if not _onednn_ok(form, layer):
        return None
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, QuantLinear):
        return OnednnQuantLinear(form, bias)
    return OnednnQuantConv2d(form, bias, _geometry(layer))


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, padding=1), dict(kernel_size=5, stride=2, padding=2),
    dict(kernel_size=3, dilation=2, padding=2), dict(kernel_size=3, groups=2, padding=1),
    dict(kernel_size=1)])
def test_onednn_int8_conv_equals_the_model_layer(geometry: dict[str, int]) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(6, 8, bias=True, **geometry))
    _ptq(model, shape=(6, 13, 11), reduce_range=True)
    layer = model[0]
    exe = _onednn(layer)
    assert exe is not None
    x = torch.randn(5, 6, 13, 11)
    ref = layer(x).detach()
    torch.testing.assert_close(exe(x), ref, atol=1e-4, rtol=1e-4)
    # a channels-last input (what the previous int8 conv returns) is read as it is
    torch.testing.assert_close(exe(x.contiguous(memory_format=torch.channels_last)), ref,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exe(x[0]), ref[0], atol=1e-4, rtol=1e-4)  # unbatched
    assert exe(torch.empty(0, 6, 13, 11)).shape[0] == 0


def test_onednn_int8_linear_equals_the_model_layer() -> None:
    model = nn.Sequential(nn.Linear(30, 12))
    _ptq(model, shape=(30,), reduce_range=True)
    layer = model[0]
    exe = _onednn(layer)
    x = torch.randn(7, 30) * 3
    torch.testing.assert_close(exe(x), layer(x).detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exe(x.reshape(7, 1, 30)), layer(x).detach().reshape(7, 1, 12),
                               atol=1e-4, rtol=1e-4)


def test_onednn_is_not_offered_where_8_bit_inputs_could_saturate() -> None:
    model = nn.Sequential(nn.Linear(30, 12))
    _ptq(model, shape=(30,))  # 8-bit inputs, weights up to 127: u8 x s8 pair sums could saturate
    assert int(model[0].weight.abs().max()) == 127 and _onednn(model[0]) is None
    with torch.no_grad():  # weights within +-64 cannot saturate: offered again, and exact
        model[0].weight.clamp_(-64, 64)
    exe = _onednn(model[0])
    x = torch.randn(9, 30) * 4
    torch.testing.assert_close(exe(x), model[0](x).detach(), atol=1e-4, rtol=1e-4)


def test_quantize_kernel_refuses_bad_arguments() -> None:
    import ctypes

    from deepsqueeze.runtime.executors.quantized import _QUANT_ARGS
    from deepsqueeze.runtime.kernel import DSQ_EINVAL, DSQ_ESIZE, get_kernel

    kernel = get_kernel()
    if kernel is None:
        pytest.skip("no C compiler")
    fn = kernel.function("dsq_quant_u8_nhwc", _QUANT_ARGS)
    x = torch.tensor([[-1.0, 0.26, 1e9, float("nan")]]).reshape(1, 4)
    out = torch.empty(4, dtype=torch.uint8)
    assert fn(x.data_ptr(), 4, 1, 4, 1, 0, 0.5, 3, 127, out.data_ptr(), 4) == 0
    assert out.tolist() == [1, 4, 127, 0]  # -2 + 3, round(0.52) + 3, clamped, NaN -> 0
    assert fn(x.data_ptr(), 4, 1, 4, 1, 0, 0.5, 3, 127, out.data_ptr(), 3) == DSQ_ESIZE
    assert fn(x.data_ptr(), 4, 1, 4, 1, 2, 0.5, 3, 127, out.data_ptr(), 4) == DSQ_EINVAL
    assert fn(x.data_ptr(), 4, 1, 4, 1, 0, 0.0, 3, 127, out.data_ptr(), 4) == DSQ_EINVAL
    assert fn(x.data_ptr(), 4, 1, 4, 1, 0, 0.5, 200, 127, out.data_ptr(), 4) == DSQ_EINVAL
    assert fn(None, 4, 1, 4, 1, 0, 0.5, 3, 127, out.data_ptr(), 4) == DSQ_EINVAL
    assert fn(x.data_ptr(), 4, 1 << 62, 4, 1 << 10, 0, 0.5, 3, 127, out.data_ptr(),
              4) == DSQ_ESIZE
    assert ctypes.sizeof(ctypes.c_float) == 4


def test_autotuner_times_the_channels_last_int8_chain_as_a_whole(
        reduced_file: tuple[Path, nn.Module]) -> None:
    from deepsqueeze.runtime.loader import runtime_info

    path, model = reduced_file
    fast = load_runtime(path, batch_size=8, autotune=True, cache=False)
    info = runtime_info(fast)
    chain = [f for f in info.fused if f["name"] == "channels-last chain"]
    impls = {c.layer: c.impl for c in info.layers}
    if not chain:  # every layer chose it alone: nothing to decide
        assert all(i == "int8-onednn" for i in impls.values())
    else:
        assert len(chain) == 1 and set(chain[0]["time_us"]) == {"chain", "layers"}
        kept = chain[0]["time_us"]["chain"] < chain[0]["time_us"]["layers"]
        assert chain[0]["kept"] == kept and set(chain[0]["layers"]) == set(impls)
        switched = {c.layer for c in info.layers if c.source == "chain"}
        if kept:
            assert all(i == "int8-onednn" for i in impls.values())
        else:
            assert not switched and any(i != "int8-onednn" for i in impls.values())
        assert "whole model timed" in info.table().caption
    x, _ = _data(8, seed=9)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert float((out - ref).abs().max()) <= 0.02 * float(ref.abs().max()) + 1e-4


def test_one_integer_layer_matches_fake_quantization_closely() -> None:
    from deepsqueeze.runtime.executors.quantized import OrtQuantLinear, QuantForm

    model = nn.Sequential(nn.Linear(30, 12))
    method = create_method("quantize")
    method.apply(model, select_layers(model, None))
    method.calibrate(model, (torch.randn(64, 30), torch.zeros(64)))  # type: ignore[attr-defined]
    layer = model[0]
    form = QuantForm(layer.weight.detach().numpy().astype(np.int8),
                     layer.weight_scale.numpy(), *layer.input_qparams(), True, 8)
    exe = OrtQuantLinear(form, layer.bias.detach())
    x = torch.randn(64, 30)
    torch.testing.assert_close(exe(x), layer(x).detach(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------- ONNX


def test_int8_onnx_export_runs_in_onnxruntime_and_matches(
        lenet5_file: tuple[Path, nn.Module], tmp_path: Path) -> None:
    import onnx

    from deepsqueeze.runtime.onnx_export import export_onnx, onnx_session

    path, model = lenet5_file
    data = export_onnx(path, tmp_path / "m.onnx", int8=True)
    graph = onnx.load_from_string(data).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.UINT8
            and len(i.dims) >= 2]
    weights = sum(m.weight.numel() for m in quantized_layers(model).values())
    assert sum(int(np.prod(i.dims)) for i in int8) == weights
    assert len(data) < 1.3 * weights + 8192  # int8, not fp32
    x, _ = _data(16, seed=5)
    out = onnx_session(data, 1).run(None, {"input": x.numpy()})[0]
    ref = model(x).detach().numpy()
    assert float(np.abs(out - ref).max()) <= 0.02 * float(np.abs(ref).max()) + 1e-4
    assert (out.argmax(1) == ref.argmax(1)).all()


def test_int8_onnx_export_clips_7_bit_inputs(reduced_file: tuple[Path, nn.Module],
                                            tmp_path: Path) -> None:
    import onnx

    from deepsqueeze.runtime.onnx_export import export_onnx, onnx_session

    path, model = reduced_file
    data = export_onnx(path, tmp_path / "m7.onnx", int8=True)
    assert "Clip" in {n.op_type for n in onnx.load_from_string(data).graph.node}
    x = _data(16, seed=6)[0] * 4  # wide inputs: the clip at 127 matters
    out = onnx_session(data, 1).run(None, {"input": x.numpy()})[0]
    ref = model(x).detach().numpy()
    assert float(np.abs(out - ref).max()) <= 0.02 * float(np.abs(ref).max()) + 1e-4


def test_cli_export_int8(lenet5_file: tuple[Path, nn.Module], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = lenet5_file
    out = tmp_path / "cli.onnx"
    code, stdout, _ = run_cli(["export", path, "--format", "onnx", "--int8", "--out", out],
                              capsys)
    assert code == 0 and out.is_file() and "int8 QDQ" in stdout
    code, _, err = run_cli(["export", path, "--format", "tflite", "--out", out], capsys)
    assert code != 0 and "onnx" in err
    plain = tmp_path / "plain.dsq"
    deepsqueeze.save(models.create("lenet300"), plain)
    code, _, err = run_cli(["export", plain, "--int8", "--out", tmp_path / "p.onnx"], capsys)
    assert code != 0 and "no quantized layer" in err


# ------------------------------------------------------------------------- hostile files


def _forged(tmp_path: Path, change: str) -> Path:
    torch.manual_seed(0)
    model = _ptq(models.create("lenet300"))
    with torch.no_grad():
        if change == "fraction":
            model.fc2.weight[0, 0] = 0.5
        elif change == "range":
            model.fc2.weight[0, 0] = 200.0
        elif change == "scale":
            model.fc2.weight_scale[1] = -1.0
        elif change == "zero_point":
            model.fc2.input_zero_point.fill_(300.0)
        elif change == "input_scale":
            model.fc2.input_scale.fill_(0.0)
    path = tmp_path / f"{change}.dsq"
    deepsqueeze.save(model, path)
    return path


@pytest.mark.parametrize("change", ["fraction", "range", "scale", "zero_point", "input_scale"])
def test_forged_int8_sections_are_refused(tmp_path: Path, change: str) -> None:
    path = _forged(tmp_path, change)
    with pytest.raises(DsqFormatError, match="fc2"):
        load_runtime(path, autotune=False)


def test_int8_codec_entries_are_checked() -> None:
    enc = encode_tensor("w", torch.tensor([[1.0, -3.0, 127.0, 0.0]]))
    assert enc.entry["dtype"] == "int8"
    torch.testing.assert_close(decode_tensor(enc.entry, enc.sections),
                               torch.tensor([[1.0, -3.0, 127.0, 0.0]]))
    short = {k: v[:-1] for k, v in enc.sections.items()}
    with pytest.raises(DsqFormatError):
        decode_tensor(enc.entry, short)
    assert encode_tensor("w", torch.tensor([0.5, 1.0, 2.0, 3.0])).entry["dtype"] != "int8"
    assert encode_tensor("w", torch.tensor([128.0, 1.0, 2.0, 3.0])).entry["dtype"] != "int8"


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16),
                                               ("bfloat16", torch.bfloat16)])
def test_half_precision_storage(tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    x = torch.randn(257)
    enc = encode_tensor("w", x, dense_dtype=dtype, codebook_dtype=dtype)
    assert enc.entry["dtype"] == dtype and enc.nbytes == 2 * 257
    torch.testing.assert_close(decode_tensor(enc.entry, enc.sections),
                               x.to(torch_dtype).float(), atol=0, rtol=0)
    with pytest.raises(DsqFormatError):
        decode_tensor(enc.entry, {k: v + b"\0" for k, v in enc.sections.items()})
    model = models.create("lenet300")
    full, half = tmp_path / "full.dsq", tmp_path / "half.dsq"
    deepsqueeze.save(model, full)
    deepsqueeze.save(model, half, encode={"dense_dtype": dtype, "codebook_dtype": dtype})
    assert half.stat().st_size < 0.51 * full.stat().st_size
    loaded = deepsqueeze.load(half)
    torch.testing.assert_close(loaded.fc1.weight, model.fc1.weight.to(torch_dtype).float(),
                               atol=0, rtol=0)


@pytest.mark.parametrize("method,params", [
    ("qat", {"bits": 4}),
    ("quantize", {"bits": 8}),  # no calibration dataset: the fine-tuning batches calibrate
])
def test_through_compress_with_user_data(tmp_path: Path, method: str,
                                         params: dict[str, object]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    recipe = {"name": method, "stages": [{
        "method": method, "params": params,
        "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 64}}]}
    out = tmp_path / "m.dsq"
    result = deepsqueeze.compress(models.create("lenet300"), recipe, train_data=(x, y),
                                  eval_data=(x, y), out=out, progress=False)
    assert result.file_accuracy is not None
    loaded = deepsqueeze.load(out)
    assert isinstance(loaded.fc1, QuantLinear) and loaded.fc1.bits == params["bits"]
    w = loaded.fc1.weight.detach()
    assert torch.equal(w, torch.round(w)) and float(w.abs().max()) <= 2 ** (params["bits"] - 1)
    assert float(loaded.fc1.input_scale) != 1.0  # calibrated
