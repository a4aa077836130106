"""One typed settings object for every process (API, worker, CLI).

Every value comes from an environment variable with the ``SYNTHRAY_`` prefix (or a
``.env`` file). A deployment that keeps a default secret refuses to start unless
``SYNTHRAY_DEV_MODE=true`` says, explicitly, that this is a development machine.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# How an oversampled synthetic draw is chosen from (models.generators.selection.SCORED_AS);
# the API's requests take the same (app.fields).
Choice = Literal["realistic", "typical"]

DEV_SECRET = "dev-only-not-a-secret"
EMBEDDED_BROKER = "embedded"


class InsecureSettingsError(RuntimeError):
    """Raised when a production deployment would start with a default secret."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNTHRAY_", env_file=".env", extra="ignore")

    dev_mode: bool = Field(False, description="Allow default secrets (development only).")
    data_dir: Path = Field(
        Path("var"), description="Blobs, embedded broker, SQLite file, the gate's cache."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default is a SQLite file in data_dir."
    )
    broker_url: str = Field(
        EMBEDDED_BROKER,
        description="'embedded' (serverless, files under data_dir) or redis://host:port/db.",
    )
    secret_key: str = Field(
        DEV_SECRET, description="Site secret: API key HMAC and patient pseudonyms."
    )
    import_root: Path | None = Field(
        None, description="Server-side folder that ingest may read from (relative paths)."
    )
    demo_data: Path = Field(
        Path("../shared/data/nih-cxr14-64"), description="Folder used by `synthray demo`."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device.")
    cpu_bf16: Literal["auto", "off"] = Field(
        "auto",
        description="bf16 on CPUs with bf16 units (auto) or fp32 everywhere (off).",
    )
    job_lease_seconds: int = Field(120, ge=4, description="Lease a worker holds on a job.")
    job_max_attempts: int = Field(3, ge=1, description="Deliveries before a job fails.")
    worker_child_max_mb: int = Field(
        2048,
        ge=0,
        description="A worker's job process is replaced by a fresh one after a job that left "
        "it above this resident memory (MiB; 0 never): a job process keeps its peak heap "
        "(see synthray.models.runtime.keep_freed_memory), so without this the next job "
        "starts from the last one's peak.",
    )
    job_files_retention_days: float = Field(
        7.0,
        ge=0,
        description="Days a cancelled or failed job keeps its scratch folder (its last "
        "checkpoint); 0 keeps them forever.",
    )
    requeue_after_seconds: int = Field(
        600, ge=10, description="Re-publish a queued job whose message may be lost after this."
    )
    memorization_quantile: float = Field(
        0.95, gt=0.5, lt=1.0, description="Hold-out quantile that sets the flag threshold."
    )
    max_flagged_fraction: float = Field(
        0.10, ge=0.0, le=1.0, description="A batch with more flagged images fails the gate."
    )
    max_dcr_train_share: float = Field(
        0.80,
        ge=0.5,
        le=1.0,
        description="A batch whose images sit nearer to training than to held-out images "
        "more often than this fails the gate (0.5 is ideal).",
    )
    min_class_patients: int = Field(
        5,
        ge=1,
        description="Synthesis refuses a class with fewer training patients than this: a "
        "generator can only reproduce the few it has seen.",
    )
    guidance_full_patients: int = Field(
        50,
        ge=1,
        description="A latent flow generator guides a class with fewer training patients "
        "than this less strongly (linearly towards no guidance), so its samples stay away "
        "from those few patients.",
    )
    gate_calibrations_kept: int = Field(
        8,
        ge=1,
        description="Gate calibrations kept under the cache directory, the most recently "
        "used first; older ones are deleted (a check computes its own again).",
    )
    max_file_bytes: int = Field(
        1024**3, ge=1024, description="Largest single file ingest will read."
    )
    max_pixel_bytes: int = Field(
        512 * 1024**2, ge=1024, description="Largest decoded image a DICOM header may claim."
    )
    decode_memory_limit: int = Field(
        3 * 1024**3, ge=0, description="Address-space cap of each decoding process (0: none)."
    )
    ingest_workers: int = Field(0, ge=0, description="Decoding processes (0: one per core).")
    max_upload_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Largest accepted upload (a zip or one file)."
    )
    max_unpacked_bytes: int = Field(
        8 * 1024**3, ge=1024, description="Largest total size a zip upload may unpack to."
    )
    max_zip_ratio: int = Field(
        100,
        ge=1,
        description="A zip upload may unpack to at most this many times its own size (or "
        "64 MiB, whichever is more), and never past max_unpacked_bytes.",
    )
    max_json_bytes: int = Field(
        1024**2,
        ge=1024,
        description="Largest request body of every route but the uploads (413 past it, "
        "before it is read).",
    )
    max_batch_images: int = Field(
        100_000, ge=1, description="Most images one synthesis request may ask for."
    )
    synthesis_oversample: float = Field(
        1.25,
        ge=1.0,
        le=8.0,
        description="Synthesis and the utility evaluation draw this many times the images "
        "asked for and keep, per class, the best by synthesis_choice (1: keep every image "
        "drawn); a request's own oversample wins.",
    )
    synthesis_choice: Choice = Field(
        "realistic",
        description="Which images an oversampled draw keeps, per class: realistic, those "
        "most like the class's real training films as a whole (a density ratio in the "
        "dataset version's self-supervised quality space); typical, those the real-trained "
        "quality classifier finds most typical of their class. A request's own choice wins.",
    )
    min_free_bytes: int = Field(
        100 * 1024**2,
        ge=0,
        description="/readyz reports the storage unavailable below this much free space.",
    )
    max_zip_entries: int = Field(100_000, ge=1, description="Most entries a zip upload may hold.")
    quality_encoder_steps: int = Field(
        300,
        ge=1,
        description="Training steps of each quality-metric encoder (supervised and "
        "self-supervised; once per dataset version and resolution).",
    )
    quality_encoder_seconds: float = Field(
        600.0,
        gt=0,
        description="Most training time of each quality-metric encoder, a safety cap: "
        "an encoder cut short measures in a weaker space and chooses synthetic images "
        "less well, so the default lets quality_encoder_steps finish at 128 px on "
        "2 CPU cores (about 300 s each; the encoders always train in fp32).",
    )
    # The floor moves with the held-out subsample (docs/measurements.md, "Weight 3 through
    # the product"),
    # so the default draws enough for Kermany's 930 held-out films to be compared whole.
    quality_samples_per_class: int = Field(
        320,
        ge=10,
        description="Most generated images per class, on average, for the quality metrics "
        "(drawn as far as the held-out images reach in the training mix).",
    )
    # One 931-image draw moved the worst nearest-synthetic AUROC of one 128 px version over
    # 0.514-0.559 (its verdict flipped with the draw); three draws' worth at once, 0.525-0.530
    # (docs/measurements.md, "A fourth weight-3 run").
    audit_synthetic_draws: int = Field(
        3,
        ge=1,
        le=10,
        description="Synthetic images the membership-inference audit attacks with, in "
        "quality draws: the quality metrics' draw and this many less one more like it "
        "(other seeds, the same class mix).",
    )
    audit_per_group: int = Field(
        500,
        ge=10,
        description="Most patients per group (members; non-members, which the control "
        "halves) in the membership-inference audit of every new generator version, one "
        "film each.",
    )
    audit_planted_per_family: int = Field(
        20,
        ge=0,
        le=1000,
        description="Altered copies of training films per family that the audit of every "
        "new generator version plants and checks with the gate (0: none).",
    )
    export_approvals: int = Field(
        1,
        ge=1,
        le=10,
        description="Distinct reviewers' approvals an export needs; the key that requested it "
        "never counts (two-person rule).",
    )
    audit_syslog: str | None = Field(
        None,
        pattern=r"^(tls|tcp|udp)://[^\s/]+:[0-9]+$",
        description="Forward every audit record to this syslog collector (RFC 5424), "
        "tls://host:port (RFC 5425), tcp://host:port or udp://host:port, from the workers; "
        "unset: not forwarded.",
    )
    audit_syslog_ca: Path | None = Field(
        None,
        description="PEM file of the CA(s) that sign the tls:// collector's certificate; "
        "unset: the system's trust store.",
    )
    audit_syslog_cert: Path | None = Field(
        None,
        description="PEM client certificate (with its key, or see audit_syslog_key) for a "
        "tls:// collector that requires one.",
    )
    audit_syslog_key: Path | None = Field(
        None, description="PEM private key of audit_syslog_cert, if not in the same file."
    )
    dicom_uid_root: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)*\.$",
        max_length=40,
        description="The hospital's DICOM organization root (ending in a dot) under which "
        "the synthetic images' UIDs are made; unset: pydicom's root.",
    )
    export_download_days: float = Field(
        30.0,
        ge=0,
        description="Days after approval the addressed partner may download an export; 0: no end.",
    )
    export_max_downloads: int = Field(
        0,
        ge=0,
        description="Downloads (from the first byte; resumed parts do not count) the "
        "addressed partner may make of one export; 0: no limit.",
    )
    export_requires_passed_audit: bool = Field(
        False,
        description="Refuse exports from a generator version whose membership-inference "
        "audit is missing or missed its goals.",
    )
    web_session_hours: float = Field(
        8.0,
        gt=0,
        le=24 * 30,
        description="Hours a browser stays signed in with one API key (sign-out ends it "
        "sooner, and so does revoking the key).",
    )
    web_cookie_secure: bool = Field(
        False,
        description="Mark the session cookie Secure even when the request reached the API "
        "as plain HTTP (a TLS proxy in front that does not forward its scheme); over "
        "HTTPS it is always Secure.",
    )
    copydetect_seconds: float = Field(
        300.0,
        ge=0.5,
        description="Training time of the copy-detection embedding (once per dataset version "
        "and resolution). Its steps decide which training films the gate registers a "
        "synthetic image against: on Kermany at 64 px, 160 steps put the source of 354 of "
        "400 combined planted copies among an image's 6 nearest, 1,200 steps all 400.",
    )
    copydetect_steps: int | None = Field(
        None,
        ge=1,
        description="A fixed step count for the copy-detection embedding instead of a time "
        "budget (deterministic; unset: as many steps as fit in copydetect_seconds).",
    )
    rate_limit: str = Field(
        "1200/minute",
        description="Requests each client address may make, "
        "in the limits notation ('1200/minute', '50/second;1200/minute'); empty: no limit.",
    )
    rate_limit_per_key: str = Field(
        "1200/minute",
        description="Requests each presented API key may make, whatever the address "
        "(the same notation); empty: no per-key limit.",
    )
    rate_limit_storage: str = Field(
        "memory://",
        description="Where request counts live: memory:// for one API process, a redis:// URL "
        "when several API processes share the limit.",
    )
    api_docs: bool | None = Field(
        None,
        description="Serve /docs, /redoc and /openapi.json (default: only in dev mode, so "
        "a production deployment does not publish its API map unless asked to).",
    )
    forwarded_allow_ips: str = Field(
        "",
        description="Addresses of reverse proxies whose X-Forwarded-For is believed "
        "(comma-separated, as uvicorn's --forwarded-allow-ips); empty: none.",
    )
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = Field(
        "json",
        description="Server and worker logs: one JSON object per line (for a log "
        "collector) or plain text; both carry the request and job ids.",
    )
    metrics_token: str | None = Field(
        None,
        description="Bearer token Prometheus presents at /metrics; unset, /metrics is "
        "served only in dev mode.",
    )

    oidc_issuer: str | None = Field(
        None,
        description="Staff sign-in with the hospital's OpenID Connect provider: the issuer "
        "('iss') its access tokens carry; unset, only API keys are accepted.",
    )
    oidc_audience: str | None = Field(None, description="The 'aud' tokens must name.")
    oidc_jwks: str | None = Field(
        None, description="The provider's signing keys: its jwks_uri, or a JWKS file path."
    )
    oidc_groups_claim: str = Field("groups", description="The claim that lists groups.")
    oidc_roles: str = Field(
        "",
        description="Groups mapped to roles, 'group=role' pairs separated by commas "
        "(admin, operator, reviewer; partners use API keys).",
    )
    oidc_client_id: str | None = Field(
        None,
        description="The pages' client id at the provider; set, the sign-in page offers the "
        "provider's sign-in (authorization code flow with PKCE), and the ID tokens it returns "
        "must name this id as their audience.",
    )
    oidc_client_secret: str | None = Field(
        None,
        description="The client secret of a confidential client (sent with HTTP Basic to the "
        "token endpoint); unset, the pages sign in as a public client with PKCE alone.",
    )
    oidc_redirect_url: str | None = Field(
        None,
        description="The callback address registered at the provider "
        "(https://<host>/ui/signin/provider/callback); unset, taken from the request.",
    )
    oidc_post_logout_redirect_url: str | None = Field(
        None,
        description="Where the provider sends a browser after signing a person out there "
        "(register it at the provider: https://<host>/ui/signin); unset, taken from the "
        "request.",
    )
    oidc_scopes: str = Field(
        "openid profile", description="Scopes the pages ask for ('openid' is required)."
    )

    @field_validator("data_dir", "import_root")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        # Every process resolves paths the same way, whatever its working directory
        # becomes; relative and resolved paths are never compared with each other.
        return v.expanduser().resolve() if v is not None else None

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, v: str) -> str:
        if v != EMBEDDED_BROKER and not v.startswith(("redis://", "rediss://", "amqp://")):
            raise ValueError("broker_url must be 'embedded', redis://... or amqp://...")
        return v

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Settings:
        if not self.dev_mode and self.secret_key == DEV_SECRET:
            raise InsecureSettingsError(
                "SYNTHRAY_SECRET_KEY is unset: set a long random secret "
                "(or SYNTHRAY_DEV_MODE=true on a development machine)."
            )
        if not self.dev_mode and len(self.secret_key) < 32:
            raise InsecureSettingsError("SYNTHRAY_SECRET_KEY must be at least 32 characters.")
        if self.oidc_issuer and not (self.oidc_audience and self.oidc_jwks and self.oidc_roles):
            raise ValueError(
                "SYNTHRAY_OIDC_ISSUER needs SYNTHRAY_OIDC_AUDIENCE, SYNTHRAY_OIDC_JWKS and "
                "SYNTHRAY_OIDC_ROLES as well"
            )
        if self.oidc_client_id and not self.oidc_issuer:
            raise ValueError("SYNTHRAY_OIDC_CLIENT_ID needs SYNTHRAY_OIDC_ISSUER as well")
        if self.oidc_client_id and "openid" not in self.oidc_scopes.split():
            raise ValueError("SYNTHRAY_OIDC_SCOPES must include 'openid'")
        if self.oidc_roles:
            from synthray.app.auth.oidc import role_map

            role_map(self.oidc_roles)  # raises on a malformed pair
        return self

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'synthray.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def work_dir(self) -> Path:
        """Scratch space for jobs (checkpoints, uploads in flight)."""
        return self.data_dir / "work"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def cache_dir(self) -> Path:
        """Results that can be computed again (the gate's calibrations); safe to delete."""
        return self.data_dir / "cache"


@lru_cache
def get_settings() -> Settings:
    return Settings()
