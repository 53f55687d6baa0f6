"""Suite-wide settings.

- `gpu` tests skip cleanly without a CUDA device.
- torch runs single-threaded in tests: on this shared 2-core machine, OpenMP's two
  threads stall tiny-model steps badly whenever another process is busy (seen while
  developing, with other jobs on the cores), and tests measure behaviour, not speed.
  Benchmarks run with the default thread count.
- Without a CUDA device, Triton kernels (engine/model/triton_attention.py) run in Triton's
  interpreter, on CPU tensors: Triton decides this when it is first imported, so it is set here.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
