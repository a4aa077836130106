"""The Celery client the API uses to publish job ids (and the worker reuses).

Only job ids travel through the broker; the jobs table carries everything else.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from celery import Celery
from kombu import Queue

from synthray.config import EMBEDDED_BROKER, Settings

TASK_NAME = "synthray.run_job"
QUEUES = ("gpu", "cpu")


def celery_config(broker_url: str, broker_dir: Path) -> dict[str, object]:
    conf: dict[str, object] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": "cpu",
        "task_queues": tuple(Queue(q) for q in QUEUES),
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
    }
    if broker_url == EMBEDDED_BROKER:
        queue_dir = broker_dir / "queue"
        control_dir = broker_dir / "control"
        queue_dir.mkdir(parents=True, exist_ok=True)
        control_dir.mkdir(parents=True, exist_ok=True)
        conf.update(
            broker_url="filesystem://",
            broker_transport="synthray.app.jobs.fs_transport:Transport",
            broker_transport_options={
                "data_folder_in": str(queue_dir),
                "data_folder_out": str(queue_dir),
                "control_folder": str(control_dir),
                "polling_interval": 0.2,
            },
        )
    else:
        conf.update(broker_url=broker_url, broker_transport_options={"visibility_timeout": 3600})
    return conf


@lru_cache(maxsize=4)
def _celery(broker_url: str, broker_dir: str) -> Celery:
    app = Celery("synthray-client")
    app.conf.update(celery_config(broker_url, Path(broker_dir)))
    return app


def client(settings: Settings) -> Celery:
    return _celery(settings.broker_url, str(settings.broker_dir.resolve()))


def publish(settings: Settings, job_id: str, queue: str) -> None:
    client(settings).send_task(TASK_NAME, args=[job_id], queue=queue)


def epoch(settings: Settings) -> str | None:
    """An id of the broker's current run, which changes when Redis restarts (and may have
    lost every queued message, without persistence); None for brokers whose queues
    survive a restart (the embedded one on disk, AMQP's durable queues). Raises if the
    broker cannot be reached."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis  # kombu's Redis transport needs it, so it is there whenever Redis is used

    r = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return str(r.info("server")["run_id"])
    finally:
        r.close()


def ping(settings: Settings) -> None:
    """Open (and close) a broker connection; raises if the broker is unreachable."""
    with client(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
