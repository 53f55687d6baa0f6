"""Property-based fuzz of the public gRPC API: no request crashes a worker or hangs.

Hypothesis builds raw `GenerateRequest`s (huge, empty, negative, NaN/inf floats, int32
and int64 extremes, out-of-vocabulary ids, unknown chat roles, non-printable and
duplicate request ids, huge and many stop strings) and raw bytes (garbage, truncated
messages, invalid UTF-8 in string fields, unknown fields, merged messages) and sends
them through a generic channel, so values the typed client would refuse still reach
the served cluster. Every call runs under a deadline and must end in one of:

    OK                 a stream whose last response (and only it) has a finish reason
    INVALID_ARGUMENT   a one-line message, never a traceback

DEADLINE_EXCEEDED (a hang), INTERNAL / UNKNOWN (a crash), UNAVAILABLE (a dead worker)
fail the example. After the fuzz every pool is idle and intact (`check_pools`) and a
plain greedy request returns the same tokens as before it (the workers survived).

GenerateRequest has no enum field (FinishReason only appears in responses), so the
"unknown enum values" of the issue become out-of-range values of every other field
and a bool sent as a raw varint other than 0/1.

Bytes that do not parse as a GenerateRequest (garbage, truncation, invalid UTF-8 in a
string field) are INVALID_ARGUMENT too: the router parses requests leniently and says
which message it expected (this fuzz first found them answered UNKNOWN by grpc.aio's
own deserializer, with the DecodeError's text).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tandem_api.client import TandemClient
from tandem_api.v1 import generation_pb2 as pb
from tests.e2e.conftest import serve

pytestmark = pytest.mark.usefixtures("ray_session")

VOCAB = 512
CONTEXT = 2048  # the tiny llama's max_position_embeddings
MAX_NEW = 8  # max_tokens of every request that should run (keeps each example fast)
DEFAULT_MAX_TOKENS = 16  # SamplingParams' default when max_tokens is unset
DEADLINE_S = 30.0
METHOD = "/tandem.v1.Generation/Generate"
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
F32_MAX = 3.4028234663852886e38
F32_TINY = 1.401298464324817e-45  # smallest positive float32 (subnormal)
SENTINEL = "Zq9SENTINEL9qZ"  # replaced by invalid UTF-8 of the same length in the serialized bytes
BASELINE_IDS = list(range(3, 19))

FUZZ = settings(
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the served cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    with serve(str(tiny_dir), ray_namespace="tandem-fuzz", **{"both.block_size": 4}) as s:
        yield s


@pytest.fixture(scope="module")
def baseline(cluster):
    """Greedy tokens of one plain request before any fuzz (the survival check compares with them)."""
    _, tokens, last = TandemClient(cluster.address).complete(
        token_ids=BASELINE_IDS, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, timeout=DEADLINE_S
    )
    assert len(tokens) == MAX_NEW and last.finish_reason == pb.FINISH_REASON_LENGTH
    return tokens


@pytest.fixture(scope="module")
def send(cluster, baseline):
    """`send(raw bytes) -> Outcome` over a generic channel (no client-side serialization or checks)."""
    with grpc.insecure_channel(cluster.address) as channel:
        call = channel.unary_stream(
            METHOD, request_serializer=lambda b: b, response_deserializer=pb.GenerateResponse.FromString
        )

        def send(raw: bytes) -> Outcome:
            started = time.monotonic()
            try:
                responses = list(call(raw, timeout=DEADLINE_S))
            except grpc.RpcError as exc:
                return Outcome(exc.code(), exc.details() or "", [], time.monotonic() - started)
            return Outcome(grpc.StatusCode.OK, "", responses, time.monotonic() - started)

        yield send


# -- judging one outcome --------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list = field(default_factory=list)
    elapsed_s: float = 0.0


def _event(outcome: Outcome) -> None:
    """The outcome's kind in `--hypothesis-show-statistics` (what the fuzz really reached)."""
    if outcome.code == grpc.StatusCode.OK:
        last = outcome.responses[-1] if outcome.responses else None
        event(f"OK {pb.FinishReason.Name(last.finish_reason) if last else 'no response'}")
    else:
        event(f"{outcome.code.name}: {' '.join(outcome.details.split()[:3])}")


def judge(outcome: Outcome, *, must_succeed: bool = False, max_tokens: int | None = None) -> None:
    """AssertionError unless `outcome` is a finished stream or INVALID_ARGUMENT with a clean message.

    RESOURCE_EXHAUSTED passes only when the server says it is full (never expected here: the fuzz is
    sequential); anything else (DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, UNAVAILABLE, ...) is a hang or a
    crash."""
    code, details = outcome.code, outcome.details
    assert "Traceback" not in details, f"{code.name}: a traceback reached the client: {details[:500]}"
    if code == grpc.StatusCode.OK:
        _judge_stream(outcome.responses, max_tokens)
        return
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in details and "in-flight" in details:
        return  # the server is full (not a crash)
    assert not must_succeed, f"a valid request was refused: {code.name}: {details[:500]}"
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (
        f"{code.name} after {outcome.elapsed_s:.1f} s (want a result or INVALID_ARGUMENT): {details[:500]}"
    )
    assert details.strip(), "INVALID_ARGUMENT without a message saying what to change"
    assert "\n" not in details, f"multi-line status message: {details[:500]}"


def _judge_stream(responses: list, max_tokens: int | None) -> None:
    assert responses, "OK status but the stream had no response"
    *chunks, last = responses
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in chunks), "finish reason before the last chunk"
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH), (
        f"stream ended with finish_reason {pb.FinishReason.Name(last.finish_reason)}"
    )
    generated = sum(len(r.token_ids) for r in responses)
    assert last.usage.completion_tokens == generated >= 1, (last.usage, generated)
    assert last.usage.prompt_tokens >= 1, last.usage
    assert all(0 <= t < VOCAB for r in responses for t in r.token_ids), "token id outside the vocabulary"
    if max_tokens is not None:
        assert generated <= max_tokens, f"{generated} tokens for max_tokens={max_tokens}"
        if last.finish_reason == pb.FINISH_REASON_LENGTH:
            assert generated == max_tokens, f"LENGTH after {generated} of {max_tokens} tokens"


def _summary(message, limit: int = 60) -> str:
    """A short description of a message (huge strings and lists cut, with their length)."""
    parts = []
    for fd, value in message.ListFields():
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if fd.message_type is not None:
            items = list(value) if repeated else [value]
            inner = ", ".join(_summary(v, limit) for v in items[:4])
            more = f" +{len(items) - 4}" if len(items) > 4 else ""
            parts.append(f"{fd.name}=[{inner}{more}]" if repeated else f"{fd.name}={{{inner}}}")
        elif repeated:
            items = list(value)
            shown = [repr(v[:limit]) if isinstance(v, str) else repr(v) for v in items[:8]]
            parts.append(f"{fd.name}=[{', '.join(shown)}{f' ...({len(items)})' if len(items) > 8 else ''}]")
        elif isinstance(value, str) and len(value) > limit:
            parts.append(f"{fd.name}={value[:limit]!r}...({len(value)} chars)")
        else:
            parts.append(f"{fd.name}={value!r}")
    return ", ".join(parts)


# -- strategies: requests the server must accept --------------------------------------------------


def _opt(strategy):
    return st.one_of(st.none(), strategy)


def _f32(lo: float, hi: float, **kw):
    return st.floats(lo, hi, width=32, allow_nan=False, **kw)


_PRINTABLE = st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")) | st.just(" ")

valid_request_ids = st.one_of(
    st.just(""),
    st.sampled_from(["dup-a", "dup-b"]),  # reused across examples: fine once the earlier one finished
    st.text(_PRINTABLE, min_size=1, max_size=40),
    st.text(_PRINTABLE, min_size=256, max_size=256),
)


@st.composite
def valid_sampling(draw) -> pb.SamplingOptions:
    s = pb.SamplingOptions()
    values = {
        "max_tokens": draw(_opt(st.integers(1, MAX_NEW))),
        "temperature": draw(
            _opt(st.sampled_from([0.0, -0.0, F32_TINY, 1e-6, 0.7, 1.0, 2.0, 1e30, F32_MAX]) | _f32(0.0, 100.0))
        ),
        "top_p": draw(_opt(st.sampled_from([F32_TINY, 1e-3, 0.5, 1.0]) | _f32(0.0, 1.0, exclude_min=True))),
        "top_k": draw(_opt(st.sampled_from([0, 1, VOCAB - 1, VOCAB, I32_MAX]) | st.integers(0, 2 * VOCAB))),
        "min_p": draw(_opt(st.sampled_from([0.0, 1.0, F32_TINY]) | _f32(0.0, 1.0))),
        "seed": draw(_opt(st.sampled_from([0, 1, I64_MAX]) | st.integers(0, I64_MAX))),
        "logprobs": draw(_opt(st.integers(0, 20))),
    }
    for name, value in values.items():
        if value is not None:
            setattr(s, name, value)
    s.stop.extend(
        draw(
            st.one_of(
                st.lists(st.text(min_size=1, max_size=12), max_size=4),
                st.just(["\u00e9" * 100_000]),  # one huge stop string (~200 KB)
                st.just([f"stop-{i}" for i in range(1000)]),  # many
            )
        )
    )
    s.stop_token_ids.extend(
        draw(
            st.one_of(
                st.lists(st.integers(0, VOCAB - 1), max_size=6),
                st.just(list(range(VOCAB))),  # every token stops
            )
        )
    )
    s.ignore_eos = draw(st.booleans())
    return s


@st.composite
def valid_inputs(draw, request: pb.GenerateRequest) -> None:
    kind = draw(st.sampled_from(["prompt", "token_ids", "chat"]))
    if kind == "prompt":
        request.prompt = draw(
            st.one_of(
                st.text(min_size=1, max_size=200),
                st.sampled_from(
                    ["\x00", "\x00" * 50, "<|im_start|>", "<|endoftext|>", " ", "\u200b", "\U0001f600" * 40]
                ),
            )
        )
    elif kind == "token_ids":
        request.token_ids.ids.extend(draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=64)))
    else:
        messages = draw(
            st.lists(
                st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=40)),
                min_size=1,
                max_size=8,
            )
        )
        request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)


@st.composite
def valid_requests(draw) -> pb.GenerateRequest:
    request = pb.GenerateRequest(request_id=draw(valid_request_ids))
    draw(valid_inputs(request))
    sampling = draw(_opt(valid_sampling()))
    if sampling is not None:
        request.sampling.CopyFrom(sampling)
    return request


# -- strategies: anything a client can put in the fields ------------------------------------------

_NASTY_FLOATS = [math.nan, -math.nan, math.inf, -math.inf, -1.0, -F32_TINY, -F32_MAX, 1.0000001, 2.0, 1e30]
_NASTY_I32 = [0, -1, I32_MIN, I32_MAX, VOCAB, CONTEXT, CONTEXT + 1, 10**6]

wild_floats = st.sampled_from(_NASTY_FLOATS) | st.floats(width=32)
wild_i32 = st.sampled_from(_NASTY_I32) | st.integers(I32_MIN, I32_MAX)

wild_request_ids = st.one_of(
    valid_request_ids,
    st.sampled_from(["\x00", "a\nb", "\t", "\u200b", "\u2028", "id\x7f", "\x1b[31mred"]),
    st.just("r" * 257),
    st.just("r" * 10_000),
    st.text(max_size=40),
)


@st.composite
def wild_sampling(draw) -> pb.SamplingOptions:
    s = draw(valid_sampling())
    wild = {
        "max_tokens": st.sampled_from([0, -1, I32_MIN, I32_MAX, CONTEXT, CONTEXT + 1, 10**6]),
        "temperature": wild_floats,
        "top_p": wild_floats,
        "min_p": wild_floats,
        "top_k": wild_i32,
        "seed": st.sampled_from([-1, I64_MIN, I64_MAX]) | st.integers(I64_MIN, I64_MAX),
        "logprobs": st.sampled_from([-1, 21, I32_MIN, I32_MAX]) | st.integers(I32_MIN, I32_MAX),
    }
    for name in draw(st.sets(st.sampled_from(sorted(wild)), min_size=1, max_size=3)):
        setattr(s, name, draw(wild[name]))
    if draw(st.booleans()):
        del s.stop[:]
        s.stop.extend(
            draw(
                st.one_of(
                    st.just([""]),
                    st.just(["a", ""]),
                    st.lists(st.text(max_size=3), max_size=5),
                    st.just(["x" * 1_000_000]),  # one ~1 MB stop string
                )
            )
        )
    if draw(st.booleans()):
        del s.stop_token_ids[:]
        s.stop_token_ids.extend(
            draw(
                st.one_of(
                    st.sampled_from([[-1], [VOCAB], [I32_MAX], [I32_MIN], [0, VOCAB * 2]]),
                    st.lists(wild_i32, max_size=6),
                )
            )
        )
    return s


@st.composite
def wild_requests(draw) -> pb.GenerateRequest:
    # one wild field masks the rest (the router checks request_id, then sampling, then the input),
    # so the id and the sampling are wild in only some examples
    wild_id = draw(st.integers(0, 3)) == 0
    request = pb.GenerateRequest(request_id=draw(wild_request_ids if wild_id else valid_request_ids))
    kind = draw(st.sampled_from(["none", "valid", "valid", "prompt", "token_ids", "chat"]))
    if kind == "valid":
        draw(valid_inputs(request))
    elif kind == "prompt":
        request.prompt = draw(
            st.one_of(
                st.just(""),
                st.just("a" * 200_000),
                st.just("\U0001f600\x00é" * 70_000),  # huge (~200k chars)
                st.text(max_size=100),
            )
        )
    elif kind == "token_ids":
        ids = draw(
            st.one_of(
                st.just([]),
                st.just([5] * 100_000),
                st.just([5] * (CONTEXT - 1)),
                st.just([5] * CONTEXT),
                st.lists(wild_i32, min_size=1, max_size=10),
                st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10).map(lambda v: v + [I32_MIN]),
            )
        )
        request.token_ids.SetInParent()  # an empty list is still "token_ids set"
        request.token_ids.ids.extend(ids)
    elif kind == "chat":
        roles = st.sampled_from(["system", "user", "assistant", "", "wizard", "USER", "user\x00", "tool", " user"])
        messages = draw(
            st.one_of(
                st.just([]),
                st.lists(st.tuples(roles, st.text(max_size=20)), min_size=1, max_size=6),
                st.just([("user", "hi")] * 500),  # many (too long for the context)
                st.just([("user", "hi"), ("assistant", "yo")] * 40),  # many, short enough to run
            )
        )
        request.chat.SetInParent()
        request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    sampling = draw(st.sampled_from(["none", "valid", "wild"]))
    if sampling != "none":
        request.sampling.CopyFrom(draw(wild_sampling() if sampling == "wild" else valid_sampling()))
    return request


# -- strategies: raw bytes ------------------------------------------------------------------------

_BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"]


def _with_bad_utf8(where: str, bad: bytes) -> bytes:
    """A valid request whose `where` string holds `bad` (invalid UTF-8) instead of text."""
    request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(max_tokens=2))
    if where == "prompt":
        request.prompt = SENTINEL
    elif where == "request_id":
        request.request_id = SENTINEL
    elif where in ("role", "content"):
        message = {"role": "user", "content": "hi", where: SENTINEL}
        request.chat.messages.add(**message)
    else:
        request.sampling.stop.append(SENTINEL)
    raw = request.SerializeToString()
    assert raw.count(SENTINEL.encode()) == 1
    return raw.replace(SENTINEL.encode(), (bad * len(SENTINEL))[: len(SENTINEL)])


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def raw_requests(draw) -> bytes:
    base = draw(valid_requests()).SerializeToString()
    kind = draw(st.sampled_from(["garbage", "truncated", "bad_utf8", "unknown_fields", "merged", "bool_varint"]))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "truncated":
        return base[: draw(st.integers(0, max(len(base) - 1, 0)))]
    if kind == "bad_utf8":
        return _with_bad_utf8(
            draw(st.sampled_from(["prompt", "request_id", "role", "content", "stop"])), draw(st.sampled_from(_BAD_UTF8))
        )
    if kind == "unknown_fields":  # proto3 keeps and ignores them: the request must run as if absent
        number = draw(st.sampled_from([6, 99, 536_870_911]))
        extra = _varint(number << 3) + _varint(draw(st.integers(0, I64_MAX)))
        sampling_extra = b"\x2a" + _varint(3) + b"\xf8\x06\x01"  # sampling { field 111: 1 }
        return base + extra + (sampling_extra if draw(st.booleans()) else b"")
    if kind == "merged":  # two messages back to back merge; the oneof takes the last input set
        return base + draw(st.one_of(valid_requests(), wild_requests())).SerializeToString()
    # ignore_eos (field 9 of sampling, field 5 of the request) as a varint other than 0/1
    inner = b"\x48" + _varint(draw(st.integers(2, I64_MAX)))
    return base + b"\x2a" + _varint(len(inner)) + inner


# -- the fuzz -------------------------------------------------------------------------------------


def _expected_max_tokens(request: pb.GenerateRequest) -> int:
    s = request.sampling
    return s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS


@settings(FUZZ, max_examples=45)
@given(request=valid_requests())
def test_fuzz_valid_requests_all_finish(cluster, send, request):
    outcome = _send_and_judge(send, request, must_succeed=True)
    if request.request_id:
        assert outcome.responses[0].request_id == request.request_id


@settings(FUZZ, max_examples=75)
@given(request=wild_requests())
def test_fuzz_any_request_gets_a_result_or_invalid_argument(cluster, send, request):
    _send_and_judge(send, request)


def _send_and_judge(send, request, must_succeed: bool = False):
    note(_summary(request))
    outcome = send(request.SerializeToString())
    note(f"-> {outcome.code.name} {outcome.details[:300]!r}")
    _event(outcome)
    judge(outcome, must_succeed=must_succeed, max_tokens=_expected_max_tokens(request))
    return outcome


@settings(FUZZ, max_examples=30)
@given(raw=raw_requests())
def test_fuzz_raw_bytes(cluster, send, raw):
    note(f"{len(raw)} bytes: {raw[:120]!r}")
    outcome = send(raw)
    note(f"-> {outcome.code.name} {outcome.details[:300]!r}")
    _event(outcome)
    try:
        request = pb.GenerateRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - undecodable: must be INVALID_ARGUMENT like any bad input
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code.name, outcome.details)
        judge(outcome)
        return
    judge(outcome, max_tokens=_expected_max_tokens(request))


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\xff", id="garbage"),
        pytest.param(_with_bad_utf8("prompt", b"\xff"), id="prompt-invalid-utf8"),
    ],
)
def test_undecodable_request_is_invalid_argument(send, raw):
    outcome = send(raw)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code.name, outcome.details)
    assert outcome.details.startswith("the request is not a valid tandem.v1.GenerateRequest: ")


def test_duplicate_request_id_in_flight_is_invalid_argument(cluster, send):
    client = TandemClient(cluster.address)
    stream = iter(
        client.generate(
            token_ids=[5, 6, 7],
            request_id="fuzz-dup",
            max_tokens=1500,
            temperature=0.0,
            ignore_eos=True,
            timeout=DEADLINE_S,
        )
    )
    next(stream)  # in flight
    try:
        outcome = send(pb.GenerateRequest(request_id="fuzz-dup", prompt="x").SerializeToString())
        judge(outcome)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT and "already in flight" in outcome.details
    finally:
        stream.close()
    cluster.cluster.check_pools()


def test_the_workers_survive_the_fuzz(cluster, baseline):
    """Runs last: no leaked block or lease, every worker serving, and greedy output unchanged."""
    cluster.cluster.check_pools()
    client = TandemClient(cluster.address)
    assert sorted(w.health for w in client.server_info().workers) == ["SERVING", "SERVING"]
    _, tokens, last = client.complete(
        token_ids=BASELINE_IDS, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, timeout=DEADLINE_S
    )
    assert tokens == baseline and last.usage.completion_tokens == MAX_NEW
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    cluster.cluster.check_pools()


# -- the judge itself can fail --------------------------------------------------------------------


def _finished(n: int = 2, reason=pb.FINISH_REASON_LENGTH) -> list:
    return [
        pb.GenerateResponse(token_ids=[5]),
        pb.GenerateResponse(
            token_ids=[6] * (n - 1), finish_reason=reason, usage=pb.Usage(prompt_tokens=3, completion_tokens=n)
        ),
    ]


@pytest.mark.parametrize(
    "outcome",
    [
        pytest.param(Outcome(grpc.StatusCode.INTERNAL, "internal error: KeyError: 'x'"), id="internal"),
        pytest.param(Outcome(grpc.StatusCode.UNKNOWN, "Unexpected <class 'ValueError'>"), id="unknown"),
        pytest.param(Outcome(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", elapsed_s=30), id="hang"),
        pytest.param(Outcome(grpc.StatusCode.UNAVAILABLE, "worker decode-0 is gone"), id="dead-worker"),
        pytest.param(Outcome(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"), id="exhausted"),
        pytest.param(
            Outcome(grpc.StatusCode.INVALID_ARGUMENT, "Traceback (most recent call last): ..."), id="traceback"
        ),
        pytest.param(Outcome(grpc.StatusCode.INVALID_ARGUMENT, ""), id="no-message"),
        pytest.param(Outcome(grpc.StatusCode.OK, "", []), id="empty-stream"),
        pytest.param(Outcome(grpc.StatusCode.OK, "", [pb.GenerateResponse(token_ids=[5])]), id="no-finish-reason"),
        pytest.param(Outcome(grpc.StatusCode.OK, "", _finished(reason=pb.FINISH_REASON_ABORT)), id="aborted"),
        pytest.param(Outcome(grpc.StatusCode.OK, "", _finished(n=9)), id="too-many-tokens"),
    ],
)
def test_judge_rejects_crashes_hangs_and_broken_streams(outcome):
    with pytest.raises(AssertionError):
        judge(outcome, max_tokens=MAX_NEW)


def test_judge_accepts_results_and_invalid_argument():
    judge(Outcome(grpc.StatusCode.OK, "", _finished(n=MAX_NEW)), max_tokens=MAX_NEW)
    judge(Outcome(grpc.StatusCode.INVALID_ARGUMENT, "sampling: top_p must be in (0, 1], got nan"))
    with pytest.raises(AssertionError):
        judge(Outcome(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be >= 1"), must_succeed=True)
