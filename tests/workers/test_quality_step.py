"""How many images the train job's quality step generates per class (the step itself runs
end to end in tests/app/test_app_pipeline.py)."""

from __future__ import annotations

import numpy as np

from synthray.workers.jobs._quality import MIN_SAMPLES_PER_CLASS, samples_per_class


def test_generated_images_follow_the_training_mix_as_far_as_the_held_out_images_go() -> None:
    # Dataset classes 0..3; the generator knows 0, 2 and 3 (its own ids 0, 1, 2).
    train = np.array([0] * 300 + [1] * 50 + [2] * 100 + [3] * 600)  # 0.3 / 0.1 / 0.6 of kept
    holdout = np.array([0] * 140 + [1] * 500 + [2] * 40 + [3] * 400)
    # The held-out images in that mix: at most 400 (class 2: 40 / 0.1) -> 120 / 40 / 240,
    # raised to the minimum where a class falls below it.
    counts = samples_per_class(holdout, train, keep=[0, 2, 3], most=200)
    assert counts == {0: 120, 1: MIN_SAMPLES_PER_CLASS, 2: 240}
    # The setting caps the total (10 per class on average: 9 / 3 / 18 in the mix), and the
    # minimum where it is below it.
    assert samples_per_class(holdout, train, keep=[0, 2, 3], most=10) == {0: 10, 1: 10, 2: 18}
    plenty = np.array([0] * 1000 + [2] * 1000 + [3] * 1000)
    assert samples_per_class(plenty, train, keep=[0, 2, 3], most=200) == {0: 180, 1: 60, 2: 360}
    # No held-out image at all: the minimum for each class.
    assert samples_per_class(np.array([1, 1]), train, keep=[0, 2, 3], most=200) == {
        0: 50,
        1: 50,
        2: 50,
    }
