"""tools.write_gguf: files that transformers' own GGUF loader reads back into the same model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from tandem.engine.gguf_file import read_gguf
from tools.requantize import main as requantize_main
from tools.requantize import requantize
from tools.write_gguf import main, random_model, write_gguf

transformers = pytest.importorskip("transformers")

VOCAB = 512
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
CASES: dict[str, dict[str, Any]] = {
    "llama_gqa_untied": dict(
        BASE, model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
    ),
    "llama_rope_linear": dict(
        BASE,
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "qwen2_bias_tied": dict(
        BASE, model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "qwen3_head_dim": dict(
        BASE, model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False
    ),
}
# transformers rebuilds these configs from the GGUF metadata alone; for the others (rope scaling, qwen3's
# head_dim) its GGUF loader ignores the keys, so the config is passed in and the metadata checked below.
CONFIG_FROM_FILE = {"llama_gqa_untied", "qwen2_bias_tied"}
TOKENS = torch.tensor([[1, 17, 300, 42, 511, 3, 99, 250, 8, 64, 128, 7]])


def _fields(path: Path) -> dict[str, Any]:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _expected_tensor_names(cfg: dict[str, Any]) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"}
    if not cfg.get("tie_word_embeddings"):
        names.add("output.weight")
    for i in range(cfg["num_hidden_layers"]):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            names.add(f"blk.{i}.{t}.weight")
        names |= {f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"}
        if cfg["model_type"] == "qwen2":
            names |= {f"blk.{i}.attn_q.bias", f"blk.{i}.attn_k.bias", f"blk.{i}.attn_v.bias"}
        if cfg["model_type"] == "qwen3":
            names |= {f"blk.{i}.attn_q_norm.weight", f"blk.{i}.attn_k_norm.weight"}
    return names


def _load(path: Path, config: Any = None) -> torch.nn.Module:
    kwargs = {"config": config} if config is not None else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits[0]


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_reads_back_the_same_model(case: str, tiny_tokenizer: Path, tmp_path: Path) -> None:
    cfg = CASES[case]
    model = random_model(cfg, seed=3)
    path = write_gguf(model, tmp_path / f"{case}.gguf", tokenizer_from=tiny_tokenizer)
    loaded = _load(path, None if case in CONFIG_FROM_FILE else model.config)
    want, got = _logits(model), _logits(loaded)
    assert want.std() > 0.1  # random weights that actually move the logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    if case in CONFIG_FROM_FILE:
        c = loaded.config
        assert (c.num_key_value_heads, c.tie_word_embeddings, c.vocab_size) == (
            cfg["num_key_value_heads"],
            cfg["tie_word_embeddings"],
            VOCAB,
        )


@pytest.mark.parametrize("case", list(CASES))
def test_metadata_and_tensor_names(case: str, tiny_tokenizer: Path, tmp_path: Path) -> None:
    cfg = CASES[case]
    model = random_model(cfg, seed=1)
    path = write_gguf(model, tmp_path / "m.gguf", tokenizer_from=tiny_tokenizer, name="tiny")
    f = _fields(path)
    arch = cfg["model_type"]
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    assert f["general.architecture"] == arch and f["general.name"] == "tiny"
    assert f[f"{arch}.block_count"] == 2
    assert f[f"{arch}.context_length"] == 256
    assert f[f"{arch}.embedding_length"] == 64
    assert f[f"{arch}.feed_forward_length"] == 128
    assert f[f"{arch}.attention.head_count"] == cfg["num_attention_heads"]
    assert f[f"{arch}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.rms_norm_eps)
    assert f["general.file_type"] == gguf.LlamaFileType.ALL_F32
    # LlamaModel adds vocab_size and rope.dimension_count; the qwen converters do not
    assert f.get(f"{arch}.vocab_size") == (VOCAB if arch == "llama" else None)
    assert f.get(f"{arch}.rope.dimension_count") == (head_dim if arch == "llama" else None)
    # key/value_length: qwen3 configs always state head_dim; elsewhere only when it is not dim / heads
    assert f.get(f"{arch}.attention.key_length") == (head_dim if arch == "qwen3" else None)
    assert f.get(f"{arch}.attention.value_length") == f.get(f"{arch}.attention.key_length")
    if case == "llama_rope_linear":
        assert f["llama.rope.scaling.type"] == "linear"
        assert f["llama.rope.scaling.factor"] == 2.0
    else:
        assert f"{arch}.rope.scaling.type" not in f
    for key, value in _fields(tiny_tokenizer).items():
        if key.startswith("tokenizer."):
            assert f[key] == value, key
    tensors = _tensors(path)
    assert set(tensors) == _expected_tensor_names(cfg)
    assert all(t.tensor_type == T.F32 for t in tensors.values())
    q = tensors["blk.0.attn_q.weight"]
    assert tuple(reversed(q.shape.tolist())) == (cfg["num_attention_heads"] * head_dim, 64)


def test_llama_qk_rows_are_permuted(tiny_tokenizer: Path, tmp_path: Path) -> None:
    cfg = CASES["llama_gqa_untied"]
    model = random_model(cfg, seed=2)
    tensors = _tensors(write_gguf(model, tmp_path / "m.gguf", tokenizer_from=tiny_tokenizer))
    hf_k = model.model.layers[0].self_attn.k_proj.weight.detach().numpy()  # 2 kv heads x 16 rows
    file_k = np.asarray(tensors["blk.0.attn_k.weight"].data)
    # head 0's rows in the file: x0, y0, x1, y1, ... where HF has x0..x7, y0..y7
    assert np.array_equal(file_k[0], hf_k[0]) and np.array_equal(file_k[1], hf_k[8])
    assert np.array_equal(file_k[2], hf_k[1]) and np.array_equal(file_k[16 + 1], hf_k[16 + 8])
    hf_v = model.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    assert np.array_equal(np.asarray(tensors["blk.0.attn_v.weight"].data), hf_v)  # V is not rotated


def test_yarn_from_state_dict_and_config_dict(tiny_tokenizer: Path, tmp_path: Path) -> None:
    model = random_model(CASES["qwen2_bias_tied"], seed=4)
    config = model.config.to_dict()
    config["rope_parameters"] = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 1e6,
    }
    path = write_gguf((model.state_dict(), config), tmp_path / "m.gguf", tokenizer_from=tiny_tokenizer)
    f = _fields(path)
    assert f["qwen2.rope.scaling.type"] == "yarn"
    assert f["qwen2.rope.scaling.factor"] == 4.0
    assert f["qwen2.rope.scaling.original_context_length"] == 64
    assert f["qwen2.rope.freq_base"] == 1e6
    assert "output.weight" not in _tensors(path)


def test_llama3_rope_freqs_match_transformers(tiny_tokenizer: Path, tmp_path: Path) -> None:
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    model = random_model(dict(CASES["llama_gqa_untied"], rope_parameters=rope), seed=5)
    path = write_gguf(model, tmp_path / "m.gguf", tokenizer_from=tiny_tokenizer)
    freqs = _tensors(path)["rope_freqs.weight"]
    assert freqs.tensor_type == T.F32 and freqs.data.shape == (8,)  # head_dim 16 / 2
    assert "llama.rope.scaling.type" not in _fields(path)  # llama3 scaling lives in the tensor alone
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    np.testing.assert_allclose(np.asarray(freqs.data), (plain / scaled).numpy(), rtol=1e-5)
    assert freqs.data.min() == 1.0 and freqs.data.max() == 8.0  # both ends of the ramp are present


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_output_types(dtype: str, tiny_tokenizer: Path, tmp_path: Path) -> None:
    # intermediate 48: ffn_down's rows (48) are no whole number of 32-blocks, so they fall back to F16
    cfg = dict(CASES["qwen2_bias_tied"], intermediate_size=48)
    model = random_model(cfg, seed=6)
    path = write_gguf(model, tmp_path / f"{dtype}.gguf", dtype=dtype, tokenizer_from=tiny_tokenizer)
    want = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}[dtype]
    for name, t in _tensors(path).items():
        if name.endswith(("_norm.weight", ".bias")):
            assert t.tensor_type == T.F32, name
        elif "ffn_down" in name and dtype.startswith("q"):
            assert t.tensor_type == T.F16, name
        else:
            assert t.tensor_type == want, name
    assert _fields(path)["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{dtype.upper()}")
    if dtype in ("bf16", "q8_0"):  # close enough to the float model that transformers' logits agree
        want_logits, got = _logits(model), _logits(_load(path))
        rel = float((got - want_logits).norm() / want_logits.norm())
        assert rel < 0.05, rel


def test_default_tokenizer_is_smollm2(smollm2: Path, tmp_path: Path) -> None:
    cfg = dict(CASES["qwen2_bias_tied"], vocab_size=49152, num_hidden_layers=1)
    model = random_model(cfg, seed=7)
    path = write_gguf(model, tmp_path / "m.gguf")
    ours, theirs = read_gguf(path).metadata, read_gguf(smollm2).metadata
    tok_keys = {k for k in theirs if k.startswith("tokenizer.")}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"} <= tok_keys
    assert {k: ours[k] for k in tok_keys} == {k: theirs[k] for k in tok_keys}
    types = {k: f.types for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.ggml.")}
    assert types["tokenizer.ggml.token_type"] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert types["tokenizer.ggml.eos_token_id"] == [gguf.GGUFValueType.UINT32]


def test_bad_inputs_are_clear_errors(tiny_tokenizer: Path, tmp_path: Path) -> None:
    model = random_model(CASES["qwen2_bias_tied"], seed=8)
    with pytest.raises(ValueError, match="vocab_size 512 != the tokenizer source's 49152"):
        write_gguf(model, tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="unsupported dtype 'q3_k'"):
        write_gguf(model, tmp_path / "b.gguf", dtype="q3_k", tokenizer_from=tiny_tokenizer)
    config = dict(model.config.to_dict(), model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        write_gguf((model.state_dict(), config), tmp_path / "c.gguf", tokenizer_from=tiny_tokenizer)
    with pytest.raises(ValueError, match="model_type"):
        random_model({"hidden_size": 64})


def test_cli(tiny_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = dict(CASES["qwen3_head_dim"], num_hidden_layers=1)
    config_json = tmp_path / "cfg"
    config_json.mkdir()
    (config_json / "config.json").write_text(__import__("json").dumps(cfg))
    out = tmp_path / "cli.gguf"
    argv = ["--config", str(config_json), "--out", str(out), "--seed", "9", "--dtype", "q8_0"]
    assert main([*argv, "--tokenizer-from", str(tiny_tokenizer)]) == 0
    assert "wrote" in capsys.readouterr().out
    f = _fields(out)
    assert f["general.architecture"] == "qwen3" and f["qwen3.attention.key_length"] == 32
    assert _tensors(out)["blk.0.attn_q.weight"].tensor_type == T.Q8_0
    # the same seed gives the same file; a bad config is a usage error, not a traceback
    again = tmp_path / "again.gguf"
    main(
        [
            "--config",
            str(config_json / "config.json"),
            "--out",
            str(again),
            "--seed",
            "9",
            "--dtype",
            "q8_0",
            "--tokenizer-from",
            str(tiny_tokenizer),
        ]
    )
    assert again.read_bytes() == out.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["--config", '{"model_type": "bert"}', "--out", str(tmp_path / "x.gguf")])
    assert e.value.code == 2
    assert math.isfinite(float(np.asarray(_tensors(out)["output_norm.weight"].data).sum()))


def test_requantize_changes_only_the_weights_type(tiny_tokenizer: Path, tmp_path: Path) -> None:
    # intermediate 48: ffn_down stays F16 (no whole 32-blocks), and is copied as it is
    cfg = dict(CASES["qwen2_bias_tied"], intermediate_size=48)
    src = write_gguf(random_model(cfg, seed=10), tmp_path / "q8.gguf", dtype="q8_0", tokenizer_from=tiny_tokenizer)
    dst = tmp_path / "q4.gguf"
    assert requantize_main([str(src), str(dst), "--type", "q4_1", "--keep", "token_embd.weight"]) == 0
    before, after = _tensors(src), _tensors(dst)
    assert before.keys() == after.keys()
    for name, t in after.items():
        old = before[name]
        if name == "token_embd.weight" or old.tensor_type != T.Q8_0:
            assert t.tensor_type == old.tensor_type and np.array_equal(t.data, old.data), name
        else:
            assert t.tensor_type == T.Q4_1, name
            want = gguf.quants.dequantize(old.data, T.Q8_0)
            got = gguf.quants.dequantize(t.data, T.Q4_1)
            assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1, name
    f_before, f_after = _fields(src), _fields(dst)
    assert f_after.pop("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_1
    f_before.pop("general.file_type")
    assert f_after == f_before
    with pytest.raises(ValueError, match="another file"):
        requantize(src, src, "q4_1")
    with pytest.raises(ValueError, match="names no tensor"):
        requantize(src, tmp_path / "x.gguf", "q4_1", ["output.weight"])
    with pytest.raises(SystemExit):
        requantize_main([str(tmp_path / "missing.gguf"), str(dst), "--type", "q4_1"])
