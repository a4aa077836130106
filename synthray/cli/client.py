"""A small REST client for the CLI and the demo (it speaks only HTTP to the API)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from synthray.fileio import sha256_file

TERMINAL = {"succeeded", "failed", "cancelled"}


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class Client:
    """The API under ``/v1`` as the CLI and the demo use it.

    Paths are relative to ``/v1``; every method returns the decoded JSON body (or
    text, or bytes on disk) and raises :class:`ApiError` for any 4xx/5xx answer.
    """

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _raise_for_error(r: httpx.Response) -> None:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)

    def _json(self, r: httpx.Response) -> Any:
        self._raise_for_error(r)
        return r.json() if r.content else None

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path``; query parameters that are None are left out."""
        clean = {k: v for k, v in params.items() if v is not None}
        return self._json(self._http.get(f"/v1{path}", params=clean))

    def get_text(self, path: str) -> str:
        """GET ``path`` as text (an HTML evidence page)."""
        r = self._http.get(f"/v1{path}")
        self._raise_for_error(r)
        return r.text

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._json(self._http.post(f"/v1{path}", json=body or {}))

    def put(self, path: str, body: dict[str, Any]) -> Any:
        return self._json(self._http.put(f"/v1{path}", json=body))

    def upload(
        self,
        path: str,
        file: Path,
        *,
        form: dict[str, str] | None = None,
        filename: str | None = None,
        content_type: str = "application/zip",
    ) -> Any:
        """POST ``file`` as the multipart field ``file``, beside the text fields ``form``."""
        with file.open("rb") as f:
            files = {"file": (filename or file.name, f, content_type)}
            return self._json(self._http.post(f"/v1{path}", data=form or {}, files=files))

    def download(self, path: str, dest: Path) -> int:
        """Stream ``path`` into ``dest`` through ``dest.part``; returns the size.

        A ``.part`` left by a broken download is resumed (``Range`` from its size, with
        ``If-Range`` on the ETag recorded beside it in ``.part.etag``: if the file on the
        server changed, the whole file comes again). When the server states the file's
        sha256 (``X-Content-SHA256``), the finished file must match it, or both partial
        files are removed and the download fails."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tag_file = tmp.with_suffix(tmp.suffix + ".etag")
        headers = {}
        if tmp.is_file() and tag_file.is_file() and tmp.stat().st_size > 0:
            headers = {"Range": f"bytes={tmp.stat().st_size}-", "If-Range": tag_file.read_text()}
        with self._http.stream("GET", f"/v1{path}", headers=headers) as r:
            if r.status_code == 416:  # the part is already whole (or longer): start again
                r.read()
                tmp.unlink(missing_ok=True)
                tag_file.unlink(missing_ok=True)
                return self.download(path, dest)
            if r.status_code >= 400:
                r.read()
                self._raise_for_error(r)
            resumed = r.status_code == 206
            if r.headers.get("etag"):
                tag_file.write_text(r.headers["etag"])
            with tmp.open("ab" if resumed else "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
            expected = r.headers.get("x-content-sha256")
        if expected and sha256_file(tmp) != expected:
            tmp.unlink(missing_ok=True)
            tag_file.unlink(missing_ok=True)
            raise ApiError(
                0, "the downloaded file does not match its sha256; run the command again"
            )
        tag_file.unlink(missing_ok=True)
        tmp.replace(dest)
        return dest.stat().st_size

    def wait(
        self, job_id: str, console: Console | None = None, label: str = "", poll: float = 0.5
    ) -> dict[str, Any]:
        """Poll a job until it ends, drawing a progress bar from its progress fields."""
        console = console or Console(stderr=True)
        with Progress(
            TextColumn(f"[bold]{label or 'job'}[/bold]"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task("queued", total=None)
            while True:
                job: dict[str, Any] = self.get(f"/jobs/{job_id}")
                p = job["progress"]
                total = p["total"]
                bar.update(task, total=total, completed=p["step"], description=p["message"])
                if job["state"] in TERMINAL:
                    if job["state"] == "succeeded":
                        bar.update(task, total=total or 1, completed=total or 1)
                    return job
                time.sleep(poll)
