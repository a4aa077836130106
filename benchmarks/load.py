"""The API under load: authenticated job-status reads on SQLite and on PostgreSQL, batch
listings, and job submissions, each at 32 concurrent connections for a few seconds,
beside a bare FastAPI endpoint (no database, no key) served the same way in the same run:
uvicorn, one process, on this machine; the load comes from one asyncio process writing
HTTP/1.1 on raw keep-alive connections. Then the status reads again while unauthenticated
1 MiB bodies keep arriving.

Targets (issue: "Load held"): status reads at least 30% of the bare endpoint's requests
per second with p99 under 50 ms; at least 200 submissions per second, every accepted job
in the table and run (a real worker is started after the load and must bring every one
to an end state); p99 under 100 ms with the large bodies arriving.

Usage: python benchmarks/load.py [--seconds 6] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get(
    "SYNTHRAY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

# The worker runs every accepted submission (each fails fast, about 10 a second on 2
# cores); waiting stops when none is left, when no job has ended for STALL_S (a job that
# never runs shows itself so), or at RUN_LIMIT_S, which keeps the benchmark within its
# 10 minutes. A faster API accepts more submissions in the same seconds, so the limit is
# not a fixed share of them.
RUN_LIMIT_S = 240.0
STALL_S = 30.0

# The two servers, started as `python -c` with the settings in the environment.
BARE_APP = """
from fastapi import FastAPI
app = FastAPI()

@app.get("/bare")
def bare() -> dict[str, str]:
    return {"state": "succeeded"}
"""
SYNTHRAY_APP = """
from synthray.app.main import create_app
app = create_app()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(source: str, env: dict[str, str], probe: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    code = source + f"\nimport uvicorn\nuvicorn.run(app, port={port}, log_level='warning')\n"
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ | env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(url + probe, timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def encode(request: dict[str, Any], host: str) -> bytes:
    """One HTTP/1.1 keep-alive request as bytes (the load generator is raw asyncio
    streams: an HTTP client library would be the bottleneck on two cores, not the server)."""
    body: bytes = request.get("content", b"")
    headers = {"Host": host, "Connection": "keep-alive"} | request.get("headers", {})
    if "json" in request:
        body = json.dumps(request["json"]).encode()
        headers["Content-Type"] = "application/json"
    if body or request["method"] in ("POST", "PUT"):
        headers["Content-Length"] = str(len(body))
    head = f"{request['method']} {request['url']} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    return head.encode() + b"\r\n" + body


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[int, bool]:
    """Send one request, read one response; returns (status, connection kept)."""
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    await reader.readexactly(int(fields.get("content-length", "0")))
    return status, fields.get("connection", "").lower() != "close"


async def hammer(
    url: str,
    seconds: float,
    connections: int,
    request: dict[str, Any],
    noise: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``connections`` keep-alive connections sending ``request`` back to back for
    ``seconds``; with ``noise``, two more connections send that request meanwhile (not
    counted)."""
    host, port = url.removeprefix("http://").split(":")
    raw = encode(request, host)
    latencies: list[float] = []
    codes: dict[int, int] = {}
    noise_codes: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def loop(req: bytes, counted: bool) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                status, kept = await exchange(reader, writer, req)
                if counted:
                    latencies.append(time.perf_counter() - t)
                    codes[status] = codes.get(status, 0) + 1
                else:
                    noise_codes[status] = noise_codes.get(status, 0) + 1
                if not kept:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
        except (ConnectionError, asyncio.IncompleteReadError):
            if counted:
                raise
        finally:
            writer.close()

    t0 = time.perf_counter()
    tasks = [loop(raw, True) for _ in range(connections)]
    if noise:
        tasks += [loop(encode(noise, host), False) for _ in range(2)]
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "rps": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "codes": codes,
    } | ({"noise_codes": noise_codes} if noise else {})


def prepare(database_url: str, folder: Path) -> tuple[str, str, dict[str, str]]:
    """A migrated database with an operator key, one job and a tiny import folder."""
    env = {
        "SYNTHRAY_DEV_MODE": "true",
        "SYNTHRAY_DATA_DIR": str(folder / "data"),
        "SYNTHRAY_DATABASE_URL": database_url,
        "SYNTHRAY_IMPORT_ROOT": str(folder / "import"),
        "SYNTHRAY_RATE_LIMIT": "",
        "SYNTHRAY_RATE_LIMIT_PER_KEY": "",
        "SYNTHRAY_LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    from synthray.app.auth.schemas import Role
    from synthray.app.auth.service import create_key
    from synthray.app.db import session_scope
    from synthray.app.jobs import service as jobs
    from synthray.app.jobs.schemas import JobKind
    from synthray.config import Settings
    from synthray.migrations import upgrade

    settings = Settings()
    upgrade(settings.sqlalchemy_url)
    src = folder / "import" / "tiny"
    src.mkdir(parents=True)
    (src / "labels.csv").write_text("file,label,patient_id\na.png,x,p1\n")
    with session_scope(settings.sqlalchemy_url) as s:
        key = create_key(s, settings.secret_key, "bench", Role.operator).key
        job = jobs.create(s, settings, JobKind.export, {"bench": True}, None)
        job_id = job.id
    return key, job_id, env


def ingest_jobs_by_state(database_url: str) -> dict[str, int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT state, count(*) FROM jobs WHERE kind = 'ingest' GROUP BY state")
        ).all()
    engine.dispose()
    return {str(state): int(n) for state, n in rows}


def run_accepted(database_url: str, env: dict[str, str], limit_s: float) -> dict[str, Any]:
    """Start a real worker (two processes) on the submissions' queue and wait until every
    accepted ingest job has run to an end state (their import folder holds a labels file
    naming an image that is not there: each job runs and fails fast). Accepted, in the
    table and run: nothing lost between the 202 and the worker."""
    code = "from synthray.cli.main import app; app()"
    worker = subprocess.Popen(
        [sys.executable, "-c", code, "worker", "--concurrency", "2", "--loglevel", "WARNING"],
        env=os.environ | env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    start = last_change = time.monotonic()
    previous = -1
    try:
        while True:
            states = ingest_jobs_by_state(database_url)
            waiting = states.get("queued", 0) + states.get("running", 0)
            now = time.monotonic()
            if waiting != previous:
                previous, last_change = waiting, now
            if waiting == 0 or now - start > limit_s or now - last_change > STALL_S:
                break
            time.sleep(1)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    ended = sum(n for state, n in states.items() if state not in ("queued", "running"))
    return {
        "ran": ended,
        "not_run": waiting,
        "by_state": states,
        "seconds": round(time.monotonic() - start, 1),
    }


def run_backend(name: str, database_url: str, seconds: float, conns: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"load-{name}-"))
    key, job_id, env = prepare(database_url, folder)
    proc, url = serve(SYNTHRAY_APP, env, "/healthz")
    h = {"Authorization": f"Bearer {key}"}
    spec = {
        "name": "bench",
        "source": "tiny",
        "classes": ["x", "y"],
    }
    try:
        out: dict[str, Any] = {}
        status = {"method": "GET", "url": f"/v1/jobs/{job_id}", "headers": h}
        asyncio.run(hammer(url, 1.0, conns, status))  # warm-up
        out["status"] = asyncio.run(hammer(url, seconds, conns, status))
        out["batches"] = asyncio.run(
            hammer(url, seconds, conns, {"method": "GET", "url": "/v1/batches", "headers": h})
        )
        post = {"method": "POST", "url": "/v1/datasets", "headers": h, "json": spec}
        out["submit"] = asyncio.run(hammer(url, seconds, conns, post))
        out["submit"]["in_table"] = sum(ingest_jobs_by_state(database_url).values())
        big = {
            "method": "POST",
            "url": "/v1/train",
            "content": b" " * (1024**2 + 1),
            "headers": {"content-type": "application/json"},
        }
        out["status_with_big_bodies"] = asyncio.run(hammer(url, seconds, conns, status, big))
    finally:
        proc.terminate()
        proc.wait()
    out["submitted_jobs_run"] = run_accepted(database_url, env, RUN_LIMIT_S)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()

    proc, url = serve(BARE_APP, {}, "/bare")
    try:
        bare_req = {"method": "GET", "url": "/bare"}
        asyncio.run(hammer(url, 1.0, args.connections, bare_req))
        bare = asyncio.run(hammer(url, args.seconds, args.connections, bare_req))
    finally:
        proc.terminate()
        proc.wait()
    print("bare FastAPI endpoint:", json.dumps(bare))

    from sqlalchemy import create_engine, text

    pg_name = f"synthray_load_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{pg_name}"'))
    results: dict[str, Any] = {}
    try:
        sqlite_dir = Path(tempfile.mkdtemp(prefix="load-sqlite-db-"))
        backends = {
            "sqlite": f"sqlite:///{sqlite_dir / 'synthray.db'}",
            "postgres": PG_ADMIN.rsplit("/", 1)[0] + f"/{pg_name}",
        }
        for name, db_url in backends.items():
            results[name] = run_backend(name, db_url, args.seconds, args.connections)
            for scenario, r in results[name].items():
                print(f"{name} {scenario}:", json.dumps(r))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))
        admin.dispose()

    for name, r in results.items():  # each backend against the targets
        run = r["submitted_jobs_run"]
        print(
            f"{name}: status {r['status']['rps'] / bare['rps']:.3f}x bare "
            f"(p99 {r['status']['p99_ms']} ms), with large bodies p99 "
            f"{r['status_with_big_bodies']['p99_ms']} ms, submissions {r['submit']['rps']}/s "
            f"({r['submit']['in_table']} in the table, {run['ran']} run, "
            f"{run['not_run']} not run after {run['seconds']} s)"
        )
    sqlite_status = results["sqlite"]["status"]
    print(
        json.dumps(
            {
                "benchmark": "load",
                "value": sqlite_status["rps"],
                "unit": "job-status reads/s (SQLite, with a key)",
                "reference": "bare FastAPI endpoint, same uvicorn, same load",
                "reference_value": bare["rps"],
                "ratio": round(sqlite_status["rps"] / bare["rps"], 3),
                "target": 0.30,
            }
        )
    )


if __name__ == "__main__":
    main()
