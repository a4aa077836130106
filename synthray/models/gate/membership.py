"""Membership-inference audit: can an attacker tell the generator's training patients from
patients it never saw?

Members are training images, non-members held-out images of unseen patients. Each attack
gives every real image a score (higher: "more likely a member"); its strength is the AUROC of
members against non-members and the true-positive rate at a 1% false-positive rate, the figure
Carlini et al. argue for ("Membership Inference Attacks From First Principles", IEEE S&P
2022): an attack that finds a few members with certainty matters more than a small average
edge.

Attacks:

- ``nearest-synthetic`` in every similarity space: a real image close to some synthetic image
  is likely a member (the distance-to-closest-synthetic attack of Hilprecht et al., "Monte
  Carlo and Reconstruction Membership Inference Attacks against Generative Models", PoPETs
  2019; Chen et al., "GAN-Leaks", CCS 2020, full black-box). Needs the synthetic images only:
  it is what a partner holding the bundle could run.
- ``reconstruction``: the generator itself is asked to reproduce the image, by optimising its
  input (GAN-Leaks' white-box attack): members are reproduced better. For the latent flow the
  optimised input is the decoder's latent grid; for a GAN its noise vector.
- ``flow-loss``: for the latent flow, the flow-matching loss of the reconstructed latent under
  its class, at fixed times and noises: members' latents were regressed on and have lower
  loss (the loss attack on diffusion models of Matsumoto et al., "Membership Inference
  Attacks against Diffusion Models", IEEE SPW 2023).

Every attack also runs as a control: the non-members halved, one half posing as
members. Nothing tells them apart, so the control's AUROC must sit near 0.5; if it does not,
the attack is measuring something other than membership (class mix, image size, chance).
Every nearest-synthetic attack also runs as a space control: real films of training patients
who are not members stand in for the synthetic images. A space learned from the training
films can place members nearer any film than unseen patients' films with no generator
involved (an over-optimistic attack the first control cannot show, since both its sides are
unseen); the space control's AUROC is that part.
Members are drawn to the class mix of the non-members, for the same reason. The unit is the
patient: one film per patient, and no patient on both sides of any comparison
(``draw_groups``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from synthray.models.gate.patients import keys_or_films, one_film_each
from synthray.models.gate.pixelmatch import PixelMatcher
from synthray.models.gate.search import ExactIndex
from synthray.models.runtime import cpu_autocast, to_channels_last

GOAL_AUROC = 0.55
GOAL_TPR = 0.02
FPR = 0.01
BOOTSTRAP = 200
NULL_ROUNDS = 1000
# Fewer non-members than 1 / FPR put the 1% FPR threshold above every one of them: the TPR
# there is not measured, and the audit cannot pass.
MIN_NONMEMBERS = math.ceil(1 / FPR)


class TooFewImages(ValueError):
    """The held-out or training set is too small to draw the audit's groups."""


@dataclass(frozen=True)
class Space:
    """A feature space for the nearest-synthetic attack: ``embed`` maps uint8 (N, R, R) to
    float32 (N, d); ``metric`` ``"ip"`` for unit vectors (cosine), ``"l2"`` otherwise."""

    name: str
    embed: Callable[[np.ndarray], np.ndarray]
    metric: str = "ip"


# ------------------------------------------------------------------------ statistics
def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting one half (Mann-Whitney)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("both groups need at least one score")
    ranks = rankdata(np.concatenate([pos, neg]))  # tied scores share their mean rank
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = FPR) -> float:
    """Share of members scoring above a threshold that at most ``fpr`` of non-members pass
    (floor(fpr * N) of them; with fewer than 1 / fpr non-members, none)."""
    neg_sorted = np.sort(np.asarray(neg, np.float64))[::-1]
    allowed = math.floor(fpr * len(neg_sorted) + 1e-9)
    threshold = neg_sorted[allowed] if allowed < len(neg_sorted) else -np.inf
    return float(np.mean(np.asarray(pos, np.float64) > threshold))


def auroc_interval(
    pos: np.ndarray, neg: np.ndarray, seed: int = 0, n: int = BOOTSTRAP
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the AUROC (both groups resampled)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.asarray(pos), np.asarray(neg)
    values = [
        auroc(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))])
        for _ in range(n)
    ]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def figures(pos: np.ndarray, neg: np.ndarray, seed: int = 0) -> dict[str, Any]:
    lo, hi = auroc_interval(pos, neg, seed)
    return {
        "auroc": round(auroc(pos, neg), 4),
        "auroc_interval": [round(lo, 4), round(hi, 4)],
        "tpr_at_1pct_fpr": round(tpr_at_fpr(pos, neg), 4),
    }


def worst_tpr_null(
    scores: list[np.ndarray], n_members: int, n_nonmembers: int, seed: int, rounds: int
) -> np.ndarray:
    """(rounds,) the worst TPR at 1% FPR over every attack when membership is a coin toss:
    the member and non-member labels (one film per patient, so one label per patient) are
    permuted together for all attacks
    (so their correlation is kept, the max-T permutation test of Westfall and Young,
    "Resampling-Based Multiple Testing", 1993). ``scores``: per attack, (members +
    non-members,) in that order, NaN for films the attack left out."""
    rng = np.random.default_rng(seed)
    total = n_members + n_nonmembers
    out = np.empty(rounds)
    for r in range(rounds):
        perm = rng.permutation(total)
        worst = 0.0
        for s in scores:
            m, h = s[perm[:n_members]], s[perm[n_members:]]
            m, h = m[~np.isnan(m)], h[~np.isnan(h)]
            if len(m) and len(h):
                worst = max(worst, tpr_at_fpr(m, h))
        out[r] = worst
    return out


# ------------------------------------------------------------------------ groups
@dataclass(frozen=True)
class Groups:
    """Indices of the groups, one film per patient: members (into the training images) and
    non-members (into the held-out images), as many of each per class; and the control, the
    non-members halved: ``control`` posing as members against ``control_nonmembers``. How
    many patients each side had to draw from."""

    members: np.ndarray
    nonmembers: np.ndarray
    control: np.ndarray
    control_nonmembers: np.ndarray
    train_patients: int
    holdout_patients: int


def draw_groups(
    train_labels: np.ndarray,
    holdout_labels: np.ndarray,
    per_group: int,
    seed: int = 0,
    train_keys: np.ndarray | None = None,
    holdout_keys: np.ndarray | None = None,
) -> Groups:
    """Patients, not films, are the unit: each patient gives one film drawn at random (its
    class is that film's). Per class, the non-members are the held-out patients and the
    members as many training patients, both capped so that each group holds at most
    ``per_group``; the control halves the non-members (stratified by class).

    One patient's films look alike (same body, often the same day). Films drawn without
    regard to patient make a handful of often-imaged patients weigh as much as dozens of
    others, and a control split by film puts the same patients on both sides, where it
    cannot show that; the statistics (bootstrap, permutation) also assume independent
    draws, which patients are and films are not. Without keys every film counts as its own
    patient. Held-out patients are what a site has fewest of, and the 1% FPR threshold
    rests on them: every one is a non-member (the control reuses them), rather than a
    third of them each for non-members and control."""
    rng = np.random.default_rng(seed)
    train_pick = one_film_each(keys_or_films(train_keys, len(train_labels)), rng)
    hold_pick = one_film_each(keys_or_films(holdout_keys, len(holdout_labels)), rng)
    members, nonmembers, control, control_rest = [], [], [], []
    quota = {}
    for c in np.unique(holdout_labels[hold_pick]):
        n_hold = int((holdout_labels[hold_pick] == c).sum())
        quota[int(c)] = min(n_hold, int((train_labels[train_pick] == c).sum()))
    scale = min(1.0, per_group / max(sum(quota.values()), 1))
    for c, q in quota.items():
        take = math.floor(q * scale)
        if take < 2:  # the control needs a patient on each side
            continue
        hold = rng.permutation(hold_pick[holdout_labels[hold_pick] == c])[:take]
        nonmembers.append(hold)
        control.append(hold[: take // 2])
        control_rest.append(hold[take // 2 :])
        members.append(rng.choice(train_pick[train_labels[train_pick] == c], take, replace=False))
    if not members:
        raise TooFewImages("too few held-out or training patients for a membership audit")
    return Groups(
        members=np.sort(np.concatenate(members)),
        nonmembers=np.sort(np.concatenate(nonmembers)),
        control=np.sort(np.concatenate(control)),
        control_nonmembers=np.sort(np.concatenate(control_rest)),
        train_patients=len(train_pick),
        holdout_patients=len(hold_pick),
    )


def reference_films(
    members: np.ndarray, train_keys: np.ndarray | None, n_train: int, size: int, seed: int
) -> np.ndarray:
    """(<= size,) sorted indices into the training images of patients who are not among
    the members (``members``: their films' indices), drawn at random: one film each of up
    to ``size`` such patients, and where there are fewer patients than ``size``, their
    other films as well, until ``size`` or every such film. The real films that stand in
    for the synthetic images in the space control (see :func:`audit`), as many as the
    synthetic images where the site has them: a nearest-image search over a smaller set
    finds farther neighbours for every film, and the control would then differ from the
    attack by its size too."""
    keys = keys_or_films(train_keys, n_train)
    rng = np.random.default_rng(seed + 7919)
    outside = ~np.isin(keys, keys[members])
    first = one_film_each(keys, rng)
    first = rng.permutation(first[outside[first]])[:size]
    if len(first) < size:
        rest = np.flatnonzero(outside)
        rest = rng.permutation(rest[~np.isin(rest, first)])[: size - len(first)]
        first = np.concatenate([first, rest])
    return np.sort(first)


# ------------------------------------------------------------------------ attacks
def nearest_synthetic_pixel(synthetic: np.ndarray, real: np.ndarray) -> np.ndarray:
    """(N,) the best shift/flip/crop-robust pixel correlation of each real image with any
    synthetic image (the gate's pixel space)."""
    matcher = PixelMatcher(synthetic, anisotropic=False)
    return matcher.match(real, 1, with_ssim=False).scores[:, 0].astype(np.float64)


def nearest_embedded(metric: str, synthetic: np.ndarray, real: np.ndarray) -> np.ndarray:
    """(N,) similarity of each real image's features to the nearest synthetic image's
    (both (n, d) float32, embedded in one space): cosine for ``ip``, minus the Euclidean
    distance for ``l2``."""
    index = ExactIndex(np.ascontiguousarray(synthetic, np.float32), metric)
    scores, _ = index.search(np.ascontiguousarray(real, np.float32), 1)
    s = scores[:, 0].astype(np.float64)
    return s if metric == "ip" else -np.sqrt(np.maximum(s, 0.0))


def nearest_by_draw(
    nearest: Callable[[np.ndarray, np.ndarray], np.ndarray],
    synthetic: np.ndarray,
    real: np.ndarray,
    draws: np.ndarray | None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``nearest(synthetic, real)`` over all the synthetic images, and the same within each
    draw alone (``draws``: each synthetic image's draw; none, or one draw: no per-draw
    scores). Searched draw by draw, at the cost of one search over all: the nearest image of
    all is the nearest of the draws' nearest ones."""
    if draws is None or len(np.unique(draws)) < 2:
        return nearest(synthetic, real), []
    by_draw = [nearest(synthetic[draws == d], real) for d in np.unique(draws)]
    return np.max(by_draw, axis=0), by_draw


def _to_tensor(images: np.ndarray) -> Tensor:
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]  # (N, 1, R, R)


def _is_latent_flow(generator: nn.Module) -> bool:
    return all(hasattr(generator, a) for a in ("decoder", "velocity", "latent_mean"))


def _invert(
    forward: Callable[[Tensor], Tensor], start: Tensor, target: Tensor, steps: int, lr: float
) -> tuple[Tensor, Tensor]:
    """Adam on the input of ``forward`` so that it reproduces ``target``; returns the input and
    the per-image mean absolute error."""
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        with cpu_autocast():  # bf16 where the CPU has bf16 units, else fp32
            out = forward(x)
        err = (out.float() - target).abs().flatten(1).mean(1)  # (B,)
        opt.zero_grad(set_to_none=True)
        err.sum().backward()
        opt.step()
    with torch.no_grad():
        err = (forward(x).float().clamp(-1.0, 1.0) - target).abs().flatten(1).mean(1)
    return x.detach(), err


def generator_scores(
    generator: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int = 20,
    lr: float = 0.1,
    batch: int = 128,
    seed: int = 0,
    flow_times: int = 8,
    flow_noises: int = 4,
) -> dict[str, np.ndarray]:
    """Attack scores that use the generator's weights: ``reconstruction`` (minus the error
    of the best reproduction of each image) and, for the latent flow, ``flow-loss`` (minus
    the flow-matching loss of that reproduction's latent under the image's class). ``labels``
    index the generator's classes."""
    net: Any = to_channels_last(copy.deepcopy(generator).float().eval())
    for p in net.parameters():
        p.requires_grad_(False)
    cfg: Any = net.cfg
    flow = _is_latent_flow(net)
    g = torch.Generator().manual_seed(seed)
    recon, losses = [], []
    if flow:
        c, s = cfg.latent_channels, cfg.latent_size
        mean, std = net.latent_mean.float(), net.latent_std.float()
        noises = torch.randn(flow_noises, c, s, s, generator=g)  # the same for every image
        times = torch.linspace(0.05, 0.95, flow_times).tolist()
    for start in range(0, len(images), batch):
        x = _to_tensor(images[start : start + batch])  # (b, 1, R, R)
        y = torch.from_numpy(labels[start : start + batch].astype(np.int64))
        b = x.shape[0]
        if flow:
            z0, err = _invert(
                lambda lat: net.decoder(lat * std + mean), torch.zeros(b, c, s, s), x, steps, lr
            )
            with torch.no_grad():
                loss = torch.zeros(b)
                for t in times:
                    tt = torch.full((b,), t)
                    for e in noises:
                        zt = (1.0 - t) * z0 + t * e
                        v = net.velocity(zt, tt, y).float()
                        loss += (v - (e - z0)).pow(2).flatten(1).mean(1)
            losses.append(-(loss / (len(times) * len(noises))).numpy())
        else:
            z = torch.randn(b, cfg.z_dim, generator=g)
            _, err = _invert(partial(net, y=y), z, x, steps, lr * 0.5)
        recon.append(-err.numpy())
    out = {"reconstruction": np.concatenate(recon).astype(np.float64)}
    if flow:
        out["flow-loss"] = np.concatenate(losses).astype(np.float64)
    return out


# ------------------------------------------------------------------------ the audit
def audit(
    synthetic: np.ndarray,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    holdout_images: np.ndarray,
    holdout_labels: np.ndarray,
    *,
    spaces: list[Space],
    generator: nn.Module | None = None,
    generator_classes: dict[int, int] | None = None,
    train_keys: np.ndarray | None = None,
    holdout_keys: np.ndarray | None = None,
    per_group: int = 500,
    seed: int = 0,
    inversion_steps: int = 20,
    draws: np.ndarray | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every attack against members vs non-members, and as a control against two disjoint
    non-member sets; every nearest-synthetic attack also as a space control, with real
    films of training patients who are not members in place of the synthetic images.
    Labels index the dataset's classes; ``generator_classes`` maps those to the generator's
    own class ids (members and non-members of other classes are left out of the generator
    attacks). ``train_keys`` and ``holdout_keys``: the films' patient keys
    (one film per patient per group; without them every film counts as a patient).
    ``draws``: each synthetic image's draw, where the images come from several draws
    alike; every nearest-synthetic attack then also gives its AUROC with each draw alone
    (``auroc_by_draw``), which shows how far one draw's chance moves it.
    Returns a JSON-ready dict with a verdict against the goals."""
    groups = draw_groups(train_labels, holdout_labels, per_group, seed, train_keys, holdout_keys)
    stacked = np.concatenate([train_images[groups.members], holdout_images[groups.nonmembers]])
    stacked_y = np.concatenate([train_labels[groups.members], holdout_labels[groups.nonmembers]])
    n = len(groups.members)
    # The control's two halves, as positions among the non-members' scores.
    ctrl = np.searchsorted(groups.nonmembers, groups.control)
    ctrl_rest = np.searchsorted(groups.nonmembers, groups.control_nonmembers)

    def say(msg: str) -> None:
        if on_progress is not None:
            on_progress(msg)

    attacks: list[dict[str, Any]] = []
    member_nonmember: list[np.ndarray] = []  # per attack, for the permutation null

    def add(
        name: str,
        space: str,
        scores: np.ndarray,
        keep: np.ndarray | None = None,
        real_in_place: np.ndarray | None = None,
        by_draw: list[np.ndarray] | None = None,
    ) -> None:
        both = np.asarray(scores, np.float64).copy()
        if keep is not None:
            both[~keep] = np.nan  # left out of the figures and of every permuted draw
        member_nonmember.append(both)
        m, h = both[:n], both[n:]
        c, ch = h[ctrl], h[ctrl_rest]
        m, h, c, ch = (x[~np.isnan(x)] for x in (m, h, c, ch))
        attack = {
            "attack": name,
            "space": space,
            **figures(m, h, seed),
            "control": figures(c, ch, seed + 1),
            "members": len(m),
            "nonmembers": len(h),
        }
        if real_in_place is not None:
            attack["space_control"] = figures(real_in_place[:n], real_in_place[n:], seed + 2)
        if by_draw:
            attack["auroc_by_draw"] = [round(auroc(d[:n], d[n:]), 4) for d in by_draw]
        attacks.append(attack)

    def nearest_attack(
        space: str,
        nearest: Callable[[np.ndarray, np.ndarray], np.ndarray],
        embed: Callable[[np.ndarray], np.ndarray] = lambda images: images,
    ) -> None:
        real = embed(stacked)
        scores, by_draw = nearest_by_draw(nearest, embed(synthetic), real, draws)
        in_place = nearest(embed(reference), real) if len(reference) else None
        add("nearest-synthetic", space, scores, real_in_place=in_place, by_draw=by_draw)

    # The space control's stand-ins (module docstring); none when every training patient
    # is a member.
    reference_idx = reference_films(
        groups.members, train_keys, len(train_images), len(synthetic), seed
    )
    reference = train_images[reference_idx]
    say("membership audit: nearest synthetic image, pixel space")
    nearest_attack("pixel", nearest_synthetic_pixel)
    for space in spaces:
        say(f"membership audit: nearest synthetic image, {space.name} space")
        nearest_attack(space.name, partial(nearest_embedded, space.metric), space.embed)
    if generator is not None:
        say("membership audit: inverting the generator on members and non-members")
        mapping = generator_classes or {int(c): int(c) for c in np.unique(stacked_y)}
        keep = np.isin(stacked_y, list(mapping))
        gen_y = np.array([mapping.get(int(v), 0) for v in stacked_y], dtype=np.int64)
        scores = generator_scores(
            generator, stacked[keep], gen_y[keep], steps=inversion_steps, seed=seed
        )
        for name, s in scores.items():
            full = np.full(len(stacked), np.nan)
            full[keep] = s
            add(name, "generator", full, keep)

    worst_auroc = max(a["auroc"] for a in attacks)
    worst_tpr = max(a["tpr_at_1pct_fpr"] for a in attacks)
    control_worst = max(abs(a["control"]["auroc"] - 0.5) for a in attacks)
    null = worst_tpr_null(member_nonmember, n, len(groups.nonmembers), seed, NULL_ROUNDS)
    conclusive = len(groups.nonmembers) >= MIN_NONMEMBERS
    return {
        "unit": "patient (one film each)",
        "members": n,
        "nonmembers": len(groups.nonmembers),
        # The control: the non-members halved, this many posing as members.
        "control_nonmembers": len(groups.control),
        # The space control's stand-ins: real films of training patients who are not
        # members (one each first), as many as the synthetic images where the site has them.
        "space_control_films": len(reference),
        "space_control_patients": len(
            np.unique(keys_or_films(train_keys, len(train_images))[reference_idx])
        ),
        "train_patients": groups.train_patients,
        "holdout_patients": groups.holdout_patients,
        "synthetic": len(synthetic),
        "synthetic_draws": 1 if draws is None else max(1, len(np.unique(draws))),
        "attacks": attacks,
        "worst_auroc": worst_auroc,
        "worst_tpr_at_1pct_fpr": worst_tpr,
        "control_worst_distance_from_half": round(control_worst, 4),
        "goal": {"auroc": GOAL_AUROC, "tpr_at_1pct_fpr": GOAL_TPR},
        "conclusive": conclusive,
        "min_nonmembers": MIN_NONMEMBERS,
        "passed": bool(conclusive and worst_auroc <= GOAL_AUROC and worst_tpr <= GOAL_TPR),
        # With N non-members the 1% FPR threshold rests on floor(N / 100) of them.
        "tpr_resolution": round(1.0 / max(n, 1), 4),
        # What chance alone gives the worst attack at these group sizes (labels permuted):
        # a worst TPR inside this spread is no evidence of membership leakage, and a goal
        # below its 95th percentile cannot be told from chance with so few films.
        "worst_tpr_by_chance": {
            "median": round(float(np.median(null)), 4),
            "p95": round(float(np.percentile(null, 95)), 4),
            "above_goal": round(float(np.mean(null > GOAL_TPR)), 4),
            # worst_tpr is rounded to 4 decimals: half a unit of slack keeps ties as ties.
            "p_value": round(float((1 + np.sum(null >= worst_tpr - 5e-5)) / (1 + len(null))), 4),
            "rounds": len(null),
        },
        "seed": seed,
    }


# ------------------------------------------------------------------------ re-identification
REID_PRECISION = 0.95
MIN_REID_PAIRS = 10


def reidentification(
    embed: Callable[[np.ndarray], np.ndarray],
    synthetic: np.ndarray,
    train_images: np.ndarray,
    train_keys: np.ndarray,
    holdout_images: np.ndarray,
    holdout_keys: np.ndarray,
    *,
    precision: float = REID_PRECISION,
) -> dict[str, Any]:
    """Would a patient re-identification network confidently name a training patient for a
    synthetic image?

    ``embed`` is a re-identification embedding (uint8 (N, R, R) -> unit rows; the
    copy-detection embedding is trained with two films of one patient as positives, after
    Packhaeuser et al., Scientific Reports 2022). Its confidence is calibrated on held-out
    patients, whom it never saw: each held-out film is searched among every training film
    and every other held-out film; where its nearest film is of the same patient, it was
    re-identified. The threshold is the lowest similarity above which at least
    ``precision`` of nearest films are the same patient. Reported: that threshold, how many
    held-out films of multi-film patients it re-identifies (the network's strength), the
    share of synthetic images whose nearest training film scores above it (re-identified
    as that patient), and, as a control, the share of held-out films of single-film
    patients above it (no true match exists for them)."""
    train_keys, holdout_keys = np.asarray(train_keys), np.asarray(holdout_keys)
    ref = np.ascontiguousarray(
        np.concatenate([embed(train_images), embed(holdout_images)]), np.float32
    )
    ref_keys = np.concatenate([train_keys, holdout_keys])
    n_train = len(train_images)
    index = ExactIndex(ref, "ip")
    sims, idx = index.search(ref[n_train:], 2)  # the film itself first (or an exact twin)
    own = n_train + np.arange(len(holdout_images))
    first_is_self = idx[:, 0] == own
    nn_sim = np.where(first_is_self, sims[:, 1], sims[:, 0])
    nn_idx = np.where(first_is_self, idx[:, 1], idx[:, 0])
    same = ref_keys[nn_idx] == holdout_keys
    _, counts = np.unique(holdout_keys, return_counts=True)
    multi = np.isin(holdout_keys, np.unique(holdout_keys)[counts > 1])
    if int(same.sum()) < MIN_REID_PAIRS:
        return {
            "skipped": f"only {int(same.sum())} held-out films were matched to another film "
            f"of their patient (at least {MIN_REID_PAIRS} needed to calibrate confidence)",
            "holdout_multi_film": int(multi.sum()),
        }
    order = np.argsort(-nn_sim, kind="stable")
    running = np.cumsum(same[order]) / np.arange(1, len(order) + 1)  # precision above each
    # The lowest threshold at which the films above it still hold the target precision.
    ok = np.flatnonzero(running >= precision)
    top = int(ok[-1]) + 1 if len(ok) else 0
    threshold = float(nn_sim[order[top - 1]]) if top > 0 else math.inf
    confident = nn_sim >= threshold
    syn_index = ExactIndex(ref[:n_train], "ip")
    syn_sim, _ = syn_index.search(np.ascontiguousarray(embed(synthetic), np.float32), 1)
    hold_to_train, _ = syn_index.search(ref[n_train:], 1)
    single = ~multi
    return {
        "threshold": round(threshold, 4) if math.isfinite(threshold) else None,
        "precision_target": precision,
        "calibration_films": len(holdout_images),
        "holdout_multi_film": int(multi.sum()),
        "top1_same_patient": round(float(same[multi].mean()), 4) if multi.any() else None,
        "reidentified_with_confidence": round(float((confident & same)[multi].mean()), 4)
        if multi.any()
        else None,
        "synthetic_reidentified": round(float((syn_sim[:, 0] >= threshold).mean()), 4),
        "synthetic": len(synthetic),
        "control_single_film_above": round(float((hold_to_train[single, 0] >= threshold).mean()), 4)
        if single.any()
        else None,
        "control_single_film": int(single.sum()),
    }
