"""Native CPU kernels, compiled for this machine on first use.

`csrc/cpu_linear.c` is built with the host C compiler (`$CC`, else gcc, else cc)
and `-O3 -march=native -fopenmp` into a shared library cached under
`$TANDEM_KERNEL_CACHE` (default `~/.cache/tandem/kernels`). The file name
carries a hash of the source, the compiler's version and this CPU's flags, so a
cache shared between machines never hands one CPU another's code. The build
takes well under a second; it is written to a temporary name and renamed, so
workers starting together never load a half-written file.

Nothing here is required: without a compiler, with a failed build, or with
`TANDEM_CPU_KERNELS=0`, `linear_kernel()` returns None (logged once) and the
layers keep torch's matmul.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_linear.c"
BLOCK = 64  # outputs per packed block; must match NB in the C source
ABI = 1

_lock = threading.Lock()
_kernel: "LinearKernel | None | bool" = False  # False: not tried yet


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "gcc", "cc"):
        if cand and shutil.which(cand):
            return cand
    return None


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(src + version.encode() + _cpu_flags().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TANDEM_KERNEL_CACHE") or Path.home() / ".cache" / "tandem" / "kernels")
    lib = cache / f"cpu_linear-{digest}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    cmd = [cc, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", str(SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    os.replace(tmp, lib)
    return lib


class LinearKernel:
    """ctypes handle on the packed float32 linear."""

    def __init__(self, path: Path) -> None:
        self.path = path
        dll = ctypes.CDLL(str(path))
        if dll.tandem_cpu_linear_abi() != ABI:
            raise RuntimeError(f"{path}: kernel ABI {dll.tandem_cpu_linear_abi()} != {ABI}")
        fn = dll.tandem_linear_packed_f32
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
        fn.restype = None
        self._fn = fn

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        """[N, K] float32 -> [ceil(N / 64), K, 64], zero rows past N (see csrc/cpu_linear.c)."""
        n, k = weight.shape
        nb = -(-n // BLOCK)
        padded = weight.new_zeros(nb * BLOCK, k)
        padded[:n] = weight
        return padded.view(nb, BLOCK, k).transpose(1, 2).contiguous()

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        """x [..., K] float32 -> [..., n]."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        m, k = x2.shape
        y = torch.empty(m, n, dtype=torch.float32)
        if m:
            self._fn(x2.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                     m, k, n, torch.get_num_threads())
        return y.view(*lead, n)


def linear_kernel() -> LinearKernel | None:
    """The packed float32 linear for this CPU, or None where it cannot be built (torch's matmul is used then)."""
    global _kernel
    if _kernel is not False:
        return _kernel  # type: ignore[return-value]
    with _lock:
        if _kernel is not False:
            return _kernel  # type: ignore[return-value]
        if os.environ.get("TANDEM_CPU_KERNELS", "1") == "0":
            log.info("TANDEM_CPU_KERNELS=0: CPU linear layers use torch's matmul")
            _kernel = None
            return None
        cc = _compiler()
        try:
            if cc is None:
                raise RuntimeError("no C compiler found (set CC, or install gcc)")
            _kernel = LinearKernel(_build(cc))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("CPU linear kernel unavailable, using torch's matmul (about 1.5x slower decode): %s", e)
            _kernel = None
        return _kernel  # type: ignore[return-value]
