"""A bounded soak of the served disaggregated cluster: many streams, client faults, one worker killed.

    Serving(2 prefill + 2 decode, SmolLM2 float32, max_inflight >= 4 x concurrency)
      -> --requests seeded requests over --concurrency client threads (benchmarks/soak_driver.py):
         prompts of 8..200 tokens (3 of 4 start with one of 4 shared prefixes), max_tokens 1..32,
         greedy, ignore_eos; --cancel-rate of them cancelled after a random number of chunks,
         --deadline-rate sent with a 0.05..2 s gRPC deadline
      -> when request N/2 is dispatched: the busiest worker of --kill's pool (the router's own
         in-flight count; ties: the first) is ray.kill'ed, no_restart = (--kill-mode permanent)
      -> every request ends: its status (OK, CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, ...), or
         HUNG when it had not ended --hang-s after its deadline / after the last dispatch
      -> settle: each worker waits until idle, then its leak check (integrity, no leaked block
         or lease): ok / busy / leak / dead, per worker
      -> reference: every --sample-every'th request, plus every request in flight at the kill, is
         sent again on the settled cluster; greedy float32 is batch-independent, so an OK reply
         must equal the rerun token for token and a cut-off one must be a prefix of it

The numbers: requests by status and by injected fault, hung, token mismatches, p50/p99
end-to-end latency and p99 TTFT (client side, OK requests), wall time, the worker checks.

    python benchmarks/soak.py                                  # defaults: 2000 requests (~11 min on 2 cores)
    python benchmarks/soak.py --requests 200 --concurrency 32  # smoke run
    python benchmarks/soak.py --kill prefill --kill-mode permanent

`run_soak(SoakOptions(...)) -> SoakResult` is the whole run (tests/e2e/test_soak.py calls it
with small numbers); the CLI only parses flags, prints and writes JSON (--out, default
benchmarks/results/soak.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from served_common import ScriptRun, dist  # noqa: E402 - the script's own folder is on sys.path
from soak_driver import HUNG, Outcome, StreamDriver, plan_requests  # noqa: E402

if TYPE_CHECKING:
    from deploy.cluster import Cluster
    from deploy.config import ServeConfig
    from deploy.serve import Serving

Log = Callable[[str], None]

ALLOWED = frozenset({"OK", "CANCELLED", "DEADLINE_EXCEEDED"})  # what a user may see; a dead worker costs a retry
REFERENCE_TIMEOUT_S = 120.0
ERRORS_KEPT = 5  # distinct messages kept per status


@dataclass(frozen=True)
class SoakOptions:
    requests: int = 2000  # ~11 min in all on 2 cores (0.3 s per request at 64 streams, + start and reruns)
    concurrency: int = 64
    prefill_replicas: int = 2
    decode_replicas: int = 2
    model: str = ""  # "": the shipped SmolLM2
    dtype: str = "float32"  # greedy tokens batch-independent: the reference check relies on it
    block_size: int = 16
    prefill_kv_memory: str = "256MiB"
    decode_kv_memory: str = "512MiB"  # one decode worker must hold the whole load once its peer dies
    num_cpus: float = 0.5  # Ray CPUs per worker
    conditional_prefill_threshold: int = 0  # 0: every prompt prefilled remotely (exercises every pull)
    prompt_tokens: tuple[int, int] = (8, 200)
    max_tokens: tuple[int, int] = (1, 32)
    cancel_rate: float = 0.05
    deadline_rate: float = 0.05
    kill: Literal["decode", "prefill", "none"] = "decode"
    kill_mode: Literal["restart", "permanent"] = "restart"
    hang_s: float = 60.0
    settle_s: float = 60.0  # how long each worker may take to become idle after the run
    sample_every: int = 10
    ref_concurrency: int = 8
    seed: int = 0
    ray_namespace: str = "tandem-soak"


@dataclass
class SoakResult:
    options: dict[str, Any]
    requests: int
    by_status: dict[str, int]
    by_fault: dict[str, dict[str, int]]  # injected fault -> status -> count
    hung: int
    faults: dict[str, Any]  # cancels / deadlines planned, the kill
    checked: int  # requests compared against a rerun
    mismatches: list[str]
    reference_errors: list[str]
    short_ok: list[str]  # OK streams with fewer tokens than max_tokens (ignore_eos: must not happen)
    latency_ok_s: dict[str, float]
    ttft_ok_s: dict[str, float]
    wall_s: float
    start_s: float
    settle_s: float  # from the run's end until every worker was idle and checked
    workers: dict[str, str]  # worker id -> ok | busy ... | leak: ... | dead
    errors: dict[str, list[str]]  # status -> a few distinct details (everything but OK)
    stuck_threads: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def unexpected(self) -> dict[str, int]:
        return {s: n for s, n in self.by_status.items() if s not in ALLOWED}

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "unexpected": self.unexpected}


def serve_config(o: SoakOptions) -> ServeConfig:
    from deploy.config import ServeConfig, with_overrides

    return with_overrides(
        ServeConfig(),
        **{
            "model": o.model,
            "ray_namespace": o.ray_namespace,
            "router.port": 0,
            "router.http_port": 0,
            "prefill.replicas": o.prefill_replicas,
            "decode.replicas": o.decode_replicas,
            "router.max_inflight": max(256, 4 * o.concurrency),
            "router.conditional_prefill_threshold": o.conditional_prefill_threshold,
            "router.slo_ttft_ms": 0,  # the fixed placement: threshold 0 sends every prompt through a pull
            "router.slo_itl_ms": 0,
            "prefill.kv_cache_memory": o.prefill_kv_memory,
            "decode.kv_cache_memory": o.decode_kv_memory,
            "both.dtype": o.dtype,
            "both.block_size": o.block_size,
            "both.num_cpus": o.num_cpus,
        },
    )


def run_soak(o: SoakOptions, log: Log = lambda msg: None) -> SoakResult:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # PLATFORM.md: Ray token auth is on by default
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from deploy.serve import Serving
    from tandem_api.client import TandemClient

    t0 = time.perf_counter()
    with Serving(serve_config(o)) as serving:
        start_s = time.perf_counter() - t0
        with TandemClient(serving.address) as control:
            vocab = control.server_info().vocab_size
        token_range = (100, min(vocab, 40000)) if vocab > 1000 else (3, vocab)  # clear of special tokens
        plans = plan_requests(
            o.requests,
            o.seed,
            token_range,
            prompt_tokens=o.prompt_tokens,
            max_tokens=o.max_tokens,
            cancel_rate=o.cancel_rate,
            deadline_rate=o.deadline_rate,
        )
        log(
            f"cluster up in {start_s:.1f} s ({serving.cluster.topology()}, vocab {vocab}); "
            f"{o.requests} requests over {o.concurrency} streams"
        )
        kill: dict[str, Any] = {}
        driver: StreamDriver  # on_dispatch reads it: the driver calls it only once running
        driver = StreamDriver(
            serving.address,
            plans,
            o.concurrency,
            o.hang_s,
            on_dispatch=lambda i: _maybe_kill(serving, o, i, kill, driver, log),
        )
        outcomes = driver.run()
        log(f"run done in {driver.wall_s:.1f} s: {dict(Counter(x.status for x in outcomes))}")
        t_settle = time.perf_counter()
        workers = check_workers(serving.cluster, o.settle_s)
        settle_s = time.perf_counter() - t_settle
        log(f"workers after the run ({settle_s:.1f} s to idle + leak check): {workers}")
        sample = [
            x
            for x in outcomes
            if x.status != HUNG
            and (x.tokens or x.status == "OK")
            and (x.plan.index % o.sample_every == 0 or x.in_flight_at_kill)
        ]
        mismatches, ref_errors = compare_with_reference(serving.address, sample, o.ref_concurrency)
        log(f"reference: {len(sample)} rerun, {len(mismatches)} mismatches, {len(ref_errors)} errors")
    return summarize(o, outcomes, driver, kill, workers, len(sample), mismatches, ref_errors, start_s, settle_s)


def _maybe_kill(
    serving: Serving, o: SoakOptions, index: int, kill: dict[str, Any], driver: StreamDriver, log: Log
) -> None:
    """On the dispatch of request N/2: kill the busiest worker of the chosen pool (once)."""
    if o.kill == "none" or index != o.requests // 2:
        return
    import ray

    try:
        pool_name = o.kill

        def loads(service) -> dict[str, int]:
            pool = service.decode if pool_name == "decode" else service.prefill
            return {s.worker_id: pool.in_flight(s.worker_id) for s in pool.slots}

        in_flight = serving.on_router(loads)
        handles = serving.cluster.decode if pool_name == "decode" else serving.cluster.prefill
        victim = max(handles, key=lambda h: in_flight.get(h.worker_id, 0))  # ties: the first
        open_now = driver.open_indices()
        ray.kill(victim.actor, no_restart=o.kill_mode == "permanent")
        for i in open_now:
            driver.outcomes[i].in_flight_at_kill = True
        kill.update(
            worker=victim.worker_id,
            pool=pool_name,
            mode=o.kill_mode,
            at_request=index,
            at_s=round(driver.now(), 3),
            router_in_flight=in_flight,
            open_requests=len(open_now),
        )
        log(
            f"killed {victim.worker_id} ({o.kill_mode}) at request {index}, {driver.now():.1f} s; "
            f"router in flight {in_flight}, {len(open_now)} requests open"
        )
    except Exception as exc:  # noqa: BLE001 - the soak goes on; the report says the kill failed
        kill.update(error=f"{type(exc).__name__}: {exc}")
        log(f"!!! kill failed: {kill['error']}")


def check_workers(cluster: Cluster, settle_s: float) -> dict[str, str]:
    """Per worker: wait until idle, then its leak check. Dead actors (a killed worker stays listed
    in the cluster) are reported, not raised: cluster.check_pools() would stop at the first one."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    idle_refs = {w.worker_id: w.actor.wait_idle.remote(settle_s) for w in cluster.workers}  # all wait together
    report: dict[str, str] = {}
    for w in cluster.workers:
        try:
            if not ray.get(idle_refs[w.worker_id], timeout=settle_s + 30):
                report[w.worker_id] = f"busy after {settle_s:.0f} s"
                continue
            ray.get(w.actor.leak_check.remote(), timeout=60)
            report[w.worker_id] = "ok"
        except RayActorError:
            report[w.worker_id] = "dead"
        except GetTimeoutError:
            report[w.worker_id] = "no answer"
        except Exception as exc:  # noqa: BLE001 - the leak check raises (AssertionError inside a RayTaskError)
            cause = getattr(exc, "cause", None) or exc
            report[w.worker_id] = "leak: " + " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
    return report


def compare_with_reference(address: str, sample: list[Outcome], concurrency: int) -> tuple[list[str], list[str]]:
    """Rerun each sampled prompt; an OK reply must equal the rerun, a cut-off one be a prefix of it."""
    import grpc

    from tandem_api.client import TandemClient

    client = TandemClient(address)

    def one(x: Outcome) -> tuple[str, str]:
        p = x.plan
        try:
            _, ref, _ = client.complete(
                token_ids=p.prompt,
                request_id=f"{p.request_id}-ref",
                max_tokens=p.max_tokens,
                temperature=0.0,
                ignore_eos=True,
                timeout=REFERENCE_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            return "error", f"{p.request_id}: {exc.code().name} {exc.details()}"
        got = x.tokens if x.status == "OK" else x.tokens[: len(ref)]
        want = ref if x.status == "OK" else ref[: len(x.tokens)]
        if got == want:
            return "ok", ""
        at = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        where = f"P {x.prefill_worker or '?'}, D {x.decode_worker or '?'}"
        killed = ", in flight at the kill" if x.in_flight_at_kill else ""
        return "mismatch", (
            f"{p.request_id} ({x.status}, {where}{killed}): first difference at token {at}: "
            f"soak {got[at : at + 4]} vs rerun {want[at : at + 4]} ({len(got)} vs {len(want)} tokens)"
        )

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, sample))
    finally:
        client.close()
    return [m for k, m in results if k == "mismatch"], [m for k, m in results if k == "error"]


def summarize(
    o: SoakOptions,
    outcomes: list[Outcome],
    driver: StreamDriver,
    kill: dict[str, Any],
    workers: dict[str, str],
    checked: int,
    mismatches: list[str],
    ref_errors: list[str],
    start_s: float,
    settle_s: float,
) -> SoakResult:
    def fault(x: Outcome) -> str:
        return "cancel" if x.plan.cancel_after is not None else "deadline" if x.plan.deadline_s is not None else "none"

    by_fault: dict[str, Counter] = {}
    errors: dict[str, list[str]] = {}
    for x in outcomes:
        status = x.status or "NONE"
        by_fault.setdefault(fault(x), Counter())[status] += 1
        if status == "OK" or (status == "CANCELLED" and fault(x) == "cancel"):
            continue  # nothing to explain: it worked, or we cancelled it
        kept = errors.setdefault(status, [])
        if len(kept) < ERRORS_KEPT and not any(k.endswith(f": {x.detail}") for k in kept):
            kept.append(f"{x.plan.request_id}: {x.detail}")
    if "worker" in kill:  # where the first response said it ran (a resumed request keeps its first workers)
        on_victim = [
            x for x in outcomes if x.in_flight_at_kill and kill["worker"] in (x.prefill_worker, x.decode_worker)
        ]
        kill["on_victim"] = dict(Counter(x.status or "NONE" for x in on_victim))
    ok = [x for x in outcomes if x.status == "OK"]
    short = [
        f"{x.plan.request_id}: {len(x.tokens)} of {x.plan.max_tokens} tokens, {x.finish_reason}"
        for x in ok
        if len(x.tokens) != x.plan.max_tokens or x.finish_reason != "FINISH_REASON_LENGTH"
    ]
    rows = [
        {
            "request_id": x.plan.request_id,
            "fault": fault(x),
            "status": x.status,
            "detail": x.detail,
            "prompt_tokens": len(x.plan.prompt),
            "max_tokens": x.plan.max_tokens,
            "tokens": len(x.tokens),
            "deadline_s": x.plan.deadline_s,
            "cancel_after": x.plan.cancel_after,
            "started_s": x.started_s,
            "ttft_s": x.ttft_s,
            "latency_s": x.latency_s,
            "prefill_worker": x.prefill_worker,
            "decode_worker": x.decode_worker,
            "in_flight_at_kill": x.in_flight_at_kill,
        }
        for x in outcomes
    ]
    return SoakResult(
        options=dataclasses.asdict(o),
        requests=len(outcomes),
        by_status=dict(Counter(x.status or "NONE" for x in outcomes).most_common()),
        by_fault={f: dict(c.most_common()) for f, c in sorted(by_fault.items())},
        hung=sum(x.status == HUNG for x in outcomes),
        faults={
            "cancels": sum(x.plan.cancel_after is not None for x in outcomes),
            "deadlines": sum(x.plan.deadline_s is not None for x in outcomes),
            "kill": kill or None,
        },
        checked=checked,
        mismatches=mismatches,
        reference_errors=ref_errors,
        short_ok=short,
        latency_ok_s=dist([x.latency_s for x in ok]),
        ttft_ok_s=dist([x.ttft_s for x in ok if x.ttft_s is not None]),
        wall_s=driver.wall_s,
        start_s=start_s,
        settle_s=settle_s,
        workers=workers,
        errors=errors,
        stuck_threads=driver.stuck_threads,
        rows=rows,
    )


# -- CLI ---------------------------------------------------------------------------------------------------------


def print_table(r: SoakResult) -> None:
    ms = 1e3
    kill = r.faults["kill"] or {}
    kill_s = (
        f"{kill['worker']} ({kill['mode']}) at request {kill['at_request']}, {kill['at_s']:.1f} s, "
        f"{kill['open_requests']} open, of which on it: {kill['on_victim']}"
        if "worker" in kill
        else kill.get("error", "none")
    )
    lines = [
        ("requests", f"{r.requests} ({r.options['concurrency']} streams)"),
        ("by status", ", ".join(f"{s} {n}" for s, n in r.by_status.items())),
        *((f"  fault {f}", ", ".join(f"{s} {n}" for s, n in c.items())) for f, c in r.by_fault.items()),
        ("hung", f"{r.hung}" + (f" (threads stuck: {r.stuck_threads})" if r.stuck_threads else "")),
        ("faults injected", f"{r.faults['cancels']} cancels, {r.faults['deadlines']} deadlines, kill {kill_s}"),
        (
            "token mismatches",
            f"{len(r.mismatches)} of {r.checked} checked"
            + (f" ({len(r.reference_errors)} reruns failed)" if r.reference_errors else ""),
        ),
        ("short OK streams", f"{len(r.short_ok)}"),
        (
            "OK latency",
            f"p50 {r.latency_ok_s['p50'] * ms:.0f} ms, p99 {r.latency_ok_s['p99'] * ms:.0f} ms "
            f"(n {r.latency_ok_s['n']})",
        ),
        ("OK TTFT", f"p50 {r.ttft_ok_s['p50'] * ms:.0f} ms, p99 {r.ttft_ok_s['p99'] * ms:.0f} ms"),
        ("wall", f"{r.wall_s:.1f} s (cluster start {r.start_s:.1f} s)"),
        ("workers after", ", ".join(f"{w} {s}" for w, s in r.workers.items()) + f" (settled in {r.settle_s:.1f} s)"),
        ("outside {OK, CANCELLED, DEADLINE_EXCEEDED}", f"{r.unexpected or 'none'}"),
    ]
    width = max(len(k) for k, _ in lines)
    print()
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    for status, details in r.errors.items():
        for d in details:
            print(f"  {status}: {d}")
    for m in (r.mismatches + r.reference_errors + r.short_ok)[:10]:
        print(f"!!! {m}")


def main() -> None:
    d = SoakOptions()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=d.requests)
    ap.add_argument("--concurrency", type=int, default=d.concurrency)
    ap.add_argument("--prefill-replicas", type=int, default=d.prefill_replicas)
    ap.add_argument("--decode-replicas", type=int, default=d.decode_replicas)
    ap.add_argument("--model", default=d.model, help='"" = the shipped SmolLM2')
    ap.add_argument("--dtype", default=d.dtype)
    ap.add_argument("--prefill-kv-memory", default=d.prefill_kv_memory)
    ap.add_argument("--decode-kv-memory", default=d.decode_kv_memory)
    ap.add_argument("--num-cpus", type=float, default=d.num_cpus, help="Ray CPUs per worker")
    ap.add_argument("--conditional-prefill-threshold", type=int, default=d.conditional_prefill_threshold)
    ap.add_argument("--cancel-rate", type=float, default=d.cancel_rate)
    ap.add_argument("--deadline-rate", type=float, default=d.deadline_rate)
    ap.add_argument("--kill", choices=["decode", "prefill", "none"], default=d.kill)
    ap.add_argument("--kill-mode", choices=["restart", "permanent"], default=d.kill_mode)
    ap.add_argument("--hang-s", type=float, default=d.hang_s)
    ap.add_argument("--sample-every", type=int, default=d.sample_every)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.json"))
    args = ap.parse_args()
    opts = SoakOptions(**{k: v for k, v in vars(args).items() if k != "out"})

    frame = ScriptRun()
    result = run_soak(opts, log=lambda msg: print(msg, flush=True))
    print_table(result)
    print()
    frame.finish(args.out, result.to_json())


if __name__ == "__main__":
    main()
