"""The UCX devices this worker process's NIXL agent uses (kv_transfer/ucx_net.py decides, Ray says where)."""

from __future__ import annotations

import os

import ray

from kv_transfer.ucx_net import choose_net_devices, probe_host

JOINED_ENV = "TANDEM_RAY_JOINED"


def ucx_net_devices() -> tuple[str | None, str]:
    """(UCX_NET_DEVICES for this process's agent, why): the operator's value when set, else chosen from
    the Ray cluster's hosts (one host: loopback; several: RDMA ports or the node IP's interface)."""
    given = os.environ.get("UCX_NET_DEVICES")
    if given is not None:
        return given, "set by the operator (UCX_NET_DEVICES or transport.ucx_net_devices)"
    if not ray.is_initialized():
        return "lo", "not in a Ray cluster: loopback"
    node_ip = ray.util.get_node_ip_address()
    ips = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    may_grow = os.environ.get(JOINED_ENV) == "1"  # deploy: the driver joined a cluster it did not start
    return choose_net_devices(probe_host(node_ip), ips, may_grow)
