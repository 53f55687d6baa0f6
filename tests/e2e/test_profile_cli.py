"""`tandem profile` end to end, on the shipped SmolLM2 and the default config (one cluster start).

- `--quick --append` onto a profile of another shape of the same model writes a loadable profile with
  that shape kept, the profiled shape added, both pools named, a transfer model and served-path
  figures from real requests, and says what it left out; the table of coefficients is printed.
- Bad input (a missing output directory, an unreadable config, --append onto a file that is not a
  profile) prints one line and exits with 2, before any cluster starts.
"""

from __future__ import annotations

import pytest

from deploy.cli import main
from planner.model import StepModel
from planner.profile import Profile, Shape, WorkerProfile, load_profile, save_profile

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def test_quick_profile_of_the_default_cluster(tmp_path, capsys):
    from engine.loader import load_model_source

    name = load_model_source("").config.name
    other = WorkerProfile(Shape(tp=2, dtype="float32"), StepModel(base_s=0.02, samples=3), num_blocks=500)
    out = tmp_path / "profile.json"
    save_profile(Profile(model=name, workers=[other], pools={"prefill": other.shape.key()}), out)

    assert main(["profile", "--quick", "--append", "--output", str(out)]) == 0

    profile = load_profile(out)
    assert set(profile.pools) == {"prefill", "decode"}
    measured = profile.worker(pool="decode")
    assert profile.keys() == [other.shape.key(), measured.shape.key()]
    assert profile.worker(pool="prefill") is measured  # the run's pools win over the file's
    assert measured.step.ready and measured.step.samples == len(measured.samples) > 10
    assert measured.step.per_prefill_token_s > 0
    assert measured.num_blocks > 0 and measured.warmup_excluded == 2
    assert measured.shape.device == "cpu" and measured.shape.num_threads == 1
    assert profile.transfer.samples > 0 and profile.transfer.transfer_s(16) > 0
    assert profile.overhead.samples > 0
    assert profile.machine["cores"] and profile.machine["torch_threads"] == {"prefill": 1, "decode": 1}
    assert any("warm-up" in note for note in profile.notes)
    printed = capsys.readouterr().out
    assert measured.shape.key() in printed and "transfer:" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output", "/nonexistent-dir/profile.json"], "directory /nonexistent-dir does not exist"),
        (["--config", "/nonexistent.yaml", "--output", "{tmp}/p.json"], "cannot read config"),
        (["--append", "--output", "{tmp}/junk.json"], "not a tandem profile"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert main(["profile", *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
