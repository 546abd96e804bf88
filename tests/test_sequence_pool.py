"""Released sequences are reused (with their CUDA graphs), and a reused one computes as a fresh one does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from tandem.engine import cpu_kernels
from tandem.engine.runtime import POOL_SIZE, load_engine
from tandem.wire.errors import NodeError
from tandem.wire.gen import tandem_pb2 as pb
from target_node.service import TargetService
from tests.profile_helpers import write_pair


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pair(tmp_path_factory.mktemp("pool"))[1]


def test_reused_sequence_equals_a_fresh_one(model: Path) -> None:
    engine = load_engine(model, "cpu", "float32", "dequantized", threads=1)
    first = engine.new_sequence(64)
    first.forward(list(range(40, 80)))  # longer than what follows: stale rows stay behind in the cache
    engine.release(first)
    reused = engine.new_sequence(64)
    assert reused is first and len(reused) == 0 and not engine.pool
    fresh = engine.new_sequence(64)
    assert fresh is not reused
    tokens = [7, 100, 300, 42, 5]
    torch.testing.assert_close(reused.forward(tokens), fresh.forward(tokens), rtol=0, atol=0)
    torch.testing.assert_close(reused.forward([9, 9]), fresh.forward([9, 9]), rtol=0, atol=0)


def test_pool_is_bounded_and_keyed_by_length(model: Path) -> None:
    engine = load_engine(model, "cpu", "float32", "dequantized", threads=1)
    seqs = [engine.new_sequence(32) for _ in range(POOL_SIZE + 2)]
    for s in seqs:
        engine.release(s)
    assert len(engine.pool) == POOL_SIZE
    other = engine.new_sequence(48)
    assert all(other is not s for s in seqs) and other.max_len == 48  # another length is not a match
    assert engine.new_sequence(32) in seqs


def test_a_closed_session_hands_its_cache_to_the_next(model: Path) -> None:
    svc = TargetService(load_engine(model, "cpu", "float32", "dequantized", threads=1))
    commit = pb.Commit(base_len=0, tokens=[5, 6, 7])

    async def go() -> tuple[object, object, str]:
        await svc.prefill(pb.PrefillRequest(session="a", commit=commit), pb.PrefillReply())
        first = svc.sessions["a"].seq
        await svc.close(pb.CloseRequest(session="a"), pb.CloseReply())
        try:
            await svc.prefill(pb.PrefillRequest(session="a", commit=pb.Commit(base_len=3)), pb.PrefillReply())
        except NodeError as exc:
            gone = exc.code.name
        await svc.prefill(pb.PrefillRequest(session="b", commit=commit), pb.PrefillReply())
        return first, svc.sessions["b"].seq, gone

    try:
        first, second, gone = asyncio.run(go())
    finally:
        svc.shutdown()
    assert second is first and len(second) == 3
    assert gone == "NOT_FOUND"


def test_eager_forwards_never_read_cache_rows_past_the_length(model: Path) -> None:
    """CPU caches are not zero-filled: whatever lies past the length (here NaN) must never reach the logits."""
    engine = load_engine(model, "cpu", "float32", "dequantized", threads=1)
    dirty, clean = engine.new_sequence(64), engine.new_sequence(64)
    for k, v in dirty.caches + clean.caches:
        k.zero_(), v.zero_()
    for k, v in dirty.caches:
        k.fill_(float("nan")), v.fill_(float("nan"))
    for tokens in ([3, 1, 4, 1, 5], [9], [2, 6]):
        got, want = dirty.forward(tokens), clean.forward(tokens)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu_kernels", "matmuls"])
def test_padded_cpu_attention_never_reads_garbage(model: Path, kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 on CPU: our attention kernel reads only live rows; the matmuls attend over a length rounded up
    to ATTN_PAD rows (model.attention_span), whose rows past the length are zeroed before use. Either way a
    cache full of NaN gives the logits of a clean one, across prefills, decode steps, a rollback and the step
    into the next padded block."""
    if kernel and not cpu_kernels.available():
        pytest.skip("our CPU kernels do not run here")
    if not kernel:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    engine = load_engine(model, "cpu", "bfloat16", "dequantized", threads=1)
    assert engine.model.cpu_attention == kernel
    dirty, clean = engine.new_sequence(256), engine.new_sequence(256)
    for k, v in dirty.caches:
        k.fill_(float("nan")), v.fill_(float("nan"))
    for k, v in clean.caches:
        k.zero_(), v.zero_()
    steps = [list(range(10, 70)), [5], [6, 7], [8]] + [[9]] * 4
    for i, tokens in enumerate(steps):
        got, want = dirty.forward(tokens), clean.forward(tokens)
        assert torch.isfinite(got).all(), i
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if i == 3:
            dirty.truncate(62), clean.truncate(62)
    assert len(dirty) == 66 and dirty.finite == (0 if kernel else 128)


def test_bf16_verify_blocks_pick_the_tokens_decoding_picks(smollm2: Path) -> None:
    """SmolLM2 in bfloat16 on CPU: the argmax at every position of 4-token verify blocks equals one-token
    greedy decoding. A float32 cache attended in one float32 call per block failed at token 12 of this
    prompt (a near tie), which made speculative greedy output differ from the target alone."""
    engine = load_engine(smollm2, "cpu", "bfloat16", "quantized", threads=2)
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Write a haiku about autumn."}])
    prompt = engine.tokenizer.encode(text, add_special=False)
    seq = engine.new_sequence(256)
    out = [int(seq.forward(prompt)[-1].argmax())]
    for _ in range(40):
        out.append(int(seq.forward(out[-1:])[-1].argmax()))
    blocks = engine.new_sequence(256)
    blocks.forward(prompt[:-1])
    fed = [prompt[-1], *out[:-1]]
    picked = torch.cat([blocks.forward(fed[i : i + 4]).argmax(-1) for i in range(0, len(fed), 4)]).tolist()
    assert picked == out


def test_static_shape_forward_over_a_span_equals_the_eager_one(model: Path) -> None:
    """The CUDA graphs' forward (positions as a tensor, attention over a span of the cache, rows past the
    length masked) gives the eager forward's logits; run here on the CPU, where the same code runs eagerly."""
    engine = load_engine(model, "cpu", "float32", "dequantized", threads=1)
    eager = engine.new_sequence(96)
    static = engine.new_sequence(96)
    prompt = list(range(30, 60))
    eager.forward(prompt), static.forward(prompt)
    for kc, vc in static.caches:  # rows past the length hold stale numbers, as a reused cache's do
        kc[..., 30:].normal_(), vc[:, 30:].normal_()  # keys are cached transposed
    for block, span in (([5], 32), ([6, 7, 8], 64), ([9], 96)):
        n = len(eager)
        want = eager.forward(block)
        pos = torch.arange(n, n + len(block))
        with torch.inference_mode():
            got = engine.model(torch.tensor(block), pos, static.caches, span)
        static.tokens.extend(block)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
