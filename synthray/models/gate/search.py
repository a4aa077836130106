"""Exact k-nearest-neighbour search (maximum inner product or L2) with low-precision matmuls.

A privacy gate needs the true nearest training image, so approximate indexes will not do; but an
exact search need not compute every score in full precision. Scores are computed cheaply in low
precision, and the answer is then proven with rigorous floating-point error bounds (Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., SIAM 2002, sections 2.2 and 3.1:
an n-term dot product computed in precision u has error <= gamma_n sum |x_i y_i|,
gamma_n = n u / (1 - n u)):

1. Every score is computed by one bf16 matmul (inputs rounded to bf16, products accumulated in
   fp32, output rounded to bf16), several times faster than an fp32 matmul on CPUs with AMX or
   AVX-512 bf16 units. On CPUs without them bf16 is emulated and far slower than fp32
   (:mod:`synthray.models.runtime`), so the shortlist matmul is fp32 there: the same steps and
   bounds hold with no input or output rounding.
2. The top-k' bf16 scores per query (the shortlist, k' > k) are found exactly with a group-max
   reduction followed by ``topk`` on 1/16 of the scores.
3. The shortlist is re-scored in fp32 (error <= gamma_{D+2} |x| |y|), and the candidates fp32
   cannot order are re-scored in fp64; ties are broken by the lower index, as ``numpy.argmax``
   does.
4. Certificate: a reference outside the shortlist has a bf16 score <= the k'-th one, so its exact
   score is at most ``up(s_k') + E``, where ``E`` bounds the bf16 input rounding (measured per
   vector: ``|x^.y^ - x.y| <= |x^| |y^ - y| + |x^ - x| |y|``) and the fp32 accumulation, and
   ``up`` undoes the bf16 output rounding (``|v - bf16(v)| <= 2^-8 |bf16(v)|``). When the k-th
   exact score beats that ceiling, the shortlist provably holds the exact top-k.
5. Otherwise (near ties) every reference whose bf16 score could still reach the k-th exact score
   is re-scored as in 3. The answer is again exact.

High-dimensional vectors with structure (pixel vectors of radiographs: 98% of their energy lies in
256 of 4,096 directions) are shortlisted in a subspace instead. With P the leading right singular
vectors of a sample of the references (orthonormal rows, r x D), h = Px and t >= |x - P^T h|,

    |x.y - h_x.h_y| <= t_x t_y + e_x |h_y| + |h_x| (e_y + eps |h_y|)

(Cauchy-Schwarz on the parts outside the subspace; e bounds the fp32 rounding of h, eps =
||I - P P^T|| the basis's departure from orthonormality). The shortlist matmul then scores
[h_x, t_x] . [h_y, t_y] = h_x.h_y + t_x t_y, an upper bound of every exact score up to those small
terms, in r + 1 dimensions instead of D; steps 2-5 run as above with it, and every candidate is
re-scored with its full vectors. The answer stays exact whatever the basis; a good one only makes
it fast. The subspace is used when it holds 98% of a sample's energy in at most D/4 directions;
random isotropic vectors never qualify.

Every re-scored pair is also checked against the bounds; a violation (a BLAS that accumulates in
bf16, say) switches the block to plain fp64 search, so a wrong answer is never returned. Memory
is bounded by scoring queries in blocks (``max_block_bytes`` of shortlist scores at a time).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from synthray.models.runtime import cpu_compute_dtype

_U_BF16_OUT = 2.0**-8  # |v - bf16(v)| <= 2^-8 |bf16(v)| for round-to-nearest (8 significant bits)
_U_FP32 = 2.0**-24
_U_FP64 = 2.0**-53
_TINY = 1e-30  # covers flushed bf16/fp32 subnormals, far below any score that matters
_GROUP = 16
_SMALL_WORK = 1 << 31  # multiply-adds below which one thread beats two (OpenMP overhead)
# Temporaries stay under 16 MiB: glibc serves larger blocks with fresh mmap pages every time,
# and the page faults then cost more than the arithmetic.
_ELEMS = 1 << 22
# The subspace shortlist (see the module docstring): used from this dimension and this much
# reference data (M x D) on, when at most D/4 (and at most _SUB_MAX) directions leave at most
# _SUB_TAIL of a sample's energy outside.
_SUB_MIN_DIM = 512
_SUB_MIN_WORK = 1 << 24
_SUB_MAX = 256
_SUB_TAIL = 0.02
_SUB_SAMPLE = 2048
# Projections sum at most this many products per BLAS call, so that each rounding error bound
# holds with gamma of (chunk + chunks + 1) terms rather than of D.
_SUB_CHUNK = 256


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block (None: leave the setting alone)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread() -> contextlib.AbstractContextManager[None]:
    """One torch thread. Small ops then avoid an OpenMP fork/join each, which on a busy 2-core
    host cost 17 ms instead of 0.05 ms for a batch of twelve 72x72 FFTs."""
    return torch_threads(1)


def in_parallel(fn: Callable[[int], None], starts: Iterable[int], workers: int) -> None:
    """``fn(start)`` for every start, on up to ``workers`` threads, each running torch on one
    thread (call it inside :func:`single_thread`). The blocks are independent and each op is
    large enough to release the GIL for most of its time, so two cores run two blocks at once
    where one torch op on two threads pays a fork/join per small op."""
    starts = list(starts)
    if workers <= 1 or len(starts) <= 1:
        for s in starts:
            fn(s)
        return
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(starts))) as pool:
        list(pool.map(fn, starts))  # consumed, so that a block's exception is raised here


def _gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): relative error bound of an n-term floating-point dot product."""
    return n * u / (1.0 - n * u)


@dataclass
class SearchStats:
    """What one or more :meth:`ExactIndex.search` calls did (for benchmarks and tests)."""

    queries: int = 0
    certified: int = 0  # answered from the shortlist, proven by the error bound
    near_ties: int = 0  # queries for which every reference within the bound was re-scored
    near_tie_pairs: int = 0  # (query, reference) pairs re-scored for them
    fp64_pairs: int = 0  # pairs whose fp32 scores were too close to call, scored in fp64
    exact_blocks: int = 0  # blocks searched in plain fp64 after a failed self-check


def _as_float32(a: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """A 2-D float32 CPU tensor sharing memory with ``a`` where possible."""
    if isinstance(a, np.ndarray):
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{name} must hold floating-point values, got {a.dtype}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not a.flags.writeable:  # torch.from_numpy warns on read-only arrays
            a = a.copy()
        t = torch.from_numpy(a)
    else:
        if not torch.is_floating_point(a):
            raise ValueError(f"{name} must hold floating-point values, got {a.dtype}")
        t = a.detach().to("cpu", torch.float32).contiguous()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), got shape {tuple(t.shape)}")
    arr = t.numpy()
    step = _rows_per_chunk(arr.shape[1])
    for s in range(0, len(arr), step):
        if not np.isfinite(arr[s : s + step]).all():
            raise ValueError(f"{name} holds NaN or infinite values")
    return t


def _rows_per_chunk(width: int) -> int:
    return max(1, _ELEMS // max(1, width))


def _split3(v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 (M,) -> (``dtype`` (M, 3) parts whose sum is ~v, fp64 (M,) residual v - sum(parts))."""
    parts = []
    rest = v.clone()
    for _ in range(3):
        p = rest.to(dtype)
        parts.append(p)
        rest = rest - p.double()
    return torch.stack(parts, dim=1), rest  # (M, 3), (M,)


def _norms(a: torch.Tensor | np.ndarray) -> np.ndarray:
    """fp32 (N, D) -> fp64 (N,) row L2 norms, inflated to stay upper bounds despite rounding."""
    arr = a.numpy() if isinstance(a, torch.Tensor) else a
    sq = np.einsum("nd,nd->n", arr, arr).astype(np.float64)  # fp32 sums of squares
    return np.sqrt(sq) * (1.0 + _gamma(arr.shape[1] + 2, _U_FP32))


def _subspace(y: torch.Tensor, max_rank: int, tail: float) -> torch.Tensor | None:
    """(r, D) fp32 orthonormal rows spanning the leading right singular subspace of an even
    sample of ``y``'s rows, r the smallest multiple of 32 (<= ``max_rank``) that leaves at most
    ``tail`` of the sample's energy outside; None if none does. Randomized range finder with two
    power iterations (Halko, Martinsson and Tropp, SIAM Review 2011), seeded: deterministic."""
    m, d = y.shape
    rows = np.unique(np.linspace(0, m - 1, min(m, _SUB_SAMPLE)).round().astype(np.int64))
    s = y[torch.from_numpy(rows)]  # (n, D)
    total = float(s.double().square().sum())
    if total == 0.0:
        return None
    width = min(max_rank + 16, *s.shape)
    omega = torch.randn(d, width, generator=torch.Generator().manual_seed(0))  # (D, l)
    basis = torch.linalg.qr(s @ omega)[0]  # (n, l)
    for _ in range(2):
        basis = torch.linalg.qr(s @ (s.T @ basis))[0]
    _, sv, vh = torch.linalg.svd(basis.T @ s, full_matrices=False)  # (l,), (l, D)
    outside = 1.0 - np.cumsum(sv.double().numpy() ** 2) / total  # (l,)
    for r in range(32, min(max_rank, len(outside)) + 1, 32):
        if outside[r - 1] <= tail:
            q = torch.linalg.qr(vh[:r].double().T)[0]  # (D, r) orthonormal in fp64
            return q.T.float().contiguous()
    return None


def _first_k(rows: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """Positions of the first k entries of each row in a row-sorted array, (n_rows * k,)."""
    starts = np.searchsorted(rows, np.arange(n_rows))
    return (starts[:, None] + np.arange(k)[None, :]).reshape(-1)


class ExactIndex:
    """Exact top-k search among fixed reference vectors (M, D), like faiss ``IndexFlatIP/L2``.

    ``metric="ip"`` ranks by inner product (descending); ``metric="l2"`` by squared Euclidean
    distance (ascending). Results equal a brute-force fp64 search of the fp32 inputs, ties broken
    by the lower reference index. A float32 C-contiguous array is used without a copy: do not
    change it while the index is in use. ``shortlist_dtype`` (bf16 or fp32) is the precision of
    the shortlist matmul; the default is bf16 where the CPU has bf16 units, else fp32.
    """

    def __init__(
        self,
        refs: np.ndarray | torch.Tensor,
        metric: str = "ip",
        *,
        shortlist_dtype: torch.dtype | None = None,
        subspace: bool | None = None,
    ) -> None:
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        low = cpu_compute_dtype() if shortlist_dtype is None else shortlist_dtype
        if low not in (torch.bfloat16, torch.float32):
            raise ValueError(f"shortlist_dtype must be bfloat16 or float32, got {low}")
        self._low = low
        # |v - low(v)| <= u_out |low(v)| for the rounded matmul output; fp32 output is not rounded
        # again (the accumulation bound covers it).
        self._u_out = _U_BF16_OUT if low == torch.bfloat16 else 0.0
        y = _as_float32(refs, "refs")  # (M, D)
        if y.shape[0] == 0:
            raise ValueError("refs is empty")
        self.metric = metric
        self.size, self.dim = y.shape
        self._y = y
        m, d = self.size, self.dim
        self._basis: torch.Tensor | None = None  # (r, D): shortlist in a subspace (docstring)
        if subspace is None:
            subspace = d >= _SUB_MIN_DIM and m * d >= _SUB_MIN_WORK
        if subspace:
            self._basis = _subspace(y, min(_SUB_MAX, d // 4), _SUB_TAIL)
        self._tail = np.zeros(m)  # (M,) t_y, the norm outside the subspace (0 without one)
        if self._basis is not None:
            b64 = self._basis.double()
            self._rho = float(b64.norm(dim=1).max())  # rows' largest norm
            eye = torch.eye(len(b64), dtype=torch.float64)
            gap = float(torch.linalg.matrix_norm(eye - b64 @ b64.T))  # Frobenius >= spectral
            self._eps = gap + len(b64) * d * _U_FP64 * 4  # + the rounding of that computation
        zdim = d if self._basis is None else len(self._basis) + 1
        self._zdim = zdim  # width of the vectors the shortlist matmul scores
        self._pad = -(-m // _GROUP) * _GROUP  # rows padded to whole groups of 16
        extra = 3 if metric == "l2" else 0  # l2: the bias rides in three low-precision columns
        self._yb = torch.zeros(self._pad, zdim + extra, dtype=low)  # (Mp, D')
        self._bias = torch.zeros(m, dtype=torch.float64)  # (M,) fp64, added to x.y
        max_round = max_norm = max_full = max_bias_abs = max_bias_resid = 0.0
        self._max_proj_err = self._max_head = 0.0  # largest e_y and |h_y|
        with torch.inference_mode():
            step = _rows_per_chunk(d)
            for s in range(0, m, step):
                yc = y[s : s + step]  # (c, D)
                zc = yc
                if self._basis is not None:
                    zc, err, head = self._to_subspace(yc)  # (c, r + 1), (c,), (c,)
                    self._tail[s : s + len(yc)] = zc[:, -1].double().numpy()
                    self._max_proj_err = max(self._max_proj_err, float(err.max()))
                    self._max_head = max(self._max_head, float(head.max()))
                ybc = self._yb[s : s + len(yc), :zdim]
                ybc.copy_(zc)  # rounds to bf16 (nearest even); exact in fp32
                max_norm = max(max_norm, float(_norms(zc).max()))
                max_full = max_norm if zc is yc else max(max_full, float(_norms(yc).max()))
                max_round = max(max_round, float(_norms(torch.sub(ybc, zc)).max()))  # exact diff
                if metric == "l2":
                    # Rank by x.y - |y|^2 / 2, the same order as ascending |x - y|^2.
                    bias = -0.5 * yc.double().square().sum(1)  # (c,)
                    parts, resid = _split3(bias, low)  # (c, 3), (c,)
                    self._bias[s : s + len(yc)] = bias
                    self._yb[s : s + len(yc), zdim:] = parts
                    max_bias_resid = max(max_bias_resid, float(resid.abs().max()))
                    max_bias_abs = max(max_bias_abs, float(parts.float().abs().sum(1).max()))
        self._bias_np = self._bias.numpy()  # shares memory
        self._max_round, self._max_norm, self._max_full = max_round, max_norm, max_full
        self._max_norm_b = max_norm + max_round  # |y^| <= |y| + |y^ - y|
        self._max_bias_abs, self._max_bias_resid = max_bias_abs, max_bias_resid

    @property
    def subspace_rank(self) -> int:
        """Directions of the subspace the shortlist is scored in (0: the full vectors)."""
        return 0 if self._basis is None else len(self._basis)

    # ---------------------------------------------------------------- public API

    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int = 1,
        *,
        exclude_self: bool = False,
        shortlist: int | None = None,
        block: int | None = None,
        max_block_bytes: int = 512 << 20,
        stats: SearchStats | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (Q, k), indices int64 (Q, k)), best first.

        Scores are inner products, or squared distances for ``metric="l2"``. ``exclude_self``
        (queries are the references, row i is reference i) skips i == j. ``shortlist`` is k'
        (default k + 7); ``block`` caps the queries scored at once, which
        ``max_block_bytes`` also bounds (shortlist scores of one block). Every block reads all
        references once, so fewer queries per block cost time: at 100,000 x 512-d in fp32,
        128 MiB blocks (335 queries) searched 20% slower than 512 MiB ones (1,024 queries).
        """
        x = _as_float32(queries, "queries")  # (Q, D)
        if x.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {x.shape[1]}, refs {self.dim}")
        if exclude_self and x.shape[0] != self.size:
            raise ValueError("exclude_self needs queries and refs of the same length")
        available = self.size - 1 if exclude_self else self.size
        if not 1 <= k <= available:
            raise ValueError(f"k must be in [1, {available}] for {self.size} references, got {k}")
        kp = min(available, shortlist if shortlist is not None else k + 7)
        if kp < k:
            raise ValueError(f"shortlist ({kp}) must be >= k ({k})")
        if block is not None and block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        stats = stats if stats is not None else SearchStats()

        q_n = x.shape[0]
        itemsize = self._yb.element_size()
        rows = max(1, min(1024, q_n, max_block_bytes // (itemsize * self._pad)))
        if block is not None:
            rows = min(rows, block)
        out_s = np.empty((q_n, k), dtype=np.float64)
        out_i = np.empty((q_n, k), dtype=np.int64)
        small = q_n * self._pad * self._zdim < _SMALL_WORK
        with torch.inference_mode(), single_thread() if small else contextlib.nullcontext():
            buf = torch.empty(rows, self._pad, dtype=self._low)  # (b, Mp), reused
            for qs in range(0, q_n, rows):
                xs = x[qs : qs + rows]  # (b, D)
                s, i = self._search_block(xs, qs, k, kp, exclude_self, buf, stats)
                out_s[qs : qs + len(xs)] = s
                out_i[qs : qs + len(xs)] = i
            stats.queries += q_n
            if self.metric == "l2":
                out_s = self._sq_dist(x, out_i)
        return out_s.astype(np.float32), out_i

    # ---------------------------------------------------------------- internals

    def _to_subspace(self, v: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """fp32 (c, D) -> (z = [h, t] fp32 (c, r + 1), e (c,), |h| upper bounds (c,)).

        h = fl(P v) summed in chunks of ``_SUB_CHUNK`` products, so that each component's error
        is at most gamma_(chunk + chunks + 1) |P_i| |v| (Higham 3.1) and |h - P v| <= e. t bounds
        |v - P^T h| from above: |v - P^T h|^2 = |v|^2 - |h|^2 - 2 (Pv - h).h - h.(I - PP^T)h.
        """
        basis = self._basis
        assert basis is not None
        c, d = v.shape
        r = len(basis)
        h = torch.zeros(c, r)
        for k0 in range(0, d, _SUB_CHUNK):
            h.addmm_(v[:, k0 : k0 + _SUB_CHUNK], basis[:, k0 : k0 + _SUB_CHUNK].T)
        depth = min(d, _SUB_CHUNK) + -(-d // _SUB_CHUNK) + 1
        v_norm = _norms(v)  # (c,) upper bounds
        err = np.sqrt(r) * _gamma(depth, _U_FP32) * self._rho * v_norm * (1 + 1e-12)
        hh = np.einsum("nd,nd->n", h.numpy(), h.numpy()).astype(np.float64)
        h_low = hh * (1.0 - _gamma(r + 2, _U_FP32))  # |h|^2 from below
        h_up = np.sqrt(hh) * (1.0 + _gamma(r + 2, _U_FP32))  # |h| from above
        vv = v_norm**2  # |v|^2 from above
        tail2 = vv - h_low + 2.0 * err * h_up + self._eps * h_up**2
        tail = np.sqrt(np.maximum(tail2, 0.0)) * (1.0 + 1e-12) + _TINY
        t32 = tail.astype(np.float32)
        t32 = np.where(t32 < tail, np.nextafter(t32, np.float32(np.inf)), t32)  # rounded up
        return torch.cat([h, torch.from_numpy(t32)[:, None]], dim=1), err, h_up

    def _subspace_slack(self, err: np.ndarray, head: np.ndarray) -> np.ndarray:
        """(b,) e_x |h_y| + |h_x| (e_y + eps |h_y|), maximised over the references."""
        big_h = self._max_head
        return err * big_h + head * (self._max_proj_err + self._eps * big_h) + _TINY

    def _pair_scores(
        self, x: np.ndarray, rows: np.ndarray, cols: np.ndarray, dtype: type
    ) -> np.ndarray:
        """Ranking scores x_r . y_c + bias_c of pairs, dot products in ``dtype``, as fp64.

        Runs of one row (as the callers pass them: rows sorted) with many columns are scored
        as one matrix-vector product each, which gathers their query once instead of per pair.
        """
        y = self._y.numpy()
        out = np.empty(len(rows), dtype=np.float64)
        step = _rows_per_chunk(self.dim)
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else rows
        if len(starts) and len(rows) >= 32 * len(starts):
            ends = np.r_[starts[1:], len(rows)]
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                xr = x[rows[a]].astype(dtype, copy=False)  # (D,)
                for s in range(a, b, step):
                    c = cols[s : min(b, s + step)]
                    out[s : s + len(c)] = y[c].astype(dtype, copy=False) @ xr
            return out + self._bias_np[cols]
        for s in range(0, len(rows), step):
            r, c = rows[s : s + step], cols[s : s + step]
            yc, xr = y[c].astype(dtype, copy=False), x[r].astype(dtype, copy=False)  # (p, D)
            out[s : s + len(r)] = np.einsum("pd,pd->p", yc, xr)
        return out + self._bias_np[cols]

    def _sq_dist(self, x: torch.Tensor, idx: np.ndarray) -> np.ndarray:
        """fp64 squared distances |x_q - y_idx[q, j]|^2, (Q, k)."""
        q_n, k = idx.shape
        rows = torch.from_numpy(np.repeat(np.arange(q_n), k))
        cols = torch.from_numpy(idx.reshape(-1))
        out = np.empty(len(rows), dtype=np.float64)
        step = _rows_per_chunk(self.dim)
        for s in range(0, len(rows), step):
            r, c = rows[s : s + step], cols[s : s + step]
            out[s : s + len(r)] = (self._y[c].double() - x[r].double()).square().sum(1).numpy()
        return out.reshape(q_n, k)

    def _shortlist_bound(self, x: torch.Tensor, xb: torch.Tensor) -> np.ndarray:
        """(b,) E: |fp32 sum of the rounded products - exact score| <= E_i, for every reference
        (before the output rounding, which ``_u_out`` covers)."""
        xbf = xb[:, : self._zdim].float()
        xb_norm = _norms(xbf)  # (b,)
        x_round = _norms(xbf - x)  # (b,) |x^ - x|, exact differences
        rounding = xb_norm * self._max_round + x_round * self._max_norm
        d_aug = self._yb.shape[1]
        accumulation = _gamma(d_aug, _U_FP32) * (xb_norm * self._max_norm_b + self._max_bias_abs)
        return rounding + accumulation + self._max_bias_resid + _TINY

    def _fp32_bound(self, x: torch.Tensor) -> np.ndarray:
        """(b,) |fp32 dot + fp64 bias - exact score| <= bound, for every reference."""
        x_norm = _norms(x)  # (b,)
        bias = 2 * _U_FP64 * self._max_bias_abs  # the fp64 addition of the l2 bias
        return _gamma(self.dim + 2, _U_FP32) * x_norm * self._max_full + bias + _TINY

    def _refine(
        self,
        x: torch.Tensor,
        rows: np.ndarray,
        cols: np.ndarray,
        s32: np.ndarray,
        approx: np.ndarray,
        err_low: np.ndarray,
        k: int,
        stats: SearchStats,
        tail_x: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Exact top-k per row among candidate pairs (rows sorted, every row has >= k pairs).

        ``s32`` holds the pairs' fp32 scores (error <= ``_fp32_bound``); only the pairs whose
        fp32 interval reaches the k-th best lower bound of their row are re-scored in fp64.
        ``approx`` exceeds the exact score by at most 2 t_x t_y (``tail_x``: t_x per row; 0
        without a subspace) beyond the low-precision errors ``err_low``.
        Returns (scores fp64 (b, k), ids (b, k), ok); ok is False if a score broke its bound.
        """
        b = len(err_low)
        if np.bincount(rows, minlength=b).min() < k:  # only if an error bound was broken
            return np.zeros((b, k)), np.zeros((b, k), dtype=np.int64), False
        err32 = self._fp32_bound(x)[rows]  # (p,)
        margin = self._u_out * np.abs(approx) + err_low[rows] + err32 + _TINY
        below = 2.0 * tail_x[rows] * self._tail[cols] * (1.0 + 1e-12)  # (p,)
        gap = s32 - approx
        ok = bool(np.all((gap <= margin) & (gap >= -margin - below)))
        lower = s32 - err32
        order = np.lexsort((-lower, rows))
        kth_lower = lower[order][_first_k(rows[order], b, k)].reshape(b, k)[:, -1]  # (b,)
        close = np.flatnonzero(s32 + err32 >= kth_lower[rows])  # could be in the top k
        stats.fp64_pairs += len(close)
        r, c = rows[close], cols[close]
        s64 = self._pair_scores(x.numpy(), r, c, np.float64)
        ok = ok and bool(np.all(np.abs(s64 - s32[close]) <= err32[close] + _TINY))
        order = np.lexsort((c, -s64, r))
        take = _first_k(r[order], b, k)
        return s64[order][take].reshape(b, k), c[order][take].reshape(b, k), ok

    def _search_block(
        self,
        x: torch.Tensor,
        qs: int,
        k: int,
        kp: int,
        exclude_self: bool,
        buf: torch.Tensor,
        stats: SearchStats,
    ) -> tuple[np.ndarray, np.ndarray]:
        b, m, mp = x.shape[0], self.size, self._pad
        zx, slack, tail_x = x, np.zeros(b), np.zeros(b)  # shortlist vectors, their extra error
        if self._basis is not None:
            zx, proj_err, head = self._to_subspace(x)  # (b, r + 1)
            slack, tail_x = self._subspace_slack(proj_err, head), zx[:, -1].double().numpy()
        xb = zx.to(self._low)  # (b, D')
        if self.metric == "l2":
            xb = torch.cat([xb, torch.ones(b, 3, dtype=self._low)], dim=1)  # (b, D' + 3)
        scores = torch.mm(xb, self._yb.T, out=buf[:b])  # (b, Mp) low precision
        scores[:, m:] = -torch.inf
        local = torch.arange(b)
        if exclude_self:
            scores[local, qs + local] = -torch.inf

        # Shortlist: exact top-k' of the low-precision scores. The top-k' lie in the k' groups
        # with the largest maxima (groups interleave: member r of group g is reference
        # g + r * Mp/16).
        n_groups = mp // _GROUP
        if n_groups >= kp:
            gmax = scores.view(b, _GROUP, n_groups).amax(1)  # (b, G)
            _, gid = torch.topk(gmax, kp, dim=1)  # (b, k')
            offsets = torch.arange(_GROUP) * n_groups  # (16,)
            members = (gid[:, None, :] + offsets[None, :, None]).reshape(b, -1)  # (b, 16 k')
            approx, pos = torch.topk(scores.gather(1, members), kp, dim=1)  # (b, k')
            cand = members.gather(1, pos)  # (b, k')
        else:
            approx, cand = torch.topk(scores, kp, dim=1)  # (b, k')
        approx_np = approx.double().numpy()  # (b, k')
        err = self._shortlist_bound(zx, xb) + slack  # (b,)

        cand_np = cand.numpy()
        s32 = np.empty((b, kp), dtype=np.float64)
        step = _rows_per_chunk(kp * self.dim)
        for rs in range(0, b, step):
            y_cand = self._y.numpy()[cand_np[rs : rs + step]]  # (c, k', D)
            x_col = x.numpy()[rs : rs + step, :, None]  # (c, D, 1)
            s32[rs : rs + step] = np.matmul(y_cand, x_col)[..., 0]  # fp32 accumulation
        s32 += self._bias_np[cand_np]
        rows = np.repeat(np.arange(b), kp)
        top_s, top_i, ok = self._refine(
            x,
            rows,
            cand_np.reshape(-1),
            s32.reshape(-1),
            approx_np.reshape(-1),
            err,
            k,
            stats,
            tail_x,
        )
        if not ok:
            stats.exact_blocks += 1
            return self._exact_block(x, qs, k, exclude_self)

        last = approx_np[:, -1]
        ceiling = last + self._u_out * np.abs(last) + err + _TINY  # (b,) max exact score outside
        certified = top_s[:, -1] > ceiling
        if self.metric == "ip":
            # A zero query scores exactly 0 against everything: the first k references win.
            for r in np.flatnonzero(~x.numpy().any(axis=1)):
                ids = np.arange(k + 1)
                ids = ids[ids != qs + r][:k] if exclude_self else ids[:k]
                top_s[r], top_i[r], certified[r] = 0.0, ids, True
        stats.certified += int(certified.sum())

        failing = np.flatnonzero(~certified)
        if len(failing):
            stats.near_ties += len(failing)
            # Every ref j with up(s^_j) + E >= s*_k could be in the top k: re-score them all.
            target = top_s[failing, -1] - err[failing] - _TINY  # (f,)
            u = self._u_out
            thr = np.where(target >= 0, target / (1 + u), target / (1 - u))
            thr32 = thr.astype(np.float32)
            thr32 = np.where(thr32 > thr, np.nextafter(thr32, np.float32(-np.inf)), thr32)
            thr_t = torch.from_numpy(thr32)
            found_r: list[torch.Tensor] = []
            found_c: list[torch.Tensor] = []
            found_a: list[torch.Tensor] = []
            step = _rows_per_chunk(mp)
            for f0 in range(0, len(failing), step):
                sub = scores[torch.from_numpy(failing[f0 : f0 + step])]  # (c, Mp)
                hit_r, hit_c = torch.nonzero(sub >= thr_t[f0 : f0 + step, None], as_tuple=True)
                found_r.append(hit_r + f0)
                found_c.append(hit_c)
                found_a.append(sub[hit_r, hit_c])
            fr, fc = torch.cat(found_r), torch.cat(found_c)
            stats.near_tie_pairs += len(fr)
            sub_approx = torch.cat(found_a).double().numpy()
            x_sub = x[torch.from_numpy(failing)]  # (f, D)
            fr_np, fc_np = fr.numpy(), fc.numpy()
            fs, fi, ok = self._refine(
                x_sub,
                fr_np,
                fc_np,
                self._pair_scores(x_sub.numpy(), fr_np, fc_np, np.float32),
                sub_approx,
                err[failing],
                k,
                stats,
                tail_x[failing],
            )
            if not ok:
                stats.exact_blocks += 1
                return self._exact_block(x, qs, k, exclude_self)
            top_s[failing], top_i[failing] = fs, fi
        return top_s, top_i

    def _exact_block(
        self, x: torch.Tensor, qs: int, k: int, exclude_self: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Plain fp64 search of one block (used only if a self-check fails)."""
        outs, ids_out = [], []
        ids = np.arange(self.size)
        for rs in range(0, x.shape[0], 64):
            xr = x[rs : rs + 64]
            b = xr.shape[0]
            s64 = (xr.double() @ self._y.double().T + self._bias[None, :]).numpy()  # (b, M)
            if exclude_self:
                s64[np.arange(b), qs + rs + np.arange(b)] = -np.inf
            order = np.lexsort((np.broadcast_to(ids, s64.shape), -s64), axis=-1)[:, :k]
            outs.append(np.take_along_axis(s64, order, 1))
            ids_out.append(order)
        return np.concatenate(outs), np.concatenate(ids_out)


def knn(
    queries: np.ndarray | torch.Tensor,
    refs: np.ndarray | torch.Tensor,
    k: int = 1,
    *,
    metric: str = "ip",
    exclude_self: bool = False,
    block: int | None = None,
    stats: SearchStats | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One-off exact search: ``ExactIndex(refs, metric).search(queries, k, ...)``."""
    return ExactIndex(refs, metric).search(
        queries, k, exclude_self=exclude_self, block=block, stats=stats
    )
