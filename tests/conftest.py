"""Suite-wide settings.

- `gpu` tests skip cleanly without a CUDA device.
- torch runs single-threaded in tests: on this shared 2-core machine, OpenMP's two
  threads stall tiny-model steps badly whenever another process is busy (seen while
  developing, with other jobs on the cores), and tests measure behaviour, not speed.
  Benchmarks run with the default thread count.
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
