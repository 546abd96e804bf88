"""Verify cost of a mixture-of-experts target with its routed experts on the CPU and the rest on the GPU
(llama.cpp's --cpu-moe rig), beside the same model all on the GPU.

A random-weight qwen3moe with Qwen3-30B-A3B's layer shape (hidden 2048, 32 query / 4 KV heads of 128,
128 experts of ffn 768, top-8), fewer layers, is written as a Q4_0 or Q4_K GGUF right here (random
blocks: seconds, no quantizer), then loaded with weights kept quantized in bfloat16. For each placement:
load time, resident memory (host anonymous memory grown by the load + GPU memory allocated) against the
file size, and the median milliseconds of a forward of k = 1, 2, 4, 8, 16 tokens after a prompt, with
the routed experts it touched per layer (their union grows with k: the verify-cost slope the coordinator's
tuner needs).

    python bench/moe.py [--layers 4] [--qtypes q4_0 q4_k] [--device cuda] [--out results.json]

Prints one table; on a machine without CUDA it runs the CPU rows only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.engine import moe
from tandem.engine.runtime import cpu_moe_rules, load_engine
from tools.write_gguf import random_model, write_gguf, write_tiny_tokenizer

KS = (1, 2, 4, 8, 16)
QWEN3_30B_A3B = dict(
    model_type="qwen3_moe", vocab_size=512, hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    norm_topk_prob=True, max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)  # fmt: skip


def anon_bytes() -> int:
    """Anonymous resident memory of this process (the weights we hold; file pages are not counted)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(path: Path, device: str, rules: list[str], context: int, reps: int) -> dict:
    release()
    host0 = anon_bytes()
    gpu0 = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    t0 = time.perf_counter()
    engine = load_engine(path, device=device, dtype="bfloat16", weights="quantized", override_tensor=rules)
    load_s = time.perf_counter() - t0
    host = anon_bytes() - host0
    gpu = (torch.cuda.memory_allocated() - gpu0) if device.startswith("cuda") else 0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    touched: list[int] = []  # distinct experts per MoE block, per forward
    forward = moe.Experts.forward

    def counting(self: moe.Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        touched.append(int(idx.unique().numel()))
        return forward(self, x, idx, w)

    seq = engine.new_sequence(context + 64)
    seq.forward([(i * 7919) % 500 + 3 for i in range(context)])
    ms, experts = {}, {}
    moe.Experts.forward = counting
    try:
        for k in KS:
            times, touched[:] = [], []
            for r in range(reps + 2):  # two warm-ups
                block = [(r * 31 + i * 17) % 500 + 3 for i in range(k)]  # other tokens each time: other experts
                sync()
                t = time.perf_counter()
                seq.forward(block)
                sync()
                if r >= 2:
                    times.append((time.perf_counter() - t) * 1e3)
                seq.truncate(context)
            ms[k] = statistics.median(times)
            experts[k] = statistics.mean(touched)
    finally:
        moe.Experts.forward = forward
    del engine, seq
    release()
    return {"load_s": load_s, "host": host, "gpu": gpu, "ms": ms, "experts": experts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--qtypes", nargs="+", default=["q4_0", "q4_k"], choices=["q4_0", "q4_k", "q8_0"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens before the timed forwards")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the GGUF (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(QWEN3_30B_A3B, num_hidden_layers=args.layers)
    gpu = args.device.startswith("cuda")
    placements = [("experts CPU, rest GPU", args.device, cpu_moe_rules()), ("all GPU", args.device, [])]
    if not gpu:
        placements = [("all CPU", "cpu", [])]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if gpu else ""), flush=True)  # fmt: skip

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tok = write_tiny_tokenizer(Path(tmp) / "tok.gguf")
        for qtype in args.qtypes:
            t0 = time.perf_counter()
            path = write_gguf(random_model(cfg, meta=True), Path(tmp) / f"moe-{qtype}.gguf", dtype=qtype,
                              tokenizer_from=tok, name=f"random Qwen3-30B-A3B shape, {args.layers} layers")  # fmt: skip
            size = path.stat().st_size
            print(f"wrote {qtype}: {size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s", flush=True)
            for label, device, rules in placements:
                r = measure(path, device, rules, args.context, args.reps)
                r.update(qtype=qtype, placement=label, file=size)
                rows.append(r)
                print(json.dumps(r), flush=True)
            path.unlink()

    head = f"{'file':5} {'placement':22} {'load s':>6} {'host MiB':>8} {'GPU MiB':>8} {'mem/file':>8}"
    head += "".join(f" {'k=' + str(k):>8}" for k in KS) + "   experts touched/layer (k=1..16)"
    print(f"\n{args.layers} layers of Qwen3-30B-A3B (128 experts, top-8), bfloat16, weights quantized; ms per forward")
    print(head)
    for r in rows:
        mem = (r["host"] + r["gpu"]) / r["file"]
        line = f"{r['qtype']:5} {r['placement']:22} {r['load_s']:6.1f} {r['host'] / 2**20:8.0f} {r['gpu'] / 2**20:8.0f}"
        line += f" {mem:8.2f}" + "".join(f" {r['ms'][k]:8.1f}" for k in KS)
        line += "   " + " ".join(f"{r['experts'][k]:.0f}" for k in KS)
        print(line)
    if args.out:
        args.out.write_text(json.dumps({"layers": args.layers, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
