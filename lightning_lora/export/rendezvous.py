"""Ranks that share an export meet through files on the shared filesystem, never in a collective.

A collective that waits for a long export outlives the process group's timeout (30 minutes by
default) and takes the job down with a timeout that names nobody. Here each rank writes small
files into a directory all ranks see: ``<rank>.<stage>.json`` when it reached a stage (with its
report), ``<rank>.failed.json`` when it failed (with the message), and a heartbeat it touches every
few seconds while it works. A rank that waits polls those files and fails at once, naming the
rank, when another rank failed, when its heartbeat stopped (the process died), or when the
deadline passed (naming the ranks that did not arrive).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_lora.errors import ExportError

__all__ = ["Rendezvous"]

HEARTBEAT_S = 2.0


class Rendezvous:
    """One rank's side of a file rendezvous in ``directory``.

    Args:
        directory: a directory every rank sees (created by rank 0; the others wait for it).
        rank: this rank; ``world``: how many there are.
        timeout_s: the longest any wait may take.
        stale_s: a rank whose heartbeat is older than this is taken for dead.
        alive: optional extra liveness test of a rank (local workers: the process still runs).
    """

    def __init__(self, directory: Path, rank: int, world: int, timeout_s: float = 3600.0, stale_s: float = 120.0,
                 alive: Callable[[int], bool] | None = None) -> None:
        self.directory, self.rank, self.world = Path(directory), rank, world
        self.timeout_s, self.stale_s, self.alive = timeout_s, stale_s, alive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Rendezvous:
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        else:
            self._wait_for(lambda: self.directory.is_dir(), f"the shared directory {str(self.directory)!r} to appear "
                           "(is the export directory on a filesystem every node sees?)", ranks=[0])
        self._beat()
        self._thread = threading.Thread(target=self._beat_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S * 2)

    def _beat(self) -> None:
        path = self.directory / f"{self.rank}.alive"
        try:
            path.touch()
        except OSError:
            pass  # the directory is being removed at the end of the export

    def _beat_forever(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()

    def _write(self, name: str, data: Any) -> None:
        tmp = self.directory / f".{name}.{os.getpid()}"
        tmp.write_text(json.dumps(data, default=str))
        tmp.rename(self.directory / name)

    def report(self, stage: str, payload: Any = None) -> None:
        """Tell the other ranks this rank reached ``stage``."""
        self._write(f"{self.rank}.{stage}.json", {"payload": payload})

    def fail(self, message: str) -> None:
        """Tell the other ranks this rank failed; they stop waiting and fail with ``message``."""
        try:
            self._write(f"{self.rank}.failed.json", {"message": message})
        except OSError:
            pass

    def settle(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until every other rank has stopped: failed or done."""
        deadline = time.monotonic() + timeout_s
        others = [r for r in range(self.world) if r != self.rank]
        while time.monotonic() < deadline:
            stopped = [r for r in others if (self.directory / f"{r}.failed.json").is_file()
                       or (self.directory / f"{r}.done.json").is_file() or (self.alive is not None and not self.alive(r))]
            if len(stopped) == len(others):
                return
            time.sleep(0.05)

    def wait(self, stage: str, ranks: list[int] | None = None, timeout_s: float | None = None) -> dict[int, Any]:
        """Wait until ``ranks`` (all by default) reached ``stage``; returns their payloads by rank."""
        ranks = list(range(self.world)) if ranks is None else ranks

        def arrived() -> bool:
            return all((self.directory / f"{r}.{stage}.json").is_file() for r in ranks)

        self._wait_for(arrived, f"stage {stage!r}", ranks, stage, timeout_s)
        return {r: json.loads((self.directory / f"{r}.{stage}.json").read_text())["payload"] for r in ranks}

    def _wait_for(self, done: Callable[[], bool], what: str, ranks: list[int], stage: str | None = None,
                  timeout_s: float | None = None) -> None:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        started = time.time()
        while not done():
            self._check_others(ranks, started, stage)
            if time.monotonic() > deadline:
                late = [r for r in ranks if stage is None or not (self.directory / f"{r}.{stage}.json").is_file()]
                raise ExportError(f"rank(s) {late} did not reach {what} within {timeout_s:.0f} s")
            time.sleep(0.05)

    def _check_others(self, ranks: list[int], started: float, stage: str | None) -> None:
        if not self.directory.is_dir():
            return
        for r in range(self.world):
            failed = self.directory / f"{r}.failed.json"
            if r != self.rank and failed.is_file():
                message = json.loads(failed.read_text())["message"]
                raise ExportError(f"rank {r} of the export failed: {message}")
        for r in ranks:
            if r == self.rank or (stage is not None and (self.directory / f"{r}.{stage}.json").is_file()):
                continue
            if self.alive is not None and not self.alive(r):
                raise ExportError(f"rank {r} of the export stopped without a report; nothing was published")
            try:
                last = (self.directory / f"{r}.alive").stat().st_mtime
            except OSError:
                last = started
            if time.time() - last > self.stale_s:
                raise ExportError(f"rank {r} of the export has given no sign of life for {time.time() - last:.0f} s "
                                  "(it died or its node lost the shared filesystem); nothing was published")
