"""The `tandem` command line.

    tandem generate --offline [--model PATH] [--prompt TEXT | --chat TEXT]... [--max-tokens N]
                    [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] [--json]
                    [--speculative ngram|draft [--num-speculative-tokens K] [--draft-model PATH] ...]
    tandem generate --server HOST:PORT [--prompt TEXT | --chat TEXT]... [sampling flags] [--json] [--timeout S]
    tandem serve [--model PATH] [--port N] [--mode disaggregated|aggregated] [...]   (deploy/serve_cli.py)
    tandem admin [--server HOST:PORT] add|remove|scale ...                          (deploy/admin_cli.py)
    tandem profile [--config FILE] [--model PATH] --output profile.json [--append] [--quick]
                                                                     (deploy/profile_cli.py)
    tandem bench --server HOST:PORT | --openai-url URL [...]                        (tandem_api/bench/cli.py)
    tandem simulate --profile profile.json --prefill N --decode M [bench workload flags] (planner/cli.py)
    tandem plan --profile profile.json --request-rate R --slo ttft_ms=X,itl_ms=Y [--max-workers K]

--offline runs every prompt (`--prompt` and `--chat` may repeat and mix) together
as one batch in this process. --server sends them, one after the other, to a
running router over gRPC (tandem_api.client; no torch in that path) and streams
each text to stdout as it arrives. With --json, one JSON object per prompt per
line, in the order given (with --server it also holds timings and the workers).
Errors in the input print one line on stderr and exit with status 2; with
--server, a server that cannot be reached or fails exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

# Only the standard library at the top: `tandem bench` runs from a client-only install (requirements/bench.txt:
# no torch, Ray, msgspec), so the serving commands' modules are imported when their command is parsed or run.

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


class _Ordered(argparse.Action):
    """Collects --prompt and --chat into one list, keeping their order."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, "inputs", None) or []
        items.append((self.dest, values))
        namespace.inputs = items


def build_parser() -> argparse.ArgumentParser:
    from deploy.admin_cli import add_admin_parser
    from deploy.profile_cli import add_profile_parser
    from deploy.serve_cli import add_serve_parser, add_speculative_flags
    from planner.cli import add_plan_parser, add_simulate_parser
    from tandem_api.bench.cli import add_bench_parser
    from tandem_api.connection import add_connection_flags

    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_admin_parser(sub)
    add_profile_parser(sub)
    add_bench_parser(sub)
    add_simulate_parser(sub)
    add_plan_parser(sub)
    g = sub.add_parser("generate", help="generate completions")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--offline", action="store_true", help="run the engine in this process (no cluster)")
    where.add_argument("--server", metavar="HOST:PORT", default=None, help="send the prompts to a running router")
    g.add_argument(
        "--model", default="", help="HF directory or .gguf file (default: the shipped SmolLM2-135M-Instruct)"
    )
    g.add_argument("--prompt", action=_Ordered, dest="prompt", help="a text prompt (repeatable)")
    g.add_argument(
        "--chat", action=_Ordered, dest="chat", help="a user message, rendered with the chat template (repeatable)"
    )
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto (cuda where a GPU is visible, else cpu), cpu or cuda")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="KV cache budget in bytes")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    g.add_argument("--timeout", type=float, default=None, help="--server: deadline per request, in seconds")
    g.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="--server: first wait up to S seconds for the server to report SERVING (a starting cluster)",
    )
    g.add_argument("-v", "--verbose", action="store_true")
    add_speculative_flags(g)
    add_connection_flags(g)
    g.set_defaults(inputs=None)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from common.sampling_params import SamplingParams

    if not args.offline and not args.server:
        print(
            "error: pass --offline (run the engine in this process) or --server HOST:PORT (a running router)",
            file=sys.stderr,
        )
        return 2
    inputs = args.inputs or [("chat", DEFAULT_PROMPT)]
    params = SamplingParams(  # checked here too with --server: bad flags fail before any connection
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )
    if args.server:
        if args.model or args.speculative or args.draft_model:
            print(
                "error: --model and the speculative flags apply to --offline only; the server's are chosen when "
                "it starts (tandem serve)",
                file=sys.stderr,
            )
            return 2
        return _generate_remote(args, inputs, params)
    from deploy.config import ServeConfig, with_overrides
    from deploy.serve_cli import speculative_overrides
    from engine.llm import LLM  # imports torch: only on the offline path

    speculative = with_overrides(ServeConfig(), **speculative_overrides(args)).speculative.engine()
    llm = LLM(
        args.model or None,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory,
        seed=args.seed or 0,
        speculative=speculative,
    )
    prompts = [[{"role": "user", "content": text}] if kind == "chat" else text for kind, text in inputs]
    outputs = llm.generate(prompts, params)
    for (kind, text), out in zip(inputs, outputs):
        if args.json:
            print(json.dumps(out.to_dict(), ensure_ascii=False), flush=True)
        else:
            print(f"### {kind}: {text}\n{out.text}\n[{out.finish_reason}, {len(out.token_ids)} tokens]\n", flush=True)
    return 0


def _generate_remote(args: argparse.Namespace, inputs: list[tuple[str, str]], params) -> int:
    """--server: one request per input, in order; text streamed, or one JSON line per input."""
    import grpc

    from deploy.admin_cli import connect
    from tandem_api.v1 import generation_pb2 as pb

    sampling = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "seed": params.seed,
        "stop": list(params.stop),
        "ignore_eos": params.ignore_eos,
        "logprobs": params.logprobs,
    }
    with connect(args) as client:
        if args.wait > 0:
            try:
                client.wait_until_serving(timeout=args.wait)
            except TimeoutError:
                print(f"error: {args.server} did not report SERVING within {args.wait:.0f} s", file=sys.stderr)
                return 1
        for kind, text in inputs:
            source = {"chat": [{"role": "user", "content": text}]} if kind == "chat" else {"prompt": text}
            ids: list[int] = []
            texts: list[str] = []
            logprobs: list[dict] = []
            first = last = None
            if not args.json:
                print(f"### {kind}: {text}", flush=True)
            try:
                for last in client.generate(**source, timeout=args.timeout, **sampling):
                    first = first or last
                    ids.extend(last.token_ids)
                    texts.append(last.text)
                    logprobs.extend(
                        {
                            "token_id": lp.token_id,
                            "logprob": lp.logprob,
                            "top": [[t.token_id, t.logprob] for t in lp.top],
                        }
                        for lp in last.logprobs
                    )
                    if not args.json:
                        print(last.text, end="", flush=True)
            except grpc.RpcError as e:
                if not args.json:
                    print(flush=True)
                print(f"error: {e.details()} ({e.code().name})", file=sys.stderr)
                bad_input = e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
                return 2 if bad_input else 1
            if last is None or first is None:
                print("error: the server ended the stream without a response", file=sys.stderr)
                return 1
            reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
            if not args.json:
                print(f"\n[{reason}, {len(ids)} tokens]\n", flush=True)
                continue
            t = last.timings
            record = {
                "request_id": last.request_id,
                "token_ids": ids,
                "text": "".join(texts),
                "finish_reason": reason,
                "stop_reason": last.stop_reason or None,
                "prompt_tokens": last.usage.prompt_tokens,
                "completion_tokens": last.usage.completion_tokens,
                "cached_tokens": last.usage.cached_tokens,
                "timings": {
                    "time_to_first_token_s": t.time_to_first_token_s,
                    "total_s": t.total_s,
                    "queue_s": t.queue_s,
                    "prefill_s": t.prefill_s,
                    "kv_transfer_s": t.kv_transfer_s,
                },
                "prefill_worker": first.prefill_worker,
                "decode_worker": first.decode_worker,
                "route": first.route,
            }
            if params.logprobs is not None:
                record["logprobs"] = logprobs
            print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # before the serving stack's parsers are imported (see the imports above)
        from tandem_api.bench.cli import main as bench_main

        return bench_main(argv[1:], prog="tandem bench")
    if argv[:1] in (["simulate"], ["plan"]):  # torch-free too (planner/)
        from planner.cli import main as planner_main

        return planner_main(argv)
    from deploy.import_names import ImportNameCollision, check_import_names

    try:
        check_import_names()
    except ImportNameCollision as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from common.errors import EngineError

    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if verbose:  # every routing decision as its filled-in cost formulas
        logging.getLogger("router.decisions").setLevel(logging.DEBUG)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            from deploy.serve_cli import run_serve

            return run_serve(args)
        if args.command == "admin":
            from deploy.admin_cli import run_admin

            return run_admin(args)
        if args.command == "profile":
            from deploy.profile_cli import run_profile

            return run_profile(args)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
