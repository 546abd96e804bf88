"""The tokenizer a GGUF file describes, built on the `tokenizers` library.

A GGUF carries no `tokenizer.json`: it stores the vocabulary, merges or scores, token types and special ids
as metadata under llama.cpp's key names. We rebuild from them the tokenizer llama.cpp runs, so a prompt gets
the ids llama.cpp would give it:

- `tokenizer.ggml.model = gpt2`: byte-level BPE. Text is split by the regexes llama.cpp uses for the
  pre-tokenizer `tokenizer.ggml.pre` names (each regex splits the pieces the previous one left, keeping both
  the matches and the text between them), mapped to the GPT-2 byte alphabet, then merged.
- `tokenizer.ggml.model = llama`: SentencePiece BPE. Spaces become U+2581 and every stretch of text gets a
  dummy space in front (the start of the input, and, as in llama.cpp, the text after each special token);
  pieces merge best score first (scores become the equivalent ranked merges), and a character outside the
  vocabulary falls back to `<0xXX>` byte tokens.

Tokens typed CONTROL, USER_DEFINED or UNKNOWN are found whole in the text before anything else. Decoding
goes through a table of the bytes each id stands for, so a stream can hold back half a UTF-8 character.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

__all__ = ["PRE_TOKENIZERS", "StreamDecoder", "Tokenizer"]

log = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split regexes of llama.cpp's pre-tokenizers (src/llama-vocab.cpp). Where llama.cpp spells a
# case-insensitive group out as `'[sS]|'[tT]...` for std::regex, we keep the `(?i:...)` of the models'
# own tokenizer.json: Oniguruma reads it, and both match the same strings.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_STARCODER = (r"\p{N}", _GPT2)

# `tokenizer.ggml.pre` -> (split regexes, ignore_merges, add_bos when the file does not say).
# ignore_merges: a pre-token that is itself in the vocabulary is taken whole (llama.cpp, for llama3).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": (_DEFAULT, False, False),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo"), ((_GPT2,), False, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), (_STARCODER, False, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), ((_LLAMA3,), True, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ((_LLAMA3,), False, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), ((_QWEN2,), False, False)),
}

# Texts that end a turn in well-known chat formats (from llama.cpp's end-of-generation list).
_END_OF_TURN = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    spelling = {b: chr(b) for b in (*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100))}
    unprintable = [b for b in range(256) if b not in spelling]
    spelling.update({b: chr(256 + i) for i, b in enumerate(unprintable)})
    return spelling


_BYTE_TO_CHAR = _byte_alphabet()
_CHAR_TO_LATIN1 = str.maketrans({c: chr(b) for b, c in _BYTE_TO_CHAR.items()})
_NOT_BYTE_CHAR = re.compile("[^" + re.escape("".join(_BYTE_TO_CHAR.values())) + "]")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """Text <-> ids for one GGUF vocabulary, and its chat template. Build with `Tokenizer.from_gguf`."""

    model: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre, for byte-level BPE
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eos_ids: set[int]  # every id that ends generation: EOS, EOT/EOM, end-of-turn tokens
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    fingerprint: str  # sha256 of tokens, merges or scores, and special ids

    def __init__(self, backend: _Backend, pieces: list[bytes], skipped: frozenset[int], strip_space: bool):
        self._backend = backend
        self._pieces = pieces  # the bytes each id decodes to
        self._skipped = skipped  # ids that skip_special leaves out
        self._strip_space = strip_space  # SentencePiece: drop the dummy prefix when decoding
        self._template: Any = None
        self.vocab_size = len(pieces)

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (`read_gguf(path).metadata`); refuses what it cannot reproduce."""
        model = metadata.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r}; supported: 'gpt2', 'llama'")
        tokens = _str_list(metadata, "tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
        n = len(tokens)
        types = _number_list(metadata, "tokenizer.ggml.token_type", n, int) or [NORMAL] * n
        vocab = {token: i for i, token in enumerate(tokens)}
        if len(vocab) != n:
            duplicate = next(t for i, t in enumerate(tokens) if vocab[t] != i)
            raise ValueError(f"token {duplicate!r} appears twice in tokenizer.ggml.tokens")

        pre = None
        if model == "gpt2":
            pre = metadata.get("tokenizer.ggml.pre")
            if pre is None:
                log.warning("GGUF names no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer")
                pre = "default"
            if pre not in PRE_TOKENIZERS:
                raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: {sorted(PRE_TOKENIZERS)}")
            merges = _str_list(metadata, "tokenizer.ggml.merges")
            if merges is None:
                raise ValueError("byte-level BPE GGUF has no tokenizer.ggml.merges")
            regexes, ignore_merges, add_bos = PRE_TOKENIZERS[pre]
            backend, pieces = _byte_level(tokens, types, dict(vocab), merges, regexes, ignore_merges)
            add_eos, strip_space, ranking = False, False, merges
            bos_id = _special_id(metadata, "bos", n)
            eos_id = _special_id(metadata, "eos", n)
        else:
            scores = _number_list(metadata, "tokenizer.ggml.scores", n, float)
            if scores is None:
                raise ValueError("SentencePiece GGUF has no tokenizer.ggml.scores")
            add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            backend, pieces = _sentencepiece(tokens, types, vocab, scores, add_prefix)
            add_bos, add_eos, strip_space, ranking = True, False, add_prefix, scores
            bos_id = _special_id(metadata, "bos", n, default=1)  # llama.cpp's defaults for SentencePiece
            eos_id = _special_id(metadata, "eos", n, default=2)

        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", add_eos))
        if add_bos and bos_id is None:
            raise ValueError("tokenizer.ggml.add_bos_token is true but the GGUF names no BOS token")
        if add_eos and eos_id is None:
            raise ValueError("tokenizer.ggml.add_eos_token is true but the GGUF names no EOS token")

        # Generation must also stop where a turn ends, which chat formats mark with a token of their own.
        ends = {eos_id, _special_id(metadata, "eot", n), _special_id(metadata, "eom", n)}
        ends.update(vocab[t] for t in _END_OF_TURN if t in vocab and types[vocab[t]] in (CONTROL, USER_DEFINED))
        ends.discard(None)

        tok = cls(backend, pieces, frozenset(i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)), strip_space)
        tok.model, tok.pre = model, pre
        tok.bos_id, tok.eos_id, tok.eos_ids = bos_id, eos_id, ends
        tok.add_bos, tok.add_eos = add_bos, add_eos
        template = metadata.get("tokenizer.chat_template")
        tok.chat_template = template if isinstance(template, str) else None
        identity = [model, tokens, ranking, bos_id, sorted(ends)]
        tok.fingerprint = hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode()).hexdigest()
        return tok

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Ids for `text`; special-token text in it becomes that one token. `add_special`: BOS/EOS per the file."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos:
            ids.insert(0, self.bos_id)
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for `ids` (bytes that are not UTF-8 become U+FFFD); `skip_special` leaves control tokens out."""
        text = self._bytes(ids, skip_special).decode("utf-8", errors="replace")
        return text[1:] if self._strip_space and text.startswith(" ") else text

    def token_text(self, token_id: int) -> str:
        """One token's text, for display; part of a UTF-8 character shows as U+FFFD."""
        return self._bytes([token_id], False).decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `tokenizer.chat_template` in a sandbox with the variables HF's `apply_chat_template` sets."""
        import jinja2

        if self.chat_template is None:
            raise ValueError("this GGUF has no chat template (tokenizer.chat_template)")
        if self._template is None:
            try:
                self._template = _jinja_env().from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise ValueError(f"the GGUF's chat template does not compile: {e}") from e
        variables = {
            "bos_token": "" if self.bos_id is None else self.token_text(self.bos_id),
            "eos_token": "" if self.eos_id is None else self.token_text(self.eos_id),
            "tools": None,  # HF sets these to None; a template testing `is defined` sees the difference
            "documents": None,
            **kwargs,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused these messages: {e}") from e

    def _bytes(self, ids: Iterable[int], skip_special: bool) -> bytes:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})")
        if skip_special:
            return b"".join([self._pieces[i] for i in ids if i not in self._skipped])
        return b"".join([self._pieces[i] for i in ids])


class StreamDecoder:
    """Incremental decoding for streaming: `push` returns only whole characters, never half of one.

    All `push` results plus `finish()` concatenate to `tokenizer.decode(all_ids, skip_special)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True

    def push(self, ids: Iterable[int]) -> str:
        """The text these ids complete; the bytes of an unfinished character wait for the next call."""
        return self._emit(self._utf8.decode(self._tokenizer._bytes(ids, self._skip_special)))

    def finish(self) -> str:
        """Whatever is still held back; an unfinished character comes out as U+FFFD."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if self._at_start and text:
            self._at_start = False
            if self._tokenizer._strip_space and text.startswith(" "):
                text = text[1:]
        return text


def _byte_level(
    tokens: list[str],
    types: list[int],
    vocab: dict[str, int],
    merges: list[str],
    regexes: tuple[str, ...],
    ignore_merges: bool,
) -> tuple[_Backend, list[bytes]]:
    """Byte-level BPE: the backend that encodes, and the bytes each id decodes to."""
    whole = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)}
    pieces = [t.translate(_CHAR_TO_LATIN1).encode("latin-1", errors="replace") for t in tokens]
    for i in whole:
        pieces[i] = tokens[i].encode()  # matched as plain text, so it decodes as plain text
    if _NOT_BYTE_CHAR.search("".join(tokens)):
        for i, t in enumerate(tokens):
            if i not in whole and _NOT_BYTE_CHAR.search(t):
                # An ordinary token written in plain text: respell it in the byte alphabet BPE works in.
                del vocab[t]
                vocab.setdefault("".join(_BYTE_TO_CHAR[b] for b in t.encode()), i)
                pieces[i] = t.encode()
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise ValueError(f"malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((m[:cut], m[cut + 1 :]))
    try:
        model = BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False)
    except Exception as e:  # the Rust side reports a merge of unknown tokens as a bare Exception
        raise ValueError(f"tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}") from e
    backend = _Backend(model)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    _add_whole_tokens(backend, tokens, types)
    return backend, pieces


def _sentencepiece(
    tokens: list[str], types: list[int], vocab: dict[str, int], scores: list[float], add_prefix: bool
) -> tuple[_Backend, list[bytes]]:
    """SentencePiece BPE: merges ranked by the score of the piece they make, with byte fallback."""
    ranked = []
    for token, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(token)):
            if token[:cut] in vocab and token[cut:] in vocab:
                ranked.append((-score, -cut, token[:cut], token[cut:]))
    ranked.sort(key=lambda r: (r[0], r[1]))  # best score first; one piece made two ways: longer left first
    unk = next((t for t, ty in zip(tokens, types, strict=True) if ty == UNKNOWN), None)
    merges = [(left, right) for _, _, left, right in ranked]
    backend = _Backend(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # The normalizer sees each stretch of text between special tokens on its own, so each gets the dummy
    # prefix, even before a space, as in llama.cpp (HF's Metaspace adds it only at the very start).
    escape = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), escape]) if add_prefix else escape
    _add_whole_tokens(backend, tokens, types)

    pieces = []
    for token, ty in zip(tokens, types, strict=True):
        byte = _BYTE_TOKEN.fullmatch(token) if ty == BYTE else None
        if byte:
            pieces.append(bytes([int(byte.group(1), 16)]))
        elif ty == NORMAL:
            pieces.append(token.replace("▁", " ").encode())
        else:
            pieces.append(token.encode())
    return backend, pieces


def _add_whole_tokens(backend: _Backend, tokens: list[str], types: list[int]) -> None:
    """Control, unknown and user-defined tokens are found whole in the text before any splitting."""
    typed = list(zip(tokens, types, strict=True))
    special = [AddedToken(t, special=True, normalized=False) for t, ty in typed if ty in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _special_id(metadata: Mapping[str, Any], name: str, n: int, default: int | None = None) -> int | None:
    key = f"tokenizer.ggml.{name}_token_id"
    value = metadata.get(key)
    if value is None:
        return default if default is not None and default < n else None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < n:
        raise ValueError(f"{key} = {value!r} is not a token id of this vocabulary (size {n})")
    return int(value)


def _str_list(metadata: Mapping[str, Any], key: str) -> list[str] | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be an array of strings")
    return list(value)


def _number_list(metadata: Mapping[str, Any], key: str, n: int, kind: type) -> list[Any] | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != n:
        raise ValueError(f"{key} must be an array of {n} numbers, one per token")
    return [kind(v) for v in value]


def _jinja_env() -> Any:
    """The sandbox HF renders chat templates in: same options, filters and globals."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which no chat format wants.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
