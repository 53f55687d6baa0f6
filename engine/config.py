"""Frozen, validated configuration of the engine.

`ModelConfig` is the one internal description of a model, whichever file it was
loaded from (Hugging Face directory or GGUF). `CacheConfig` and `SchedulerConfig`
size the paged KV cache and the token budget. Invalid values raise `ConfigError`
(never `assert`, which vanishes under `python -O`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Rope scaling of the `llama3` kind (the only kind supported so far)."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: bias on q, k and v projections
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # recorded; full attention is used when None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"model config {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing. `num_blocks` wins over the memory budget when set."""

    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30  # 1 GiB budget by default
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    kv_order: str = "NHD"  # "NHD" | "HND": slot-major or head-major inside a block (engine/kv_cache.py)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.kv_order not in ("NHD", "HND"):
            raise ConfigError(f"kv_order must be NHD or HND, got {self.kv_order!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory_bytes < 1:
            raise ConfigError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Token budget per step and batch limits (continuous batching, chunked prefill)."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True
    # TTFT first (engine/scheduler.py): a step prefills its oldest prompt alone, up to the token budget, and a
    # later prompt joins that step only whole and while the step's prompt tokens stay within this many.
    # None: prompts fill the budget (throughput first: the offline LLM's default)
    prefill_join_tokens: int | None = None
    # SLO triage (common/prefill_share.py): with a TTFT target, a waiting prompt predicted to miss it yields its
    # turn to a later one that can still meet it (0: first come, first served)
    ttft_target_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if not self.ttft_target_s >= 0:
            raise ConfigError(f"ttft_target_s must be >= 0 (0: first come, first served), got {self.ttft_target_s}")
        if self.prefill_join_tokens is not None and self.prefill_join_tokens < 0:
            raise ConfigError(
                f"prefill_join_tokens must be >= 0 (0: one prompt per step) or None (fill the budget), "
                f"got {self.prefill_join_tokens}"
            )


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor x pipeline parallel shape of one worker: tp * pp ranks, one process each.

    Global rank = pp_rank * tp + tp_rank; rank 0 (first stage, first TP rank) is the
    leader that schedules and samples. `backend` None picks gloo on CPU, nccl on CUDA.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    backend: str | None = None
    collective_timeout_s: float = 300.0  # a collective that waits longer fails the step (a dead rank)

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ConfigError(f"parallel backend must be gloo or nccl, got {self.backend!r}")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (engine/spec_decode/). `method` None = off.

    ngram: prompt lookup: the longest suffix n-gram (prompt_lookup_max down to prompt_lookup_min tokens)
    seen earlier in the request proposes the tokens that followed it. draft: `draft_model` (a path; any
    model with the target's vocabulary) proposes them autoregressively from its own paged KV, which uses
    the target's block tables. Speculation is off for a step whose decode batch exceeds
    `disable_batch_size` (0 = never off): verifying K extra tokens per request stops being nearly free
    once the batch's rows no longer fit the memory-bound regime.
    """

    method: str | None = None
    num_speculative_tokens: int = 4
    draft_model: str | None = None
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    disable_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.method is None:
            if self.draft_model is not None:
                raise ConfigError("draft_model is set but speculative method is not; use method 'draft'")
            return
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(
                f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}"
            )
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ConfigError(f"num_speculative_tokens must be in 1..16, got {self.num_speculative_tokens}")
        if self.method == "draft" and not self.draft_model:
            raise ConfigError(
                "speculative method 'draft' needs draft_model (a model directory or .gguf sharing "
                "the target's tokenizer)"
            )
        if self.method == "ngram" and self.draft_model is not None:
            raise ConfigError("draft_model is only used by speculative method 'draft', not 'ngram'")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ConfigError(
                f"prompt lookup needs 1 <= prompt_lookup_min ({self.prompt_lookup_min}) <= "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        if self.disable_batch_size < 0:
            raise ConfigError(f"speculative disable_batch_size must be >= 0, got {self.disable_batch_size}")

    @property
    def enabled(self) -> bool:
        return self.method is not None


@dataclass(frozen=True)
class EngineConfig:
    model: str  # path to a HF directory or a .gguf file; "" = the default SmolLM2
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    device: str = "cpu"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
