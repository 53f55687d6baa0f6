"""Does the simulator agree with reality? `tandem simulate` against `tandem bench` on the same cluster and load.

1. `tandem profile` measures the configured cluster (or `--profile FILE` reuses a profile);
2. `tandem serve` starts it as a user would (its own process), `tandem bench` runs the seeded sweep;
3. `tandem simulate` runs the same sweep (same dataset flags, seed, rates, SLO) on the profile;
4. per rate: p50 TTFT, p50 ITL, p50 TPOT and goodput, simulated / measured, and whether each is within
   `--tolerance` (issue 20 asks for 20 %).

Writes OUT/profile.json, OUT/real/ and OUT/sim/ (each a summary.json + requests.jsonl), OUT/compare.json and
OUT/compare.png.

    python benchmarks/sim_vs_bench.py --out benchmarks/results/sim_vs_bench -- \\
        --dataset random --input-len 256 --output-len 64 --ignore-eos --num-requests 60 \\
        --request-rate 0.3,0.8,1.4 --slo ttft_ms=2000,tpot_ms=150 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_compare import TANDEM, start, stop  # noqa: E402 - the script's own folder is on sys.path

METRICS = (("ttft_ms", "p50", "TTFT p50"), ("itl_ms", "p50", "ITL p50"), ("tpot_ms", "p50", "TPOT p50"))


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as out:
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True)


def _rate(run_doc: dict) -> float:
    r = run_doc["metadata"]["request_rate"]
    return float("inf") if r == "inf" else float(r)


def compare(real: list[dict], sim: list[dict], tolerance: float) -> list[dict]:
    rows = []
    for a, b in zip(sorted(real, key=_rate), sorted(sim, key=_rate), strict=True):
        row: dict = {"request_rate": _rate(a)}
        for key, stat, _ in METRICS:
            m, s = a[key][stat], b[key][stat]
            row[key] = {"real": m, "sim": s, "ratio": (s / m) if m else None}
        m, s = a["goodput"], b["goodput"]
        row["goodput"] = {"real": m, "sim": s, "ratio": (s / m) if m else None}
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
        ax.plot(rates, [r[key]["real"] for r in rows], "o-", label="tandem bench (measured)")
        ax.plot(rates, [r[key]["sim"] for r in rows], "s--", label="tandem simulate")
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)


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
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then `tandem bench` flags (dataset, rates, SLO, seed)")
    args = ap.parse_args()
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = Path(args.profile) if args.profile else out / "profile.json"
    commands: dict[str, str] = {}
    if not args.profile:
        cmd = [*TANDEM, "profile", "--output", str(profile), *shlex.split(args.tandem_flags)]
        commands["profile"] = shlex.join(cmd)
        run(cmd, out / "profile.log")
    proc, target = start("tandem", [], argparse.Namespace(tandem_flags=args.tandem_flags), out / "serve.log")
    try:
        cmd = [*TANDEM, "bench", *target, *bench, "--output", str(out / "real"), "--quiet"]
        commands["bench"] = shlex.join(cmd)
        run(cmd, out / "bench.log")
    finally:
        stop(proc)
    sim_bench = [a for a in bench if a != "--ignore-eos"]  # the simulator always generates the full lengths
    cmd = [*TANDEM, "simulate", "--profile", str(profile), *shlex.split(args.sim_flags), *sim_bench]
    cmd += ["--output", str(out / "sim"), "--no-plots"]
    commands["simulate"] = shlex.join(cmd)
    run(cmd, out / "simulate.log")
    real = json.loads((out / "real" / "summary.json").read_text())
    sim = json.loads((out / "sim" / "summary.json").read_text())
    rows = compare(real, sim, args.tolerance)
    print_table(rows)
    (out / "compare.json").write_text(
        json.dumps({"commands": commands, "tolerance": args.tolerance, "rows": rows}, indent=2)
    )
    plot(out, rows)
    print(f"wrote {out / 'compare.json'} and compare.png")


if __name__ == "__main__":
    main()
