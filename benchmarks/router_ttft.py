"""TTFT with KV-aware prefill routing against round-robin, on the real served cluster.

Starts, one after the other in this process, a disaggregated cluster of 2 prefill + 1
decode Ray actors (SmolLM2-135M, NIXL) per router policy (`router.policy`: kv,
round-robin, optionally least-loaded) and drives each with the same multi-turn chat
workload with heavy prefix sharing:

    --system-prompts 8 system prompts of --system-tokens 512 random token ids
    --conversations 64, conversation c starts with system prompt c % 8, --turns 3 turns:
        turn t's prompt = system + (user_1 + reply_1) + ... + user_t
        user_i = 16..48 random token ids, reply_i = the ids the server returned for turn i
        (--max-tokens 8, greedy, ignore_eos)
    --concurrency 4 client threads; a conversation's turns run in order; a thread takes
        the next ready conversation (seeded random order first, then a conversation goes
        to the back of the queue when its turn finishes)

Each prefill worker gets only --prefill-kv-memory of KV cache (default 72MiB, about 200
blocks of 16 tokens: about 6 of the 8 system prompts, fewer with the conversations' own
blocks), so a load-blind policy that sends every system prompt to both workers keeps
evicting them, while `kv` keeps each prompt on the worker that holds it. Greedy replies
do not depend on the policy, so every run sends the same prompts; the script compares
the replies across runs and reports any difference loudly.

Per policy: client TTFT (send -> first response message) p50/p90/p99/mean, the router's
timings.time_to_first_token_s, P's compute (timings.prefill_s), the prefix-cache hit rate
sum(cached) / sum(prompt tokens), requests per prefill worker, wall time; then kv /
round-robin for p50 and p99 against the issue's target (kv p50 TTFT <= 0.5x round-robin).

Two hit rates are printed. `usage` is the router's usage.cached_tokens on the last chunk.
`P` is what the prefill worker itself found: PrefillResult.cached_tokens, read by wrapping
the router's prefill client in this process (deploy.serve.ray_client). They must agree: the
first runs of this script showed `usage` reporting the decode worker's own hit instead (it
holds every system prompt), which the decode worker no longer does; the two columns stay as
a check.

Replies: in bfloat16 the engine's greedy tokens depend on which other requests share the
decode batch, so a few replies differ between any two runs, even of the same policy (and
later turns of that conversation then send different prompts). The script reports each
difference with the first token that differs; token 1 comes from P, tokens 2+ from D.
float32 (--dtype float32, about 3x slower) is expected to give identical replies.

    python benchmarks/router_ttft.py                                  # default run (~4 min on 2 cores)
    python benchmarks/router_ttft.py --conversations 8 --turns 2      # smoke run
    python benchmarks/router_ttft.py --policies kv round-robin least-loaded --rounds 2

--rounds 2 alternates the order (kv, rr, rr, kv) to cancel drift; stats pool the rounds.
Writes JSON to --out (default benchmarks/results/router_ttft.json).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router_ttft_report import (  # noqa: E402 - the script's own folder is on sys.path
    compare_policies,
    compare_replies,
    policy_stats,
    print_table,
)
from served_common import ScriptRun, fmt_load, free_port, timed_greedy  # noqa: E402

TOKEN_LO, TOKEN_HI = 100, 40000  # random prompt ids: clear of special tokens, inside the vocabulary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--policies", nargs="+", default=["kv", "round-robin"], choices=["kv", "round-robin", "least-loaded"]
    )
    ap.add_argument("--rounds", type=int, default=1, help="2: kv, rr, rr, kv (alternating order)")
    ap.add_argument("--system-prompts", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--user-tokens", type=int, nargs=2, default=[16, 48], metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill-kv-memory", default="72MiB", help="per prefill worker; 368,640 B per 16-token block")
    ap.add_argument("--decode-kv-memory", default="256MiB")
    ap.add_argument("--num-cpus", type=float, default=0.5, help="Ray CPUs per worker (both pools)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--timeout", type=float, default=300.0, help="gRPC deadline per request, seconds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "router_ttft.json"))
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # PLATFORM.md: Ray token auth is on by default
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    frame = ScriptRun()

    workload = build_workload(args)
    print(
        f"workload: {args.conversations} conversations x {args.turns} turns, {args.system_prompts} system prompts "
        f"of {args.system_tokens} tokens, concurrency {args.concurrency}, max_tokens {args.max_tokens}",
        flush=True,
    )

    runs = []
    for rnd in range(args.rounds):
        order = args.policies if rnd % 2 == 0 else list(reversed(args.policies))
        for policy in order:
            runs.append(run_policy(args, policy, rnd, workload))

    mismatches = compare_replies(runs)
    stats = {p: policy_stats([r for r in runs if r["policy"] == p]) for p in args.policies}
    print_table(args, runs, stats)
    verdict = compare_policies(stats)
    if mismatches:
        first = [c for c, t in (m.split(":")[0].split()[-1].split("/") for m in mismatches) if t == "1"]
        print(
            f"\n!!! REPLY MISMATCH: {len(mismatches)} (conversation, turn) replies differ between runs "
            f"({len(first)} on turn 1, where the prompts are identical). Greedy replies should not depend on the "
            "routing policy; in bfloat16 they do depend on the decode batch (see the docstring). First ones:",
            flush=True,
        )
        for m in mismatches[:10]:
            print(f"!!!   {m}")
    else:
        print(f"\nreplies: identical across all {len(runs)} runs ({sum(len(r['replies']) for r in runs[:1])} per run)")

    frame.finish(
        args.out,
        {
            "cluster": {r["policy"] + f"#{r['round']}": r["cluster"] for r in runs},
            "stats": stats,
            "kv_vs_round_robin": verdict,
            "reply_mismatches": mismatches,
            "runs": [{k: v for k, v in r.items() if k not in ("rows", "replies")} for r in runs],
            "rows": [row for r in runs for row in r["rows"]],
        },
        config={k: v for k, v in vars(args).items() if k != "out"},
    )


# -- workload ------------------------------------------------------------------------------------------


def build_workload(args) -> dict:
    rng = random.Random(args.seed)
    systems = [
        [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(args.system_tokens)] for _ in range(args.system_prompts)
    ]
    users = [
        [[rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(rng.randint(*args.user_tokens))] for _ in range(args.turns)]
        for _ in range(args.conversations)
    ]
    order = list(range(args.conversations))
    rng.shuffle(order)
    warmup = [[rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(48)] for _ in range(8)]
    return {"systems": systems, "users": users, "order": order, "warmup": warmup}


# -- one cluster -----------------------------------------------------------------------------------------


class PrefillProbe:
    """Records PrefillResult.cached_tokens per request id: what the prefill worker's own prefix cache held."""

    def __init__(self) -> None:
        self.cached: dict[str, int] = {}
        self.worker: dict[str, str] = {}

    def install(self):
        import deploy.serve as serve_mod

        original = serve_mod.ray_client
        probe = self

        def ray_client(handle):
            client = original(handle)
            inner = client.prefill

            async def prefill(request_id, *args):  # the WorkerClient call, whatever it carries after the id
                result = await inner(request_id, *args)
                probe.cached[request_id] = result.cached_tokens
                probe.worker[request_id] = result.worker_id
                return result

            client.prefill = prefill
            return client

        serve_mod.ray_client = ray_client
        return lambda: setattr(serve_mod, "ray_client", original)


def run_policy(args, policy: str, rnd: int, workload: dict) -> dict:
    from deploy.config import ServeConfig, with_overrides
    from deploy.serve import Serving
    from tandem_api.client import TandemClient

    cfg = with_overrides(
        ServeConfig(),
        **{
            "model": "",
            "prefill.replicas": 2,
            "decode.replicas": 1,
            "router.policy": policy,
            "router.conditional_prefill_threshold": 0,
            "router.slo_ttft_ms": 0,  # every prompt to the prefill pool: the policies see the same placement
            "router.slo_itl_ms": 0,
            "router.port": free_port(),
            "router.http_port": 0,
            "prefill.kv_cache_memory": args.prefill_kv_memory,
            "decode.kv_cache_memory": args.decode_kv_memory,
            "both.num_cpus": args.num_cpus,
            "both.dtype": args.dtype,
        },
    )
    print(f"\n=== policy {policy} (round {rnd}): starting cluster, load {fmt_load(os.getloadavg())}", flush=True)
    probe = PrefillProbe()
    uninstall = probe.install()
    t0 = time.perf_counter()
    try:
        serving = Serving(cfg)
    finally:
        uninstall()
    with serving as s:
        start_s = time.perf_counter() - t0
        control = TandemClient(s.address)
        info = control.server_info()
        if info.vocab_size < TOKEN_HI:
            raise SystemExit(f"vocab_size {info.vocab_size} < {TOKEN_HI}: the random prompt ids would be invalid")
        workers = {
            w.worker_id: {
                "role": w.role,
                "kv_blocks_total": w.kv_blocks_total,
                "block_size": w.block_size,
                "dtype": w.dtype,
            }
            for w in info.workers
        }
        prefill_ids = sorted(w for w, v in workers.items() if v["role"] == "prefill")
        print(
            f"cluster up in {start_s:.1f} s: {info.topology}, vocab {info.vocab_size}; "
            + ", ".join(
                f"{w} {v['kv_blocks_total']} blocks x {v['block_size']} ({v['dtype']})" for w, v in workers.items()
            ),
            flush=True,
        )
        warm = warm_up(control, prefill_ids, workload["warmup"], args.timeout)
        print(f"warm-up: {warm}", flush=True)

        t_run = time.perf_counter()
        rows, replies, errors = drive(args, s.address, policy, rnd, workload)
        wall_s = time.perf_counter() - t_run
        for row in rows:
            row["p_cached_tokens"] = probe.cached.get(row["request_id"])
        try:
            s.cluster.check_pools()
            pools_ok = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, the numbers are still worth printing
            pools_ok = f"FAILED: {exc!r}"
            print(f"!!! check_pools after the {policy} run: {pools_ok}", flush=True)
        end_info = control.server_info()
        indexed = {w.worker_id: w.kv_blocks_indexed for w in end_info.workers}
        control.close()
    per_worker = Counter(r["prefill_worker"] for r in rows if r.get("ttft_s") is not None)
    print(
        f"policy {policy}: {len(rows)} requests in {wall_s:.1f} s, {len(errors)} errors; per prefill worker "
        f"{dict(sorted(per_worker.items()))}; pools {pools_ok}",
        flush=True,
    )
    for e in errors[:5]:
        print(f"!!!   error: {e}", flush=True)
    return {
        "policy": policy,
        "round": rnd,
        "wall_s": wall_s,
        "start_s": start_s,
        "errors": errors,
        "pools": pools_ok,
        "per_worker": dict(per_worker),
        "rows": rows,
        "replies": replies,
        "cluster": {
            "topology": info.topology,
            "model": info.model,
            "workers": workers,
            "kv_blocks_indexed_at_end": indexed,
            "warmup": warm,
        },
    }


def warm_up(client, prefill_ids: list[str], prompts: list[list[int]], timeout: float) -> dict:
    """Throwaway requests until every prefill worker has served one (sent in pairs, so kv spreads them too)."""
    seen: Counter = Counter()
    prompts = list(prompts)
    while prompts and not all(seen[w] for w in prefill_ids):
        batch = [prompts.pop() for _ in range(min(len(prefill_ids), len(prompts)))]
        results: list = [None] * len(batch)

        def one(i: int, ids: list[int]) -> None:
            first = None
            for resp in client.generate(token_ids=ids, max_tokens=2, temperature=0.0, ignore_eos=True, timeout=timeout):
                first = first or resp.prefill_worker
            results[i] = first

        threads = [threading.Thread(target=one, args=(i, ids)) for i, ids in enumerate(batch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen.update(r for r in results if r)
    missing = [w for w in prefill_ids if not seen[w]]
    if missing:
        print(f"!!! warm-up never reached {missing}", flush=True)
    return dict(seen)


def drive(args, address: str, policy: str, rnd: int, workload: dict):
    import grpc

    from tandem_api.client import TandemClient

    systems, users = workload["systems"], workload["users"]
    n_sys = len(systems)
    ready = deque(workload["order"])
    history: dict[int, list[int]] = {c: [] for c in range(args.conversations)}  # (user + reply) tokens so far
    next_turn = dict.fromkeys(range(args.conversations), 0)
    state = {"in_flight": 0}
    cond = threading.Condition()
    rows: list[dict] = []
    replies: dict[str, list[int]] = {}
    errors: list[str] = []

    def worker(k: int) -> None:
        client = TandemClient(address)
        try:
            while True:
                with cond:
                    while not ready and state["in_flight"]:
                        cond.wait()
                    if not ready:
                        return
                    c = ready.popleft()
                    state["in_flight"] += 1
                    t = next_turn[c]
                    prompt = systems[c % n_sys] + history[c] + users[c][t]
                rid = f"{policy}-r{rnd}-c{c}-t{t}"
                row = {
                    "policy": policy,
                    "round": rnd,
                    "conversation": c,
                    "turn": t + 1,
                    "system": c % n_sys,
                    "request_id": rid,
                    "prompt_tokens": len(prompt),
                    "thread": k,
                }
                reply: list[int] = []
                ok = False
                try:
                    r = timed_greedy(client, prompt, rid, args.max_tokens, args.timeout)
                    reply, last = r.tokens, r.last
                    row.update(
                        prefill_worker=r.first.prefill_worker, decode_worker=r.first.decode_worker, route=r.first.route
                    )
                    row.update(
                        ttft_s=r.ttft_s,
                        total_s=r.total_s,
                        sent_at_s=r.sent_at - t_run0,
                        router_ttft_s=last.timings.time_to_first_token_s,
                        prefill_s=last.timings.prefill_s,
                        queue_s=last.timings.queue_s,
                        kv_transfer_s=last.timings.kv_transfer_s,
                        cached_tokens=last.usage.cached_tokens,
                        usage_prompt_tokens=last.usage.prompt_tokens,
                        completion_tokens=last.usage.completion_tokens,
                    )
                    ok = len(reply) == args.max_tokens
                    if not ok:
                        errors.append(f"{rid}: {len(reply)} tokens back, expected {args.max_tokens}")
                except grpc.RpcError as exc:
                    errors.append(f"{rid}: {exc.code().name} {exc.details()}")
                    row["error"] = f"{exc.code().name} {exc.details()}"
                except RuntimeError as exc:  # an empty stream
                    errors.append(f"{rid}: {exc}")
                    row["error"] = str(exc)
                with cond:
                    rows.append(row)
                    state["in_flight"] -= 1
                    if ok:
                        replies[f"{c}/{t + 1}"] = reply
                        history[c] = history[c] + users[c][t] + reply
                        next_turn[c] = t + 1
                        if t + 1 < args.turns:
                            ready.append(c)
                    cond.notify_all()
        finally:
            client.close()

    t_run0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,), name=f"client-{k}") for k in range(args.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rows.sort(key=lambda r: r.get("sent_at_s", float("inf")))
    return rows, replies, errors


# -- numbers -----------------------------------------------------------------------------------------------


if __name__ == "__main__":
    main()
