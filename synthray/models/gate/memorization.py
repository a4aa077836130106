"""The memorization check: does a synthetic image copy a training image?

Every synthetic image is compared with every training image (exact search: approximate indexes
missed the true neighbour for a fifth or more of the queries here, which is unfit for a privacy
check), in up to three spaces: a shift-, flip- and crop-robust Pearson correlation of pixels
(:mod:`synthray.models.gate.pixelmatch`), so a re-exposed, moved or cropped copy still scores
about 1; optionally, a learned copy-detection embedding
(:mod:`synthray.models.gate.copydetect`); and the correlation after a bounded affine
registration onto the nearest candidates of the other spaces
(:mod:`synthray.models.gate.register`), so a rotated, sheared or warped copy scores about 1
too. The thresholds are calibrated together on a holdout
set of real images the generator never saw: a synthetic image closer to a training image than
almost all genuinely new images are is flagged. This is the distance-to-closest-record idea of
Park et al., "Data Synthesis based on Generative Adversarial Networks", VLDB 2018, applied to
images as in the memorization analysis of Carlini et al., "Extracting Training Data from
Diffusion Models", USENIX Security 2023. The report also carries alignment evidence,
distance-to-closest-record and authenticity. The exact search behind it is
:mod:`synthray.models.gate.search`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from synthray.models.gate.patients import keys_or_films, one_film_each
from synthray.models.gate.pixelmatch import PixelMatcher
from synthray.models.gate.register import registered_scores, rotation_candidates
from synthray.models.gate.search import ExactIndex

_FEATURE_CHUNK = 4096
# Nearest training images per space that each image is registered onto: the embedding,
# trained to ignore rotations, finds a rotated copy's source more often than the others.
REGISTER_FROM_PIXEL, REGISTER_FROM_EMBEDDING, REGISTER_FROM_PROBES = 2, 6, 2


def pixel_shift_range(resolution: int) -> int:
    """The pixel space's shift search, 4 px at 64 px and scaled with the resolution (8 px at
    128, 16 at 256), so that it covers the same share of the film at every size. At 128 px
    a 4 px search missed 1 of 20 planted copies shifted by up to 8 px; an 8 px one caught
    all 20, with as many held-out films flagged and no measurable extra cost."""
    return max(4, round(4 * resolution / 64))


def pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, R, R) -> float32 (N, R*R), each row mean-centred and L2-normalised.

    The dot product of two rows is the Pearson correlation of the two images' pixels. A constant
    image has no correlation with anything and becomes the zero vector.
    """
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, R, R), got {images.shape}")
    n = images.shape[0]
    d = images.shape[1] * images.shape[2]
    out = np.empty((n, d), dtype=np.float32)  # (N, D)
    for start in range(0, n, _FEATURE_CHUNK):
        x = images[start : start + _FEATURE_CHUNK].reshape(-1, d).astype(np.float32)  # (n, D)
        x -= x.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
        np.divide(x, norm, out=x, where=norm > 1e-6)
        x[norm[:, 0] <= 1e-6] = 0.0
        out[start : start + len(x)] = x
    return out


def _check_images(name: str, images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{name} must be a uint8 array of shape (N, R, R)")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")


Embedder = Callable[[np.ndarray], np.ndarray]  # uint8 (N, R, R) -> float32 (N, d) unit rows


@dataclass
class MemorizationReport:
    """Per-image evidence and batch figures of :func:`check_memorization`.

    ``flagged`` is the union over spaces. Pixel-space figures (robust correlation) are
    ``scores["pixel"]``, ``thresholds["pixel"]`` and the ``neighbours`` by that score.
    """

    quantile: float  # asked for: about 1 - quantile of new real images are flagged
    spaces: list[str]  # "pixel", "embedding" with an embedder, "registered" when registering
    thresholds: dict[str, float]
    space_quantile: float  # per-space holdout quantile behind the thresholds
    holdout_scores: dict[str, np.ndarray]  # (H,) each holdout image's nearest-train score
    holdout_flagged_fraction: float  # holdout images above some threshold (in-sample)
    scores: dict[str, np.ndarray]  # (Q,) nearest-train score per space
    flagged_by: dict[str, np.ndarray]  # (Q,) bool per space
    flagged: np.ndarray  # (Q,) bool: some space exceeds its threshold
    neighbours: np.ndarray  # (Q, k) int64 train indices by robust pixel correlation, best first
    neighbour_similarities: np.ndarray  # (Q, k) float32
    best_shift: np.ndarray  # (Q, 2) int64 (dy, dx), see synthray.models.gate.pixelmatch
    best_flip: np.ndarray  # (Q,) bool
    best_scale: np.ndarray  # (Q, 2) float32 template (height, width) / R
    ssim: np.ndarray  # (Q,) float32 SSIM at the best alignment (evidence, not a decision)
    embedding_neighbours: np.ndarray | None  # (Q, k) int64 train indices by embedding
    embedding_similarities: np.ndarray | None  # (Q, k) float32 cosine
    registered_neighbours: np.ndarray | None  # (Q,) int64 train index of the best registration
    dcr_train_share: float  # robust pixel space, train sample as large as the holdout set
    authentic: np.ndarray  # (Q,) bool, Alaa et al. 2022 (robust pixel space)
    authenticity: float  # fraction of authentic synthetic images

    @property
    def flagged_fraction(self) -> float:
        return float(self.flagged.mean()) if len(self.flagged) else 0.0


def _union_thresholds(holdout: dict[str, np.ndarray], quantile: float) -> tuple[dict, float]:
    """Per-space thresholds at one common holdout rank, so that about ``1 - quantile`` of new
    holdout-like images exceed at least one of them.

    Each holdout image's score becomes its rank in its space; the image's largest rank over the
    spaces is its rank under "any space exceeds". The split-conformal rule (Vovk et al.,
    "Algorithmic Learning in a Random World", 2005; Angelopoulos and Bates, "A Gentle
    Introduction to Conformal Prediction", 2021) takes the ceil((H + 1) q)-th smallest of those
    (capped at H), and each space's threshold is its score at that rank.
    """
    h = len(next(iter(holdout.values())))
    ranks = {}
    for name, v in holdout.items():
        ordered = np.sort(v)
        ranks[name] = np.searchsorted(ordered, v, side="right")  # (H,) 1..H, ties share the top
    worst = np.max(np.stack(list(ranks.values())), axis=0)  # (H,)
    kth = min(h, math.ceil((h + 1) * quantile))
    m = int(np.sort(worst)[kth - 1])
    thresholds = {name: float(np.sort(v)[m - 1]) for name, v in holdout.items()}
    return thresholds, m / h


def _embedding_nn(
    embedder: Embedder, train_e: ExactIndex, images: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of images and their mirror images, merged: (sims, idx)."""
    e = embedder(images)  # (N, d)
    e_flip = embedder(np.ascontiguousarray(images[:, :, ::-1]))  # (N, d)
    s1, i1 = train_e.search(e, k)
    s2, i2 = train_e.search(e_flip, k)
    s = np.concatenate([s1, s2], axis=1)  # (N, 2k)
    i = np.concatenate([i1, i2], axis=1)
    order = np.lexsort((i, -s), axis=-1)
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    out_s = np.empty((len(images), k), dtype=np.float32)
    out_i = np.empty((len(images), k), dtype=np.int64)
    for r in range(len(images)):  # drop an index found by both the image and its mirror
        _, first = np.unique(i[r], return_index=True)
        keep = np.sort(first)[:k]
        out_s[r, : len(keep)], out_i[r, : len(keep)] = s[r, keep], i[r, keep]
        out_s[r, len(keep) :], out_i[r, len(keep) :] = -np.inf, -1
    return out_s, out_i


def _distinct(candidates: np.ndarray) -> np.ndarray:
    """(N, C) candidate indices with repeats within a row replaced by -1 (scored once)."""
    out = candidates.copy()
    for r in range(len(out)):
        _, first = np.unique(out[r], return_index=True)
        repeat = np.ones(out.shape[1], dtype=bool)
        repeat[first] = False
        out[r, repeat] = -1
    return out


def _dcr_share(
    synthetic: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    max_shift: int,
    seed: int,
    train_keys: np.ndarray | None = None,
    holdout_keys: np.ndarray | None = None,
) -> float:
    """Share of synthetic images closer to a sample of training patients than to as many
    held-out patients, one film of each (seeded), by robust pixel correlation. The two
    sides must be alike but for membership: drawn by film, a held-out side of a few
    often-imaged patients covers less ground than a training side of many, and the share
    rises with nothing memorized (NIH demo: 0.62-0.69 by film, 0.51-0.60 by patient).
    Without keys each film counts as a patient."""
    rng = np.random.default_rng(seed)
    t_pick = one_film_each(keys_or_films(train_keys, train.shape[0]), rng)
    h_pick = one_film_each(keys_or_films(holdout_keys, holdout.shape[0]), rng)
    n_ref = min(len(t_pick), len(h_pick))
    t_ref = np.sort(rng.permutation(t_pick)[:n_ref])
    h_ref = np.sort(rng.permutation(h_pick)[:n_ref])
    # Square templates only: the share compares two distances measured the same way, and the
    # anisotropic ones (for crop detection) would triple its cost without changing its meaning.
    to_sample = PixelMatcher(train[t_ref], max_shift=max_shift, anisotropic=False).match(
        synthetic, 1, with_ssim=False
    )
    to_hold = PixelMatcher(holdout[h_ref], max_shift=max_shift, anisotropic=False).match(
        synthetic, 1, with_ssim=False
    )
    return float(np.mean(to_sample.scores[:, 0] > to_hold.scores[:, 0]))


def _nearest_other(matcher: PixelMatcher, train: np.ndarray, which: np.ndarray) -> np.ndarray:
    """(len(which),) float32: robust pixel correlation of each train[which] with its nearest
    *other* training image (-inf where there is none)."""
    if train.shape[0] < 2 or not len(which):
        return np.full(len(which), -np.inf, dtype=np.float32)
    return matcher.match(train[which], 1, exclude=which, with_ssim=False).scores[:, 0]


def _authentic(best: np.ndarray, score: np.ndarray, own: np.ndarray) -> np.ndarray:
    """(Q,) bool: synthetic j is authentic unless score_j > rho(i*, its nearest other train
    image) = own[i*], i* = best[j] (Alaa et al. 2022, with the training-side lookup by i*);
    authentic where j has no training neighbour (best -1)."""
    return (best < 0) | (score <= own[np.where(best >= 0, best, 0)])


@dataclass
class Calibration:
    """What the check learns from the held-out images, whatever the synthetic batch.

    ``holdout_scores`` are each held-out image's nearest-training scores per space, from which
    the thresholds follow for any quantile; ``train_embeddings`` are the copy-detection
    embeddings of the training images (None without an embedder); ``train_nearest_other``
    is what the authenticity figure needs of the training set, filled in by the checks as
    they need it (a robust pixel search of a training image among the others costs as much
    as checking a synthetic image; all of them at once would cost several batches' worth).
    ``params`` records how they were computed (image counts, resolution, spaces, shift
    range), and
    :func:`check_memorization` refuses a calibration whose ``params`` differ from its own.
    It depends only on the training and held-out images, the embedder and the parameters,
    so it can be computed once per dataset version and reused
    (:mod:`synthray.models.gate.calibration`).
    """

    holdout_scores: dict[str, np.ndarray]  # (H,) float32 per space
    train_embeddings: np.ndarray | None  # (M, d) float32 unit rows
    params: dict
    # (M,) float32: each training image's robust pixel correlation with its nearest other
    # training image, the training side of the authenticity test; NaN until a check needed
    # it (each check fills in what it computed, see check_memorization). None: per check.
    train_nearest_other: np.ndarray | None = None


def calibration_params(
    train: np.ndarray, holdout: np.ndarray, embedder: object, max_shift: int, register: bool
) -> dict:
    spaces = ["pixel"] + (["embedding"] if embedder is not None else [])
    return {
        "train": int(train.shape[0]),
        "holdout": int(holdout.shape[0]),
        "resolution": int(train.shape[1]),
        "spaces": spaces + (["registered"] if register else []),
        "max_shift": int(max_shift),
        "candidates": [REGISTER_FROM_PIXEL, REGISTER_FROM_EMBEDDING, REGISTER_FROM_PROBES],
    }


def _as_embedder(embedder: Embedder | nn.Module | None) -> Embedder | None:
    if isinstance(embedder, nn.Module):
        from synthray.models.gate.copydetect import CopyDetectNet, embed

        if not isinstance(embedder, CopyDetectNet):
            raise TypeError("embedder must be a CopyDetectNet or a function of uint8 images")
        model = embedder
        return lambda x: embed(model, x)
    return embedder


def _candidate_counts(m: int, register: bool) -> tuple[int, int]:
    """Nearest training images per image kept for registration, by pixels and by embedding
    (one each without registration), for ``m`` training images."""
    if not register:
        return 1, 1
    return min(REGISTER_FROM_PIXEL, m), min(REGISTER_FROM_EMBEDDING, m)


def _check_inputs(synthetic: np.ndarray | None, train: np.ndarray, holdout: np.ndarray) -> None:
    named = [("train", train), ("holdout", holdout)]
    if synthetic is not None:
        named.insert(0, ("synthetic", synthetic))
    for name, arr in named:
        _check_images(name, arr)
    shapes = {arr.shape[1:] for _, arr in named}
    if len(shapes) != 1:
        names = ", ".join(name for name, _ in named)
        raise ValueError(f"{names} differ in resolution: {sorted(shapes)}")
    if train.shape[1] != train.shape[2]:
        raise ValueError("images must be square")


def _holdout_side(
    matcher: PixelMatcher,
    train: np.ndarray,
    holdout: np.ndarray,
    embedding: tuple[Embedder, ExactIndex] | None,
    register: bool,
) -> dict[str, np.ndarray]:
    """Each held-out image's nearest-training score per space, computed exactly as the
    synthetic images' scores are (same candidates per image), so the thresholds compare like
    with like."""
    m = train.shape[0]
    c, ce = _candidate_counts(m, register)
    hold = matcher.match(holdout, c, with_ssim=False)
    scores = {"pixel": hold.scores[:, 0]}
    cand = [hold.neighbours[:, :c]]
    if embedding is not None:
        hold_e, hold_ei = _embedding_nn(*embedding, holdout, ce)
        scores["embedding"] = hold_e[:, 0]
        cand.append(hold_ei[:, :ce])
    if register:
        cand.append(rotation_candidates(holdout, train, min(REGISTER_FROM_PROBES, m)))
        scores["registered"], _ = registered_scores(
            holdout, train, _distinct(np.concatenate(cand, axis=1))
        )
    return {name: np.asarray(v, dtype=np.float32) for name, v in scores.items()}


def calibrate(
    train: np.ndarray,
    holdout: np.ndarray,
    *,
    embedder: Embedder | nn.Module | None = None,
    max_shift: int = 4,
    register: bool = True,
) -> Calibration:
    """The held-out side of :func:`check_memorization` on its own (see :class:`Calibration`)."""
    _check_inputs(None, train, holdout)
    embedder = _as_embedder(embedder)
    matcher = PixelMatcher(train, max_shift=max_shift)
    train_emb, embedding = None, None
    if embedder is not None:
        train_emb = embedder(train)
        embedding = (embedder, ExactIndex(train_emb, "ip"))
    return Calibration(
        holdout_scores=_holdout_side(matcher, train, holdout, embedding, register),
        train_embeddings=train_emb,
        params=calibration_params(train, holdout, embedder, max_shift, register),
        train_nearest_other=np.full(train.shape[0], np.nan, dtype=np.float32),
    )


def check_memorization(
    synthetic: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    *,
    quantile: float = 0.95,
    embedder: Embedder | nn.Module | None = None,
    k: int = 3,
    max_shift: int = 4,
    with_ssim: bool = True,
    batch_figures: bool = True,
    seed: int = 0,
    register: bool = True,
    calibration: Calibration | None = None,
    train_keys: np.ndarray | None = None,
    holdout_keys: np.ndarray | None = None,
) -> MemorizationReport:
    """Flag synthetic images that copy a training image, in every similarity space at once.

    Spaces: "pixel", the shift/flip/crop-robust Pearson correlation of
    :class:`synthray.models.gate.pixelmatch.PixelMatcher`; and, given an ``embedder`` (a
    :class:`synthray.models.gate.copydetect.CopyDetectNet` or a function from uint8 images to unit
    vectors), "embedding", the larger cosine similarity of the image or its mirror image with
    the nearest training embedding; and, with ``register``, "registered", the best
    correlation after a bounded affine registration onto any of its nearest training
    images in each other space and in a search with rotated probes
    (:mod:`synthray.models.gate.register`; rotated, sheared and warped copies). Each space's
    threshold is calibrated on the holdout
    images' nearest-train scores, computed the same way, so that about ``1 - quantile`` of new
    real images are flagged by at least one space (:func:`_union_thresholds`); an image is
    flagged when any space exceeds its threshold.

    Batch figures: ``dcr_train_share``, the share of synthetic images closer (robust pixel
    correlation) to a sample of training patients than to as many held-out patients, one
    film each (``train_keys`` / ``holdout_keys``: the films' patient keys; 0.5 is ideal),
    and ``authenticity`` after Alaa et al., "How Faithful is your Synthetic Data?
    Sample-level Metrics for Evaluating and Auditing Generative Models", ICML 2022: synthetic
    image j with nearest training image i* = NN(j) is unauthentic when
    d(j, i*) < d(i*, NN_train(i*)), the distance from i* to its nearest *other* training image
    (distances d = sqrt(2 - 2 rho) from the robust correlation, so the test compares rho). The
    training-side distance is indexed by i*, the training image, not by j. Both cost about as
    much as the check itself; ``batch_figures=False`` skips them (NaN, and ``authentic`` all
    True).

    ``calibration``: the held-out side computed beforehand by :func:`calibrate` with the same
    images, embedder and parameters; without it the check computes it (about as much work
    again as checking as many synthetic images as there are held-out ones). With the batch
    figures, the check fills in the calibration's ``train_nearest_other`` entries it
    computed, so that a caller who keeps the calibration (the check jobs store it again)
    spares later checks that work.
    """
    _check_inputs(synthetic, train, holdout)
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, train.shape[0])
    embedder = _as_embedder(embedder)
    params = calibration_params(train, holdout, embedder, max_shift, register)
    if calibration is not None and calibration.params != params:
        raise ValueError(
            f"the calibration was computed with {calibration.params}, this check needs {params}"
        )

    m = train.shape[0]
    c, ce = _candidate_counts(m, register)
    matcher = PixelMatcher(train, max_shift=max_shift)
    syn = matcher.match(synthetic, max(k, c), with_ssim=with_ssim)
    scores = {"pixel": syn.scores[:, 0]}
    syn_cand = [syn.neighbours[:, :c]]
    emb_s = emb_i = embedding = None
    if embedder is not None:
        train_emb = calibration.train_embeddings if calibration is not None else None
        train_e = ExactIndex(train_emb if train_emb is not None else embedder(train), "ip")
        embedding = (embedder, train_e)
        emb_s, emb_i = _embedding_nn(embedder, train_e, synthetic, max(k, ce))
        scores["embedding"] = emb_s[:, 0]
        syn_cand.append(emb_i[:, :ce])
        emb_s, emb_i = emb_s[:, :k], emb_i[:, :k]
    reg_i = None
    if register:
        syn_cand.append(rotation_candidates(synthetic, train, min(REGISTER_FROM_PROBES, m)))
        scores["registered"], reg_i = registered_scores(
            synthetic, train, _distinct(np.concatenate(syn_cand, axis=1))
        )
    if calibration is None:
        holdout_scores = _holdout_side(matcher, train, holdout, embedding, register)
    else:
        holdout_scores = calibration.holdout_scores
    thresholds, space_q = _union_thresholds(holdout_scores, quantile)
    flagged_by = {name: scores[name] > thresholds[name] for name in scores}
    flagged = np.any(np.stack(list(flagged_by.values())), axis=0)
    hold_flagged = np.any(
        np.stack([holdout_scores[n] > thresholds[n] for n in holdout_scores]), axis=0
    )

    dcr_share, authentic = math.nan, np.ones(len(synthetic), dtype=bool)
    if batch_figures:
        dcr_share = _dcr_share(synthetic, train, holdout, max_shift, seed, train_keys, holdout_keys)
        best = syn.neighbours[:, 0]
        own = calibration.train_nearest_other if calibration is not None else None
        if own is None:
            own = np.full(m, np.nan, dtype=np.float32)
        needed = np.unique(best[best >= 0])
        needed = needed[np.isnan(own[needed])]
        own[needed] = _nearest_other(matcher, train, needed)  # kept in the calibration
        authentic = _authentic(best, scores["pixel"], own)

    return MemorizationReport(
        quantile=quantile,
        spaces=list(scores),
        thresholds=thresholds,
        space_quantile=space_q,
        holdout_scores=holdout_scores,
        holdout_flagged_fraction=float(hold_flagged.mean()),
        scores=scores,
        flagged_by=flagged_by,
        flagged=flagged,
        neighbours=syn.neighbours[:, :k],
        neighbour_similarities=syn.scores[:, :k],
        best_shift=syn.shift,
        best_flip=syn.flip,
        best_scale=syn.scale,
        ssim=syn.ssim if syn.ssim is not None else np.full(len(synthetic), np.nan, np.float32),
        embedding_neighbours=emb_i,
        embedding_similarities=emb_s,
        registered_neighbours=reg_i,
        dcr_train_share=dcr_share,
        authentic=authentic,
        authenticity=float(authentic.mean()) if batch_figures else math.nan,
    )
