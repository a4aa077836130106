"""Membership-inference audit: the statistics, the groups, and the attacks against real
films, a generator that copies and one that memorized its few training films."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import load_nih

from synthray.app.exports import privacy
from synthray.app.exports.privacy import false_flag_interval
from synthray.app.registry import summary
from synthray.models.gate import membership as mia
from synthray.models.gate.memorization import pixel_features
from synthray.models.generators.config import TrainConfig
from synthray.models.generators.files import load_generator, save_generator
from synthray.models.generators.sampling import sample_images
from synthray.models.generators.training import train_generator


def _films(n: int) -> np.ndarray:
    """The first ``n`` NIH films of distinct patients."""
    images, patients = load_nih()
    _, first = np.unique(patients, return_index=True)
    return images[np.sort(first)[:n]]


def test_auroc_counts_pairs_and_halves_ties() -> None:
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 6, 40).astype(float)
    neg = rng.integers(0, 6, 50).astype(float)
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert mia.auroc(pos, neg) == pytest.approx(pairs)
    assert mia.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert mia.auroc(np.ones(5), np.ones(7)) == 0.5


def test_tpr_at_fpr_allows_one_percent_of_non_members() -> None:
    neg = np.arange(200, dtype=float)  # 2 of 200 may pass: threshold 197, passing 198, 199
    pos = np.array([196.0, 197.0, 197.5, 250.0])
    assert mia.tpr_at_fpr(pos, neg) == pytest.approx(0.5)
    assert mia.tpr_at_fpr(np.array([1e9]), np.arange(50.0)) == 1.0  # 0 may pass: above max
    assert mia.tpr_at_fpr(np.array([49.0]), np.arange(50.0)) == 0.0


def test_groups_are_disjoint_equal_and_class_matched() -> None:
    rng = np.random.default_rng(1)
    train_y = rng.integers(0, 3, 500)
    hold_y = np.r_[np.zeros(60), np.ones(20), np.full(7, 2)].astype(int)
    g = mia.draw_groups(train_y, hold_y, per_group=1000, seed=0)
    # Every held-out film is a non-member; as many members; the control halves them.
    assert len(g.members) == len(g.nonmembers) == 60 + 20 + 7
    assert not set(g.control) & set(g.control_nonmembers)
    assert set(g.control) | set(g.control_nonmembers) == set(g.nonmembers)
    for c in range(3):
        assert (train_y[g.members] == c).sum() == (hold_y[g.nonmembers] == c).sum()
        assert (hold_y[g.control] == c).sum() == (hold_y[g.nonmembers] == c).sum() // 2
    small = mia.draw_groups(train_y, hold_y, per_group=20, seed=0)
    assert len(small.members) <= 20 and len(small.nonmembers) == len(small.members)
    # One held-out film per class cannot be both a control member and its non-member.
    with pytest.raises(mia.TooFewImages):
        mia.draw_groups(train_y, np.array([0, 1, 2]), per_group=20)


def test_groups_count_patients_once_and_keep_them_on_one_side() -> None:
    rng = np.random.default_rng(3)
    # 120 training patients with 1-5 films; 80 held-out patients, one of them with 40 films.
    train_keys = np.repeat([f"t{i}" for i in range(120)], rng.integers(1, 6, 120))
    hold_keys = np.r_[np.repeat("heavy", 40), [f"h{i}" for i in range(79)]]
    train_y = rng.integers(0, 2, len(train_keys))
    hold_y = rng.integers(0, 2, len(hold_keys))
    g = mia.draw_groups(train_y, hold_y, 1000, 0, train_keys, hold_keys)
    assert (g.train_patients, g.holdout_patients) == (120, 80)
    for group, keys in ((g.members, train_keys), (g.nonmembers, hold_keys)):
        assert len(set(keys[group])) == len(group)  # one film per patient
    assert not set(hold_keys[g.control_nonmembers]) & set(hold_keys[g.control])
    assert len(g.nonmembers) == 80  # by film, the 40 would be half of them
    # Without keys every film is a patient: the heavy patient's films land on both sides.
    films = mia.draw_groups(train_y, hold_y, 1000, 0)
    assert len(films.nonmembers) == 119
    assert {"heavy"} <= set(hold_keys[films.control]) & set(hold_keys[films.control_nonmembers])


def test_one_often_imaged_patient_fakes_leakage_by_film_but_not_by_patient() -> None:
    """Synthetic images that are other patients' films leak nothing. A held-out patient
    with 60 films unlike any of them fills most of the non-member group when films are
    drawn, pulling the non-members' scores down: by film the attack "finds" members (an
    AUROC far above 0.5) and the film-split control, with that patient on both sides, does
    not show it. Counted by patient, that patient is one of 61 and the AUROC is near 0.5."""
    films = _films(260)
    synthetic, train, pool = films[:80], films[80:180], films[180:]
    scores = mia.nearest_synthetic_pixel(synthetic, pool)
    odd = pool[np.argmin(scores)]  # the held-out film least like any synthetic one
    rng = np.random.default_rng(4)
    repeats = np.clip(odd.astype(float) + rng.normal(0, 3, (60, 64, 64)), 0, 255)
    others = np.delete(pool, np.argmin(scores), axis=0)[:60]
    hold = np.concatenate([others, repeats.astype(np.uint8)])
    hold_keys = np.r_[[f"h{i}" for i in range(60)], np.repeat("often-imaged", 60)]
    train_keys = np.array([f"t{i}" for i in range(len(train))])
    zeros_t, zeros_h = np.zeros(len(train), np.int64), np.zeros(len(hold), np.int64)
    by_film = mia.audit(synthetic, train, zeros_t, hold, zeros_h, spaces=[], per_group=120)
    by_patient = mia.audit(
        synthetic,
        train,
        zeros_t,
        hold,
        zeros_h,
        spaces=[],
        per_group=120,
        train_keys=train_keys,
        holdout_keys=hold_keys,
    )
    assert by_film["attacks"][0]["auroc"] > 0.65
    assert abs(by_film["attacks"][0]["control"]["auroc"] - 0.5) < 0.15
    assert by_patient["unit"] == "patient (one film each)"
    assert by_patient["holdout_patients"] == 61 and by_patient["nonmembers"] == 61
    assert 0.3 < by_patient["attacks"][0]["auroc"] < 0.65
    # 61 non-members cannot measure a TPR at 1% FPR: the audit says so and does not pass.
    assert by_patient["conclusive"] is False and not by_patient["passed"]
    assert by_patient["min_nonmembers"] == mia.MIN_NONMEMBERS == 100  # the bound it states
    verdict = summary.audit_verdict(by_patient)
    assert "inconclusive: 61 non-member patients" in verdict and "needs 100" in verdict


def test_nearest_synthetic_attack_finds_copies_and_nothing_else() -> None:
    films = _films(240)
    train, hold, fresh = films[:80], films[80:160], films[160:]
    zeros = np.zeros(80, dtype=np.int64)
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 6, size=(40, 64, 64))
    # Copies of exactly half the members the audit will draw (same seed, same draw), and
    # of 20 training films it will not.
    members = mia.draw_groups(zeros, zeros, 40, 0).members
    others = np.setdiff1d(np.arange(80), members)
    copied = np.r_[members[:20], others[:20]]
    copies = np.clip(train[copied].astype(float) + noise, 0, 255).astype(np.uint8)
    leaky = mia.audit(copies, train, zeros, hold, zeros, spaces=[], per_group=40)
    (pixel,) = leaky["attacks"]
    assert pixel["attack"] == "nearest-synthetic" and pixel["space"] == "pixel"
    # Half the members were copied: they are found at 1% false positives.
    assert pixel["auroc"] > 0.7 and pixel["tpr_at_1pct_fpr"] >= 0.25
    assert abs(pixel["control"]["auroc"] - 0.5) < 0.2
    # Real films of other training patients in place of the copies find no one.
    assert abs(pixel["space_control"]["auroc"] - 0.5) < 0.2
    assert pixel["space_control"]["tpr_at_1pct_fpr"] < 0.2
    assert not leaky["passed"]
    # Copies of half the members are far outside what chance gives.
    assert leaky["worst_tpr_by_chance"]["p_value"] < 0.01
    assert leaky["worst_tpr_by_chance"]["p95"] < pixel["tpr_at_1pct_fpr"]
    # Films of other patients as "synthetic" images: nothing to tell members by.
    clean = mia.audit(fresh, train, zeros, hold, zeros, spaces=[], per_group=40)
    assert 0.3 < clean["attacks"][0]["auroc"] < 0.7
    assert clean["attacks"][0]["tpr_at_1pct_fpr"] < 0.2
    assert clean["worst_tpr_by_chance"]["p_value"] > 10 * leaky["worst_tpr_by_chance"]["p_value"]


def test_each_draw_alone_shows_how_far_one_draw_moves_the_attack() -> None:
    """Synthetic images from two draws: the second holds noisy copies of half the members,
    the first only films of other patients. Each attack is scored with both draws together
    (the nearest image of all is the nearer of each draw's nearest) and with each alone."""
    films = _films(240)
    train, hold, fresh = films[:80], films[80:160], films[160:]
    zeros = np.zeros(80, dtype=np.int64)
    members = mia.draw_groups(zeros, zeros, 40, 0).members
    noise = np.random.default_rng(3).normal(0, 6, size=(20, 64, 64))
    copies = np.clip(train[members[:20]].astype(float) + noise, 0, 255).astype(np.uint8)
    synthetic = np.concatenate([fresh[:20], copies])
    draws = np.repeat([0, 1], 20)
    flat = mia.Space("flat", lambda x: x.reshape(len(x), -1).astype(np.float32), "l2")
    out = mia.audit(synthetic, train, zeros, hold, zeros, spaces=[flat], per_group=40, draws=draws)
    together = mia.audit(synthetic, train, zeros, hold, zeros, spaces=[flat], per_group=40)
    assert out["synthetic_draws"] == 2 and together["synthetic_draws"] == 1
    for a, b in zip(out["attacks"], together["attacks"], strict=True):
        assert a["auroc"] == b["auroc"] and a["tpr_at_1pct_fpr"] == b["tpr_at_1pct_fpr"]
        first, second = a["auroc_by_draw"]
        assert abs(first - 0.5) < 0.2 and second > 0.7
        assert "auroc_by_draw" not in b
    scorecard = "\n".join(privacy._by_draw(out))
    worst = max(a["auroc_by_draw"][1] for a in out["attacks"])
    assert "40 synthetic images are 2 draws alike" in scorecard and f"{worst:.3f}" in scorecard
    assert privacy._by_draw(together) == []


def test_a_space_fitted_to_the_members_shows_itself_in_the_space_control() -> None:
    """An encoder trained on the training films may place them nearer everything than it
    places unseen patients' films: the nearest-synthetic attack in its space then finds
    "members" with no generator memorizing anything. The space control (real films of other
    training patients in place of the synthetic images) shows the same separation."""
    films = _films(240)
    train, hold, fresh = films[:80], films[80:160], films[160:]
    zeros = np.zeros(80, dtype=np.int64)
    known = {f.tobytes() for f in train}

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float32) / 255.0

    centre = flat(train).mean(0)

    def fitted(x: np.ndarray) -> np.ndarray:  # pulls the films it was fitted on inwards
        f = flat(x)
        seen = np.array([img.tobytes() in known for img in x])
        f[seen] = 0.5 * f[seen] + 0.5 * centre
        return f

    # Films of unseen patients as the "synthetic" images: nothing was memorized.
    out = mia.audit(
        fresh, train, zeros, hold, zeros, spaces=[mia.Space("fitted", fitted, "l2")], per_group=40
    )
    pixel, space = out["attacks"]
    assert space["auroc"] > 0.65 and space["space_control"]["auroc"] > 0.65
    assert abs(space["control"]["auroc"] - 0.5) < 0.2  # the non-member halves cannot show it
    assert abs(pixel["space_control"]["auroc"] - 0.5) < 0.2
    # The real films standing in: training patients, none of them a member.
    groups = mia.draw_groups(zeros, zeros, 40, 0)
    reference = mia.reference_films(groups.members, None, 80, 80, 0)
    assert len(reference) == 40 and not np.isin(reference, groups.members).any()
    keys = np.repeat(np.arange(40), 2)  # two films per patient
    members = mia.draw_groups(zeros, zeros, 20, 0, keys, None).members
    others = 40 - len(members)  # patients who are not members
    # Fewer such patients than asked for: one film each, then their second films.
    for size, patients in ((others - 5, others - 5), (others + 5, others), (80, others)):
        reference = mia.reference_films(members, keys, 80, size, 0)
        assert not np.isin(keys[reference], keys[members]).any()
        assert len(reference) == min(size, 2 * others) == len(np.unique(reference))
        assert len(np.unique(keys[reference])) == patients


def test_chance_gives_a_worst_tpr_above_two_percent_at_small_groups() -> None:
    """The permutation null of the worst TPR at 1% FPR: with 248 films per group and six
    attacks that see nothing, the worst one exceeds 2% in most draws (simulated: about
    three quarters of audits if the attacks were independent), so the figure alone cannot
    resolve the 2% goal; with identical attacks the worst is a single attack's, which
    exceeds 2% about a fifth of the time; a p-value is uniform-ish under the null."""
    rng = np.random.default_rng(5)
    n = 248
    independent = [rng.random(2 * n) for _ in range(6)]
    null = mia.worst_tpr_null(independent, n, n, seed=0, rounds=400)
    assert 0.5 < np.mean(null > 0.02) < 0.95
    same = [independent[0]] * 6
    null_same = mia.worst_tpr_null(same, n, n, seed=0, rounds=400)
    assert 0.1 < np.mean(null_same > 0.02) < 0.35
    assert np.median(null_same) <= np.median(null)
    # Films an attack left out (NaN) are left out of every permuted draw too.
    holes = independent[0].copy()
    holes[::3] = np.nan
    assert np.isfinite(mia.worst_tpr_null([holes], n, n, seed=0, rounds=20)).all()


def test_generator_attacks_find_what_a_generator_memorized(tmp_path: Path) -> None:
    films = _films(112)
    train, hold = films[:16], films[16:]
    labels = np.arange(len(films)) % 2
    cfg = TrainConfig(
        architecture="latentflow",
        class_names=["a", "b"],
        max_steps=500,
        device="cpu",
        checkpoint_every_s=0.0,
        sample_steps=4,
        latent_size=8,
        latent_channels=2,
        ae_width=8,
        flow_width=16,
        batch_size=16,
        ae_batch_size=16,
        seed=0,
    )
    result = train_generator(train, labels[:16], cfg)
    path = tmp_path / "g.safetensors"
    save_generator(path, result.generator_state, dict(result.generator_config))
    gen = load_generator(path, expected_sha256=None)
    synthetic, _ = sample_images(gen, {0: 48, 1: 48}, seed=1, device="cpu")
    out = mia.audit(
        synthetic, train, labels[:16], hold, labels[16:], spaces=[], generator=gen, per_group=16
    )
    by_name = {(a["attack"], a["space"]): a for a in out["attacks"]}
    assert set(by_name) == {
        ("nearest-synthetic", "pixel"),
        ("reconstruction", "generator"),
        ("flow-loss", "generator"),
    }
    # 500 steps on 16 films: the flow regressed on exactly these latents.
    assert by_name[("flow-loss", "generator")]["auroc"] > 0.8
    assert by_name[("nearest-synthetic", "pixel")]["auroc"] > 0.8
    assert all(np.isfinite(a["control"]["auroc"]) for a in out["attacks"])
    assert not out["passed"] and out["worst_auroc"] > mia.GOAL_AUROC


def test_gan_generators_are_attacked_through_their_noise(tmp_path: Path) -> None:
    cfg = TrainConfig(
        architecture="dcgan",
        class_names=["a", "b"],
        max_steps=1,
        device="cpu",
        checkpoint_every_s=0.0,
        batch_size=8,
    )
    films = _films(8)
    result = train_generator(films, np.arange(8) % 2, cfg)
    path = tmp_path / "g.safetensors"
    save_generator(path, result.generator_state, dict(result.generator_config))
    gen = load_generator(path, expected_sha256=None)
    scores = mia.generator_scores(gen, films, np.arange(8) % 2, steps=3)
    assert set(scores) == {"reconstruction"}
    assert scores["reconstruction"].shape == (8,) and np.all(scores["reconstruction"] <= 0)


def test_false_flag_interval_matches_simulated_calibrations() -> None:
    """Conformal calibration on H films at quantile q: the share of new films above the
    threshold, over many calibration draws, has the stated mean and 90% interval."""
    h, q = 120, 0.95
    stated = false_flag_interval(h, q)
    rng = np.random.default_rng(3)
    k = int(np.ceil((h + 1) * q))
    # Scores uniform on [0, 1]: the rate above the k-th smallest is 1 minus it.
    rates = 1.0 - np.sort(rng.random((20000, h)), axis=1)[:, k - 1]
    assert stated["expected"] == pytest.approx(rates.mean(), abs=0.002)
    lo, hi = np.quantile(rates, [0.05, 0.95])
    assert stated["interval_90"] == pytest.approx([lo, hi], abs=0.004)
    # Films of fewer patients: the interval counting patients is the wider one.
    by_patient = false_flag_interval(h, q, patients=40)
    assert by_patient["interval_90"] == stated["interval_90"]
    plo, phi = by_patient["interval_90_counting_patients"]
    assert plo <= lo + 0.004 and phi > hi + 0.02
    assert "interval_90_counting_patients" not in false_flag_interval(h, q, patients=h)


def test_reidentification_names_training_patients_only_for_their_own_films() -> None:
    films, keys = load_nih()
    patients = np.unique(keys)
    held = set(np.random.default_rng(0).permutation(patients)[: len(patients) // 3])
    h = np.array([k in held for k in keys])
    # A crude re-identification embedding (coarse pixels): follow-up films of one patient
    # look alike, and that is enough to calibrate on.
    embed = lambda x: pixel_features(np.ascontiguousarray(x[:, ::4, ::4]))  # noqa: E731
    train, train_keys, hold, hold_keys = films[~h], keys[~h], films[h], keys[h]
    copies = mia.reidentification(embed, train[:100], train, train_keys, hold, hold_keys)
    assert copies["holdout_multi_film"] > 50 and 0.1 < copies["top1_same_patient"] < 1.0
    assert copies["threshold"] is not None and copies["synthetic_reidentified"] == 1.0
    assert copies["control_single_film_above"] <= 0.05
    # Films of other patients are not re-identified as training patients.
    others = mia.reidentification(embed, hold[:100], train, train_keys, hold, hold_keys)
    assert others["synthetic_reidentified"] <= 0.05
    # One film per held-out patient: nothing to calibrate confidence on.
    _, first = np.unique(hold_keys, return_index=True)
    single = mia.reidentification(
        embed, train[:10], train, train_keys, hold[first], hold_keys[first]
    )
    assert "skipped" in single and single["holdout_multi_film"] == 0
