"""The tuner against a simulated link and models: near the best fixed k in hindsight, k = 0 when it pays."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import pytest

from coordinator.tuner import MAX_ALONE_ROUNDS, LinearFit, Tuner
from tandem.cost_model import best_k

STEP = 0.020  # target decode step, seconds
RTT_TARGET = 0.0001  # the coordinator sits next to the target
MAX_K = 16
DRIFT_ROUNDS = 1000


@dataclass(frozen=True)
class World:
    alpha: float
    draft_ratio: float  # draft per-token cost / target step
    slope: float  # verify cost per draft token / target step
    rtt: float  # coordinator <-> draft link, seconds
    hidden: float = 0.0  # wall time a speculative round costs that no node reports (e.g. the draft catching up)
    gap: float = 0.0  # a verify block's cost over a decode step's at k -> 0, / target step (another kernel path)
    shared: float = 0.0  # wall time a call ahead adds to a round (both nodes on one GPU, say)
    drift: float = 0.0  # the target's compute swings by this fraction, a slow wave over DRIFT_ROUNDS rounds
    spells: tuple[tuple[int, int, float], ...] = ()  # (first round, end, factor): the target slowed for a while
    after: float = 0.0  # what a decode step right after a verify block costs more than one after a decode step, / step

    @property
    def per_token(self) -> float:
        return self.draft_ratio * STEP

    @property
    def overhead(self) -> float:
        return 0.5 * self.draft_ratio * STEP


@dataclass
class Trace:
    """Common random numbers: every policy sees the same acceptance runs and the same noise."""

    run: np.ndarray  # drafts the target would accept in a row (truncated at k per round)
    noise: np.ndarray  # [rounds, 4] multiplicative noise on draft compute, draft link, verify, target link


def make_trace(world: World, rounds: int, seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    run = rng.geometric(1.0 - world.alpha, size=rounds) - 1  # P(run >= j) = alpha^j
    noise = rng.lognormal(0.0, 0.05, size=(rounds, 4))
    return Trace(run, noise)


def draft_call(world: World, m: int, nz: np.ndarray) -> tuple[float, float]:
    """(compute, wall) of a draft call drafting m tokens."""
    compute = (world.overhead + world.per_token * m) * nz[0]
    return compute, compute + world.rtt * nz[1]


def verify_call(world: World, k: int, nz: np.ndarray, i: int, after: bool) -> tuple[float, float]:
    speed = 1.0 + world.drift * math.sin(2 * math.pi * i / DRIFT_ROUNDS)
    speed *= math.prod(f for start, end, f in world.spells if start <= i < end)
    shape = world.gap + world.slope * k if k else world.after if after else 0.0
    compute = STEP * (1.0 + shape) * nz[2] * speed
    return compute, compute + RTT_TARGET * nz[3]


@dataclass
class Played:
    """One simulated round: its calls' (compute, wall), what was accepted and its duration."""

    k: int
    ahead: int
    ready: bool
    n: int
    draft: tuple[float, float] | None
    draft_ahead: tuple[float, float] | None
    verify: tuple[float, float]
    wall: float


def play(
    world: World, trace: Trace, i: int, k: int, mode: str, ahead: int = 0, ready: bool = False, after: bool = False
) -> Played:
    """Round i: verify k drafts (drafted first unless `ready`) while, pipelined, the draft drafts `ahead`
    tokens past its guess; the loop waits for that call only when all k drafts held. after: round i - 1
    verified a block."""
    nz, run = trace.noise[i], int(trace.run[i])
    n = min(run, k)
    d = draft_call(world, k, nz) if k and not ready else None
    a = draft_call(world, ahead + 1, nz) if ahead else None
    v = verify_call(world, k, nz, i, after)
    wall = (d[1] if d else 0.0) + (max(v[1], a[1]) if a and n == k else v[1])
    wall += (world.hidden if k else 0.0) + (world.shared if ahead else 0.0)
    return Played(k, ahead, ready, n, d, a, v, wall)


def simulate(world: World, trace: Trace, mode: str, start: int, choose) -> tuple[float, np.ndarray, np.ndarray]:
    """Goodput after `start`, and the k and ahead of every round. choose(i, ready, k_ready) -> (k, ahead)
    decides each round (k_ready: the block drafted ahead when ready). Pipelined, a block drafted ahead is
    ready next round when all k drafts and the guess after them hold (the run reaches k + 1)."""
    rounds = len(trace.run)
    ks, aheads = np.zeros(rounds, dtype=np.int64), np.zeros(rounds, dtype=np.int64)
    tokens = time = 0.0
    ready, k_ready = False, 0
    for i in range(rounds):
        k, ahead = choose(i, ready, k_ready)
        if mode != "pipelined":
            ahead = 0
        r = play(world, trace, i, k, mode, ahead, ready, i > 0 and ks[i - 1] > 0)
        ks[i], aheads[i] = k, ahead
        if i >= start:
            tokens, time = tokens + r.n + 1, time + r.wall
        ready, k_ready = ahead > 0 and trace.run[i] >= k + 1, ahead
    return tokens / time, ks, aheads


def fixed_goodput(world: World, k: int, trace: Trace, mode: str, start: int) -> float:
    """Drafting k tokens every round (pipelined: and k ahead)."""
    return simulate(world, trace, mode, start, lambda i, ready, kr: (kr if ready else k, k))[0]


def predraft_goodput(world: World, j: int, trace: Trace, start: int) -> float:
    """Pipelined: the target alone, with the draft drafting j tokens ahead of it."""
    return simulate(world, trace, "pipelined", start, lambda i, ready, kr: (kr if ready else 0, j))[0]


def tuned(world: World, trace: Trace, mode: str, start: int, request_len: int = 250):
    """Run the tuner round by round as the loop does; return goodput after `start`, the k and ahead it chose."""
    tuner = Tuner(max_k=MAX_K)
    request = tuner.new_request()
    last_k = 0

    def choose(i: int, ready: bool, k_ready: int) -> tuple[int, int]:
        nonlocal request, last_k
        if i % request_len == 0:
            request = tuner.new_request()
        k = k_ready if ready else tuner.choose_k(request, mode)
        ahead = 0
        if mode == "pipelined":
            ahead = (tuner.choose_k(request, mode) if k else 0) or request.ahead
        alpha = tuner.alpha(request)
        r = play(world, trace, i, k, mode, ahead, ready, last_k > 0)
        last_k = k
        if r.draft:
            tuner.record_draft(k, *r.draft)
        if r.draft_ahead:
            tuner.record_draft(ahead + 1, *r.draft_ahead)
        tuner.record_verify(k, *r.verify)
        tuner.record_acceptance(request, k, r.n)
        tuner.record_round_time(k, r.wall, mode, alpha, ready=ready, ahead=ahead, held=r.n == k)
        return k, ahead

    goodput, ks, aheads = simulate(world, trace, mode, start, choose)
    return goodput, ks, aheads, tuner


WORLDS = [
    World(a, c, s, r) for a, c, s, r in itertools.product((0.3, 0.6, 0.9), (0.05, 0.3), (0.0, 0.1), (0.0, 0.002, 0.020))
]
WARMUP, MEASURED = 300, 2000


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "pipelined"])
def test_tuner_close_to_best_fixed_k(mode: str) -> None:
    """Pipelined, the hindsight baseline also holds every fixed length drafted ahead of a target alone."""
    failures = []
    for j, world in enumerate(WORLDS):
        trace = make_trace(world, WARMUP + MEASURED, seed=1000 + j)
        fixed = [fixed_goodput(world, k, trace, mode, WARMUP) for k in range(MAX_K + 1)]
        ahead = [predraft_goodput(world, a, trace, WARMUP) for a in range(1, MAX_K + 1)] if mode == "pipelined" else []
        best = max(fixed + ahead)
        goodput, ks, aheads, _ = tuned(world, trace, mode, WARMUP)
        ratio = goodput / best
        alone = float(np.mean((ks[WARMUP:] == 0) & (aheads[WARMUP:] == 0)))  # rounds with no draft call at all
        line = (
            f"{world} best fixed k {int(np.argmax(fixed))} (ahead {int(np.argmax(ahead)) + 1 if ahead else '-'}) "
            f"ratio {ratio:.3f} alone {alone:.2f} median k {np.median(ks)} median ahead {np.median(aheads)}"
        )
        if ratio < 0.95:
            failures.append("goodput " + line)
        # Where drafting loses clearly, the target alone is the rule; probe rounds stay a minority.
        if fixed[0] > 1.05 * max(fixed[1:] + ahead) and alone < 0.75:
            failures.append("should stay at k=0: " + line)
        if max(fixed[1:] + ahead) > 1.10 * fixed[0] and alone > 0.10:
            failures.append("should speculate: " + line)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "pipelined"])
def test_tuner_follows_a_target_whose_speed_drifts(mode: str) -> None:
    """The target's compute swings by +-30% over 1000 rounds (a CPU target on a busy host did more). A verify
    line fitted apart from decode steps, each with its own forgetting, made 0.89x the best fixed k here."""
    ratios = []
    for j, world in enumerate(replace(w, drift=0.3) for w in WORLDS):
        trace = make_trace(world, WARMUP + MEASURED, seed=1000 + j)
        fixed = [fixed_goodput(world, k, trace, mode, WARMUP) for k in range(MAX_K + 1)]
        ahead = [predraft_goodput(world, a, trace, WARMUP) for a in range(1, MAX_K + 1)] if mode == "pipelined" else []
        ratios.append(tuned(world, trace, mode, WARMUP)[0] / max(fixed + ahead))
    low = [f"{w}: {r:.3f}" for w, r in zip(WORLDS, ratios, strict=True) if r < 0.95]
    assert not low, low


@pytest.mark.slow
def test_a_decode_step_slowed_by_the_block_before_it_is_the_blocks_to_pay() -> None:
    """A decode step right after a verify block costs 5% more (the demo pair's loop: up to 1-2.5 ms of 15 ms, in
    slow stretches of the machine), and fixed k = 1 makes 0.97x the target alone. Counted in the level, those
    steps priced the target alone dearest just where the tuner had drafted, and it kept going back and forth:
    0.968-0.989x the best fixed k here."""
    world = World(0.4, 0.2, 0.05, 0.002, after=0.05)
    ratios = []
    for seed in range(1, 5):
        trace = make_trace(world, WARMUP + MEASURED, seed=seed)
        fixed = [fixed_goodput(world, k, trace, "sequential", WARMUP) for k in range(MAX_K + 1)]
        goodput, _, _, tuner = tuned(world, trace, "sequential", WARMUP)
        ratios.append(goodput / max(fixed))
        learnt = tuner.target_fit.predict(0, after=True) - tuner.target_fit.predict(0)
        assert 0.5 < learnt / (world.after * STEP) < 1.5, learnt
    assert np.mean(ratios) >= 0.985, ratios


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "pipelined"])
def test_a_slow_spell_of_the_target_does_not_outlive_it(mode: str) -> None:
    """Near break-even, the target slows 1.8-2x for a while (another process on its cores): drafting may
    pay during the spell, not after it. Overheads priced against the filter's estimate of each call kept
    the spell after it was over (0.94x the best fixed k here, drafting in 21-72% of the 500 rounds after it)."""
    low = []
    for alpha, ratio, slope, gap in ((0.46, 0.25, 0.12, 0.15), (0.46, 0.2, 0.1, 0.1), (0.4, 0.2, 0.1, 0.1)):
        for spells in (((600, 700, 1.8),), ((600, 640, 2.0), (1200, 1260, 1.6))):
            world = World(alpha, ratio, slope, 0.001, gap=gap, spells=spells)
            for seed in range(4):
                trace = make_trace(world, WARMUP + MEASURED, seed=seed)
                fixed = [fixed_goodput(world, k, trace, mode, WARMUP) for k in range(5)]
                r = tuned(world, trace, mode, WARMUP)[0] / max(fixed)
                if r < 0.95:
                    low.append(f"{world} seed {seed}: {r:.3f}")
    assert not low, low


@pytest.mark.parametrize("mode", ["sequential", "pipelined"])
def test_learns_what_speculative_rounds_cost_beyond_the_model(mode: str) -> None:
    """Rounds that cost more than their calls say (here 2 target steps per speculative round, unseen by
    any node) turn a modest win into a loss: the tuner must learn that from round times and stop drafting."""
    world = World(0.6, 0.05, 0.0, 0.002, hidden=2 * STEP)
    trace = make_trace(world, WARMUP + MEASURED, seed=5)
    fixed = [fixed_goodput(world, k, trace, mode, WARMUP) for k in range(MAX_K + 1)]
    assert fixed[0] > 1.03 * max(fixed[1:]), fixed  # drafting loses here, every k
    assert fixed_goodput(replace(world, hidden=0.0), 3, trace, mode, WARMUP) > 1.1 * fixed[0]  # it would not without
    goodput, ks, _, tuner = tuned(world, trace, mode, WARMUP)
    assert goodput >= 0.97 * fixed[0], (goodput, fixed[0])
    assert np.mean(ks == 0) > 0.9
    assert tuner.costs().spec_overhead == pytest.approx(world.hidden, rel=0.3)


def test_pipelined_drafts_ahead_of_the_target_alone_where_that_alone_pays() -> None:
    """A draft token costs a quarter of a target step: drafting first loses at every k, drafting ahead of
    target-only rounds wins. When the call ahead slows the target (one GPU for both), it stops."""
    world = World(0.4, 0.25, 0.15, 0.001)
    trace = make_trace(world, WARMUP + MEASURED, seed=11)
    fixed = [fixed_goodput(world, k, trace, "pipelined", WARMUP) for k in range(6)]
    ahead = [predraft_goodput(world, j, trace, WARMUP) for j in range(1, 6)]
    assert fixed[0] == max(fixed) and max(ahead) > 1.05 * fixed[0]
    goodput, ks, aheads, _ = tuned(world, trace, "pipelined", WARMUP)
    assert goodput > 0.97 * max(ahead)
    assert np.mean((ks == 0) & (aheads > 0)) > 0.5
    shared = replace(world, shared=0.3 * STEP)
    fixed = [fixed_goodput(shared, k, trace, "pipelined", WARMUP) for k in range(6)]
    ahead = [predraft_goodput(shared, j, trace, WARMUP) for j in range(1, 6)]
    assert fixed[0] > 1.05 * max(ahead + fixed[1:])
    goodput, ks, aheads, tuner = tuned(shared, trace, "pipelined", WARMUP)
    assert goodput > 0.97 * fixed[0] and np.mean(aheads > 0) < 0.1
    assert tuner.costs().ahead_overhead == pytest.approx(shared.shared, rel=0.3)


def test_a_decode_step_is_fitted_apart_from_the_verify_line() -> None:
    """A CPU target's rounds took about 41 ms at k = 0 and 49.5 + 2k ms above. Fitted as one line through
    k = 0, a decode step looks 8 ms dearer than it is and the blocks' slope absorbs the jump."""
    tuner = Tuner()
    tuner.record_draft(2, 0.002)
    for i in range(200):
        k = 0 if i % 2 else 2 + i % 3
        tuner.record_verify(k, 0.041 if k == 0 else 0.0495 + 0.002 * k)
    costs = tuner.costs()
    assert costs.decode == pytest.approx(0.041, rel=1e-3)
    assert costs.verify_intercept == pytest.approx(0.0495, rel=1e-3)
    assert costs.verify_slope == pytest.approx(0.002, rel=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "pipelined"])
def test_near_the_best_k_when_blocks_cost_more_than_decode_steps(mode: str) -> None:
    failures = []
    for j, (alpha, gap) in enumerate(((0.42, 0.2), (0.7, 0.2), (0.7, 0.5))):
        world = World(alpha, 0.02, 0.05, 0.001, gap=gap)
        trace = make_trace(world, WARMUP + MEASURED, seed=50 + j)
        fixed = [fixed_goodput(world, k, trace, mode, WARMUP) for k in range(MAX_K + 1)]
        goodput, ks, _, _ = tuned(world, trace, mode, WARMUP)
        ratio = goodput / max(fixed)
        if ratio < 0.95:
            failures.append(
                f"{world}: {ratio:.3f} of the best fixed k {int(np.argmax(fixed))}, median k {np.median(ks)}"
            )
    assert not failures, "\n".join(failures)


def test_a_few_speculative_rounds_set_their_overhead() -> None:
    """Where drafting does not pay, speculative rounds are rare probes: their mean, not the first one, counts."""
    tuner = Tuner()
    tuner.record_draft(2, 0.001)
    tuner.record_verify(2, 0.002)
    tuner.record_verify(0, 0.001)
    base = tuner.costs()
    model = (
        base.rtt_draft + base.draft_overhead + 2 * base.draft_per_token + base.verify_intercept + 2 * base.verify_slope
    )
    for extra in (0.0, 0.004, 0.004, 0.004):
        tuner.record_round_time(2, model + extra)
    assert tuner.costs().spec_overhead == pytest.approx(0.003, rel=1e-6)


def test_drafts_soon_where_drafting_pays_or_a_probe_is_near() -> None:
    tuner = Tuner()
    request = tuner.new_request()
    assert tuner.drafts_soon(request)  # nothing measured: the first rounds draft
    tuner.record_draft(2, 0.050)  # a draft far slower than the target: drafting cannot pay
    tuner.record_verify(2, 0.002)
    tuner.record_verify(0, 0.002)
    assert not tuner.drafts_soon(request)
    tuner.alone_rounds = MAX_ALONE_ROUNDS - 3
    assert tuner.drafts_soon(request, within=4) and not tuner.drafts_soon(request, within=2)
    cheap = Tuner()
    cheap.record_draft(2, 0.0001)
    cheap.record_verify(2, 0.002)
    assert cheap.drafts_soon(cheap.new_request())


@pytest.mark.parametrize("back", [0.0, 0.010])
def test_probes_pay_what_they_really_lost(back: float) -> None:
    """Probe credit is shared by requests and charged with each probe's measured loss: probes that the model
    prices at a fraction of their cost come correspondingly rarer, so they keep to about probe_budget. The
    round after a probe, back to the target alone, pays what it costs beyond one (`back`) as well."""
    tuner = Tuner()
    tuner.record_draft(1, 0.004)
    tuner.record_verify(1, 0.002)
    tuner.record_verify(0, 0.002)
    rounds, lost, request, last = 0, 0.0, tuner.new_request(), 0
    for i in range(20_000):
        if i % 64 == 0:  # short requests, as in service
            request = tuner.new_request()
        k = tuner.choose_k(request)
        wall = 0.030 if k else 0.002 + (back if last else 0.0)  # a probe really costs 15 target steps
        tuner.record_round_time(k, wall)
        lost += wall - 0.002
        rounds, last = rounds + 1, k
    assert lost / (rounds * 0.002) < 1.25 * tuner.probe_budget


def test_worlds_cover_both_regimes() -> None:
    """The grid must contain worlds where speculation loses and where it wins, or the test above is moot."""
    from tandem.cost_model import Costs

    regimes = set()
    for w in WORLDS:
        costs = Costs(w.rtt, RTT_TARGET, w.per_token, w.overhead, STEP, w.slope * STEP)
        regimes.add(best_k(w.alpha, costs)[0] == 0)
    assert regimes == {True, False}


def test_recovers_when_acceptance_rises() -> None:
    """Stuck at k = 0 on hard text, the probes must notice when the text turns easy."""
    world_hard, world_easy = World(0.05, 0.05, 0.0, 0.002), World(0.95, 0.05, 0.0, 0.002)
    tuner, request = Tuner(max_k=MAX_K), None
    request = tuner.new_request()
    chosen = []
    for phase, (world, rounds) in enumerate(((world_hard, 600), (world_easy, 600))):
        trace = make_trace(world, rounds, seed=7 + phase)
        for i in range(rounds):
            k = tuner.choose_k(request)
            chosen.append(k)
            r = play(world, trace, i, k, "sequential")
            tuner.record_round(
                request,
                k,
                r.n,
                target_compute_s=r.verify[0],
                target_wall_s=r.verify[1],
                draft_compute_s=r.draft[0] if r.draft else None,
                draft_wall_s=r.draft[1] if r.draft else None,
            )
    hard, easy = np.array(chosen[300:600]), np.array(chosen[-300:])
    assert np.mean(hard == 0) > 0.8
    assert np.mean(easy == 0) < 0.05 and np.median(easy) >= 6


def test_alpha_estimate_is_unbiased_under_truncation() -> None:
    """accepted / (accepted + rejections) is the MLE; accepted / proposed would read ~0.56 here."""
    rng = np.random.default_rng(3)
    tuner = Tuner(global_decay=1.0, request_decay=1.0, prior_strength=1.0)
    request = tuner.new_request()
    k, alpha = 3, 0.7
    runs = rng.geometric(1.0 - alpha, size=20000) - 1
    for r in runs:
        tuner.record_acceptance(request, k, int(min(r, k)))
    assert abs(tuner.alpha(request) - alpha) < 0.01
    naive = np.minimum(runs, k).sum() / (k * len(runs))
    assert abs(naive - alpha) > 0.1


def test_alpha_prior_then_request_counts() -> None:
    tuner = Tuner(prior_alpha=0.5, prior_strength=8.0)
    a, b = tuner.new_request(), tuner.new_request()
    assert tuner.alpha(a) == pytest.approx(0.5)
    for _ in range(50):
        tuner.record_acceptance(a, 4, 4)
    assert tuner.alpha(a) > 0.9
    # b has no data of its own: it sees the global estimate, which a pulled up.
    assert 0.5 < tuner.alpha(b) < tuner.alpha(a)
    with pytest.raises(ValueError):
        tuner.record_acceptance(a, 2, 3)


def test_greedy_and_sampled_requests_learn_their_own_acceptance() -> None:
    """Greedy requests accepting most drafts must not make a new sampled request expect the same."""
    tuner = Tuner(prior_alpha=0.5, prior_strength=8.0)
    greedy, sampled = tuner.new_request(greedy=True), tuner.new_request(greedy=False)
    for _ in range(200):
        tuner.record_acceptance(greedy, 4, 4)  # nearly everything accepted
        tuner.record_acceptance(sampled, 4, 0)  # nothing accepted
    fresh_greedy, fresh_sampled = tuner.new_request(greedy=True), tuner.new_request(greedy=False)
    assert tuner.alpha(fresh_greedy) > 0.9 and tuner.alpha(fresh_sampled) < 0.1
    assert tuner.alpha(fresh_sampled) < tuner.global_alpha() < tuner.alpha(fresh_greedy)
    # A kind with no data of its own yet starts from the pooled estimate.
    other = Tuner(prior_alpha=0.5, prior_strength=8.0)
    for _ in range(200):
        other.record_acceptance(other.new_request(greedy=True), 4, 4)
    assert other.global_alpha(other.new_request(greedy=False)) == pytest.approx(other.global_alpha())


def test_new_requests_are_forecast_from_requests_not_from_drafts() -> None:
    """Easy requests (alpha 0.8) draft nearly every round and hard ones (0.2) stop after a few: counted per
    draft, the kind's rate was the easy ones' (0.73-0.75 here), and each new request's first drafts were
    forecast 0.12-0.17 above what they accepted."""
    easy, hard = World(0.8, 0.3, 0.0, 0.002), World(0.2, 0.3, 0.0, 0.002)
    tuner = Tuner(max_k=MAX_K)
    forecast, accepted = [], []
    for j in range(80):
        world = easy if j % 2 == 0 else hard
        trace = make_trace(world, 64, seed=j)
        request = tuner.new_request()
        for i in range(64):
            k = tuner.choose_k(request, "sequential")
            alpha = tuner.alpha(request)
            r = play(world, trace, i, k, "sequential")
            if k and j >= 20 and request.accepted + request.rejected < 4:
                forecast.append(alpha)
                accepted.append(float(r.n > 0))
            if r.draft:
                tuner.record_draft(k, *r.draft)
            tuner.record_verify(k, *r.verify)
            tuner.record_acceptance(request, k, r.n)
            tuner.record_round_time(k, r.wall, "sequential", alpha)
    assert np.mean(forecast) - np.mean(accepted) < 0.11
    assert tuner.alpha(tuner.new_request()) < 0.70


def test_where_in_its_answer_a_round_falls_moves_the_forecast() -> None:
    """Every answer's first 16 tokens are hard for the draft (alpha 0.15) and the rest easy (0.7): drafting
    pays only after them. Forecast alike at every position, the easy rounds pull the early ones' forecast
    above break-even (0.4-0.5 here), and every answer starts with rounds that lose."""
    early, late = World(0.15, 0.3, 0.0, 0.002), World(0.7, 0.3, 0.0, 0.002)
    tuner = Tuner(max_k=MAX_K)
    drafted = {True: [], False: []}  # early round? -> drafted
    for j in range(60):
        traces = {w: make_trace(w, 64, seed=2 * j + (w is late)) for w in (early, late)}
        request, position = tuner.new_request(), 0
        for i in range(64):
            world = early if position < 16 else late
            k = tuner.choose_k(request, "sequential")
            alpha = tuner.alpha(request)
            r = play(world, traces[world], i, k, "sequential")
            if j >= 20:
                drafted[world is early].append(k > 0)
            if r.draft:
                tuner.record_draft(k, *r.draft)
            tuner.record_verify(k, *r.verify)
            tuner.record_acceptance(request, k, r.n)
            tuner.record_round_time(k, r.wall, "sequential", alpha)
            position += r.n + 1
    fresh, on = tuner.new_request(), tuner.new_request()
    on.position = 40
    assert tuner.alpha(fresh) < 0.45 and tuner.alpha(on) > 0.6  # now 0.38 and 0.71; alike before: 0.51 at both
    assert np.mean(drafted[True]) < 0.1 and np.mean(drafted[False]) > 0.9  # now 0.05 and 0.98; before 0.21, 0.26


def test_first_and_later_drafts_learn_their_own_rates() -> None:
    """Blocks whose first draft holds a third of the time and whose later drafts then hold 0.8 of it."""
    tuner, rng = Tuner(), random.Random(0)
    request = tuner.new_request()
    assert tuner.later(request) == pytest.approx(tuner.alpha(request))  # the geometric model until blocks say
    for _ in range(600):
        n = 0
        if rng.random() < 1 / 3:
            n = 1
            while n < 4 and rng.random() < 0.8:
                n += 1
        tuner.record_acceptance(request, 4, n)
    fresh = tuner.new_request()
    assert tuner.alpha(fresh) == pytest.approx(1 / 3, abs=0.06)
    assert tuner.later(fresh) == pytest.approx(0.8, abs=0.06)
    assert tuner.alpha(request) == pytest.approx(1 / 3, abs=0.1) and tuner.later(request) > 0.65


def test_sequential_requests_do_not_inherit_pipelined_acceptance() -> None:
    """A pipelined request's counts mix in blocks drafted ahead; a new sequential request must start from what
    sequential rounds accepted."""
    tuner = Tuner(prior_alpha=0.5, prior_strength=8.0)
    piped, seq = tuner.new_request(greedy=False, mode="pipelined"), tuner.new_request(greedy=False)
    for i in range(300):
        tuner.record_acceptance(piped, 3, 3 if i % 2 else 1)
        tuner.record_acceptance(seq, 1, int(i % 3 == 0))  # a third accepted
    fresh_seq = tuner.new_request(greedy=False, mode="sequential")
    fresh_piped = tuner.new_request(greedy=False, mode="pipelined")
    assert tuner.alpha(fresh_seq) == pytest.approx(1 / 3, abs=0.03)
    assert tuner.alpha(fresh_piped) > 0.6


def test_speculative_rounds_short_of_their_forecast_scale_drafting_down() -> None:
    """Sequential rounds chosen at a forecast of 0.55 that accept 0.3 scale the kind's drafting choices down by
    about what they fell short; rounds on forecast leave them, and pipelined rounds do not count."""
    tuner = Tuner(max_k=4)
    short, piped = tuner.new_request(greedy=False), tuner.new_request(greedy=False, mode="pipelined")
    on_forecast = tuner.new_request(greedy=True)
    rng = random.Random(0)
    for _ in range(600):
        for request, rate in ((short, 0.3), (piped, 0.3), (on_forecast, 0.55)):
            request.modelled = True  # drafted at the model's best k, as choose_k would mark it
            tuner.record_draft(1, 0.004, 0.005)
            tuner.record_verify(1, 0.016, 0.017)
            n = int(rng.random() < rate)
            tuner.record_acceptance(request, 1, n)
            tuner.record_round_time(1, 0.022, request.mode, 0.55, 0.55, ready=False, held=n == 1)
    # 1.3 tokens a round where 1.55 were forecast, each round as long as priced (its overhead learnt)
    assert tuner.calibration(short) == pytest.approx(1.3 / 1.55, abs=0.05)
    assert tuner.calibration(on_forecast) == pytest.approx(1.0, abs=0.05)
    assert tuner.calibration(piped) == 1.0


@pytest.mark.parametrize("burst_lasts", [False, True])
def test_rounds_drafted_in_a_passing_burst_are_scored_against_the_target_after_it(burst_lasts: bool) -> None:
    """A speculative round chosen while the target's level is up (a burst of slow calls) is scored against
    the target alone as it runs some calls later: where the burst passes, drafting gained less than the
    choice was priced at; where it lasts, as much."""
    tuner = Tuner(max_k=4)
    request = tuner.new_request()
    for i in range(3000):
        slow = i % 16 < 6 or burst_lasts
        if i % 16 == 5:  # a speculative round at the burst's end, on forecast otherwise
            request.modelled = True
            tuner.record_draft(1, 0.004, 0.005)
            tuner.record_verify(1, 0.024, 0.025)
            n = i % 32 < 16
            tuner.record_acceptance(request, 1, int(n))
            tuner.record_round_time(1, 0.030, "sequential", 0.5, 0.5, ready=False, held=n)
        else:
            request.modelled = False
            tuner.record_verify(0, 0.020 if slow else 0.016, 0.021 if slow else 0.017)
            tuner.record_acceptance(request, 0, 0)
            tuner.record_round_time(0, 0.021 if slow else 0.017, "sequential", ready=False)
    factor = tuner.calibration(request)
    if burst_lasts:
        assert factor == pytest.approx(1.0, abs=0.02)
    else:
        assert factor < 0.97  # 0.959 here, against 1.001 where the burst lasts


def test_how_far_a_request_trusts_its_own_counts_follows_how_much_requests_differ() -> None:
    """Requests that all accept alike leave a lucky start to the kind's estimate; requests that differ (text
    and code, say) each follow their own counts. Each kind learns this for itself."""
    rng = random.Random(1)

    def run(tuner: Tuner, alphas: list[float], greedy: bool, checks: int = 30) -> None:
        for a in alphas:
            request = tuner.new_request(greedy=greedy)
            for _ in range(checks):
                tuner.record_acceptance(request, 1, int(rng.random() < a))

    alike, apart = Tuner(), Tuner()
    run(alike, [0.4] * 120, greedy=False)
    run(apart, [0.15, 0.65] * 30, greedy=True)
    assert alike.request_strength[False, "sequential"] >= 256
    assert apart.request_strength[True, "sequential"] <= 8
    assert alike.request_strength[True, "sequential"] == apart.request_strength[False, "sequential"] == 32.0

    for tuner, greedy in ((alike, False), (apart, True)):
        lucky = tuner.new_request(greedy=greedy)  # a lucky start: 7 of its first 9 drafts held
        for n in (1, 1, 0, 1, 1, 1, 0, 1, 1):
            tuner.record_acceptance(lucky, 1, n)
        fresh = tuner.new_request(greedy=greedy)
        fresh.position = lucky.position  # where in its answer a round falls moves the forecast too
        start = tuner.alpha(fresh)
        if tuner is alike:
            assert tuner.alpha(lucky) - start < 0.03  # under the default strength: 0.07
        else:
            assert tuner.alpha(lucky) > 0.6

    # Too few drafts scored: the default still holds.
    early = Tuner()
    run(early, [0.15, 0.65] * 2, greedy=True, checks=10)
    assert early.request_strength[True, "sequential"] == 32.0


def test_linear_fit_recovers_line_and_uses_prior_when_flat() -> None:
    fit = LinearFit(decay=0.99, prior_b=0.0)
    assert fit.coefficients() is None
    for x in [0, 3, 5, 1, 8, 2] * 5:
        fit.add(x, 0.02 + 0.003 * x)
    a, b = fit.coefficients()
    assert a == pytest.approx(0.02, rel=1e-3) and b == pytest.approx(0.003, rel=1e-3)
    flat = LinearFit(decay=0.99, prior_b=0.0)
    for _ in range(10):
        flat.add(4, 0.05)
    a, b = flat.coefficients()
    assert b == pytest.approx(0.0, abs=1e-4) and a + 4 * b == pytest.approx(0.05, rel=1e-3)


def test_rtt_is_wall_minus_compute() -> None:
    tuner = Tuner()
    for _ in range(100):
        tuner.record_verify(2, compute_s=0.03, wall_s=0.035)
        tuner.record_draft(2, compute_s=0.004, wall_s=0.024)
    costs = tuner.costs()
    assert costs.rtt_target == pytest.approx(0.005)
    assert costs.rtt_draft == pytest.approx(0.020)


def test_choose_k_respects_limit_and_starts_at_initial_k() -> None:
    tuner = Tuner(max_k=8, initial_k=4)
    request = tuner.new_request()
    assert tuner.choose_k(request) == 4
    assert tuner.choose_k(request, limit=2) == 2
    assert tuner.predicted_tps(request) is None
    for k in (1, 2, 4, 8) * 10:
        tuner.record_round(
            request,
            k,
            k,
            target_compute_s=0.02,
            target_wall_s=0.02,
            draft_compute_s=0.001 * k,
            draft_wall_s=0.001 * k,
        )
    assert tuner.choose_k(request, limit=3) <= 3
    assert tuner.choose_k(request, limit=0) == 0
    assert tuner.predicted_tps(request) > 1 / 0.02


def test_one_stall_does_not_hold_the_fit_up_but_a_lasting_change_moves_it() -> None:
    """A draft call that compiled a kernel (1 s against 2 ms) is capped; a lasting 3x slowdown is learned."""
    fit = LinearFit(0.99, prior_a=0.0, prior_weight=0.1)
    for i in range(200):
        fit.add(1 + i % 4, 0.002 * (1 + i % 4))
    fit.add(2, 1.0)
    a, b = fit.coefficients()
    assert a + 2 * b == pytest.approx(0.004, rel=0.1)  # uncapped, the stall alone lifts it 3.7x
    for i in range(400):
        fit.add(1 + i % 4, 0.006 * (1 + i % 4))
    a, b = fit.coefficients()
    assert a + 2 * b == pytest.approx(0.012, rel=0.05)


def test_a_stall_measured_first_is_forgotten_at_the_next_sample() -> None:
    fit = LinearFit(0.99, prior_a=0.0, prior_weight=0.1)
    fit.add(4, 0.5)  # a session's first call: graphs captured, kernels built
    fit.add(4, 0.008)
    a, b = fit.coefficients()
    assert a + 4 * b == pytest.approx(0.008, rel=1e-6)


def test_a_draft_that_looks_hopeless_is_still_probed_now_and_then() -> None:
    """A draft measured once at 10 s a token (a stall) would never be tried again on predicted loss alone."""
    tuner = Tuner()
    tuner.record_draft(1, 10.0)
    tuner.record_verify(0, 0.01)
    ks = [tuner.choose_k(tuner.new_request()) for _ in range(4 * MAX_ALONE_ROUNDS)]
    probes = [i for i, k in enumerate(ks) if k > 0]
    assert probes[:2] == [MAX_ALONE_ROUNDS - 1, 3 * MAX_ALONE_ROUNDS - 1]  # the wait doubles while hopeless


def test_a_draft_call_that_also_took_context_only_lowers_the_fit() -> None:
    tuner = Tuner()
    tuner.record_draft(4, 0.5)  # a stall
    tuner.record_draft(4, 3.0, bound=True)  # above the fit: says nothing
    assert tuner.costs() is None and tuner.draft_fit.coefficients()[1] == pytest.approx(0.125, rel=0.05)
    tuner.record_draft(1, 0.004, bound=True)  # a probe after a target-only stretch, catching the draft up
    a, b = tuner.draft_fit.coefficients()
    assert a + b == pytest.approx(0.004, rel=1e-6)
