"""Export job: re-check the gate and build the bundle (``app.exports.service.build``)."""

from __future__ import annotations

from typing import Any

from synthray.app.exports import service as exports
from synthray.app.jobs.context import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    return exports.build(ctx)


def on_failure(ctx: JobContext, state: str) -> None:
    with ctx.session() as s:
        exports.build_ended(s, int(ctx.params["export_id"]), state)
