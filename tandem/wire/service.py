"""What both nodes share: the session store, request validation, and the request handlers.

Transport-free: handlers take a request message and fill a reply message (no copies), raising
NodeError; tandem.wire.grpc_transport and tandem.wire.zmq_transport only move bytes. Model work
runs in one worker thread per engine (the engine is not thread-safe), so the event loop keeps
answering Ping and health while a forward runs. The session dict is only touched on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib.metadata
import os
import platform
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from tandem.engine.runtime import Engine, Sequence
from tandem.sampling import SamplingParams, make_generator
from tandem.wire import errors
from tandem.wire.errors import NodeError
from tandem.wire.gen import tandem_pb2 as pb

PROTOCOL = "tandem.v1"
MAX_MESSAGE_BYTES = 16 << 20  # both transports reject bigger requests with RESOURCE_EXHAUSTED
MAX_SESSION_ID = 128
DEFAULT_MAX_K = 64
DEFAULT_DRAFT_TOP_K = 32

T = TypeVar("T")


@dataclass
class Session:
    id: str
    seq: Sequence | None = None  # allocated in the worker on first use
    generator: torch.Generator | None = None
    seed: int | None = None
    closed: bool = False


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("tandem", "grpcio", "pyzmq", "protobuf"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


class Worker:
    """The engine's one thread: runs model work in order. A bare queue hands off ~15 µs faster than
    a ThreadPoolExecutor, and every round pays the hop twice. Results go back through an eventfd that
    the worker writes with the GIL released, so the woken loop finds the GIL free; call_soon_threadsafe
    wakes it while the worker still holds the GIL, and it waits for a second wake-up (~10 µs a round).

    poll_s: after each item, how long the thread polls for the next before it sleeps (as llama.cpp's
    --poll). In speculation each node idles while the other computes, a few ms a round, and a CPU that
    went idle came back slow, at times: on a 2-core VM, SmolLM2's decode step took 16.9-17.6 ms on average
    with 5 ms sleeps between steps, against 14.0-14.3 back to back and 13.7-14.9 with those 5 ms spent
    polling (two of three cycles of 35 s each; in the third all three took 13.9-14.3)."""

    def __init__(self, name: str, poll_s: float = 0.0) -> None:
        self.poll_s = poll_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._results: deque = deque()  # (future, result, exc) for the home loop
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if hasattr(os, "eventfd") else None
        self._home: asyncio.AbstractEventLoop | None = None  # the loop whose reader drains _results
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _next(self) -> Any:
        """The next item; polling for up to poll_s first, yielding the CPU (and the GIL) between looks, so
        the event loop that queues it runs at once."""
        if self.poll_s > 0:
            deadline = time.perf_counter() + self.poll_s
            while time.perf_counter() < deadline:
                try:
                    return self._queue.get_nowait()
                except queue.Empty:
                    os.sched_yield()
        return self._queue.get()

    def _work(self) -> None:
        while (item := self._next()) is not None:
            fn, args, done = item
            try:
                result, exc = fn(*args), None
            except BaseException as e:
                result, exc = None, e
            with contextlib.suppress(RuntimeError):  # the caller's event loop is gone; nobody waits
                done(result, exc)

    def _post(self, fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
        self._results.append((fut, result, exc))
        os.eventfd_write(self._fd, 1)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)
        while self._results:
            with contextlib.suppress(RuntimeError):  # a future of a loop closed since
                _resolve(*self._results.popleft())

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether results reach this loop through the eventfd: the first loop to run work, or a
        later one once that has closed; any other gets call_soon_threadsafe."""
        if self._fd is None:
            return False
        if loop is self._home:
            return True
        if self._home is not None and not self._home.is_closed():
            return False
        try:
            loop.add_reader(self._fd, self._drain)
        except NotImplementedError:  # a loop without readers (Windows' proactor)
            return False
        self._home = loop
        return True

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self._adopt(loop):
            done = functools.partial(self._post, fut)
        else:
            done = functools.partial(loop.call_soon_threadsafe, _resolve, fut)
        self._queue.put((fn, args, done))
        return await fut

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """From any thread, without an event loop (tools and tests)."""
        f: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((fn, args, lambda r, e: f.set_exception(e) if e else f.set_result(r)))
        return f

    def shutdown(self) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()
        home = self._home
        try:
            on_home = asyncio.get_running_loop() is home
        except RuntimeError:
            on_home = False
        if self._fd is not None and (home is None or home.is_closed() or on_home):
            if on_home:
                home.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


@functools.lru_cache(maxsize=256)
def _sampling_params(data: bytes) -> SamplingParams:
    """A session sends the same sampler every round: build (and validate) it once, keyed by its bytes."""
    msg = pb.Sampling.FromString(data)
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
    )


def _resolve(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class NodeService:
    """Sessions over one engine; subclasses add Propose (draft) or Verify (target)."""

    role = "node"
    seed_salt = 0  # mixed into request seeds so two nodes given one seed draw independent streams

    def __init__(
        self,
        engine: Engine,
        *,
        max_sessions: int = 8,
        max_context: int | None = None,
        max_k: int = DEFAULT_MAX_K,
        default_draft_top_k: int = DEFAULT_DRAFT_TOP_K,
        poll_s: float = 0.0,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if max_context is not None and max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {max_context}")
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        if not 0 <= poll_s < float("inf"):
            raise ValueError(f"poll_s must be finite and >= 0, got {poll_s}")
        self.engine = engine
        self.vocab = engine.config.vocab_size
        self.max_context = min(max_context or engine.config.context_length, engine.config.context_length)
        self.max_sessions = max_sessions
        self.max_k = max_k
        self.default_draft_top_k = default_draft_top_k
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.worker = Worker(f"{self.role}-forward", poll_s)
        self.draining = False
        self.inflight = 0
        self._idle: asyncio.Event | None = None
        self.info_reply = self._make_info()

    # --- plumbing -------------------------------------------------------------------------

    def _make_info(self) -> pb.InfoReply:
        eng, tok = self.engine, self.engine.tokenizer
        info = pb.InfoReply(
            role=self.role,
            model=eng.name,
            arch=eng.config.arch,
            vocab_size=self.vocab,
            tokenizer_fingerprint=tok.fingerprint,
            context_length=self.max_context,
            device=",".join(str(d) for d in eng.devices),
            dtype=str(eng.dtype).removeprefix("torch."),
            max_sessions=self.max_sessions,
            max_k=self.max_k,
            eos_ids=sorted(tok.eos_ids),
            protocol=PROTOCOL,
            versions=_versions(),
            weights=eng.weights,
        )
        if tok.bos_id is not None:
            info.bos_id = tok.bos_id
        return info

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn in the engine's worker thread; errors other than NodeError become INTERNAL."""
        try:
            return await self.worker.run(fn, *args)
        except NodeError:
            raise
        except Exception as exc:
            raise NodeError(errors.Code.INTERNAL, f"{type(exc).__name__}: {exc}") from exc

    def begin(self) -> None:
        if self.draining:
            raise errors.unavailable("node is shutting down")
        self.inflight += 1

    def end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout: float = 30.0) -> bool:
        """Refuse new requests and wait for those in flight; True when all finished in time."""
        self.draining = True
        if self.inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def shutdown(self) -> None:
        self.worker.shutdown()

    # --- sessions ---------------------------------------------------------------------------

    def session(self, sid: str, commit: pb.Commit) -> Session:
        """The session for a request that carries a commit; a new one when base_len is 0."""
        if not sid or len(sid) > MAX_SESSION_ID:
            raise errors.invalid(f"session id must be 1..{MAX_SESSION_ID} characters")
        s = self.sessions.get(sid)
        if s is not None:
            self.sessions.move_to_end(sid)
            return s
        if commit.base_len != 0:
            raise errors.not_found(
                f"unknown session {sid!r} (closed, evicted or never opened): resend the context with base_len 0"
            )
        while len(self.sessions) >= self.max_sessions:
            self.retire(self.sessions.popitem(last=False)[1])
        s = self.sessions[sid] = Session(sid)
        return s

    def retire(self, s: Session) -> None:
        """A closed or evicted session: later requests on it fail; its cache goes back to the engine for the
        next session, on the worker thread, after whatever is already queued for it."""
        s.closed = True
        if s.seq is not None:
            self.worker.submit(self.engine.release, s.seq)

    def check_commit(self, commit: pb.Commit, extra: int = 0) -> None:
        """Checks that need no session state (the worker checks base_len against the cache)."""
        base, tokens = commit.base_len, commit.tokens
        n = len(tokens)
        if base < 0:
            raise errors.invalid(f"base_len must be >= 0, got {base}")
        if n:
            self.check_tokens(tokens, "commit")
        elif base == 0:
            raise errors.invalid("empty context: a commit with base_len 0 needs tokens")
        if base + n + extra > self.max_context:
            raise errors.exhausted(f"{base} + {n} + {extra} tokens exceed this node's context of {self.max_context}")

    def check_tokens(self, tokens: Any, what: str) -> None:
        if tokens and (min(tokens) < 0 or max(tokens) >= self.vocab):
            bad = next(t for t in tokens if not 0 <= t < self.vocab)
            raise errors.invalid(f"{what} token id {bad} outside the vocabulary [0, {self.vocab})")

    def apply(self, s: Session, commit: pb.Commit, extra: list[int], all_logits: bool) -> Tensor:
        """Worker thread: roll back to base_len, append commit tokens + extra; logits for the new tokens.

        With nothing to append, the last held token is recomputed so there are logits to sample from.
        Every check happens before the cache moves, so a failed request leaves the session as it was.
        """
        if s.closed:
            raise errors.not_found(f"session {s.id!r} was evicted or closed: resend the context")
        if s.seq is None:
            s.seq = self.engine.new_sequence(self.max_context)
        seq, base = s.seq, commit.base_len
        if base > len(seq):
            raise errors.precondition(
                f"base_len {base} is beyond the {len(seq)} tokens session {s.id!r} holds: resend the context"
            )
        new = [*commit.tokens, *extra]
        if not commit.tokens:
            if base == 0:
                raise errors.invalid("empty context: the first request of a session needs tokens")
            base -= 1
            new.insert(0, seq.tokens[base])
        seq.truncate(base)
        return seq.forward(new, all_logits)

    def generator(self, s: Session, params: SamplingParams) -> torch.Generator:
        """Worker thread: the session's generator, reseeded whenever the request's seed changes."""
        if s.generator is None or (params.seed is not None and params.seed != s.seed):
            seed = None if params.seed is None else (params.seed ^ self.seed_salt) & (2**64 - 1)
            s.generator = make_generator(seed, self.engine.output_device)
            s.seed = params.seed
        return s.generator

    def sampling(self, msg: pb.Sampling) -> SamplingParams:
        try:
            return _sampling_params(msg.SerializeToString())
        except ValueError as exc:
            raise errors.invalid(f"sampling: {exc}") from None

    # --- handlers: fill `out`, raise NodeError ------------------------------------------------

    async def info(self, req: pb.InfoRequest, out: pb.InfoReply) -> None:
        out.CopyFrom(self.info_reply)

    async def ping(self, req: pb.PingRequest, out: pb.PingReply) -> None:
        out.payload = req.payload

    async def prefill(self, req: pb.PrefillRequest, out: pb.PrefillReply) -> None:
        self.check_commit(req.commit)
        s = self.session(req.session, req.commit)

        def work() -> tuple[int, int]:
            t0 = time.perf_counter_ns()
            self.apply(s, req.commit, [], all_logits=False)
            return len(s.seq), time.perf_counter_ns() - t0

        out.cache_len, out.timing.compute_ns = await self.run(work)

    async def propose(self, req: pb.ProposeRequest, out: pb.ProposeReply) -> None:
        raise errors.unimplemented(f"Propose is served by draft nodes; this is a {self.role} node")

    async def verify(self, req: pb.VerifyRequest, out: pb.VerifyReply) -> None:
        raise errors.unimplemented(f"Verify is served by target nodes; this is a {self.role} node")

    async def close(self, req: pb.CloseRequest, out: pb.CloseReply) -> None:
        s = self.sessions.pop(req.session, None)
        if s is None:
            raise errors.not_found(f"unknown session {req.session!r}")
        self.retire(s)
        out.timing.compute_ns = 0

    # --- dispatch ---------------------------------------------------------------------------

    async def call(self, kind: str, req: Any, out: Any) -> None:
        """One request, as every transport runs it: drain-aware, timed, typed errors."""
        t0 = time.perf_counter_ns()
        self.begin()
        try:
            await getattr(self, kind)(req, out)
        finally:
            self.end()
        out.timing.server_ns = time.perf_counter_ns() - t0

    def dispatch_now(self, req: pb.Request) -> pb.Reply:
        """dispatch() without a task or a turn of the loop, for kinds whose handler never waits
        (Ping, Info): the coroutine runs to its end in one step."""
        coro = self.dispatch(req)
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        raise RuntimeError(f"the {req.WhichOneof('body')} handler waited; it cannot run inline")

    async def dispatch(self, req: pb.Request) -> pb.Reply:
        """An envelope in, an envelope out; failures become an Error body (streams and ZeroMQ)."""
        rep = pb.Reply(id=req.id)
        kind = req.WhichOneof("body")
        try:
            if kind is None:
                raise errors.invalid("empty request: set one of info, ping, prefill, propose, verify, close")
            await self.call(kind, getattr(req, kind), getattr(rep, kind))
        except NodeError as exc:
            rep.error.CopyFrom(exc.to_proto())
        return rep
