"""Correlation after affine registration: a copy that was rotated, sheared, zoomed or warped a
little still lines up with its source.

The pixel space (:mod:`synthray.models.gate.pixelmatch`) searches integer shifts, a mirror and
a few rescales; a copy rotated by a few degrees or sheared falls between those alignments and
its correlation drops to what different patients' films reach. Here each synthetic image is
registered onto each of a few candidate training images (its nearest ones in the other
spaces) by intensity-based affine registration, maximising the Pearson correlation of the two
images over a bounded transform: rotation up to 10 degrees, scale of each axis within 15 %,
shear up to 0.1, translation up to 6 px (at 64 px), each orientation (as it is and
mirrored) registered separately. This is the classic intensity-based registration of
medical images (Maes et al., "Multimodality image registration by maximization of mutual
information", IEEE TMI 1997, here with correlation, the right similarity within one modality),
solved by gradient ascent with the Lucas-Kanade gradient (Lucas and Kanade, "An Iterative
Image Registration Technique", IJCAI 1981; Baker and Matthews, "Lucas-Kanade 20 Years On",
IJCV 2004: the warped image's derivatives times the pixel coordinates), the warp sampled
with ``grid_sample`` (Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015),
coarse to fine: every candidate at 32 px (where the optimum's basin
is wider and a step is four times cheaper), then the two best per query at 64 px from there.
Both images are blurred slightly first and compared on their interior, where no border
padding enters.

Candidates: the nearest images of the other spaces, and those of a coarse search of their
own: each query rotated by -8, -4, 0, 4 and 8 degrees, and mirrored, pooled to 16 x 16 and
compared with every reference by correlation (exact search), so that a copy rotated too far
for the pixel space's shift search still finds its source among the few registered.

The score is the largest registered correlation over a query's candidates. Registration
raises every pair's correlation, copies' to about 1 and genuinely different films' by a
little; the threshold is calibrated on held-out real images registered the same way
(:func:`synthray.models.gate.memorization.check_memorization`). Images are registered at
64 px at most, so the cost does not grow with the resolution.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (conventional alias)
from torch import Tensor

from synthray.models.gate.imageops import gaussian_blur, unit_films, unit_rows
from synthray.models.gate.search import ExactIndex

SIZE = 64  # registration resolution (the fine stage); the coarse stage works at half of it
MAX_ANGLE = math.radians(10.0)
MAX_LOG_SCALE = math.log(1.15)
MAX_SHEAR = 0.1
MAX_SHIFT = 2.0 * 6.0 / SIZE  # 6 px at SIZE, in normalised coordinates
BORDER = 6  # px at SIZE left out of the correlation (half of it at the coarse stage)
COARSE_STEPS, FINE_STEPS = 30, 25
LR = 0.05
KEEP = 2  # candidates per query registered at full resolution after the coarse stage
PAIRS_PER_BATCH = 1024


PROBE_ANGLES = (-8.0, -4.0, 0.0, 4.0, 8.0)
POOLED = 16


def _rotated(x: Tensor, degrees: float, mirror: bool) -> Tensor:
    """(N, 1, S, S) -> the same rotated about the centre (and mirrored), edges repeated."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    if mirror:
        theta[:, 0] = -theta[:, 0]
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pooled_rows(x: Tensor) -> np.ndarray:
    """(N, 1, S, S) -> float32 (N, 256) pooled to 16 x 16, mean-centred, unit rows."""
    return unit_rows(F.adaptive_avg_pool2d(x, POOLED)[:, 0])


def rotation_candidates(queries: np.ndarray, references: np.ndarray, c: int) -> np.ndarray:
    """(Q, c) int64: each query's ``c`` references of highest pooled correlation with any
    rotated or mirrored probe of it, best first (-1 where there are fewer)."""
    with torch.inference_mode():
        index = ExactIndex(_pooled_rows(_prepare(references)), "ip")
        q = _prepare(queries)
        found = [
            index.search(_pooled_rows(_rotated(q, angle, mirror)), c)
            for angle in PROBE_ANGLES
            for mirror in (False, True)
        ]
    sims = np.concatenate([f[0] for f in found], axis=1)  # (Q, probes * c)
    idx = np.concatenate([f[1] for f in found], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, 1)
    out = np.full((len(queries), c), -1, dtype=np.int64)
    for r in range(len(queries)):
        _, first = np.unique(idx[r], return_index=True)
        keep = idx[r, np.sort(first)][:c]
        out[r, : len(keep)] = keep
    return out


def _prepare(images: np.ndarray) -> Tensor:
    """uint8 (N, R, R) -> float32 (N, 1, S, S) in [0, 1], area-downsampled to S <= 64."""
    return unit_films(images, SIZE)


def _theta(p: Tensor, flip: Tensor) -> Tensor:
    """(P, 6) free parameters -> (P, 2, 3) bounded affine maps (output -> input coordinates),
    the same at every resolution (normalised coordinates)."""
    t = torch.tanh(p)
    angle = MAX_ANGLE * t[:, 0]
    sx, sy = torch.exp(MAX_LOG_SCALE * t[:, 1]), torch.exp(MAX_LOG_SCALE * t[:, 2])
    shear = MAX_SHEAR * t[:, 3]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.empty(p.shape[0], 2, 3, dtype=p.dtype)
    # diag(sx * mirror, sy) @ rotation @ [[1, shear], [0, 1]]
    theta[:, 0, 0] = sx * flip * cos
    theta[:, 0, 1] = sx * flip * (cos * shear - sin)
    theta[:, 1, 0] = sy * sin
    theta[:, 1, 1] = sy * (sin * shear + cos)
    theta[:, :, 2] = MAX_SHIFT * t[:, 4:6]
    return theta


def _base_coords(size: int) -> Tensor:
    """(S*S, 3) normalised output coordinates (x, y, 1) of the pixel centres, row-major, as
    ``affine_grid`` uses them (``align_corners=False``)."""
    c = (2 * torch.arange(size, dtype=torch.float32) + 1) / size - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x.flatten(), y.flatten(), torch.ones(size * size)], dim=1)


def _gradients(r: Tensor) -> Tensor:
    """(P, 1, S, S) -> (P, 3, S, S): the image and its x and y derivatives in normalised
    coordinates (central differences, one-sided at the edges), sampled together so that one
    forward ``grid_sample`` gives the warped image and its gradient."""
    size = r.shape[-1]
    gy, gx = torch.gradient(r[:, 0], dim=(1, 2))
    return torch.stack([r[:, 0], gx * (size / 2), gy * (size / 2)], dim=1)


def _register(q: Tensor, r: Tensor, flip: Tensor, p0: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """(P, 1, S, S) queries and references (blurred) -> (P,) the best correlation of each
    query with its reference warped by a bounded affine map, and (P, 6) that map's
    parameters, by gradient ascent from ``p0``.

    The gradient is the classic Lucas-Kanade one, without autograd through the sampler: the
    warped reference's sampled x and y derivatives times the correlation's derivative with
    respect to each warped pixel, summed against the pixel coordinates for the affine
    map's six entries, then through the bounded parametrisation (a few tiny ops). One
    three-channel forward ``grid_sample`` per step replaces a forward and backward pass
    through it (about half the registration's time)."""
    size = q.shape[-1]
    border = max(1, BORDER * size // SIZE)
    inner = slice(border, size - border)
    qa = q[:, 0, inner, inner].flatten(1)  # (P, I) the query's interior
    qa = qa - qa.mean(dim=1, keepdim=True)
    qa = qa / qa.norm(dim=1, keepdim=True).clamp_min(1e-8)
    coords = _base_coords(size).view(size, size, 3)[inner, inner].reshape(-1, 3)  # (I, 3)
    stack = _gradients(r)  # (P, 3, S, S)
    n = q.shape[0]
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=LR)
    best, best_p = torch.full((n,), -1.0), p0.clone()
    for _ in range(steps):
        pv = p.detach().requires_grad_(True)
        theta = _theta(pv, flip)  # (P, 2, 3)
        # Sample at the interior's pixels only: the grid is (P, 1, I, 2).
        grid = (theta.detach().reshape(2 * n, 3) @ coords.T).view(n, 2, -1)  # (P, 2, I)
        grid = grid.transpose(1, 2).unsqueeze(1)
        s = F.grid_sample(stack, grid, mode="bilinear", padding_mode="border", align_corners=False)
        s = s[:, :, 0]  # (P, 3, I): warped image, d/dx, d/dy
        w = s[:, 0] - s[:, 0].mean(dim=1, keepdim=True)
        wn = w.norm(dim=1, keepdim=True).clamp_min(1e-8)  # (P, 1)
        w = w / wn
        rho = (qa * w).sum(dim=1)  # (P,)
        better = rho > best
        best = torch.where(better, rho, best)
        best_p = torch.where(better[:, None], p.detach(), best_p)
        g = (qa - rho[:, None] * w) / wn  # (P, I) d rho / d warped pixel
        d_grid = s[:, 1:] * g[:, None]  # (P, 2, I) d rho / d grid (x, y)
        d_theta = (d_grid.reshape(2 * n, -1) @ coords).view(n, 2, 3)
        (grad,) = torch.autograd.grad(theta, pv, grad_outputs=-d_theta)
        p.grad = grad
        opt.step()
    return best, best_p


def _in_batches(
    q: Tensor, r: Tensor, qi: Tensor, ri: Tensor, flip: Tensor, p0: Tensor, steps: int
) -> tuple[Tensor, Tensor]:
    rho, params = torch.empty(len(qi)), torch.empty(len(qi), 6)
    for s in range(0, len(qi), PAIRS_PER_BATCH):
        sl = slice(s, s + PAIRS_PER_BATCH)
        rho[sl], params[sl] = _register(q[qi[sl]], r[ri[sl]], flip[sl], p0[sl], steps)
    return rho, params


def registered_scores(
    queries: np.ndarray, references: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's best registered correlation over its candidate references.

    ``queries`` uint8 (Q, R, R), ``references`` uint8 (M, R, R), ``candidates`` (Q, C) int64
    indices into ``references`` (-1 for none, and no index twice in a row). Every candidate,
    as it is and mirrored, is registered at half resolution (coarse, which also widens the
    basin of the optimum); the ``KEEP`` best per query are then refined at full resolution
    from there. Returns (Q,)
    float32 scores (-inf where a query has no candidate) and (Q,) int64 the best candidate
    (-1 where none)."""
    n = len(candidates)
    top = np.full(n, -np.inf, dtype=np.float32)
    idx = np.full(n, -1, dtype=np.int64)
    qi_np, ci_np = np.nonzero(candidates >= 0)
    if not len(qi_np):
        return top, idx
    used = np.unique(candidates[qi_np, ci_np])
    where = np.full(int(used.max()) + 1, -1, dtype=np.int64)
    where[used] = np.arange(len(used))
    with torch.no_grad():
        fine_q, fine_r = _prepare(queries), _prepare(references[used])
        coarse_q = gaussian_blur(F.avg_pool2d(fine_q, 2), 1.0)
        coarse_r = gaussian_blur(F.avg_pool2d(fine_r, 2), 1.0)
        fine_q, fine_r = gaussian_blur(fine_q, 1.0), gaussian_blur(fine_r, 1.0)
    # Both orientations of every candidate at the coarse stage (a chest film and its mirror
    # image can correlate better than the film with a rotated copy of itself).
    qi_np, ci_np = np.concatenate([qi_np, qi_np]), np.concatenate([ci_np, ci_np])
    qi = torch.from_numpy(qi_np.astype(np.int64))
    ri = torch.from_numpy(where[candidates[qi_np, ci_np]])
    half = len(qi_np) // 2
    flip = torch.cat([torch.ones(half), -torch.ones(half)])
    p0 = torch.zeros(len(qi), 6)
    rho, params = _in_batches(coarse_q, coarse_r, qi, ri, flip, p0, COARSE_STEPS)
    # Per query, the KEEP best pairs of the coarse stage, refined at full resolution.
    order = np.lexsort((-rho.numpy(), qi_np))
    rank = np.arange(len(order)) - np.searchsorted(qi_np[order], qi_np[order], side="left")
    keep = np.sort(order[rank < KEEP])
    k = torch.from_numpy(keep)
    fine, _ = _in_batches(fine_q, fine_r, qi[k], ri[k], flip[k], params[k], FINE_STEPS)
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    np.maximum.at(scores, (qi_np[keep], ci_np[keep]), fine.numpy())
    best = np.argmax(scores, axis=1)
    top = scores[np.arange(n), best]
    idx = np.where(np.isfinite(top), candidates[np.arange(n), best], -1)
    return top, idx
