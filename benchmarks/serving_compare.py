"""The same seeded `tandem bench` sweep against several server configurations, one after the other, on one chart.

Each configuration is started as its own server process (as a user would start it), benchmarked by
`tandem bench` in another process, and stopped before the next starts, so they never share the
machine. Every configuration gets the same requests at the same arrival times (same seed; each rate
of the sweep has its own prompt content, so no rate warms the next one's prefix cache).

Built-in configurations (`--configs`, in that order):
    disagg   tandem serve                      (the default: 1 prefill + 1 decode worker)
    agg      tandem serve --mode aggregated    (2 workers, each doing both phases)
    vllm     vLLM's OpenAI server, one engine using every core (needs --vllm-python and --hf-model;
             see ../shared/PEERS.md for installing it outside the repository)
More with `--custom NAME="tandem serve flags"`, e.g. --custom rr2="--prefill-replicas 2 --router-policy round-robin".
`--tandem-flags` go to every Tandem configuration (e.g. "--dtype float32 --model DIR").

Everything after `--` goes to `tandem bench` (dataset, rates, SLO, ...). Writes OUT/<config>/
(summary.json, requests.jsonl, plots), OUT/compare.json (per rate: goodput, TTFT, TPOT, ITL of
every configuration and each one's ratio to the first) and OUT/compare.png.

    python benchmarks/serving_compare.py --configs disagg agg --out benchmarks/results/compare -- \\
        --dataset random --input-len 256 --output-len 64 --ignore-eos --num-requests 40 \\
        --request-rate 0.3,0.7 --slo ttft_ms=4000,tpot_ms=200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from served_common import free_port  # noqa: E402 - the script's own folder is on sys.path

TANDEM = [sys.executable, "-m", "deploy.cli"]
BUILTIN = {"disagg": [], "agg": ["--mode", "aggregated"]}
START_TIMEOUT_S = 900


def wait_tandem(port: int, proc: subprocess.Popen) -> None:
    from tandem_api.client import TandemClient

    deadline = time.monotonic() + START_TIMEOUT_S
    with TandemClient(f"127.0.0.1:{port}") as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before serving")
            try:
                client.wait_until_serving(timeout=10)
                return
            except Exception:  # noqa: BLE001 - not up yet
                continue
    raise RuntimeError(f"no server on {port} after {START_TIMEOUT_S} s")


def wait_http(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)  # a starting server (a benchmark script, not a test: polling is fine here)
    raise RuntimeError(f"no server at {url} after {START_TIMEOUT_S} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(name: str, flags: list[str], args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, list[str]]:
    """(server process, the `tandem bench` target flags)."""
    out = log.open("w")
    if name == "vllm":
        if not args.vllm_python or not args.hf_model:
            raise SystemExit("the vllm configuration needs --vllm-python and --hf-model")
        port = free_port()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),
        }
        cmd = [
            args.vllm_python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            args.hf_model,
            "--served-model-name",
            "model",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            args.vllm_dtype,
            "--max-model-len",
            "2048",
            "--enforce-eager",
            *shlex.split(args.vllm_flags),
        ]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}/v1"
        wait_http(url, proc)
        return proc, [
            "--openai-url",
            url,
            "--openai-model",
            "model",
            *(["--tokenizer", args.hf_model] if args.hf_model else []),
        ]
    port = free_port()
    cmd = [*TANDEM, "serve", "--port", str(port), "--http-port", "0", *shlex.split(args.tandem_flags), *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_tandem(port, proc)
    return proc, ["--server", f"127.0.0.1:{port}"]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--configs", nargs="+", default=["disagg", "agg"])
    ap.add_argument("--custom", action="append", default=[], metavar='NAME="FLAGS"')
    ap.add_argument("--tandem-flags", default="", help="flags for every `tandem serve`")
    ap.add_argument("--vllm-python", help="the python of a venv with vllm-cpu installed")
    ap.add_argument("--hf-model", help="HF model directory for vLLM (and its tokenizer for the bench)")
    ap.add_argument("--vllm-dtype", default="float32")
    ap.add_argument("--vllm-kv-gib", type=int, default=4)
    ap.add_argument("--vllm-flags", default="")
    ap.add_argument("--out", default="benchmarks/results/compare")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then `tandem bench` flags")
    args = ap.parse_args()
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    configs = {**BUILTIN, "vllm": None}
    for item in args.custom:
        name, _, flags = item.partition("=")
        configs[name] = shlex.split(flags)
        if name not in args.configs:
            args.configs.append(name)
    unknown = [c for c in args.configs if c not in configs]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {sorted(configs)} (more with --custom)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results: dict[str, list[dict]] = {}
    commands: dict[str, str] = {}
    for name in args.configs:
        t0 = time.monotonic()
        print(f"\n=== {name}: starting the server", flush=True)
        proc, target = start(name, configs[name] or [], args, out / f"{name}.server.log")
        try:
            cmd = [*TANDEM, "bench", *target, *bench, "--label", name, "--output", str(out / name)]
            commands[name] = "tandem " + shlex.join(cmd[3:])
            print(f"=== {name}: up after {time.monotonic() - t0:.0f} s; {commands[name]}", flush=True)
            subprocess.run(cmd, cwd=REPO, check=True)
        finally:
            stop(proc)
        results[name] = json.loads((out / name / "summary.json").read_text())
    write_comparison(out, results, commands)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _rate(run: dict) -> float:
    r = run["metadata"]["request_rate"]
    return math.inf if r == "inf" else (r if r is not None else -1.0)


def write_comparison(out: Path, results: dict[str, list[dict]], commands: dict[str, str]) -> None:
    names = list(results)
    base = names[0]
    rows = []
    for run in results[base]:
        rate = run["metadata"]["request_rate"]
        row = {"request_rate": rate}
        for name in names:
            match = [r for r in results[name] if r["metadata"]["request_rate"] == rate]
            if not match:
                continue
            r = match[0]
            row[name] = {
                "goodput": r["goodput"],
                "slo_attainment": r["slo_attainment"],
                "completed": r["completed"],
                "failed": r["failed"],
                "ttft_p50_ms": r["ttft_ms"]["p50"],
                "ttft_p99_ms": r["ttft_ms"]["p99"],
                "tpot_p50_ms": r["tpot_ms"]["p50"],
                "itl_p50_ms": r["itl_ms"]["p50"],
                "itl_p99_ms": r["itl_ms"]["p99"],
                "output_throughput": r["output_throughput"],
            }
        for name in names[1:]:
            if name in row:
                row[f"{name}/{base}"] = {
                    k: _ratio(row[name][k], row[base][k])
                    for k in ("goodput", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p99_ms")
                }
        rows.append(row)
    (out / "compare.json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=2))
    print(
        f"\n{'rate':>6} {'config':>10} {'goodput':>8} {'attain':>7} {'TTFT p50':>9} {'p99':>8} "
        f"{'TPOT p50':>9} {'ITL p50':>8} {'p99':>8}"
    )
    for row in rows:
        for name in names:
            if name not in row:
                continue
            r = row[name]
            print(
                f"{str(row['request_rate']):>6} {name:>10} {r['goodput']:8.3f} {_pct(r['slo_attainment']):>7} "
                f"{_f(r['ttft_p50_ms']):>9} {_f(r['ttft_p99_ms']):>8} {_f(r['tpot_p50_ms'], 1):>9} "
                f"{_f(r['itl_p50_ms'], 1):>8} {_f(r['itl_p99_ms'], 1):>8}"
            )
    plot(out, results)
    print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _f(v, digits=0):
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v):
    return "-" if v is None else f"{v:.0%}"


def plot(out: Path, results: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = [
        (axes[0][0], "goodput", None, "goodput (req/s meeting the SLO)"),
        (axes[0][1], "ttft_ms", ("p50", "p99"), "TTFT (ms)"),
        (axes[1][0], "tpot_ms", ("p50", "p99"), "TPOT (ms)"),
        (axes[1][1], "itl_ms", ("p50", "p99"), "ITL (ms)"),
    ]
    for k, (name, runs) in enumerate(results.items()):
        runs = sorted((r for r in runs if math.isfinite(_rate(r))), key=_rate)
        xs = [_rate(r) for r in runs]
        color = f"C{k}"
        for ax, key, qs, title in panels:
            if qs is None:
                ax.plot(xs, [r[key] for r in runs], "o-", color=color, label=name)
            else:
                for q, style in zip(qs, ("o-", "^:")):
                    ys = [r[key][q] for r in runs]
                    ax.plot(xs, [float("nan") if y is None else y for y in ys], style, color=color, label=f"{name} {q}")
            ax.set_title(title)
            ax.set_xlabel("request rate (req/s)")
            ax.grid(alpha=0.3)
    for ax, *_ in panels:
        ax.legend(fontsize=8)
    first = next(iter(results.values()))
    slo = first[0].get("slo") if first else None
    fig.suptitle(f"same seeded load, SLO {slo}")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
