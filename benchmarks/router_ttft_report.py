"""router_ttft.py's summary: per-policy statistics over the rounds, the replies compared between policies,
the kv / round-robin ratios against the target, and the printed table.
"""

from __future__ import annotations

from collections import Counter

from served_common import dist, pct

TARGET_P50_RATIO = 0.5  # the issue: kv's p50 TTFT at most half of round-robin's


def policy_stats(runs: list[dict]) -> dict:
    rows = [r for run in runs for r in run["rows"] if r.get("ttft_s") is not None]
    prompt = sum(r["prompt_tokens"] for r in rows)
    p_known = [r for r in rows if r.get("p_cached_tokens") is not None]
    per_turn = {}
    for t in sorted({r["turn"] for r in rows}):
        rt = [r for r in rows if r["turn"] == t]
        per_turn[t] = {
            "ttft_p50": pct([r["ttft_s"] for r in rt], 50),
            "p_hit_rate": (sum(r["p_cached_tokens"] or 0 for r in rt) / sum(r["prompt_tokens"] for r in rt)),
        }
    per_worker: Counter = Counter()
    for run in runs:
        per_worker.update(run["per_worker"])
    return {
        "runs": len(runs),
        "requests": len(rows),
        "errors": sum(len(run["errors"]) for run in runs),
        "ttft_s": dist([r["ttft_s"] for r in rows]),
        "router_ttft_s": dist([r["router_ttft_s"] for r in rows]),
        "prefill_s": dist([r["prefill_s"] for r in rows]),
        "kv_transfer_s": dist([r["kv_transfer_s"] for r in rows]),
        "hit_rate_usage": sum(r["cached_tokens"] for r in rows) / prompt if prompt else float("nan"),
        "hit_rate_prefill": (
            sum(r["p_cached_tokens"] for r in p_known) / sum(r["prompt_tokens"] for r in p_known)
            if p_known
            else float("nan")
        ),
        "prompt_tokens": prompt,
        "per_worker": dict(sorted(per_worker.items())),
        "wall_s": [run["wall_s"] for run in runs],
        "per_turn": per_turn,
    }


def compare_replies(runs: list[dict]) -> list[str]:
    if len(runs) < 2:
        return []
    ref = runs[0]
    out = []
    for run in runs[1:]:
        for key in sorted(set(ref["replies"]) | set(run["replies"])):
            a, b = ref["replies"].get(key), run["replies"].get(key)
            if a != b:
                at = next((i + 1 for i, (x, y) in enumerate(zip(a or [], b or [])) if x != y), None)
                out.append(
                    f"conversation/turn {key}: first differing token {at}: {ref['policy']}#{ref['round']} "
                    f"{a} vs {run['policy']}#{run['round']} {b}"
                )
    return out


def compare_policies(stats: dict) -> dict | None:
    kv, rr = stats.get("kv"), stats.get("round-robin")
    if not kv or not rr or not kv["requests"] or not rr["requests"]:
        return None
    p50 = kv["ttft_s"]["p50"] / rr["ttft_s"]["p50"]
    p99 = kv["ttft_s"]["p99"] / rr["ttft_s"]["p99"]
    met = p50 <= TARGET_P50_RATIO
    print(
        f"\nkv / round-robin client TTFT: p50 {p50:.2f}x, p99 {p99:.2f}x "
        f"(router TTFT p50 {kv['router_ttft_s']['p50'] / rr['router_ttft_s']['p50']:.2f}x)"
    )
    print(f"target: kv p50 TTFT at most {TARGET_P50_RATIO:g}x round-robin's -> {'MET' if met else 'NOT MET'}")
    return {
        "p50_ratio": p50,
        "p99_ratio": p99,
        "router_p50_ratio": kv["router_ttft_s"]["p50"] / rr["router_ttft_s"]["p50"],
        "target": f"p50 <= {TARGET_P50_RATIO:g}x round-robin",
        "met": met,
    }


def print_table(args, runs: list[dict], stats: dict) -> None:
    print("\nper run:")
    for run in runs:
        print(
            f"  {run['policy']:>13} round {run['round']}: wall {run['wall_s']:.1f} s, cluster start "
            f"{run['start_s']:.1f} s, {len(run['errors'])} errors, pools {run['pools']}, "
            f"per prefill worker {dict(sorted(run['per_worker'].items()))}"
        )
    ms = 1e3
    print(
        f"\n{'policy':>13} {'n':>4} {'TTFT p50':>9} {'p90':>7} {'p99':>7} {'mean':>7} {'router p50':>11} "
        f"{'p99':>7} {'P comp p50':>11} {'hit P':>6} {'hit usage':>10} {'wall s':>7}  requests per prefill worker"
    )
    for p, s in stats.items():
        t, r = s["ttft_s"], s["router_ttft_s"]
        print(
            f"{p:>13} {s['requests']:>4} {t['p50'] * ms:>7.0f}ms {t['p90'] * ms:>5.0f}ms {t['p99'] * ms:>5.0f}ms "
            f"{t['mean'] * ms:>5.0f}ms {r['p50'] * ms:>9.0f}ms {r['p99'] * ms:>5.0f}ms "
            f"{s['prefill_s']['p50'] * ms:>9.0f}ms {100 * s['hit_rate_prefill']:>5.1f}% "
            f"{100 * s['hit_rate_usage']:>9.1f}% {sum(s['wall_s']):>7.1f}  {s['per_worker']}"
        )
    print("\nper turn (client TTFT p50 / hit rate on P):")
    for p, s in stats.items():
        print(
            f"{p:>13}  "
            + "  ".join(
                f"turn {t}: {v['ttft_p50'] * ms:.0f}ms / {100 * v['p_hit_rate']:.0f}%" for t, v in s["per_turn"].items()
            )
        )


# -- helpers -------------------------------------------------------------------------------------------------
