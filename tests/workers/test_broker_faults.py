"""The broker fails: a private redis-server (its own port, no persistence) is restarted
under queued jobs, or is down when a job is accepted. No job is lost, and each is
published again at the sweeper's next pass after the broker returns, not after the
requeue period. The shared Redis is never touched."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import make_settings
from fastapi.testclient import TestClient
from support import NIH_INGEST, Keys, auth, copy_subset, free_port, make_keys

from synthray.app.db import session_scope
from synthray.app.jobs.tables import Job
from synthray.app.main import create_app
from synthray.config import Settings
from synthray.workers.sweeper import BrokerWatch, sweep_once


class PrivateRedis:
    """A redis-server of the test's own, started and stopped at will, keeping nothing."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                if redis.Redis(port=self.port, socket_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def queued(self, queue: str = "cpu") -> int:
        return int(redis.Redis(port=self.port).llen(queue))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    r.stop()


def _ingest(client: TestClient, key: str) -> str:
    r = client.post(
        "/v1/datasets", json={"name": "d", "source": "nih"} | NIH_INGEST, headers=auth(key)
    )
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


@pytest.fixture
def on_private_redis(
    tmp_path: Path, database_url: str, private_redis: PrivateRedis
) -> tuple[Settings, Keys]:
    """Settings whose broker is the private redis-server, with keys and an import folder."""
    s = make_settings(tmp_path, database_url, broker_url=private_redis.url)
    copy_subset(s.import_root, per_class=3)
    return s, make_keys(s)


def test_jobs_lost_with_a_restarted_broker_are_published_again(
    on_private_redis: tuple[Settings, Keys], private_redis: PrivateRedis
) -> None:
    s, keys = on_private_redis
    watch = BrokerWatch()
    assert watch.lost_messages(s) is False  # the first look only learns the run id
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        _ingest(c, keys.operator)
        _ingest(c, keys.operator)
    assert private_redis.queued() == 2
    assert watch.lost_messages(s) is False and sweep_once(s) == 0  # nothing is stale yet

    private_redis.stop()
    private_redis.start()  # a new run: without persistence, the queue is gone
    assert private_redis.queued() == 0
    assert watch.lost_messages(s) is True
    assert sweep_once(s, broker_lost_messages=True) == 2
    assert private_redis.queued() == 2
    assert watch.lost_messages(s) is False  # once only


def test_a_job_accepted_while_the_broker_is_down_is_published_when_it_returns(
    on_private_redis: tuple[Settings, Keys], private_redis: PrivateRedis
) -> None:
    s, keys = on_private_redis
    watch = BrokerWatch()
    watch.lost_messages(s)
    private_redis.stop()
    assert watch.lost_messages(s) is False  # down: nothing to do but remember it
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        t0 = time.monotonic()
        job_id = _ingest(c, keys.operator)  # the row is the promise; the message failed
        accepted_s = time.monotonic() - t0
        assert c.get(f"/v1/jobs/{job_id}", headers=auth(keys.operator)).json()["state"] == (
            "queued"
        )
    assert accepted_s < 30, accepted_s  # a hang guard, not a speed claim
    with session_scope(s.sqlalchemy_url) as session:
        assert session.get(Job, job_id).enqueued_at is None  # marked as never published
    private_redis.start()
    assert watch.lost_messages(s) is True
    # Even without the watch, a never-published job is due at once.
    assert sweep_once(s) == 1
    assert private_redis.queued() == 1
    with session_scope(s.sqlalchemy_url) as session:
        assert session.get(Job, job_id).enqueued_at is not None
