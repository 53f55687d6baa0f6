"""Offline interface: `LLM(...).generate(inputs, params)` runs a batch to completion.

Each input is one of:
    str                      a text prompt (tokenized with the model's tokenizer)
    Sequence[int]            token ids, used as they are
    Sequence[Mapping]        chat messages [{"role": ..., "content": ...}], rendered with
                             the model's chat template (generation prompt added)
All inputs are validated before any is admitted; a bad one raises a typed error
and leaves the engine empty and usable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from engine.engine_core import EngineCore
from engine.outputs import CompletionOutput

PromptInput = Union[str, Sequence[int], Sequence[Mapping[str, str]]]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        block_size: int = 16,
        kv_cache_memory_bytes: int = 1 << 30,
        num_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        enable_chunked_prefill: bool = True,
        seed: int = 0,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        self.config = EngineConfig(
            model=model or "",
            dtype=dtype,
            device=device,
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                num_blocks=num_blocks,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                enable_chunked_prefill=enable_chunked_prefill,
            ),
            speculative=speculative or SpeculativeConfig(),
            seed=seed,
        )
        self.engine = EngineCore(self.config)
        self.tokenizer = self.engine.tokenizer

    def encode(self, prompt: PromptInput) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            return self.tokenizer.encode_chat([dict(m) for m in prompt if isinstance(m, Mapping)])
        if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [t for t in prompt if isinstance(t, int)]
        raise InvalidRequestError(
            "each prompt must be a string, a list of token ids, or a list of chat messages {'role', 'content'}"
        )

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        batch = self._as_batch(prompts)
        params_list = self._params_for(batch, params)
        token_lists = [self.encode(p) for p in batch]
        engine = self.engine
        rids = engine.add_requests([(ids, sp, None) for ids, sp in zip(token_lists, params_list)])  # all or nothing
        ids_by_req = {rid: i for i, rid in enumerate(rids)}
        results: list[CompletionOutput | None] = [None] * len(batch)
        requests = {rid: engine.scheduler.requests[rid] for rid in ids_by_req}  # all admitted just now
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        req = requests[out.request_id]
                        results[ids_by_req[out.request_id]] = CompletionOutput(
                            request_id=out.request_id,
                            prompt_token_ids=list(req.prompt_token_ids),
                            token_ids=req.output_token_ids,
                            text=req.text,
                            finish_reason=out.finish_reason or "stop",
                            stop_reason=req.stop_reason,
                            logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
                            num_cached_tokens=max(req.num_cached_tokens, 0),
                            acceptance_length=req.acceptance_length,
                        )
        except BaseException:
            for rid in ids_by_req:
                engine.abort_request(rid)
            raise
        return [r for r in results if r is not None]

    def chat(self, conversations, params: SamplingParams | None = None) -> list[CompletionOutput]:
        """One conversation (list of messages) or several."""
        if conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]
        return self.generate(list(conversations), params)

    @staticmethod
    def _as_batch(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one list of token ids
        if isinstance(prompts, Sequence) and prompts and all(isinstance(m, Mapping) for m in prompts):
            return [prompts]  # one chat
        if not isinstance(prompts, Sequence) or not prompts:
            raise InvalidRequestError("generate() needs at least one prompt")
        return list(prompts)

    @staticmethod
    def _params_for(batch: list, params) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * len(batch)
        if isinstance(params, SamplingParams):
            return [params] * len(batch)
        params = list(params)
        if len(params) != len(batch):
            raise InvalidRequestError(f"got {len(params)} sampling params for {len(batch)} prompts")
        return params
