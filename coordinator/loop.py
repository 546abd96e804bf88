"""The speculative loop: draft proposes, target verifies, the coordinator commits; lossless by construction.

Every token the client sees is the target's: accepted draft tokens are the ones the target's rule kept,
and each round ends with the target's own token. So greedy output equals target-only decoding token for
token and sampled output keeps the target's distribution, whatever the draft does, including failing.

Sessions travel as deltas. For each node the loop tracks how many leading tokens of the context that
node's session is known to hold (`held`); a call commits `(held, context[held:])`. A node that lost the
session (evicted, restarted) answers NOT_FOUND or FAILED_PRECONDITION and gets the whole context again.

Pipelined mode: while the target verifies block i (drafts d1..dk), the draft drafts block i+1 from
context + d1..dk, its first proposed token being its guess g for the target's next token. If the target
accepts all k and its next token is g, block i+1 was drafted from the true context and goes to the target
at once; otherwise it is dropped. Either way the next verify sees a draft made from the committed
context with its exact distribution q, so the acceptance rule stays exact. g is the draft's most likely
token (only the tokens after it are sampled from q), and where the tuner leaves the target alone it may
still have the draft guess and draft past the target's token the same way (k = 0, RequestState.ahead).

The draft is optional at every round: unreachable, erroring or too slow, it is marked down, a background
task reconnects to it (a fresh client every RECONNECT_INTERVAL, checking its vocabulary again), and
requests continue target-only meanwhile. The target has no substitute: its failure ends the request with
TargetError within seconds (calls in flight are watched with pings, so a dead peer on a transport
without connection errors, ZeroMQ, is noticed too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coordinator.tuner import RequestState, Tuner
from tandem.cost_model import all_held, expected_tokens, round_as_run
from tandem.engine.tokenizer import StreamDecoder, Tokenizer
from tandem.sampling import SamplingParams
from tandem.wire.client import NodeClient, connect
from tandem.wire.errors import Code, NodeError
from tandem.wire.gen import tandem_pb2 as pb

log = logging.getLogger("tandem.coordinator")

Mode = Literal["sequential", "pipelined"]
MODES: tuple[Mode, ...] = ("sequential", "pipelined")

PING_INTERVAL = 1.0  # a call outstanding this long gets a liveness ping to its node, and so on
PING_TIMEOUT = 1.5
PING_FAILURES = 2  # consecutive failed pings that declare a node dead
RECONNECT_INTERVAL = 0.2  # seconds between reconnection attempts to a draft marked down
CONNECT_TIMEOUT = 10.0
# While the target runs alone, the draft is sent the new tokens once it lags this many (beside the target's
# call, on a node that is idle anyway), so that a probe or a return to speculation does not pay for the
# whole stretch on its critical path. Where drafting does not pay, only ahead of a probe (PROBE_LEAD rounds
# before the tuner expects it): with both nodes on one H100, target-only rounds ran 2-6% slower (median)
# while the draft was sent each prompt and caught up every 32 tokens, for probes that came rarely.
CATCH_UP = 32
PROBE_LEAD = 4
# A call drafting ahead of a target-only round also takes up to this many tokens the draft lacks (one short
# batched forward); a draft further behind catches up beside the target first, so that no such round
# carries a long catch-up. Requiring no lag at all, a draft whose catch-ups took two target rounds chased
# the target for a whole request.
AHEAD_LAG = 4
# Errors that mean "this session is gone on the node": resend the whole context once.
LOST_SESSION = (Code.NOT_FOUND, Code.FAILED_PRECONDITION)
# Draft errors specific to one request (its context or arguments): stop drafting for that request only.
REQUEST_ONLY = (Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE)


class CoordinatorError(Exception):
    """Setting up failed (unreachable node, mismatched models): the message says what to fix."""


class Unreachable(CoordinatorError):
    """A node did not answer (as opposed to answering with something unusable)."""


class RequestError(ValueError):
    """The request cannot be served as asked (too long, bad values): a client error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TargetError(Exception):
    """The target node failed or stopped answering during a request."""


# --- metrics ----------------------------------------------------------------------------------


class Metrics:
    """Prometheus series for the loop, in a registry of their own (several coordinators per process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("tandem_requests", "Generations finished, by outcome", ["outcome"], registry=r)
        self.tokens = Counter("tandem_generated_tokens", "Tokens generated", registry=r)
        self.drafted = Counter("tandem_draft_tokens", "Draft tokens sent to the target for verification", registry=r)
        self.accepted = Counter("tandem_accepted_tokens", "Draft tokens the target accepted", registry=r)
        self.acceptance = Gauge("tandem_acceptance_rate", "The tuner's global acceptance-rate estimate", registry=r)
        self.request_acceptance = Histogram(
            "tandem_request_acceptance", "Acceptance rate per request (drafted requests only)",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r,
        )  # fmt: skip
        self.k = Histogram("tandem_chosen_k", "Draft length chosen per round", buckets=tuple(range(17)), registry=r)
        self.round_seconds = Histogram(
            "tandem_round_seconds", "Wall time of one round (propose + verify)", ["mode"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=r,
        )  # fmt: skip
        self.rtt = Histogram(
            "tandem_link_rtt_seconds", "Reply wall time minus the node's compute", ["node"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5), registry=r,
        )  # fmt: skip
        self.tps = Histogram(
            "tandem_request_tokens_per_second", "Decode tokens/s per request",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r,
        )  # fmt: skip
        self.predicted_tps = Gauge("tandem_predicted_tokens_per_second", "Cost model's best tokens/s", registry=r)
        self.fallbacks = Counter(
            "tandem_fallbacks", "Draft failures that sent requests target-only", ["reason"], registry=r
        )
        self.draft_up = Gauge("tandem_draft_up", "1 while the draft node is connected", registry=r)
        self.pipeline_hits = Counter("tandem_pipeline_hits", "Pipelined blocks used as drafted ahead", registry=r)


# --- node links -------------------------------------------------------------------------------


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class Link:
    """One node: its client, its Info, and whether it is usable now."""

    def __init__(
        self,
        role: str,
        url: str,
        token: str | None = None,
        tls_ca: str | None = None,
        check: Callable[[pb.InfoReply], None] | None = None,
    ) -> None:
        self.role, self.url, self.token, self.tls_ca = role, url, token, tls_ca
        self.check = check  # raises CoordinatorError for a node we must not use
        self.client: NodeClient | None = None
        self.info: pb.InfoReply | None = None
        self.up = False
        self.down_reason = ""
        self.on_change: Callable[[bool], None] | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[Any]] = set()

    async def open(self, timeout: float = CONNECT_TIMEOUT) -> pb.InfoReply:
        """Connect and handshake; CoordinatorError when the node cannot be reached or used."""
        try:
            client = await connect(self.url, self.token, self.tls_ca)
        except ValueError as exc:
            raise CoordinatorError(f"{self.role} node address {self.url!r}: {exc}") from None
        try:
            async with asyncio.timeout(timeout):
                info = await client.info()
            self._validate(info)
        except BaseException as exc:
            await client.aclose()
            if isinstance(exc, TimeoutError):
                raise Unreachable(f"no answer from the {self.role} node at {self.url} within {timeout:g} s") from None
            if isinstance(exc, NodeError):
                raise Unreachable(f"cannot reach the {self.role} node at {self.url}: {exc}") from None
            raise
        self._set(client, info)
        return info

    def _validate(self, info: pb.InfoReply) -> None:
        if info.role != self.role:
            raise CoordinatorError(f"the node at {self.url} is a {info.role or 'unknown'} node, not a {self.role} node")
        if self.check is not None:
            self.check(info)

    def _set(self, client: NodeClient, info: pb.InfoReply) -> None:
        old, self.client, self.info, self.up, self.down_reason = self.client, client, info, True, ""
        if old is not None and old is not client:
            self.spawn(old.aclose())
        if self.on_change:
            self.on_change(True)

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        task.add_done_callback(_consume)

    async def call(self, method: str, *args: Any, limit: float | None = None) -> tuple[Any, float]:
        """(reply, wall seconds); NodeError on failure. Outstanding calls are watched with pings."""
        client = self.client
        if client is None or not self.up:
            raise NodeError(Code.UNAVAILABLE, f"{self.role} node {self.url} is down ({self.down_reason})")
        t0 = time.perf_counter()
        task = asyncio.ensure_future(getattr(client, method)(*args))
        task.add_done_callback(_consume)
        failed_pings = 0
        try:
            while True:
                wait = 0.0 if failed_pings else PING_INTERVAL  # after a failed ping, ask again at once
                if limit is not None:
                    wait = max(0.0, min(wait, t0 + limit - time.perf_counter()))
                done, _ = await asyncio.wait({task}, timeout=wait)
                if done:
                    if task.cancelled():  # the client was closed under us (a reconnect): not our cancellation
                        raise NodeError(Code.CANCELLED, f"{self.role} {method} was cancelled: the link was reset")
                    try:
                        return task.result(), time.perf_counter() - t0
                    except NodeError:
                        raise
                    except Exception as exc:  # whatever a transport lets through is still this node failing
                        raise NodeError(Code.UNAVAILABLE, f"{self.role} {method}: {type(exc).__name__}: {exc}") from exc
                over = limit is not None and time.perf_counter() - t0 >= limit
                try:
                    async with asyncio.timeout(PING_TIMEOUT):
                        await client.ping()
                    failed_pings = 0
                except Exception as exc:  # any failure to ping (a closed client raises its own errors)
                    failed_pings += 1
                    if (over or failed_pings >= PING_FAILURES) and not task.done():
                        raise NodeError(
                            Code.UNAVAILABLE, f"{self.role} node {self.url} stopped answering ({exc})"
                        ) from None
                if over and not task.done():  # it answers pings, so it is alive, only slow
                    raise NodeError(Code.DEADLINE_EXCEEDED, f"{self.role} {method} took over {limit:g} s")
        finally:
            if not task.done():
                task.cancel()

    def mark_down(self, reason: str) -> None:
        """Stop using this node; a background task reconnects (drafts only: targets reconnect lazily)."""
        if not self.up:
            return
        log.warning("%s node %s marked down: %s", self.role, self.url, reason)
        self.start_reconnect(reason)

    def start_reconnect(self, reason: str) -> None:
        self.up, self.down_reason = False, reason
        if self.on_change:
            self.on_change(False)
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.ensure_future(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        old, self.client = self.client, None
        if old is not None:
            self.spawn(old.aclose())
        last_error = ""
        while not self.up:
            await asyncio.sleep(RECONNECT_INTERVAL)
            client = await connect(self.url, self.token, self.tls_ca)
            try:
                async with asyncio.timeout(1.0):
                    info = await client.info()
                self._validate(info)
            except Exception as exc:  # whatever the attempt raised, try again later
                self.spawn(client.aclose())
                if isinstance(exc, CoordinatorError) and str(exc) != last_error:
                    log.error("%s node %s is back but unusable: %s", self.role, self.url, exc)
                last_error = str(exc)
                continue
            log.info("%s node %s reconnected (model %s)", self.role, self.url, info.model)
            self._set(client, info)

    async def refresh(self) -> None:
        """A fresh client (gRPC channels back off after failures; a new one connects at once)."""
        client = await connect(self.url, self.token, self.tls_ca)
        old, self.client = self.client, client
        if old is not None:
            self.spawn(old.aclose())

    async def aclose(self) -> None:
        if self._reconnect is not None:
            self._reconnect.cancel()
        for task in list(self._bg):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 2.0)
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        self.up = False


# --- requests ---------------------------------------------------------------------------------


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int | None = 16  # None: until the target's context is full
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    k: int | None = None  # None: tuned every round; 0: target alone; N: fixed draft length
    mode: Mode | None = None  # None: the coordinator's default
    ignore_eos: bool = False


@dataclass
class Stats:
    """What one generation measured, and what the cost model predicted for it."""

    mode: str = ""
    k_policy: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    k_hist: Tally[int] = field(default_factory=Tally)
    fallback_rounds: int = 0  # rounds that would have drafted but the draft was unavailable
    draft_failures: int = 0
    pipeline_bets: int = 0  # blocks drafted ahead (pipelined)
    pipeline_hits: int = 0  # ... that were used
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_link_s: float = 0.0
    draft_calls: int = 0
    target_link_s: float = 0.0
    target_calls: int = 0
    predicted_tokens: float = 0.0  # sums over rounds of the cost model's E(k) and T(k)
    predicted_time: float = 0.0
    finish_reason: str | None = None
    trace: list[tuple[float, int, int]] = field(default_factory=list)  # (monotonic time, k, accepted) per round

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else None

    @property
    def predicted_tps(self) -> float | None:
        return self.predicted_tokens / self.predicted_time if self.predicted_time > 0 else None

    def as_dict(self) -> dict[str, Any]:
        def ms(total: float, n: int) -> float | None:
            return round(1000 * total / n, 3) if n else None

        def r(x: float | None, nd: int = 3) -> float | None:
            return None if x is None else round(x, nd)

        return {
            "mode": self.mode,
            "k": self.k_policy,
            "rounds": self.rounds,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": r(self.acceptance),
            "mean_tokens_per_round": r(self.completion_tokens / self.rounds if self.rounds else None),
            "k_histogram": {str(k): n for k, n in sorted(self.k_hist.items())},
            "pipeline_bets": self.pipeline_bets,
            "pipeline_hits": self.pipeline_hits,
            "fallback_rounds": self.fallback_rounds,
            "draft_failures": self.draft_failures,
            "prefill_seconds": r(self.prefill_s, 4),
            "decode_seconds": r(self.decode_s, 4),
            "tokens_per_second": r(self.tokens_per_second, 2),
            "predicted_tokens_per_second": r(self.predicted_tps, 2),
            "draft_rtt_ms": ms(self.draft_link_s, self.draft_calls),
            "target_rtt_ms": ms(self.target_link_s, self.target_calls),
        }


@dataclass
class Result:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: Stats = field(default_factory=Stats)


class StopText:
    """Incremental text with stop strings, checked token by token as target-only decoding would.

    `push` decodes one token; when a stop string completes, the text is cut where it begins. `release`
    gives the text that can be shown now: everything except a tail that could still begin a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.decoder = StreamDecoder(tokenizer, skip_special=True)
        self.stop = [s for s in stop if s]
        self.longest = max(map(len, self.stop), default=0)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> bool:
        self._add(self.decoder.push([token]))
        return self.stopped

    def _add(self, piece: str) -> None:
        if not piece or self.stopped:
            return
        start = len(self.text)
        self.text += piece
        if self.stop:
            lo = max(0, start - self.longest + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, lo)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def _held(self) -> int:
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def release(self, final: bool = False) -> str:
        if final:
            self._add(self.decoder.finish())
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


# --- the coordinator --------------------------------------------------------------------------


@dataclass
class Settings:
    k: int | None = None  # default draft-length policy (None: auto)
    mode: Mode = "sequential"
    max_k: int = 16
    draft_top_k: int = 0  # 0: the draft node's default
    draft_timeout: float = 10.0  # a propose slower than this counts as a draft failure


class Coordinator:
    """Nodes, tokenizer, tuner and metrics shared by every request; all on one event loop."""

    def __init__(
        self, target: Link, draft: Link | None, tokenizer: Tokenizer, settings: Settings, metrics: Metrics
    ) -> None:
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.settings, self.metrics = settings, metrics
        self.tuner = Tuner(max_k=settings.max_k)
        assert target.info is not None
        slots = target.info.max_sessions
        if draft is not None and draft.info is not None:
            slots = min(slots, draft.info.max_sessions)
        self.slots = asyncio.Semaphore(max(1, slots))  # more sessions than a node keeps would evict ours
        self._bg: set[asyncio.Task[Any]] = set()
        self.target_suspect = False  # a target call failed: new requests ping it first, to fail fast
        if draft is not None:
            draft.on_change = lambda up: metrics.draft_up.set(1 if up else 0)
            metrics.draft_up.set(1 if draft.up else 0)

    @classmethod
    async def connect(
        cls,
        target_url: str,
        draft_url: str | None,
        tokenizer: Tokenizer,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        settings: Settings | None = None,
        metrics: Metrics | None = None,
        tokenizer_source: str = "the local tokenizer",
    ) -> Coordinator:
        """Handshake with both nodes; refuse nodes whose vocabularies differ. A draft that is not up
        yet is not fatal (the coordinator starts target-only and keeps reconnecting)."""
        settings = settings or Settings()
        if settings.mode not in MODES:
            raise CoordinatorError(f"mode must be one of {MODES}, got {settings.mode!r}")

        def check_target(info: pb.InfoReply) -> None:
            if info.tokenizer_fingerprint != tokenizer.fingerprint:
                raise CoordinatorError(
                    f"the target model {info.model!r} at {target_url} has a different vocabulary from "
                    f"{tokenizer_source}: pass --tokenizer-model with the target's GGUF"
                )

        target = Link("target", target_url, token, tls_ca, check_target)
        tinfo = await target.open()
        draft = None
        if draft_url is not None:

            def check_draft(info: pb.InfoReply) -> None:
                if info.tokenizer_fingerprint != tinfo.tokenizer_fingerprint or info.vocab_size != tinfo.vocab_size:
                    raise CoordinatorError(
                        f"draft model {info.model!r} ({draft_url}) and target model {tinfo.model!r} ({target_url}) "
                        f"have different tokenizers (fingerprints {info.tokenizer_fingerprint[:12]} vs "
                        f"{tinfo.tokenizer_fingerprint[:12]}, vocab {info.vocab_size} vs {tinfo.vocab_size}): "
                        "the target verifies the draft's token ids, so both models need the same vocabulary"
                    )

            draft = Link("draft", draft_url, token, tls_ca, check_draft)
            try:
                await draft.open()
            except Unreachable as exc:
                log.warning("%s; starting target-only and reconnecting in the background", exc)
                draft.start_reconnect(str(exc))
            except CoordinatorError:
                await target.aclose()
                raise
        return cls(target, draft, tokenizer, settings, metrics or Metrics())

    async def aclose(self) -> None:
        for task in list(self._bg):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 2.0)
        if self.draft is not None:
            await self.draft.aclose()
        await self.target.aclose()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        task.add_done_callback(_consume)

    @property
    def model_name(self) -> str:
        assert self.target.info is not None
        return self.target.info.model

    @property
    def context_length(self) -> int:
        assert self.target.info is not None
        return self.target.info.context_length

    def check(self, req: Request) -> None:
        """Client errors, raised before anything is sent (so HTTP can answer 400)."""
        vocab = self.tokenizer.vocab_size
        if not req.prompt:
            raise RequestError("the prompt is empty", "prompt")
        if min(req.prompt) < 0 or max(req.prompt) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if len(req.prompt) > self.context_length:
            raise RequestError(
                f"the prompt has {len(req.prompt)} tokens; the target's context holds {self.context_length}", "prompt"
            )
        if req.max_tokens is not None and req.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {req.max_tokens}", "max_tokens")
        if req.k is not None and req.k < 0:
            raise RequestError(f"k must be >= 0 or auto, got {req.k}", "k")
        if req.mode is not None and req.mode not in MODES:
            raise RequestError(f"mode must be one of {MODES}, got {req.mode!r}", "mode")

    async def run(self, req: Request) -> Result:
        """One generation to the end."""
        result = Result()
        async with aclosing(self.stream(req, result)) as chunks:
            async for _ in chunks:
                pass
        return result

    async def stream(self, req: Request, result: Result) -> AsyncIterator[str]:
        """Text as it is committed; stop strings are cut exactly. `result` is complete at the end."""
        self.check(req)
        text = StopText(self.tokenizer, req.stop)
        stats = result.stats
        outcome = "error"
        try:
            async with aclosing(self.rounds(req, stats)) as rounds:
                async for tokens in rounds:
                    for t in tokens:
                        result.tokens.append(t)
                        if (t in self.target.info.eos_ids and not req.ignore_eos) or text.push(t):
                            stats.finish_reason = "stop"
                            break
                    if piece := text.release():
                        yield piece
                    if stats.finish_reason == "stop":
                        break
            if piece := text.release(final=True):
                yield piece
            outcome = "ok"
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"  # the client went away
            raise
        finally:
            result.text = text.text
            result.finish_reason = stats.finish_reason or "length"
            stats.completion_tokens = len(result.tokens)
            self._record_request(stats, outcome)

    def _record_request(self, stats: Stats, outcome: str) -> None:
        m = self.metrics
        m.requests.labels(outcome).inc()
        m.tokens.inc(stats.completion_tokens)
        if stats.acceptance is not None:
            m.request_acceptance.observe(stats.acceptance)
        if stats.tokens_per_second is not None:
            m.tps.observe(stats.tokens_per_second)
        m.acceptance.set(self.tuner.global_alpha())
        if (tps := self.tuner.predicted_tps(None, stats.mode or "sequential")) is not None:
            m.predicted_tps.set(tps)

    # -- node calls ------------------------------------------------------------------------------

    async def _target_call(
        self, stats: Stats, method: str, *args: Any, limit: float | None = None
    ) -> tuple[Any, float]:
        client = self.target.client
        try:
            rep, wall = await self.target.call(method, *args, limit=limit)
        except NodeError as exc:
            if exc.code == Code.UNAVAILABLE and self.target.client is client:
                await self.target.refresh()  # a fresh channel reconnects at once when the node is back
                self.target_suspect = True
            raise
        link = max(wall - rep.timing.compute_ns / 1e9, 0.0)
        stats.target_link_s += link
        stats.target_calls += 1
        self.metrics.rtt.labels("target").observe(link)
        return rep, wall

    async def _verify(
        self, stats: Stats, sid: str, ctx: list[int], held: int, draft: list[int], dists: list[Any], sp: SamplingParams
    ) -> tuple[pb.VerifyReply, float]:
        """Verify with the session delta; a session the target lost gets the whole context again."""
        try:
            try:
                return await self._target_call(stats, "verify", sid, held, ctx[held:], draft, dists, sp)
            except NodeError as exc:
                if exc.code not in LOST_SESSION or held == 0:
                    raise
                log.info("target lost session %s (%s): resending %d tokens", sid, exc.code.name, len(ctx))
                return await self._target_call(stats, "verify", sid, 0, ctx, draft, dists, sp)
        except NodeError as exc:
            raise TargetError(f"target node {self.target.url}: {exc}") from None

    async def _draft_call(self, stats: Stats, method: str, *args: Any, limit: float | None) -> tuple[Any, float]:
        assert self.draft is not None
        rep, wall = await self.draft.call(method, *args, limit=limit)
        link = max(wall - rep.timing.compute_ns / 1e9, 0.0)
        stats.draft_link_s += link
        stats.draft_calls += 1
        self.metrics.rtt.labels("draft").observe(link)
        return rep, wall

    async def _propose(
        self, stats: Stats, sid: str, ctx: list[int], held: int, k: int, sp: SamplingParams, guess: bool = False
    ) -> tuple[pb.ProposeReply, float]:
        """Propose from ctx (resending it whole if the draft lost the session); NodeError on failure.
        guess: the first token is the draft's guess at the target's next one (drafting ahead)."""
        args = (k, sp, self.settings.draft_top_k, guess)
        limit = self.settings.draft_timeout
        try:
            rep, wall = await self._draft_call(stats, "propose", sid, held, ctx[held:], *args, limit=limit)
        except NodeError as exc:
            if exc.code not in LOST_SESSION or held == 0:
                raise
            # A restarted or evicting draft: catch it up (not a sample of drafting speed).
            return await self._draft_call(stats, "propose", sid, 0, ctx, *args, limit=limit)
        bound = len(ctx) - held > 2  # the call also took a stretch of context: not a clean drafting sample
        self.tuner.record_draft(len(rep.tokens), rep.timing.compute_ns / 1e9, wall, bound=bound)
        return rep, wall

    async def _catch_up(self, stats: Stats, sid: str, tokens: list[int], held: int) -> None:
        """Bring the draft's session to `tokens` (resending them whole if the draft lost the session)."""
        try:
            await self._draft_call(stats, "prefill", sid, held, tokens[held:], limit=None)
        except NodeError as exc:
            if exc.code not in LOST_SESSION or held == 0:
                raise
            await self._draft_call(stats, "prefill", sid, 0, tokens, limit=None)

    def _draft_failed(self, stats: Stats, exc: BaseException, k: int = 0) -> bool:
        """Account a draft failure; True when only this request should stop drafting."""
        stats.draft_failures += 1
        code = exc.code if isinstance(exc, NodeError) else Code.UNKNOWN
        self.metrics.fallbacks.labels(code.name.lower()).inc()
        if code == Code.DEADLINE_EXCEEDED:
            # Alive (pings answered) but too slow: teach the tuner what drafting costs, and finish
            # this request without it; the tuner decides for the next ones.
            limit = self.settings.draft_timeout
            if k > 0:
                self.tuner.record_draft(k, limit, limit)
            log.warning("draft too slow (%s): continuing the request target-only", exc)
            return True
        if code in REQUEST_ONLY or code in LOST_SESSION:
            log.warning("draft refused a request (%s): continuing it target-only", exc)
            return True
        assert self.draft is not None
        self.draft.mark_down(str(exc))
        return False

    # -- the loop --------------------------------------------------------------------------------

    async def rounds(self, req: Request, stats: Stats) -> AsyncIterator[list[int]]:
        """Committed tokens per round, ending at max_tokens, EOS (inclusive) or the target's context."""
        self.check(req)
        s, tuner, metrics = self.settings, self.tuner, self.metrics
        mode: Mode = req.mode or s.mode
        policy = s.k if req.k is None and s.k is not None else req.k
        tinfo = self.target.info
        assert tinfo is not None
        eos = frozenset(() if req.ignore_eos else tinfo.eos_ids)
        sp = req.sampling
        stats.mode, stats.k_policy = mode, "auto" if policy is None else str(policy)
        stats.prompt_tokens = len(req.prompt)
        state: RequestState = tuner.new_request(greedy=req.sampling.greedy, mode=mode)
        draft = self.draft if policy != 0 else None
        use_draft = draft is not None  # False once the draft refused this request
        sid = uuid.uuid4().hex
        ctx = list(req.prompt)
        t_held = d_held = 0
        produced = 0
        block: list[int] = []  # a draft block ready for the next verify (a pipelined hit)
        dists: list[Any] = []
        dprefill: asyncio.Task[Any] | None = None  # the draft taking the prompt, or catching up (CATCH_UP)
        dprefill_to = len(ctx) - 1  # what the draft holds once dprefill is done
        stale: asyncio.Task[Any] | None = None  # a pipelined propose whose block was dropped

        def draft_ctx() -> int:
            return draft.info.context_length if draft is not None and draft.info is not None else 0

        def draft_max_k() -> int:
            return draft.info.max_k if draft is not None and draft.info is not None else 0

        async with self.slots:
            t_start = time.perf_counter()
            if self.target_suspect:
                try:
                    await self._target_call(stats, "ping", limit=PING_TIMEOUT)
                except NodeError as exc:
                    raise TargetError(f"target node {self.target.url}: {exc}") from None
                self.target_suspect = False
            try:
                if (
                    draft is not None
                    and draft.up
                    and 1 < len(ctx) <= draft_ctx()
                    and (policy is not None or tuner.drafts_soon(state, mode, PROBE_LEAD))
                ):
                    # Beside the target's prefill; rounds stay target-only until it is done.
                    dprefill = asyncio.ensure_future(self._catch_up(stats, sid, ctx[:-1], 0))
                    dprefill.add_done_callback(_consume)
                if len(ctx) > 1:
                    try:
                        await self._target_call(stats, "prefill", sid, 0, ctx[:-1])
                    except NodeError as exc:
                        raise TargetError(f"target node {self.target.url}: {exc}") from None
                    t_held = len(ctx) - 1
                t_decode = t_prev = time.perf_counter()
                stats.prefill_s = t_decode - t_start

                while True:
                    remaining = (req.max_tokens - produced) if req.max_tokens is not None else 1 << 30
                    room_t = tinfo.context_length - len(ctx)  # drafts the target can still take
                    if remaining <= 0 or room_t < 0:
                        stats.finish_reason = "length"
                        return
                    if dprefill is not None and dprefill.done():
                        try:
                            dprefill.result()
                            d_held = dprefill_to
                        except (NodeError, TimeoutError) as exc:
                            use_draft = not self._draft_failed(stats, exc) and use_draft
                        dprefill = None

                    k, ready = len(block), bool(block)
                    if not block:
                        cap = min(remaining - 1, room_t, s.max_k, draft_max_k(), draft_ctx() - len(ctx) + 1)
                        if draft is not None and use_draft and cap > 0 and dprefill is None:
                            if not draft.up:
                                stats.fallback_rounds += 1
                            else:
                                k = tuner.choose_k(state, mode, cap) if policy is None else min(policy, cap)
                        if k > 0:
                            try:
                                rep, _ = await self._propose(stats, sid, ctx, d_held, k, sp)
                                block, dists = list(rep.tokens), list(rep.dists)
                                d_held = len(ctx) + k - 1
                            except (NodeError, TimeoutError) as exc:
                                use_draft = not self._draft_failed(stats, exc, k) and use_draft
                                stats.fallback_rounds += 1
                                block, dists, k = [], [], 0
                    alpha, later = tuner.rates(state)
                    t_round = time.perf_counter()
                    vtask = asyncio.ensure_future(self._verify(stats, sid, ctx, t_held, block, dists, sp))
                    vtask.add_done_callback(_consume)
                    ahead: asyncio.Task[Any] | None = None
                    k2 = 0  # pipelined: tokens the draft drafts past its guess of the target's next one
                    lag = len(ctx) - 1 - d_held  # tokens the draft lacks beyond the one a call always sends
                    if mode == "pipelined" and use_draft and draft is not None and draft.up and dprefill is None:
                        cap2 = min(
                            remaining - k - 2, room_t - k - 1, s.max_k, draft_max_k() - 1, draft_ctx() - len(ctx) - k
                        )
                        if cap2 > 0 and policy is not None:
                            k2 = min(policy, cap2) if k > 0 else 0
                        elif cap2 > 0 and k > 0:
                            k2 = tuner.choose_k(state, mode, cap2) or min(state.ahead, cap2)
                        elif cap2 > 0 and lag <= AHEAD_LAG:
                            # The tuner's 0 may come with a length to draft ahead of this target-only round. A
                            # draft further behind catches up first, beside the target (below), not on its path.
                            k2 = min(state.ahead, cap2)
                        if k2 > 0:
                            base = len(ctx) + k - 1 if k > 0 else d_held
                            call = self._propose(stats, sid, [*ctx, *block], base, k2 + 1, sp, guess=True)
                            ahead = asyncio.ensure_future(call)
                            stats.pipeline_bets += 1
                            ahead.add_done_callback(_consume)
                    if (costs := tuner.costs()) is not None:
                        stats.predicted_tokens += expected_tokens(alpha, k, later)
                        stats.predicted_time += round_as_run(costs, k, k2, ready, all_held(alpha, k, later))
                    # The tuner drafting (or not asked): every CATCH_UP tokens, or at once where it wants to draft
                    # ahead; it waiting to probe: just before.
                    if state.probe_in == 0:
                        due = lag >= CATCH_UP or (state.ahead > 0 and lag > AHEAD_LAG)
                    else:
                        due = state.probe_in <= PROBE_LEAD and lag >= PROBE_LEAD
                    if (
                        k == 0
                        and ahead is None
                        and due
                        and dprefill is None
                        and draft is not None
                        and use_draft
                        and draft.up
                        and len(ctx) <= draft_ctx()
                    ):
                        dprefill_to = len(ctx) - 1
                        dprefill = asyncio.ensure_future(self._catch_up(stats, sid, ctx[:dprefill_to], d_held))
                        dprefill.add_done_callback(_consume)
                    try:
                        vrep, vwall = await vtask
                    except BaseException:
                        if ahead is not None:
                            ahead.cancel()
                        raise
                    n, nxt = vrep.accepted, vrep.next_token
                    old_len = len(ctx)
                    new = [*block[:n], nxt]
                    ctx.extend(new)
                    t_held = old_len + n
                    if k > 0:
                        d_held = min(d_held, old_len + min(n, k - 1))
                    block, dists = [], []
                    if ahead is not None:
                        if n == k:
                            try:
                                prep, _ = await ahead
                            except (NodeError, TimeoutError) as exc:
                                use_draft = not self._draft_failed(stats, exc, k2 + 1) and use_draft
                            else:
                                if prep.tokens[0] == nxt:  # the draft's guess was the target's token
                                    block, dists = list(prep.tokens[1:]), list(prep.dists[1:])
                                    d_held = len(ctx) + k2 - 1
                                    stats.pipeline_hits += 1
                                    metrics.pipeline_hits.inc()
                                else:
                                    d_held = old_len + k
                        else:
                            stale = ahead  # the draft's session queue orders it before our next call
                    tuner.record_verify(k, vrep.timing.compute_ns / 1e9, vwall)
                    tuner.record_acceptance(state, k, n)
                    now = time.perf_counter()
                    tuner.record_round_time(k, now - t_prev, mode, alpha, later, ready=ready, ahead=k2, held=n == k)
                    t_prev = now
                    stats.rounds += 1
                    stats.k_hist[k] += 1
                    stats.drafted += k
                    stats.accepted += n
                    stats.trace.append((now, k, n))
                    metrics.k.observe(k)
                    metrics.drafted.inc(k)
                    metrics.accepted.inc(n)
                    metrics.round_seconds.labels(mode).observe(now - t_round)

                    out = []
                    for t in new:
                        out.append(t)
                        produced += 1
                        if t in eos:
                            stats.finish_reason = "stop"
                            break
                        if req.max_tokens is not None and produced >= req.max_tokens:
                            break
                    stats.decode_s = time.perf_counter() - t_decode
                    yield out
                    if stats.finish_reason == "stop":
                        return
            finally:
                for task in (dprefill, stale):
                    if task is not None and not task.done():
                        task.cancel()
                with contextlib.suppress(RuntimeError):  # no loop left (finalised at exit): nothing to close
                    self.spawn(self._close(sid, draft is not None and (d_held > 0 or stats.draft_calls > 0)))

    async def _close(self, sid: str, draft_too: bool) -> None:
        """Release the sessions; best effort (a node that restarted no longer has them anyway)."""
        links = [self.target, *([self.draft] if draft_too and self.draft is not None else [])]
        for link in links:
            client = link.client
            if client is None or not link.up:
                continue
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await client.close(sid)
