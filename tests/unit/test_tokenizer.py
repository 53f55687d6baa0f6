"""Tokenizer and chat template: ours against transformers on the same files.

- SmolLM2 GGUF: our tokenizer rebuilt from metadata vs transformers' GGUF tokenizer
  (slow: ~5 s to build). Texts without digits only: transformers ignores the
  `smollm` pre-tokenizer (see engine/loader/gguf_tokenizer.py); digits are tested
  on ours alone.
- tiny HF directory: ours (tokenizer.json as is) vs `AutoTokenizer`.
(The sentencepiece GGUF tokenizer is tested in test_loader_gguf.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import processors

from common.errors import InvalidRequestError
from engine.loader import default_model_path, load_model_source
from engine.tokenizer import Tokenizer
from tests.helpers.tiny_models import make_tiny_hf_model

TEXTS = [
    "Hello world",
    "",
    " ",
    "  leading spaces, inner   runs\t\ttabs\n\n\nnewlines \r\n crlf  ",
    "héllo naïve café Ångström — “quotes” 你好，世界！ 日本語 한국어 Россия مرحبا",
    "emoji 😀👍🏽🇺🇸❤️ and zero\u200bwidth and nbsp\u00a0here",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "<|endoftext|>x<file_sep>y <repo_name>",
    "def foo(x):\n    return x ** two  # comment",
]
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "  spaces  and\nnewlines "},
    ],
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_model_source(None).tokenizer


@pytest.fixture(scope="module")
def smol_reference() -> Any:
    from transformers import AutoTokenizer

    path = Path(default_model_path())
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tok"), "llama", num_hidden_layers=1)


def _reference(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


# -- SmolLM2 GGUF vs transformers ------------------------------------------------------


@pytest.mark.slow
def test_smollm2_ids_and_text_match_transformers(smol: Tokenizer, smol_reference: Any) -> None:
    for text in TEXTS:
        ids = smol.encode(text)
        assert ids == smol_reference.encode(text), text
        for skip in (True, False):
            assert smol.decode(ids, skip_special_tokens=skip) == smol_reference.decode(ids, skip_special_tokens=skip)
    assert smol.bos_token_id == smol_reference.bos_token_id and smol.eos_token_id == smol_reference.eos_token_id
    assert smol.add_bos_token is False and smol.vocab_size == len(smol_reference) == 49152
    # the documented difference (gguf_tokenizer.py): transformers ignores `smollm` digit splitting
    assert smol.encode("  1") == [256, 33] and smol_reference.encode("  1") == [216, 216, 33]


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(smol: Tokenizer, smol_reference: Any) -> None:
    for messages in CONVERSATIONS:
        for generation in (True, False):
            text = smol.apply_chat_template(messages, add_generation_prompt=generation)
            expected = smol_reference.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
            assert text == expected
            ids = smol_reference.apply_chat_template(messages, add_generation_prompt=generation, return_dict=False)
            assert smol.encode_chat(messages, add_generation_prompt=generation) == list(ids)


def test_smollm2_splits_every_digit(smol: Tokenizer) -> None:
    pieces = [piece for piece, _ in smol.backend.pre_tokenizer.pre_tokenize_str("in 2024, ²³")]
    assert pieces == ["in", "Ġ", "2", "0", "2", "4", ",", "Ġ", "Â²", "Â³"]
    assert [smol.id_to_token(i) for i in smol.encode("12345")] == list("12345")
    # where digit splitting changes ids: a whitespace run before a digit stays one token
    assert [smol.id_to_token(i) for i in smol.encode("  1")] == ["ĠĠ", "1"]


def test_smollm2_special_tokens(smol: Tokenizer) -> None:
    assert (smol.bos_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (smol.bos_token_id, smol.eos_token_id, smol.eos_token_ids) == (1, 2, (2,))
    assert smol.all_special_ids == frozenset(range(17))  # the 17 control tokens of the file
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and smol.encode("hi") == smol.encode("hi", add_special_tokens=False)
    assert smol.decode(ids) == "user\nhi" and smol.decode(ids, skip_special_tokens=False).startswith("<|im_start|>")


def test_smollm2_encode_chat_is_render_then_encode_without_specials(smol: Tokenizer) -> None:
    messages = CONVERSATIONS[1]
    text = smol.apply_chat_template(messages)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n") and text.endswith(
        "<|im_start|>assistant\n"
    )
    ids = smol.encode_chat(messages)
    assert ids == smol.encode(text, add_special_tokens=False) and ids.count(1) == 5
    assert not smol.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")


# SmolLM2's vocabulary lacks six control bytes and the lead bytes of U+40000..U+BFFFF
# (0xF1, 0xF2): text with those cannot round-trip through any tokenizer of this model.
_REPRESENTABLE = st.characters(
    max_codepoint=0x3FFFF, exclude_categories=["Cs"], exclude_characters="\x04\x06\x13\x14\x16\x1d"
)


@settings(deadline=None, max_examples=60)
@given(text=st.text(_REPRESENTABLE, max_size=60))
def test_byte_level_round_trip(smol: Tokenizer, text: str) -> None:
    assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


def test_decode_and_encode_edges(smol: Tokenizer) -> None:
    assert smol.decode([]) == "" and smol.decode([60000]) == ""  # past the vocabulary: nothing
    with pytest.raises(InvalidRequestError):
        smol.decode([-1])
    with pytest.raises(InvalidRequestError):
        smol.encode(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="surrogate"):
        smol.encode("ok \ud800 not")  # json.loads accepts lone surrogates; tokenizers does not
    with pytest.raises(InvalidRequestError, match="surrogate"):
        smol.encode_chat([{"role": "user", "content": "\udfff"}])


# -- tiny HF directory vs transformers --------------------------------------------------


def test_hf_dir_tokenizer_matches_transformers(tiny_dir: Path) -> None:
    ours = load_model_source(str(tiny_dir)).tokenizer
    reference = _reference(tiny_dir)
    for text in [*TEXTS, "Numbers 12345 and 3.14159 and 1,000,000", "  1²484b9-22 ٣٤"]:
        assert ours.encode(text) == reference.encode(text), text
    for messages in CONVERSATIONS:
        for generation in (True, False):
            expected = reference.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=generation) == expected
            ids = reference.apply_chat_template(messages, add_generation_prompt=generation, return_dict=False)
            assert ours.encode_chat(messages, add_generation_prompt=generation) == list(ids)


def test_bos_from_post_processor_and_template_file(tiny_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "bos"
    shutil.copytree(tiny_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, bos_token="<|endoftext|>")  # ignored: tokenizer.json decides, as in v5
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", 0)]
    )
    backend.save(str(directory / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (directory / "chat_template.jinja").write_text(template)
    ours = load_model_source(str(directory)).tokenizer
    reference = _reference(directory)
    assert ours.add_bos_token and ours.encode("hi") == reference.encode("hi") == [0, *ours.encode("hi", False)]
    messages = CONVERSATIONS[0]
    assert ours.apply_chat_template(messages) == "<|endoftext|>[user] What is the capital of France?\n"
    assert ours.apply_chat_template(messages) == reference.apply_chat_template(messages, tokenize=False)
    assert ours.encode_chat(messages).count(0) == 1  # BOS written by the template only
    assert ours.encode_chat(messages) == list(reference.apply_chat_template(messages, return_dict=False))


FEATURE_TEMPLATE = """{%- set ns = namespace(count=0) -%}
{%- for m in messages -%}
{%- if m['role'] == 'skip' %}{% continue %}{% endif -%}
{%- set ns.count = ns.count + 1 -%}
{% generation %}{{ m | tojson }}{% endgeneration %} #{{ ns.count }} {{ m.get('name', 'anon') }}
{% endfor -%}
    {% if messages | length > 2 %}
  three or more
    {% endif %}
{{ strftime_now('%Y') }}{{ dict(a=1) | tojson }}{% if add_generation_prompt %}<go>{% endif %}"""


def test_template_features_match_transformers(tiny_dir: Path) -> None:
    ours = load_model_source(str(tiny_dir)).tokenizer
    reference = _reference(tiny_dir)
    messages = [
        {"role": "user", "content": '<b>&"quoted" 😀</b>', "name": "ann"},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "ok"},
    ]
    ours.chat_template = FEATURE_TEMPLATE
    rendered = ours.apply_chat_template(messages)
    assert '"<b>&\\"quoted\\" 😀</b>"' in rendered and rendered.endswith('{"a": 1}<go>')
    assert "\n  three or more\n2" in rendered  # trim_blocks and lstrip_blocks at work
    expected = reference.apply_chat_template(
        messages, chat_template=FEATURE_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert rendered == expected


def test_template_errors_are_invalid_requests(tiny_dir: Path) -> None:
    ours = load_model_source(str(tiny_dir)).tokenizer
    ours.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first must be system') }}{% endif %}"
    )
    with pytest.raises(InvalidRequestError, match="first must be system"):
        ours.apply_chat_template(CONVERSATIONS[0])
    ours.chat_template = "{% for m in messages %}"
    with pytest.raises(InvalidRequestError, match="does not compile"):
        ours.apply_chat_template(CONVERSATIONS[0])
    ours.chat_template = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template(CONVERSATIONS[0])  # the sandbox refuses, the request is rejected
    ours.chat_template = "{{ messages[0]['content'] + 1 }}"
    with pytest.raises(InvalidRequestError, match="failed"):
        ours.apply_chat_template(CONVERSATIONS[0])  # a template bug: a typed error, no stack trace


def test_no_chat_template(tmp_path: Path) -> None:
    ours = load_model_source(
        str(make_tiny_hf_model(tmp_path, "qwen2", num_hidden_layers=1, chat_template=None))
    ).tokenizer
    assert ours.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        ours.encode_chat(CONVERSATIONS[0])


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        ["hello"],
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": "user", "content": 3}],
        [{"role": None, "content": "hi"}],
        [{"role": "user", "content": ["part"]}],
        [{"role": "user", "content": "hi", "extra": {"nested": 1}}],
    ],
)
def test_bad_messages_are_invalid_requests(smol: Tokenizer, messages: Any) -> None:
    with pytest.raises(InvalidRequestError, match="message"):
        smol.apply_chat_template(messages)
