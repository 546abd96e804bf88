"""Engine numerics against HF transformers on identical weights (float32, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tandem.engine import cuda_attention
from tandem.engine.model import apply_rope, attention
from tandem.engine.runtime import load_engine
from tools.write_gguf import random_model, write_gguf

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
CASES: dict[str, dict[str, Any]] = {
    "llama_gqa_untied": dict(
        BASE, model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
    ),
    "llama_tied_rope_linear": dict(
        BASE,
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "llama_yarn": dict(
        BASE,
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        },
    ),
    "llama3_rope_freqs": dict(
        BASE,
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
    ),
    "qwen2_bias_tied": dict(
        BASE, model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "qwen3_head_dim": dict(
        BASE, model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False
    ),
}
DEVICE = os.environ.get("TANDEM_TEST_DEVICE", "cpu")  # run the suite on cuda with TANDEM_TEST_DEVICE=cuda
PROMPT = [1, 17, 300, 42, 511, 3, 99, 250, 8, 64, 128, 7, 200, 201, 13, 77, 31, 400, 5, 6]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory):
    case = request.param
    model = random_model(CASES[case], seed=11).eval()
    path = write_gguf(model, tmp_path_factory.mktemp(case) / "m.gguf", tokenizer_from=tiny_tokenizer)
    return case, model, load_engine(path, device=DEVICE, dtype="float32", weights="dequantized")


def test_prefill_decode_block_and_rollback_match_transformers(pair) -> None:
    case, model, engine = pair
    full = PROMPT + [9, 10, 11, 12, 13, 14]
    ref = hf_logits(model, full)
    assert ref.std() > 0.05, "random weights that move the logits"
    seq = engine.new_sequence(128)
    n = len(PROMPT)
    got = seq.forward(PROMPT)
    assert rel_err(got, ref[:n]) <= 1e-4, f"{case}: prefill"
    got = seq.forward([9])
    assert rel_err(got, ref[n : n + 1]) <= 1e-4, f"{case}: one-token decode"
    got = seq.forward([10, 11, 12, 13, 14])
    assert rel_err(got, ref[n + 1 :]) <= 1e-4, f"{case}: k-token forward"
    # Roll back into the middle of the block, append different tokens: equals a fresh run of them.
    seq.truncate(n + 2)
    alt = [99, 98, 97]
    got = seq.forward(alt)
    fresh = engine.new_sequence(128).forward(full[: n + 2] + alt)[-3:]
    assert rel_err(got, fresh) <= 1e-5, f"{case}: after truncate"
    assert rel_err(got, hf_logits(model, full[: n + 2] + alt)[-3:]) <= 1e-4


def test_sequences_are_independent(pair) -> None:
    _, _, engine = pair
    a, b = engine.new_sequence(64), engine.new_sequence(64)
    la = a.forward(PROMPT[:8])
    b.forward(PROMPT[8:16])
    assert rel_err(a.forward([5]), engine.new_sequence(64).forward(PROMPT[:8] + [5])[-1:]) <= 1e-5
    assert la.shape == (8, 512)


def test_bad_calls_are_refused(pair) -> None:
    _, _, engine = pair
    seq = engine.new_sequence(16)
    with pytest.raises(ValueError, match="out of range"):
        seq.forward([512])
    with pytest.raises(ValueError, match="context full"):
        seq.forward(list(range(17)))
    seq.forward([1, 2])
    with pytest.raises(ValueError, match="truncate"):
        seq.truncate(3)
    assert len(seq) == 2


def test_unsupported_architecture_is_refused(tiny_tokenizer: Path, tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported architecture 'mamba'"):
        load_engine(path)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_quantized_weights_match_dequantized(qtype: str, tiny_tokenizer: Path, tmp_path: Path) -> None:
    cfg = dict(CASES["llama_gqa_untied"], hidden_size=128, intermediate_size=256)
    path = write_gguf(random_model(cfg, seed=5), tmp_path / "m.gguf", dtype=qtype, tokenizer_from=tiny_tokenizer)
    ref = load_engine(path, device=DEVICE, dtype="float32", weights="dequantized").new_sequence(64).forward(PROMPT)
    eng = load_engine(path, device=DEVICE, dtype="float32", weights="quantized")
    assert not eng.dequantized_tensors
    got = eng.new_sequence(64).forward(PROMPT)
    # float32 activations on CPU; CUDA's int4 kernel computes in bfloat16.
    assert rel_err(got, ref) <= (1e-4 if DEVICE == "cpu" else 2e-2)


def test_smollm2_paris_and_logits_match_transformers(smollm2: Path) -> None:
    engine = load_engine(smollm2, device=DEVICE, dtype="float32", weights="dequantized")
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    seq = engine.new_sequence(256)
    logits = seq.forward(prompt)
    out: list[int] = []
    for _ in range(12):
        nxt = int(logits[-1].argmax())
        if nxt in tok.eos_ids:
            break
        out.append(nxt)
        logits = seq.forward([nxt])
    assert "Paris" in tok.decode(out)

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    ids = prompt + out
    assert rel_err(engine.new_sequence(256).forward(ids), hf_logits(hf.eval(), ids)) <= 1e-3


def test_smollm2_quantized_greedy_matches(smollm2: Path) -> None:
    """The packed int4 path reproduces the dequantized path's greedy reply."""
    tok_ids = None
    replies = []
    for weights in ("dequantized", "quantized"):
        engine = load_engine(smollm2, device=DEVICE, dtype="float32", weights=weights)
        tok = engine.tokenizer
        tok_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three colours."}]))
        seq = engine.new_sequence(256)
        logits = seq.forward(tok_ids)
        out = []
        for _ in range(16):
            out.append(int(logits[-1].argmax()))
            logits = seq.forward(out[-1:])
        replies.append(out)
    assert replies[0] == replies[1]


LOAD_PEAK = """
import contextlib, json, sys, torch
from tandem.engine.runtime import load_engine

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

# Peak from here on (not the imports'): VmHWM, since ru_maxrss starts at the parent's RSS after fork and exec.
with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base, anon = status("VmRSS"), status("RssAnon")
e = load_engine(sys.argv[1], dtype=sys.argv[2], weights=sys.argv[3])
kept = status("RssAnon") - anon
weights = sum(b.numel() * b.element_size() for b in e.model.buffers())
weights += sum(t.numel() * t.element_size() for m in e.model.layers for t in vars(m).values() if torch.is_tensor(t))
weights += sum(t.numel() * t.element_size() for t in vars(e.model).values() if torch.is_tensor(t))
print(json.dumps({"peak_delta": status("VmHWM") - base, "kept": kept, "weights": weights}))
"""


@pytest.mark.parametrize("weights,dtype", [("dequantized", "float32"), ("quantized", "bfloat16")])
@pytest.mark.skipif(DEVICE != "cpu", reason="host memory while loading to the CPU")
def test_load_peak_memory(smollm2: Path, weights: str, dtype: str) -> None:
    """Tensor-by-tensor loading: peak RSS growth stays under the mapped file's pages plus 1.5x what the
    load keeps (the weights, the tokenizer), so no tensor is ever held whole more than once in flight."""
    out = subprocess.run(
        [sys.executable, "-c", LOAD_PEAK, str(smollm2), dtype, weights], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["kept"] >= r["weights"], r
    assert r["peak_delta"] <= smollm2.stat().st_size + 1.5 * r["kept"], r


def test_compiled_forward_matches_eager(tiny_tokenizer: Path, tmp_path: Path) -> None:
    path = write_gguf(
        random_model(CASES["qwen2_bias_tied"], seed=2), tmp_path / "m.gguf", tokenizer_from=tiny_tokenizer
    )
    eager = load_engine(path, device=DEVICE).new_sequence(64)
    compiled = load_engine(path, device=DEVICE, compile=True).new_sequence(64)
    for block in (PROMPT, [5], [6, 7, 8], [9]):
        assert rel_err(compiled.forward(block), eager.forward(block)) <= 1e-5
    compiled.truncate(len(PROMPT) + 1)
    eager.truncate(len(PROMPT) + 1)
    assert rel_err(compiled.forward([1, 2, 3, 4]), eager.forward([1, 2, 3, 4])) <= 1e-5


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
@pytest.mark.parametrize("case", ["llama_tied_rope_linear", "llama_gqa_untied"])
def test_a_cut_head_gives_the_full_heads_first_logits(
    tiny_tokenizer: Path, tmp_path: Path, case: str, qtype: str
) -> None:
    """head_rows (draft-node --head-rows) keeps the first rows of the output head, packed or dense, tied or
    not: its logits are the full head's first columns, and every token id can still be fed in."""
    path = write_gguf(
        random_model(CASES[case], seed=3), tmp_path / "m.gguf", tokenizer_from=tiny_tokenizer, dtype=qtype
    )
    for weights in ("quantized", "dequantized"):
        full = load_engine(path, device=DEVICE, dtype="float32", weights=weights).new_sequence(64)
        cut = load_engine(path, device=DEVICE, dtype="float32", weights=weights, head_rows=100).new_sequence(64)
        for block in (PROMPT, [400, 5], [499]):  # ids past the cut go in as they did
            want, got = full.forward(block), cut.forward(block)
            assert got.shape == (len(block), 100)
            torch.testing.assert_close(got, want[:, :100], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least 1"):
        load_engine(path, head_rows=0)


def test_eager_rope_as_complex_pairs_is_the_real_formula_bit_for_bit() -> None:
    """Eager mode rotates llama's interleaved pairs as complex numbers (one multiply instead of a dozen ops);
    compiled code keeps the real formula. The complex form must not change a bit of the result."""
    torch.manual_seed(0)
    for n, heads, hd, rope_dim, dtype in ((1, 12, 64, 64, torch.bfloat16), (9, 3, 64, 32, torch.float32)):
        x = torch.randn(n, heads, hd, dtype=dtype)
        cos, sin = torch.randn(n, rope_dim // 2), torch.randn(n, rope_dim // 2)
        rot = x[..., :rope_dim].float()
        a, b = rot[..., 0::2], rot[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        real = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2).to(dtype)
        want = torch.cat((real, x[..., rope_dim:]), dim=-1)
        assert torch.equal(apply_rope(x, cos, sin, neox=False), want)


@pytest.mark.skipif(not cuda_attention.available(torch.device(DEVICE)), reason="the Triton kernel runs on CUDA")
def test_cuda_attention_kernel_equals_the_matmul_attention_and_is_row_invariant() -> None:
    """The one-kernel attention against model.attention with its explicit mask, on shapes that are not
    multiples of the kernel's tiles; and a decode step's row is bit for bit the same row of a verify block."""
    torch.manual_seed(0)
    shapes = ((1, 9, 3, 64, 300, 130), (5, 9, 3, 64, 300, 200), (17, 9, 3, 64, 300, 0), (3, 8, 8, 96, 200, 70))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)):
        for k, nh, nkv, hd, length, p0 in shapes:
            q = torch.randn(k, nh + nkv, hd, device=DEVICE, dtype=dtype)[:, :nh]  # a view, as project_qkv gives
            keys_t = torch.randn(nkv, hd, length, device=DEVICE, dtype=dtype)
            values = torch.randn(nkv, length, hd, device=DEVICE, dtype=dtype)
            positions = torch.arange(p0, p0 + k, device=DEVICE)
            span = p0 + k
            mask = torch.arange(span, device=DEVICE)[None, :] <= positions[:, None]
            want = attention(q, keys_t[:, :, :span], values[:, :span], mask).reshape(k, -1).float()
            got = cuda_attention.gqa_attention(q, keys_t, values, positions)
            assert rel_err(got.reshape(k, -1).float(), want) <= tol, (dtype, k, nh, nkv, hd)
            for i in range(k):
                one = cuda_attention.gqa_attention(q[i : i + 1], keys_t, values, positions[i : i + 1])
                assert torch.equal(one, got[i : i + 1]), (dtype, k, i)
