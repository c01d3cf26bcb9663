"""Block locks: which process is writing which (view, shard) block of a store, so that no two write one.

A process claims every block it is about to write by creating `locks/<view>-<shard>.json` in the store
exclusively, and removes the lock once the block's done flag is set. A lock names its holder's host and
process and is refreshed by a heartbeat; a lock whose process is gone (same host) or whose heartbeat is
older than the timeout (any host) was left by a killed process and is taken over. A lock whose record cannot
be read (empty, or not a record) is being written right now, or was left by a process that failed to write
it: it is taken over once RECORD_WRITE_SECONDS old. A process that cannot write its record (a full disk)
removes the lock it created.
Exclusive creation is atomic on local and shared POSIX filesystems and on fsspec's memory filesystem; on
object stores it is as strong as the filesystem's exclusive-create mode.
A training run's folder is locked the same way while a process trains in it (RunFolderLock).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import fsspec

from richkd.cache.reader import store_location
from richkd.pipeline.errors import UserError

LOCKS = "locks"
# Seconds within which a process that created a lock has written its record (a lock is empty in between, and while a
# heartbeat rewrites it): an unreadable lock older than this was left by a process that failed to write it.
RECORD_WRITE_SECONDS = 10.0


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return not is_zombie(pid)


def is_zombie(pid: int) -> bool:
    """Whether process `pid` has ended and only waits to be reaped: a killed process whose parent was killed too
    stays one until init reaps it. Read from Linux's /proc; False where there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


class BlockLocks:
    """The locks this process holds on blocks of the store at `url`."""

    def __init__(self, url: str, holder: str, timeout: float, scope: str = ""):
        self.url, self.timeout = url, timeout
        self.filesystem, root = fsspec.core.url_to_fs(store_location(url))
        # Runs adding other sources write other arrays: their locks are apart, so they can run at once.
        self.folder = f"{root.rstrip('/')}/{LOCKS}" + (f"/{scope}" if scope else "")
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), "holder": holder}
        self.held: set[tuple[int, int]] = set()
        self.guard = threading.Lock()
        self.stopped = threading.Event()
        self.heartbeat = threading.Thread(target=self._refresh, daemon=True)

    def path(self, view: int, shard: int) -> str:
        return f"{self.folder}/{view}-{shard}.json"

    def record(self) -> bytes:
        return json.dumps({**self.identity, "heartbeat": time.time()}).encode()

    def claim(self, blocks: list[tuple[int, int]]) -> None:
        """Lock every block of `blocks`, or none of them and refuse when another live process holds one."""
        self.filesystem.makedirs(self.folder, exist_ok=True)
        try:
            for view, shard in blocks:
                self._claim(view, shard)
        except BaseException:
            self.release_all()
            raise
        if not self.heartbeat.is_alive():
            self.heartbeat.start()

    def _claim(self, view: int, shard: int) -> None:
        path = self.path(view, shard)
        for attempt in range(2):
            try:
                file = self.filesystem.open(path, "xb")
            except FileExistsError:
                holder = self._read(path)
                if attempt == 0 and self._is_stale(path, holder):
                    with contextlib.suppress(FileNotFoundError):  # taken over by another process meanwhile
                        self.filesystem.rm(path)
                    continue
                raise self.refusal(view, shard, holder) from None
            try:
                with file:
                    file.write(self.record())
            except OSError:  # a full disk: an empty lock left behind would keep the block from every process
                self.filesystem.rm(path)
                raise
            with self.guard:
                self.held.add((view, shard))
            return

    def refusal(self, view: int, shard: int, holder: dict | None) -> UserError:
        """The error of a claim on a block that another live process holds (`holder`, None if unreadable)."""
        who = (f"process {holder['pid']} on {holder['host']} (part {holder['holder']})" if holder
               else "another process")
        return UserError(
            f"block view {view} shard {shard} of {self.url} is being written by {who}; two precompute "
            "processes would write it: give each its own --part i/n, or wait for that one to finish"
        )

    def _read(self, path: str) -> dict | None:
        """The lock's record, or None: gone meanwhile, being written, or left empty or damaged."""
        try:
            record = json.loads(self.filesystem.cat_file(path))
        except (OSError, ValueError):
            return None
        is_record = (isinstance(record, dict) and isinstance(record.get("host"), str)
                     and isinstance(record.get("pid"), int) and isinstance(record.get("heartbeat"), (int, float)))
        return record if is_record else None

    def _is_stale(self, path: str, holder: dict | None) -> bool:
        if holder is None:
            try:
                modified = self.filesystem.modified(path).timestamp()
            except (OSError, NotImplementedError):
                return False
            return time.time() - modified > min(RECORD_WRITE_SECONDS, self.timeout)
        if time.time() - holder["heartbeat"] > self.timeout:
            return True
        return holder["host"] == self.identity["host"] and not process_is_alive(holder["pid"])

    def release(self, view: int, shard: int) -> None:
        # Under the guard, so that the heartbeat never brings back a lock just removed.
        with self.guard:
            self.held.discard((view, shard))
            self.filesystem.rm(self.path(view, shard))

    def release_all(self) -> None:
        with self.guard:
            for view, shard in self.held:
                self.filesystem.rm(self.path(view, shard))
            self.held = set()

    def _refresh(self) -> None:
        while not self.stopped.wait(self.timeout / 4):
            with self.guard:
                for view, shard in self.held:
                    self.filesystem.pipe_file(self.path(view, shard), self.record())

    def close(self) -> None:
        """Stop the heartbeat and give back what is still held (the blocks of a run that stopped early)."""
        self.stopped.set()
        if self.heartbeat.is_alive():
            self.heartbeat.join()
        self.release_all()


# A training run's lock file, in its folder.
RUN_FOLDER_LOCK = "lock.json"


class RunFolderLock(BlockLocks):
    """The lock of a training run's folder, held while a process trains in it, so that no second process writes its
    checkpoints meanwhile: the folder's lock file is claimed, refreshed and taken over as a store's blocks are, as
    the folder's only block."""

    ONLY_BLOCK = (0, 0)

    def __init__(self, folder: str, timeout: float):
        super().__init__(folder, "training", timeout)
        self.folder = fsspec.core.url_to_fs(folder)[1].rstrip("/")

    def path(self, view: int, shard: int) -> str:
        return f"{self.folder}/{RUN_FOLDER_LOCK}"

    def refusal(self, view: int, shard: int, holder: dict | None) -> UserError:
        who = f"process {holder['pid']} on {holder['host']}" if holder else "another process"
        return UserError(f"run folder {self.url} is in use: {who} is training in it; two runs would write the same "
                         "checkpoints: wait for that one to finish, or stop it and continue with --resume")

    def __enter__(self) -> RunFolderLock:
        self.claim([self.ONLY_BLOCK])
        return self

    def __exit__(self, *exception) -> None:
        self.close()
