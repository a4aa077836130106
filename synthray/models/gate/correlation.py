"""Normalised cross-correlation of image pairs over shifts, mirror images and template sizes.

Each (query, reference) pair is scored by the largest Pearson correlation over every integer
shift in [-s, s]^2 of the query, of its mirror image, and of both shrunk to a few template sizes
(which undoes a small crop that was scaled back up), each correlation computed on the pixels the
two images share at that alignment. This is the normalised cross-correlation of template
matching (Lewis, "Fast Normalized Cross-Correlation", Vision Interface 1995), with the cross
terms and the windowed sums for the means and variances computed through zero-padded FFTs.

Alignment convention: with ``q`` the query, mirrored if ``flip``, shrunk to ``scale * R`` pixels
and centred on an R x R canvas, ``q[y, x] ~ ref[y - dy, x - dx]`` for ``shift = (dy, dx)``: the
reference moved down by dy and right by dx.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (conventional alias)

from synthray.models.gate.imageops import ssim, standardise
from synthray.models.gate.search import in_parallel, single_thread

_ELEMS = 1 << 22  # bounds the temporaries (see synthray.models.gate.search)


def _shift_grid(max_shift: int) -> np.ndarray:
    """(S, 2) int64 shifts (dy, dx), row-major over [-s, s]^2."""
    r = np.arange(-max_shift, max_shift + 1)
    return np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1).reshape(-1, 2)


def _fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast FFT lengths)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


class _Correlator:
    """Cross-correlations at shifts in [-s, s]^2 through zero-padded real FFTs.

    For R x R canvases a and b, ``cross(A, B)[d] = sum_u a[u + d] b[u]`` (d = (dy, dx)); with
    the canvases zero-padded to N >= R + s, the circular correlation has no wrap-around at those
    shifts. Only (2s+1)^2 of the N^2 outputs are wanted, so the inverse transform is evaluated
    at those alone, as two small matrix products (a pruned inverse DFT: over the rows, a
    complex (2s+1) x N matrix; over the half-spectrum columns, a real matrix that folds in
    the Hermitian symmetry). A full inverse FFT computed and copied N^2 values per pair to
    keep 81 of 5,184, and was three fifths of the time.
    """

    def __init__(self, r: int, max_shift: int) -> None:
        self.r, self.s = r, max_shift
        self.n = n = _fft_size(r + max_shift)
        d = np.arange(-max_shift, max_shift + 1)  # (D,) shifts, D = 2s+1
        k = np.arange(n)
        # Over the rows: Y[dy, kx] = sum_ky P[ky, kx] exp(2 pi i ky dy / N) / N.
        rows = np.exp(2j * np.pi * np.outer(d, k) / n) / n  # (D, N)
        self.rows = torch.from_numpy(rows.astype(np.complex64))
        # Over the N/2+1 columns of a real signal's half spectrum: out[dx] = sum_kx w_kx
        # Re(Y[kx] exp(2 pi i kx dx / N)) / N, w = 1 at kx = 0 (and N/2 for even N), else 2;
        # on (Re Y, Im Y) interleaved, as torch.view_as_real lays them out.
        kh = np.arange(n // 2 + 1)
        w = np.full(len(kh), 2.0)
        w[0] = 1.0
        if n % 2 == 0:
            w[-1] = 1.0
        ang = 2 * np.pi * np.outer(kh, d) / n  # (K, D)
        cols = np.stack([w[:, None] * np.cos(ang), -w[:, None] * np.sin(ang)], axis=1) / n
        self.cols = torch.from_numpy(cols.reshape(2 * len(kh), len(d)).astype(np.float32))

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """(..., R, R) -> (..., N, N/2 + 1) complex."""
        return torch.fft.rfft2(x, s=(self.n, self.n))

    def cross(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """Spectra (..., N, N/2+1) broadcast -> (..., S) correlations at the (2s+1)^2 shifts
        (row-major over (dy, dx), as :func:`_shift_grid`)."""
        prod = fa * fb.conj()  # (..., N, K)
        y = torch.matmul(self.rows, prod)  # (..., D, K) complex
        y = torch.view_as_real(y).flatten(-2)  # (..., D, 2K)
        out = torch.matmul(y, self.cols)  # (..., D, D)
        return out.reshape(*out.shape[:-2], -1)


def _shapes(sizes: tuple) -> tuple[tuple[int, int], ...]:
    """Template sizes as (height, width) pairs: an int h stands for (h, h)."""
    out = []
    for s in sizes:
        hy, hx = (s, s) if isinstance(s, int | np.integer) else s
        out.append((int(hy), int(hx)))
    return tuple(out)


def templates(x: torch.Tensor, shapes: tuple[tuple[int, int], ...], flips: bool) -> torch.Tensor:
    """(B, R, R) -> (B, V, R, R): the image resized to each (h, w) of ``shapes`` and centred on
    a zero R x R canvas, then the same for its mirror image (``flips``)."""
    b, r = x.shape[0], x.shape[-1]
    out = []
    for img in (x, torch.flip(x, dims=[2])) if flips else (x,):
        for hy, hx in shapes:
            canvas = torch.zeros(b, r, r)
            oy, ox = (r - hy) // 2, (r - hx) // 2
            small = (
                img
                if (hy, hx) == (r, r)
                else F.interpolate(
                    img[:, None],
                    size=(hy, hx),
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )[:, 0]
            )
            canvas[:, oy : oy + hy, ox : ox + hx] = small
            out.append(canvas)
    return torch.stack(out, dim=1)  # (B, V, R, R)


def _masks(r: int, shapes: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """(Z, R, R) 0/1 support of each centred template shape."""
    m = torch.zeros(len(shapes), r, r)
    for i, (hy, hx) in enumerate(shapes):
        oy, ox = (r - hy) // 2, (r - hx) // 2
        m[i, oy : oy + hy, ox : ox + hx] = 1.0
    return m


@dataclass
class PairScores:
    correlation: np.ndarray  # (Q, C) float32, best over alignments; -inf for padding
    shift: np.ndarray  # (Q, C, 2) int64 (dy, dx) of the best alignment
    flip: np.ndarray  # (Q, C) bool: the mirrored synthetic image aligned best
    scale: np.ndarray  # (Q, C, 2) float32: template (height, width) / R of the best alignment


def adopt(
    ps: PairScores,
    rows: np.ndarray,
    cols: np.ndarray,
    fine: PairScores,
    fine_rows: np.ndarray,
    fine_cols: np.ndarray | int,
    *,
    flip: bool = True,
) -> None:
    """Give the pairs (rows, cols) of ``ps`` the alignment ``fine`` found for its pairs
    (fine_rows, fine_cols): correlation, shift, template scale and, with ``flip``, mirroring."""
    ps.correlation[rows, cols] = fine.correlation[fine_rows, fine_cols]
    ps.shift[rows, cols] = fine.shift[fine_rows, fine_cols]
    ps.scale[rows, cols] = fine.scale[fine_rows, fine_cols]
    if flip:
        ps.flip[rows, cols] = fine.flip[fine_rows, fine_cols]


def robust_correlation(
    queries: np.ndarray,
    refs: np.ndarray,
    candidates: np.ndarray,
    *,
    max_shift: int = 4,
    flips: bool = True,
    sizes: tuple[int | tuple[int, int], ...] | None = None,
    smooth: float = 0.0,
) -> PairScores:
    """Best Pearson correlation over alignments of each query against its candidates.

    ``queries`` uint8 (Q, R, R), ``refs`` uint8 (M, R, R), ``candidates`` int64 (Q, C) indices
    into ``refs`` (-1 = no candidate, scored -inf). Alignments: every shift in [-s, s]^2 of the
    query, of its mirror image (``flips``), and of the query shrunk to each template size in
    ``sizes`` (default R only; smaller sizes undo a crop that was scaled back up; an int h is
    an h x h template, a pair (h, w) an h x w one, for crops that were not square). Each
    correlation uses only the pixels where the (shifted) template and the reference overlap.
    """
    q_n, c_n = candidates.shape
    r = queries.shape[-1]
    if queries.ndim != 3 or refs.shape[1:] != queries.shape[1:] or queries.shape[1] != r:
        raise ValueError(f"queries {queries.shape} and refs {refs.shape} must be (N, R, R)")
    if not 0 <= max_shift < r // 2:
        raise ValueError(f"max_shift must be in [0, {r // 2}), got {max_shift}")
    shapes = _shapes(tuple(sizes) if sizes else (r,))
    if any(not r // 2 <= h <= r for shape in shapes for h in shape):
        raise ValueError(f"template sizes must lie in [{r // 2}, {r}], got {sizes}")
    shifts = _shift_grid(max_shift)  # (S, 2)
    n_s, n_z = len(shifts), len(shapes)
    valid = candidates >= 0
    used = np.unique(candidates[valid])
    lookup = np.zeros(refs.shape[0], dtype=np.int64)
    lookup[used] = np.arange(len(used))
    corr = np.full((q_n, c_n), -np.inf, dtype=np.float32)
    best = np.zeros((q_n, c_n), dtype=np.int64)  # index into (flip, size, shift)
    fft = _Correlator(r, max_shift)

    workers = torch.get_num_threads()
    with torch.inference_mode(), single_thread():
        masks = fft.spectrum(_masks(r, shapes))  # (Z, N, N')
        ones = fft.spectrum(torch.ones(r, r))  # (N, N')
        count = fft.cross(masks, ones).round()  # (Z, S) overlapping pixels
        ref_f, ref_sum, ref_var = [], [], []
        for us in range(0, len(used), 256):
            t = standardise(refs[used[us : us + 256]], smooth)  # (u, R, R)
            ft = fft.spectrum(t)  # (u, N, N')
            t_sum = fft.cross(masks[:, None], ft[None])  # (Z, u, S)
            t_sq = fft.cross(masks[:, None], fft.spectrum(t.square())[None])  # (Z, u, S)
            ref_f.append(ft)
            ref_sum.append(t_sum.permute(1, 0, 2))  # (u, Z, S)
            ref_var.append(count[None] * t_sq.permute(1, 0, 2) - t_sum.permute(1, 0, 2) ** 2)
        if used.size:
            all_f = torch.cat(ref_f)  # (U, N, N')
            all_sum = torch.cat(ref_sum)  # (U, Z, S)
            all_var = torch.cat(ref_var).clamp_min(0)  # (U, Z, S)
        n_v = n_z * (2 if flips else 1)
        cnt = count.repeat(n_v // n_z, 1)  # (V, S)
        step = max(1, _ELEMS // (2 * n_v * c_n * fft.n * fft.n))  # FFT temporaries near 16 MiB
        slot = torch.from_numpy(lookup[np.where(valid, candidates, used[0] if used.size else 0)])

        def score_block(qs: int) -> None:
            tmpl = templates(
                standardise(queries[qs : qs + step], smooth), shapes, flips
            )  # (b, V, R, R)
            fq = fft.spectrum(tmpl)  # (b, V, N, N')
            q_sum = fft.cross(fq, ones)  # (b, V, S)
            q_sq = fft.cross(fft.spectrum(tmpl.square()), ones)  # (b, V, S)
            q_var = (cnt * q_sq - q_sum.square()).clamp_min(0)  # (b, V, S)
            sl = slot[qs : qs + step]  # (b, C)
            cross = fft.cross(fq[:, :, None], all_f[sl][:, None])  # (b, V, C, S)
            r_sum = all_sum[sl].repeat(1, 1, n_v // n_z, 1).transpose(1, 2)  # (b, V, C, S)
            r_var = all_var[sl].repeat(1, 1, n_v // n_z, 1).transpose(1, 2)  # (b, V, C, S)
            num = cnt[None, :, None] * cross - q_sum[:, :, None] * r_sum
            den = (q_var[:, :, None] * r_var).sqrt()
            rho = torch.where(den > 1e-6, num / den.clamp_min(1e-6), torch.zeros_like(num))
            rho = rho.permute(0, 2, 1, 3).reshape(len(sl), c_n, -1)  # (b, C, V S)
            val, arg = rho.max(dim=2)  # (b, C)
            corr[qs : qs + step] = val.clamp(-1, 1).numpy()
            best[qs : qs + step] = arg.numpy()

        in_parallel(score_block, range(0, q_n if used.size else 0, step), workers)
    corr[~valid] = -np.inf
    variant, shift_i = best // n_s, best % n_s
    return PairScores(
        correlation=corr,
        shift=shifts[shift_i],
        flip=variant >= n_z,
        scale=(np.asarray(shapes, dtype=np.float32) / r)[variant % n_z],  # (Q, C, 2)
    )


def _aligned_pair(
    q: np.ndarray, t: np.ndarray, dy: int, dx: int, hy: int, hx: int
) -> tuple[np.ndarray, np.ndarray]:
    """The parts of q's hy x hx centred canvas and of t that align at shift (dy, dx)."""
    r = t.shape[-1]
    canvas = templates(torch.from_numpy(q), ((hy, hx),), flips=False)[:, 0].numpy()  # (n, R, R)
    oy, ox = (r - hy) // 2, (r - hx) // 2
    u0, u1 = max(0, oy - dy), min(r, oy + hy - dy)
    v0, v1 = max(0, ox - dx), min(r, ox + hx - dx)
    return canvas[:, u0 + dy : u1 + dy, v0 + dx : v1 + dx], t[:, u0:u1, v0:v1]


def aligned_ssim(
    queries: np.ndarray,
    refs: np.ndarray,
    index: np.ndarray,
    shift: np.ndarray,
    flip: np.ndarray,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """(Q,) float32 SSIM of each query and refs[index] at its alignment (shift, flip, and
    ``scale``, the template's (height, width) / R, (Q, 2); a (Q,) scale is square).

    Computed on the overlapping pixels, in grey levels (L = 255): a brightness or contrast
    change lowers SSIM although the correlation stays at 1.
    """
    r = queries.shape[-1]
    scale = np.ones((len(queries), 2)) if scale is None else np.asarray(scale, dtype=np.float64)
    if scale.ndim == 1:
        scale = np.stack([scale, scale], axis=1)
    sizes = np.round(scale * r).astype(int)  # (Q, 2)
    out = np.zeros(len(queries), dtype=np.float32)
    q = np.where(flip[:, None, None], queries[:, :, ::-1], queries).astype(np.float32)
    t = refs[index].astype(np.float32)  # (Q, R, R)
    keys = np.stack([shift[:, 0], shift[:, 1], sizes[:, 0], sizes[:, 1]], axis=1)
    with torch.inference_mode(), single_thread():
        for dy, dx, hy, hx in np.unique(keys, axis=0):
            sel = np.flatnonzero((keys == (dy, dx, hy, hx)).all(axis=1))
            qa, ta = _aligned_pair(q[sel], t[sel], int(dy), int(dx), int(hy), int(hx))
            out[sel] = ssim(torch.from_numpy(qa.copy()), torch.from_numpy(ta.copy())).numpy()
    return out
