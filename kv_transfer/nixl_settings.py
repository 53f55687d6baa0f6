"""`NixlSettings`: how a NixlTransport starts its agent, and the UCX environment it needs.

UCX reads its variables when an agent starts, so `apply_env` runs before each agent
is created, and sets a variable only when the environment does not already set it
(the user's value always wins). Defaults, measured here (2-core CPU VM; H100 host).
Figures marked (scratch) were seen by hand while developing, not kept as results;
the command after them reproduces the comparison (the benchmark honours UCX_* set
in its environment, and its spawned peer inherits them).

- enable_prog_thread=False: with NIXL's progress thread on, host-to-host reads reached
  ~1.6 GB/s on 2 cores, with it off 4.5-5.4 GB/s (../shared/PLATFORM.md, "NIXL on CPU").
  The price is the liveness rule in transport.py (both agents must keep calling in).
- UCX_TLS is left to UCX: it picks cma for host memory within one machine (fastest
  here (scratch): ~8 GB/s vs ~7 with "tcp,sm,self", ~1.8 with "tcp";
  `UCX_TLS=tcp .venv/bin/python benchmarks/kv_transfer_bandwidth.py --reps 3`) and the cuda transports
  for VRAM. A set without tcp fails with NIXL_ERR_BACKEND (UCX needs tcp for active
  messages), and on a GPU host a set without a cuda transport is refused by NIXL
  ("Invalid UCX_TLS=tcp,sm,self for NIXL UCX backend: NVIDIA GPU(s) are present, but
  this setting does not enable CUDA memory support. Add cuda_copy ...").
- UCX_NET_DEVICES: workers choose it from the Ray cluster's hosts (kv_transfer/ucx_net.py:
  loopback on one host, RDMA ports or the node IP's interface across hosts); "lo" is the
  default of a bare NixlSettings (tests, benchmarks on one host).
- UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y (unless set): without NVLink (one PCIe GPU) UCX
  disables CUDA-IPC reads ("cuda-ipc get zcopy disabled as no nvlinks detected") and a
  VRAM READ falls back to tcp "software emulation": ~0.45 GB/s instead of ~640 GB/s
  (scratch, H100, two processes, 360 MiB; `UCX_CUDA_IPC_ENABLE_GET_ZCOPY=n python3
  benchmarks/kv_transfer_bandwidth.py --device cuda --blocks 1024`). WRITE uses CUDA IPC either way. Within ONE process
  CUDA IPC never applies ("cannot reach ... same process"): two agents in one process
  move VRAM over tcp, correct but slow (tests only).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import MutableMapping
from dataclasses import dataclass

from kv_transfer.errors import TransportUnavailableError


@dataclass(frozen=True)
class NixlSettings:
    backend: str = "UCX"
    enable_prog_thread: bool = False
    ucx_tls: str | None = None  # None: leave UCX_TLS to UCX
    ucx_net_devices: str | None = "lo"  # workers pass kv_transfer/ucx_net.py's choice; None: UCX's (every device)
    ucx_cuda_ipc_get_zcopy: str | None = "y"  # READ of VRAM by CUDA IPC even without NVLink
    num_threads: int = 0  # backend worker threads; 0 = NIXL's default

    def apply_env(self, environ: MutableMapping[str, str] = os.environ, cuda: bool = True) -> None:
        """Export the UCX variables this config sets, unless the user already set them.

        `cuda=False` (no GPU) leaves out the CUDA-IPC variable, which UCX would flag as
        "unused environment variable" on every agent start.
        """
        for var, value in (
            ("UCX_TLS", self.ucx_tls),
            ("UCX_NET_DEVICES", self.ucx_net_devices),
            ("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", self.ucx_cuda_ipc_get_zcopy if cuda else None),
        ):
            if value is not None and var not in environ:
                environ[var] = value


def load_nixl():
    """Import NIXL lazily: the package imports without it, this transport explains why not.

    nixl_cu12 is the build pinned here (CPU hosts, CUDA 12); nixl_cu13 serves CUDA 13
    hosts; `nixl` is the meta package that re-exports one of them.
    """
    errors = []
    for module in ("nixl_cu12._api", "nixl_cu13._api", "nixl._api"):
        try:
            api = importlib.import_module(module)
            return api.nixl_agent, api.nixl_agent_config
        except ImportError as e:
            errors.append(str(e))
    raise TransportUnavailableError(
        f"NIXL is not installed ({'; '.join(errors)}); install it with `pip install nixl-cu12` after torch"
    )
