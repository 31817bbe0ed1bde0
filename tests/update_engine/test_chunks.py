"""The content-defined chunker: cuts depend only on content, an edit moves only the chunks around it,
sizes stay in bounds, and the streaming scan cuts exactly like one pass over the whole buffer."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from update_engine import chunks
from update_engine.chunks import Chunker

SMALL = Chunker.for_average(4096)  # many chunks in small data: fast property tests


def _data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_index_covers_data_in_bounds() -> None:
    data = _data(1, 1 << 20)
    idx = SMALL.index_bytes(data)
    assert idx[0].offset == 0 and idx[-1].end == len(data)
    assert all(a.end == b.offset for a, b in zip(idx, idx[1:], strict=False))
    assert all(SMALL.min_size <= c.length <= SMALL.max_size for c in idx[:-1])
    assert 0.6 * SMALL.avg_size < len(data) / len(idx) < 1.5 * SMALL.avg_size  # about the average asked


def test_default_average_is_measured() -> None:
    data = _data(2, 8 << 20)
    idx = Chunker().index_bytes(data)
    assert 0.7 * chunks.DEFAULT_AVG < len(data) / len(idx) < 1.4 * chunks.DEFAULT_AVG


def test_runs_of_padding_cut_at_max() -> None:
    idx = SMALL.index_bytes(bytes(100_000))
    assert [c.length for c in idx[:-1]] == [SMALL.max_size] * (len(idx) - 1)
    assert len({c.sha256 for c in idx[:-1]}) == 1


def test_streaming_scan_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data(3, 300_000)
    whole = SMALL.index_bytes(data)
    monkeypatch.setattr(chunks, "READ_BLOCK", 7_001)  # reads that end anywhere, even inside a window
    assert SMALL.index_bytes(data) == whole


def test_bad_sizes_refused() -> None:
    with pytest.raises(ValueError, match="must grow"):
        Chunker(100, 50, 200)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), at=st.integers(0, 199_999), insert=st.binary(min_size=0, max_size=300),
       cut=st.integers(0, 300))
def test_an_edit_moves_only_the_chunks_around_it(seed: int, at: int, insert: bytes, cut: int) -> None:
    old = _data(seed, 200_000)
    new = old[:at] + insert + old[at + cut:]
    a, b = SMALL.index_bytes(old), SMALL.index_bytes(new)
    have = {c.sha256 for c in a}
    fresh = [c for c in b if c.sha256 not in have]
    # Chunks ending before the edit are untouched; after it the cuts fall back in step within a few chunks.
    assert all(c.sha256 in have for c in b if c.end <= at - SMALL.max_size)
    assert sum(c.length for c in fresh) <= 4 * SMALL.max_size + len(insert)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), skip=st.integers(1, 50_000))
def test_cuts_depend_only_on_content(seed: int, skip: int) -> None:
    """Indexing from a cut of the whole gives the same later chunks (no state but the bytes)."""
    data = _data(seed, 150_000)
    whole = SMALL.index_bytes(data)
    start = next(c.offset for c in whole if c.offset >= skip)
    tail = SMALL.index_bytes(data[start:])
    assert [(c.offset + start, c.length, c.sha256) for c in tail] == [
        (c.offset, c.length, c.sha256) for c in whole if c.offset >= start]
