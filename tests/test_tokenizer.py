"""The GGUF tokenizer against HF transformers' GGUF tokenizer, sentencepiece itself, and llama.cpp's rules.

Oracles: `transformers` builds its own tokenizer from the same GGUF file; for SentencePiece the
`sentencepiece` library that trained the vocabulary is the ground truth. Where HF departs from llama.cpp
(pre-tokenizers it does not map, SentencePiece's dummy prefix) the test says so and checks llama.cpp's
documented rule instead.
"""

from __future__ import annotations

import inspect
import io
import random
import re
import textwrap
import time
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import pytest
import tokenizers
from tokenizers import Regex, pre_tokenizers

from tandem.engine.gguf_file import read_gguf
from tandem.engine.tokenizer import StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It wasn't me, they'll say; WE'D agree, I'm sure!",
    "code": inspect.getsource(textwrap.dedent) + "\nx = {'a': [1, 2.5e-3]}  # comment\r\n\tif x: return\n",
    "whitespace": "  a  b\n\n\tc   \r\n  \t \n\n\n    end   \u00a0\u3000 ",
    "digits": "12345 6789012 3.14159 1,000,000 0x1F 2024-01-01 ١٢٣ ½ v2.0.1",
    "non_ascii": "Crème brûlée, naïve café — 東京タワーに行きました。한국어 😀👍🏽👨‍👩‍👧 Ωμέγα ∑∫√ \u200bzw",
    "contractions": "I'm you'RE they'll WE'D don't it's O'Neil's",
    "single_space": " ",
    "empty": "",
}
SMOL_SPECIAL = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>x <|im_end|> c<|im_start|>"


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings mixing the character classes the pre-tokenizer regexes care about."""
    rng = random.Random(seed)
    alphabet = "aZé東😀 1234567890  \t\n\r'.,;:!?()[]{}<>|$+=^~-_\"\\/#@%&*ſﬁ\u00a0\u0301"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _write_gguf(path: Path, metadata: Mapping[str, Any]) -> None:
    """A GGUF holding only a llama header and tokenizer metadata: all HF's GGUF tokenizer loader reads."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in metadata.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))  # str -> STRING, int -> INT32, float -> FLOAT32, as llama.cpp wants
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def _hf_from(path: Path) -> Any:
    """HF's tokenizer for a GGUF. AutoTokenizer resolves to this class (checked on SmolLM2 below) but first
    reads the whole file through gguf's slow reader to build a model config, which takes seconds."""
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)


def _copy(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(backend.to_str())


def _pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.token_text(i) for i in ids]


def _tiny(pre: str, tokens: list[str], merges: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": merges,
        **extra,
    }


# --- SmolLM2 (byte-level BPE, pre "smollm") ---------------------------------------------------------


@pytest.fixture(scope="module")
def smol_meta(smollm2: Path) -> dict[str, Any]:
    return read_gguf(smollm2).metadata


@pytest.fixture(scope="module")
def smol(smol_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf(smol_meta)


@pytest.fixture(scope="module")
def hf_smol(smollm2: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)


def test_smollm2_matches_hf(smol: Tokenizer, hf_smol: Any) -> None:
    assert type(hf_smol) is transformers.PreTrainedTokenizerFast
    # HF maps no split for "smollm" and keeps GPT-2's regex, while llama.cpp (like SmolLM2's own
    # tokenizer.json, Digits(individual_digits=True) then ByteLevel) cuts off every \p{N} first. The
    # vocabulary has no merge joining an ASCII digit to anything, so HF is a fair oracle except next to
    # other numerals such as "½"; for those the reference is HF's model behind SmolLM2's own pre-tokenizer.
    reference = _copy(hf_smol.backend_tokenizer)
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in [*TEXTS.values(), SMOL_SPECIAL, *_random_texts(300)]:
        ids = smol.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        if _hf_splits_digits_alike(text):
            assert ids == hf_smol.encode(text) == hf_smol.encode(text, add_special_tokens=False), text
        assert smol.decode(ids) == text
    assert _pieces(smol, smol.encode(" ½")) == [" ", "½"]
    assert hf_smol.convert_ids_to_tokens(hf_smol.encode(" ½")) == ["ĠÂ", "½"]
    assert _pieces(smol, smol.encode("a  1")) == ["a", "  ", "1"]
    assert hf_smol.convert_ids_to_tokens(hf_smol.encode("a  1")) == ["a", "Ġ", "Ġ", "1"]


def _hf_splits_digits_alike(text: str) -> bool:
    """Whether cutting numerals off first cannot matter for SmolLM2's vocabulary: no numeral other than
    ASCII digits (merged with a space: " ½"), none after two spaces (GPT-2's regex leaves the last space
    for the digit, which then stands alone, where llama.cpp keeps the whitespace run whole)."""
    numerals = (c for c in text if unicodedata.category(c)[0] == "N")
    return all(c.isascii() for c in numerals) and not re.search(r"\s\s[0-9]", text)


def test_smollm2_decode_matches_hf(smol: Tokenizer, hf_smol: Any) -> None:
    ids = smol.encode(SMOL_SPECIAL + TEXTS["non_ascii"] + TEXTS["code"])
    for skip in (False, True):
        assert smol.decode(ids, skip_special=skip) == hf_smol.decode(ids, skip_special_tokens=skip)
    assert smol.decode(smol.encode(SMOL_SPECIAL), skip_special=True) == "user\nhi\nx  c"


def test_smollm2_special_tokens(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.add_bos) == (1, 2, False)
    assert smol.eos_ids == {0, 2}  # <|im_end|> is EOS; <|endoftext|> is a control end-of-turn text
    assert smol.encode("<|im_start|>assistant<|im_end|>") == [1, 520, 9531, 2]
    assert smol.encode("<|im_start|>", add_special=True) == [1]  # add_bos_token is false in this file
    with pytest.raises(TypeError):
        smol.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="49152"):
        smol.decode([5, 49152])
    with pytest.raises(ValueError, match="-1"):
        smol.decode([-1])


def test_smollm2_chat_template(smol: Tokenizer, hf_smol: Any) -> None:
    messages = [{"role": "user", "content": "Hi!"}]
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smol.apply_chat_template(messages) == expected
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Ωμέγα 😀"},
    ]
    for convo, gen in ((messages, True), (conversation, True), (conversation, False)):
        ours = smol.apply_chat_template(convo, add_generation_prompt=gen)
        assert ours == hf_smol.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen)
        assert smol.encode(ours)[0] == 1  # <|im_start|> stays one token


def test_chat_template_sandbox_and_errors() -> None:
    tokens = ["<s>", "</s>", "x"]
    ids = {"tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.token_type": [3, 3, 1]}
    meta = _tiny("qwen2", tokens, [], **ids)
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}"
    )
    tok = Tokenizer.from_gguf({**meta, "tokenizer.chat_template": template})
    assert tok.apply_chat_template([{"role": "user", "content": "é<b>"}]) == '<s>"é<b>"</s>'
    with pytest.raises(ValueError, match="first message must be the user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    escape = Tokenizer.from_gguf({**meta, "tokenizer.chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(ValueError, match="unsafe"):  # the sandbox refuses attribute games
        escape.apply_chat_template([{"role": "user", "content": "x"}])
    broken = Tokenizer.from_gguf({**meta, "tokenizer.chat_template": "{% for %}"})
    with pytest.raises(ValueError, match="does not compile"):
        broken.apply_chat_template([])
    no_template = Tokenizer.from_gguf({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template([])


def test_build_is_fast(smol_meta: dict[str, Any]) -> None:
    best = min(_timed(Tokenizer.from_gguf, smol_meta) for _ in range(3))
    print(f"SmolLM2 tokenizer (49152 tokens, 48900 merges) built in {best * 1000:.0f} ms")
    assert best < 1.0


def _timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def test_stream_decoder_never_splits_a_character(smol: Tokenizer) -> None:
    text = SMOL_SPECIAL + TEXTS["non_ascii"] + TEXTS["prose"]
    ids = smol.encode(text)
    for skip in (False, True):
        stream = StreamDecoder(smol, skip_special=skip)
        chunks = [stream.push([i]) for i in ids]
        assert "" in chunks  # some byte-level token ended inside a character and was held back
        assert all("\ufffd" not in c for c in chunks)
        assert "".join(chunks) + stream.finish() == smol.decode(ids, skip_special=skip)
    # A character cut off for good comes out as U+FFFD at the end, exactly as decode() shows it.
    emoji = smol.encode("😀")
    assert len(emoji) > 1
    stream = StreamDecoder(smol)
    assert stream.push(emoji[:-1]) == ""
    assert stream.finish() == smol.decode(emoji[:-1]) == "\ufffd"


def test_fingerprint(smol_meta: dict[str, Any], smol: Tokenizer) -> None:
    assert len(smol.fingerprint) == 64 and int(smol.fingerprint, 16) >= 0
    same_vocab = {**smol_meta, "tokenizer.ggml.pre": "qwen2", "tokenizer.chat_template": "{{ messages }}"}
    assert Tokenizer.from_gguf(same_vocab).fingerprint == smol.fingerprint
    tokens = list(smol_meta["tokenizer.ggml.tokens"])
    tokens[1000], tokens[1001] = tokens[1001], tokens[1000]
    changed = [
        {**smol_meta, "tokenizer.ggml.tokens": tokens},
        {**smol_meta, "tokenizer.ggml.merges": smol_meta["tokenizer.ggml.merges"][:-1]},
        {**smol_meta, "tokenizer.ggml.eos_token_id": 5},
        {**smol_meta, "tokenizer.ggml.bos_token_id": 0},
    ]
    assert len({smol.fingerprint, *(Tokenizer.from_gguf(m).fingerprint for m in changed)}) == 5


# --- other byte-level pre-tokenizers, on SmolLM2's vocabulary ------------------------------------------


@pytest.fixture(scope="module")
def variants(smol_meta: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2's vocabulary and merges under other `tokenizer.ggml.pre` values, so HF and we read the same."""
    paths = {}
    for pre in ("qwen2", "llama3", "deepseek-r1-qwen", "default"):
        paths[pre] = tmp_path_factory.mktemp(pre) / "vocab.gguf"
        _write_gguf(paths[pre], {**smol_meta, "tokenizer.ggml.pre": pre})
    return paths


@pytest.mark.parametrize("pre", ["qwen2", "llama3", "deepseek-r1-qwen"])
def test_pre_tokenizer_matches_hf(pre: str, variants: dict[str, Path]) -> None:
    tok = Tokenizer.from_gguf(read_gguf(variants[pre]).metadata)
    hf = _hf_from(variants[pre])
    assert "Split" in repr(hf.backend_tokenizer.pre_tokenizer)  # HF honoured this pre value
    for text in [*TEXTS.values(), SMOL_SPECIAL, *_random_texts(300, seed=1)]:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_default_pre_tokenizer(variants: dict[str, Path]) -> None:
    # HF maps no split for "default" and keeps GPT-2's one regex; llama.cpp's default runs four in turn.
    # Reference: HF's own BPE model behind a pre-tokenizer written here from llama.cpp's regex list.
    tok = Tokenizer.from_gguf(read_gguf(variants["default"]).metadata)
    hf = _hf_from(variants["default"])
    assert "Split" not in repr(hf.backend_tokenizer.pre_tokenizer)
    llama_cpp_default = [
        r"[\p{P}\$\+<=>\^~\|]+",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ]
    reference = _copy(hf.backend_tokenizer)
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in llama_cpp_default]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    for text in [*TEXTS.values(), SMOL_SPECIAL, *_random_texts(300, seed=2)]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text)) == text
    # Punctuation is cut off first, so "'m" and " (" do not stay together as GPT-2's regex keeps them.
    assert _pieces(tok, tok.encode("I'm (x)")) == ["I", "'", "m", " ", "(", "x", ")"]
    assert hf.convert_ids_to_tokens(hf.encode("I'm (x)")) == ["I", "'m", "Ġ(", "x", ")"]


def test_digit_rules() -> None:
    # Vocabularies where digits do merge, so each pre-tokenizer's way of cutting numbers shows in the ids.
    # smollm cuts off every numeral first: GPT-2's regex keeps " 12" together, smollm leaves the space alone.
    meta = _tiny("smollm", ["Ġ", "1", "2", "a", "Ġ1", "12"], ["Ġ 1", "1 2"])
    smollm, gpt2 = Tokenizer.from_gguf(meta), Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "gpt-2"})
    assert _pieces(smollm, smollm.encode("a 12")) == ["a", " ", "1", "2"]
    assert _pieces(gpt2, gpt2.encode("a 12")) == ["a", " 1", "2"]
    # "1234": default and llama3 cut runs of digits into threes, qwen2 into ones, GPT-2 not at all.
    meta = _tiny("default", ["1", "2", "3", "4", "12", "23", "34"], ["1 2", "3 4", "2 3"])
    cut = {pre: Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": pre}) for pre in ("default", "qwen2", "gpt-2")}
    cut["llama3"] = Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "llama3", "tokenizer.ggml.add_bos_token": False})
    assert {pre: _pieces(tok, tok.encode("1234")) for pre, tok in cut.items()} == {
        "default": ["12", "3", "4"],
        "qwen2": ["1", "2", "3", "4"],
        "gpt-2": ["12", "34"],
        "llama3": ["12", "3", "4"],
    }


def test_llama3_takes_whole_words() -> None:
    # llama.cpp sets ignore_merges for llama3: a pre-token found in the vocabulary is used whole, even
    # when the merges would not build it.
    meta = _tiny("llama3", ["a", "b", "c", "ab", "abc"], ["a b"], **{"tokenizer.ggml.add_bos_token": False})
    assert Tokenizer.from_gguf(meta).encode("abc", add_special=False) == [4]
    assert Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "qwen2"}).encode("abc") == [3, 2]


def test_bos_eos_rules() -> None:
    tokens = ["a", "b", "<s>", "</s>", "<|eot_id|>", "<|im_end|>"]
    types = [1, 1, 3, 3, 3, 1]
    meta = _tiny("qwen2", tokens, [], **{"tokenizer.ggml.token_type": types})
    ids = {"tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 3}
    # llama.cpp adds BOS by default for llama3 vocabularies only; the file's add_bos_token wins.
    assert Tokenizer.from_gguf({**meta, **ids}).encode("ab") == [0, 1]
    assert Tokenizer.from_gguf({**meta, **ids, "tokenizer.ggml.pre": "llama3"}).encode("ab") == [2, 0, 1]
    both = {**meta, **ids, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    assert Tokenizer.from_gguf(both).encode("ab") == [2, 0, 1, 3]
    assert Tokenizer.from_gguf(both).encode("ab", add_special=False) == [0, 1]
    # End of generation: EOS, the EOT key, and end-of-turn texts typed CONTROL (not a plain-text token).
    tok = Tokenizer.from_gguf({**meta, **ids})
    assert (tok.eos_id, tok.eos_ids) == (3, {3, 4})
    assert Tokenizer.from_gguf({**meta, "tokenizer.ggml.eot_token_id": 1}).eos_ids == {1, 4}
    with pytest.raises(ValueError, match="no BOS"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "llama3"})


def test_tokens_outside_byte_alphabet() -> None:
    # DeepSeek-R1 distills carry a control token in full-width characters and a user-defined <think>; an
    # ordinary token written in plain text rather than the byte alphabet gets respelled so BPE reaches it.
    # "東" is UTF-8 e6 9d b1, spelled "æĿ±" in the byte alphabet.
    tokens = ["a", "b", "æ", "Ŀ", "±", "æĿ", "東", "<think>", "<｜end▁of▁sentence｜>"]
    types = [1, 1, 1, 1, 1, 1, 1, 4, 3]
    tok = Tokenizer.from_gguf(
        _tiny("deepseek-r1-qwen", tokens, ["æ Ŀ", "æĿ ±"], **{"tokenizer.ggml.token_type": types})
    )
    ids = tok.encode("a東<think>b<｜end▁of▁sentence｜>")
    assert ids == [0, 6, 7, 1, 8]
    assert tok.decode(ids) == "a東<think>b<｜end▁of▁sentence｜>"
    assert tok.decode(ids, skip_special=True) == "a東<think>b"  # user-defined tokens are text, not control
    assert tok.eos_ids == {8}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.pre": "deepseek-llm"}, "'deepseek-llm'"),
        ({"tokenizer.ggml.model": "bert"}, "'bert'"),
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model None"),
        ({"tokenizer.ggml.merges": None}, "no tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["a x"]}, "do not fit"),
        ({"tokenizer.ggml.merges": ["ab"]}, "malformed merge 'ab'"),
        ({"tokenizer.ggml.tokens": ["a", "b", "a"]}, "'a' appears twice"),
        ({"tokenizer.ggml.token_type": [1]}, "one per token"),
        ({"tokenizer.ggml.eos_token_id": 7}, "eos_token_id = 7"),
        ({"tokenizer.ggml.add_eos_token": True}, "no EOS"),
        ({"tokenizer.ggml.tokens": []}, "no tokenizer.ggml.tokens"),
    ],
)
def test_refuses_bad_metadata(change: dict[str, Any], message: str) -> None:
    meta = _tiny("qwen2", ["a", "b", "ab"], ["a b"])
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_gguf({k: v for k, v in {**meta, **change}.items() if v is not None})


# --- SentencePiece (tokenizer.ggml.model = llama) --------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model() -> Any:
    """A SentencePiece BPE vocabulary trained here on standard-library source, set up as Llama's is."""
    import email.message
    import http.client

    text = inspect.getsource(http.client) + inspect.getsource(email.message) + inspect.getsource(textwrap)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=model,
        vocab_size=1200,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        control_symbols=["<|im_end|>"],
        user_defined_symbols=["<tool>"],
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.fixture(scope="module")
def sp_gguf(sp_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vocabulary written into a GGUF the way llama.cpp's converter does (pieces, scores, types)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(sp_model.serialized_model_proto())
    path = tmp_path_factory.mktemp("spm") / "vocab.gguf"
    _write_gguf(
        path,
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
            "tokenizer.ggml.scores": [p.score for p in proto.pieces],
            "tokenizer.ggml.token_type": [p.type for p in proto.pieces],  # numbered as llama.cpp's types
            "tokenizer.ggml.bos_token_id": sp_model.bos_id(),
            "tokenizer.ggml.eos_token_id": sp_model.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp_model.unk_id(),
            "tokenizer.ggml.add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False,
        },
    )
    return path


@pytest.fixture(scope="module")
def sp_tok(sp_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(sp_gguf).metadata)


def test_sentencepiece_matches_sentencepiece(sp_tok: Tokenizer, sp_model: Any) -> None:
    # Plain text (sentencepiece reads special-token text as ordinary characters, so none here).
    for text in [*TEXTS.values(), *_random_texts(300, seed=3)]:
        text = text.replace("<", "(")  # keep "<tool>" and friends out
        assert sp_tok.encode(text, add_special=False) == sp_model.encode(text), text
        assert sp_tok.encode(text) == [sp_model.bos_id(), *sp_model.encode(text)]
        assert sp_tok.decode(sp_tok.encode(text), skip_special=True) == text
        assert sp_tok.decode(sp_tok.encode(text, add_special=False)) == text
    # Not in the vocabulary: the dummy prefix, then the character's four UTF-8 bytes as byte tokens.
    fallback = [sp_model.piece_to_id("▁")] + [sp_model.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    assert sp_tok.encode("😀", add_special=False) == sp_model.encode("😀") == fallback


def test_sentencepiece_matches_hf(sp_tok: Tokenizer, sp_gguf: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(str(sp_gguf.parent), gguf_file=sp_gguf.name)
    # HF's Metaspace adds the dummy prefix only at the very start of the input and not before a space,
    # so compare text that starts with neither whitespace nor a special token; see the next test.
    texts = [t.replace("<", "(").lstrip() for t in (*TEXTS.values(), *_random_texts(300, seed=4))]
    for text in [*texts, "Hello</s>", "a <tool>", "x<|im_end|>"]:
        assert sp_tok.encode(text) == hf.encode(text), text
        assert sp_tok.encode(text, add_special=False) == hf.encode(text, add_special_tokens=False), text
    ids = sp_tok.encode(TEXTS["non_ascii"] + "</s>")
    for skip in (False, True):
        assert sp_tok.decode(ids, skip_special=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_sentencepiece_dummy_prefix_follows_llama_cpp(sp_tok: Tokenizer, sp_model: Any) -> None:
    # llama.cpp (and sentencepiece) put the dummy space in front of the text even when it starts with a
    # space; HF does not. llama.cpp also puts one in front of the text after every special token, as if
    # each stretch were encoded on its own (the way Llama's chat prompts were built); HF does not.
    assert "".join(_pieces(sp_tok, sp_tok.encode(" x", add_special=False))) == "  x"
    assert sp_tok.encode(" x", add_special=False) == sp_model.encode(" x")
    ids = sp_tok.encode("a</s>b<tool>c", add_special=False)
    assert "".join(_pieces(sp_tok, ids)) == " a</s> b<tool> c"
    assert ids[1] == sp_tok.eos_id and ids.count(sp_model.piece_to_id("<tool>")) == 1
    # So text after a special token decodes with that space, as llama.cpp's detokenizer shows it.
    assert sp_tok.decode(ids) == "a</s> b<tool> c"
    assert sp_tok.decode(ids, skip_special=True) == "a b<tool> c"  # <tool> is user-defined, not control


def test_sentencepiece_stream(sp_tok: Tokenizer) -> None:
    ids = sp_tok.encode("Ωμέγα 東京 😀 ok")
    stream = StreamDecoder(sp_tok, skip_special=True)
    chunks = [stream.push([i]) for i in ids]
    assert "" in chunks and all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + stream.finish() == sp_tok.decode(ids, skip_special=True) == "Ωμέγα 東京 😀 ok"


def test_sentencepiece_defaults(sp_gguf: Path) -> None:
    meta = read_gguf(sp_gguf).metadata
    bare = {k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.add_") and "token_id" not in k}
    tok = Tokenizer.from_gguf(bare)  # llama.cpp's SentencePiece defaults: BOS 1, EOS 2, add BOS
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, True, False)
    assert tok.encode("x")[0] == 1
    no_prefix = Tokenizer.from_gguf({**meta, "tokenizer.ggml.add_space_prefix": False})
    assert not _pieces(no_prefix, no_prefix.encode("x y", add_special=False))[0].startswith(" ")
    assert no_prefix.decode(no_prefix.encode(" x y"), skip_special=True) == " x y"
    assert tok.fingerprint == Tokenizer.from_gguf(meta).fingerprint
