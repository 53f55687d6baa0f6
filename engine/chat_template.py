"""Rendering a model's Jinja chat template, the way Hugging Face transformers does.

A chat template turns `[{"role": ..., "content": ...}, ...]` into the prompt text
the model was trained on. Templates come with the model (tokenizer_config.json,
chat_template.jinja, or GGUF metadata `tokenizer.chat_template`) and are
untrusted code, so they run in Jinja's `ImmutableSandboxedEnvironment`.

To produce byte-identical prompts to `transformers`' `apply_chat_template`, the
environment is set up like transformers' own:

- `trim_blocks=True, lstrip_blocks=True`, the `loopcontrols` extension, and a
  `{% generation %}` block tag that renders its body unchanged;
- globals `raise_exception(msg)`, `strftime_now(fmt)`, `dict`, `namespace`;
- a `tojson` filter that does not HTML-escape (`ensure_ascii=False`);
- variables `messages`, `add_generation_prompt`, `tools=None`, `documents=None`
  and the special token strings (`bos_token`, `eos_token`, `unk_token`,
  `pad_token`) where the model has them.

Bad messages and `raise_exception` calls in the template (e.g. "roles must
alternate") raise `InvalidRequestError`: the request, not the engine, is at fault.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common.errors import InvalidRequestError

_PLAIN_SCALARS = (str, int, float, bool, type(None))


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body as is.

    transformers uses this tag to find assistant tokens for training masks; for
    serving only the text matters.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names (no reaching into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile `source` once (cached). A syntax error raises `InvalidRequestError`."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise InvalidRequestError(f"the model's chat template does not compile (line {exc.lineno}): {exc}") from exc


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and return plain copies the sandbox can safely see.

    Each message must be a dict with string `role` and `content`; other keys
    (e.g. `name`) may hold strings, numbers, booleans or None.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise InvalidRequestError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidRequestError("messages must contain at least one message")
    plain: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"message {index} must be a dict with role and content, got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                found = "missing" if key not in message else type(message[key]).__name__
                raise InvalidRequestError(f"message {index} needs a string {key!r}; found {found}")
        copy: dict[str, Any] = {}
        for key, value in message.items():
            if not isinstance(key, str) or not isinstance(value, _PLAIN_SCALARS):
                raise InvalidRequestError(
                    f"message {index} field {key!r} must be a string, number, boolean or null, "
                    f"got {type(value).__name__}"
                )
            copy[str.__str__(key)] = str.__str__(value) if isinstance(value, str) else value
        plain.append(copy)
    return plain


def render_chat_template(
    source: str | None,
    messages: Any,
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
) -> str:
    """Render `messages` with the template `source`.

    `special_tokens` maps template variable names (`bos_token`, `eos_token`, ...)
    to token strings; None values are left undefined, as in transformers.
    """
    if not source:
        raise InvalidRequestError("this model has no chat template; send a plain text prompt instead of chat messages")
    plain = validate_messages(messages)
    template = compile_chat_template(source)
    variables: dict[str, Any] = {name: value for name, value in (special_tokens or {}).items() if value is not None}
    try:
        return template.render(
            messages=plain, tools=None, documents=None, add_generation_prompt=bool(add_generation_prompt), **variables
        )
    except jinja2.exceptions.TemplateError as exc:  # raise_exception(), sandbox refusals, undefined names
        raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}") from exc
    except Exception as exc:  # a template bug (e.g. 1 + 'a') must not surface as a stack trace
        raise InvalidRequestError(f"the model's chat template failed on these messages: {exc!r}") from exc
