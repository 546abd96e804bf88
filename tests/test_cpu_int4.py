"""Our int4 CPU kernel (tandem/engine/cpu_int4.cpp) against dequantize-then-matmul, and its packing."""

from __future__ import annotations

import pytest
import torch

from tandem.engine import cpu_kernels
from tandem.engine.qlinear import Int4Weight

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="our int4 kernel needs AVX512-BF16 and a compiler")


def weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, float16-exact scales and mins, and the dense matrix they stand for (float64)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // 32, generator=g) * 0.05).half().float()
    mn = (-torch.rand(n, k // 32, generator=g) * 0.4).half().float()
    dense = (q.double().view(n, -1, 32) * scale.double()[..., None] + mn.double()[..., None]).view(n, k)
    return q, scale, mn, dense


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("n,k", [(1, 32), (15, 64), (17, 96), (100, 576), (1000, 160), (3072, 576)])
@pytest.mark.parametrize("m", [1, 2, 5, 9, 13, 40])
def test_matches_dequantize_then_matmul(n: int, k: int, m: int) -> None:
    """Float32 activations within 1e-4 (they run as two bfloat16 halves); bfloat16 ones within their own
    rounding of the output. Shapes include rows that are not a multiple of the 16-row block (padded)."""
    q, scale, mn, dense = weights(n, k, seed=n * 1000 + k)
    w = Int4Weight(q, scale, mn, torch.float32)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    assert w.ours
    assert rel_err(w(x), x.double() @ dense.T) <= 1e-4
    wb = Int4Weight(q, scale, mn, torch.bfloat16)
    xb = x.bfloat16()
    yb = wb(xb)
    assert yb.dtype == torch.bfloat16 and yb.shape == (m, n)
    assert rel_err(yb, xb.double() @ dense.T) <= 4e-3


def test_rows_are_bit_identical_whatever_the_block() -> None:
    """A row's result does not depend on the rows beside it (decode step == that row of a verify block)."""
    q, scale, mn, _ = weights(3072, 576, seed=1)
    w = Int4Weight(q, scale, mn, torch.bfloat16)
    x = torch.randn(20, 576).bfloat16()
    full = w(x)
    for m in (1, 2, 3, 5, 9, 11):
        assert torch.equal(w(x[:m]), full[:m])
    for i in range(20):
        assert torch.equal(w(x[i : i + 1]), full[i : i + 1])


def test_every_tiling_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    q, scale, mn, _ = weights(3072, 576, seed=3)
    w = Int4Weight(q, scale, mn, torch.bfloat16)
    x = torch.randn(11, 576).bfloat16()
    monkeypatch.setattr(cpu_kernels, "BLOCKS", 1)
    one = [w(x[:m]) for m in range(1, 12)]
    for blocks in cpu_kernels.BLOCK_CHOICES:
        monkeypatch.setattr(cpu_kernels, "BLOCKS", blocks)
        for m in range(1, 12):
            assert torch.equal(w(x[:m]), one[m - 1]), (blocks, m)
    with pytest.raises(RuntimeError, match="blocks must be 1, 2 or 4"):
        torch.ops.tandem_cpu.int4_mm(x, w.packed, w.scales, 3072, 3)


def test_tune_keeps_the_fastest_tiling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "BLOCKS", 4)
    q, scale, mn, _ = weights(3072, 576, seed=4)
    w = Int4Weight(q, scale, mn, torch.bfloat16)
    x = torch.randn(1, 576).bfloat16()

    def step() -> None:  # as if tiles of 2 blocks were 20x faster here
        for _ in range(1 if cpu_kernels.BLOCKS == 2 else 20):
            w(x)

    medians = cpu_kernels.tune(step, rounds=3)
    assert set(medians) == set(cpu_kernels.BLOCK_CHOICES) and cpu_kernels.BLOCKS == 2


def test_threads_give_the_same_bits() -> None:
    q, scale, mn, _ = weights(1000, 576, seed=2)
    w = Int4Weight(q, scale, mn, torch.bfloat16)
    x = torch.randn(9, 576).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = w(x)
        torch.set_num_threads(2)
        assert torch.equal(w(x), one)
    finally:
        torch.set_num_threads(before)


def test_agrees_with_torchs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    q, scale, mn, dense = weights(200, 96, seed=3)
    ours = Int4Weight(q, scale, mn, torch.float32)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    theirs = Int4Weight(q, scale, mn, torch.float32)
    assert ours.ours and not theirs.ours
    x = torch.randn(4, 96)
    assert rel_err(ours(x), x.double() @ dense.T) <= 1e-4
    assert rel_err(theirs(x), x.double() @ dense.T) <= 1e-4


def test_a_scale_beyond_float16_moves_the_matrix_to_torchs_packing() -> None:
    """Scales are kept as float16; one that does not fit sends the whole matrix, slices filled before it
    included, to torch's kernel rather than lose it."""
    n, k = 2 * 1024 + 40, 64
    q, scale, mn, _ = weights(n, k, seed=4)
    scale[1500, 1] = 1e6
    dense = (q.double().view(n, -1, 32) * scale.double()[..., None] + mn.double()[..., None]).view(n, k)
    w = Int4Weight.empty(n, k, torch.float32, torch.device("cpu"))
    for start in range(0, n, 1024):
        w.fill(start, q[start : start + 1024], scale[start : start + 1024], mn[start : start + 1024])
    assert not w.ours
    x = torch.randn(3, k)
    assert rel_err(w(x), x.double() @ dense.T) <= 1e-4


def test_bad_calls_are_clear_errors() -> None:
    q, scale, mn, _ = weights(32, 64, seed=5)
    codes, sm = cpu_kernels.pack(q, scale, mn)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        cpu_kernels.matmul(torch.randn(1, 64).half(), codes, sm, 32)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_kernels.matmul(torch.randn(1, 96), codes, sm, 32)
    with pytest.raises(RuntimeError, match="output rows"):
        cpu_kernels.matmul(torch.randn(1, 64), codes, sm, 33)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_kernels.pack(q[:20], scale[:20], mn[:20])
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Weight(torch.zeros(16, 40, dtype=torch.uint8), torch.ones(16, 1), torch.zeros(16, 1), torch.float32)


def test_compiles_inside_a_graph() -> None:
    """torch.compile sees the op through its registered shape function, with dynamic row counts."""
    q, scale, mn, _ = weights(64, 96, seed=6)
    w = Int4Weight(q, scale, mn, torch.bfloat16)
    f = torch.compile(lambda x: torch.relu(w(x)) * 2, dynamic=True, fullgraph=True)
    for m in (1, 3, 9):
        x = torch.randn(m, 96).bfloat16()
        assert torch.equal(f(x), torch.relu(w(x)) * 2)
