"""Exact low-precision-shortlist search: identical neighbours to a brute-force fp64 search.

Both shortlist precisions are tested on every machine: bf16 (the default where the CPU has bf16
units, emulated and slow elsewhere, hence the small sizes) and fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthray.models.gate.search import ExactIndex, SearchStats, knn


def _brute(q: np.ndarray, r: np.ndarray, k: int, metric: str = "ip", exclude_self: bool = False):
    """fp64 brute force, ties to the lower index (numpy.argmax's rule)."""
    q64, r64 = q.astype(np.float64), r.astype(np.float64)
    score = q64 @ r64.T if metric == "ip" else -((q64[:, None, :] - r64[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(score, -np.inf)
    ids = np.broadcast_to(np.arange(r.shape[0]), score.shape)
    order = np.lexsort((ids, -score), axis=-1)[:, :k]
    return np.take_along_axis(score, order, 1), order


SHORTLIST = pytest.mark.parametrize("low", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@SHORTLIST
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize(("d", "k", "block"), [(24, 1, None), (96, 5, 37), (512, 3, 64)])
def test_random_data_matches_fp64_brute_force(
    metric: str, d: int, k: int, block, low: torch.dtype
) -> None:
    rng = np.random.default_rng(d)
    refs = rng.normal(size=(700, d)).astype(np.float32)
    queries = rng.normal(size=(150, d)).astype(np.float32) * 3
    stats = SearchStats()
    index = ExactIndex(refs, metric, shortlist_dtype=low)
    scores, idx = index.search(queries, k, block=block, stats=stats)
    want_s, want_i = _brute(queries, refs, k, metric)
    assert idx.dtype == np.int64 and scores.dtype == np.float32 and idx.shape == (150, k)
    assert np.array_equal(idx, want_i)
    if metric == "ip":
        full = queries.astype(np.float64) @ refs.T.astype(np.float64)
        assert np.array_equal(idx[:, 0], full.argmax(1))
    expect = want_s if metric == "ip" else -want_s  # l2 returns squared distances
    assert np.allclose(scores, expect, rtol=1e-5, atol=1e-4)
    assert stats.queries == 150 and stats.exact_blocks == 0


@SHORTLIST
def test_near_ties_fall_back_and_stay_exact(low: torch.dtype) -> None:
    """More near-identical references than the shortlist holds: the certificate must fail and
    the fallback must still return the fp64 order, also among exact duplicates."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 64))
    refs = rng.normal(size=(2000, 64))
    for b in range(3):  # 40 copies of each base, within 1e-6..1e-4 of each other
        scale = 10.0 ** rng.uniform(-6, -4, size=(40, 1))
        refs[b * 40 : (b + 1) * 40] = base[b] + scale * rng.normal(size=(40, 64))
    refs = _unit(refs)
    refs[1000:1010] = refs[500]  # exact duplicates: the lower index must win
    queries = np.concatenate([_unit(base + 1e-5 * rng.normal(size=(3, 64))), refs[[500, 7]]])
    stats = SearchStats()
    _, idx = ExactIndex(refs, shortlist_dtype=low).search(queries, 4, stats=stats)
    _, want = _brute(queries, refs, 4)
    assert np.array_equal(idx, want)
    assert np.array_equal(
        idx[:, 0], (queries.astype(np.float64) @ refs.T.astype(np.float64)).argmax(1)
    )
    assert stats.near_ties > 0 and stats.near_tie_pairs > 0
    assert idx[3].tolist() == [500, 1000, 1001, 1002]  # itself, then its duplicates in order


def test_exclude_self_and_duplicates() -> None:
    rng = np.random.default_rng(2)
    x = _unit(rng.normal(size=(300, 16)))
    x[10] = x[20]
    _, idx = ExactIndex(x).search(x, 2, exclude_self=True, block=50)
    _, want = _brute(x, x, 2, exclude_self=True)
    assert np.array_equal(idx, want)
    assert idx[10, 0] == 20 and idx[20, 0] == 10
    _, idx_self = knn(x, x, 1)
    assert idx_self[:, 0].tolist()[:10] == list(range(10))


def test_zero_queries_and_refs() -> None:
    refs = np.zeros((50, 8), dtype=np.float32)
    refs[7] = 1.0
    queries = np.zeros((3, 8), dtype=np.float32)
    queries[1, 0] = 1.0
    scores, idx = ExactIndex(refs).search(queries, 3)
    _, want = _brute(queries, refs, 3)
    assert np.array_equal(idx, want) and idx[0].tolist() == [0, 1, 2]
    assert idx[1, 0] == 7 and scores[1, 0] == 1.0


@SHORTLIST
def test_failed_self_check_switches_to_exact_search(
    monkeypatch: pytest.MonkeyPatch, low: torch.dtype
) -> None:
    """If the shortlist error bound did not hold (a BLAS accumulating in bf16, say), blocks are
    searched in fp64 instead of returning a possibly wrong answer."""
    rng = np.random.default_rng(3)
    refs = rng.normal(size=(400, 32)).astype(np.float32)
    queries = rng.normal(size=(60, 32)).astype(np.float32)
    monkeypatch.setattr(ExactIndex, "_shortlist_bound", lambda self, x, xb: np.full(len(x), -1.0))
    stats = SearchStats()
    _, idx = ExactIndex(refs, shortlist_dtype=low).search(queries, 2, block=25, stats=stats)
    assert stats.exact_blocks == 3
    assert np.array_equal(idx, _brute(queries, refs, 2)[1])


def test_memory_is_bounded_by_blocks() -> None:
    rng = np.random.default_rng(4)
    refs = rng.normal(size=(5000, 8)).astype(np.float32)
    queries = rng.normal(size=(40, 8)).astype(np.float32)
    a = ExactIndex(refs).search(queries, 2, max_block_bytes=1)[1]  # one query at a time
    b = ExactIndex(refs).search(queries, 2)[1]
    assert np.array_equal(a, b)


def test_accepts_torch_and_read_only_input() -> None:
    x = np.eye(6, dtype=np.float32)
    x.setflags(write=False)
    assert ExactIndex(x).search(x, 1)[1][:, 0].tolist() == list(range(6))
    t = torch.eye(6, dtype=torch.float64)
    assert ExactIndex(t).search(t, 1)[1][:, 0].tolist() == list(range(6))


def test_validation() -> None:
    r = np.ones((5, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="metric"):
        ExactIndex(r, "cosine")
    with pytest.raises(ValueError, match="empty"):
        ExactIndex(r[:0])
    with pytest.raises(ValueError, match="NaN"):
        ExactIndex(np.full((2, 2), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="floating"):
        ExactIndex(np.ones((2, 2), dtype=np.int64))
    index = ExactIndex(r)
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="k must be"):
        index.search(r, 6)
    with pytest.raises(ValueError, match="k must be"):
        index.search(r, 5, exclude_self=True)
    with pytest.raises(ValueError, match="same length"):
        index.search(r[:2], 1, exclude_self=True)
