"""Building a `Tokenizer` from GGUF metadata, without transformers.

A GGUF file carries no tokenizer.json: llama.cpp stores the vocabulary
(`tokenizer.ggml.tokens`, `.token_type`, `.scores`), the BPE merges
(`.merges`), the special token ids and a pre-tokenizer *name* (`.pre`). We
rebuild an equivalent `tokenizers.Tokenizer` from those.

Supported `tokenizer.ggml.model` values:

- `gpt2`: byte-level BPE (SmolLM2, Llama 3, Qwen2, ...). Tokens are already
  spelled in GPT-2's byte-to-unicode alphabet (any normal token that is not gets
  re-spelled). Control tokens (type 3) become special added tokens, user-defined
  ones (type 4) plain added tokens, both matched whole in the text.
- `llama`: sentencepiece-style BPE (TinyLlama, Mistral v0.1, ...): `▁` for
  spaces (Metaspace, prepended to the first word when `add_space_prefix`),
  byte fallback (`<0x0A>`), merges from the file or, when absent, derived from
  the token scores (higher score merges first).

The pre-tokenizer (how text is cut before BPE) follows `tokenizer.ggml.pre`:

| pre | split |
|---|---|
| `smollm` | every digit alone (`Digits(individual_digits=True)`), then GPT-2's regex |
| `llama3`, `llama-bpe`, ... | Llama 3 regex (digits in runs of up to 3), `ignore_merges` |
| `qwen2`, ... | Qwen2 regex (every digit alone), NFC normalizer |
| anything else | GPT-2's regex (`ByteLevel(add_prefix_space=False)`) |

NOTE: `smollm` is rebuilt like the *real* SmolLM2 tokenizer.json
(`Sequence[Digits(individual_digits=True), ByteLevel]`) and like llama.cpp.
transformers' GGUF loader has no entry for `smollm` and falls back to plain
ByteLevel, which keeps " 2024" as one pre-token. SmolLM2's vocabulary has no
merges between digits, so plain ASCII numbers still come out the same; the two
differ where a digit cuts a pre-token short: a whitespace run before a digit
("  1": ours "ĠĠ","1"; transformers "Ġ","Ġ","1") and a space before a non-ASCII
numeral (" ²"). On text without digits they agree exactly (tested).
Likewise we add Qwen2's NFC normalizer and Llama 3's `ignore_merges`, which the
real tokenizer.json files have and transformers' GGUF path omits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from common.errors import ModelLoadError, UnsupportedModelError
from engine.tokenizer import Tokenizer

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"})
_QWEN2_PRES = frozenset({"qwen2", "deepseek-r1-qwen", "megrez"})


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _meta(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return meta.get(f"tokenizer.ggml.{key}", default)


def build_gguf_tokenizer(meta: Mapping[str, Any], source: str) -> Tokenizer:
    """The tokenizer described by GGUF metadata `meta` (key -> python value) of file `source`."""
    model = _meta(meta, "model")
    tokens = _meta(meta, "tokens")
    if model is None or tokens is None:
        raise ModelLoadError(f"{source} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    tokens = [str(t) for t in tokens]
    types = list(_meta(meta, "token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ModelLoadError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    if model == "gpt2":
        backend = _byte_level_backend(meta, tokens, types)
    elif model == "llama":
        backend = _sentencepiece_backend(meta, tokens, types, source)
    else:
        raise UnsupportedModelError(
            f"{source} uses tokenizer model {model!r}; supported GGUF tokenizer models: "
            f"{', '.join(SUPPORTED_TOKENIZER_MODELS)}"
        )
    _add_special_tokens(backend, tokens, types)

    def token_at(key: str) -> str | None:
        index = _meta(meta, key)
        if index is None:
            return None
        if not 0 <= int(index) < len(tokens):
            raise ModelLoadError(f"{source}: tokenizer.ggml.{key} = {index} is outside the vocabulary ({len(tokens)})")
        return tokens[int(index)]

    extra_eos = [int(_meta(meta, key)) for key in ("eot_token_id", "eom_token_id") if _meta(meta, key) is not None]
    add_bos = _meta(meta, "add_bos_token")
    if add_bos is None and model == "llama":
        add_bos = True  # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise
    add_eos = _meta(meta, "add_eos_token")
    return Tokenizer(
        backend,
        bos_token=token_at("bos_token_id"),
        eos_token=token_at("eos_token_id"),
        unk_token=token_at("unknown_token_id"),
        pad_token=token_at("padding_token_id"),
        extra_eos_token_ids=extra_eos,
        add_bos_token=bool(add_bos) if add_bos is not None else None,
        add_eos_token=bool(add_eos) if add_eos is not None else None,
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _merges(meta: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    merges = _meta(meta, "merges")
    if merges is None:
        return None
    pairs = []
    for merge in merges:
        left, sep, right = str(merge).partition(" ")
        if not sep:
            raise ModelLoadError(f"malformed BPE merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    return pairs


def _byte_level_backend(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]) -> BackendTokenizer:
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type == TOKEN_NORMAL and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    pre = _meta(meta, "pre", "default")
    backend = BackendTokenizer(
        BPE(
            vocab=vocab,
            merges=_merges(meta) or [],
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=pre in _LLAMA3_PRES,
        )
    )
    prefix = bool(_meta(meta, "add_space_prefix", False))
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=prefix, trim_offsets=True, use_regex=True),
            ]
        )
    elif pre in _LLAMA3_PRES or pre in _QWEN2_PRES:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRES else _QWEN2_SPLIT
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False),
            ]
        )
        if pre in _QWEN2_PRES:
            backend.normalizer = normalizers.NFC()
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    backend.decoder = decoders.ByteLevel()
    return backend


def derive_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two
    vocabulary pieces, best-scored merged token first (longer left piece first on ties)."""
    ids = {token: index for index, token in enumerate(tokens)}
    candidates: list[tuple[float, int, int, str, str]] = []
    for token, score in zip(tokens, scores):
        splits = [
            (token[:cut], token[cut:]) for cut in range(1, len(token)) if token[:cut] in ids and token[cut:] in ids
        ]
        splits.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        candidates.extend((float(score), len(left), len(right), left, right) for left, right in splits)
    candidates.sort(key=lambda c: (-c[0], -c[1], -c[2]))  # stable: ties keep vocabulary order
    return [(left, right) for _, _, _, left, right in candidates]


def _sentencepiece_backend(
    meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int], source: str
) -> BackendTokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _merges(meta)
    if merges is None:
        scores = _meta(meta, "scores")
        if scores is None or len(scores) != len(tokens):
            raise ModelLoadError(f"{source}: sentencepiece tokenizer without merges needs tokenizer.ggml.scores")
        merges = derive_merges(tokens, scores)
    unk_id = _meta(meta, "unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    backend = BackendTokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    prefix = bool(_meta(meta, "add_space_prefix", True))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_special_tokens(backend: BackendTokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens.

    Both are then matched whole in the input text instead of being cut by BPE;
    their ids are the vocabulary ids (the content is already in the vocabulary).
    """
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
    if user:
        backend.add_tokens(user)
