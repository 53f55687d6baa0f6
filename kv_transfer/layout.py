"""`KVLayout`: the frozen, serialisable description of one rank's KV cache tensor.

A layout is everything a peer must know to address our cache without seeing the
tensor: which slice of the model it holds (layer and head ranges), the element type
and the block geometry. It travels inside the handshake (msgspec, ints and strs
only) and is the input of `plan_transfer`.

Byte addressing (the same for NHD and HND, see engine/kv_cache.py):

    tensor = [ L0.K | L0.V | L1.K | L1.V | ... ]       one (layer, K|V) "plane" each
    plane  = [ block 0 | block 1 | ... | block num_blocks-1 ]
    block  = block_bytes contiguous bytes (slot/head order inside is `order`)

    offset(layer, kv, block) = ((layer * 2 + kv) * num_blocks + block) * block_bytes

Two peers are *compatible* when the fields in `COMPAT_FIELDS` agree (`compat_hash`
covers exactly those): same model, dtype, head_dim and model totals. Everything else
is topology that a conversion bridges (kv_transfer/planner.py): layer and head ranges
(a TP=2 prefill rank and a TP=1 decode rank hold different head ranges of the same
model; PP stages hold different layer ranges), block_size (when one divides the
other) and order (NHD vs HND). So `check_compatible` accepts those, and
`pair.check_pair` validates a whole prefill/decode worker pair at startup.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import msgspec

from kv_transfer.errors import IncompatiblePeerError, InvalidLayoutError

if TYPE_CHECKING:  # only the type: kv_transfer must not depend on engine internals
    import torch

    from engine.kv_cache import KVCacheSpec

# element size of every dtype a KV cache may use (names as torch prints them)
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
ORDERS = ("NHD", "HND")

# What must be equal between two peers, in the order messages list them.
# num_blocks, device, the layer/head ranges, block_size and order are deliberately
# absent: a layout conversion (planner.py) bridges them (check_pair refuses block sizes where
# neither divides the other).
COMPAT_FIELDS = ("model_fingerprint", "dtype", "head_dim", "total_layers", "total_kv_heads")


class KVLayout(msgspec.Struct, frozen=True):
    model_fingerprint: str
    total_layers: int
    layer_start: int
    num_layers: int
    total_kv_heads: int
    head_start: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: str  # "bfloat16", "float32", ... (torch's name without "torch.")
    order: str  # "NHD" | "HND"
    device: str  # "cpu" | "cuda:0"

    def __post_init__(self) -> None:
        # runs on construction and on msgspec decode: a peer cannot hand us a bad layout
        if self.dtype not in DTYPE_ITEMSIZE:
            raise InvalidLayoutError(f"KV dtype {self.dtype!r} is not supported; use one of {sorted(DTYPE_ITEMSIZE)}")
        if self.order not in ORDERS:
            raise InvalidLayoutError(f"KV order {self.order!r} is not one of {ORDERS}")
        for name in ("total_layers", "num_layers", "total_kv_heads", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) < 1:
                raise InvalidLayoutError(f"KVLayout.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks < 0 or self.layer_start < 0 or self.head_start < 0:
            raise InvalidLayoutError(
                f"KVLayout num_blocks/layer_start/head_start must be >= 0, got "
                f"{self.num_blocks}/{self.layer_start}/{self.head_start}"
            )
        if self.layer_start + self.num_layers > self.total_layers:
            raise InvalidLayoutError(
                f"layer range [{self.layer_start}, {self.layer_start + self.num_layers}) "
                f"exceeds the model's {self.total_layers} layers"
            )
        if self.head_start + self.num_kv_heads > self.total_kv_heads:
            raise InvalidLayoutError(
                f"KV head range [{self.head_start}, {self.head_start + self.num_kv_heads}) "
                f"exceeds the model's {self.total_kv_heads} KV heads"
            )

    # ---- derived sizes -------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one (layer, K|V, block): the unit a plan region is made of."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def region_bytes(self) -> int:
        """Bytes of the whole registered tensor."""
        return self.num_layers * 2 * self.num_blocks * self.block_bytes

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the cache tensor (engine/kv_cache.py's KVCacheSpec.shape)."""
        inner = (self.block_size, self.num_kv_heads) if self.order == "NHD" else (self.num_kv_heads, self.block_size)
        return (self.num_layers, 2, self.num_blocks, *inner, self.head_dim)

    def offset(self, layer: int, kv: int, block: int) -> int:
        """Byte offset of (local layer, K=0|V=1, block id) from the tensor start."""
        return ((layer * 2 + kv) * self.num_blocks + block) * self.block_bytes

    # ---- construction and compatibility ---------------------------------------------
    @classmethod
    def from_cache(cls, kv_cache: torch.Tensor, spec: KVCacheSpec, model_fingerprint: str) -> KVLayout:
        """The one constructor from an allocated cache; checks the tensor matches its spec.

        A transport registers the tensor as one region, so it must be contiguous and
        have exactly the spec's shape and dtype.
        """
        if tuple(kv_cache.shape) != tuple(spec.shape):
            raise InvalidLayoutError(
                f"KV cache shape {tuple(kv_cache.shape)} does not match its spec {tuple(spec.shape)}"
            )
        if kv_cache.dtype != spec.dtype:
            raise InvalidLayoutError(f"KV cache dtype {kv_cache.dtype} does not match its spec {spec.dtype}")
        if not kv_cache.is_contiguous():
            raise InvalidLayoutError("KV cache tensor must be contiguous to be registered as one region")
        return cls.from_spec(spec, model_fingerprint, tensor_device(kv_cache))

    @classmethod
    def from_spec(cls, spec: KVCacheSpec, model_fingerprint: str, device: str = "cpu") -> KVLayout:
        """The layout a cache of `spec` will have (start-up validation builds these before any cache exists)."""
        return cls(
            model_fingerprint=model_fingerprint,
            total_layers=spec.total_layers,
            layer_start=spec.layer_start,
            num_layers=spec.num_layers,
            total_kv_heads=spec.total_kv_heads,
            head_start=spec.head_start,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            block_size=spec.block_size,
            num_blocks=spec.num_blocks,
            dtype=str(spec.dtype).removeprefix("torch."),
            order=str(getattr(spec.order, "value", spec.order)),
            device=device,
        )

    def compat_hash(self) -> str:
        """Short hex digest over `COMPAT_FIELDS` (stable across processes and versions)."""
        blob = msgspec.msgpack.encode([getattr(self, f) for f in COMPAT_FIELDS])
        return hashlib.sha256(blob).hexdigest()[:16]


def compat_mismatches(local: KVLayout, remote: KVLayout) -> list[str]:
    """'field: local X vs remote Y' for each compatibility field that differs."""
    return [
        f"{f}: local {getattr(local, f)!r} vs remote {getattr(remote, f)!r}"
        for f in COMPAT_FIELDS
        if getattr(local, f) != getattr(remote, f)
    ]


def check_compatible(local: KVLayout, remote: KVLayout) -> None:
    """Refuse a peer whose cache can never be exchanged with ours, naming every field.

    Only what no conversion can bridge is refused; topology (layer/head ranges, block
    size, order) and capacity (num_blocks, device) may differ.
    """
    bad = compat_mismatches(local, remote)
    if bad:
        raise IncompatiblePeerError("KV layouts are incompatible: " + "; ".join(bad))


def tensor_device(t: torch.Tensor) -> str:
    """The layout's device string of a tensor: "cpu" or "cuda:N"."""
    if t.device.type == "cpu":
        return "cpu"
    return f"{t.device.type}:{t.device.index if t.device.index is not None else 0}"


def check_registrable(kv_cache: torch.Tensor, layout: KVLayout) -> None:
    """Raise InvalidLayoutError unless `kv_cache` is the one contiguous tensor `layout` describes."""
    nbytes = kv_cache.numel() * kv_cache.element_size()
    problems = []
    if not kv_cache.is_contiguous():
        problems.append("it is not contiguous")
    if nbytes != layout.region_bytes:
        problems.append(f"it has {nbytes} bytes, the layout {layout.region_bytes}")
    if str(kv_cache.dtype).removeprefix("torch.") != layout.dtype:
        problems.append(f"its dtype is {kv_cache.dtype}, the layout's {layout.dtype}")
    if tensor_device(kv_cache) != layout.device:
        problems.append(f"it lives on {tensor_device(kv_cache)}, the layout says {layout.device}")
    if problems:
        raise InvalidLayoutError("cannot register the KV cache: " + "; ".join(problems))


def check_staging(staging: torch.Tensor, layout: KVLayout) -> int:
    """Raise InvalidLayoutError unless `staging` can be registered next to the cache; its bytes.

    A staging buffer receives the staged reads of a layout conversion (conversion_plan.py) and is
    scattered into the cache on the same device, so it must be contiguous, non-empty and
    live where the cache does. Its dtype is free (it is addressed in bytes).
    """
    nbytes = staging.numel() * staging.element_size()
    problems = []
    if not staging.is_contiguous():
        problems.append("it is not contiguous")
    if nbytes == 0:
        problems.append("it is empty")
    if tensor_device(staging) != layout.device:
        problems.append(f"it lives on {tensor_device(staging)}, the KV cache on {layout.device}")
    if problems:
        raise InvalidLayoutError("cannot register the staging buffer: " + "; ".join(problems))
    return nbytes
