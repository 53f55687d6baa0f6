"""The worker's performance model (common/perf_model.py): fitted from the step times it is fed."""

from __future__ import annotations

import pytest

from common.perf_model import PerfEstimate, StepTimes


def test_the_decode_and_prefill_lines_are_recovered():
    st = StepTimes(warmup_steps=3)
    for _ in range(3):
        st.observe(0, 1, 9.0)  # warm-up steps are ignored, however slow
    for b in [1, 2, 3, 4, 6, 8] * 4:
        st.observe(0, b, 0.020 + 0.005 * b)
    for tokens, seqs in [(512, 0), (128, 3), (64, 2), (300, 0)]:
        st.observe(tokens, seqs, 0.030 + 0.005 * seqs + 0.0015 * tokens)  # mixed steps: the decode part is removed
    est = st.estimate()
    assert est.ready and est.decode_steps == 24 and est.prefill_steps == 4
    assert est.decode_base_s == pytest.approx(0.020) and est.per_seq_s == pytest.approx(0.005)
    assert est.prefill_base_s == pytest.approx(0.030) and est.per_token_s == pytest.approx(0.0015)
    assert est.decode_step_s(4) == pytest.approx(0.040)
    assert est.prefill_s(200) == pytest.approx(0.330)


def test_recent_steps_weigh_more_and_short_prefills_are_not_samples():
    st = StepTimes(warmup_steps=0, decay=0.9)
    for _ in range(50):
        st.observe(0, 2, 0.050)
    for _ in range(50):
        st.observe(0, 2, 0.100)  # the machine got busier
    assert st.estimate().decode_step_s(2) == pytest.approx(0.100, rel=0.01)
    st.observe(8, 2, 5.0)  # below min_prefill_tokens: a resumed request's few tokens, not a prefill sample
    assert st.estimate().prefill_steps == 0 and not st.estimate().ready


def test_a_prefill_only_worker_borrows_the_decode_line():
    p = StepTimes(warmup_steps=0)
    for tokens in (100, 200, 400, 800):
        p.observe(tokens, 0, 0.01 + 0.002 * tokens)
    d = StepTimes(warmup_steps=0)
    for b in (1, 2, 4, 8, 1, 2):
        d.observe(0, b, 0.02 + 0.01 * b)
    pe, de = p.estimate(), d.estimate()
    assert pe.prefill_ready and not pe.decode_ready and de.decode_ready and not de.prefill_ready
    both = pe.completed_by(de)
    assert both.ready and both.prefill_s(100) == pytest.approx(0.21) and both.decode_step_s(2) == pytest.approx(0.04)
    assert de.completed_by(pe).prefill_s(100) == pytest.approx(0.21)
    assert PerfEstimate().completed_by(PerfEstimate()) == PerfEstimate()


def test_prefill_busy_is_the_share_of_the_window_spent_in_prefill_steps():
    st = StepTimes(warmup_steps=0, window_s=10.0)
    t = 100.0
    for _ in range(10):  # 1 s of prefill, then 1 s of decode steps, over 20 s
        t += 1.0
        st.observe(200, 0, 1.0, now=t)
        for _ in range(10):
            t += 0.1
            st.observe(0, 2, 0.1, now=t)
    est = st.estimate(now=t)
    assert est.prefill_busy == pytest.approx(0.5, abs=0.06)
    assert est.tpot_s(2) == pytest.approx(est.decode_step_s(2) / (1 - est.prefill_busy))
    assert st.estimate(now=t + 60).prefill_busy == 0.0  # nothing in the last window


def test_widened_steps_count_as_busy_but_stay_out_of_the_lines():
    """A prefill step run on cores a peer lent is faster than this worker alone: the router predicts from
    the worker's own speed, since the lender may be busy next time."""
    st = StepTimes(warmup_steps=0, window_s=10.0)
    for i, tokens in enumerate((100, 200, 400)):
        st.observe(tokens, 0, 0.01 + 0.002 * tokens, now=1.0 + i)
    st.observe(800, 0, 0.81, now=10.0, widened=True)  # half the time on two cores
    est = st.estimate(now=10.0)
    assert est.prefill_steps == 3 and est.prefill_s(800) == pytest.approx(1.61)
    # busy: all four steps over the 9.21 s since the first one began (1.0 - 0.21)
    assert est.prefill_busy == pytest.approx((0.21 + 0.41 + 0.81 + 0.81) / 9.21)
