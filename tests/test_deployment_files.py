"""The deployment files hold: Debian's docker-compose validates the compose file (no
container daemon runs here), and it refuses to render without the secrets it needs, so a
deployment cannot start on defaults; the hashed lock files cover pyproject.toml."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def _locked(name: str) -> dict[str, tuple[str, list[str]]]:
    """{normalized package name: (version, [sha256 hashes])} of one lock file."""
    out: dict[str, tuple[str, list[str]]] = {}
    for entry in re.split(r"\n(?=\S)", (ROOT / "requirements" / name).read_text()):
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", entry)
        if m:
            out[canonicalize_name(m[1])] = (
                m[2],
                re.findall(r"--hash=sha256:([0-9a-f]{64})", entry),
            )
    return out


def test_the_lock_files_pin_every_dependency_with_hashes() -> None:
    """Every requirement of pyproject.toml (runtime, and dev for the dev lock) is locked at a
    version its specifier admits, every locked entry carries a sha256, the runtime lock
    agrees with the dev lock, and this environment was installed from the locks."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev, runtime, torch = (_locked(f) for f in ("dev.txt", "runtime.txt", "torch-cpu.txt"))
    assert all(hashes for _, hashes in (dev | runtime | torch).values())
    assert list(torch) == ["torch"] and "torch" not in dev and "torch" not in runtime
    for lock, requirements in (
        (runtime, project["dependencies"]),
        (dev, project["dependencies"] + project["optional-dependencies"]["dev"]),
    ):
        for text in requirements:
            req = Requirement(text)
            name = canonicalize_name(req.name)
            version = (lock | torch)[name][0] if name in lock | torch else None
            assert version is not None, f"{req.name} is not locked: run scripts/lock.sh"
            assert req.specifier.contains(version, prereleases=True), (
                f"{req.name}=={version} does not satisfy {req.specifier}: run scripts/lock.sh"
            )
    assert {k: v for k, (v, _) in runtime.items()} == {k: dev[k][0] for k in runtime}
    for name, (version, _) in (dev | torch).items():
        assert metadata.version(name) == version, name
