"""`tandem serve` flags: every common setting without writing a file.

    tandem serve [--config FILE] [--model PATH] [--host H] [--port N]
                 [--mode disaggregated|aggregated] [--prefill-replicas N] [--decode-replicas N]
                 [--block-size N] [--dtype D] [--kv-cache-memory SIZE] [--device D]
                 [--prefill-tp N] [--prefill-pp N] [--decode-tp N] [--decode-pp N]
                 [--prefill-block-size N] [--decode-block-size N]
                 [--prefill-kv-order NHD|HND] [--decode-kv-order NHD|HND]
                 [--router-policy kv|round-robin|least-loaded] [--conditional-prefill-threshold N]
                 [--router-temperature T] [--slo-ttft-ms MS] [--slo-itl-ms MS] [--metrics-port N]
                 [--max-inflight N] [--lease-s S]
                 [--http-port N | --no-http]
                 [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]] [--auth-token-file FILE]
                 [--speculative ngram|draft [--num-speculative-tokens K] [--draft-model PATH]
                  [--prompt-lookup-min N] [--prompt-lookup-max N] [--speculative-disable-batch-size N]]
                 [--planner none|sla --planner-profile FILE [--planner-slo KEY=MS,...]
                  [--planner-interval S] [--planner-max-workers N]]
                 [--ray-address HOST:PORT] [--print-config]

Flags override the file; the file overrides the defaults (deploy/config.py).
With --config, SIGHUP re-reads the file (and the flags) and the pools grow or shrink to its
`replicas` while serving (other changes are logged as needing a restart).
`--ray-address` (or RAY_ADDRESS) joins an existing Ray cluster instead of starting one.
"""

from __future__ import annotations

import argparse
import os
import sys

from deploy.config import ServeConfig, dump_config, load_config, parse_size, with_overrides


def add_speculative_flags(p) -> None:
    """Speculative decoding flags, the same for `tandem serve` and `tandem generate --offline`."""
    p.add_argument(
        "--speculative",
        choices=["ngram", "draft"],
        default=None,
        help="speculative decoding: n-gram prompt lookup, or a draft model (--draft-model)",
    )
    p.add_argument("--num-speculative-tokens", type=int, metavar="K", help="tokens proposed per step (default 4)")
    p.add_argument("--draft-model", metavar="PATH", help="--speculative draft: a model sharing the target's tokenizer")
    p.add_argument(
        "--prompt-lookup-min", type=int, metavar="N", help="--speculative ngram: shortest n-gram (default 2)"
    )
    p.add_argument("--prompt-lookup-max", type=int, metavar="N", help="--speculative ngram: longest n-gram (default 4)")
    p.add_argument(
        "--speculative-disable-batch-size",
        type=int,
        metavar="N",
        help="no speculation in a step with more than N requests decoding (default 8; 0: never off)",
    )


def speculative_overrides(args: argparse.Namespace) -> dict:
    """The speculative flags as with_overrides keys (None: not given)."""
    return {
        "speculative.method": args.speculative,
        "speculative.num_speculative_tokens": args.num_speculative_tokens,
        "speculative.draft_model": args.draft_model,
        "speculative.prompt_lookup_min": args.prompt_lookup_min,
        "speculative.prompt_lookup_max": args.prompt_lookup_max,
        "speculative.disable_batch_size": args.speculative_disable_batch_size,
    }


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="start the cluster and its front doors: gRPC, and OpenAI HTTP (Ctrl-C to stop)")
    s.add_argument("--config", help="YAML/JSON/TOML ServeConfig file (see deploy/config.py)")
    s.add_argument("--model", help="HF directory or .gguf file (default: the shipped SmolLM2-135M-Instruct)")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="gRPC port (default 50051)")
    s.add_argument(
        "--http-port",
        type=int,
        metavar="N",
        help="OpenAI-compatible HTTP port on the same --host (default 8000; 0: any free port)",
    )
    s.add_argument(
        "--no-http",
        dest="http",
        action="store_false",
        default=None,
        help="serve gRPC only (no OpenAI-compatible HTTP door)",
    )
    s.add_argument("--mode", choices=["disaggregated", "aggregated"])
    s.add_argument("--prefill-replicas", type=int)
    s.add_argument("--decode-replicas", type=int)
    s.add_argument("--block-size", type=int, help="KV block size of both pools")
    for pool in ("prefill", "decode"):
        s.add_argument(f"--{pool}-tp", type=int, metavar="N", help=f"tensor-parallel ranks per {pool} worker")
        s.add_argument(f"--{pool}-pp", type=int, metavar="N", help=f"pipeline stages per {pool} worker")
        s.add_argument(f"--{pool}-block-size", type=int, metavar="N", help=f"KV block size of the {pool} pool")
        s.add_argument(f"--{pool}-kv-order", choices=["NHD", "HND"], help=f"KV block layout of the {pool} pool")
    s.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--kv-cache-memory", type=parse_size, metavar="SIZE", help="KV cache per worker, e.g. 256MiB")
    s.add_argument("--device", help="auto, cpu or cuda (both pools; auto: cuda where the Ray cluster has a GPU)")
    s.add_argument(
        "--router-policy",
        "--policy",
        dest="policy",
        choices=["kv", "round-robin", "least-loaded", "round_robin", "least_loaded"],
        help="how the router picks workers: kv (prefix overlap + load, default), round-robin, least-loaded",
    )
    s.add_argument(
        "--conditional-prefill-threshold",
        type=int,
        metavar="N",
        help="prompts with at most N tokens uncached on the chosen decode worker prefill there "
        "(0, the default, disables local prefill)",
    )
    s.add_argument(
        "--slo-ttft-ms",
        type=float,
        metavar="MS",
        help="placement by SLO: prefill remotely while measured step times predict this TTFT (and "
        "--slo-itl-ms) is met, else locally on decode or whole on a prefill worker when that is predicted to "
        "meet them (default 4000; 0 with --slo-itl-ms 0: fixed placement)",
    )
    s.add_argument(
        "--slo-itl-ms",
        type=float,
        metavar="MS",
        help="placement by SLO: time per output token target (default 200; also what a decode worker lends "
        "its core within)",
    )
    s.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus metrics of the whole cluster at http://HOST:N/metrics (0: any free port)",
    )
    s.add_argument("--tls-cert", metavar="PEM", help="server certificate: the gRPC port is TLS-only (with --tls-key)")
    s.add_argument("--tls-key", metavar="PEM", help="server private key")
    s.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mutual TLS)")
    s.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="bearer tokens, one per line: every call except health checks must send one",
    )
    s.add_argument(
        "--router-temperature",
        type=float,
        metavar="T",
        help="kv policy: 0 picks the cheapest worker; T > 0 samples among near-equal ones",
    )
    s.add_argument("--max-inflight", type=int, help="requests in flight before RESOURCE_EXHAUSTED")
    s.add_argument("--lease-s", type=float, help="seconds prefill keeps a prompt's KV for decode to pull")
    s.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="join an existing Ray cluster (default: $RAY_ADDRESS, else start a local one)",
    )
    add_speculative_flags(s)
    pl = s.add_argument_group("SLA planner (planner/policy.py)")
    pl.add_argument(
        "--planner",
        choices=["none", "sla"],
        help="sla: size the prefill and decode pools from the targets while serving (default none)",
    )
    pl.add_argument("--planner-profile", metavar="FILE", help="profile.json written by `tandem profile`")
    pl.add_argument("--planner-slo", metavar="KEY=MS,...", help="targets, e.g. ttft_ms=2000,itl_ms=100")
    pl.add_argument("--planner-interval", type=float, metavar="S", help="seconds between decisions (default 30)")
    pl.add_argument("--planner-max-workers", type=int, metavar="N", help="prefill + decode workers at most")
    s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    s.add_argument("-v", "--verbose", action="store_true")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    base = load_config(args.config) if args.config else ServeConfig()
    return with_overrides(
        base,
        model=args.model,
        mode=args.mode,
        ray_address=args.ray_address,
        **{
            "router.host": args.host,
            "router.port": args.port,
            "router.policy": args.policy,
            "router.http": args.http,
            "router.http_port": args.http_port,
            "router.conditional_prefill_threshold": args.conditional_prefill_threshold,
            "router.slo_ttft_ms": args.slo_ttft_ms,
            "router.slo_itl_ms": args.slo_itl_ms,
            "router.temperature": args.router_temperature,
            "router.metrics_port": args.metrics_port,
            "router.tls_cert": args.tls_cert,
            "router.tls_key": args.tls_key,
            "router.tls_client_ca": args.tls_client_ca,
            "router.auth_token_file": args.auth_token_file,
            "router.max_inflight": args.max_inflight,
            "transport.lease_s": args.lease_s,
            "prefill.replicas": args.prefill_replicas,
            "decode.replicas": args.decode_replicas,
            "both.block_size": args.block_size,
            "both.dtype": args.dtype,
            "both.device": args.device,
            "both.kv_cache_memory": args.kv_cache_memory,
            **{
                f"{pool}.{field}": getattr(args, f"{pool}_{field}")
                for pool in ("prefill", "decode")
                for field in ("tp", "pp", "block_size", "kv_order")
            },
            **speculative_overrides(args),
            "planner.mode": args.planner,
            "planner.profile": args.planner_profile,
            "planner.slo": args.planner_slo,
            "planner.interval_s": args.planner_interval,
            "planner.max_workers": args.planner_max_workers,
        },
    )


def run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.print_config:
        print(dump_config(config))
        return 0
    from deploy.serve import serve_forever  # Ray and the router load only when serving

    try:  # unreadable TLS or token files fail here, before any actor starts
        from router.security import TlsFiles, read_tokens

        r = config.router
        if r.tls_cert and r.tls_key:
            TlsFiles(r.tls_cert, r.tls_key, r.tls_client_ca).credentials()
        if r.auth_token_file:
            read_tokens(r.auth_token_file)
        if config.planner.mode == "sla":  # a bad profile fails here, not after the workers started
            from planner.profile import load_profile

            load_profile(config.planner.profile)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reload = (lambda: config_from_args(args)) if args.config else None  # SIGHUP: the pools follow the file
    try:
        return serve_forever(config, reload)
    except ConnectionError as e:  # Ray not reachable at --ray-address / RAY_ADDRESS
        print(f"error: cannot join the Ray cluster ({config.ray_address or 'RAY_ADDRESS'}): {e}", file=sys.stderr)
        return 1
