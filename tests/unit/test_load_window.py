"""router/load_window.py: what the SLA planner reads of the router's recent requests."""

from __future__ import annotations

import random

from router.load_window import LoadWindow
from router.responses import RequestTrace


def trace(received: float, gaps: list[tuple[float, int]], first: float = 0.1) -> RequestTrace:
    t = RequestTrace(received=received, prompt_tokens=100)
    t.first_sent = received + first
    t.last_sent = t.first_sent + sum(g for g, _ in gaps)
    t.completion_tokens = 1 + sum(n for _, n in gaps)
    t.token_gaps = gaps
    return t


def test_p99_itl_counts_each_token_of_a_chunk_without_expanding_it():
    rng = random.Random(4)
    gaps = [(rng.uniform(0.01, 0.2) * n, n) for n in (rng.choice([1, 1, 1, 2, 5]) for _ in range(300))]
    expanded = sorted(g / n for g, n in gaps for _ in range(n))
    want = expanded[min(len(expanded) - 1, int(0.99 * (len(expanded) - 1) + 0.5))]
    w = LoadWindow()
    t = trace(0.0, gaps)
    w.ended(t, "OK", t.last_sent or 0.0)
    (e,) = w.since(-1.0)[1]
    assert e.itl_p99_s == want and e.ok and e.ttft_s == 0.1
    assert e.tpot_s is not None and abs(e.tpot_s - sum(g for g, _ in gaps) / sum(n for _, n in gaps)) < 1e-12


def test_since_counts_arrivals_and_ends_after_the_mark_and_forgets_past_the_horizon():
    w = LoadWindow(horizon_s=100.0)
    for t in (1.0, 2.0, 50.0, 120.0):
        w.arrived(t)
    failed = RequestTrace(received=2.0, prompt_tokens=10)
    w.ended(failed, "INTERNAL", 3.0)
    w.ended(trace(50.0, [(0.1, 1)]), "OK", 51.0)
    arrivals, ended = w.since(1.5)
    assert arrivals == 2  # 50.0 and 120.0: 1.0 and 2.0 fell past the 100 s horizon when 120.0 arrived
    assert [e.ok for e in ended] == [False, True] and ended[0].ttft_s is None
