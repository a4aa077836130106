"""Shift-, flip- and crop-robust pixel correlation, SSIM, and the nearest training images by both.

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

Candidates come from exact searches (:mod:`synthray.models.search`) of 16x16 pooled images with
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

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (conventional alias)

from synthray.models.search import ExactIndex, single_thread

_ELEMS = 1 << 22  # bounds the temporaries (see synthray.models.search)


@functools.lru_cache(maxsize=16)
def _blur_matrix(r: int, sigma: float) -> torch.Tensor:
    """(R, R) matrix B with B @ x = x blurred along one axis (Gaussian, reflect at the edges)."""
    radius = max(1, round(3 * sigma))
    g = _gaussian_window(2 * radius + 1, sigma).double()
    m = torch.zeros(r, r, dtype=torch.float64)
    for i in range(r):
        for k in range(-radius, radius + 1):
            j = i + k
            while j < 0 or j >= r:  # reflect without repeating the edge (numpy "reflect")
                j = -j if j < 0 else 2 * (r - 1) - j
            m[i, j] += g[k + radius]
    return m.float()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, R, R) float -> (N, R, R) blurred with a Gaussian of ``sigma`` pixels (separable,
    3 sigma radius, reflected edges), as two small matmuls."""
    if sigma <= 0:
        return x
    b = _blur_matrix(x.shape[-1], sigma)  # (R, R)
    return b @ x @ b.T


def standardise(images: np.ndarray, smooth: float = 0.0) -> torch.Tensor:
    """uint8 (N, R, R) -> float32 (N, R, R), each image with zero mean and unit variance.

    Pearson correlation is unchanged by this; it keeps the windowed sums small so that fp32
    does not cancel. A constant image becomes all zeros. ``smooth`` > 0 first blurs with a
    Gaussian of that sigma (pixels), which suppresses pixel noise more than anatomy.
    """
    x = gaussian_blur(torch.from_numpy(np.ascontiguousarray(images)).float(), smooth)
    x = x - x.mean(dim=(1, 2), keepdim=True)
    sd = x.square().mean(dim=(1, 2), keepdim=True).sqrt()  # (N, 1, 1)
    return torch.where(sd > 1e-6, x / sd.clamp_min(1e-6), torch.zeros_like(x))


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
    shifts.
    """

    def __init__(self, r: int, max_shift: int) -> None:
        self.r, self.s = r, max_shift
        self.n = _fft_size(r + max_shift)
        d = np.arange(-max_shift, max_shift + 1) % self.n
        self.rows = torch.from_numpy(d)  # (2s+1,) indices of the shifts in the output

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """(..., R, R) -> (..., N, N/2 + 1) complex."""
        return torch.fft.rfft2(x, s=(self.n, self.n))

    def cross(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """Spectra (..., N, N/2+1) broadcast -> (..., S) correlations at the (2s+1)^2 shifts."""
        full = torch.fft.irfft2(fa * fb.conj(), s=(self.n, self.n))  # (..., N, N)
        sub = full.index_select(-2, self.rows).index_select(-1, self.rows)  # (..., 2s+1, 2s+1)
        return sub.reshape(*sub.shape[:-2], -1)


def _shapes(sizes: tuple) -> tuple[tuple[int, int], ...]:
    """Template sizes as (height, width) pairs: an int h stands for (h, h)."""
    out = []
    for s in sizes:
        hy, hx = (s, s) if isinstance(s, int | np.integer) else s
        out.append((int(hy), int(hx)))
    return tuple(out)


def _templates(x: torch.Tensor, shapes: tuple[tuple[int, int], ...], flips: bool) -> torch.Tensor:
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


def _adopt(
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
        for qs in range(0, q_n if used.size else 0, step):
            tmpl = _templates(
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
    corr[~valid] = -np.inf
    variant, shift_i = best // n_s, best % n_s
    return PairScores(
        correlation=corr,
        shift=shifts[shift_i],
        flip=variant >= n_z,
        scale=(np.asarray(shapes, dtype=np.float32) / r)[variant % n_z],  # (Q, C, 2)
    )


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return (g / g.sum()).float()  # (size,)


def _valid_conv_matrix(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n - len(g) + 1, n) matrix applying the window g at every fully inside position."""
    k = len(g)
    m = torch.zeros(n - k + 1, n, dtype=g.dtype)
    for i in range(n - k + 1):
        m[i, i : i + k] = g
    return m


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Mean SSIM of image pairs (N, H, W) on Wang et al.'s 11x11 Gaussian window (valid part).

    SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 +
    sigma_y^2 + C2)), C1 = (0.01 L)^2, C2 = (0.03 L)^2, averaged over the map (their MSSIM).
    Images smaller than the window use a window as large as they are.
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"need two (N, H, W) stacks of the same shape, got {a.shape}, {b.shape}")
    h, w = a.shape[1:]
    size = min(11, h, w)
    g = _gaussian_window(size).double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x = torch.stack([a, b, a * a, b * b, a * b], dim=1).double()  # (N, 5, H, W)
    n = x.shape[0]
    flat = _valid_conv_matrix(h, g) @ x @ _valid_conv_matrix(w, g).T  # (N, 5, H', W')
    mu_a, mu_b, e_aa, e_bb, e_ab = flat.reshape(n, 5, *flat.shape[2:]).unbind(1)
    var_a = e_aa - mu_a**2
    var_b = e_bb - mu_b**2
    cov = e_ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean(dim=(1, 2)).float()  # (N,)


def _aligned_pair(
    q: np.ndarray, t: np.ndarray, dy: int, dx: int, hy: int, hx: int
) -> tuple[np.ndarray, np.ndarray]:
    """The parts of q's hy x hx centred canvas and of t that align at shift (dy, dx)."""
    r = t.shape[-1]
    canvas = _templates(torch.from_numpy(q), ((hy, hx),), flips=False)[:, 0].numpy()  # (n, R, R)
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


def _pixel_shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(N, R, R) moved down by dy and right by dx, edges replicated."""
    if dy == 0 and dx == 0:
        return images
    m = max(abs(dy), abs(dx))
    r = images.shape[-1]
    padded = np.pad(images, ((0, 0), (m, m), (m, m)), mode="edge")
    return padded[:, m - dy : m - dy + r, m - dx : m - dx + r]


def _unit_rows(x: torch.Tensor) -> np.ndarray:
    """(N, ...) -> float32 (N, D) rows mean-centred and L2-normalised (zero rows stay zero)."""
    f = x.reshape(len(x), -1).double()
    f = f - f.mean(dim=1, keepdim=True)
    n = f.norm(dim=1, keepdim=True)
    return torch.where(n > 1e-9, f / n.clamp_min(1e-9), torch.zeros_like(f)).float().numpy()


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
    (at most ``polish`` steps).
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
        self._pool = max(1, r // 16)
        probe = max(0, self.max_shift - 1)
        self._probe_shifts = sorted({-probe, 0, probe})
        self._probe_shapes = _size_pairs(
            tuple(sorted({r, self.sizes[-1]}, reverse=True)), anisotropic
        )
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
        x = torch.from_numpy(np.ascontiguousarray(images)).float()  # (N, R, R)
        with torch.inference_mode(), single_thread():
            x = F.avg_pool2d(gaussian_blur(x, self.smooth)[:, None], self._pool)[:, 0]
            return _unit_rows(x)  # (N, (R / pool)^2)

    def _probes(self, queries: np.ndarray) -> list[np.ndarray]:
        r = queries.shape[-1]
        out = []
        for img in (queries, np.ascontiguousarray(queries[:, :, ::-1])):
            for hy, hx in self._probe_shapes:
                if (hy, hx) == (r, r):
                    base = img
                else:
                    t = torch.from_numpy(img).float()
                    canvas = _templates(t, ((hy, hx),), flips=False)[:, 0]  # (N, R, R), 0 border
                    oy, ox = (r - hy) // 2, (r - hx) // 2
                    mean = t.mean(dim=(1, 2), keepdim=True)
                    inside = torch.zeros(r, r, dtype=torch.bool)
                    inside[oy : oy + hy, ox : ox + hx] = True
                    filled = torch.where(inside, canvas, mean).round().clamp(0, 255)
                    base = filled.to(torch.uint8).numpy()
                for dy in self._probe_shifts:
                    for dx in self._probe_shifts:
                        out.append(_pixel_shift(base, dy, dx))
        return out

    def candidates(self, queries: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """(Q, C) int64 candidate reference indices per query, -1 padded, no repeats.

        ``exclude`` (Q,) names one reference per query never to return (-1: none).
        """
        q_n = len(queries)
        kk = min(self.per_probe + int(exclude is not None), self._index.size)
        probes = self._probes(queries)
        feats = np.concatenate([self._pooled(p) for p in probes])  # (P Q, d)
        _, idx = self._index.search(feats, kk)  # (P Q, kk)
        p_n = len(probes)
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
        _adopt(ps, qi, top[qi, ci], fine, qi, ci)
        for _ in range(self.polish):
            if not self._polish(queries, cand, ps):
                break
        return ps

    def _polish(self, queries: np.ndarray, cand: np.ndarray, ps: PairScores) -> bool:
        """Refine each query's best pair between the grid's sizes: the 24 template shapes up
        to two pixels taller, shorter, wider or narrower than its best, at its best
        mirroring, kept where they correlate better (one hill-climbing step; True if any
        pair improved). The grid is 3 px apart, so a crop lying between two of its sizes is
        otherwise scored with up to 1.5 px of misfit at the edges; two-pixel moves are
        needed because a template centred on an integer pixel moves its centre by half a
        pixel whenever its size changes parity, which a one-pixel move cannot undo."""
        r = queries.shape[-1]
        best = np.argmax(ps.correlation, axis=1)  # (Q,)
        rows = np.arange(len(queries))
        valid = np.isfinite(ps.correlation[rows, best])
        shape = np.round(ps.scale[rows, best] * r).astype(np.int64)  # (Q, 2)
        flip = ps.flip[rows, best]
        keys = np.concatenate([shape, flip[:, None].astype(np.int64)], axis=1)  # (Q, 3)
        lo, hi = r // 2, r
        improved = False
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
            _adopt(ps, sel[gain], best[sel[gain]], fine, gain, 0, flip=False)
            improved |= len(gain) > 0
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
        """
        if (
            queries.ndim != 3
            or queries.dtype != np.uint8
            or queries.shape[1:] != self.refs.shape[1:]
        ):
            raise ValueError(f"queries must be uint8 {('N', *self.refs.shape[1:])}")
        if exclude is not None and np.shape(exclude) != (len(queries),):
            raise ValueError("exclude needs one entry per query")
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
