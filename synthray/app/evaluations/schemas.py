from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

from synthray.app.fields import NAME, Choice, RequestModel

Arm = Literal["DS1", "DS2", "DS3", "TSTR", "AUG", "DS2+AUG", "DS2-even", "PRE"]
ALL_ARMS: list[Arm] = ["DS1", "DS2", "DS3", "TSTR", "AUG", "DS2+AUG", "DS2-even", "PRE"]


class EvaluationState(StrEnum):
    """queued -> running -> done; a job that fails or is cancelled leaves its end state."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class EvaluationCreate(RequestModel):
    """Does the generator's output help a classifier? Every arm trains the same small
    classifier for the same number of steps and is scored on the same real test images
    of patients that neither the generator nor any classifier saw."""

    model: str = Field(max_length=100, pattern=NAME)
    version: StrictInt | None = Field(None, ge=1, le=2**31 - 1, description="Latest if omitted.")
    test_dataset: str | None = Field(
        None,
        max_length=100,
        pattern=NAME,
        description="Score on this dataset (another site or period: all its images) instead "
        "of the held-out patients of the generator's own dataset version. It must hold "
        "every class of the generator and no patient of the generator's training split.",
    )
    test_dataset_version: StrictInt | None = Field(None, ge=1, le=2**31 - 1)
    arms: list[Arm] = Field(
        default_factory=lambda: list(ALL_ARMS),
        min_length=1,
        max_length=len(ALL_ARMS),
        description="DS1 (real as it is) is always run: the others are compared with it.",
    )
    seeds: StrictInt = Field(3, ge=1, le=10, description="Independent repeats of every arm.")
    steps: StrictInt = Field(
        300, ge=50, le=100_000, description="Classifier training steps, the same for every arm."
    )
    batch_size: StrictInt = Field(64, ge=8, le=512)
    width: StrictInt = Field(
        16, ge=4, le=128, description="Channels of the classifier's first stage."
    )
    synthesis_seed: StrictInt = Field(0, ge=0, le=2**31 - 1)
    oversample: StrictFloat | None = Field(
        None,
        ge=1,
        le=8,
        description="The synthetic images are chosen as synthesis chooses them (see "
        "POST /v1/batches); default SYNTHRAY_SYNTHESIS_OVERSAMPLE, so that the evaluation "
        "measures what an export would hold.",
    )
    choice: Choice | None = Field(
        None,
        description="How the synthetic images are chosen (see POST /v1/batches); default "
        "SYNTHRAY_SYNTHESIS_CHOICE.",
    )

    @field_validator("arms")
    @classmethod
    def _with_ds1(cls, arms: list[Arm]) -> list[Arm]:
        chosen = set(arms) | {"DS1"}
        return [a for a in ALL_ARMS if a in chosen]


class EvaluationAccepted(BaseModel):
    evaluation_id: int
    job_id: str


class EvaluationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    model_version_id: int
    dataset_version_id: int
    test_dataset_version_id: int | None
    state: EvaluationState
    params: dict[str, Any]
    summary: dict[str, Any] = Field(
        description="Per arm: mean and 95% interval over seeds of accuracy, balanced "
        "accuracy and macro AUROC, and the difference to DS1."
    )
    code_version: str
    job_id: str | None
    created_at: datetime


def format_interval(fig: dict[str, Any] | None, signed: bool = False) -> str:
    """A summary figure as text: '0.712 [0.690, 0.734]', without the interval when there is
    none (one seed), '-' when there is no figure."""
    if not fig:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(fig["mean"])
    if fig.get("low") is not None and fig.get("high") is not None:
        text += f" [{fmt.format(fig['low'])}, {fmt.format(fig['high'])}]"
    return text
