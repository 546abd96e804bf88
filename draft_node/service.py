"""The draft node: propose k tokens per request, with their exact draft distributions when sampling."""

from __future__ import annotations

import time

from tandem.sampling import draft_distribution, sample
from tandem.wire import errors
from tandem.wire.gen import tandem_pb2 as pb
from tandem.wire.service import NodeService


class DraftService(NodeService):
    role = "draft"
    seed_salt = 0x9E3779B97F4A7C15  # the target seeds with the same request seed; keep streams apart

    async def propose(self, req: pb.ProposeRequest, out: pb.ProposeReply) -> None:
        k = req.k
        if not 1 <= k <= self.max_k:
            raise errors.invalid(f"k must be in [1, {self.max_k}], got {k}")
        if req.draft_top_k < 0:
            raise errors.invalid(f"draft_top_k must be >= 0 (0: node default), got {req.draft_top_k}")
        self.check_commit(req.commit, extra=k - 1)
        params = self.sampling(req.sampling)
        top_k = req.draft_top_k or self.default_draft_top_k
        s = self.session(req.session, req.commit)

        def work() -> tuple[list[int], list[tuple[list[int], list[float]]], int, int]:
            t0 = time.perf_counter_ns()
            logits = self.apply(s, req.commit, [], all_logits=False)[-1]
            g = None if params.greedy else self.generator(s, params)
            tokens: list[int] = []
            dists = []
            for i in range(k):
                if g is None:
                    tok = int(logits.argmax())
                else:
                    # q is exactly what the token is drawn from, so the target's rule stays lossless. A guess
                    # is not drawn: its most likely token is likelier to be the target's next one.
                    ids, probs = draft_distribution(logits, params.temperature, top_k)
                    ids_l, probs_l = ids.tolist(), probs.tolist()
                    tok = ids_l[0 if i == 0 and req.guess else sample(probs, g)]
                    dists.append((ids_l, probs_l))
                tokens.append(tok)
                if i < k - 1:
                    logits = s.seq.forward([tok], all_logits=False)[-1]
            return tokens, dists, len(s.seq), time.perf_counter_ns() - t0

        tokens, dists, out.cache_len, out.timing.compute_ns = await self.run(work)
        out.tokens.extend(tokens)
        for ids, probs in dists:
            d = out.dists.add()
            d.ids.extend(ids)
            d.probs.extend(probs)
