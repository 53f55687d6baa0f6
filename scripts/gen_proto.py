#!/usr/bin/env python3
"""Generate the Python code of Tandem's public API from proto/tandem/v1/*.proto.

    python scripts/gen_proto.py            # (re)write tandem_api/v1/ in place
    python scripts/gen_proto.py --check    # exit 1 with a diff if the committed files are stale

Why the output package is `tandem_api`, not `tandem`: the proto package is
`tandem.v1` (that name is the wire contract: it appears in every RPC path,
`/tandem.v1.Generation/Generate`), but a top-level Python package called `tandem`
could clash with other distributions' import names. protoc names the Python
module after the .proto path and makes `generation_pb2_grpc.py` import its sibling
as `from tandem.v1 import generation_pb2`; this script rewrites that import to
`from tandem_api.v1 import ...`. The descriptors keep their proto names, so the
wire format and the service name are unchanged.

The generated files are committed (the runtime needs only grpcio + protobuf, not
grpcio-tools). They depend on the grpcio-tools version that wrote them (it stamps
its version in the files), so `--check` is meaningful against the pinned
grpcio-tools of requirements/runtime.txt; tests/unit/test_proto_codegen.py runs it.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTOS = ("tandem/v1/generation.proto", "tandem/v1/admin.proto")
OUT_PACKAGE = "tandem_api"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
V1_INIT = '"""Generated code of the tandem.v1 API (scripts/gen_proto.py writes this package; do not edit)."""\n'
IMPORT_FROM = "from tandem.v1 import"
IMPORT_TO = f"from {OUT_PACKAGE}.v1 import"


def _protoc(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) on every proto into out_dir/tandem/v1/."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(PROTO_ROOT / p) for p in PROTOS),
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code} (arguments: {' '.join(args[1:])})")


def generate() -> dict[str, str]:
    """Relative path under tandem_api/ -> contents, for every file this script owns."""
    with tempfile.TemporaryDirectory(prefix="tandem-proto-") as tmp:
        _protoc(Path(tmp))
        files: dict[str, str] = {"v1/__init__.py": V1_INIT}
        for proto in PROTOS:
            stem = Path(proto).with_suffix("")
            for suffix in GENERATED_SUFFIXES:
                text = (Path(tmp) / f"{stem}{suffix}").read_text(encoding="utf-8")
                files[f"v1/{stem.name}{suffix}"] = text.replace(IMPORT_FROM, IMPORT_TO)
    return files


def write(files: dict[str, str], package_dir: Path) -> None:
    for rel, text in files.items():
        path = package_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def stale(files: dict[str, str], package_dir: Path) -> list[str]:
    """Unified diffs of every committed file that differs from a fresh generation."""
    diffs = []
    for rel, fresh in sorted(files.items()):
        path = package_dir / rel
        committed = path.read_text(encoding="utf-8") if path.exists() else ""
        if committed != fresh:
            diffs.append(
                "".join(
                    difflib.unified_diff(
                        committed.splitlines(keepends=True),
                        fresh.splitlines(keepends=True),
                        fromfile=f"committed/{OUT_PACKAGE}/{rel}",
                        tofile=f"generated/{OUT_PACKAGE}/{rel}",
                    )
                )
                or f"{OUT_PACKAGE}/{rel} differs\n"
            )
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="diff against the committed files; exit 1 if stale")
    parser.add_argument("--out", type=Path, default=ROOT / OUT_PACKAGE, help="package directory (default: %(default)s)")
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        diffs = stale(files, args.out)
        if diffs:
            sys.stdout.write("".join(diffs))
            print(
                f"\n{len(diffs)} generated file(s) under {args.out} are stale: run scripts/gen_proto.py",
                file=sys.stderr,
            )
            return 1
        print(f"{len(files)} generated files under {args.out} are up to date")
        return 0
    write(files, args.out)
    print(f"wrote {len(files)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
