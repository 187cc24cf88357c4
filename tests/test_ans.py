"""rANS index coding: round trips, sizes against the entropy, hostile streams, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from deepsqueeze import dsq
from deepsqueeze.codec.ans import ans_decode, ans_encode, quantize_frequencies
from deepsqueeze.codec.bits import decode_uvarint, encode_uvarint, encode_uvarints
from deepsqueeze.codec.container import dsq_bytes, read_dsq
from deepsqueeze.codec.huffman import huffman_encode
from deepsqueeze.codec.options import EncodeOptions
from deepsqueeze.codec.tensor import decode_tensor, encode_tensor
from deepsqueeze.errors import DsqFormatError
from deepsqueeze.runtime import load_runtime

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _entropy_bytes(symbols: np.ndarray) -> float:
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


def test_round_trip_and_size_close_to_entropy_where_huffman_is_not() -> None:
    rng = np.random.default_rng(0)
    for probs, scale in (([0.6, 0.25, 0.1, 0.05], 1), ([0.97, 0.03], 7), ([0.5, 0.5], 1)):
        s = rng.choice(len(probs), size=20_000, p=probs) * scale + 3
        coded = ans_encode(s)
        assert np.array_equal(ans_decode(coded, s.size), s)
        assert len(coded) <= _entropy_bytes(s) * 1.01 + 16
    skewed = rng.choice(2, size=20_000, p=[0.97, 0.03])
    assert len(ans_encode(skewed)) * 4 < len(huffman_encode(skewed))  # Huffman: >= 1 bit each


@given(st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=300).filter(
    lambda v: len(set(v)) > 1))
@FAST
def test_round_trip_property(values: list[int]) -> None:
    s = np.array(values, dtype=np.int64)
    assert np.array_equal(ans_decode(ans_encode(s), s.size), s)


@pytest.mark.parametrize("precision", [1, 4, 12, 16])
def test_quantized_frequencies_sum_to_a_power_of_two_and_stay_positive(precision: int) -> None:
    rng = np.random.default_rng(precision)
    for k in (2, 3, min(50, 1 << precision)):
        if k > 1 << precision:
            continue
        counts = rng.integers(1, 10_000, size=k)
        counts[0] = 10**7  # one dominant symbol: the others still get >= 1
        f = quantize_frequencies(counts, precision)
        assert f.sum() == 1 << precision and f.min() >= 1
    with pytest.raises(ValueError, match="precision"):
        quantize_frequencies(np.ones(5, dtype=np.int64), 2)


def test_encode_rejects_what_it_cannot_code() -> None:
    with pytest.raises(ValueError, match="2\\.\\."):
        ans_encode(np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match="0\\.\\."):
        ans_encode(np.array([-1, 2]))
    with pytest.raises(TypeError):
        ans_encode(np.array([0.5, 1.0]))
    assert ans_decode(ans_encode(np.zeros(0, dtype=np.int64)), 0).size == 0


def _stream(count: int, k: int, desc: int, first: int, freqs: list[int], words: bytes) -> bytes:
    return (encode_uvarint(count) + encode_uvarint(k) + bytes([desc]) + encode_uvarint(first)
            + encode_uvarints(np.array(freqs) - 1) + words)


def test_layout_is_as_documented_and_hostile_streams_are_refused() -> None:
    s = np.array([5, 5, 5, 6, 5, 6, 5, 5])
    good = ans_encode(s)
    count, k, desc = good[0], good[1], good[2]
    precision = (desc & 15) + 1
    assert (count, k, desc >> 4, good[3]) == (8, 2, 0, 5)  # contiguous alphabet from 5
    freqs = []
    pos = 4
    for _ in range(2):
        freqs.append(good[pos] + 1)
        pos += 1
    assert sum(freqs) == 1 << precision
    words = good[pos:]
    assert len(words) % 4 == 0 and len(words) >= 4
    for cut in range(len(good)):
        with pytest.raises(DsqFormatError):
            ans_decode(good[:cut], 8)
    f0, f1 = freqs
    # (an rANS stream does not delimit itself: the same words may decode as 8 or 9 symbols,
    # so the count is the header's and the manifest's, and must agree with the manifest)
    cases = {
        "count differs from the manifest": (good, 7),
        "extra word": (good + b"\x01\x00\x00\x00", 8),
        "partial word": (good + b"\x01", 8),
        "no words": (_stream(8, 2, desc, 5, freqs, b""), 8),
        "one symbol": (_stream(8, 1, desc, 5, [1 << precision], words), 8),
        "k over count": (_stream(1, 2, desc, 5, freqs, words), 1),
        "frequencies sum short": (_stream(8, 2, desc, 5, [f0, f1 - 1] if f1 > 1 else [f0 - 1, f1],
                                          words), 8),
        "precision over 16": (_stream(8, 2, 0x0F | 0, 5, [1, (1 << 16) - 1], words), 8),
        "alphabet mode 3": (_stream(8, 2, (precision - 1) | 0x30, 5, freqs, words), 8),
        "high descriptor bits": (_stream(8, 2, (precision - 1) | 0x40, 5, freqs, words), 8),
        "symbol over 2**32": (_stream(8, 2, desc, 2**32 - 1, freqs, words), 8),
        "zero last word": (_stream(8, 2, desc, 5, freqs, b"\x00\x00\x00\x00"), 8),
        "empty with trailing bytes": (b"\x00\x00", 0),
    }
    for what, (data, expected) in cases.items():
        with pytest.raises(DsqFormatError):
            ans_decode(data, expected)
            pytest.fail(what)


@given(st.binary(max_size=64), st.integers(0, 1000))
@FAST
def test_decode_random_bytes_only_raises_format_errors(data: bytes, expected: int) -> None:
    try:
        out = ans_decode(data, expected)
    except DsqFormatError:
        return
    assert out.shape == (expected,)


def test_tensor_encoder_picks_ans_where_smaller_and_only_when_asked() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=gen)
    keep = torch.rand(200, 300, generator=gen) < 0.05
    levels = torch.tensor([-0.3, -0.1, 0.1, 0.3])
    codes = torch.multinomial(torch.tensor([0.05, 0.45, 0.45, 0.05]), 60_000, True,
                              generator=gen).reshape(200, 300)
    w = torch.where(keep, levels[codes], torch.zeros(()))
    plain = encode_tensor("w", w)
    coded = encode_tensor("w", w, ans=True)
    assert "ans" in (coded.entry.get("value_coding"), coded.entry.get("index_coding"))
    assert coded.nbytes < plain.nbytes
    assert "ans" not in (plain.entry.get("value_coding"), plain.entry.get("index_coding"))
    assert torch.equal(decode_tensor(coded.entry, coded.sections), w)


def _sparse_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            w = layer.weight
            w.copy_(torch.where(torch.rand_like(w) < 0.1, torch.round(w * 20) / 20, 0.0))
    return model


def test_files_use_ans_by_default_and_not_when_switched_off(tmp_path: Path) -> None:
    model = _sparse_mlp()
    on, off = tmp_path / "on.dsq", tmp_path / "off.dsq"
    dsq.save(model, on)
    dsq.save(model, off, encode=EncodeOptions(ans=False))
    codings = {e.get(k) for e in read_dsq(on).meta["tensors"]
               for k in ("index_coding", "value_coding")}
    assert "ans" in codings
    assert "ans" not in {e.get(k) for e in read_dsq(off).meta["tensors"]
                         for k in ("index_coding", "value_coding")}
    assert on.stat().st_size < off.stat().st_size
    x = torch.randn(4, 64)
    with torch.no_grad():
        for path in (on, off):
            assert torch.equal(dsq.load(path, model=nn.Sequential(
                nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))(x), model(x))


def test_forged_ans_sections_are_refused_by_the_loader_and_the_runtime(tmp_path: Path) -> None:
    path = tmp_path / "m.dsq"
    dsq.save(_sparse_mlp(), path)
    stored = read_dsq(path)
    entry = next(e for e in stored.meta["tensors"] if e["name"] == "0.weight")
    key = "index" if entry.get("index_coding") == "ans" else "values"
    assert entry[f"{key}_coding" if key == "index" else "value_coding"] == "ans"
    section = f"0.weight:{key}"

    def forge(change) -> Path:  # valid CRCs: only the decoder can notice
        meta = {**stored.meta, "tensors": [dict(e) for e in stored.meta["tensors"]]}
        sections = dict(stored.sections)
        change(next(e for e in meta["tensors"] if e["name"] == "0.weight"), sections)
        out = tmp_path / "forged.dsq"
        out.write_bytes(dsq_bytes(meta, sections))
        return out

    def random_words(e, sections):
        data = sections[section]
        tail = np.random.default_rng(0).integers(1, 255, size=8, dtype=np.uint8).tobytes()
        sections[section] = data[:-8] + tail

    def extra_word(e, sections):
        sections[section] = sections[section] + b"\x07\x00\x00\x00"

    def count_lies(e, sections):  # the stream's own count one short of the manifest's
        data = sections[section]
        count, pos = decode_uvarint(data, 0)
        sections[section] = encode_uvarint(count - 1) + data[pos:]

    for change in (random_words, extra_word, count_lies):
        forged = forge(change)
        with pytest.raises(DsqFormatError):
            dsq.load(forged, model=_sparse_mlp())
            pytest.fail(change.__name__)
        with pytest.raises(DsqFormatError):
            load_runtime(forged, model=_sparse_mlp())
            pytest.fail(change.__name__)


def test_sparse_positions_coded_below_one_bit_per_entry_decode() -> None:
    """Gaps of a regular pattern cost < 1 bit each under rANS: the decoder's size bound on the
    entry count must not assume Huffman's 1 bit per entry (it uses the tensor's size)."""
    positions = np.cumsum(np.where(np.arange(4000) % 97 == 0, 4, 3))
    values = torch.zeros(int(positions[-1]) + 1)
    values[torch.as_tensor(positions)] = torch.where(
        torch.as_tensor(np.arange(4000) % 3 == 0), 0.5, -0.25)
    enc = encode_tensor("w", values, ans=True)
    assert enc.entry["encoding"].startswith("sparse") and enc.entry["index_coding"] == "ans"
    assert 8 * len(enc.sections["w:index"]) < enc.entry["entries"]
    assert torch.equal(decode_tensor(enc.entry, enc.sections), values)
    with pytest.raises(DsqFormatError, match="entry count"):
        decode_tensor({**enc.entry, "entries": values.numel() + 1}, enc.sections)
