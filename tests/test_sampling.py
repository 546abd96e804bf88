from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tandem import sampling
from tandem.sampling import SamplingParams, draft_distribution, draw, make_generator, sample, target_probs


def reference_probs(logits: np.ndarray, t: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """One row, float64, loops: temperature, top-k, top-p, min-p (vLLM's order)."""
    v = len(logits)
    if t == 0:
        out = np.zeros(v)
        out[int(np.argmax(logits))] = 1.0
        return out
    x = logits.astype(np.float64) / t
    if 0 < top_k < v:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1:
        keep, mass = np.zeros(v, dtype=bool), 0.0
        for i in np.argsort(-p, kind="stable"):
            if mass < top_p:
                keep[i] = True
            mass += p[i]
        p = np.where(keep, p, 0.0)
    if min_p > 0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()


SETTINGS = [
    (1.0, 0, 1.0, 0.0),
    (0.0, 0, 1.0, 0.0),
    (0.7, 5, 1.0, 0.0),
    (1.3, 0, 0.8, 0.0),
    (1.0, 0, 1.0, 0.1),
    (0.8, 6, 0.9, 0.05),
    (2.0, 3, 0.5, 0.3),
    (0.5, 1, 1.0, 0.0),
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_target_probs_matches_reference(setting: tuple[float, int, float, float]) -> None:
    params = SamplingParams(*setting)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 32, generator=gen) * 3
    got = target_probs(logits, params)
    assert got.shape == logits.shape and got.dtype == torch.float32
    for row in range(logits.shape[0]):
        want = reference_probs(logits[row].numpy(), *setting)
        np.testing.assert_allclose(got[row].numpy(), want, atol=1e-5)
        assert (got[row].numpy() > 0).tolist() == (want > 0).tolist()


sampling_sorted = sampling._top_p_sorted  # the sort itself, before a test wraps it to count calls


def test_top_p_window_keeps_what_the_full_sort_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Peaked rows end their prefix inside the first window, broader ones in the second; flat rows and a
    # tie across the prefix's end are sorted, alone or beside rows a window settled. All must keep
    # exactly the stable sort's set.
    sorts = []
    monkeypatch.setattr(sampling, "_top_p_sorted", lambda p, t: sorts.append(1) or sampling_sorted(p, t))
    gen = torch.Generator().manual_seed(0)
    vocab = 2 * sampling.TOP_P_WINDOWS[-1]
    cases = [torch.randn(3, vocab, generator=gen) * scale for scale in (0.3, 3.0, 10.0, 30.0)]
    cases.append((torch.randn(3, vocab, generator=gen) * 8).round())  # many exact ties
    tie = torch.full((1, vocab), -20.0)
    tie[0, :4] = 5.0  # four equal tokens, each a quarter: top-p 0.6 keeps three, chosen by id
    cases.append(tie)
    cases.append(torch.stack([torch.cat([cases[3][:2], cases[0][:1]]), torch.cat([tie, cases[1][:2]])]))  # mixed
    windowed = 0
    for logits, top_p in itertools.product(cases, (0.3, 0.6, 0.9, 0.99)):
        probs = sampling._softmax_(logits.clone())
        want = probs.masked_fill(sampling_sorted(probs, top_p), 0.0)
        before = len(sorts)
        sampling._top_p_(probs, top_p)
        assert torch.equal(probs, want)
        windowed += len(sorts) == before
    assert 0 < windowed < len(cases) * 4  # both paths ran
    assert (target_probs(tie, SamplingParams(1.0, top_p=0.6))[0, :5] > 0).tolist() == [True] * 3 + [False] * 2


def test_draw_follows_each_rows_weights_and_never_a_zero() -> None:
    weights = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 2.0, 0.0, 0.0], [1e-30, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 1.0]])
    g = make_generator(3)
    drawn = torch.stack([draw(weights, g) for _ in range(4000)])  # [4000, 4]
    assert drawn.dtype == torch.long and drawn.shape == (4000, 4)
    for row in range(4):
        counts = np.bincount(drawn[:, row].numpy(), minlength=4) / 4000
        want = (weights[row] / weights[row].sum()).numpy()
        assert (counts[want == 0] == 0).all()
        np.testing.assert_allclose(counts, want, atol=0.03)
    assert torch.equal(draw(weights, make_generator(9)), draw(weights, make_generator(9)))


def test_target_probs_is_vectorised_over_leading_dims() -> None:
    params = SamplingParams(0.9, top_k=7, top_p=0.85, min_p=0.02)
    logits = torch.randn(2, 3, 20)
    batched = target_probs(logits, params)
    for i, j in itertools.product(range(2), range(3)):
        torch.testing.assert_close(batched[i, j], target_probs(logits[i, j][None], params)[0])


def test_truncations_keep_the_top_token() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    for params in (
        SamplingParams(1.0, top_p=1e-6),
        SamplingParams(1.0, top_k=1),
        SamplingParams(1.0, min_p=1.0),
    ):
        assert target_probs(logits, params).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    # Ties at the k-th value are kept together rather than split by sort order.
    tied = target_probs(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), SamplingParams(1.0, top_k=1))
    assert tied.tolist() == [[0.0, 0.5, 0.5, 0.0]]


def test_temperature_applies_before_top_p() -> None:
    # At T = 1 the top token holds 0.665 < 0.7, so top-p keeps two tokens; at T = 0.5 it holds
    # 0.867 >= 0.7 and stands alone. Temperature-last (llama.cpp) would keep two.
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    p = target_probs(logits, SamplingParams(0.5, top_p=0.7))
    assert p.tolist() == [[1.0, 0.0, 0.0]]
    assert (target_probs(logits, SamplingParams(1.0, top_p=0.7)) > 0).sum() == 2


def test_greedy_is_one_hot_argmax() -> None:
    logits = torch.randn(4, 11)
    p = target_probs(logits, SamplingParams())
    assert SamplingParams().greedy and not SamplingParams(0.1).greedy
    assert torch.equal(p.argmax(-1), logits.argmax(-1)) and torch.equal(p.sum(-1), torch.ones(4))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_sampling_params_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_edges_and_is_frozen() -> None:
    p = SamplingParams(temperature=1, top_k=0, top_p=1.0, min_p=1.0, seed=3)
    p.validate()
    with pytest.raises(AttributeError):
        p.temperature = 2.0  # type: ignore[misc]


def test_target_probs_rejects_bad_logits() -> None:
    with pytest.raises(ValueError):
        target_probs(torch.zeros(2, 0), SamplingParams(1.0))
    with pytest.raises(ValueError):
        target_probs(torch.zeros(2, 4, dtype=torch.long), SamplingParams(1.0))


def test_draft_distribution_is_exact_truncated_softmax() -> None:
    logits = torch.randn(3, 40)
    ids, probs = draft_distribution(logits, 0.7, 5)
    assert ids.shape == probs.shape == (3, 5) and ids.dtype == torch.long
    for row in range(3):
        top = logits[row].topk(5)
        assert ids[row].tolist() == top.indices.tolist()
        torch.testing.assert_close(probs[row], torch.softmax(top.values / 0.7, -1))
    ids1, probs1 = draft_distribution(logits[1], 0.7, 5)
    assert torch.equal(ids1, ids[1]) and torch.equal(probs1, probs[1])
    full_ids, full_probs = draft_distribution(logits[0], 1.0, 0)
    assert sorted(full_ids.tolist()) == list(range(40))
    torch.testing.assert_close(full_probs.sum(), torch.tensor(1.0))
    assert draft_distribution(logits[0], 1.0, 100)[0].numel() == 40


def test_draft_distribution_greedy_and_errors() -> None:
    logits = torch.randn(2, 9)
    ids, probs = draft_distribution(logits, 0.0, 4)
    assert ids[:, 0].tolist() == logits.argmax(-1).tolist() and probs.tolist() == [[1.0], [1.0]]
    for bad in ((-1.0, 4), (float("nan"), 4), (1.0, -2), (1.0, 1.5)):
        with pytest.raises(ValueError):
            draft_distribution(logits, *bad)


def test_sample_is_deterministic_for_a_seed_and_follows_probs() -> None:
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    a = [sample(probs, make_generator(5)) for _ in range(3)]
    g1, g2 = make_generator(42), make_generator(42)
    seq1 = [sample(probs, g1) for _ in range(50)]
    seq2 = [sample(probs, g2) for _ in range(50)]
    assert seq1 == seq2 and len(set(a)) == 1
    g = make_generator(1)
    counts = np.bincount([sample(probs, g) for _ in range(4000)], minlength=4)
    assert counts[1] == 0
    np.testing.assert_allclose(counts / 4000, probs.numpy(), atol=0.03)
    assert sample(torch.tensor([0.0, 0.0, 1.0]), make_generator(None)) == 2
    with pytest.raises(ValueError):
        sample(torch.ones(2, 2))
