"""Train the draft model by distillation from the target's outputs, and export it as GGUF.

The draft is a small llama (same 49152-token vocabulary, tied embeddings, GQA) so that our engine and
llama.cpp both load it. Its embedding starts from the target's token embeddings projected onto their
top principal directions, which gives the tiny model the target's notion of which tokens are alike.
The loss at each position is the cross-entropy to the target's top-k probabilities (a KL up to a
constant) plus a cross-entropy on the target's own top token, which is what greedy acceptance scores.
Reply positions count fully; prompt and plain-text positions count less.

Training runs for a wall-clock budget (the learning rate follows it), evaluates on the held-out greedy
replies (teacher-forced: per-token acceptance at k = 4 as the speculative loop would count it), keeps
the best state, and writes the GGUF with tools.write_gguf.

    python -m tools.train_draft --data runs/draft/data.pt --out runs/draft/smollm2-draft.Q8_0.gguf \\
        --device cuda --time-budget 300

The demo draft's layers then went to Q4_1 (tools.requantize, models/MODEL_CARD.md).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
import torch.nn.functional as F
from torch import Tensor, nn

KIND_TEXT = 0
SPLIT_HELDOUT = 1
MAX_FILE_BYTES = 16_000_000


@dataclass
class DraftConfig:
    vocab_size: int = 49152
    dim: int = 192
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 2
    ffn_dim: int = 768
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 8192

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def hf(self) -> dict[str, Any]:
        """The transformers LlamaConfig dict tools.write_gguf reads."""
        return {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": True,
        }


# --- model (HF llama names and rotate-half RoPE, so write_gguf's converter logic applies) ---------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: DraftConfig) -> None:
        super().__init__()
        self.c = c
        hd = c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.n_heads * hd, c.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        c, hd = self.c, self.c.head_dim
        q = self.q_proj(x).view(b, t, c.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.n_kv_heads, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_heads != c.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c.n_heads * hd))


class MLP(nn.Module):
    def __init__(self, c: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.up_proj = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.down_proj = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: DraftConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, c: DraftConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)


class Draft(nn.Module):
    """Llama with tied embeddings; state_dict keys are transformers' LlamaForCausalLM keys."""

    def __init__(self, c: DraftConfig) -> None:
        super().__init__()
        self.c = c
        self.model = Body(c)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        for name, p in self.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                nn.init.normal_(
                    p,
                    std=0.02
                    / (math.sqrt(2 * c.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1),
                )
        nn.init.normal_(self.model.embed_tokens.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [b, t] -> final hidden states [b, t, dim] (logits: hidden @ embedding.T)."""
        t = tokens.shape[1]
        freqs = torch.outer(torch.arange(t, device=tokens.device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = self.model.embed_tokens(tokens)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden @ self.model.embed_tokens.weight.T


def pca_embedding(target: Path, dim: int, vocab: int) -> Tensor:
    """The target's token embeddings projected onto their top `dim` principal directions."""
    from tandem.engine.gguf_file import read_gguf
    from tandem.engine.quants import dequantize

    gf = read_gguf(target)
    info = gf.tensors["token_embd.weight"]
    e = dequantize(gf.raw(info.name), info.ggml_type, info.shape).float()
    if e.shape[0] != vocab:
        raise ValueError(f"target vocabulary {e.shape[0]} != draft vocabulary {vocab}")
    _, _, vt = torch.linalg.svd(e - e.mean(0), full_matrices=False)
    k = min(dim, vt.shape[0])
    proj = e @ vt[:k].T
    if k < dim:
        proj = torch.cat([proj, torch.randn(vocab, dim - k) * proj.std()], dim=1)
    return proj * (0.05 / proj.std())  # a scale the freshly initialised layers can work with


def unpermute_qk(w: Tensor, n_head: int) -> Tensor:
    """Inverse of tools.write_gguf.permute_qk: per head, rows (x0, y0, x1, y1, ...) -> (x0..x_{d/2-1}, y0..)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_draft_gguf(path: Path) -> tuple[DraftConfig, dict[str, Tensor]]:
    """A draft GGUF (ours, or any tied-embedding llama) back as a config and a float32 state dict."""
    from tandem.engine.gguf_file import read_gguf
    from tandem.engine.quants import dequantize

    gf = read_gguf(path)
    m = gf.metadata
    if m.get("general.architecture") != "llama" or "output.weight" in gf.tensors:
        raise ValueError(f"{path}: --init needs a llama GGUF with tied embeddings")
    cfg = DraftConfig(
        vocab_size=gf.tensors["token_embd.weight"].shape[0],
        dim=m["llama.embedding_length"],
        n_layers=m["llama.block_count"],
        n_heads=m["llama.attention.head_count"],
        n_kv_heads=m.get("llama.attention.head_count_kv", m["llama.attention.head_count"]),
        ffn_dim=m["llama.feed_forward_length"],
        rope_theta=m.get("llama.rope.freq_base", 10000.0),
        norm_eps=m["llama.attention.layer_norm_rms_epsilon"],
        max_position_embeddings=m["llama.context_length"],
    )
    # GGUF name -> our (transformers) name, through gguf's own map, as tools.write_gguf names them
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    to_hf = {names.get_name(hf, try_suffixes=(".weight",)): hf for hf in Draft(cfg).state_dict()}
    sd: dict[str, Tensor] = {}
    for name, info in gf.tensors.items():
        w = dequantize(gf.raw(name), info.ggml_type, info.shape).float()
        if name.endswith("attn_q.weight"):
            w = unpermute_qk(w, cfg.n_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.n_kv_heads)
        sd[to_hf[name]] = w
    return cfg, sd


# --- data --------------------------------------------------------------------------------------------


@dataclass
class Data:
    tokens: Tensor  # [T] int64
    ids: Tensor  # [T, K] int64
    probs: Tensor  # [T, K] float
    starts: Tensor  # [n] first token of each sequence
    lengths: Tensor  # [n]
    n_prompt: Tensor  # [n]
    kind: Tensor  # [n]
    lengths_cpu: Tensor  # [n]


def read_data(paths: list[Path]) -> dict[str, Tensor]:
    """One or more files of tools.gen_draft_data as one (held-out replies are kept from the first only)."""
    packs = [torch.load(p, weights_only=True) for p in paths]
    for p in packs[1:]:
        keep = p["split"] != SPLIT_HELDOUT
        lengths = p["offsets"].diff()
        rows = torch.repeat_interleave(keep, lengths)
        p.update({k: p[k][keep] for k in ("n_prompt", "kind", "split")})
        p.update({k: p[k][rows] for k in ("tokens", "topk_ids", "topk_probs")})
        p["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths[keep].cumsum(0)])
    out = {
        k: torch.cat([p[k] for p in packs]) for k in ("tokens", "n_prompt", "kind", "split", "topk_ids", "topk_probs")
    }
    lengths = torch.cat([p["offsets"].diff() for p in packs])
    out["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return out


def load_data(paths: list[Path], device: torch.device, max_len: int) -> tuple[Data, Tensor, Tensor]:
    """All sequences on `device`; returns (data, train indices, held-out greedy indices)."""
    d = read_data(paths)
    lengths = d["offsets"].diff().clamp(max=max_len)
    data = Data(
        tokens=d["tokens"].long().to(device),
        ids=(d["topk_ids"].to(torch.int32) & 0xFFFF).to(device),
        probs=d["topk_probs"].to(device),
        starts=d["offsets"][:-1].to(device),
        lengths=lengths.to(device),
        n_prompt=d["n_prompt"].long().to(device),
        kind=d["kind"].long().to(device),
        lengths_cpu=lengths,
    )
    split = d["split"].long()
    train = torch.nonzero(split != SPLIT_HELDOUT).flatten()
    held = torch.nonzero((split == SPLIT_HELDOUT) & (d["kind"].long() > KIND_TEXT)).flatten()
    return data, train, held


def batch(data: Data, idx: Tensor, w_prompt: float, w_text: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Padded tokens [b, t], top-k ids/probs [b, t, K], position weights [b, t], reply mask [b, t]."""
    t = int(data.lengths_cpu[idx].max())  # from the CPU copy: no device sync per batch
    idx = idx.to(data.starts.device)
    lengths = data.lengths[idx]
    ar = torch.arange(t, device=idx.device)
    valid = ar[None] < lengths[:, None]
    pos = (data.starts[idx][:, None] + ar[None]).clamp(max=len(data.tokens) - 1)
    tokens = torch.where(valid, data.tokens[pos], 0)
    has_next = ar[None] < (lengths[:, None] - 1)
    reply = has_next & (ar[None] >= (data.n_prompt[idx][:, None] - 1)) & (data.kind[idx][:, None] > KIND_TEXT)
    is_text = (data.kind[idx] == KIND_TEXT)[:, None]
    w = torch.where(reply, 1.0, torch.where(is_text, w_text, w_prompt)) * has_next
    return tokens, data.ids[pos], data.probs[pos].float(), w, reply


def distill_loss(model: Draft, tokens: Tensor, ids: Tensor, probs: Tensor, w: Tensor, hard: float) -> Tensor:
    h = model(tokens)
    logp = torch.log_softmax(model.logits(h).float(), dim=-1)
    soft = -(probs * logp.gather(-1, ids)).sum(-1)
    top = -logp.gather(-1, ids[..., :1]).squeeze(-1)
    return ((soft + hard * top) * w).sum() / w.sum().clamp(min=1)


@torch.no_grad()
def evaluate(model: Draft, data: Data, held: Tensor, k: int, bs: int = 16) -> dict[str, float]:
    """Teacher-forced on the held-out greedy replies: greedy rounds of k as the speculative loop runs them.

    A round starting at reply position p proposes k tokens; draft token j is accepted while the draft's
    argmax equals the target's token (teacher forcing is exact here: an accepted draft token is the
    target's token), then the target's own token follows; the next round starts after it.
    """
    model.eval()
    accepted = proposed = rounds = 0
    top1 = n = 0
    for s in range(0, len(held), bs):
        idx = held[s : s + bs]
        tokens, ids, _, _, reply = batch(data, idx, 0.0, 0.0)
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=tokens.device.type == "cuda"):
            pred = model.logits(model(tokens)).argmax(-1)
        match = (pred == ids[..., 0]) & reply
        top1 += int(match.sum())
        n += int(reply.sum())
        for row, rmask in zip(match.tolist(), reply.tolist(), strict=True):
            p = rmask.index(True) if True in rmask else len(rmask)
            end = len(rmask) - rmask[::-1].index(True) if True in rmask else 0
            while p < end:
                a = 0
                while a < k and p + a < end and row[p + a]:
                    a += 1
                accepted += a
                proposed += k
                rounds += 1
                p += a + 1
    model.train()
    return {
        "top1": top1 / max(n, 1),
        "acceptance": accepted / max(proposed, 1),
        "tokens_per_round": (accepted + rounds) / max(rounds, 1),
        "accepted_per_round": accepted / max(rounds, 1),
    }


# --- training ----------------------------------------------------------------------------------------


def export(model: Draft, out: Path, dtype: str, target: Path, name: str) -> int:
    from tools.write_gguf import write_gguf

    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf((sd, model.c.hf()), out, dtype=dtype, tokenizer_from=target, name=name)
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.train_draft", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="tensor file(s) from tools.gen_draft_data")
    ap.add_argument("--target", type=Path, default=None, help="target GGUF (PCA init, tokenizer for the export)")
    ap.add_argument("--out", type=Path, default=Path("runs/draft/smollm2-draft.Q8_0.gguf"))
    ap.add_argument("--dtype", default="q8_0", help="GGUF weight type (q8_0, q4_0, f16, f32 ...)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds of training")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: budget only)")
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--max-len", type=int, default=1024, help="sequences are cut to this many tokens")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--hard", type=float, default=0.5, help="weight of the CE on the target's top token")
    ap.add_argument("--w-prompt", type=float, default=0.2, help="loss weight of prompt positions")
    ap.add_argument("--w-text", type=float, default=0.3, help="loss weight of plain-text positions")
    ap.add_argument("--eval-every", type=float, default=30.0, help="seconds between evaluations")
    ap.add_argument("--k", type=int, default=4, help="draft length for the acceptance estimate")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--no-pca", action="store_true", help="random embedding init instead of the target's PCA")
    ap.add_argument("--resume", type=Path, default=None, help="checkpoint (.pt) to continue from")
    ap.add_argument("--init", type=Path, default=None, help="start from the weights of a draft GGUF (its shape too)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="where to keep the best state (.pt)")
    ap.add_argument("--save-fp16", type=Path, default=None, help="also save the best weights here as fp16 (.pt)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for path in args.data:
        if not path.exists():
            ap.error(f"--data {path} does not exist")
    if args.target is None:
        from tools.gen_draft_data import default_target

        args.target = default_target()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from tandem.engine.gguf_file import read_gguf

    vocab = read_gguf(args.target).tensors["token_embd.weight"].shape[0]
    cfg = DraftConfig(
        vocab_size=vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        ffn_dim=args.ffn,
    )
    model = Draft(cfg)
    step0 = 0
    if args.resume:
        ck = torch.load(args.resume, weights_only=False)
        cfg = DraftConfig(**ck["config"])
        model = Draft(cfg)
        model.load_state_dict(ck["model"])
        step0 = ck.get("step", 0)
        print(f"resumed from {args.resume} (step {step0}, {ck.get('metrics')})")
    elif args.init:
        cfg, sd = read_draft_gguf(args.init)
        model = Draft(cfg)
        model.load_state_dict(sd)
        print(f"initialised from {args.init}")
    elif not args.no_pca:
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(pca_embedding(args.target, cfg.dim, cfg.vocab_size))
    model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"draft: {asdict(cfg)}, {n_params:,} parameters")

    data, train_idx, held_idx = load_data(args.data, dev, args.max_len)
    lengths = data.lengths.cpu()
    reply_tokens = int((lengths - data.n_prompt.cpu())[(data.kind.cpu() > 0)].clamp(min=0).sum())
    print(
        f"data: {len(train_idx)} train sequences ({int(lengths[train_idx].sum())} tokens, {reply_tokens} reply "
        f"tokens in all), {len(held_idx)} held-out greedy replies"
    )
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=dev.type == "cuda",
    )
    gen = torch.Generator().manual_seed(args.seed)
    mean_len = float(lengths[train_idx].float().mean())
    per_batch = max(1, int(args.batch_tokens / mean_len))

    best: dict[str, Any] = {"acceptance": -1.0}
    best_state = None
    t0 = time.time()
    last_eval = t0
    step = 0
    tokens_seen = 0
    ema = None

    def do_eval(final: bool = False) -> None:
        nonlocal best, best_state
        if len(held_idx) == 0:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return
        m = evaluate(model, data, held_idx, args.k)
        m["step"] = step0 + step
        m["seconds"] = round(time.time() - t0, 1)
        if m["acceptance"] > best["acceptance"]:
            best, best_state = m, {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(
            f"eval step {step0 + step}: top1 {m['top1']:.4f}  acceptance@k={args.k} {m['acceptance']:.4f}  "
            f"tokens/round {m['tokens_per_round']:.3f}  ({m['seconds']:.0f}s){'  final' if final else ''}",
            flush=True,
        )

    model.train()
    while True:
        elapsed = time.time() - t0
        frac = min(elapsed / args.time_budget, 1.0)
        if frac >= 1.0 or (args.max_steps and step >= args.max_steps):
            break
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = train_idx[torch.randint(len(train_idx), (per_batch,), generator=gen)]
        tokens, ids, probs, w, _ = batch(data, idx, args.w_prompt, args.w_text)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = distill_loss(model, tokens, ids, probs, w, args.hard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += w.gt(0).sum()
        ema = loss.detach() if ema is None else 0.98 * ema + 0.02 * loss.detach()
        if step % 100 == 0 or step == 1:
            print(
                f"step {step0 + step}: loss {float(ema):.4f} lr {lr:.2e} "
                f"{int(tokens_seen) / (time.time() - t0):.0f} tok/s "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
        if time.time() - last_eval > args.eval_every:
            do_eval()
            last_eval = time.time()
    do_eval(final=True)
    train_s = time.time() - t0
    print(f"trained {step} steps in {train_s:.0f}s; best: {best}")
    model.load_state_dict(best_state)
    if args.checkpoint:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": asdict(cfg), "model": best_state, "step": step0 + step, "metrics": best}, args.checkpoint)
    if args.save_fp16:
        torch.save({"config": asdict(cfg), "model": {k: v.half().cpu() for k, v in best_state.items()}}, args.save_fp16)
    size = export(model, args.out, args.dtype, args.target, "SmolLM2-135M-Instruct draft (tandem)")
    print(f"wrote {args.out}: {size:,} bytes ({args.dtype})")
    if size > MAX_FILE_BYTES:
        print(f"WARNING: {args.out} is over {MAX_FILE_BYTES:,} bytes")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
