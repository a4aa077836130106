"""The `synthray` command as a user runs it (real subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthray.config import InsecureSettingsError, Settings


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "synthray.cli.main", *args],
        env=os.environ.copy() | env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_refuses_default_secret_outside_dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNTHRAY_DEV_MODE", raising=False)
    monkeypatch.delenv("SYNTHRAY_SECRET_KEY", raising=False)
    with pytest.raises(InsecureSettingsError):
        Settings()
    with pytest.raises(InsecureSettingsError):
        Settings(secret_key="short")
    assert Settings(secret_key="x" * 40).secret_key == "x" * 40


def test_keys_create_prints_the_key_once(tmp_path: Path) -> None:
    env = {"SYNTHRAY_DEV_MODE": "true", "SYNTHRAY_DATA_DIR": str(tmp_path / "d")}
    r = _run(["keys", "create", "--role", "partner", "--name", "site-b"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("sr_")
    db = (tmp_path / "d" / "synthray.db").read_bytes()
    assert key.encode() not in db  # only the HMAC is stored
    r = _run(["keys", "create", "--role", "king", "--name", "x"], env, tmp_path)
    assert r.returncode == 2 and "role" in r.stderr
    # A partner's name is its identity: reusing it takes --same-partner.
    again = ["keys", "create", "--role", "partner", "--name", "site-b"]
    r = _run(again, env, tmp_path)
    assert r.returncode == 2 and "already has keys" in r.stderr and not r.stdout
    assert "Traceback" not in r.stderr
    r = _run([*again, "--same-partner"], env, tmp_path)
    assert r.returncode == 0 and r.stdout.strip().startswith("sr_") and r.stdout.strip() != key


def test_server_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    env = {"SYNTHRAY_DEV_MODE": "false", "SYNTHRAY_DATA_DIR": str(tmp_path / "d")}
    r = _run(["db", "upgrade"], env | {"SYNTHRAY_SECRET_KEY": ""}, tmp_path)
    assert r.returncode == 2
    assert "SYNTHRAY_SECRET_KEY" in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_without_data_says_so_in_one_sentence(tmp_path: Path) -> None:
    env = {"SYNTHRAY_DEV_MODE": "true", "SYNTHRAY_DEMO_DATA": str(tmp_path / "nothing")}
    r = _run(["demo"], env, tmp_path)
    assert r.returncode == 2
    msg = " ".join(r.stderr.split())
    assert "No labelled images at" in msg and "SYNTHRAY_DEMO_DATA" in msg
    assert "Traceback" not in r.stderr
