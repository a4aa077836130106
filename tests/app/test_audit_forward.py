"""The audit trail reaches the hospital's log collector as RFC 5424 syslog: a real TCP
collector of the test's own (octet-counted frames), the same behind TLS (RFC 5425) with a
test CA, and a UDP one. Over TLS, a collector whose certificate the CA did not sign or whose
name does not match, and one that refuses our client certificate, get nothing and the
records wait. Records written while
the collector is down wait and go out in order when it returns, none twice; a real worker
forwards them as they are written."""

from __future__ import annotations

import json
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from support import Keys, auth, free_port

from synthray.app.audit.forward import Collector, forward_once, tls_context
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

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
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
        if tls is not None:  # every accepted connection does the TLS handshake first
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
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


# --------------------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca: Path  # the test CA's certificate
    other_ca: Path  # a CA that signed nothing here
    server: Path  # certificate + key for 127.0.0.1 and localhost
    wrong_name: Path  # certificate + key for collector.invalid, by the same CA
    client: Path  # client certificate + key, by the same CA


def _pem_pair(name: str, issuer: tuple | None, *, ca: bool = False, sans: list | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    sign_key, issuer_name = (key, subject) if issuer is None else (issuer[1], issuer[0].subject)
    now = datetime.now(UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(sign_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert, key, cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    import ipaddress

    from cryptography import x509

    d = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key, ca_pem, _ = _pem_pair("SynthRay test CA", None, ca=True)
    _, _, other_pem, _ = _pem_pair("Another CA", None, ca=True)
    files = {"ca": ca_pem, "other_ca": other_pem}
    for name, cn, sans in (
        (
            "server",
            "collector",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ),
        ("wrong_name", "collector.invalid", [x509.DNSName("collector.invalid")]),
        ("client", "synthray-worker", None),
    ):
        _, _, cert_pem, key_pem = _pem_pair(cn, (ca_cert, ca_key), sans=sans)
        files[name] = cert_pem + key_pem
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
    return Pki(**{name: d / f"{name}.pem" for name in files})


def _server_context(pki: Pki, cert: Path, require_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert))
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(pki.ca))
    return ctx


def _wait_for(server: TcpCollector, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(server.received) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_tls_collector_verified_by_the_site_ca(
    client: TestClient, keys: Keys, settings: Settings, port: int, pki: Pki
) -> None:
    server = TcpCollector(port, tls=_server_context(pki, pki.server))
    try:
        _records(client, keys, 3)
        for ca in (pki.other_ca, None):  # a CA that did not sign it, the system's store
            refused = Collector(
                f"tls://127.0.0.1:{port}", timeout=2, context=tls_context(str(ca) if ca else None)
            )
            with pytest.raises(ssl.SSLCertVerificationError):
                forward_once(settings.sqlalchemy_url, refused)
        right = Collector(f"tls://127.0.0.1:{port}", timeout=2, context=tls_context(str(pki.ca)))
        assert forward_once(settings.sqlalchemy_url, right) == 3  # nothing was counted as sent
        _records(client, keys, 2)
        assert forward_once(settings.sqlalchemy_url, right) == 2  # the same connection
        right.close()
        _wait_for(server, 5)
    finally:
        server.stop()
    parsed = [_parse(m) for m in server.received]
    assert [int(p["sd"]["seq"]) for p in parsed] == [1, 2, 3, 4, 5]
    assert parsed[4]["sd"]["hash"] == _hashes(settings)[5]


def test_tls_collector_name_is_checked(
    client: TestClient, keys: Keys, settings: Settings, port: int, pki: Pki
) -> None:
    server = TcpCollector(port, tls=_server_context(pki, pki.wrong_name))
    try:
        _records(client, keys, 1)
        c = Collector(f"tls://127.0.0.1:{port}", timeout=2, context=tls_context(str(pki.ca)))
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            forward_once(settings.sqlalchemy_url, c)
    finally:
        server.stop()
    assert server.received == []


def test_tls_collector_that_requires_a_client_certificate(
    client: TestClient, keys: Keys, settings: Settings, port: int, pki: Pki
) -> None:
    server = TcpCollector(port, tls=_server_context(pki, pki.server, require_client=True))
    try:
        _records(client, keys, 1)  # one small record: one write that a closed peer may still take
        anonymous = Collector(
            f"tls://127.0.0.1:{port}", timeout=2, context=tls_context(str(pki.ca))
        )
        with pytest.raises(OSError):
            forward_once(settings.sqlalchemy_url, anonymous)
        known = Collector(
            f"tls://127.0.0.1:{port}",
            timeout=2,
            context=tls_context(str(pki.ca), str(pki.client)),
        )
        assert forward_once(settings.sqlalchemy_url, known) == 1
        known.close()
        _wait_for(server, 1)
    finally:
        server.stop()
    assert [int(_parse(m)["sd"]["seq"]) for m in server.received] == [1]


def test_tls_settings_are_validated() -> None:
    assert Settings(dev_mode=True, audit_syslog="tls://logs.hospital.example:6514").audit_syslog
    with pytest.raises(ValueError):
        Settings(dev_mode=True, audit_syslog="https://logs.hospital.example:6514")
