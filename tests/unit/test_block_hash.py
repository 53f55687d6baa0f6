"""Block hashes: a stable wire format (golden digests), chaining, and the incremental form."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.block_hash import (
    HASH_DOMAIN,
    extend_block_hashes,
    hash_block_tokens,
    hash_full_blocks,
)

REPO = Path(__file__).resolve().parents[2]

# Golden digests of format version 1. If one changes, every router and worker must
# be upgraded together: change these only on purpose, with a version bump.
GOLDEN_ROOT = "14123635beed3e9ef8e081d96a65e122"  # hash_block_tokens(None, [1, 2, 3, 4])
GOLDEN_CHILD = "91ddb95d4e5022625d20308dbfbd6427"  # hash_block_tokens(root, [5, 6, 7, 8])


def reference_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """The documented format, written out independently of the implementation."""
    msg = HASH_DOMAIN + (b"\x00" if parent is None else b"\x01" + parent)
    msg += struct.pack(f"<{len(tokens)}I", *tokens)
    return hashlib.blake2b(msg, digest_size=16).digest()


def test_golden_digests() -> None:
    root = hash_block_tokens(None, [1, 2, 3, 4])
    assert root.hex() == GOLDEN_ROOT
    assert hash_block_tokens(root, [5, 6, 7, 8]).hex() == GOLDEN_CHILD
    assert HASH_DOMAIN == b"tandem.kv-block.v1\x00"


def test_matches_documented_format() -> None:
    root = reference_hash(None, [1, 2, 3, 4])
    assert hash_block_tokens(None, [1, 2, 3, 4]) == root
    assert hash_block_tokens(root, [2**32 - 1, 0, 7]) == reference_hash(root, [2**32 - 1, 0, 7])


def test_stable_across_processes() -> None:
    code = "from common.block_hash import hash_block_tokens as h; print(h(h(None, [1, 2, 3, 4]), [5, 6, 7, 8]).hex())"
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == GOLDEN_CHILD


def test_common_imports_neither_torch_nor_engine() -> None:
    code = (
        "import sys, common.block_hash, common.kv_events; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'engine')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_chaining_and_sensitivity() -> None:
    root_a = hash_block_tokens(None, [1, 2, 3, 4])
    root_b = hash_block_tokens(None, [1, 2, 3, 5])
    assert root_a != root_b
    # same tokens, different parents (and no parent) -> different digests
    digests = {hash_block_tokens(p, [9, 9, 9, 9]) for p in (None, root_a, root_b)}
    assert len(digests) == 3
    # order and length matter
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    assert hash_block_tokens(None, [0]) != hash_block_tokens(None, [0, 0])
    assert len(root_a) == 16


def test_full_blocks_ignore_partial_tail() -> None:
    tokens = list(range(10))
    hashes = hash_full_blocks(tokens, 4)
    assert len(hashes) == 2
    assert hashes[0] == hash_block_tokens(None, [0, 1, 2, 3])
    assert hashes[1] == hash_block_tokens(hashes[0], [4, 5, 6, 7])
    assert hash_full_blocks(tokens[:3], 4) == []


def test_start_block_and_parent() -> None:
    tokens = list(range(100, 116))
    full = hash_full_blocks(tokens, 4)
    assert hash_full_blocks(tokens, 4, parent=full[1], start_block=2) == full[2:]


@settings(deadline=None, max_examples=60)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=40),
    block_size=st.integers(1, 6),
    cut=st.integers(0, 40),
)
def test_incremental_equals_full(tokens: list[int], block_size: int, cut: int) -> None:
    full = hash_full_blocks(tokens, block_size)
    prior = hash_full_blocks(tokens[:cut], block_size)
    assert hash_full_blocks(tokens, block_size, prior=prior) == full
    grown = list(prior)
    added = extend_block_hashes(grown, tokens, block_size)
    assert grown == full and added == len(full) - len(prior)
    capped: list[bytes] = []
    extend_block_hashes(capped, tokens, block_size, max_blocks=1)
    assert capped == full[:1]


def test_incremental_hashes_only_new_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import common.block_hash as bh

    calls: list[int] = []
    real = bh._digest

    def counting_digest(parent: bh.BlockHash | None, packed: bytes | memoryview) -> bh.BlockHash:
        calls.append(1)
        return real(parent, packed)

    monkeypatch.setattr(bh, "_digest", counting_digest)
    tokens = list(range(64))
    prior = hash_full_blocks(tokens[:60], 4)
    calls.clear()
    grown = hash_full_blocks(tokens, 4, prior=prior)
    assert len(calls) == 1  # only block 15 is new
    assert grown == hash_full_blocks(tokens, 4)


@pytest.mark.parametrize("bad", [[-1], [2**32], [1.5]])
def test_bad_tokens_raise_value_error(bad: list) -> None:
    with pytest.raises(ValueError, match="token ids"):
        hash_block_tokens(None, bad)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        hash_block_tokens(b"short", [1])
    with pytest.raises(ValueError, match="block_size"):
        hash_full_blocks([1, 2], 0)
    with pytest.raises(ValueError, match="start_block"):
        hash_full_blocks([1, 2], 1, start_block=-1)
