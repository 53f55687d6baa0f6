"""Tandem's engine against vLLM-CPU (and transformers' numbers stay in engine_vs_transformers.py), offline.

Each engine runs in its own process (Tandem from this repository's .venv, vLLM from
the environment given by --vllm-python, built as ../shared/PEERS.md says), alternating
engine order between repetitions; both load the same Hugging Face directory in the
same dtype. The read bandwidth is measured in the same run (best of 5 `torch.sum`
over 1 GiB, torch's default threads), and the batch-1 bound is bandwidth / weight bytes.

Per engine and repetition, with the same seeded random token prompts, greedy, EOS ignored:
    (a) batch-1 decode tok/s   (N - 1) / (t(N tokens) - t(1 token)) for one 128-token prompt, N = 128:
                               the same two-call method for both engines (no per-token timestamps needed)
    (b) output tok/s           64 requests x (128 prompt, 64 output) tokens in one generate call
    (c) 512-token prefill      wall time of generate(max_tokens=1) on a fresh 512-token prompt

    .venv/bin/python benchmarks/engine_vs_vllm.py --hf-model DIR --vllm-python VLLM_ENV/bin/python
    .venv/bin/python benchmarks/engine_vs_vllm.py --hf-model DIR            # Tandem alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
DEFAULT_OUT = os.path.join(HERE, "results", "engine_vs_vllm.json")
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_KVCACHE_SPACE": "4",
}


# ---- worker side: runs inside one engine's python -------------------------------------------------------------------


def prompts(seed: int, n: int, length: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(17, 40000) for _ in range(length)] for _ in range(n)]


def worker(engine: str, model: str, dtype: str, seed: int) -> dict:
    if engine == "tandem":
        sys.path.insert(0, ROOT)
        from common.sampling_params import SamplingParams
        from engine.llm import LLM

        llm = LLM(model, dtype=dtype, kv_cache_memory_bytes=2 << 30)

        def generate(batch: list[list[int]], max_tokens: int) -> list[list[int]]:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            return [o.token_ids for o in llm.generate(batch, params)]
    else:
        from vllm import LLM as VllmLLM
        from vllm import SamplingParams as VllmSamplingParams

        vllm_llm = VllmLLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=2048, seed=seed)

        def generate(batch: list[list[int]], max_tokens: int) -> list[list[int]]:
            params = VllmSamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            outs = vllm_llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

    def timed(batch, max_tokens):
        t = time.perf_counter()
        out = generate(batch, max_tokens)
        return time.perf_counter() - t, out

    timed(prompts(seed + 99, 2, 64), 8)  # warm-up: first-call allocations and lazy builds
    p1 = prompts(seed, 1, 128)
    # (a) decode: distinct prompts per call so no prefix cache turns one call into a hit of another
    t1, _ = timed(prompts(seed + 1, 1, 128), 1)
    tn, out = timed(p1, 128)
    decode = 127 / max(tn - t1, 1e-9)
    # (b) throughput
    batch = prompts(seed + 2, 64, 128)
    tb, outs = timed(batch, 64)
    throughput = sum(len(o) for o in outs) / tb
    # (c) prefill
    tc, _ = timed(prompts(seed + 3, 1, 512), 1)
    import torch

    return {
        "engine": engine,
        "decode_tok_s": decode,
        "throughput_tok_s": throughput,
        "prefill_512_s": tc,
        "first_tokens": out[0][:32],
        "threads": torch.get_num_threads(),
    }


# ---- parent ----------------------------------------------------------------------------------------------------------


def weight_bytes(model: str, dtype: str) -> int:
    """Bytes one batch-1 decode step reads (engine_vs_transformers' count, from the model's config)."""
    import torch

    from benchmarks.engine_vs_transformers import weight_bytes_per_token
    from engine.loader import load_model_source

    return weight_bytes_per_token(load_model_source(model).config, getattr(torch, dtype))


def run_one(python: str, engine: str, a: argparse.Namespace) -> dict:
    env = dict(os.environ, **(VLLM_ENV if engine == "vllm" else {}))
    cmd = [
        python,
        os.path.abspath(__file__),
        "--worker",
        engine,
        "--hf-model",
        a.hf_model,
        "--dtype",
        a.dtype,
        "--seed",
        str(a.seed),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} worker failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf-model", required=True, help="Hugging Face directory both engines load")
    p.add_argument("--vllm-python", default=None, help="python of a vLLM-CPU environment (../shared/PEERS.md)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--worker", choices=["tandem", "vllm"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.hf_model, a.dtype, a.seed)), flush=True)
        return
    engines = [("tandem", sys.executable)] + ([("vllm", a.vllm_python)] if a.vllm_python else [])
    from benchmarks.engine_vs_transformers import read_bandwidth

    bw = read_bandwidth(1024) / 1e9  # best of 5 torch.sum over 1 GiB
    wbytes = weight_bytes(a.hf_model, a.dtype)
    runs: list[dict] = []
    for rep in range(a.reps):
        for name, py in engines if rep % 2 == 0 else engines[::-1]:
            r = run_one(py, name, a)
            r["rep"] = rep
            print(
                f"rep {rep} {name}: decode {r['decode_tok_s']:.1f} tok/s, throughput {r['throughput_tok_s']:.1f} "
                f"tok/s, prefill 512 {r['prefill_512_s']:.3f} s",
                flush=True,
            )
            runs.append(r)
    bound = bw * 1e9 / wbytes
    summary: dict[str, dict] = {}
    for name, _ in engines:
        rs = [r for r in runs if r["engine"] == name]
        summary[name] = {
            k: statistics.median(r[k] for r in rs) for k in ("decode_tok_s", "throughput_tok_s", "prefill_512_s")
        }
        summary[name]["decode_share_of_bound"] = summary[name]["decode_tok_s"] / bound
    print(f"\nread bandwidth {bw:.1f} GB/s, weights {wbytes / 1e6:.0f} MB/token -> batch-1 bound {bound:.1f} tok/s")
    print("| metric | " + " | ".join(n for n, _ in engines) + (" | Tandem / vLLM |" if len(engines) > 1 else " |"))
    print("|---|" + "---:|" * (len(engines) + (1 if len(engines) > 1 else 0)))
    for key, label, better_low in (
        ("decode_tok_s", "batch-1 decode tok/s", False),
        ("decode_share_of_bound", "share of bound", False),
        ("throughput_tok_s", "64 x (128, 64) output tok/s", False),
        ("prefill_512_s", "512-token prefill s", True),
    ):
        vals = [summary[n][key] for n, _ in engines]
        row = f"| {label} | " + " | ".join(
            f"{v:.3f}" if key in ("prefill_512_s", "decode_share_of_bound") else f"{v:.1f}" for v in vals
        )
        if len(vals) > 1:
            ratio = vals[1] / vals[0] if better_low else vals[0] / vals[1]
            row += f" | {ratio:.2f}x"
        print(row + " |")
    if len(engines) > 1:
        same = [runs[0]["first_tokens"] == r["first_tokens"] for r in runs]
        print(f"first 32 tokens identical across engines and repetitions: {all(same)}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(
            {
                "read_bandwidth_gb_s": bw,
                "weight_bytes": wbytes,
                "bound_tok_s": bound,
                "runs": runs,
                "summary": summary,
                "dtype": a.dtype,
                "load_avg": os.getloadavg(),
                "date": time.strftime("%Y-%m-%d %H:%M"),
            },
            f,
            indent=1,
        )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
