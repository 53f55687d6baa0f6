"""RequestTrace: the TTFT decomposition and the inter-token gaps the metrics are built from."""

from __future__ import annotations

import pytest

from router.responses import RequestTrace


def test_ttft_parts_sum_exactly_to_the_ttft():
    t = RequestTrace(received=10.0, prompt_tokens=5)
    assert t.ttft_parts() is None  # nothing sent yet
    t.routing_started, t.dispatched, t.first_arrived = 10.004, 10.0043, 10.250
    t.sent(10.2512, 1)
    parts = t.ttft_parts()
    assert parts == pytest.approx({"queue": 0.004, "route": 0.0003, "prefill": 0.2457, "return": 0.0012})
    assert sum(parts.values()) == pytest.approx(t.first_sent - t.received, rel=1e-12)


def test_token_gaps_skip_the_first_response_and_empty_chunks():
    t = RequestTrace(received=0.0, prompt_tokens=5)
    t.sent(1.0, 1)  # token 1: that is TTFT, not a gap
    t.sent(1.1, 1)
    t.sent(1.4, 3)  # three tokens coalesced: 0.3 s for three
    t.sent(1.5, 0)  # a final chunk without tokens: no gap
    assert t.token_gaps == [(pytest.approx(0.1), 1), (pytest.approx(0.3), 3)]
    assert t.first_sent == 1.0 and t.last_sent == 1.5


def test_tokens_that_arrive_with_the_first_are_gaps_of_zero():
    """A local prefill's first chunk may carry tokens 1..k at once: tokens 2..k still count (ITL 0), so the
    ITL histogram has one sample per token after the first (seen missing as a flake of test_metrics)."""
    t = RequestTrace(received=0.0, prompt_tokens=5)
    t.sent(1.0, 3)
    t.sent(1.2, 2)
    assert t.token_gaps == [(0.0, 2), (pytest.approx(0.2), 2)]
    assert sum(n for _, n in t.token_gaps) == 3 + 2 - 1
