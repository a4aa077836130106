"""The ``synthray`` command: server verbs (serve, worker, db, keys, demo) and client
verbs that talk to the REST API (SYNTHRAY_URL, SYNTHRAY_API_KEY)."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Concatenate, NoReturn, ParamSpec

import typer
from rich.console import Console
from rich.table import Table

from synthray.app.evaluations.schemas import format_interval
from synthray.app.registry.summary import choice_caveats, quality_lines
from synthray.cli.client import ApiError, Client

app = typer.Typer(help="SynthRay: privacy-gated synthetic chest radiographs.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
jobs_app = typer.Typer(help="Background jobs.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
store_app = typer.Typer(help="The blob store.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
app.add_typer(store_app, name="store")
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")

out = Console()
err = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:8000"


def _connection(
    url: Annotated[str, typer.Option(envvar="SYNTHRAY_URL", help="API base URL.")] = DEFAULT_URL,
    api_key: Annotated[str, typer.Option(envvar="SYNTHRAY_API_KEY", help="API key.")] = "",
) -> Client:
    """The options every client verb takes; their values become the verb's ``Client``."""
    return Client(url, api_key)


_P = ParamSpec("_P")
Verb = Callable[Concatenate[Client, _P], None]


def api_command(
    group: typer.Typer, name: str | None = None, *, hidden: bool = False
) -> Callable[[Verb[_P]], Verb[_P]]:
    """Register a client verb: ``def verb(c: Client, ...)``.

    The command gets the options of ``_connection`` (``--url``/SYNTHRAY_URL and
    ``--api-key``/SYNTHRAY_API_KEY) after its own; the verb gets the open ``Client``
    and any ``ApiError`` it lets out becomes ``error (status): detail`` and exit 1.
    """

    def register(verb: Verb[_P]) -> Verb[_P]:
        own = list(inspect.signature(verb, eval_str=True).parameters.values())[1:]
        conn = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(_connection, eval_str=True).parameters.values()
        ]

        @functools.wraps(verb)
        def command(**kwargs: Any) -> None:
            client = _connection(**{p.name: kwargs.pop(p.name) for p in conn})
            with client:
                try:
                    verb(client, **kwargs)  # type: ignore[call-arg]
                except ApiError as exc:
                    _fail(exc)

        # Typer reads a command's options from its signature.
        command.__signature__ = inspect.Signature([*own, *conn])  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in (*own, *conn)}
        group.command(name, hidden=hidden)(command)
        return verb

    return register


def _renamed(old: str, new: str, verb: Verb[_P]) -> Verb[_P]:
    """``verb`` behind a deprecated name: one warning line on stderr, then the same."""

    @functools.wraps(verb)
    def warned(c: Client, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        err.print(
            f"warning: 'synthray {old}' is deprecated and will be removed in the next "
            f"release; use 'synthray {new}'",
            soft_wrap=True,
            highlight=False,
        )
        verb(c, *args, **kwargs)

    return warned


def _settings() -> Any:
    from pydantic import ValidationError

    from synthray.config import InsecureSettingsError, get_settings

    try:
        return get_settings()
    except (InsecureSettingsError, ValidationError) as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _fail(exc: ApiError) -> NoReturn:
    err.print(f"[red]error[/red] ({exc.status}): {exc.detail}")
    raise typer.Exit(1)


def _download(c: Client, path: str, dest: Path) -> None:
    """Stream an API file to ``dest`` and say where it went."""
    size = c.download(path, dest)
    err.print(f"wrote {dest} ({size} bytes)")


def _print(obj: Any) -> None:
    out.print_json(json.dumps(obj, default=str))


# ---------------------------------------------------------------- server verbs


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the newest revision."""
    from synthray.migrations import upgrade

    s = _settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(s.sqlalchemy_url)
    err.print("database schema is up to date")


@audit_app.command("verify")
def audit_verify() -> None:
    """Walk the audit trail's hash chain; name the first record altered, removed or
    inserted. Exit 1 on a break. Prints the head's hash, worth keeping outside the database."""
    from synthray.app.audit.service import verify_trail

    verdict = verify_trail(_settings().sqlalchemy_url)
    if verdict.problem:
        err.print(f"[red]audit trail broken:[/red] {verdict.problem}", soft_wrap=True)
        raise typer.Exit(1)
    err.print(
        f"audit trail intact: {verdict.records} records, head {verdict.head_seq} "
        f"{verdict.head_hash}",
        soft_wrap=True,
    )


@audit_app.command("export")
def audit_export(
    after: Annotated[int, typer.Option(help="Only records after this seq.")] = 0,
) -> None:
    """Write the trail as JSON lines on stdout, in order, with each record's hashes (for a
    log archive or a second copy)."""
    import json

    from synthray.app.audit.repository import in_order
    from synthray.app.audit.schemas import AuditRead
    from synthray.app.db import session_scope

    with session_scope(_settings().sqlalchemy_url, read_only=True) as s:
        for row in in_order(s):
            if row.seq > after:
                line = AuditRead.model_validate(row).model_dump(mode="json")
                line["prev_hash"] = row.prev_hash
                sys.stdout.write(json.dumps(line, sort_keys=True) + "\n")


@store_app.command("verify")
def store_verify() -> None:
    """Check that this is the database's blob store, then re-read every blob the database
    names and check its sha256 (after a restore, or on a schedule). Exit 1 on a problem."""
    from synthray.app.storecheck import verify

    s = _settings()
    _same_blob_store(s)
    checked, problems = verify(s.sqlalchemy_url, s.blob_dir)
    for line in problems:
        err.print(f"[red]{line}[/red]", soft_wrap=True)
    err.print(f"{checked} blobs checked, {len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin, operator, reviewer or partner")],
    name: Annotated[str, typer.Option(help="Who the key is for (a partner's name).")],
    same_partner: Annotated[
        bool,
        typer.Option(
            "--same-partner",
            help="Another key for an existing partner of this name (it sees that partner's "
            "exports); without it a partner name already in use is refused.",
        ),
    ] = False,
) -> None:
    """Create an API key. The key is printed once; only its HMAC is stored."""
    from pydantic import ValidationError

    from synthray.app.auth.schemas import KeyCreate
    from synthray.app.auth.service import create_key
    from synthray.app.db import session_scope
    from synthray.app.errors import DomainError
    from synthray.migrations import upgrade

    s = _settings()
    try:
        body = KeyCreate(name=name, role=role, same_partner=same_partner)  # type: ignore[arg-type]
    except ValidationError as exc:
        err.print(f"[red]invalid key:[/red] {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
        raise typer.Exit(2) from exc
    if s.sqlalchemy_url.startswith("sqlite"):
        s.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(s.sqlalchemy_url)
    try:
        with session_scope(s.sqlalchemy_url) as session:
            created = create_key(
                session, s.secret_key, body.name, body.role, same_partner=body.same_partner
            )
    except DomainError as exc:
        err.print(f"[red]refused:[/red] {exc.detail}")
        raise typer.Exit(2) from exc
    err.print(f"created {created.role} key {created.prefix} for {created.name}; store it now:")
    print(created.key)


def _same_blob_store(s: Any) -> None:
    """Refuse to start on a blob folder that is not the database's store (a worker on
    another machine without the shared filesystem mounted, for example)."""
    from sqlalchemy.exc import SQLAlchemyError

    from synthray.app.storecheck import StoreMismatch, ensure

    try:
        ensure(s.sqlalchemy_url, s.blob_dir)
    except StoreMismatch as exc:
        err.print(f"[red]refusing to start:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    except SQLAlchemyError as exc:
        err.print(
            f"[red]refusing to start:[/red] the database cannot be read ({type(exc).__name__}); "
            "is it up, and migrated (`synthray db upgrade`)?"
        )
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    with_worker: Annotated[
        bool | None,
        typer.Option(help="Start a worker too (default: yes with the embedded broker)."),
    ] = None,
) -> None:
    """Run the API (and, on the embedded default, a worker process beside it)."""
    import subprocess

    import uvicorn

    from synthray import logs
    from synthray.app.main import create_app
    from synthray.config import EMBEDDED_BROKER
    from synthray.migrations import upgrade

    s = _settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    if s.sqlalchemy_url.startswith("sqlite"):
        upgrade(s.sqlalchemy_url)
    _same_blob_store(s)
    start_worker = with_worker if with_worker is not None else s.broker_url == EMBEDDED_BROKER
    worker = None
    if start_worker:
        worker = subprocess.Popen([sys.executable, "-m", "synthray.cli.main", "worker"])
    try:
        # X-Forwarded-For is believed only from the proxies the operator names: the rate
        # limit counts per client address, and any client can write that header.
        logs.configure(s.log_format, s.log_level)
        uvicorn.run(
            create_app(s),
            host=host,
            port=port,
            log_config=None,  # logs.configure above: JSON lines with request ids
            log_level=s.log_level.lower(),
            proxy_headers=bool(s.forwarded_allow_ips),
            forwarded_allow_ips=s.forwarded_allow_ips or None,
        )
    finally:
        if worker is not None:
            # Warm shutdown lets the running job reach a checkpoint; after 30 s the worker
            # is killed rather than left behind (its job is redelivered by the sweeper).
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues.")] = "gpu,cpu",
    concurrency: Annotated[int, typer.Option(help="Processes (1 per GPU).")] = 1,
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker: one job at a time per process, late acks, prefetch 1; a job
    process left above SYNTHRAY_WORKER_CHILD_MAX_MB by its job is replaced."""
    settings = _settings()
    _same_blob_store(settings)
    from synthray.workers.celery_app import app as celery_app

    recycle: list[str] = []
    if settings.worker_child_max_mb:
        recycle = ["--max-memory-per-child", str(settings.worker_child_max_mb * 1024)]  # KiB
    celery_app.worker_main(
        [
            "worker",
            *recycle,
            "--queues",
            queues,
            "--concurrency",
            str(concurrency),
            "--pool",
            "prefork",
            "--prefetch-multiplier",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            loglevel,
            "--hostname",
            f"synthray-{os.getpid()}@%h",
        ]
    )


@app.command()
def demo(
    data: Annotated[
        Path | None, typer.Option(help="Folder with images and labels.csv (SYNTHRAY_DEMO_DATA).")
    ] = None,
    # 160 s leaves the whole run (with the audit) under 10 minutes on a 2-core fp32 CPU.
    train_seconds: Annotated[float, typer.Option(help="Training budget in seconds.")] = 160.0,
    # ... or this many steps, whichever comes first: on a fast CPU or a GPU the seconds buy
    # many more epochs of the demo's few hundred films, and the thin classes get memorized
    # (README, "Measured: the demo"); a step cap also makes the demo's generator the same
    # on every machine that reaches it.
    train_steps: Annotated[
        int | None, typer.Option(help="Training budget in steps (whichever comes first).")
    ] = 800,
    per_class: Annotated[int, typer.Option(help="Synthetic images per class.")] = 100,
    workdir: Annotated[Path | None, typer.Option(help="Where the demo keeps its state.")] = None,
) -> None:
    """Run the whole pipeline on the embedded default and download the partner bundle."""
    from synthray.cli.demo import run_demo

    raise typer.Exit(run_demo(data, train_seconds, train_steps, per_class, workdir, out, err))


# ---------------------------------------------------------------- client verbs


@api_command(app)
def ingest(
    c: Client,
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    source: Annotated[str, typer.Option(help="Folder relative to the server's import root.")],
    classes: Annotated[str, typer.Option(help="Comma-separated class names.")],
    labels_csv: Annotated[str | None, typer.Option(help="'' for none (label_attribute)")] = (
        "labels.csv"
    ),
    file_column: str | None = "file",
    sop_column: Annotated[
        str | None, typer.Option(help="Key the CSV by SOPInstanceUID instead of file name.")
    ] = None,
    label_column: str = "label",
    label_attribute: Annotated[
        str | None, typer.Option(help="DICOM keyword holding the label (no CSV).")
    ] = None,
    patient_column: Annotated[
        str | None, typer.Option(help="'' to take patients from DICOM PatientID.")
    ] = "patient_id",
    label_separator: str | None = None,
    label_map: Annotated[str | None, typer.Option(help="JSON object: raw -> class.")] = None,
    resolutions: Annotated[str, typer.Option(help="Comma-separated: 64,128,256.")] = "64",
    holdout_fraction: float = 0.2,
    allow_burned_in: bool = False,
    wait: bool = True,
) -> None:
    """Import a folder of labelled radiographs (DICOM, PNG, JPEG) as a new dataset version."""
    csv_name = labels_csv or None
    body = {
        "name": name,
        "source": source,
        "labels_csv": csv_name,
        "file_column": None if (sop_column or not csv_name) else file_column,
        "sop_column": sop_column,
        "label_column": label_column if csv_name else None,
        "label_attribute": label_attribute,
        "patient_column": patient_column or None,
        "label_separator": label_separator,
        "label_map": json.loads(label_map) if label_map else {},
        "classes": [k.strip() for k in classes.split(",") if k.strip()],
        "resolutions": [int(r) for r in resolutions.split(",") if r.strip()],
        "holdout_fraction": holdout_fraction,
        "allow_burned_in": allow_burned_in,
    }
    _submit(c, "/datasets", body, wait, "ingest")


@api_command(app)
def train(
    c: Client,
    dataset: str,
    model_name: Annotated[str, typer.Option(help="Registry name of the model.")],
    max_seconds: float | None = None,
    max_steps: int | None = None,
    batch_size: Annotated[
        int | None, typer.Option(help="The architecture's default if omitted.")
    ] = None,
    resolution: int = 64,
    seed: int = 0,
    architecture: Annotated[
        str, typer.Option(help="latentflow (default), projgan or dcgan.")
    ] = "latentflow",
    guidance: Annotated[
        float | None,
        typer.Option(help="latentflow: classifier-free guidance of the sampler (default 2)."),
    ] = None,
    guidance_interval: Annotated[
        str | None,
        typer.Option(
            help="latentflow: 'T_LOW:T_HIGH', guidance only at flow times T_LOW < t <= T_HIGH "
            "(t = 1 is noise; default 0:0.5 at 128 and 256 px, 0:1 at 64 px)."
        ),
    ] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16.")] = "auto",
    classes: Annotated[
        str | None, typer.Option(help="Comma list: train on these classes only.")
    ] = None,
    imbalance: Annotated[
        str | None,
        typer.Option(
            help="Induce imbalance, e.g. 'virus=0.1,normal=0.5': keep that fraction of the "
            "class's training images (whole patients)."
        ),
    ] = None,
    evaluate: Annotated[bool, typer.Option(help="Measure FID/KID/precision/recall.")] = True,
    wait: bool = True,
) -> None:
    """Train a generator; it is registered as a new model version when it finishes."""
    body: dict[str, Any] = {
        "dataset": dataset,
        "model_name": model_name,
        "max_seconds": max_seconds,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "resolution": resolution,
        "seed": seed,
        "architecture": architecture,
        "guidance": guidance,
        "precision": precision,
        "evaluate": evaluate,
    }
    if classes:
        body["classes"] = [x.strip() for x in classes.split(",") if x.strip()]
    if imbalance:
        body["imbalance"] = _fractions(imbalance)
    if guidance_interval:
        body["guidance_interval"] = _interval(guidance_interval)
    _submit(c, "/train", body, wait, "train")


def _interval(text: str) -> list[float]:
    """'0:0.5' -> [0.0, 0.5]; the API checks the range."""
    low, sep, high = text.partition(":")
    try:
        if sep:
            return [float(low), float(high)]
    except ValueError:
        pass
    err.print(f"[red]error:[/red] expected T_LOW:T_HIGH such as 0:0.5, got {text!r}")
    raise typer.Exit(2)


def _fractions(text: str) -> dict[str, float]:
    """'virus=0.1,normal=0.5' -> {'virus': 0.1, 'normal': 0.5}."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            err.print(f"[red]error:[/red] expected CLASS=FRACTION, got {part.strip()!r}")
            raise typer.Exit(2) from None
    return out


@api_command(app)
def evaluate(
    c: Client,
    model: str,
    version: Annotated[int | None, typer.Option(help="Latest if omitted.")] = None,
    seeds: Annotated[int, typer.Option(help="Repeats of every arm.")] = 3,
    steps: Annotated[int, typer.Option(help="Classifier steps, the same for every arm.")] = 300,
    batch_size: int = 64,
    width: Annotated[int, typer.Option(help="Channels of the classifier's first stage.")] = 16,
    arms: Annotated[
        str | None,
        typer.Option(help="Comma list of DS1,DS2,DS3,TSTR,AUG,DS2+AUG,DS2-even,PRE (all)."),
    ] = None,
    test_dataset: Annotated[
        str | None, typer.Option(help="Score on this dataset instead of the held-out patients.")
    ] = None,
    synthesis_seed: int = 0,
    oversample: Annotated[
        float | None,
        typer.Option(help="Choose the synthetic images as synthesis does (site default)."),
    ] = None,
    choice: Annotated[
        str | None,
        typer.Option(help="realistic or typical: how they are chosen (site default)."),
    ] = None,
    dest: Annotated[
        Path | None, typer.Option(help="Write evaluation-ID.csv and evaluation-ID.png here.")
    ] = None,
    wait: bool = True,
) -> None:
    """Does the generator's output help a classifier? Trains the same classifier on each
    arm (real, real+synthetic, undersampled, synthetic only, ...) and scores it on real
    images of unseen patients."""
    body: dict[str, Any] = {
        "model": model,
        "version": version,
        "seeds": seeds,
        "steps": steps,
        "batch_size": batch_size,
        "width": width,
        "test_dataset": test_dataset,
        "synthesis_seed": synthesis_seed,
        "oversample": oversample,
        "choice": choice,
    }
    if arms:
        body["arms"] = [a.strip() for a in arms.split(",") if a.strip()]
    acc = c.post("/evaluations", body)
    if not wait:
        _print(acc)
        return
    job = c.wait(acc["job_id"], err, "evaluate")
    if job["state"] != "succeeded":
        _job_failed(job)
    eid = acc["evaluation_id"]
    evaluation = c.get(f"/evaluations/{eid}")
    table = Table(title=f"evaluation {eid}: {evaluation['summary']['seeds']} seed(s)")
    for col in ("arm", "balanced accuracy", "accuracy", "macro AUROC", "vs DS1 (bal. acc.)"):
        table.add_column(col)
    for arm, fig in evaluation["summary"]["arms"].items():
        table.add_row(
            arm,
            format_interval(fig["balanced_accuracy"]),
            format_interval(fig["accuracy"]),
            format_interval(fig["macro_auroc"]),
            format_interval(fig["vs_ds1"].get("balanced_accuracy"), signed=True),
        )
    out.print(table)
    pool = evaluation["summary"]["synthetic"].get("quality")
    if pool:
        out.print("The synthetic images the classifiers used (chosen and gated, as exported):")
        for line in quality_lines(pool):
            out.print(f"  {line}")
        for caveat in choice_caveats(evaluation["summary"]["synthetic"].get("selection", [])):
            out.print(f"  ({caveat})")
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        _download(c, f"/evaluations/{eid}/result.csv", dest / f"evaluation-{eid}.csv")
        _download(c, f"/evaluations/{eid}/chart.png", dest / f"evaluation-{eid}.png")


@api_command(app)
def synthesize(
    c: Client,
    model: str,
    version: int | None = None,
    per_class: int = 100,
    seed: int = 0,
    oversample: Annotated[
        float | None,
        typer.Option(
            help="Draw this many times the images and keep the best of each class by "
            "--choice (default: the site's SYNTHRAY_SYNTHESIS_OVERSAMPLE)."
        ),
    ] = None,
    choice: Annotated[
        str | None,
        typer.Option(
            help="realistic (most like the class's real films as a whole) or typical (most "
            "typical to the real-trained classifier); default SYNTHRAY_SYNTHESIS_CHOICE."
        ),
    ] = None,
    wait: bool = True,
) -> None:
    """Sample a class-balanced batch; its memorization check runs right after."""
    body = {
        "model": model,
        "version": version,
        "per_class": per_class,
        "seed": seed,
        "oversample": oversample,
        "choice": choice,
    }
    acc = c.post("/synthesize", body)
    if not wait:
        _print(acc)
        return
    job = c.wait(acc["job_id"], err, "synthesize")
    if job["state"] != "succeeded":
        _job_failed(job)
    check = c.wait(job["result"]["check_job_id"], err, "check")
    if check["state"] != "succeeded":
        _job_failed(check)
    _print(c.get(f"/batches/{acc['batch_id']}"))


@api_command(app)
def export(
    c: Client,
    batch_id: int,
    partner: Annotated[str, typer.Option(help="Partner key name the export is for.")],
    wait: bool = True,
) -> None:
    """Build an export bundle from a batch that passed the memorization gate."""
    _submit(c, "/exports", {"batch_id": batch_id, "partner": partner}, wait, "export")


@api_command(app)
def approve(
    c: Client,
    export_id: int,
    comment: Annotated[str, typer.Option(help="Why (kept with the review).")] = "",
) -> None:
    """Approve a built export bundle (a reviewer other than its requester)."""
    _print(c.post(f"/exports/{export_id}/approve", {"comment": comment}))


@api_command(app)
def reject(
    c: Client,
    export_id: int,
    comment: Annotated[str, typer.Option(help="Why it is refused (required).")],
) -> None:
    """Refuse a built export bundle for good (reviewer); the reason is shown to staff."""
    _print(c.post(f"/exports/{export_id}/reject", {"comment": comment}))


@api_command(app)
def download(
    c: Client,
    export_id: int,
    dest: Annotated[Path, typer.Option(help="Where to write the zip.")] = Path("."),
) -> None:
    """Download an approved export bundle (the partner it is addressed to)."""
    target = dest / f"synthray-export-{export_id}.zip" if dest.is_dir() else dest
    _download(c, f"/exports/{export_id}/download", target)


def check_images(
    c: Client,
    dataset: Annotated[str, typer.Option(help="Dataset whose patients to check against.")],
    images: Annotated[Path, typer.Option(help="Folder (or zip) of PNG/JPEG/DICOM images.")],
    version: int | None = None,
    html: Annotated[Path | None, typer.Option(help="Save the evidence page here.")] = None,
) -> None:
    """Vet images made elsewhere with the memorization gate (they can never be exported)."""
    import tempfile
    import zipfile

    if not images.exists():
        err.print(f"[red]error:[/red] {images} does not exist")
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        if images.is_dir():
            archive = Path(tmp) / "images.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
                for p in sorted(images.rglob("*")):
                    if p.is_file() and not p.is_symlink():
                        zf.write(p, p.relative_to(images).as_posix())
        else:
            archive = images
        form = {"check": json.dumps({"dataset": dataset, "version": version})}
        acc = c.upload("/image-checks", archive, form=form, filename="images.zip")
    job = c.wait(acc["job_id"], err, "imagecheck")
    if job["state"] != "succeeded":
        _job_failed(job)
    if html is not None:
        html.write_text(c.get_text(f"/image-checks/{acc['check_id']}/report.html"))
        err.print(f"evidence page written to {html}")
    _print(c.get(f"/image-checks/{acc['check_id']}"))


api_command(app, "check-images")(check_images)
# ``check`` was this verb's name up to 0.1.0, but it is also the job kind of a batch's
# memorization check. The old name stays, hidden and deprecated, for one release.
api_command(app, "check", hidden=True)(_renamed("check", "check-images", check_images))


@api_command(jobs_app, "list")
def jobs_list(c: Client, limit: int = 20) -> None:
    """Recent jobs."""
    jobs = c.get("/jobs", limit=limit)
    t = Table("id", "kind", "state", "progress", "attempts", "created")
    for j in jobs:
        p = j["progress"]
        prog = f"{p['step']}/{p['total']}" if p["total"] else str(p["step"])
        t.add_row(
            j["id"][:8],
            j["kind"],
            j["state"],
            f"{prog} {p['message']}"[:60],
            str(j["attempts"]),
            j["created_at"][:19],
        )
    out.print(t)


@api_command(jobs_app, "show")
def jobs_show(c: Client, job_id: str, wait: bool = False) -> None:
    """One job (with --wait: follow it with a progress bar until it ends)."""
    _print(c.wait(job_id, err) if wait else c.get(f"/jobs/{job_id}"))


@api_command(jobs_app, "preview")
def jobs_preview(
    c: Client,
    job_id: str,
    dest: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("preview.png"),
) -> None:
    """Save the latest preview grid of a training job (one row per class)."""
    _download(c, f"/jobs/{job_id}/preview.png", dest)


@api_command(jobs_app, "cancel")
def jobs_cancel(c: Client, job_id: str) -> None:
    """Ask a job to stop (a training job stops at its next step and keeps its checkpoint)."""
    _print(c.post(f"/jobs/{job_id}/cancel"))


@api_command(jobs_app, "retry")
def jobs_retry(c: Client, job_id: str) -> None:
    """Queue a failed or cancelled job again (a training job resumes from its checkpoint)."""
    _print(c.post(f"/jobs/{job_id}/retry"))


@api_command(models_app, "list")
def models_list(c: Client) -> None:
    """Registered models, their versions and aliases."""
    t = Table("model", "version", "architecture", "steps", "created", "aliases", "archived")
    for m in c.get("/models"):
        names = {v: a for a, v in m["aliases"].items()}
        for v in m["versions"]:
            t.add_row(
                m["name"],
                str(v["version"]),
                v["architecture"],
                str(v["metrics"].get("steps", "")),
                v["created_at"][:19],
                names.get(v["version"], ""),
                "yes" if v["archived"] else "",
            )
    out.print(t)


@api_command(models_app, "show")
def models_show(c: Client, name: str, version: int) -> None:
    """One version with its full lineage."""
    _print(c.get(f"/models/{name}/versions/{version}"))


@api_command(models_app, "compare")
def models_compare(c: Client, name: str, a: int, b: int) -> None:
    """Two versions' metrics side by side."""
    cmp = c.get(f"/models/{name}/compare", a=a, b=b)
    t = Table("metric", f"v{a}", f"v{b}", "delta")
    for k, row in cmp["metrics"].items():
        t.add_row(k, str(row["a"]), str(row["b"]), str(row.get("delta", "")))
    out.print(t)
    if cmp["config_changes"]:
        _print(cmp["config_changes"])


@api_command(models_app, "alias")
def models_alias(
    c: Client,
    name: str,
    alias: str,
    version: Annotated[int | None, typer.Argument(help="Omit to remove the alias.")] = None,
) -> None:
    """Move an alias (reviewer); every move is recorded."""
    _print(c.put(f"/models/{name}/aliases/{alias}", {"version": version}))


@api_command(models_app, "archive")
def models_archive(c: Client, name: str, version: int) -> None:
    """Archive a version (kept for lineage, no longer usable)."""
    _print(c.post(f"/models/{name}/versions/{version}/archive"))


@api_command(models_app, "weights")
def models_weights(
    c: Client,
    name: str,
    version: int,
    dest: Annotated[Path, typer.Option(help="File to write.")] = Path("generator.safetensors"),
) -> None:
    """Download a generator's weights (admin)."""
    _download(c, f"/models/{name}/versions/{version}/weights", dest)


def _job_failed(job: dict[str, Any]) -> NoReturn:
    err.print(f"[red]job {job['id']} {job['state']}:[/red] {job.get('error') or ''}")
    raise typer.Exit(1)


def _submit(c: Client, path: str, body: dict[str, Any], wait: bool, label: str) -> None:
    acc = c.post(path, body)
    if not wait:
        _print(acc)
        return
    job = c.wait(acc["job_id"], err, label)
    if job["state"] != "succeeded":
        _job_failed(job)
    _print(acc | {"result": job["result"]})


if __name__ == "__main__":
    app()
