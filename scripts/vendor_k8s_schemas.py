"""Writes the schemas that tests/unit/test_kubernetes_manifests.py validates deploy/kubernetes/ against.

Inputs are files fetched by hand (deploy/kubernetes/schemas/SOURCES.md says which
release of each, with checksums); the output is deterministic JSON in deploy/kubernetes/schemas/:

    .venv/bin/python scripts/vendor_k8s_schemas.py \\
        --crd ray.io_rayclusters.yaml --crd ray.io_rayjobs.yaml \\
        --crd monitoring.coreos.com_servicemonitors.yaml \\
        --kubernetes-validate-wheel kubernetes_validate-1.37.0-py3-none-any.whl --kubernetes-version v1.33.0

- a CRD: the `openAPIV3Schema` of its storage version, as it is, less its `description` texts
  (`<kind>-<group>-<version>.json`). The test turns the structural schema into a JSON Schema.
- Kubernetes kinds (Service, ConfigMap, and ObjectMeta for the custom resources' metadata): the "strict"
  JSON Schemas of that Kubernetes version shipped in the kubernetes-validate wheel, each made standalone
  (only the definitions it reaches, references made local), less their `description` texts.

CRD YAML is read with PyYAML (in the project's .venv).
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "schemas"
# schema keywords whose value is one subschema, a list of them, or a map of name -> subschema
ONE = ("additionalProperties", "items", "not")
MANY = ("anyOf", "allOf", "oneOf", "prefixItems")
NAMED = ("properties", "patternProperties", "$defs", "definitions")
K8S_KINDS = {  # output name -> file in the wheel's <version>-local-strict/ folder, or a definition
    "service-v1.json": "service-v1.json",
    "configmap-v1.json": "configmap-v1.json",
    "objectmeta-v1.json": "#io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
}
_REF = re.compile(r"^(?:/api/_definitions\.json)?#/\$defs/(.+)$")


def strip_descriptions(schema: Any) -> Any:
    """The schema without `description` keywords (a property named "description" is kept)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in ONE and isinstance(value, dict):
            out[key] = strip_descriptions(value)
        elif key in MANY and isinstance(value, list):
            out[key] = [strip_descriptions(v) for v in value]
        elif key in NAMED and isinstance(value, dict):
            out[key] = {name: strip_descriptions(v) for name, v in value.items()}
        else:
            out[key] = value
    return out


def crd_schemas(crd: dict[str, Any]) -> dict[str, Any]:
    """{file name: schema} for the version a CRD stores (the one its objects are written in)."""
    names = crd["spec"]["names"]
    group = crd["spec"]["group"]
    out = {}
    for version in crd["spec"]["versions"]:
        if not version.get("storage"):
            continue
        name = f"{names['kind'].lower()}-{group}-{version['name']}.json"
        out[name] = strip_descriptions(version["schema"]["openAPIV3Schema"])
    return out


def _localise(node: Any, reached: set[str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                m = _REF.match(value)
                if m is None:
                    raise ValueError(f"unexpected reference {value!r}")
                reached.add(m.group(1))
                out[key] = f"#/$defs/{m.group(1)}"
            else:
                out[key] = _localise(value, reached)
        return out
    if isinstance(node, list):
        return [_localise(v, reached) for v in node]
    return node


def standalone(top: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """`top` with the definitions it reaches (transitively) in its own $defs, references made local."""
    reached: set[str] = set()
    out = _localise(top, reached)
    defs: dict[str, Any] = {}
    todo = sorted(reached)
    while todo:
        name = todo.pop()
        if name in defs:
            continue
        more: set[str] = set()
        defs[name] = _localise(definitions[name], more)
        todo.extend(sorted(more - defs.keys()))
    out["$defs"] = dict(sorted(defs.items()))
    return strip_descriptions(out)


def kubernetes_schemas(wheel: Path, version: str) -> dict[str, Any]:
    folder = f"kubernetes_validate/kubernetes-json-schema/{version}-local-strict/"
    with zipfile.ZipFile(wheel) as z:
        definitions = json.loads(z.read(folder + "_definitions.json"))["$defs"]
        out = {}
        for name, source in K8S_KINDS.items():
            if source.startswith("#"):
                top = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": f"#/$defs/{source[1:]}"}
            else:
                top = json.loads(z.read(folder + source))
                top.pop("$id", None)  # its $id would make the test's registry resolve references remotely
            out[name] = standalone(top, definitions)
    return out


def main(argv: list[str] | None = None) -> int:
    import yaml  # PyYAML: in the project's .venv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crd", action="append", default=[], type=Path, help="a CRD YAML file (repeatable)")
    parser.add_argument("--kubernetes-validate-wheel", type=Path, help="kubernetes_validate-*.whl")
    parser.add_argument("--kubernetes-version", default="v1.33.0")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    schemas: dict[str, Any] = {}
    for path in args.crd:
        schemas.update(crd_schemas(yaml.safe_load(path.read_text(encoding="utf-8"))))
    if args.kubernetes_validate_wheel:
        schemas.update(kubernetes_schemas(args.kubernetes_validate_wheel, args.kubernetes_version))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, schema in sorted(schemas.items()):
        text = json.dumps(schema, indent=1, sort_keys=True) + "\n"
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"{args.out / name}: {len(text)} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
