"""Loading the tokenizer of a Hugging Face model directory.

Files read (the first two required):

- `tokenizer.json`: the `tokenizers` pipeline, loaded as is;
- `tokenizer_config.json`: `bos_token` / `eos_token` / `unk_token` / `pad_token`
  (a string or a `{"content": ...}` dict) and `chat_template` (a string, or a
  list of `{"name", "template"}` of which `default` is used);
- `chat_template.jinja` (transformers v5) or `chat_template.json`, which win
  over the template in tokenizer_config.json, as in transformers.

Whether BOS is prepended comes from tokenizer.json's post-processor alone:
like transformers v5, `add_bos_token` / `add_eos_token` in tokenizer_config.json
are ignored when a tokenizer.json exists (real checkpoints such as Llama 2/3
encode their BOS in the post-processor).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

from common.errors import ModelLoadError
from engine.tokenizer import Tokenizer


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; `ModelLoadError` naming the file if missing or invalid."""
    if not path.is_file():
        raise ModelLoadError(f"{path.name} not found in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _token_string(value: Any, key: str, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ModelLoadError(f"{path}: {key} must be a string or {{'content': ...}}, found {value!r}")


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"cannot read {jinja_file}: {exc}") from exc
    json_file = directory / "chat_template.json"
    template: Any = read_json(json_file).get("chat_template") if json_file.is_file() else config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"the chat template in {directory} must be a string, found {type(template).__name__}")
    return template


def load_hf_tokenizer(directory: Path, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
    """The `Tokenizer` of an HF model directory; `ModelLoadError` naming any missing or bad file."""
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelLoadError(
            f"tokenizer.json not found in {directory} (slow sentencepiece/tiktoken tokenizers are not supported)"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # the Rust side raises a plain Exception on malformed files
        raise ModelLoadError(f"{tokenizer_file} cannot be loaded: {exc}") from exc
    config_file = directory / "tokenizer_config.json"
    config = read_json(config_file)

    def token(key: str) -> str | None:
        return _token_string(config.get(key), key, config_file)

    return Tokenizer(
        backend,
        bos_token=token("bos_token"),
        eos_token=token("eos_token"),
        unk_token=token("unk_token"),
        pad_token=token("pad_token"),
        extra_eos_token_ids=extra_eos_token_ids,
        chat_template=_chat_template(directory, config),
    )
