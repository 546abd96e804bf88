"""Sampled speculation through running nodes emits exactly the target's sampling distribution.

On a tiny model (vocab 48), each setting draws DRAWS rounds from a fixed context, half over gRPC
and half over ZeroMQ, with two draft tokens per round. The first emitted token must follow the
target's sampler p(. | ctx) and, when a round emits a second token, that one must follow
p(. | ctx, first): both checked with chi-square tests (p > 0.001). Drafts range from the target's
own distribution to a much worse one; one setting drafts with a real draft node, over NODE_DRAWS rounds
(each costs it two calls).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from contextlib import nullcontext

import numpy as np
import pytest
from scipy import stats

from draft_node.service import DraftService
from tandem.engine.runtime import Engine
from tandem.sampling import SamplingParams, target_probs
from tandem.wire.client import NodeClient, connect
from tandem.wire.gen import tandem_pb2 as pb
from target_node.service import TargetService
from tests.wire_helpers import TINY_VOCAB, running, tiny_engine, write_tiny_llama

pytestmark = pytest.mark.slow

DRAWS = 20_000
NODE_DRAWS = 10_000
CONCURRENCY = 8  # sessions in flight per transport, so round trips overlap the node's compute
CTX = [3, 8, 15]
ALPHA = 1e-3


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, Engine]:
    d = tmp_path_factory.mktemp("exact")
    # scale 0.5: flat enough that every setting leaves a dozen or more tokens to test
    target = tiny_engine(write_tiny_llama(d / "target.gguf", seed=11, n_layers=1, scale=0.5))
    draft = tiny_engine(write_tiny_llama(d / "draft.gguf", seed=12, n_layers=1, scale=0.5))
    return target, draft


def probs_after(engine: Engine, ctx: list[int], params: SamplingParams) -> np.ndarray:
    logits = engine.new_sequence().forward(ctx, all_logits=False)[-1]
    return target_probs(logits, params).double().numpy()


def chi_square(counts: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Pearson's test; cells expected below 5 are pooled. A token the target cannot emit fails outright."""
    impossible = (expected == 0) & (counts > 0)
    assert not impossible.any(), f"emitted tokens the target gives probability 0: {np.flatnonzero(impossible)}"
    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep & (expected > 0)].sum())
    exp = np.append(expected[keep], expected[~keep & (expected > 0)].sum())
    assert len(obs) >= 3, f"degenerate test: {len(obs)} cells"
    if exp[-1] < 5:  # fold a small pooled cell into the smallest kept one
        i = int(np.argmin(exp[:-1]))
        obs[i] += obs[-1]
        exp[i] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    return chi2, float(stats.chi2.sf(chi2, len(obs) - 1))


Proposal = tuple[list[int], list[pb.TokenDist]]
Propose = Callable[[NodeClient | None, str, np.random.Generator], Awaitable[Proposal]]


def fixed_draft(q1: np.ndarray, q2: np.ndarray) -> Propose:
    """A draft with known q at both positions (q2 ignores the first token: a legitimate, bad draft)."""

    def dist(q: np.ndarray) -> pb.TokenDist:
        ids = np.flatnonzero(q)
        return pb.TokenDist(ids=ids.tolist(), probs=q[ids].astype(np.float32).tolist())

    d1, d2 = dist(q1), dist(q2)
    # What the node reads is float32: sample from exactly that, renormalised the way torch would.
    q1 = np.zeros(TINY_VOCAB)
    q1[list(d1.ids)] = d1.probs
    q2 = np.zeros(TINY_VOCAB)
    q2[list(d2.ids)] = d2.probs

    async def propose(_: NodeClient | None, sid: str, rng: np.random.Generator) -> Proposal:
        return [int(rng.choice(TINY_VOCAB, p=q1 / q1.sum())), int(rng.choice(TINY_VOCAB, p=q2 / q2.sum()))], [d1, d2]

    return propose


Rounds = list[tuple[int, int | None]]


async def draw_rounds(
    target: NodeClient, draft: NodeClient | None, propose: Propose, params: SamplingParams, n: int, seed: int
) -> Rounds:
    """n rounds from CTX over CONCURRENCY sessions: (first emitted token, second or None)."""
    sp = pb.Sampling(temperature=params.temperature, top_k=params.top_k, min_p=params.min_p, seed=seed)
    if params.top_p != 1.0:
        sp.top_p = params.top_p
    out: Rounds = []

    async def worker(w: int) -> None:
        sid, rng = f"s{seed}-{w}", np.random.default_rng(seed * 100 + w)
        wsp = pb.Sampling()
        wsp.CopyFrom(sp)
        wsp.seed = seed * 100 + w  # sessions sharing a seed would share random streams: not independent
        await target.prefill(sid, 0, CTX[:-1])
        for _ in range(n // CONCURRENCY):
            tokens, dists = await propose(draft, sid, rng)
            rep = await target.verify(sid, len(CTX) - 1, CTX[-1:], tokens, dists, wsp)
            emitted = [*tokens[: rep.accepted], rep.next_token]
            out.append((emitted[0], emitted[1] if len(emitted) > 1 else None))

    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    return out


def node_draft(temperature: float, top_k: int) -> Propose:
    async def propose(draft: NodeClient | None, sid: str, rng: np.random.Generator) -> Proposal:
        assert draft is not None
        sp = pb.Sampling(temperature=temperature, seed=zlib.crc32(sid.encode()))  # one stream per session
        rep = await draft.propose(sid, 0, CTX, 2, sp, draft_top_k=top_k)
        return list(rep.tokens), list(rep.dists)

    return propose


def check(engine: Engine, params: SamplingParams, rounds: Rounds) -> None:
    p1 = probs_after(engine, CTX, params)
    first = np.bincount([a for a, _ in rounds], minlength=TINY_VOCAB)
    chi2, pval = chi_square(first, p1 * len(rounds))
    assert pval > ALPHA, f"first token: chi2 {chi2:.1f}, p {pval:.2e}"
    # Second tokens, each against p(. | CTX + first): one pooled test over the (first, second) cells.
    pairs = [(a, b) for a, b in rounds if b is not None]
    assert len(pairs) > 200, "too few two-token rounds to test the second position"
    obs, exp = np.zeros((TINY_VOCAB, TINY_VOCAB)), np.zeros((TINY_VOCAB, TINY_VOCAB))
    for a, b in pairs:
        obs[a, b] += 1
    for a in np.flatnonzero(obs.sum(1)):
        exp[a] = probs_after(engine, [*CTX, int(a)], params) * obs[a].sum()
    chi2, pval = chi_square(obs.ravel(), exp.ravel())
    assert pval > ALPHA, f"second token: chi2 {chi2:.1f}, p {pval:.2e}"


def run_both_transports(
    target_engine: Engine,
    draft_engine: Engine | None,
    propose: Propose,
    params: SamplingParams,
    seed: int,
    draws: int = DRAWS,
) -> Rounds:
    rounds: Rounds = []
    for i, transport in enumerate(("grpc", "zmq")):
        with (
            running(TargetService(target_engine, max_sessions=64), transport) as tn,
            running(DraftService(draft_engine, max_sessions=64), transport)
            if draft_engine is not None
            else nullcontext() as dn,
        ):
            rounds += asyncio.run(_collect(tn.url, dn and dn.url, propose, params, seed + i, draws // 2))
    return rounds


async def _collect(turl: str, durl: str | None, propose: Propose, params: SamplingParams, seed: int, n: int) -> Rounds:
    target = await connect(turl)
    draft = await connect(durl) if durl else None
    try:
        return await draw_rounds(target, draft, propose, params, n, seed)
    finally:
        await target.aclose()
        if draft is not None:
            await draft.aclose()


def _worst_draft(p: np.ndarray) -> np.ndarray:
    """Most of q's mass on the tokens the target likes least: acceptance is rare, residuals common."""
    order = np.argsort(p)
    q = np.zeros_like(p)
    q[order[:8]] = 0.9 / 8
    q[order[-2:]] = 0.05
    return q


SETTINGS = {
    "t1.0-worst-draft": (SamplingParams(temperature=1.0), "worst"),
    "t1.3-topp0.8-minp0.02-near-target-draft": (SamplingParams(temperature=1.3, top_p=0.8, min_p=0.02), "near"),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_speculation_is_exact(engines: tuple[Engine, Engine], name: str) -> None:
    target, _ = engines
    params, kind = SETTINGS[name]
    p1 = probs_after(target, CTX, params)
    uniform = np.full(TINY_VOCAB, 1.0 / TINY_VOCAB)
    if kind == "worst":
        q1 = _worst_draft(p1)
    else:  # the target's own distribution, slightly off: almost always accepted
        q1 = 0.8 * p1 + 0.2 * uniform
    q2 = _worst_draft(p1) if kind == "worst" else uniform
    rounds = run_both_transports(target, None, fixed_draft(q1, q2), params, seed=len(name))
    assert len(rounds) == DRAWS
    check(target, params, rounds)


def test_sampled_speculation_with_a_draft_node_is_exact(engines: tuple[Engine, Engine]) -> None:
    """A different model drafting hot (temperature 1.6, top-6) for a cooler, top-k- and top-p-cut target."""
    target, draft = engines
    params = SamplingParams(temperature=0.8, top_k=12, top_p=0.9)
    rounds = run_both_transports(target, draft, node_draft(1.6, 6), params, seed=7, draws=NODE_DRAWS)
    assert len(rounds) == NODE_DRAWS
    check(target, params, rounds)


def sample_rounds(engine: Engine, first: SamplingParams, second: SamplingParams, seed: int) -> list:
    """Rounds drawn straight from the target's sampler, no speculation: half of them emit two tokens."""
    rng = np.random.default_rng(seed)
    p1 = probs_after(engine, CTX, first)
    firsts = rng.choice(TINY_VOCAB, size=DRAWS, p=p1 / p1.sum())
    p2 = {int(a): probs_after(engine, [*CTX, int(a)], second) for a in np.unique(firsts)}
    return [
        (int(a), int(rng.choice(TINY_VOCAB, p=p2[a] / p2[a].sum())) if i % 2 else None) for i, a in enumerate(firsts)
    ]


def test_the_check_passes_true_samples_and_rejects_slightly_wrong_ones(engines: tuple[Engine, Engine]) -> None:
    target, _ = engines
    right, wrong = SamplingParams(temperature=1.0), SamplingParams(temperature=1.15)
    check(target, right, sample_rounds(target, right, right, seed=1))
    with pytest.raises(AssertionError, match="first token"):
        check(target, right, sample_rounds(target, wrong, right, seed=2))
    with pytest.raises(AssertionError, match="second token"):
        check(target, right, sample_rounds(target, right, wrong, seed=3))
