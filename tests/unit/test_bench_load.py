"""`tandem bench` load generation: arrival processes, datasets, the max-rate search and the runner's
stop rules, concurrency cap, conversations and interruption (the runner against an in-process target
that answers at once; the real targets are exercised in tests/e2e/test_bench.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import statistics

import pytest

from tandem_api.bench.arrivals import gamma_arrivals, parse_rates, trace_times
from tandem_api.bench.datasets import (
    DatasetError,
    DatasetOptions,
    PromptMaker,
    build_dataset,
    read_trace,
)
from tandem_api.bench.metrics import OK
from tandem_api.bench.runner import INTERRUPTED, LoadConfig, find_max_rate, run_load
from tandem_api.bench.targets import Reply, TargetError, WireRequest, split_openai_url


def gaps(rate: float, burstiness: float, seed: int, n: int = 20000) -> list[float]:
    times = list(itertools.islice(gamma_arrivals(rate, burstiness, seed), n + 1))
    assert times[0] == 0.0
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_arrivals_have_the_mean_rate_and_the_burstiness_asked_for(burstiness):
    g = gaps(2.0, burstiness, seed=1)
    assert statistics.fmean(g) == pytest.approx(0.5, rel=0.05)
    cv = statistics.pstdev(g) / statistics.fmean(g)  # a gamma's coefficient of variation is 1/sqrt(shape)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_arrivals_are_seeded_and_inf_is_all_at_once():
    assert gaps(1.0, 1.0, 7, 50) == gaps(1.0, 1.0, 7, 50)
    assert gaps(1.0, 1.0, 7, 50) != gaps(1.0, 1.0, 8, 50)
    assert list(itertools.islice(gamma_arrivals(math.inf), 5)) == [0.0] * 5
    with pytest.raises(ValueError, match="burstiness"):
        next(gamma_arrivals(1.0, 0.0))


def test_rates_and_trace_times():
    assert parse_rates("0.2, 1,inf") == [0.2, 1.0, math.inf]
    for bad in ("fast", "0", "-1", "nan"):
        with pytest.raises(ValueError, match="--request-rate"):
            parse_rates(bad)
    assert trace_times([10.0, 11.0, 14.0]) == [0.0, 1.0, 4.0]
    assert trace_times([10.0, 11.0, 14.0], rate=1.0) == pytest.approx([0.0, 0.5, 2.0])  # 2 gaps in 2 s
    assert trace_times([10.0, 11.0, 14.0], rate=math.inf) == [0.0, 0.0, 0.0]


# -- datasets ------------------------------------------------------------------------------------


class WordTokenizer:
    """One token per whitespace-separated word (ids from a growing table): lengths are easy to check."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out = []
        for w in text.split():
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
            out.append(self.ids[w])
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(self.words[i] for i in ids)


def take(dataset, n):
    return list(itertools.islice(dataset.units, n))


def test_random_dataset_lengths_follow_the_medians_and_spread_zero_is_exact():
    prompts = PromptMaker(WordTokenizer())
    exact = take(build_dataset("random", DatasetOptions(input_len=40, output_len=9, spread=0), prompts, 0), 20)
    assert {len(u.turns[0].user.ids) for u in exact} == {40}
    assert {u.turns[0].output_tokens for u in exact} == {9}
    spread = take(build_dataset("random", DatasetOptions(input_len=100, output_len=20, spread=0.5), prompts, 0), 2000)
    lengths = [len(u.turns[0].user.ids) for u in spread]
    assert statistics.median(lengths) == pytest.approx(100, rel=0.08)
    assert min(lengths) >= 1 and max(lengths) <= 400 and len(set(lengths)) > 50
    assert statistics.median(u.turns[0].output_tokens for u in spread) == pytest.approx(20, rel=0.1)
    # prompts are windows of the real text, decoded and re-encoded to the same ids
    u = spread[0].turns[0].user
    assert prompts.tokenizer.encode(u.text) == list(u.ids)


def test_datasets_are_deterministic_and_the_salt_changes_only_content():
    prompts = PromptMaker(WordTokenizer())
    opts = DatasetOptions(input_len=30, output_len=8)
    first = take(build_dataset("random", opts, prompts, 3), 30)
    again = take(build_dataset("random", opts, prompts, 3), 30)
    salted = take(build_dataset("random", opts, prompts, 3, salt=1), 30)
    assert [u.turns[0].user for u in first] == [u.turns[0].user for u in again]
    assert [len(u.turns[0].user.ids) for u in first] == [len(u.turns[0].user.ids) for u in salted]
    assert [u.turns[0].output_tokens for u in first] == [u.turns[0].output_tokens for u in salted]
    assert [u.turns[0].user.ids for u in first] != [u.turns[0].user.ids for u in salted]


def test_shared_prefix_groups_share_their_system_prompt_in_shuffled_order():
    prompts = PromptMaker(WordTokenizer())
    opts = DatasetOptions(num_groups=4, prefix_len=50, input_len=10, output_len=5, num_requests=40)
    units = take(build_dataset("shared-prefix", opts, prompts, 0), 40)
    groups = [u.prefix_group for u in units]
    assert sorted(set(groups)) == [0, 1, 2, 3] and all(groups.count(g) == 10 for g in range(4))
    assert groups != sorted(groups)  # interleaved, not one group after another
    systems = {}
    for u in units:
        assert len(u.system.ids) == 50
        systems.setdefault(u.prefix_group, u.system.ids)
        assert systems[u.prefix_group] == u.system.ids
    assert len(set(systems.values())) == 4


def test_multi_turn_and_unknown_or_bad_parameters():
    prompts = PromptMaker(WordTokenizer())
    d = build_dataset("multi-turn", DatasetOptions(turns=3, input_len=12), prompts, 0)
    assert d.requests_per_unit == 3 and all(len(u.turns) == 3 for u in take(d, 5))
    with pytest.raises(DatasetError, match="--dataset: unknown dataset 'sharegpt'"):
        build_dataset("sharegpt", DatasetOptions(), prompts, 0)
    with pytest.raises(DatasetError, match="--input-len"):
        build_dataset("random", DatasetOptions(input_len=0), prompts, 0)
    with pytest.raises(DatasetError, match="--trace-file"):
        build_dataset("trace", DatasetOptions(), prompts, 0)


def test_prompts_without_a_tokenizer():
    ids_only = PromptMaker(None, vocab_size=512).make(30, random.Random(0))
    assert len(ids_only.ids) == 30 and all(100 <= i < 512 for i in ids_only.ids)
    words = PromptMaker(None).make(130, random.Random(0))
    assert words.ids is None and len(words.text.split()) == 100  # ~1.3 tokens per word


def write_trace(tmp_path, lines):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_trace_requests_have_their_lengths_times_and_shared_prefixes(tmp_path):
    path = write_trace(
        tmp_path,
        [
            {"timestamp_s": 2.0, "input_tokens": 30, "output_tokens": 4, "prefix_group": 1, "prefix_tokens": 20},
            {"timestamp_s": 1.0, "input_tokens": 25, "output_tokens": 3, "prefix_group": 1, "prefix_tokens": 12},
            "",
            {"timestamp_s": 3.5, "input_tokens": 7, "output_tokens": 2},
        ],
    )
    d = build_dataset("trace", DatasetOptions(trace_file=str(path)), PromptMaker(WordTokenizer()), 0)
    assert d.timestamps == [1.0, 2.0, 3.5] and d.size == 3  # sorted by time
    units = list(d.units)
    assert [len(u.turns[0].user.ids) for u in units] == [25, 30, 7]
    assert [u.turns[0].output_tokens for u in units] == [3, 4, 2]
    a, b = units[0].turns[0].user.ids, units[1].turns[0].user.ids
    assert a[:12] == b[:12]  # the group's members share min(prefix_tokens) tokens


@pytest.mark.parametrize(
    "line, words",
    [
        ("{not json", "line 2: not JSON"),
        ('{"timestamp_s": 1, "input_tokens": 5}', "line 2: missing 'output_tokens'"),
        ('{"timestamp_s": -1, "input_tokens": 5, "output_tokens": 1}', "line 2: timestamp_s must be a number >= 0"),
        ('{"timestamp_s": 1, "input_tokens": 2.5, "output_tokens": 1}', "line 2: input_tokens must be an integer"),
        ('{"timestamp_s": 1, "input_tokens": 5, "output_tokens": 1, "prefix_tokens": 3}', "prefix_tokens without"),
        (
            '{"timestamp_s": 1, "input_tokens": 5, "output_tokens": 1, "prefix_group": 0, "prefix_tokens": 9}',
            "prefix_tokens 9 > input_tokens 5",
        ),
        ("[1, 2]", "line 2: expected an object"),
    ],
)
def test_a_malformed_trace_line_is_named(tmp_path, line, words):
    path = write_trace(tmp_path, [{"timestamp_s": 0, "input_tokens": 3, "output_tokens": 1}, line])
    with pytest.raises(DatasetError, match=words):
        read_trace(path)
    with pytest.raises(DatasetError, match="cannot read"):
        read_trace(tmp_path / "missing.jsonl")


# -- max-rate search -------------------------------------------------------------------------------


def attainment_curve(knee: float):
    """A synthetic server: every request meets the SLO up to `knee` req/s, half of them above."""
    calls = []

    async def evaluate(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= knee else 0.5

    return evaluate, calls


@pytest.mark.parametrize("start", [0.1, 1.0, 50.0])
def test_search_brackets_the_knee_within_the_tolerance(start):
    evaluate, calls = attainment_curve(3.3)
    found = asyncio.run(find_max_rate(evaluate, start=start, attainment=0.9, rel_tol=0.05, max_probes=20))
    assert found.max_rate <= 3.3 < found.upper
    assert found.upper / found.max_rate <= 1.05
    assert [r for r, _ in found.probes] == calls


def test_search_reports_zero_when_no_rate_passes_and_respects_the_probe_budget():
    evaluate, calls = attainment_curve(0.0)
    found = asyncio.run(find_max_rate(evaluate, start=1.0, max_probes=4))
    assert found.max_rate == 0.0 and len(calls) == 4
    evaluate, calls = attainment_curve(1e9)
    found = asyncio.run(find_max_rate(evaluate, start=1.0, max_probes=3))
    assert found.max_rate == 4.0 and found.upper is None  # 1, 2, 4: never missed within the budget
    with pytest.raises(ValueError, match="--attainment"):
        asyncio.run(find_max_rate(evaluate, attainment=1.5))


# -- the runner ------------------------------------------------------------------------------------


class InstantTarget:
    """Answers each request with its max_tokens tokens (ids 1000+), yielding to the loop between chunks."""

    kind, description = "test", "in-process"

    def __init__(self, fail_every: int = 0, hold: asyncio.Event | None = None) -> None:
        self.requests: list[WireRequest] = []
        self.in_flight = self.max_in_flight = 0
        self.fail_every, self.hold = fail_every, hold
        self.started = asyncio.Event()

    async def open(self):
        return {}

    async def close(self):
        pass

    async def send(self, request, record, clock):
        self.requests.append(request)
        record.send_s = clock()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.started.set()
        try:
            if self.hold is not None:
                await self.hold.wait()
            if self.fail_every and len(self.requests) % self.fail_every == 0:
                record.status, record.error = "RESOURCE_EXHAUSTED", "full"
                return Reply(None, "")
            ids = [1000 + len(self.requests) * 10 + k for k in range(request.max_tokens)]
            for _ in ids:
                await asyncio.sleep(0)
                record.chunks.append((clock(), 1))
            record.status = OK
            return Reply(ids, "reply")
        finally:
            self.in_flight -= 1


def dataset(name="random", **kw):
    opts = DatasetOptions(**{"input_len": 8, "output_len": 3, "spread": 0, **kw})
    return build_dataset(name, opts, PromptMaker(WordTokenizer()), 0)


def test_runner_sends_num_requests_under_the_concurrency_cap_and_counts_failures():
    target = InstantTarget(fail_every=4)
    cfg = LoadConfig(rate=math.inf, max_concurrency=3, num_requests=10, ignore_eos=True)
    result = asyncio.run(run_load(target, dataset(), cfg))
    assert len(result.records) == 10 and len(target.requests) == 10
    assert target.max_in_flight == 3
    assert [r.status for r in result.records].count("RESOURCE_EXHAUSTED") == 2
    assert all(r.n_output == 3 for r in result.records if r.ok)
    assert all(req.max_tokens == 3 and req.ignore_eos and len(req.ids) == 8 for req in target.requests)
    assert len({r.request_id for r in result.records}) == 10 and not result.interrupted


def test_a_conversation_sends_each_turn_with_the_replies_so_far():
    target = InstantTarget()
    cfg = LoadConfig(rate=math.inf, num_requests=3)
    result = asyncio.run(run_load(target, dataset("multi-turn", turns=3), cfg))
    assert [(r.conversation, r.turn) for r in result.records] == [(0, 0), (0, 1), (0, 2)]
    first, second, third = target.requests
    reply1 = [1010, 1011, 1012]
    reply2 = [1020, 1021, 1022]
    assert list(second.ids[:8]) == list(first.ids) and list(second.ids[8:11]) == reply1
    assert list(third.ids[:19]) == list(second.ids) and list(third.ids[19:22]) == reply2
    assert [m["role"] for m in third.messages] == ["user", "assistant", "user", "assistant", "user"]


def test_the_duration_stops_new_requests_and_the_stop_event_interrupts_those_in_flight():
    async def scenario():
        target = InstantTarget(hold=asyncio.Event())  # never released: requests stay in flight
        stop = asyncio.Event()
        task = asyncio.create_task(run_load(target, dataset(), LoadConfig(rate=math.inf, num_requests=5), stop=stop))
        await target.started.wait()
        while len(target.requests) < 5:
            await asyncio.sleep(0)
        stop.set()
        return await task

    result = asyncio.run(scenario())
    assert result.interrupted and len(result.records) == 5
    assert {r.status for r in result.records} == {INTERRUPTED}
    # a duration shorter than the first gap: only the request at t = 0 is sent
    result = asyncio.run(run_load(InstantTarget(), dataset(), LoadConfig(rate=1e-6, duration_s=0.5, seed=1)))
    assert len(result.records) == 1 and result.records[0].ok


def test_openai_urls():
    assert split_openai_url("http://h:8000", None) == ("http://h:8000/v1", "completions")
    assert split_openai_url("http://h:8000/v1/chat/completions", None) == ("http://h:8000/v1", "chat")
    assert split_openai_url("https://h/v1/", "chat") == ("https://h/v1", "chat")
    with pytest.raises(TargetError, match="contradicts"):
        split_openai_url("http://h/v1/completions", "chat")
    with pytest.raises(TargetError, match="--openai-url"):
        split_openai_url("h:8000", None)


def test_a_common_prefix_starts_every_request_at_every_rate():
    prompts = PromptMaker(WordTokenizer())
    opts = DatasetOptions(input_len=10, spread=0, common_prefix_len=6)
    runs = [take(build_dataset("random", opts, prompts, 0, salt=salt), 3) for salt in (0, 1)]
    commons = {u.system.ids for units in runs for u in units}
    assert len(commons) == 1 and len(next(iter(commons))) == 6
    shared = take(
        build_dataset("shared-prefix", DatasetOptions(num_groups=2, prefix_len=5, common_prefix_len=6), prompts, 0), 4
    )
    assert all(len(u.system.ids) == 11 and u.system.ids[:6] == next(iter(commons)) for u in shared)


def test_prompts_do_not_share_a_first_block_by_accident():
    prompts = PromptMaker(WordTokenizer())
    rng = random.Random(0)
    firsts = [prompts.make(64, rng).ids[:16] for _ in range(500)]  # the corpus alone has ~800 window starts
    assert len(set(firsts)) == 500
