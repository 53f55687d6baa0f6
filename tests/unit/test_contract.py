"""The router-worker contract (common/contract.py) is the one way types cross between router and workers.

- The router imports worker-facing types from the contract only: no router file imports the errors,
  sampling parameters or KV events modules directly, nor anything from engine/ or the worker packages.
- The worker actors answer WorkerAPI as declared: every method the contract lists for a role exists on
  that role's actor class with the same parameters, and the router calls them by attribute.
- Another wire version is refused with a message naming both versions.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from common.contract import (
    ROLE_METHODS,
    WIRE_VERSION,
    Health,
    Role,
    WireVersionError,
    WorkerAPI,
    check_wire_version,
)

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_ROUTER = ("common.errors", "common.sampling_params", "common.kv_events", "engine", "worker_core",
                       "prefill_worker", "decode_worker")  # fmt: skip


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_router_imports_worker_facing_types_from_the_contract_only():
    offenders = {
        f"{path.relative_to(REPO)}: {name}"
        for path in (REPO / "router").rglob("*.py")
        for name in imports_of(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_ROUTER)
    }
    assert not offenders, sorted(offenders)


def test_the_router_calls_worker_methods_by_attribute_not_by_string():
    source = (REPO / "router" / "workers.py").read_text()
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "getattr"]
    assert not calls, "router/workers.py looks a worker method up by name"
    called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Attribute) and n.value.attr == "handle"}  # fmt: skip
    assert called <= {m for m in dir(WorkerAPI) if not m.startswith("_")}, called


@pytest.mark.parametrize("role", [Role.PREFILL, Role.DECODE])
def test_worker_actors_answer_the_contract(role):
    from decode_worker.worker import DecodeWorker
    from prefill_worker.worker import PrefillWorker

    actor = PrefillWorker if role is Role.PREFILL else DecodeWorker
    shared = {"status", "kv_events", "kv_snapshot", "wait_idle", "model_info", "get_tokenizer", "handshake_payload",
              "add_peer", "remove_peer"}  # fmt: skip
    for name in shared | ROLE_METHODS[role]:
        declared = list(inspect.signature(getattr(WorkerAPI, name)).parameters)
        assert hasattr(actor, name), f"{actor.__name__} lacks {name}"
        actual = list(inspect.signature(getattr(actor, name)).parameters)
        assert actual[: len(declared)] == declared, (actor.__name__, name, actual, declared)


def test_another_wire_version_is_refused_naming_both():
    check_wire_version(WIRE_VERSION)
    with pytest.raises(WireVersionError, match=rf"decode-0 speaks wire version 3, this router {WIRE_VERSION}"):
        check_wire_version(3, "decode-0")
    with pytest.raises(WireVersionError, match="wire version < 4"):
        check_wire_version(0)  # a worker from before ModelInfo carried its version


def test_roles_and_health_equal_the_strings_older_versions_sent():
    assert Role.PREFILL == "prefill" and Role.DECODE == "decode" and Role.AGGREGATED == "aggregated"
    assert Health.SERVING == "SERVING" and Health.NOT_SERVING == "NOT_SERVING"
