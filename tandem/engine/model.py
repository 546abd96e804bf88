"""Decoder-only transformer for the GGUF architectures we serve (llama, qwen2, qwen3; MoE ones in moe.py).

gpt-fast style: one module per block, a KV cache written by absolute position and owned by the caller
(one per sequence), so several sequences share one set of weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tandem.engine import cpu_kernels, cuda_attention
from tandem.engine.qlinear import Linear, raw_rows

MOE_ARCHS = ("qwen2moe", "qwen3moe", "deepseek2")
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", *MOE_ARCHS)
GATING = {0: "softmax", 1: "softmax", 2: "sigmoid"}  # GGUF expert_gating_func (0: unset, llama.cpp's softmax)


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    context_length: int
    rope_base: float
    rope_dim: int
    rope_neox: bool  # rotate halves (qwen) instead of interleaved pairs (llama, whose Q/K are permuted)
    rope_scaling: str = "none"  # none | linear | yarn
    rope_factor: float = 1.0
    rope_orig_context: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    attn_bias: bool = False
    qk_norm: bool = False
    # Mixture of experts (qwen2moe, qwen3moe, deepseek2); n_experts == 0 for dense models.
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn_dim: int = 0
    leading_dense: int = 0  # deepseek2: the first blocks have a dense FFN
    expert_gating: str = "softmax"  # softmax | sigmoid
    expert_norm: bool = False  # renormalise the chosen experts' weights to sum 1
    expert_scale: float = 1.0
    expert_groups: int = 0  # deepseek2 group-limited routing: pick expert_groups_used groups first
    expert_groups_used: int = 0
    # Multi-head latent attention (deepseek2); kv_lora_rank == 0 otherwise.
    q_lora_rank: int = 0  # 0: q is one projection
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    v_head_dim: int = 0
    yarn_log_mul: float = 0.0  # deepseek2: mscale_all_dim; YaRN then scales q.k instead of the rotation

    @staticmethod
    def from_gguf(md: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
        arch = str(md.get("general.architecture", ""))
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

        def get(key: str, default: Any = None) -> Any:
            v = md.get(f"{arch}.{key}", default)
            if v is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return v

        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        n_kv = get("attention.head_count_kv", n_heads)
        head_dim = int(get("attention.key_length", dim // n_heads))
        vocab = int(md.get(f"{arch}.vocab_size", tensor_shapes["token_embd.weight"][0]))
        scaling = str(md.get(f"{arch}.rope.scaling.type", "none"))
        if scaling not in ("none", "linear", "yarn"):
            raise ValueError(f"unsupported rope scaling type {scaling!r}")
        extra = _moe_config(arch, md, tensor_shapes) if arch in MOE_ARCHS else {}
        return ModelConfig(
            arch=arch,
            vocab_size=vocab,
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(n_kv if not isinstance(n_kv, list) else n_kv[0]),
            head_dim=head_dim,
            ffn_dim=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            context_length=int(get("context_length", 4096)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_dim=int(get("rope.dimension_count", head_dim)),
            rope_neox=arch not in ("llama", "deepseek2"),
            rope_scaling=scaling,
            rope_factor=float(md.get(f"{arch}.rope.scaling.factor", 1.0)),
            rope_orig_context=int(md.get(f"{arch}.rope.scaling.original_context_length", 0)),
            yarn_beta_fast=float(md.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
            yarn_beta_slow=float(md.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
            attn_bias="blk.0.attn_q.bias" in tensor_shapes,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_shapes,
            **extra,
        )


def _moe_config(arch: str, md: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The MoE and MLA fields, with llama.cpp's per-architecture defaults where the file is silent."""
    n_exp = int(md.get(f"{arch}.expert_count", 0))
    used = int(md.get(f"{arch}.expert_used_count", 0))
    if n_exp < 1 or not 0 < used <= n_exp:
        raise ValueError(f"{arch}: needs expert_count >= 1 and 0 < expert_used_count <= it, got {n_exp}, {used}")
    gating = int(md.get(f"{arch}.expert_gating_func", 0))
    if gating not in GATING:
        raise ValueError(f"{arch}: unsupported expert_gating_func {gating} (softmax and sigmoid are)")
    groups = int(md.get(f"{arch}.expert_group_count", 0))
    groups_used = int(md.get(f"{arch}.expert_group_used_count", 0))
    if groups > 1 and (n_exp % groups or n_exp // groups < 2 or not 0 < groups_used <= groups):
        raise ValueError(f"{arch}: {n_exp} experts do not route in {groups} groups of which {groups_used} are used")
    out: dict[str, Any] = dict(
        n_experts=n_exp,
        n_experts_used=used,
        expert_ffn_dim=int(md.get(f"{arch}.expert_feed_forward_length", 0)),
        leading_dense=int(md.get(f"{arch}.leading_dense_block_count", 0)),
        expert_gating=GATING[gating],
        # llama.cpp's qwen3moe always renormalises, qwen2moe never; deepseek2 says so in its metadata.
        expert_norm=bool(md.get(f"{arch}.expert_weights_norm", arch == "qwen3moe")),
        expert_scale=float(md.get(f"{arch}.expert_weights_scale", 0.0)) or 1.0,
        expert_groups=groups if groups > 1 else 0,
        expert_groups_used=groups_used if groups > 1 else 0,
    )
    if arch == "deepseek2":
        k_mla = md.get(f"{arch}.attention.key_length_mla")
        if k_mla is None or "blk.0.attn_k_b.weight" not in shapes:
            raise ValueError(
                "deepseek2 file without attn_k_b/attn_v_b (an old conversion storing attn_kv_b): "
                "convert it again with a current llama.cpp"
            )
        rope_dim = int(md[f"{arch}.rope.dimension_count"])
        out.update(
            q_lora_rank=int(md.get(f"{arch}.attention.q_lora_rank", 0)),
            kv_lora_rank=int(md[f"{arch}.attention.kv_lora_rank"]),
            qk_nope_dim=int(k_mla) - rope_dim,
            v_head_dim=int(md[f"{arch}.attention.value_length_mla"]),
            # llama.cpp's converter stores 0.1 * mscale_all_dim, and its loader divides the 0.1 back out.
            yarn_log_mul=float(md.get(f"{arch}.rope.scaling.yarn_log_multiplier", 0.0)) / 0.1,
        )
    return out


def rope_tables(cfg: ModelConfig, max_len: int, freq_factors: Tensor | None) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [max_len, rope_dim // 2], float32, with the file's scaling rules applied."""
    d = cfg.rope_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    attn_scale = 1.0
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.to(torch.float64)
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "yarn":
        # YaRN: interpolate low frequencies, keep high ones, blend in between (Peng et al. 2023).
        orig = cfg.rope_orig_context or cfg.context_length
        factor = cfg.rope_factor

        def dim_for(rotations: float) -> float:
            return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_base))

        low = max(math.floor(dim_for(cfg.yarn_beta_fast)), 0)
        high = min(math.ceil(dim_for(cfg.yarn_beta_slow)), d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        # deepseek2 with a log multiplier leaves the rotation unscaled and scales q.k instead (moe.py).
        attn_scale = 0.1 * math.log(factor) + 1.0 if factor > 1 and not cfg.yarn_log_mul else 1.0
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    return (freqs.cos() * attn_scale).float(), (freqs.sin() * attn_scale).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, neox: bool) -> Tensor:
    """x: [k, heads, head_dim]; cos/sin: [k, rope_dim // 2]. Rotates the first rope_dim dims."""
    rd = cos.shape[-1] * 2
    rot, rest = x[..., :rd].float(), x[..., rd:]
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:
        a, b = rot[..., : rd // 2], rot[..., rd // 2 :]
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    elif torch.compiler.is_compiling():  # real arithmetic fuses into one kernel; complex does not compile
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        # Pairs as complex numbers: one multiply instead of a dozen ops (38 -> 9 us for SmolLM2's q and k on
        # one core), and bit for bit the real formula's result.
        pairs = torch.view_as_complex(rot.unflatten(-1, (-1, 2)))
        out = torch.view_as_real(pairs * torch.complex(c, s)).flatten(-2)
    out = out.to(x.dtype)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def attention(q: Tensor, keys_t: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
    """Grouped-query attention of k new queries [k, heads, hd] over cached keys, transposed [kv_heads, hd, len],
    and values [kv_heads, len, hd].

    Plain matmuls: for a handful of queries this beats the fused CPU kernels, and the query heads that
    share a KV head are batched together instead of repeating the cache.
    """
    k_new, nh, hd = q.shape
    nkv = keys_t.shape[0]
    g = nh // nkv
    qg = q.view(k_new, nkv, g, hd).permute(1, 2, 0, 3).reshape(nkv, g * k_new, hd)
    scores = torch.matmul(qg, keys_t).float() * (1.0 / math.sqrt(hd))
    if mask is not None:
        scores = scores.view(nkv, g, k_new, -1).masked_fill(~mask, float("-inf")).view(nkv, g * k_new, -1)
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values)  # [nkv, g * k, hd]
    return out.view(nkv, g, k_new, hd).permute(2, 0, 1, 3)


ATTN_PAD = 64


def attention_span(end: int, values: Tensor) -> int:
    """Cache rows an eager forward attends over when the first `end` are live. A 16-bit matmul on CPU goes
    through oneDNN, which builds a kernel for every new shape, and the length is new at every token
    (attention took 328 us a layer in the draft's decode, 57 us at a fixed length). Rounded up to
    ATTN_PAD rows, with the rows past `end` masked (and zeroed by the Sequence), the kernels are reused.
    values: a layer's value cache, [heads, len, dim] (MLA's too)."""
    if values.device.type != "cpu" or values.dtype == torch.float32:
        return end
    return min(-(-end // ATTN_PAD) * ATTN_PAD, values.shape[1])


class Embedding(nn.Module):
    """Token embeddings; quantized rows are dequantized only for the tokens looked up.

    Tied to a packed output head (`head`), the table is not held twice: `rows` keeps only each block's
    header bytes and the codes are read back from the head's int4 packing (qlinear.raw_rows).
    """

    def __init__(
        self,
        weight: Tensor | None,
        rows: Tensor | None = None,
        qtype: int = 0,
        dim: int = 0,
        dtype=torch.float32,
        head: Linear | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("rows", rows)  # raw GGUF bytes, one row of blocks per token (headers only if head)
        self.qtype, self.dim, self.dtype = qtype, dim, dtype
        self.head = head

    def forward(self, tokens: Tensor) -> Tensor:
        if self.weight is not None:
            return F.embedding(tokens, self.weight)
        from tandem.engine.quants import dequantize_blocks

        rows = self.rows[tokens] if self.head is None else raw_rows(self.head, self.qtype, self.rows, tokens)
        return dequantize_blocks(rows, self.qtype, (tokens.shape[0], self.dim), self.dtype)


def project_qkv(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries [n, heads, hd], keys and values [n, kv_heads, hd] of n normed rows: the fused projection,
    the optional q/k norms (qwen3), and rope at each row's position (cos, sin: [n, ...])."""
    cfg = layer.cfg
    n, hd, nh, nkv = h.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    qkv = layer.wqkv(h)
    if layer.q_norm is None:  # q and k lie side by side: one rotation for both
        qk = apply_rope(qkv[:, : (nh + nkv) * hd].view(n, nh + nkv, hd), cos, sin, cfg.rope_neox)
        return qk[:, :nh], qk[:, nh:], qkv[:, (nh + nkv) * hd :].view(n, nkv, hd)
    q, k, v = qkv.split((nh * hd, nkv * hd, nkv * hd), dim=-1)
    q, k, v = q.view(n, nh, hd), k.view(n, nkv, hd), v.view(n, nkv, hd)
    q = rms_norm(q, layer.q_norm, cfg.norm_eps)
    k = rms_norm(k, layer.k_norm, cfg.norm_eps)
    return apply_rope(q, cos, sin, cfg.rope_neox), apply_rope(k, cos, sin, cfg.rope_neox), v


def self_attention(
    layer: nn.Module,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: int | Tensor,
    mask: Tensor | None,
) -> Tensor:
    """Grouped-query attention of a normed input through layer.wqkv / q_norm / k_norm / wo (dense and MoE
    blocks alike): writes the new keys and values at pos, returns the output projection.

    Keys are cached transposed, [kv_heads, head_dim, len] (values as [kv_heads, len, head_dim]): q.k then reads
    rows of the cache in order. On CPU a bfloat16 matmul against the other layout's transposed view took 65 us
    a layer at 512 cached tokens (28 us now), a quarter of SmolLM2's decode step."""
    k_new = h.shape[0]
    q, k, v = project_qkv(layer, h, cos, sin)
    if isinstance(pos, Tensor):  # static shapes (CUDA graphs): write by index
        k_cache.index_copy_(2, pos, k.permute(1, 2, 0))
        v_cache.index_copy_(1, pos, v.transpose(0, 1))
    else:
        k_cache[:, :, pos : pos + k_new] = k.permute(1, 2, 0)
        v_cache[:, pos : pos + k_new] = v.transpose(0, 1)
    if k_new <= cuda_attention.MAX_TOKENS and cuda_attention.available(q.device):  # the mask is implied
        positions = pos if isinstance(pos, Tensor) else torch.arange(pos, pos + k_new, device=q.device)
        attn = cuda_attention.gqa_attention(q, k_cache, v_cache, positions)
    elif layer.cpu_attention and not isinstance(pos, Tensor):  # causal over the live rows, so no mask either
        attn = cpu_kernels.attention(q, k_cache, v_cache, pos)
    else:
        # The rows attended over: the mask's width where there is one (a graph's span, or attention_span's
        # padding), else exactly the live ones.
        span = pos + k_new if mask is None else mask.shape[-1]
        attn = attention(q, k_cache[:, :, :span], v_cache[:, :span], mask)
    return layer.wo(attn.reshape(k_new, -1))


class Block(nn.Module):
    """One transformer block. Weights are attached by the loader (see runtime.py)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm: Tensor
        self.ffn_norm: Tensor
        self.wqkv: Linear  # q, k, v fused: [q_dim + 2 * kv_dim, dim] (+ bias for qwen2)
        self.wo: Linear
        self.w13: Linear  # gate and up fused: [2 * ffn, dim]
        self.w2: Linear
        self.q_norm: Tensor | None = None
        self.k_norm: Tensor | None = None
        self.cpu_attention = False  # cpu_kernels.attention serves this block (set by the loader)

    def forward(
        self,
        x: Tensor,
        ffn_out: Tensor,
        cos: Tensor,
        sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        pos: int | Tensor,
        mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Takes and returns (residual, FFN output) unsummed: the sum is taken at the start of the next block,
        where a compiled block fuses it with the norm (one kernel a block fewer: ~3 us each on a GPU)."""
        cfg = self.cfg
        x = x + ffn_out
        x = x + self_attention(self, rms_norm(x, self.attn_norm, cfg.norm_eps), cos, sin, k_cache, v_cache, pos, mask)
        h = rms_norm(x, self.ffn_norm, cfg.norm_eps)
        gate, up = self.w13(h).chunk(2, dim=-1)
        return x, self.w2(F.silu(gate) * up)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.arch in MOE_ARCHS:
            from tandem.engine.moe import MoEBlock

            self.layers = nn.ModuleList(MoEBlock(cfg, i) for i in range(cfg.n_layers))
        else:
            self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.embed: Embedding
        self.output_norm: Tensor
        self.output: Linear
        self.cos: Tensor
        self.sin: Tensor
        self.layer_devices: list[torch.device] = []
        # cuda_attention serves every layer (all on CUDA, and no MLA), or cpu_kernels.attention does. Set by the
        # loader once the layers are placed, so that a forward (a graph replay included) does not walk the
        # layers to find out.
        self.kernel_attention = False
        self.cpu_attention = False

    def needs_mask(self, k_new: int, static: bool = False) -> bool:
        """The kernels imply the mask and read only live rows; a prompt on CUDA, layers split between devices,
        MLA's attention, or positions given as a tensor on the CPU need the mask built and attend over a span."""
        cpu = self.cpu_attention and not static
        return not (cpu or (self.kernel_attention and k_new <= cuda_attention.MAX_TOKENS))

    def forward(
        self, tokens: Tensor, pos: int | Tensor, caches: list[tuple[Tensor, Tensor]], span: int | None = None
    ) -> Tensor:
        """Append tokens at positions pos.. and return float32 logits for each of them.

        pos is an int (shapes follow the context length) or a tensor of the k positions, for CUDA graphs:
        shapes are then fixed by `span`, the cache rows attended over (all by default; more than pos).
        """
        k_new = tokens.shape[0]
        x = self.embed(tokens)
        mask = None
        masked = self.needs_mask(k_new, static=isinstance(pos, Tensor))
        if isinstance(pos, Tensor):
            if masked:
                mask = torch.arange(span or caches[0][1].shape[1], device=x.device)[None, :] <= pos[:, None]
            cos, sin = self.cos[pos], self.sin[pos]
        else:
            span = attention_span(pos + k_new, caches[0][1]) if masked else pos + k_new
            if masked and (k_new > 1 or span > pos + k_new):
                # Causal among the new tokens; everything cached before pos is visible, padding never.
                idx = torch.arange(span, device=x.device)
                mask = idx[None, :] <= (pos + torch.arange(k_new, device=x.device))[:, None]
            # Copies, not views: a view's offset into the table would be one more size to specialize on.
            cos, sin = self.cos[pos : pos + k_new].clone(), self.sin[pos : pos + k_new].clone()
        out = torch.zeros_like(x)  # the FFN output each block hands on (Block.forward)
        for layer, dev, (kc, vc) in zip(self.layers, self.layer_devices, caches, strict=True):
            if x.device != dev:
                x, out, cos, sin = x.to(dev), out.to(dev), cos.to(dev), sin.to(dev)
                mask = mask.to(dev) if mask is not None else None
            x, out = layer(x, out, cos, sin, kc, vc, pos, mask)
        if x.device != self.output_norm.device:
            x, out = x.to(self.output_norm.device), out.to(self.output_norm.device)
        return self.logits(x, out)

    def logits(self, x: Tensor, ffn_out: Tensor) -> Tensor:
        """The last block's sum, the final norm and the head: a region of its own for torch.compile."""
        return self.output(rms_norm(x + ffn_out, self.output_norm, self.cfg.norm_eps)).float()
