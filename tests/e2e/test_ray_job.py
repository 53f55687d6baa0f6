"""The deployment submitted to a real multi-node Ray cluster with `ray job submit`.

A head node (`ray start --head` on loopback, resource `prefill_node`) and a second
node process (`ray start --address`, resource `decode_node`) form the cluster. The
config pins the prefill pool to the first and the decode pool to the second via
custom resources. The job serves requests (the two workers report different node
ids); `ray job stop` must release everything: the port closes, no Tandem actor is
left and both nodes' custom resources are whole again.

The cluster's processes are found by its private temp dir and killed at the end
(`ray stop` would also stop the test session's own Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import grpc
import psutil
import pytest

from tandem_api.client import TandemClient
from tests.e2e.conftest import _free_port
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.slow

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    # (that variable at 0 keeps Ray single-node: a second `ray start --address` is then refused)
    env.update(
        RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", RAY_JOB_STOP_WAIT_TIME_S="30"
    )  # SIGTERM, then this long for the graceful drain before SIGKILL
    return env


def _run(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([RAY, *args], env=_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _ray_processes_since(before: set[int]) -> list[psutil.Process]:
    """Ray daemons started after the snapshot, outside this test process's own tree.

    Ray renames many of its processes (`ray::DashboardAgent`), so they are found by
    start order and name, not by a command-line flag.
    """
    mine = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        if proc.pid in before or proc.pid in mine:
            continue
        text = " ".join([proc.info["name"] or "", *(proc.info["cmdline"] or ())])
        if any(key in text for key in ("ray", "raylet", "gcs_server", "deploy.job")):
            found.append(proc)
    return found


@pytest.fixture
def ray_cluster(tmp_path):
    before = {p.pid for p in psutil.process_iter()}
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client = _free_port(), _free_port(), _free_port()
    try:
        _run(
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            '--resources={"prefill_node": 1}',
            "--disable-usage-stats",
            *_node_ports(),
        )
        _run(
            "start",
            f"--address=127.0.0.1:{gcs}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            '--resources={"decode_node": 1}',
            "--disable-usage-stats",
            *_node_ports(),
        )
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
    finally:
        procs = _ray_processes_since(before)
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)


def _node_ports() -> list[str]:
    """Two nodes on one host must not share the agents' fixed default ports (52365 and friends)."""
    return [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]


def test_ray_job_submit_serves_on_two_nodes_and_stop_releases_everything(ray_cluster, tmp_path):
    dashboard, gcs = ray_cluster
    model = make_tiny_hf_model(tmp_path, "llama", vocab_size=512)
    port = _free_port()
    pool = {"replicas": 1, "dtype": "float32", "kv_cache_memory": "64MiB", "num_cpus": 0.5, "block_size": 4}
    config = {
        "model": str(model),
        "prefill": {**pool, "resources": {"prefill_node": 0.5}},
        "decode": {**pool, "resources": {"decode_node": 0.5}},
        "router": {"host": "127.0.0.1", "port": port},
    }
    cfg_file = tmp_path / "cluster.json"
    cfg_file.write_text(json.dumps(config))
    job = f"tandem-test-{port}"
    _submit(dashboard, job, sys.executable, "-m", "deploy.job", "--config", str(cfg_file))
    try:
        client = TandemClient(f"127.0.0.1:{port}")
        _wait_serving(client, dashboard, job)
        text, ids, last = client.complete(token_ids=[5, 6, 7, 8, 9], max_tokens=6, temperature=0.0, ignore_eos=True)
        assert len(ids) == 6 and last.usage.completion_tokens == 6
        info = client.server_info()
        nodes = {w.role: w.node_id for w in info.workers}
        assert set(nodes) == {"prefill", "decode"} and nodes["prefill"] != nodes["decode"]
    finally:
        _run("job", "stop", f"--address={dashboard}", job, timeout=180)
    _assert_released(dashboard, gcs, port)


def _submit(dashboard: str, job: str, *entrypoint: str) -> None:
    """`ray job submit`, retried while the fresh head's job agent is still starting ("No available agent")."""
    deadline = time.monotonic() + 90
    while True:
        try:
            _run("job", "submit", f"--address={dashboard}", f"--submission-id={job}", "--no-wait", "--", *entrypoint)
            return
        except AssertionError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise


def _wait_serving(client: TandemClient, dashboard: str, job: str) -> None:
    try:
        client.wait_until_serving(timeout=240)
    except Exception:
        logs = _run("job", "logs", f"--address={dashboard}", job)
        raise AssertionError(f"the job never served; its log:\n{logs[-4000:]}") from None


def _assert_released(dashboard: str, gcs: str, port: int) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    assert JobSubmissionClient(dashboard).get_job_status(f"tandem-test-{port}") == JobStatus.STOPPED
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(ch).result(timeout=2)
    deadline = time.monotonic() + 60
    while True:  # the driver is gone; Ray reclaims its actors asynchronously
        alive = [
            a
            for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")])
            if (a.get("name") or "").startswith("tandem-")
        ]
        if not alive or time.monotonic() > deadline:
            break  # each list_actors call is a round trip to the dashboard: no sleep needed between them
    assert alive == []
    out = _run("status", f"--address={gcs}")
    for res in ("prefill_node", "decode_node"):
        line = next(ln for ln in out.splitlines() if res in ln)
        assert line.split()[0].startswith("0.0/1.0"), line
