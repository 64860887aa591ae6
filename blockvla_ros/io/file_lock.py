"""Advisory locks with flock(2): held while the process lives, released by the kernel when it dies (even SIGKILL).

So a lock left by a killed process never blocks anyone: the next `try_lock` simply gets it. Used for the training
run folder (one `blockvla-train` per out_dir) and for the temporary folders of atomic directory writes (a folder
whose lock can be taken belongs to no live writer and may be removed).
"""
from __future__ import annotations

import datetime
import fcntl
import os
from pathlib import Path
from typing import Optional


class LockedError(RuntimeError):
    """Another live process holds the lock; the message names the path and, when known, the holder."""


def try_flock(path: str | os.PathLike) -> Optional[int]:
    """Open `path` (a file or a directory) and take an exclusive flock without waiting -> the fd, or None when another
    process holds it. The caller closes the fd to release it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class FileLock:
    """An exclusive lock on a lock file (created if needed) that records who holds it.

        with FileLock(out_dir / '.lock', what='training run folder'):
            ...  # a second FileLock on the same file raises LockedError at once
    """

    def __init__(self, path: str | os.PathLike, what: str = 'folder'):
        self.path = Path(path)
        self.what = what
        self.fd: Optional[int] = None

    def acquire(self) -> 'FileLock':
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text(errors='replace').strip() or 'unknown process'
            os.close(fd)
            raise LockedError(f'{self.path.parent}: this {self.what} is in use by another process ({holder}); '
                              'wait for it to finish or use another folder') from None
        except BaseException:
            os.close(fd)
            raise
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()} since {now}\n'.encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock; the file stays (removing it would race a new holder)
            self.fd = None

    def __enter__(self) -> 'FileLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
