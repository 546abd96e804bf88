"""The cost model the coordinator optimises: expected tokens per round over expected round time.

alpha is the acceptance rate of a round's first draft, `later` that of each later one once those before it
held (None: alpha, the usual geometric model). Drafts deeper in a block accept more, having come through an
easy stretch (the demo pair, k = 4: 0.43, 0.46, 0.51, 0.57 at T = 0; 0.34, 0.45, 0.48, 0.39 at T = 0.7, the
last of 38), so one rate fitted to blocks of several drafts overrates the first, and with it k = 1.
k is the draft length (0 = the target alone). All times are seconds. verify(k) = a + b*k is the target's
time to check k >= 1 draft tokens (k + 1 positions: the last committed token plus the drafts); verify(0),
a plain decode step, is a term of its own (`decode`, a when unknown): a decode step and a verify block can
take different paths (a one-row matmul kernel against a multi-row one, another CUDA graph): a 16-thread
CPU target's rounds at k = 0 took a median 41 ms where its fitted verify line met k = 0 at 49.5 ms.

Sequential round:  T(k) = rtt_d + draft_overhead + k*draft_per_token + rtt_t + a + b*k,  T(0) = rtt_t + decode.

Pipelined round: the draft drafts the next block while the target verifies this one, betting on full
acceptance and guessing the bonus token with its own next token. The bet wins when all k drafts and
the guess are accepted, probability w = h(k)*alpha, where h(k) = alpha*later^(k-1) is that of all k drafts
holding (the guess taken as likely as a first draft). A round whose block was drafted ahead costs V(k),
plus, when all k drafts hold (probability h(k): only then is the call ahead waited for), whatever the
call ahead (the guess and k more, D(k + 1)) takes beyond V(k). A round that drafts its block first costs
D(k) more; D(k) = rtt_d + draft_overhead + k*draft_per_token and V(k) = rtt_t + a + b*k. So
T_pipe(k) = V(k) + h(k)*max(0, D(k + 1) - V(k)) + (1 - w)*D(k), and T_pipe(0) = T(0).

A pipelined request may also leave the target alone and still draft ahead (`predraft_throughputs`): each
target-only round has the draft guess the target's token and draft j past it, max(V(0), D(j + 1)): when
the guess holds (probability alpha) the next round verifies that block at once, and so on while its bets
win. Where drafting first costs more than the block is worth (a slow draft, a long link), this keeps the
draft entirely off the critical path.

Every round also pays round_overhead (the coordinator's own work: bookkeeping, streaming the tokens out),
and on top a speculative round spec_overhead, a pipelined one whose block was drafted ahead ready_overhead,
and a target-only round that drafts ahead ahead_overhead: what such rounds measurably cost beyond the
terms above (the draft catching up after target-only rounds, a second call on a shared host, the
coordinator waiting on two calls in a row). The tuner measures them from rounds' wall times; they are
what keeps a marginal draft from costing throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Costs",
    "Mode",
    "all_held",
    "best_k",
    "best_plan",
    "break_even_alpha",
    "draft_side",
    "expected_tokens",
    "predraft_throughputs",
    "round_as_run",
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
    ready_overhead: float = 0.0  # the same for a pipelined round whose block was drafted ahead
    decode: float | None = None  # target compute of a plain decode step (k = 0); None: verify_intercept
    ahead_overhead: float = 0.0  # extra wall time of a target-only round that drafts ahead, beyond round_overhead


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {alpha!r}")
    return float(alpha)


def _later(alpha: float, later: float | None) -> float:
    return alpha if later is None else _check_alpha(later)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"draft length k must be an integer >= 0, got {k!r}")
    return k


def expected_tokens(alpha: float, k: int, later: float | None = None) -> float:
    """E(k) = 1 + alpha*(1 + later + ... + later^(k-1)): accepted drafts plus the target's own token."""
    alpha, k = _check_alpha(alpha), _check_k(k)
    later = _later(alpha, later)
    # The finite sum is exact at 1 and avoids cancellation just below it.
    return 1.0 + alpha * math.fsum(later**i for i in range(k))


def all_held(alpha: float, k: int, later: float | None = None) -> float:
    """h(k): the probability that all k drafts of a block are accepted."""
    if _check_k(k) == 0:
        return 1.0
    alpha = _check_alpha(alpha)
    return alpha * _later(alpha, later) ** (k - 1)


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


def round_time(
    costs: Costs, k: int, mode: Mode = "sequential", alpha: float | None = None, later: float | None = None
) -> float:
    """Expected wall time of one round; pipelined needs alpha (the bet on the next block)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if k == 0 or mode == "sequential":
        return round_as_run(costs, k)
    if alpha is None:
        raise ValueError("pipelined round time needs the acceptance rate alpha")
    # Drafting k ahead each round: ready with probability h(k)*alpha, the call ahead waited for at h(k).
    held = all_held(alpha, k, later)
    w = held * alpha
    return w * round_as_run(costs, k, k, True, held) + (1.0 - w) * round_as_run(costs, k, k, False, held)


def round_as_run(costs: Costs, k: int, ahead: int = 0, ready: bool = False, held: float = 1.0) -> float:
    """Wall time of one round as it ran: k drafts verified (drafted this round unless `ready`) while
    (pipelined) the draft drafts `ahead` tokens past its guess (0: no call ahead), a call waited for when
    all k drafts hold: `held`, 1 or 0 for a round that ran, their probability for an expectation."""
    v = verify_side(costs, k)
    t = v + held * max(0.0, draft_side(costs, _check_k(ahead) + 1) - v) if ahead else v
    if k == 0:
        return t + costs.round_overhead + (costs.ahead_overhead if ahead else 0.0)
    # A negative overhead (rounds measured cheaper than the terms say) never beats the target call alone.
    if ready:
        return max(t + costs.ready_overhead, v) + costs.round_overhead
    return max(t + draft_side(costs, k) + costs.spec_overhead, v) + costs.round_overhead


def tokens_per_second(
    alpha: float, k: int, costs: Costs, mode: Mode = "sequential", later: float | None = None
) -> float:
    return expected_tokens(alpha, k, later) / round_time(costs, k, mode, alpha, later)


def throughputs(
    alpha: float, costs: Costs, mode: Mode = "sequential", max_k: int = 16, later: float | None = None
) -> list[float]:
    """tokens_per_second for k = 0..max_k in one pass: the tuner asks every round, and a round on a GPU is
    a couple of milliseconds (the per-k calls took ~55 us, this loop 3-5 us). E(k) is summed as k grows: at
    most 17 terms below 1, so the running sum is as good as expected_tokens' fsum here."""
    alpha, max_k = _check_alpha(alpha), _check_k(max_k)
    later = _later(alpha, later)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    c = costs
    v0, d0 = c.rtt_target + c.verify_intercept, c.rtt_draft + c.draft_overhead
    dpt, slope, over = c.draft_per_token, c.verify_slope, c.round_overhead
    spec, ready = c.spec_overhead, c.ready_overhead
    out = [1.0 / (verify_side(c, 0) + over)]
    e, power = 1.0, 1.0  # E(k) and h(k)
    # round_time's terms inlined, with conditionals for max(): a third of the time of the calls.
    for k in range(1, max_k + 1):
        power *= alpha if k == 1 else later
        e += power
        d, v = d0 + k * dpt, v0 + k * slope
        if mode == "sequential":
            t = d + v + spec
            t = (t if t > v else v) + over
        else:
            base = v + power * (d + dpt - v) if d + dpt > v else v
            r, f, w = base + ready, base + d + spec, power * alpha
            t = w * (r if r > v else v) + (1.0 - w) * (f if f > v else v) + over
        out.append(e / t)
    return out


def predraft_throughputs(alpha: float, costs: Costs, max_k: int = 16, later: float | None = None) -> list[float]:
    """Pipelined tokens/s of leaving the target alone while the draft drafts j tokens ahead, j = 0..max_k
    (j = 0: the target alone, no draft call).

    Rounds alternate between two states: no block ready (a target-only round, max(V(0), D(j + 1)), ready
    next with probability alpha: the guess) and a block ready (verify j at once, max(V(j), D(j + 1)), ready
    again with probability h(j)*alpha). The chain's stationary share of ready rounds weighs them.
    """
    alpha, max_k = _check_alpha(alpha), _check_k(max_k)
    later = _later(alpha, later)
    c = costs
    v0, over = verify_side(c, 0), c.round_overhead
    out = [1.0 / (v0 + over)]
    # round_as_run's terms inlined (conditionals for max()): the tuner asks every round.
    vi, d1 = c.rtt_target + c.verify_intercept, c.rtt_draft + c.draft_overhead + c.draft_per_token
    dpt, slope, ready, alone = c.draft_per_token, c.verify_slope, c.ready_overhead, over + c.ahead_overhead
    e, power = 1.0, 1.0  # E(j) and h(j)
    for j in range(1, max_k + 1):
        power *= alpha if j == 1 else later
        e += power
        p = alpha / (1.0 - power * alpha + alpha) if alpha > 0 else 0.0  # share of rounds with a block ready
        d, v = d1 + j * dpt, vi + j * slope  # D(j + 1), V(j)
        t_alone = (d if d > v0 else v0) + alone
        r = (v + power * (d - v) if d > v else v) + ready
        t_ready = (r if r > v else v) + over
        out.append(((1.0 - p) + p * e) / ((1.0 - p) * t_alone + p * t_ready))
    return out


def best_plan(
    alpha: float, costs: Costs, mode: Mode = "sequential", max_k: int = 16, later: float | None = None
) -> tuple[int, int, float]:
    """(k, ahead, predicted tokens/s): the best draft length, or (pipelined) 0 with a length to draft ahead
    while the target runs alone; ties go to the target alone and to shorter drafts."""
    k, tps = best_k(alpha, costs, mode, max_k, later)
    if mode == "pipelined" and max_k > 0:
        pre = predraft_throughputs(alpha, costs, max_k, later)
        j = pre.index(max(pre))
        if j and pre[j] > tps:
            return 0, j, pre[j]
    return k, 0, tps


def best_k(
    alpha: float, costs: Costs, mode: Mode = "sequential", max_k: int = 16, later: float | None = None
) -> tuple[int, float]:
    """(k, predicted tokens/s) maximising throughput over 0..max_k; ties go to the shorter draft."""
    tps = throughputs(alpha, costs, mode, max_k, later)
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
