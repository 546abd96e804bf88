"""Chooses the draft length every round from what the rounds measured.

Measurements feed the cost model (tandem.cost_model): draft compute as overhead + per_token*k, fitted by
exponentially forgotten least squares; the target's compute per call as a level (its decode step, k = 0)
plus, for a verify block of k >= 1 drafts, a gap and a slope per draft, tracked by a Kalman filter
(StepFilter) in which every call moves the level; link times as EWMAs of reply wall time minus
node-reported compute; acceptance as Beta counts, apart for a block's first draft and for the later ones
(deeper drafts accept more: cost_model; the later drafts' rate starts at the first's, the geometric model,
and moves off it as blocks of several drafts are seen), a global prior per kind of request, shrunk toward
the pooled estimate and learnt from the other requests of the kind (each draft counted as heavily as the
prior weighs in its request's forecast, so requests that draft a lot do not set it), plus each request's
own counts, weighed against that prior as heavily as best forecast the kind's drafts so far; each first-draft
forecast is scaled by how the kind's drafts accept at that point of an answer (POSITION_EDGES). Kinds accept at
different rates: a sampled request checks its draft against a distribution, not an argmax, and a pipelined
one mixes blocks drafted ahead into its counts (one prior for both modes, on the demo pair at T = 0.7, stood
at 0.40-0.43 while sequential rounds accepted 0.35, and sequential requests drafted at k = 1 where it lost);
and what rounds cost beyond all that, as EWMAs of each round's wall time minus the model's (with the round's
own target call in place of the filter's estimate of it), apart for target-only rounds, speculative ones
and, pipelined, rounds whose block was drafted ahead and target-only rounds with a call ahead (the model's
blind spots: the draft catching up after target-only stretches, the coordinator's own work, two nodes on one
GPU); a target-only round right after a speculative one is priced apart too, and what it costs beyond a
target-only round is the speculative round's, as often as one follows it.
choose_k maximises predicted tokens/s; in pipelined mode, leaving the target alone while the draft drafts
ahead of it (cost_model.predraft_throughputs) is one more choice, handed to the loop as RequestState.ahead.
In sequential mode every drafting choice is scaled by how the kind's rounds drafted at the model's best k gained
on the target alone against the gains they were chosen for (calibration): rounds drafted where a forecast looks
best fall short of it.

Two kinds of exploration keep the estimates alive. While speculating, every dither_every-th round
drafts one token more or fewer, so the fits keep seeing more than one k, and every fourth such round is
a decode step: where k = 0 never ran, the filter could not tell its level from its gap. While the target
runs alone (k = 0) nothing is learnt about acceptance, so target-only rounds earn "probe credit" at
probe_budget of each round's time, spent on a round at the best k > 0 once the credit covers that
round's predicted loss; once the round is timed, the credit pays what it really lost, and what the round
after it, back to the target alone, took beyond a target-only round. So the probes cost about
probe_budget of throughput however far the model misjudges them, and a request whose text turns easy
gets back to speculating. The credit is shared by all requests: earned per request, it gave every
64-token request about one probe on an H100 where no k paid. However costly the draft looks, at most
MAX_ALONE_ROUNDS rounds pass without a draft, twice as many after each such probe that finds drafting
still hopeless (up to 16x): a cost that was measured once in a stall and never again would otherwise
keep the draft out for good.

Not thread-safe: call from the coordinator's event loop.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field, replace

from tandem.cost_model import (
    Costs,
    Mode,
    best_plan,
    expected_tokens,
    predraft_throughputs,
    round_as_run,
    round_time,
    throughputs,
    tokens_per_second,
)

__all__ = ["LinearFit", "RequestState", "StepFilter", "Tuner"]


OUTLIER = 4.0  # a cost sample counts as at most this many times the fit's prediction
MAX_ALONE_ROUNDS = 512  # target-only rounds in a row, across requests, before a probe however costly
# How far a request trusts its own acceptance counts over its kind's estimate: the candidate prior strengths,
# and how many first drafts (decayed) each is scored on before the best replaces request_prior_strength.
STRENGTHS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
STRENGTH_MIN_SCORED = 100.0
# Where in its answer a round falls (tokens generated before it): a request's first drafts accept less on the
# demo pair at fixed k = 1 (16 prompts, 96 tokens): 0.27-0.28 greedy in rounds 0-7, 0.41 in rounds 8-15, 0.55
# after; sampled at T = 0.7, 0.34-0.35, 0.38, then 0.41-0.42. A position's rate is held at its kind's by
# POSITION_STRENGTH pseudo-drafts until its own drafts show otherwise.
POSITION_EDGES = (8, 16, 32, 64)
POSITION_STRENGTH = 16.0
MAX_RATE = 0.99  # a position's factor may lift a forecast past 1
# Forecast against outcome: what a kind's speculative rounds at the model's best k gained on the target alone,
# against the gain they were chosen for (decayed per round; a prior of CALIBRATION_PRIOR expected tokens at no
# bias), scales every drafting choice.
CALIBRATION_DECAY = 0.995
CALIBRATION_PRIOR = 64.0
# At most 1: the rounds a model picks as its best disappoint it on average, and a factor that noise lifted past 1
# drafted where the model saw a loss (on the demo pair at T = 0.7, such rounds made 0.93x the target alone's pace).
CALIBRATION_RANGE = (0.5, 1.0)
CALIBRATION_LAG = 10  # target calls between a speculative round and its scoring (_score_outcomes)


def _first_forecast(accepted: float, exposure: float, strength: float, kind_rate: float, factor: float) -> float:
    """A request's first-draft rate at a position: its counts over its kind's rate as a prior of `strength`
    pseudo-drafts, read as a level (exposure: its drafts weighed by their positions' factors), times the
    factor of the position asked about."""
    return min((accepted + strength * kind_rate) / (exposure + strength) * factor, MAX_RATE)


def _held(y: float, predicted: float | None, seen: float) -> float | None:
    """A cost sample held within OUTLIER of a fit's prediction once `seen` samples back the fit; None where the
    fit should start afresh at it. A one-off stall (a kernel built on first use, a graph captured for a new
    session) measured 35-1,000x a GPU step: past the first few samples it is capped, and a lasting change
    still moves the fit, a capped step at a time. A sample below the prediction by as much means what the
    fit held was such a stall, or is past."""
    if predicted is None:
        return y
    predicted = max(predicted, 1e-9)
    if y * OUTLIER < predicted:
        return None
    return min(y, OUTLIER * predicted) if seen >= 4 else y


class LinearFit:
    """Weighted least squares y = a + b*x with forgetting, plus a weak ridge prior on a and/or b.

    The prior only matters while the data cannot separate a from b (every sample at one x).
    """

    def __init__(
        self, decay: float, prior_a: float | None = None, prior_b: float | None = None, prior_weight: float = 1e-3
    ) -> None:
        self.decay = decay
        self.prior_a, self.prior_b = prior_a, prior_b
        self.prior_weight = prior_weight  # relative to the data's weight
        self.s0 = self.sx = self.sxx = self.sy = self.sxy = 0.0

    def add(self, x: float, y: float) -> None:
        """One sample, held within OUTLIER of the fit's prediction (_held)."""
        if (held := _held(y, self.predict(x), self.s0)) is None:
            self.s0 = self.sx = self.sxx = self.sy = self.sxy = 0.0
        else:
            y = held
        d = self.decay
        self.s0 = d * self.s0 + 1.0
        self.sx = d * self.sx + x
        self.sxx = d * self.sxx + x * x
        self.sy = d * self.sy + y
        self.sxy = d * self.sxy + x * y

    def predict(self, x: float) -> float | None:
        coef = self.coefficients()
        return None if coef is None else coef[0] + coef[1] * x

    def coefficients(self) -> tuple[float, float] | None:
        if self.s0 == 0:
            return None
        w = self.prior_weight * self.s0
        m00, m01, m11 = self.s0, self.sx, self.sxx
        r0, r1 = self.sy, self.sxy
        if self.prior_a is not None:
            m00, r0 = m00 + w, r0 + w * self.prior_a
        if self.prior_b is not None:
            m11, r1 = m11 + w, r1 + w * self.prior_b
        det = m00 * m11 - m01 * m01
        if det <= 1e-12 * max(m00 * m11, 1e-300):
            return self.sy / self.s0, 0.0
        return (r0 * m11 - m01 * r1) / det, (m00 * r1 - m01 * r0) / det


class StepFilter:
    """The target's compute per call: level + gap*[k > 0] + slope*k for k drafts, plus `after` for a decode step
    right after a verify block, tracked by a Kalman filter.

    One level serves decode steps and verify blocks alike, and every call moves it: a target's speed
    drifts (an 8-thread CPU target verified 2 drafts in 40 ms for minutes, then in 28 ms), and a verify
    line fitted apart from decode steps heard of that only from speculative rounds, the very rounds its
    stale estimate had stopped. The gap and slope change slowly and are learnt from contrasts between calls
    close in time, out of which a drift cancels; while the target runs alone their uncertainty grows, so
    the next probe counts for more. So is `after`: in the loop on the demo pair, decode steps right after a
    verify block took 1-2.5 ms more than the others in a slow stretch of the machine (none on a quiet one),
    and counted in the level they priced the target alone dearest just where the tuner had drafted. Its
    prior is tight: where the tuner drafts steadily, the only decode steps are those right after a block, and
    the level takes them. Samples are held within OUTLIER of the prediction (_held), and an innovation within
    3 standard deviations: a busy CPU's calls spike to 2-4x a step.
    """

    def __init__(self, level_drift: float = 0.01, shape_drift: float = 0.002) -> None:
        self.level_drift, self.shape_drift = level_drift, shape_drift  # per call, relative to the level
        self.x: list[float] = []  # level, gap, slope, after (seconds); empty before the first sample
        self.p: list[list[float]] = []  # their covariance
        self.noise = 0.1  # a call's compute about the prediction, relative sd (learnt)
        self.n = 0

    def _start(self, y: float) -> None:
        self.x = [y, 0.0, 0.0, 0.0]
        self.p = [[0.0] * 4 for _ in range(4)]
        for i, sd in enumerate((1.0, 0.1, 0.03, 0.02)):
            self.p[i][i] = (sd * y) ** 2
        self.n = 1

    def predict(self, k: int, after: bool = False) -> float | None:
        if not self.x:
            return None
        level, gap, slope, past_block = self.x
        return level + (gap + slope * k if k else past_block if after else 0.0)

    def add(self, k: int, y: float, after: bool = False) -> None:
        """A call's compute; after: a decode step (k = 0) right after a verify block."""
        predicted = self.predict(k, after)
        if predicted is None or (held := _held(y, predicted, self.n)) is None:
            self._start(y)  # the first call, or what came before was a stall
            return
        y, predicted = held, max(predicted, 1e-9)
        x, p = self.x, self.p
        drift = max(x[0], 1e-9)
        for i, q in enumerate((self.level_drift, self.shape_drift, self.shape_drift, 0.25 * self.shape_drift)):
            p[i][i] += (q * drift) ** 2
        h = (1.0, 1.0 if k else 0.0, float(k), 1.0 if after and not k else 0.0)
        ph = [sum(p[i][j] * h[j] for j in range(4)) for i in range(4)]
        s = sum(ph[i] * h[i] for i in range(4)) + (self.noise * predicted) ** 2
        e = y - predicted
        rel = e / predicted
        self.noise = math.sqrt(self.noise**2 + 0.02 * (min(rel * rel, 9.0 * self.noise**2) - self.noise**2))
        bound = 3.0 * math.sqrt(s)
        e = min(max(e, -bound), bound)
        for i in range(4):
            x[i] += ph[i] / s * e
            for j in range(4):
                p[i][j] -= ph[i] * ph[j] / s
        self.n += 1

    def coefficients(self) -> tuple[float, float, float] | None:
        """(decode step, verify intercept, verify slope), or None before any call."""
        if not self.x:
            return None
        level, gap, slope, _ = self.x
        return level, level + gap, slope


@dataclass
class RequestState:
    """One request's acceptance counts and exploration state."""

    greedy: bool = True
    mode: Mode = "sequential"
    accepted: float = 0.0  # a block's first draft
    rejected: float = 0.0
    exposure: float = 0.0  # those first drafts weighed by their positions' factors (decayed alike)
    later_accepted: float = 0.0  # the drafts after it, once those before them held
    later_rejected: float = 0.0
    lent: list[float] = field(default_factory=lambda: [0.0] * 4)  # what its counts added to its kind's
    probe_in: int = 0  # target-only rounds expected before the next probe (0 while drafting)
    rounds: int = 0
    position: int = 0  # tokens generated so far
    ahead: int = 0  # pipelined: tokens to draft ahead past a guess while the target runs alone (0: none)
    modelled: bool = False  # the latest choice drafted at the model's best k (not a probe or a dither)


class Tuner:
    def __init__(
        self,
        max_k: int = 16,
        initial_k: int = 4,
        prior_alpha: float = 0.5,
        prior_strength: float = 8.0,
        request_prior_strength: float = 32.0,
        fit_decay: float = 0.99,
        rtt_smoothing: float = 0.1,
        overhead_smoothing: float = 0.01,
        global_decay: float = 0.999,
        request_decay: float = 0.98,
        dither_every: int = 16,
        probe_budget: float = 0.01,
    ) -> None:
        if max_k < 0 or initial_k < 0:
            raise ValueError("max_k and initial_k must be >= 0")
        if not 0.0 < prior_alpha < 1.0 or prior_strength <= 0 or request_prior_strength <= 0:
            raise ValueError("prior_alpha must be in (0, 1) and the prior strengths > 0")
        self.max_k, self.initial_k = max_k, min(initial_k, max_k)
        # Pseudo-counts, in proposed tokens: the global estimate starts at prior_alpha; a request starts at
        # the global estimate and owns its estimate after rounds of its own: request_prior_strength of them
        # until the kind's drafts show which of STRENGTHS forecasts best (_score_strengths).
        self.prior_alpha, self.prior_strength = prior_alpha, prior_strength
        self.rtt_smoothing, self.overhead_smoothing = rtt_smoothing, overhead_smoothing
        self.global_decay, self.request_decay = global_decay, request_decay
        self.dither_every, self.probe_budget = dither_every, probe_budget
        # Drafting time is mostly per token: pull the overhead toward 0 until k varies.
        # A draft call is k decode steps: hold its fixed cost near zero firmly, or rounds that all use one k
        # let the fit trade per-token cost for per-call cost and the chosen k drifts to an extreme.
        self.draft_fit = LinearFit(fit_decay, prior_a=0.0, prior_weight=0.1)
        # The target's calls: a verify block starts as dear as a decode step and flat in k (optimistic, so
        # speculation gets tried); the gap between them is a term of its own (cost_model: another path).
        self.target_fit = StepFilter()
        self.rtt_draft: float | None = None
        self.rtt_target: float | None = None
        self.extra_alone: float | None = None  # round wall time beyond the model, k = 0
        self.extra_spec: float | None = None  # the same, k > 0
        self.extra_ready: float | None = None  # the same, k > 0 with the block drafted ahead (pipelined)
        self.extra_ahead: float | None = None  # the same, k = 0 with a draft call ahead (pipelined)
        self.extra_back: float | None = None  # the same, k = 0 right after a round that drafted: beyond k = 0's
        self.n_alone = self.n_spec = self.n_ready = self.n_ahead = self.n_back = 0  # rounds behind each
        self.back_share = 0.0  # of rounds that drafted, those followed by a target-only round (_mean)
        self.n_drafted = 0
        self._after_block = False  # the latest round drafted: the target's next call follows a verify block
        # (greedy, mode) -> [accepted, rejected] of first drafts, then of later ones
        kinds = [(g, m) for g in (True, False) for m in ("sequential", "pipelined")]
        self.global_counts = {kind: [0.0, 0.0, 0.0, 0.0] for kind in kinds}
        # (greedy, mode) -> squared errors of each candidate strength's forecast of a first draft, then how many
        # were scored; and the strength in use
        self.strength_scores = {kind: [0.0] * (len(STRENGTHS) + 1) for kind in kinds}
        self.request_strength = dict.fromkeys(kinds, request_prior_strength)
        # (greedy, mode) -> [accepted, drafted] first drafts per position bucket (POSITION_EDGES)
        self.position_counts = {kind: [[0.0, 0.0] for _ in range(len(POSITION_EDGES) + 1)] for kind in kinds}
        self.rounds = 0
        self.alone_rounds = 0  # target-only choices in a row, across requests
        self.alone_limit = MAX_ALONE_ROUNDS  # ... before a probe however costly
        self.probe_credit = 0.0  # seconds of throughput probes may still lose (negative: overspent)
        self._probe_loss: float | None = None  # the predicted loss of the probe in flight, until it is timed
        self._probe_back = False  # a probe was timed: the next round's cost beyond a target-only one is its too
        self._costs: Costs | None = None  # costs(), until the next measurement changes it
        self._last_verify: tuple[int, float] | None = None  # (k, compute) of the latest target call
        # (kind, accepted) of the latest round, where the model chose its k (probes pay their own way, and are
        # spent where the forecast looks poor, so they beat it: 1.07x the k = 0 pace on the demo pair at T = 0.7)
        self._last_accepted: tuple[tuple[bool, Mode], int] | None = None
        # Sequential speculative rounds waiting to be scored: (kind, tokens made, expected, wall, predicted, the
        # target alone's price, the target's level then, the filter's call count then)
        self._pending: deque[tuple[tuple[bool, Mode], float, float, float, float, float, float, int]] = deque()
        # (greedy, mode) -> [tokens its speculative rounds gained on the target alone beyond their forecast gain,
        # expected tokens], decayed (calibration())
        self.outcomes = {kind: [0.0, 0.0] for kind in kinds}
        self._costs_stale = True

    # -- measurements ---------------------------------------------------------------------------

    def new_request(self, greedy: bool = True, mode: Mode = "sequential") -> RequestState:
        self._after_block = False  # the target's next call is its prefill
        return RequestState(greedy=greedy, mode=mode)

    def _rtt(self, old: float | None, wall_s: float, compute_s: float) -> float:
        """Smoothed; like the fits' samples, one far below the estimate replaces it, one far above is capped."""
        sample = max(wall_s - compute_s, 0.0)
        if old is None or sample * OUTLIER < old:
            return sample
        return old + self.rtt_smoothing * (min(sample, OUTLIER * old + 1e-4) - old)

    def record_draft(self, k: int, compute_s: float, wall_s: float | None = None, bound: bool = False) -> None:
        """A draft call that produced k tokens in compute_s (node-reported) and wall_s (as seen here).
        bound: the call also took a stretch of context, so compute_s only bounds drafting's cost from
        above; it counts where it is below the fit's prediction (a probe after a stall, say)."""
        if k <= 0:
            return
        if bound and ((predicted := self.draft_fit.predict(k)) is None or compute_s >= predicted):
            return
        self._costs_stale = True
        self.draft_fit.add(k, compute_s)
        if wall_s is not None:
            self.rtt_draft = self._rtt(self.rtt_draft, wall_s, compute_s)

    def record_verify(self, k: int, compute_s: float, wall_s: float | None = None) -> None:
        """A target call that verified k draft tokens (k + 1 positions; k = 0: a decode step)."""
        self._costs_stale = True
        self.target_fit.add(k, compute_s, after=self._after_block)
        self._last_verify = (k, compute_s)
        if self._pending:
            self._score_outcomes()
        if wall_s is not None:
            self.rtt_target = self._rtt(self.rtt_target, wall_s, compute_s)

    def record_round_time(
        self,
        k: int,
        wall_s: float,
        mode: Mode = "sequential",
        alpha: float | None = None,
        later: float | None = None,
        *,
        ready: bool | None = None,
        ahead: int = 0,
        held: bool = True,
    ) -> None:
        """A round's wall time, end to end (from the previous round's end: the caller's work between rounds
        counts). Its excess over the model's calls feeds round_overhead or one of the other overheads.
        Pipelined, `ready` says whether the block was drafted ahead, `ahead` how many tokens the draft
        drafted ahead during this round and `held` whether all k drafts held (the call ahead was waited
        for); with ready None the round is priced at the mode's expectation. alpha, later: the acceptance
        rates the round was chosen with (default: the global estimates)."""
        costs = self.costs()
        if costs is None:
            return
        a, b = self.rates() if alpha is None else (alpha, later)
        bare = replace(costs, round_overhead=0.0, spec_overhead=0.0, ready_overhead=0.0, ahead_overhead=0.0)
        if self._last_verify is not None and self._last_verify[0] == k:
            # The round's own target call, not the filter's estimate of it: a slow spell of the target is the
            # filter's to follow, and one that leaked into these overheads outlived it where k = 0 was rare
            # (the demo pair: a round_overhead of 1.4 ms held for ~250 speculative rounds after the target
            # recovered, k = 0 looking 10% dearer than it was).
            y = self._last_verify[1]
            bare = replace(bare, decode=y) if k == 0 else replace(bare, verify_intercept=y - bare.verify_slope * k)
        self._last_verify = None
        base = round_time(bare, k, mode, a, b) if ready is None else round_as_run(bare, k, ahead, ready, float(held))
        if k and mode == "sequential" and self._last_accepted is not None:
            # Scored once CALIBRATION_LAG more target calls have come (_score_outcomes).
            kind, n = self._last_accepted
            expected, predicted = expected_tokens(a, k, b), round_time(costs, k, mode, a, b)
            wall = min(wall_s, 3.0 * predicted)
            t0 = round_time(costs, 0, mode)
            self._pending.append((kind, n + 1.0, expected, wall, predicted, t0, costs.decode, self.target_fit.n))
        self._last_accepted = None
        extra = min(wall_s - base, 2.0 * base)  # one stall (GC, a slow client) must not swamp the estimate
        self._costs_stale = True
        if k and self._probe_loss is not None:  # a probe: pay what it lost beyond the prediction
            lost = wall_s - expected_tokens(a, k, b) * round_time(costs, 0, mode)
            self.probe_credit -= lost - self._probe_loss
            self._probe_loss, self._probe_back = None, True
        elif self._probe_back:
            # The round after a probe pays too, where it goes back to the target alone: on the demo pair such a
            # round took a median 0.6 ms more than one after a target-only round, a cost the probe round's own
            # time does not show.
            if not k and not ahead:
                self.probe_credit -= wall_s - round_time(costs, 0, mode)
            self._probe_back = False
        # A target-only round right after one that drafted may cost more than one after a target-only round (the
        # demo pair, in the loop: 0.25-1.3 ms more in wall time, most in slow stretches of the machine): priced
        # against k = 0's clean rounds, that is the drafting round's to pay, as often as one follows.
        back = not k and not ahead and self._after_block
        if self._after_block:
            self.n_drafted += 1
            self.back_share = self._mean(self.back_share, float(back), self.n_drafted)
        self._after_block = k > 0
        # The mean of the first rounds, then an EWMA: where speculation does not pay, speculative rounds are
        # a few probes, and an EWMA started at the first one held near it for dozens more (probes on an H100
        # took 6-13 ms against 1.8 ms rounds at k = 0).
        if back:
            t0 = round_time(costs, 0, mode)
            self.n_back += 1
            self.extra_back = self._mean(self.extra_back, min(wall_s - t0, 2.0 * t0), self.n_back)
        elif k and ready:
            self.n_ready += 1
            self.extra_ready = self._mean(self.extra_ready, extra, self.n_ready)
        elif k:
            self.n_spec += 1
            self.extra_spec = self._mean(self.extra_spec, extra, self.n_spec)
        elif ahead:
            self.n_ahead += 1
            self.extra_ahead = self._mean(self.extra_ahead, extra, self.n_ahead)
        else:
            self.n_alone += 1
            self.extra_alone = self._mean(self.extra_alone, extra, self.n_alone)

    def _score_outcomes(self) -> None:
        """Score speculative rounds CALIBRATION_LAG target calls after them: the tokens each made beyond what the
        target alone would have made in its time, against the same forecast. The target alone is priced as at
        the choice, moved by how far the target's level has moved since: the tuner drafts where its estimate
        of the level is high, and by then the calls that raised it are in the past."""
        level = self.target_fit.x[0]
        while self._pending and not 0 <= self.target_fit.n - self._pending[0][7] < CALIBRATION_LAG:
            kind, made, expected, wall, predicted, t0, level_then, _ = self._pending.popleft()
            t0_later = max(t0 + level - level_then, 1e-9)
            o, d = self.outcomes[kind], CALIBRATION_DECAY
            o[0] = d * o[0] + (made - wall / t0_later) - (expected - predicted / t0)
            o[1] = d * o[1] + expected

    def _mean(self, old: float | None, sample: float, n: int) -> float:
        return sample if old is None else old + max(self.overhead_smoothing, 1.0 / n) * (sample - old)

    def record_acceptance(self, request: RequestState, k: int, n_accepted: int) -> None:
        """n_accepted of k proposed; a round that stops short also saw one rejection.

        With the first draft accepted at rate alpha and each later one at `later`, a round has likelihood
        alpha^[n > 0] (1 - alpha)^[n = 0] later^(n - 1) (1 - later)^[0 < n < k], so the two pairs of
        counts are sufficient and Beta priors stay conjugate.
        """
        if not 0 <= n_accepted <= k:
            raise ValueError(f"n_accepted {n_accepted} outside [0, k={k}]")
        self._last_accepted = ((request.greedy, request.mode), n_accepted) if request.modelled else None
        self.rounds += 1
        request.rounds += 1
        position = request.position
        request.position += n_accepted + 1
        if k == 0:
            return
        first = 1.0 if n_accepted else 0.0
        more = float(max(n_accepted - 1, 0))
        stop = 1.0 if 0 < n_accepted < k else 0.0
        kind = (request.greedy, request.mode)
        factor = self._position_factor(kind, position)
        self._score_strengths(request, first, factor)
        g, r = self.global_decay, self.request_decay
        # Aged by its own drafts only: where drafting does not pay the tuner drafts little, and those few drafts
        # are what keeps it from drafting there.
        c = self.position_counts[kind][bisect.bisect_right(POSITION_EDGES, position)]
        c[:] = [g * c[0] + first, g * c[1] + 1.0]
        # The kind's estimate is what forecasts a request while its own counts are few: a draft teaches it as
        # much as that estimate weighs in its request's forecast now. Counted alike, the requests that drafted
        # most set it: with half the requests accepting 0.8 and half 0.2, where drafting paid only for the
        # first half, new requests were forecast 0.73-0.75 (test_tuner.py).
        w = (s := self.request_strength[kind]) / (request.accepted + request.rejected + s)
        add = (w * first, w * (1.0 - first), w * more, w * stop)
        c = self.global_counts[kind]
        c[:] = [g * x + y for x, y in zip(c, add, strict=True)]
        # Aged as the kind's counts are (exactly so while requests run one at a time).
        request.lent[:] = [g * x + y for x, y in zip(request.lent, add, strict=True)]
        request.accepted = r * request.accepted + first
        request.rejected = r * request.rejected + 1.0 - first
        request.exposure = r * request.exposure + factor
        if n_accepted:
            request.later_accepted = r * request.later_accepted + more
            request.later_rejected = r * request.later_rejected + stop

    def _score_strengths(self, request: RequestState, first: float, factor: float) -> None:
        """Score each candidate prior strength by how well it would have forecast this first draft from the
        request's counts so far and its kind's rate, and use the best. Requests that accept alike then lean on
        their kind's rate instead of drafting wherever their first rounds were lucky; requests that differ
        (code and prose), or whose text runs in easy and hard stretches, follow their own counts. Each forecast
        uses only what came before it, so the score stays fair though the tuner drafts more where a request's
        counts look good. On the demo pair it settled at 8 greedy and 16-32 sampled."""
        n = request.accepted + request.rejected
        others = self._others(request)
        # Every candidate forecasts the kind's rate before the request's own first draft; and until other
        # requests back that rate, it is the prior's, and the request's own counts always forecast better.
        if n == 0.0 or others[0] + others[1] < self.prior_strength:
            return
        kind = (request.greedy, request.mode)
        g, d, a, e = self._global_rates(others)[0], self.global_decay, request.accepted, request.exposure
        scores = self.strength_scores[kind]
        for i, s in enumerate(STRENGTHS):
            err = first - _first_forecast(a, e, s, g, factor)
            scores[i] = d * scores[i] + err * err
        scores[-1] = d * scores[-1] + 1.0
        if scores[-1] >= STRENGTH_MIN_SCORED:
            self.request_strength[kind] = STRENGTHS[min(range(len(STRENGTHS)), key=scores.__getitem__)]

    def record_round(
        self,
        request: RequestState,
        k: int,
        n_accepted: int,
        *,
        target_compute_s: float,
        target_wall_s: float | None = None,
        draft_compute_s: float | None = None,
        draft_wall_s: float | None = None,
    ) -> None:
        if k > 0 and draft_compute_s is not None:
            self.record_draft(k, draft_compute_s, draft_wall_s)
        self.record_verify(k, target_compute_s, target_wall_s)
        self.record_acceptance(request, k, n_accepted)

    # -- estimates ------------------------------------------------------------------------------

    def _others(self, request: RequestState) -> list[float]:
        """The counts of the request's kind without its own: what its own counts are weighed against."""
        counts = self.global_counts[request.greedy, request.mode]
        return [max(c - x, 0.0) for c, x in zip(counts, request.lent, strict=True)]

    def _global_rates(self, others: list[float] | None = None) -> tuple[float, float]:
        """(first, later): all requests' acceptance rates (None), or those of a request's kind without its own
        counts (_others) shrunk toward them; a later draft's rate is shrunk toward the first's."""
        s, counts = self.prior_strength, list(self.global_counts.values())
        a1, r1 = sum(c[0] for c in counts), sum(c[1] for c in counts)
        a2, r2 = sum(c[2] for c in counts), sum(c[3] for c in counts)
        first = (a1 + s * self.prior_alpha) / (a1 + r1 + s)
        if others is not None:
            a1, r1, a2, r2 = others
            first = (a1 + s * first) / (a1 + r1 + s)
        return first, (a2 + s * first) / (a2 + r2 + s)

    def global_alpha(self, request: RequestState | None = None) -> float:
        """All requests' acceptance rate of a first draft (None), or that of the request's kind."""
        return self._global_rates(None if request is None else self._others(request))[0]

    def rates(self, request: RequestState | None = None) -> tuple[float, float]:
        """Posterior mean acceptance rates of a block's first draft and of each later one (once those before it
        held): the request's counts over its kind's global estimates as priors."""
        if request is None:
            return self._global_rates()
        others = self._others(request)
        first, later = self._global_rates(others)
        s, r = self.request_strength[request.greedy, request.mode], request
        # While the kind's counts are few its estimate is uncertain too, and a request leans on it less: the
        # strengths combine as precisions do.
        a1, r1, a2, r2 = others
        s1 = 1.0 / (1.0 / s + 1.0 / (a1 + r1 + self.prior_strength))
        s2 = 1.0 / (1.0 / s + 1.0 / (a2 + r2 + self.prior_strength))
        factor = self._position_factor((r.greedy, r.mode), r.position)
        return (
            _first_forecast(r.accepted, r.exposure, s1, first, factor),
            (r.later_accepted + s2 * later) / (r.later_accepted + r.later_rejected + s2),
        )

    def _position_factor(self, kind: tuple[bool, Mode], position: int) -> float:
        """How a first draft after `position` generated tokens accepts, relative to its kind's first drafts
        wherever they fell: a request's counts are read as a level times the factors of their positions."""
        counts = self.position_counts[kind]
        mean = (sum(c[0] for c in counts) + 1.0) / (sum(c[1] for c in counts) + 2.0)
        c = counts[bisect.bisect_right(POSITION_EDGES, position)]
        return (c[0] + POSITION_STRENGTH * mean) / (c[1] + POSITION_STRENGTH) / mean

    def calibration(self, request: RequestState) -> float:
        """How the request kind's speculative rounds gained on the target alone, against the gains they were
        chosen for (_score_outcomes).

        Rounds drafted where a forecast looks best regress to the mean: on the demo pair at T = 0.7, k = 1
        rounds forecast to gain 5-10% accepted 0.40 where 0.47 was forecast, and the tuner drafted where it
        priced the target alone 5% above what the target-only requests beside them took. Every drafting choice
        is scaled by it, so the tuner drafts where drafting has paid.
        Sequential only: a pipelined round's tokens and time hang on the bets around it (a block that held
        waits for the call ahead; a block drafted ahead skips the draft), and scaling by those rounds' outcomes
        drifted the tuner into drafting ahead where every k paid more (simulated, test_tuner.py)."""
        gained, expected = self.outcomes[request.greedy, request.mode]
        lo, hi = CALIBRATION_RANGE
        return min(max(1.0 + gained / (expected + CALIBRATION_PRIOR), lo), hi)

    def _throughputs(
        self, request: RequestState, costs: Costs, alpha: float, later: float, mode: Mode, cap: int
    ) -> list[float]:
        """cost_model.throughputs, each k > 0 scaled by the request kind's calibration."""
        tps, f = throughputs(alpha, costs, mode, cap, later), self.calibration(request)
        return tps if f == 1.0 else [tps[0], *(t * f for t in tps[1:])]

    def alpha(self, request: RequestState | None = None) -> float:
        return self.rates(request)[0]

    def later(self, request: RequestState | None = None) -> float:
        return self.rates(request)[1]

    def costs(self) -> Costs | None:
        """The cost model's terms as measured; computed again only after a new measurement (the loop asks
        several times a round)."""
        if self._costs_stale:
            self._costs, self._costs_stale = self._measured_costs(), False
        return self._costs

    def _measured_costs(self) -> Costs | None:
        draft, target = self.draft_fit.coefficients(), self.target_fit.coefficients()
        if draft is None or target is None:
            return None
        decode, intercept, slope = target
        alone = max(self.extra_alone or 0.0, 0.0)
        back = max(self.extra_back or 0.0, 0.0) * self.back_share
        return Costs(
            rtt_draft=self.rtt_draft or 0.0,
            rtt_target=self.rtt_target or 0.0,
            draft_per_token=max(draft[1], 0.0),
            draft_overhead=max(draft[0], 0.0),
            verify_intercept=max(intercept, 1e-9),
            verify_slope=max(slope, 0.0),
            round_overhead=alone,
            # 0 until a speculative round was timed, so speculation gets tried. Smoothed slowly: a pipelined
            # round's time swings with its bet, and a dip would make probes look cheap.
            spec_overhead=(self.extra_spec or 0.0) - alone + back,
            ready_overhead=(self.extra_ready or 0.0) - alone + back,
            decode=max(decode, 1e-9),
            ahead_overhead=(self.extra_ahead or 0.0) - alone,
        )

    def predicted_tps(
        self, request: RequestState | None = None, mode: Mode = "sequential", k: int | None = None
    ) -> float | None:
        """Model tokens/s at k (default: the best k); None before anything was measured."""
        costs = self.costs()
        if costs is None:
            return None
        alpha, later = self.rates(request)
        if k is None:
            return best_plan(alpha, costs, mode, self.max_k, later)[2]
        return tokens_per_second(alpha, k, costs, mode, later)

    # -- decision -------------------------------------------------------------------------------

    def choose_k(self, request: RequestState, mode: Mode = "sequential", limit: int | None = None) -> int:
        """Draft length for the request's next round; limit caps it (tokens left, draft context). Pipelined,
        a 0 may come with request.ahead > 0: leave the target alone, but draft that many tokens ahead."""
        cap = self.max_k if limit is None else max(0, min(self.max_k, limit))
        request.ahead, request.modelled = 0, False
        costs = self.costs()
        if costs is None:
            return min(self.initial_k, cap)
        alpha, later = self.rates(request)
        tps = self._throughputs(request, costs, alpha, later, mode, cap)
        k = tps.index(max(tps))
        if j := self._ahead(costs, alpha, later, tps, mode, cap):
            self._speculating(request)
            request.ahead = max(1, self._dither(request, j, cap))
            return 0
        if k == 0:
            if cap == 0:
                return 0
            # Earn credit while the target runs alone; spend it on a probe at the best k > 0 once it
            # covers that round's predicted loss against making the same tokens at k = 0. Near
            # break-even the loss is small and probes come often; hopeless drafts are rarely tried.
            probe, loss, earn = self._probe(costs, alpha, later, tps, mode)
            self.probe_credit += earn
            self.alone_rounds += 1
            if self.probe_credit >= loss or self.alone_rounds >= self.alone_limit:
                if self.alone_rounds >= self.alone_limit:
                    self.alone_limit = min(2 * self.alone_limit, 16 * MAX_ALONE_ROUNDS)
                self.probe_credit -= loss
                self._probe_loss, request.probe_in = loss, 0
                self.alone_rounds = 0
                return probe
            request.probe_in = self._rounds_to_probe(loss, earn)
            return 0
        self._speculating(request)
        chosen = self._dither(request, k, cap)
        request.modelled = chosen == k
        return chosen

    def _dither(self, request: RequestState, k: int, cap: int) -> int:
        if self.dither_every and request.rounds % self.dither_every == self.dither_every - 1:
            cycle = request.rounds // self.dither_every
            step = 1 if cycle % 2 == 0 else -1
            k = 0 if cycle % 4 == 3 else min(max(k + step, 0), cap)
        return k

    def _speculating(self, request: RequestState) -> None:
        self.probe_credit, request.probe_in = 0.0, 0
        self.alone_rounds, self.alone_limit = 0, MAX_ALONE_ROUNDS

    def _ahead(self, costs: Costs, alpha: float, later: float, tps: list[float], mode: Mode, cap: int) -> int:
        """Pipelined: the length to draft ahead of target-only rounds, if that beats every k (else 0)."""
        if mode != "pipelined" or cap == 0:
            return 0
        pre = predraft_throughputs(alpha, costs, cap, later)
        j = pre.index(max(pre))
        return j if j and pre[j] > max(tps) else 0

    def drafts_soon(self, request: RequestState, mode: Mode = "sequential", within: int = 4) -> bool:
        """Whether the request is expected to draft within `within` rounds, as choose_k would decide them. A
        request starting where drafting does not pay sends the draft its prompt only ahead of a probe."""
        costs = self.costs()
        if costs is None or self.max_k == 0:
            return costs is None
        alpha, later = self.rates(request)
        tps = self._throughputs(request, costs, alpha, later, mode, self.max_k)
        if tps.index(max(tps)) > 0 or self._ahead(costs, alpha, later, tps, mode, self.max_k):
            return True
        _, loss, earn = self._probe(costs, alpha, later, tps, mode)
        return self._rounds_to_probe(loss, earn) <= within

    def _probe(
        self, costs: Costs, alpha: float, later: float, tps: list[float], mode: Mode
    ) -> tuple[int, float, float]:
        """(the k a probe drafts, its predicted loss against k = 0, the credit a target-only round earns)."""
        t0 = round_time(costs, 0, mode)
        probe = tps.index(max(tps[1:]), 1)
        loss = round_time(costs, probe, mode, alpha, later) - expected_tokens(alpha, probe, later) * t0
        return probe, loss, self.probe_budget * t0

    def _rounds_to_probe(self, loss: float, earn: float) -> int:
        rounds = self.alone_limit - self.alone_rounds
        if earn > 0:
            rounds = min(rounds, math.ceil((loss - self.probe_credit) / earn))
        return max(rounds, 1)

    def summary(self, request: RequestState | None = None, mode: Mode = "sequential") -> dict[str, float]:
        """Current estimates, for logs and metrics."""
        alpha, later = self.rates(request)
        out: dict[str, float] = {"alpha": alpha, "alpha_later": later}
        costs = self.costs()
        if costs is not None:
            out.update(vars(costs))
            k, ahead, tps = best_plan(alpha, costs, mode, self.max_k, later)
            out.update(best_k=k, ahead=ahead, predicted_tps=tps)
        return {key: (math.nan if v is None else float(v)) for key, v in out.items()}
