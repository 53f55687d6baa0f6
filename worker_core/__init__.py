"""worker_core: what the prefill and decode workers share, below their Ray actors.

It owns one worker's machinery, whatever its role: the EngineCore on its own thread and
the named calls the roles make into it (`engine_loop.AsyncEngine`), the host that
composes engine, KV transport, KV event publisher, tracing and fault points
(`host.WorkerHost`), the Ray-facing methods both roles answer alike (`actor.WorkerActor`),
the ranks of a tp x pp worker (`ranks`, `rank_kv`), the per-request server span
(`spans.RequestSpan`), the worker's settings (`settings.WorkerSettings`), and borrowing
idle cores (`core_share`). The roles themselves (a request's life cycle) live in
`prefill_worker/` and `decode_worker/`. Read worker_core/README.md first.

Importing this package imports nothing. `ranks` and `host` import ray (so does `actor`,
through `host`); `engine_loop`, `spans`, `settings`, `faults`, `rank_kv`, `kv_publisher`
and `core_share` do not.
"""

TANDEM_PACKAGE = "tandem-serve"  # deploy/import_names.py: this import name is Tandem's
