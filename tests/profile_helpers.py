"""A synthetic draft/target pair with a known shape, for the profiling and two-host tests.

The target is a small random llama whose first layer does the work and whose other layers add exactly
zero to the residual stream (zero output projections): it computes the same function as a one-layer
model at several times the cost. The draft is that one-layer model with noise on its output head, so
it agrees with the target on most greedy tokens (acceptance around 0.85 at T = 0) at a fraction of its
cost: the regime where speculation pays and the best draft length moves with the link's delay. Both
use a 512-token byte-level vocabulary, so any text encodes.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

VOCAB = 512
LETTERS = "etaoinshrdlucmfw"


def _vocabulary() -> tuple[list[str], list[int], list[str]]:
    """Three specials, the 256 byte symbols of byte-level BPE, then two-letter merges."""
    alphabet = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
    alphabet += [chr(256 + i) for i in range(256 - len(alphabet))]
    merges = [f"{a} {b}" for a in LETTERS for b in LETTERS][: VOCAB - 3 - len(alphabet)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *(m.replace(" ", "") for m in merges)]
    return tokens, [3, 3, 3] + [1] * (VOCAB - 3), merges


def _write(
    path: Path, name: str, tensors: dict[str, np.ndarray], n_layers: int, dim: int, ffn: int, heads: int, kv: int
) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(1024)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    tokens, types, merges = _vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    for key, value in tensors.items():
        w.add_tensor(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_pair(
    directory: Path,
    target_layers: int = 4,
    draft_noise: float = 0.07,
    dim: int = 128,
    ffn: int = 384,
    heads: int = 4,
    kv: int = 2,
    seed: int = 0,
) -> tuple[Path, Path]:
    """(draft, target) GGUF paths; see the module docstring."""
    rng = np.random.default_rng(seed)

    def t(*shape: int, s: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * s / np.sqrt(shape[-1])).astype(np.float32)

    hd = dim // heads
    head = t(VOCAB, dim, s=6.0)  # sharp next-token distributions, as a trained model's mostly are
    common = {"token_embd.weight": t(VOCAB, dim, s=float(np.sqrt(dim))), "output_norm.weight": np.ones(dim, np.float32)}

    def layer(i: int, live: bool) -> dict[str, np.ndarray]:
        p = f"blk.{i}."
        out = {
            p + "attn_norm.weight": np.ones(dim, np.float32),
            p + "ffn_norm.weight": np.ones(dim, np.float32),
            p + "attn_q.weight": t(heads * hd, dim),
            p + "attn_k.weight": t(kv * hd, dim),
            p + "attn_v.weight": t(kv * hd, dim),
            p + "attn_output.weight": t(dim, heads * hd),
            p + "ffn_gate.weight": t(ffn, dim),
            p + "ffn_up.weight": t(ffn, dim),
            p + "ffn_down.weight": t(dim, ffn),
        }
        if not live:  # the layer still computes everything, then adds exactly zero
            out[p + "attn_output.weight"] = np.zeros((dim, heads * hd), np.float32)
            out[p + "ffn_down.weight"] = np.zeros((dim, ffn), np.float32)
        return out

    first = layer(0, True)
    target = {**common, "output.weight": head, **first}
    for i in range(1, target_layers):
        target.update(layer(i, False))
    noise = rng.standard_normal(head.shape).astype(np.float32) * draft_noise * float(head.std())
    draft = {**common, "output.weight": head + noise, **first}
    d = _write(directory / "pair-draft.gguf", "pair-draft", draft, 1, dim, ffn, heads, kv)
    tg = _write(directory / "pair-target.gguf", "pair-target", target, target_layers, dim, ffn, heads, kv)
    return d, tg
