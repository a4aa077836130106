"""Offline quality metrics: known answers on synthetic features, and a real encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from synthray.app.registry.summary import quality_lines
from synthray.models import runtime
from synthray.models.checkpoint import ChecksumMismatch
from synthray.models.evaluation.quality import (
    SPACES,
    SSL_PROJECTION,
    Encoder,
    EncoderConfig,
    _to_input,
    _views,
    accuracy,
    choice_batch,
    evaluate,
    features,
    fid,
    kid,
    load_encoder,
    precision_recall,
    probabilities,
    probabilities_for_choice,
    save_encoder,
    train_encoder,
    train_space,
    train_ssl_encoder,
)


def test_fid_known_values() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    b = rng.normal(size=(4000, 8))
    assert fid(a, b) == pytest.approx(0.0, abs=0.05)
    # Same covariance, mean shifted by 2 along one axis: FID = 4.
    assert fid(a, b + np.eye(8)[0] * 2) == pytest.approx(4.0, abs=0.15)
    # Scaled by 2: Tr(S + 4S - 2*2S) = Tr(S) = 8 for unit covariance.
    assert fid(a, 2 * b) == pytest.approx(8.0, abs=0.4)


def test_kid_and_precision_recall() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    far = rng.normal(size=(600, 16)) + 10
    assert abs(kid(a, b, subsets=10, subset_size=300)) < 0.02
    assert kid(a, far, subsets=10, subset_size=300) > 1.0
    p, r = precision_recall(a, b)
    assert p > 0.6 and r > 0.6  # k-NN manifolds are conservative in 16 dimensions
    p, r = precision_recall(a, far)
    assert p == 0.0 and r == 0.0
    # Mode collapse: all generated samples at one real point -> precision high, recall ~0.
    collapsed = np.repeat(a[:1], 600, axis=0) + rng.normal(scale=1e-3, size=(600, 16))
    p, r = precision_recall(a, collapsed)
    assert p == 1.0 and r < 0.05


def _two_kinds(n: int = 64, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Two classes a classifier can tell apart: bright top half vs bright bottom half."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 60, size=(n, 32, 32), dtype=np.uint8)
    labels = np.arange(n) % 2
    imgs[labels == 0, :16] += 150
    imgs[labels == 1, 16:] += 150
    return imgs, labels


def test_encoder_round_trip_and_evaluate(tmp_path: Path) -> None:
    imgs, labels = _two_kinds()
    cfg = EncoderConfig(resolution=32, num_classes=2, width=8, feat_dim=16)
    trained = train_encoder(imgs, labels, cfg, max_steps=40, max_seconds=30, batch_size=16)
    assert (trained.steps, trained.planned_steps, trained.cut_short) == (40, 40, False)
    model = trained.model
    sha = save_encoder(tmp_path / "enc.safetensors", model)
    again = load_encoder(tmp_path / "enc.safetensors", sha)
    with pytest.raises(ChecksumMismatch):
        load_encoder(tmp_path / "enc.safetensors", "0" * 64)
    assert accuracy(again, imgs[48:], labels[48:]) >= 0.9
    out = evaluate(
        {"a": again, "b": model},
        again,
        imgs[:48],
        labels[:48],
        imgs[48:],
        labels[48:],
        imgs[48:],
        labels[48:],
        ["top", "bottom"],
    )
    assert set(out["spaces"]) == {"a", "b"} and out["compared_images"] == 16
    for space in out["spaces"].values():
        assert set(space["overall"]) == {"generated", "floor"}
        # Generated == holdout here, so the generated figures equal the floor.
        assert space["overall"]["generated"] == space["overall"]["floor"]
    consistency = out["class_consistency"]
    assert consistency["generated"] == consistency["floor"] >= 0.9
    # Images that do not look like the class they were asked for.
    swapped = evaluate(
        {"a": again},
        again,
        imgs[:48],
        labels[:48],
        imgs[48:],
        labels[48:],
        imgs[48:],
        1 - labels[48:],
        ["top", "bottom"],
    )["class_consistency"]
    assert swapped["generated"] <= 0.1 and swapped["floor"] >= 0.9
    assert swapped["per_class"]["top"]["generated"] <= 0.1


def test_floor_uses_as_many_held_out_images_as_generated_ones() -> None:
    imgs, labels = _two_kinds(n=96)
    cfg = EncoderConfig(resolution=32, num_classes=2, width=8, feat_dim=16)
    model = train_encoder(imgs, labels, cfg, max_steps=10, batch_size=16).model
    out = evaluate(
        {"s": model},
        model,
        imgs[:40],
        labels[:40],
        imgs[40:],
        labels[40:],
        imgs[:20],
        labels[:20],
        ["top", "bottom"],
    )
    assert out["compared_images"] == 20 and out["reference_images"] == 40


def test_every_training_film_is_the_reference_and_figures_are_medians_over_subsamples() -> None:
    """The reference is the whole training split (once capped at a random 2,000, which
    moved the floor threefold), and the held-out and generated sets are compared on
    several subsamples: the figures are medians, the spread gives their range and the
    ratio of generated to floor FID, paired by comparison."""
    imgs, labels = _two_kinds(n=2500, seed=4)
    cfg = EncoderConfig(resolution=32, num_classes=2, width=8, feat_dim=16)
    model = train_encoder(imgs[:2200], labels[:2200], cfg, max_steps=10, batch_size=16).model

    def run(subsamples: int, seed: int = 0) -> dict:
        return evaluate(
            {"s": model},
            model,
            imgs[:2200],
            labels[:2200],
            imgs[2200:2300],  # 100 held-out films, 50 of each kind: all of them every time
            labels[2200:2300],
            imgs[2300:],  # 200 "generated": 100 of them, other ones each time
            labels[2300:],
            ["top", "bottom"],
            subsamples=subsamples,
            seed=seed,
        )

    out = run(5)
    assert (out["reference_images"], out["compared_images"], out["subsamples"]) == (2200, 100, 5)
    overall, spread = out["spaces"]["s"]["overall"], out["spaces"]["s"]["spread"]
    for side in ("generated", "floor"):
        for metric, (lo, hi) in spread[side].items():
            assert lo <= overall[side][metric] <= hi, (side, metric)
    g_lo, g_hi = spread["generated"]["fid"]
    assert g_lo < g_hi  # other generated images in each comparison
    assert spread["floor"]["fid"][0] == spread["floor"]["fid"][1]  # the same held-out ones
    floor = overall["floor"]["fid"]
    ratio = spread["fid_ratio"]
    assert ratio["median"] == pytest.approx(overall["generated"]["fid"] / floor, rel=1e-3)
    assert ratio["range"] == pytest.approx([g_lo / floor, g_hi / floor], rel=1e-3)
    assert run(5) == out  # the subsamples come from the seed
    one = run(1)["spaces"]["s"]["spread"]["generated"]["fid"]
    assert one[0] == one[1]


def test_an_encoder_cut_short_by_its_time_budget_says_so() -> None:
    """On a slow or busy machine the time budget ends an encoder's training early; the
    record, and the figures' wording, must say so rather than pass the weaker space off as
    the usual one."""
    imgs, labels = _two_kinds()
    cfg = EncoderConfig(resolution=32, num_classes=2, width=8, feat_dim=16)
    for train in (
        lambda **kw: train_encoder(imgs, labels, cfg, batch_size=16, **kw),
        lambda **kw: train_ssl_encoder(imgs, cfg, batch_size=16, **kw),
    ):
        short = train(max_steps=10_000, max_seconds=0.3)
        assert short.cut_short and 0 < short.steps < 10_000 and short.planned_steps == 10_000
        assert short.seconds >= 0.3
        full = train(max_steps=3, max_seconds=60)
        assert not full.cut_short and full.steps == 3
    space = {"precision": 0.9, "recall": 0.8, "fid": 2.0}
    q = {
        "class_consistency": {"generated": 0.8, "floor": 0.7},
        "subsamples": 5,
        "spaces": {
            name: {
                "overall": {"generated": space, "floor": space},
                "spread": {"fid_ratio": {"median": 1.0, "range": [0.84, 1.31]}},
            }
            for name in ("supervised", "self_supervised")
        },
        "encoder_training": {
            "supervised": short.record() | {"steps": 50, "planned_steps": 300},
            "self_supervised": full.record(),
        },
    }
    consistency, supervised, ssl = quality_lines(q)
    assert "WEAK ENCODER" in consistency and "50 of 300 steps" in supervised
    assert "WEAK" not in ssl
    assert "FID 2.00 (floor 2.00; ratio 1.0x, 0.8-1.3x over 5 subsamples)" in ssl
    # Records from before encoders' training was kept: nothing claimed either way.
    assert not any("WEAK" in line for line in quality_lines(q | {"encoder_training": {}}))


def _retrieval(model: Encoder, images: np.ndarray) -> float:
    """Share of new views of ``images`` whose nearest image in feature space is their own."""
    views = _views(_to_input(images), torch.Generator().manual_seed(5))
    views_u8 = ((views[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    f_img, f_view = features(model, images), features(model, views_u8)
    d = ((f_view[:, None] - f_img[None]) ** 2).sum(-1)
    return float((d.argmin(1) == np.arange(len(images))).mean())


def test_self_supervised_encoder_maps_views_of_an_unseen_image_together() -> None:
    rng = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(
        torch.from_numpy(rng.normal(size=(96, 1, 8, 8))).float(), size=32, mode="bilinear"
    )[:, 0].numpy()
    imgs = np.clip(128 + 50 * smooth, 0, 255).astype(np.uint8)
    cfg = EncoderConfig(resolution=32, num_classes=16, width=8, feat_dim=16)
    untrained = train_ssl_encoder(imgs[:64], cfg, max_steps=0).model
    trained = train_ssl_encoder(imgs[:64], cfg, max_steps=200, batch_size=32).model
    before, after = _retrieval(untrained, imgs[64:]), _retrieval(trained, imgs[64:])
    assert after >= 0.6 and after >= before + 0.2, (before, after)


def test_probabilities_for_a_choice_rank_like_the_reported_ones() -> None:
    """The chooser's scores (bf16 where the CPU has the units, cache-sized batches) are the
    reported fp32 probabilities within bf16's rounding, in the same order where they
    differ by more than that; the batch holds 2^19 positions, 8 to 512 images."""
    assert [choice_batch(r) for r in (32, 64, 128, 256, 1024)] == [512, 128, 32, 8, 8]
    imgs, labels = _two_kinds()
    cfg = EncoderConfig(resolution=32, num_classes=2, width=8, feat_dim=16)
    model = train_encoder(imgs, labels, cfg, max_steps=20, max_seconds=30, batch_size=16).model
    images = np.concatenate([imgs] * 5)  # 5 x 64: several batches of the chosen size
    reported = probabilities(model, images)
    chosen = probabilities_for_choice(model, images)
    assert chosen.shape == reported.shape == (len(images), 2)
    assert np.allclose(chosen.sum(1), 1.0, atol=1e-5)
    assert np.abs(chosen - reported).max() < 0.02
    p, q = reported[:, 0], chosen[:, 0]
    far = np.abs(p[:, None] - p[None, :]) > 0.05
    assert far.any()
    assert np.all((p[:, None] > p[None, :])[far] == (q[:, None] > q[None, :])[far])


def test_a_set_drawn_in_another_class_mix_is_compared_in_the_reference_mix() -> None:
    """A TSTR pool is drawn balanced while a site's films are not; compared as drawn, it
    lies away from the training features by its mix alone. Here the "generated" images are
    real held-out films of the same two kinds, drawn 1:1 against a 3:1 site: in the
    reference mix they sit at the floor, as drawn far above it."""
    rng = np.random.default_rng(5)
    imgs, labels = _two_kinds(n=800, seed=3)
    order = np.concatenate([np.flatnonzero(labels == 0)[:240], np.flatnonzero(labels == 1)[:80]])
    train, train_y = imgs[order], labels[order]  # 3:1
    rest0, rest1 = np.flatnonzero(labels == 0)[240:], np.flatnonzero(labels == 1)[80:]
    hold = np.concatenate([rest0[:60], rest1[:20]])  # 3:1, like the site
    fake = np.concatenate([rest0[60:140], rng.permutation(rest1[20:])[:80]])  # 1:1
    assert len(rest0[60:140]) == 80
    cfg = EncoderConfig(resolution=32, num_classes=2, width=8, feat_dim=16)
    model = train_encoder(train, train_y, cfg, max_steps=40, batch_size=32).model

    def versus(hx: np.ndarray, hy: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> dict:
        """The figures of generated ``fx`` against the site, beside held-out ``hx``."""
        return evaluate({"s": model}, model, train, train_y, hx, hy, fx, fy, ["top", "bottom"])

    out = versus(imgs[hold], labels[hold], imgs[fake], labels[fake])
    assert out["class_mix"]["reference"] == {"top": 0.75, "bottom": 0.25}
    assert out["class_mix"]["compared"] == {"top": 0.75, "bottom": 0.25}
    assert out["class_mix"]["generated_as_drawn"] == {"top": 0.5, "bottom": 0.5}
    # 80 of each drawn: the reference mix holds at most 80 / 0.75 = 106; the floor's 80
    # held-out films hold 80.
    assert out["compared_images"] == 80
    space = out["spaces"]["s"]
    matched, drawn, floor = (
        space["overall"]["generated"]["fid"],
        space["as_drawn"]["generated"]["fid"],
        space["overall"]["floor"]["fid"],
    )
    assert space["as_drawn"]["images"] == 80  # as many as the matched figures compare
    assert drawn > 3 * matched and matched < 2 * floor + 0.05, (matched, drawn, floor)
    # Drawn in the reference's mix already: no second figure.
    same = versus(imgs[hold], labels[hold], imgs[hold], labels[hold])
    assert "as_drawn" not in same["spaces"]["s"] and same["compared_images"] == 80
    # A class with no held-out film has no floor: both sides leave it out, in one mix.
    tops = labels[hold] == 0
    lacking = versus(imgs[hold][tops], labels[hold][tops], imgs[fake], labels[fake])
    assert lacking["class_mix"]["compared"] == {"top": 1.0, "bottom": 0.0}
    assert lacking["compared_images"] == 60
    assert lacking["spaces"]["s"]["overall"]["generated"]["fid"] < 0.05
    # Too few held-out images to match any mix (a tiny site): compared as drawn, and said.
    few = versus(imgs[hold][:6], labels[hold][:6], imgs[fake], labels[fake])
    assert few["compared_images"] == 6 and "as_drawn" not in few["spaces"]["s"]
    assert few["class_mix"]["compared"] == {"top": 0.5, "bottom": 0.5}


def test_matched_subsample_keeps_the_proportions_and_its_capacity() -> None:
    from synthray.models.evaluation.quality import matched_subsample, mix_capacity

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [100, 30, 50])
    shares = np.array([0.5, 0.25, 0.25])
    assert mix_capacity(labels, shares) == 120  # class 1: 30 / 0.25
    picked = matched_subsample(labels, shares, 120, rng)
    assert np.bincount(labels[picked]).tolist() == [60, 30, 30]
    assert len(np.unique(picked)) == 120
    # Largest remainders: 7 in 0.5 / 0.25 / 0.25 -> 3.5, 1.75, 1.75 -> 3, 2, 2 (sums to 7).
    assert np.bincount(labels[matched_subsample(labels, shares, 7, rng)]).tolist() == [3, 2, 2]
    # A class the set lacks: the rest keep their proportions among themselves.
    no_two = labels[labels != 2]
    assert mix_capacity(no_two, shares) == 90  # class 1: 30 / (0.25 / 0.75)
    assert np.bincount(no_two[matched_subsample(no_two, shares, 90, rng)]).tolist() == [60, 30]


def test_quality_spaces_train_the_same_in_fp32_whatever_the_cpu() -> None:
    """The encoders are the ruler every FID of a dataset version is read with: one seed,
    data and step count must give the same weights whether the CPU's bf16 units are
    allowed or not (trained under bf16 autocast, the same 128 px images once read 3.2x
    from the floor instead of 13.3x). Each space gets its own head, and another seed
    another trajectory."""
    imgs, labels = _two_kinds()

    def weights(space: str, seed: int) -> torch.Tensor:
        model = train_space(space, imgs, labels, 2, max_steps=6, max_seconds=60, seed=seed).model
        assert model.cfg.resolution == 32
        expected = 2 if space == "supervised" else SSL_PROJECTION
        assert model.head.out_features == expected
        return torch.cat(
            [p.flatten() for p in model.state_dict().values() if p.is_floating_point()]
        )

    allowed = runtime._bf16_allowed
    try:
        for space in SPACES:
            runtime.allow_cpu_bf16(False)
            fp32 = weights(space, 0)
            runtime.allow_cpu_bf16(True)  # bf16 where this CPU has the units
            assert torch.equal(weights(space, 0), fp32), space
            assert not torch.equal(weights(space, 1), fp32), space
    finally:
        runtime.allow_cpu_bf16(allowed)
    with pytest.raises(ValueError, match="unknown quality space"):
        train_space("pixels", imgs, labels, 2, max_steps=1, max_seconds=1)
