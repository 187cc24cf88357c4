"""Opening input files that may be hostile: only regular files, never blocking.

``open("x.dsq", "rb")`` blocks forever when ``x.dsq`` is a FIFO (named pipe) nobody writes to,
and reads a device such as ``/dev/zero`` without end. Every reader of user files (``.dsq``,
``model.pt``, checkpoints, dataset files) opens them with :func:`open_input`, which refuses
anything but a regular file: ``os.stat`` first (nothing is opened for a device or a FIFO), then
an ``O_NONBLOCK`` open and an ``fstat`` of what was opened, so a file swapped in between is
caught too.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

__all__ = ["NotReadable", "open_input", "read_input"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


class NotReadable(Exception):
    """Why a path cannot be read as a file; ``missing`` when there is nothing at the path."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.missing = missing


def _check_kind(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise NotReadable(f"it is {kind}, not a regular file")


def open_input(path: str | os.PathLike[str]) -> BinaryIO:
    """Open the regular file ``path`` for binary reading; :class:`NotReadable` otherwise.

    The reason says what is wrong: no such file, a directory / FIFO / device / socket, or the
    operating system's error (permission denied, ...).
    """
    try:
        _check_kind(os.stat(path).st_mode)
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        raise NotReadable("no such file", missing=True) from None
    except OSError as exc:
        raise NotReadable(exc.strerror or str(exc)) from None
    try:
        _check_kind(os.fstat(fd).st_mode)  # what was opened, should the path have changed
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """All bytes of the regular file ``path`` (:func:`open_input`), read in one allocation of
    the size ``fstat`` gives; :class:`NotReadable` also for a file over ``limit`` bytes."""
    with open_input(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if limit is not None and size > limit:
            raise NotReadable(f"it is {size:,} bytes, over the {limit:,}-byte limit")
        data = handle.read(size + 1)  # +1: a file that grew since is caught below
    if limit is not None and len(data) > limit:
        raise NotReadable(f"it grew past the {limit:,}-byte limit while being read")
    return data

