"""Rotary position embedding (the "rotate half" form used by HF Llama/Mistral/Qwen2).

The cos/sin tables are computed once for every position up to the model's
context, in float32, then cast to the compute dtype; a step gathers the rows of
its positions once and every layer reuses them.
"""

from __future__ import annotations

import math

import torch

from engine.config import ModelConfig, RopeScaling


def _inv_freq(dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    # float32 throughout, as the HF reference computes it (bit-equal tables)
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    if scaling is None:
        return inv
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        inv = _inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        pos = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv)  # [P, D/2]
        self.cos = freqs.cos().to(dtype=dtype, device=device)
        self.sin = freqs.sin().to(dtype=dtype, device=device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for these positions, shaped [T, 1, D/2] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D] -> rotated copy (first half / second half pairing)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
