"""Verification rules: greedy by construction, sampled by statistics against the target's sampler."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from tandem.acceptance import dense_q, verify_greedy, verify_probs, verify_sampled
from tandem.sampling import SamplingParams, draft_distribution, make_generator, target_probs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: a thread team only adds latency, and a lot of it on a shared, busy host.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- greedy ---------------------------------------------------------------------------------------


def logits_with_argmax(best: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.randn(len(best), vocab, generator=torch.Generator().manual_seed(len(best)))
    logits[torch.arange(len(best)), torch.tensor(best)] = 10.0
    return logits


def test_greedy_accepts_matching_prefix_then_target_token() -> None:
    logits = logits_with_argmax([4, 7, 1, 9])
    assert verify_greedy(logits, [4, 7, 1]) == (3, 9)  # all accepted: the bonus
    assert verify_greedy(logits, [4, 7, 2]) == (2, 1)  # mismatch at 2: the target's token there
    assert verify_greedy(logits, [5, 7, 1]) == (0, 4)  # a later match does not count
    assert verify_greedy(logits[:1], []) == (0, 4)  # k = 0: a plain decode step


def test_greedy_rejects_bad_input() -> None:
    logits = logits_with_argmax([1, 2, 3])
    with pytest.raises(ValueError, match="rows"):
        verify_greedy(logits, [1])
    with pytest.raises(ValueError, match="token id"):
        verify_greedy(logits, [1, 10])
    with pytest.raises(ValueError, match="token id"):
        verify_greedy(logits, [1, -1])
    with pytest.raises(ValueError):
        verify_greedy(logits[0], [])


def test_sampled_with_greedy_params_equals_greedy() -> None:
    gen = torch.Generator().manual_seed(1)
    g = make_generator(0)
    for trial in range(200):
        k = trial % 4
        logits = torch.randn(k + 1, 6, generator=gen)
        best = logits.argmax(-1).tolist()
        draft = [best[i] if torch.rand(1, generator=gen) < 0.6 else (best[i] + 1) % 6 for i in range(k)]
        dists = [draft_distribution(torch.randn(6, generator=gen), 1.0, 3) for _ in range(k)]
        dists = [
            (torch.cat([ids, torch.tensor([x])]), torch.cat([p * 0.9, torch.tensor([0.1])]))
            for (ids, p), x in zip(dists, draft, strict=True)
        ]
        want = verify_greedy(logits, draft)
        assert verify_sampled(logits, draft, None, SamplingParams(), g) == want
        assert verify_sampled(logits, draft, dists, SamplingParams(), g) == want


# -- sampled: exactness ---------------------------------------------------------------------------

V = 8
START = 3
TRIALS = 20_000
TARGET_LOGITS = torch.randn(V, V, generator=torch.Generator().manual_seed(11)) * 1.5  # row: previous token

# name -> (draft logits table, draft temperature, draft top_k, greedy proposals without q)
DRAFTS = {
    "close": (TARGET_LOGITS + 0.4 * torch.randn(V, V, generator=torch.Generator().manual_seed(12)), 1.0, 0, False),
    "poor": (3.0 * torch.randn(V, V, generator=torch.Generator().manual_seed(13)), 1.5, 4, False),
    "disjoint": (-TARGET_LOGITS, 1.0, 2, False),  # mass on the target's least likely tokens
    "greedy-q": (TARGET_LOGITS + 0.4 * torch.randn(V, V, generator=torch.Generator().manual_seed(14)), 0.0, 0, False),
    "greedy-none": (-TARGET_LOGITS, 0.0, 0, True),  # draft_dists=None
}
SETTINGS = {
    "plain": SamplingParams(1.0),
    "cold-topk": SamplingParams(0.7, top_k=3),
    "hot-topp": SamplingParams(1.3, top_p=0.8),
    "minp": SamplingParams(1.0, min_p=0.15),
    "all": SamplingParams(0.8, top_k=6, top_p=0.9, min_p=0.05),
}


def speculative_round(
    ctx: torch.Tensor, k: int, draft: tuple, params: SamplingParams, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batched round from contexts ctx [B] of a Markov toy model: returns (drafts, n, next)."""
    logits_d, t_d, top_k_d, no_q = draft
    ids, probs = draft_distribution(logits_d, t_d, top_k_d)
    q_table = dense_q(list(zip(ids, probs, strict=True)), V, "cpu")  # [V, V], row = previous token
    prev, xs = ctx, []
    for _ in range(k):
        prev = torch.multinomial(q_table[prev], 1, generator=g).squeeze(-1)
        xs.append(prev)
    x = torch.stack(xs, -1) if xs else torch.zeros(len(ctx), 0, dtype=torch.long)
    rows = torch.cat([ctx[:, None], x], -1)  # the target sees ctx, x_1..x_k
    p = target_probs(TARGET_LOGITS[rows], params)  # [B, k+1, V]
    if no_q:
        q = torch.nn.functional.one_hot(x, V).float()
    else:
        q = q_table[rows[:, :k]]
    n, nxt = verify_probs(p, q, x, g)
    return x, n, nxt


def first_two_tokens(k: int, draft: tuple, params: SamplingParams, seed: int) -> np.ndarray:
    """Generate until two tokens are out (a second round where the first emitted one token)."""
    g = make_generator(seed)
    ctx = torch.full((TRIALS,), START, dtype=torch.long)
    x, n, nxt = speculative_round(ctx, k, draft, params, g)
    first = torch.where(n >= 1, x[:, 0], nxt)
    second = torch.where(n >= 2, x[:, 1], nxt) if k >= 2 else nxt.clone()
    again = n == 0
    x2, n2, nxt2 = speculative_round(nxt[again], k, draft, params, g)
    second[again] = torch.where(n2 >= 1, x2[:, 0], nxt2)
    return (first * V + second).numpy()


def assert_matches(observed_codes: np.ndarray, expected_probs: np.ndarray, label: str) -> None:
    counts = np.bincount(observed_codes, minlength=expected_probs.size).astype(float)
    expected = expected_probs.ravel() * len(observed_codes)
    impossible = expected_probs.ravel() == 0
    assert counts[impossible].sum() == 0, f"{label}: emitted tokens the target's sampler excludes"
    small = (expected < 5) & ~impossible
    obs = np.append(counts[~impossible & ~small], counts[small].sum())
    exp = np.append(expected[~impossible & ~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    pvalue = chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert pvalue > 1e-3, f"{label}: chi-square p = {pvalue:.2e}"


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("draft_name", list(DRAFTS))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampled_joint_of_first_two_tokens_matches_target(k: int, draft_name: str, setting: str) -> None:
    params = SETTINGS[setting]
    p = target_probs(TARGET_LOGITS, params).double().numpy()  # p[prev, next]
    joint = p[START][:, None] * p  # P(first = a) P(second = b | a)
    seed = zlib.crc32(f"{k} {draft_name} {setting}".encode())
    codes = first_two_tokens(k, DRAFTS[draft_name], params, seed)
    assert_matches(codes, joint, f"k={k} draft={draft_name} sampler={setting}")


def test_statistical_check_detects_a_wrong_rule() -> None:
    """The check above must fail for a biased rule, e.g. resampling from p instead of the residual."""
    params, draft = SETTINGS["plain"], DRAFTS["close"]
    g = make_generator(5)
    ctx = torch.full((TRIALS,), START, dtype=torch.long)
    x, n, _ = speculative_round(ctx, 1, draft, params, g)
    p = target_probs(TARGET_LOGITS, params)
    wrong = torch.multinomial(p[ctx], 1, generator=g).squeeze(-1)
    first = torch.where(n >= 1, x[:, 0], wrong).numpy()
    with pytest.raises(AssertionError, match="chi-square"):
        assert_matches(first, p[START].double().numpy(), "wrong rule")


def test_verify_sampled_first_token_matches_target() -> None:
    """The public one-block function, looped (slower, so fewer trials), for one draft and sampler."""
    params = SETTINGS["all"]
    ids, probs = draft_distribution(DRAFTS["poor"][0], 1.5, 4)
    g = make_generator(123)
    p = target_probs(TARGET_LOGITS, params)
    firsts = np.empty(5000, dtype=np.int64)
    for t in range(len(firsts)):
        x1 = int(ids[START][torch.multinomial(probs[START], 1, generator=g)])
        x2 = int(ids[x1][torch.multinomial(probs[x1], 1, generator=g)])
        logits = TARGET_LOGITS[[START, x1, x2]]
        dists = [(ids[START], probs[START]), (ids[x1], probs[x1])]
        n, nxt = verify_sampled(logits, [x1, x2], dists, params, g)
        firsts[t] = x1 if n >= 1 else nxt
    assert_matches(firsts, p[START].double().numpy(), "verify_sampled")


# -- sampled: edge cases --------------------------------------------------------------------------


def test_seeded_generator_replays() -> None:
    logits = torch.randn(4, 12)
    dists = [draft_distribution(torch.randn(12), 1.0, 5) for _ in range(3)]
    draft = [int(ids[0]) for ids, _ in dists]
    params = SamplingParams(0.9, top_p=0.95)
    a = [verify_sampled(logits, draft, dists, params, make_generator(9)) for _ in range(3)]
    g1, g2 = make_generator(77), make_generator(77)
    seq1 = [verify_sampled(logits, draft, dists, params, g1) for _ in range(30)]
    seq2 = [verify_sampled(logits, draft, dists, params, g2) for _ in range(30)]
    assert len(set(a)) == 1 and seq1 == seq2


def test_draft_token_outside_its_q_is_treated_as_deterministic() -> None:
    # q says token 2 is impossible, yet the draft proposed it: no crash, and with q = one-hot the
    # rule accepts it with probability p(2) and otherwise draws from p without token 2.
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7, 0.0001], [0.25, 0.25, 0.25, 0.25]]))
    dists = [(torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))]
    g = make_generator(3)
    outcomes = [verify_sampled(logits, [2], dists, SamplingParams(1.0), g) for _ in range(1000)]
    accepted = np.mean([n for n, _ in outcomes])
    assert abs(accepted - 0.7) < 0.05
    assert all(tok != 2 for n, tok in outcomes if n == 0)


def test_empty_residual_falls_back_to_p() -> None:
    # q = 2p (not normalised) leaves max(p - q, 0) = 0 after a rejection: draw from p instead.
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    q = 2 * p[:, :1]
    g = make_generator(0)
    n, nxt = verify_probs(p.expand(4000, 2, 3), q.expand(4000, 1, 3), torch.zeros(4000, 1, dtype=torch.long), g)
    rejected = nxt[n == 0]
    assert 0.4 < (n == 0).float().mean() < 0.6
    assert set(rejected.tolist()) <= {0, 1} and 0.4 < (rejected == 0).float().mean() < 0.6


def test_sampled_rejects_bad_draft_dists() -> None:
    logits = torch.randn(3, 5)
    ok = (torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))
    params, g = SamplingParams(1.0), make_generator(0)
    with pytest.raises(ValueError, match="draft distributions"):
        verify_sampled(logits, [0, 1], [ok], params, g)
    with pytest.raises(ValueError, match="outside"):
        verify_sampled(logits, [0, 1], [ok, (torch.tensor([0, 5]), torch.tensor([0.5, 0.5]))], params, g)
    with pytest.raises(ValueError, match="probability"):
        verify_sampled(logits, [0, 1], [ok, (torch.tensor([0, 1]), torch.tensor([0.5, 0.6]))], params, g)
    with pytest.raises(ValueError, match="ids"):
        verify_sampled(logits, [0, 1], [ok, (torch.tensor([0, 1, 2]), torch.tensor([0.5, 0.5]))], params, g)
    with pytest.raises(ValueError, match="integers"):
        verify_sampled(logits, [0, 1], [ok, (torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]))], params, g)
    with pytest.raises(ValueError, match="rows"):
        verify_sampled(logits, [0], None, params, g)


# -- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_device_sync_per_verify_on_cuda() -> None:
    import warnings

    vocab, k = 4096, 4
    logits = torch.randn(k + 1, vocab, device="cuda")
    best = logits.argmax(-1).tolist()
    draft = [*best[:2], (best[2] + 1) % vocab, best[3]]
    dists = [draft_distribution(torch.randn(vocab), 1.0, 8) for _ in range(k)]  # host tensors, as off the wire
    dists = [
        (torch.cat([ids, torch.tensor([x])]), torch.cat([p * 0.5, torch.tensor([0.5])]))
        for (ids, p), x in zip(dists, draft, strict=True)
    ]
    params, g = SamplingParams(0.8, top_k=50, top_p=0.95, min_p=0.01), make_generator(0, "cuda")
    calls = {
        "greedy": lambda: verify_greedy(logits, draft),
        "sampled": lambda: verify_sampled(logits, draft, dists, params, g),
        "sampled-none": lambda: verify_sampled(logits, draft, None, params, g),
        "sampled-greedy": lambda: verify_sampled(logits, draft, dists, SamplingParams(), g),
    }
    for call in calls.values():
        call()
    torch.cuda.synchronize()
    counts = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "a prototype feature"
        torch.cuda.set_sync_debug_mode("warn")
    try:
        for name, call in calls.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = call()
            counts[name] = sum("synchroniz" in str(w.message) for w in caught)
            if name.endswith("greedy"):
                assert result == (2, best[2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counts == dict.fromkeys(calls, 1), counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampled_first_token_matches_target_on_cuda() -> None:
    params, (logits_d, t_d, top_k_d, _) = SETTINGS["all"], DRAFTS["poor"]
    g = make_generator(21, "cuda")
    q_table = dense_q(list(zip(*draft_distribution(logits_d, t_d, top_k_d), strict=True)), V, "cuda")
    ctx = torch.full((TRIALS,), START, dtype=torch.long, device="cuda")
    x1 = torch.multinomial(q_table[ctx], 1, generator=g)
    x2 = torch.multinomial(q_table[x1[:, 0]], 1, generator=g)
    x = torch.cat([x1, x2], -1)
    rows = torch.cat([ctx[:, None], x], -1)
    p = target_probs(TARGET_LOGITS.cuda()[rows], params)
    n, nxt = verify_probs(p, q_table[rows[:, :2]], x, g)
    first = torch.where(n >= 1, x[:, 0], nxt).cpu().numpy()
    assert_matches(first, target_probs(TARGET_LOGITS, params)[START].double().numpy(), "cuda")
