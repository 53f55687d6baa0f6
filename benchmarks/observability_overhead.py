"""Throughput with tracing and metrics on against off, on the real served cluster, in one run.

Starts two copies of the default disaggregated cluster (1 prefill + 1 decode Ray actor,
SmolLM2, NIXL, dtype auto) side by side in this process, each once, in its own Ray
namespace and on its own router port:

    off  tracing.exporter=none, router.metrics_port unset (no /metrics server)
    on   tracing.exporter=memory (router and every worker keep their spans in memory),
         router.metrics_port=0, and a thread here scraping http://127.0.0.1:<port>/metrics
         every --scrape-interval s during the run, as a Prometheus would

(The router's Prometheus registry is updated in both: metrics_port only serves it. So
"on" adds tracing + the HTTP endpoint + scraping; recording the metrics is in both.)

Ray gets max(cores, 2) CPUs from the first cluster; each worker asks for --num-cpus (0.5
by default), so 2 clusters x 2 workers fit. Only one cluster has traffic at a time; the
other sits idle (the router's 5 s health poll).

Workload of one run: --requests prompts of --prompt-tokens random token ids in [100,
40000), --max-tokens new tokens each (greedy, ignore_eos), sent by --concurrency client
threads (each takes the next prompt when its request finishes). Round r uses its own
prompt list, the same for both clusters; a fresh list per round because the clusters live
on and would otherwise find round 1's prompts in their prefix caches (the script sums
usage.cached_tokens as a check: it should be 0). Each cluster gets --warmup untimed
requests once after start.

--rounds alternates the order (off, on, on, off, off, on, ...); --start-first on starts the
"on" cluster first (it then owns Ray), to check that a difference follows the config. Per
run: wall time, output tokens/s, requests/s, client TTFT (send -> first response) and
end-to-end p50/p99, and the machine's CPU busy share (/proc/stat). Then the per-round
ratio on/off of output tokens/s, its median against the issue's target (loss under 3%,
ratio >= 0.97), and the spans the "on" cluster recorded (router + each worker) to show
tracing was really on. In-memory exporters keep every span, so they grow with the run:
expected.

Read throughput, not TTFT p50: with 8 closed-loop threads, requests arrive in waves and
the prefill worker takes one alone (~160 ms) and batches the rest (~900 ms), so TTFT is
bimodal and its p50 jumps between the modes from run to run.

    python benchmarks/observability_overhead.py                          # default (~3 min on 2 cores)
    python benchmarks/observability_overhead.py --requests 16 --rounds 1 # smoke run

Writes JSON to --out (default benchmarks/results/observability_overhead.json).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host_probes import Scraper, cpu_busy_since, cpu_times, settle  # noqa: E402 - the script's own folder is on sys.path
from served_common import ScriptRun, fmt_load, pct, timed_greedy  # noqa: E402

TOKEN_LO, TOKEN_HI = 100, 40000  # random prompt ids: clear of special tokens, inside the vocabulary
TARGET_RATIO = 0.97  # the issue: under 3% throughput loss with tracing and metrics on
CONFIGS = ("off", "on")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=96, help="per run")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="each round runs off and on; the order alternates")
    ap.add_argument("--warmup", type=int, default=4, help="untimed requests per cluster after it starts")
    ap.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between /metrics scrapes (on)")
    ap.add_argument("--num-cpus", type=float, default=0.5, help="Ray CPUs per worker (both pools, both clusters)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--start-first",
        choices=CONFIGS,
        default="off",
        help="which cluster starts first (and starts Ray); to check that a difference follows the config",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="gRPC deadline per request, seconds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "observability_overhead.json"))
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # PLATFORM.md: Ray token auth is on by default
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        print(f"note: {key}={os.environ[key]} is set; the config's tracing.exporter overrides the exporter only")

    frame = ScriptRun(f" ({os.cpu_count()} cores)")
    print(
        f"workload per run: {args.requests} requests x {args.prompt_tokens} prompt tokens -> {args.max_tokens} "
        f"tokens, {args.concurrency} client threads; {args.rounds} round(s)",
        flush=True,
    )

    rng = random.Random(args.seed)
    prompts = [
        [[rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
        for _ in range(args.rounds)
    ]
    warmup = {
        c: [[rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(args.prompt_tokens)] for _ in range(args.warmup)]
        for c in CONFIGS
    }

    runs: list[dict] = []
    spans: dict = {}
    clusters: dict = {}
    with contextlib.ExitStack() as stack:  # closes in reverse: the cluster whose Serving started Ray goes last
        servings = {}
        for name in sorted(CONFIGS, key=lambda c: c != args.start_first):
            servings[name], clusters[name] = start_cluster(args, name, warmup[name])
            stack.callback(servings[name].stop)
        settle_s, idle = settle()
        print(
            f"both clusters up; machine CPU busy while idle: {100 * idle:.0f}% (waited {settle_s:.0f} s for it to "
            f"settle), load {fmt_load(os.getloadavg())}",
            flush=True,
        )
        for c in clusters.values():
            c["idle_cpu_busy_before_runs"] = idle
        for rnd in range(args.rounds):
            order = CONFIGS if rnd % 2 == 0 else tuple(reversed(CONFIGS))
            for name in order:
                run = run_once(args, name, rnd, servings[name], prompts[rnd])
                if name == "on":
                    run["spans_after"] = count_spans(servings[name])
                    print(f"    spans so far in the on cluster: {run['spans_after']}", flush=True)
                runs.append(run)
        spans = count_spans(servings["on"])
        for name, s in servings.items():
            try:
                s.cluster.check_pools()
                clusters[name]["pools_at_end"] = "ok"
            except Exception as exc:  # noqa: BLE001 - reported; the numbers are still worth printing
                clusters[name]["pools_at_end"] = f"FAILED: {exc!r}"
                print(f"!!! check_pools of {name}: {exc!r}", flush=True)
        print("stopping the clusters", flush=True)

    stats = {c: config_stats([r for r in runs if r["config"] == c]) for c in CONFIGS}
    verdict = compare(runs, args.rounds)
    mismatch = compare_replies(runs, args.rounds)
    print_table(runs, stats, verdict, spans, args)
    print(
        f"replies: {mismatch['identical']} of {mismatch['compared']} identical between on and off of the same round "
        "(bfloat16 greedy replies depend on the decode batch; information only)"
    )

    frame.finish(
        args.out,
        {
            "clusters": clusters,
            "stats": stats,
            "on_vs_off": verdict,
            "spans_on_cluster": spans,
            "replies": mismatch,
            "runs": [{k: v for k, v in r.items() if k not in ("rows", "replies")} for r in runs],
            "rows": [row for r in runs for row in r["rows"]],
        },
        config={k: v for k, v in vars(args).items() if k != "out"},
    )


# -- clusters ---------------------------------------------------------------------------------------------


def start_cluster(args, name: str, warmup: list[list[int]]):
    from deploy.config import ServeConfig, with_overrides
    from deploy.serve import Serving
    from tandem_api.client import TandemClient

    on = name == "on"
    cfg = with_overrides(
        ServeConfig(),
        **{
            "model": "",
            "router.port": 0,
            "router.http_port": 0,
            "ray_namespace": f"tandem-bench-{name}",
            "both.num_cpus": args.num_cpus,
            "both.dtype": args.dtype,
            "tracing.exporter": "memory" if on else "none",
        },
    )
    if on:
        cfg = with_overrides(cfg, **{"router.metrics_port": 0})
    print(
        f"\n=== starting cluster {name}: tracing {cfg.tracing.exporter}, metrics_port {cfg.router.metrics_port}, "
        f"load {fmt_load(os.getloadavg())}",
        flush=True,
    )
    t0 = time.perf_counter()
    serving = Serving(cfg)
    start_s = time.perf_counter() - t0
    try:
        metrics_port = serving.on_router(lambda svc: svc.metrics_port)
        tracing_on = serving.on_router(lambda svc: svc.tracing.enabled)
        if (metrics_port is not None) != on or tracing_on != on:
            raise SystemExit(
                f"cluster {name}: metrics_port {metrics_port}, tracing enabled {tracing_on}: "
                "not the configuration asked for"
            )
        control = TandemClient(serving.address)
        info = control.server_info()
        control.close()
        if info.vocab_size < TOKEN_HI:
            raise SystemExit(f"vocab_size {info.vocab_size} < {TOKEN_HI}: the random prompt ids would be invalid")
        workers = {
            w.worker_id: {"role": w.role, "kv_blocks_total": w.kv_blocks_total, "dtype": w.dtype} for w in info.workers
        }
        print(
            f"cluster {name} up in {start_s:.1f} s on {serving.address}: {info.topology}, "
            + ", ".join(f"{w} {v['kv_blocks_total']} blocks ({v['dtype']})" for w, v in workers.items())
            + (f"; metrics on :{metrics_port}" if on else ""),
            flush=True,
        )
        warm_rows, _, warm_errors, warm_s = drive(args, serving.address, f"{name}-warmup", warmup)
        print(f"warm-up: {len(warm_rows)} requests in {warm_s:.1f} s, {len(warm_errors)} errors", flush=True)
        for e in warm_errors[:3]:
            print(f"!!!   warm-up error: {e}", flush=True)
    except BaseException:
        serving.stop()
        raise
    return serving, {
        "namespace": cfg.ray_namespace,
        "address": serving.address,
        "start_s": start_s,
        "topology": info.topology,
        "model": info.model,
        "workers": workers,
        "tracing_exporter": cfg.tracing.exporter,
        "metrics_port": metrics_port,
        "warmup_s": warm_s,
        "warmup_errors": warm_errors,
    }


def count_spans(serving) -> dict:
    import ray

    out = {"router": serving.on_router(lambda svc: len(svc.tracing.finished_spans()))}
    for h in serving.cluster.workers:
        out[h.worker_id] = len(ray.get(h.actor.finished_spans.remote(), timeout=60))
    out["total"] = sum(out.values())
    return out


# -- one run ----------------------------------------------------------------------------------------------


def run_once(args, name: str, rnd: int, serving, prompts: list[list[int]]) -> dict:
    load = os.getloadavg()
    print(f"\n--- {name} round {rnd}: load {fmt_load(load)}", flush=True)
    scraper = None
    if name == "on":
        scraper = Scraper(serving.on_router(lambda svc: svc.metrics_port), args.scrape_interval)
    cpu0 = cpu_times()
    with scraper if scraper is not None else contextlib.nullcontext():
        rows, replies, errors, wall_s = drive(args, serving.address, f"{name}-r{rnd}", prompts)
    cpu_busy = cpu_busy_since(cpu0)
    ok = [r for r in rows if "ttft_s" in r]
    out_tokens = sum(r["completion_tokens"] for r in ok)
    run = {
        "config": name,
        "round": rnd,
        "wall_s": wall_s,
        "requests": len(ok),
        "errors": errors,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall_s,
        "req_s": len(ok) / wall_s,
        "ttft_p50_s": pct([r["ttft_s"] for r in ok], 50),
        "ttft_p99_s": pct([r["ttft_s"] for r in ok], 99),
        "e2e_p50_s": pct([r["e2e_s"] for r in ok], 50),
        "e2e_p99_s": pct([r["e2e_s"] for r in ok], 99),
        "cached_tokens": sum(r["cached_tokens"] for r in ok),
        "cpu_busy": cpu_busy,
        "load_avg_before": load,
        "scrape": scraper.summary() if scraper is not None else None,
        "rows": rows,
        "replies": replies,
    }
    print(
        f"{name} round {rnd}: {len(ok)} requests in {wall_s:.2f} s, {run['output_tok_s']:.1f} output tok/s, "
        f"TTFT p50 {1e3 * run['ttft_p50_s']:.0f} ms, e2e p50 {1e3 * run['e2e_p50_s']:.0f} ms, "
        f"{len(errors)} errors, cached tokens {run['cached_tokens']}, CPU busy {100 * cpu_busy:.0f}%"
        + (f", {run['scrape']['scrapes']} scrapes ({run['scrape']['failures']} failed)" if scraper else ""),
        flush=True,
    )
    for e in errors[:5]:
        print(f"!!!   error: {e}", flush=True)
    if scraper is not None and scraper.failures:
        print(f"!!!   scrape failures: {scraper.failures[:3]}", flush=True)
    return run


def drive(args, address: str, tag: str, prompts: list[list[int]]):
    """Send every prompt from --concurrency threads (each takes the next when its request ends); the clock runs
    from when every thread is ready to when the last request ends. Returns (rows, replies, errors, wall_s)."""
    import grpc

    from tandem_api.client import TandemClient

    lock = threading.Lock()
    queue = list(enumerate(prompts))
    queue.reverse()
    rows: list[dict] = []
    replies: dict[int, list[int]] = {}
    errors: list[str] = []
    clients = [TandemClient(address) for _ in range(min(args.concurrency, len(prompts)))]
    start = threading.Barrier(len(clients) + 1)

    def worker(k: int) -> None:
        client = clients[k]
        start.wait()
        while True:
            with lock:
                if not queue:
                    return
                i, prompt = queue.pop()
            rid = f"{tag}-{i}"
            row = {"request_id": rid, "index": i, "thread": k}
            reply: list[int] = []
            try:
                r = timed_greedy(client, prompt, rid, args.max_tokens, args.timeout)
                reply, last = r.tokens, r.last
                row.update(
                    ttft_s=r.ttft_s,
                    e2e_s=r.total_s,
                    sent_at_s=r.sent_at - t_run0,
                    completion_tokens=last.usage.completion_tokens,
                    cached_tokens=last.usage.cached_tokens,
                    router_ttft_s=last.timings.time_to_first_token_s,
                    route=last.route,
                )
                if len(reply) != args.max_tokens:
                    errors.append(f"{rid}: {len(reply)} tokens back, expected {args.max_tokens}")
            except grpc.RpcError as exc:
                row["error"] = f"{exc.code().name} {exc.details()}"
                errors.append(f"{rid}: {row['error']}")
            except Exception as exc:  # noqa: BLE001 - counted as an error of this request
                row["error"] = repr(exc)
                errors.append(f"{rid}: {row['error']}")
            with lock:
                rows.append(row)
                replies[i] = reply

    threads = [threading.Thread(target=worker, args=(k,), name=f"client-{k}") for k in range(len(clients))]
    for th in threads:
        th.start()
    start.wait()  # channels made and threads running before the clock starts
    t_run0 = time.perf_counter()
    for th in threads:
        th.join()
    wall_s = time.perf_counter() - t_run0
    for c in clients:
        c.close()
    rows.sort(key=lambda r: r["index"])
    return rows, replies, errors, wall_s


# -- numbers ----------------------------------------------------------------------------------------------


def config_stats(runs: list[dict]) -> dict:
    tok = [r["output_tok_s"] for r in runs]
    return {
        "runs": len(runs),
        "output_tok_s_median": statistics.median(tok) if tok else float("nan"),
        "output_tok_s_min": min(tok, default=float("nan")),
        "output_tok_s_max": max(tok, default=float("nan")),
        "spread_pct": 100 * (max(tok) - min(tok)) / statistics.median(tok) if tok else float("nan"),
        "req_s_median": statistics.median(r["req_s"] for r in runs) if runs else float("nan"),
        "ttft_p50_s_median": statistics.median(r["ttft_p50_s"] for r in runs) if runs else float("nan"),
        "e2e_p50_s_median": statistics.median(r["e2e_p50_s"] for r in runs) if runs else float("nan"),
        "errors": sum(len(r["errors"]) for r in runs),
    }


def compare(runs: list[dict], rounds: int) -> dict:
    per_round = []
    for rnd in range(rounds):
        off = next(r for r in runs if r["config"] == "off" and r["round"] == rnd)
        on = next(r for r in runs if r["config"] == "on" and r["round"] == rnd)
        per_round.append(
            {
                "round": rnd,
                "tok_s_ratio": on["output_tok_s"] / off["output_tok_s"],
                "ttft_p50_ratio": on["ttft_p50_s"] / off["ttft_p50_s"],
                "e2e_p50_ratio": on["e2e_p50_s"] / off["e2e_p50_s"],
            }
        )
    median = statistics.median(r["tok_s_ratio"] for r in per_round)
    return {
        "per_round": per_round,
        "median_tok_s_ratio": median,
        "loss_pct": 100 * (1 - median),
        "target": f"on/off output tok/s >= {TARGET_RATIO:g} (loss under {100 * (1 - TARGET_RATIO):.0f}%)",
        "met": median >= TARGET_RATIO,
    }


def compare_replies(runs: list[dict], rounds: int) -> dict:
    compared = identical = 0
    for rnd in range(rounds):
        off = next(r for r in runs if r["config"] == "off" and r["round"] == rnd)["replies"]
        on = next(r for r in runs if r["config"] == "on" and r["round"] == rnd)["replies"]
        for i in set(off) & set(on):
            compared += 1
            identical += off[i] == on[i]
    return {"compared": compared, "identical": identical}


def print_table(runs: list[dict], stats: dict, verdict: dict, spans: dict, args) -> None:
    ms = 1e3
    print(
        f"\n{'run':>9} {'wall s':>7} {'out tok/s':>10} {'req/s':>6} {'TTFT p50':>9} {'p99':>7} {'e2e p50':>8} "
        f"{'p99':>7} {'CPU':>5} {'load1':>6} {'err':>4}  scrapes"
    )
    for r in runs:
        sc = r["scrape"]
        print(
            f"{r['config'] + ' #' + str(r['round']):>9} {r['wall_s']:>7.2f} {r['output_tok_s']:>10.1f} "
            f"{r['req_s']:>6.2f} {r['ttft_p50_s'] * ms:>7.0f}ms {r['ttft_p99_s'] * ms:>5.0f}ms "
            f"{r['e2e_p50_s'] * ms:>6.0f}ms {r['e2e_p99_s'] * ms:>5.0f}ms {100 * r['cpu_busy']:>4.0f}% "
            f"{r['load_avg_before'][0]:>6.2f} {len(r['errors']):>4}  "
            + (
                f"{sc['scrapes']} ({sc['failures']} failed, {sc['bytes_per_scrape'] / 1024:.0f} KiB, "
                f"{sc['scrape_ms_p50']:.1f} ms)"
                if sc
                else "-"
            )
        )
    print()
    for c, s in stats.items():
        print(
            f"{c:>4}: median {s['output_tok_s_median']:.1f} output tok/s (min {s['output_tok_s_min']:.1f}, "
            f"max {s['output_tok_s_max']:.1f}, spread {s['spread_pct']:.1f}% of the median), "
            f"TTFT p50 {s['ttft_p50_s_median'] * ms:.0f} ms, e2e p50 {s['e2e_p50_s_median'] * ms:.0f} ms, "
            f"{s['errors']} errors"
        )
    print(
        "\non/off output tok/s per round: "
        + ", ".join(f"#{p['round']} {p['tok_s_ratio']:.3f}" for p in verdict["per_round"])
    )
    print(
        f"median on/off {verdict['median_tok_s_ratio']:.3f} (loss {verdict['loss_pct']:.1f}%); target "
        f"{verdict['target']} -> {'MET' if verdict['met'] else 'NOT MET'}"
    )
    n_req = sum(r["requests"] for r in runs if r["config"] == "on") + args.warmup
    print(
        f"spans recorded by the on cluster ({n_req} requests incl. warm-up): "
        + ", ".join(f"{k} {v}" for k, v in spans.items())
        + (f" ({spans['total'] / n_req:.1f} per request)" if n_req else "")
    )


if __name__ == "__main__":
    main()
