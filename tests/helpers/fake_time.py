"""A clock that moves only when the code under test sleeps: waits and pauses run instantly, in order."""

from __future__ import annotations


class FakeTime:
    """Pass `clock` and `sleep` where the code takes injected ones; `sleeps` counts the calls."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps += 1
        self.now += s
