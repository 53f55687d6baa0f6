"""Does the simulator agree with reality? `tandem simulate` against `tandem bench` on the same cluster and load.

1. `tandem profile` measures the configured cluster (or `--profile FILE` reuses a profile);
2. `tandem serve` starts it as a user would (its own process), `tandem bench` runs the seeded sweep;
3. `tandem simulate` runs the same sweep (same dataset flags, seed, rates, SLO) on the profile;
4. per rate: p50 TTFT, p50 ITL, p50 TPOT and goodput, simulated / measured, and whether each is within
   `--tolerance` (issue 20 asks for 20 %).

`--repeats N` runs the real sweep N times against the one server (so each rate's runs are spread over the
window, not back to back) and compares the simulator with each rate's median, showing the runs' range: on a
shared machine one run's p50 near saturation moves by more than the tolerance. After each real sweep the
script also reads the workers' live step models from the cluster's /metrics (`tandem_worker_step_model_*`,
the planner's refit from served steps after each worker's warm-up) and compares them with the profile on a
few typical steps (OUT/live_fit.json).

Writes OUT/profile.json, OUT/real/ (OUT/real-2/, ... with --repeats) and OUT/sim/ (each a summary.json +
requests.jsonl), OUT/compare.json, OUT/live_fit.json and OUT/compare.png.

    python benchmarks/sim_vs_bench.py --out benchmarks/results/sim_vs_bench -- \\
        --dataset random --input-len 256 --output-len 64 --ignore-eos --num-requests 60 \\
        --request-rate 0.3,0.8,1.4 --slo ttft_ms=2000,tpot_ms=150 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from served_common import free_port  # noqa: E402 - the script's own folder is on sys.path
from serving_compare import TANDEM, start, stop  # noqa: E402

from planner.model import StepModel, StepShape, attn_pairs  # noqa: E402
from planner.profile import load_profile  # noqa: E402
from router.metrics import STEP_TERMS  # noqa: E402

METRICS = (("ttft_ms", "p50", "TTFT p50"), ("itl_ms", "p50", "ITL p50"), ("tpot_ms", "p50", "TPOT p50"))


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as out:
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True)


def _rate(run_doc: dict) -> float:
    r = run_doc["metadata"]["request_rate"]
    return float("inf") if r == "inf" else float(r)


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_runs(repeats: list[list[dict]]) -> list[dict]:
    """One summary-shaped run per rate from several repeats of the sweep: each figure the median of the
    repeats', with every repeat's value kept under "runs"."""
    by_rate: dict[float, list[dict]] = {}
    for sweep in repeats:
        for r in sweep:
            by_rate.setdefault(_rate(r), []).append(r)
    out = []
    for rate, docs in sorted(by_rate.items()):
        doc: dict = {"metadata": {"request_rate": rate}, "runs": {}}
        for key, stat, _ in METRICS:
            values = [d[key][stat] for d in docs]
            doc[key] = {stat: _median(values)}
            doc["runs"][key] = values
        for key in ("goodput", "slo_attainment"):
            values = [d[key] for d in docs]
            doc[key] = _median(values)
            doc["runs"][key] = values
        out.append(doc)
    return out


def compare(real: list[dict], sim: list[dict], tolerance: float) -> list[dict]:
    rows = []
    for a, b in zip(sorted(real, key=_rate), sorted(sim, key=_rate), strict=True):
        row: dict = {"request_rate": _rate(a)}
        runs = a.get("runs", {})
        for key, stat, _ in METRICS:
            m, s = a[key][stat], b[key][stat]
            row[key] = {"real": m, "sim": s, "ratio": (s / m) if m else None, "real_runs": runs.get(key, [m])}
        m, s = a["goodput"], b["goodput"]
        row["goodput"] = {"real": m, "sim": s, "ratio": (s / m) if m else None, "real_runs": runs.get("goodput", [m])}
        row["slo_attainment"] = {"real": a["slo_attainment"], "sim": b["slo_attainment"]}
        checked = [row[k]["ratio"] for k in ("ttft_ms", "itl_ms", "goodput")]
        row["within_tolerance"] = all(r is not None and abs(r - 1) <= tolerance for r in checked)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'rate':>6} " + " ".join(f"{label:>22}" for *_, label in METRICS) + f" {'goodput':>22} {'ok':>4}"
    print(head)
    print(" " * 7 + " ".join(f"{'real / sim (ratio)':>22}" for _ in range(len(METRICS) + 1)))
    for row in rows:
        cells = []
        for key in [k for k, *_ in METRICS] + ["goodput"]:
            c = row[key]
            digits = 3 if key == "goodput" else 0
            ratio = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
            real = "-" if c["real"] is None else f"{c['real']:.{digits}f}"
            sim = "-" if c["sim"] is None else f"{c['sim']:.{digits}f}"
            cells.append(f"{real + ' / ' + sim + ' (' + ratio + ')':>22}")
        print(f"{row['request_rate']:>6.2f} " + " ".join(cells) + f" {'yes' if row['within_tolerance'] else 'NO':>4}")
        spread = []
        for key in [k for k, *_ in METRICS] + ["goodput"]:
            runs = [v for v in row[key].get("real_runs", []) if v is not None]
            digits = 3 if key == "goodput" else 0
            spread.append(f"{'runs ' + f'{min(runs):.{digits}f}-{max(runs):.{digits}f}' if len(runs) > 1 else '':>22}")
        if any(c.strip() for c in spread):
            print(" " * 7 + " ".join(spread))


# typical steps of the default sweep (256-token prompts, 64 output tokens): name -> StepShape
TYPICAL_STEPS = {
    "prefill 256": StepShape(256, attn_pairs(256, 0), 0, 0),
    "decode 1 x 288": StepShape(0, 0.0, 1, 288),
    "decode 8 x 288": StepShape(0, 0.0, 8, 8 * 288),
}


def live_models(metrics_url: str) -> dict[str, dict]:
    """{worker: {"role", "steps", "model": StepModel}} from the cluster's tandem_worker_step_model_* gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=30) as r:
        text = r.read().decode()
    terms: dict[str, dict[str, float]] = {}
    found: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            worker = sample.labels.get("worker", "")
            if sample.name == "tandem_worker_step_model_seconds":
                terms.setdefault(worker, {})[sample.labels["term"]] = sample.value
                found.setdefault(worker, {})["role"] = sample.labels["role"]
            elif sample.name == "tandem_worker_step_model_steps":
                found.setdefault(worker, {})["steps"] = int(sample.value)
            elif sample.name == "tandem_worker_step_model_busy_neighbours":
                found.setdefault(worker, {})["busy"] = sample.value
            elif sample.name == "tandem_worker_step_model_decode_shape":
                found.setdefault(worker, {}).setdefault("decode_shape", {})[sample.labels["dim"]] = sample.value
    for worker, t in terms.items():
        found[worker]["model"] = StepModel.of_coefficients([t[name] for name in STEP_TERMS])
    return {w: f for w, f in found.items() if "model" in f}


def live_fit_rows(profiled: StepModel, live: dict[str, dict], after_sweep: int) -> list[dict]:
    rows = []
    for worker, f in sorted(live.items()):
        steps = {}
        for name, shape in TYPICAL_STEPS.items():
            # against the step as the simulator prices it (the profile's decode grid for decode rows), as the
            # online policy compares them (planner.policy.speed_factors); the profile's five terms beside it
            p, m = profiled.step_s(shape), f["model"].step_s(shape)
            steps[name] = {"profile_ms": p * 1e3, "live_ms": m * 1e3, "ratio": m / p if p else None}
            steps[name]["profile_linear_ms"] = profiled.linear().step_s(shape) * 1e3
        coefficients = dict(zip(STEP_TERMS, f["model"].coefficients(), strict=True))
        rows.append(
            {"after_sweep": after_sweep, "worker": worker, "role": f["role"], "steps": f.get("steps", 0)}
            | {"busy_neighbours": f.get("busy", 0.0), "decode_shape": f.get("decode_shape", {})}
            | {"typical": steps, "coefficients": coefficients}
        )
    return rows


def print_live_fit(rows: list[dict]) -> None:
    print(
        f"{'sweep':>5} {'worker':>12} {'steps':>6} {'busy':>5} " + " ".join(f"{n + ' ms':>26}" for n in TYPICAL_STEPS)
    )
    print(" " * 32 + " ".join(f"{'profile / live (ratio)':>26}" for _ in TYPICAL_STEPS))
    for r in rows:
        cells = [
            f"{c['profile_ms']:.1f} / {c['live_ms']:.1f} ({c['ratio']:.2f})" if c["ratio"] is not None else "-"
            for c in r["typical"].values()
        ]
        head = f"{r['after_sweep']:>5} {r['worker']:>12} {r['steps']:>6} {r.get('busy_neighbours', 0.0):>5.2f} "
        print(head + " ".join(f"{c:>26}" for c in cells))


def plot(out: Path, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rates = [r["request_rate"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(
        axes, (("ttft_ms", "TTFT p50 (ms)"), ("itl_ms", "ITL p50 (ms)"), ("goodput", "goodput (req/s)")), strict=True
    ):
        ax.plot(rates, [r[key]["real"] for r in rows], "o-", label="tandem bench (measured, median)")
        for rate, row in zip(rates, rows, strict=True):
            runs = [v for v in row[key].get("real_runs", []) if v is not None]
            if len(runs) > 1:
                ax.vlines(rate, min(runs), max(runs), colors="C0", alpha=0.5)
        ax.plot(rates, [r[key]["sim"] for r in rows], "s--", label="tandem simulate")
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)


def measure(
    args: argparse.Namespace, bench: list[str], out: Path, profile: Path, real_dirs: list[Path]
) -> tuple[dict[str, str], list[dict]]:
    """The profile (unless given), then the real sweeps against one `tandem serve`, reading the workers' live
    step models after each; (the commands run, the live-fit rows)."""
    commands: dict[str, str] = {}
    if not args.profile:
        cmd = [*TANDEM, "profile", "--output", str(profile), *shlex.split(args.tandem_flags)]
        commands["profile"] = shlex.join(cmd)
        run(cmd, out / "profile.log")
    metrics_port = free_port()
    serve_flags = f"{args.tandem_flags} --metrics-port {metrics_port}"
    proc, target = start("tandem", [], argparse.Namespace(tandem_flags=serve_flags), out / "serve.log")
    live_rows: list[dict] = []
    profiled = load_profile(profile).worker().step
    try:
        for i, real_dir in enumerate(real_dirs):
            cmd = [*TANDEM, "bench", *target, *bench, "--output", str(real_dir), "--quiet"]
            commands.setdefault("bench", shlex.join(cmd))
            run(cmd, out / f"bench-{i + 1}.log")
            live_rows += live_fit_rows(profiled, live_models(f"http://127.0.0.1:{metrics_port}/metrics"), i + 1)
    finally:
        stop(proc)
    return commands, live_rows


def resimulation_inputs(out: Path, profiled: StepModel) -> tuple[dict[str, str], list[dict]]:
    """`--resimulate`: the commands and live fits of OUT's earlier run, the live fits compared anew with the
    (perhaps refitted) profile."""
    earlier = json.loads((out / "compare.json").read_text())
    live = json.loads((out / "live_fit.json").read_text())
    rows: list[dict] = []
    for r in live["rows"]:
        model = StepModel.of_coefficients([r["coefficients"][t] for t in STEP_TERMS])
        one = {r["worker"]: {"role": r["role"], "steps": r["steps"], "busy": r.get("busy_neighbours", 0.0)}}
        one[r["worker"]] |= {"model": model, "decode_shape": r.get("decode_shape", {})}
        rows += live_fit_rows(profiled, one, r["after_sweep"])
    commands = {k: v for k, v in earlier["commands"].items() if k in ("profile", "bench", "simulate")}
    return commands, rows


def simulate(args: argparse.Namespace, profile: Path, sim_bench: list[str], out_dir: Path, log: Path) -> list[str]:
    """`tandem simulate` of the sweep on `profile` into `out_dir`; returns the command it ran."""
    cmd = [*TANDEM, "simulate", "--profile", str(profile), *shlex.split(args.sim_flags), *sim_bench]
    cmd += ["--output", str(out_dir), "--no-plots"]
    run(cmd, log)
    return cmd


def served_decode(row: dict) -> tuple[float, ...]:
    """A live-fit row's typical decode step as WorkerLive.live_decode: (rows, context per row), or ()."""
    shape = row.get("decode_shape", {})
    return (shape["rows"], shape["context"]) if "rows" in shape and "context" in shape else ()


def simulate_refined(
    args: argparse.Namespace, profile: Path, live_rows: list[dict], sim_bench: list[str], repeats: list, out: Path
) -> dict:
    """`--refine-after K`: the profile as `tandem serve --planner sla` refines it online (planner.policy:
    each pool's step model scaled by its workers' live / profiled ratio on a typical step), from the live fits
    read after real sweep K, simulated and compared with the median of the later sweeps only."""
    from planner.live_speed import WorkerLive, refined_profile, speed_factors
    from planner.profile import save_profile

    k = args.refine_after
    if not 0 < k < len(repeats):
        raise SystemExit(f"--refine-after {k}: needs 1 <= K < --repeats ({len(repeats)}) to leave later sweeps")
    workers = tuple(
        WorkerLive(
            r["worker"],
            r["role"],
            float("inf"),
            live_step=tuple(r["coefficients"][t] for t in STEP_TERMS),
            live_busy=r.get("busy_neighbours", 0.0),
            live_decode=served_decode(r),
        )
        for r in live_rows
        if r["after_sweep"] == k
    )
    base = load_profile(profile)
    factors, _ = speed_factors(base, workers, warmup_s=0.0)
    refined_path = out / f"profile_refined_{k}.json"
    save_profile(refined_profile(base, factors), refined_path)
    cmd = simulate(args, refined_path, sim_bench, out / "sim-refined", out / "simulate-refined.log")
    later = repeats[k:]
    real = median_runs(later) if len(later) > 1 else later[0]
    rows = compare(real, json.loads((out / "sim-refined" / "summary.json").read_text()), args.tolerance)
    print(
        f"\nrefined by the live step models after sweep {k} (speed factors {factors}), against sweeps {k + 1}-"
        f"{len(repeats)}:"
    )
    print_table(rows)
    return {"after_sweep": k, "speed_factors": factors, "command": shlex.join(cmd), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--out", default="benchmarks/results/sim_vs_bench")
    ap.add_argument("--profile", help="reuse this profile instead of measuring one")
    ap.add_argument("--tandem-flags", default="", help="flags for `tandem serve` (and `tandem profile --mode`)")
    ap.add_argument(
        "--sim-flags", default="", help="extra `tandem simulate` flags (e.g. --mode aggregated --prefill 2)"
    )
    ap.add_argument("--tolerance", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=1, help="real sweeps against the one server; compare medians")
    ap.add_argument(
        "--resimulate",
        action="store_true",
        help="keep OUT's real runs (real/, real-2/, ... and the live fits) and rerun only the simulation (with the "
        "stored run's bench flags and repeats): after a change to the simulator or `tandem profile --refit`",
    )
    ap.add_argument(
        "--refine-after",
        type=int,
        default=0,
        metavar="K",
        help="also simulate on the profile as the online planner refines it from the workers' live step models "
        "read after real sweep K, against the median of the sweeps after K (out of sample; needs --repeats > K)",
    )
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then `tandem bench` flags (dataset, rates, SLO, seed)")
    args = ap.parse_args()
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = Path(args.profile) if args.profile else out / "profile.json"
    if args.resimulate:  # the stored run's own sweep and repeats, whatever this command line says
        stored = json.loads((out / "compare.json").read_text())
        bench = stored.get("bench_args", bench)
        args.repeats = stored.get("repeats", args.repeats)
    real_dirs = [out / ("real" if i == 0 else f"real-{i + 1}") for i in range(args.repeats)]
    if args.resimulate:
        commands, live_rows = resimulation_inputs(out, load_profile(profile).worker().step)
    else:
        commands, live_rows = measure(args, bench, out, profile, real_dirs)
    profiled = load_profile(profile).worker().step
    sim_bench = [a for a in bench if a != "--ignore-eos"]  # the simulator always generates the full lengths
    cmd = simulate(args, profile, sim_bench, out / "sim", out / "simulate.log")
    commands["simulate" if not args.resimulate else "resimulate"] = shlex.join(cmd)
    repeats = [json.loads((d / "summary.json").read_text()) for d in real_dirs]
    real = median_runs(repeats) if len(repeats) > 1 else repeats[0]
    sim = json.loads((out / "sim" / "summary.json").read_text())
    rows = compare(real, sim, args.tolerance)
    print_table(rows)
    print_live_fit(live_rows)
    doc = {"commands": commands, "tolerance": args.tolerance, "repeats": args.repeats, "bench_args": bench}
    doc["rows"] = rows
    if args.refine_after:
        doc["refined"] = simulate_refined(args, profile, live_rows, sim_bench, repeats, out)
    (out / "compare.json").write_text(json.dumps(doc, indent=2))
    live_doc = {"profile": profiled.coefficients(), "profile_grid": profiled.decode_grid is not None, "rows": live_rows}
    (out / "live_fit.json").write_text(json.dumps(live_doc, indent=2))
    plot(out, rows)
    print(f"wrote {out / 'compare.json'} and compare.png")


if __name__ == "__main__":
    main()
