"""The `tandem generate --offline` command line, run as a real process.

    python -m deploy.cli generate --offline --json --prompt A --chat B --prompt C --max-tokens 8

must print one JSON object per input, in the order given, with the same tokens
the offline `LLM` API gives; bad input must exit with status 2 and one
`error: ...` line on stderr (no traceback). The default-model run loads the
shipped SmolLM2 and is marked slow; the same contract is also checked on a tiny
model, and the error paths never load a model at all.

Subprocesses run with OMP_NUM_THREADS=1: on a shared 2-core box torch's
default threading makes these tiny workloads many times slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.sampling_params import SamplingParams
from deploy.cli import main
from engine.llm import LLM
from tests.helpers.tiny_models import make_tiny_hf_model

REPO = Path(__file__).resolve().parents[2]
INPUTS = [("prompt", "The capital of France is"), ("chat", "What is 2+2?"), ("prompt", "Once upon a time, in a land")]
ARGS = [arg for kind, text in INPUTS for arg in (f"--{kind}", text)]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def as_llm_input(kind: str, text: str):
    return [{"role": "user", "content": text}] if kind == "chat" else text


def check_json_lines(stdout: str, llm: LLM, max_tokens: int) -> list[dict]:
    """One JSON line per input, in order, each equal to the same input run alone through `LLM` (greedy)."""
    lines = stdout.strip().splitlines()
    assert len(lines) == len(INPUTS), stdout
    records = [json.loads(line) for line in lines]
    for (kind, text), record in zip(INPUTS, records):
        assert set(record) >= {"token_ids", "text", "finish_reason"}
        assert 1 <= len(record["token_ids"]) <= max_tokens
        assert record["finish_reason"] in ("stop", "length")
        assert record["finish_reason"] == "stop" or len(record["token_ids"]) == max_tokens
        (alone,) = llm.generate(as_llm_input(kind, text), SamplingParams(max_tokens=max_tokens, temperature=0.0))
        assert record["prompt_tokens"] == len(alone.prompt_token_ids), f"line for {kind} {text!r} is out of order"
        assert record["token_ids"] == alone.token_ids and record["text"] == alone.text, f"{kind} {text!r}"
    llm.engine.leak_check()
    return records


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]
    assert proc.stdout == ""
    return lines[0]


# ---- tiny model: the output contract, fast -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("cli"), "llama", vocab_size=512)


def test_json_lines_in_order_on_tiny_model(tiny_dir: Path) -> None:
    proc = run_cli(
        "generate",
        "--offline",
        "--json",
        "--model",
        str(tiny_dir),
        *ARGS,
        "--max-tokens",
        "6",
        "--dtype",
        "float32",
        "--ignore-eos",
    )
    assert proc.returncode == 0, proc.stderr
    records = check_json_lines(proc.stdout, LLM(str(tiny_dir), dtype="float32", num_blocks=64), 6)
    assert all(len(r["token_ids"]) == 6 and r["finish_reason"] == "length" for r in records)  # --ignore-eos


# ---- errors: exit 2, one line, no traceback ----------------------------------------------------------------------


def test_max_tokens_zero_exits_2_with_one_error_line() -> None:
    assert_one_error_line(run_cli("generate", "--offline", "--prompt", "hi", "--max-tokens", "0"), "max_tokens")


def test_unknown_model_exits_2_naming_the_path() -> None:
    assert_one_error_line(run_cli("generate", "--offline", "--model", "/nonexistent", "--prompt", "hi"), "/nonexistent")


def test_without_offline_exits_2() -> None:
    assert_one_error_line(run_cli("generate", "--prompt", "hi"), "--offline")


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "1.5", "top_p"),
        ("--top-k", "-2", "top_k"),
        ("--min-p", "2", "min_p"),
        ("--logprobs", "99", "logprobs"),
        ("--seed", "-1", "seed"),
    ],
)
def test_bad_sampling_flag_exits_2_in_process(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, needle: str
) -> None:
    """Same contract, checked through `main()` so that no process (or model) is started per flag."""
    assert main(["generate", "--offline", "--prompt", "hi", flag, value]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], captured.err
    assert captured.out == ""


# ---- the default model (real SmolLM2) ----------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_json_lines_match_the_llm_api() -> None:
    proc = run_cli("generate", "--offline", "--json", *ARGS, "--max-tokens", "8", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    records = check_json_lines(proc.stdout, LLM(dtype="float32"), 8)
    chat = records[1]
    assert chat["text"].strip(), "the chat answer should not be empty on SmolLM2"
