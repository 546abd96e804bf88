"""GGML block formats -> torch tensors, on the target device.

Raw blocks are copied to the device as bytes and unpacked there, so a GPU load moves the file's size over
the bus, not the float32 size, and the bit twiddling runs on the accelerator. Each unpacker mirrors
gguf-py's numpy reference (`gguf.quants`) operation for operation in float32, so results agree bit for
bit; the block layouts are those of ggml-common.h. Types gguf can dequantize but that have no torch
unpacker here go through gguf's numpy code and are then moved to the device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

T = GGMLQuantizationType
Unpacker = Callable[[torch.Tensor], torch.Tensor]  # (n_blocks, type_size) uint8 -> (n_blocks, block) float32

# Blocks unpacked per step: bounds the temporaries (a few times the float32 output) on big tensors.
_CHUNK_BLOCKS = 1 << 16


def bytes_for(qtype: GGMLQuantizationType | int, shape: Sequence[int]) -> int:
    """Bytes a tensor of this type and torch-order shape takes in a GGUF file."""
    qtype = _qtype(qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(d) for d in shape)
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"bad tensor shape {shape}")
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of {qtype.name}'s block size {block}")
    return math.prod(shape) // block * type_size


def dequantize(
    raw: np.ndarray,
    qtype: GGMLQuantizationType | int,
    shape: Sequence[int],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unpack a tensor's raw GGUF bytes into a `dtype` tensor of torch-order `shape` on `device`.

    The result never shares memory with `raw` (which is usually a read-only map of the file).
    """
    qtype, shape = _check(qtype, shape, np.asarray(raw).nbytes)
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    device = torch.device(device)
    if qtype not in _PLAIN and qtype not in _UNPACKERS:  # numpy reference: skip the trip to the device and back
        return _numpy_fallback(flat, qtype, shape, device, dtype)
    with warnings.catch_warnings():  # read-only maps are fine: nothing writes through this view
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(flat).to(device)
    out = _unpack(src, qtype, shape, dtype)
    if out.data_ptr() == src.data_ptr():  # a plain type already in `dtype` on the CPU: still the file's memory
        out = out.clone()
    return out


def dequantize_blocks(
    rows: torch.Tensor, qtype: GGMLQuantizationType | int, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unpack raw bytes already on the device (e.g. embedding rows gathered per token) into `shape`."""
    qtype, shape = _check(qtype, shape, rows.numel() * rows.element_size())
    return _unpack(rows.contiguous().view(torch.uint8).reshape(-1), qtype, shape, dtype)


def _check(
    qtype: GGMLQuantizationType | int, shape: Sequence[int], nbytes: int
) -> tuple[GGMLQuantizationType, tuple[int, ...]]:
    qtype = _qtype(qtype)
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"cannot dequantize GGML type {qtype.name}: not supported")
    shape = tuple(int(d) for d in shape)
    if nbytes != (need := bytes_for(qtype, shape)):
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {need} bytes, got {nbytes}")
    return qtype, shape


def _unpack(
    flat: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Flat uint8 bytes on their device -> `dtype` values of `shape` there."""
    if qtype in _PLAIN:
        return flat.view(_PLAIN[qtype]).to(dtype).reshape(shape)
    block, type_size = GGML_QUANT_SIZES[qtype]
    unpack = _UNPACKERS.get(qtype)
    if unpack is None:
        return _numpy_fallback(flat.cpu().numpy(), qtype, shape, flat.device, dtype)
    blocks = flat.view(-1, type_size)
    out = torch.empty(blocks.shape[0], block, dtype=dtype, device=flat.device)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        stop = min(start + _CHUNK_BLOCKS, blocks.shape[0])
        out[start:stop] = unpack(blocks[start:stop])
    return out.reshape(shape)


def _numpy_fallback(
    flat: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    values = gguf.quants.dequantize(flat.reshape(-1, GGML_QUANT_SIZES[qtype][1]), qtype)
    return torch.from_numpy(np.ascontiguousarray(values)).to(device=device, dtype=dtype).reshape(shape)


def _qtype(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(int(qtype))
    except (ValueError, TypeError):
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from None


# ---- small helpers over (n, type_size) uint8 blocks ------------------------------------------------


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block, as float32 (n, 1)."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _u16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian uint16 words of a (n, 2k) byte slice, as int32 (n, k)."""
    b = b.to(torch.int32).view(b.shape[0], -1, 2)
    return b[..., 0] | (b[..., 1] << 8)


def _u32(b: torch.Tensor) -> torch.Tensor:
    """Little-endian uint32 words of a (n, 4k) byte slice, as int64 (n, k)."""
    b = b.to(torch.int64).view(b.shape[0], -1, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


_SHIFTS: dict[tuple[int | str, ...], dict[torch.device, torch.Tensor]] = {}


def _shifts(values: Sequence[int], device: torch.device, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    key = (*values, str(dtype))
    per_device = _SHIFTS.setdefault(key, {})
    if device not in per_device:
        per_device[device] = torch.tensor(values, dtype=dtype, device=device)
    return per_device[device]


def _bits(b: torch.Tensor, width: int, shifts: Sequence[int]) -> torch.Tensor:
    """Fields of `width` bits at `shifts` of every byte: (..., k) -> (..., len(shifts), k)."""
    s = _shifts(shifts, b.device).view(len(shifts), 1)
    return (b.unsqueeze(-2) >> s) & ((1 << width) - 1)


def _bitplanes(b: torch.Tensor) -> torch.Tensor:
    """Bits 0..7 of each byte: (n, k) -> (n, k, 8), low bit first."""
    return (b.unsqueeze(-1) >> _shifts(range(8), b.device)) & 1


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """(n, k) -> (n, 2k): all low nibbles, then all high nibbles."""
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _lut(name: str, device: torch.device, make: Callable[[], np.ndarray]) -> torch.Tensor:
    if (name, device) not in _LUTS:
        _LUTS[(name, device)] = torch.from_numpy(np.ascontiguousarray(make())).to(device)
    return _LUTS[(name, device)]


def _grid(cls: type, device: torch.device) -> torch.Tensor:
    """gguf's decoded lattice of an i-quant, (entries, width) float32."""

    def make() -> np.ndarray:
        cls.init_grid()
        return cls.grid.reshape(cls.grid_shape).astype(np.float32)

    return _lut(cls.__name__, device, make)


def _ksigns(device: torch.device) -> torch.Tensor:
    return _lut("ksigns", device, lambda: np.frombuffer(gguf.quants.IQ2_XXS.ksigns, dtype=np.uint8).copy())


def _kvalues(cls: type, device: torch.device) -> torch.Tensor:
    return _lut(f"{cls.__name__}.kvalues", device, lambda: np.array(cls.kvalues, dtype=np.float32))


def _signs(bits01: torch.Tensor) -> torch.Tensor:
    return 1.0 - 2.0 * bits01.float()


# ---- legacy 32-element blocks ---------------------------------------------------------------------


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    return d * _nibbles(b[:, 4:]).float() + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    return _bitplanes(qh).reshape(qh.shape[0], 32)  # bit j of the little-endian u32 -> element j


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = (_nibbles(b[:, 6:]) | (_q5_high(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 8:]) | (_q5_high(b[:, 4:8]) << 4)
    return d * q.float() + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return b[:, 2:].contiguous().view(torch.int8).float() * d


# ---- k-quants: 256-element super-blocks -----------------------------------------------------------


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), 2, (0, 2, 4, 6)).reshape(n, 16, 16).float()
    return (dl * q - ml).view(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    lo = _bits(scales[:, :8], 4, (0, 4)).reshape(n, 16)
    hi = _bits(scales[:, 8:], 2, (0, 2, 4, 6)).reshape(n, 16)
    sc = (lo | (hi << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).view(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 2, (0, 2, 4, 6)).reshape(n, 16, 16)
    qh = (_bits(hmask, 1, range(8)).reshape(n, 16, 16)) ^ 1  # a set bit means "no -4 offset"
    q = ql.to(torch.int8) - (qh << 2).to(torch.int8)
    return (dl * q.float()).view(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    q = _bits(b[:, 16:].reshape(n, 4, 32), 4, (0, 4)).reshape(n, 8, 32).float()
    return (dl * q - ml).view(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    ql = _bits(b[:, 48:].reshape(n, 4, 32), 4, (0, 4)).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 1, range(8))  # (n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).view(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    dl = (d * scales.contiguous().view(torch.int8).float()).view(n, 16, 1)
    lo = _bits(ql.reshape(n, 2, 64), 4, (0, 4)).reshape(n, 8, 32)
    hi = _bits(qh.reshape(n, 2, 32), 2, (0, 2, 4, 6)).reshape(n, 8, 32)
    q = (lo | (hi << 4)).to(torch.int8) - 32
    return (dl * q.view(n, 16, 16).float()).view(n, QK_K)


# ---- ternary and fp4 ------------------------------------------------------------------------------


def _tq1_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs, qh = b[:, :48].to(torch.int32), b[:, 48:52].to(torch.int32)
    dev = b.device
    p5 = _shifts((1, 3, 9, 27, 81), dev, torch.int32).view(5, 1)
    p4 = _shifts((1, 3, 9, 27), dev, torch.int32).view(4, 1)
    # Each byte holds base-3 digits as a fixed-point fraction; multiplying by 3^k (mod 256) brings digit k up top.
    parts = [
        (qs[:, :32].unsqueeze(1) * p5).reshape(n, -1),
        (qs[:, 32:].unsqueeze(1) * p5).reshape(n, -1),
        (qh.unsqueeze(1) * p4).reshape(n, -1),
    ]
    q = ((torch.cat(parts, dim=-1) & 0xFF) * 3) >> 8
    return _f16(b, 52) * (q - 1).float()


def _tq2_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    q = _bits(b[:, :64].reshape(n, 2, 32), 2, (0, 2, 4, 6)).reshape(n, QK_K).to(torch.int8) - 1
    return _f16(b, 64) * q.float()


def _mxfp4(b: torch.Tensor) -> torch.Tensor:
    e = b[:, :1].to(torch.int32)
    # e8m0 exponent, halved (the value table is doubled): see ggml_e8m0_to_fp32_half
    bits = torch.where(e < 2, torch.bitwise_left_shift(torch.full_like(e, 0x00200000), e), (e - 1) << 23)
    d = bits.view(torch.float32)
    idx = _nibbles(b[:, 1:]).long()
    return d * _kvalues(gguf.quants.MXFP4, b.device)[idx]


# ---- i-quants -------------------------------------------------------------------------------------


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    idx = _nibbles(b[:, 2:]).long()
    return _f16(b, 0) * _kvalues(gguf.quants.IQ4_NL, b.device)[idx]


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    sh = _u16(b[:, 2:4])  # (n, 1)
    sl = _bits(b[:, 4:8], 4, (0, 4)).transpose(1, 2).reshape(n, 8)
    hi = (sh >> _shifts(range(0, 16, 2), b.device, torch.int32)) & 3
    sc = (sl.to(torch.int32) | (hi << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).view(n, 8, 1)
    idx = _bits(b[:, 8:].reshape(n, 8, 16), 4, (0, 4)).reshape(n, 8, 32).long()
    return (dl * _kvalues(gguf.quants.IQ4_NL, b.device)[idx]).view(n, QK_K)


def _ksign_bits(words: torch.Tensor) -> torch.Tensor:
    """Four 7-bit sign indices per uint32 -> (.., 4, 8) of 0/1 through the ksigns table."""
    idx = (words.unsqueeze(-1) >> _shifts((0, 7, 14, 21), words.device, torch.int64)) & 0x7F
    return _bitplanes(_ksigns(words.device)[idx])


def _iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    words = _u32(b[:, 2:66]).view(n, 8, 2)
    db = (d * (0.5 + (words[..., 1] >> 28).float()) * 0.25).view(n, 8, 1, 1)
    signs = _signs(_ksign_bits(words[..., 1]))  # (n, 8, 4, 8)
    grid_idx = b[:, 2:66].reshape(n, 8, 8)[:, :, :4].long()  # low word's four bytes
    grid = _grid(gguf.quants.IQ2_XXS, b.device)[grid_idx]  # (n, 8, 4, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq2_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    qs = _u16(b[:, 2:66])  # (n, 32)
    sc = _bits(b[:, 66:74], 4, (0, 4)).transpose(1, 2).reshape(n, 16)
    db = (d * (0.5 + sc.float()) * 0.25).view(n, 16, 1, 1)
    signs = _signs(_bitplanes(_ksigns(b.device)[(qs >> 9).long()])).view(n, 16, 2, 8)
    grid = _grid(gguf.quants.IQ2_XS, b.device)[(qs & 511).long()].view(n, 16, 2, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq2_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    qs, sign_bytes, qh, scales = b[:, 2:34], b[:, 34:66], b[:, 66:74], b[:, 74:82]
    sc = _bits(scales, 4, (0, 4)).transpose(1, 2).reshape(n, 16)
    db = (d * (0.5 + sc.float()) * 0.25).view(n, 16, 1, 1)
    signs = _signs(_bitplanes(sign_bytes)).view(n, 16, 2, 8)
    high = _bits(qh, 2, (0, 2, 4, 6)).transpose(1, 2).reshape(n, 32)
    idx = qs.long() | (high.long() << 8)
    grid = _grid(gguf.quants.IQ2_S, b.device)[idx].view(n, 16, 2, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    qs, words = b[:, 2:66], _u32(b[:, 66:98])  # (n, 64), (n, 8)
    db = (d * (0.5 + (words >> 28).float()) * 0.5).view(n, 8, 1, 1)
    signs = _signs(_ksign_bits(words))  # (n, 8, 4, 8)
    grid = _grid(gguf.quants.IQ3_XXS, b.device)[qs.long()].view(n, 8, 4, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq3_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    qs, qh, sign_bytes, scales = b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
    sc = _bits(scales, 4, (0, 4)).transpose(1, 2).reshape(n, 8)
    db = (d * (1 + 2 * sc).float()).view(n, 8, 1, 1)
    signs = _signs(_bitplanes(sign_bytes)).view(n, 8, 4, 8)
    idx = qs.long() | (_bitplanes(qh).reshape(n, 64).long() << 8)
    grid = _grid(gguf.quants.IQ3_S, b.device)[idx].view(n, 8, 4, 8)
    return (db * grid * signs).view(n, QK_K)


_IQ1_DELTA = float(gguf.quants.IQ1_S.delta)


def _iq1_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    qs, qh = b[:, 2:34], _u16(b[:, 34:50])  # (n, 32), (n, 8)
    dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).view(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, _IQ1_DELTA, -_IQ1_DELTA).view(n, 8, 1, 1)
    high = (qh.unsqueeze(-1) >> _shifts((0, 3, 6, 9), b.device, torch.int32)) & 7  # (n, 8, 4)
    idx = qs.long() | (high.reshape(n, 32).long() << 8)
    grid = _grid(gguf.quants.IQ1_S, b.device)[idx].view(n, 8, 4, 8)
    return (dl * (grid + delta)).view(n, QK_K)


def _iq1_m(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs, qh, words = b[:, :32], b[:, 32:48], _u16(b[:, 48:56])  # (n, 32), (n, 16), (n, 4)
    # the fp16 super-block scale is spread over the top nibbles of the four scale words
    top = (words & 0xF000) >> _shifts((12, 8, 4, 0), b.device, torch.int32)
    d16 = top[:, 0] | top[:, 1] | top[:, 2] | top[:, 3]
    d = d16.to(torch.int16).view(torch.float16).float().view(n, 1)  # low 16 bits, reinterpreted
    sc = ((words.unsqueeze(-1) >> _shifts((0, 3, 6, 9), b.device, torch.int32)) & 7).reshape(n, 16)
    dl = (d * (2 * sc + 1).float()).view(n, 8, 2, 1, 1)
    halves = _bits(qh, 4, (0, 4)).transpose(1, 2)  # (n, 16, 2): low nibble, high nibble
    idx = qs.long() | ((halves & 7).reshape(n, 32).long() << 8)
    delta = torch.where((halves & 8) == 0, _IQ1_DELTA, -_IQ1_DELTA).reshape(n, 8, 2, 2, 1)
    grid = _grid(gguf.quants.IQ1_M, b.device)[idx].view(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).view(n, QK_K)


_UNPACKERS: dict[GGMLQuantizationType, Unpacker] = {
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q8_0: _q8_0,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
    T.TQ1_0: _tq1_0,
    T.TQ2_0: _tq2_0,
    T.MXFP4: _mxfp4,
    T.IQ4_NL: _iq4_nl,
    T.IQ4_XS: _iq4_xs,
    T.IQ2_XXS: _iq2_xxs,
    T.IQ2_XS: _iq2_xs,
    T.IQ2_S: _iq2_s,
    T.IQ3_XXS: _iq3_xxs,
    T.IQ3_S: _iq3_s,
    T.IQ1_S: _iq1_s,
    T.IQ1_M: _iq1_m,
}

# Element types stored as-is: a reinterpreting view, then a cast.
_PLAIN: dict[GGMLQuantizationType, torch.dtype] = {
    T.F32: torch.float32,
    T.F16: torch.float16,
    T.BF16: torch.bfloat16,
    T.F64: torch.float64,
    T.I8: torch.int8,
    T.I16: torch.int16,
    T.I32: torch.int32,
    T.I64: torch.int64,
}


def _gguf_can_dequantize(qtype: GGMLQuantizationType) -> bool:
    try:
        gguf.quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except Exception:  # NotImplementedError today; anything else also means "not usable"
        return False
    return True


# Every type this module turns into floats: torch unpackers, plain element types, and gguf's numpy fallback.
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {*_UNPACKERS, *_PLAIN} | {t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES and _gguf_can_dequantize(t)}
)
