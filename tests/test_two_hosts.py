"""Two hosts, for real: the draft node in one network namespace, the target node and the coordinator in
another, a delayed link between them (tc netem on a veth pair, or tests/delay_line.py on two TUN devices
where the kernel lacks netem).

Checks that tandem-profile measures the injected round trip, that generation across the link equals the
target alone at T = 0, and that the coordinator drafts longer blocks when the link gets slower. The pair
is the synthetic one of tests/profile_helpers.py: a cheap draft that agrees with the target on most
tokens, where the best draft length depends on the link. Needs root (namespaces); skips otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.profile_helpers import write_pair

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
DRAFT_IP, TARGET_IP = "10.77.0.1", "10.77.0.2"  # private, and only inside the two namespaces
DRAFT_PORT, TARGET_PORT, HTTP_PORT = 50052, 50051, 8000
TOKEN = "two-hosts-test-token"
# Timing decides k: run ahead of whatever else the machine is busy with, so its load blurs the link less.
NICE = ("nice", "-n", "-10")
PROMPT = "Once upon a time, in a small town by the sea, there lived"
RTTS = (0.5, 5.0)
# How far the link's own round trip wanders, ms: netem runs in the kernel; the userspace delay line (for
# kernels without netem) wakes a process twice per packet, which a busy 2-core machine delays by ~0.1 ms.
JITTER = {"netem": 0.0, "delay_line": 0.1}


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to build network namespaces (run the suite as root, e.g. in CI)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (.ci/setup-system.sh installs it)"
    return None


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TANDEM_AUTH_TOKEN": TOKEN}


@dataclass
class TwoHosts:
    """Namespaces `draft_ns` and `target_ns`; `set_rtt(ms)` sets the link's round trip."""

    draft_ns: str
    target_ns: str
    method: str  # "netem" or "delay_line"
    set_rtt: Callable[[float], None]
    workdir: Path
    target_model: Path
    token_file: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    base_rtt_ms: float = 0.0  # the link's own round trip with no delay injected (the delay line's relay costs some)

    def run(self, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """Python with `args` in the target's namespace (where the coordinator runs)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.target_ns, *NICE, sys.executable, *args], cwd=ROOT, env=_env(),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def start(self, ns: str, name: str, args: list[str], ready: str, timeout: float = 180) -> None:
        """A long-running Python process in `ns`, logging to workdir/name.log; waits for `ready` there."""
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *NICE, sys.executable, *args], cwd=ROOT, env=_env(), stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready in log.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{name} did not start:\n{log.read_text(errors='replace')[-3000:]}")


def _netem_link(ns_a: str, ns_b: str, tag: str) -> tuple[Callable[[float], None], Callable[[], None]] | None:
    """A veth pair with netem on both ends (half the round trip each); None when netem is missing."""
    va, vb = f"tdv{tag}a", f"tdv{tag}b"
    sh("ip", "link", "add", va, "netns", ns_a, "type", "veth", "peer", "name", vb, "netns", ns_b)
    netem = ("tc", "qdisc", "add", "dev", va, "root", "netem", "delay", "0ms")
    if sh("ip", "netns", "exec", ns_a, *netem, check=False).returncode != 0:
        sh("ip", "-n", ns_a, "link", "del", va, check=False)
        return None
    sh("ip", "netns", "exec", ns_b, "tc", "qdisc", "add", "dev", vb, "root", "netem", "delay", "0ms")
    for ns, dev, ip in ((ns_a, va, DRAFT_IP), (ns_b, vb, TARGET_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")

    def set_rtt(ms: float) -> None:
        for ns, dev in ((ns_a, va), (ns_b, vb)):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "change", "dev", dev, "root", "netem", "delay", f"{ms / 2}ms")

    return set_rtt, lambda: None


def _delay_line_link(ns_a: str, ns_b: str, tag: str) -> tuple[Callable[[float], None], Callable[[], None]]:
    """Two TUN devices joined by tests/delay_line.py, which holds every packet half the round trip."""
    ta, tb = f"tdt{tag}a", f"tdt{tag}b"
    relay = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("delay_line.py")), ta, tb],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip

    def stop() -> None:
        if relay.poll() is None:
            relay.stdin.close()
            try:
                relay.wait(5)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait(5)

    try:
        if relay.stdout.readline().strip() != "ready":
            raise RuntimeError("delay_line.py did not start")
        for ns, dev, ip, peer in ((ns_a, ta, DRAFT_IP, TARGET_IP), (ns_b, tb, TARGET_IP, DRAFT_IP)):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", ip, "peer", peer, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
    except BaseException:
        stop()
        raise

    def set_rtt(ms: float) -> None:
        relay.stdin.write(f"{ms / 2}\n")
        relay.stdin.flush()

    return set_rtt, stop


def _handshake_rtt_ms(hosts: TwoHosts) -> float:
    """The fastest of 100 TCP handshakes from the target's namespace to the draft node, measured independently."""
    code = (
        "import socket, time\n"
        "xs = []\n"
        "for _ in range(100):\n"
        f"    t = time.perf_counter(); s = socket.create_connection(({DRAFT_IP!r}, {DRAFT_PORT}))\n"
        "    xs.append(time.perf_counter() - t); s.close(); time.sleep(0.002)\n"
        "print(min(xs) * 1e3)\n"
    )
    res = hosts.run(["-c", code], timeout=60)
    assert res.returncode == 0, res.stderr
    return float(res.stdout)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    if reason := _skip_reason():
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("two-hosts")
    draft_model, target_model = write_pair(workdir, target_layers=16)
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    tag = str(os.getpid() % 100000)
    ns_a, ns_b = f"tandem-draft-{tag}", f"tandem-target-{tag}"
    stop_link: Callable[[], None] = lambda: None
    procs: list[subprocess.Popen] = []
    try:
        sh("ip", "netns", "add", ns_a)
        sh("ip", "netns", "add", ns_b)
        for ns in (ns_a, ns_b):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        link = _netem_link(ns_a, ns_b, tag)
        method = "netem"
        if link is None:
            method = "delay_line"
            link = _delay_line_link(ns_a, ns_b, tag)
        set_rtt, stop_link = link
        h = TwoHosts(ns_a, ns_b, method, set_rtt, workdir, target_model, token_file, procs)
        node = ["--threads", "1", "--max-k", "32"]
        h.start(ns_a, "draft", ["-m", "draft_node.cli", "--model", str(draft_model),
                                "--listen", f"{DRAFT_IP}:{DRAFT_PORT}", *node], "draft-node serving")  # fmt: skip
        h.start(ns_b, "target", ["-m", "target_node.cli", "--model", str(target_model),
                                 "--listen", f"127.0.0.1:{TARGET_PORT}", *node], "target-node serving")  # fmt: skip
        h.base_rtt_ms = _handshake_rtt_ms(h)
        yield h
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        stop_link()
        for ns in (ns_a, ns_b):  # deleting a namespace removes its ends of the link too
            sh("ip", "netns", "del", ns, check=False)


def _nodes(hosts: TwoHosts) -> list[str]:
    return [
        "--draft", f"{DRAFT_IP}:{DRAFT_PORT}", "--target", f"127.0.0.1:{TARGET_PORT}",
        "--tokenizer-model", str(hosts.target_model), "--auth-token-file", str(hosts.token_file),
    ]  # fmt: skip


def test_profile_measures_the_link(hosts: TwoHosts) -> None:
    prompts = hosts.workdir / "prompts.txt"
    prompts.write_text("Tell me a story about the sea.\nWhat is two plus two?\nName three colors.\n")
    profiles = {}
    for rtt in RTTS:
        hosts.set_rtt(rtt)
        res = hosts.run([
            "-m", "coordinator.profile", *_nodes(hosts), "--prompts", str(prompts), "--max-k", "16", "--reps", "3",
            "--pings", "40", "--max-tokens", "16", "--temperature", "0", "--json", "--quiet",
        ])  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        prof = profiles[rtt] = json.loads(res.stdout)
        link = prof["link"]["draft"]
        info = (hosts.method, hosts.base_rtt_ms, rtt, link["rtt_ms"], link["network_rtt_ms"])
        assert abs(link["rtt_ms"] - hosts.base_rtt_ms - rtt) <= 0.2 * rtt + JITTER[hosts.method], info
        # A call pays the network's round trip plus the RPC stack; the target sits on loopback.
        assert prof["link"]["draft"]["ping"][0]["link_ms"]["median"] >= 0.8 * rtt
        assert prof["link"]["draft"]["ping"][-1]["link_ms"]["median"] >= 0.8 * rtt  # 64 KB
        assert prof["link"]["target"]["rtt_ms"] < 0.5 * rtt
        assert prof["link"]["draft"]["call_ms"] >= 0.8 * rtt
        assert 0.5 < prof["acceptance"][0]["alpha"] <= 1.0
    # Only the draft's link changed: the model's link cost follows it, and so does the best draft length.
    gap = profiles[5.0]["costs_ms"]["rtt_draft"] - profiles[0.5]["costs_ms"]["rtt_draft"]
    assert 0.5 * 4.5 < gap < 2 * 4.5, gap
    best = [max(p["predictions"][0]["table"], key=lambda row: row["sequential_tps"])["k"] for p in profiles.values()]
    assert best[1] >= best[0], best  # never shorter across a slower link (the coordinator test checks the rise)


def test_generation_across_the_link_equals_the_target_alone(hosts: TwoHosts) -> None:
    outputs = []
    for rtt in RTTS:
        hosts.set_rtt(rtt)
        res = hosts.run([
            "-m", "coordinator.cli", *_nodes(hosts), "--prompt", PROMPT, "--max-tokens", "64", "--ignore-eos",
            "--k", "6", "--compare", "--json",
        ])  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout)
        assert out["identical"] is True
        assert out["tokens"] == out["baseline"]["tokens"]
        assert len(out["tokens"]) == 64
        spec = out["speculation"]
        assert spec["drafted_tokens"] > 0 and 0 < spec["accepted_tokens"] < spec["drafted_tokens"], spec
        outputs.append(out["tokens"])
    assert outputs[0] == outputs[1]


def drafted(histogram: dict[str, int]) -> dict[int, int]:
    """The rounds that drafted, by k: rounds at k = 0 (the tuner or a fallback running the target alone for a
    while) say nothing about how long a draft it chooses."""
    return {int(k): n for k, n in histogram.items() if int(k) > 0}


def mean_k(histogram: dict[str, int]) -> float:
    rounds = drafted(histogram)
    return sum(k * n for k, n in rounds.items()) / max(1, sum(rounds.values()))


# The coordinator test's two delays: far enough apart that the link, not the machine's noise, sets the round
# time's fixed part (a round here takes ~30 ms of compute).
DELAYS = (0.5, 20.0)


def test_chosen_k_rises_with_the_delay(hosts: TwoHosts) -> None:
    """One coordinator serving throughout, as in production: it learns the pair on the fast link, then the
    link slows down under it, and its tuner should answer with longer drafts (more tokens per round trip)."""
    hosts.set_rtt(DELAYS[0])
    hosts.start(hosts.target_ns, "coordinator", ["-m", "coordinator.cli", *_nodes(hosts), "--listen",
                f"127.0.0.1:{HTTP_PORT}", "--max-k", "32", "--mode", "sequential"], "coordinator serving")  # fmt: skip
    client = (
        "import json, sys, urllib.request\n"
        f"req = urllib.request.Request('http://127.0.0.1:{HTTP_PORT}/v1/completions', data=sys.argv[1].encode(),\n"
        "                             headers={'Content-Type': 'application/json'})\n"
        "print(urllib.request.urlopen(req, timeout=120).read().decode())\n"
    )

    def complete(max_tokens: int, k: str | int = "auto") -> dict:
        body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "k": k}
        res = hosts.run(["-c", client, json.dumps(body)], timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout)

    baseline = complete(400, k=0)["choices"][0]["text"]
    # Two fixed draft lengths first, so the tuner's fits of draft and verify time have seen more than one k,
    # then long enough on the fast link for what it learnt while cold to fade.
    complete(100, k=4)
    complete(100, k=12)
    stats = {}
    for rtt, settle in zip(DELAYS, (1200, 400), strict=True):
        hosts.set_rtt(rtt)
        complete(settle)  # the tuner's link estimates follow the new delay within a few dozen calls
        out = complete(400)
        assert out["choices"][0]["text"] == baseline
        stats[rtt] = out["speculation"]
    fast, slow = (mean_k(stats[rtt]["k_histogram"]) for rtt in DELAYS)
    hist = stats[DELAYS[0]]["k_histogram"]
    assert sum(drafted(hist).values()) >= sum(hist.values()) / 2, (
        f"the tuner hardly speculated on the fast link (acceptance ~0.85): {hist}"
    )
    assert slow > fast, (fast, slow, {rtt: stats[rtt]["k_histogram"] for rtt in DELAYS})
