"""Linear layers whose weights stay in their GGUF precision.

Q4_0, Q4_1 and Q4_K are 4-bit codes with one scale and one offset per 32 weights: exactly torch's int4
weight-only format (group size 32, w = (q - 8) * scale + zero). Q8_0 splits exactly into two such
4-bit matrices (q8 = 16 * hi + lo), so it rides the same kernel at the same bytes per weight.
Everything else is dequantized at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from torch import Tensor, nn

GROUP = 32
INT4_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K)
PACKED_TYPES = (*INT4_TYPES, T.Q8_0)


def _f16(b: Tensor) -> Tensor:
    """Little-endian fp16 from a [..., 2] uint8 tensor, as float32."""
    return b.contiguous().view(torch.float16).float().squeeze(-1)


def _nibbles(qs: Tensor) -> Tensor:
    """[..., 16] packed bytes -> [..., 32] codes: low nibbles first, then high (ggml's order)."""
    return torch.cat((qs & 15, qs >> 4), dim=-1)


def unpack_int4(raw: Tensor, qtype: T, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Raw GGUF bytes -> (codes uint8 [N, K] in 0..15, scale [N, K/32], min [N, K/32]); w = q * scale + min."""
    n, k = shape
    if qtype == T.Q4_0:
        b = raw.view(n, k // 32, 18)
        d = _f16(b[..., :2])
        return _nibbles(b[..., 2:]).reshape(n, k), d, -8 * d
    if qtype == T.Q4_1:
        b = raw.view(n, k // 32, 20)
        return _nibbles(b[..., 4:]).reshape(n, k), _f16(b[..., :2]), _f16(b[..., 2:4])
    if qtype == T.Q4_K:
        b = raw.view(n, k // 256, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s = b[..., 4:16].to(torch.int32)
        # 8 six-bit scales and mins packed into 12 bytes (ggml's get_scale_min_k4).
        sc = torch.cat((s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)), dim=-1)
        mn = torch.cat((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), dim=-1)
        qs = b[..., 16:].view(n, k // 256, 4, 32)
        q = torch.stack((qs & 15, qs >> 4), dim=3).reshape(n, k)  # chunk j: sub-block 2j low, 2j+1 high
        return q, (d[..., None] * sc).reshape(n, -1), (-dmin[..., None] * mn).reshape(n, -1)
    raise ValueError(f"{qtype.name} is not a 4-bit type")


def unpack_q8_0(raw: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Raw Q8_0 bytes -> (int8 codes [N, K], scale [N, K/32])."""
    n, k = shape
    b = raw.view(n, k // 32, 34)
    return b[..., 2:].contiguous().view(torch.int8).reshape(n, k), _f16(b[..., :2])


class Int4Weight(nn.Module):
    """One int4-packed matrix; y = x @ W.T where W = (q - 8) * scale + zero per 32-wide group."""

    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        n, k = q.shape
        if k % GROUP:
            raise ValueError(f"int4 weights need rows that are a multiple of {GROUP}, got {k}")
        self.out_features, self.in_features = n, k
        pad = -n % 16  # the packing kernels want N a multiple of 16; padded rows are zero weights
        if pad:
            q = torch.cat((q, torch.full((pad, k), 8, dtype=q.dtype, device=q.device)))
            scale = torch.cat((scale, scale.new_zeros(pad, k // GROUP)))
            zero = torch.cat((zero, zero.new_zeros(pad, k // GROUP)))
        if q.device.type == "cpu":
            # The CPU layout is row by row: pack in slices so the int32 staging copy stays small.
            pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
            packed = torch.cat([pack(q[i : i + 4096].to(torch.int32), 2) for i in range(0, q.shape[0], 4096)])
        else:
            tiles = 8 if k % (8 * 16) == 0 else 4 if k % (4 * 16) == 0 else 2
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        self.register_buffer("packed", packed)
        # The CUDA kernel takes bfloat16 activations and scales only; the CPU one takes the compute dtype.
        sz_dtype = dtype if q.device.type == "cpu" else torch.bfloat16
        self.register_buffer("scales_zeros", torch.stack((scale.t(), zero.t()), dim=-1).contiguous().to(sz_dtype))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros)
            y = y.to(x.dtype)
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*shape[:-1], self.out_features)


class Linear(nn.Module):
    """A projection: dense, int4, or Q8_0 as the sum of two int4 halves; plus an optional bias."""

    def __init__(self, parts: list[nn.Module] | Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if isinstance(parts, Tensor):
            self.register_buffer("weight", parts)
            self.parts = None
        else:
            self.weight = None
            self.parts = nn.ModuleList(parts)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.parts is None:
            return F.linear(x, self.weight, self.bias)
        y = self.parts[0](x)
        for p in self.parts[1:]:
            y = y + p(x)
        return y if self.bias is None else y + self.bias


def _int4_codes(raw: Tensor, qtype: T, shape: tuple[int, int]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(codes, scale, zero) of the int4 matrices whose sum is this tensor: one for Q4_*, two for Q8_0."""
    if qtype in INT4_TYPES:
        q, scale, mn = unpack_int4(raw, qtype, shape)
        return [(q, scale, mn + 8 * scale)]
    if qtype == T.Q8_0:
        q8, s = unpack_q8_0(raw, shape)
        hi, lo = ((q8 >> 4) + 8).to(torch.uint8), (q8 & 15).to(torch.uint8)  # q8 = 16 * (hi - 8) + lo
        return [(hi, 16 * s, torch.zeros_like(s)), (lo, s, 8 * s)]
    raise ValueError(f"{qtype.name} cannot stay quantized")


def packed_linear(raws: list[Tensor], qtype: T, shapes: list[tuple[int, int]], dtype: torch.dtype) -> Linear:
    """One Linear for several same-typed GGUF tensors stacked along the output dim (fused q/k/v, gate/up)."""
    per_tensor = [_int4_codes(r, qtype, s) for r, s in zip(raws, shapes, strict=True)]
    parts = []
    for i in range(len(per_tensor[0])):
        q, scale, zero = (torch.cat([p[i][j] for p in per_tensor]) for j in range(3))
        parts.append(Int4Weight(q, scale, zero, dtype))
    return Linear(parts)
