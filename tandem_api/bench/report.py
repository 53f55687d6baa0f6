"""What `tandem bench` writes: the terminal table, summary.json, requests.jsonl and the plots.

`--output DIR` holds:
- `summary.json`: a JSON list, one object per rate run (pinned fields, see metrics.summarize, plus
  `metadata`); a max-rate search adds `search.json` (every probe and the answer);
- `requests.jsonl`: one line per request of every run (`rate_index` says which run);
- PNG plots: `latency_vs_rate.png` (TTFT, TPOT and ITL percentiles against rate), `goodput_vs_rate.png`,
  `cdf.png` (TTFT and ITL per rate) and, where the server reports its TTFT timings (tandem.v1),
  `ttft_breakdown.png` (mean TTFT per rate, stacked by part).
Plots need matplotlib (installed by scripts/setup.sh; `pip install -r requirements/bench.txt` for a
client-only install); without it the plots are skipped with a message, the JSON is still written.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandem_api.bench.metrics import RequestRecord

BREAKDOWN_PARTS = ("router_queue", "prefill", "server_other", "client_network")


def rate_label(rate: float | None) -> str:
    if rate is None:
        return "trace"
    return "inf" if math.isinf(rate) else f"{rate:g}"


def json_rate(rate: float | None) -> float | str | None:
    return "inf" if rate is not None and math.isinf(rate) else rate


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(runs: Sequence[dict[str, Any]], out: Any = None) -> None:
    """One row per run: counts, throughput, goodput and the latency percentiles (ms)."""
    import sys

    out = out or sys.stdout
    cols = [
        ("rate", 6),
        ("ok", 5),
        ("fail", 5),
        ("req/s", 7),
        ("tok/s", 7),
        ("goodput", 8),
        ("attain", 7),
        ("TTFT p50", 9),
        ("p99", 8),
        ("TPOT p50", 9),
        ("p99", 8),
        ("ITL p50", 8),
        ("p99", 8),
        ("E2E p50", 9),
    ]
    print(" ".join(f"{name:>{w}}" for name, w in cols), file=out)
    for run in runs:
        failed = sum(run["failed"].values())
        att = run["slo_attainment"]
        row = [
            rate_label(_rate_of(run)),
            str(run["completed"]),
            str(failed),
            _fmt(run["request_throughput"], 3),
            _fmt(run["output_throughput"], 1),
            _fmt(run["goodput"], 3),
            "-" if att is None else f"{att:.0%}",
            _fmt(run["ttft_ms"]["p50"], 0),
            _fmt(run["ttft_ms"]["p99"], 0),
            _fmt(run["tpot_ms"]["p50"], 1),
            _fmt(run["tpot_ms"]["p99"], 1),
            _fmt(run["itl_ms"]["p50"], 1),
            _fmt(run["itl_ms"]["p99"], 1),
            _fmt(run["e2el_ms"]["p50"], 0),
        ]
        print(" ".join(f"{v:>{w}}" for v, (_, w) in zip(row, cols)), file=out)
    for run in runs:
        if run["failed"]:
            reasons = ", ".join(f"{code} x{n}" for code, n in run["failed"].items())
            first = run.get("first_errors", {})
            detail = "; ".join(f"{code}: {msg}" for code, msg in first.items() if msg)
            print(f"rate {rate_label(_rate_of(run))}: failed {reasons}" + (f" ({detail})" if detail else ""), file=out)
    print(
        "(latencies in ms; goodput in requests/s meeting every --slo target; attain = that share of all requests)",
        file=out,
    )


def _rate_of(run: dict[str, Any]) -> float | None:
    rate = run["metadata"]["request_rate"]
    return math.inf if rate == "inf" else rate


def write_outputs(
    out_dir: str | Path,
    runs: Sequence[dict[str, Any]],
    records: Sequence[Sequence[RequestRecord]],
    search: dict[str, Any] | None = None,
    plots: bool = True,
) -> list[str]:
    """Writes the files (see the module docstring); returns messages about what was skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(list(runs), indent=2))
    with (out / "requests.jsonl").open("w") as f:
        for rate_index, recs in enumerate(records):
            for r in recs:
                f.write(
                    json.dumps(
                        {
                            "rate_index": rate_index,
                            "request_rate": runs[rate_index]["metadata"]["request_rate"],
                            **r.to_json(),
                        }
                    )
                    + "\n"
                )
    if search is not None:
        (out / "search.json").write_text(json.dumps(search, indent=2))
    if not plots:
        return []
    try:
        import matplotlib
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install -r requirements/bench.txt)"]
    matplotlib.use("Agg")
    plot_runs(out, runs, records)
    return []


def plot_runs(out: Path, runs: Sequence[dict[str, Any]], records: Sequence[Sequence[RequestRecord]]) -> None:
    import matplotlib.pyplot as plt

    order = sorted(range(len(runs)), key=lambda i: _sort_rate(_rate_of(runs[i])))
    xs = [_x(_rate_of(runs[i]), i) for i in order]
    xlabel = "request rate (req/s)"

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "itl_ms"), ("TTFT", "TPOT", "ITL")):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ys = [runs[i][key][q] for i in order]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=q)
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_rate.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(xs, [runs[i]["request_throughput"] for i in order], "o-", label="throughput (completed/s)")
    ax.plot(xs, [runs[i]["goodput"] for i in order], "s-", label="goodput (met SLO/s)")
    finite = [x for x in xs if math.isfinite(x)]
    if finite:
        ax.plot([0, max(finite)], [0, max(finite)], ":", color="grey", label="offered load")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("requests/s")
    slo = runs[0].get("slo") if runs else None
    ax.set_title(f"goodput, SLO {slo_text(slo)}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "goodput_vs_rate.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i in order:
        done = [r for r in records[i] if r.ok]
        label = f"{rate_label(_rate_of(runs[i]))} req/s"
        for ax, values in (
            (axes[0], [r.ttft_s * 1000 for r in done if r.ttft_s is not None]),
            (axes[1], [s * 1000 for r in done for s in r.itl_s()]),
        ):
            if values:
                values = sorted(values)
                ax.plot(values, [(k + 1) / len(values) for k in range(len(values))], label=label)
    for ax, title in zip(axes, ("TTFT", "ITL")):
        ax.set_title(f"CDF of {title}")
        ax.set_xlabel("ms")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cdf.png", dpi=100)
    plt.close(fig)

    with_breakdown = [i for i in order if runs[i].get("ttft_breakdown_ms")]
    if with_breakdown:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = [rate_label(_rate_of(runs[i])) for i in with_breakdown]
        bottom = [0.0] * len(with_breakdown)
        for part in BREAKDOWN_PARTS:
            heights = [runs[i]["ttft_breakdown_ms"][part] for i in with_breakdown]
            ax.bar(labels, heights, bottom=bottom, label=part.replace("_", " "))
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean TTFT (ms)")
        ax.set_title("TTFT as the server reports it")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "ttft_breakdown.png", dpi=100)
        plt.close(fig)


def _sort_rate(rate: float | None) -> float:
    return -1.0 if rate is None else rate


def _x(rate: float | None, i: int) -> float:
    """Where a run sits on the rate axis: inf and trace runs at their measured request rate instead."""
    return float(i) if rate is None or math.isinf(rate) else rate


def slo_text(slo: dict[str, float] | None) -> str:
    return ",".join(f"{k}={v:g}" for k, v in slo.items()) if slo else "(none: every completed request)"


# -- metadata -------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """The client machine: CPU model, cores, memory, GPUs (nvidia-smi, when present)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus: list[str] = []
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if result.returncode == 0:
            gpus = [g.strip() for g in result.stdout.splitlines() if g.strip()]
    except (OSError, subprocess.TimeoutExpired):
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "gpus": gpus,
        "hostname": platform.node(),
        "python": platform.python_version(),
    }


def tandem_version() -> dict[str, str | None]:
    """The installed tandem-serve version and, when run from a git checkout, its commit (+ '-dirty')."""
    from importlib import metadata

    try:
        version = metadata.version("tandem-serve")
    except metadata.PackageNotFoundError:
        version = None
    commit = None
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if result.returncode == 0:
            commit = result.stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "-dirty"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"tandem_version": version, "git_commit": commit}
