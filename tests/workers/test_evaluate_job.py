"""The evaluation job's synthetic pool: how many images it draws again when the gate flags
many (the job itself runs end to end in tests/app/evaluations)."""

from __future__ import annotations

import numpy as np

from synthray.workers.jobs.evaluate import draw_sizes


def test_a_class_the_gate_flags_often_is_drawn_again_by_its_flag_rate() -> None:
    missing = np.array([100, 0, 50])
    # Nothing drawn yet: the margin (10%) plus a few.
    assert draw_sizes(missing, np.zeros(3), np.zeros(3)) == {0: 114, 2: 59}
    # Class 2 lost half its images to the gate: twice as many are drawn for what it lacks.
    assert draw_sizes(missing, np.array([110, 0, 55]), np.array([0, 0, 27]))[2] == 113
    # A class flagged almost always is drawn at most five times what it lacks (plus margin).
    assert draw_sizes(np.array([10]), np.array([20]), np.array([20])) == {0: 59}
