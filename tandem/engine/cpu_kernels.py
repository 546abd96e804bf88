"""Our CPU kernels for x86 with AVX512-BF16, built on first use with the machine's C++ compiler: the int4 matmul
(cpu_int4.cpp) and decode/verify attention (cpu_attention.cpp).

torch's CPU int4 kernel converts codes to float32 and re-converts them for every 4 rows of activations:
on SmolLM2's gate/up projection it took 52 us for one row and 230 us for nine. Ours looks codes up as
bfloat16 once per load and multiplies pairs with vdpbf16ps, exact products summed in float32: 20 us and
100 us. Attention of a decode step or a verify block over a bfloat16 cache, SmolLM2's shapes at 512 cached
tokens on one core: 7 us a layer for one row and 44 for nine, against 73 and 155 for model.attention's
matmuls and masked softmax; with the cache cold, as it is a step later, 22 and 60 us against 110 and 190.

Where the CPU lacks the instructions or the build fails, `available()` is False: weights keep torch's
packing and attention its matmuls.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("tandem.engine")

GROUP = 32
ROWS = 16  # output rows per block of codes
BLOCK_CHOICES = (1, 2, 4)  # blocks of output rows per tile of the int4 matmul, at most (fewer with many rows)
BLOCKS = 4  # this machine's, once tune() has run
SOURCE = Path(__file__).with_name("cpu_int4.cpp")
ATTENTION_SOURCE = Path(__file__).with_name("cpu_attention.cpp")
FLAGS = ["-O3", "-march=x86-64-v4", "-mavx512bf16", "-fopenmp"]  # OpenMP: at::parallel_for runs on torch's threads
STALE_LOCK_S = 180.0  # a build takes 10-20 s: a lock this old was left by one that was killed


def wait_for_build_lock(build_dir: Path, stale_s: float = STALE_LOCK_S, poll_s: float = 0.5) -> None:
    """Wait while another process builds the kernels, and remove a lock older than stale_s. torch waits on its
    lock file without end, and a node killed during its first start (a build) leaves one behind: every later
    start hung without a word."""
    lock, warned = build_dir / "lock", False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_s:
            log.warning("removing %s, left %.0f s ago by a build of our CPU kernels that did not finish", lock, age)
            lock.unlink(missing_ok=True)
            return
        if not warned:
            log.warning("waiting up to %.0f s for another build of our CPU kernels to release %s", stale_s - age, lock)
            warned = True
        time.sleep(poll_s)


@functools.cache
def available() -> bool:
    """Whether the kernels run here; builds them the first time (10-20 s, then cached by torch)."""
    if not (hasattr(torch.cpu, "_is_avx512_bf16_supported") and torch.cpu._is_avx512_bf16_supported()):
        return False
    from torch.utils.cpp_extension import get_default_build_root, load

    try:
        build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "tandem_cpu"
        build_dir.mkdir(parents=True, exist_ok=True)
        wait_for_build_lock(build_dir)
        load(
            name="tandem_cpu",
            sources=[str(SOURCE), str(ATTENTION_SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
        )
    except Exception as exc:  # no compiler, no ninja, an unwritable cache: torch's kernel still works
        log.warning("our CPU kernels are unavailable (%s: %s); using torch's", type(exc).__name__, exc)
        return False

    @torch.library.register_fake("tandem_cpu::int4_mm")
    def _(x: Tensor, codes: Tensor, scales_mins: Tensor, n: int, blocks: int) -> Tensor:
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("tandem_cpu::gqa_attention")
    def _(q: Tensor, keys_t: Tensor, values: Tensor, pos: int) -> Tensor:
        return q.new_empty(q.shape)

    return True


def pack(q: Tensor, scale: Tensor, mn: Tensor) -> tuple[Tensor, Tensor] | None:
    """Codes uint8 [N, K] in 0..15 with W = q * scale + mn per 32 columns -> (codes [N/16, K/32, 8, 32],
    scales and mins float16 [N/16, K/32, 2, 16]), N a multiple of 16; None where a scale leaves float16's
    range. Byte 2i + t of load l holds row i's columns 4l + t (low nibble) and 4l + 2 + t (high)."""
    n, k = q.shape
    if n % ROWS or k % GROUP:
        raise ValueError(f"int4 codes of {n} x {k}: need rows a multiple of {ROWS} and columns of {GROUP}")
    blocks, groups = n // ROWS, k // GROUP
    sm = torch.stack((scale, mn)).view(2, blocks, ROWS, groups).permute(1, 3, 0, 2).to(torch.float16)
    if not torch.isfinite(sm).all():
        return None
    x = q.view(blocks, ROWS, groups, 8, 2, 2).permute(0, 2, 3, 1, 5, 4)  # block, group, load, row, t, nibble
    codes = (x[..., 0] | x[..., 1] << 4).reshape(blocks, groups, 8, 32)
    return codes.contiguous(), sm.contiguous()


def gather_codes(codes: Tensor, rows: Tensor) -> Tensor:
    """The codes of output rows `rows` of a packed matrix: uint8 [len(rows), K] (inverse of pack)."""
    groups = codes.shape[1]
    col = torch.arange(groups * GROUP, device=rows.device)
    g, c = col // GROUP, col % GROUP
    offset = ((g * 8 + c // 4) * 32 + c % 2)[None, :] + ((rows // ROWS) * (groups * 256) + 2 * (rows % ROWS))[:, None]
    shift = (4 * ((c % 4) // 2)).to(torch.uint8)
    return (codes.view(-1)[offset] >> shift) & 15


def matmul(x: Tensor, codes: Tensor, scales_mins: Tensor, n: int) -> Tensor:
    """x [M, K] bfloat16 or float32 -> [M, n] in x's dtype."""
    return torch.ops.tandem_cpu.int4_mm(x, codes, scales_mins, n, BLOCKS)


def tune(forward: Callable[[], object], rounds: int = 5) -> dict[int, float]:
    """Keep the tiling under which `forward` (a model's decode step) runs fastest; returns the median seconds
    of each. Tiles of several blocks of output rows give few rows of activations independent accumulators,
    one block keeps one stream of codes per thread, and which wins depends on the machine: on a 2-core AMD
    EPYC, SmolLM2's decode step on one thread took 10.3 ms with one block and 14.8 with up to four (the
    fixed choice before); on an Intel Xeon's 8 threads all three took 15.3-15.4 ms. The candidates take
    turns, so a drift in the machine's speed lands on all of them. Results do not depend on the choice:
    every row is summed in the same order whatever its tile."""
    global BLOCKS
    times: dict[int, list[float]] = {b: [] for b in BLOCK_CHOICES}
    for i in range(rounds + 1):
        for b in BLOCK_CHOICES:
            BLOCKS = b
            t0 = time.perf_counter()
            forward()
            if i:  # the first round warms up
                times[b].append(time.perf_counter() - t0)
    medians = {b: statistics.median(t) for b, t in times.items()}
    BLOCKS = min(medians, key=medians.__getitem__)
    return medians


def attention(q: Tensor, keys_t: Tensor, values: Tensor, pos: int) -> Tensor:
    """Causal grouped-query attention of k new queries q [k, heads, hd] at positions pos.. over a layer's whole
    cache: keys transposed [kv_heads, hd, len] and values [kv_heads, len, hd], the new rows already written.
    Row i sees cache rows 0..pos + i; rows from pos + k on are never read. -> [k, heads, hd] in q's dtype
    (bfloat16 or float32, the cache's too; hd a multiple of 32 up to 256)."""
    return torch.ops.tandem_cpu.gqa_attention(q, keys_t, values, pos)
