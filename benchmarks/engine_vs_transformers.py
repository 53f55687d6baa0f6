"""Tandem's engine against Hugging Face `transformers` on the same SmolLM2 weights, on this CPU.

One process, one run, both models loaded side by side, repetitions interleaved
(ours first on even repetitions, transformers first on odd ones) and medians
reported, because the CPU is small and shared. Per dtype (float32, bfloat16):

    (a) batch-1 decode tok/s      128 new tokens after a chat prompt, greedy, EOS ignored.
                                  Decode only: time from the first token to the last, (N-1) tokens.
                                  Ours: per-step timestamps from EngineCore.step(). Transformers: a
                                  greedy loop over forward() with a DynamicCache (no generate()
                                  overhead: the strongest simple baseline), same timestamps.
                                  Also as a fraction of the memory-bandwidth bound
                                  read_bandwidth / weight_bytes_per_token.
    (b) output tok/s, 32 requests seeded lognormal prompt/output lengths, random real token ids.
                                  Ours: one LLM.generate (continuous batching). Transformers:
                                  generate() on left-padded batches (default: one batch of 32),
                                  max_new_tokens = the batch's longest drawn output; only the drawn
                                  tokens count. Wall time includes prefill on both sides.
    (c) prefill tok/s, 512 tokens time to first token (ours: max_tokens=1) vs one forward() of 512
                                  tokens with logits_to_keep=1.

Fresh random prompts are drawn for every repetition of (b) and (c), so our prefix
cache never turns a repetition into a cache hit.

    .venv/bin/python benchmarks/engine_vs_transformers.py            # full (~10 min)
    .venv/bin/python benchmarks/engine_vs_transformers.py --quick    # smoke run (< 1 min after loading)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.sampling_params import SamplingParams  # noqa: E402
from engine.device import resolve_dtype  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.loader import default_model_path, load_model_source  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "engine_vs_transformers.json")
CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
FIRST_REAL_ID = 17  # SmolLM2's ids 0..16 are special tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "both"],
        default=None,
        help="default: both (bfloat16 only with --quick)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results path")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke run")
    p.add_argument("--model", default=None, help="GGUF file (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of (a) and (c)")
    p.add_argument("--reps-b", type=int, default=2, help="repetitions of (b)")
    p.add_argument(
        "--hf-batching",
        choices=["padded", "sorted"],
        default="padded",
        help="(b) transformers: one left-padded batch of all requests, or 4 batches sorted by prompt length",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    a = p.parse_args(argv)
    size = (
        dict(
            decode_tokens=16,
            num_requests=4,
            prompt_median=32,
            prompt_cap=64,
            output_median=16,
            output_cap=32,
            prefill_tokens=128,
            bandwidth_mib=256,
        )
        if a.quick
        else dict(
            decode_tokens=128,
            num_requests=32,
            prompt_median=128,
            prompt_cap=512,
            output_median=128,
            output_cap=256,
            prefill_tokens=512,
            bandwidth_mib=1024,
        )
    )
    a.__dict__.update(size)
    if a.quick:
        a.reps, a.reps_b = 1, 1
    a.dtype = a.dtype or ("bfloat16" if a.quick else "both")
    return a


# ---- machine ---------------------------------------------------------------------------------------------------------


def read_bandwidth(mib: int, reps: int = 5) -> float:
    """Best-of-`reps` bytes/s of torch .sum() over a float32 tensor far larger than the caches."""
    x = torch.ones(mib * (1 << 20) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - a note, never a failure
        return platform.processor() or "unknown"


def weight_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    """Every weight one decode step reads: all layers, final norm, LM head (a tied embedding counts once, as head)."""
    h, q, kv, inter = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    per_layer = (
        h * (q + 2 * kv) + q * h + 2 * h * inter + inter * h + 2 * h + ((q + 2 * kv) if cfg.attention_bias else 0)
    )
    params = cfg.num_layers * per_layer + h + cfg.vocab_size * h
    return params * torch.empty((), dtype=dtype).element_size()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(message)


# ---- workloads -------------------------------------------------------------------------------------------------------


def ours_decode(llm: LLM, prompt: list[int], n: int) -> tuple[float, float]:
    """(decode tok/s from first to last token, TTFT s) driving EngineCore.step() directly."""
    eng = llm.engine
    t0 = time.perf_counter()
    rid = eng.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    stamps = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == rid:
                stamps.append(time.perf_counter())
    _check(len(stamps) == n, f"ours produced {len(stamps)} tokens, expected {n}")
    return (n - 1) / (stamps[-1] - stamps[0]), stamps[0] - t0


@torch.inference_mode()
def hf_decode(model, prompt: list[int], n: int) -> tuple[float, float]:
    from transformers import DynamicCache

    cache = DynamicCache()
    t0 = time.perf_counter()
    ids = torch.tensor([prompt])
    stamps = []
    for _ in range(n):
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        ids = logits.argmax().view(1, 1)
        stamps.append(time.perf_counter())
    return (n - 1) / (stamps[-1] - stamps[0]), stamps[0] - t0


def ours_prefill(llm: LLM, prompt: list[int]) -> float:
    t = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    return len(prompt) / (time.perf_counter() - t)


@torch.inference_mode()
def hf_prefill(model, prompt: list[int]) -> float:
    t = time.perf_counter()
    int(model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1).logits[0, -1].argmax())
    return len(prompt) / (time.perf_counter() - t)


def ours_batch(llm: LLM, prompts: list[list[int]], outs: list[int]) -> float:
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outs]
    t = time.perf_counter()
    results = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    produced = sum(len(r.token_ids) for r in results)
    _check(produced == sum(outs), f"ours produced {produced} tokens, expected {sum(outs)}")
    return produced / dt


@torch.inference_mode()
def hf_batch(model, prompts: list[list[int]], outs: list[int], batching: str, pad_id: int) -> float:
    from transformers import GenerationConfig

    order = list(range(len(prompts)))
    groups = [order]
    if batching == "sorted":
        order.sort(key=lambda i: len(prompts[i]))
        k = max(1, len(order) // 4)
        groups = [order[i : i + k] for i in range(0, len(order), k)]
    t = time.perf_counter()
    for g in groups:
        width = max(len(prompts[i]) for i in g)
        ids = torch.full((len(g), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(g), width), dtype=torch.long)
        for row, i in enumerate(g):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        new = max(outs[i] for i in g)
        gc_ = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=pad_id)
        seq = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc_)
        _check(seq.shape[1] == width + new, f"transformers produced {seq.shape[1] - width} tokens, expected {new}")
    return sum(outs) / (time.perf_counter() - t)


def draw_lengths(rng: np.random.Generator, n: int, median: int, cap: int, sigma: float) -> list[int]:
    return [int(x) for x in np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 4, cap)]


def random_prompt(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return [int(t) for t in rng.integers(FIRST_REAL_ID, vocab, n)]


def interleaved(reps: int, ours: Callable[[int], float], theirs: Callable[[int], float]) -> tuple[list, list]:
    a, b = [], []
    for r in range(reps):
        if r % 2 == 0:
            a.append(ours(r))
            b.append(theirs(r))  # noqa: E702
        else:
            b.append(theirs(r))
            a.append(ours(r))  # noqa: E702
    return a, b


# ---- one table -------------------------------------------------------------------------------------------------------


def load_hf(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path),
        gguf_file=os.path.basename(path),
        dtype=dtype,
        quantization_config=GgufConfig(dequantize=True),
    )
    bad = {p.dtype for p in model.parameters()} - {dtype}
    if bad:
        raise RuntimeError(f"transformers model has parameters in {bad}, expected only {dtype}")
    return model.eval()


def run_dtype(args, dtype_name: str, path: str, bandwidth: float, vocab: int) -> dict:
    dtype = getattr(torch, dtype_name)
    t = time.perf_counter()
    llm = LLM(path, dtype=dtype_name, seed=args.seed)
    hf = load_hf(path, dtype)
    print(f"[{dtype_name}] models loaded in {time.perf_counter() - t:.0f} s", flush=True)
    rng = np.random.default_rng(args.seed)
    chat_ids = llm.encode(CHAT)
    pad_id = llm.tokenizer.eos_token_id or 0

    # warm-up: oneDNN primitives, allocator, both code paths
    w = random_prompt(rng, 32, vocab)
    ours_decode(llm, w, 4)
    hf_decode(hf, w, 4)
    ours_prefill(llm, w)
    hf_prefill(hf, w)  # noqa: E702
    ours_batch(llm, [w, w[:16]], [4, 4])
    hf_batch(hf, [w, w[:16]], [4, 4], args.hf_batching, pad_id)  # noqa: E702

    n = args.decode_tokens
    a_ours, a_hf = interleaved(
        args.reps, lambda r: ours_decode(llm, chat_ids, n)[0], lambda r: hf_decode(hf, chat_ids, n)[0]
    )
    print(f"[{dtype_name}] (a) ours {a_ours}  transformers {a_hf}", flush=True)

    c_prompts = [random_prompt(rng, args.prefill_tokens, vocab) for _ in range(args.reps)]
    c_ours, c_hf = interleaved(
        args.reps, lambda r: ours_prefill(llm, c_prompts[r]), lambda r: hf_prefill(hf, c_prompts[r])
    )
    print(f"[{dtype_name}] (c) ours {c_ours}  transformers {c_hf}", flush=True)

    lrng = np.random.default_rng(args.seed + 1)  # lengths identical for every dtype and repetition
    p_lens = draw_lengths(lrng, args.num_requests, args.prompt_median, args.prompt_cap, 0.8)
    o_lens = draw_lengths(lrng, args.num_requests, args.output_median, args.output_cap, 0.6)
    b_prompts = [[random_prompt(rng, L, vocab) for L in p_lens] for _ in range(args.reps_b)]
    b_ours, b_hf = interleaved(
        args.reps_b,
        lambda r: ours_batch(llm, b_prompts[r], o_lens),
        lambda r: hf_batch(hf, b_prompts[r], o_lens, args.hf_batching, pad_id),
    )
    print(f"[{dtype_name}] (b) ours {b_ours}  transformers {b_hf}", flush=True)

    wbytes = weight_bytes_per_token(llm.engine.model_config, dtype)
    bound = bandwidth / wbytes
    med = statistics.median
    rows = [
        row("(a) decode tok/s, batch 1", a_ours, a_hf, ">= 1.2x", 1.2),
        {
            "metric": "(a) decode / bandwidth bound",
            "ours": med(a_ours) / bound,
            "transformers": med(a_hf) / bound,
            "target": ">= 70% of bound",
            "pass": med(a_ours) / bound >= 0.70,
        },
        row(f"(b) output tok/s, {args.num_requests} requests", b_ours, b_hf, ">= 3x", 3.0),
        row(f"(c) prefill tok/s, {args.prefill_tokens} tokens", c_ours, c_hf, ">= 1.0x", 1.0),
    ]
    # drop both models before the next dtype loads (a del would hide them from the lambdas above, for the
    # linter); llm stays typed LLM, as the lambdas need: this None only frees it, nothing reads it after
    llm = hf = None  # type: ignore[assignment]
    gc.collect()
    return {
        "dtype": dtype_name,
        "weight_bytes_per_token": wbytes,
        "bound_tok_s": bound,
        "rows": rows,
        "workload_b": {
            "prompt_lens": p_lens,
            "output_lens": o_lens,
            "hf_batching": args.hf_batching,
            "useful_output_tokens": sum(o_lens),
        },
    }


def row(metric: str, ours: list[float], theirs: list[float], target: str, need: float) -> dict:
    ratio = statistics.median(ours) / statistics.median(theirs)
    return {
        "metric": metric,
        "ours": statistics.median(ours),
        "transformers": statistics.median(theirs),
        "ratio": ratio,
        "target": target,
        "pass": ratio >= need,
        "samples_ours": ours,
        "samples_transformers": theirs,
    }


def render(table: dict, bandwidth: float) -> str:
    lines = [
        f"dtype={table['dtype']}: read bandwidth {bandwidth / 1e9:.1f} GB/s, weights/token "
        f"{table['weight_bytes_per_token'] / 1e6:.1f} MB -> bound {table['bound_tok_s']:.1f} tok/s",
        f"{'metric':<32}{'ours':>10}{'transformers':>14}{'ratio':>9}  {'target':<17}result",
    ]
    for r in table["rows"]:
        if "ratio" in r:
            cells = f"{r['ours']:>10.1f}{r['transformers']:>14.1f}{r['ratio']:>8.2f}x"
        else:
            cells = f"{r['ours']:>9.1%} {r['transformers']:>13.1%} {'':>8}"
        lines.append(f"{r['metric']:<32}{cells}  {r['target']:<17}{'PASS' if r['pass'] else 'MISS'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    started = time.time()
    load_start = os.getloadavg()
    bandwidth = read_bandwidth(args.bandwidth_mib)
    cfg = load_model_source(path).config
    auto = resolve_dtype("auto", torch.device("cpu"), cfg.hidden_size, cfg.intermediate_size)
    print(
        f"threads={torch.get_num_threads()}  read bandwidth {bandwidth / 1e9:.1f} GB/s  "
        f"dtype='auto' on this CPU -> {str(auto).replace('torch.', '')}",
        flush=True,
    )
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    tables = [run_dtype(args, d, path, bandwidth, cfg.vocab_size) for d in dtypes]
    import transformers

    bandwidth_end = read_bandwidth(args.bandwidth_mib)
    meta: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/engine_vs_transformers.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": path,
        "auto_dtype": str(auto).replace("torch.", ""),
        "read_bandwidth_bytes_s": bandwidth,
        "read_bandwidth_end_bytes_s": bandwidth_end,
        "method": {
            "a": "decode only: (N-1)/(t_last_token - t_first_token); transformers: greedy forward() loop "
            "with DynamicCache, logits_to_keep=1",
            "b": f"ours: one LLM.generate; transformers: generate(), {args.hf_batching} left-padded batches, "
            "max_new_tokens = longest drawn output per batch; useful tokens = drawn output lengths",
            "c": "ours: LLM.generate max_tokens=1 wall time; transformers: one forward(), logits_to_keep=1",
        },
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "seconds": time.time() - started,
        "sizes": {
            k: getattr(args, k)
            for k in (
                "decode_tokens",
                "num_requests",
                "prompt_median",
                "prompt_cap",
                "output_median",
                "output_cap",
                "prefill_tokens",
                "reps",
                "reps_b",
            )
        },
    }
    print()
    print(
        f"{meta['cpu']}, {meta['cpus']} CPUs, torch threads {meta['torch_threads']}, "
        f"OMP_WAIT_POLICY {meta['omp_wait_policy']}, "
        f"load average {load_start[0]:.1f} -> {meta['loadavg_end'][0]:.1f}; dtype='auto' picks {meta['auto_dtype']}; "
        f"(b) transformers batching: {args.hf_batching}"
    )
    for t in tables:
        print()
        print(render(t, bandwidth))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "tables": tables}, f, indent=1)
    print(f"\nwrote {args.out} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
