"""Reference greedy decoding with Hugging Face transformers (the correctness oracle)."""

from __future__ import annotations

import os

import torch


def smollm2_reference():
    """transformers' SmolLM2 from the shipped GGUF, fp32 (an exact token oracle needs fp32 on both sides)."""
    from transformers import AutoModelForCausalLM

    from engine.loader import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """A plain greedy loop with a KV cache: no min_new_tokens masking, no EOS stop (PLATFORM.md)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
            out.append(int(logits.argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def engine_greedy(
    model_dir, prompts: list[list[int]], max_tokens: int, num_blocks: int = 128
) -> dict[tuple, list[int]]:
    """Greedy tokens of one aggregated TP1 float32 engine (no speculation), per prompt, one request at a time."""
    from common.sampling_params import SamplingParams
    from engine.config import CacheConfig, EngineConfig
    from engine.engine_core import EngineCore

    core = EngineCore(EngineConfig(model=str(model_dir), dtype="float32", cache=CacheConfig(num_blocks=num_blocks)))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = {}
    for ids in prompts:
        rid = core.add_request(ids, params)
        toks: list[int] = []
        while core.has_unfinished_requests():
            toks += [t for o in core.step() if o.request_id == rid for t in o.new_token_ids]
        out[tuple(ids)] = toks
    core.leak_check()
    return out
