"""Grouped-query attention of a decode or verify block over the KV cache, in two Triton kernels, for CUDA.

model.attention's matmuls cost three kernels a layer on a GPU (q.k, the masked softmax, p.v), about 9 us
together in SmolLM2's compiled decode step on an H100, where the whole step is bound by kernel launches.
Flash-decoding instead: the first kernel cuts the cache into chunks and attends each one in parallel with
an online softmax (Milakov & Gimelshein 2018, as in FlashAttention), reading only the rows the block sees;
the second merges the chunks. A decode step's query rows find a chunk in 2 steps where one program walking
the whole cache takes 8 or more, and such a walk ran at 11.5-14 us a call against 6-7.5 us for the pair.

Every query row is computed by the same instructions whatever the block size, and masked columns add exact
zeros, so a decode step and a verify block give the same bits for the same position.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: model.attention serves
    triton = None

MAX_TOKENS = 32  # blocks up to this size (decode and verify) use the kernel; prompts, model.attention's matmuls
BLOCK_M = 16  # query rows a program takes (tl.dot's least); fixed, so that every block size computes alike
BLOCK_N = 64  # cache rows a step
MAX_SPLITS = 64  # the cache is cut into at most this many chunks (a power of two rows each), attended in parallel


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit(do_not_specialize=["k_new"])  # one build for every block size (k_new == 1 would be another)
    def _split_kernel(
        q, keys_t, values, part_m, part_l, part_acc, positions,
        k_new, group, scale,
        sq_t, sq_h, sk_h, sk_d, sv_h, sv_n,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        kv = tl.program_id(0)
        split = tl.program_id(2)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < group * k_new
        tok = rows % k_new
        head = kv * group + rows // k_new
        last = tl.load(positions + tok, live, -1)
        lo = split * CHUNK
        end = tl.minimum(tl.max(last, 0) + 1, lo + CHUNK)
        if lo < end:
            k_base, v_base = keys_t + kv * sk_h, values + kv * sv_h
            d = tl.arange(0, BLOCK_D)
            dmask = d < HEAD_DIM
            qt = tl.load(
                q + tok[:, None] * sq_t + head[:, None] * sq_h + d[None, :], live[:, None] & dmask[None, :], 0.0
            )
            m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            den = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
            for start in range(lo, end, BLOCK_N):
                n = start + tl.arange(0, BLOCK_N)
                kt = tl.load(k_base + d[:, None] * sk_d + n[None, :], dmask[:, None] & (n[None, :] < end), 0.0)
                if IEEE:
                    s = tl.dot(qt, kt, input_precision="ieee")
                else:
                    s = tl.dot(qt, kt)
                s = tl.where(n[None, :] <= last[:, None], s * scale, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing of this chunk
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m - m_safe)
                den = den * alpha + tl.sum(p, 1)
                v = tl.load(v_base + n[:, None] * sv_n + d[None, :], (n[:, None] < end) & dmask[None, :], 0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
            # Partials by (token, head, split): the combine reads a row's splits side by side.
            idx = (tok * (group * tl.num_programs(0)) + head) * SPLITS + split
            tl.store(part_m + idx, m, live)
            tl.store(part_l + idx, den, live)
            tl.store(part_acc + idx[:, None] * BLOCK_D + d[None, :], acc, live[:, None])

    @triton.jit
    def _combine_kernel(
        part_m, part_l, part_acc, out, positions, heads, so_t, so_h,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)  # token * heads + head
        tok = row // heads
        used = tl.load(positions + tok) // CHUNK + 1
        sp = tl.arange(0, SPLITS)
        ok = sp < used
        m = tl.load(part_m + row * SPLITS + sp, ok, float("-inf"))
        w = tl.exp(m - tl.max(m, 0))
        den = tl.sum(w * tl.load(part_l + row * SPLITS + sp, ok, 0.0), 0)
        d = tl.arange(0, BLOCK_D)
        acc = tl.load(part_acc + (row * SPLITS + sp)[:, None] * BLOCK_D + d[None, :], ok[:, None], 0.0)
        res = tl.sum(w[:, None] * acc, 0) / den
        tl.store(out + tok * so_t + (row % heads) * so_h + d, res, d < HEAD_DIM)


@torch.library.custom_op("tandem::gqa_attention", mutates_args=())
def gqa_attention(q: Tensor, keys_t: Tensor, values: Tensor, positions: Tensor) -> Tensor:
    """q [k, heads, hd] at cache positions `positions` [k] (ascending), over the whole cache: keys transposed
    [kv_heads, hd, len] and values [kv_heads, len, hd], already holding the k new rows. Query i sees rows
    0..positions[i]. Returns [k, heads, hd] in q's dtype."""
    k_new, nh, hd = q.shape
    nkv, _, length = keys_t.shape
    group = nh // nkv
    # Chunks are cut from the cache's full length, not the live one: a CUDA graph replays at any length.
    chunk = max(2 * BLOCK_N, triton.next_power_of_2(triton.cdiv(length, MAX_SPLITS)))
    splits = triton.next_power_of_2(triton.cdiv(length, chunk))
    block_d = triton.next_power_of_2(hd)
    part_m = torch.empty(k_new * nh * splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(k_new * nh * splits, block_d, dtype=torch.float32, device=q.device)
    out = torch.empty(k_new, nh, hd, dtype=q.dtype, device=q.device)
    with torch.cuda.device(q.device):
        _split_kernel[(nkv, triton.cdiv(group * k_new, BLOCK_M), splits)](
            q, keys_t, values, part_m, part_l, part_acc, positions,
            k_new, group, 1.0 / math.sqrt(hd),
            q.stride(0), q.stride(1), keys_t.stride(0), keys_t.stride(1), values.stride(0), values.stride(1),
            HEAD_DIM=hd, BLOCK_D=block_d, IEEE=q.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            CHUNK=chunk, SPLITS=splits, num_warps=4, num_stages=2,
        )  # fmt: skip
        _combine_kernel[(k_new * nh,)](
            part_m, part_l, part_acc, out, positions, nh, out.stride(0), out.stride(1),
            HEAD_DIM=hd, BLOCK_D=block_d, CHUNK=chunk, SPLITS=splits, num_warps=4,
        )  # fmt: skip
    return out


@gqa_attention.register_fake
def _(q: Tensor, keys_t: Tensor, values: Tensor, positions: Tensor) -> Tensor:
    return q.new_empty(q.shape)
