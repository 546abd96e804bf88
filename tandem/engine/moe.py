"""Mixture-of-experts blocks (qwen2moe, qwen3moe, deepseek2) and multi-head latent attention (deepseek2).

Routed experts run grouped by expert: the (token, slot) pairs of a block are sorted by expert once, and
each active expert does one matmul over all the tokens routed to it. A verify of k tokens therefore
costs one pass over the union of their experts, which is the curve the coordinator's tuner needs.

A block has three placements, resolved at load from the tensor rules (runtime.py): attention (with the
KV cache), the FFN (norm, router, shared experts, dense FFN) and the routed experts. Activations move
only where two of them differ.

Routed experts are stored per expert: packed int4 (Q4_0/Q4_1/Q4_K; Q8_0 as two int4 halves, see
qlinear.py) when weights are kept quantized, else the stacked tensor's raw bytes, of which one expert at a
time is dequantized while it runs. A 671B model never exists dequantized in memory.

MLA caches the compressed latent: per token the normalised kv_lora_rank latent and the rotated rope key,
one row of kv_lora_rank + rope_dim values, as llama.cpp does. Queries are absorbed through attn_k_b
(q_nope -> latent space) and outputs expanded through attn_v_b after attention, so a decode or verify
step never expands the cached keys and values: it is attention over one shared "head" of 576 values
(DeepSeek-V3) instead of 128 heads of 192 + 128 values, 71x less cache per token. Prefill pays more
attention FLOPs than the expanded form; verify blocks, our workload, pay less. The cache rows are written
by position, so rollback stays O(1) (only the sequence length moves) and each sequence owns its cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as GT
from torch import Tensor, nn

from tandem.engine.gguf_file import GGUFFile, TensorInfo
from tandem.engine.model import ModelConfig, apply_rope, rms_norm, self_attention
from tandem.engine.qlinear import PACKED_TYPES, Int4Weight, Linear, _int4_codes
from tandem.engine.quants import dequantize_blocks

EXPERT_CHUNK = 1 << 26  # weights unpacked at once while packing experts (bounds the loader's transient memory)
NORM_FLOOR = 6.103515625e-5  # llama.cpp clamps the routing-weight sum here (smallest normal fp16)


class ExpertStack(nn.Module):
    """One stacked expert tensor [n_expert, out, in]: a Linear per expert, or raw bytes dequantized per call."""

    def __init__(
        self,
        parts: list[Linear] | None = None,
        raw: Tensor | None = None,
        qtype: GT = GT.F32,
        shape: tuple[int, int] = (0, 0),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts) if parts is not None else None
        self.register_buffer("raw", raw)  # [n_expert, bytes per expert] on the experts' device
        self.qtype, self.shape, self.dtype = qtype, shape, dtype

    def forward(self, e: int, x: Tensor) -> Tensor:
        if self.parts is not None:
            return self.parts[e](x)
        return F.linear(x, dequantize_blocks(self.raw[e], self.qtype, self.shape, self.dtype))


class Experts(nn.Module):
    """The routed experts of one block, on one device."""

    def __init__(
        self, gate_up: ExpertStack | None, gate: ExpertStack | None, up: ExpertStack | None, down: ExpertStack
    ):
        super().__init__()
        self.gate_up, self.gate, self.up, self.down = gate_up, gate, up, down  # gate_up: gate and up fused
        self.n_experts = len(down.parts) if down.parts is not None else down.raw.shape[0]

    def expert(self, e: int, x: Tensor) -> Tensor:
        if self.gate_up is not None:
            g, u = self.gate_up(e, x).chunk(2, dim=-1)
        else:
            g, u = self.gate(e, x), self.up(e, x)
        return self.down(e, F.silu(g) * u)

    def forward(self, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        """x [T, dim], idx/w [T, K] chosen experts and weights (already on this device) -> [T, dim]."""
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # the one host sync of the block
        tok = order // k
        xs = x[tok]
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.expert(e, xs[start : start + n]))
                start += n
        ys = torch.cat(outs) * w.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tok, ys)


def route(logits: Tensor, cfg: ModelConfig, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Router logits [T, n_expert] (float32) -> (expert ids [T, K], weights [T, K]), as llama.cpp's build_moe_ffn.

    The selection bias (exp_probs_b) and group limits steer which experts are chosen; the weights are
    always the unbiased gate values of the chosen experts, then normalised and scaled if configured.
    """
    probs = torch.softmax(logits, dim=-1) if cfg.expert_gating == "softmax" else torch.sigmoid(logits)
    select = probs if bias is None else probs + bias
    if cfg.expert_groups:
        t = select.shape[0]
        grouped = select.view(t, cfg.expert_groups, -1)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(cfg.expert_groups_used, dim=-1).indices
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        select = grouped.masked_fill(dropped[..., None], float("-inf")).view(t, -1)
    idx = select.topk(cfg.n_experts_used, dim=-1).indices
    w = probs.gather(1, idx)
    if cfg.expert_norm:
        w = w / w.sum(-1, keepdim=True).clamp_min(NORM_FLOOR)
    if cfg.expert_scale != 1.0:
        w = w * cfg.expert_scale
    return idx, w


def mla_kq_scale(cfg: ModelConfig) -> float:
    """llama.cpp's deepseek2 softmax scale: YaRN's magnitude correction applied to q.k, squared."""
    scale = 1.0 / math.sqrt(cfg.qk_nope_dim + cfg.rope_dim)
    if cfg.rope_scaling != "yarn" or cfg.rope_factor <= 1:
        return scale
    log_f = math.log(cfg.rope_factor)
    factor = 1.0 if cfg.yarn_log_mul else 1.0 + 0.1 * log_f  # without a log multiplier: plain YaRN mscale
    mscale = factor * (1.0 + 0.1 * cfg.yarn_log_mul * log_f)
    return scale * mscale * mscale


class MoEBlock(nn.Module):
    """A transformer block with GQA or MLA attention and a routed-expert (or, leading, dense) FFN."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.cfg, self.index = cfg, index
        self.mla = cfg.kv_lora_rank > 0
        self.kq_scale = mla_kq_scale(cfg) if self.mla else 0.0
        self.cpu_attention = False  # cpu_kernels.attention serves the GQA attention (set by the loader)
        self.ffn_device = torch.device("cpu")  # set by the loader, as is expert_device
        self.expert_device = torch.device("cpu")
        self.attn_norm: Tensor
        self.ffn_norm: Tensor
        # GQA attention (qwen2moe, qwen3moe)
        self.wqkv: Linear | None = None
        self.q_norm: Tensor | None = None
        self.k_norm: Tensor | None = None
        # MLA attention (deepseek2)
        self.wq: Linear | None = None  # no q LoRA
        self.wq_a: Linear | None = None
        self.wq_b: Linear | None = None
        self.q_a_norm: Tensor | None = None
        self.wkv_a: Linear | None = None
        self.kv_a_norm: Tensor | None = None
        self.k_b: Tensor | None = None  # [heads, kv_lora_rank, qk_nope_dim]
        self.v_b: Tensor | None = None  # [heads, v_head_dim, kv_lora_rank]
        self.wo: Linear
        # FFN: dense (leading deepseek2 blocks) or routed experts plus optional shared expert
        self.w13: Linear | None = None
        self.w2: Linear | None = None
        self.router: Tensor | None = None  # [n_expert, dim] float32
        self.probs_bias: Tensor | None = None  # exp_probs_b, float32
        self.experts: Experts | None = None
        self.shared_w13: Linear | None = None
        self.shared_w2: Linear | None = None
        self.shared_gate: Tensor | None = None  # qwen2moe: sigmoid gate of the shared expert, [dim]

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
        """As model.Block.forward: (residual, FFN output) in and out, summed at the start of the next block."""
        eps = self.cfg.norm_eps
        x = x + ffn_out
        if cos.device != x.device:  # an earlier block's FFN placement moved x: the rope tables and mask follow
            cos, sin = cos.to(x.device), sin.to(x.device)
            mask = mask.to(x.device) if mask is not None else None
        h = rms_norm(x, self.attn_norm, eps)
        if self.mla:
            x = x + self._mla(h, cos, sin, k_cache, pos, mask)
        else:
            x = x + self_attention(self, h, cos, sin, k_cache, v_cache, pos, mask)
        if x.device != self.ffn_device:
            x = x.to(self.ffn_device)
        h = rms_norm(x, self.ffn_norm, eps)
        if self.w13 is not None:
            gate, up = self.w13(h).chunk(2, dim=-1)
            return x, self.w2(F.silu(gate) * up)
        return x, self._moe(h)

    def _moe(self, h: Tensor) -> Tensor:
        idx, w = route(F.linear(h.float(), self.router), self.cfg, self.probs_bias)
        dev = self.expert_device
        if dev != h.device:
            out = self.experts(h.to(dev), idx.to(dev), w.to(dev)).to(h.device)
        else:
            out = self.experts(h, idx, w)
        if self.shared_w13 is not None:
            gate, up = self.shared_w13(h).chunk(2, dim=-1)
            shared = self.shared_w2(F.silu(gate) * up)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(h @ self.shared_gate)[:, None]
            out = out + shared
        return out

    def _mla(
        self, h: Tensor, cos: Tensor, sin: Tensor, cache: Tensor, pos: int | Tensor, mask: Tensor | None
    ) -> Tensor:
        """Multi-head latent attention over the cached latents (cache [1, len, kv_lora_rank + rope_dim])."""
        cfg = self.cfg
        t, nh, nope, r, lora = h.shape[0], cfg.n_heads, cfg.qk_nope_dim, cfg.rope_dim, cfg.kv_lora_rank
        q = self.wq(h) if self.wq is not None else self.wq_b(rms_norm(self.wq_a(h), self.q_a_norm, cfg.norm_eps))
        q_nope, q_pe = q.view(t, nh, nope + r).split((nope, r), dim=-1)
        kv = self.wkv_a(h)
        latent = rms_norm(kv[:, :lora], self.kv_a_norm, cfg.norm_eps)
        k_pe = apply_rope(kv[:, None, lora:], cos, sin, cfg.rope_neox)[:, 0]
        q_pe = apply_rope(q_pe, cos, sin, cfg.rope_neox)
        q_lat = torch.matmul(q_nope.transpose(0, 1), self.k_b.transpose(1, 2))  # [nh, t, lora]: absorbed k_b
        row = torch.cat((latent, k_pe), dim=-1)
        if isinstance(pos, Tensor):
            cache.index_copy_(1, pos, row[None])
            keys = cache[0]
        else:
            cache[0, pos : pos + t] = row
            keys = cache[0, : pos + t if mask is None else mask.shape[-1]]  # padded: model.attention_span
        query = torch.cat((q_lat, q_pe.transpose(0, 1)), dim=-1)  # [nh, t, lora + r]
        scores = torch.matmul(query, keys.t()).float() * self.kq_scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(keys.dtype)
        out = torch.matmul(torch.matmul(probs, keys[:, :lora]), self.v_b.transpose(1, 2))  # [nh, t, v]
        return self.wo(out.transpose(0, 1).reshape(t, nh * cfg.v_head_dim))


# --- loading (called from runtime._load_weights with its tensor helpers) ---------------------------

DenseFn = Callable[..., Tensor]  # dense(name, device, dtype=None) -> Tensor
LinearFn = Callable[..., Linear]  # linear(names, device, bias_names=None) -> Linear
PLAIN = (GT.F32, GT.F16, GT.BF16)


def load_block(
    blk: MoEBlock,
    gf: GGUFFile,
    devices: tuple[torch.device, torch.device, torch.device],
    dense: DenseFn,
    linear: LinearFn,
    quantized: bool,
    dtype: torch.dtype,
    dequantized: list[str],
) -> None:
    """Attach block `blk`'s weights; devices = (attention, FFN, routed experts)."""
    cfg = blk.cfg
    p = f"blk.{blk.index}."
    attn_dev, ffn_dev, exp_dev = devices
    blk.ffn_device, blk.expert_device = ffn_dev, exp_dev

    def has(name: str) -> bool:
        return p + name in gf.tensors

    blk.attn_norm = dense(p + "attn_norm.weight", attn_dev)
    if blk.mla:
        if has("attn_q.weight"):
            blk.wq = linear([p + "attn_q.weight"], attn_dev)
        else:
            blk.wq_a = linear([p + "attn_q_a.weight"], attn_dev)
            blk.q_a_norm = dense(p + "attn_q_a_norm.weight", attn_dev)
            blk.wq_b = linear([p + "attn_q_b.weight"], attn_dev)
        blk.wkv_a = linear([p + "attn_kv_a_mqa.weight"], attn_dev)
        blk.kv_a_norm = dense(p + "attn_kv_a_norm.weight", attn_dev)
        # Per-head matrices used in batched matmuls: dense, and small (heads x rank x head size).
        blk.k_b = dense(p + "attn_k_b.weight", attn_dev).view(cfg.n_heads, cfg.kv_lora_rank, cfg.qk_nope_dim)
        blk.v_b = dense(p + "attn_v_b.weight", attn_dev).view(cfg.n_heads, cfg.v_head_dim, cfg.kv_lora_rank)
        if quantized:
            dequantized.extend(
                f"{p}{n} ({gf.tensors[p + n].ggml_type.name})"
                for n in ("attn_k_b.weight", "attn_v_b.weight")
                if gf.tensors[p + n].ggml_type not in PLAIN
            )
    else:
        qkv = [p + f"attn_{n}.weight" for n in "qkv"]
        blk.wqkv = linear(qkv, attn_dev, [p + f"attn_{n}.bias" for n in "qkv"] if cfg.attn_bias else None)
        if cfg.qk_norm:
            blk.q_norm = dense(p + "attn_q_norm.weight", attn_dev)
            blk.k_norm = dense(p + "attn_k_norm.weight", attn_dev)
    blk.wo = linear([p + "attn_output.weight"], attn_dev)

    blk.ffn_norm = dense(p + "ffn_norm.weight", ffn_dev)
    if blk.index < cfg.leading_dense:
        blk.w13 = linear([p + "ffn_gate.weight", p + "ffn_up.weight"], ffn_dev)
        blk.w2 = linear([p + "ffn_down.weight"], ffn_dev)
        return
    blk.router = dense(p + "ffn_gate_inp.weight", ffn_dev, torch.float32)
    if has("exp_probs_b.bias"):
        blk.probs_bias = dense(p + "exp_probs_b.bias", ffn_dev, torch.float32)
    if has("ffn_up_shexp.weight"):
        blk.shared_w13 = linear([p + "ffn_gate_shexp.weight", p + "ffn_up_shexp.weight"], ffn_dev)
        blk.shared_w2 = linear([p + "ffn_down_shexp.weight"], ffn_dev)
    if has("ffn_gate_inp_shexp.weight"):
        blk.shared_gate = dense(p + "ffn_gate_inp_shexp.weight", ffn_dev).reshape(-1)
    blk.experts = load_experts(gf, p, exp_dev, quantized, dtype, dequantized)
    if blk.experts.n_experts != cfg.n_experts:
        raise ValueError(f"{p}ffn_down_exps holds {blk.experts.n_experts} experts, metadata says {cfg.n_experts}")


def load_experts(
    gf: GGUFFile, p: str, dev: torch.device, quantized: bool, dtype: torch.dtype, dequantized: list[str]
) -> Experts:
    """The stacked gate/up/down expert tensors of one block, packed per expert or kept as raw bytes."""
    infos = {}
    for k in ("gate", "up", "down"):
        name = f"{p}ffn_{k}_exps.weight"
        if name not in gf.tensors:
            raise ValueError(f"{gf.path}: missing tensor {name}")
        infos[k] = gf.tensors[name]
        if len(infos[k].shape) != 3:
            raise ValueError(f"{name}: expected [n_expert, out, in], got shape {infos[k].shape}")
    n_exp = infos["down"].shape[0]

    def packed(group: list[TensorInfo]) -> ExpertStack:
        """int4 Linears per expert (gate and up fused when both given), unpacked a chunk of experts at a time."""
        out_f, in_f = group[0].shape[1:]
        chunk = max(1, EXPERT_CHUNK // (out_f * in_f))
        experts: list[Linear] = []
        for start in range(0, n_exp, chunk):
            stop = min(start + chunk, n_exp)
            codes = []  # per tensor: the int4 matrices (two for Q8_0) of experts start..stop, stacked by rows
            for t in group:
                per = t.nbytes // n_exp
                raw = torch.from_numpy(np.array(gf.raw(t.name)[start * per : stop * per])).to(dev)
                codes.append(_int4_codes(raw, t.ggml_type, ((stop - start) * t.shape[1], t.shape[2])))
            for e in range(stop - start):
                parts = []
                for i in range(len(codes[0])):
                    q, scale, mn = (
                        torch.cat(
                            [c[i][j][e * t.shape[1] : (e + 1) * t.shape[1]] for c, t in zip(codes, group, strict=True)]
                        )
                        for j in range(3)
                    )
                    parts.append(Int4Weight(q, scale, mn, dtype))
                experts.append(Linear(parts))
        return ExpertStack(parts=experts)

    def raw(info: TensorInfo) -> ExpertStack:
        if info.ggml_type not in PLAIN:
            dequantized.append(f"{info.name} ({info.ggml_type.name}, one expert at a time while it runs)")
        data = torch.from_numpy(np.array(gf.raw(info.name))).view(info.shape[0], -1).to(dev)
        return ExpertStack(raw=data, qtype=info.ggml_type, shape=info.shape[1:], dtype=dtype)

    def packable(info: TensorInfo) -> bool:
        return quantized and info.ggml_type in PACKED_TYPES

    gate, up, down = infos["gate"], infos["up"], infos["down"]
    if packable(gate) and gate.ggml_type == up.ggml_type:
        gate_up, g, u = packed([gate, up]), None, None
    else:
        gate_up = None
        g = packed([gate]) if packable(gate) else raw(gate)
        u = packed([up]) if packable(up) else raw(up)
    return Experts(gate_up, g, u, packed([down]) if packable(down) else raw(down))
