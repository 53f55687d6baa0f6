"""`Tokenizer`: one tokenizer interface for every model source.

It wraps a `tokenizers.Tokenizer` (the Rust "fast" tokenizer), built either from
a Hugging Face `tokenizer.json` or from GGUF metadata (see
`engine/loader/gguf_tokenizer.py`), and adds what serving needs: special token
ids, the end-of-sequence set, and chat template rendering.

Whether `encode(..., add_special_tokens=True)` prepends BOS follows transformers:
an explicit `add_bos_token` / `add_eos_token` (tokenizer_config.json, GGUF
`tokenizer.ggml.add_bos_token`) installs a `TemplateProcessing` post-processor;
otherwise the backend's own post-processor (from tokenizer.json) is kept. The
`add_bos_token` attribute reports what encoding actually does.

`encode_chat` renders the chat template and encodes the result *without* adding
special tokens again, because templates write BOS themselves
(like `transformers`' `apply_chat_template(tokenize=True)`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers
from tokenizers import processors

from common.errors import InvalidRequestError, ModelLoadError
from engine.chat_template import render_chat_template


class Tokenizer:
    """Text <-> token ids, special tokens and chat template of one model.

    Attributes:
        backend: the wrapped `tokenizers.Tokenizer` (thread-safe for encode/decode).
        bos_token_id, eos_token_id: ids of the BOS / EOS tokens, None if the model has none.
        eos_token_ids: every id that ends generation (EOS first, then extras such as
            ids from generation_config.json or GGUF `eot_token_id`), without duplicates.
        all_special_ids: ids of the special tokens (added tokens marked special,
            plus bos/eos/unk/pad).
        vocab_size: size of the whole vocabulary, added tokens included.
        add_bos_token: whether `encode(text)` starts with BOS.
        chat_template: Jinja source of the chat template, None if the model has none.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        self.bos_token_id = self._id_of(bos_token, "bos_token")
        self.eos_token_id = self._id_of(eos_token, "eos_token")
        # unk/pad are optional: a name the vocabulary lacks is dropped rather than added
        self.unk_token_id = backend.token_to_id(unk_token) if unk_token is not None else None
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token is not None else None
        self.unk_token = unk_token if self.unk_token_id is not None else None
        self.pad_token = pad_token if self.pad_token_id is not None else None
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        eos_ids = ([self.eos_token_id] if self.eos_token_id is not None else []) + [int(i) for i in extra_eos_token_ids]
        for token_id in eos_ids:
            if not 0 <= token_id < self.vocab_size:
                raise ModelLoadError(
                    f"end-of-sequence id {token_id} is outside the vocabulary (size {self.vocab_size})"
                )
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))
        if add_bos_token is not None or add_eos_token is not None:
            self._install_post_processor(bool(add_bos_token), bool(add_eos_token))
        probe = backend.encode("", add_special_tokens=True).ids
        self.add_bos_token: bool = bool(probe) and self.bos_token_id is not None and probe[0] == self.bos_token_id
        special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        named = (self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id)
        self.all_special_ids: frozenset[int] = frozenset(special | {i for i in named if i is not None})
        self.chat_template: str | None = chat_template or None

    def _id_of(self, token: str | None, role: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ModelLoadError(f"the tokenizer's {role} {token!r} is not in its vocabulary")
        return token_id

    def _install_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """Prepend BOS / append EOS on `add_special_tokens=True`, as transformers does."""
        if add_bos and self.bos_token_id is None:
            add_bos = False  # transformers silently turns add_bos_token off without a BOS token
        if add_eos and self.eos_token_id is None:
            add_eos = False
        single = " ".join(
            ([f"{self.bos_token}:0"] if add_bos else []) + ["$A:0"] + ([f"{self.eos_token}:0"] if add_eos else [])
        )
        pair = (
            single
            + " "
            + " ".join(
                ([f"{self.bos_token}:1"] if add_bos else []) + ["$B:1"] + ([f"{self.eos_token}:1"] if add_eos else [])
            )
        )
        special: list[tuple[str, int]] = []
        if add_bos:
            special.append((str(self.bos_token), int(self.bos_token_id)))  # type: ignore[arg-type]
        if add_eos and (not add_bos or self.eos_token != self.bos_token):
            special.append((str(self.eos_token), int(self.eos_token_id)))  # type: ignore[arg-type]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # -- text <-> ids -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is prepended when the model asks for it."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, got {type(text).__name__}")
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError as exc:  # the Rust side refuses strings that are not valid UTF-8
            raise InvalidRequestError(f"text is not valid Unicode (lone surrogate?): {exc}") from exc

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special_tokens=False`.

        Ids past the vocabulary (a model's padded embedding rows) decode to nothing,
        as in `tokenizers`; negative ids raise `InvalidRequestError`.
        """
        ids = [int(i) for i in ids]
        if any(token_id < 0 for token_id in ids):
            raise InvalidRequestError(f"token ids must be >= 0, got {min(ids)}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` (byte-level spelling), None if unknown."""
        return self.backend.id_to_token(int(token_id))

    # -- chat ---------------------------------------------------------------------------

    @property
    def template_special_tokens(self) -> dict[str, str | None]:
        """Special token strings the chat template can read (`bos_token`, ...)."""
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; `InvalidRequestError` if there is no template or a bad message."""
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.template_special_tokens,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Render `messages` and encode without adding special tokens (the template wrote them)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids}, "
            f"add_bos_token={self.add_bos_token}, chat_template={'yes' if self.chat_template else 'no'})"
        )
