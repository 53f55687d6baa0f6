"""A request id may be used again once its request has ended (router/validation.py refuses only ids in
flight), also when a worker failed that request and the router resumed it elsewhere: the cleanup abort
the router sends the failed attempt's decode worker must not leave that id refused there."""

from __future__ import annotations

import pytest
import ray

from kv_transfer.faulty import FaultPlan
from tandem_api.client import TandemClient
from tests.e2e.conftest import serve
from tests.helpers.reference import hf_greedy
from tests.helpers.tiny_models import make_tiny_hf_model
from worker_core.faults import WorkerFaultPlan

pytestmark = pytest.mark.usefixtures("ray_session")

VOCAB = 512


def test_an_id_is_reusable_after_a_retried_kv_failure(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    tiny = make_tiny_hf_model(tmp_path, "llama", vocab_size=VOCAB)
    reference = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with serve(str(tiny), ray_namespace="tandem-id-reuse", fault_injection=True,
               **{"both.block_size": 4, "prefill.replicas": 2, "decode.replicas": 1}) as s:
        d = s.cluster.handle("decode-0").actor
        client = TandemClient(s.address)
        first_ids, again_ids = list(range(10, 40)), list(range(50, 80))
        ray.get(d.set_fault_plan.remote(WorkerFaultPlan(transport=FaultPlan(fail_polls={1}))))
        try:
            first = list(client.generate(token_ids=first_ids, max_tokens=6, temperature=0.0, ignore_eos=True,
                                         request_id="same"))
        finally:
            ray.get(d.set_fault_plan.remote(WorkerFaultPlan()))
        assert first[-1].retries == 1  # the pull failed once: resumed after token 1 on the other P
        assert s.on_router(lambda svc: svc.wait_idle(30), timeout_s=40)  # its cleanup abort has landed on D
        again = list(client.generate(token_ids=again_ids, max_tokens=6, temperature=0.0, ignore_eos=True,
                                     request_id="same"))
        assert [t for r in again for t in r.token_ids] == hf_greedy(reference, again_ids, 6)
        assert again[-1].retries == 0
        s.cluster.check_pools()
