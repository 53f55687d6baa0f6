"""IncrementalDetokenizer against real byte-level tokenizers built on the fly.

Invariant: the concatenation of push() deltas plus flush() equals
tokenizer.decode(all ids); for valid UTF-8 no delta ever holds U+FFFD, i.e.
no character is split across deltas; the decode window stays bounded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.detokenizer import Decoder, IncrementalDetokenizer

END = "<|end|>"
SENTENCES = [
    "café crème brûlée, naïve façade élève",
    "日本語のテキスト 日本 東京 大阪",
    "emoji 🙂🙂 🚀 party 🎉 👩‍💻",
    "hello world, the quick brown fox",
    "Ελληνικά и русский текст",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable stand-in table (the ByteLevel alphabet): printable bytes map to
    themselves, the others to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _byte_tokenizer() -> Tokenizer:
    """One token per byte (id == byte value, no merges), plus one special token (id 256)."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([END])
    return tok


def _bpe_tokenizer() -> Tokenizer:
    """A tiny trained byte-level BPE: merges can end mid-character."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[END],
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 5, trainer)
    return tok


def _metaspace_tokenizer() -> Tokenizer:
    """SentencePiece-like: the leading space of the first decoded token is dropped."""
    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "!": 3, "▁": 4, "ing": 5, "▁日本": 6}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


BYTE_TOK = _byte_tokenizer()
BPE_TOK = _bpe_tokenizer()
META_TOK = _metaspace_tokenizer()


def _stream(tok: Decoder, ids: Sequence[int], prompt: Sequence[int] = (), skip: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.push(t) for t in ids]
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


def test_byte_tokenizer_is_one_token_per_byte() -> None:
    text = "é日🙂"
    assert BYTE_TOK.encode(text).ids == list(text.encode())
    assert BYTE_TOK.token_to_id(END) == 256
    assert BYTE_TOK.decode([0xE6]) == "\ufffd"  # an incomplete character decodes to U+FFFD


@pytest.mark.parametrize("tok", [BYTE_TOK, BPE_TOK], ids=["bytes", "bpe"])
@settings(deadline=None, max_examples=150)
@given(text=st.text(max_size=40).filter(lambda t: "\ufffd" not in t))
def test_valid_text_never_split(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text).ids
    deltas, tail = _stream(tok, ids)
    assert tok.decode(ids) == text
    assert "".join(deltas) == text
    assert tail == ""
    assert all("\ufffd" not in d for d in deltas)


def test_literal_replacement_character_is_emitted() -> None:
    ids = BYTE_TOK.encode("a\ufffdb\ufffd").ids
    deltas, tail = _stream(BYTE_TOK, ids)
    assert "".join(deltas) + tail == "a\ufffdb\ufffd"  # the last one waits for flush (it may be a torn char)


def test_multibyte_characters_span_tokens_and_come_out_whole() -> None:
    text = "".join(SENTENCES)
    ids = BYTE_TOK.encode(text).ids
    deltas, tail = _stream(BYTE_TOK, ids)
    assert "".join(deltas) == text and tail == ""
    assert deltas.count("") > 0  # held-back bytes of multi-byte characters
    assert "🙂" in deltas and "日" in deltas


@pytest.mark.parametrize("tok", [BYTE_TOK, BPE_TOK], ids=["bytes", "bpe"])
@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_match_full_decode(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(1234)
    vocab = tok.get_vocab_size()
    utf8_heavy = [i for i in range(vocab) if any(b >= 0x80 for b in tok.decode([i]).encode("utf-8", "replace"))]
    for _ in range(300):
        n = rng.randint(0, 40)
        ids = [rng.choice(utf8_heavy) if rng.random() < 0.6 else rng.randrange(vocab) for _ in range(n)]
        deltas, tail = _stream(tok, ids, skip=skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip), ids


def test_random_valid_utf8_byte_streams_long() -> None:
    rng = random.Random(7)
    chars = "aé日🙂 ß€\n"
    text = "".join(rng.choice(chars) for _ in range(2000))
    ids = BYTE_TOK.encode(text).ids
    deltas, tail = _stream(BYTE_TOK, ids)
    assert "".join(deltas) == text and tail == ""
    assert all("\ufffd" not in d for d in deltas)


def test_invalid_bytes_come_out_as_replacement_and_flush_releases_held_tail() -> None:
    ids = [ord("a"), 0x80, 0x80, ord("b"), 0xE6, 0x97]  # two stray continuation bytes, then a truncated 日
    deltas, tail = _stream(BYTE_TOK, ids)
    assert "".join(deltas) == "a\ufffd\ufffdb"
    assert tail == "\ufffd"
    assert "".join(deltas) + tail == BYTE_TOK.decode(ids)


def test_special_tokens_skipped_or_kept() -> None:
    end = BYTE_TOK.token_to_id(END)
    ids = [*b"hi", end, *b"!"]
    assert "".join(_stream(BYTE_TOK, ids, skip=True)[0]) == "hi!"
    assert "".join(_stream(BYTE_TOK, ids, skip=False)[0]) == "hi<|end|>!"
    many = [*"é".encode()[:1], *([end] * 30), *"é".encode()[1:], *b"x"]  # specials inside a character
    assert "".join(_stream(BYTE_TOK, many, skip=True)[0]) == "éx"


def test_prompt_gives_context_for_leading_space() -> None:
    detok = IncrementalDetokenizer(META_TOK, prompt_token_ids=[1])  # "▁hello"
    assert detok.push(2) == " world"
    assert detok.push(3) == "!"
    assert detok.text == " world!"
    fresh = IncrementalDetokenizer(META_TOK)
    assert fresh.push(2) == "world"  # no context: a decode drops the first leading space, like decode([2])


@pytest.mark.parametrize("prompt_len", [0, 3, 30])
def test_metaspace_long_stream_matches_decode(prompt_len: int) -> None:
    rng = random.Random(prompt_len)
    prompt = [rng.randrange(1, 7) for _ in range(prompt_len)]
    ids = [rng.randrange(1, 7) for _ in range(500)]
    deltas, tail = _stream(META_TOK, ids, prompt=prompt)
    full, head = META_TOK.decode(prompt + ids), META_TOK.decode(prompt)
    expected = full[len(head) :] if prompt else full
    assert "".join(deltas) + tail == expected


class _CountingTokenizer:
    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.longest = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)


def test_cost_per_token_is_bounded() -> None:
    counting = _CountingTokenizer(BYTE_TOK)
    text = "日本 café 🙂 " * 400
    ids = BYTE_TOK.encode(text).ids
    prompt = BYTE_TOK.encode("a long prompt " * 100).ids
    deltas, tail = _stream(counting, ids, prompt=prompt)
    assert "".join(deltas) + tail == text
    assert len(ids) > 4000
    assert counting.longest <= 32  # a window, not the whole output
