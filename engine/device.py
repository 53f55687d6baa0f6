"""Device and dtype choice.

`dtype="auto"` is decided by measurement on CPU: CPUs differ wildly in how fast
they multiply bfloat16 (with AVX512-BF16 or AMX it is several times faster than
float32; without, it is slower). A ~50 ms micro-benchmark of the model's own MLP
shape picks whichever is faster, once per process. On CUDA, auto is bfloat16.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F

from common.errors import ConfigError

log = logging.getLogger(__name__)

_NAMED = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """The torch device of `device`; auto: cuda where this process sees a GPU, else cpu (a Ray actor given no
    GPU sees none)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {device!r}")
    return dev


def resolve_dtype(requested: str, device: torch.device, hidden: int, intermediate: int) -> torch.dtype:
    if requested != "auto":
        if requested not in _NAMED:
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {requested!r}")
        if device.type == "cpu" and requested == "float16":
            raise ConfigError("float16 is not supported on CPU (slow and lossy there); use float32 or bfloat16")
        return _NAMED[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _measure_cpu_dtype(hidden, intermediate)


def _cpu_has_bf16_dot() -> bool:
    """AVX512-BF16 or AMX-BF16 present (Linux /proc/cpuinfo; elsewhere assume yes and measure)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return True


def _time_once(x: torch.Tensor, w: torch.Tensor, reps: int = 4) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        F.linear(x, w)
    return time.perf_counter() - t


@functools.lru_cache(maxsize=8)
def _measure_cpu_dtype(hidden: int, intermediate: int) -> torch.dtype:
    """Interleaved rounds, best of each: robust to another process sharing the cores."""
    if not _cpu_has_bf16_dot():
        log.info("dtype=auto on CPU: no bf16 dot-product instructions -> float32")
        return torch.float32
    x32 = torch.randn(16, hidden)
    w32 = torch.randn(2 * intermediate, hidden)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    _time_once(x32, w32, 2)
    _time_once(x16, w16, 2)
    fp32 = bf16 = float("inf")
    for _ in range(12):
        fp32 = min(fp32, _time_once(x32, w32))
        bf16 = min(bf16, _time_once(x16, w16))
    choice = torch.bfloat16 if bf16 * 1.25 < fp32 else torch.float32
    log.info("dtype=auto on CPU: float32 %.0f us, bfloat16 %.0f us -> %s", fp32 * 1e6, bf16 * 1e6, choice)
    return choice
