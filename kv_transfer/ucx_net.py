"""Which network devices UCX may use for KV transfer, chosen from where the workers run.

UCX reads UCX_NET_DEVICES once, when a NIXL agent starts, and a worker's agent talks to every peer
it is handshaken with. So the choice is per process, from the hosts of the Ray cluster:

- every node on one host of a cluster Tandem started (the embedded local one): `lo`; a joined cluster on
  one host (it may grow) gets the interface of the node IP instead. Data between processes
  on one host moves by cma / shared memory (host memory) or CUDA IPC (GPU memory) whatever the
  device list says; the device only carries UCX's control messages, and loopback keeps them off
  the machine's NICs.
- several hosts: the host's active RDMA ports (InfiniBand / RoCE, e.g. `mlx5_0:1`) when it has any,
  so that UCX moves KV by RDMA (GPUDirect RDMA for GPU memory where the driver supports it), plus the
  interface that carries the node's IP (TCP for control and fallback); no RDMA: that interface only.
- the operator's UCX_NET_DEVICES (the environment, or `transport.ucx_net_devices` in the config)
  always wins.

`TransportInfo` is what a worker reports once its agent is up; `pair_route` says, for one P/D pair,
what will carry their KV, and refuses a pair that cannot reach each other (loopback across hosts).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Collection
from pathlib import Path

import msgspec

from common.errors import ConfigError

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


class HostNet(msgspec.Struct, frozen=True):
    """A host's network, as UCX would see it."""

    node_ip: str  # the address Ray knows the node by
    interfaces: tuple[tuple[str, str], ...] = ()  # (name, IPv4) of every interface that is up
    rdma_ports: tuple[str, ...] = ()  # active RDMA ports as UCX names them, "mlx5_0:1"

    def interface_of(self, ip: str) -> str | None:
        return next((name for name, addr in self.interfaces if addr == ip), None)


class TransportInfo(msgspec.Struct, frozen=True):
    """One worker's KV transport, as its agent started (`status`-like, asked once at start-up)."""

    worker_id: str
    node_ip: str
    net_devices: str  # UCX_NET_DEVICES the agent started with ("" = UCX's own choice: every device)
    why: str  # how net_devices was chosen
    ucx_tls: str  # UCX_TLS the agent started with ("" = UCX's own choice)
    memory: str  # "DRAM" or "VRAM": where its KV cache lives
    rdma_ports: tuple[str, ...] = ()


def choose_net_devices(host: HostNet, cluster_ips: Collection[str], may_grow: bool = False) -> tuple[str | None, str]:
    """(UCX_NET_DEVICES for a worker on `host`, why) when the Ray cluster's nodes are at `cluster_ips`.
    `may_grow`: the cluster was joined, not started by Tandem, so hosts may come later: one host then gets the
    node IP's interface, not loopback. None: leave it to UCX (every device), when that interface is unknown."""
    hosts = len(set(cluster_ips) | {host.node_ip})
    iface = host.interface_of(host.node_ip)
    if hosts <= 1 and not may_grow:
        return "lo", "every Ray node is on this host: loopback"
    if hosts <= 1:
        if iface:
            return iface, f"one host in a joined Ray cluster that may grow: {iface}, the interface of {host.node_ip}"
        return None, f"one host in a joined Ray cluster, no interface holds node IP {host.node_ip}: UCX's choice"
    if host.rdma_ports:
        devices = [*host.rdma_ports, *([iface] if iface else [])]
        return ",".join(devices), f"{hosts} hosts: RDMA ports" + (f" and {iface}" if iface else "")
    if iface:
        return iface, f"{hosts} hosts: {iface}, the interface of node IP {host.node_ip} (TCP)"
    return None, f"{hosts} hosts, no interface holds node IP {host.node_ip}: UCX's choice"


def pair_route(p: TransportInfo, d: TransportInfo) -> str:
    """What carries the KV of one P -> D pair, in words; ConfigError when the two cannot reach each other."""
    if p.node_ip == d.node_ip:
        data = "CUDA IPC (NVLink or PCIe)" if "VRAM" in (p.memory, d.memory) else "cma / shared memory"
        return f"{p.worker_id} -> {d.worker_id}: same host {p.node_ip}, {p.memory}->{d.memory} by {data}"
    for w in (p, d):
        if "lo" in w.net_devices.split(","):
            raise ConfigError(
                f"{p.worker_id} ({p.node_ip}) and {d.worker_id} ({d.node_ip}) are on different hosts, but "
                f"{w.worker_id} started UCX with UCX_NET_DEVICES={w.net_devices!r} ({w.why}): KV cannot move "
                "between them; unset UCX_NET_DEVICES and transport.ucx_net_devices, or name a NIC"
            )
    both_rdma = _rdma(p) and _rdma(d)
    if both_rdma:
        gpu = " (GPUDirect RDMA where the driver has it)" if "VRAM" in (p.memory, d.memory) else ""
        via = f"RDMA {p.net_devices or ','.join(p.rdma_ports)} -> {d.net_devices or ','.join(d.rdma_ports)}{gpu}"
    else:
        staged = " (GPU memory staged through host memory)" if "VRAM" in (p.memory, d.memory) else ""
        via = f"TCP {p.net_devices or 'any device'} -> {d.net_devices or 'any device'}{staged}"
    return f"{p.worker_id} -> {d.worker_id}: across hosts {p.node_ip} -> {d.node_ip}, {p.memory}->{d.memory} by {via}"


def _rdma(w: TransportInfo) -> bool:
    """Whether UCX may use RDMA on `w`: an RDMA port ("mlx5_0:1") named, or no list and the host has one."""
    devices = [dev for dev in w.net_devices.split(",") if dev]
    return any(":" in dev for dev in devices) if devices else bool(w.rdma_ports)


# ---- probing this host (Linux) ------------------------------------------------------------------------------------


def probe_host(node_ip: str, sys_root: str = "/sys", dev_root: str = "/dev") -> HostNet:
    """This host's interfaces that are up, with their IPv4, and its active RDMA ports."""
    interfaces = []
    for name in sorted(os.listdir(f"{sys_root}/class/net")) if os.path.isdir(f"{sys_root}/class/net") else ():
        state = _read(Path(sys_root, "class/net", name, "operstate"))
        if state in ("down", "lowerlayerdown", "notpresent"):
            continue
        ip = _ipv4_of(name)
        if ip:
            interfaces.append((name, ip))
    return HostNet(node_ip, tuple(interfaces), rdma_ports(sys_root, dev_root))


def rdma_ports(sys_root: str = "/sys", dev_root: str = "/dev") -> tuple[str, ...]:
    """Active RDMA ports ("mlx5_0:1") this process can use: the port's state in /sys/class/infiniband/<dev>/
    ports/<n>/state is "4: ACTIVE", and the device's verbs node (/dev/infiniband/uverbsN, named by
    <dev>/device/infiniband_verbs/) is there to open. A container sees the host's /sys but, without the
    device mounted, no verbs node: UCX could not use such a port."""
    base = Path(sys_root, "class/infiniband")
    if not base.is_dir():
        return ()
    ports = []
    for dev in sorted(base.iterdir()):
        verbs = dev / "device/infiniband_verbs"
        nodes = [Path(dev_root, "infiniband", v.name) for v in verbs.iterdir()] if verbs.is_dir() else []
        if not any(os.access(node, os.R_OK | os.W_OK) for node in nodes):
            continue
        for port in sorted((dev / "ports").iterdir()) if (dev / "ports").is_dir() else ():
            if "ACTIVE" in _read(port / "state").upper():
                ports.append(f"{dev.name}:{port.name}")
    return tuple(ports)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ipv4_of(interface: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", interface.encode()[:15]))
        except OSError:
            return ""
    return socket.inet_ntoa(packed[20:24])
