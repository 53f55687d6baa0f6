"""`tandem profile`: measure the configured cluster's workers and served path; write profile.json.

    tandem profile [--config FILE] [--model PATH] [--mode disaggregated|aggregated] --output profile.json
                   [--append] [--quick] [-v]
    tandem profile --refit --output profile.json

    config -> Serving (the cluster and its router, as `tandem serve` starts them; gRPC on a free port
              of 127.0.0.1, no HTTP door, no TLS or tokens)
      1. per distinct worker shape of the pools (planner.profile.Shape), one worker runs the step sweep
         (WorkerAPI.profile, worker_core/profiling.py), one worker at a time on an idle cluster
         -> planner.model.fit_step_model -> WorkerProfile (KV blocks and dtype from the worker's status)
      2. sequential requests through the router (prompts of ServedPlan.blocks decode blocks, random
         token ids, ignore_eos): the decode worker's kv_transfer_s -> fit_transfer_model, and the
         client's TTFT and inter-token gaps -> ServedOverhead (deploy/profiling.py)
    -> planner.profile.Profile (merged into the existing file with --append) -> save_profile

`--quick` runs a few points of each kind (tests, a first look). `--refit` starts no cluster: it refits each
worker's step model (and its decode grid) from the step samples the file holds, after a change to the model
code; the served-path figures are kept as measured. Bad input (an unreadable config or
profile, a missing output directory) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, cast

import msgspec

if TYPE_CHECKING:
    from common.contract import ProfilePlan, WorkerStatus
    from deploy.config import ServeConfig
    from deploy.profiling import ServedPlan, ServedRecord
    from deploy.serve import Serving
    from planner.profile import Profile

log = logging.getLogger(__name__)

PROFILE_TIMEOUT_S = 1800.0  # one worker's step sweep (the default plan takes ~1.5 min on 1 CPU thread)
REQUEST_TIMEOUT_S = 300.0


def add_profile_parser(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="measure the workers' step times, KV capacity, transfer and served-path overhead (profile.json)",
    )
    p.add_argument("--config", help="YAML/JSON/TOML ServeConfig file: the pools to profile (default: tandem serve's)")
    p.add_argument("--model", help="HF directory or .gguf file (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--mode", choices=["disaggregated", "aggregated"])
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="where to write the profile (JSON)")
    p.add_argument("--append", action="store_true", help="merge into FILE's profile (its other shapes are kept)")
    p.add_argument("--quick", action="store_true", help="a few points of each kind (seconds, not minutes)")
    p.add_argument(
        "--refit", action="store_true", help="refit FILE's step models from the samples it holds (no cluster)"
    )
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="profile on an existing Ray cluster (default: $RAY_ADDRESS, else a local one)",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def profile_config(args: argparse.Namespace) -> tuple[ServeConfig, list[str]]:
    """The ServeConfig profiled: the file and flags, with the router on a free local port, gRPC only, no TLS
    and no tokens (it serves only this command); and a note when that changed the served path."""
    from msgspec.structs import replace

    from deploy.config import ServeConfig, load_config, with_overrides

    base = load_config(args.config) if args.config else ServeConfig()
    config = with_overrides(
        base,
        model=args.model,
        mode=args.mode,
        ray_address=args.ray_address,
        **{"router.host": "127.0.0.1", "router.port": 0, "router.http": False},
    )
    r = config.router
    if not (r.tls_cert or r.auth_token_file):
        return config, []
    r = replace(r, tls_cert=None, tls_key=None, tls_client_ca=None, auth_token_file=None)
    return replace(config, router=r), ["the served path was measured without the TLS and tokens the config sets"]


def run_profile(args: argparse.Namespace) -> int:
    from planner.profile import ProfileError, load_profile, save_profile

    out = Path(args.output)
    if not out.parent.is_dir():
        print(f"error: --output {out}: directory {out.parent} does not exist", file=sys.stderr)
        return 2
    if args.refit:
        return refit_profile(out)
    existing = None
    if args.append and out.exists():
        try:
            existing = load_profile(out)
        except ProfileError as e:
            print(f"error: --append: {e}", file=sys.stderr)
            return 2
    config, notes = profile_config(args)  # ConfigError: exit 2 in deploy.cli.main
    from common.contract import ProfilePlan
    from deploy.profiling import ServedPlan, format_table
    from deploy.serve import Serving
    from planner.model import ModelFitError

    plan, served = (ProfilePlan.quick(), ServedPlan.quick()) if args.quick else (ProfilePlan(), ServedPlan())
    t0 = time.perf_counter()
    with Serving(config) as serving:
        try:
            profile = measure(serving, plan, served)
        except ModelFitError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    profile.notes.extend(notes)
    if existing is not None:
        try:
            profile = existing.merged(profile)
        except ProfileError as e:
            print(f"error: --append: {e}", file=sys.stderr)
            return 2
    save_profile(profile, out)
    print(format_table(profile))
    print(f"tandem: profile written to {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


def refit_profile(path: Path) -> int:
    """`--refit`: every worker's step model fitted again from its stored samples; the file rewritten."""
    from deploy.profiling import format_table
    from planner.model import ModelFitError, fit_step_model, with_decode_grid
    from planner.profile import ProfileError, load_profile, save_profile

    try:
        profile = load_profile(path)
    except ProfileError as e:
        print(f"error: --refit: {e}", file=sys.stderr)
        return 2
    workers = []
    for w in profile.workers:
        if not w.samples:
            print(f"error: --refit: {w.shape.key()} holds no step samples to refit", file=sys.stderr)
            return 2
        try:
            workers.append(msgspec.structs.replace(w, step=with_decode_grid(fit_step_model(w.samples), w.samples)))
        except ModelFitError as e:
            print(f"error: --refit: {w.shape.key()}: {e}", file=sys.stderr)
            return 1
    profile.workers = workers
    profile.notes.append(
        "step models refitted from the stored samples (tandem profile --refit); the served path's per-token "
        "figure was derived from the earlier model's batch-1 decode step and is kept as it was"
    )
    save_profile(profile, path)
    print(format_table(profile))
    print(f"tandem: profile refitted in {path}", flush=True)
    return 0


def measure(serving: Serving, plan: ProfilePlan, served: ServedPlan) -> Profile:
    """Steps of one worker per distinct shape, then the served path; a Profile (deploy/profiling.py)."""
    import ray

    from deploy.cluster import CALL_TIMEOUT_S
    from deploy.profiling import CORUN_ROUNDS, served_overhead, shape_of, transfer_model, worker_profile
    from planner.model import TransferModel
    from planner.profile import Profile
    from tandem_api.bench.report import machine_info

    cluster = serving.cluster
    cfg = cluster.config
    workers: dict = {}
    pools: dict[str, str] = {}
    notes = [
        f"the first {plan.warmup_steps} engine steps of each worker's sweep were warm-up, not fitted",
        "decode steps: each row owns its context's KV blocks, admitted as if prefilled elsewhere (no B x C tokens of "
        "prefill, and no shared prefix kept hot in the CPU's caches)",
    ]
    for name, pool, handles in (("prefill", cfg.prefill, cluster.prefill), ("decode", cfg.decode, cluster.decode)):
        handle = handles[0]
        status = cast("WorkerStatus", ray.get(handle.actor.status.remote(), timeout=CALL_TIMEOUT_S))
        key = shape_of(pool, status).key()
        pools[name] = key
        if key in workers:
            first = workers[key]
            if (first.num_blocks, first.max_num_seqs, first.max_num_batched_tokens, first.prefill_join_tokens) != (
                status.kv_blocks_total,
                pool.max_num_seqs,
                pool.max_num_batched_tokens,
                pool.join_tokens,
            ):
                notes.append(f"pool {name} has shape {key} with other limits than the pool profiled with it")
            continue
        print(f"tandem: profiling {handle.worker_id} ({key}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        timings = ray.get(handle.actor.profile.remote(plan), timeout=PROFILE_TIMEOUT_S)
        workers[key] = worker_profile(pool, status, timings, plan.warmup_steps)
        log.info("%s: %d steps in %.1f s", handle.worker_id, len(timings), time.perf_counter() - t0)
    if cfg.mode == "aggregated":
        pools["aggregated"] = pools["decode"]
    by_pool = {name: workers[key] for name, key in pools.items()}
    print("tandem: measuring the served path ...", file=sys.stderr, flush=True)
    cpu0 = time.process_time()  # the router and this client run in this process (deploy.serve.Serving)
    records = served_requests(serving.address, cluster, served, by_pool["decode"].shape.block_size)
    router_cpu = time.process_time() - cpu0
    tokens = sum(len(r.token_times) for r in records) or 1
    disagg = cfg.mode == "disaggregated"
    transfer = transfer_model(records, by_pool["decode"].shape.block_size) if disagg else None
    if transfer is None:
        notes.append("aggregated mode: no KV transfer, the transfer model is left at its default")
    elif not transfer.samples:
        notes.append("no request reported a KV transfer: the transfer model is left at its default")
    notes.append(
        "served path: sequential requests, the first left out as warm-up; TTFT less the step model's "
        "prefill (the transfer is in token 2's latency, not TTFT), inter-token gaps after token 2 less "
        "the step model's decode step"
    )
    notes.append(
        "not measured: preemption, queueing under load, speculative proposals (unless configured), "
        "prefix-cache hits on the served path"
    )
    overhead = served_overhead(records, by_pool)
    corun = measure_contention(cluster, plan.warmup_steps > 2)
    if corun is not None:
        found, per_host, sharing = corun
        overhead = msgspec.structs.replace(overhead, contention=found, workers_per_host=per_host, **sharing)
        notes.append(
            "contention: each role's steps measured while a worker of the same host ran a longer sweep "
            f"(decode beside prefill, prefill beside decode), {CORUN_ROUNDS} rounds pooled: {found}"
        )
        if sharing:
            notes.append(
                f"core sharing: the prefill sweep on {sharing['widen_threads']} threads (the decode worker idle) "
                f"against its own, step by step: {sharing['widened_prefill_speedup']:.2f}x; the decode pool lends "
                f"within {sharing['lend_tpot_s'] * 1000:.0f} ms per output token"
            )
    else:
        notes.append("contention: not measured (the workers do not share a host, or there is one worker)")
    overhead = msgspec.structs.replace(
        overhead, router_cpu_per_token_s=router_cpu / tokens, host_cores=float(os.cpu_count() or 1)
    )
    notes.append(
        "router_cpu_per_token_s: CPU seconds of the router and the client per streamed token, over the "
        "served-path requests (one process); host_cores: this host's"
    )
    machine = machine_info()
    machine["torch_threads"] = {name: workers[key].shape.num_threads for name, key in pools.items()}
    return Profile(
        model=cluster.model.name if cluster.model is not None else cfg.model,
        workers=list(workers.values()),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine,
        transfer=transfer if transfer is not None else TransferModel(),
        overhead=overhead,
        pools=pools,
        notes=notes,
    )


def measure_contention(cluster, full: bool) -> tuple[dict[str, float], int, dict] | None:
    """(slowdown per busy neighbour by role, workers on the host, core sharing) from CORUN_ROUNDS pairs of co-runs of a
    prefill-pool and a decode-pool worker on one node (aggregated: two workers of the pool); None if no two
    share a node. Core sharing (ServedOverhead fields; empty when the pools do not share cores): the prefill
    sweep again on the host's cores, the decode worker idle, as a widened step runs."""
    import ray

    from deploy.cluster import CALL_TIMEOUT_S
    from deploy.profiling import (
        BUSY_DECODE,
        BUSY_PREFILL,
        CORUN_DECODE,
        CORUN_PREFILL,
        CORUN_ROUNDS,
        contention,
        widening,
    )

    cfg = cluster.config
    pair = (cluster.prefill[0], cluster.decode[0]) if cfg.mode == "disaggregated" else tuple(cluster.decode[:2])
    if len(pair) < 2 or not full:
        return None
    statuses = [ray.get(h.actor.status.remote(), timeout=CALL_TIMEOUT_S) for h in cluster.workers]
    nodes = [st.node_id for st in statuses]
    a, b = pair
    node_a = ray.get(a.actor.status.remote(), timeout=CALL_TIMEOUT_S).node_id
    if ray.get(b.actor.status.remote(), timeout=CALL_TIMEOUT_S).node_id != node_a:
        return None
    sharing: dict = {}
    borrow, _ = cfg.prefill.core_sharing("prefill", cfg.router.slo_itl_ms)
    _, lend_ms = cfg.decode.core_sharing("decode", cfg.router.slo_itl_ms)
    threads = os.cpu_count() or 1
    bases = sum(pool.replicas * (pool.num_threads or 1) for pool in (cfg.prefill, cfg.decode))
    cpu = cfg.prefill.device == "cpu" and cfg.prefill.world_size == 1
    widen = cfg.mode == "disaggregated" and borrow and cpu and bases <= threads
    widen = widen and threads > (cfg.prefill.num_threads or 1)
    wide = msgspec.structs.replace(CORUN_PREFILL, threads=threads)
    also = f" and a prefill widened onto {threads} threads" if widen else ""
    print(
        f"tandem: measuring contention between workers of one host{also} ({CORUN_ROUNDS} rounds) ...",
        file=sys.stderr,
        flush=True,
    )
    # each sweep alone, then beside the neighbour's longer sweep: decode on b while a prefills, prefill on a
    # while b decodes (and the prefill on the host's threads, b idle); the step-by-step ratio is the slowdown
    # (no model error in it). CORUN_ROUNDS rounds, the ratios of all pooled: one pair of sweeps falls in one
    # window of a shared VM, whose speed under load moves between minutes (docs/BENCHMARKS.md)
    d_skip, p_skip = CORUN_DECODE.warmup_steps, CORUN_PREFILL.warmup_steps
    d_alone, d_beside, p_alone, p_beside, p_wide = [], [], [], [], []
    for _ in range(CORUN_ROUNDS):
        d_alone += ray.get(b.actor.profile.remote(CORUN_DECODE), timeout=PROFILE_TIMEOUT_S)[d_skip:]
        _, beside = ray.get(
            [a.actor.profile.remote(BUSY_PREFILL), b.actor.profile.remote(CORUN_DECODE)], timeout=PROFILE_TIMEOUT_S
        )
        d_beside += beside[d_skip:]
        p_alone += ray.get(a.actor.profile.remote(CORUN_PREFILL), timeout=PROFILE_TIMEOUT_S)[p_skip:]
        beside, _ = ray.get(
            [a.actor.profile.remote(CORUN_PREFILL), b.actor.profile.remote(BUSY_DECODE)], timeout=PROFILE_TIMEOUT_S
        )
        p_beside += beside[p_skip:]
        if widen:
            p_wide += ray.get(a.actor.profile.remote(wide), timeout=PROFILE_TIMEOUT_S)[p_skip:]
    found = {"decode": contention(d_alone, d_beside, 0), "prefill": contention(p_alone, p_beside, 0)}
    if cfg.mode == "aggregated":
        found["aggregated"] = max(found.values())
    if widen:
        sharing = {
            "widened_prefill_speedup": widening(p_alone, p_wide, 0),
            "widen_threads": threads,
            "lend_tpot_s": lend_ms / 1000,
        }
    return found, sum(1 for n in nodes if n == node_a), sharing


def served_requests(address: str, cluster, plan: ServedPlan, block_size: int) -> list[ServedRecord]:
    """ServedPlan's requests one after the other through the router (the first: warm-up, left out)."""
    from deploy.profiling import ServedRecord
    from tandem_api.client import TandemClient

    info = cluster.model
    limit = min(info.max_model_len, info.kv_capacity_tokens) - plan.max_tokens - 1
    rng = random.Random(1)
    sizes = [b for _ in range(plan.repeats) for b in plan.blocks]
    records: list[ServedRecord] = []
    with TandemClient(address) as client:
        for i, blocks in enumerate([1, *sizes]):
            tokens = min(max(1, blocks * block_size - block_size // 2), limit)
            prompt = [rng.randrange(info.vocab_size) for _ in range(tokens)]
            times: list[float] = []
            first = last = None
            t0 = time.perf_counter()
            for last in client.generate(
                token_ids=prompt,
                max_tokens=plan.max_tokens,
                temperature=0.0,
                ignore_eos=True,
                timeout=REQUEST_TIMEOUT_S,
            ):
                first = first or last
                times.extend([time.perf_counter() - t0] * len(last.token_ids))
            if i == 0 or first is None or last is None or not times:
                continue
            records.append(
                ServedRecord(
                    prompt_tokens=last.usage.prompt_tokens or tokens,
                    ttft_s=times[0],
                    token_times=times,
                    kv_transfer_s=last.timings.kv_transfer_s,
                    prefill_pool=cluster.pool_name(first.prefill_worker or first.decode_worker),
                    decode_pool=cluster.pool_name(first.decode_worker),
                )
            )
    return records
