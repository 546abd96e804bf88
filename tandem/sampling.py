"""Sampling distributions for speculative decoding.

The target's distribution p comes from the request's sampler; the draft's distribution q is a
top-k-truncated, temperature-scaled softmax whose support is small enough to travel as sparse
(ids, probs). Both must be known exactly for the acceptance rule to be lossless.

Target sampler order (vLLM's, the classic v0 sampler): temperature, then top-k, then top-p, then
min-p. llama.cpp's default chain differs (top-k, top-p, min-p on the unscaled logits, temperature
last); the two agree whenever temperature is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

__all__ = ["SamplingParams", "draft_distribution", "draw", "make_generator", "sample", "target_probs"]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampler. temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 mean off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        t = _number("temperature", self.temperature)
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        p = _number("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        m = _number("min_p", self.min_p)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() < 1 or logits.shape[-1] == 0:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor [..., vocab] with vocab > 0, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _softmax_(x: Tensor) -> Tensor:
    """Softmax over the last dim, in place: fresh vocabulary-sized buffers cost page faults on a CPU."""
    # torch.softmax on CPU forks its thread pool even for a few short rows, which costs
    # milliseconds on a busy host; these element-wise ops only go parallel on large inputs.
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


TOP_P_WINDOWS = (256, 4096)


def _top_p_sorted(probs: Tensor, top_p: float) -> Tensor:
    """Mask of what top-p drops, from a stable sort of the whole vocabulary."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(-1) - sorted_p
    return torch.empty_like(before, dtype=torch.bool).scatter_(-1, order, before >= top_p)


def _top_p_(probs: Tensor, top_p: float) -> None:
    """Keep the smallest prefix (by descending prob, ties by id) whose mass reaches top_p, in place.

    Token i stays while the mass strictly before it is short of top_p; the top token always stays.
    A CPU core sorts a 49k vocabulary in 4 ms a row, so there each row's prefix is first sought among
    its likeliest tokens, in windows of TOP_P_WINDOWS: where it ends inside a window on a value strictly
    above the next one, it is every token at or above that value, the set the sort gives; only rows no
    window settles are sorted. A GPU sorts in microseconds, and the windows' checks would cost it syncs.
    """
    vocab = probs.shape[-1]
    if probs.device.type != "cpu":
        probs.masked_fill_(_top_p_sorted(probs, top_p), 0.0)
        return
    rows = probs.view(-1, vocab)  # probs is ours and contiguous: writes to rows land in it
    left = torch.arange(rows.shape[0])
    for window in TOP_P_WINDOWS:
        if window >= vocab or not len(left):
            break
        sub = rows[left]
        vals = sub.topk(window, dim=-1).values  # descending; tied tokens hold equal values, so sums agree
        kept = ((vals.cumsum(-1) - vals) < top_p).sum(-1, keepdim=True)
        last = vals.gather(-1, kept - 1)
        ok = ((kept < window) & (last > vals.gather(-1, kept.clamp_max(window - 1)))).squeeze(-1)
        done = sub[ok]
        rows[left[ok]] = done.masked_fill_(done < last[ok], 0.0)
        left = left[~ok]
    if len(left):
        sub = rows[left]
        rows[left] = sub.masked_fill_(_top_p_sorted(sub, top_p), 0.0)


def target_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The request's sampling distribution for every row of logits [..., V] -> float32 probs [..., V].

    Greedy gives the one-hot of the argmax, so greedy and sampled verification share one rule.
    """
    _check_logits(logits)
    params.validate()
    logits = logits.float()
    vocab = logits.shape[-1]
    if params.greedy:
        out = torch.zeros_like(logits)
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    x = logits / params.temperature
    if 0 < params.top_k < vocab:
        # Ties with the k-th value are all kept, so the result does not depend on sort order.
        kth = x.topk(params.top_k, dim=-1).values[..., -1:]
        x.masked_fill_(x < kth, -math.inf)
    probs = _softmax_(x)
    if params.top_p < 1.0:
        _top_p_(probs, params.top_p)
    if params.min_p > 0.0:
        # Relative to the top token, so renormalising after top-k/top-p would not change it.
        pmax = probs.amax(-1, keepdim=True)
        probs.masked_fill_(probs < params.min_p * pmax, 0.0)
    return probs.div_(probs.sum(-1, keepdim=True))


def draft_distribution(logits: Tensor, temperature: float, top_k: int) -> tuple[Tensor, Tensor]:
    """The draft's exact proposal q as sparse (ids int64 [..., m], probs float32 [..., m]).

    q is softmax(logits / temperature) restricted to the top_k logits (top_k 0 = whole vocab), ids
    in descending probability. Temperature 0 gives the argmax with probability 1.
    """
    _check_logits(logits)
    t = _number("temperature", temperature)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"draft temperature must be finite and >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"draft top_k must be an integer >= 0 (0 = whole vocabulary), got {top_k!r}")
    logits = logits.float()
    if t == 0:
        ids = logits.argmax(-1, keepdim=True)
        return ids, torch.ones(ids.shape, dtype=torch.float32, device=logits.device)
    vocab = logits.shape[-1]
    m = vocab if top_k == 0 else min(top_k, vocab)
    values, ids = logits.topk(m, dim=-1)
    return ids, _softmax_(values / t)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on the device that samples there; seeded runs replay exactly on the same device."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def draw(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of non-negative weights [..., V] (any positive total), as a device tensor [...].

    Inverts the float64 cumulative sum at a uniform point: one random number per row, where the
    exponential race drew one per token (1.2 ms over a 49k vocabulary on one core, against 0.07 ms), and
    no input checks that read values back to the host (torch.multinomial's cost a device sync). A token
    of weight 0 spans an empty interval, so it is never drawn.
    """
    cdf = weights.double().cumsum(-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rounding must not reach the total
    return torch.searchsorted(cdf, u, right=True).clamp_max_(cdf.shape[-1] - 1).squeeze(-1)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn from a 1-D (unnormalised is fine) probability vector."""
    if not isinstance(probs, Tensor) or probs.dim() != 1 or probs.numel() == 0:
        raise ValueError("sample expects a non-empty 1-D probability tensor")
    return int(draw(probs, generator))
