"""The target node: score a draft block in one forward and keep what the acceptance rule allows."""

from __future__ import annotations

import math
import time

from tandem.acceptance import verify_greedy, verify_sampled
from tandem.wire import errors
from tandem.wire.gen import tandem_pb2 as pb
from tandem.wire.service import NodeService

PROB_SUM_TOLERANCE = 1e-3


class TargetService(NodeService):
    role = "target"

    def check_dists(self, req: pb.VerifyRequest) -> list[tuple[list[int], list[float]]] | None:
        """Sparse draft distributions as lists, checked here so a bad one never reaches the cache."""
        if not req.draft_dists:
            return None  # a greedy draft: q is the one-hot of each token, which is still exact
        if len(req.draft_dists) != len(req.draft_tokens):
            raise errors.invalid(f"{len(req.draft_dists)} draft_dists for {len(req.draft_tokens)} draft_tokens")
        out = []
        for i, d in enumerate(req.draft_dists):
            m = len(d.ids)
            if m == 0 or m != len(d.probs) or m > self.vocab:
                raise errors.invalid(f"draft_dists[{i}]: {m} ids for {len(d.probs)} probs")
            if min(d.ids) < 0 or max(d.ids) >= self.vocab:
                raise errors.invalid(f"draft_dists[{i}] has ids outside the vocabulary [0, {self.vocab})")
            total = sum(d.probs)
            if not math.isfinite(total) or min(d.probs) < 0 or abs(total - 1.0) > PROB_SUM_TOLERANCE:
                raise errors.invalid(f"draft_dists[{i}] is not a probability vector (sum {total})")
            out.append((list(d.ids), list(d.probs)))
        return out

    async def verify(self, req: pb.VerifyRequest, out: pb.VerifyReply) -> None:
        k = len(req.draft_tokens)
        if k > self.max_k:
            raise errors.invalid(f"{k} draft tokens; this node verifies at most {self.max_k}")
        self.check_commit(req.commit, extra=k)
        self.check_tokens(req.draft_tokens, "draft")
        params = self.sampling(req.sampling)
        dists = None if params.greedy else self.check_dists(req)
        s = self.session(req.session, req.commit)

        def work() -> tuple[int, int, int, int]:
            t0 = time.perf_counter_ns()
            draft = list(req.draft_tokens)
            logits = self.apply(s, req.commit, draft, all_logits=True)[-(k + 1) :]
            seq = s.seq
            try:
                if params.greedy:
                    n, nxt = verify_greedy(logits, draft)
                else:
                    n, nxt = verify_sampled(logits, draft, dists, params, self.generator(s, params))
            except ValueError as exc:
                seq.truncate(len(seq) - k)
                raise errors.invalid(str(exc)) from None
            except Exception:
                seq.truncate(len(seq) - k)
                raise
            seq.truncate(len(seq) - k + n)  # keep the accepted prefix; next_token is not in the cache yet
            return n, nxt, len(seq), time.perf_counter_ns() - t0

        n, nxt, cache_len, compute_ns = await self.run(work)
        out.accepted, out.next_token, out.cache_len = n, nxt, cache_len
        out.committed_len = cache_len + 1
        out.timing.compute_ns = compute_ns
