"""Prometheus metrics at ``/metrics``, drawn with ``prometheus_client``.

Two kinds of figure. Requests (count by route template, method and status; latency by
route template) are counted in the API process as they happen. Everything about work
(jobs by kind and state, their durations, queue depth, gate outcomes, export downloads)
is read from the database when Prometheus scrapes, because the rows are the truth: several
API processes and workers on several machines share them, and a counter held in one
process would forget its share on a restart. Those queries are a handful of GROUP BYs on
indexed columns, cached for a few seconds so that several scrapers cost one read.

The endpoint is off unless ``SYNTHRAY_METRICS_TOKEN`` is set (the scraper then sends it as
a bearer token) or the server runs in dev mode. Route templates, not paths, label the
request metrics: a path carries dataset names and ids, and unbounded label values would
grow the registry without end.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import generate_latest
from sqlalchemy import ColumnElement, func, select

from synthray.app.audit.tables import AuditEvent
from synthray.app.batches.tables import SyntheticBatch
from synthray.app.db import session_scope
from synthray.app.jobs.tables import Job

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCRAPE_CACHE_S = 5.0


def _seconds_between(dialect: str, start: Any, end: Any) -> ColumnElement[Any]:
    """SQL for the seconds from ``start`` to ``end`` (two timestamp columns)."""
    if dialect == "postgresql":
        return func.extract("epoch", end - start)
    # SQLite keeps timestamps as ISO text; julianday reads it in days (to the millisecond).
    return (func.julianday(end) - func.julianday(start)) * 86400.0


class WorkCollector:
    """Jobs, queues, gate outcomes and downloads, read from the database at scrape time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > SCRAPE_CACHE_S:
                self._cached = (now, self._read())
            yield from self._cached[1]

    def _read(self) -> list[Metric]:
        jobs = GaugeMetricFamily(
            "synthray_jobs",
            "Jobs by kind and state (rows in the jobs table).",
            labels=["kind", "state"],
        )
        durations = SummaryMetricFamily(
            "synthray_job_duration_seconds",
            "Wall time from start to end of finished jobs, by kind and final state.",
            labels=["kind", "state"],
        )
        depth = GaugeMetricFamily(
            "synthray_queue_depth", "Jobs queued and not yet claimed, by queue.", labels=["queue"]
        )
        gate = GaugeMetricFamily(
            "synthray_gate_batches",
            "Synthetic batches by the memorization gate's outcome (passed, failed, or a "
            "state before the verdict).",
            labels=["state"],
        )
        flagged = GaugeMetricFamily(
            "synthray_gate_flagged_images", "Synthetic images the gate has flagged, all batches."
        )
        downloads = GaugeMetricFamily(
            "synthray_export_downloads",
            "Export download attempts by outcome (from the audit trail).",
            labels=["outcome"],
        )
        with session_scope(self.url, read_only=True) as s:
            for kind, state, n in s.execute(
                select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
            ):
                jobs.add_metric([str(kind), str(state)], n)
            # Counted and summed by the database, so a scrape costs one row per kind and
            # state however many jobs the table holds.
            seconds = _seconds_between(s.get_bind().dialect.name, Job.started_at, Job.finished_at)
            for kind, state, count, total in s.execute(
                select(Job.kind, Job.state, func.count(), func.sum(seconds))
                .where(Job.started_at.is_not(None), Job.finished_at.is_not(None))
                .group_by(Job.kind, Job.state)
                .order_by(Job.kind, Job.state)
            ):
                durations.add_metric([str(kind), str(state)], count, max(0.0, float(total or 0)))
            for queue, n in s.execute(
                select(Job.queue, func.count()).where(Job.state == "queued").group_by(Job.queue)
            ):
                depth.add_metric([queue], n)
            for batch_state, n in s.execute(
                select(SyntheticBatch.state, func.count()).group_by(SyntheticBatch.state)
            ):
                gate.add_metric([str(batch_state)], n)
            total_flagged = s.scalar(
                select(func.sum(SyntheticBatch.check["flagged"].as_integer())).where(
                    SyntheticBatch.state.in_(("passed", "failed"))
                )
            )
            flagged.add_metric([], int(total_flagged or 0))
            for outcome, n in s.execute(
                select(AuditEvent.outcome, func.count())
                .where(AuditEvent.action == "download_export")
                .group_by(AuditEvent.outcome)
            ):
                downloads.add_metric([outcome], n)
        return [jobs, durations, depth, gate, flagged, downloads]


class Metrics:
    """One registry per application (tests build many apps in one process)."""

    def __init__(self, database_url: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "synthray_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "synthray_http_request_duration_seconds",
            "Time to answer, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(WorkCollector(database_url))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def token_accepted(expected: str | None, authorization: str | None) -> bool:
    """Whether the scraper's ``Authorization: Bearer`` matches the configured token."""
    if not expected:
        return False
    presented = (authorization or "")[7:] if (authorization or "")[:7].lower() == "bearer " else ""
    return hmac.compare_digest(presented.strip().encode(), expected.encode())
