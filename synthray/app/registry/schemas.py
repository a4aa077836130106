from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasPath,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from synthray.app.fields import MAX_CLASSES, NAME, Flag, Id32, Label, Name, RequestModel

# What the torch-free API must know of each generator architecture: its family and the
# resolutions it supports (tests hold this against synthray.models.generators.registry).
ARCHITECTURES: dict[str, tuple[str, tuple[int, ...]]] = {
    "latentflow": ("latent-flow", (64, 128, 256)),
    "projgan": ("gan", (64, 128, 256)),
    "dcgan": ("gan", (64, 128)),
}
GAN_ONLY = ("lr_g", "lr_d")
LATENT_FLOW_ONLY = ("guidance", "sample_steps", "guidance_interval")


class TrainRequest(RequestModel):
    dataset: Name
    dataset_version: Id32 | None = Field(None, description="Latest ready version if omitted.")
    model_name: str = Field(max_length=100, pattern=NAME)
    architecture: Literal["latentflow", "projgan", "dcgan"] = Field(
        "latentflow",
        description="latentflow: a site autoencoder, then class-conditional flow matching "
        "on its latents (the default); projgan: projection discriminator, hinge loss, "
        "spectral norm, DiffAugment, EMA generator; dcgan: the seed study's baseline.",
    )
    resolution: Literal[64, 128, 256] = 64
    batch_size: StrictInt | None = Field(
        None, ge=2, le=1024, description="The architecture's default if omitted."
    )
    max_steps: StrictInt | None = Field(None, ge=1, le=10_000_000)
    max_seconds: StrictFloat | None = Field(None, ge=5, le=7 * 24 * 3600)
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1)
    lr_g: StrictFloat | None = Field(None, gt=0, le=0.1, description="GANs only (default 2e-4).")
    lr_d: StrictFloat | None = Field(None, gt=0, le=0.1, description="GANs only (default 2e-4).")
    guidance: StrictFloat | None = Field(
        None,
        ge=0,
        le=20,
        description="latentflow only: classifier-free guidance weight of the sampler "
        "(default 2; 1 is no guidance, higher trades diversity for class fidelity).",
    )
    sample_steps: StrictInt | None = Field(
        None, ge=1, le=100, description="latentflow only: Heun steps per sample (default 8)."
    )
    guidance_interval: (
        tuple[Annotated[StrictFloat, Field(ge=0, le=1)], Annotated[StrictFloat, Field(ge=0, le=1)]]
        | None
    ) = Field(
        None,
        description="latentflow only: [t_low, t_high], guidance applied only at flow times "
        "t_low < t <= t_high (t = 1 is pure noise; outside, one network evaluation "
        "instead of two). Default [0, 0.5] at 128 and 256 px, every step at 64 px ([0, 1]).",
    )
    checkpoint_every_s: StrictFloat = Field(
        30.0, ge=1, le=3600, description="Also how often the preview grid is refreshed."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 on GPUs that support it (else fp16) and on CPUs with bf16 "
        "units (AVX512-BF16 or AMX), else fp32.",
    )
    evaluate: Flag = Field(True, description="Compute offline quality metrics at the end.")
    classes: list[Label] | None = Field(
        None,
        max_length=MAX_CLASSES,
        description="Train on these classes of the dataset only (all if omitted).",
    )
    imbalance: dict[Label, Annotated[StrictFloat, Field(gt=0, le=1)]] | None = Field(
        None,
        max_length=64,
        description="Induce imbalance: keep only this fraction of each named class's "
        'training images, taking whole patients (e.g. {"virus": 0.1}). Utility '
        "evaluations of the generator use exactly the same real images.",
    )
    imbalance_seed: StrictInt = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _budget(self) -> TrainRequest:
        if self.max_steps is None and self.max_seconds is None:
            raise ValueError("set a training budget: max_steps, max_seconds or both")
        family, resolutions = ARCHITECTURES[self.architecture]
        if self.resolution not in resolutions:
            raise ValueError(
                f"{self.architecture} supports resolutions {list(resolutions)}, "
                f"not {self.resolution}"
            )
        foreign = LATENT_FLOW_ONLY if family == "gan" else GAN_ONLY
        given = [name for name in foreign if getattr(self, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} do not apply to {self.architecture}")
        if self.guidance_interval and not self.guidance_interval[0] < self.guidance_interval[1]:
            raise ValueError("guidance_interval needs t_low < t_high")
        return self


class TrainAccepted(BaseModel):
    job_id: str
    model_name: str
    dataset_version_id: int


class ModelVersionRead(BaseModel):
    # Validated from a row (``model`` is its model's name) or, by field name, from its
    # own dump.
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: int
    model: str = Field(validation_alias=AliasPath("registered_model", "name"))
    version: int
    dataset_version_id: int
    dataset_sha256: str
    architecture: str
    config: dict[str, Any]
    classes: list[str]
    code_version: str
    train_job_id: str
    metrics: dict[str, Any]
    blob_sha256: str
    size_bytes: int
    encoder_sha256: str | None
    archived: bool
    created_at: datetime


class AliasMove(BaseModel):
    # Validated from a history row, its versions given by number. A move that created or
    # removed the alias has no version on that side (None); the defaults stay required
    # in the response schema.
    model_config = ConfigDict(
        from_attributes=True,
        populate_by_name=True,
        json_schema_serialization_defaults_required=True,
    )

    alias: str
    from_version: int | None = Field(None, validation_alias=AliasPath("moved_from", "version"))
    to_version: int | None = Field(None, validation_alias=AliasPath("moved_to", "version"))
    moved_by: str | None = Field(validation_alias="moved_by_name")
    moved_at: datetime


class AliasSet(RequestModel):
    version: Id32 | None = Field(description="Version to point at; null removes the alias.")


class ModelRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    created_at: datetime
    aliases: dict[str, int]  # alias -> version number
    versions: list[ModelVersionRead]

    @field_validator("aliases", mode="before")
    @classmethod
    def _alias_targets(cls, value: Any) -> Any:
        """A model's alias rows become alias -> the number of the version it points at."""
        if isinstance(value, dict):
            return value
        return {a.alias: a.target.version for a in value}


class VersionComparison(BaseModel):
    model: str
    a: int
    b: int
    metrics: dict[str, dict[str, Any]]  # metric -> {"a": .., "b": .., "delta": ..}
    config_changes: dict[str, dict[str, Any]]  # changed config keys -> {"a": .., "b": ..}
