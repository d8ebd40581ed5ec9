"""One run per output_dir: an exclusive `flock` on `<output_dir>/.lock`, held by rank 0 for the whole run.

flock is released by the kernel when the holder exits, however it exits, so a lock left by a dead (killed)
process is free again by construction: no stale-lock clean-up, no pid guessing. The file's one line names the
holder (pid, host, start time) for the message a second run prints.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from leapalign_fast.errors import UserError

LOCK_NAME = ".lock"


def check_writable(directory: Path, what: str) -> None:
    """Create `directory` if needed and prove it writable now, before any step runs."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"{what} {directory} is not writable ({e.strerror}); pick a directory you can write, or fix its permissions"
        ) from None


class RunLock:
    """Context manager: hold the exclusive lock of `output_dir`, or raise a UserError naming the holder."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        check_writable(self.path.parent, "output_dir")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"output_dir {self.path.parent} is in use by another run ({holder}); wait for it to end, "
                "stop it, or choose another output_dir (nothing was changed)"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {stamp}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def is_main_rank() -> bool:
    """Rank 0 of a torchrun/accelerate launch (RANK unset: a single process)."""
    return int(os.environ.get("RANK", "0")) == 0
