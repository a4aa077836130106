"""The audit trail reaches the hospital's log collector as RFC 5424 syslog: a real TCP
collector of the test's own (octet-counted frames) and a UDP one. Records written while
the collector is down wait and go out in order when it returns, none twice; a real worker
forwards them as they are written."""

from __future__ import annotations

import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from support import Keys, auth, free_port

from synthray.app.audit.forward import Collector, forward_once
from synthray.app.audit.tables import AuditEvent
from synthray.app.db import session_scope
from synthray.config import Settings

RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<host>\S+) "
    rb"synthray - audit \[synthray@32473 (?P<sd>[^\]]*)\] \xef\xbb\xbf(?P<msg>\{.*\})$",
    re.S,
)


class TcpCollector:
    """Reads RFC 6587 octet-counted frames from any number of connections."""

    def __init__(self, port: int) -> None:
        self.received: list[bytes] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    length = b""
                    while (c := self.rfile.read(1)) not in (b" ", b""):
                        length += c
                    if not length:
                        return
                    outer.received.append(self.rfile.read(int(length)))

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _parse(raw: bytes) -> dict[str, Any]:
    m = RFC5424.match(raw)
    assert m, raw[:200]
    sd = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["sd"].decode()))
    return {"pri": int(m["pri"]), "sd": sd, "msg": json.loads(m["msg"])}


def _records(client: TestClient, keys: Keys, n: int) -> None:
    for _ in range(n):  # refused requests: each one an audit record
        assert client.get("/v1/keys", headers=auth(keys.partner)).status_code == 403


def _hashes(settings: Settings) -> dict[int, str]:
    with session_scope(settings.sqlalchemy_url) as s:
        return {e.seq: e.hash for e in s.scalars(select(AuditEvent))}


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()


def test_records_wait_for_a_collector_that_is_down_and_go_once_in_order(
    client: TestClient, keys: Keys, settings: Settings, port: int
) -> None:
    collector = Collector(f"tcp://127.0.0.1:{port}", timeout=2)
    _records(client, keys, 5)
    with pytest.raises(OSError):
        forward_once(settings.sqlalchemy_url, collector)  # nothing listens yet
    server = TcpCollector(port)
    try:
        assert forward_once(settings.sqlalchemy_url, collector, hostname="synthray-1") == 5
        _records(client, keys, 3)
        assert forward_once(settings.sqlalchemy_url, collector, hostname="synthray-1") == 3
        assert forward_once(settings.sqlalchemy_url, collector) == 0
        collector.close()
        deadline = time.monotonic() + 10
        while len(server.received) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
    parsed = [_parse(m) for m in server.received]
    assert [int(p["sd"]["seq"]) for p in parsed] == list(range(1, 9))
    hashes = _hashes(settings)
    assert all(p["sd"]["hash"] == hashes[int(p["sd"]["seq"])] for p in parsed)
    assert {p["pri"] for p in parsed} == {10 * 8 + 4}  # authpriv.warning: refusals
    assert parsed[0]["msg"]["action"] == "request" and parsed[0]["msg"]["outcome"] == "refused"
    assert parsed[1]["sd"]["prev"] == parsed[0]["sd"]["hash"]


def test_udp_collector(client: TestClient, keys: Keys, settings: Settings) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    _records(client, keys, 2)
    url = f"udp://127.0.0.1:{sock.getsockname()[1]}"
    assert forward_once(settings.sqlalchemy_url, Collector(url)) == 2
    got = [_parse(sock.recv(65536)) for _ in range(2)]
    sock.close()
    assert [int(p["sd"]["seq"]) for p in got] == [1, 2]


@pytest.mark.e2e
def test_a_worker_forwards_records_as_they_are_written(
    client: TestClient, keys: Keys, settings: Settings, port: int
) -> None:
    server = TcpCollector(port)
    env = os.environ | {
        "SYNTHRAY_DEV_MODE": "true",
        "SYNTHRAY_DATABASE_URL": settings.sqlalchemy_url,
        "SYNTHRAY_DATA_DIR": str(settings.data_dir),
        "SYNTHRAY_AUDIT_SYSLOG": f"tcp://127.0.0.1:{port}",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "synthray.cli.main", "worker", "--queues", "cpu"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _records(client, keys, 4)
        deadline = time.monotonic() + 60
        while len(server.received) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [int(_parse(m)["sd"]["seq"]) for m in server.received] == [1, 2, 3, 4]
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=40)
        except subprocess.TimeoutExpired:
            worker.kill()
        server.stop()
