"""`tandem bench` (also `python -m tandem_api.bench`): goodput under SLOs, rate sweeps, records and plots.

    tandem bench --server 127.0.0.1:50051 --dataset random --input-len 256 --output-len 64 --ignore-eos \\
                 --num-requests 200 --request-rate 0.5,1,2 --slo ttft_ms=2000,tpot_ms=200 --output out/
    tandem bench --openai-url http://127.0.0.1:8000/v1 --openai-model NAME ...   # any OpenAI-compatible server
    tandem bench --server ... --find-max-rate --request-rate 1 --slo ttft_ms=2000 --attainment 0.9

Needs only the client side: grpcio (gRPC targets), aiohttp (OpenAI targets), matplotlib (plots),
and for exact prompt lengths the model's tokenizer (tokenizers, gguf); never torch or Ray.
Exit status: 0 done (failed requests are counted, not fatal), 2 bad flags or input files,
1 the target cannot be used, 130 interrupted (what was measured is written first).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tandem_api.bench.arrivals import parse_rates
from tandem_api.bench.datasets import DATASETS, DatasetError, DatasetOptions, PromptMaker, build_dataset
from tandem_api.bench.metrics import SloError, parse_slo, summarize
from tandem_api.bench.report import (
    json_rate,
    machine_info,
    print_table,
    rate_label,
    slo_text,
    tandem_version,
    write_outputs,
)
from tandem_api.bench.runner import LoadConfig, LoadResult, Progress, find_max_rate, run_load
from tandem_api.bench.targets import GrpcTarget, OpenAITarget, Target, TargetError
from tandem_api.connection import add_connection_flags, connection_settings

DEFAULT_NUM_REQUESTS = 100


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_argument_group("target (one of)")
    where.add_argument("--server", metavar="HOST:PORT", help="a Tandem router (tandem.v1 gRPC)")
    where.add_argument(
        "--openai-url",
        metavar="URL",
        help="an OpenAI-compatible server: http://HOST:PORT[/v1[/completions|/chat/completions]]",
    )
    where.add_argument(
        "--openai-model", metavar="NAME", help="model name to send (default: the first /v1/models lists)"
    )
    where.add_argument(
        "--openai-endpoint",
        choices=["completions", "chat"],
        help="which endpoint (default: from the URL, else completions)",
    )
    where.add_argument(
        "--chat",
        action="store_true",
        help="gRPC: send chat messages (the server renders its template) where the dataset has them",
    )
    add_connection_flags(p)
    add_workload_arguments(p)
    add_load_arguments(p)

    slo = p.add_argument_group("SLO and search")
    slo.add_argument("--slo", default=None, metavar="KEY=MS,...", help="targets: ttft_ms, tpot_ms, itl_ms, e2el_ms")
    slo.add_argument(
        "--find-max-rate",
        action="store_true",
        help="search the highest rate whose SLO attainment stays >= --attainment (starts at --request-rate)",
    )
    slo.add_argument("--attainment", type=float, default=0.9)
    slo.add_argument("--search-probes", type=int, default=8, help="runs the search may spend")
    slo.add_argument("--search-tolerance", type=float, default=0.1, help="stop when the bracket is within 10%%")
    add_output_arguments(p)


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The dataset flags (shared with `tandem simulate` and `tandem plan`)."""
    data = p.add_argument_group("workload")
    data.add_argument("--dataset", default="random", help=f"one of {', '.join(DATASETS)} (default random)")
    data.add_argument("--input-len", type=int, default=256, help="median prompt tokens (shared-prefix: the question)")
    data.add_argument("--output-len", type=int, default=64, help="median output tokens (max_tokens per request)")
    data.add_argument(
        "--spread",
        type=float,
        default=0.5,
        help="lognormal sigma of the lengths (0: every request exactly --input-len / --output-len)",
    )
    data.add_argument("--num-groups", type=int, default=8, help="shared-prefix: system prompts")
    data.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens per system prompt")
    data.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    data.add_argument(
        "--common-prefix-len",
        type=int,
        default=0,
        metavar="N",
        help="every request starts with the same N tokens (like a chat template's system prompt)",
    )
    data.add_argument("--trace-file", metavar="FILE", help="trace: JSONL of timestamp_s, input_tokens, output_tokens")
    data.add_argument(
        "--tokenizer",
        default="auto",
        metavar="PATH",
        help="a .gguf file or HF directory whose tokenizer makes exact-length prompts; auto (default): "
        "the model path the server reports, when it exists here; none: no tokenizer",
    )
    data.add_argument("--ignore-eos", action="store_true", help="generate exactly the output lengths")
    data.add_argument("--temperature", type=float, default=0.0)


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The arrival-process flags (shared with `tandem simulate`)."""
    load = p.add_argument_group("load")
    load.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help=f"requests per rate (default {DEFAULT_NUM_REQUESTS}; unlimited with --duration)",
    )
    load.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="stop starting requests after S seconds (those in flight finish)",
    )
    load.add_argument(
        "--request-rate",
        default=None,
        metavar="R[,R...]",
        help="requests/s, several for a sweep; inf = all at once (default inf; trace: its timestamps)",
    )
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, <1 burstier")
    load.add_argument("--max-concurrency", type=int, default=None, help="requests (conversations) in flight at most")
    load.add_argument("--warmup", type=int, default=0, metavar="N", help="N requests first, not measured")
    load.add_argument("--seed", type=int, default=0, help="same seed, same requests and arrival times")
    load.add_argument("--request-timeout", type=float, default=None, metavar="S", help="deadline of each request")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("output")
    out.add_argument("--output", metavar="DIR", help="summary.json, requests.jsonl and PNG plots")
    out.add_argument("--label", default="", help="a name for this configuration (kept in metadata)")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="benchmark a server: goodput under SLOs, rate sweeps, plots", description=__doc__.split("\n\n")[0]
    )
    add_bench_arguments(p)


def build_parser(prog: str = "python -m tandem_api.bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_bench_arguments(p)
    return p


class UsageError(ValueError):
    """A bad flag combination; exit status 2."""


def check_args(args: argparse.Namespace) -> tuple[list[float | None], dict[str, float]]:
    """(rates, slo) from the flags; UsageError / SloError / DatasetError naming the flag."""
    if bool(args.server) == bool(args.openai_url):
        raise UsageError("give exactly one target: --server HOST:PORT (tandem gRPC) or --openai-url URL")
    if args.dataset not in DATASETS:
        raise DatasetError(f"--dataset: unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    slo = parse_slo(args.slo)
    if args.request_rate is None:
        rates: list[float | None] = [None] if args.dataset == "trace" else [math.inf]
    else:
        rates = list(parse_rates(args.request_rate))
    for flag, value in (("--num-requests", args.num_requests), ("--max-concurrency", args.max_concurrency)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.duration is not None and not (args.duration > 0):
        raise UsageError(f"--duration must be a positive number of seconds, got {args.duration}")
    if (
        args.duration is not None
        and args.num_requests is None
        and args.max_concurrency is None
        and any(r is not None and math.isinf(r) for r in rates)
    ):
        raise UsageError(
            "--duration with --request-rate inf needs --max-concurrency or --num-requests "
            "(otherwise requests would start without end)"
        )
    if not (args.burstiness > 0 and math.isfinite(args.burstiness)):
        raise UsageError(f"--burstiness must be a positive number, got {args.burstiness}")
    if args.find_max_rate:
        if len(rates) != 1 or rates[0] is None or math.isinf(rates[0]):
            raise UsageError("--find-max-rate starts from one finite --request-rate (e.g. --request-rate 1)")
        if not slo:
            raise UsageError("--find-max-rate needs --slo targets to judge each rate by")
        if not (0 < args.attainment <= 1):
            raise UsageError(f"--attainment must be in (0, 1], got {args.attainment}")
    if args.chat and not args.server:
        raise UsageError("--chat applies to --server; for OpenAI servers use --openai-endpoint chat")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    return rates, slo


def make_target(args: argparse.Namespace) -> Target:
    if args.server:
        return GrpcTarget(
            args.server, chat=args.chat, request_timeout_s=args.request_timeout, **connection_settings(args)
        )
    return OpenAITarget(
        args.openai_url,
        model=args.openai_model,
        endpoint=args.openai_endpoint,
        api_key=os.environ.get("OPENAI_API_KEY"),
        request_timeout_s=args.request_timeout,
    )


def resolve_tokenizer(spec: str, server: dict[str, Any]) -> tuple[Any, str | None]:
    """(tokenizer or None, where it came from). `auto`: the model path the server reports, if it is here."""
    if spec == "none":
        return None, None
    path: str | None = spec
    if spec == "auto":
        candidates = [server.get("model_path"), server.get("model")]
        path = next((c for c in candidates if c and os.path.exists(c)), None)
        if path is None:
            return None, None
    try:
        from engine.loader import load_tokenizer  # torch-free: tokenizers + gguf
    except ImportError:
        if spec == "auto":
            return None, None
        raise UsageError("--tokenizer needs the tandem-serve package's engine.loader (tokenizers, gguf)") from None
    from common.errors import EngineError

    try:
        return load_tokenizer(path), path
    except EngineError as e:
        if spec == "auto":
            return None, None
        raise UsageError(f"--tokenizer: {e}") from None


async def _bench(args: argparse.Namespace, rates: list[float | None], slo: dict[str, float]) -> int:
    target = make_target(args)
    try:
        server = await target.open()
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            os._exit(130)
        print("\ninterrupted: finishing the current run's records (Ctrl-C again to quit at once)", file=sys.stderr)
        stop.set()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):  # not the main thread (tests) or no signals here
        pass
    try:
        return await _sweep(args, target, server, rates, slo, stop)
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError):
            pass
        await target.close()


async def _sweep(
    args: argparse.Namespace,
    target: Target,
    server: dict[str, Any],
    rates: list[float | None],
    slo: dict[str, float],
    stop: asyncio.Event,
) -> int:
    tokenizer, tokenizer_path = resolve_tokenizer(args.tokenizer, server)
    prompts = PromptMaker(tokenizer, vocab_size=server.get("vocab_size") or None)
    if tokenizer is None and not args.quiet:
        print(
            "note: no tokenizer (--tokenizer PATH for exact prompt lengths): "
            + (
                "random token ids from the server's vocabulary"
                if prompts.vocab_size
                else "corpus words, ~1.3 tokens each"
            ),
            file=sys.stderr,
        )
    options = dataset_options(args, server.get("max_model_len") or None)
    num_requests = planned_requests(args, DEFAULT_NUM_REQUESTS)
    build_dataset(args.dataset, options, prompts, args.seed)  # bad parameters / trace lines fail before any load
    base_meta = {
        **tandem_version(),
        "label": args.label,
        "target": {"kind": target.kind, "url": target.description},
        "server": server,
        "model": server.get("model"),
        "dtype": server.get("dtype"),
        "topology": server.get("topology"),
        "tokenizer": tokenizer_path,
        "seed": args.seed,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "warmup": args.warmup,
        "duration_limit_s": args.duration,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "machine": machine_info(),
    }
    runs: list[dict[str, Any]] = []
    records: list[list] = []

    if args.warmup:
        warm = build_dataset(args.dataset, options, prompts, args.seed + 1_000_003)
        cfg = LoadConfig(
            rate=math.inf,
            max_concurrency=args.max_concurrency or args.warmup,
            num_requests=args.warmup,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            temperature=args.temperature,
        )
        warm_result = await run_load(target, warm, cfg, stop=stop, progress=Progress(args.warmup, "warmup", args.quiet))
        bad = [r for r in warm_result.records if not r.ok]
        if bad and not args.quiet:
            print(
                f"warmup: {len(bad)} of {len(warm_result.records)} failed ({bad[0].status}: {bad[0].error})",
                file=sys.stderr,
            )

    async def run_rate(rate: float | None) -> dict[str, Any]:
        dataset = build_dataset(args.dataset, options, prompts, args.seed, salt=len(runs))
        cfg = load_config(args, rate, num_requests)
        total = num_requests
        if dataset.size is not None:
            available = dataset.size * dataset.requests_per_unit
            total = available if total is None else min(total, available)
        result = await run_load(
            target, dataset, cfg, stop=stop, progress=Progress(total, f"rate {rate_label(rate)}", args.quiet)
        )
        run = run_summary(result, slo, rate, dataset.name, dataset.params, base_meta, num_requests)
        runs.append(run)
        records.append(result.records)
        return run

    search_doc = None
    if args.find_max_rate:

        async def evaluate(rate: float) -> float:
            if stop.is_set():
                return 0.0
            run = await run_rate(rate)
            print_table([run])
            return run["slo_attainment"] or 0.0

        found = await find_max_rate(
            evaluate,
            start=rates[0] if rates[0] is not None else 1.0,  # --find-max-rate parses one rate (not a trace)
            attainment=args.attainment,
            rel_tol=args.search_tolerance,
            max_probes=args.search_probes,
        )
        search_doc = {
            "max_rate": found.max_rate,
            "upper": found.upper,
            "attainment_target": args.attainment,
            "slo": slo,
            "probes": [{"request_rate": r, "slo_attainment": a} for r, a in found.probes],
        }
        upper = f" (missed at {found.upper:.3g})" if found.upper else ""
        print(
            f"\nhighest rate meeting {slo_text(slo)} for >= {args.attainment:.0%} of requests: "
            f"{found.max_rate:.3g} req/s{upper}"
        )
    else:
        for rate in rates:
            if stop.is_set():
                break
            await run_rate(rate)
    print()
    print_table(runs)
    if args.output:
        for message in write_outputs(args.output, runs, records, search_doc, plots=not args.no_plots):
            print(message, file=sys.stderr)
        print(f"wrote {Path(args.output) / 'summary.json'} and requests.jsonl" + ("" if args.no_plots else ", plots"))
    return 130 if stop.is_set() else 0


def planned_requests(args: argparse.Namespace, default: int) -> int | None:
    """Requests per rate: --num-requests, else unlimited under --duration, else `default`."""
    if args.num_requests is not None:
        return args.num_requests
    return None if args.duration is not None else default


def load_config(args: argparse.Namespace, rate: float | None, num_requests: int | None) -> LoadConfig:
    """The load flags as the LoadConfig of one rate."""
    return LoadConfig(
        rate=rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        num_requests=num_requests,
        duration_s=args.duration,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
    )


def dataset_options(args: argparse.Namespace, max_model_len: int | None) -> DatasetOptions:
    """The workload flags as DatasetOptions."""
    return DatasetOptions(
        input_len=args.input_len,
        output_len=args.output_len,
        spread=args.spread,
        num_groups=args.num_groups,
        prefix_len=args.prefix_len,
        turns=args.turns,
        common_prefix_len=args.common_prefix_len,
        trace_file=args.trace_file,
        max_model_len=max_model_len,
        num_requests=args.num_requests or DEFAULT_NUM_REQUESTS,
    )


def run_summary(
    result: LoadResult,
    slo: dict[str, float],
    rate: float | None,
    dataset: str,
    params: dict[str, Any],
    base_meta: dict[str, Any],
    num_requests: int | None,
) -> dict[str, Any]:
    run = summarize(result.records, result.duration_s, slo)
    first_errors: dict[str, str] = {}
    for r in result.records:
        if not r.ok and r.status not in first_errors:
            first_errors[r.status] = r.error
    run["first_errors"] = first_errors
    run["metadata"] = {
        **base_meta,
        "request_rate": json_rate(rate),
        "dataset": dataset,
        "dataset_params": params,
        "num_requests": num_requests,
        "interrupted": result.interrupted,
        "started_at": result.started_at,
    }
    return run


def run_bench(args: argparse.Namespace) -> int:
    try:
        rates, slo = check_args(args)
        if args.server:
            connection_settings(args)  # unreadable token / certificate files fail before anything else
    except (UsageError, SloError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_bench(args, rates, slo))
    except (UsageError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None, prog: str = "python -m tandem_api.bench") -> int:
    return run_bench(build_parser(prog).parse_args(argv))
