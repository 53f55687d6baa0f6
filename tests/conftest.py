"""Suite-wide settings.

- `gpu` tests skip cleanly without a CUDA device.
- torch runs single-threaded in tests: on this shared 2-core machine, OpenMP's two
  threads make tiny-model steps 50-100x slower whenever another process is busy
  (measured: a 6-request batch 2.4 s with 2 threads vs 0.027 s with 1), and tests
  measure behaviour, not speed. Benchmarks run with the default thread count.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
