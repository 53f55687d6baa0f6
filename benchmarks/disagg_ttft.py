"""Share of time to first token spent moving the KV cache, on the real served cluster.

Starts the default disaggregated cluster (1 prefill + 1 decode Ray actor, SmolLM2,
NIXL over UCX) in this process, sends prompts of 128, 512 and 2048 random tokens
one at a time (fresh prompts each time: no prefix-cache hit on either side) and
reads the timings the router returns on the last chunk:

    ttft          router receipt -> token 1 sent (prefill on P, streamed at once)
    kv_transfer   decode's pull of the prompt's blocks (submit -> DONE)
    share         kv_transfer / ttft: the share transfer would add to TTFT if token 1
                  waited for it, as in a proxy that streams only from decode (Tandem
                  streams token 1 from P, so transfer is in token 2's latency instead)
    token2_gap    token 1 -> token 2 at the client (transfer + one decode step)

Median over --reps. Prints a table and writes benchmarks/results/disagg_ttft.json.
    python benchmarks/disagg_ttft.py [--reps 5] [--lengths 128 512 2048] [--dtype auto] [--device cpu]

--shape runs several cluster shapes one after the other in the same run (config keys as
`tandem serve` sets them, comma-separated; "" = the default), e.g. TP1 -> TP1 against
prefill TP3 -> decode TP1 with re-blocking and NHD -> HND:
    python benchmarks/disagg_ttft.py --shape "" "prefill.tp=3,decode.block_size=32,decode.kv_order=HND"
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-cache-memory", default="512MiB")
    ap.add_argument("--shape", nargs="+", default=[""], help='cluster shapes, e.g. "prefill.tp=3,decode.pp=2"')
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "disagg_ttft.json"))
    args = ap.parse_args()
    results = [run_shape(args, shape) for shape in args.shape]
    for res in results:
        print(f"\n{res['topology']}")
        print(
            f"{'prompt':>7} {'TTFT ms':>9} {'prefill ms':>11} {'KV pull ms':>11} {'pull/TTFT':>10} {'tok1->2 ms':>11}"
        )
        for r in res["rows"]:
            print(
                f"{r['prompt_tokens']:>7} {r['ttft_ms']:>9.1f} {r['prefill_ms']:>11.1f} {r['kv_transfer_ms']:>11.2f} "
                f"{r['share_pct']:>9.2f}% {r['token2_gap_ms']:>11.1f}"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results[0] if len(results) == 1 else {"shapes": results}, indent=2))


def _parse_shape(shape: str) -> dict:
    out = {}
    for item in filter(None, (x.strip() for x in shape.split(","))):
        key, _, value = item.partition("=")
        out[key] = int(value) if value.isdigit() else value
    return out


def run_shape(args, shape: str) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from deploy.config import ServeConfig, with_overrides
    from deploy.serve import Serving
    from tandem_api.client import TandemClient

    cfg = with_overrides(
        ServeConfig(),
        **{
            "router.port": 0,
            "router.http_port": 0,
            "both.dtype": args.dtype,
            "both.device": args.device,
            "both.kv_cache_memory": args.kv_cache_memory,
            **_parse_shape(shape),
        },
    )
    rng = random.Random(0)
    rows = []
    with Serving(cfg) as s:
        client = TandemClient(s.address)
        vocab = client.server_info().vocab_size
        client.complete(token_ids=[rng.randrange(vocab) for _ in range(64)], max_tokens=2)  # warm up both workers
        for n in args.lengths:
            samples = []
            for _ in range(args.reps):
                ids = [rng.randrange(100, vocab) for _ in range(n)]
                t0 = time.perf_counter()
                stamps, last = [], None
                for last in client.generate(token_ids=ids, max_tokens=2, temperature=0.0, ignore_eos=True):
                    stamps.append(time.perf_counter() - t0)
                assert last is not None  # the server always sends at least one response
                t = last.timings
                samples.append(
                    (
                        t.time_to_first_token_s,
                        t.kv_transfer_s,
                        t.prefill_s,
                        stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan"),
                    )
                )
            ttft, xfer, prefill, gap = (statistics.median(col) for col in zip(*samples))
            rows.append(
                {
                    "prompt_tokens": n,
                    "ttft_ms": ttft * 1e3,
                    "prefill_ms": prefill * 1e3,
                    "kv_transfer_ms": xfer * 1e3,
                    "share_pct": 100 * xfer / ttft,
                    "token2_gap_ms": gap * 1e3,
                }
            )
        s.cluster.check_pools()
        info = client.server_info()
    return {
        "rows": rows,
        "reps": args.reps,
        "model": info.model,
        "dtype": [w.dtype for w in info.workers][0],
        "device": args.device,
        "topology": info.topology,
        "shape": shape,
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }


if __name__ == "__main__":
    main()
