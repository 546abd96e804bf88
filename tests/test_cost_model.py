from __future__ import annotations

import math
import random

import pytest

from tandem.cost_model import (
    Costs,
    all_held,
    best_k,
    best_plan,
    break_even_alpha,
    draft_side,
    expected_tokens,
    predraft_throughputs,
    round_as_run,
    round_time,
    throughputs,
    tokens_per_second,
    verify_side,
)

COSTS = Costs(
    rtt_draft=0.002,
    rtt_target=0.0,
    draft_per_token=0.001,
    draft_overhead=0.0005,
    verify_intercept=0.020,
    verify_slope=0.001,
)


def test_expected_tokens() -> None:
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.0, 7) == 1.0
    assert expected_tokens(0.999999, 3) == pytest.approx(4.0, rel=1e-5)
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError):
            expected_tokens(bad, 2)
    with pytest.raises(ValueError):
        expected_tokens(0.5, -1)


def test_later_drafts_accept_at_their_own_rate() -> None:
    """First draft at alpha, each later one at `later` once those before it held; None is the geometric model."""
    assert expected_tokens(0.4, 3, 0.6) == pytest.approx(1 + 0.4 + 0.4 * 0.6 + 0.4 * 0.36)
    assert expected_tokens(0.4, 1, 0.9) == pytest.approx(1.4)
    assert expected_tokens(0.4, 3, None) == pytest.approx(expected_tokens(0.4, 3, 0.4))
    assert all_held(0.4, 3, 0.6) == pytest.approx(0.4 * 0.36)
    assert all_held(0.4, 0, 0.6) == 1.0
    with pytest.raises(ValueError):
        expected_tokens(0.4, 2, 1.5)
    # Deeper drafts accepting more make longer blocks worth it where one rate fitted to the first would not.
    assert best_k(0.5, COSTS, "sequential", 16, 0.95)[0] > best_k(0.5, COSTS, "sequential", 16)[0]


def test_round_time_sequential() -> None:
    assert round_time(COSTS, 0) == pytest.approx(0.020)
    assert round_time(COSTS, 3) == pytest.approx(0.002 + 0.0005 + 0.003 + 0.020 + 0.003)
    with pytest.raises(ValueError):
        round_time(COSTS, 2, "parallel")


def test_round_time_pipelined_between_max_and_sum() -> None:
    d, v = 0.002 + 0.0005 + 0.004, 0.020 + 0.004
    assert round_time(COSTS, 4, "pipelined", alpha=1.0) == pytest.approx(max(d, v))
    assert round_time(COSTS, 4, "pipelined", alpha=0.0) == pytest.approx(d + v)
    w = 0.8**5
    assert round_time(COSTS, 4, "pipelined", alpha=0.8) == pytest.approx(w * max(d, v) + (1 - w) * (d + v))
    assert round_time(COSTS, 0, "pipelined", alpha=0.8) == round_time(COSTS, 0)
    with pytest.raises(ValueError):
        round_time(COSTS, 4, "pipelined")


def test_best_k() -> None:
    k, tps = best_k(0.8, COSTS)
    assert k > 0 and tps == pytest.approx(max(tokens_per_second(0.8, j, COSTS) for j in range(17)))
    assert best_k(0.8, COSTS, max_k=2)[0] <= 2
    # A slow draft behind a slow link never pays at a low acceptance rate.
    slow = Costs(0.02, 0.0, 0.006, 0.003, 0.020, 0.002)
    assert best_k(0.3, slow) == (0, pytest.approx(1 / 0.020))
    assert best_k(0.95, COSTS, "pipelined")[1] > best_k(0.95, COSTS, "sequential")[1]


def test_throughputs_are_tokens_per_second_at_every_k() -> None:
    """The one-pass form the tuner uses every round gives the per-k function's values (up to the rounding of
    its running sum of alpha's powers)."""
    rng = random.Random(0)
    for _ in range(2000):
        costs = Costs(*(rng.uniform(0, 0.01) for _ in range(6)), rng.uniform(0, 0.002), rng.uniform(-0.002, 0.002))
        alpha, mode, max_k = (
            rng.choice([0.0, 1.0, rng.random()]),
            rng.choice(["sequential", "pipelined"]),
            rng.randrange(17),
        )
        later = rng.choice([None, 0.0, 1.0, rng.random()])
        assert throughputs(alpha, costs, mode, max_k, later) == pytest.approx(
            [tokens_per_second(alpha, k, costs, mode, later) for k in range(max_k + 1)], rel=1e-12
        )


def test_break_even_matches_design_rule_for_one_token() -> None:
    # k = 1 sequential: (1 + alpha) / T(1) = 1 / T(0)  <=>  alpha = c + beta + link (relative to T(0)).
    t0 = COSTS.verify_intercept + COSTS.rtt_target
    rule = (COSTS.draft_per_token + COSTS.draft_overhead + COSTS.verify_slope + COSTS.rtt_draft) / t0
    assert break_even_alpha(COSTS, 1) == pytest.approx(rule, rel=1e-9)
    a = break_even_alpha(COSTS, 4)
    assert tokens_per_second(a, 4, COSTS) == pytest.approx(tokens_per_second(a, 0, COSTS), rel=1e-9)
    assert break_even_alpha(COSTS, 4, "pipelined") < a
    hopeless = Costs(1.0, 0.0, 0.1, 0.0, 0.020, 0.0)
    assert break_even_alpha(hopeless, 2) == math.inf
    assert break_even_alpha(COSTS, 0) == 0.0


def test_a_pipelined_round_by_what_it_did() -> None:
    v1, v0 = verify_side(COSTS, 1), verify_side(COSTS, 0)
    slow = Costs(0.030, 0.0, 0.001, 0.0005, 0.020, 0.001)  # a call ahead outlasts the verify
    assert round_as_run(COSTS, 0, 0, False) == pytest.approx(v0)
    assert round_as_run(COSTS, 0, 2, False) == pytest.approx(v0)  # the call ahead fits in the verify
    assert round_as_run(slow, 0, 2, False) == pytest.approx(draft_side(slow, 3))  # ... or is waited for
    assert round_as_run(slow, 1, 2, True, held=0.0) == pytest.approx(verify_side(slow, 1))  # not waited
    assert round_as_run(COSTS, 1, 1, True) == pytest.approx(v1)
    assert round_as_run(COSTS, 1, 1, False) == pytest.approx(draft_side(COSTS, 1) + v1)
    # The expectation over the bet: ready with probability alpha^(k+1), the call ahead waited for at alpha^k.
    a, k = 0.6, 3
    w, held = a ** (k + 1), a**k
    ready, fresh = (round_as_run(slow, k, k, r, held) for r in (True, False))
    expected = w * ready + (1 - w) * fresh
    assert round_time(slow, k, "pipelined", a) == pytest.approx(expected)


def test_drafting_ahead_of_the_target_alone() -> None:
    """A draft too slow to draft first (its call costs most of a decode step) still pays drafting ahead."""
    costs = Costs(0.001, 0.0, 0.005, 0.0005, 0.020, 0.003, decode=0.020)
    alpha = 0.4
    pre = predraft_throughputs(alpha, costs, 8)
    assert pre[0] == pytest.approx(1 / 0.020)
    assert max(throughputs(alpha, costs, "pipelined", 8)) == pytest.approx(1 / 0.020)  # no k pays
    # j = 1 by hand: target-only rounds make a block ready with probability alpha (the guess), blocks stay
    # ready with alpha^2; the chain spends alpha / (1 - alpha^2 + alpha) of its rounds verifying one.
    p = alpha / (1 - alpha**2 + alpha)
    t_ready = verify_side(costs, 1)
    assert pre[1] == pytest.approx(((1 - p) + p * (1 + alpha)) / ((1 - p) * 0.020 + p * t_ready))
    assert pre[1] > 1.05 / 0.020
    assert best_plan(alpha, costs, "pipelined", 8) == (0, 1, pytest.approx(pre[1]))
    assert best_plan(alpha, costs, "sequential", 8)[:2] == (0, 0)
    # Paid for by the target (both nodes on one GPU): no longer worth it.
    shared = Costs(0.001, 0.0, 0.005, 0.0005, 0.020, 0.003, decode=0.020, ahead_overhead=0.004, ready_overhead=0.004)
    assert best_plan(alpha, shared, "pipelined", 8)[:2] == (0, 0)


def test_predraft_throughputs_follow_the_round_times() -> None:
    """The inlined form against the chain built from round_as_run."""
    rng = random.Random(1)
    for _ in range(500):
        overheads = (rng.uniform(-0.002, 0.002) for _ in range(3))
        decode = rng.choice([None, rng.uniform(0, 0.01)])
        costs = Costs(*(rng.uniform(0, 0.01) for _ in range(6)), *overheads, decode, rng.uniform(-0.002, 0.002))
        alpha, later = rng.choice([0.0, 1.0, rng.random()]), rng.choice([None, rng.random()])
        want = [1 / round_as_run(costs, 0, 0, False)]
        for j in range(1, 9):
            held = all_held(alpha, j, later)
            p = alpha / (1 - held * alpha + alpha) if alpha else 0.0
            t_alone = round_as_run(costs, 0, j, False)
            t_ready = round_as_run(costs, j, j, True, held)
            want.append(((1 - p) + p * expected_tokens(alpha, j, later)) / ((1 - p) * t_alone + p * t_ready))
        assert predraft_throughputs(alpha, costs, 8, later) == pytest.approx(want, rel=1e-12)
