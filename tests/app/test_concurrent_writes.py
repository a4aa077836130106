"""Requests that write SQLite wait for its write lock in the API's own queue, on the event
loop, not in the thread pool (``deps._write_gate``)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from sqlalchemy import Connection
from support import Keys, auth, make_keys, served

from synthray.config import Settings


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_writers_waiting_for_sqlite_leave_the_thread_pool_free(settings: Settings) -> None:
    """Another process's long transaction holds SQLite's write lock while 48 requests that
    write arrive, more than the thread pool's 40 threads. A request that needs a thread
    but not the lock (a plain endpoint) must still be answered at once; every writer is
    answered once the lock is free. Writers that waited in SQLite's busy handler, a
    thread each, would hold the whole pool until the lock came free."""
    keys: Keys = make_keys(settings)
    from synthray.app.db import engine_for

    once = threading.Lock()
    released: list[bool] = []
    answered_while_locked: list[float] = []

    def release(writer: Connection) -> None:
        with once:
            if not released:
                released.append(True)
                writer.rollback()

    async def scenario(base: str, writer: Connection) -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            # Each authenticates in a write transaction, then finds no such key: 404.
            writes = [
                asyncio.create_task(client.delete(f"/v1/keys/{900000 + i}", headers=admin))
                for i in range(48)
            ]
            await asyncio.sleep(1.0)  # all of them are waiting for the lock by now
            start = time.monotonic()
            probe = await client.get("/v1/batches/999999/report", headers=auth(keys.operator))
            assert probe.status_code == 404
            if not released:
                answered_while_locked.append(time.monotonic() - start)
            release(writer)
            return [r.status_code for r in await asyncio.gather(*writes)]

    admin = auth(keys.admin)
    with served(settings) as base, engine_for(settings.sqlalchemy_url).connect() as writer:
        writer.exec_driver_sql("SELECT 1")  # begun IMMEDIATE: the write lock is held
        # Let go after 15 s at the latest, well inside the busy timeout (30 s).
        timer = threading.Timer(15, release, (writer,))
        timer.start()
        try:
            codes = asyncio.run(scenario(base, writer))
        finally:
            timer.cancel()
            release(writer)
    assert answered_while_locked, "the plain endpoint waited for the write lock"
    assert answered_while_locked[0] < 5, answered_while_locked
    assert codes == [404] * 48
