"""The one way kdcache writes a local file: a temporary file next to it, fsync, rename, fsync the folder.

A reader (or a process restarted after kill -9 or a power cut) sees the old file or the whole new one,
never a torn one. zarr-python does the same in its LocalStore (`_atomic_write`); kdcache writes its own
files (manifests, checkpoints, config.json, ledgers) outside any Zarr store, so it needs its own.
"""

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Union


def _temporary_name(path: Path) -> Path:
    # unique per writer: two processes writing the same file never share a temporary
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Union[str, Path], *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (by any writer: torch.save, safetensors,
    open(...)); on a clean exit it is fsynced and renamed over `path`; on an error it is removed and `path`
    is untouched.

    exclusive=True: the temporary file is hard-linked to `path` instead of renamed over it, and
    FileExistsError is raised when `path` already exists (link(2) fails on an existing name, atomically
    on local file systems and on NFS v3+: the classic NFS lock-file method; zarr's LocalStore
    `_atomic_write(path, mode, exclusive)` does the same). Of two exclusive writers exactly one wins."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # durable before it gets its final name
        if exclusive:
            os.link(tmp, path)
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write(path: Union[str, Path], data: Union[bytes, str], *, exclusive: bool = False) -> None:
    """Replace `path` with `data` (str: UTF-8) atomically and durably; with exclusive=True create it,
    raising FileExistsError if it exists (see atomic_file)."""
    with atomic_file(path, exclusive=exclusive) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Kept for the callers written before atomic_write; same behaviour."""
    atomic_write(path, text)
