"""Native CPU kernels, compiled for this machine on first use.

`csrc/cpu_kernels.c` is built with the host C compiler (`$CC`, else gcc, else cc)
and `-O3 -march=native -fopenmp` into a shared library cached under
`$TANDEM_KERNEL_CACHE` (default `~/.cache/tandem/kernels`). The file name
carries a hash of the source, the compiler's version and this CPU's flags, so a
cache shared between machines never hands one CPU another's code. The build
takes well under a second; it is written to a temporary name and renamed, so
workers starting together never load a half-written file.

The kernels are written over vectors as wide as the CPU's registers: 16 float
lanes with AVX-512, 8 with AVX2 + FMA (x86-64-v3); the packed weight layout
follows (blocks of 64 or 32 outputs, which the library reports). Nothing here is
required: on a CPU with neither (or not x86), without a compiler, with a failed
build, or with `TANDEM_CPU_KERNELS=0`, `cpu_kernels()` returns None (logged once)
and the layers keep torch's ops (the same results within float32 rounding).
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
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
ABI = 7

_lock = threading.Lock()
_kernel: "CpuKernels | None | bool" = False  # False: not tried yet


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def vector_isa(flags: str | None = None) -> str | None:
    """The vector ISA the kernels are built for on this CPU: "avx512", "avx2", or None (torch's ops then)."""
    have = set((_cpu_flags() if flags is None else flags).split())
    if "avx512f" in have:
        return "avx512"
    if {"avx2", "fma"} <= have:
        return "avx2"
    return None


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "gcc", "cc"):
        if cand and shutil.which(cand):
            return cand
    return None


def _build(cc: str, march: str = "native") -> Path:
    """Build (or find in the cache) the library for `march`: the host CPU by default; tests also build
    `x86-64-v3` (AVX2 + FMA) to check that variant on AVX-512 hosts."""
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = ["-O3", f"-march={march}", "-fopenmp", "-fPIC", "-shared"]
    digest = hashlib.sha256(src + version.encode() + _cpu_flags().encode() + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TANDEM_KERNEL_CACHE") or Path.home() / ".cache" / "tandem" / "kernels")
    lib = cache / f"cpu_kernels-{digest}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    cmd = [cc, *flags, str(SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o755)  # mkstemp makes it 0600: a cache shared between users must stay loadable
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
MAX_HEAD_DIM = 512  # the bf16 decode attention keeps a head in a stack buffer of this size


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuKernels:
    """ctypes handles on the kernels; tensor arguments are contiguous CPU tensors of one dtype, float32 or bfloat16."""

    def __init__(self, path: Path) -> None:
        self.path = path
        dll = ctypes.CDLL(str(path))
        if dll.tandem_cpu_kernels_abi() != ABI:
            raise RuntimeError(f"{path}: kernel ABI {dll.tandem_cpu_kernels_abi()} != {ABI}")
        self.block = int(dll.tandem_cpu_kernels_block())  # outputs per packed weight block: 4 vectors
        self.lanes = self.block // 4  # float32 lanes per vector: 16 (AVX-512) or 8 (AVX2)

        def bind(name, *argtypes):
            fn = getattr(dll, name)
            fn.argtypes, fn.restype = list(argtypes), None
            return fn

        self._linear = bind("tandem_linear_packed_f32", _P, _P, _P, _P, _P, _L, _L, _L, _I)
        self._linear_bf16 = bind("tandem_linear_packed_bf16", _P, _P, _P, _P, _P, _L, _L, _L, _I)

        def by_dtype(name: str, *argtypes) -> dict[torch.dtype, Any]:
            """`name`_f32 and `name`_bf16, by the dtype they take."""
            return {dt: bind(f"{name}_{sfx}", *argtypes) for dt, sfx in _SUFFIX.items()}

        # the fused layer ops, attention and the whole decode step, by dtype
        self._rms_norm = by_dtype("tandem_rms_norm", _P, _P, _P, _L, _L, _F, _I)
        self._silu_mul = by_dtype("tandem_silu_mul", _P, _P, _L, _L, _I)
        self._rope = by_dtype("tandem_rope", _P, _L, _P, _P, _L, _L, _L, _I)
        # q, q_row, cache k, v, (block, slot, head) strides, table, max_blocks, lens, block_size, out, B, heads,
        # kv_heads, D, scale, threads
        self._decode_attn = by_dtype(
            "tandem_paged_decode_attention", _P, _L, _P, _P, _L, _L, _L, _P, _L, _P, _L, _P, _L, _L, _L, _L, _F, _I
        )
        # q, q_row, k, v, (block, slot, head) strides, blocks, block_size, context, T, out, heads, kv_heads, D, scale,
        # threads
        self._prefill_attn = by_dtype(
            "tandem_paged_prefill_attention", _P, _L, _P, _P, _L, _L, _L, _P, _L, _L, _L, _P, _L, _L, _L, _F, _I
        )
        # csrc DECODE_LAYERS_ARGS
        self._decode_layers = by_dtype(
            "tandem_decode_layers",
            *(_P, _L, _P, _L, _L, _L, _L, _L, _L, _F, _P, _P, _P, _P, _L, _L, _L, _P, _L, _P, _L),
            *(_P, _P, _P, _P, _P, _F, _I),
        )

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """[N, K] float32 or bfloat16 -> [ceil(N / B), K, B], zero rows past N (B = self.block; csrc/cpu_kernels.c)."""
        return self.pack_t(weight.t())

    def pack_t(self, weight_t: torch.Tensor) -> torch.Tensor:
        """The same packing from the transposed weight [K, N] (a view or a copy). From a contiguous [in, out] copy
        it moves runs of B values (2.5x faster than from [N, K] for SmolLM2's weights: worker start-up)."""
        k, n = weight_t.shape
        blk = self.block
        nb, full = -(-n // blk), n // blk
        out = weight_t.new_empty(nb, k, blk)
        out[:full].copy_(weight_t[:, : full * blk].unflatten(1, (full, blk)).transpose(0, 1))
        if full < nb:
            out[full].zero_()
            out[full, :, : n - full * blk].copy_(weight_t[:, full * blk :])
        return out

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        bias: torch.Tensor | None,
        n: int,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [..., K] -> x W^T (+ bias) (+ residual), [..., n]; float32, or bfloat16 throughout."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        m, k = x2.shape
        if packed.dtype != x.dtype or (
            residual is not None and (residual.dtype != x.dtype or not residual.is_contiguous())
        ):
            raise ValueError(
                f"linear kernel: x {x.dtype}, weights {packed.dtype} and a contiguous residual of the "
                f"same dtype are required"
            )
        y = torch.empty(m, n, dtype=x.dtype)
        if m:
            fn = self._linear if x.dtype == torch.float32 else self._linear_bf16
            fn(
                x2.data_ptr(),
                packed.data_ptr(),
                _ptr(bias),
                _ptr(residual),
                y.data_ptr(),
                m,
                k,
                n,
                torch.get_num_threads(),
            )
        return y.view(*lead, n)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, H] contiguous -> normalised and scaled, [T, H]."""
        t, h = x.shape
        out = torch.empty_like(x)
        self._rms_norm[x.dtype](x.data_ptr(), weight.data_ptr(), out.data_ptr(), t, h, eps, torch.get_num_threads())
        return out

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """gu [T, 2I] ([gate | up]) -> silu(gate) * up, [T, I]."""
        t, two_i = gu.shape
        out = gu.new_empty(t, two_i // 2)
        self._silu_mul[gu.dtype](gu.data_ptr(), out.data_ptr(), t, two_i // 2, torch.get_num_threads())
        return out

    def rope_(self, x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate the first `heads` heads of each row of x [T, row] in place; cos, sin [T, D/2] contiguous."""
        t, row = x.shape
        d = cos.shape[-1] * 2
        self._rope[x.dtype](x.data_ptr(), row, cos.data_ptr(), sin.data_ptr(), t, heads, d, torch.get_num_threads())

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        strides: tuple[int, int, int],
        table: torch.Tensor,
        lens: torch.Tensor,
        block_size: int,
        heads: int,
        kv_heads: int,
        dim: int,
        scale: float,
    ) -> torch.Tensor:
        """q: [B, row] whose first heads * dim floats are the queries -> [B, heads * dim].

        strides: (block, slot, head) element strides of cache_k / cache_v (the last dim is contiguous);
        table: [B, max_blocks] int64 block ids; lens: [B] int64 context lengths.
        """
        b, row = q.shape
        if cache_k.dtype != q.dtype or dim > MAX_HEAD_DIM or heads % kv_heads or q.stride(1) != 1:
            raise ValueError(
                f"decode attention kernel: q {q.dtype} rows with unit stride, a cache of the same dtype "
                f"(got {cache_k.dtype}), head_dim <= {MAX_HEAD_DIM} (got {dim}) and heads divisible "
                f"by kv_heads ({heads}, {kv_heads}) are required"
            )
        out = q.new_empty(b, heads * dim)
        sb, ss, sh = strides
        self._decode_attn[q.dtype](
            q.data_ptr(),
            row,
            cache_k.data_ptr(),
            cache_v.data_ptr(),
            sb,
            ss,
            sh,
            table.data_ptr(),
            table.shape[1],
            lens.data_ptr(),
            block_size,
            out.data_ptr(),
            b,
            heads,
            kv_heads,
            dim,
            scale,
            torch.get_num_threads(),
        )
        return out

    def paged_prefill_attention(
        self,
        q: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        strides: tuple[int, int, int],
        blocks: torch.Tensor,
        block_size: int,
        context_len: int,
        kv_heads: int,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of one prompt chunk: q [T, heads, dim] (rows of any stride, heads and dims packed)
        at positions context_len - T .. context_len - 1 -> [T, heads * dim].

        K/V are read in place: element (block, slot, head, d) of cache_k / cache_v at the pointers' offset
        block * strides[0] + slot * strides[1] + head * strides[2] + d, blocks[token // block_size] holding each
        token of the context (int64). A fresh prompt's own K/V rows pass as one block: strides (0, row, head).
        """
        t, heads, dim = q.shape
        if (
            cache_k.dtype != q.dtype
            or cache_v.dtype != q.dtype
            or heads % kv_heads
            or q.stride(2) != 1
            or q.stride(1) != dim
            or blocks.dtype != torch.int64
            or not blocks.is_contiguous()
            or dim > MAX_HEAD_DIM
        ):
            raise ValueError(
                f"prefill attention kernel: head_dim <= {MAX_HEAD_DIM} (got {dim}), "
                f"q {q.dtype} [T, heads, dim] with packed heads, K/V of the same dtype "
                f"(got {cache_k.dtype}, {cache_v.dtype}), heads divisible by kv_heads ({heads}, {kv_heads}) and "
                f"contiguous int64 blocks (got {blocks.dtype}) are required"
            )
        if context_len < t or blocks.numel() * block_size < context_len:
            raise ValueError(
                f"prefill attention kernel: {t} queries need a context of at least as many tokens (got "
                f"{context_len}), and {blocks.numel()} blocks of {block_size} must cover it"
            )
        out = q.new_empty(t, heads * dim)
        if t:
            sb, ss, sh = strides
            self._prefill_attn[q.dtype](
                q.data_ptr(),
                q.stride(0),
                cache_k.data_ptr(),
                cache_v.data_ptr(),
                sb,
                ss,
                sh,
                blocks.data_ptr(),
                block_size,
                context_len,
                t,
                out.data_ptr(),
                heads,
                kv_heads,
                dim,
                scale,
                torch.get_num_threads(),
            )
        return out

    def decode_layers(
        self,
        ptrs: torch.Tensor,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_block: torch.Tensor,
        slot_offset: torch.Tensor,
        strides: tuple[int, int, int],
        table: torch.Tensor,
        lens: torch.Tensor,
        block_size: int,
        heads: int,
        kv_heads: int,
        dim: int,
        intermediate: int,
        eps: float,
        scale: float,
    ) -> None:
        """A decode-only step through consecutive layers, h [B, H] updated in place (csrc: tandem_decode_layers).

        ptrs: [layers, 12] int64 addresses (norm weights, packed weights and biases, the layer's K and V cache);
        cos, sin: [B, D/2]; slot_block, slot_offset, lens: [B] int64; table: [B, max_blocks] int64; strides:
        (block, slot, head) element strides of every layer's K and V cache.
        """
        b, hidden = h.shape
        for name, t in (("slot_block", slot_block), ("slot_offset", slot_offset), ("table", table), ("lens", lens)):
            if t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != b:
                raise ValueError(
                    f"decode layers: {name} must be contiguous int64 with {b} rows, got {t.dtype} {t.shape}"
                )
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dtype != h.dtype or not t.is_contiguous() or t.numel() != b * (dim // 2):
                raise ValueError(f"decode layers: {name} must be contiguous {h.dtype} [{b}, {dim // 2}], got {t.shape}")
        if not h.is_contiguous() or ptrs.dtype != torch.int64 or ptrs.shape[1:] != (12,) or not ptrs.is_contiguous():
            raise ValueError("decode layers: h contiguous and ptrs a contiguous [layers, 12] int64 tensor are required")
        if dim > MAX_HEAD_DIM or heads % kv_heads or not bool(ptrs[:, [0, 1, 3, 5, 6, 8, 10, 11]].all()):
            raise ValueError(
                f"decode layers: head_dim <= {MAX_HEAD_DIM} (got {dim}), heads divisible by kv_heads ({heads}, "
                f"{kv_heads}) and every norm, packed weight and cache address set are required"
            )
        row = (heads + 2 * kv_heads) * dim
        normed, qkv, attn = h.new_empty(b, hidden), h.new_empty(b, row), h.new_empty(b, heads * dim)
        gu, act = h.new_empty(b, 2 * intermediate), h.new_empty(b, intermediate)
        sb, ss, sh = strides
        self._decode_layers[h.dtype](
            ptrs.data_ptr(),
            ptrs.shape[0],
            h.data_ptr(),
            b,
            hidden,
            heads,
            kv_heads,
            dim,
            intermediate,
            eps,
            cos.data_ptr(),
            sin.data_ptr(),
            slot_block.data_ptr(),
            slot_offset.data_ptr(),
            sb,
            ss,
            sh,
            table.data_ptr(),
            table.shape[1],
            lens.data_ptr(),
            block_size,
            normed.data_ptr(),
            qkv.data_ptr(),
            attn.data_ptr(),
            gu.data_ptr(),
            act.data_ptr(),
            scale,
            torch.get_num_threads(),
        )


def cpu_kernels() -> CpuKernels | None:
    """The float32 kernels for this CPU, or None where they cannot be built (torch's ops are used then)."""
    global _kernel
    if _kernel is not False:
        return _kernel  # type: ignore[return-value]
    with _lock:
        if _kernel is not False:
            return _kernel  # type: ignore[return-value]
        if os.environ.get("TANDEM_CPU_KERNELS", "1") == "0":
            log.info("TANDEM_CPU_KERNELS=0: CPU layers use torch's ops")
            _kernel = None
            return None
        if vector_isa() is None:
            log.info("CPU without AVX-512 or AVX2 + FMA: CPU layers use torch's ops")
            _kernel = None
            return None
        cc = _compiler()
        try:
            if cc is None:
                raise RuntimeError("no C compiler found (set CC, or install gcc)")
            _kernel = CpuKernels(_build(cc))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("CPU kernels unavailable, using torch's ops (about 2x slower decode): %s", e)
            _kernel = None
        return _kernel  # type: ignore[return-value]
