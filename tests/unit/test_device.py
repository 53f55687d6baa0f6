"""Device and dtype choice: explicit dtypes are honoured, bad ones refused, auto decides by CPU flags + timing."""

from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from engine import device as dev


def test_explicit_dtypes_and_refusals():
    cpu = torch.device("cpu")
    assert dev.resolve_dtype("float32", cpu, 64, 128) is torch.float32
    assert dev.resolve_dtype("bfloat16", cpu, 64, 128) is torch.bfloat16
    with pytest.raises(ConfigError, match="float16 is not supported on CPU"):
        dev.resolve_dtype("float16", cpu, 64, 128)
    with pytest.raises(ConfigError, match="dtype must be"):
        dev.resolve_dtype("int8", cpu, 64, 128)


def test_cuda_refused_without_a_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="no CUDA device"):
        dev.resolve_device("cuda")
    with pytest.raises(ConfigError, match="cpu or cuda"):
        dev.resolve_device("meta")


def test_auto_device_is_what_the_process_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("cuda")


def test_auto_without_bf16_instructions_is_float32(monkeypatch):
    dev._measure_cpu_dtype.cache_clear()
    monkeypatch.setattr(dev, "_cpu_has_bf16_dot", lambda: False)
    assert dev.resolve_dtype("auto", torch.device("cpu"), 64, 128) is torch.float32
    dev._measure_cpu_dtype.cache_clear()


@pytest.mark.parametrize(("bf16_time", "expected"), [(0.1, torch.bfloat16), (0.9, torch.float32)])
def test_auto_picks_the_faster_dtype(monkeypatch, bf16_time, expected):
    dev._measure_cpu_dtype.cache_clear()
    monkeypatch.setattr(dev, "_cpu_has_bf16_dot", lambda: True)
    monkeypatch.setattr(dev, "_time_once", lambda x, w, reps=4: bf16_time if x.dtype == torch.bfloat16 else 1.0)
    assert dev.resolve_dtype("auto", torch.device("cpu"), 64, 128) is expected
    dev._measure_cpu_dtype.cache_clear()
