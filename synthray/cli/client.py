"""A small REST client for the CLI and the demo (it speaks only HTTP to the API)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

TERMINAL = {"succeeded", "failed", "cancelled"}


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class Client:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r.json() if r.content else None

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self._check(self.http.get(f"/v1{path}", params=clean))

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._check(self.http.post(f"/v1{path}", json=body or {}))

    def download(self, path: str, dest: Path) -> int:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        with self.http.stream("GET", f"/v1{path}") as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            size = 0
            with tmp.open("wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
                    size += len(chunk)
        tmp.replace(dest)
        return size

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
