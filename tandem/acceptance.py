"""Speculative verification: which draft tokens the target keeps, and the token it adds.

Greedy: accept while the draft token equals the target's argmax. Sampled: accept x with probability
min(1, p(x)/q(x)); at the first rejection draw from norm(max(p - q, 0)); after k acceptances draw the
bonus from p (Leviathan et al. 2023; Chen et al. 2023). Each emitted token is then distributed
exactly as the target's sampler would have drawn it. Everything stays on the logits' device and
the result crosses to the host once.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor

from tandem.sampling import SamplingParams, draw, target_probs

__all__ = ["dense_q", "verify_greedy", "verify_probs", "verify_sampled"]

Dist = tuple[Tensor, Tensor]


def _check_block(target_logits: Tensor, draft_tokens: Sequence[int]) -> tuple[int, int]:
    if not isinstance(target_logits, Tensor) or target_logits.dim() != 2:
        raise ValueError("target_logits must be a 2-D tensor [k + 1, vocab]")
    k = len(draft_tokens)
    rows, vocab = target_logits.shape
    if rows != k + 1:
        raise ValueError(f"target_logits has {rows} rows for {k} draft tokens; expected {k + 1}")
    for t in draft_tokens:
        if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < vocab:
            raise ValueError(f"draft token {t!r} is not a token id in [0, {vocab})")
    return k, vocab


def _to_device(tokens: Sequence[int], device: torch.device) -> Tensor:
    # A plain copy to a GPU waits for the stream (a sync); from host memory that is staged at once,
    # so a non-blocking copy is safe and lets the verify forward keep running.
    return torch.tensor([int(t) for t in tokens], dtype=torch.long).to(device, non_blocking=True)


def verify_greedy(target_logits: Tensor, draft_tokens: Sequence[int]) -> tuple[int, int]:
    """(n_accepted, next_token): the longest prefix matching the target's argmax, then its token."""
    k, _ = _check_block(target_logits, draft_tokens)
    best = target_logits.argmax(-1)
    draft = _to_device(draft_tokens, best.device)
    n = (best[:k] == draft).long().cumprod(0).sum().view(1)
    # gather, not best[n]: indexing by a 0-d tensor reads it back to the host first.
    n_accepted, next_token = torch.cat([n, best.gather(0, n)]).tolist()
    return n_accepted, next_token


def dense_q(draft_dists: Sequence[Dist], vocab: int, device: torch.device | str) -> Tensor:
    """Scatter the draft's sparse per-position (ids, probs) into dense q [k, vocab]."""
    flat_ids, flat_probs = [], []
    for i, (ids, probs) in enumerate(draft_dists):
        ids = torch.as_tensor(ids).reshape(-1)
        probs = torch.as_tensor(probs, dtype=torch.float32).reshape(-1)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"draft ids at position {i} must be integers, got {ids.dtype}")
        if ids.numel() != probs.numel() or ids.numel() == 0:
            raise ValueError(f"draft distribution {i}: {ids.numel()} ids for {probs.numel()} probs")
        if ids.device.type == "cpu" and probs.device.type == "cpu":  # checks that cost no device sync
            if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                raise ValueError(f"draft distribution {i} has token ids outside [0, {vocab})")
            total = float(probs.sum())
            if bool((probs < 0).any()) or not abs(total - 1.0) <= 1e-3:
                raise ValueError(f"draft distribution {i} is not a probability vector (sum {total:.6f})")
        flat_ids.append(ids.to(dtype=torch.long) + i * vocab)
        flat_probs.append(probs)
    q = torch.zeros(len(draft_dists) * vocab, dtype=torch.float32, device=device)
    if flat_ids:
        ids_all = torch.cat([t.to(device, non_blocking=True) for t in flat_ids])
        q.index_add_(0, ids_all, torch.cat([t.to(device, non_blocking=True) for t in flat_probs]))
    return q.view(len(draft_dists), vocab)


def verify_probs(
    p: Tensor, q: Tensor, draft_tokens: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The acceptance rule on dense distributions, batched: p [..., k+1, V], q [..., k, V], tokens [..., k].

    Returns device tensors (n_accepted [...], next_token [...]). Draws the same amount of randomness
    whatever the outcome, so a seeded generator replays exactly.
    """
    k, vocab = q.shape[-2], q.shape[-1]
    if p.shape[-2] != k + 1 or p.shape[-1] != vocab or draft_tokens.shape[-1] != k:
        raise ValueError(f"shapes disagree: p {tuple(p.shape)}, q {tuple(q.shape)}, tokens {tuple(draft_tokens.shape)}")
    if k == 0:
        return torch.zeros(p.shape[:-2], dtype=torch.long, device=p.device), draw(p[..., 0, :], generator)
    x = draft_tokens.long().unsqueeze(-1)
    q_x = q.gather(-1, x).squeeze(-1)
    # A proposed token the draft claims it could not propose breaks the rule's premise; treating
    # that position as a deterministic proposal (q = one-hot) is exact for a draft that chose it so.
    impossible = q_x <= 0
    q_x = torch.where(impossible, torch.ones_like(q_x), q_x)
    p_x = p[..., :k, :].gather(-1, x).squeeze(-1)
    u = torch.rand(q_x.shape, generator=generator, device=q_x.device, dtype=q_x.dtype)
    accepted = u * q_x < p_x  # u < p/q without dividing; p >= q always accepts, p == 0 never
    n = accepted.long().cumprod(-1).sum(-1)
    # Only row n is drawn from: the residual max(p_n - q_n, 0) at a rejection, p_k after k acceptances.
    # Building that one row, not all k + 1, keeps a block's cost near a decode step's.
    at = n.clamp_max(k - 1)[..., None, None]
    p_n = p.gather(-2, n[..., None, None].expand(*n.shape, 1, vocab))
    q_n = q.gather(-2, at.expand(*n.shape, 1, vocab))
    x_n = x.gather(-2, at)
    q_n = torch.where(impossible.gather(-1, at[..., 0])[..., None], torch.zeros_like(q_n).scatter_(-1, x_n, 1.0), q_n)
    residual = (p_n - q_n).clamp_min_(0.0)
    # After k acceptances, or where p == q leaves nothing (a rejection there has probability 0): p itself.
    use_p = (n == k)[..., None, None] | (residual.sum(-1, keepdim=True) <= 0)
    return n, draw(torch.where(use_p, p_n, residual).squeeze(-2), generator)


def verify_sampled(
    target_logits: Tensor,
    draft_tokens: Sequence[int],
    draft_dists: Sequence[Dist] | None,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """(n_accepted, next_token) for one block under the request's sampler.

    draft_dists holds the draft's exact (ids, probs) per drafted position; None means the draft
    proposed greedily (q is the one-hot of each draft token), which is still exact.
    """
    k, vocab = _check_block(target_logits, draft_tokens)
    device = target_logits.device
    p = target_probs(target_logits, params)
    tokens = _to_device(draft_tokens, device)
    if draft_dists is None:
        q = torch.zeros(k, vocab, dtype=torch.float32, device=device).scatter_(-1, tokens[:, None], 1.0)
    else:
        if len(draft_dists) != k:
            raise ValueError(f"{len(draft_dists)} draft distributions for {k} draft tokens")
        q = dense_q(draft_dists, vocab, device)
    n, next_token = verify_probs(p, q, tokens, generator)
    n_accepted, token = torch.stack([n, next_token]).tolist()
    return n_accepted, token
