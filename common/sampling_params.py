"""Per-request sampling parameters, validated once when the request arrives.

`SamplingParams` is frozen: build it, and every bad value raises
`InvalidSamplingParamsError` at construction with a message that names the
field, says what was found and what is allowed (so the router can turn it
into an INVALID_ARGUMENT status without a stack trace). `stop` and
`stop_token_ids` accept any list or tuple (a single string for `stop`) and are
normalised to tuples, so instances stay hashable.

Greedy decoding: a request is greedy when `temperature < SAMPLING_EPS` (1e-5,
the same cut-off vLLM uses: dividing logits by a smaller temperature overflows
float32) or when `top_k == 1`. Greedy rows take `argmax`, which picks the lowest
token id on ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidSamplingParamsError

SAMPLING_EPS = 1e-5  # temperatures below this are treated as greedy
MAX_LOGPROBS = 20  # most top-n logprobs a request may ask for
MAX_SEED = 2**63 - 1
MAX_REPETITION_PENALTY = 100.0  # beyond this a seen token's logit is flattened to about 0 anyway


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any) -> None:
    if not _is_int(value):
        raise InvalidSamplingParamsError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSamplingParamsError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    result = float(value)
    if not math.isfinite(result):
        raise InvalidSamplingParamsError(f"{name} must be a finite number, got {value!r}")
    return result


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidSamplingParamsError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request, and when to stop.

    Filters apply in this order: temperature, top-k, top-p, min-p, each one
    disabled at its default value. Logprobs are taken from the raw logits
    (before temperature and filters).
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0  # (0, 1]; 1 disables
    top_k: int = 0  # 0 disables; k >= vocab size also acts as disabled
    min_p: float = 0.0  # [0, 1]; 0 disables
    seed: int | None = None  # per-request generator: same seed + prompt => same output whatever the batch
    stop: tuple[str, ...] = ()  # stop strings
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token; 0 => only the sampled token's
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # penalties (vLLM's and OpenAI's semantics), applied to the logits before temperature and every filter,
    # greedy rows included: presence subtracts once for every token the output already holds, frequency
    # once per occurrence in the output; repetition divides a positive logit (multiplies a negative one)
    # of every token seen in the prompt or the output
    presence_penalty: float = 0.0  # [-2, 2]; 0 disables
    frequency_penalty: float = 0.0  # [-2, 2]; 0 disables
    repetition_penalty: float = 1.0  # > 0; 1 disables

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise InvalidSamplingParamsError(f"max_tokens must be >= 1, got {self.max_tokens}")

        temperature = _check_float("temperature", self.temperature)
        if temperature < 0:
            raise InvalidSamplingParamsError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
        object.__setattr__(self, "temperature", temperature)

        top_p = _check_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise InvalidSamplingParamsError(f"top_p must be in (0, 1], got {top_p}")
        object.__setattr__(self, "top_p", top_p)

        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise InvalidSamplingParamsError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

        min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise InvalidSamplingParamsError(f"min_p must be in [0, 1], got {min_p}")
        object.__setattr__(self, "min_p", min_p)

        if self.seed is not None:
            _check_int("seed", self.seed)
            if not 0 <= self.seed <= MAX_SEED:
                raise InvalidSamplingParamsError(f"seed must be in 0..{MAX_SEED} (2**63-1), got {self.seed}")

        object.__setattr__(self, "stop", self._normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", self._normalise_stop_token_ids(self.stop_token_ids))

        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise InvalidSamplingParamsError(
                    f"logprobs must be in 0..{MAX_LOGPROBS} (0 = only the sampled token), got {self.logprobs}"
                )

        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        _check_bool("skip_special_tokens", self.skip_special_tokens)

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise InvalidSamplingParamsError(f"{name} must be in [-2, 2] (0 disables it), got {value}")
            object.__setattr__(self, name, value)
        repetition = _check_float("repetition_penalty", self.repetition_penalty)
        if not 0.0 < repetition <= MAX_REPETITION_PENALTY:
            raise InvalidSamplingParamsError(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 disables it), got {repetition}"
            )
        object.__setattr__(self, "repetition_penalty", repetition)

    @staticmethod
    def _normalise_stop(stop: Any) -> tuple[str, ...]:
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, Sequence):
            raise InvalidSamplingParamsError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        for i, s in enumerate(stop):
            if not isinstance(s, str):
                raise InvalidSamplingParamsError(f"stop[{i}] must be a string, got {s!r} ({type(s).__name__})")
            if not s:
                raise InvalidSamplingParamsError(f"stop[{i}] is an empty string; stop strings must be non-empty")
        return tuple(stop)

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> tuple[int, ...]:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidSamplingParamsError(f"stop_token_ids must be a list of integers, got {type(ids).__name__}")
        for i, t in enumerate(ids):
            if not _is_int(t):
                raise InvalidSamplingParamsError(f"stop_token_ids[{i}] must be an integer, got {t!r}")
            if t < 0:
                raise InvalidSamplingParamsError(f"stop_token_ids[{i}] must be >= 0, got {t}")
        return tuple(ids)

    @property
    def penalized(self) -> bool:
        """True when any of the three penalties is on (the sampler then tracks the request's tokens)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax (lowest token id on ties)."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1
