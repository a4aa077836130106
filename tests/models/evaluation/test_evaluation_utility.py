"""Downstream utility: every arm's training set exactly as the protocol says, metrics
against sklearn and by hand, intervals over seeds, determinism, a signal a classifier
must find, cancellation, and the chart and CSV people read. Real torch steps, tiny."""

from __future__ import annotations

import csv
import io
import json
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics

from synthray.models.evaluation.utility import (
    ARMS,
    ArmScores,
    Cancelled,
    ClassifierConfig,
    SmallResNet,
    UtilityResult,
    augment_batch,
    build_arms,
    chart_png,
    classification_scores,
    evaluate_utility,
    pool_needs,
    t_interval,
)

R = 64
CLASSES = ["normal", "effusion", "mass"]
TINY = ClassifierConfig(steps=20, batch_size=16, width=4)


def tagged(labels: np.ndarray, synthetic: bool) -> np.ndarray:
    """Images that say who they are: pixel (0, 0) is 255 for synthetic, 0 for real;
    pixels (0, 1) and (0, 2) hold the image's index in its set, and (0, 3) its label."""
    x = np.full((len(labels), R, R), 128, dtype=np.uint8)
    x[:, 0, 0] = 255 if synthetic else 0
    idx = np.arange(len(labels))
    x[:, 0, 1], x[:, 0, 2], x[:, 0, 3] = idx // 256, idx % 256, labels
    return x


def ident(x: np.ndarray) -> np.ndarray:
    """(N, 2) of (synthetic?, index) for tagged images."""
    return np.stack([x[:, 0, 0] == 255, x[:, 0, 1].astype(int) * 256 + x[:, 0, 2]], axis=1)


def noisy(labels: np.ndarray, rng: np.random.Generator, step: float) -> np.ndarray:
    """Class c is ``c * step`` grey levels brighter, under a random per-image exposure
    (+-40) and pixel noise: a weak signal with ``step`` 15, an obvious one with 100."""
    base = 60 + rng.uniform(-40, 40, size=(len(labels), 1, 1)) + step * labels[:, None, None]
    x = base + rng.normal(0, 25, size=(len(labels), R, R))
    return np.clip(x, 0, 255).astype(np.uint8)


def counts_of(y: np.ndarray, c: int = 3) -> list[int]:
    return np.bincount(y, minlength=c).tolist()


# --------------------------------------------------------------------------- arms


def test_arm_sets_follow_the_protocol() -> None:
    real_y = np.repeat([0, 1, 2], [12, 6, 3])  # n_c = 12, 6, 3; N = 21
    need = pool_needs(np.bincount(real_y))
    # DS2 adds 0, 6, 9; TSTR is 7 per class; DS2-even adds round(15/21 * n_c) = 9, 4, 2.
    assert need.tolist() == [9, 7, 9]
    syn_y = np.repeat([0, 1, 2], need)
    real_x, syn_x = tagged(real_y, False), tagged(syn_y, True)
    sets = build_arms(real_x, real_y, syn_x, syn_y, 3, np.random.default_rng(0))
    assert list(sets) == list(ARMS)

    def check(arm: str, counts: list[int], n_syn: list[int], augment: bool) -> None:
        s = sets[arm]
        assert counts_of(s.labels) == counts, arm
        assert counts_of(s.labels[s.synthetic]) == n_syn, arm
        tags = ident(s.images)
        assert (tags[:, 0] == s.synthetic).all(), arm  # the flag tells the truth
        assert (s.images[:, 0, 3] == s.labels).all(), arm  # every image keeps its label
        assert len({tuple(t) for t in tags}) == len(s.labels), arm  # no image twice
        assert s.augment is augment, arm
        assert s.images.dtype == np.uint8 and s.labels.dtype == np.int64
        assert s.synthetic.dtype == bool

    check("DS1", [12, 6, 3], [0, 0, 0], False)
    check("DS2", [12, 12, 12], [0, 6, 9], False)
    check("DS3", [3, 3, 3], [0, 0, 0], False)
    check("TSTR", [7, 7, 7], [7, 7, 7], False)
    check("AUG", [12, 6, 3], [0, 0, 0], True)
    check("DS2+AUG", [12, 12, 12], [0, 6, 9], True)
    check("DS2-even", [21, 10, 5], [9, 4, 2], False)
    check("PRE", [12, 6, 3], [0, 0, 0], False)
    assert all(sets[a].pretrain is None for a in ARMS if a != "PRE")

    # DS1 is the real set; DS3 a random subset of it; DS2+AUG the very images of DS2.
    assert np.array_equal(sets["DS1"].images, real_x)
    assert len(set(ident(sets["DS3"].images)[:, 1]) - set(range(21))) == 0
    assert np.array_equal(sets["DS2+AUG"].images, sets["DS2"].images)
    # DS2-even keeps the real class proportions (to rounding).
    share = np.bincount(sets["DS2-even"].labels) / len(sets["DS2-even"].labels)
    assert np.allclose(share, [12 / 21, 6 / 21, 3 / 21], atol=0.02)
    # PRE pre-trains on exactly the TSTR set, then fine-tunes on DS1.
    pre = sets["PRE"].pretrain
    assert pre is not None
    assert np.array_equal(pre[0], sets["TSTR"].images)
    assert np.array_equal(pre[1], sets["TSTR"].labels)
    assert np.array_equal(sets["PRE"].images, real_x)

    # One arm's images do not depend on which other arms were asked for.
    alone = build_arms(real_x, real_y, syn_x, syn_y, 3, np.random.default_rng(0), ["DS3"])
    assert np.array_equal(alone["DS3"].images, sets["DS3"].images)
    other = build_arms(real_x, real_y, syn_x, syn_y, 3, np.random.default_rng(1), ["DS3"])
    assert not np.array_equal(other["DS3"].images, sets["DS3"].images)


@pytest.mark.parametrize(
    ("counts", "arms"),
    [
        ([12, 6, 3], ARMS),
        ([5, 40], ARMS),
        ([7, 7, 7, 7], ARMS),
        ([30, 2, 9, 1], ("DS2", "DS3")),
        ([30, 2, 9, 1], ("DS2-even",)),
        ([10, 3], ("DS1", "AUG")),
        ([11, 4, 2], ("PRE",)),
    ],
)
def test_pool_needs_agrees_with_build_arms(counts: list[int], arms: tuple[str, ...]) -> None:
    c = len(counts)
    real_y = np.repeat(np.arange(c), counts)
    need = pool_needs(np.array(counts), arms)
    syn_y = np.repeat(np.arange(c), need)
    sets = build_arms(
        tagged(real_y, False),
        real_y,
        tagged(syn_y, True),
        syn_y,
        c,
        np.random.default_rng(3),
        arms,
    )
    used = np.zeros(c, dtype=int)
    for s in sets.values():
        used = np.maximum(used, np.bincount(s.labels[s.synthetic], minlength=c))
        if s.pretrain is not None:
            used = np.maximum(used, np.bincount(s.pretrain[1], minlength=c))
    assert used.tolist() == need.tolist()  # exactly enough: the pool is used to its end
    for k in np.flatnonzero(need):  # and one image fewer in any class is too few
        short = np.delete(syn_y, np.flatnonzero(syn_y == k)[0])
        with pytest.raises(ValueError, match=f"of class {k},"):
            build_arms(
                tagged(real_y, False),
                real_y,
                tagged(short, True),
                short,
                c,
                np.random.default_rng(3),
                arms,
            )


def test_a_too_small_pool_or_an_empty_class_is_refused_clearly() -> None:
    real_y = np.repeat([0, 1], [10, 4])
    syn_y = np.repeat([0, 1], [7, 2])  # DS2 needs 6 of class 1, TSTR 7 of each
    with pytest.raises(ValueError) as err:
        build_arms(
            tagged(real_y, False),
            real_y,
            tagged(syn_y, True),
            syn_y,
            2,
            np.random.default_rng(0),
            ["DS1", "DS2"],
        )
    assert str(err.value) == "arm DS2 needs 6 synthetic images of class 1, the pool holds 2"
    with pytest.raises(ValueError, match="class 2 has no real training image"):
        pool_needs(np.array([5, 3, 0]))
    with pytest.raises(ValueError, match="class 1 has no real training image"):
        build_arms(
            tagged(real_y * 0, False),
            real_y * 0,
            tagged(syn_y, True),
            syn_y,
            2,
            np.random.default_rng(0),
            ["DS1"],
        )
    with pytest.raises(ValueError, match="unknown arms"):
        pool_needs(np.array([5, 3]), ["DS4"])


# --------------------------------------------------------------------------- metrics


def pairwise_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half: ROC AUC by hand."""
    pos, neg = score[positive], score[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_metrics_equal_sklearn_and_hand_values() -> None:
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    proba = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.5, 0.3, 0.2],
            [0.3, 0.6, 0.1],  # class 0 called 1
            [0.2, 0.5, 0.3],
            [0.1, 0.4, 0.5],  # class 1 called 2
            [0.1, 0.1, 0.8],
            [0.2, 0.2, 0.6],
            [0.5, 0.1, 0.4],  # class 2 called 0
        ]
    )
    acc, bal, auroc, recall = classification_scores(y, proba, 3)
    assert acc == pytest.approx(5 / 8)
    assert recall == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert bal == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    by_hand = np.mean([pairwise_auc(proba[:, c], y == c) for c in range(3)])
    assert auroc == pytest.approx(by_hand)
    assert auroc == pytest.approx(metrics.roc_auc_score(y, proba, multi_class="ovr"))
    assert bal == pytest.approx(metrics.balanced_accuracy_score(y, proba.argmax(1)))

    # Two classes: the binary AUC, which is also the one-vs-rest mean over both classes.
    y2 = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.3])
    acc, bal, auroc, recall = classification_scores(y2, np.stack([1 - p1, p1], 1), 2)
    assert auroc == pytest.approx(pairwise_auc(p1, y2 == 1)) and auroc == pytest.approx(4 / 6)
    assert recall == pytest.approx([1.0, 0.5]) and bal == pytest.approx(0.75)
    assert acc == pytest.approx(0.8)


def test_t_interval() -> None:
    one = t_interval([0.7])
    assert one == {"mean": 0.7, "low": None, "high": None}
    three = t_interval([0.6, 0.7, 0.9])
    half = 4.302652729911275 * np.std([0.6, 0.7, 0.9], ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert three["mean"] == pytest.approx(0.7333333)
    assert three["low"] == pytest.approx(three["mean"] - half)
    assert three["high"] == pytest.approx(three["mean"] + half)
    assert t_interval([0.5, 0.5, 0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5}


# --------------------------------------------------------------------------- network


def test_small_resnet_shapes_size_and_no_global_rng() -> None:
    state = torch.random.get_rng_state()
    for res in (64, 128, 256):
        net = SmallResNet(3, res, 16, generator=torch.Generator().manual_seed(0)).eval()
        assert 100_000 < sum(p.numel() for p in net.parameters()) < 400_000
        with torch.no_grad():
            assert net(torch.zeros(2, 1, res, res)).shape == (2, 3)
    assert torch.equal(state, torch.random.get_rng_state())  # built without the global RNG
    a = SmallResNet(2, 64, 4, generator=torch.Generator().manual_seed(5))
    b = SmallResNet(2, 64, 4, generator=torch.Generator().manual_seed(5))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="resolution"):
        SmallResNet(2, 96)


def test_augmentation_is_small_seeded_and_never_a_mirror() -> None:
    x = torch.linspace(-1, 1, R).repeat(4, 1, R, 1)  # (4, 1, R, R), dark left, bright right
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and not torch.equal(a, x)
    for img in a[:, 0]:
        left, right = img[:, : R // 4].mean(), img[:, -R // 4 :].mean()
        assert right - left > 0.8  # still dark on the left: no flip, no large rotation


def test_config_round_trip() -> None:
    cfg = ClassifierConfig(steps=7, balanced_batches=True)
    assert ClassifierConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="stepz"):
        ClassifierConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError):
        ClassifierConfig(steps=0)


# --------------------------------------------------------------------------- whole runs


class Data(NamedTuple):
    """evaluate_utility's first six arguments."""

    real_x: np.ndarray
    real_y: np.ndarray
    syn_x: np.ndarray
    syn_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def make_data(step: float, seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    real_y = np.repeat([0, 1, 2], [20, 9, 4])
    test_y = np.repeat([0, 1, 2], 8)
    syn_y = np.repeat([0, 1, 2], pool_needs(np.bincount(real_y)))
    return Data(
        noisy(real_y, rng, step), real_y, noisy(syn_y, rng, step), syn_y,
        noisy(test_y, rng, step), test_y,
    )  # fmt: skip


@pytest.fixture(scope="module")
def weak() -> Data:
    return make_data(step=15.0)


@pytest.fixture(scope="module")
def three_seeds(weak: Data) -> tuple[UtilityResult, list[tuple[int, int, str]]]:
    calls: list[tuple[int, int, str]] = []
    result = evaluate_utility(
        *weak,
        classes=CLASSES,
        config=TINY,
        seeds=[0, 1, 2],
        on_progress=lambda d, t, m: calls.append((d, t, m)),
    )
    return result, calls


@pytest.fixture(scope="module")
def one_seed(weak: Data) -> UtilityResult:
    arms = ["PRE", "DS2+AUG", "DS1"]
    return evaluate_utility(*weak, classes=CLASSES, config=TINY, seeds=[1], arms=arms)


def without_time(scores: list[ArmScores]) -> list[dict[str, object]]:
    return [{k: v for k, v in vars(s).items() if k != "seconds"} for s in scores]


def test_summary_intervals_and_paired_differences(
    three_seeds: tuple[UtilityResult, list[tuple[int, int, str]]],
) -> None:
    result, calls = three_seeds
    assert [(d, t) for d, t, _ in calls] == [(i, 24) for i in range(1, 25)]
    assert result.arms == list(ARMS) and result.seeds == [0, 1, 2]
    assert result.test_images == 24 and result.test_counts == [8, 8, 8]
    assert result.config == TINY.to_dict()
    strict = 0
    for arm in ARMS:
        assert len(result.scores[arm]) == 3
        for m in ("accuracy", "balanced_accuracy", "macro_auroc"):
            cell = result.summary[arm][m]
            vals = [getattr(s, m) for s in result.scores[arm]]
            assert cell["mean"] == pytest.approx(np.mean(vals))
            assert cell["low"] <= cell["mean"] <= cell["high"]
            strict += cell["low"] < cell["mean"] < cell["high"]
            diff = result.vs_ds1[arm][m]
            assert diff["mean"] == pytest.approx(cell["mean"] - result.summary["DS1"][m]["mean"])
            assert diff["low"] <= diff["mean"] <= diff["high"]
        assert len(result.summary[arm]["recall"]) == 3
        for c, cell in enumerate(result.summary[arm]["recall"]):
            assert cell["mean"] == pytest.approx(np.mean([s.recall[c] for s in result.scores[arm]]))
            assert cell["low"] <= cell["mean"] <= cell["high"]
    assert strict > 0  # the seeds do differ somewhere
    for m in ("accuracy", "balanced_accuracy", "macro_auroc"):
        assert result.vs_ds1["DS1"][m] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    ds2, pre = result.scores["DS2"][0], result.scores["PRE"][0]
    assert (ds2.train_images, ds2.synthetic_images) == (60, 27)
    assert (pre.train_images, pre.synthetic_images) == (66, 33)  # DS1 + its TSTR set


def test_runs_are_deterministic_per_seed_and_independent_of_other_arms(
    one_seed: UtilityResult, three_seeds: tuple[UtilityResult, list[tuple[int, int, str]]]
) -> None:
    full, _ = three_seeds
    again, arms = one_seed, one_seed.arms
    assert arms == ["PRE", "DS2+AUG", "DS1"]
    for arm in arms:
        assert without_time(again.scores[arm]) == without_time(full.scores[arm][1:2]), arm
    # One seed: means without intervals.
    for arm in arms:
        assert again.summary[arm]["balanced_accuracy"]["low"] is None
        assert again.summary[arm]["recall"][0]["high"] is None
        assert again.vs_ds1[arm]["macro_auroc"]["low"] is None
    assert again.vs_ds1["DS1"]["accuracy"]["mean"] == 0.0


def test_csv_and_json(three_seeds: tuple[UtilityResult, list[tuple[int, int, str]]]) -> None:
    result, _ = three_seeds
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    header = list(rows[0])
    assert header == [
        "arm", "seed", "accuracy", "balanced_accuracy", "macro_auroc",
        "recall_normal", "recall_effusion", "recall_mass", "train_images", "synthetic_images",
    ]  # fmt: skip
    assert len(rows) == len(ARMS) * 3 + len(ARMS)
    per_seed = [r for r in rows if r["seed"] != "mean"]
    means = [r for r in rows if r["seed"] == "mean"]
    assert [(r["arm"], int(r["seed"])) for r in per_seed] == [
        (a, s) for a in ARMS for s in (0, 1, 2)
    ]
    assert [r["arm"] for r in means] == list(ARMS)
    for r in per_seed:
        s = result.scores[r["arm"]][int(r["seed"])]
        assert float(r["balanced_accuracy"]) == pytest.approx(s.balanced_accuracy, abs=1e-5)
        assert float(r["recall_mass"]) == pytest.approx(s.recall[2], abs=1e-5)
        assert int(r["train_images"]) == s.train_images
    for r in means:
        cell = result.summary[r["arm"]]["macro_auroc"]["mean"]
        assert float(r["macro_auroc"]) == pytest.approx(cell, abs=1e-5)

    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(data) == {
        "classes", "arms", "seeds", "config", "scores", "summary", "vs_ds1",
        "test_images", "test_counts",
    }  # fmt: skip
    back = UtilityResult.from_dict(data)
    assert back.scores == result.scores and back.summary == result.summary


def test_chart_is_a_readable_png(
    three_seeds: tuple[UtilityResult, list[tuple[int, int, str]]], one_seed: UtilityResult
) -> None:
    for result in (three_seeds[0], one_seed):  # with and without intervals
        png = chart_png(result)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(png)) as img:
            img.verify()
        with Image.open(io.BytesIO(png)) as img:
            assert img.size == (1000, 850)
            # Not blank: bars, text and lines in many shades.
            assert len(img.convert("RGB").getcolors(maxcolors=100_000) or []) > 20


def test_an_obvious_signal_is_learned() -> None:
    rng = np.random.default_rng(7)
    real_y = np.repeat([0, 1], [30, 10])  # dark vs bright, unbalanced
    test_y = np.repeat([0, 1], 20)
    empty = np.zeros((0, R, R), dtype=np.uint8)
    result = evaluate_utility(
        noisy(real_y, rng, 100.0), real_y, empty, np.zeros(0, np.int64),
        noisy(test_y, rng, 100.0), test_y, ["dark", "bright"],
        ClassifierConfig(steps=30, batch_size=16, width=4), [0], arms=["DS1"],
    )  # fmt: skip
    assert result.scores["DS1"][0].balanced_accuracy >= 0.9
    assert result.scores["DS1"][0].macro_auroc >= 0.95


def test_stop_between_arms(weak: Data) -> None:
    seen: list[tuple[int, int]] = []
    with pytest.raises(Cancelled, match="2 of 6"):
        evaluate_utility(
            *weak,
            classes=CLASSES,
            config=ClassifierConfig(steps=3, batch_size=8, width=4),
            seeds=[0, 1],
            arms=["DS1", "DS3", "TSTR"],
            on_progress=lambda d, t, m: seen.append((d, t)),
            should_stop=lambda: len(seen) >= 2,
        )
    assert seen == [(1, 6), (2, 6)]


def test_balanced_batches_change_what_an_arm_sees() -> None:
    from synthray.models.evaluation.utility import _Batches

    labels = np.repeat([0, 1, 2], [90, 9, 1])
    gen = torch.Generator().manual_seed(0)
    uniform = labels[_Batches(labels, 3, False).draw(6000, gen).numpy()]
    balanced = labels[_Batches(labels, 3, True).draw(6000, gen).numpy()]
    assert np.bincount(uniform, minlength=3)[2] < 200  # about 1%
    assert np.allclose(np.bincount(balanced, minlength=3) / 6000, 1 / 3, atol=0.03)
