"""Seeded workloads for `tandem bench`: what each request asks, and how long its answer is.

Datasets (`--dataset`):

- `random`: prompt and output lengths drawn from lognormal distributions with medians
  `--input-len` / `--output-len` and log-space standard deviation `--spread` (0: exact).
- `shared-prefix`: `--num-groups` long system prompts of `--prefix-len` tokens, each shared by many
  questions (lengths as `random`); the groups' questions are interleaved in shuffled order.
- `multi-turn`: conversations of `--turns` turns; each turn's prompt is the whole conversation so
  far (earlier user messages and the server's actual replies) plus a new user message.
- `trace`: `--trace-file` JSONL, one request a line:
  `{"timestamp_s": 0.5, "input_tokens": 812, "output_tokens": 64, "prefix_group": 3, "prefix_tokens": 512}`
  (`prefix_group` and `prefix_tokens` optional: members of a group share their first `prefix_tokens`).

`--common-prefix-len N` starts every request of any dataset with the same N tokens, as a chat
template's system prompt does (the same at every rate of a sweep).

Prompts are real text: windows of an English corpus shipped with the package, each opened by a few
words drawn at random from its vocabulary so that no two prompts share a first block by accident
(the corpus is short: windows alone collide), tokenized with the served model's tokenizer when the
client has one (`--tokenizer`, or the model path the server
reports when that file exists here), so prompt lengths are exact token counts. Without a
tokenizer, token-id prompts are random ids from the server's vocabulary (gRPC reports its size)
and text prompts are corpus words, about 1.3 tokens each (the server's usage then says how many).
Same seed, same prompts and lengths.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

DATASETS = ("random", "shared-prefix", "multi-turn", "trace")
TOKENS_PER_WORD = 1.3  # English words -> BPE tokens, for prompts made without a tokenizer
OPENING_WORDS = 8  # random vocabulary words that open every prompt: distinct first blocks
RANDOM_ID_LOW = 100  # random token ids start here: clear of the special tokens at the vocabulary's start


class DatasetError(ValueError):
    """Bad dataset parameters or a malformed trace line; the message names the flag or line."""


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...] | None  # exact token ids; None when neither a tokenizer nor a vocabulary is known
    text: str

    def __add__(self, other: Prompt) -> Prompt:
        ids = self.ids + other.ids if self.ids is not None and other.ids is not None else None
        return Prompt(ids, f"{self.text}\n\n{other.text}" if self.text else other.text)

    @property
    def n_tokens(self) -> int:
        return len(self.ids) if self.ids is not None else round(len(self.text.split()) * TOKENS_PER_WORD)


class PromptMaker:
    """Prompts of n tokens from the shipped corpus (see the module docstring)."""

    def __init__(self, tokenizer: TextTokenizer | None = None, vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        corpus = resources.files("tandem_api.bench").joinpath("corpus.txt").read_text(encoding="utf-8")
        self.words = corpus.split()
        self.vocabulary = sorted(set(self.words))
        self.corpus_ids = tokenizer.encode(corpus, add_special_tokens=False) if tokenizer is not None else None
        if vocab_size is not None and vocab_size <= RANDOM_ID_LOW + 1 and tokenizer is None:
            self.low = 0
        else:
            self.low = RANDOM_ID_LOW

    @property
    def exact(self) -> bool:
        return self.corpus_ids is not None

    def make(self, n: int, rng: random.Random) -> Prompt:
        opening = [rng.choice(self.vocabulary) for _ in range(OPENING_WORDS)]
        tok = self.tokenizer
        if self.corpus_ids is not None and tok is not None:  # exact: the corpus was tokenized with it
            head = tok.encode(" ".join(opening) + ".", add_special_tokens=False)[:n]
            start = rng.randrange(len(self.corpus_ids))
            exact = tuple(head) + tuple(
                self.corpus_ids[(start + i) % len(self.corpus_ids)] for i in range(n - len(head))
            )
            return Prompt(exact, tok.decode(exact))
        ids: tuple[int, ...] | None = None
        if self.vocab_size is not None:
            ids = tuple(rng.randrange(self.low, self.vocab_size) for _ in range(n))
        n_words = max(1, round(n / TOKENS_PER_WORD))
        start = rng.randrange(len(self.words))
        words = opening + [self.words[(start + i) % len(self.words)] for i in range(max(0, n_words - OPENING_WORDS))]
        return Prompt(ids, " ".join(words[:n_words]))

    def head(self, prompt: Prompt, n: int) -> Prompt:
        """The first n tokens of `prompt` (its first n / 1.3 words when it has no ids)."""
        words = " ".join(prompt.text.split()[: max(1, round(n / TOKENS_PER_WORD))])
        if prompt.ids is None:
            return Prompt(None, words)
        ids = prompt.ids[:n]
        return Prompt(ids, self.tokenizer.decode(ids) if self.tokenizer is not None else words)


@dataclass
class Turn:
    user: Prompt
    output_tokens: int


@dataclass
class Unit:
    """What the arrival process releases at once: one request, or one conversation (turns in order)."""

    index: int
    turns: list[Turn]
    system: Prompt | None = None  # shared-prefix: the group's system prompt (sent before turn 1)
    prefix_group: int | None = None

    @property
    def requests(self) -> int:
        return len(self.turns)


@dataclass
class Dataset:
    name: str
    params: dict[str, Any]
    units: Iterator[Unit]
    requests_per_unit: int = 1
    timestamps: list[float] | None = None  # trace: each unit's arrival in the trace
    size: int | None = None  # units available (trace files are finite)


@dataclass
class LengthDist:
    median: int
    spread: float
    cap: int | None = None

    def draw(self, rng: random.Random) -> int:
        n = self.median if self.spread == 0 else round(self.median * math.exp(self.spread * rng.gauss(0.0, 1.0)))
        upper = 4 * self.median if self.spread > 0 else self.median
        if self.cap is not None:
            upper = min(upper, self.cap)
        return max(1, min(n, upper))


@dataclass
class DatasetOptions:
    input_len: int = 256
    output_len: int = 64
    spread: float = 0.5
    num_groups: int = 8
    prefix_len: int = 512
    turns: int = 4
    trace_file: str | None = None
    common_prefix_len: int = 0  # tokens every request starts with (a chat template's system prompt)
    max_model_len: int | None = None  # the server's, when known: prompts + outputs are kept inside it
    num_requests: int | None = None  # shuffles shared-prefix groups over this many (None: rounds of 4)
    extra: dict[str, Any] = field(default_factory=dict)


def build_dataset(name: str, options: DatasetOptions, prompts: PromptMaker, seed: int, salt: int = 0) -> Dataset:
    """The named dataset (see `_build`), every request starting with --common-prefix-len shared tokens."""
    dataset = _build(name, options, prompts, seed, salt)
    if options.common_prefix_len < 0:
        raise DatasetError(f"--common-prefix-len must be >= 0, got {options.common_prefix_len}")
    if options.common_prefix_len:
        common = prompts.make(options.common_prefix_len, random.Random(f"{seed}/common"))
        dataset.units = _with_common(dataset.units, common)
        dataset.params["common_prefix_len"] = options.common_prefix_len
    return dataset


def _with_common(units: Iterator[Unit], common: Prompt) -> Iterator[Unit]:
    for unit in units:
        unit.system = common if unit.system is None else common + unit.system
        yield unit


def _build(name: str, options: DatasetOptions, prompts: PromptMaker, seed: int, salt: int = 0) -> Dataset:
    """The named dataset; DatasetError for an unknown name or bad parameters.

    `seed` fixes lengths, groups and order; `salt` only the prompts' content. A sweep gives each rate its
    own salt: the same shapes at every rate, but no rate finds the previous rate's prompts in a prefix cache.
    """
    o = options
    if name not in DATASETS:
        raise DatasetError(f"--dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    for flag, value in (("--input-len", o.input_len), ("--output-len", o.output_len)):
        if value < 1:
            raise DatasetError(f"{flag} must be at least 1, got {value}")
    if o.spread < 0 or not math.isfinite(o.spread):
        raise DatasetError(f"--spread must be >= 0 (0: exact lengths), got {o.spread}")
    rng = random.Random(seed)
    content = random.Random(f"{seed}/content/{salt}")
    out = LengthDist(o.output_len, o.spread, cap=None)
    base: dict[str, Any] = {"seed": seed, "salt": salt, "exact_token_lengths": prompts.exact}
    if name == "random":
        inp = LengthDist(o.input_len, o.spread, _input_cap(o, o.output_len))
        params = {**base, "input_len": o.input_len, "output_len": o.output_len, "spread": o.spread}
        return Dataset(name, params, _random_units(rng, content, prompts, inp, out))
    if name == "shared-prefix":
        if o.num_groups < 1 or o.prefix_len < 1:
            raise DatasetError(f"--num-groups and --prefix-len must be at least 1, got {o.num_groups}, {o.prefix_len}")
        inp = LengthDist(o.input_len, o.spread, _input_cap(o, o.output_len, used=o.prefix_len))
        params = {
            **base,
            "num_groups": o.num_groups,
            "prefix_len": o.prefix_len,
            "input_len": o.input_len,
            "output_len": o.output_len,
            "spread": o.spread,
        }
        return Dataset(name, params, _shared_prefix_units(rng, content, prompts, o, inp, out))
    if name == "multi-turn":
        if o.turns < 1:
            raise DatasetError(f"--turns must be at least 1, got {o.turns}")
        inp = LengthDist(o.input_len, o.spread, None)
        params = {**base, "turns": o.turns, "input_len": o.input_len, "output_len": o.output_len, "spread": o.spread}
        return Dataset(
            name, params, _multi_turn_units(rng, content, prompts, o.turns, inp, out), requests_per_unit=o.turns
        )
    if not o.trace_file:
        raise DatasetError("--dataset trace needs --trace-file FILE (JSONL: timestamp_s, input_tokens, output_tokens)")
    entries = read_trace(o.trace_file)
    params = {**base, "trace_file": str(o.trace_file), "trace_requests": len(entries)}
    return Dataset(
        name,
        params,
        _trace_units(entries, prompts, f"{seed}/content/{salt}"),
        timestamps=[e.timestamp_s for e in entries],
        size=len(entries),
    )


def _input_cap(o: DatasetOptions, output_median: int, used: int = 0) -> int | None:
    if o.max_model_len is None:
        return None
    return max(1, o.max_model_len - used - 4 * output_median)


def _random_units(
    rng: random.Random, content: random.Random, prompts: PromptMaker, inp: LengthDist, out: LengthDist
) -> Iterator[Unit]:
    index = 0
    while True:
        n_in, n_out = inp.draw(rng), out.draw(rng)
        yield Unit(index, [Turn(prompts.make(n_in, content), n_out)])
        index += 1


def _shared_prefix_units(
    rng: random.Random,
    content: random.Random,
    prompts: PromptMaker,
    o: DatasetOptions,
    inp: LengthDist,
    out: LengthDist,
) -> Iterator[Unit]:
    systems = [prompts.make(o.prefix_len, content) for _ in range(o.num_groups)]
    per_round = math.ceil(o.num_requests / o.num_groups) if o.num_requests else 4
    index = 0
    while True:
        order = [g for g in range(o.num_groups) for _ in range(per_round)]
        rng.shuffle(order)
        for group in order:
            n_in, n_out = inp.draw(rng), out.draw(rng)
            yield Unit(index, [Turn(prompts.make(n_in, content), n_out)], system=systems[group], prefix_group=group)
            index += 1


def _multi_turn_units(
    rng: random.Random, content: random.Random, prompts: PromptMaker, turns: int, inp: LengthDist, out: LengthDist
) -> Iterator[Unit]:
    index = 0
    while True:
        yield Unit(index, [Turn(prompts.make(inp.draw(rng), content), out.draw(rng)) for _ in range(turns)])
        index += 1


# -- traces ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceEntry:
    timestamp_s: float
    input_tokens: int
    output_tokens: int
    prefix_group: int | None = None
    prefix_tokens: int = 0


def read_trace(path: str | Path) -> list[TraceEntry]:
    """Parse a trace file (pinned format, see the module docstring); DatasetError naming the line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DatasetError(f"--trace-file: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"--trace-file {path}: not UTF-8 text ({e.reason})") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--trace-file {path} line {number}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(doc, dict):
            raise DatasetError(
                f'{where}: expected an object like {{"timestamp_s": 0.0, "input_tokens": 128, "output_tokens": 32}}'
            )
        entries.append(_trace_entry(doc, where))
    if not entries:
        raise DatasetError(f"--trace-file {path}: no requests in it")
    entries.sort(key=lambda e: e.timestamp_s)  # stable: equal timestamps keep the file's order
    return entries


def _trace_entry(doc: dict[str, Any], where: str) -> TraceEntry:
    def number(key: str, kind: type, low: float, required: bool = True) -> Any:
        if key not in doc:
            if required:
                raise DatasetError(f"{where}: missing {key!r}")
            return None
        value = doc[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok = ok and float(value).is_integer()
        if not ok or not math.isfinite(value) or value < low:
            what = "an integer" if kind is int else "a number"
            raise DatasetError(f"{where}: {key} must be {what} >= {low:g}, got {value!r}")
        return kind(value)

    entry = TraceEntry(
        number("timestamp_s", float, 0),
        number("input_tokens", int, 1),
        number("output_tokens", int, 1),
        number("prefix_group", int, 0, required=False),
        number("prefix_tokens", int, 0, required=False) or 0,
    )
    if entry.prefix_tokens > entry.input_tokens:
        raise DatasetError(f"{where}: prefix_tokens {entry.prefix_tokens} > input_tokens {entry.input_tokens}")
    if entry.prefix_tokens and entry.prefix_group is None:
        raise DatasetError(f"{where}: prefix_tokens without prefix_group (which requests share the prefix?)")
    return entry


def _trace_units(entries: list[TraceEntry], prompts: PromptMaker, content_seed: str) -> Iterator[Unit]:
    rng = random.Random(content_seed)
    longest: dict[int, int] = {}
    for e in entries:
        if e.prefix_group is not None:
            longest[e.prefix_group] = max(longest.get(e.prefix_group, 0), e.prefix_tokens)
    groups = {g: prompts.make(n, random.Random(f"{content_seed}/group/{g}")) for g, n in longest.items() if n > 0}
    for index, e in enumerate(entries):
        if e.prefix_group is not None and e.prefix_tokens > 0:
            cut = prompts.head(groups[e.prefix_group], e.prefix_tokens)
            rest = e.input_tokens - e.prefix_tokens
            user = cut + prompts.make(rest, rng) if rest > 0 else cut
            yield Unit(index, [Turn(user, e.output_tokens)], prefix_group=e.prefix_group)
        else:
            yield Unit(index, [Turn(prompts.make(e.input_tokens, rng), e.output_tokens)], prefix_group=e.prefix_group)
