from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

from synthray.app.fields import (
    ALIAS,
    MAX_CLASSES,
    Choice,
    Id32,
    Label,
    Name,
    RequestModel,
    Seed,
)


class BatchState(StrEnum):
    """generating -> unchecked -> checking -> passed | failed.

    A synthesis job that fails or is cancelled leaves its end state on a batch still
    generating; a check that stops leaves the batch unchecked.
    """

    generating = "generating"
    unchecked = "unchecked"
    checking = "checking"
    passed = "passed"
    failed = "failed"
    cancelled = "cancelled"


OVERSAMPLE = (
    "Draw this many times the images asked for and keep, per class, the best by `choice` "
    "(1: keep every image drawn). Default SYNTHRAY_SYNTHESIS_OVERSAMPLE."
)
CHOICE = (
    "Which images an oversampled draw keeps, per class: `realistic`, those most like the "
    "class's real training films as a whole (a density ratio in the dataset version's "
    "self-supervised quality space); `typical`, those its real-trained quality classifier "
    "finds most typical of their class. Default SYNTHRAY_SYNTHESIS_CHOICE."
)


# What each choice kept, in words (the demo, the batches page, PRIVACY.md).
CHOSEN_BY = {
    "realistic": "per class, those most like the class's real training films as a whole "
    "(no image is ranked for being near one film)",
    "typical": "per class, those a classifier trained on the training films found most "
    "typical of their class",
}


class SynthesizeRequest(RequestModel):
    model: Name
    version: Id32 | None = Field(None, description="Latest non-archived version if omitted.")
    alias: str | None = Field(
        None, max_length=40, pattern=ALIAS, description="Use the version an alias points at."
    )
    per_class: StrictInt | None = Field(None, ge=1, le=100_000)
    counts: dict[Label, Annotated[StrictInt, Field(ge=0, le=100_000)]] | None = Field(
        None, max_length=MAX_CLASSES, description="Images per class name."
    )
    seed: Seed = 0
    oversample: StrictFloat | None = Field(None, ge=1, le=8, description=OVERSAMPLE)
    choice: Choice | None = Field(None, description=CHOICE)

    @model_validator(mode="after")
    def _one_of(self) -> SynthesizeRequest:
        if (self.per_class is None) == (self.counts is None):
            raise ValueError("give exactly one of per_class or counts")
        if self.counts is not None:
            if not self.counts:
                raise ValueError("counts must name at least one class")
            if sum(self.counts.values()) == 0:
                raise ValueError("counts must ask for at least one image")
        return self


class SynthesizeAccepted(BaseModel):
    batch_id: int
    job_id: str


class BatchRead(BaseModel):
    # Validated from a row (``images_sha256`` is its ``images_blob``) or, by field name,
    # from its own dump.
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: int
    model_version_id: int
    state: BatchState
    counts: dict[str, int]
    seed: int
    selection: dict[str, Any] = Field(
        description="How the images were chosen from those drawn: the oversample factor, "
        "the choice (`by`) and, per class, images drawn and kept with the mean score before "
        "and after and the lowest kept (`realistic`: log density ratio; `typical`: the "
        "classifier's probability of their class) ({} while generating; oversample 1: all "
        "kept).",
    )
    images_sha256: str | None = Field(validation_alias="images_blob")
    checked_sha256: str | None
    check: dict[str, Any]
    synth_job_id: str | None
    check_job_id: str | None
    created_at: datetime
