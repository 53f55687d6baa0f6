"""find_stop: matches completed by the newest text, earliest completion wins, truncation point."""

from __future__ import annotations

import random

import pytest

from engine.stop_checker import find_stop


def _feed(deltas: list[str], stops: list[str], include: bool) -> tuple[str, str | None]:
    """Simulate the engine: append each delta, check, cut on the first match."""
    text = ""
    for delta in deltas:
        text += delta
        hit = find_stop(text, len(delta), stops, include)
        if hit is not None:
            return text[: hit[0]], hit[1]
    return text, None


def test_no_stops_or_no_new_text() -> None:
    assert find_stop("hello END", 3, [], False) is None
    assert find_stop("hello END", 0, ["END"], False) is None
    assert find_stop("hello", 2, ["END"], False) is None


def test_match_inside_one_delta() -> None:
    assert find_stop("say hi. bye", 11, ["."], False) == (6, ".")
    assert find_stop("say hi. bye", 11, ["."], True) == (7, ".")


def test_stop_spanning_two_deltas() -> None:
    assert _feed(["Hello wo", "rld! and", " more"], ["world"], include=False) == ("Hello ", "world")
    assert _feed(["Hello wo", "rld! and", " more"], ["world"], include=True) == ("Hello world", "world")


def test_stop_spanning_many_single_char_deltas() -> None:
    assert _feed(list("abc<|im_end|>xyz"), ["<|im_end|>"], include=False) == ("abc", "<|im_end|>")


def test_only_new_region_is_searched() -> None:
    # "END" lies wholly in old text: the engine would have stopped earlier, so it is not re-found.
    assert find_stop("END and more", 4, ["END"], False) is None
    # A match that ends inside the new text is found even when it starts in old text.
    assert find_stop("xxEN" + "D!", 2, ["END"], False) == (2, "END")


def test_multiple_stops_earliest_completion_wins() -> None:
    assert find_stop("one two three", 13, ["three", "two"], False) == (4, "two")
    assert find_stop("one two three", 13, ["two", "three"], True) == (7, "two")
    # "bc" completes (end 3) before "abcd" (end 4): it wins even though "abcd" starts earlier.
    assert find_stop("abcd", 4, ["abcd", "bc"], False) == (1, "bc")
    # Same end: the longer one (earlier start) wins.
    assert find_stop("xabc", 4, ["bc", "abc"], False) == (1, "abc")


def test_equivalent_to_whole_text_scan_char_by_char() -> None:
    rng = random.Random(0)
    alphabet = "ab\n."
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(1, len(text) + 1), k=min(len(text), rng.randint(0, 6))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)]) if j > i]
        # Reference: the first position where any stop ends, then the longest stop ending there.
        ref: tuple[str, str | None] = (text, None)
        for end in range(1, len(text) + 1):
            ending = [s for s in stops if text[:end].endswith(s)]
            if ending:
                s = max(ending, key=len)
                ref = (text[: end - len(s)], s)
                break
        assert _feed(deltas, stops, include=False) == ref, (text, stops, deltas)


@pytest.mark.parametrize("include", [True, False])
def test_unicode_stops(include: bool) -> None:
    hit = find_stop("日本語。次", 2, ["。"], include)
    assert hit == ((4 if include else 3), "。")
