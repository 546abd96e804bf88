"""Our CPU attention kernel (tandem/engine/cpu_attention.cpp) against a float64 masked softmax."""

from __future__ import annotations

import math

import pytest
import torch

from tandem.engine import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="our CPU kernels need AVX512-BF16 and a compiler")


def reference(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, pos: int) -> torch.Tensor:
    """Causal grouped-query attention in float64 over the live rows only."""
    k_new, nh, hd = q.shape
    nkv, end = keys_t.shape[0], pos + k_new
    heads = torch.arange(nh) // (nh // nkv)
    k = keys_t[heads, :, :end].double()  # [nh, hd, end]
    v = values[heads, :end].double()
    scores = torch.einsum("thd,hdn->htn", q.double(), k) / math.sqrt(hd)
    mask = torch.arange(end)[None, :] <= (pos + torch.arange(k_new))[:, None]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("htn,hnd->thd", probs, v)


def cache(
    nkv: int, hd: int, max_len: int, live: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (transposed) and values with `live` rows of data and NaN past them: a row read by mistake shows."""
    g = torch.Generator().manual_seed(seed)
    keys_t = torch.full((nkv, hd, max_len), float("nan"), dtype=dtype)
    values = torch.full((nkv, max_len, hd), float("nan"), dtype=dtype)
    keys_t[:, :, :live] = torch.randn(nkv, hd, live, generator=g).to(dtype)
    values[:, :live] = torch.randn(nkv, live, hd, generator=g).to(dtype)
    return keys_t, values


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("nh,nkv", [(9, 3), (4, 2), (8, 8)])
@pytest.mark.parametrize("hd", [32, 64, 128])
@pytest.mark.parametrize("k_new", [1, 2, 5, 9, 17])
@pytest.mark.parametrize("pos", [0, 1, 63, 511])
def test_matches_float64_reference(nh: int, nkv: int, hd: int, k_new: int, pos: int) -> None:
    """bfloat16 within its own rounding of the output; float32 to float32 accuracy."""
    keys_t, values = cache(nkv, hd, pos + k_new + 40, pos + k_new, torch.bfloat16, seed=pos * 100 + k_new)
    q = torch.randn(k_new, nh, hd, generator=torch.Generator().manual_seed(hd)).bfloat16()
    out = cpu_kernels.attention(q, keys_t, values, pos)
    assert out.dtype == torch.bfloat16 and out.shape == (k_new, nh, hd) and out.is_contiguous()
    assert rel_err(out, reference(q, keys_t, values, pos)) <= 4e-3
    q32, k32, v32 = q.float(), keys_t.float(), values.float()
    out32 = cpu_kernels.attention(q32, k32, v32, pos)
    assert out32.dtype == torch.float32
    assert rel_err(out32, reference(q32, k32, v32, pos)) <= 1e-5


@pytest.mark.parametrize("hd", [96, 256])
def test_other_head_dims(hd: int) -> None:
    keys_t, values = cache(2, hd, 300, 290, torch.bfloat16, seed=hd)
    q = torch.randn(7, 4, hd).bfloat16()
    assert rel_err(cpu_kernels.attention(q, keys_t, values, 283), reference(q, keys_t, values, 283)) <= 4e-3


def test_engine_layout() -> None:
    """The engine's q is a view into the fused q/k projection (rows strided), the cache a whole layer's; a long
    block (a prompt) takes the same path."""
    nh, nkv, hd, pos, k_new = 9, 3, 64, 100, 300
    keys_t, values = cache(nkv, hd, 576, pos + k_new, torch.bfloat16, seed=7)
    qk = torch.randn(k_new, nh + nkv, hd).bfloat16()
    q = qk[:, :nh]
    assert not q.is_contiguous()
    out = cpu_kernels.attention(q, keys_t, values, pos)
    assert torch.equal(out, cpu_kernels.attention(q.contiguous(), keys_t, values, pos))
    assert rel_err(out, reference(q, keys_t, values, pos)) <= 4e-3
    # A transposed head dim of q is taken too (copied).
    qt = q.contiguous().transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(cpu_kernels.attention(qt, keys_t, values, pos), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_are_bit_identical_whatever_the_block(dtype: torch.dtype) -> None:
    """A decode step at position p gives the bits of the row at p of a verify block, whatever the block's size,
    its place in the block, or the number of threads."""
    pos, k_new = 500, 20
    keys_t, values = cache(3, 64, 576, pos + k_new, dtype, seed=8)
    q = torch.randn(k_new, 9, 64).to(dtype)
    full = cpu_kernels.attention(q, keys_t, values, pos)
    for k in (1, 2, 3, 5, 9, 13):
        for i in range(0, k_new - k + 1):
            assert torch.equal(cpu_kernels.attention(q[i : i + k], keys_t, values, pos + i), full[i : i + k])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(cpu_kernels.attention(q, keys_t, values, pos), full)
            assert torch.equal(cpu_kernels.attention(q[4:13], keys_t, values, pos + 4), full[4:13])
    finally:
        torch.set_num_threads(before)


def test_bad_calls_are_clear_errors() -> None:
    keys_t, values = cache(3, 64, 64, 64, torch.bfloat16, seed=9)
    q = torch.randn(2, 9, 64).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        cpu_kernels.attention(q.half(), keys_t.half(), values.half(), 0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_kernels.attention(q.float(), keys_t, values, 0)
    with pytest.raises(RuntimeError, match="do not fit"):
        cpu_kernels.attention(q, keys_t, values, 63)
    with pytest.raises(RuntimeError, match="do not fit"):
        cpu_kernels.attention(q, keys_t, values, -1)
    with pytest.raises(RuntimeError, match="evenly"):
        cpu_kernels.attention(torch.randn(2, 8, 64).bfloat16(), keys_t, values, 0)
    with pytest.raises(RuntimeError, match="head_dim"):
        cpu_kernels.attention(torch.randn(2, 9, 48).bfloat16(), keys_t[:, :48], values[..., :48], 0)
    with pytest.raises(RuntimeError, match="do not match"):
        cpu_kernels.attention(q, keys_t, values[:, :, :32], 0)
    with pytest.raises(RuntimeError, match=r"\[k_new, heads, head_dim\]"):
        cpu_kernels.attention(q[0], keys_t, values, 0)


def test_compiles_inside_a_graph() -> None:
    """torch.compile sees the op through its registered shape function, with dynamic row counts and positions."""
    keys_t, values = cache(3, 64, 128, 100, torch.bfloat16, seed=10)

    def step(q: torch.Tensor, pos: int) -> torch.Tensor:
        return cpu_kernels.attention(q * 2, keys_t, values, pos).reshape(q.shape[0], -1) + 1

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    f = torch.compile(step, dynamic=True, fullgraph=True, backend=counter)
    for k_new, pos in ((1, 50), (3, 60), (3, 61), (3, 62), (9, 91)):
        q = torch.randn(k_new, 9, 64).bfloat16()
        assert torch.equal(f(q, pos), step(q, pos))
    # Positions are symbolic (SymInt in the op's schema): declared int, every new one recompiled.
    assert counter.frame_count <= 2, counter.frame_count
