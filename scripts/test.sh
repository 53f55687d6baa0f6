#!/usr/bin/env bash
# Installs what the tests need into .venv and runs the whole suite. `.ci/run` calls this.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh --test
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# lint and format first (pyproject.toml [tool.ruff]): a finding fails the run before any test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# type check (pyproject.toml [tool.mypy]) of the whole tree: every product package, tests, benchmarks, scripts
.venv/bin/mypy common engine kv_transfer worker_core prefill_worker decode_worker router deploy tandem_api planner \
  tests benchmarks scripts
exec .venv/bin/python -m pytest "$@"
