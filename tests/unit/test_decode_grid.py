"""The step model's decode grid (planner/model.py DecodeGrid): decode steps whose time is not linear in the batch.

On a CPU a decode step of a few rows runs one kernel and a larger batch another (the measured profile of this
project's host: 17, 24, 58, 94 ms at 1, 4, 8, 16 rows), so the five-coefficient linear model misses the middle
batches by 40 % or more. The grid keeps the measured medians and interpolates between them.
"""

from __future__ import annotations

import json

import msgspec
import pytest

from deploy.cli import main
from planner.model import (
    DecodeGrid,
    StepModel,
    StepSample,
    StepShape,
    attn_pairs,
    fit_decode_grid,
    fit_step_model,
    with_decode_grid,
)
from planner.profile import load_profile, save_profile
from tests.helpers.planner_profiles import profile_of

ROWS = (1, 2, 4, 8, 16, 32)
CONTEXTS = (64, 512)


def decode_truth(rows: int, context: float) -> float:
    """A kernel for up to 4 rows, a GEMM with a start-up cost beyond: a knee the linear model cannot fit."""
    weights = 0.002 * rows if rows <= 4 else 0.035 + 0.0015 * rows
    return 0.015 + weights + 2e-5 * rows * context


def prefill_truth(tokens: int, context: int = 0) -> float:
    return 0.015 + 0.0014 * tokens + 1e-6 * attn_pairs(tokens, context)


def profile_samples() -> list[StepSample]:
    """What a profile's sweep records: prompts alone, then per context every batch for 4 steps, each step
    one token longer (largest batch first, as worker_core/profiling.py runs them)."""
    samples = [StepSample(StepShape.of([(n, 0)]), prefill_truth(n)) for n in (16, 64, 256, 1024)]
    for context in CONTEXTS:
        grown = 0
        for rows in reversed(ROWS):
            for _ in range(4):
                c = context + 1 + grown
                samples.append(StepSample(StepShape.of([], [c] * rows), decode_truth(rows, c)))
                grown += 1
    return samples


def test_the_linear_model_misses_the_knee_and_the_grid_does_not():
    samples = profile_samples()
    linear = fit_step_model(samples)
    gridded = with_decode_grid(linear, samples)
    assert gridded.decode_grid is not None
    assert gridded.coefficients() == linear.coefficients()  # what workers refit live stays the same five terms
    middle = StepShape.of([], [300] * 8)
    assert abs(linear.step_s(middle) / decode_truth(8, 300) - 1) > 0.1
    assert gridded.step_s(middle) == pytest.approx(decode_truth(8, 300), rel=0.05)
    assert gridded.rel_error_p90 < linear.rel_error_p90 / 3


def test_grid_holds_the_measured_medians_one_group_per_swept_context():
    grid = fit_decode_grid(profile_samples())
    assert grid is not None
    assert len(grid.rows) == 2 and all(r == ROWS for r in grid.rows)
    # each context's steps grew a token per step: each batch keeps the context it was measured at
    for base, contexts in zip(CONTEXTS, grid.contexts, strict=True):
        assert all(base < c <= base + 4 * len(ROWS) for c in contexts) and list(contexts) == sorted(contexts)[::-1]
    for rows, seconds, contexts in zip(grid.rows, grid.seconds, grid.contexts, strict=True):
        for r, s, c in zip(rows, seconds, contexts, strict=True):
            assert s == pytest.approx(decode_truth(r, c), rel=1e-9)


def test_interpolation_linear_between_points_extended_above_held_below():
    grid = DecodeGrid(
        rows=((1, 4, 8), (1, 4, 8)), seconds=((1.0, 4.0, 12.0), (2.0, 8.0, 20.0)), contexts=((100.0,) * 3, (500.0,) * 3)
    )
    assert grid.at(4, 100) == 4.0 and grid.at(6, 100) == 8.0  # between 4 and 8 rows
    assert grid.at(4, 300) == pytest.approx(6.0)  # halfway between the two contexts
    assert grid.at(12, 100) == pytest.approx(20.0)  # past the largest batch: the last segment's slope
    assert grid.at(4, 900) == pytest.approx(12.0)  # past the largest context: extended linearly
    assert grid.at(4, 10) == 4.0  # below the smallest context: held, never extrapolated towards zero
    assert grid.at(1, 100) == 1.0


def test_a_mixed_step_is_the_grid_plus_the_prompt_terms_without_a_second_base():
    samples = profile_samples()
    model = with_decode_grid(fit_step_model(samples), samples)
    assert model.decode_grid is not None
    decode = StepShape.of([], [300] * 4)
    mixed = StepShape.of([(128, 0)], [300] * 4)
    prompt = model.per_prefill_token_s * 128 + model.per_attn_pair_s * attn_pairs(128, 0)
    assert model.step_s(mixed) == pytest.approx(model.step_s(decode) + prompt)
    assert model.step_s(StepShape.of([(512, 0)])) == pytest.approx(prefill_truth(512), rel=0.02)  # linear path
    assert model.decode_step_s(8, 300) == model.step_s(StepShape(0, 0.0, 8, 8 * 300))


@pytest.mark.parametrize(
    "samples",
    [
        [StepSample(StepShape.of([], [64 + i] * 4), 0.02) for i in range(4)],  # one batch size only
        [StepSample(StepShape.of([], [64] * r), 0.01 * r) for r in (1, 2, 4)],  # one context only
    ],
    ids=["one-batch", "one-context"],
)
def test_no_grid_from_samples_that_do_not_span_two_batches_at_two_contexts(samples):
    assert fit_decode_grid(samples) is None
    model = StepModel(base_s=0.01, per_decode_seq_s=0.002, samples=4)
    assert with_decode_grid(model, samples) is model


def test_profile_with_a_grid_round_trips_and_refit_adds_one(tmp_path, capsys):
    samples = profile_samples()
    linear = fit_step_model(samples)
    profile = profile_of(linear)
    profile.workers = [msgspec.structs.replace(w, samples=samples) for w in profile.workers]
    path = tmp_path / "profile.json"
    save_profile(profile, path)
    assert load_profile(path).worker().step.decode_grid is None  # measured before grids existed

    assert main(["profile", "--refit", "--output", str(path)]) == 0
    refit = load_profile(path)
    step = refit.worker().step
    assert step.decode_grid == fit_decode_grid(samples)
    assert step.step_s(StepShape.of([], [300] * 8)) == pytest.approx(decode_truth(8, 300), rel=0.05)
    assert any("refitted" in note for note in refit.notes)
    assert "refitted" in capsys.readouterr().out
    assert json.loads(path.read_text())["workers"][0]["step"]["decode_grid"]["rows"][0] == list(ROWS)


def test_refit_of_a_profile_without_samples_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "profile.json"
    save_profile(profile_of(StepModel(base_s=0.01, samples=3)), path)
    assert main(["profile", "--refit", "--output", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no step samples" in err and len(err.splitlines()) == 1


def test_groups_whose_contexts_meet_or_cross_never_divide_by_zero():
    # contexts fall with the batch in one group and rise in the other: held beyond the measured batches
    grid = DecodeGrid(
        rows=((1, 2), (1, 2)), seconds=((0.05, 0.06), (0.07, 0.08)), contexts=((100.0, 110.0), (160.0, 150.0))
    )
    for rows in (1, 2, 5, 6, 50):
        for context in (10.0, 120.0, 150.0, 200.0, 1000.0):
            assert 0.05 <= grid.at(rows, context) < 10.0
    same = DecodeGrid(
        rows=((1, 2), (1, 2)), seconds=((0.05, 0.06), (0.07, 0.08)), contexts=((100.0,) * 2, (100.0,) * 2)
    )
    assert same.at(1, 100.0) in (0.05, 0.07) and same.at(1, 500.0) >= 0.05


def test_the_planners_live_speed_factor_scales_the_grid_too():
    from planner.live_speed import scaled

    samples = profile_samples()
    model = with_decode_grid(fit_step_model(samples), samples)
    slow = scaled(model, 2.0)
    for shape in (StepShape.of([], [300] * 8), StepShape.of([(128, 0)], [300] * 4), StepShape.of([(512, 0)])):
        assert slow.step_s(shape) == pytest.approx(2 * model.step_s(shape))
    assert model.linear().decode_grid is None and model.linear().coefficients() == model.coefficients()


def test_a_worker_as_fast_as_its_profile_gets_factor_one_even_with_a_grid():
    """A decode worker serving batches of 6-10 rows at the profile's measured speed fits a linear model that is
    right where it serves and nothing like the profile's linear part (fitted over 1-32 rows): it is compared
    with the step as the simulator prices it, the grid, and gets 1.0; twice as slow gets 2.0."""
    from planner.live_speed import TYPICAL_DECODE, WorkerLive, speed_factors

    samples = profile_samples()
    model = with_decode_grid(fit_step_model(samples), samples)
    assert model.linear().step_s(TYPICAL_DECODE) < 0.9 * model.step_s(TYPICAL_DECODE)  # the knee: linear is off

    def served(slow: float) -> tuple[float, ...]:
        steps = []
        for i in range(120):
            rows, context = 6 + i % 5, 400 + 7 * i
            steps.append(StepSample(StepShape.of([], [context] * rows), slow * decode_truth(rows, context)))
            if i % 10 == 0:  # now and then a prompt prefilled locally
                steps.append(StepSample(StepShape.of([(256, 0)]), slow * prefill_truth(256)))
        return tuple(fit_step_model(steps).coefficients())

    assert served(1.0) != pytest.approx(tuple(model.coefficients()), rel=0.05)  # a different linear fit
    workers = (
        WorkerLive("d0", "decode", 600.0, live_step=served(1.0)),
        WorkerLive("p0", "prefill", 600.0, live_step=tuple(2 * c for c in model.coefficients())),
    )
    factors, cold = speed_factors(profile_of(model), workers, warmup_s=120.0)
    assert factors["decode"] == pytest.approx(1.0, rel=0.05) and factors["prefill"] == pytest.approx(2.0)
    assert cold == 0
    slow = (WorkerLive("d0", "decode", 600.0, live_step=served(2.0)),)
    assert speed_factors(profile_of(model), slow, warmup_s=120.0)[0]["decode"] == pytest.approx(2.0, rel=0.05)


def test_the_live_fit_is_compared_with_the_profile_where_it_has_its_steps():
    """A decode worker under light load runs 1-3 rows: its linear fit knows nothing of the knee at 4 rows, so at
    the default typical step (8 rows) it says 'faster than the profile'. The worker's own typical decode step
    (LiveFit.served_decode, reported as WorkerStatus.live_decode) is where the two are compared."""
    from planner.live_speed import TYPICAL_DECODE, WorkerLive, speed_factors
    from planner.model import LiveFit

    samples = profile_samples()
    model = with_decode_grid(fit_step_model(samples), samples)
    live = LiveFit(warmup_s=0.0, window=300, refit_every=50, min_steps=40)
    for i in range(200):
        rows, context = 1 + i % 3, 250 + i % 60
        shape = StepShape.of([], [context] * rows)
        live.observe((0, 0.0, shape.decode_seqs, shape.decode_context), decode_truth(rows, context), float(i))
    fit = live.model()
    served = live.served_decode()
    assert fit is not None and served is not None
    assert served[0] == 2 and 250 <= served[1] < 310  # the median step: 2 rows of the contexts served
    assert fit.step_s(TYPICAL_DECODE) < 0.8 * model.step_s(TYPICAL_DECODE)  # extrapolated past the knee
    blind = WorkerLive("d0", "decode", 600.0, live_step=fit.coefficients())
    assert speed_factors(profile_of(model), (blind,), warmup_s=120.0)[0]["decode"] < 0.8
    aware = WorkerLive("d0", "decode", 600.0, live_step=fit.coefficients(), live_decode=served)
    assert speed_factors(profile_of(model), (aware,), warmup_s=120.0)[0]["decode"] == pytest.approx(1.0, rel=0.05)
    assert LiveFit(warmup_s=0.0).served_decode() is None  # no decode steps yet: the default typical step
