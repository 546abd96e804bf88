"""Memory a loaded engine holds: a tied embedding is held once, by the packed head, and read back exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from tandem.engine import cpu_kernels
from tandem.engine.gguf_file import read_gguf
from tandem.engine.qlinear import SLICE, Int4Weight, cpu_layout, packed_linear
from tandem.engine.quants import dequantize
from tandem.engine.runtime import load_engine
from tools.write_gguf import random_model, write_gguf

RESIDENT = """
import ctypes, gc, json, sys
from tandem.engine.runtime import load_engine

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = anon()
engine = load_engine(sys.argv[1], device="cpu", dtype=sys.argv[2], weights="quantized")
print(json.dumps({"grown": anon() - base}))
"""

TIED = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)
PROMPT = [1, 17, 300, 42, 511, 3, 99, 250, 8, 64]


def table(path: Path, dtype: torch.dtype) -> torch.Tensor:
    """token_embd dequantized whole, straight from the file."""
    gf = read_gguf(path)
    t = gf.tensors["token_embd.weight"]
    return dequantize(gf.raw(t.name), t.ggml_type, t.shape, dtype=dtype)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and glibc's malloc_trim")
def test_smollm2_quantized_load_keeps_under_one_and_a_half_file_sizes(smollm2: Path) -> None:
    """Anonymous memory a bfloat16 int4 load keeps (weights, tokenizer): the Q8_0 tied table once, not twice."""
    out = subprocess.run(
        [sys.executable, "-c", RESIDENT, str(smollm2), "bfloat16"], capture_output=True, text=True, check=True
    )
    grown = json.loads(out.stdout.strip().splitlines()[-1])["grown"]
    assert grown <= 1.5 * smollm2.stat().st_size, f"{grown / smollm2.stat().st_size:.2f}x the file"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_smollm2_embedding_reads_the_heads_rows_exactly(smollm2: Path, dtype: str) -> None:
    engine = load_engine(smollm2, device="cpu", dtype=dtype, weights="quantized")
    embed = engine.model.embed
    if not cpu_kernels.available() and cpu_layout() is None:
        pytest.skip("this torch's CPU int4 packing is not one whose rows read back: the file's rows are kept")
    assert embed.head is engine.model.output and embed.weight is None
    ref = table(smollm2, getattr(torch, dtype))
    assert embed.rows.numel() * 8 < ref.numel(), "only the block headers (2 bytes of 34) are kept beside the head"
    for ids in torch.arange(ref.shape[0]).split(8192):
        assert torch.equal(embed(ids), ref[ids])
    ids = torch.tensor([7, 0, ref.shape[0] - 1, 7])  # repeats, the first and the last rows
    assert torch.equal(embed(ids), ref[ids])


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0", "q4_k"])
def test_tied_embedding_of_each_packed_type(qtype: str, tiny_tokenizer: Path, tmp_path: Path) -> None:
    """Rows rebuilt from the head's codes equal the file's rows, and the forward matches the dequantized one."""
    model = random_model(TIED, seed=3, meta=qtype == "q4_k")  # gguf-py cannot quantize to Q4_K: random blocks
    path = write_gguf(model, tmp_path / "m.gguf", dtype=qtype, tokenizer_from=tiny_tokenizer)
    eng = load_engine(path, device="cpu", dtype="float32", weights="quantized")
    assert not eng.dequantized_tensors
    if cpu_kernels.available() or cpu_layout() is not None:
        assert eng.model.embed.head is eng.model.output
    ids = torch.arange(TIED["vocab_size"])
    assert torch.equal(eng.model.embed(ids), table(path, torch.float32))
    ref = load_engine(path, device="cpu", dtype="float32", weights="dequantized").new_sequence(32).forward(PROMPT)
    got = eng.new_sequence(32).forward(PROMPT)
    assert float((got - ref).norm() / ref.norm()) <= 1e-4


@pytest.mark.parametrize("ours", [True, False], ids=["cpu_kernels", "torch"])
@pytest.mark.parametrize("n", [16, 48, 64 + 16, 200, SLICE + 128 + 3, 2 * SLICE + 7])
def test_int4_rows_read_back(n: int, ours: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row of a packing (full blocks, a short last block, padding, several slices) reads back."""
    if ours and not cpu_kernels.available():
        pytest.skip("our int4 kernel does not run on this CPU")
    if not ours:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
        if cpu_layout() is None:
            pytest.skip("this torch's CPU int4 packing is not one whose rows read back")
    k = 96
    g = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // 32, generator=g)
    w = Int4Weight(q, scale, torch.zeros_like(scale), torch.float32)
    assert w.ours == ours and w.readable
    assert torch.equal(w.codes_of(torch.arange(n)), q)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0])
def test_sliced_packing_of_stacked_tensors_matches_dense(qtype: T) -> None:
    """Tensors stacked across slice boundaries (as fused q/k/v are) pack to the same matrix as dequantized."""
    rng = np.random.default_rng(0)
    shapes = [(SLICE - 300, 64), (700, 64), (45, 64)]
    raws = [gguf.quants.quantize(rng.standard_normal(s, dtype=np.float32), qtype) for s in shapes]
    lin = packed_linear([torch.from_numpy(r.reshape(-1)) for r in raws], qtype, shapes, torch.float32)
    dense = torch.cat([dequantize(r, qtype, s) for r, s in zip(raws, shapes, strict=True)])
    x = torch.from_numpy(rng.standard_normal((3, 64), dtype=np.float32))
    ref = x @ dense.T
    assert float((lin(x) - ref).norm() / ref.norm()) <= 1e-5
