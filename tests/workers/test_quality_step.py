"""How many images the train job's quality step generates per class (the step itself runs
end to end in tests/app/test_app_pipeline.py)."""

from __future__ import annotations

import numpy as np

from synthray.workers.jobs._quality import MIN_SAMPLES_PER_CLASS, samples_per_class


def test_generated_images_follow_the_held_out_images_of_each_class() -> None:
    # Dataset classes 0..3; the generator knows 0, 2 and 3 (its own ids 0, 1, 2).
    holdout = np.array([0] * 140 + [1] * 500 + [2] * 12 + [3] * 400)
    counts = samples_per_class(holdout, keep=[0, 2, 3], most=200)
    # As many as held out (140), never fewer than the minimum (12 -> 50), at most 200.
    assert counts == {0: 140, 1: MIN_SAMPLES_PER_CLASS, 2: 200}
    # A class with no held-out image still gets its minimum; the setting caps everything.
    assert samples_per_class(np.array([0, 0]), keep=[0, 1], most=200) == {0: 50, 1: 50}
    assert samples_per_class(holdout, keep=[0, 2, 3], most=10) == {0: 10, 1: 10, 2: 10}
