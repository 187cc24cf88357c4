"""Output paths checked before any work starts.

A command that writes a file (``compress --out``, ``export --out``, ``--json``) or a folder
(``train --out``) checks the path first, so a directory, a parent that is a file, a folder it
cannot write, or an output that is one of its own inputs is refused in a second, not after an
hour of training, and an input is never replaced by the output.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from deepsqueeze.errors import OutputPathError

PathLike = str | os.PathLike[str]


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file: one inode (hard links, symlinks) or, where
    one does not exist yet, the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        pass
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def _refuse_inputs(path: Path, inputs: Iterable[PathLike | None], option: str) -> None:
    for source in inputs:
        if source is not None and same_file(path, source):
            raise OutputPathError(
                f"{option} {path} is the input file {source}: writing it would replace the "
                "input; choose another output path"
            )


def _probe_folder(folder: Path, path: Path, option: str) -> None:
    """Create ``folder`` (and missing parents) and a temporary file in it, then remove all of
    it again; a clear error when that fails."""
    existing, missing = folder, []
    while not os.path.lexists(existing) and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if os.path.lexists(existing) and not existing.is_dir():
        raise OutputPathError(
            f"{option} {path}: {existing} is a file, not a folder; choose another output path"
        )
    created: list[Path] = []
    try:
        for sub in reversed(missing):
            sub.mkdir()
            created.append(sub)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".dsq-probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputPathError(
            f"{option} {path}: cannot write in {folder} ({reason}); choose a folder you can "
            "write to"
        ) from exc
    finally:
        for sub in reversed(created):
            with contextlib.suppress(OSError):
                sub.rmdir()


def _stat(path: Path, option: str) -> os.stat_result | None:
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte
        reason = getattr(exc, "strerror", None) or str(exc)
        raise OutputPathError(f"{option} {path}: cannot use it ({reason})") from exc


def check_output_file(
    path: PathLike, *, inputs: Iterable[PathLike | None] = (), option: str = "--out"
) -> Path:
    """Check that ``path`` can be written as a file before the work that produces it starts.

    Refused (:class:`OutputPathError`): ``path`` is one of ``inputs`` (same inode or same
    resolved path), a directory or another non-regular file (FIFO, device), or its folder is
    under a file or cannot be created or written. Nothing is left behind by the check.
    """
    path = Path(path)
    _refuse_inputs(path, inputs, option)
    st = _stat(path, option)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputPathError(
            f"{option} {path} is a folder; give a file name, e.g. {path / 'out'}"
        )
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(
            f"{option} {path} exists and is not a regular file (a FIFO, device or socket); "
            "choose another output path"
        )
    _probe_folder(path.parent, path, option)
    return path


def check_output_dir(path: PathLike, *, option: str = "--out") -> Path:
    """Check that folder ``path`` exists or can be created, and files can be written in it."""
    path = Path(path)
    st = _stat(path, option)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{option} {path} is a file, not a folder; choose a folder path")
    _probe_folder(path, path, option)
    return path


__all__ = ["check_output_dir", "check_output_file", "same_file"]
