"""Atomic file writes: a crash mid-write never leaves a half file where a good one was."""
from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a binary file open on a temp file in `path`'s directory; on success fsync it and rename it over `path`,
    on an exception delete it and leave `path` as it was (for writes streamed in pieces)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_output_dir(path: str | os.PathLike, what: str = '--out') -> Path:
    """Refuse, before any work is done, an output folder that exists as a file (or lies under a file)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(f'{what} {path}: {p} exists and is not a directory')
            break
    return path


def _sweep_stale(path: Path) -> None:
    """Remove `.<name>.*.tmp` siblings that no live writer holds (left by a killed process), and `.<name>.old<pid>`
    leftovers of a dead process when `path` itself exists (they are the replaced version)."""
    from .file_lock import try_flock

    for stale in path.parent.glob(f'.{glob.escape(path.name)}.*.tmp'):
        if not stale.is_dir() or stale.is_symlink():
            continue
        try:
            fd = try_flock(stale)
        except OSError:
            continue
        if fd is None:
            continue  # a live writer (another export into the same folder) is using it
        try:
            shutil.rmtree(stale, ignore_errors=True)
            log.info('removed %s, left by an interrupted write', stale)
        finally:
            os.close(fd)
    if not path.exists():
        return  # an .old folder may then be the only copy: leave it
    for old in path.parent.glob(f'.{glob.escape(path.name)}.old*'):
        pid = old.name.rsplit('.old', 1)[-1]
        if old.is_dir() and not old.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


@contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces `path` (the old one is removed last).

    On an exception the temporary directory is deleted and `path` is left untouched. The temporary directory is
    flock-ed while it is being written, so one left by a killed process (SIGKILL, power loss) is recognised and
    removed by the next atomic_directory(path); a concurrent writer's is left alone.
    """
    from .file_lock import try_flock

    path = check_output_dir(path, 'output folder')
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent))
    fd = try_flock(tmp)
    try:
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if path.exists():
            old = path.with_name(f'.{path.name}.old{os.getpid()}')
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)
