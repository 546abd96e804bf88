"""The `coordinator` command: help, clear errors for bad set-ups, and the embedded default (it starts
its own draft and target nodes on loopback) printing text, a stats line, and the comparison with the
target alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.coordinator_helpers import ROOT
from tests.wire_helpers import write_tiny_llama


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_help_explains_the_options() -> None:
    res = run("--help", timeout=60)
    assert res.returncode == 0
    for opt in ("--draft", "--target", "--prompt", "--k", "--mode", "--listen", "--draft-model", "--compare", "--json"):
        assert opt in res.stdout, opt
    assert "embedded" in res.stdout


def test_bad_setups_are_clear_errors(tmp_path: Path) -> None:
    res = run("--draft-model", str(tmp_path / "absent.gguf"), "--prompt", "hi", timeout=60)
    assert res.returncode == 2 and "absent.gguf not found" in res.stderr and "Traceback" not in res.stderr
    res = run("--target", "127.0.0.1:1", "--prompt", "hi", timeout=60)
    assert res.returncode == 2 and "--tokenizer-model" in res.stderr
    res = run("--k", "-1", "--prompt", "hi", timeout=60)
    assert res.returncode == 2 and "--k" in res.stderr
    tiny = write_tiny_llama(tmp_path / "t.gguf")
    res = run("--target", "127.0.0.1:1", "--tokenizer-model", str(tiny), "--prompt", "ab", timeout=60)
    assert res.returncode == 1 and "target node at 127.0.0.1:1" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_embedded_nodes_on_tiny_models_stream_text_and_stats(tmp_path: Path) -> None:
    target = write_tiny_llama(tmp_path / "target.gguf", seed=5, n_layers=3, dim=64, ffn=32, scale=3.0)
    draft = write_tiny_llama(tmp_path / "draft.gguf", seed=5, n_layers=2, dim=64, ffn=32, scale=3.0)
    common = ["--target-model", str(target), "--draft-model", str(draft), "--threads", "1", "--draft-threads", "1",
              "--max-tokens", "24", "--ignore-eos", "--k", "3", "--node-log", str(tmp_path / "nodes.log")]  # fmt: skip
    res = run(*common, "--prompt", "abcdef", "--mode", "pipelined")
    assert res.returncode == 0, res.stderr
    text = res.stdout.rstrip("\n")
    assert len(text) >= 24  # one letter per token (the vocabulary's "ab" gives two)
    err = res.stderr
    assert "tandem: 24 tokens" in err and "acceptance" in err and "tokens/round" in err and "rtt draft" in err
    assert "target alone: 24 tokens" in err and "greedy text identical: yes" in err and "speedup" in err
    res = run(*common, "--prompt", "abcdef", "--chat")
    assert res.returncode == 2 and "has no chat template" in res.stderr


@pytest.mark.slow
def test_demo_default_with_smollm2_as_its_own_draft_prints_json(smollm2: Path, tmp_path: Path) -> None:
    res = run("--draft-model", str(smollm2), "--threads", "1", "--draft-threads", "1", "--prompt",
              "The capital of France is", "--max-tokens", "8", "--ignore-eos", "--k", "4", "--json",
              "--node-log", str(tmp_path / "nodes.log"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["identical"] is True and out["tokens"] == out["baseline"]["tokens"]
    assert out["usage"]["completion_tokens"] == 8 and "Paris" in out["text"]
    spec = out["speculation"]
    assert spec["acceptance_rate"] >= 0.9 and spec["mean_tokens_per_round"] > 1.5
    assert out["baseline"]["speculation"]["drafted_tokens"] == 0 and out["speedup"] > 0


def test_embedded_nodes_make_a_log_only_when_a_node_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator given both nodes starts none, and must leave no empty temporary log behind."""
    import tempfile

    from coordinator.cli import EmbeddedNodes

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    nodes = EmbeddedNodes()
    nodes.stop()
    assert nodes.log is None and not list(tmp_path.iterdir())
