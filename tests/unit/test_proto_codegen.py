"""The committed tandem_api/v1 code is what scripts/gen_proto.py generates from the .proto today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_proto.py"


def gen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_committed_code_is_up_to_date() -> None:
    result = gen("--check")
    assert result.returncode == 0, f"stale generated code; run scripts/gen_proto.py\n{result.stdout}{result.stderr}"


def test_check_reports_a_stale_file_with_a_diff(tmp_path: Path) -> None:
    copy = tmp_path / "tandem_api"
    shutil.copytree(REPO / "tandem_api", copy, ignore=shutil.ignore_patterns("__pycache__"))
    stub = copy / "v1" / "generation_pb2_grpc.py"
    stub.write_text(stub.read_text().replace("from tandem_api.v1 import", "from tandem.v1 import"))
    result = gen("--check", "--out", str(copy))
    assert result.returncode == 1
    assert "-from tandem.v1 import" in result.stdout and "+from tandem_api.v1 import" in result.stdout
    assert "stale" in result.stderr


def test_generated_imports_are_package_qualified() -> None:
    from tandem_api.v1 import generation_pb2, generation_pb2_grpc

    assert generation_pb2.DESCRIPTOR.package == "tandem.v1"  # the wire name is unchanged
    assert generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name == "tandem.v1.Generation"
    assert generation_pb2_grpc.GenerationStub is not None
    text = (REPO / "tandem_api" / "v1" / "generation_pb2_grpc.py").read_text()
    assert "from tandem.v1 import" not in text
