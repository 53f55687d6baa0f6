"""A small soak of the served cluster (benchmarks/soak.py's `run_soak`, tiny random llama).

2 prefill + 2 decode workers, 200 requests over 32 streams: prompts from shared-prefix pools,
5% cancelled by the client after some chunks, 5% with a 0.05..2 s deadline, and the busiest
decode worker killed (ray.kill, restart mode) when request 100 is sent. What must hold:

- every request ends (none HUNG, no client thread stuck);
- a user sees only OK, CANCELLED or DEADLINE_EXCEEDED: the dead worker costs a retry, not an error;
- greedy float32 tokens equal a rerun on the settled cluster (every 10th request and every
  request in flight at the kill; a cut-off stream must be a prefix of the rerun);
- every worker still alive is idle with intact pools and no leaked block or lease afterwards.
"""

from __future__ import annotations

import pytest

from benchmarks.soak import ALLOWED, SoakOptions, run_soak

pytestmark = pytest.mark.usefixtures("ray_session")


def test_soak_with_client_faults_and_a_killed_decode_worker(tiny_dir):
    options = SoakOptions(
        requests=200,
        concurrency=32,
        model=str(tiny_dir),
        block_size=4,
        prefill_kv_memory="64MiB",
        decode_kv_memory="64MiB",
        kill="decode",
        kill_mode="restart",
        hang_s=30.0,
        settle_s=30.0,
        ray_namespace="tandem-soak-test",
    )
    r = run_soak(options)

    kill = r.faults["kill"] or {}
    assert "worker" in kill, f"no worker was killed: {kill}"
    assert r.faults["cancels"] > 0 and r.faults["deadlines"] > 0
    assert r.hung == 0 and not r.stuck_threads, (r.hung, r.stuck_threads, r.errors.get("HUNG"))
    assert r.checked >= options.requests // options.sample_every // 2
    assert not r.mismatches and not r.reference_errors, r.mismatches + r.reference_errors
    assert not r.short_ok, r.short_ok
    # a restarted worker must come back clean; one that stayed dead (no max_restarts) has nothing to check
    bad = {w: s for w, s in r.workers.items() if s != "ok" and not (w == kill["worker"] and s == "dead")}
    assert not bad, r.workers
    assert set(r.by_status) <= ALLOWED, (r.by_status, r.errors)
