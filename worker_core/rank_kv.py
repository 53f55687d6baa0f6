"""RankKV: one rank's KV transport endpoint, and its half of a converted pull.

Every rank of a worker registers its own slice of the KV cache with its own NIXL
agent (named "<worker>-r<rank>"), so a decode rank reads exactly the bytes it needs
straight from the prefill ranks that hold them, whatever the two workers' shapes:

    D rank r, for a request:
      plan   = plan_conversion(P's rank layouts, D rank r's layout)   once per P worker
      rounds = plan.bind(P's block table, our block table, tokens)    pure, per request
      per round: READ from each P rank it names (into our cache, or into our staging
                 buffer when the bytes must be rearranged), wait, release, then
                 apply_scatter(staging -> cache) on our device

The leader runs rank 0's RankKV in its own process; rank actors (worker_core/ranks.py)
run theirs. Pulls carry no NIXL notification (a pull touches several P ranks, the
lease lives on P's leader): the router releases P's lease once D streams.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from common.errors import KVTransferFailedError
from engine.kv_cache import KVCacheSpec

if TYPE_CHECKING:
    from kv_transfer.ucx_net import TransportInfo

log = logging.getLogger(__name__)

POLL_S = 0.0002  # transfer poll period (a 512-token SmolLM2 prompt moves in 3.3 ms: benchmarks/disagg_ttft.py)


class RankKV:
    def __init__(
        self,
        agent_name: str,
        cache: torch.Tensor,
        spec: KVCacheSpec,
        fingerprint: str,
        *,
        backend: str = "UCX",
        progress_thread: bool = False,
        staging_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kv_transfer import KVLayout, NixlSettings, NixlTransport

        self.clock = clock  # the pull's deadline
        self.cache = cache
        self.layout = KVLayout.from_cache(cache, spec, fingerprint)
        row = spec.head_dim * cache.element_size()
        staging_bytes -= staging_bytes % row
        # uninitialised: pages are only touched by the conversions that use them
        self.staging = torch.empty(staging_bytes, dtype=torch.uint8, device=cache.device) if staging_bytes else None
        from worker_core.net import ucx_net_devices

        self.net_devices, self.net_why = ucx_net_devices()  # before the agent starts: UCX reads it then
        settings = NixlSettings(backend=backend, enable_prog_thread=progress_thread, ucx_net_devices=self.net_devices)
        self.transport = NixlTransport(agent_name, settings)
        self.transport.register(cache, self.layout, self.staging)
        self._workers: dict[str, list[str]] = {}  # peer worker's leader agent -> its ranks' agents
        self._plans: dict[str, object] = {}  # peer worker's leader agent -> ConversionPlan for this rank

    @property
    def agent_name(self) -> str:
        return self.transport.agent_name

    def handshake_payload(self) -> bytes:
        return self.transport.handshake_payload()

    def transport_info(self, worker_id: str, node_ip: str) -> TransportInfo:
        """The UCX devices and transports this agent started with, and where its KV lives."""
        from kv_transfer.ucx_net import TransportInfo, rdma_ports

        return TransportInfo(
            worker_id=worker_id,
            node_ip=node_ip,
            net_devices=os.environ.get("UCX_NET_DEVICES", ""),
            why=self.net_why,
            ucx_tls=os.environ.get("UCX_TLS", ""),
            memory="VRAM" if self.cache.is_cuda else "DRAM",
            rdma_ports=rdma_ports(),
        )

    def add_peer_worker(self, payloads: list[bytes]) -> list[str]:
        """Add every rank of a peer worker (rank order); refuses a peer whose model can never match."""
        agents = [self.transport.add_peer(p) for p in payloads]
        self._workers[agents[0]] = agents
        self._plans.pop(agents[0], None)
        return agents

    def remove_peer_worker(self, leader_agent: str) -> bool:
        """Forget every rank of a peer worker (it left the cluster); False if it was not known."""
        agents = self._workers.pop(leader_agent, None)
        self._plans.pop(leader_agent, None)
        for agent in agents or ():
            self.transport.remove_peer(agent)
        return agents is not None

    def peer_layouts(self, leader_agent: str) -> list:
        return [self.transport.peer_layout(a) for a in self._agents(leader_agent)]

    def _agents(self, leader_agent: str) -> list[str]:
        agents = self._workers.get(leader_agent)
        if agents is None:
            raise KVTransferFailedError(f"{self.agent_name} has no handshake with prefill worker {leader_agent!r}")
        return agents

    def plan(self, leader_agent: str):
        plan = self._plans.get(leader_agent)
        if plan is None:
            from kv_transfer import plan_conversion

            plan = plan_conversion(self.peer_layouts(leader_agent), self.layout)
            self._plans[leader_agent] = plan
        return plan

    def progress(self) -> None:
        self.transport.progress()

    def pull(
        self,
        leader_agent: str,
        src_blocks: list[int],
        dst_blocks: list[int],
        num_tokens: int,
        first_token: int,
        timeout_s: float,
    ) -> int:
        """Bring tokens [first_token, num_tokens) of a request into our blocks; returns bytes read.

        Blocking. Every handle is released before returning (also on failure and timeout),
        so the destination blocks may be freed as soon as this returns or raises.
        """
        from kv_transfer import TransferOp, TransferState, apply_scatter

        agents = self._agents(leader_agent)
        rounds = self.plan(leader_agent).bind(
            src_blocks, dst_blocks, num_tokens, first_token, 0 if self.staging is None else self.staging.numel()
        )
        deadline = self.clock() + timeout_s
        moved = 0
        for rnd in rounds:
            handles = [self.transport.submit(plan, TransferOp.READ, agents[src]) for src, plan in rnd.reads]
            try:
                states = [self.transport.poll(h) for h in handles]
                while TransferState.PENDING in states and self.clock() < deadline:
                    time.sleep(POLL_S)
                    states = [self.transport.poll(h) for h in handles]
            finally:
                for h in handles:
                    self.transport.release(h)
            bad = [(h.peer, s.value) for h, s in zip(handles, states) if s is not TransferState.DONE]
            if bad:
                what = "timed out" if any(s == "PENDING" for _, s in bad) else "failed"
                raise KVTransferFailedError(
                    f"KV pull of {len(dst_blocks)} blocks into {self.agent_name} {what} (from {sorted(set(bad))})"
                )
            moved += sum(h.nbytes for h in handles)
            if rnd.scatter is not None:
                if self.staging is None:
                    raise KVTransferFailedError(f"{self.agent_name}: a staged conversion needs a staging buffer")
                apply_scatter(rnd.scatter, self.staging, self.cache)
                if self.cache.is_cuda:
                    # the kernel is asynchronous and NIXL's next READ into staging is not ordered
                    # with the stream: staging is reused (and the cache handed on) only after it ran
                    torch.cuda.current_stream(self.cache.device).synchronize()
        return moved

    def close(self) -> None:
        self.transport.close()
