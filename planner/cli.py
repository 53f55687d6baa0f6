"""`tandem simulate` and `tandem plan`: the cluster in simulated time, from a profile (`tandem profile`).

    tandem simulate --profile profile.json --prefill 1 --decode 1 --dataset random --input-len 256 \\
                    --output-len 64 --num-requests 200 --request-rate 0.3,0.5,0.7 --slo ttft_ms=4000,tpot_ms=200 \\
                    --output sim/
    tandem plan --profile profile.json --request-rate 1000 --dataset random --slo ttft_ms=2000,itl_ms=100 \\
                --max-workers 500 [--cost KEY=C,...] [--output plan/]

`simulate` takes the workload and load flags of `tandem bench` and writes the same summary.json and
requests.jsonl (and plots); `plan` prints the cheapest cluster per family and the winner, and writes
plan.json. Torch-free, Ray-free: runs where the benchmark client runs.
Exit status: 0 done, 2 bad flags or files, 1 no cluster meets the SLO (plan).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from planner.plan import Plan, Planner, PlanRequest
from planner.profile import Profile, ProfileError, load_profile
from planner.sim_prompts import SegmentPromptMaker
from planner.simulator import MODES, POLICIES, ClusterSpec, SimError, simulate
from router.placement import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS
from tandem_api.bench.arrivals import parse_rates
from tandem_api.bench.cli import (
    add_load_arguments,
    add_output_arguments,
    add_workload_arguments,
    dataset_options,
    load_config,
    planned_requests,
    run_summary,
)
from tandem_api.bench.datasets import DATASETS, DatasetError, build_dataset
from tandem_api.bench.metrics import SloError, parse_slo
from tandem_api.bench.report import json_rate, print_table, write_outputs
from tandem_api.bench.runner import LoadResult

DEFAULT_SIM_REQUESTS = 200


class UsageError(ValueError):
    pass


def _cluster_arguments(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("cluster")
    c.add_argument("--profile", required=True, metavar="FILE", help="profile.json written by `tandem profile`")
    c.add_argument("--mode", choices=MODES, default="disaggregated")
    c.add_argument("--prefill", type=int, default=1, help="prefill workers (aggregated: the workers)")
    c.add_argument("--decode", type=int, default=1, help="decode workers")
    c.add_argument("--prefill-shape", default=None, metavar="KEY", help="a shape of the profile (default: as profiled)")
    c.add_argument("--decode-shape", default=None, metavar="KEY")
    c.add_argument("--policy", choices=POLICIES, default="kv", help="the router's policy (default kv)")
    c.add_argument("--conditional-prefill-threshold", type=int, default=0, metavar="TOKENS")


def _placement_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slo-ttft-ms",
        type=float,
        default=DEFAULT_SLO_TTFT_MS,
        metavar="MS",
        help="the router's placement by SLO, as `tandem serve --slo-ttft-ms` (default %(default)g; 0 with "
        "--slo-itl-ms 0: the fixed placement)",
    )
    p.add_argument(
        "--slo-itl-ms",
        type=float,
        default=DEFAULT_SLO_ITL_MS,
        metavar="MS",
        help="its time per output token target, as `tandem serve --slo-itl-ms` (default %(default)g)",
    )


def add_simulate_parser(sub: Any) -> None:
    p = sub.add_parser("simulate", help="simulate a cluster from a profile (same summary.json as bench)")
    _cluster_arguments(p)
    add_workload_arguments(p)
    add_load_arguments(p)
    p.add_argument("--slo", default=None, metavar="KEY=MS,...", help="targets: ttft_ms, tpot_ms, itl_ms, e2el_ms")
    _placement_arguments(p)
    add_output_arguments(p)


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="the cheapest pool sizes and shapes that meet TTFT / ITL targets")
    p.add_argument("--profile", required=True, metavar="FILE", help="profile.json written by `tandem profile`")
    p.add_argument("--request-rate", type=float, required=True, metavar="R", help="requests per second to plan for")
    p.add_argument("--slo", required=True, metavar="KEY=MS,...", help="targets: ttft_ms, tpot_ms, itl_ms, e2el_ms")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet the SLO")
    p.add_argument("--max-workers", type=int, default=64, help="the largest cluster to consider (workers)")
    p.add_argument("--cost", default="", metavar="KEY=C,...", help="cost per worker of a profile shape")
    p.add_argument("--modes", default="disaggregated,aggregated", help="families to consider")
    p.add_argument("--policy", choices=POLICIES, default="kv")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-requests", type=int, default=None, help="requests per simulation (default: 60 s of load)")
    p.add_argument("--max-simulations", type=int, default=200)
    _placement_arguments(p)
    add_workload_arguments(p)
    p.add_argument("--output", metavar="DIR", help="plan.json")


def build_parser(prog: str = "tandem") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_parser(sub)
    add_plan_parser(sub)
    return parser


def _load(path: str) -> Profile:
    return load_profile(path)


def _check_workload(args: argparse.Namespace) -> None:
    if args.dataset not in DATASETS:
        raise DatasetError(f"--dataset: unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")


def run_simulate(args: argparse.Namespace) -> int:
    _check_workload(args)
    profile = _load(args.profile)
    slo = parse_slo(args.slo)
    if args.request_rate is None:
        rates: list[float | None] = [None] if args.dataset == "trace" else [math.inf]
    else:
        rates = list(parse_rates(args.request_rate))
    spec = ClusterSpec(
        mode=args.mode,
        prefill=args.prefill,
        decode=args.decode,
        prefill_shape=args.prefill_shape,
        decode_shape=args.decode_shape,
        policy=args.policy,
        conditional_prefill_threshold=args.conditional_prefill_threshold,
        slo_ttft_s=args.slo_ttft_ms / 1000,
        slo_tpot_s=args.slo_itl_ms / 1000,
    )
    num_requests = planned_requests(args, DEFAULT_SIM_REQUESTS)
    options = dataset_options(args, None)
    runs: list[dict[str, Any]] = []
    records = []
    for i, rate in enumerate(rates):
        dataset = build_dataset(args.dataset, options, SegmentPromptMaker(), args.seed, salt=i)
        cfg = load_config(args, rate, num_requests)
        t0 = time.perf_counter()
        result = simulate(profile, spec, dataset, cfg)
        wall = time.perf_counter() - t0
        meta = {
            "label": args.label,
            "target": {"kind": "simulator", "url": f"profile:{args.profile}"},
            "cluster": spec.describe(),
            "mode": spec.mode,
            "policy": spec.policy,
            "model": profile.model,
            "profile_machine": profile.machine,
            "simulated_workers": result.workers,
            "simulation_wall_s": wall,
            "simulation_events": result.events,
            "seed": args.seed,
            "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency,
        }
        run = run_summary(
            LoadResult(result.records, result.duration_s),
            slo,
            rate,
            dataset.name,
            dataset.params,
            meta,
            num_requests,
        )
        runs.append(run)
        records.append(result.records)
    print_table(runs)
    if args.output:
        for message in write_outputs(args.output, runs, records, None, plots=not args.no_plots):
            print(message, file=sys.stderr)
        print(f"wrote {Path(args.output) / 'summary.json'} and requests.jsonl")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    _check_workload(args)
    profile = _load(args.profile)
    slo = parse_slo(args.slo)
    if not slo:
        raise UsageError("--slo: give at least one target (e.g. ttft_ms=2000,itl_ms=100)")
    if not (args.request_rate > 0 and math.isfinite(args.request_rate)):
        raise UsageError(f"--request-rate must be a positive number, got {args.request_rate}")
    if not (0 < args.attainment <= 1):
        raise UsageError(f"--attainment must be in (0, 1], got {args.attainment}")
    if args.max_workers < 1:
        raise UsageError(f"--max-workers must be at least 1, got {args.max_workers}")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(f"--modes: choose among {', '.join(MODES)}, got {args.modes!r}")
    costs = _parse_costs(args.cost, profile)
    num_requests = args.num_requests or int(min(max(200, 60 * args.request_rate), 30000))
    request = PlanRequest(
        rate=args.request_rate,
        slo=slo,
        dataset=args.dataset,
        options=dataset_options(args, None),
        attainment=args.attainment,
        max_workers=args.max_workers,
        num_requests=num_requests,
        seed=args.seed,
        burstiness=args.burstiness,
        costs=costs,
        modes=modes,
        policy=args.policy,
        max_simulations=args.max_simulations,
        placement_slo_s=(args.slo_ttft_ms / 1000, args.slo_itl_ms / 1000),
    )
    t0 = time.perf_counter()
    plan = Planner(profile, request).run()
    wall = time.perf_counter() - t0
    _print_plan(plan, request, wall)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps(plan_document(plan, request, args.profile, wall), indent=2))
        print(f"wrote {out / 'plan.json'}")
    return 0 if plan.best is not None else 1


def _parse_costs(text: str, profile: Profile) -> dict[str, float]:
    costs: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"--cost: {part!r} is not KEY=COST (KEY one of {', '.join(profile.keys())})")
        if key not in profile.keys():
            raise UsageError(f"--cost: the profile has no shape {key!r}; it has {', '.join(profile.keys())}")
        try:
            costs[key] = float(value)
        except ValueError:
            raise UsageError(f"--cost: {value!r} is not a number") from None
        if not (costs[key] > 0 and math.isfinite(costs[key])):
            raise UsageError(f"--cost: {key} must cost a positive amount, got {value}")
    return costs


def plan_document(plan: Plan, request: PlanRequest, profile_path: str, wall_s: float) -> dict[str, Any]:
    return {
        "request_rate": json_rate(request.rate),
        "slo": request.slo,
        "attainment_target": request.attainment,
        "dataset": request.dataset,
        "num_requests_per_simulation": request.num_requests,
        "profile": profile_path,
        "recommended": plan.best.row() if plan.best else None,
        "per_family": [c.row() for c in plan.per_family],
        "simulations": [c.row() for c in plan.tried],
        "lower_bounds": {k: {"prefill": v[0], "decode": v[1]} for k, v in plan.lower_bounds.items()},
        "note": plan.note,
        "planning_wall_s": wall_s,
    }


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _print_plan(plan: Plan, request: PlanRequest, wall_s: float) -> None:
    slo = ",".join(f"{k}={v:g}" for k, v in request.slo.items())
    print(f"plan for {request.rate:g} req/s, {request.dataset}, SLO {slo} for >= {request.attainment:.0%}")
    print(
        f"{'cluster':<28} {'cost':>7} {'attain':>7} {'goodput':>8} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7}"
    )
    for c in plan.per_family:
        r = c.row()
        shapes = r["prefill_shape"] if r["mode"] == "aggregated" else f"{r['prefill_shape']}/{r['decode_shape']}"
        name = f"{r['cluster']} {shapes}"[:28]
        print(
            f"{name:<28} {r['cost']:>7.1f} {r['slo_attainment']:>7.1%} {r['goodput']:>8.2f} "
            f"{_fmt(r['ttft_ms_p50']):>9} {_fmt(r['ttft_ms_p99']):>7} {_fmt(r['itl_ms_p50'], 1):>8} "
            f"{_fmt(r['itl_ms_p99'], 1):>7}"
        )
    if plan.best is not None:
        print(f"recommended: {plan.best.full.describe()} (cost {plan.best.cost:g})")
    if plan.note:
        print(f"note: {plan.note}")
    sliced = sorted({c.scale for c in plan.per_family if c.scale > 1})
    if sliced:
        print(f"large families simulated as proportional slices (1/{', 1/'.join(f'{x:.3g}' for x in sliced)})")
    print(f"{len(plan.tried)} simulations in {wall_s:.1f} s")


def main(argv: list[str] | None = None, prog: str = "tandem") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "simulate":
            return run_simulate(args)
        return run_plan(args)
    except (UsageError, ProfileError, SimError, SloError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
