"""Mixture-of-experts targets (qwen3moe, qwen2moe, deepseek2 with MLA) against HF transformers, weights kept
quantized per expert, tensor placement rules, and a target node serving such a model with --cpu-moe.

Float32 on the CPU unless TANDEM_TEST_DEVICE names an accelerator; the placement tests then also move the
routed experts (or whole blocks) to the CPU and check the logits stay the all-accelerator ones.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from tandem.engine.model import ModelConfig
from tandem.engine.moe import route
from tandem.engine.runtime import cpu_moe_rules, load_engine
from tools.write_gguf import random_model, write_gguf

transformers = pytest.importorskip("transformers")

DEVICE = os.environ.get("TANDEM_TEST_DEVICE", "cpu")
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
CASES: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        BASE, model_type="qwen3_moe", num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, max_position_embeddings=256,
    ),
    "qwen2_moe": dict(
        BASE, model_type="qwen2_moe", num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=32, shared_expert_intermediate_size=64, max_position_embeddings=256,
    ),
    # q LoRA, YaRN with mscale (llama.cpp's log multiplier), group-limited sigmoid routing with a bias,
    # weight normalisation and scaling, a shared expert and a leading dense block.
    "deepseek_v3": dict(
        BASE, model_type="deepseek_v3", num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=3, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, max_position_embeddings=256,
        rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0),
    ),
    # DeepSeek-V2-Lite's shape: no q LoRA, no groups, no renormalisation, mscale 0.707.
    "deepseek_lite": dict(
        BASE, model_type="deepseek_v3", num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=64, first_k_dense_replace=0, n_group=1, topk_group=1, n_shared_experts=2, norm_topk_prob=False,
        routed_scaling_factor=1.0, max_position_embeddings=256,
        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707),
    ),
}  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent
PROMPT = [1, 17, 300, 42, 511, 3, 99, 250, 8, 64, 128, 7, 200, 201, 13, 77, 31, 400, 5, 6]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def assert_close_bf16(got: torch.Tensor, ref: torch.Tensor) -> None:
    """CUDA's int4 kernel takes bfloat16 activations, whose rounding can flip a near-tie routing decision and
    move that token's logits a lot; so most tokens must be close and nearly all argmaxes agree."""
    got, ref = got.float().cpu(), ref.float().cpu()
    per_token = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert float((per_token <= 5e-2).float().mean()) >= 0.75, per_token
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module")
def models(tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    d = tmp_path_factory.mktemp("moe")
    out = {}
    for case, cfg in CASES.items():
        model = random_model(cfg, seed=3).eval()
        out[case] = (model, write_gguf(model, d / f"{case}.gguf", tokenizer_from=tiny_tokenizer))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_decode_block_and_rollback_match_transformers(models, case: str) -> None:
    model, path = models[case]
    engine = load_engine(path, device=DEVICE)
    full = PROMPT + [9, 10, 11, 12, 13, 14]
    ref = hf_logits(model, full)
    assert ref.std() > 0.3, "random weights that move the logits"
    seq = engine.new_sequence(128)
    n = len(PROMPT)
    assert rel_err(seq.forward(PROMPT), ref[:n]) <= 1e-4, f"{case}: prefill"
    assert rel_err(seq.forward([9]), ref[n : n + 1]) <= 1e-4, f"{case}: one-token decode"
    assert rel_err(seq.forward([10, 11, 12, 13, 14]), ref[n + 1 :]) <= 1e-4, f"{case}: k-token forward"
    seq.truncate(n + 2)
    alt = [99, 98, 97]
    got = seq.forward(alt)
    assert rel_err(got, hf_logits(model, full[: n + 2] + alt)[-3:]) <= 1e-4, f"{case}: after rollback"
    # Another sequence on the same weights, interleaved: its own cache.
    other = engine.new_sequence(64)
    other.forward(PROMPT[:5])
    assert rel_err(seq.forward([7]), hf_logits(model, full[: n + 2] + alt + [7])[-1:]) <= 1e-4
    assert rel_err(other.forward([8]), hf_logits(model, PROMPT[:5] + [8])[-1:]) <= 1e-4
    if engine.config.kv_lora_rank:  # MLA caches one latent + rope-key row per token, nothing per head
        k_cache, v_cache = seq.caches[0]
        assert k_cache.shape == (1, 128, engine.config.kv_lora_rank + engine.config.rope_dim)
        assert v_cache.numel() == 0


def roundtrip(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """The HF model with every weight the GGUF stores quantized replaced by its dequantized value."""
    qtype = gguf.GGMLQuantizationType[dtype.upper()]

    def rt(w: torch.Tensor) -> torch.Tensor:  # quantized along rows, as write_gguf does
        t = qtype if w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else gguf.GGMLQuantizationType.F16
        data = gguf.quants.quantize(w.float().contiguous().numpy(), t)
        return torch.from_numpy(gguf.quants.dequantize(data, t).copy()).reshape(w.shape)

    m = copy.deepcopy(model)
    cfg = m.config
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim < 2 or re.search(r"mlp\.gate\.weight$|shared_expert_gate", name):  # routers stay F32
                continue
            if name.endswith("kv_b_proj.weight"):  # k_b is stored transposed: rows of qk_nope_head_dim
                nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
                kv = p.view(cfg.num_attention_heads, nope + v, -1)
                kv[:, :nope] = rt(kv[:, :nope].transpose(1, 2)).transpose(1, 2)
                kv[:, nope:] = rt(kv[:, nope:])
            else:
                p.copy_(rt(p))
    return m


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
@pytest.mark.parametrize("case", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_quantized_experts_match_dequantize_then_reference(
    models, case: str, dtype: str, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    model = models[case][0]
    path = write_gguf(model, tmp_path / "m.gguf", dtype=dtype, tokenizer_from=tiny_tokenizer)
    engine = load_engine(path, device=DEVICE, weights="quantized")
    experts = engine.model.layers[-1].experts
    assert experts.down.parts is not None and len(experts.down.parts) == engine.config.n_experts  # int4 per expert
    assert not [n for n in engine.dequantized_tensors if "exps" in n]
    seq = engine.new_sequence(64)
    got = torch.cat((seq.forward(PROMPT), seq.forward([9]), seq.forward([10, 11, 12])))
    ref = hf_logits(roundtrip(model, dtype), [*PROMPT, 9, 10, 11, 12])
    assert rel_err(ref, hf_logits(model, [*PROMPT, 9, 10, 11, 12])) > 1e-3, "quantization changes the logits"
    if DEVICE == "cpu":  # float32 activations: the int4 path is exact up to summation order
        assert rel_err(got, ref) <= 1e-4
    else:
        assert_close_bf16(got, ref)


@pytest.mark.parametrize("dtype", ["q4_k", "q4_1"])
def test_quantized_experts_match_dequantized_engine_random_blocks(dtype: str, tiny_tokenizer: Path, tmp_path) -> None:
    """Q4_K (which gguf-py cannot quantize) from random blocks: packed per expert == dequantized per call."""
    cfg = dict(CASES["qwen3_moe"], hidden_size=256, moe_intermediate_size=256, head_dim=64)
    path = write_gguf(random_model(cfg, meta=True), tmp_path / "m.gguf", dtype=dtype, tokenizer_from=tiny_tokenizer)
    ref_engine = load_engine(path, device=DEVICE, weights="dequantized")
    assert any("one expert at a time" in n for n in ref_engine.dequantized_tensors)
    ref = ref_engine.new_sequence(64).forward(PROMPT)
    got = load_engine(path, device=DEVICE, weights="quantized").new_sequence(64).forward(PROMPT)
    assert ref.std() > 0.3
    if DEVICE == "cpu":
        assert rel_err(got, ref) <= 1e-4
    else:
        assert_close_bf16(got, ref)


def reference_route(logits: torch.Tensor, cfg: ModelConfig, bias: torch.Tensor | None) -> list[dict[int, float]]:
    """Token by token, in plain Python: DeepSeek-V3's reference gate and Qwen's softmax top-k."""
    out = []
    for row in logits.tolist():
        if cfg.expert_gating == "softmax":
            z = [math.exp(v - max(row)) for v in row]
            probs = [v / sum(z) for v in z]
        else:
            probs = [1 / (1 + math.exp(-v)) for v in row]
        sel = [p + (float(bias[i]) if bias is not None else 0.0) for i, p in enumerate(probs)]
        allowed = set(range(len(row)))
        if cfg.expert_groups:
            size = len(row) // cfg.expert_groups
            score = [sum(sorted(sel[g * size : (g + 1) * size])[-2:]) for g in range(cfg.expert_groups)]
            keep = sorted(range(cfg.expert_groups), key=lambda g: -score[g])[: cfg.expert_groups_used]
            allowed = {e for g in keep for e in range(g * size, (g + 1) * size)}
        chosen = sorted(allowed, key=lambda e: -sel[e])[: cfg.n_experts_used]
        w = {e: probs[e] for e in chosen}
        if cfg.expert_norm:
            total = sum(w.values())
            w = {e: v / total for e, v in w.items()}
        out.append({e: v * cfg.expert_scale for e, v in w.items()})
    return out


@pytest.mark.parametrize(
    "gating,norm,scale,groups,bias",
    [("softmax", False, 1.0, 0, False), ("softmax", True, 1.0, 0, False), ("sigmoid", True, 2.5, 4, True),
     ("sigmoid", False, 1.5, 0, True), ("softmax", True, 16.0, 2, False)],
)  # fmt: skip
def test_routing_variants_match_a_token_by_token_reference(gating, norm, scale, groups, bias) -> None:
    cfg = ModelConfig(
        arch="deepseek2", vocab_size=8, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, ffn_dim=8,
        norm_eps=1e-6, context_length=8, rope_base=1e4, rope_dim=8, rope_neox=False, n_experts=16,
        n_experts_used=4, expert_gating=gating, expert_norm=norm, expert_scale=scale, expert_groups=groups,
        expert_groups_used=2 if groups else 0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 16, generator=gen)
    b = torch.randn(16, generator=gen) * 0.3 if bias else None
    idx, w = route(logits, cfg, b)
    for t, expect in enumerate(reference_route(logits, cfg, b)):
        got = dict(zip(idx[t].tolist(), w[t].tolist(), strict=True))
        assert got.keys() == expect.keys()
        assert all(abs(got[e] - expect[e]) < 1e-5 for e in expect)


RULE_SETS = [
    [],
    ["exps=CPU"],
    cpu_moe_rules(),
    cpu_moe_rules(1),
    [r"blk\.0\.=cpu", r"attn_.*=CPU,token_embd=cpu"],
    [r"blk\.1\.ffn_(gate|up|down)_exps\.weight=cpu", r"^output=CPU"],  # not blk.N.attn_output: a search
    [r"blk\.0\.attn=CPU"],  # block 0's FFN on the default device, block 1's attention there too
]


def placements(engine) -> list[tuple[str, str, str]]:
    """Per block: the devices of its attention, FFN and routed experts."""

    def dev(t: torch.Tensor | None) -> str:
        return str(t.device.type) if t is not None else "-"

    out = []
    for blk in engine.model.layers:
        experts = next(iter(blk.experts.buffers())) if blk.experts is not None else None
        out.append((dev(blk.attn_norm), dev(blk.ffn_norm), dev(experts)))
    return out


@pytest.mark.parametrize("case", ["qwen2_moe", "deepseek_v3"])
def test_placement_rules_give_the_same_logits(models, case: str) -> None:
    path = models[case][1]
    base = load_engine(path, device=DEVICE).new_sequence(64)
    ref = torch.cat((base.forward(PROMPT), base.forward([5, 6, 7])))
    for rules in RULE_SETS:
        engine = load_engine(path, device=DEVICE, override_tensor=rules)
        seq = engine.new_sequence(64)
        got = torch.cat((seq.forward(PROMPT), seq.forward([5, 6, 7])))
        if DEVICE == "cpu":
            assert torch.equal(got, ref), rules
        else:
            assert rel_err(got, ref) <= 1e-4, rules
    if DEVICE != "cpu":  # the rules did move things: experts on the CPU, attention on the accelerator
        engine = load_engine(path, device=DEVICE, override_tensor=cpu_moe_rules())
        acc = torch.device(DEVICE).type
        assert {p[2] for p in placements(engine) if p[2] != "-"} == {"cpu"}
        assert {p[0] for p in placements(engine)} == {acc}
        engine = load_engine(path, device=DEVICE, override_tensor=cpu_moe_rules(1))
        first_moe = next(i for i, p in enumerate(placements(engine)) if p[2] != "-")
        assert placements(engine)[first_moe][2] == ("cpu" if first_moe == 0 else acc)


def test_bad_placement_rules_are_refused(models) -> None:
    path = models["qwen3_moe"][1]
    with pytest.raises(ValueError, match="bad regular expression"):
        load_engine(path, override_tensor=["blk.(0=CPU"])
    with pytest.raises(ValueError, match="expected REGEX=DEVICE"):
        load_engine(path, override_tensor=["exps"])
    with pytest.raises(ValueError, match="unknown device 'TPU0'"):
        load_engine(path, override_tensor=["exps=TPU0"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_engine(path, override_tensor=["exps=CUDA0"])
    else:
        with pytest.raises(ValueError, match="place them together"):
            load_engine(path, device="cuda", override_tensor=[r"blk\.0\.attn_q\.=CPU"])
        with pytest.raises(ValueError, match="placed whole"):  # dense blocks are not split
            dense = dict(BASE, model_type="qwen3", num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
            p = write_gguf(random_model(dense), path.with_name("dense.gguf"), tokenizer_from=path)
            load_engine(p, device="cuda", override_tensor=[r"ffn_down=CPU"])


def test_writer_refuses_configs_llama_cpp_would_misread(tmp_path: Path, tiny_tokenizer: Path) -> None:
    for cfg in (dict(CASES["qwen3_moe"], norm_topk_prob=False), dict(CASES["qwen2_moe"], norm_topk_prob=True)):
        with pytest.raises(ValueError, match="norm_topk_prob"):
            write_gguf(random_model(cfg, meta=True), tmp_path / "x.gguf", tokenizer_from=tiny_tokenizer)


MEMORY = """
import ctypes, gc, json, os, sys
from tandem.engine import cpu_kernels
from tandem.engine.runtime import load_engine
def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))
load_engine(sys.argv[1], dtype="bfloat16", weights="quantized")  # first-use set-up (tokenizer, kernels)
cpu_kernels.available()
out = {}
for path in sys.argv[2:]:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = anon()
    engine = load_engine(path, dtype="bfloat16", weights="quantized")
    out[path] = {"resident": anon() - base, "file": os.path.getsize(path)}
    del engine
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or DEVICE != "cpu", reason="host memory, Linux /proc")
def test_resident_memory_within_1_25x_file(tiny_tokenizer: Path, tmp_path: Path) -> None:
    """Experts stay packed: 4-bit codes + bfloat16 scales are 0.625 bytes/weight vs 0.5625 in the file."""
    cfg = dict(CASES["qwen3_moe"], hidden_size=512, moe_intermediate_size=512, num_experts=16, head_dim=64)
    files = [
        str(write_gguf(random_model(cfg, meta=True), tmp_path / f"{dt}.gguf", dtype=dt, tokenizer_from=tiny_tokenizer))
        for dt in ("q4_0", "q4_k")
    ]
    small = write_gguf(random_model(CASES["qwen3_moe"], meta=True), tmp_path / "s.gguf", tokenizer_from=tiny_tokenizer)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY, str(small), *files], capture_output=True, text=True, check=True, cwd=ROOT
    )
    for path, r in json.loads(out.stdout.strip().splitlines()[-1]).items():
        assert r["file"] > 10e6
        assert r["resident"] <= 1.25 * r["file"], (path, r)


@pytest.mark.slow
def test_target_node_with_cpu_moe_greedy_equals_target_only(models, tmp_path: Path) -> None:
    from coordinator.loop import Coordinator, Request
    from draft_node.service import DraftService
    from tests.coordinator_helpers import start_node_process
    from tests.wire_helpers import NodeThread

    model, path = models["qwen3_moe"]
    # An early-exit draft: the target's first block with its head; it shares the vocabulary.
    keep = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.1.")}
    draft_path = write_gguf(
        (keep, dict(CASES["qwen3_moe"], num_hidden_layers=1)), tmp_path / "d.gguf", tokenizer_from=path
    )
    target_engine = load_engine(path, weights="quantized")
    prompts = [[3 + (7 * i + 5 * j) % 500 for j in range(4 + i)] for i in range(4)]
    expected = []
    for p in prompts:  # target-only argmax decoding in-process
        seq, out = target_engine.new_sequence(64), []
        logits = seq.forward(p)
        for _ in range(12):
            out.append(int(logits[-1].argmax()))
            logits = seq.forward(out[-1:])
        expected.append(out)

    proc, port = start_node_process(
        "target", path, tmp_path / "target.log", "--cpu-moe", "--weights", "quantized", "--dtype", "float32"
    )
    draft = NodeThread(DraftService(load_engine(draft_path, threads=1), max_sessions=8))
    try:
        assert "placement rules: 1" in (tmp_path / "target.log").read_text()

        async def go() -> None:
            coord = await Coordinator.connect(f"grpc://127.0.0.1:{port}", draft.url, target_engine.tokenizer)
            try:
                for p, exp in zip(prompts, expected, strict=True):
                    for k in (0, 3, None):
                        res = await coord.run(Request(p, max_tokens=12, k=k, ignore_eos=True))
                        assert res.tokens == exp, (k, p)
            finally:
                await coord.aclose()

        asyncio.run(go())
    finally:
        draft.stop(0)
        proc.terminate()
        proc.wait(30)


def test_random_blocks_are_sane(tiny_tokenizer: Path, tmp_path: Path) -> None:
    """The benchmark's random Q4_K/Q4_0 blocks decode to unit-norm rows centred near zero."""
    from tandem.engine.gguf_file import read_gguf
    from tandem.engine.quants import dequantize

    cfg = dict(CASES["qwen3_moe"], hidden_size=256, moe_intermediate_size=256)
    for dtype in ("q4_k", "q4_0", "q8_0"):
        gf = read_gguf(write_gguf(random_model(cfg, meta=True), tmp_path / f"{dtype}.gguf", dtype=dtype,
                                  tokenizer_from=tiny_tokenizer))  # fmt: skip
        t = gf.tensors["blk.0.ffn_down_exps.weight"]
        assert t.ggml_type.name == dtype.upper() and t.shape == (8, 256, 256)
        w = dequantize(gf.raw(t.name), t.ggml_type, t.shape)
        assert 0.9 < float(w.norm(dim=-1).mean()) < 1.1 and abs(float(w.mean())) < 0.01
        assert np.isfinite(w.numpy()).all()


def test_node_cli_refuses_a_bad_rule_before_loading(models) -> None:
    path = models["qwen3_moe"][1]
    out = subprocess.run(
        [sys.executable, "-m", "target_node.cli", "--model", str(path), "--cpu-moe", "--override-tensor", "blk.(=CPU"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "bad regular expression" in out.stderr, out.stderr
