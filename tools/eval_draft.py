"""Measure a draft against its target: greedy speculative rounds on held-out chat prompts, with our engine.

Runs the real loop in one process (no network): the draft proposes k tokens one forward at a time, the
target checks them in one forward (`tandem.acceptance.verify_greedy`), both roll back to what was
accepted. Reports accepted/proposed, the per-token acceptance rate alpha (accepted over tokens checked:
each round checks its accepted tokens plus the first rejected one), and the mean tokens per round.

    python -m tools.eval_draft --draft models/smollm2-draft.Q4_1.gguf --skip 64 --n 24
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tandem.acceptance import verify_greedy
from tandem.engine.runtime import Sequence, load_engine
from tools.draft_prompts import read_jsonl_gz
from tools.gen_draft_data import chat_ids, default_target


def feed(seq: Sequence, context: list[int], extra: list[int]) -> torch.Tensor:
    """Bring `seq` to context + extra (it holds a prefix of context); logits of the tokens appended."""
    return seq.forward(context[len(seq) :] + extra)


def speculate(
    target: Sequence, draft: Sequence, prompt: list[int], k: int, max_new: int, eos: set[int]
) -> tuple[dict[str, int], list[int]]:
    """One greedy reply by speculative rounds: (counts, reply). Both caches hold every committed token but the last."""
    first = int(target.forward(prompt)[-1].argmax())
    draft.forward(prompt[:-1])
    ctx = [*prompt, first]
    stats = {"rounds": 0, "proposed": 0, "accepted": 0, "checked": 0, "new": 1}
    while ctx[-1] not in eos and stats["new"] < max_new:
        kk = min(k, max_new - stats["new"])
        props: list[int] = []
        logits = feed(draft, ctx, [])
        for _ in range(kk):
            props.append(int(logits[-1].argmax()))
            if len(props) < kk:
                logits = draft.forward(props[-1:])
        base = len(ctx) - 1  # the target holds ctx[:-1]
        n_acc, nxt = verify_greedy(feed(target, ctx, props)[-(kk + 1) :], props)
        target.truncate(base + 1 + n_acc)
        new = [*props[:n_acc], nxt]
        for i, t in enumerate(new):  # an accepted end-of-turn ends the reply
            if t in eos:
                new = new[: i + 1]
                break
        new = new[: max_new - stats["new"]]
        ctx += new
        draft.truncate(min(len(draft), len(ctx) - 1))
        stats["rounds"] += 1
        stats["proposed"] += kk
        stats["accepted"] += n_acc
        stats["checked"] += n_acc + (n_acc < kk)
        stats["new"] += len(new)
    return stats, ctx[len(prompt) :]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.eval_draft", description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", type=Path, default=Path("models/smollm2-draft.Q4_1.gguf"))
    ap.add_argument("--target", type=Path, default=None, help="target GGUF (default: the SmolLM2 demo model)")
    ap.add_argument("--prompts", type=Path, default=Path("data/draft/heldout.jsonl.gz"))
    ap.add_argument("--skip", type=int, default=64, help="held-out prompts to skip (gen_draft_data used them)")
    ap.add_argument("--n", type=int, default=24, help="prompts to run")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--head-rows", type=int, default=None, help="the draft's head keeps only its first rows")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    target_path = args.target or default_target()
    for path in (args.draft, target_path, args.prompts):
        if not Path(path).exists():
            ap.error(f"{path} does not exist")
    if args.k < 1 or args.n < 1:
        ap.error("--k and --n must be at least 1")
    target = load_engine(target_path, threads=args.threads)
    draft = load_engine(args.draft, threads=args.threads, head_rows=args.head_rows)
    if draft.tokenizer.fingerprint != target.tokenizer.fingerprint:
        ap.error("the draft's vocabulary differs from the target's")
    items = read_jsonl_gz(args.prompts)[args.skip : args.skip + args.n]
    eos = set(target.tokenizer.eos_ids)
    total = {"rounds": 0, "proposed": 0, "accepted": 0, "checked": 0, "new": 0}
    t0 = time.perf_counter()
    for i, item in enumerate(items):
        prompt = chat_ids(target.tokenizer, item["prompt"])
        tseq = target.new_sequence(len(prompt) + args.max_new + args.k + 2)
        dseq = draft.new_sequence(len(prompt) + args.max_new + args.k + 2)
        s, _ = speculate(tseq, dseq, prompt, args.k, args.max_new, eos)
        for key in total:
            total[key] += s[key]
        alpha = total["accepted"] / max(total["checked"], 1)
        print(
            f"[{i + 1}/{len(items)}] {item['source']:12s} accepted {s['accepted']}/{s['proposed']} "
            f"in {s['rounds']} rounds, {s['new']} tokens; so far alpha {alpha:.3f}, "
            f"accepted/proposed {total['accepted'] / max(total['proposed'], 1):.3f}",
            flush=True,
        )
    rounds = max(total["rounds"], 1)
    result = {
        "prompts": len(items),
        "k": args.k,
        "rounds": total["rounds"],
        "accepted_over_proposed": total["accepted"] / max(total["proposed"], 1),
        "alpha": total["accepted"] / max(total["checked"], 1),
        "accepted_per_round": total["accepted"] / rounds,
        "tokens_per_round": (total["new"] - len(items)) / rounds,  # the first token comes from the prefill
        "tokens": total["new"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
