"""Decoding in child processes: both CPU cores used, and a memory cap per child.

Each child sets RLIMIT_AS before it imports the decoders, so a file that makes a
decoder allocate without bound fails with MemoryError in that child (or kills it)
instead of taking the worker down. A child that dies breaks the executor; the files in
flight are then retried one at a time in a fresh pool, so only the culprit is rejected.
Children are started with "spawn": they inherit no torch, Celery or database state.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

# A private stdlib class (the type of a process's authkey) that typeshed does not declare.
from multiprocessing.process import AuthenticationString  # type: ignore[attr-defined]
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from synthray.app.datasets.decode import Decoded, DecodeOptions

Outcome = tuple["Decoded | None", "str | None"]  # (decoded, reason rejected)


def _init_child(memory_limit: int) -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if memory_limit > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))


def decode_one(path: str, opts: DecodeOptions, max_file_bytes: int) -> Outcome:
    from synthray.app.datasets.decode import Rejected, decode_path

    try:
        return decode_path(Path(path), opts, max_file_bytes), None
    except Rejected as exc:
        return None, str(exc)
    except MemoryError:
        return None, "decoding the image exceeded the memory limit"
    except RecursionError:
        return None, "file structure is nested too deeply"
    except Exception:  # never let one file's failure (or its message) escape
        return None, "file cannot be decoded"


class DecodePool:
    def __init__(self, workers: int, memory_limit: int) -> None:
        self.workers = max(1, workers)
        self.memory_limit = memory_limit
        # Celery's prefork children are marked daemonic, and multiprocessing refuses to
        # start children from a daemon. Our children are spawned (no inherited state),
        # are shut down by close(), and exit on their own when their parent's pipes
        # close, so the flag is lifted for the pool's lifetime.
        self._config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
        self._was_daemon = self._config.get("daemon")
        self._config["daemon"] = False
        # billiard also puts its own AuthenticationString in the process config, which
        # refuses to be pickled into a spawned child's preparation data; re-wrap the same
        # key in the standard library's type.
        key = self._config.get("authkey")
        if key is not None and type(key) is not AuthenticationString:
            self._config["authkey"] = AuthenticationString(bytes(key))
        self._pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_child,
            initargs=(self.memory_limit,),
        )

    def close(self) -> None:
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            if self._was_daemon is not None:
                self._config["daemon"] = self._was_daemon

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _alone(self, path: str, opts: DecodeOptions, max_file_bytes: int) -> Outcome:
        try:
            return self._pool.submit(decode_one, path, opts, max_file_bytes).result()
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new()
            return None, "decoding the image crashed or exceeded the memory limit"

    def map(
        self,
        paths: Sequence[str],
        opts: DecodeOptions,
        max_file_bytes: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Outcome]:
        """Outcomes in input order, with at most 4 files per child in flight."""
        window = self.workers * 4
        pending: list[tuple[str, Future[Outcome]]] = []
        i = 0
        while i < len(paths) or pending:
            while i < len(paths) and len(pending) < window:
                if should_stop is not None and should_stop():
                    return
                pending.append(
                    (paths[i], self._pool.submit(decode_one, paths[i], opts, max_file_bytes))
                )
                i += 1
            path, fut = pending.pop(0)
            try:
                yield fut.result()
            except BrokenProcessPool:
                retry = [path] + [p for p, _ in pending]
                pending.clear()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new()
                for p in retry:
                    yield self._alone(p, opts, max_file_bytes)
