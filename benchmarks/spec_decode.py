"""Speculative decoding against plain decoding, offline on one engine: where proposals help and where not.

Tandem's variants (plain, n-gram, n-gram without the batch cut-off) share one engine and process and run
interleaved, request by request at batch 1 and group by group above, rotating the order (this VM's
speed drifts between minutes, which a process per configuration mistakes for an effect).
vLLM runs one process per configuration, one after the other. Tokens are timed as the engine emits
them (EngineCore.step); a step that emits n tokens of a request after a gap g counts n inter-token
latencies of g / n (as `tandem bench` counts tokens that arrive together). Greedy, EOS ignored, 128 output tokens.

Workloads (chat-templated SmolLM2-135M-Instruct prompts, fixed texts in this file):
    edit    "rewrite this text, ..." over a given ~200-token passage: the answer copies spans of the
            prompt, so n-gram lookup proposes tokens the target accepts
    open    open questions with nothing to copy: proposals are rare and mostly rejected
Batch 1 (requests one after another), batch 8 and batch 32 (that many requests at once, the prompts
cycled): at 8 the default still speculates, at 32 it does not.

Configurations: plain; ngram k=4 (lookup 2..4, off above 8 decoding requests: the default);
ngram k=4 with the batch cut-off disabled (what speculating at batch 32 would cost). With
--vllm-python, vLLM-CPU runs the same token-id prompts (its LLMEngine stepped the same way, timed the
same way) plain and with its n-gram speculation (k=4, lookup 2..4) on the Hugging Face directory
--hf-model (../shared/PEERS.md).

    .venv/bin/python benchmarks/spec_decode.py [--dtype float32] [--reps 2] [--out benchmarks/results/spec_decode.json]
        [--vllm-python VLLM_ENV/bin/python --hf-model SMOLLM2_HF_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import TypedDict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
DEFAULT_OUT = os.path.join(HERE, "results", "spec_decode.json")
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_KVCACHE_SPACE": "4",
}

PASSAGES = [
    "The lighthouse stood on a rock at the mouth of the bay. Every evening the keeper climbed the ninety "
    "steps, trimmed the wick, wound the clockwork that turned the lens, and wrote the weather in a book. "
    "Ships that passed at night saw the beam sweep across the water every twelve seconds. In winter the "
    "spray froze on the windows, and the keeper scraped the glass with a knife so that the light would "
    "not be dimmed. When the lamp was replaced by an electric one, the keeper stayed on for a year to "
    "show the engineers where the cables should run, and then he moved to a house in the village.",
    "To make bread, mix five hundred grams of flour with ten grams of salt and seven grams of dried "
    "yeast. Add three hundred and fifty millilitres of warm water and stir until the dough comes "
    "together. Knead it on a floured table for ten minutes, until it is smooth and springs back when "
    "pressed. Leave it in a covered bowl for an hour, until it has doubled in size. Shape it into a "
    "loaf, put it in a tin, and let it rise again for thirty minutes. Bake it at two hundred and twenty "
    "degrees for thirty minutes, until the crust is brown and the loaf sounds hollow when tapped.",
    "The committee met on Tuesday to review the budget for the new library. The architect presented "
    "three designs: a single large reading room, a building of four floors with smaller rooms, and a "
    "renovation of the old post office. The first design was the cheapest to heat, the second gave the "
    "most shelf space, and the third kept a building that many residents wanted to save. After a long "
    "discussion the committee asked the architect to cost the third design in detail and to report "
    "back at the next meeting, which will be held in the town hall at seven in the evening.",
    "A river starts as rain that falls on hills and mountains. The water runs down the slopes in small "
    "streams, which join to form larger ones. As the river flows towards the sea it carries sand, mud "
    "and stones, and it cuts a valley into the land. Where the ground is flat the river slows down, "
    "bends from side to side, and drops some of what it carries. Near the sea it may split into many "
    "channels, forming a delta of islands and marshes where birds and fish find food and shelter.",
]
EDIT_ASKS = [
    "Rewrite the text above exactly, but in the past tense where it is in the present tense.",
    "Copy the text above, replacing every number written in words with digits.",
    "Rewrite the text above word for word, correcting any mistakes.",
    "Repeat the text above, adding a title at the start.",
]
OPEN_ASKS = [
    "Write a short story about a cat who learns to play the piano.",
    "Explain why the sky is blue to a ten-year-old.",
    "What are five good habits for staying healthy? Explain each one.",
    "Describe a day in the life of a farmer in the year 1800.",
    "Give advice to someone starting their first job.",
    "Why do people like to travel? Give several reasons.",
    "Write a letter to a friend about your summer holiday.",
    "What would happen if the moon disappeared?",
]


def messages(workload: str) -> list[list[dict]]:
    if workload == "edit":
        return [[{"role": "user", "content": f"{p}\n\n{a}"}] for p in PASSAGES for a in EDIT_ASKS[:2]]
    return [[{"role": "user", "content": a}] for a in OPEN_ASKS]


RESULT = "RESULT "
CONFIGS = {
    "plain": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
    "ngram-always": {"method": "ngram", "num_speculative_tokens": 4, "disable_batch_size": 0},
    "vllm-plain": None,
    "vllm-ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
}


def encode_prompts(path: str) -> None:
    """Every workload's prompts as token ids (Tandem's tokenizer and chat template), for both engines."""
    from engine.llm import LLM
    from engine.loader import load_model_source

    source = load_model_source("")
    enc = LLM.__new__(LLM)
    enc.engine = type("E", (), {"tokenizer": source.tokenizer, "model_config": source.config})()
    enc.tokenizer = source.tokenizer
    with open(path, "w") as f:
        json.dump({w: [enc.encode(m) for m in messages(w)] for w in ("edit", "open")}, f)


def timed_run(add, step, unfinished, group: list[list[int]]) -> tuple[list[float], list[float], float, int]:
    """Run `group` at once; per-token ITL (a step's n tokens of a request after gap g: n x g / n) and TPOT."""
    last: dict[str, float] = {}
    first: dict[str, float] = {}
    counts: dict[str, int] = {}
    itl: list[float] = []
    t0 = time.perf_counter()
    ids = [add(p) for p in group]
    while unfinished():
        deltas = step()
        now = time.perf_counter()
        for rid, n in deltas:
            if n == 0:
                continue
            if rid not in last:
                first[rid] = now
                itl.extend([0.0] * (n - 1))
            else:
                itl.extend([(now - last[rid]) / n] * n)
            last[rid] = now
            counts[rid] = counts.get(rid, 0) + n
    wall = time.perf_counter() - t0
    tpot = [(last[r] - first[r]) / (counts[r] - 1) for r in ids]
    return itl, tpot, wall, sum(counts.values())


# ---- worker side -------------------------------------------------------------------------------------------------

TANDEM_VARIANTS = {"plain": (0, 0), "ngram": (4, 8), "ngram-always": (4, 0)}  # (spec tokens, disable batch size)


class VariantTotals(TypedDict):
    """One variant's measurements over every run of `tandem_worker`."""

    itl: list[float]
    tpot: list[float]
    wall: float
    tokens: int
    spec: list[int]  # spec steps, proposed, accepted


def tandem_worker(dtype: str, max_tokens: int, batch: int, prompts: list[list[int]], reps: int) -> dict:
    """Every Tandem variant on ONE engine (n-gram proposer, k=4, lookup 2..4), interleaved request by request
    (batch 1) or group by group, rotating the order: the machine's slow and fast phases hit all alike.
    A variant sets the scheduler's proposal slots and batch cut-off; plain gives no slots, so its steps
    are plain decode steps."""
    from common.sampling_params import SamplingParams
    from engine.config import CacheConfig, EngineConfig, SpeculativeConfig
    from engine.engine_core import EngineCore

    core = EngineCore(
        EngineConfig(
            model="",
            dtype=dtype,
            cache=CacheConfig(kv_cache_memory_bytes=2 << 30),
            speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=4),
        )
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def step():
        return [(o.request_id, len(o.new_token_ids)) for o in core.step()]

    def add(p):
        return core.add_request(p, params)

    timed_run(add, step, core.has_unfinished_requests, [prompts[0]])  # warm-up
    variants = [v for v in TANDEM_VARIANTS if batch > 1 or v != "ngram-always"]
    acc: dict[str, VariantTotals] = {
        v: {"itl": [], "tpot": [], "wall": 0.0, "tokens": 0, "spec": [0, 0, 0]} for v in variants
    }
    groups = [[p] for p in prompts] * reps if batch == 1 else [[prompts[i % len(prompts)] for i in range(batch)]] * reps
    for i, group in enumerate(groups):
        for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
            core.scheduler.spec_tokens, core.scheduler.spec_disable_batch_size = TANDEM_VARIANTS[v]
            before = (core.spec_steps, core.spec_proposed, core.spec_accepted)
            itl, tpot, wall, tokens = timed_run(add, step, core.has_unfinished_requests, group)
            a = acc[v]
            a["itl"] += itl
            a["tpot"] += tpot
            a["wall"] += wall
            a["tokens"] += tokens
            for j, (x, y) in enumerate(zip((core.spec_steps, core.spec_proposed, core.spec_accepted), before)):
                a["spec"][j] += x - y
    return {v: summarize(a["itl"], a["tpot"], a["wall"], a["tokens"], *a["spec"]) for v, a in acc.items()}


def summarize(itl, tpot, wall, tokens, steps, proposed, accepted) -> dict:
    return {
        "itl_p50_ms": 1e3 * statistics.median(itl),
        "itl_p90_ms": 1e3 * _pct(itl, 0.9),
        "tpot_mean_ms": 1e3 * statistics.fmean(tpot),
        "tokens_per_s": tokens / wall,
        "requests": len(tpot),
        "acceptance_length": 1 + accepted / steps if steps else None,
        "proposed": proposed,
        "accepted": accepted,
        "verify_steps": steps,
    }


def worker(
    config: str,
    dtype: str,
    max_tokens: int,
    batch: int,
    workload: str,
    prompts_path: str,
    hf_model: str | None,
    reps: int,
) -> dict:
    """One process: "tandem" (every Tandem variant, interleaved) or a vLLM configuration."""
    with open(prompts_path) as f:
        prompts = json.load(f)[workload]
    if config.startswith("vllm"):
        from vllm import LLM, SamplingParams

        spec = CONFIGS[config]
        llm = LLM(
            model=hf_model,
            dtype=dtype,
            enforce_eager=True,
            max_model_len=2048,
            seed=0,
            **({"speculative_config": spec} if spec else {}),
        )
        eng = llm.llm_engine
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        seen: dict[str, int] = {}
        ids = iter(range(1 << 30))

        def add(p):
            rid = f"r{next(ids)}"
            seen[rid] = 0
            eng.add_request(rid, {"prompt_token_ids": p}, params)
            return rid

        def step():
            out = []
            for o in eng.step():
                n = len(o.outputs[0].token_ids)
                out.append((o.request_id, n - seen[o.request_id]))
                seen[o.request_id] = n
            return out

        unfinished = eng.has_unfinished_requests
    else:
        return tandem_worker(dtype, max_tokens, batch, prompts, reps)
    timed_run(add, step, unfinished, [prompts[0]])  # warm-up
    itl: list[float] = []
    tpot: list[float] = []
    wall = 0.0
    tokens = 0
    groups = [[p] for p in prompts] * reps if batch == 1 else [[prompts[i % len(prompts)] for i in range(batch)]] * reps
    for group in groups:
        a, b, w, n = timed_run(add, step, unfinished, group)
        itl += a
        tpot += b
        wall += w
        tokens += n
    return {config: summarize(itl, tpot, wall, tokens, 0, 0, 0)}


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- driver ------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2, help="passes over the prompts (batch 1) or groups (batch > 1)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--vllm-python", default=None, help="vLLM-CPU's python (../shared/PEERS.md); off when unset")
    ap.add_argument("--hf-model", default=None, help="SmolLM2 as a Hugging Face directory, for vLLM")
    ap.add_argument("--worker", nargs=4, metavar=("CONFIG", "BATCH", "WORKLOAD", "PROMPTS"), help=argparse.SUPPRESS)
    ap.add_argument("--encode", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.encode:
        encode_prompts(args.encode)
        return
    if args.worker:
        config, batch, workload, prompts_path = args.worker
        result = worker(
            config, args.dtype, args.max_tokens, int(batch), workload, prompts_path, args.hf_model, args.reps
        )
        print(RESULT + json.dumps(result), flush=True)  # engines log to stdout too: the driver looks for RESULT
        return
    if args.vllm_python and not args.hf_model:
        ap.error("--vllm-python needs --hf-model (vLLM loads a Hugging Face directory)")
    prompts_path = os.path.join(os.path.dirname(args.out) or ".", "spec_decode_prompts.json")
    os.makedirs(os.path.dirname(prompts_path) or ".", exist_ok=True)
    subprocess.run([sys.executable, __file__, "--encode", prompts_path], check=True)
    cases = [("edit", 1), ("open", 1), ("edit", 8), ("open", 8), ("edit", 32), ("open", 32)]
    results: dict[str, dict[str, dict]] = {}
    for workload, batch in cases:
        procs = ["tandem"] + (["vllm-plain", "vllm-ngram"] if args.vllm_python and batch != 8 else [])
        for config in procs:
            python = args.vllm_python if config.startswith("vllm") else sys.executable
            env = {**os.environ, **(VLLM_ENV if config.startswith("vllm") else {})}
            out = subprocess.run(
                [
                    python,
                    __file__,
                    "--dtype",
                    args.dtype,
                    "--max-tokens",
                    str(args.max_tokens),
                    "--reps",
                    str(args.reps),
                    *(["--hf-model", args.hf_model] if args.hf_model else []),
                    "--worker",
                    config,
                    str(batch),
                    workload,
                    prompts_path,
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if out.returncode:
                raise SystemExit(f"{config} {workload} b{batch} failed:\n{out.stderr[-3000:]}")
            line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith(RESULT)), None)
            if line is None:
                raise SystemExit(f"{config} {workload} b{batch} printed no result:\n{out.stdout[-2000:]}")
            for name, r in json.loads(line[len(RESULT) :]).items():
                results.setdefault(f"{workload} b{batch}", {})[name] = r
                print(
                    f"{workload:4s} b{batch:<2d} {name:12s} ITL p50 {r['itl_p50_ms']:6.1f} ms  p90 "
                    f"{r['itl_p90_ms']:6.1f}  TPOT {r['tpot_mean_ms']:6.1f}  {r['tokens_per_s']:6.1f} tok/s  "
                    f"accept {r['acceptance_length']}",
                    flush=True,
                )
    table = []
    for case, by_config in results.items():
        for config, r in by_config.items():
            base = by_config["vllm-plain" if config.startswith("vllm") else "plain"]
            table.append(
                {
                    "case": case,
                    "config": config,
                    **r,
                    "itl_p50_speedup": base["itl_p50_ms"] / r["itl_p50_ms"],
                    "tpot_speedup": base["tpot_mean_ms"] / r["tpot_mean_ms"],
                    "throughput_ratio": r["tokens_per_s"] / base["tokens_per_s"],
                }
            )
    print(
        f"\n{'case':9s} {'config':12s} {'ITL p50':>8s} {'ITL p90':>8s} {'TPOT':>7s} {'tok/s':>7s} {'accept':>6s} "
        f"{'ITL p50 x':>9s} {'TPOT x':>7s} {'tput x':>7s}"
    )
    for r in table:
        acc = f"{r['acceptance_length']:.2f}" if r["acceptance_length"] else "-"
        print(
            f"{r['case']:9s} {r['config']:12s} {r['itl_p50_ms']:8.1f} {r['itl_p90_ms']:8.1f} {r['tpot_mean_ms']:7.1f} "
            f"{r['tokens_per_s']:7.1f} {acc:>6s} {r['itl_p50_speedup']:9.2f} {r['tpot_speedup']:7.2f} "
            f"{r['throughput_ratio']:7.2f}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"dtype": args.dtype, "max_tokens": args.max_tokens, "reps": args.reps, "table": table, "runs": results},
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
