"""Turn one step's logits into one token per request (plus optional logprobs).

Pipeline per batch (all tensor ops over the batch, no loop over the vocab):

    logits [B, V] (any device, cast to float32; cut to vocab_limit columns)
      |-- penalized rows: repetition (prompt + output), frequency and presence (output)
      |-- every row greedy ---------------------------> argmax          (fast path)
      |-- greedy rows ---------------------------------> argmax
      '-- random rows: / temperature -> top-k mask -> top-p mask -> min-p mask
                       -> softmax -> argmax(probs / q),  q ~ Exp(1) per row
    logprobs: log_softmax of the *raw* logits (before temperature and filters,
    like vLLM's default), only for the rows that ask; skipped when none ask.

Sampling uses the "exponential race": argmax(p_i / q_i) with q_i ~ Exp(1)
i.i.d. picks token i with probability p_i. Each random row draws its own q of
shape [V]: a seeded request from its own generator (held by its
`SamplingState`), an unseeded one from the sampler's generator. So a seeded
request's tokens depend only on its seed and its logits, never on which other
requests share the batch or in which order.

Filter semantics:
- top-k keeps every token whose logit is >= the k-th largest (ties at the k-th
  value are all kept); k >= V acts as disabled.
- top-p keeps the smallest prefix of the tokens sorted by probability whose
  mass reaches top_p (a token is kept when the mass strictly before it is
  < top_p), so the most probable token is always kept.
- min-p drops tokens whose probability is < min_p * max probability.
Greedy rows (`SamplingParams.greedy`) use torch.argmax: on ties the lowest
token id wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # top-n (token_id, logprob), best first; len == min(n, V)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None for rows that did not ask


@dataclass
class SamplingState:
    """Sampling state of one request; lives as long as the request.

    `generator` is a CPU `torch.Generator` seeded with `params.seed` (None when
    unseeded). When logits live on another device, a generator for that device
    is created on first use with the same seed (`generator_for`).
    """

    params: SamplingParams
    generator: torch.Generator | None = None
    _device_generators: dict[str, torch.Generator] = field(default_factory=dict, repr=False)
    # penalties only (empty otherwise): the prompt's distinct token ids, the output's token counts
    prompt_ids: tuple[int, ...] = field(default=(), repr=False)
    output_counts: dict[int, int] = field(default_factory=dict, repr=False)
    penalized: bool = False  # params.penalized, read once: `record` runs for every token of every request

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids=()) -> SamplingState:
        """`prompt_ids`: the request's prompt (kept, as distinct ids, only for a repetition penalty)."""
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(params.seed)
        kept = tuple(sorted(set(prompt_ids))) if params.repetition_penalty != 1.0 else ()
        return cls(params=params, generator=generator, prompt_ids=kept, penalized=params.penalized)

    def record(self, token_id: int) -> None:
        """One output token (sampled here, or replayed: P's token 1 on D, a resumed request's prior output),
        counted for the penalties; a no-op without them."""
        if self.penalized:
            self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1

    def advance(self, vocab_size: int, device: torch.device) -> None:
        """Consume the draw one sampled token takes, without sampling.

        A decode-role engine replays the first token that a prefill worker sampled;
        advancing here keeps a seeded request's later draws identical to a run in
        which one engine sampled every token (the sampler draws one Exp(1) row of
        `vocab_size` per seeded random row per step). Greedy and unseeded: no-op.
        """
        gen = self.generator_for(device)
        if gen is not None and not self.params.greedy:
            torch.empty(vocab_size, device=device).exponential_(generator=gen)

    def generator_for(self, device: torch.device) -> torch.Generator | None:
        """This request's generator on `device` (None when unseeded)."""
        if self.generator is None or device.type == "cpu":
            return self.generator
        if device.index is None:  # "cuda" and "cuda:0" must share one generator (one draw sequence)
            device = torch.device(device.type, torch.cuda.current_device() if device.type == "cuda" else 0)
        key = str(device)
        gen = self._device_generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.generator.initial_seed())
            self._device_generators[key] = gen
        return gen


class Sampler:
    """Stateless apart from the generator used by unseeded random rows."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator  # None => torch's default generator of the logits' device

    def __call__(
        self, logits: torch.Tensor, states: list[SamplingState], vocab_limit: int | None = None
    ) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [len(states)={len(states)}, V], got shape {tuple(logits.shape)}")
        if vocab_limit is not None:
            if not 1 <= vocab_limit <= logits.shape[1]:
                raise ValueError(f"vocab_limit must be in 1..{logits.shape[1]}, got {vocab_limit}")
            logits = logits[:, :vocab_limit]
        logits = raw = logits.float()
        params = [s.params for s in states]
        greedy = [p.greedy for p in params]
        if any(p.penalized for p in params):
            logits = self._penalize(logits, states)

        if all(greedy):
            token_ids = logits.argmax(dim=-1)
        else:
            rand_rows = [i for i, g in enumerate(greedy) if not g]
            if len(rand_rows) == len(states):
                token_ids = self._sample(logits, states)
            else:
                greedy_rows = [i for i, g in enumerate(greedy) if g]
                token_ids = torch.empty(len(states), dtype=torch.long, device=logits.device)
                g_idx = torch.tensor(greedy_rows, device=logits.device)
                r_idx = torch.tensor(rand_rows, device=logits.device)
                token_ids[g_idx] = logits[g_idx].argmax(dim=-1)
                token_ids[r_idx] = self._sample(logits[r_idx], [states[i] for i in rand_rows])

        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=self._logprobs(raw, params, token_ids))

    # ----------------------------------------------------------------- penalties
    @staticmethod
    def _penalize(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """A copy of `logits` with each penalized row's penalties applied (other rows untouched)."""
        out = logits.clone()
        device, vocab = logits.device, logits.shape[1]
        for i, state in enumerate(states):
            p = state.params
            if not p.penalized:
                continue
            row = out[i]
            counts = {t: c for t, c in state.output_counts.items() if t < vocab}
            if p.repetition_penalty != 1.0:
                seen = set(t for t in state.prompt_ids if t < vocab) | counts.keys()
                if seen:
                    idx = torch.tensor(sorted(seen), dtype=torch.long, device=device)
                    vals = row[idx]
                    rp = p.repetition_penalty
                    row[idx] = torch.where(vals > 0, vals / rp, vals * rp)
            if counts and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
                idx = torch.tensor(list(counts), dtype=torch.long, device=device)
                n = torch.tensor(list(counts.values()), dtype=torch.float32, device=device)
                row[idx] -= p.frequency_penalty * n + p.presence_penalty
        return out

    # ----------------------------------------------------------------- sampling
    def _sample(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Sample one token per row of `logits` [R, V]; every row is non-greedy."""
        probs = self._probs(logits, states)
        q = self._exponential(states, probs.shape, logits.device)
        return (probs / q).argmax(dim=-1)

    def distribution(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """The distributions [R, V] that random rows sample from: penalties, temperature, top-k, top-p, min-p.

        Speculative verification (engine/spec_decode/verify.py) accepts or rejects against these.
        Every row must be non-greedy.
        """
        logits = logits.float()
        if any(s.penalized for s in states):
            logits = self._penalize(logits, states)
        return self._probs(logits, states)

    def race(self, probs: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """One token per row drawn from `probs` [R, V] (need not be normalised) by the exponential race."""
        q = self._exponential(states, probs.shape, probs.device)
        return (probs / q).argmax(dim=-1)

    def uniform(self, state: SamplingState, device: torch.device) -> float:
        """One U[0, 1) draw from the request's generator (the sampler's when unseeded)."""
        gen = state.generator_for(device)
        if gen is None:
            gen = self.generator
            device = gen.device if gen is not None else device
        return float(torch.rand(1, generator=gen, device=device).item())

    def _probs(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        params = [s.params for s in states]
        device, vocab = logits.device, logits.shape[1]

        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        x = logits / temps.unsqueeze(1)

        top_ks = [p.top_k if p.top_k < vocab else 0 for p in params]
        need_top_k = any(k > 0 for k in top_ks)
        need_top_p = any(p.top_p < 1.0 for p in params)
        if need_top_p:
            x = self._top_k_top_p_sorted(x, top_ks, [p.top_p for p in params])
        elif need_top_k:
            x = self._top_k(x, top_ks)

        if any(p.min_p > 0.0 for p in params):
            probs = x.softmax(dim=-1)
            max_p = probs.max(dim=-1, keepdim=True).values
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device).unsqueeze(1)
            x = x.masked_fill(probs < min_p * max_p, _NEG_INF)

        return x.softmax(dim=-1)

    @staticmethod
    def _top_k(x: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
        """Mask logits below each row's k-th largest (rows with k == 0 untouched)."""
        max_k = max(top_ks)
        values = x.topk(max_k, dim=-1).values  # [R, max_k], descending
        k = torch.tensor([max(k, 1) for k in top_ks], device=x.device).unsqueeze(1)
        kth = values.gather(1, k - 1)
        disabled = torch.tensor([k == 0 for k in top_ks], device=x.device).unsqueeze(1)
        kth = kth.masked_fill(disabled, _NEG_INF)
        return x.masked_fill(x < kth, _NEG_INF)

    @staticmethod
    def _top_k_top_p_sorted(x: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
        """Top-k then top-p on the logits sorted descending; returns masked logits in vocab order.

        When every top-p row also has a top-k, only the top max(k) candidates are
        sorted (torch.topk), not the whole vocabulary.
        """
        device, vocab = x.device, x.shape[1]
        has_k = [k > 0 for k in top_ks]
        width = max(top_ks) if all(hk for hk, tp in zip(has_k, top_ps) if tp < 1.0) else vocab
        if width < vocab:
            sorted_x, sorted_idx = x.topk(width, dim=-1)
        else:
            sorted_x, sorted_idx = x.sort(dim=-1, descending=True)
        candidates = sorted_x
        if any(has_k):
            k = torch.tensor([k if k > 0 else width for k in top_ks], device=device).unsqueeze(1)
            kth = sorted_x.gather(1, k - 1)
            sorted_x = sorted_x.masked_fill(sorted_x < kth, _NEG_INF)
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Rows with top_p == 1 get a threshold no rounding error can reach.
        p = torch.tensor([tp if tp < 1.0 else 2.0 for tp in top_ps], dtype=torch.float32, device=device)
        remove = mass_before >= p.unsqueeze(1)
        remove[:, 0] = False  # the most probable token always survives
        sorted_x = sorted_x.masked_fill(remove, _NEG_INF)
        if width == vocab:
            return torch.empty_like(x).scatter_(1, sorted_idx, sorted_x)
        # Truncated: rows with a top-k lose everything outside their candidates; rows
        # without one (top_p == 1 there) keep their logits untouched.
        has_k_t = torch.tensor(has_k, device=device).unsqueeze(1)
        out = x.masked_fill(has_k_t, _NEG_INF)
        return out.scatter_(1, sorted_idx, torch.where(has_k_t, sorted_x, candidates))

    def _exponential(self, states: list[SamplingState], shape: torch.Size, device: torch.device) -> torch.Tensor:
        """q ~ Exp(1) of `shape` [R, V]: seeded rows from their own generator, others from the sampler's."""
        q = torch.empty(shape, dtype=torch.float32, device=device)
        unseeded = [i for i, s in enumerate(states) if s.generator is None]
        if unseeded:
            gen = self.generator
            if gen is not None and gen.device != device:
                draws = torch.empty(len(unseeded), shape[1], device=gen.device).exponential_(generator=gen).to(device)
            else:
                draws = torch.empty(len(unseeded), shape[1], device=device).exponential_(generator=gen)
            if len(unseeded) == len(states):
                q = draws
            else:
                q[torch.tensor(unseeded, device=device)] = draws
        for i, s in enumerate(states):
            if s.generator is not None:  # one draw of V per seeded row: independent of the batch
                q[i].exponential_(generator=s.generator_for(device))
        # Exp(1) can round to 0; 0 would make p/q inf (or NaN for masked p == 0).
        return q.clamp_min_(torch.finfo(torch.float32).tiny)

    # ----------------------------------------------------------------- logprobs
    def logprobs(
        self, logits: torch.Tensor, params: list[SamplingParams], token_ids: list[int]
    ) -> list[TokenLogprobs | None]:
        """Logprobs of given tokens under raw `logits` [R, V] (rows whose params ask; None elsewhere)."""
        return self._logprobs(logits.float(), params, torch.tensor(token_ids, dtype=torch.long, device=logits.device))

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, params: list[SamplingParams], token_ids: torch.Tensor
    ) -> list[TokenLogprobs | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(params)
        if not rows:
            return out
        if len(rows) == len(params):
            sub, ids = logits, token_ids
        else:
            idx = torch.tensor(rows, device=logits.device)
            sub, ids = logits[idx], token_ids[idx]
        lp = sub.log_softmax(dim=-1)
        chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
        ids_list = ids.tolist()
        n_max = min(max(params[i].logprobs or 0 for i in rows), lp.shape[1])
        top_vals: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if n_max > 0:
            values, indices = lp.topk(n_max, dim=-1)
            top_vals, top_ids = values.tolist(), indices.tolist()
        for j, i in enumerate(rows):
            n = params[i].logprobs or 0
            top = list(zip(top_ids[j][:n], top_vals[j][:n]))
            out[i] = TokenLogprobs(token_id=ids_list[j], logprob=chosen[j], top=top)
        return out
