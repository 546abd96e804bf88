"""The draft-model pipeline (tools/draft_prompts, gen_draft_data, train_draft, eval_draft) on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.engine.runtime import load_engine
from tools import draft_prompts, eval_draft, gen_draft_data, train_draft
from tools.draft_prompts import write_jsonl_gz
from tools.train_draft import Draft, DraftConfig, export
from tools.write_gguf import write_tiny_tokenizer

TINY = DraftConfig(
    vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_position_embeddings=512
)


def random_draft(seed: int) -> Draft:
    torch.manual_seed(seed)
    model = Draft(TINY)
    with torch.no_grad():  # sharper than the training init, so argmax decisions are not near-ties
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_target(tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Draft]:
    path = tmp_path_factory.mktemp("target") / "target.f32.gguf"
    model = random_draft(0)
    export(model, path, "f32", tiny_tokenizer, "tiny target")
    return path, model


def test_export_matches_the_engine(tiny_target: tuple[Path, Draft]) -> None:
    """Our llama (HF names, rotate-half rope) written by write_gguf gives the engine the same logits."""
    path, model = tiny_target
    tokens = [1, 40, 41, 300, 7, 99, 120, 5, 6, 2, 511, 17]
    with torch.no_grad():
        ref = model.logits(model(torch.tensor([tokens])))[0]
    seq = load_engine(path).new_sequence(64)
    got = torch.cat([seq.forward(tokens[:5]), seq.forward(tokens[5:6]), seq.forward(tokens[6:])])
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_batched_decode_matches_sequence_forward(tiny_target: tuple[Path, Draft]) -> None:
    engine = load_engine(tiny_target[0])
    prompts = [[1, 50, 60, 70], [1, 9, 8, 7, 6, 5, 4, 3, 200], [1, 300]]
    steps = 6
    expected = []
    for p in prompts:
        seq = engine.new_sequence(64)
        logits = seq.forward(p)
        out, rows = [int(logits[-1].argmax())], []
        for _ in range(steps):
            logits = seq.forward(out[-1:])
            rows.append(logits[-1])
            out.append(int(logits[-1].argmax()))
        expected.append((out, torch.stack(rows)))
    batch = gen_draft_data.Batch(engine, 4, 64)  # one slot stays empty
    ctx = [[*p, int(batch.load(i, p)[-1].argmax())] for i, p in enumerate(prompts)]
    rows: list[list[torch.Tensor]] = [[], [], []]
    for _ in range(steps):
        xs = [c[-1] for c in ctx] + [0]
        ps = [len(c) - 1 for c in ctx] + [0]
        logits = batch.step(torch.tensor(xs), torch.tensor(ps), max(ps) + 1)
        for i, c in enumerate(ctx):
            rows[i].append(logits[i])
            c.append(int(logits[i].argmax()))
    for (out, ref_rows), c, p, r in zip(expected, ctx, prompts, rows, strict=True):
        assert c[len(p) :] == out
        torch.testing.assert_close(torch.stack(r), ref_rows, atol=1e-4, rtol=1e-4)


def test_speculation_gives_the_targets_greedy_reply(
    tiny_target: tuple[Path, Draft], tiny_tokenizer: Path, tmp_path: Path
) -> None:
    engine = load_engine(tiny_target[0])
    prompt = [1, 70, 71, 72, 73]
    k, max_new = 3, 13
    seq = engine.new_sequence(64)
    logits = seq.forward(prompt)
    greedy = [int(logits[-1].argmax())]
    for _ in range(max_new - 1):
        greedy.append(int(seq.forward(greedy[-1:])[-1].argmax()))
    # The target as its own draft: every proposal is accepted.
    s, reply = eval_draft.speculate(engine.new_sequence(64), engine.new_sequence(64), prompt, k, max_new, set())
    assert reply == greedy
    assert s["accepted"] == s["proposed"] == s["checked"] == 9 and s["rounds"] == 3
    # Another model as the draft: the same reply, whatever it costs.
    other = tmp_path / "other.gguf"
    export(random_draft(1), other, "f32", tiny_tokenizer, "other")
    s, reply = eval_draft.speculate(
        engine.new_sequence(64), load_engine(other).new_sequence(64), prompt, k, max_new, set()
    )
    assert reply == greedy
    assert s["accepted"] < s["proposed"] and s["checked"] <= s["proposed"]


def test_generate_train_export_evaluate(tiny_target: tuple[Path, Draft], tmp_path: Path) -> None:
    """The three stages end to end on CPU, one worker, tiny settings."""
    target, _ = tiny_target
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    train = [{"id": f"t{i}", "source": "x", "template": "{x}", "prompt": f"tea {i} then ten"} for i in range(5)]
    held = [{"id": f"h{i}", "source": "x", "template": "{x}", "prompt": f"on the hat {i}"} for i in range(3)]
    write_jsonl_gz(prompts / "train.jsonl.gz", train)
    write_jsonl_gz(prompts / "heldout.jsonl.gz", held)
    write_jsonl_gz(prompts / "text.jsonl.gz", [{"id": "x0", "source": "x", "text": "the other hat is to the east"}])
    data = tmp_path / "data.pt"
    args = ["--model", str(target), "--prompts", str(prompts), "--out", str(data), "--workers", "1", "--batch", "3"]
    args += ["--max-new", "8", "--heldout", "2", "--passes", "1", "--time-budget", "60", "--sampled-frac", "0.5"]
    assert gen_draft_data.main(args) == 0
    d = torch.load(data, weights_only=True)
    assert int((d["split"] == gen_draft_data.SPLIT_HELDOUT).sum()) == 2
    assert int((d["kind"] == gen_draft_data.KIND_TEXT).sum()) == 1
    assert len(d["kind"]) == 8
    ids = d["topk_ids"].to(torch.int32) & 0xFFFF
    off = d["offsets"]
    for s in torch.nonzero(d["kind"] == gen_draft_data.KIND_GREEDY).flatten().tolist():
        a, b, n = int(off[s]), int(off[s + 1]), int(d["n_prompt"][s])
        assert b - a - n <= 8
        # Row t is the distribution after token t: on a greedy reply its top id is the next token.
        assert ids[a + n - 1 : b - 1, 0].tolist() == d["tokens"][a + n : b].tolist()
        assert torch.all(d["topk_probs"][a + n - 1 : b - 1].float().sum(-1) <= 1.001)

    out = tmp_path / "draft.gguf"
    args = ["--data", str(data), "--target", str(target), "--out", str(out), "--device", "cpu", "--max-steps", "3"]
    args += ["--dim", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn", "64", "--batch-tokens", "256"]
    args += ["--checkpoint", str(tmp_path / "ck.pt")]
    assert train_draft.main(args) == 0
    draft = load_engine(out)
    assert draft.config.n_layers == 1 and draft.config.vocab_size == 512
    assert draft.tokenizer.fingerprint == load_engine(target).tokenizer.fingerprint

    result = tmp_path / "eval.json"
    args = ["--draft", str(out), "--target", str(target), "--prompts", str(prompts / "heldout.jsonl.gz")]
    args += ["--skip", "0", "--n", "2", "--max-new", "8", "--json", str(result)]
    assert eval_draft.main(args) == 0
    figures = json.loads(result.read_text())
    assert figures["prompts"] == 2 and 0.0 <= figures["alpha"] <= 1.0


def test_listed_and_pack_text() -> None:
    assert draft_prompts.listed(" a;\n b c ;\n\nd e\nf; ") == ["a", "b c", "d e f"]
    packed = draft_prompts.pack_text([{"source": "s", "text": "x" * 10}] * 3 + [{"source": "t", "text": "y"}], size=15)
    assert packed == [{"source": "s", "text": "x" * 10 + "\n\n" + "x" * 10}, {"source": "s", "text": "x" * 10},
                      {"source": "t", "text": "y"}]  # fmt: skip


@pytest.mark.slow
def test_prompt_splits_are_disjoint_and_deterministic(tmp_path: Path) -> None:
    """Same seed, different hash seeds: byte-identical files; no held-out prompt or template in training."""
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(Path(__file__).parents[1])}
        subprocess.run([sys.executable, "-m", "tools.draft_prompts", "--out", str(out)], check=True, env=env)
        outs.append(out)
    for name in ("train", "heldout", "text"):
        a, b = ((o / f"{name}.jsonl.gz").read_bytes() for o in outs)
        assert a == b, name
    train = draft_prompts.read_jsonl_gz(outs[0] / "train.jsonl.gz")
    held = draft_prompts.read_jsonl_gz(outs[0] / "heldout.jsonl.gz")
    assert len(held) >= 100 and len(train) > 1000
    assert not {h["prompt"] for h in held} & {t["prompt"] for t in train}
    assert not {h["template"] for h in held if h["template"] != "{x}"} & {t["template"] for t in train}


def test_init_reads_back_an_exported_draft(tmp_path: Path, tiny_tokenizer: Path) -> None:
    """--init: a written draft comes back as the same config and weights (Q/K rows un-permuted)."""
    model = random_draft(3)
    for dtype, exact in (("f32", True), ("q8_0", False)):
        path = tmp_path / f"d.{dtype}.gguf"
        export(model, path, dtype, tiny_tokenizer, "d")
        cfg, state = train_draft.read_draft_gguf(path)
        assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (64, 2, 4, 2, 128)
        assert state.keys() == model.state_dict().keys()
        for name, ref in model.state_dict().items():
            if exact:
                assert torch.equal(state[name], ref), name
            else:  # Q8_0: 8-bit codes, one scale per 32 values
                torch.testing.assert_close(state[name], ref, atol=ref.abs().max().item() / 100, rtol=0)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_self_chat_records_whole_conversations(tmp_path: Path) -> None:
    """The target writes the user's turn and answers it; every recorded row is the target's own distribution."""
    tok = write_tiny_tokenizer(tmp_path / "tok.gguf", 512, CHATML)
    target = tmp_path / "target.gguf"
    export(random_draft(0), target, "f32", tok, "tiny chat target")
    engine = load_engine(target)
    head, tail = gen_draft_data.chat_frame(engine.tokenizer)
    data = tmp_path / "sc.pt"
    args = ["--model", str(target), "--self-chat", "--out", str(data), "--batch", "3", "--max-new", "6"]
    args += ["--max-user", "5", "--time-budget", "3", "--sampled-frac", "0.5", "--top-k", "4"]
    assert gen_draft_data.main(args) == 0
    d = torch.load(data, weights_only=True)
    off, ids = d["offsets"], d["topk_ids"].to(torch.int32) & 0xFFFF
    assert len(d["kind"]) >= 6  # slots are reused once a conversation ends
    assert {int(k) for k in d["kind"]} <= {gen_draft_data.KIND_GREEDY, gen_draft_data.KIND_SAMPLED}
    for s in range(len(d["kind"])):
        a, b, n = int(off[s]), int(off[s + 1]), int(d["n_prompt"][s])
        tokens = d["tokens"][a:b].tolist()
        assert tokens[: len(head)] == head and tokens[n - len(tail) : n] == tail
        assert 4 <= n - len(head) - len(tail) <= 5 and 1 <= b - a - n <= 6
        # A fresh forward of the whole conversation gives the recorded top-1 at every position.
        fresh = engine.new_sequence(64).forward(tokens)
        assert ids[a : b - 1, 0].tolist() == fresh[:-1].argmax(-1).tolist()
        if d["kind"][s] == gen_draft_data.KIND_GREEDY:
            assert ids[a + n - 1 : b - 1, 0].tolist() == tokens[n:]
