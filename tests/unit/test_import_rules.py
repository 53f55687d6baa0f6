"""Dependency arrows, checked in fresh interpreters (this test process has torch loaded already).

- The router and the Python client never load torch: they run on CPU-only gateway
  hosts and must start fast.
- engine, common and kv_transfer never import the router or Ray (arrows point
  deploy -> router, workers -> engine, kv_transfer).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def loaded_after(modules: list[str], prelude: str = "") -> set[str]:
    """Top-level package names in sys.modules after importing `modules` (and running `prelude`) in a new
    interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"{prelude}"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def all_modules(package: str) -> list[str]:
    """Every module of `package`, found on disk (nothing is imported in this process)."""
    root = REPO / package
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_router_and_client_never_load_torch() -> None:
    loaded = loaded_after([*all_modules("router"), "tandem_api.client"])
    assert "torch" not in loaded
    assert "ray" not in loaded  # router.workers imports ray only when classifying a Ray error


def test_the_planner_needs_neither_torch_nor_ray() -> None:
    """`tandem simulate` and `tandem plan` run where the benchmark client runs (planner/README.md)."""
    loaded = loaded_after(all_modules("planner"))
    assert "torch" not in loaded and "ray" not in loaded


def test_the_benchmark_client_needs_neither_torch_nor_ray() -> None:
    """`tandem bench` installs without the serving stack: its modules, its targets' libraries, the
    plotting library and the tokenizer it loads from a GGUF file, and `tandem`'s CLI module."""
    code = (
        "from engine.loader import load_tokenizer; load_tokenizer(None)\nimport grpc.aio, aiohttp, matplotlib.pyplot\n"
    )
    modules = [m for m in all_modules("tandem_api") if not m.endswith("__main__")]
    loaded = loaded_after([*modules, "deploy.cli"], prelude=code)
    assert "torch" not in loaded and "ray" not in loaded


@pytest.mark.parametrize("package", ["engine", "common", "kv_transfer"])
def test_lower_layers_never_import_router_or_ray(package: str) -> None:
    if importlib.util.find_spec(package) is None or not (REPO / package).is_dir():
        pytest.skip(f"{package} does not exist yet")
    modules = [m for m in all_modules(package) if not m.endswith("__main__")]
    loaded = loaded_after(modules)
    assert "router" not in loaded, f"{package} imports the router"
    assert "ray" not in loaded, f"{package} imports ray"
    assert "tandem_api" not in loaded and "grpc" not in loaded, f"{package} imports the gRPC API"


def test_tandem_bench_runs_where_only_the_client_is_installed(tmp_path) -> None:
    """requirements/bench.txt has no torch, Ray or msgspec: `tandem bench` (the console script's
    deploy.cli.main) and the tokenizer it loads must work with those imports failing."""
    script = tmp_path / "client_only.py"
    script.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'ray', 'msgspec', 'nixl', 'nixl_cu12'):\n"
        "            raise ImportError(f'{name} is not installed (client-only install)')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from engine.loader import load_tokenizer\n"
        "assert load_tokenizer(None).encode('Hello world', add_special_tokens=False)\n"
        "from deploy.cli import main\n"
        "sys.exit(main(['bench', '--server', '127.0.0.1:9', '--slo', 'ttft=1']))\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr  # the flag error, not an ImportError
    assert "--slo: unknown target 'ttft'" in result.stderr
