"""deploy/observability against router/metrics.py: the Grafana dashboard, the Prometheus scrape config and
the OpenTelemetry Collector config.

The dashboard may only query metrics the router exposes. The check goes both ways through
router.metrics.METRIC_NAMES: every metric an expression names is in it, and a fresh RouterMetrics
registry exposes exactly the metrics it lists. `dashboard_problems` is the checker; one test feeds
it a dashboard with a metric that does not exist, to show it can fail.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from common.contract import WorkerStatus
from planner.model import StepModel
from router.metrics import METRIC_NAMES, STEP_TERMS, RouterMetrics

REPO = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana" / "tandem-dashboard.json"
PROMETHEUS_YML = OBSERVABILITY / "prometheus.yml"
COLLECTOR_YAML = OBSERVABILITY / "otel-collector.yaml"

SUFFIXES = ("_bucket", "_sum", "_count", "_total")

# Names in PromQL that are not metrics: a function or an aggregation is followed by "(" and never
# reaches the check; these are the ones that can stand without a parenthesis after them.
PROMQL_WORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
        "atan2",
        "inf",
        "nan",
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "limitk",
        "limit_ratio",
        "rate",
        "irate",
        "increase",
        "delta",
        "idelta",
        "histogram_quantile",
        "le",
    }
)
# Everything that is not a metric reference is removed before names are picked out.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_COMMENT = re.compile(r"#[^\n]*")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")  # Grafana: $x, ${x:fmt}, [[x]]
_RANGE = re.compile(r"\[[^\]]*\]")  # [5m], [$__rate_interval], subqueries [1h:5m]
_MATCHERS = re.compile(r"\{[^}]*\}")  # {code!="OK", worker=~"..."}: label names, not metrics
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE)
# A name in metric position: not part of a longer name or a number, not a call (followed by "(").
# Typically followed by "{", "[", whitespace, ")" or the end; anything but "(" counts.
_NAME = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?!\s*\(|[\w:])")


def series_in(expr: str) -> set[str]:
    """The series names (as written: with _bucket/_sum/_count/_total) a PromQL expression selects."""
    if "__name__" in expr:
        raise ValueError(f"selecting by __name__ is not checked, name the metric: {expr}")
    s = _STRING.sub('""', expr)
    s = _COMMENT.sub(" ", s)
    s = _VARIABLE.sub(" ", s)
    s = _RANGE.sub("[]", s)
    s = _MATCHERS.sub("{}", s)
    s = _LABEL_LIST.sub(" ", s)
    return {name for name in _NAME.findall(s) if name.lower() not in PROMQL_WORDS}


def base_name(series: str) -> str:
    """A series name less the one suffix Prometheus adds (x_bucket -> x; tandem_requests_total -> tandem_requests)."""
    for suffix in SUFFIXES:
        if series.endswith(suffix) and len(series) > len(suffix):
            return series[: -len(suffix)]
    return series


def iter_panels(panels: list[dict]):
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def data_panels(dashboard: dict) -> list[dict]:
    return [p for p in iter_panels(dashboard["panels"]) if p.get("type") != "row"]


def exprs_of(dashboard: dict) -> list[tuple[dict, str]]:
    return [(p, t["expr"]) for p in data_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def dashboard_problems(dashboard: dict, metric_names: set[str] = METRIC_NAMES) -> list[str]:
    """What is wrong with a dashboard's queries against `metric_names` (empty when nothing is)."""
    known = {base_name(name) for name in metric_names}
    problems = []
    for panel, expr in exprs_of(dashboard):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        try:
            series = series_in(expr)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if not series:
            problems.append(f"{where}: no metric found in {expr!r}")
        for name in sorted(series):
            if base_name(name) not in known:
                problems.append(f"{where}: unknown metric {name!r} in {expr!r}")
    return problems


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# -- the checker itself --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket[$__rate_interval])))", {"a_seconds_bucket"}),
        ("sum by (part) (rate(x_sum[$__rate_interval])) / sum by (part) (rate(x_count[5m]))", {"x_sum", "x_count"}),
        ('sum by (code) (rate(tandem_requests_total{code!="OK"}[1m]))', {"tandem_requests_total"}),
        ('tandem_worker_up{worker=~"$worker"}', {"tandem_worker_up"}),
        ("tandem_requests_in_flight", {"tandem_requests_in_flight"}),  # at the end: no "{", "[" or ")" after it
        ("sum(g) by (worker)", {"g"}),  # label list after the aggregation
        ("max(a) without(role) > on(worker) group_left(state) b", {"a", "b"}),
        ("clamp_min(a, 0) + b offset 5m", {"a", "b"}),  # an argument before ","; a duration
        ("rate(a[${__rate_interval}]) * 1e3 and bool c", {"a", "c"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a"}),  # string arguments are not names
        ("sum(rate(a:recorded:rate5m[1h:5m]))", {"a:recorded:rate5m"}),  # recording-rule names; subquery
        ("sum(\n  rate(a_total[$__rate_interval])  # comment naming not_a_metric\n)", {"a_total"}),
    ],
)
def test_series_in_picks_out_metric_names(expr, expected):
    assert series_in(expr) == expected


def test_checker_catches_a_metric_that_does_not_exist():
    dashboard = load_dashboard()
    assert dashboard_problems(dashboard) == []
    bogus = copy.deepcopy(dashboard)
    panel = data_panels(bogus)[-1]
    panel["targets"][0]["expr"] = 'sum by (le) (rate(tandem_bogus_seconds_bucket{worker=~"$worker"}[$__rate_interval]))'
    problems = dashboard_problems(bogus)
    assert len(problems) == 1 and "tandem_bogus_seconds_bucket" in problems[0], problems
    # hidden among known ones, inside a label list or a matcher does not hide a bad name either
    panel["targets"][0]["expr"] = (
        "histogram_quantile(0.5, sum by (le) (rate(tandem_kv_transfer_seconds_bucket"
        "[$__rate_interval]))) / on() tandem_nope"
    )
    assert any("tandem_nope" in p for p in dashboard_problems(bogus))
    # a query that names no metric at all is a problem too (the checker must see something)
    panel["targets"][0]["expr"] = "vector(1)"
    assert any("no metric" in p for p in dashboard_problems(bogus))
    # and a metric that leaves METRIC_NAMES is caught in a dashboard that still uses it
    assert any("tandem_worker_up" in p for p in dashboard_problems(dashboard, METRIC_NAMES - {"tandem_worker_up"}))


# -- the router's registry against METRIC_NAMES --------------------------------------------------


def _fresh_registry_samples() -> dict[str, set[str]]:
    """{metric name as in METRIC_NAMES: its sample names} of a fresh RouterMetrics with one of everything."""
    metrics = RouterMetrics()
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
        if hasattr(child, "observe"):
            child.observe(0.01)
        elif hasattr(child, "inc"):
            child.inc()
    status = WorkerStatus(
        worker_id="d0",
        role="decode",
        health="SERVING",
        kv_blocks_total=100,
        kv_blocks_free=60,
        running=2,
        waiting=1,
        leased=0,
        node_id="n0",
        device="cpu",
        block_size=16,
        dtype="float32",
        prefix_query_tokens=10,
        prefix_hit_tokens=5,
        live_step=(0.015, 0.0015, 1e-6, 0.002, 7e-6),
        live_steps=300,
        live_decode=(4.0, 300.0),
    )
    rows = [("decode", "d0", status, True)]
    if hasattr(metrics, "set_workers"):
        metrics.set_workers(rows)
    else:  # the service installs a callable read at scrape time
        metrics.workers_source = lambda: rows
    exposed: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        samples = {s.name for s in family.samples if not s.name.endswith("_created")}
        if samples:
            exposed[family.name + "_total" if family.type == "counter" else family.name] = samples
    return exposed


def test_registry_exposes_exactly_metric_names():
    exposed = _fresh_registry_samples()
    assert set(exposed) - METRIC_NAMES == set(), "exposed but not in METRIC_NAMES"
    assert METRIC_NAMES - set(exposed) == set(), "in METRIC_NAMES but not exposed"
    known = {base_name(name) for name in METRIC_NAMES}
    assert len(known) == len(METRIC_NAMES), "two METRIC_NAMES entries differ only by a suffix"
    for name, samples in exposed.items():
        for sample in samples:
            assert base_name(sample) in known, (name, sample)


def test_worker_step_model_gauges_carry_the_live_fit_term_by_term():
    metrics = RouterMetrics()
    common = dict(role="prefill", health="SERVING", kv_blocks_total=100, kv_blocks_free=100, running=0, waiting=0)
    common |= dict(leased=0, node_id="n0", device="cpu", block_size=16, dtype="float32")
    live_step = (0.015, 0.0015, 1e-6, 0.002, 7e-6)
    live = WorkerStatus(
        worker_id="p0", **common, live_step=live_step, live_steps=300, live_busy=0.4, live_decode=(6.0, 300.5)
    )
    cold = WorkerStatus(worker_id="p1", **common)  # in its warm-up: no live model yet
    metrics.workers_source = lambda: [("prefill", "p0", live, True), ("prefill", "p1", cold, True)]
    get = metrics.registry.get_sample_value
    terms = ("base", "prefill_token", "attn_pair", "decode_row", "decode_context")
    assert STEP_TERMS == terms and len(terms) == len(StepModel().coefficients())  # the planner's coefficient order
    got = [get("tandem_worker_step_model_seconds", {"role": "prefill", "worker": "p0", "term": t}) for t in terms]
    assert got == [0.015, 0.0015, 1e-6, 0.002, 7e-6]
    assert get("tandem_worker_step_model_steps", {"role": "prefill", "worker": "p0"}) == 300
    assert get("tandem_worker_step_model_steps", {"role": "prefill", "worker": "p1"}) is None
    assert get("tandem_worker_step_model_busy_neighbours", {"role": "prefill", "worker": "p0"}) == 0.4
    assert get("tandem_worker_step_model_busy_neighbours", {"role": "prefill", "worker": "p1"}) is None
    shape = [get("tandem_worker_step_model_decode_shape", {"role": "prefill", "worker": "p0", "dim": d}) for d in "rc"]
    assert shape == [None, None]  # dims are named in full
    rows = get("tandem_worker_step_model_decode_shape", {"role": "prefill", "worker": "p0", "dim": "rows"})
    context = get("tandem_worker_step_model_decode_shape", {"role": "prefill", "worker": "p0", "dim": "context"})
    assert (rows, context) == (6.0, 300.5)
    assert get("tandem_worker_step_model_seconds", {"role": "prefill", "worker": "p1", "term": "base"}) is None


def test_dashboard_series_are_ones_the_registry_exposes():
    """Stricter than METRIC_NAMES: the suffix must fit the type (no _bucket on a gauge, no _total on a histogram)."""
    series = {s for samples in _fresh_registry_samples().values() for s in samples}
    for panel, expr in exprs_of(load_dashboard()):
        assert series_in(expr) <= series, (panel["title"], expr, series_in(expr) - series)


# -- the dashboard -------------------------------------------------------------------------------


def test_dashboard_shape():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "tandem-serving"
    assert dashboard["title"] == "Tandem serving"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    worker = variables["worker"]
    query = worker["query"]["query"] if isinstance(worker["query"], dict) else worker["query"]
    assert re.sub(r"\s", "", query) == "label_values(tandem_worker_up,worker)"
    assert worker["type"] == "query" and worker["multi"] is True and worker["includeAll"] is True

    panels = list(iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel.get("title"), panel
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        exprs = [t.get("expr") for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"{panel['title']}: needs targets, each with an expr"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_queries():
    dashboard = load_dashboard()
    used = set()
    for panel, expr in exprs_of(dashboard):
        where = (panel["title"], expr)
        used |= {base_name(s) for s in series_in(expr)}
        # every range is the rate interval Grafana derives from the scrape interval
        assert all(r == "[$__rate_interval]" for r in re.findall(r"\[[^\]]*\]", expr)), where
        # counters and histogram parts are only ever read as rates
        for name in series_in(expr):
            if name.endswith(SUFFIXES):
                assert re.search(rf"rate\(\s*{re.escape(name)}\b", expr), where
        if "histogram_quantile" in expr:
            assert re.search(r"by \(le\b", expr) and "_bucket" in expr, where
        # per-worker gauges follow the $worker selection
        for selector in re.findall(r"tandem_worker_\w+(\{[^}]*\})?", expr):
            assert 'worker=~"$worker"' in selector, where
    # every metric the router exposes is on the dashboard
    assert {base_name(n) for n in METRIC_NAMES} - used == set()


def _panel(dashboard: dict, metric: str, title_word: str) -> dict:
    found = [p for p, e in exprs_of(dashboard) if metric in e and title_word.lower() in p["title"].lower()]
    assert found, (metric, title_word)
    return found[0]


def test_stacked_panels():
    dashboard = load_dashboard()
    parts = _panel(dashboard, "tandem_ttft_part_seconds_sum", "decomposition")
    assert parts["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    expr = parts["targets"][0]["expr"]
    assert "rate(tandem_ttft_part_seconds_sum[$__rate_interval])" in expr
    assert "rate(tandem_ttft_part_seconds_count[$__rate_interval])" in expr and "by (part)" in expr
    mix = _panel(dashboard, "tandem_routing_decisions_total", "routing")
    assert mix["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert "by (prefill, reason)" in mix["targets"][0]["expr"]
    errors = _panel(dashboard, "tandem_requests_total", "error")
    assert 'code!="OK"' in errors["targets"][0]["expr"] and "by (code)" in errors["targets"][0]["expr"]


# -- Prometheus and the Collector ----------------------------------------------------------------


def test_prometheus_config():
    text = PROMETHEUS_YML.read_text()
    config = yaml.safe_load(text)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    tandem = jobs["tandem"]
    assert tandem.get("scrape_interval", config.get("global", {}).get("scrape_interval")) == "5s"
    assert tandem.get("metrics_path", "/metrics") == "/metrics"
    assert [t for c in tandem["static_configs"] for t in c["targets"]] == ["localhost:9464"]
    collector = [job for job in jobs.values() if any("localhost:8889" in c["targets"] for c in job["static_configs"])]
    assert len(collector) == 1
    assert re.search(r"#.*optional", text, re.IGNORECASE), "the collector job is marked optional"


def test_collector_config():
    config = yaml.safe_load(COLLECTOR_YAML.read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    assert "batch" in config["processors"]
    assert "spanmetrics" in config["connectors"]
    exporters = config["exporters"]
    tempo = [
        name
        for name, c in exporters.items()
        if name.split("/")[0] in ("otlp", "otlp_grpc") and c["endpoint"] == "tempo:4317"
    ]
    assert len(tempo) == 1 and exporters[tempo[0]]["tls"]["insecure"] is True
    assert exporters["prometheus"]["endpoint"] == "0.0.0.0:8889"

    pipelines = config["service"]["pipelines"]
    traces, metrics = pipelines["traces"], pipelines["metrics"]
    assert traces["receivers"] == ["otlp"] and "batch" in traces["processors"]
    assert set(traces["exporters"]) == {tempo[0], "spanmetrics"}
    assert metrics["receivers"] == ["spanmetrics"] and metrics["exporters"] == ["prometheus"]
    # what the collector checks at start: every component a pipeline names is defined, every defined one
    # is used, and a connector is an exporter in one pipeline and a receiver in another
    connectors = set(config["connectors"])
    for kind in ("receivers", "processors", "exporters"):
        defined = set(config[kind]) | (connectors if kind != "processors" else set())
        named = {c for p in pipelines.values() for c in p.get(kind, [])}
        assert named <= defined, (kind, named - defined)
        assert set(config[kind]) <= named, (kind, set(config[kind]) - named)
    for connector in connectors:
        assert any(connector in p.get("exporters", []) for p in pipelines.values())
        assert any(connector in p.get("receivers", []) for p in pipelines.values())
