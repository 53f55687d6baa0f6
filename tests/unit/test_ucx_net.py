"""kv_transfer/ucx_net.py: UCX devices chosen from the hosts; each P/D pair's route, refused when unreachable."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from kv_transfer.ucx_net import HostNet, TransportInfo, choose_net_devices, pair_route, probe_host, rdma_ports
from worker_core.net import ucx_net_devices

ETH = HostNet("10.0.0.5", (("lo", "127.0.0.1"), ("eth0", "10.0.0.5")))
IB = HostNet("10.0.0.5", ETH.interfaces, ("mlx5_0:1", "mlx5_1:1"))


def test_one_host_stays_on_loopback():
    assert choose_net_devices(ETH, {"10.0.0.5"}) == ("lo", "every Ray node is on this host: loopback")
    assert choose_net_devices(IB, {"10.0.0.5"})[0] == "lo"


def test_a_joined_cluster_on_one_host_may_grow_so_it_keeps_a_nic():
    devices, why = choose_net_devices(ETH, {"10.0.0.5"}, may_grow=True)
    assert devices == "eth0" and "may grow" in why
    on_loopback = HostNet("127.0.0.1", ETH.interfaces)  # a test cluster bound to 127.0.0.1
    assert choose_net_devices(on_loopback, {"127.0.0.1"}, may_grow=True)[0] == "lo"


def test_several_hosts_use_rdma_ports_or_the_node_ips_interface():
    hosts = {"10.0.0.5", "10.0.0.6", "10.0.0.7"}
    assert choose_net_devices(IB, hosts) == ("mlx5_0:1,mlx5_1:1,eth0", "3 hosts: RDMA ports and eth0")
    devices, why = choose_net_devices(ETH, hosts)
    assert devices == "eth0" and "interface of node IP 10.0.0.5 (TCP)" in why
    devices, why = choose_net_devices(HostNet("10.9.9.9", ETH.interfaces), hosts)
    assert devices is None and "no interface holds node IP 10.9.9.9: UCX's choice" in why


def _info(wid: str, ip: str, devices: str, memory: str = "DRAM", rdma: tuple[str, ...] = ()) -> TransportInfo:
    return TransportInfo(wid, ip, devices, "test", "", memory, rdma)


def test_pair_routes_say_what_carries_the_kv():
    same = pair_route(_info("prefill-0", "10.0.0.5", "lo"), _info("decode-0", "10.0.0.5", "lo"))
    assert same == "prefill-0 -> decode-0: same host 10.0.0.5, DRAM->DRAM by cma / shared memory"
    gpus = pair_route(_info("p", "10.0.0.5", "lo", "VRAM"), _info("d", "10.0.0.5", "lo", "VRAM"))
    assert gpus.endswith("VRAM->VRAM by CUDA IPC (NVLink or PCIe)")
    rdma = pair_route(_info("p", "10.0.0.5", "mlx5_0:1,eth0", "VRAM"), _info("d", "10.0.0.6", "mlx5_1:1", "VRAM"))
    assert rdma == (
        "p -> d: across hosts 10.0.0.5 -> 10.0.0.6, VRAM->VRAM by RDMA mlx5_0:1,eth0 -> mlx5_1:1 "
        "(GPUDirect RDMA where the driver has it)"
    )
    tcp = pair_route(_info("p", "10.0.0.5", "eth0"), _info("d", "10.0.0.6", "", rdma=("mlx5_0:1",)))
    assert tcp == "p -> d: across hosts 10.0.0.5 -> 10.0.0.6, DRAM->DRAM by TCP eth0 -> any device"
    unset = pair_route(_info("p", "10.0.0.5", "", rdma=("mlx5_0:1",)), _info("d", "10.0.0.6", "", rdma=("mlx5_2:1",)))
    assert "by RDMA mlx5_0:1 -> mlx5_2:1" in unset  # no list: UCX may use the host's RDMA ports


def test_loopback_across_hosts_is_refused_with_what_to_change():
    with pytest.raises(ConfigError, match=r"decode-1 started UCX with UCX_NET_DEVICES='lo'.*unset UCX_NET_DEVICES"):
        pair_route(_info("prefill-0", "10.0.0.5", "eth0"), _info("decode-1", "10.0.0.6", "lo"))


def test_probe_reads_usable_active_rdma_ports_and_interfaces(tmp_path):
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    ports = (("mlx5_0", "1", "4: ACTIVE"), ("mlx5_0", "2", "1: DOWN"), ("mlx5_1", "1", "4: ACTIVE"))
    for dev, port, state in (*ports, ("mlx5_2", "1", "4: ACTIVE")):
        (sys_root / f"class/infiniband/{dev}/ports/{port}").mkdir(parents=True)
        (sys_root / f"class/infiniband/{dev}/ports/{port}/state").write_text(state + "\n")
    for dev, node in (("mlx5_0", "uverbs0"), ("mlx5_1", "uverbs1"), ("mlx5_2", "uverbs2")):
        (sys_root / f"class/infiniband/{dev}/device/infiniband_verbs/{node}").mkdir(parents=True)
    (dev_root / "infiniband").mkdir(parents=True)
    for node in ("uverbs0", "uverbs1"):  # mlx5_2's node is not mounted here (a container without the device)
        (dev_root / "infiniband" / node).write_text("")
    assert rdma_ports(str(sys_root), str(dev_root)) == ("mlx5_0:1", "mlx5_1:1")
    (sys_root / "class/net/lo").mkdir(parents=True)
    (sys_root / "class/net/lo/operstate").write_text("unknown\n")  # loopback reports unknown, and is up
    (sys_root / "class/net/eth9").mkdir()
    (sys_root / "class/net/eth9/operstate").write_text("down\n")
    host = probe_host("127.0.0.1", str(sys_root), str(dev_root))
    assert host == HostNet("127.0.0.1", (("lo", "127.0.0.1"),), ("mlx5_0:1", "mlx5_1:1"))
    assert rdma_ports(str(tmp_path / "none")) == ()


def test_the_operators_devices_win(monkeypatch):
    monkeypatch.setenv("UCX_NET_DEVICES", "ib0")
    assert ucx_net_devices() == ("ib0", "set by the operator (UCX_NET_DEVICES or transport.ucx_net_devices)")
    monkeypatch.delenv("UCX_NET_DEVICES")
    assert ucx_net_devices()[0] == "lo"  # no Ray, or a Ray on this one host
