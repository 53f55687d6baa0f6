"""Where one engine step spends its time: a batch-1 decode step and a prefill chunk.

Two views of the same steps (issue 17's "measure first"):

1. Wall-clock split of `EngineCore.step()`: schedule, prepare (tensors of the
   step), model forward, sampler, and the rest (commit, token append, stop
   checks). Medians over `--steps` steps.
2. torch.profiler over the model forward, ops grouped by kind: matmuls (the
   projections and the LM head), attention (SDPA, the block gather, the KV
   write), norms, rope, elementwise (residual adds, silu * mul), and the time
   between ops that no op accounts for (Python and dispatch).

    .venv/bin/python benchmarks/profile_step.py                       # float32, 1 thread
    .venv/bin/python benchmarks/profile_step.py --dtype bfloat16 --threads 2

Writes JSON (`--out`) and prints both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.sampling_params import SamplingParams  # noqa: E402
from engine.llm import LLM  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile_step.json")

NATIVE = (
    "linear",
    "rms_norm",
    "silu_mul",
    "rope_",
    "paged_decode_attention",
    "paged_prefill_attention",
)  # engine/model/cpu_kernels.py

# op name -> kind; the first matching prefix wins
KINDS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm", "tandem::linear")),
    (
        "attention",
        (
            "tandem::paged_decode_attention",
            "tandem::paged_prefill_attention",
            "aten::_scaled_dot_product",
            "aten::scaled_dot_product",
            "aten::index_select",
            "aten::index_copy",
            "aten::index_put",
            "aten::_flash_attention",
            "aten::masked_fill",
        ),
    ),
    ("norm", ("tandem::rms_norm", "aten::rms_norm", "aten::_fused_rms_norm", "aten::rsqrt", "aten::pow", "aten::mean")),
    ("rope", ("tandem::rope_", "aten::cat", "aten::chunk", "aten::neg")),
    (
        "elementwise",
        (
            "tandem::silu_mul",
            "aten::add",
            "aten::mul",
            "aten::silu",
            "aten::sub",
            "aten::to",
            "aten::_to_copy",
            "aten::copy_",
            "aten::clone",
        ),
    ),
    ("embedding/index", ("aten::embedding", "aten::index", "aten::gather")),
]


def kind_of(name: str) -> str:
    for kind, prefixes in KINDS:
        if name.startswith(prefixes):
            return kind
    return "other"


def make_prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(17, 40000, (n,), generator=g).tolist()


def timed_steps(llm: LLM, prompt: list[int], steps: int, decode: bool) -> dict:
    """Run steps with the phases of EngineCore.step() timed one by one."""
    core = llm.engine
    phases: dict[str, list[float]] = {"schedule": [], "prepare": [], "forward": [], "sampler": [], "rest": []}
    params = SamplingParams(max_tokens=steps + 2 if decode else 1, temperature=0.0, ignore_eos=True)
    n = 0
    while n < steps:
        rid = f"p{n}-{time.monotonic_ns()}"
        core.add_request(make_prompt(len(prompt), n) if not decode else prompt, params, rid)
        if decode:
            core.step()  # the prefill, not measured
        while core.has_unfinished_requests() and n < steps:
            t0 = time.perf_counter()
            out = core.scheduler.schedule()
            t1 = time.perf_counter()
            batch = core.runner.prepare(out)
            t2 = time.perf_counter()
            logits = core.runner.execute(batch)
            t3 = time.perf_counter()
            sampled = core.sampler(logits, [s.request.sampling for s in batch.sample])
            t4 = time.perf_counter()
            for s in batch.order:
                req = s.request
                req.num_computed_tokens += s.num_new_tokens
                core.kv_manager.commit(req.request_id, req.token_ids, req.num_computed_tokens)
            now = time.monotonic()
            for s, tid, lp in zip(batch.sample, sampled.token_ids, sampled.logprobs):
                core._append_token(s.request, tid, lp, now)
            t5 = time.perf_counter()
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[k].append(v * 1e3)
            n += 1
        for rid_ in list(core.scheduler.requests):
            core.abort_request(rid_)
    return {k: statistics.median(v) for k, v in phases.items()}


def op_profile(llm: LLM, prompt: list[int], decode: bool, steps: int) -> dict:
    core = llm.engine
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    core.add_request(prompt, params, f"prof-{time.monotonic_ns()}")
    if decode:
        core.step()
    batches = []
    for _ in range(steps if decode else 1):
        batches.append(core.runner.prepare(core.scheduler.schedule()))
        break
    batch = batches[0]
    core.runner.execute(batch)  # warm
    from torch.profiler import ProfilerActivity, profile, record_function

    from engine.model import cpu_kernels

    # the native kernels are invisible to the profiler: label each call (restored below)
    originals = {name: getattr(cpu_kernels.CpuKernels, name) for name in NATIVE}

    def labelled(name, fn):
        def call(self, *args, **kwargs):
            with record_function(f"tandem::{name}"):
                return fn(self, *args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(cpu_kernels.CpuKernels, name, labelled(name, fn))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            core.runner.execute(batch)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    for name, fn in originals.items():
        setattr(cpu_kernels.CpuKernels, name, fn)
    for rid_ in list(core.scheduler.requests):
        core.abort_request(rid_)
    by_kind: dict[str, float] = {}
    by_op: dict[str, float] = {}
    calls = 0
    for e in prof.key_averages():
        # self time: an op's own time, children excluded, so kinds add up without double counting
        if not e.key.startswith(("aten::", "tandem::")):
            continue
        ms = e.self_cpu_time_total / 1e3 / steps
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + ms
        by_op[e.key] = ms
        calls += e.count
    accounted = sum(by_kind.values())
    by_kind["between ops (python, dispatch)"] = max(0.0, wall - accounted)
    top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12])
    return {"wall_ms": wall, "by_kind_ms": by_kind, "top_ops_ms": top, "aten_calls_per_step": calls / steps}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--context", type=int, default=256, help="prompt tokens before the decode steps")
    p.add_argument("--prefill", type=int, default=512, help="tokens of the prefill chunk")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    llm = LLM(a.model, dtype=a.dtype, kv_cache_memory_bytes=256 << 20)
    prompt = make_prompt(a.context, 12345)
    res = {"dtype": a.dtype, "threads": a.threads, "context": a.context, "prefill_tokens": a.prefill}
    res["decode_phases_ms"] = timed_steps(llm, prompt, a.steps, decode=True)
    res["prefill_phases_ms"] = timed_steps(llm, make_prompt(a.prefill, 7), max(3, a.steps // 10), decode=False)
    res["decode_ops"] = op_profile(llm, prompt, True, a.steps)
    res["prefill_ops"] = op_profile(llm, make_prompt(a.prefill, 99), False, max(3, a.steps // 10))
    for what in ("decode", "prefill"):
        ph = res[f"{what}_phases_ms"]
        total = sum(ph.values())
        print(f"\n{what} step ({a.dtype}, {a.threads} thread(s)): {total:.2f} ms")
        for k, v in ph.items():
            print(f"  {k:<12} {v:8.2f} ms  {100 * v / total:5.1f}%")
        ops = res[f"{what}_ops"]
        print(f"  forward under the profiler: {ops['wall_ms']:.2f} ms, {ops['aten_calls_per_step']:.0f} aten calls")
        for k, v in sorted(ops["by_kind_ms"].items(), key=lambda kv: -kv[1]):
            print(f"    {k:<32} {v:8.2f} ms  {100 * v / ops['wall_ms']:5.1f}%")
        print("    top ops: " + ", ".join(f"{k} {v:.2f}" for k, v in list(ops["top_ops_ms"].items())[:8]))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
