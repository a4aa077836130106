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


def _structured(m: int, d: int, rank: int, noise: float, seed: int) -> np.ndarray:
    """Rows near a ``rank``-dimensional subspace (like radiographs' pixel vectors), unit norm."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, d)) / np.sqrt(d)
    weights = rng.normal(size=(m, rank)) * np.linspace(3, 0.3, rank)
    return _unit(weights @ basis + noise * rng.normal(size=(m, d)) / np.sqrt(d))


@SHORTLIST
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_subspace_shortlist_matches_fp64_brute_force(metric: str, low: torch.dtype) -> None:
    """Shortlisted in a subspace (an upper bound per pair): still the fp64 order, through the
    certificate and through the near-tie path (queries with 30 near-copies each)."""
    rng = np.random.default_rng(5)
    refs = _structured(1500, 512, 24, 0.08, seed=5)
    refs[:300] = _unit(np.repeat(refs[:10], 30, 0) + 0.02 * rng.normal(size=(300, 512)) / 22)
    refs = refs.astype(np.float32)
    queries = np.concatenate([_structured(60, 512, 24, 0.08, seed=6), refs[[0, 45, 299]]])
    queries = (queries * 2).astype(np.float32)  # not unit: the bounds scale with the norms
    stats = SearchStats()
    index = ExactIndex(refs, metric, shortlist_dtype=low, subspace=True)
    assert 0 < index.subspace_rank <= 128
    scores, idx = index.search(queries, 3, block=25, stats=stats)
    want_s, want_i = _brute(queries, refs, 3, metric)
    assert np.array_equal(idx, want_i)
    assert np.allclose(scores, want_s if metric == "ip" else -want_s, rtol=1e-5, atol=1e-4)
    assert stats.exact_blocks == 0 and stats.certified > 0 and stats.near_ties > 0
    _, self_idx = index.search(refs[:40], 2, exclude_self=False)
    assert np.array_equal(self_idx, _brute(refs[:40], refs, 2, metric)[1])


def test_subspace_is_chosen_only_where_it_holds_the_energy() -> None:
    rng = np.random.default_rng(7)
    structured = _structured(32768, 512, 20, 0.05, seed=7).astype(np.float32)
    isotropic = _unit(rng.normal(size=(32768, 512)))
    assert 0 < ExactIndex(structured).subspace_rank <= 128
    assert ExactIndex(isotropic).subspace_rank == 0
    assert ExactIndex(structured[:1000]).subspace_rank == 0  # too little work to pay for it
    assert ExactIndex(isotropic, subspace=True).subspace_rank == 0  # no subspace holds it


def test_broken_subspace_bound_switches_to_exact_search() -> None:
    """Norms outside the subspace under-stated (as a wrong basis or a BLAS bug would): the
    self-check sees scores above their upper bound and searches those blocks in fp64."""
    refs = _structured(800, 512, 16, 0.3, seed=8).astype(np.float32)
    queries = _structured(50, 512, 16, 0.3, seed=9).astype(np.float32)
    index = ExactIndex(refs, subspace=True, shortlist_dtype=torch.float32)
    index._tail[:] = 0.0
    index._yb[:, index.subspace_rank] = 0.0
    stats = SearchStats()
    _, idx = index.search(queries, 2, block=10, stats=stats)
    assert stats.exact_blocks > 0
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
