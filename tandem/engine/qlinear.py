"""Linear layers whose weights stay in their GGUF precision.

Q4_0, Q4_1 and Q4_K are 4-bit codes with one scale and one offset per 32 weights (w = q * scale + min):
exactly the int4 weight-only format of our CPU kernel (cpu_int4.cpp) and of torch's kernels (group size 32,
w = (q - 8) * scale + zero). Q8_0 splits exactly into two such 4-bit matrices (q8 = 16 * (hi - 8) + lo),
so it rides the same kernels at the same bytes per weight. Everything else is dequantized at load.

A tied token embedding is held only once, by the output head: its rows are read back out of the packed
codes (CPU packings) and rebuilt into GGUF blocks with the block headers kept aside, so the lookup
dequantizes exactly the bytes the file holds.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from torch import Tensor, nn

from tandem.engine import cpu_kernels

GROUP = 32
SLICE = 1024  # rows unpacked and packed at a time: a multiple of every packing's row block
INT4_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K)
PACKED_TYPES = (*INT4_TYPES, T.Q8_0)
# Bytes at the start of each GGUF block that are not codes (fp16 scales, mins, 6-bit sub-block scales).
HEADER_BYTES = {T.Q4_0: 2, T.Q4_1: 4, T.Q4_K: 16, T.Q8_0: 2}


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


@functools.cache
def cpu_layout() -> tuple[int, bool] | None:
    """How torch's CPU int4 packing orders rows here: (rows per block, full blocks split in halves), or None.

    It depends on the vector ISA torch dispatches to (AVX512: 64 rows, row r and r + 32 share a byte;
    AVX2: 32 rows, r and r + 16; otherwise 32 rows, r and r + 1); within a block, column k's bytes are
    contiguous, and a short last block pairs neighbouring rows. A probe packed here picks the candidate.
    """
    n, k = 176, 64  # two full blocks of 64 and a short one, or five of 32 and a short one
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    rows = torch.arange(n)
    for layout in ((64, True), (32, True), (32, False), (64, False), (16, False), (128, True), (128, False)):
        if torch.equal(gather_codes([packed], k, rows, layout)[0].to(torch.int32), q):
            return layout
    return None


def gather_codes(packed: list[Tensor], k: int, rows: Tensor, layout: tuple[int, bool]) -> list[Tensor]:
    """The 4-bit codes of output rows `rows` of same-shaped CPU-packed [N, K/2] matrices: uint8 [len(rows), K]."""
    block, halves = layout
    blk, r = rows // block, rows % block
    nb = (packed[0].shape[0] - blk * block).clamp(max=block)  # rows in this block (the last may be short)
    if halves:
        full = nb == block
        byte = torch.where(full, r % (block // 2), r // 2)
        shift = torch.where(full, r // (block // 2), r % 2)
    else:
        byte, shift = r // 2, r % 2
    idx = (blk * (block * k // 2) + byte)[:, None] + torch.arange(k, device=rows.device) * (nb // 2)[:, None]
    shift = (4 * shift[:, None]).to(torch.uint8)
    return [(p.view(-1)[idx] >> shift) & 15 for p in packed]


class Int4Weight(nn.Module):
    """One int4 matrix; y = x @ W.T where W = q * scale + mn per 32-wide group.

    On CPUs with AVX512-BF16, bfloat16 and float32 activations run our kernel (cpu_kernels.matmul); elsewhere torch's
    int4 kernels, whose packing wants W = (q - 8) * scale + zero. Built whole, or empty and then filled a
    slice of rows at a time (packed_linear), so that a big tensor's unpacked codes never exist at once:
    every packing lays rows out block by block.
    """

    def __init__(self, q: Tensor, scale: Tensor, mn: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self._allocate(q.shape[0], q.shape[1], dtype, q.device)
        self.fill(0, q, scale, mn)

    @classmethod
    def empty(cls, n: int, k: int, dtype: torch.dtype, device: torch.device) -> Int4Weight:
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._allocate(n, k, dtype, device)
        return self

    def _allocate(self, n: int, k: int, dtype: torch.dtype, device: torch.device, ours: bool = True) -> None:
        if k % GROUP:
            raise ValueError(f"int4 weights need rows that are a multiple of {GROUP}, got {k}")
        self.out_features, self.in_features, self.dtype = n, k, dtype
        n_pad = n + -n % 16  # every packing wants N a multiple of 16; padded rows are zero weights
        self.ours = (
            ours and device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and cpu_kernels.available()
        )
        if self.ours:
            blocks, groups = n_pad // cpu_kernels.ROWS, k // GROUP
            self.register_buffer("packed", torch.empty(blocks, groups, 8, 32, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(blocks, groups, 2, cpu_kernels.ROWS, dtype=torch.float16))
            return
        # torch's packings. Allocated by the first fill: its shape is the kernel's (dim 0 goes with the rows).
        self.register_buffer("packed", None)
        if device.type == "cpu":
            self.layout = cpu_layout()
        else:
            self.tiles = 8 if k % (8 * 16) == 0 else 4 if k % (4 * 16) == 0 else 2
            self.layout = None  # tiled for the tensor cores: rows are not read back
        # Scales and zeros; the CUDA kernel takes bfloat16, the CPU one the compute dtype.
        sz_dtype = dtype if device.type == "cpu" else torch.bfloat16
        self.register_buffer("scales", torch.empty(k // GROUP, n_pad, 2, dtype=sz_dtype, device=device))

    @property
    def packed_rows(self) -> int:
        return self.scales.shape[0] * cpu_kernels.ROWS if self.ours else self.scales.shape[1]

    @property
    def readable(self) -> bool:
        """Whether codes_of can read rows back (not from CUDA's tiles, nor from an unknown CPU packing)."""
        return self.ours or self.layout is not None

    def fill(self, start: int, q: Tensor, scale: Tensor, mn: Tensor) -> None:
        """Pack rows start.. (start a multiple of SLICE; the slice that ends the matrix also pads it)."""
        n, k = self.out_features, self.in_features
        stop = start + q.shape[0]
        if start % SLICE or q.shape[1] != k or stop > n:
            raise ValueError(f"rows {start}..{stop} of {k} do not fit an int4 matrix of {n} x {k}")
        if stop == n and (pad := self.packed_rows - n):
            q = torch.cat((q, q.new_zeros(pad, k)))
            scale = torch.cat((scale, scale.new_zeros(pad, k // GROUP)))
            mn = torch.cat((mn, mn.new_zeros(pad, k // GROUP)))
        end = start + q.shape[0]
        if self.ours:
            if (packed := cpu_kernels.pack(q, scale, mn)) is not None:
                self.packed[start // cpu_kernels.ROWS : end // cpu_kernels.ROWS] = packed[0]
                self.scales[start // cpu_kernels.ROWS : end // cpu_kernels.ROWS] = packed[1]
                return
            self._repack_for_torch(start)  # a scale beyond float16's range: torch's kernel keeps float32 ones
        self.scales[:, start:end] = torch.stack((scale.t(), (mn + 8 * scale).t()), dim=-1)
        for i in range(0, q.shape[0], SLICE):  # in slices, so the int32 staging copy stays small
            rows = q[i : i + SLICE]
            if q.device.type == "cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows.to(torch.int32), 2)
            else:
                pairs = (rows[:, ::2] << 4 | rows[:, 1::2]).to(torch.uint8)
                packed = torch.ops.aten._convert_weight_to_int4pack(pairs, self.tiles)
            per, r = packed.shape[0], rows.shape[0]
            if self.packed is None:
                self.packed = packed.new_empty((self.packed_rows * per // r, *packed.shape[1:]))
            at = (start + i) * per // r
            self.packed[at : at + per] = packed
        if self.layout is not None:  # rows that do not read back as packed are never read back
            probe = torch.tensor([0, q.shape[0] - 1])
            got = self.codes_of(probe + start)
            if not torch.equal(got, q[probe].to(got.device)):
                self.layout = None

    def _repack_for_torch(self, filled: int) -> None:
        """Move the rows filled so far into torch's CPU packing."""
        q = cpu_kernels.gather_codes(self.packed, torch.arange(filled))
        sm = self.scales.permute(2, 0, 3, 1).reshape(2, -1, self.in_features // GROUP)[:, :filled].float()
        del self.packed, self.scales
        self._allocate(self.out_features, self.in_features, self.dtype, torch.device("cpu"), ours=False)
        if filled:
            self.fill(0, q, sm[0], sm[1])

    def codes_of(self, rows: Tensor) -> Tensor:
        """The 4-bit codes of output rows `rows`: uint8 [len(rows), K]."""
        if self.ours:
            return cpu_kernels.gather_codes(self.packed, rows)
        if self.layout is None:
            raise ValueError("this int4 packing does not read rows back")
        return gather_codes([self.packed], self.in_features, rows, self.layout)[0]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.ours:
            return cpu_kernels.matmul(x2, self.packed, self.scales, self.out_features).reshape(*shape[:-1], -1)
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), self.packed, GROUP, self.scales)
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
    """(codes, scale, min) of the int4 matrices whose sum is this tensor: one for Q4_*, two for Q8_0."""
    if qtype in INT4_TYPES:
        return [unpack_int4(raw, qtype, shape)]
    if qtype == T.Q8_0:
        q8, s = unpack_q8_0(raw, shape)
        hi, lo = ((q8 >> 4) + 8).to(torch.uint8), (q8 & 15).to(torch.uint8)  # q8 = 16 * (hi - 8) + lo
        return [(hi, 16 * s, -128 * s), (lo, s, torch.zeros_like(s))]
    raise ValueError(f"{qtype.name} cannot stay quantized")


def packed_linear(raws: list[Tensor], qtype: T, shapes: list[tuple[int, int]], dtype: torch.dtype) -> Linear:
    """One Linear for several same-typed GGUF tensors stacked along the output dim (fused q/k/v, gate/up).

    Unpacked and packed SLICE rows at a time: the loader's scratch is a slice's codes, not the tensor's.
    """
    k = shapes[0][1]
    if any(s[1] != k for s in shapes):
        raise ValueError(f"cannot stack tensors of different row lengths {[s[1] for s in shapes]}")
    n = sum(s[0] for s in shapes)
    blocks = [r.view(s[0], -1) for r, s in zip(raws, shapes, strict=True)]  # one row of GGUF blocks per row
    parts: list[Int4Weight] = []
    for start in range(0, n, SLICE):
        stop = min(start + SLICE, n)
        pieces, first = [], 0  # this slice's rows of each stacked tensor
        for b in blocks:
            lo, hi = max(start, first) - first, min(stop, first + b.shape[0]) - first
            if lo < hi:
                pieces.append(_int4_codes(b[lo:hi].reshape(-1), qtype, (hi - lo, k)))
            first += b.shape[0]
        if not parts:
            parts = [Int4Weight.empty(n, k, dtype, raws[0].device) for _ in pieces[0]]
        for i, part in enumerate(parts):
            q, scale, mn = (
                pieces[0][i][j] if len(pieces) == 1 else torch.cat([p[i][j] for p in pieces]) for j in range(3)
            )
            part.fill(start, q, scale, mn)
    return Linear(parts)


def can_rebuild_rows(lin: Linear) -> bool:
    """Whether raw_rows can read this Linear's rows back (packed on the CPU in a layout it knows, no bias)."""
    return lin.parts is not None and lin.bias is None and all(p.readable for p in lin.parts)


def raw_rows(lin: Linear, qtype: T, headers: Tensor, rows: Tensor) -> Tensor:
    """The GGUF bytes of rows `rows` of the tensor packed in `lin`, from its codes and the kept headers.

    The inverse of _int4_codes: Q8_0 bytes are (hi - 8) * 16 + lo; 4-bit codes go back in pairs, element j
    with j + 16 of a 32-block for Q4_0/Q4_1, sub-block 2i with 2i + 1 of a 256-block for Q4_K.
    """
    m, n_blocks = rows.shape[0], headers.shape[1]
    parts = [p.codes_of(rows) for p in lin.parts]
    if qtype == T.Q8_0:
        hi, lo = parts
        codes = ((hi << 4 | lo) ^ 0x80).view(m, n_blocks, 32)
    elif qtype == T.Q4_K:
        c = parts[0].view(m, n_blocks, 4, 2, 32)
        codes = (c[..., 0, :] | c[..., 1, :] << 4).view(m, n_blocks, 128)
    elif qtype in (T.Q4_0, T.Q4_1):
        c = parts[0].view(m, n_blocks, 2, 16)
        codes = c[..., 0, :] | c[..., 1, :] << 4
    else:
        raise ValueError(f"{qtype.name} rows are not rebuilt from int4 codes")
    return torch.cat((headers[rows], codes), dim=-1).view(m, -1)
