"""The demo pair across a real link: speedup over the target alone on loopback, then with the draft node
in a network namespace of its own behind a delayed link, sequential vs pipelined, tuned k at each delay.

    sudo .venv/bin/python bench/link.py                      # the demo pair; appends to bench/RESULTS.md
    sudo .venv/bin/python bench/link.py --delays 0.5,2,10 --prompts 8 --max-tokens 96 --no-record

The draft node runs on core 0 and the target node on core 1 (`taskset`, one torch thread each); the
coordinator runs in this process, beside the target (its link to the target is loopback). Phase one: the
draft node on loopback. Phase two: a second draft node in its own network namespace, joined to this one
by a veth pair with `tc netem` delaying both ends (half the round trip each), or, where the kernel lacks
netem, by two TUN devices and tests/delay_line.py holding every packet. Each phase gets a fresh
coordinator (a fresh tuner) and a short warm-up; every prompt then runs target-only, sequential and
pipelined back to back (the machine's load drifts; interleaving keeps the comparison fair). k is tuned
every round; "predicted" is the cost model's tokens/s for the k chosen, from the tuner's measured alpha,
costs and link times at that moment. Namespaces, links and nodes are removed on exit, always. Needs root.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from coordinator.cli import DEMO_DRAFT, demo_target  # noqa: E402
from coordinator.loop import Coordinator, Request, Settings, Stats  # noqa: E402
from tandem.cost_model import Mode, best_plan, break_even_alpha, tokens_per_second  # noqa: E402
from tandem.engine.gguf_file import read_gguf  # noqa: E402
from tandem.engine.tokenizer import Tokenizer  # noqa: E402
from tandem.sampling import SamplingParams  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
DELAY_LINE = ROOT / "tests" / "delay_line.py"
DRAFT_IP, HOST_IP = "10.79.0.1", "10.79.0.2"  # private; the draft's end lives only in its namespace
TOKEN = "bench-link-token"
NICE_LEVEL = -10  # nodes and coordinator run ahead of whatever else shares the machine
NICE = ("nice", "-n", str(NICE_LEVEL))
DRAFT_CORE, TARGET_CORE = 0, 1
MODES = ("target-only", "sequential", "pipelined")

CHAT_PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short poem about autumn leaves.",
    "What are three tips for staying focused while studying?",
    "Describe the water cycle in simple terms.",
    "How do I make a cup of green tea?",
    "Why is the sky blue during the day?",
    "Give me a few ideas for a weekend trip near the mountains.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the story of Little Red Riding Hood.",
    "How does a bicycle stay upright while moving?",
]


# --- processes, namespaces, the link ------------------------------------------------------------


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


@dataclass
class Node:
    role: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


def start_node(
    role: str, model: Path, listen: str, core: int, log: Path, ns: str | None = None, extra: tuple[str, ...] = ()
) -> Node:
    """A node process pinned to `core` (optionally inside namespace `ns`); returns once it serves."""
    env = {**os.environ, "TANDEM_AUTH_TOKEN": TOKEN,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    cmd = [*(("ip", "netns", "exec", ns) if ns else ()), "taskset", "-c", str(core), *NICE, sys.executable, "-m",
           f"{role}_node.cli", "--model", str(model), "--listen", listen, "--threads", "1", *extra]  # fmt: skip
    with log.open("ab") as out:
        out.write(f"--- {shlex.join(cmd)}\n".encode())
        out.flush()
        start = out.tell()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    pattern = re.compile(rf"{role}-node serving .*? address=(\S+):(\d+)")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if m := pattern.search(log.read_bytes()[start:].decode(errors="replace")):
            return Node(role, proc, f"grpc://{m.group(1)}:{m.group(2)}", log)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop(proc)
    sys.exit(f"link: the {role} node did not start:\n{log.read_bytes()[-3000:].decode(errors='replace')}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class DelayedLink:
    """This namespace <-> namespace `ns` (DRAFT_IP there, HOST_IP here); `set_rtt(ms)` sets the delay."""

    ns: str
    method: str  # "netem" or "delay_line"
    set_rtt: Callable[[float], None]
    relay: subprocess.Popen[str] | None = None


def netem_link(ns: str, tag: str, cleanup: ExitStack) -> DelayedLink | None:
    """A veth pair with netem on both ends; None when the kernel has no netem."""
    here, there = f"tbl{tag}h", f"tbl{tag}d"
    sh("ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
    cleanup.callback(sh, "ip", "link", "del", here, check=False)  # takes its peer with it
    if sh("tc", "qdisc", "add", "dev", here, "root", "netem", "delay", "0ms", check=False).returncode != 0:
        return None
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", there, "root", "netem", "delay", "0ms")
    sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", here)
    sh("ip", "link", "set", here, "up")
    sh("ip", "-n", ns, "addr", "add", f"{DRAFT_IP}/30", "dev", there)
    sh("ip", "-n", ns, "link", "set", there, "up")

    def set_rtt(ms: float) -> None:
        sh("tc", "qdisc", "change", "dev", here, "root", "netem", "delay", f"{ms / 2}ms")
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "change", "dev", there, "root", "netem", "delay", f"{ms / 2}ms")

    return DelayedLink(ns, "netem", set_rtt)


def delay_line_link(ns: str, tag: str, cleanup: ExitStack) -> DelayedLink:
    """Two TUN devices relayed by tests/delay_line.py (one here, one moved into `ns`)."""
    here, there = f"tbt{tag}h", f"tbt{tag}d"
    relay = subprocess.Popen([sys.executable, str(DELAY_LINE), here, there], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip

    def stop_relay() -> None:
        if relay.poll() is None:
            relay.stdin.close()  # end of stdin stops it; its devices go with it
            try:
                relay.wait(5)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait(5)

    cleanup.callback(stop_relay)
    if relay.stdout.readline().strip() != "ready":
        raise RuntimeError("tests/delay_line.py did not start")
    sh("ip", "link", "set", there, "netns", ns)
    sh("ip", "-n", ns, "addr", "add", DRAFT_IP, "peer", HOST_IP, "dev", there)
    sh("ip", "-n", ns, "link", "set", there, "up")
    sh("ip", "addr", "add", HOST_IP, "peer", DRAFT_IP, "dev", here)
    sh("ip", "link", "set", here, "up")

    def set_rtt(ms: float) -> None:
        relay.stdin.write(f"{ms / 2}\n")
        relay.stdin.flush()
        time.sleep(0.1)  # the relay reads the new delay between packets: let it, before anyone measures

    return DelayedLink(ns, "delay_line", set_rtt, relay)


def handshake_rtt_ms(host: str, port: int, n: int = 60) -> tuple[float, float]:
    """(fastest, median) of n TCP handshakes: the link's own round trip, measured apart from the RPC stack."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with socket.create_connection((host, port), timeout=5):
            times.append((time.perf_counter() - t) * 1e3)
        time.sleep(0.002)
    return min(times), statistics.median(times)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Row:
    link: str
    temperature: float
    mode: str
    tokens: int = 0
    decode_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    k_hist: Counter[int] = field(default_factory=Counter)
    predicted_tokens: float = 0.0
    predicted_time: float = 0.0
    draft_link_s: float = 0.0
    draft_calls: int = 0
    pipeline_hits: int = 0
    rejected: int = 0  # rounds that stopped short of their k: with `accepted`, the tuner's acceptance estimate
    texts: list[list[int]] = field(default_factory=list)

    def add(self, s: Stats, tokens: list[int]) -> None:
        self.tokens += len(tokens)
        self.decode_s += s.decode_s
        self.drafted += s.drafted
        self.accepted += s.accepted
        self.rounds += s.rounds
        self.k_hist.update(s.k_hist)
        self.predicted_tokens += s.predicted_tokens
        self.predicted_time += s.predicted_time
        self.draft_link_s += s.draft_link_s
        self.draft_calls += s.draft_calls
        self.pipeline_hits += s.pipeline_hits
        self.rejected += sum(1 for _, k, n in s.trace if n < k)
        self.texts.append(tokens)

    @property
    def tps(self) -> float:
        return self.tokens / self.decode_s if self.decode_s else 0.0

    @property
    def predicted(self) -> float | None:
        return self.predicted_tokens / self.predicted_time if self.predicted_time else None

    @property
    def mean_k(self) -> float:
        return sum(k * n for k, n in self.k_hist.items()) / max(self.rounds, 1)

    def hist(self) -> str:
        return " ".join(f"{k}:{n}" for k, n in sorted(self.k_hist.items())) if self.mode != "target-only" else "-"


# Warm-up text: a chat prompt like the measured ones (so the acceptance the tuner learns from it is typical),
# but not one of them.
WARM_UP_PROMPT = "Tell me how a lighthouse helps ships at night."


async def warm_up(coord: Coordinator, tokenizer: Tokenizer) -> None:
    """First forwards are slow, and a fresh tuner needs its fits to see more than one k."""
    ids = chat(tokenizer, WARM_UP_PROMPT)
    for k, mode in ((0, "sequential"), (2, "sequential"), (6, "sequential"), (None, "pipelined"), (None, "sequential")):
        await coord.run(Request(ids, 24, k=k, mode=mode))  # type: ignore[arg-type]


def chat(tokenizer: Tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
    if tokenizer.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_id:
        ids = ids[1:]
    return ids


async def measure(
    link: str, target_url: str, draft_url: str, tokenizer: Tokenizer, args: argparse.Namespace
) -> tuple[list[Row], str]:
    """Every prompt target-only, sequential and pipelined (tuned k) in turn, at each temperature."""
    settings = Settings(max_k=args.max_k)
    coord = await Coordinator.connect(target_url, draft_url, tokenizer, token=TOKEN, settings=settings)
    try:
        await warm_up(coord, tokenizer)
        prompts = [chat(tokenizer, p) for p in CHAT_PROMPTS[: args.prompts]]
        rows: list[Row] = []
        for t in args.temperatures:
            at = {m: Row(link, t, m) for m in MODES}
            for i, ids in enumerate(prompts):
                for mode in MODES:
                    sp = SamplingParams(temperature=t, seed=1234 + i if t > 0 else None)
                    k = 0 if mode == "target-only" else None
                    req = Request(ids, args.max_tokens, sp, k=k, mode="sequential" if k == 0 else mode)  # type: ignore[arg-type]
                    res = await coord.run(req)
                    at[mode].add(res.stats, res.tokens)
            if t == 0:
                for mode in MODES[1:]:
                    if at[mode].texts != at["target-only"].texts:
                        print(f"  !! {link} {mode}: greedy output differs from the target alone", file=sys.stderr)
            for row in at.values():
                print(format_row(row, at["target-only"].tps), file=sys.stderr, flush=True)
            rows += at.values()
        return rows, model_note(link, coord, rows)
    finally:
        await coord.aclose()


def model_note(link: str, coord: Coordinator, rows: list[Row]) -> str:
    """The tuner's cost estimates at the end and what the cost model makes of them at each temperature's
    measured acceptance: why speculation pays here or not."""
    tuner = coord.tuner
    costs = tuner.costs()
    if costs is None:
        return f"- {link}: the tuner measured nothing"
    c = {key: f"{1e3 * v:.2f}" for key, v in vars(costs).items()}  # milliseconds
    out = (f"- {link}: the tuner's costs at the end: draft {c['draft_per_token']} ms/token + {c['draft_overhead']} "
           f"ms/call; verify {c['verify_intercept']} + {c['verify_slope']}*k ms; link draft {c['rtt_draft']} ms, "
           f"target {c['rtt_target']} ms. Break-even acceptance for k=1: {break_even_alpha(costs, 1):.2f} sequential, "
           f"{break_even_alpha(costs, 1, 'pipelined'):.2f} pipelined")  # fmt: skip
    base = tokens_per_second(0.0, 0, costs)

    def gain(alpha: float, mode: Mode) -> float:
        return best_plan(alpha, costs, mode, tuner.max_k)[2] / base

    def needed(goal: float, mode: Mode) -> str:
        if gain(1.0, mode) < goal:
            return "unreachable"
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if gain(mid, mode) >= goal else (mid, hi)
        return f"{hi:.2f}"

    out += (f"; with a perfect draft (acceptance 1) at most {gain(1.0, 'sequential'):.2f}x sequential, "
            f"{gain(1.0, 'pipelined'):.2f}x pipelined; acceptance needed for 1.8x: {needed(1.8, 'sequential')} "
            f"sequential, {needed(1.8, 'pipelined')} pipelined")  # fmt: skip
    for t in sorted({r.temperature for r in rows}):
        spec = [r for r in rows if r.temperature == t and r.mode != "target-only"]
        acc, rej = sum(r.accepted for r in spec), sum(r.rejected for r in spec)
        if acc + rej:
            a = acc / (acc + rej)
            out += f"; T={t:g}: measured acceptance {a:.2f}, model's best {gain(a, 'pipelined'):.2f}x"
    return out


# --- reporting --------------------------------------------------------------------------------

HEADER = (
    f"{'link':<10} {'T':>3} {'mode':<11} {'tok/s':>6} {'x alone':>7} {'accept':>6} {'tok/rnd':>7} {'mean k':>6} "
    f"{'predicted':>9} {'meas/pred':>9} {'draft link ms':>13}  k histogram (k:rounds)"
)


def format_row(r: Row, alone: float) -> str:
    acc = f"{r.accepted / r.drafted:.2f}" if r.drafted else "-"
    pred = f"{r.predicted:.1f}" if r.predicted else "-"
    ratio = f"{r.tps / r.predicted:.2f}" if r.predicted else "-"
    dlink = f"{1000 * r.draft_link_s / r.draft_calls:.2f}" if r.draft_calls else "-"
    mean_k = f"{r.mean_k:.2f}" if r.mode != "target-only" else "-"
    return (f"{r.link:<10} {r.temperature:>3.1f} {r.mode:<11} {r.tps:>6.1f} {r.tps / alone:>7.2f} {acc:>6} "
            f"{r.tokens / max(r.rounds, 1):>7.2f} {mean_k:>6} {pred:>9} {ratio:>9} {dlink:>13}  "
            f"{r.hist()}")  # fmt: skip


def table(rows: list[Row]) -> str:
    alone = {(r.link, r.temperature): r.tps for r in rows if r.mode == "target-only"}
    return "\n".join([HEADER, *(format_row(r, alone[r.link, r.temperature]) for r in rows)])


def speedup(rows: list[Row], link: str, t: float, mode: str) -> float | None:
    at = {r.mode: r.tps for r in rows if r.link == link and r.temperature == t}
    return at[mode] / at["target-only"] if mode in at and at.get("target-only") else None


def goals(rows: list[Row], delays: list[float]) -> list[str]:
    def ok(cond: bool) -> str:
        return "met" if cond else "NOT MET"

    out = []
    for t in sorted({r.temperature for r in rows}):
        s, p = speedup(rows, "loopback", t, "sequential"), speedup(rows, "loopback", t, "pipelined")
        if s is None or p is None:
            continue
        best = max(s, p)
        goal = f" [goal >= 1.80x at T=0: {ok(best >= 1.8)}]" if t == 0 else ""
        out.append(f"T={t:.1f} loopback: sequential {s:.2f}x, pipelined {p:.2f}x the target alone{goal}")
        for d, keep in ((2.0, 0.9), (10.0, 0.75)):
            if d in delays and (pd := speedup(rows, f"{d:g} ms", t, "pipelined")) is not None:
                out.append(f"T={t:.1f} {d:g} ms: pipelined {pd:.2f}x = {pd / p:.0%} of its loopback speedup "
                           f"[goal >= {keep:.0%}: {ok(pd / p >= keep)}]")  # fmt: skip
    worst = min((speedup(rows, r.link, r.temperature, r.mode) or 1.0, r) for r in rows if r.mode != "target-only")
    worst_r = worst[1]
    out.append(f"lowest speedup anywhere: {worst[0]:.2f}x ({worst_r.link}, T={worst_r.temperature:.1f}, "
               f"{worst_r.mode}) [goal never below 0.97x: {ok(worst[0] >= 0.97)}]")  # fmt: skip
    errs = [(abs(r.tps / r.predicted - 1), r) for r in rows if r.predicted]
    if errs:
        far = [f"{r.link} T={r.temperature:.1f} {r.mode} {r.tps / r.predicted:.2f}" for e, r in errs if e > 0.10]
        wr = max(errs, key=lambda x: x[0])[1]
        out.append(f"measured vs predicted: worst {wr.tps / wr.predicted:.2f} ({wr.link}, T={wr.temperature:.1f}, "
                   f"{wr.mode}); {len(errs) - len(far)}/{len(errs)} rows within 10% [goal all within 10%: "
                   f"{ok(not far)}]" + (f"; outside: {', '.join(far)}" if far else ""))  # fmt: skip
    return out


def record(path: Path, command: str, context: list[str], text: str) -> None:
    if not path.exists():
        path.write_text(
            "# Benchmark results\n\n"
            "Figures from the scripts in `bench/`, each section under the exact command that produced it, with the\n"
            "machine and the date. They depend on the machine and on its load at the time; rerun the command to "
            "compare.\n"
        )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join([f"\n## Link: speedup across a delayed link (`bench/link.py`, {stamp})\n", *context, "",
                      "```", f"$ {command}", text, "```", ""])  # fmt: skip
    with path.open("a") as f:
        f.write(body)


# --- main -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, cleanup: ExitStack, workdir: Path) -> tuple[list[Row], list[str]]:
    tokenizer = Tokenizer.from_gguf(read_gguf(args.target_model).metadata)
    log = workdir / "nodes.log"
    context: list[str] = []
    extra = ("--max-k", str(max(args.max_k + 1, 2)))
    target = start_node("target", args.target_model, "127.0.0.1:0", TARGET_CORE, log, extra=extra)
    cleanup.callback(stop, target.proc)
    draft = start_node("draft", args.draft_model, "127.0.0.1:0", DRAFT_CORE, log, extra=extra)
    cleanup.callback(stop, draft.proc)

    rows, note = await measure("loopback", target.url, draft.url, tokenizer, args)
    notes = [note]
    stop(draft.proc)
    if not args.delays:
        return rows, context + notes

    tag = str(os.getpid() % 100000)
    ns = f"tandem-bench-{tag}"
    sh("ip", "netns", "add", ns)
    cleanup.callback(sh, "ip", "netns", "del", ns, check=False)  # removes its end of the link and its nodes' view
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    link = netem_link(ns, tag, cleanup) or delay_line_link(ns, tag, cleanup)
    rdraft = start_node("draft", args.draft_model, f"{DRAFT_IP}:0", DRAFT_CORE, log, ns=ns, extra=extra)
    cleanup.callback(stop, rdraft.proc)
    port = int(rdraft.url.rsplit(":", 1)[1])
    link.set_rtt(0.0)
    base, base_med = handshake_rtt_ms(DRAFT_IP, port)
    how = "`tc netem` on a veth pair" if link.method == "netem" else (
        "two TUN devices and tests/delay_line.py (this kernel has no netem)")  # fmt: skip
    context.append(f"- link: draft node in network namespace {ns}, {how}; with no delay injected the link's "
                   f"round trip (TCP handshake) is {base:.3f} ms fastest, {base_med:.3f} ms median")  # fmt: skip
    for d in args.delays:
        link.set_rtt(d)
        rtt, rtt_med = handshake_rtt_ms(DRAFT_IP, port)
        cpu0 = cpu_seconds(link.relay.pid) if link.relay else 0.0
        t0 = time.monotonic()
        more, note = await measure(f"{d:g} ms", target.url, rdraft.url, tokenizer, args)
        rows += more
        notes.append(note)
        relay = ""
        if link.relay:
            share = (cpu_seconds(link.relay.pid) - cpu0) / (time.monotonic() - t0)
            relay = f"; the relay used {share:.1%} of a core meanwhile"
        context.append(
            f"- {d:g} ms injected: handshake round trip {rtt:.3f} ms fastest, {rtt_med:.3f} ms median{relay}"
        )
    return rows, context + notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-model", type=Path, default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--draft-model", type=Path, default=DEMO_DRAFT, help=f"default: models/{DEMO_DRAFT.name}")
    ap.add_argument("--prompts", type=int, default=8, help=f"distinct chat prompts (at most {len(CHAT_PROMPTS)})")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--delays", default="0.5,2,10", help="round-trip delays in ms ('' : loopback only)")
    ap.add_argument("--temperatures", default="0,0.7")
    ap.add_argument("--max-k", type=int, default=16, help="longest draft the tuner considers")
    ap.add_argument("--results", type=Path, default=RESULTS, help="append the figures here")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to --results")
    args = ap.parse_args()
    if sys.platform != "linux":
        sys.exit("link: network namespaces need Linux")
    if os.geteuid() != 0:
        sys.exit("link: needs root (it builds a network namespace and a delayed link); run it with sudo")
    for tool in ("ip", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"link: `{tool}` not found (iproute2, util-linux)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("link: needs two cores (draft node on one, target node on the other)")
    os.nice(NICE_LEVEL)  # the coordinator too: its latency is part of every round
    args.target_model = args.target_model or demo_target()
    for what, path in (("target", args.target_model), ("draft", args.draft_model)):
        if path is None or not Path(path).is_file():
            sys.exit(f"link: {what} model {path} not found (pass --{what}-model)")
    if not 1 <= args.prompts <= len(CHAT_PROMPTS) or args.max_tokens < 1 or args.max_k < 1:
        sys.exit(f"link: --prompts must be 1..{len(CHAT_PROMPTS)}, --max-tokens and --max-k >= 1")
    try:
        args.delays = [float(x) for x in args.delays.split(",") if x.strip()]
        args.temperatures = [float(x) for x in args.temperatures.split(",") if x.strip()]
    except ValueError as exc:
        sys.exit(f"link: --delays/--temperatures take comma-separated numbers: {exc}")

    with tempfile.TemporaryDirectory(prefix="tandem-link-") as tmp, ExitStack() as cleanup:
        try:
            rows, context = uvloop.run(run(args, cleanup, Path(tmp)))
        except BaseException:
            log = Path(tmp) / "nodes.log"
            if log.exists():
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    context[:0] = [
        f"- machine: {os.cpu_count()} cores ({cpu}), shared with other work; draft node on core {DRAFT_CORE}, "
        f"target node on core {TARGET_CORE} (taskset, --threads 1, node defaults: bfloat16, packed 4-bit), "
        "coordinator in the benchmark process beside the target, unpinned",
        f"- pair: target {Path(args.target_model).name}, draft {Path(args.draft_model).name} (sha256 "
        f"{hashlib.sha256(Path(args.draft_model).read_bytes()).hexdigest()[:12]}); "
        f"{args.prompts} distinct chat prompts, up to {args.max_tokens} tokens each, k tuned every round "
        f"(max {args.max_k})",
    ]
    text = table(rows) + "\n\n" + "\n".join(goals(rows, args.delays))
    print("\n".join(context) + "\n\n" + text)
    if not args.no_record:
        command = shlex.join([".venv/bin/python", "bench/link.py", *sys.argv[1:]])
        record(args.results, command, context, text)
        print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
