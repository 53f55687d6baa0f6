"""One conformance suite for every Transport: InProcessTransport, NixlTransport (two agents
in this process), and FaultyTransport over InProcessTransport with an empty fault plan.

"local" (agent D...) initiates; "remote" (agent P...) is the peer. READ pulls remote ->
local, WRITE pushes local -> remote. READs whose regions land in the local staging
buffer (layout conversion, kv_transfer/conversion_plan.py) follow the basic suite; a NIXL peer in
another process, and `gpu` tests for VRAM, close the file.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import torch

from kv_transfer import (
    PROTOCOL_VERSION,
    ConversionPlan,
    FaultPlan,
    FaultyTransport,
    Handshake,
    IncompatiblePeerError,
    InProcessRegistry,
    InProcessTransport,
    InvalidLayoutError,
    InvalidPlanError,
    KVLayout,
    NixlSettings,
    NixlTransport,
    Region,
    TransferError,
    TransferOp,
    TransferPlan,
    TransferState,
    Transport,
    TransportUnavailableError,
    TransportVersionError,
    UnknownPeerError,
    apply_scatter,
    encode_handshake,
    plan_conversion,
    plan_transfer,
)
from kv_transfer.testing import PeerSpec, RemotePeer, make_cache, wait_done

TIMEOUT_S = 10.0
IMPLS = ["inproc", "nixl", "faulty"]
_names = itertools.count()


def layout(num_blocks: int = 16, dtype: str = "bfloat16", device: str = "cpu", **kw) -> KVLayout:
    base: dict[str, Any] = dict(model_fingerprint="tiny", total_layers=2, layer_start=0, num_layers=2,
                                total_kv_heads=2, head_start=0, num_kv_heads=2, head_dim=8, block_size=4,
                                order="NHD")  # fmt: skip
    return KVLayout(**(base | kw), num_blocks=num_blocks, dtype=dtype, device=device)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Compare caches bytewise: random bytes hold NaNs, which torch.equal calls unequal."""
    return t.cpu().reshape(t.shape[:3] + (-1,)).contiguous().view(torch.uint8)


@dataclass
class Pair:
    local: Transport
    remote: Transport
    kv_local: torch.Tensor
    kv_remote: torch.Tensor
    l_layout: KVLayout
    r_layout: KVLayout
    staging: torch.Tensor | None = None

    def wait(self, handle) -> TransferState:
        return wait_done(self.local, handle, TIMEOUT_S, pump=[self.remote])

    def remote_notifications(self, want: int = 1) -> list[tuple[str, bytes]]:
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + TIMEOUT_S
        while len(got) < want and time.monotonic() < deadline:
            self.local.progress()  # both sides must make progress (transport.py, liveness)
            got += self.remote.notifications()
        return got


class Factory:
    def __init__(self, kind: str) -> None:
        self.kind, self.registry = kind, InProcessRegistry()
        self.made: list[Transport] = []

    def transport(self, role: str) -> Transport:
        name = f"{role}{next(_names)}"
        t: Transport
        if self.kind == "nixl":
            t = NixlTransport(name, NixlSettings())
        elif self.kind == "faulty":
            t = FaultyTransport(InProcessTransport(name, self.registry), FaultPlan())
        else:
            t = InProcessTransport(name, self.registry)
        self.made.append(t)
        return t

    def endpoint(
        self, role: str, lay: KVLayout, seed: int | None, staging: torch.Tensor | None = None
    ) -> tuple[Transport, torch.Tensor]:
        t, kv = self.transport(role), make_cache(lay, seed)
        t.register(kv, lay, staging)
        return t, kv

    def pair(self, l_layout=None, r_layout=None, local_seed=None, remote_seed=None, connect=True,
             staging_bytes: int = 0) -> Pair:  # fmt: skip
        l_layout, r_layout = l_layout or layout(12), r_layout or layout(16)
        staging = torch.zeros(staging_bytes, dtype=torch.uint8, device=l_layout.device) if staging_bytes else None
        local, kl = self.endpoint("D", l_layout, local_seed, staging)
        remote, kr = self.endpoint("P", r_layout, remote_seed)
        if connect:
            assert local.add_peer(remote.handshake_payload()) == remote.agent_name
            assert remote.add_peer(local.handshake_payload()) == local.agent_name
        return Pair(local, remote, kl, kr, l_layout, r_layout, staging)


@pytest.fixture(params=IMPLS)
def factory(request):
    f = Factory(request.param)
    yield f
    for t in f.made:
        t.close()


# ---- bytes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_read_pulls_the_planned_blocks_and_nothing_else(factory, dtype):
    p = factory.pair(layout(12, dtype), layout(16, dtype), remote_seed=7)
    src_ids, dst_ids = [5, 6, 7, 1, 9, 15], [0, 1, 2, 8, 3, 11]  # runs and singles
    h = p.local.submit(plan_transfer(p.r_layout, p.l_layout, src_ids, dst_ids), TransferOp.READ, p.remote.agent_name)
    assert h.op is TransferOp.READ and h.nbytes == 6 * 2 * 2 * p.l_layout.block_bytes
    assert p.wait(h) is TransferState.DONE
    p.local.release(h)
    got, want = as_bytes(p.kv_local), as_bytes(p.kv_remote)
    assert torch.equal(got[:, :, dst_ids], want[:, :, src_ids])
    untouched = [b for b in range(12) if b not in dst_ids]
    assert not got[:, :, untouched].any()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_write_pushes_the_planned_blocks(factory, dtype):
    p = factory.pair(layout(12, dtype), layout(16, dtype), local_seed=3)
    src_ids, dst_ids = [0, 1, 2, 11], [13, 14, 15, 4]
    h = p.local.submit(plan_transfer(p.l_layout, p.r_layout, src_ids, dst_ids), TransferOp.WRITE, p.remote.agent_name)
    assert p.wait(h) is TransferState.DONE
    p.local.release(h)
    got = as_bytes(p.kv_remote)
    assert torch.equal(got[:, :, dst_ids], as_bytes(p.kv_local)[:, :, src_ids])
    assert not got[:, :, [b for b in range(16) if b not in dst_ids]].any()


def test_empty_plan_completes_and_still_notifies(factory):
    p = factory.pair()
    h = p.local.submit(TransferPlan.empty(), TransferOp.READ, p.remote.agent_name, notify=b"nothing-to-copy")
    assert p.wait(h) is TransferState.DONE and h.nbytes == 0
    p.local.release(h)
    assert p.remote_notifications() == [(p.local.agent_name, b"nothing-to-copy")]


def test_notification_reaches_the_peer_with_its_payload_once(factory):
    p = factory.pair(remote_seed=1)
    plan = plan_transfer(p.r_layout, p.l_layout, [3, 4], [0, 1])
    h = p.local.submit(plan, TransferOp.READ, p.remote.agent_name, notify=b"req-42")
    assert p.wait(h) is TransferState.DONE
    p.local.release(h)
    assert p.remote_notifications() == [(p.local.agent_name, b"req-42")]
    assert p.remote.notifications() == [] and p.local.notifications() == []


def test_plan_outside_the_registered_memory_is_refused(factory):
    p = factory.pair()
    too_big = plan_transfer(layout(64), layout(64), [63], [0])
    with pytest.raises(InvalidPlanError, match="outside the registered memory"):
        p.local.submit(too_big, TransferOp.READ, p.remote.agent_name)


# ---- staging: READs that land in the local staging buffer (layout conversion) ------------------------
STAGING_BYTES = 4096
SMALL_STAGING = 1000  # a few rows of 16 bytes: a request needs several rounds


def test_read_regions_may_land_in_the_local_staging_buffer(factory):
    p = factory.pair(layout(12), layout(16), remote_seed=7, staging_bytes=STAGING_BYTES)
    lay, bb, cache_n = p.l_layout, p.l_layout.block_bytes, p.l_layout.region_bytes
    regions = (
        Region(p.r_layout.offset(0, 0, 3), cache_n + 128, bb),  # into staging at 128
        Region(p.r_layout.offset(1, 1, 2), lay.offset(0, 1, 4), bb),  # into the cache
        Region(p.r_layout.offset(1, 0, 9), cache_n + STAGING_BYTES - bb, bb),  # the last staging bytes
    )
    h = p.local.submit(TransferPlan(regions, 3 * bb, 3), TransferOp.READ, p.remote.agent_name, b"staged")
    assert p.wait(h) is TransferState.DONE and h.nbytes == 3 * bb
    p.local.release(h)
    remote = p.kv_remote.reshape(-1).view(torch.uint8)
    staging = p.staging.cpu()
    assert torch.equal(staging[128 : 128 + bb], remote[regions[0].src_offset :][:bb].cpu())
    assert torch.equal(staging[-bb:], remote[regions[2].src_offset :][:bb].cpu())
    assert not staging[:128].any() and not staging[128 + bb : -bb].any()
    got = as_bytes(p.kv_local)
    assert torch.equal(got[0, 1, 4], as_bytes(p.kv_remote)[1, 1, 2])
    got[0, 1, 4] = 0
    assert not got.any()  # staged bytes never leak into the cache
    assert p.remote_notifications() == [(p.local.agent_name, b"staged")]


def test_staging_is_only_the_local_side_of_a_read(factory):
    p = factory.pair(layout(12), layout(16), remote_seed=7, staging_bytes=STAGING_BYTES)
    cache_n, peer = p.l_layout.region_bytes, p.remote.agent_name
    past = TransferPlan((Region(0, cache_n + STAGING_BYTES - 8, 16),), 16, 1)
    with pytest.raises(InvalidPlanError, match="outside the registered memory"):
        p.local.submit(past, TransferOp.READ, peer)
    across = TransferPlan((Region(0, cache_n - 8, 16),), 16, 1)
    with pytest.raises(InvalidPlanError, match="crosses the end of the KV cache"):
        p.local.submit(across, TransferOp.READ, peer)
    from_staging = TransferPlan((Region(cache_n, 0, 16),), 16, 1)  # a WRITE never reads staging
    with pytest.raises(InvalidPlanError, match="outside the registered memory"):
        p.local.submit(from_staging, TransferOp.WRITE, peer)
    into_peer_staging = TransferPlan((Region(0, p.r_layout.region_bytes, 16),), 16, 1)  # peers have none
    with pytest.raises(InvalidPlanError, match="outside the registered memory"):
        p.local.submit(into_peer_staging, TransferOp.WRITE, peer)


def test_staging_must_be_contiguous_and_beside_the_cache(factory):
    t, lay = factory.transport("S"), layout(4)
    with pytest.raises(InvalidLayoutError, match="staging buffer: it is not contiguous"):
        t.register(make_cache(lay), lay, torch.zeros(8, 8, dtype=torch.uint8).t())
    with pytest.raises(InvalidLayoutError, match="it is empty"):
        t.register(make_cache(lay), lay, torch.zeros(0, dtype=torch.uint8))


def converted_read(local: Transport, peer: str, plan: ConversionPlan, kv: torch.Tensor, staging: torch.Tensor,
                   src_blocks, dst_blocks, num_tokens: int, first_token: int, pump=()) -> int:  # fmt: skip
    """Pull one request through `local`: each round's READ, then its scatter. Returns the round count."""
    rounds = plan.bind(src_blocks, dst_blocks, num_tokens, first_token, staging.numel())
    for i, rnd in enumerate(rounds):
        [(src_index, read)] = rnd.reads
        assert src_index == 0
        notify = b"req-1" if i == len(rounds) - 1 else b""
        h = local.submit(read, TransferOp.READ, peer, notify)
        assert wait_done(local, h, TIMEOUT_S, pump=pump) is TransferState.DONE
        local.release(h)
        if rnd.scatter is not None:
            apply_scatter(rnd.scatter, staging, kv)
    return len(rounds)


def assert_converted(src: torch.Tensor, src_l: KVLayout, dst: torch.Tensor, dst_l: KVLayout,
                     src_blocks, dst_blocks, num_tokens: int, first_token: int) -> None:  # fmt: skip
    """Token by token, on the caches' own shapes: src is NHD, dst HND (same heads and layers)."""
    src, dst = src.cpu().view(torch.int16), dst.cpu().view(torch.int16)
    for t in range(first_token, num_tokens):
        s_blk, s_slot = src_blocks[t // src_l.block_size], t % src_l.block_size
        d_blk, d_slot = dst_blocks[t // dst_l.block_size - first_token // dst_l.block_size], t % dst_l.block_size
        for h in range(dst_l.num_kv_heads):
            assert torch.equal(dst[:, :, d_blk, h, d_slot], src[:, :, s_blk, s_slot, h]), (t, h)


def test_converted_read_through_staging_in_several_rounds(factory):
    # prefill NHD blocks of 4 -> decode HND blocks of 8: staged reads + scatters, 1000 bytes of staging
    p = factory.pair(layout(12, order="HND", block_size=8), layout(16), remote_seed=3, staging_bytes=SMALL_STAGING)
    plan = plan_conversion([p.r_layout], p.l_layout)
    assert plan.needs_staging and plan.staging_bytes(27, 8) > SMALL_STAGING
    src_blocks, dst_blocks = [9, 3, 4, 5, 15, 0, 1], [7, 2, 10]
    rounds = converted_read(p.local, p.remote.agent_name, plan, p.kv_local, p.staging, src_blocks, dst_blocks,
                            27, 8, pump=[p.remote])  # fmt: skip
    assert rounds > 1
    assert_converted(p.kv_remote, p.r_layout, p.kv_local, p.l_layout, src_blocks, dst_blocks, 27, 8)
    untouched = [b for b in range(12) if b not in dst_blocks]
    assert not as_bytes(p.kv_local)[:, :, untouched].any()
    assert p.remote_notifications() == [(p.local.agent_name, b"req-1")]


# ---- failures ---------------------------------------------------------------------------------
def test_unknown_and_removed_peers_are_refused(factory):
    p = factory.pair(remote_seed=2)
    plan = plan_transfer(p.r_layout, p.l_layout, [0], [0])
    with pytest.raises(UnknownPeerError, match="nobody"):
        p.local.submit(plan, TransferOp.READ, "nobody")
    assert p.local.peer_layout(p.remote.agent_name) == p.r_layout
    p.local.remove_peer(p.remote.agent_name)
    p.local.remove_peer(p.remote.agent_name)  # idempotent
    with pytest.raises(UnknownPeerError):
        p.local.submit(plan, TransferOp.READ, p.remote.agent_name)
    with pytest.raises(UnknownPeerError):
        p.local.peer_layout(p.remote.agent_name)
    p.local.add_peer(p.remote.handshake_payload())  # and it can come back
    h = p.local.submit(plan, TransferOp.READ, p.remote.agent_name)
    assert p.wait(h) is TransferState.DONE
    p.local.release(h)


def test_failed_transfer_is_released_and_the_transport_keeps_working(factory):
    p = factory.pair(remote_seed=5)
    local = FaultyTransport(p.local, FaultPlan(fail_submits={1}, fail_polls={2}, delay_polls=2))
    plan = plan_transfer(p.r_layout, p.l_layout, [1, 2], [1, 2])
    with pytest.raises(TransferError, match="injected fault: submit #1"):
        local.submit(plan, TransferOp.READ, p.remote.agent_name)
    failed = local.submit(plan, TransferOp.READ, p.remote.agent_name, b"r2")
    assert [local.poll(failed) for _ in range(2)] == [TransferState.PENDING] * 2  # delayed
    assert wait_done(local, failed, TIMEOUT_S, pump=[p.remote]) is TransferState.FAILED
    local.release(failed)
    local.release(failed)  # idempotent, also after FAILED
    with pytest.raises(TransferError, match="released"):
        local.poll(failed)
    ok = local.submit(plan, TransferOp.READ, p.remote.agent_name, b"r3")
    assert wait_done(local, ok, TIMEOUT_S, pump=[p.remote]) is TransferState.DONE
    local.release(ok)
    assert torch.equal(as_bytes(p.kv_local)[:, :, [1, 2]], as_bytes(p.kv_remote)[:, :, [1, 2]])


def test_stalled_and_late_transfers(factory):
    """stall_polls: PENDING however long it is polled (the pull's timeout ends it), releasable, and the
    bytes did land (the inner transfer ran); delay_only: only the chosen transfer is late."""
    p = factory.pair(remote_seed=9)
    local = FaultyTransport(p.local, FaultPlan(stall_polls={1}, delay_polls=3, delay_only={2}))
    plan = plan_transfer(p.r_layout, p.l_layout, [1, 2], [1, 2])
    stalled = local.submit(plan, TransferOp.READ, p.remote.agent_name)
    for _ in range(50):
        p.remote.progress()
        assert local.poll(stalled) is TransferState.PENDING
    local.release(stalled)
    late = local.submit(plan, TransferOp.READ, p.remote.agent_name)
    assert [local.poll(late) for _ in range(3)] == [TransferState.PENDING] * 3
    assert wait_done(local, late, TIMEOUT_S, pump=[p.remote]) is TransferState.DONE
    local.release(late)
    on_time = local.submit(plan, TransferOp.READ, p.remote.agent_name)
    assert wait_done(local, on_time, TIMEOUT_S, pump=[p.remote]) is TransferState.DONE
    local.release(on_time)
    assert torch.equal(as_bytes(p.kv_local)[:, :, [1, 2]], as_bytes(p.kv_remote)[:, :, [1, 2]])


def test_version_mismatch_is_refused_before_the_backend(factory):
    p = factory.pair(connect=False)
    hs = msgspec.msgpack.decode(p.remote.handshake_payload(), type=Handshake)
    newer = encode_handshake(msgspec.structs.replace(hs, version=PROTOCOL_VERSION + 1))
    with pytest.raises(TransportVersionError, match=f"version {PROTOCOL_VERSION + 1}"):
        p.local.add_peer(newer)
    with pytest.raises(TransportVersionError, match="not a Tandem KV handshake"):
        p.local.add_peer(b"\x00garbage")
    with pytest.raises(UnknownPeerError):  # nothing was added
        p.local.submit(TransferPlan.empty(), TransferOp.READ, p.remote.agent_name)


@pytest.mark.parametrize(
    "remote_kw, needle",
    [
        (dict(dtype="float32"), "dtype: local 'bfloat16' vs remote 'float32'"),
        (dict(model_fingerprint="other-model"), "model_fingerprint: local 'tiny' vs remote 'other-model'"),
        (dict(head_dim=16), "head_dim: local 8 vs remote 16"),
    ],
)
def test_incompatible_peer_is_refused_naming_the_field(factory, remote_kw, needle):
    p = factory.pair(layout(12), layout(16, **remote_kw), connect=False)
    with pytest.raises(IncompatiblePeerError, match=needle):
        p.local.add_peer(p.remote.handshake_payload())


def test_tampered_compat_hash_is_refused(factory):
    p = factory.pair(connect=False)
    hs = msgspec.msgpack.decode(p.remote.handshake_payload(), type=Handshake)
    with pytest.raises(IncompatiblePeerError, match="does not match its own layout"):
        p.local.add_peer(encode_handshake(msgspec.structs.replace(hs, compat_hash="0" * 16)))


def test_close_is_idempotent_and_final(factory):
    p = factory.pair(remote_seed=4)
    h = p.local.submit(plan_transfer(p.r_layout, p.l_layout, [0], [0]), TransferOp.READ, p.remote.agent_name)
    assert isinstance(p.local, Transport)
    p.local.close()  # with a handle still held: close releases it
    p.local.close()
    p.local.release(h)
    with pytest.raises(TransferError, match="closed"):
        p.local.submit(TransferPlan.empty(), TransferOp.READ, p.remote.agent_name)
    with pytest.raises(TransferError):
        p.local.poll(h)


def test_unregistered_transport_has_no_handshake(factory):
    with pytest.raises(TransferError, match="register"):
        factory.transport("X").handshake_payload()


# ---- NIXL specifics ------------------------------------------------------------------------------
def test_payload_of_another_transport_kind_is_refused():
    nixl, inproc = NixlTransport(f"N{next(_names)}"), InProcessTransport(f"I{next(_names)}", InProcessRegistry())
    try:
        for t in (nixl, inproc):
            t.register(make_cache(layout(4)), layout(4))
        with pytest.raises(IncompatiblePeerError, match="transport: local 'nixl' vs remote 'inproc'"):
            nixl.add_peer(inproc.handshake_payload())
    finally:
        nixl.close(), inproc.close()


def test_missing_nixl_raises_transport_unavailable_with_the_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl_cu12._api", None)
    monkeypatch.setitem(sys.modules, "nixl._api", None)
    monkeypatch.setitem(sys.modules, "nixl_cu13._api", None)
    with pytest.raises(TransportUnavailableError, match=r"NIXL is not installed \(.*nixl_cu12._api"):
        NixlTransport("absent")


def test_ucx_env_defaults_never_override_the_user():
    env = {"UCX_NET_DEVICES": "eth7"}
    NixlSettings(ucx_tls="tcp,sm,self", ucx_cuda_ipc_get_zcopy=None).apply_env(env)
    assert env == {"UCX_NET_DEVICES": "eth7", "UCX_TLS": "tcp,sm,self"}
    NixlSettings().apply_env(env := {})
    assert env == {"UCX_NET_DEVICES": "lo", "UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}  # UCX_TLS: UCX's choice
    NixlSettings().apply_env(env := {}, cuda=False)
    assert env == {"UCX_NET_DEVICES": "lo"}


GPU = pytest.mark.gpu


@pytest.mark.parametrize(
    "local_dev, remote_dev",
    [("cpu", "cpu"), pytest.param("cuda:0", "cuda:0", marks=GPU), pytest.param("cuda:0", "cpu", marks=GPU)],
)
def test_nixl_peer_in_another_process_reads_and_writes(local_dev, remote_dev):
    lay_p, lay_d = layout(16, device=remote_dev), layout(12, device=local_dev)
    local = NixlTransport(f"D{next(_names)}")
    kv = make_cache(lay_d)
    local.register(kv, lay_d)
    with RemotePeer(PeerSpec(f"P{next(_names)}", lay_p, seed=11)) as peer:
        local.add_peer(peer.call("handshake"))
        peer.call("add_peer", local.handshake_payload())
        plan = plan_transfer(lay_p, lay_d, [2, 3, 9], [0, 1, 5])
        read = local.submit(plan, TransferOp.READ, peer.agent_name, b"rid-1")
        assert wait_done(local, read, TIMEOUT_S) is TransferState.DONE
        local.release(read)
        want = as_bytes(make_cache(lay_p, seed=11))
        assert torch.equal(as_bytes(kv)[:, :, [0, 1, 5]], want[:, :, [2, 3, 9]])

        write = local.submit(plan_transfer(lay_d, lay_p, [5], [15]), TransferOp.WRITE, peer.agent_name, b"rid-2")
        assert wait_done(local, write, TIMEOUT_S) is TransferState.DONE
        local.release(write)
        off, n = lay_p.offset(1, 1, 15), lay_p.block_bytes  # last layer's V of block 15
        mine = kv.reshape(-1).view(torch.uint8)[lay_d.offset(1, 1, 5) :][:n]
        assert peer.call("bytes", off, n) == mine.cpu().numpy().tobytes()
        got, deadline = [], time.monotonic() + TIMEOUT_S
        while len(got) < 2 and time.monotonic() < deadline:
            got += peer.call("notifications")
        assert got == [(local.agent_name, b"rid-1"), (local.agent_name, b"rid-2")]
    local.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_nixl_peer_in_another_process_serves_a_converted_read_into_staging(device):
    lay_p, lay_d = layout(16, device=device), layout(12, order="HND", block_size=8, device=device)
    local = NixlTransport(f"D{next(_names)}")
    kv, staging = make_cache(lay_d), torch.zeros(SMALL_STAGING, dtype=torch.uint8, device=device)
    local.register(kv, lay_d, staging)
    try:
        with RemotePeer(PeerSpec(f"P{next(_names)}", lay_p, seed=13)) as peer:
            local.add_peer(peer.call("handshake"))
            peer.call("add_peer", local.handshake_payload())  # block size and order differ: still compatible
            plan = plan_conversion([local.peer_layout(peer.agent_name)], lay_d)
            src_blocks, dst_blocks = [2, 3, 4, 5, 11, 12], [0, 5, 6]
            assert converted_read(local, peer.agent_name, plan, kv, staging, src_blocks, dst_blocks, 23, 0) > 1
            assert_converted(make_cache(lay_p, seed=13), lay_p, kv, lay_d, src_blocks, dst_blocks, 23, 0)
            got, deadline = [], time.monotonic() + TIMEOUT_S
            while not got and time.monotonic() < deadline:
                got += peer.call("notifications")
            assert got == [(local.agent_name, b"req-1")]
    finally:
        local.close()


def test_nixl_peer_process_death_fails_cleanly_and_close_survives():
    lay = layout(8)
    local = NixlTransport(f"D{next(_names)}")
    local.register(make_cache(lay), lay)
    peer = RemotePeer(PeerSpec(f"P{next(_names)}", lay, seed=1))
    try:
        local.add_peer(peer.call("handshake"))
        peer.call("add_peer", local.handshake_payload())
        plan = plan_transfer(lay, lay, [1, 2], [1, 2])
        warm = local.submit(plan, TransferOp.READ, peer.agent_name)
        assert wait_done(local, warm, TIMEOUT_S) is TransferState.DONE
        local.release(warm)
        peer.kill()
        for p, notify in ((TransferPlan.empty(), b"rid"), (plan, b"rid"), (plan, b"")):
            h = local.submit(p, TransferOp.READ, peer.agent_name, notify)
            state = wait_done(local, h, TIMEOUT_S)
            local.release(h)
            if p.regions:  # a lone notification may leave unnoticed; bytes cannot
                assert state is TransferState.FAILED
        local.remove_peer(peer.agent_name)  # after a failed transfer: used to abort inside UCX at close
    finally:
        local.close()
        peer.close()


# ---- GPU ------------------------------------------------------------------------------------------
@GPU
@pytest.mark.parametrize("kind", ["nixl", "inproc"])
@pytest.mark.parametrize("local_dev, remote_dev", [("cuda:0", "cuda:0"), ("cpu", "cuda:0"), ("cuda:0", "cpu")])
def test_vram_transfers(kind, local_dev, remote_dev):
    f = Factory(kind)
    try:
        p = f.pair(layout(12, device=local_dev), layout(16, device=remote_dev), remote_seed=9)
        h = p.local.submit(plan_transfer(p.r_layout, p.l_layout, [4, 5, 6, 0], [0, 1, 2, 7]), TransferOp.READ,
                           p.remote.agent_name, b"gpu")  # fmt: skip
        assert p.wait(h) is TransferState.DONE
        p.local.release(h)
        torch.cuda.synchronize()
        assert torch.equal(as_bytes(p.kv_local)[:, :, [0, 1, 2, 7]], as_bytes(p.kv_remote)[:, :, [4, 5, 6, 0]])
        plan = plan_transfer(p.l_layout, p.r_layout, [0, 1], [10, 11])
        w = p.local.submit(plan, TransferOp.WRITE, p.remote.agent_name)
        assert p.wait(w) is TransferState.DONE
        p.local.release(w)
        torch.cuda.synchronize()
        assert torch.equal(as_bytes(p.kv_remote)[:, :, [10, 11]], as_bytes(p.kv_local)[:, :, [0, 1]])
        assert p.remote_notifications() == [(p.local.agent_name, b"gpu")]
    finally:
        for t in f.made:
            t.close()


@GPU
@pytest.mark.parametrize("kind", ["nixl", "inproc"])
@pytest.mark.parametrize("remote_dev", ["cuda:0", "cpu"])
def test_vram_converted_read_through_staging(kind, remote_dev):
    f = Factory(kind)
    try:
        p = f.pair(layout(12, order="HND", block_size=8, device="cuda:0"), layout(16, device=remote_dev),
                   remote_seed=5, staging_bytes=SMALL_STAGING)  # fmt: skip
        plan = plan_conversion([p.r_layout], p.l_layout)
        src_blocks, dst_blocks = [9, 3, 4, 5, 15, 0, 1], [7, 2, 10]
        assert converted_read(p.local, p.remote.agent_name, plan, p.kv_local, p.staging, src_blocks, dst_blocks,
                              27, 8, pump=[p.remote]) > 1  # fmt: skip
        torch.cuda.synchronize()
        assert_converted(p.kv_remote, p.r_layout, p.kv_local, p.l_layout, src_blocks, dst_blocks, 27, 8)
    finally:
        for t in f.made:
            t.close()
