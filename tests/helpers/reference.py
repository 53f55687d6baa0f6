"""Reference greedy decoding with Hugging Face transformers (the correctness oracle)."""

from __future__ import annotations

import torch


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
