"""KV block transfer bandwidth: NIXL READ between two agents vs a plain preallocated memcpy.

SmolLM2-135M's KV geometry (30 layers, 3 KV heads, head_dim 64, block 16, bf16:
368,640 bytes per block across all layers and K/V). For each block count, the same
plan (`plan_transfer`, one region per (layer, K|V, run)) is executed three ways:

    nixl            NixlTransport READ from a peer agent in a spawned process that owns
                    its own cache: host memory by UCX cma (--device cpu), or VRAM on the
                    same GPU by CUDA IPC (--device cuda; two agents in ONE process would
                    fall back to tcp, see nixl_transport.py)
    memcpy regions  dst[region].copy_(src[region]) for every region, in this process
    memcpy flat     one dst.copy_(src) of the same number of bytes (the ceiling)

Timings are best of --reps, with the three methods interleaved in each repetition;
a NIXL time runs from submit (descriptors built, request posted) to DONE, release
excluded. Blocks are a contiguous run by default (a fresh pool), or `--pattern
scattered` (random ids: one region per block per layer per K/V). No notification is
attached (the data path alone); add --notify to attach one, which then also waits on
the peer's poll cadence (~0.5 ms).

    .venv/bin/python benchmarks/kv_transfer_bandwidth.py                       # 1,16,256,4096 blocks
    .venv/bin/python benchmarks/kv_transfer_bandwidth.py --blocks 1,16 --reps 3
    .venv/bin/python benchmarks/kv_transfer_bandwidth.py --device cuda

Memory: about 3 caches of max(blocks) blocks (1.5 GB each at 4096 blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from kv_transfer import KVLayout, NixlTransport, TransferOp, TransferState, plan_transfer
from kv_transfer.testing import PeerSpec, RemotePeer, make_cache, wait_done

SMOLLM2: dict[str, Any] = dict(model_fingerprint="smollm2-135m", total_layers=30, layer_start=0, num_layers=30,
                               total_kv_heads=3, head_start=0, num_kv_heads=3, head_dim=64, block_size=16,
                               dtype="bfloat16", order="NHD")  # fmt: skip
RESULTS = Path(__file__).parent / "results" / "kv_transfer_bandwidth.json"


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def timed(fn, plan, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn(plan)
    sync(device)
    return time.perf_counter() - t


def pick_blocks(n: int, num_blocks: int, pattern: str, rng: random.Random) -> tuple[list[int], list[int]]:
    if pattern == "contiguous":
        return list(range(n)), list(range(num_blocks - n, num_blocks))
    return rng.sample(range(num_blocks), n), rng.sample(range(num_blocks), n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="1,16,256,4096", help="comma-separated block counts")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--pattern", choices=["contiguous", "scattered"], default="contiguous")
    ap.add_argument("--notify", action="store_true", help="attach a notification to each READ")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    counts = [int(x) for x in args.blocks.split(",")]
    device = "cpu" if args.device == "cpu" else "cuda:0"
    lay = KVLayout(**SMOLLM2, num_blocks=max(counts), device=device)
    print(f"device {device}, {lay.block_bytes * 2 * lay.num_layers} bytes per block, {max(counts)} blocks per cache, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip

    dst = make_cache(lay)  # the local cache NIXL reads into
    src = make_cache(lay)  # a local source for the memcpy baselines
    src.reshape(-1).view(torch.uint8).fill_(0x5A)
    dst_b, src_b = dst.reshape(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8)
    local = NixlTransport("bench-D")
    local.register(dst, lay)
    peer = RemotePeer(PeerSpec("bench-P", lay, seed=None))  # its cache is filled with 0x5A
    local.add_peer(peer.call("handshake"))
    peer.call("add_peer", local.handshake_payload())

    rng = random.Random(0)
    plans = {n: plan_transfer(lay, lay, *pick_blocks(n, lay.num_blocks, args.pattern, rng)) for n in counts}
    best = {(n, m): float("inf") for n in counts for m in ("nixl", "regions", "flat")}
    notify = b"bench" if args.notify else b""

    def nixl_read(plan):
        h = local.submit(plan, TransferOp.READ, "bench-P", notify)
        if wait_done(local, h, 60.0) is not TransferState.DONE:
            raise RuntimeError("NIXL READ failed")
        local.release(h)

    def memcpy_regions(plan):
        for r in plan.regions:
            dst_b[r.dst_offset : r.dst_offset + r.nbytes].copy_(src_b[r.src_offset : r.src_offset + r.nbytes])

    def memcpy_flat(plan):
        dst_b[: plan.total_bytes].copy_(src_b[: plan.total_bytes])

    for n, plan in plans.items():  # warm-up and a correctness check of each plan
        dst_b.zero_()
        nixl_read(plan)
        r = plan.regions[-1]
        if not bool((dst_b[r.dst_offset : r.dst_offset + r.nbytes] == 0x5A).all()):
            raise RuntimeError(f"NIXL READ of {n} blocks did not land")
    for _ in range(args.reps):
        for n, plan in plans.items():
            for m, fn in (("nixl", nixl_read), ("regions", memcpy_regions), ("flat", memcpy_flat)):
                best[n, m] = min(best[n, m], timed(fn, plan, device))

    rows = []
    print(f"{'blocks':>7} {'MiB':>9} {'regions':>8} {'nixl GB/s':>10} {'memcpy regions':>15} {'memcpy flat':>12} "
          f"{'nixl/regions':>13} {'nixl/flat':>10}")  # fmt: skip
    for n, plan in plans.items():
        gb = {m: plan.total_bytes / best[n, m] / 1e9 for m in ("nixl", "regions", "flat")}
        ratios = dict(ratio_vs_regions=gb["nixl"] / gb["regions"], ratio_vs_flat=gb["nixl"] / gb["flat"])
        best_s = {m: best[n, m] for m in gb}
        rows.append(dict(blocks=n, bytes=plan.total_bytes, regions=len(plan.regions), best_s=best_s, gbps=gb, **ratios))
        print(f"{n:>7} {plan.total_bytes / 2**20:>9.2f} {len(plan.regions):>8} {gb['nixl']:>10.2f} "
              f"{gb['regions']:>15.2f} {gb['flat']:>12.2f} {ratios['ratio_vs_regions']:>13.2f} "
              f"{ratios['ratio_vs_flat']:>10.2f}")  # fmt: skip

    local.close()
    peer.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device, reps=args.reps, pattern=args.pattern, notify=args.notify,
                                   layout=SMOLLM2, torch_threads=torch.get_num_threads(),
                                   loadavg=os.getloadavg()[0], rows=rows), indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
