"""Several machines, one blob store: a process whose blob folder is not the database's
store (a worker without the shared filesystem mounted) refuses to start and says why,
and /readyz reports it; real folders, both databases, the real CLI."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_settings
from fastapi.testclient import TestClient
from support import synthray_cli

from synthray.app import storecheck
from synthray.app.db import session_scope
from synthray.app.main import create_app
from synthray.app.storage import BlobStore
from synthray.app.storecheck import StoreIdentity, StoreMismatch, ensure
from synthray.config import Settings


def test_the_first_process_establishes_the_store_and_others_must_match(
    settings: Settings, tmp_path: Path
) -> None:
    url = settings.sqlalchemy_url
    token = ensure(url, settings.blob_dir)
    assert ensure(url, settings.blob_dir) == token  # the same folder, again
    with pytest.raises(StoreMismatch, match="has no store marker"):
        ensure(url, tmp_path / "a-local-disk" / "blobs")
    other = tmp_path / "another-site" / "blobs"
    other.mkdir(parents=True)
    (other / storecheck.MARKER).write_text("0" * 32)
    with pytest.raises(StoreMismatch, match="another store's marker"):
        ensure(url, other)


def test_processes_racing_on_one_shared_folder_agree(settings: Settings) -> None:
    with ThreadPoolExecutor(8) as pool:
        tokens = list(
            pool.map(lambda _: ensure(settings.sqlalchemy_url, settings.blob_dir), range(8))
        )
    assert len(set(tokens)) == 1


def test_an_existing_deployment_is_checked_against_the_blobs_it_names(
    settings: Settings, tmp_path: Path
) -> None:
    """Upgraded from before the marker: the folder must hold the blobs the rows name."""
    from synthray.app.datasets.tables import Dataset, DatasetVersion

    sha, _ = BlobStore(settings.blob_dir).put_bytes(b"images of dataset version 1")
    with session_scope(settings.sqlalchemy_url) as s:
        d = Dataset(name="old")
        s.add(d)
        s.flush()
        s.add(DatasetVersion(dataset_id=d.id, version=1, images_blob=sha))
    with pytest.raises(StoreMismatch, match="lacks 1 of the 1 newest blobs"):
        ensure(settings.sqlalchemy_url, tmp_path / "empty" / "blobs")
    with session_scope(settings.sqlalchemy_url) as s:
        assert s.get(StoreIdentity, 1) is None  # nothing established by the refusal
    assert ensure(settings.sqlalchemy_url, settings.blob_dir)


def test_readyz_reports_a_foreign_blob_folder(settings: Settings, tmp_path: Path) -> None:
    ensure(settings.sqlalchemy_url, settings.blob_dir)
    with TestClient(create_app(settings)) as c:
        assert c.get("/readyz").json()["blob_store"] == "ok"
    stray = make_settings(tmp_path / "elsewhere", settings.sqlalchemy_url)
    with TestClient(create_app(stray)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["blob_store"] == "unavailable (not the database's blob store)"


def test_a_worker_on_the_wrong_folder_refuses_to_start(settings: Settings, tmp_path: Path) -> None:
    ensure(settings.sqlalchemy_url, settings.blob_dir)
    stray = make_settings(tmp_path / "local-only", settings.sqlalchemy_url)
    done = synthray_cli(stray, "worker", timeout=120)
    assert done.returncode == 2, done.stderr
    assert "refusing to start" in done.stderr and "SYNTHRAY_DATA_DIR/blobs" in done.stderr
