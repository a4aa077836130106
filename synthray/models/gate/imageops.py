"""Image operations of the pixel gate: films as [0, 1] tensors at a bounded size, Gaussian
blur, standardisation, SSIM, the matrices of blurring, pooling and edge-replicated shifts,
and unit-norm rows.

The structural similarity (SSIM, Wang et al., "Image Quality Assessment: From Error Visibility to
Structural Similarity", IEEE TIP 2004) uses their 11x11 Gaussian window, sigma 1.5, K1 = 0.01,
K2 = 0.03, on raw grey levels. Blurs and windows are small matrix products, so no convolution
kernel choice changes a result.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (conventional alias)


def unit_films(images: np.ndarray, max_side: int) -> torch.Tensor:
    """uint8 (N, R, R) -> float32 (N, 1, S, S) in [0, 1], area-downsampled to S = ``max_side``
    when R is larger (S = R otherwise)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None]
    if x.shape[-1] > max_side:
        x = F.interpolate(x, size=(max_side, max_side), mode="area")
    return x


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


def blur_matrix(r: int, sigma: float) -> torch.Tensor:
    """(R, R) B with B @ x @ B.T = :func:`gaussian_blur` (x, sigma); the identity for sigma 0."""
    return _blur_matrix(r, sigma) if sigma > 0 else torch.eye(r)


def pool_matrix(r: int, p: int) -> torch.Tensor:
    """(R // p, R) A with A @ x @ A.T = average pooling of x over p x p blocks (a remainder
    of R / p dropped, as ``avg_pool2d``)."""
    a = torch.zeros(r // p, r)
    for i in range(r // p):
        a[i, i * p : (i + 1) * p] = 1.0 / p
    return a


def shift_matrix(r: int, d: int) -> torch.Tensor:
    """(R, R) S with S @ x = x moved down by d, edge rows repeated (x @ S.T moves it right)."""
    s = torch.zeros(r, r)
    s[torch.arange(r), (torch.arange(r) - d).clamp(0, r - 1)] = 1.0
    return s


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


def unit_rows(x: torch.Tensor) -> np.ndarray:
    """(N, ...) -> float32 (N, D) rows mean-centred and L2-normalised (zero rows stay zero)."""
    f = x.reshape(len(x), -1).double()
    f = f - f.mean(dim=1, keepdim=True)
    n = f.norm(dim=1, keepdim=True)
    return torch.where(n > 1e-9, f / n.clamp_min(1e-9), torch.zeros_like(f)).float().numpy()
