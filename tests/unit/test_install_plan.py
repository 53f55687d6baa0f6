"""scripts/install_plan.py and `scripts/setup.sh --dry-run`: the device and wheels chosen, with a simulated
`nvidia-smi` on PATH (no download, nothing installed)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import install_plan  # noqa: E402
from install_plan import PlanError, plan, rewrite_requirements  # noqa: E402

H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5a1c0e3e-0000-0000-0000-000000000000)"


def _header(cuda: str) -> str:
    return (
        "+-----------------------------------------------------------------------------------------+\n"
        f"| NVIDIA-SMI 580.95.05              Driver Version: 580.95.05      CUDA Version: {cuda}     |\n"
        "|-----------------------------------------+------------------------+----------------------+\n"
    )


def _fake_smi(tmp_path: Path, listing: str, header: str, rc: int = 0) -> Path:
    """A directory holding an `nvidia-smi` that answers `-L` with `listing` and no arguments with `header`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "listing").write_text(listing)
    (bin_dir / "header").write_text(header)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        f'#!/bin/sh\nif [ "$1" = "-L" ]; then cat "{bin_dir}/listing"; else cat "{bin_dir}/header"; fi\nexit {rc}\n'
    )
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _env(bin_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """A PATH with `bin_dir` (or no nvidia-smi at all) and the TANDEM_ variables given."""
    path = [str(bin_dir)] if bin_dir else []
    path += [p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists()]
    return {"PATH": os.pathsep.join(path), **extra}


def test_no_driver_installs_what_setup_always_installed():
    p = plan(_env())
    assert (p.device, p.torch, p.torch_index, p.nixl) == ("cpu", "torch==2.13.0", "", "nixl-cu12==1.5.1")
    assert "no nvidia-smi" in p.reason


@pytest.mark.parametrize(
    ("cuda", "torch", "nixl"),
    [
        ("12.6", "torch==2.13.0+cu126", "nixl-cu12==1.5.1"),
        ("12.8", "torch==2.13.0+cu128", "nixl-cu12==1.5.1"),
        ("12.9", "torch==2.13.0+cu128", "nixl-cu12==1.5.1"),  # the newest build the driver supports
        ("13.0", "torch==2.13.0+cu130", "nixl-cu13==1.5.1"),
        ("13.2", "torch==2.13.0+cu130", "nixl-cu13==1.5.1"),
    ],
)
def test_a_driver_picks_the_matching_cuda_build(tmp_path, cuda, torch, nixl):
    p = plan(_env(_fake_smi(tmp_path, H100, _header(cuda))))
    assert (p.device, p.torch, p.nixl, p.cuda_version) == ("cuda", torch, nixl, cuda)
    assert p.torch_index == f"https://download.pytorch.org/whl/{torch.split('+')[1]}"
    assert f"driver supports CUDA {cuda}" in p.reason and "1 GPU(s)" in p.reason


def test_a_driver_too_old_says_what_to_do(tmp_path):
    with pytest.raises(PlanError, match=r"CUDA 12\.4 is older than any torch 2\.13\.0 CUDA build.*TANDEM_DEVICE=cpu"):
        plan(_env(_fake_smi(tmp_path, H100, _header("12.4"))))


def test_nvidia_smi_without_a_driver_means_cpu(tmp_path):
    failing = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    p = plan(_env(_fake_smi(tmp_path, failing, failing, rc=9)))
    assert p.device == "cpu" and p.torch == "torch==2.13.0"
    assert "couldn't communicate with the NVIDIA driver" in p.reason


def test_overrides(tmp_path):
    gpu = _fake_smi(tmp_path, H100, _header("12.8"))
    assert plan(_env(gpu, TANDEM_DEVICE="cpu")).torch == "torch==2.13.0"
    built = plan(_env(None, TANDEM_DEVICE="cuda", TANDEM_CUDA_VERSION="13.0"))  # an image build: no driver
    assert (built.device, built.torch, built.nixl) == ("cuda", "torch==2.13.0+cu130", "nixl-cu13==1.5.1")
    mirror = plan(_env(gpu, TANDEM_TORCH_INDEX_URL="https://mirror.example/whl/cu128"))
    assert mirror.torch_index == "https://mirror.example/whl/cu128" and mirror.torch == "torch==2.13.0+cu128"
    with pytest.raises(PlanError, match="set TANDEM_CUDA_VERSION"):
        plan(_env(None, TANDEM_DEVICE="cuda"))
    with pytest.raises(PlanError, match="TANDEM_DEVICE='gpu': use cpu, cuda or auto"):
        plan(_env(gpu, TANDEM_DEVICE="gpu"))
    with pytest.raises(PlanError, match="is not MAJOR.MINOR"):
        plan(_env(None, TANDEM_DEVICE="cuda", TANDEM_CUDA_VERSION="twelve"))


def test_requirements_get_the_plans_nixl_wheel_and_cuda_keeps_torchs_triton():
    runtime, test = (ROOT / "requirements/runtime.txt").read_text(), (ROOT / "requirements/test.txt").read_text()
    cpu = plan(_env())
    assert rewrite_requirements(runtime, cpu) == runtime and rewrite_requirements(test, cpu) == test
    cu13 = plan(_env(None, TANDEM_DEVICE="cuda", TANDEM_CUDA_VERSION="13.0"))
    lines = rewrite_requirements(runtime, cu13).splitlines()
    assert "nixl-cu13==1.5.1" in lines and not any(line.startswith("nixl-cu12") for line in lines)
    assert len(lines) == len(runtime.splitlines())  # one line replaced, nothing else lost
    assert install_plan.DEFAULT_NIXL in runtime.splitlines()  # the default names what the file pins
    cu12_test = rewrite_requirements(test, plan(_env(None, TANDEM_DEVICE="cuda", TANDEM_CUDA_VERSION="12.8")))
    assert any(line.startswith("triton==") for line in test.splitlines())  # CPU tests run Triton's interpreter
    assert not any(line.startswith("triton==") for line in cu12_test.splitlines())


def _dry_run(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """setup.sh --dry-run in a copy of the scripts, so that anything it would create is seen."""
    (tmp_path / "repo/scripts").mkdir(parents=True)
    for name in ("setup.sh", "install_plan.py"):
        shutil.copy2(ROOT / "scripts" / name, tmp_path / "repo/scripts" / name)
    return subprocess.run(
        ["bash", str(tmp_path / "repo/scripts/setup.sh"), "--test", "--dry-run"],
        env={**env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_setup_dry_run_prints_the_plan_and_installs_nothing(tmp_path):
    done = _dry_run(tmp_path, _env(_fake_smi(tmp_path, H100, _header("13.0"))))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("device: cuda (nvidia-smi: 1 GPU(s), driver supports CUDA 13.0)")
    assert "torch==2.13.0+cu130 from https://download.pytorch.org/whl/cu130" in done.stdout
    assert "with nixl-cu13==1.5.1 in place of nixl-cu12==1.5.1" in done.stdout
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["scripts"]  # no .venv, nothing else


def test_setup_refuses_an_unknown_option_and_a_bad_device(tmp_path):
    env = _env()
    bad = subprocess.run(
        ["bash", str(ROOT / "scripts/setup.sh"), "--dryrun"], env=env, capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "unknown option --dryrun (use --test, --dry-run)" in bad.stderr
    done = _dry_run(tmp_path, {**env, "TANDEM_DEVICE": "tpu"})
    assert done.returncode == 2 and "TANDEM_DEVICE='tpu': use cpu, cuda or auto" in done.stderr
