"""The deployment files hold: Debian's docker-compose validates the compose file (no
container daemon runs here), and it refuses to render without the secrets it needs, so a
deployment cannot start on defaults."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert shutil.which("docker-compose"), (
        "docker-compose is needed (apt-get install docker-compose)"
    )
    clean = {
        k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "SYNTHRAY_SECRET_KEY")
    }
    return subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT / "tests",  # no .env here: only what the test passes
    )


def test_the_compose_file_is_valid() -> None:
    done = _config({"POSTGRES_PASSWORD": "p" * 20, "SYNTHRAY_SECRET_KEY": "s" * 40})
    assert done.returncode == 0, done.stderr
    for service in ("postgres", "redis", "migrate", "api", "worker-gpu", "worker-cpu"):
        assert f"\n  {service}:\n" in done.stdout, service
    assert "s" * 40 in done.stdout  # the secret reaches the services


def test_the_compose_file_refuses_to_render_without_its_secrets() -> None:
    done = _config({"SYNTHRAY_SECRET_KEY": "s" * 40})
    assert done.returncode != 0 and "set POSTGRES_PASSWORD" in done.stderr
    done = _config({"POSTGRES_PASSWORD": "p" * 20})
    assert done.returncode != 0 and "set SYNTHRAY_SECRET_KEY" in done.stderr
