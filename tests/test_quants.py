"""tandem.engine.quants against gguf-py's numpy reference, type by type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.engine import quants
from tandem.engine.quants import SUPPORTED_TYPES, bytes_for, dequantize

T = GGMLQuantizationType

# Byte offsets of each block's fp16 scale fields (ggml-common.h). Random bytes there can be inf/NaN, so
# the test writes sane values instead; every other byte stays random and so covers every bit pattern.
FP16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),  # scales[16] qs[64] d dmin
    T.Q3_K: (108,),  # hmask[32] qs[64] scales[12] d
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),  # ql[128] qh[64] scales[16] d
    T.IQ2_XXS: (0,),
    T.IQ2_XS: (0,),
    T.IQ2_S: (0,),
    T.IQ3_XXS: (0,),
    T.IQ3_S: (0,),
    T.IQ1_S: (0,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
    T.TQ1_0: (52,),  # qs[48] qh[4] d
    T.TQ2_0: (64,),  # qs[64] d
}


def _fp16_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    values = rng.uniform(0.01, 2.0, n) * rng.choice([-1.0, 1.0], n)
    return values.astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(qtype: GGMLQuantizationType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of `qtype` whose scale fields are finite."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype in FP16_FIELDS:
        for at in FP16_FIELDS[qtype]:
            blocks[:, at : at + 2] = _fp16_bytes(rng, n_blocks)
    elif qtype == T.IQ1_M:
        # qs[32] qh[16] scales[8]: the fp16 scale is split over the top nibbles of the four uint16 words
        d = _fp16_bytes(rng, n_blocks).view(np.uint16).reshape(n_blocks)
        words = blocks[:, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
        for i in range(4):  # word i's top nibble holds bits 4i..4i+3 of the scale
            words[:, i] |= ((d >> (4 * i)) & 0xF) << 12
        blocks[:, 48:56] = words.view(np.uint8)
    elif qtype == T.MXFP4:
        blocks[:, 0] = rng.integers(110, 140, n_blocks)  # e8m0 exponent near 2^0
    elif qtype == T.NVFP4:
        pass  # four unsigned e4m3 scales: every byte decodes to a finite value
    elif qtype in (T.F32, T.F16, T.BF16):
        values = rng.standard_normal(n_blocks).astype(np.float32)  # one element per "block"
        return gguf.quants.quantize(values, qtype).view(np.uint8).reshape(n_blocks, type_size)
    else:
        raise AssertionError(f"no block layout known for {qtype.name}: add it to this test")
    return blocks


def _gguf_dequantizes(qtype: GGMLQuantizationType) -> bool:
    try:
        gguf.quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _gguf_quantizes(qtype: GGMLQuantizationType) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


GGUF_TYPES = [t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES and _gguf_dequantizes(t)]
QUANTIZABLE = [t for t in GGUF_TYPES if _gguf_quantizes(t)]
SHAPES = [(3, 2, 2), (7, 1), (1, 5)]  # (outer..., blocks per row): 3-D, many rows, one long row


def _assert_matches(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape
    assert np.isfinite(ref).all()
    scale = float(np.abs(ref).max()) or 1.0
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=1e-6 * scale)


def _shape(qtype: GGMLQuantizationType, outer_and_blocks: tuple[int, ...]) -> tuple[int, ...]:
    block = GGML_QUANT_SIZES[qtype][0]
    block = block if block > 1 else 32
    return (*outer_and_blocks[:-1], outer_and_blocks[-1] * block)


def test_every_gguf_type_is_supported() -> None:
    assert set(GGUF_TYPES) <= SUPPORTED_TYPES
    # the ones the engine relies on are unpacked in torch, not by the numpy fallback
    for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        assert t in quants._UNPACKERS


@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("outer_and_blocks", SHAPES, ids=str)
def test_random_blocks_match_gguf(qtype: GGMLQuantizationType, outer_and_blocks: tuple[int, ...]) -> None:
    rng = np.random.default_rng([int(qtype), *outer_and_blocks])
    shape = _shape(qtype, outer_and_blocks)
    raw = random_blocks(qtype, bytes_for(qtype, shape) // GGML_QUANT_SIZES[qtype][1], rng)
    ref = gguf.quants.dequantize(raw, qtype).reshape(shape)
    _assert_matches(dequantize(raw.reshape(-1), qtype, shape), ref)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_floats_match_gguf(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(int(qtype))
    shape = _shape(qtype, (4, 3, 2))
    values = rng.standard_normal(shape)
    if qtype in (T.TQ1_0, T.TQ2_0):  # ternary formats: give them ternary data
        values = np.sign(np.round(values))
    values = (values * rng.uniform(0.1, 3.0, (*shape[:-1], 1))).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    ref = gguf.quants.dequantize(raw, qtype).reshape(shape)
    ours = dequantize(raw, qtype, shape)
    _assert_matches(ours, ref)
    # and the round trip is close to the input, so the test is not comparing two equal wrongs
    err = float(np.abs(ours.numpy() - values).mean() / np.abs(values).mean())
    assert err < 0.2


def test_real_model_tensors(smollm2) -> None:
    reader = gguf.GGUFReader(smollm2)
    seen = set()
    for t in reader.tensors:
        if t.tensor_type in seen or t.name.startswith("token_embd"):
            continue
        seen.add(t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        _assert_matches(dequantize(t.data, t.tensor_type, shape), ref)
    assert {T.Q4_1, T.F32} <= seen


def test_chunked_unpacking_spans_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    raw = random_blocks(T.Q4_K, 10, rng)
    monkeypatch.setattr(quants, "_CHUNK_BLOCKS", 3)
    _assert_matches(dequantize(raw, T.Q4_K, (5, 512)), gguf.quants.dequantize(raw, T.Q4_K).reshape(5, 512))


def test_output_dtype_and_no_aliasing(tmp_path) -> None:
    values = np.arange(64, dtype=np.float32).reshape(2, 32)
    path = tmp_path / "t.bin"
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")  # read-only, like a mapped GGUF
    out = dequantize(mapped, T.F32, (2, 32))
    out += 1  # must not write through to the read-only map
    assert torch.equal(out, torch.from_numpy(values) + 1)
    half = dequantize(mapped, T.F32, (2, 32), dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half.float(), torch.from_numpy(values))
    q = gguf.quants.quantize(values, T.Q8_0)
    bf = dequantize(q, T.Q8_0, (2, 32), dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    assert torch.equal(bf, torch.from_numpy(gguf.quants.dequantize(q, T.Q8_0)).to(torch.bfloat16))


def test_plain_integer_types() -> None:
    values = np.array([[-3, 7, 1000, -1000]], dtype=np.int32)
    out = dequantize(values.view(np.uint8), T.I32, (1, 4))
    assert torch.equal(out, torch.tensor([[-3.0, 7.0, 1000.0, -1000.0]]))


@pytest.mark.parametrize("qtype", [T.Q8_K, T.Q8_1, 999, "Q4_0"], ids=str)
def test_unsupported_type_is_a_clear_error(qtype) -> None:
    if qtype in (T.Q8_K, T.Q8_1):
        assert qtype not in SUPPORTED_TYPES
    with pytest.raises(ValueError, match=str(getattr(qtype, "name", qtype))):
        dequantize(np.zeros(1024, dtype=np.uint8), qtype, (1, 256))


def test_bad_sizes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="multiple of Q4_0's block size 32"):
        dequantize(np.zeros(18, dtype=np.uint8), T.Q4_0, (1, 16))
    with pytest.raises(ValueError, match="needs 36 bytes, got 18"):
        dequantize(np.zeros(18, dtype=np.uint8), T.Q4_0, (2, 32))


def test_bytes_for_matches_gguf() -> None:
    for qtype in GGUF_TYPES:
        block = GGML_QUANT_SIZES[qtype][0]
        shape = (3, 4, 2 * block)
        assert bytes_for(qtype, shape) == int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
    assert bytes_for(T.F16, (5,)) == 10
    with pytest.raises(ValueError):
        bytes_for(T.Q6_K, (4, 100))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q6_K, T.F16, T.NVFP4], ids=lambda t: t.name)
def test_dequantize_blocks_on_gathered_rows(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(2)
    shape = _shape(qtype, (6, 2))
    raw = random_blocks(qtype, bytes_for(qtype, shape) // GGML_QUANT_SIZES[qtype][1], rng)
    table = torch.from_numpy(raw.reshape(shape[0], -1))  # one packed row per token, as an embedding keeps it
    ids = torch.tensor([4, 0, 4, 5])
    full = dequantize(raw, qtype, shape)
    got = quants.dequantize_blocks(table[ids], qtype, (len(ids), shape[1]), torch.float32)
    assert torch.equal(got, full[ids])
    with pytest.raises(ValueError, match="needs"):
        quants.dequantize_blocks(table[ids], qtype, (len(ids) + 1, shape[1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_gguf() -> None:
    rng = np.random.default_rng(3)
    for qtype in GGUF_TYPES:
        shape = _shape(qtype, (5, 3))
        raw = random_blocks(qtype, bytes_for(qtype, shape) // GGML_QUANT_SIZES[qtype][1], rng)
        out = dequantize(raw, qtype, shape, device="cuda")
        assert out.device.type == "cuda", qtype.name
        _assert_matches(out.cpu(), gguf.quants.dequantize(raw, qtype).reshape(shape))
        rows = dequantize(raw, qtype, shape, device="cuda", dtype=torch.bfloat16)
        assert rows.dtype == torch.bfloat16
