"""Load a GGUF into a Transformer and run sequences over it.

Weights are read tensor by tensor from the mapped file and dequantized straight onto their device, so
peak memory while loading is the loaded weights plus one tensor in flight.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tandem.engine.gguf_file import GGUFFile, read_gguf
from tandem.engine.model import ModelConfig, Transformer, rope_tables
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

    @property
    def device(self) -> torch.device:
        return self.devices[0]

    @property
    def output_device(self) -> torch.device:
        return self.devices[-1]

    def new_sequence(self, max_len: int | None = None) -> Sequence:
        n = min(max_len or self.config.context_length, self.config.context_length)
        cfg = self.config
        caches = []
        for dev in self.model.layer_devices:
            shape = (cfg.n_kv_heads, n, cfg.head_dim)
            caches.append((torch.zeros(shape, dtype=self.dtype, device=dev), torch.zeros(shape, dtype=self.dtype, device=dev)))
        return Sequence(self, caches, n)


class Sequence:
    """One session's tokens and KV cache. Rollback is O(1): only the length moves."""

    def __init__(self, engine: Engine, caches: list[tuple[Tensor, Tensor]], max_len: int) -> None:
        self.engine = engine
        self.caches = caches
        self.max_len = max_len
        self.tokens: list[int] = []

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
        ids = torch.tensor(tokens, dtype=torch.long, device=self.engine.device)
        outs = []
        for start in range(0, k, PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            logits = self.engine.model(chunk, len(self.tokens) + start, self.caches)
            outs.append(logits if all_logits else logits[-1:])
        self.tokens.extend(tokens)
        return outs[0] if len(outs) == 1 else (torch.cat(outs) if all_logits else outs[-1])


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blk.") else None


def load_engine(
    path: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    weights: str = "dequantized",
    threads: int | None = None,
) -> Engine:
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (use {', '.join(DTYPES)})")
    if weights not in ("dequantized", "quantized"):
        raise ValueError(f"--weights must be quantized or dequantized, not {weights!r}")
    torch.set_num_threads(threads or default_threads())
    devices = parse_devices(device)
    tdtype = DTYPES[dtype]
    gf = read_gguf(path)
    cfg = ModelConfig.from_gguf(gf.metadata, {n: t.shape for n, t in gf.tensors.items()})
    tokenizer = Tokenizer.from_gguf(gf.metadata)

    n_dev = len(devices)
    per = -(-cfg.n_layers // n_dev)
    layer_dev = [devices[min(i // per, n_dev - 1)] for i in range(cfg.n_layers)]
    model = Transformer(cfg)
    model.layer_devices = layer_dev

    def load(name: str, dev: torch.device, to_dtype: torch.dtype | None = None) -> Tensor:
        info = gf.tensors.get(name)
        if info is None:
            raise ValueError(f"{path}: missing tensor {name}")
        return dequantize(np.asarray(gf.raw(name)), info.ggml_type, info.shape, device=dev, dtype=to_dtype or tdtype)

    _load_weights(gf, cfg, model, layer_dev, devices, load)
    freq_factors = load("rope_freqs.weight", devices[0], torch.float32) if "rope_freqs.weight" in gf.tensors else None
    model.cos, model.sin = (t.to(devices[0]) for t in rope_tables(cfg, cfg.context_length, freq_factors))

    name = str(gf.metadata.get("general.name", Path(path).stem))
    eng = Engine(model, cfg, tokenizer, name, Path(path), devices, tdtype, weights, time.perf_counter() - t0)
    return eng


def _load_weights(gf: GGUFFile, cfg: ModelConfig, model: Transformer, layer_dev, devices, load) -> None:
    first, last = devices[0], devices[-1]
    model.tok_embd = load("token_embd.weight", first)
    model.output_norm = load("output_norm.weight", last)
    if "output.weight" in gf.tensors:
        model.output = load("output.weight", last)
    else:  # tied embeddings
        model.output = model.tok_embd if first == last else model.tok_embd.to(last)
    for i, blk in enumerate(model.layers):
        dev = layer_dev[i]
        p = f"blk.{i}."
        blk.attn_norm = load(p + "attn_norm.weight", dev)
        blk.ffn_norm = load(p + "ffn_norm.weight", dev)
        blk.wqkv = torch.cat([load(p + f"attn_{n}.weight", dev) for n in "qkv"])
        if cfg.attn_bias:
            blk.bqkv = torch.cat([load(p + f"attn_{n}.bias", dev) for n in "qkv"])
        blk.wo = load(p + "attn_output.weight", dev)
        blk.w13 = torch.cat([load(p + "ffn_gate.weight", dev), load(p + "ffn_up.weight", dev)])
        blk.w2 = load(p + "ffn_down.weight", dev)
        if cfg.qk_norm:
            blk.q_norm = load(p + "attn_q_norm.weight", dev)
            blk.k_norm = load(p + "attn_k_norm.weight", dev)
