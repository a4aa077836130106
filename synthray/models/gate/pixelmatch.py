"""The nearest training images of synthetic ones by shift-, flip- and crop-robust correlation.

A generator that memorised a training radiograph may reproduce it shifted by a few pixels,
mirrored (horizontal flips are a common GAN augmentation: Karras et al., "Training Generative
Adversarial Networks with Limited Data", NeurIPS 2020), slightly zoomed, or noisy. Plain pixel
correlation drops fast under a shift, so each (synthetic, training) pair is scored by the
largest Pearson correlation over every integer shift in [-s, s]^2 of the synthetic image, of its
mirror image, and of both shrunk to a few template sizes (which undoes a small crop that was
scaled back up), each correlation computed on the pixels the two images share at that
alignment. This is the normalised cross-correlation of template matching (Lewis, "Fast
Normalized Cross-Correlation", Vision Interface 1995), with the cross terms and the windowed
sums for the means and variances computed through zero-padded FFTs. Both images are first
blurred slightly (Gaussian, sigma 1 px), which removes more pixel noise than anatomy.

Candidates come from exact searches (:mod:`synthray.models.gate.search`) of 16x16 pooled images with
probe variants (shifted, mirrored, shrunk) of each query, so that a shifted or cropped copy is
found even where its plain correlation with the source is not among the top few.

The structural similarity of the best alignment (SSIM, Wang et al., "Image Quality Assessment:
From Error Visibility to Structural Similarity", IEEE TIP 2004, their 11x11 Gaussian window,
sigma 1.5, K1 = 0.01, K2 = 0.03, on raw grey levels) is reported beside it as evidence.

Alignment convention: with ``q`` the synthetic image, mirrored if ``flip``, and shrunk to
``scale * R`` pixels and centred on an R x R canvas, ``q[y, x] ~ train[y - dy, x - dx]`` for
``shift = (dy, dx)``: the training image moved down by dy and right by dx.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (conventional alias)

from synthray.models.gate.correlation import (
    PairScores,
    adopt,
    aligned_ssim,
    robust_correlation,
    templates,
)
from synthray.models.gate.imageops import blur_matrix, pool_matrix, shift_matrix, unit_rows
from synthray.models.gate.search import ExactIndex, single_thread


@dataclass
class PixelMatch:
    """Nearest references of each query by robust pixel correlation."""

    neighbours: np.ndarray  # (Q, k) int64 reference indices, best first
    scores: np.ndarray  # (Q, k) float32 robust correlations (-inf where fewer candidates)
    shift: np.ndarray  # (Q, 2) int64 (dy, dx) of the best alignment with neighbours[:, 0]
    flip: np.ndarray  # (Q,) bool
    scale: np.ndarray  # (Q, 2) float32 template (height, width) / R (1 = no zoom)
    ssim: np.ndarray | None  # (Q,) float32 SSIM at that alignment, if asked for
    candidates: float  # mean number of candidates scored per query


# Queries matched at once by :meth:`PixelMatcher.match` (measured at 256 px against 1,500
# references: peak RSS 1.4 GB for 256 queries at once, 2.3 GB for 1,024; a 4,563-image
# evaluation batch at once was killed for memory).
QUERY_BLOCK = 256


def _joined(blocks: list[PixelMatch]) -> PixelMatch:
    """One :class:`PixelMatch` from those of consecutive query blocks."""
    sizes = np.array([len(b.neighbours) for b in blocks], dtype=np.float64)
    return PixelMatch(
        neighbours=np.concatenate([b.neighbours for b in blocks]),
        scores=np.concatenate([b.scores for b in blocks]),
        shift=np.concatenate([b.shift for b in blocks]),
        flip=np.concatenate([b.flip for b in blocks]),
        scale=np.concatenate([b.scale for b in blocks]),
        ssim=None if blocks[0].ssim is None else np.concatenate([b.ssim for b in blocks]),
        candidates=float(np.average([b.candidates for b in blocks], weights=sizes)),
    )


def _size_pairs(sizes: tuple[int, ...], anisotropic: bool) -> tuple[tuple[int, int], ...]:
    """Template (height, width) pairs: every pair of ``sizes``, or the square ones only."""
    if anisotropic:
        return tuple((hy, hx) for hy in sizes for hx in sizes)
    return tuple((h, h) for h in sizes)


class PixelMatcher:
    """Robust pixel nearest neighbours of query images among fixed reference images.

    Shortlist: for each query, exact inner-product searches of pooled (about 16 x 16),
    mean-centred, normalised images, one per probe: shifts in {-p, 0, p}^2 (p = max_shift - 1),
    mirrored or not, full size or shrunk to the smallest template size (in height, width or
    both when ``anisotropic``); the top ``per_probe``
    references of each probe are pooled; when there are more than ``max_candidates``, the
    robust correlation of the pooled images (shifts of one pooled pixel) picks the best of them.
    Scoring: :func:`robust_correlation` at full resolution, with templates of every (height,
    width) pair of ``sizes`` when ``anisotropic`` (a crop of 1-4 px from each edge is rarely
    square: height and width then shrink by different amounts), else square ones only; the
    non-square pairs score the ``refine`` best candidates by the square ones, and the best
    pair's template is then moved by up to two pixels in height and width while that helps
    (at most ``polish`` steps). Queries are matched ``query_block`` at a time.
    """

    def __init__(
        self,
        refs: np.ndarray,
        *,
        max_shift: int = 4,
        sizes: tuple[float, ...] = (1.0, 0.953, 0.906),
        smooth: float = 1.0,
        per_probe: int = 4,
        max_candidates: int = 12,
        anisotropic: bool = True,
        refine: int = 4,
        polish: int = 3,
        query_block: int = QUERY_BLOCK,
    ) -> None:
        if refs.ndim != 3 or refs.dtype != np.uint8 or refs.shape[1] != refs.shape[2]:
            raise ValueError(f"refs must be uint8 (M, R, R), got {refs.dtype} {refs.shape}")
        r = refs.shape[1]
        self.refs = refs
        self.max_shift = min(max_shift, max(0, r // 2 - 1))
        self.sizes = tuple(sorted({max(r // 2, min(r, round(f * r))) for f in sizes}, reverse=True))
        self.shapes = _size_pairs(self.sizes, anisotropic)
        self.smooth = smooth
        self.per_probe = per_probe
        self.max_candidates = max_candidates
        self.refine = refine
        self.polish = polish
        if query_block < 1:
            raise ValueError(f"query_block must be >= 1, got {query_block}")
        self.query_block = query_block
        self._pool = max(1, r // 16)
        probe = max(0, self.max_shift - 1)
        self._probe_shifts = sorted({-probe, 0, probe})
        self._probe_shapes = _size_pairs(
            tuple(sorted({r, self.sizes[-1]}, reverse=True)), anisotropic
        )
        # Blurring, then pooling, is one linear map per axis; with each probe shift folded
        # in, one product per probe image gives every shift's pooled image at once.
        self._fold = pool_matrix(r, self._pool) @ blur_matrix(r, smooth)  # (R/p, R)
        self._probe_rows = torch.cat([self._fold @ shift_matrix(r, d) for d in self._probe_shifts])
        self._index = ExactIndex(self._pooled(refs), "ip")
        self._small_refs = self._small(refs)
        rs = self._small_refs.shape[-1]
        self._small_shapes = _size_pairs(
            tuple(sorted({max(rs // 2, round(f * rs)) for f in sizes}, reverse=True)), False
        )

    def _small(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, R, R) -> uint8 (N, R/p, R/p) average-pooled (p = the pooling factor)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float()[:, None]
        with torch.inference_mode():
            y = F.avg_pool2d(x, self._pool)[:, 0].round().clamp(0, 255)
        return y.to(torch.uint8).numpy()

    def _pooled(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, R, R) -> (N, (R/p)^2) blurred, pooled, unit rows."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float()  # (N, R, R)
        with torch.inference_mode(), single_thread():
            return unit_rows(self._fold @ x @ self._fold.T)

    def _probe_bases(self, queries: np.ndarray) -> list[np.ndarray]:
        """The unshifted probe images: each query and its mirror image, at full size and
        shrunk onto a canvas filled with its mean (uint8 (Q, R, R) each)."""
        r = queries.shape[-1]
        out = []
        for img in (queries, np.ascontiguousarray(queries[:, :, ::-1])):
            for hy, hx in self._probe_shapes:
                if (hy, hx) == (r, r):
                    out.append(img)
                    continue
                t = torch.from_numpy(img).float()
                canvas = templates(t, ((hy, hx),), flips=False)[:, 0]  # (N, R, R), 0 border
                oy, ox = (r - hy) // 2, (r - hx) // 2
                mean = t.mean(dim=(1, 2), keepdim=True)
                inside = torch.zeros(r, r, dtype=torch.bool)
                inside[oy : oy + hy, ox : ox + hx] = True
                filled = torch.where(inside, canvas, mean).round().clamp(0, 255)
                out.append(filled.to(torch.uint8).numpy())
        return out

    def _probe_features(self, queries: np.ndarray) -> np.ndarray:
        """(P Q, (R/p)^2) pooled unit rows of every probe: per base image, every shift in
        ``_probe_shifts``^2 (dy, then dx), each for all queries."""
        n_s, rp, q_n = len(self._probe_shifts), self._fold.shape[0], len(queries)
        feats = []
        with torch.inference_mode(), single_thread():
            for base in self._probe_bases(queries):
                x = torch.from_numpy(np.ascontiguousarray(base)).float()  # (Q, R, R)
                y = self._probe_rows @ x @ self._probe_rows.T  # (Q, n_s R/p, n_s R/p)
                y = y.view(q_n, n_s, rp, n_s, rp).permute(1, 3, 0, 2, 4)
                feats.append(unit_rows(y.reshape(-1, rp, rp)))
        return np.concatenate(feats)

    def candidates(self, queries: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """(Q, C) int64 candidate reference indices per query, -1 padded, no repeats.

        ``exclude`` (Q,) names one reference per query never to return (-1: none).
        """
        q_n = len(queries)
        kk = min(self.per_probe + int(exclude is not None), self._index.size)
        feats = self._probe_features(queries)  # (P Q, d)
        _, idx = self._index.search(feats, kk)  # (P Q, kk)
        p_n = len(feats) // q_n
        allc = idx.reshape(p_n, q_n, kk).transpose(1, 0, 2).reshape(q_n, -1)  # (Q, P kk)
        if exclude is not None:
            allc = np.where(allc == exclude[:, None], -1, allc)
        allc = np.sort(allc, axis=1)
        dup = np.zeros_like(allc, dtype=bool)
        dup[:, 1:] = allc[:, 1:] == allc[:, :-1]
        allc[dup] = -1
        allc = -np.sort(-allc, axis=1)  # valid first, -1 last
        allc = allc[:, : max(1, int((allc >= 0).sum(axis=1).max()))]
        if allc.shape[1] <= self.max_candidates:
            return allc
        # Too many: rank them by the same robust correlation on the pooled images.
        coarse = robust_correlation(
            self._small(queries),
            self._small_refs,
            allc,
            max_shift=1,
            sizes=self._small_shapes,
        ).correlation  # (Q, C)
        order = np.lexsort((allc, -coarse), axis=-1)[:, : self.max_candidates]
        allc = np.take_along_axis(allc, order, 1)
        allc[np.take_along_axis(coarse, order, 1) == -np.inf] = -1
        return allc

    def _score(self, queries: np.ndarray, cand: np.ndarray) -> PairScores:
        """Robust correlation of each query with its candidates over every template shape.

        Square templates score all candidates; the non-square ones (about two thirds of the
        work) score only the ``refine`` best of them, where a copy's source always ranks: an
        uneven crop costs its source little under the nearest square template (0.95-0.98
        here), while the pair's fine alignment is what lifts it above the threshold.
        """
        square = tuple(s for s in self.shapes if s[0] == s[1])
        uneven = tuple(s for s in self.shapes if s[0] != s[1])
        opts = {"max_shift": self.max_shift, "smooth": self.smooth}
        ps = robust_correlation(queries, self.refs, cand, sizes=square, **opts)
        if not uneven or cand.shape[1] == 0:
            return ps
        r = min(self.refine, cand.shape[1])
        top = np.argsort(-ps.correlation, axis=1, kind="stable")[:, :r]  # (Q, r) columns
        sub = np.take_along_axis(cand, top, 1)  # (Q, r) reference indices, -1 = none
        fine = robust_correlation(queries, self.refs, sub, sizes=uneven, **opts)
        rows = np.arange(len(queries))[:, None]
        better = fine.correlation > ps.correlation[rows, top]  # (Q, r)
        qi, ci = np.nonzero(better)
        adopt(ps, qi, top[qi, ci], fine, qi, ci)
        # Hill climbing: a query whose best pair did not move has nothing new to try.
        moving = np.ones(len(queries), dtype=bool)
        for _ in range(self.polish):
            moving = self._polish(queries, cand, ps, moving)
            if not moving.any():
                break
        return ps

    def _polish(
        self, queries: np.ndarray, cand: np.ndarray, ps: PairScores, moving: np.ndarray
    ) -> np.ndarray:
        """Refine each query's best pair between the grid's sizes: the 24 template shapes up
        to two pixels taller, shorter, wider or narrower than its best, at its best
        mirroring, kept where they correlate better (one hill-climbing step). The grid is
        3 px apart, so a crop lying between two of its sizes is otherwise scored with up to
        1.5 px of misfit at the edges; two-pixel moves are needed because a template centred
        on an integer pixel moves its centre by half a pixel whenever its size changes
        parity, which a one-pixel move cannot undo.

        Only the queries marked ``moving`` (Q,) are tried: one whose best pair did not
        change since its last step would score the same shapes again. Returns (Q,) bool,
        the queries whose best pair improved."""
        r = queries.shape[-1]
        best = np.argmax(ps.correlation, axis=1)  # (Q,)
        rows = np.arange(len(queries))
        valid = np.isfinite(ps.correlation[rows, best]) & moving
        shape = np.round(ps.scale[rows, best] * r).astype(np.int64)  # (Q, 2)
        flip = ps.flip[rows, best]
        keys = np.concatenate([shape, flip[:, None].astype(np.int64)], axis=1)  # (Q, 3)
        lo, hi = r // 2, r
        improved = np.zeros(len(queries), dtype=bool)
        for hy, hx, fl in np.unique(keys[valid], axis=0):
            sel = np.flatnonzero(valid & (keys == (hy, hx, fl)).all(axis=1))
            near = tuple(
                (int(hy + a), int(hx + b))
                for a in (-2, -1, 0, 1, 2)
                for b in (-2, -1, 0, 1, 2)
                if (a, b) != (0, 0) and lo <= hy + a <= hi and lo <= hx + b <= hi
            )
            q = queries[sel][:, :, ::-1] if fl else queries[sel]
            pair = cand[sel, best[sel]][:, None]  # (n, 1)
            opts = {"max_shift": self.max_shift, "smooth": self.smooth, "flips": False}
            fine = robust_correlation(np.ascontiguousarray(q), self.refs, pair, sizes=near, **opts)
            gain = np.flatnonzero(fine.correlation[:, 0] > ps.correlation[sel, best[sel]])
            # The query was mirrored beforehand, so the pair keeps its own flip.
            adopt(ps, sel[gain], best[sel[gain]], fine, gain, 0, flip=False)
            improved[sel[gain]] = True
        return improved

    def match(
        self,
        queries: np.ndarray,
        k: int = 3,
        *,
        exclude: np.ndarray | None = None,
        with_ssim: bool = True,
    ) -> PixelMatch:
        """Top-k references of each query by robust correlation, and the best alignment.

        ``exclude`` (Q,) int64: a reference index each query must not match (-1: none), e.g.
        ``arange(M)`` when the queries are the references themselves.

        Queries are matched ``query_block`` at a time: each block holds its probe images and
        the spectra of every reference its candidates name, so memory stays that of one
        block whatever the batch (at 256 px about 1.2 MB more per query matched at once).
        """
        if (
            queries.ndim != 3
            or queries.dtype != np.uint8
            or queries.shape[1:] != self.refs.shape[1:]
        ):
            raise ValueError(f"queries must be uint8 {('N', *self.refs.shape[1:])}")
        if exclude is not None and np.shape(exclude) != (len(queries),):
            raise ValueError("exclude needs one entry per query")
        n = self.query_block
        if len(queries) > n:
            blocks = [
                self._match_block(
                    queries[b : b + n],
                    k,
                    None if exclude is None else exclude[b : b + n],
                    with_ssim,
                )
                for b in range(0, len(queries), n)
            ]
            return _joined(blocks)
        return self._match_block(queries, k, exclude, with_ssim)

    def _match_block(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None, with_ssim: bool
    ) -> PixelMatch:
        """:meth:`match` for one block of queries."""
        if len(queries) == 0:
            z = np.zeros(0, dtype=np.float32)
            return PixelMatch(
                neighbours=np.zeros((0, k), np.int64),
                scores=np.zeros((0, k), np.float32),
                shift=np.zeros((0, 2), np.int64),
                flip=np.zeros(0, bool),
                scale=np.zeros((0, 2), np.float32),
                ssim=z if with_ssim else None,
                candidates=0.0,
            )
        cand = self.candidates(queries, exclude)  # (Q, C)
        ps = self._score(queries, cand)
        # Best first; ties (and -inf padding) go to the lower reference index.
        key_idx = np.where(cand >= 0, cand, np.iinfo(np.int64).max)
        order = np.lexsort((key_idx, -ps.correlation), axis=-1)
        k_eff = min(k, cand.shape[1])
        top = order[:, :k_eff]
        neighbours = np.take_along_axis(cand, top, 1)
        scores = np.take_along_axis(ps.correlation, top, 1)
        if k_eff < k:
            neighbours = np.pad(neighbours, ((0, 0), (0, k - k_eff)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
        best = order[:, 0]
        rows = np.arange(len(queries))
        shift = ps.shift[rows, best]
        flip = ps.flip[rows, best]
        scale = ps.scale[rows, best]
        ssim_vals = None
        if with_ssim:
            found = neighbours[:, 0] >= 0
            ssim_vals = np.full(len(queries), np.nan, dtype=np.float32)
            ssim_vals[found] = aligned_ssim(
                queries[found],
                self.refs,
                neighbours[found, 0],
                shift[found],
                flip[found],
                scale[found],
            )
        return PixelMatch(
            neighbours=neighbours,
            scores=scores,
            shift=shift,
            flip=flip,
            scale=scale,
            ssim=ssim_vals,
            candidates=float((cand >= 0).sum(axis=1).mean()) if len(cand) else 0.0,
        )
