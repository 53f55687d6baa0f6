"""The glibc heap setting is applied once, honours its opt-out, and never raises."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str, env_extra: dict[str, str]) -> str:
    import os

    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()


def test_applied_on_glibc_and_idempotent():
    code = "from engine.cpu_memory import keep_freed_memory as k; print(k(), k())"
    out = _run(code, {"TANDEM_KEEP_HEAP": "1"})
    import platform

    expected = "True True" if platform.libc_ver()[0] == "glibc" else "False False"
    assert out == expected


def test_opt_out():
    assert (
        _run("from engine.cpu_memory import keep_freed_memory as k; print(k())", {"TANDEM_KEEP_HEAP": "0"}) == "False"
    )
