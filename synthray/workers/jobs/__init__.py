"""One module per job kind, each a thin task: load what the job names, call app services or
``synthray.models``, record the outcome through app services.

Every module exposes ``run(ctx) -> dict`` (the job's result) and may expose
``on_failure(ctx, state)``, which leaves the objects a failed or cancelled job owned in a
state that says so. Both are typed against :class:`synthray.app.jobs.context.JobContext`,
and both are idempotent: a redelivered job finds its earlier output and does no work twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from synthray.app.jobs.context import JobContext
from synthray.app.jobs.schemas import JobKind
from synthray.workers.jobs import (
    check,
    evaluate,
    export,
    imagecheck,
    ingest,
    synthesize,
    train,
)


@dataclass(frozen=True)
class Handler:
    run: Callable[[JobContext], dict[str, Any]]
    on_failure: Callable[[JobContext, str], None] | None = None


HANDLERS: dict[str, Handler] = {
    JobKind.ingest: Handler(ingest.run, ingest.on_failure),
    JobKind.train: Handler(train.run),
    JobKind.synthesize: Handler(synthesize.run, synthesize.on_failure),
    JobKind.check: Handler(check.run, check.on_failure),
    JobKind.imagecheck: Handler(imagecheck.run, imagecheck.on_failure),
    JobKind.export: Handler(export.run, export.on_failure),
    JobKind.evaluate: Handler(evaluate.run, evaluate.on_failure),
}
