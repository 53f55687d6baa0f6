"""`tandem bench`: a serving benchmark that judges a server by goodput under latency SLOs.

Client side only (no torch, no Ray): `cli` (flags), `datasets` (seeded workloads), `arrivals`
(Poisson / gamma / trace times), `targets` (tandem.v1 gRPC, OpenAI-compatible HTTP), `runner`
(open-loop load, max-rate search), `metrics` (per-request records, the pinned summary), `report`
(table, summary.json, requests.jsonl, plots). docs/BENCHMARKS.md has the definitions and results.
"""
