"""One writer per run folder.

Every command that writes into a run folder holds ``RUN/.lock`` (an OS file
lock, ``fcntl.flock``) while it works. A second process is refused with one
line naming the holder. The kernel drops the lock when its holder dies, so a
lock left by a killed process is simply taken over; the pid and start time
written into the file only say who holds it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from dpo4rec.errors import InputError

LOCK_NAME = ".lock"


def launched() -> bool:
    """True in a process started by ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank in such a launch (0 when run alone): rank 0 alone writes into the run folder."""
    return int(os.environ.get("RANK", "0"))


class RunLock:
    """``with RunLock(run_dir):`` holds the folder's lock (the folder is created if needed)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> RunLock:
        self.created = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.path.parent}: cannot create the run folder ({exc.strerror})") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise InputError(f"{self.path}: cannot create the run folder's lock ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise InputError(f"{self.path.parent} is in use by {holder}; wait for it to finish or use another --out") from None
            # the file may have been removed by a holder that just released it: lock the file that is there now
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held, so no one locks a file that is going away
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            if self.created and exc[0] is not None and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a command that failed before writing leaves no empty folder behind
        return False
