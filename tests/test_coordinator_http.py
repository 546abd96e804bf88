"""The coordinator's HTTP API with the official `openai` client, against real processes on loopback:
a SmolLM2 target node, two draft nodes (a random one-layer model with SmolLM2's vocabulary, which
almost never agrees with the target, and SmolLM2 itself with its whole head, which always does) and one
coordinator process per draft, started with the `coordinator` CLI.

Greedy output must equal target-only decoding (`k: 0`) for 10 prompts in both modes with tuned and
fixed draft lengths; streaming must give the same text as non-streaming; errors must be OpenAI-shaped
400s. The last tests kill nodes: a draft killed mid-request must not change the output and must be
used again within 2 s of its restart; a killed target must give the client an error, not a hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.coordinator_helpers import ROOT, free_port, start_node_process
from tools.write_gguf import write_gguf

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\n",
    "The speed of light is",
    "My favourite book is",
    "In 1969, astronauts",
    "The best way to learn a language is",
]
MAX_TOKENS = 6


def random_draft(path: Path, vocab_source: Path) -> Path:
    """A one-layer llama with random weights and SmolLM2's vocabulary."""
    v, d, f = 49152, 32, 64
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    sd = {"model.embed_tokens.weight": r(v, d), "model.norm.weight": torch.ones(d)}
    p = "model.layers.0."
    sd.update({
        p + "input_layernorm.weight": torch.ones(d), p + "post_attention_layernorm.weight": torch.ones(d),
        p + "self_attn.q_proj.weight": r(d, d), p + "self_attn.k_proj.weight": r(d // 2, d),
        p + "self_attn.v_proj.weight": r(d // 2, d), p + "self_attn.o_proj.weight": r(d, d),
        p + "mlp.gate_proj.weight": r(f, d), p + "mlp.up_proj.weight": r(f, d), p + "mlp.down_proj.weight": r(d, f),
    })  # fmt: skip
    cfg = {"model_type": "llama", "vocab_size": v, "hidden_size": d, "intermediate_size": f, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}  # fmt: skip
    return write_gguf((sd, cfg), path, tokenizer_from=vocab_source, name="random-smollm2-vocab")


class Stack:
    def __init__(self, d: Path, smollm2: Path) -> None:
        self.dir, self.smollm2 = d, smollm2
        self.random_model = random_draft(d / "random.gguf", smollm2)
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def node(self, name: str, role: str, model: Path, *extra: str, port: int = 0) -> None:
        log = self.dir / f"{name}.log"  # one log per node: start_node_process finds the port there
        self.procs[name], self.ports[name] = start_node_process(role, model, log, *extra, port=port)

    def coordinator(self, name: str, draft: str) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "coordinator.cli", "--target", f"127.0.0.1:{self.ports['target']}",
               "--draft", f"127.0.0.1:{self.ports[draft]}", "--tokenizer-model", str(self.smollm2),
               "--listen", f"127.0.0.1:{port}", "--draft-timeout", "3"]  # fmt: skip
        out = (self.dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError((self.dir / f"{name}.log").read_text())
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"coordinator did not start: {(self.dir / f'{name}.log').read_text()}")

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(30)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[tuple[Stack, dict[str, str]]]:
    s = Stack(tmp_path_factory.mktemp("http"), smollm2)
    try:
        with ThreadPoolExecutor(3) as pool:  # start-up is mostly importing torch: overlap it
            list(pool.map(lambda a: s.node(*a), [("target", "target", smollm2), ("random", "draft", s.random_model),
                                                  ("self", "draft", smollm2, "--head-rows", "0")]))  # fmt: skip
            names = ("random", "self")
            urls = dict(zip(names, pool.map(s.coordinator, [f"coord-{n}" for n in names], names), strict=True))
        yield s, urls
    finally:
        s.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(c: openai.OpenAI, prompt: str, **extra: object) -> openai.types.Completion:
    return c.completions.create(model="x", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)


async def complete_all(
    url: str, jobs: list[tuple[str, dict[str, object]]], concurrency: int = 4
) -> list[openai.types.Completion]:
    """Several requests in flight, so the coordinator's and the draft's work overlaps the target's."""
    ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    sem = asyncio.Semaphore(concurrency)

    async def one(prompt: str, extra: dict[str, object]) -> openai.types.Completion:
        async with sem:
            return await ac.completions.create(model="x", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                               extra_body=extra)  # fmt: skip

    try:
        return await asyncio.gather(*(one(p, e) for p, e in jobs))
    finally:
        await ac.close()


@pytest.fixture(scope="module")
def baseline(stack: tuple[Stack, dict[str, str]]) -> list[openai.types.Completion]:
    """Target-only decoding (k = 0) of every prompt, through the same coordinator path."""
    base = asyncio.run(complete_all(stack[1]["random"], [(p, {"k": 0}) for p in PROMPTS]))
    assert all(b.speculation["drafted_tokens"] == 0 and b.usage.completion_tokens >= 1 for b in base)
    return base


@pytest.mark.parametrize("draft", ["random", "self"])
def test_greedy_output_equals_target_only_for_10_prompts(
    stack: tuple[Stack, dict[str, str]], baseline: list[openai.types.Completion], draft: str
) -> None:
    configs = [{"mode": mode, "k": k} for mode in ("sequential", "pipelined") for k in ("auto", 3)]
    jobs = [(p, c) for c in configs for p in PROMPTS]
    got = asyncio.run(complete_all(stack[1][draft], jobs))
    drafted = accepted = 0
    for (prompt, config), res, base in zip(jobs, got, baseline * len(configs), strict=True):
        assert res.choices[0].text == base.choices[0].text, (prompt, config)
        assert res.usage == base.usage and res.choices[0].finish_reason == base.choices[0].finish_reason
        drafted += res.speculation["drafted_tokens"]
        accepted += res.speculation["accepted_tokens"]
    assert drafted > 0
    if draft == "self":
        assert accepted > 0.9 * drafted
    else:
        assert accepted < 0.2 * drafted


def test_streaming_equals_non_streaming_for_chat_and_completions(stack: tuple[Stack, dict[str, str]]) -> None:
    c = client(stack[1]["self"])
    for mode in ("sequential", "pipelined"):
        extra = {"k": 4, "mode": mode}
        kw = dict(model="x", max_tokens=12, temperature=0, stop=[" is", "\n\n"], extra_body=extra)
        whole = c.completions.create(prompt=PROMPTS[0], **kw)
        parts, usage, finish = [], None, None
        for chunk in c.completions.create(prompt=PROMPTS[0], stream=True, stream_options={"include_usage": True}, **kw):
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                parts.append(ch.text)
                finish = ch.finish_reason or finish
        assert "".join(parts) == whole.choices[0].text and usage == whole.usage
        assert finish == whole.choices[0].finish_reason

        msgs = [{"role": "user", "content": "Write one sentence about the sea."}]
        kw["stop"] = ["\n\n"]
        chat = c.chat.completions.create(messages=msgs, **kw)
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
        assert chat.usage.completion_tokens == 12 and chat.speculation["drafted_tokens"] > 0
        parts, roles = [], []
        for chunk in c.chat.completions.create(messages=msgs, stream=True, **kw):
            for ch in chunk.choices:
                roles.append(ch.delta.role)
                parts.append(ch.delta.content or "")
        assert "".join(parts) == chat.choices[0].message.content and roles[0] == "assistant"
        base = c.chat.completions.create(messages=msgs, **{**kw, "extra_body": {"k": 0}})
        assert base.choices[0].message.content == chat.choices[0].message.content


def test_concurrent_requests_get_their_own_sessions(stack: tuple[Stack, dict[str, str]]) -> None:
    url = stack[1]["self"]
    sync = client(url)
    want = [complete(sync, p, k=0).choices[0].text for p in PROMPTS[:4]]

    async def go() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        outs = await asyncio.gather(*(
            ac.completions.create(model="x", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"k": 3, "mode": "pipelined" if i % 2 else "sequential"})
            for i, p in enumerate(PROMPTS[:4])
        ))  # fmt: skip
        await ac.close()
        return [o.choices[0].text for o in outs]

    assert asyncio.run(go()) == want


def test_models_health_and_metrics(stack: tuple[Stack, dict[str, str]]) -> None:
    url = stack[1]["self"]
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["Smollm2 135M 8k Lc100K Mix1 Ep2"]
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["target"]["up"] and h["draft"]["up"]
    complete(client(url), PROMPTS[1], k=2)
    m = httpx.get(url + "/metrics").text
    series = [
        "tandem_chosen_k_bucket",
        "tandem_round_seconds_bucket",
        'tandem_link_rtt_seconds_bucket{le="0.001",node="draft"}',
        "tandem_acceptance_rate",
        "tandem_request_tokens_per_second_count",
        "tandem_draft_up 1.0",
        "tandem_accepted_tokens_total",
        "tandem_generated_tokens_total",
    ]
    for name in series:
        assert name in m, name


def test_bad_requests_are_openai_style_400s(stack: tuple[Stack, dict[str, str]]) -> None:
    url = stack[1]["random"]
    c = client(url)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="x", prompt=[5] * 9000, max_tokens=2)
    cases = [
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
        ("/v1/completions", {"prompt": "hi", "k": -2}, "k"),
        ("/v1/completions", {"prompt": "hi", "mode": "fast"}, "mode"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"prompt": [1, 99999999]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 2}, "logprobs"),
        ("/v1/completions", {}, "prompt"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ]
    for path, body, param in cases:
        r = httpx.post(url + path, json={"model": "x", **body})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"] and param in (err["param"] or err["message"])
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


# --- failures (these kill nodes: keep them last) -----------------------------------------------


def test_draft_killed_mid_request_then_restarted(stack: tuple[Stack, dict[str, str]]) -> None:
    s, urls = stack
    url = urls["random"]
    c = client(url)
    kw = dict(model="x", prompt=PROMPTS[2], max_tokens=24, temperature=0)
    base = c.completions.create(**kw, extra_body={"k": 0, "ignore_eos": True})
    parts, final = [], None
    stream = c.completions.create(**kw, stream=True, extra_body={"k": 2, "ignore_eos": True})
    for i, chunk in enumerate(stream):
        parts.append(chunk.choices[0].text)
        if i == 2:
            s.kill("random")
        final = chunk
    assert "".join(parts) == base.choices[0].text
    assert final.speculation["draft_failures"] >= 1 and final.speculation["fallback_rounds"] >= 1
    assert httpx.get(url + "/health").json()["draft"]["up"] is False

    s.node("random", "draft", s.random_model, port=s.ports["random"])  # returns once the node serves
    t0 = time.monotonic()
    while not httpx.get(url + "/health").json()["draft"]["up"]:
        assert time.monotonic() - t0 < 2.0, "speculation did not resume within 2 s"
        time.sleep(0.05)
    got = c.completions.create(**kw, extra_body={"k": 2, "ignore_eos": True})
    assert got.speculation["drafted_tokens"] > 0 and got.choices[0].text == base.choices[0].text


def test_target_killed_gives_the_client_an_error_not_a_hang(stack: tuple[Stack, dict[str, str]]) -> None:
    s, urls = stack
    c = client(urls["self"])
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match="target node"):
        for i, _ in enumerate(c.completions.create(model="x", prompt=PROMPTS[3], max_tokens=200, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})):  # fmt: skip
            if i == 1:
                s.kill("target")
                t0 = time.monotonic()
    assert time.monotonic() - t0 < 10
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        complete(c, PROMPTS[4])
    assert time.monotonic() - t0 < 10 and err.value.status_code == 503
    assert json.loads(err.value.response.text)["error"]["type"] == "server_error"
    assert httpx.get(urls["self"] + "/health").status_code == 503
