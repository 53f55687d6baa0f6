"""Opening a GGUF file and reading its metadata, without torch (gguf + numpy only).

Used by the weight loader (`gguf_file.py`) and by `load_tokenizer`, which the torch-free
benchmark client uses to make prompts of exact token lengths.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from common.errors import ModelLoadError


def open_gguf(path: str) -> Any:
    """A `GGUFReader`, with every tensor checked to lie inside the file.

    Parsing the metadata takes ~1.7 s for SmolLM2 (49k token strings), so the
    last two readers are cached by (path, size, mtime): loading the source and
    then streaming its weights parse the file once.
    """
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot open GGUF file {path}: {exc}") from exc
    return _open_cached(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> Any:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct/numpy errors, ... on bad bytes
        raise ModelLoadError(f"{path} is not a readable GGUF file: {type(exc).__name__}: {exc}") from exc
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise ModelLoadError(
                f"{path} is truncated: tensor {tensor.name} needs bytes up to {end}, the file has {size}"
            )
    return reader


def gguf_metadata(reader: Any) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as exc:
            raise ModelLoadError(f"{reader.data.filename}: metadata {key} is unreadable: {exc}") from exc
    return meta
