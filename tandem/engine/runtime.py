"""Load a GGUF into a Transformer and run sequences over it.

Weights are read tensor by tensor from the mapped file and dequantized straight onto their device, so
peak memory while loading is the loaded weights plus one tensor in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GT
from torch import Tensor

from tandem.engine import cpu_kernels, cuda_attention
from tandem.engine.gguf_file import GGUFFile, TensorInfo, read_gguf
from tandem.engine.model import MOE_ARCHS, Block, Embedding, ModelConfig, Transformer, attention_span, rope_tables
from tandem.engine.qlinear import HEADER_BYTES, PACKED_TYPES, Linear, can_rebuild_rows, packed_linear
from tandem.engine.quants import dequantize
from tandem.engine.tokenizer import Tokenizer

log = logging.getLogger("tandem.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFILL_CHUNK = 256


def parse_devices(device: str) -> list[torch.device]:
    """'cpu', 'cuda', 'cuda:1' or a comma list 'cuda:0,cuda:1' (layers split evenly across them)."""
    devs = [torch.device(d.strip()) for d in device.split(",") if d.strip()]
    if not devs:
        raise ValueError(f"no device in {device!r}")
    for d in devs:
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {d} requested but CUDA is not available")
        if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {d} requested but only {torch.cuda.device_count()} CUDA devices exist")
        if d.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {d} (use cpu, cuda or cuda:N)")
    return devs


def placement_device(name: str) -> torch.device:
    """A device of a --override-tensor rule: llama.cpp's names (CPU, CUDA0) or torch's (cpu, cuda, cuda:1)."""
    s = name.strip().lower()
    if m := re.fullmatch(r"cuda(\d+)", s):
        s = f"cuda:{m[1]}"
    if s != "cpu" and not re.fullmatch(r"cuda(:\d+)?", s):
        raise ValueError(f"unknown device {name!r} in --override-tensor (use CPU, CUDA0, cuda or cuda:N)")
    return parse_devices(s)[0]


def parse_overrides(rules: Iterable[str]) -> list[tuple[re.Pattern[str], torch.device]]:
    """llama.cpp's --override-tensor: REGEX=DEVICE rules (also comma-joined), searched in tensor names in order."""
    out = []
    for rule in rules:
        for part in rule.split(","):
            pattern, eq, dev = part.strip().rpartition("=")
            if not eq or not pattern or not dev.strip():
                raise ValueError(f"--override-tensor {part!r}: expected REGEX=DEVICE")
            try:
                rx = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"--override-tensor {part!r}: bad regular expression: {e}") from None
            out.append((rx, placement_device(dev)))
    return out


EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_exps"


def cpu_moe_rules(n_blocks: int | None = None) -> list[str]:
    """llama.cpp's --cpu-moe (all routed experts on the CPU) or --n-cpu-moe N (those of blocks 0..N-1)."""
    if n_blocks is None:
        return [EXPS_REGEX + "=CPU"]
    return [rf"blk\.{i}{EXPS_REGEX}=CPU" for i in range(n_blocks)]


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Engine:
    model: Transformer
    config: ModelConfig
    tokenizer: Tokenizer
    name: str
    path: Path
    devices: list[torch.device]
    dtype: torch.dtype
    weights: str
    load_seconds: float
    dequantized_tensors: list[str] = field(default_factory=list)
    input_device: torch.device | None = None  # where token ids go (the embedding's device)
    cuda_graphs: bool = False  # decode/verify blocks replay captured graphs (one CUDA device only)
    pool: list[Sequence] = field(default_factory=list)  # released sequences, reused by new ones

    def compile(self) -> float:
        """Compile each transformer block in place; returns seconds. The blocks share one code object and
        their weights are graph inputs, so one compiled graph (sizes symbolic) serves every block, k and
        length: 20 s at start-up on 2 CPU cores, where compiling the whole forward took 60-280 s and
        recompiled per length class. On CUDA the compiled blocks run inside the captured graphs."""
        t0 = time.perf_counter()
        for layer in self.model.layers:
            layer.compile(dynamic=True)
        self.model.logits = torch.compile(self.model.logits, dynamic=True)
        # Each path once, so that no session waits on a compile: a prompt at 0, a decode and a verify block
        # (graphs on CUDA), a block too long for a graph but short enough for cuda_attention, a prompt chunk
        # past 0, then a decode and a verify block over the whole cache. 512 rows: a multiple of 16 like
        # context lengths, which Triton specializes on. Sizes that happen to be equal in one call (a 64-row
        # attention span and head_dim 64) are not assumed equal for good (duck shapes), or each call that
        # breaks the coincidence would recompile. Combo kernels launch independent small kernels as one
        # (412 -> 352 a decode step).
        with (
            torch.fx.experimental._config.patch(use_duck_shape=False),
            torch._inductor.config.patch(combo_kernels=self.cuda_graphs),
        ):
            seq = self.new_sequence(512)
            steps = [40, 1, 2, 20, 36]
            half = seq.max_len // 2 + 1 - sum(steps)  # to a length past half the cache: the next span is all
            for k in [*steps, half, 1, 2] if half > 0 else [1, 2]:
                seq.forward([0] * k)
            # Every graph size once: Triton builds kernels per alignment of their inputs (the positions
            # follow k token ids), and a build on a session's first call stalled it for about half a second.
            for k in GRAPH_SIZES if self.cuda_graphs else ():
                seq.forward([0] * k)
                seq.truncate(len(seq) - k)
        return time.perf_counter() - t0

    @property
    def device(self) -> torch.device:
        return self.devices[0]

    @property
    def output_device(self) -> torch.device:
        return self.model.output_norm.device

    def new_sequence(self, max_len: int | None = None) -> Sequence:
        n = min(max_len or self.config.context_length, self.config.context_length)
        for i, seq in enumerate(self.pool):
            if seq.max_len == n:
                del self.pool[i]
                return seq
        cfg = self.config
        caches = []
        v_dim = 0 if cfg.kv_lora_rank else cfg.head_dim  # MLA caches one latent row per token (moe.py)
        # Graphs attend over the whole cache (masked), so its rows must hold numbers; the eager path reads only
        # rows below the length, so it skips zero-filling a cache of hundreds of MB on every new session.
        alloc = torch.zeros if self.cuda_graphs else torch.empty
        # Keys transposed (model.self_attention); MLA's latent rows as they are.
        k_shape = (cfg.n_kv_heads, n, cfg.head_dim) if cfg.kv_lora_rank else (cfg.n_kv_heads, cfg.head_dim, n)
        for dev in self.model.layer_devices:
            caches.append(
                (
                    alloc(k_shape, dtype=self.dtype, device=dev),
                    alloc((cfg.n_kv_heads, n, v_dim), dtype=self.dtype, device=dev),
                )
            )
        return Sequence(self, caches, n)

    def release(self, seq: Sequence) -> None:
        """Keep a finished sequence's cache, and the CUDA graphs captured on it, for the next new_sequence:
        capturing a session's graphs costs far more than its decode steps. Stale cache rows are harmless
        (positions past the length are masked, and overwritten before use). Call from the forward thread."""
        seq.truncate(0)
        if len(self.pool) < POOL_SIZE and seq.engine is self:
            self.pool.append(seq)


# CUDA graphs serve blocks up to a verify of k = 16 (17 tokens), padded up to one of these sizes; longer
# blocks (prompts) run eagerly. A graph attends over the cache rows up to a power of two (at least
# GRAPH_MIN_SPAN) that holds the block: over all 8,192 rows, SmolLM2's decode step took 2.5 ms on an H100
# instead of 1.1. A session captures a graph per (size, span) it meets, ~35 ms each.
GRAPH_SIZES = (1, 2, 3, 5, 9, 17)
GRAPH_MIN_SPAN = 256
POOL_SIZE = 4  # released sequences kept for reuse (a cache and its graphs each)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor  # [2, k] on the device: token ids, then positions
    staging: Tensor  # the same in pinned host memory, so one asynchronous copy carries both
    copied: torch.cuda.Event  # recorded after that copy: the staging rows are free again
    logits: Tensor


class Sequence:
    """One session's tokens and KV cache. Rollback is O(1): only the length moves."""

    def __init__(self, engine: Engine, caches: list[tuple[Tensor, Tensor]], max_len: int) -> None:
        self.engine = engine
        self.caches = caches
        self.max_len = max_len
        self.tokens: list[int] = []
        self.finite = 0  # cache rows known to hold numbers (written, or zeroed for model.attention_span)
        self._graphs: dict[tuple[int, int], _Graph] = {}  # per (block size, span), captured on first use (CUDA)
        self._mempool: tuple[int, int] | None = None  # one memory pool for them: they never run at once

    def _graph(self, k: int) -> _Graph:
        end = len(self.tokens) + k
        if self.engine.model.needs_mask(k):
            span = min(max(GRAPH_MIN_SPAN, 1 << (end - 1).bit_length()), self.max_len)
        else:  # cuda_attention reads the live rows whatever the span
            span = self.max_len
        g = self._graphs.get((k, span))
        if g is None:
            t0 = time.perf_counter()
            dev = self.engine.device
            inputs = torch.zeros(2, k, dtype=torch.long, device=dev)
            tokens, pos = inputs
            pos.copy_(torch.arange(k, device=dev) + len(self.tokens))
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            model = self.engine.model
            with torch.cuda.stream(stream):  # warm up (and compile) outside the capture
                model(tokens, pos, self.caches, span)
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            self._mempool = self._mempool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._mempool):
                logits = model(tokens, pos, self.caches, span)
            staging = torch.zeros(2, k, dtype=torch.long, pin_memory=True)
            g = self._graphs[k, span] = _Graph(graph, inputs, staging, torch.cuda.Event(), logits)
            ms = 1e3 * (time.perf_counter() - t0)
            log.debug("captured a %d-token graph over %d cache rows in %.1f ms", k, span, ms)
        return g

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= len(self.tokens):
            raise ValueError(f"cannot truncate a sequence of {len(self.tokens)} tokens to {n}")
        del self.tokens[n:]

    @torch.inference_mode()
    def forward(self, tokens: list[int], all_logits: bool = True) -> Tensor:
        """Append tokens; float32 logits [k, vocab] (or [1, vocab] for the last one) on the output device."""
        k = len(tokens)
        if k == 0:
            raise ValueError("forward needs at least one token")
        if len(self.tokens) + k > self.max_len:
            raise ValueError(f"context full: {len(self.tokens)} + {k} tokens exceeds {self.max_len}")
        vocab = self.engine.config.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"token id out of range [0, {vocab})")
        size = next((n for n in GRAPH_SIZES if n >= k), 0) if self.engine.cuda_graphs else 0
        if size and len(self.tokens) + size <= self.max_len:
            # Padding positions write cache rows past the live length: harmless, overwritten before use.
            g = self._graph(size)
            g.copied.synchronize()  # long done: the last replay's logits were read
            rows = g.staging.numpy()
            rows[0, :k], rows[0, k:] = tokens, 0
            rows[1] = np.arange(len(self.tokens), len(self.tokens) + size)
            g.inputs.copy_(g.staging, non_blocking=True)
            g.copied.record()
            g.graph.replay()
            self.tokens.extend(tokens)
            return g.logits[:k].clone() if all_logits else g.logits[k - 1 : k].clone()
        end = len(self.tokens) + k
        span = attention_span(end, self.caches[0][1]) if self.engine.model.needs_mask(k) else end
        if span > max(end, self.finite):  # padded attention reads rows past the length: no NaN garbage there
            lo = max(self.finite, len(self.tokens))  # rows below the length hold what was written
            key_dim = 1 if self.engine.config.kv_lora_rank else 2
            for kc, vc in self.caches:
                kc.narrow(key_dim, lo, span - lo).zero_()
                vc[:, lo:span].zero_()
            self.finite = span
        ids = torch.tensor(tokens, dtype=torch.long, device=self.engine.input_device or self.engine.device)
        outs = []
        for start in range(0, k, PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            logits = self.engine.model(chunk, len(self.tokens) + start, self.caches)
            outs.append(logits if all_logits else logits[-1:])
        self.tokens.extend(tokens)
        return outs[0] if len(outs) == 1 else (torch.cat(outs) if all_logits else outs[-1])


def _trim_heap() -> None:
    """Hand the loader's freed scratch (unpacked codes, per-tensor copies) back to the OS: glibc keeps it
    in its arenas otherwise, and resident memory would stay near twice the weights after a quantized load."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _mapped(gf: GGUFFile, name: str, dev: torch.device) -> Tensor:
    """A tensor's raw bytes: on the CPU a view of the mapped file (read, never written), not an anonymous copy."""
    with warnings.catch_warnings():  # torch warns that the read-only map is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(gf.raw(name)).to(dev)


def _row_bytes(t: TensorInfo) -> int:
    block, size = GGML_QUANT_SIZES[t.ggml_type]
    return t.shape[1] // block * size


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blk.") else None


def load_engine(
    path: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    weights: str = "dequantized",
    threads: int | None = None,
    compile: bool = False,
    override_tensor: Iterable[str] = (),
    head_rows: int | None = None,
) -> Engine:
    """override_tensor: llama.cpp-style REGEX=DEVICE placement rules (first match wins); the rest is on `device`.

    head_rows: keep at most the output head's first rows, so logits cover token ids [0, head_rows). For a
    draft: its head is much of its cost, and BPE ids run roughly in merge (frequency) order, so the first
    rows hold the tokens a draft gets accepted with. Every id can still be fed in.
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (use {', '.join(DTYPES)})")
    if weights not in ("dequantized", "quantized"):
        raise ValueError(f"--weights must be quantized or dequantized, not {weights!r}")
    torch.set_num_threads(threads or default_threads())
    devices = parse_devices(device)
    rules = parse_overrides(override_tensor)
    tdtype = DTYPES[dtype]
    gf = read_gguf(path)
    cfg = ModelConfig.from_gguf(gf.metadata, {n: t.shape for n, t in gf.tensors.items()})
    tokenizer = Tokenizer.from_gguf(gf.metadata)

    n_dev = len(devices)
    per = -(-cfg.n_layers // n_dev)
    layer_dev = [devices[min(i // per, n_dev - 1)] for i in range(cfg.n_layers)]
    model = Transformer(cfg)
    place = _placement(gf, cfg, rules, layer_dev)
    model.layer_devices = [p[0] for p in place.layers]
    model.kernel_attention = not cfg.kv_lora_rank and all(cuda_attention.available(d) for d in model.layer_devices)
    # Our CPU attention: bfloat16 or float32 caches, head dims a multiple of 32 up to 256, GQA (not MLA).
    cpu_ok = (
        any(d.type == "cpu" for d in model.layer_devices)
        and not cfg.kv_lora_rank
        and tdtype in (torch.bfloat16, torch.float32)
        and cfg.head_dim % 32 == 0
        and cfg.head_dim <= 256
        and cpu_kernels.available()
    )
    for layer, dev in zip(model.layers, model.layer_devices, strict=True):
        layer.cpu_attention = cpu_ok and dev.type == "cpu"
    model.cpu_attention = all(layer.cpu_attention for layer in model.layers)

    if head_rows is not None and head_rows < 1:
        raise ValueError(f"head_rows must be at least 1, got {head_rows}")
    if head_rows is not None and head_rows >= cfg.vocab_size:
        head_rows = None
    elif head_rows is not None:
        log.info("output head: the first %d of %d rows (token ids below %d)", head_rows, cfg.vocab_size, head_rows)
    dequantized = _load_weights(gf, model, place, tdtype, weights == "quantized", head_rows)
    freq_factors = None
    if "rope_freqs.weight" in gf.tensors:
        t = gf.tensors["rope_freqs.weight"]
        freq_factors = dequantize(gf.raw(t.name), t.ggml_type, t.shape)
    model.cos, model.sin = (t.to(place.embed) for t in rope_tables(cfg, cfg.context_length, freq_factors))
    _trim_heap()  # after the rope tables too: their float64 scratch would stay in the heap
    if dequantized:
        log.info("dequantized at load (no packed kernel for their type): %s", ", ".join(dequantized))
    name = str(gf.metadata.get("general.name", Path(path).stem))
    secs = time.perf_counter() - t0
    engine = Engine(model, cfg, tokenizer, name, Path(path), devices, tdtype, weights, secs, dequantized)
    engine.input_device = place.embed
    if rules:
        where = {"experts": {str(p[2]) for p in place.layers}, "attention": {str(p[0]) for p in place.layers}}
        log.info(
            "placement rules: %d; %s", len(rules), "; ".join(f"{k} on {', '.join(sorted(v))}" for k, v in where.items())
        )
    if any(getattr(m, "ours", False) for m in model.modules()):  # our int4 matmul serves some weights
        engine.load_seconds += _tune_cpu_kernels(engine)
    if compile and (rules or cfg.arch in MOE_ARCHS):
        # Routing sizes are data-dependent (one host sync per MoE block) and rules move activations.
        log.info("compile skipped: MoE routing and placement rules run eagerly")
    elif compile:
        # On one CUDA device, decode and verify blocks then replay graphs captured per session on first use.
        engine.cuda_graphs = len(devices) == 1 and devices[0].type == "cuda"
        engine.load_seconds += engine.compile()
    return engine


def _tune_cpu_kernels(engine: Engine) -> float:
    """Time a decode step under each tiling of our int4 matmul and keep the fastest (before any compile, which
    bakes it in); returns seconds."""
    t0 = time.perf_counter()
    seq = engine.new_sequence(64)
    seq.forward([0] * 8, all_logits=False)

    def step() -> None:
        seq.forward([0], all_logits=False)
        seq.truncate(8)

    medians = cpu_kernels.tune(step)
    engine.release(seq)
    log.debug(
        "int4 matmul: tiles of up to %d blocks (decode step %s ms)",
        cpu_kernels.BLOCKS,
        ", ".join(f"{b}: {1e3 * t:.2f}" for b, t in medians.items()),
    )
    return time.perf_counter() - t0


@dataclass
class _Placement:
    embed: torch.device
    output: torch.device
    layers: list[tuple[torch.device, torch.device, torch.device]]  # per block: attention, FFN, routed experts


def _placement(
    gf: GGUFFile, cfg: ModelConfig, rules: list[tuple[re.Pattern[str], torch.device]], layer_dev: list[torch.device]
) -> _Placement:
    """Each tensor's device (first matching rule, else the default), checked per group of fused tensors.

    A block has three groups: attention (with its KV cache), FFN (norm, router, shared and dense FFN) and
    routed experts; the tensors of a group are fused or chained, so they share a device. Dense blocks are
    placed whole.
    """

    def indexed(dev: torch.device) -> torch.device:
        # "cuda" means the current one: compare equal to tensors' devices, so nothing moves needlessly.
        return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev

    def place(name: str, default: torch.device) -> torch.device:
        return indexed(next((dev for rx, dev in rules if rx.search(name)), default))

    def one(names: list[str], default: torch.device, what: str) -> torch.device:
        devs = {place(n, default) for n in names}
        if len(devs) > 1:
            listing = ", ".join(f"{n}={place(n, default)}" for n in names)
            raise ValueError(f"--override-tensor splits {what} across devices ({listing}); place them together")
        return devs.pop() if devs else indexed(default)

    by_layer: list[list[str]] = [[] for _ in range(cfg.n_layers)]
    for name in gf.tensors:
        if (i := _layer_of(name)) is not None and i < cfg.n_layers:
            by_layer[i].append(name)
    layers = []
    for i, names in enumerate(by_layer):
        default = layer_dev[i]
        attn = [n for n in names if n.split(".")[2].startswith("attn")]
        exps = [n for n in names if re.search(EXPS_REGEX, n)]
        ffn = [n for n in names if n not in attn and n not in exps]
        if cfg.arch not in MOE_ARCHS:
            dev = one(names, default, f"block {i} (placed whole for {cfg.arch})")
            layers.append((dev, dev, dev))
        else:
            a = one(attn, default, f"block {i}'s attention")
            f = one(ffn, default, f"block {i}'s FFN")
            layers.append((a, f, one(exps, default, f"block {i}'s routed experts")))
    out_names = [n for n in ("output_norm.weight", "output.weight") if n in gf.tensors]
    return _Placement(
        embed=place("token_embd.weight", layer_dev[0]),
        output=one(out_names, layer_dev[-1], "the output head"),
        layers=layers,
    )


def _load_weights(
    gf: GGUFFile, model: Transformer, place: _Placement, dtype: torch.dtype, quantized: bool, head_rows: int | None
) -> list[str]:
    """Attach every weight to the model; returns the names of tensors dequantized despite `quantized`."""
    cfg = model.cfg
    first, last = place.embed, place.output
    dequantized: list[str] = []

    def info(name: str) -> TensorInfo:
        if name not in gf.tensors:
            raise ValueError(f"{gf.path}: missing tensor {name}")
        return gf.tensors[name]

    def dense(name: str, dev: torch.device, to: torch.dtype | None = None) -> Tensor:
        t = info(name)
        return dequantize(gf.raw(name), t.ggml_type, t.shape, device=dev, dtype=to or dtype)

    def linear(names: list[str], dev: torch.device, bias: list[str] | None = None, rows: int | None = None) -> Linear:
        """The tensors stacked as one projection; rows: only each one's first rows (a prefix of its bytes, as
        rows are stored whole)."""
        infos = [info(n) for n in names]
        b = torch.cat([dense(n, dev) for n in bias]) if bias else None
        shapes = [t.shape if rows is None else (rows, t.shape[1]) for t in infos]
        ends = [None if rows is None else rows * _row_bytes(t) for t in infos]
        qtypes = {t.ggml_type for t in infos}
        if quantized and len(qtypes) == 1 and infos[0].ggml_type in PACKED_TYPES:
            raws = [_mapped(gf, n, dev)[:end] for n, end in zip(names, ends, strict=True)]
            lin = packed_linear(raws, infos[0].ggml_type, shapes, dtype)
            lin.bias = b
            return lin
        if quantized:
            dequantized.extend(
                f"{n} ({t.ggml_type.name})"
                for n, t in zip(names, infos, strict=True)
                if t.ggml_type not in (GT.F32, GT.F16, GT.BF16)
            )
        parts = [
            dequantize(gf.raw(n)[:end], t.ggml_type, shape, device=dev, dtype=dtype)
            for n, t, shape, end in zip(names, infos, shapes, ends, strict=True)
        ]
        return Linear(torch.cat(parts), b)

    emb = info("token_embd.weight")
    tied = "output.weight" not in gf.tensors
    quant_emb = quantized and emb.ggml_type not in (GT.F32, GT.F16, GT.BF16)
    model.output_norm = dense("output_norm.weight", last)
    if tied and first == last and quant_emb and head_rows is None:  # the head holds the table; lookups read it
        model.output = linear([emb.name], last)
        model.embed = _tied_embedding(gf, emb, model.output, first, dtype)
    elif tied and first == last and not quant_emb:
        model.embed = Embedding(dense(emb.name, first))
        table = model.embed.weight
        model.output = Linear(table if head_rows is None else table[:head_rows])  # tied: one storage
    else:
        if quant_emb:
            rows = torch.from_numpy(np.array(gf.raw(emb.name))).to(first).view(emb.shape[0], -1)
            model.embed = Embedding(None, rows, int(emb.ggml_type), emb.shape[1], dtype)
        else:
            model.embed = Embedding(dense(emb.name, first))
        model.output = linear([emb.name] if tied else ["output.weight"], last, rows=head_rows)
    for i, blk in enumerate(model.layers):
        if not isinstance(blk, Block):
            from tandem.engine.moe import load_block

            load_block(blk, gf, place.layers[i], dense, linear, quantized, dtype, dequantized)
            continue
        dev = place.layers[i][0]
        p = f"blk.{i}."
        blk.attn_norm = dense(p + "attn_norm.weight", dev)
        blk.ffn_norm = dense(p + "ffn_norm.weight", dev)
        qkv = [p + f"attn_{n}.weight" for n in "qkv"]
        blk.wqkv = linear(qkv, dev, [p + f"attn_{n}.bias" for n in "qkv"] if cfg.attn_bias else None)
        blk.wo = linear([p + "attn_output.weight"], dev)
        blk.w13 = linear([p + "ffn_gate.weight", p + "ffn_up.weight"], dev)
        blk.w2 = linear([p + "ffn_down.weight"], dev)
        if cfg.qk_norm:
            blk.q_norm = dense(p + "attn_q_norm.weight", dev)
            blk.k_norm = dense(p + "attn_k_norm.weight", dev)
    return dequantized


def _tied_embedding(gf: GGUFFile, emb: TensorInfo, head: Linear, dev: torch.device, dtype: torch.dtype) -> Embedding:
    """The embedding of a quantized table tied to the head: its lookups give, bit for bit, the file's rows.

    The head holds the table; the embedding keeps only each block's header bytes (scales, mins) and reads
    the codes back out of the head's CPU int4 packing. CUDA's tiled packing is not read back: the file's
    rows are kept beside it there.
    """
    if head.parts is None:  # dequantized at load (no packed kernel for its type): the same values
        return Embedding(head.weight)
    n, k = emb.shape
    raw = gf.raw(emb.name)
    if can_rebuild_rows(head):
        block, size = GGML_QUANT_SIZES[emb.ggml_type]
        headers = np.ascontiguousarray(raw.reshape(n, k // block, size)[..., : HEADER_BYTES[emb.ggml_type]])
        return Embedding(None, torch.from_numpy(headers).to(dev), int(emb.ggml_type), k, dtype, head=head)
    rows = torch.from_numpy(np.array(raw)).to(dev).view(n, -1)
    return Embedding(None, rows, int(emb.ggml_type), k, dtype)
