"""`tandem-profile`: measure a draft/target pair over its real link, then predict what speculation gains.

    tandem-profile --draft 10.0.0.2:50052 --target 127.0.0.1:50051 [--temperature 0.7] [--json] [--plot p.png]

Run it where the coordinator will run (next to the target). It measures, against the running nodes:
- the link to each node: TCP handshakes (the network's round trip, free of any software stack; the link
  RTT is the fastest one) and Ping calls from 64 B to 64 KB, median/p90/p99 of wall time minus the
  node's own time (what a call costs beyond compute);
- the draft's compute per Propose call as k grows, fitted as overhead + per_token * k;
- the target's compute to verify k = 0..max-k draft tokens, fitted as intercept + slope * k;
- the acceptance rate on a prompt set at T = 0 and at --temperature, drafting a fixed block per round;
then feeds tandem.cost_model with them: predicted tokens/s for every k in both modes, the recommended k
and mode, and the acceptance below which speculation stops paying. It opens one session per node and
closes it at the end, so other users' sessions on the nodes are untouched (unless the node is full).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import random
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coordinator.cli import demo_target
from tandem.cost_model import (
    MODES,
    Costs,
    best_plan,
    break_even_alpha,
    expected_tokens,
    predraft_throughputs,
    tokens_per_second,
)

PING_SIZES = (64, 256, 1024, 4096, 16384, 65536)

# Short chat prompts of different kinds (facts, lists, code, prose, arithmetic): acceptance varies by kind,
# so a handful of each keeps the estimate honest while the whole profile stays around a minute on a CPU.
DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "List three primary colors.",
    "Write a Python function that returns the square of a number.",
    "Explain in two sentences why the sky is blue.",
    "Give me a short recipe for scrambled eggs.",
    "What is 12 plus 30? Show the sum.",
    "Translate 'good morning' into Spanish and French.",
    "Write the first two lines of a poem about the sea.",
)


class ProfileError(Exception):
    """Measuring failed in a way the user can fix (unreachable node, mismatched models)."""


# --- small helpers ----------------------------------------------------------------------------


def summarize(xs: Sequence[float]) -> dict[str, float]:
    """median/p90/p99 (linear interpolation), min and count."""
    s = sorted(xs)
    if not s:
        return {"median": math.nan, "p90": math.nan, "p99": math.nan, "min": math.nan, "n": 0}

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"median": q(0.5), "p90": q(0.9), "p99": q(0.99), "min": s[0], "n": len(s)}


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Theil-Sen line y = a + b*x: (a, b, r^2 about it). The slope is the median of the pairwise slopes
    and the intercept the median residual, so a stray slow call (a busy host, a page fault) moves
    neither; b = 0 when every x is the same."""
    pairs = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(zip(xs, ys, strict=True))
             for x2, y2 in zip(xs[i + 1 :], ys[i + 1 :], strict=True) if x2 != x1]  # fmt: skip
    b = summarize(pairs)["median"] if pairs else 0.0
    a = summarize([y - b * x for x, y in zip(xs, ys, strict=True)])["median"]
    my = sum(ys) / len(ys)
    syy = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True)) / syy if syy > 0 else 1.0
    return a, b, r2


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


class Progress:
    """One line per step on stderr, so a long measurement is visibly alive (silent with --quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def read_prompts(path: str) -> list[str]:
    """One prompt per line (blank lines and lines starting with '#' skipped); '\\n' in a line is a newline."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read --prompts {path}: {exc}") from None
    prompts = [ln.replace("\\n", "\n") for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts (one per line)")
    return prompts


# --- measurements -----------------------------------------------------------------------------


def tcp_rtts(host: str, port: int, n: int, timeout: float = 5.0) -> list[float]:
    """Seconds per TCP handshake: connect() returns on the SYN-ACK, one network round trip."""
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise ProfileError(f"cannot resolve {host}: {exc}") from None
    out = []
    for _ in range(n):
        with socket.socket(family, type_, proto) as s:
            s.settimeout(timeout)
            t0 = time.perf_counter()
            try:
                s.connect(addr)
            except OSError as exc:
                raise ProfileError(f"cannot open a TCP connection to {host}:{port}: {exc}") from None
            out.append(time.perf_counter() - t0)
        time.sleep(0.002)  # let the server side finish its accept/close
    return out


async def measure_link(node: Any, host: str, port: int, pings: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Network RTT (handshakes) and Ping call time minus node time, per payload size."""
    say(f"{node.role}: {pings} TCP handshakes to {host}:{port}")
    network = tcp_rtts(host, port, pings)
    sizes = []
    for size in PING_SIZES:
        payload = random.randbytes(size)
        links, nodes = [], []
        for i in range(pings + 2):
            t0 = time.perf_counter_ns()
            rep = await node.client.ping(payload)
            wall = time.perf_counter_ns() - t0
            if i >= 2:  # the first calls of a size warm buffers up
                links.append((wall - rep.timing.server_ns) / 1e9)
                nodes.append(rep.timing.server_ns / 1e9)
        st = summarize(links)
        sizes.append({"bytes": size, "link_ms": {k: ms(v) if k != "n" else v for k, v in st.items()},
                      "node_ms": ms(summarize(nodes)["median"])})  # fmt: skip
        say(f"{node.role}: ping {size:>6} B  link median {ms(st['median']):.3f} ms  p99 {ms(st['p99']):.3f} ms")
    net = summarize(network)
    return {
        # The wire's round trip: the fastest handshake (a busy host only ever adds to it), then the spread.
        "rtt_ms": ms(net["min"]),
        "network_rtt_ms": {k: ms(v) if k != "n" else v for k, v in net.items()},
        "ping": sizes,
        "stack_ms": ms(max(sizes[0]["link_ms"]["median"] / 1e3 - net["min"], 0.0)),
    }


class Node:
    """A connected node, its Info, and the one session the profile uses on it."""

    def __init__(self, role: str, url: str, client: Any, info: Any) -> None:
        self.role, self.url, self.client, self.info = role, url, client, info
        self.session = f"tandem-profile-{uuid.uuid4().hex[:12]}"
        self.opened = False

    def describe(self) -> dict[str, Any]:
        i = self.info
        return {"url": self.url, "model": i.model, "arch": i.arch, "device": i.device, "dtype": i.dtype,
                "weights": i.weights, "context_length": i.context_length, "max_k": i.max_k}  # fmt: skip


async def timed(call: Any) -> tuple[Any, float, float]:
    """(reply, wall seconds, node compute seconds)."""
    t0 = time.perf_counter_ns()
    rep = await call
    wall = time.perf_counter_ns() - t0
    return rep, wall / 1e9, rep.timing.compute_ns / 1e9


async def measure_draft(
    draft: Node, context: list[int], max_k: int, reps: int, say: Callable[[str], None]
) -> tuple[dict[str, Any], list[int], list[float]]:
    """Propose k = 1..max_k from one context (each call recomputes the last context token, as a round's
    commit does), reps times in shuffled order. Returns the summary, the max_k draft tokens and link samples."""
    c, sid, base = draft.client, draft.session, len(context)
    draft.opened = True
    await c.prefill(sid, 0, context)
    warm = await c.propose(sid, base, [], max_k)
    tokens = list(warm.tokens)
    samples: dict[int, list[float]] = {k: [] for k in range(1, max_k + 1)}
    walls: dict[int, list[float]] = {k: [] for k in range(1, max_k + 1)}
    links = []
    rng = random.Random(0)
    for r in range(reps):
        order = list(samples)
        rng.shuffle(order)
        for k in order:
            _, wall, compute = await timed(c.propose(sid, base, [], k))
            samples[k].append(compute)
            walls[k].append(wall)
            links.append(wall - compute)
        say(f"draft: Propose k = 1..{max_k}, pass {r + 1}/{reps}")
    points = []
    for k in samples:
        med = summarize(samples[k])["median"]
        points.append({"k": k, "compute_ms": ms(med), "per_token_ms": ms(med / k),
                       "wall_ms": ms(summarize(walls[k])["median"])})  # fmt: skip
    a, b, r2 = fit_line(*zip(*((k, 1e3 * t) for k, ts in samples.items() for t in ts), strict=True))
    out = {"points": points, "overhead_ms": round(a, 4), "per_token_ms": round(b, 4), "r2": round(r2, 4)}
    say(f"draft: {b:.2f} ms per token + {a:.2f} ms per call (r² {r2:.3f})")
    return out, tokens, links


async def measure_verify(
    target: Node, context: list[int], drafts: list[int], max_k: int, reps: int, say: Callable[[str], None]
) -> tuple[dict[str, Any], list[float]]:
    """Verify k = 0..max_k draft tokens (k + 1 positions each) from one context, reps times."""
    c, sid, base = target.client, target.session, len(context)
    target.opened = True
    await c.prefill(sid, 0, context)
    await c.verify(sid, base, [], drafts[:max_k])  # warm-up
    samples: dict[int, list[float]] = {k: [] for k in range(max_k + 1)}
    links = []
    rng = random.Random(1)
    for r in range(reps):
        order = list(samples)
        rng.shuffle(order)
        for k in order:
            _, wall, compute = await timed(c.verify(sid, base, [], drafts[:k]))
            samples[k].append(compute)
            links.append(wall - compute)
        say(f"target: Verify k = 0..{max_k}, pass {r + 1}/{reps}")
    points = [{"k": k, "compute_ms": ms(summarize(v)["median"])} for k, v in samples.items()]
    # The line over k >= 1, a decode step (k = 0) apart, as the tuner fits them (cost_model: another kernel path).
    fitted = [(k, 1e3 * t) for k, ts in samples.items() if k or max_k < 2 for t in ts]
    a, b, r2 = fit_line(*zip(*fitted, strict=True))
    decode = 1e3 * summarize(samples[0])["median"]
    say(f"target: decode {decode:.2f} ms; verify {a:.2f} ms + {b:.3f} ms per draft token (r² {r2:.3f})")
    out = {"points": points, "decode_ms": round(decode, 4), "intercept_ms": round(a, 4), "slope_ms": round(b, 4)}
    return {**out, "r2": round(r2, 4)}, links


async def measure_acceptance(
    draft: Node,
    target: Node,
    contexts: list[list[int]],
    k: int,
    max_tokens: int,
    temperature: float,
    eos: set[int],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Speculate with a fixed draft length over every prompt; alpha by maximum likelihood.

    A round that accepts n of k has likelihood alpha^n (1 - alpha)^[n < k], so alpha = accepted /
    (accepted + rounds cut short). The rounds' wall time gives a measured tokens/s beside the prediction.
    """
    from tandem.sampling import SamplingParams

    accepted = rejected = proposed = rounds = tokens_out = 0
    decode_s = 0.0
    for i, prompt in enumerate(contexts):
        sampling = SamplingParams(temperature=temperature, seed=1000 + i) if temperature > 0 else None
        ctx = list(prompt)
        await draft.client.prefill(draft.session, 0, ctx)
        await target.client.prefill(target.session, 0, ctx)
        held_d = held_t = len(ctx)
        produced = 0
        t0 = time.perf_counter()
        while produced < max_tokens:
            kk = min(k, max_tokens - produced)
            prop = await draft.client.propose(draft.session, held_d, ctx[held_d:], kk, sampling)
            drafts = list(prop.tokens)
            dists = [(list(d.ids), list(d.probs)) for d in prop.dists] or None
            ver = await target.client.verify(target.session, held_t, ctx[held_t:], drafts, dists, sampling)
            n = ver.accepted
            rounds += 1
            proposed += kk
            accepted += n
            rejected += n < kk
            # The draft holds the old context plus its drafts but the last; the valid part ends at the
            # first rejected draft. The target holds the context plus the accepted drafts.
            held_d = len(ctx) + min(n, kk - 1)
            new = [*drafts[:n], ver.next_token]
            ctx.extend(new)
            held_t = ver.cache_len
            produced += len(new)
            if any(t in eos for t in new):
                break
        decode_s += time.perf_counter() - t0
        tokens_out += produced
    alpha = accepted / (accepted + rejected) if accepted + rejected else 0.0
    label = "greedy" if temperature == 0 else f"T = {temperature:g}"
    say(f"acceptance {label}: {alpha:.3f} ({accepted}/{proposed} drafts accepted in {rounds} rounds)")
    return {
        "temperature": temperature,
        "alpha": round(alpha, 4),
        "k": k,
        "prompts": len(contexts),
        "rounds": rounds,
        "proposed": proposed,
        "accepted": accepted,
        "tokens": tokens_out,
        "tokens_per_round": round(tokens_out / rounds, 3) if rounds else 0.0,
        "measured_tps": round(tokens_out / decode_s, 3) if decode_s > 0 else None,
    }


# --- the model's predictions ------------------------------------------------------------------


def predict(costs: Costs, alpha: float, max_k: int) -> dict[str, Any]:
    """The table for one acceptance rate, the best (k, mode) in it, and the break-even acceptance. Each row
    also holds the pipelined alternative of drafting k ahead of target-only rounds (`ahead_*`)."""
    base = tokens_per_second(alpha, 0, costs)
    ahead = predraft_throughputs(alpha, costs, max_k)
    table = []
    for k in range(max_k + 1):
        row: dict[str, Any] = {"k": k, "expected_tokens": round(expected_tokens(alpha, k), 4)}
        for mode in MODES:
            tps = tokens_per_second(alpha, k, costs, mode)
            row[f"{mode}_tps"] = round(tps, 3)
            row[f"{mode}_speedup"] = round(tps / base, 4)
        row["ahead_tps"], row["ahead_speedup"] = round(ahead[k], 3), round(ahead[k] / base, 4)
        table.append(row)
    plans = ((best_plan(alpha, costs, m, max_k), m) for m in MODES)
    (k, j, tps), mode = max(plans, key=lambda x: (x[0][2], x[1] == "sequential"))
    if k == 0 and j == 0:
        mode = "sequential"  # the target alone has no pipeline
    # The lowest acceptance at which some k > 0 beats the target alone, in either mode.
    be = min(
        ((break_even_alpha(costs, j, m), j, m) for m in MODES for j in range(1, max_k + 1)),
        key=lambda x: (x[0], x[1], x[2] != "sequential"),
        default=(math.inf, 0, "sequential"),
    )
    return {
        "alpha": alpha,
        "table": table,
        "target_only_tps": round(base, 3),
        "recommended": {"k": k, "mode": mode, "ahead": j, "tps": round(tps, 3), "speedup": round(tps / base, 4)},
        "break_even": {"alpha": None if math.isinf(be[0]) else round(be[0], 4), "k": be[1], "mode": be[2]},
    }


def break_even_words(pred: dict[str, Any], label: str) -> str:
    be, alpha = pred["break_even"], pred["alpha"]
    if be["alpha"] is None:
        return (
            "speculation cannot pay here: even a draft the target always agrees with is slower than the "
            "target alone (the draft and the link cost more than they save)"
        )
    verdict = "pays" if alpha > be["alpha"] else "does not pay"
    return (
        f"speculation pays while acceptance > {be['alpha']:.2f} (best case k = {be['k']}, {be['mode']}); "
        f"measured {alpha:.2f} {label}, so it {verdict}"
    )


# --- the run ----------------------------------------------------------------------------------


async def connect_node(role: str, url: str, token: str | None, tls_ca: str | None, timeout: float) -> Node:
    from tandem.wire.client import connect
    from tandem.wire.errors import NodeError

    try:
        client = await connect(url, token, tls_ca, timeout=min(timeout, 15.0))
    except ValueError as exc:
        raise ProfileError(f"--{role} {url}: {exc}") from None
    try:
        info = await client.info()
    except NodeError as exc:
        await client.aclose()
        raise ProfileError(f"cannot reach the {role} node at {url}: {exc}") from None
    if info.role != role:
        await client.aclose()
        raise ProfileError(f"the node at {url} is a {info.role or 'unknown'} node, not a {role} node")
    client.timeout = timeout
    return Node(role, url, client, info)


def load_contexts(
    args: argparse.Namespace, target: Node, draft: Node, say: Callable[[str], None]
) -> tuple[list[list[int]], str]:
    """Tokenize the prompts with the target's vocabulary (checked against both nodes' fingerprints)."""
    from tandem.engine.gguf_file import read_gguf
    from tandem.engine.tokenizer import Tokenizer

    path = Path(args.tokenizer_model) if args.tokenizer_model else demo_target()
    if path is None:
        raise ProfileError("no tokenizer: pass --tokenizer-model GGUF (a copy of the target's GGUF will do)")
    try:
        tok = Tokenizer.from_gguf(read_gguf(path).metadata)
    except (OSError, ValueError) as exc:
        raise ProfileError(f"cannot read a tokenizer from {path}: {exc}") from None
    if tok.fingerprint != target.info.tokenizer_fingerprint:
        raise ProfileError(
            f"the tokenizer of {path} is not the target's ({target.info.model}): pass --tokenizer-model "
            "with the target's GGUF"
        )
    if draft.info.tokenizer_fingerprint != target.info.tokenizer_fingerprint:
        raise ProfileError(
            f"the draft ({draft.info.model}) and the target ({target.info.model}) use different vocabularies: "
            "speculation needs the same tokenizer on both"
        )
    texts = args.prompt_texts or list(DEFAULT_PROMPTS)
    contexts = []
    for text in texts:
        if not args.no_chat and tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = tok.encode(text)
        if tok.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == tok.bos_id:
            ids = ids[1:]
        if not ids:
            raise ProfileError(f"prompt {text[:40]!r} encodes to no tokens")
        contexts.append(ids)
    room = min(target.info.context_length, draft.info.context_length)
    need = max(map(len, contexts)) + args.max_tokens + args.max_k + 1
    if need > room:
        raise ProfileError(f"the longest prompt needs {need} tokens of context; the nodes hold {room}")
    say(f"{len(contexts)} prompts ({sum(map(len, contexts))} tokens) from {args.prompts or 'the built-in set'}")
    return contexts, str(path)


async def profile(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    from tandem.wire import auth
    from tandem.wire.client import parse_url

    try:
        token = auth.load_token(args.auth_token_file)
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    nodes: list[Node] = []
    try:
        draft = await connect_node("draft", args.draft, token, args.tls_ca, args.timeout)
        nodes.append(draft)
        target = await connect_node("target", args.target, token, args.tls_ca, args.timeout)
        nodes.append(target)
        say(f"draft {draft.info.model} at {args.draft}; target {target.info.model} at {args.target}")
        max_k = min(args.max_k, draft.info.max_k, target.info.max_k)
        if max_k < args.max_k:
            say(f"the nodes allow at most k = {max_k}")
        args.max_k = max_k
        contexts, tokenizer_path = load_contexts(args, target, draft, say)

        links = {}
        for node in (draft, target):
            _, host, port = parse_url(node.url)
            links[node.role] = await measure_link(node, host, port, args.pings, say)
        draft_time, drafts, draft_links = await measure_draft(draft, contexts[0], max_k, args.reps, say)
        verify_time, verify_links = await measure_verify(target, contexts[0], drafts, max_k, args.reps, say)
        # The cost model's link time is what real calls pay beyond compute (network + RPC stack + queueing).
        links["draft"]["call_ms"] = ms(summarize(draft_links)["median"])
        links["target"]["call_ms"] = ms(summarize(verify_links)["median"])
        costs = Costs(
            rtt_draft=summarize(draft_links)["median"],
            rtt_target=summarize(verify_links)["median"],
            draft_per_token=max(draft_time["per_token_ms"], 0.0) / 1e3,
            draft_overhead=max(draft_time["overhead_ms"], 0.0) / 1e3,
            verify_intercept=max(verify_time["intercept_ms"], 1e-6) / 1e3,
            verify_slope=max(verify_time["slope_ms"], 0.0) / 1e3,
            decode=max(verify_time["decode_ms"], 1e-6) / 1e3,
        )

        temps = [0.0] if args.temperature == 0 else [0.0, args.temperature]
        eos = set(target.info.eos_ids)
        acceptance = []
        for t in temps:
            acceptance.append(
                await measure_acceptance(draft, target, contexts, args.accept_k, args.max_tokens, t, eos, say)
            )
    finally:
        for node in nodes:
            if node.opened:
                with contextlib.suppress(Exception):
                    await node.client.close(node.session)
            with contextlib.suppress(Exception):
                await node.client.aclose()

    predictions = []
    for acc in acceptance:
        pred = predict(costs, acc["alpha"], max_k)
        pred["temperature"] = acc["temperature"]
        k = min(acc["k"], max_k)
        acc["predicted_tps"] = round(tokens_per_second(acc["alpha"], k, costs), 3)
        predictions.append(pred)
    main = predictions[-1]
    return {
        "draft": draft.describe(),
        "target": target.describe(),
        "tokenizer": tokenizer_path,
        "settings": {
            "max_k": max_k,
            "temperature": args.temperature,
            "pings": args.pings,
            "reps": args.reps,
            "accept_k": args.accept_k,
            "max_tokens": args.max_tokens,
            "prompts": args.prompts or "built-in",
            "n_prompts": len(contexts),
        },
        "link": links,
        "draft_time": draft_time,
        "verify_time": verify_time,
        "costs_ms": {f: ms(v) for f, v in asdict(costs).items()},
        "acceptance": acceptance,
        "predictions": predictions,
        "recommended": main["recommended"],
        "break_even": {**main["break_even"], "text": break_even_words(main, temp_label(main["temperature"]))},
        "elapsed_s": None,
    }


def temp_label(t: float) -> str:
    return "at T = 0" if t == 0 else f"at T = {t:g}"


# --- output -----------------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n >> 10} KB" if n >= 1024 else f"{n} B"


def report_text(r: dict[str, Any]) -> str:
    out = []
    d, t = r["draft"], r["target"]
    out.append(f"draft  {d['model']} ({d['arch']}, {d['device']}, {d['weights']}) at {d['url']}")
    out.append(f"target {t['model']} ({t['arch']}, {t['device']}, {t['weights']}) at {t['url']}")
    out.append("")
    out.append(f"{'link (ms)':<12}{'RTT':>8}   handshake {'median':>8}{'p90':>8}{'p99':>8}")
    for role in ("draft", "target"):
        link = r["link"][role]
        n = link["network_rtt_ms"]
        out.append(f"  {role:<10}{link['rtt_ms']:>8.3f}   {'':>9} {n['median']:>8.3f}{n['p90']:>8.3f}{n['p99']:>8.3f}")
    sizes = "".join(f"{_size(p['bytes']):>8}" for p in r["link"]["draft"]["ping"])
    out.append(f"{'Ping: call minus node time, median':<36}{sizes}")
    for role in ("draft", "target"):
        pings = "".join(f"{p['link_ms']['median']:>8.3f}" for p in r["link"][role]["ping"])
        out.append(f"  {role:<34}{pings}")
    out.append(
        "  per call beyond compute (used below): draft "
        f"{r['link']['draft']['call_ms']:.3f} ms, target {r['link']['target']['call_ms']:.3f} ms"
    )
    dt, vt = r["draft_time"], r["verify_time"]
    out.append("")
    out.append(
        f"draft   {dt['per_token_ms']:.3f} ms per token + {dt['overhead_ms']:.3f} ms per Propose (r² {dt['r2']:.3f})"
    )
    out.append(
        f"decode {vt['decode_ms']:.3f} ms, verify {vt['intercept_ms']:.3f} ms + {vt['slope_ms']:.3f} ms per draft "
        f"token (r² {vt['r2']:.3f});  "
        "measured: " + " ".join(f"{p['k']}:{p['compute_ms']:.1f}" for p in vt["points"])
    )
    out.append("")
    for acc in r["acceptance"]:
        out.append(
            f"acceptance {temp_label(acc['temperature'])}: {acc['alpha']:.3f}  ({acc['accepted']}/{acc['proposed']} "
            f"drafts, k = {acc['k']}, {acc['tokens_per_round']:.2f} tokens/round; measured {acc['measured_tps']} "
            f"tok/s, model {acc['predicted_tps']})"
        )
    out.append("")
    preds = r["predictions"]
    head = f"{'k':>3} {'verify ms':>9} {'draft ms':>9}"
    for p in preds:
        lab = f"{temp_label(p['temperature'])}, α {p['alpha']:.2f}"
        head += f" │ {lab:^33}"
    out.append(head)
    sub = f"{'':>3} {'':>9} {'':>9}" + " │ {:>16} {:>16}".format("sequential", "pipelined") * len(preds)
    out.append(sub)
    vpts = {p["k"]: p["compute_ms"] for p in vt["points"]}
    dpts = {p["k"]: p["compute_ms"] for p in dt["points"]}
    for k in range(len(preds[0]["table"])):
        line = f"{k:>3} {vpts.get(k, math.nan):>9.2f} {dpts.get(k, 0.0):>9.2f}"
        for p in preds:
            row, rec = p["table"][k], p["recommended"]
            cells = []
            for mode in MODES:
                mark = "*" if rec["k"] == k and rec["mode"] == mode else " "
                cells.append(f"{row[f'{mode}_tps']:>8.1f} ({row[f'{mode}_speedup']:.2f}×){mark}")
            line += " │ " + " ".join(f"{c:>16}" for c in cells)
        out.append(line)
    out.append("")
    for p in preds:
        rec = p["recommended"]
        label = temp_label(p["temperature"])
        if rec["k"] == 0 and rec["ahead"]:
            out.append(
                f"recommended {label}: --k auto --mode pipelined, the target alone with the draft drafting "
                f"{rec['ahead']} ahead: {rec['tps']:.1f} tok/s, {rec['speedup']:.2f}× the target alone "
                f"({p['target_only_tps']:.1f} tok/s)"
            )
        elif rec["k"] == 0:
            out.append(f"recommended {label}: k = 0 (the target alone, {rec['tps']:.1f} tok/s)")
        else:
            out.append(
                f"recommended {label}: k = {rec['k']}, {rec['mode']}: {rec['tps']:.1f} tok/s, "
                f"{rec['speedup']:.2f}× the target alone ({p['target_only_tps']:.1f} tok/s)"
            )
        out.append(f"  {break_even_words(p, label)}")
    return "\n".join(out)


def write_plot(r: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ProfileError("--plot needs matplotlib: pip install 'tandem[plot]' (or pip install matplotlib)") from None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p, style in zip(r["predictions"], ("--", "-"), strict=False):
        ks = [row["k"] for row in p["table"]]
        for mode, color in zip(MODES, ("tab:blue", "tab:orange"), strict=True):
            ax.plot(ks, [row[f"{mode}_tps"] for row in p["table"]], style, color=color,
                    label=f"{mode}, {temp_label(p['temperature'])} (α {p['alpha']:.2f})")  # fmt: skip
        ax.axhline(p["target_only_tps"], color="grey", lw=0.8, ls=":")
    for acc in r["acceptance"]:
        if acc["measured_tps"]:
            ax.plot([acc["k"]], [acc["measured_tps"]], "kx", ms=8)
    ax.plot([], [], "kx", label="measured (sequential, fixed k)")
    ax.set(xlabel="draft length k", ylabel="tokens/s (predicted)", title="Predicted throughput")
    ax.legend(fontsize=7)
    vt, dt = r["verify_time"], r["draft_time"]
    ks = [p["k"] for p in vt["points"]]
    bx.plot(ks, [p["compute_ms"] for p in vt["points"]], "o", color="tab:red", label="verify (measured)")
    bx.plot(ks, [vt["intercept_ms"] + vt["slope_ms"] * k for k in ks], "-", color="tab:red",
            label=f"verify fit {vt['intercept_ms']:.2f} + {vt['slope_ms']:.3f}·k ms")  # fmt: skip
    dks = [p["k"] for p in dt["points"]]
    bx.plot(dks, [p["compute_ms"] for p in dt["points"]], "s", color="tab:green", ms=4, label="draft (measured)")
    bx.set(xlabel="draft length k", ylabel="node compute, ms", title="Measured compute per call")
    bx.legend(fontsize=7)
    fig.suptitle(f"{r['draft']['model']} → {r['target']['model']}", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ProfileError(f"cannot write --plot {path}: {exc}") from None
    finally:
        plt.close(fig)


# --- CLI --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tandem-profile",
        description=__doc__.split("\n\n")[0],
        epilog="Run it on the coordinator's host; it takes about a minute for small models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--draft", required=True, metavar="URL", help="draft node: HOST:PORT, grpc://… or zmq://…")
    p.add_argument("--target", required=True, metavar="URL", help="target node, same forms")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: a built-in set of 8)")
    p.add_argument("--no-chat", action="store_true", help="send prompts as raw text, not in the chat template")
    p.add_argument("--tokenizer-model", metavar="GGUF", help="the target's GGUF (metadata only; default: SmolLM2)")
    p.add_argument("--max-k", type=int, default=16, help="longest draft measured and predicted")
    p.add_argument("--temperature", type=float, default=0.7, help="acceptance is measured at T = 0 and at this T")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens generated per prompt for acceptance")
    p.add_argument("--accept-k", type=int, default=4, help="draft length while measuring acceptance")
    p.add_argument("--pings", type=int, default=30, help="pings per payload size, and TCP handshakes")
    p.add_argument("--reps", type=int, default=3, help="timed calls per k for the draft and verify fits")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before giving up")
    p.add_argument("--auth-token-file", metavar="F", help="the nodes' shared token (else $TANDEM_AUTH_TOKEN)")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate for gRPC nodes served with TLS")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--plot", metavar="FILE.png", help="write predicted tokens/s and measured compute vs k")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    checks = [("max_k", 1, 1024), ("max_tokens", 1, 100_000), ("accept_k", 1, 1024), ("pings", 1, 10_000),
              ("reps", 1, 1000)]  # fmt: skip
    for name, lo, hi in checks:
        v = getattr(args, name)
        if not lo <= v <= hi:
            parser.error(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {v}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if not args.timeout > 0:
        parser.error("--timeout must be > 0")
    args.accept_k = min(args.accept_k, args.max_k)
    if args.plot and not args.plot.lower().endswith(".png"):
        parser.error("--plot writes a PNG: give a FILE.png")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install 'tandem[plot]' (or pip install matplotlib)")
    try:
        args.prompt_texts = read_prompts(args.prompts) if args.prompts else None
    except ValueError as exc:
        parser.error(str(exc))
    say = Progress(args.quiet)
    t0 = time.perf_counter()
    try:
        import uvloop

        result = uvloop.run(profile(args, say))
        result["elapsed_s"] = round(time.perf_counter() - t0, 2)
        if args.plot:
            write_plot(result, args.plot)
            say(f"wrote {args.plot}")
    except ProfileError as exc:
        print(f"tandem-profile: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a node failing mid-measurement: say which, no traceback
        from tandem.wire.errors import NodeError

        if not isinstance(exc, NodeError | TimeoutError | OSError):
            raise
        print(f"tandem-profile: error: a node failed while measuring: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
