"""The cost model the coordinator optimises: expected tokens per round over expected round time.

alpha is the per-token acceptance rate; k the draft length (0 = the target alone). All times are
seconds. verify(k) = a + b*k is the target's time to check k >= 1 draft tokens (k + 1 positions: the last
committed token plus the drafts); verify(0), a plain decode step, is a term of its own (`decode`, a when
unknown): a decode step and a verify block can take different paths (a one-row matmul kernel against a
multi-row one, another CUDA graph): a 16-thread CPU target's rounds at k = 0 took a median 41 ms where
its fitted verify line met k = 0 at 49.5 ms.

Sequential round:  T(k) = rtt_d + draft_overhead + k*draft_per_token + rtt_t + a + b*k,  T(0) = rtt_t + decode.

Pipelined round: the draft drafts the next block while the target verifies this one, betting on full
acceptance and guessing the bonus token with its own next token. The bet wins when all k drafts and
the guess are accepted, probability alpha^(k+1); the next block is then ready and the round costs
max(D, V). Otherwise the next block is drafted after the verdict and the round costs D + V, where
D = rtt_d + draft_overhead + k*draft_per_token and V = rtt_t + a + b*k. So
T_pipe(k) = w*max(D, V) + (1 - w)*(D + V) with w = alpha^(k+1), and T_pipe(0) = T(0).

Every round also pays round_overhead (the coordinator's own work: bookkeeping, streaming the tokens out),
and a speculative round spec_overhead on top: what such rounds measurably cost beyond the terms above
(the draft catching up after target-only rounds, a second call on a shared host). The tuner measures
both from rounds' wall times; they are what keeps a marginal draft from costing throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Costs",
    "Mode",
    "best_k",
    "break_even_alpha",
    "draft_side",
    "expected_tokens",
    "round_time",
    "throughputs",
    "tokens_per_second",
    "verify_side",
]

Mode = Literal["sequential", "pipelined"]
MODES = ("sequential", "pipelined")


@dataclass(frozen=True)
class Costs:
    rtt_draft: float  # link time of one coordinator <-> draft call (wall minus node compute)
    rtt_target: float  # same for the target
    draft_per_token: float  # draft compute per drafted token
    draft_overhead: float  # draft compute per call (catching up on the committed delta, dispatch)
    verify_intercept: float  # a: target compute of a verify block, extrapolated to 0 drafts
    verify_slope: float  # b: extra target compute per draft token verified
    round_overhead: float = 0.0  # wall time of any round beyond its calls
    spec_overhead: float = 0.0  # extra wall time of a round with k > 0 beyond that (may be negative)
    decode: float | None = None  # target compute of a plain decode step (k = 0); None: verify_intercept


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"draft length k must be an integer >= 0, got {k!r}")
    return k


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = (1 - alpha^(k+1)) / (1 - alpha): accepted drafts plus the target's own token."""
    alpha, k = _check_alpha(alpha), _check_k(k)
    # The finite sum is exact at alpha = 1 and avoids cancellation just below it.
    return math.fsum(alpha**i for i in range(k + 1))


def draft_side(costs: Costs, k: int) -> float:
    """D(k): the draft call's wall time (0 when nothing is drafted)."""
    if _check_k(k) == 0:
        return 0.0
    return costs.rtt_draft + costs.draft_overhead + k * costs.draft_per_token


def verify_side(costs: Costs, k: int) -> float:
    """V(k): the target call's wall time."""
    if _check_k(k) == 0 and costs.decode is not None:
        return costs.rtt_target + costs.decode
    return costs.rtt_target + costs.verify_intercept + k * costs.verify_slope


def round_time(costs: Costs, k: int, mode: Mode = "sequential", alpha: float | None = None) -> float:
    """Expected wall time of one round; pipelined needs alpha (the bet on the next block)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    d, v = draft_side(costs, k), verify_side(costs, k)
    if k == 0:
        return v + costs.round_overhead
    if mode == "pipelined" and alpha is None:
        raise ValueError("pipelined round time needs the acceptance rate alpha")
    w = 0.0 if mode == "sequential" else _check_alpha(alpha) ** (k + 1)
    return _speculative_round(costs, d, v, w, mode)


def _speculative_round(costs: Costs, d: float, v: float, w: float, mode: Mode) -> float:
    """A round with k > 0 from its draft side d, verify side v and (pipelined) the bet's odds w."""
    t = d + v if mode == "sequential" else w * max(d, v) + (1.0 - w) * (d + v)
    # A negative spec_overhead (rounds measured cheaper than the terms say) never beats the target call alone.
    return max(t + costs.spec_overhead, v) + costs.round_overhead


def tokens_per_second(alpha: float, k: int, costs: Costs, mode: Mode = "sequential") -> float:
    return expected_tokens(alpha, k) / round_time(costs, k, mode, alpha)


def throughputs(alpha: float, costs: Costs, mode: Mode = "sequential", max_k: int = 16) -> list[float]:
    """tokens_per_second for k = 0..max_k in one pass: the tuner asks every round, and a round on a GPU is
    a couple of milliseconds (the per-k calls took ~55 us). E(k) is summed as k grows: at most 17 terms
    below 1, so the running sum is as good as expected_tokens' fsum here."""
    alpha, max_k = _check_alpha(alpha), _check_k(max_k)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    v0, d0 = costs.rtt_target + costs.verify_intercept, costs.rtt_draft + costs.draft_overhead
    out = [1.0 / (verify_side(costs, 0) + costs.round_overhead)]
    e, power = 1.0, 1.0  # E(k) and alpha^k
    for k in range(1, max_k + 1):
        power *= alpha
        e += power
        d, v = d0 + k * costs.draft_per_token, v0 + k * costs.verify_slope
        out.append(e / _speculative_round(costs, d, v, power * alpha, mode))
    return out


def best_k(alpha: float, costs: Costs, mode: Mode = "sequential", max_k: int = 16) -> tuple[int, float]:
    """(k, predicted tokens/s) maximising throughput over 0..max_k; ties go to the shorter draft."""
    tps = throughputs(alpha, costs, mode, max_k)
    k = tps.index(max(tps))
    return k, tps[k]


def break_even_alpha(costs: Costs, k: int, mode: Mode = "sequential") -> float:
    """Smallest alpha at which drafting k tokens beats the target alone; inf if not even alpha = 1 does.

    Throughput at k grows with alpha, so bisection finds the crossing.
    """
    if _check_k(k) == 0:
        return 0.0
    base = tokens_per_second(0.0, 0, costs, mode)
    gain = lambda a: tokens_per_second(a, k, costs, mode) - base
    if gain(1.0) <= 0:
        return math.inf
    if gain(0.0) >= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if gain(mid) >= 0 else (mid, hi)
    return hi
