"""Checksummed, atomic downloads from a dataset's mirrors."""

from __future__ import annotations

import os
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from deepsqueeze.errors import DataError

from .checksum import mark_verified, verify_file
from .idx import read_bytes
from .registry import FileSpec

TIMEOUT_S = 30.0
_CHUNK = 1 << 16
MAX_DOWNLOAD = 1 << 30
"""Most bytes one download may write (the largest dataset file, CIFAR-100's, is 169 MB)."""


class DownloadError(DataError):
    """Every mirror failed for a file; ``attempts`` holds (url, error) for each try."""

    def __init__(self, attempts: Sequence[tuple[str, str]]) -> None:
        self.attempts = list(attempts)
        super().__init__(self.describe())

    def describe(self) -> str:
        lines = ["Download failed; mirrors tried:"]
        lines += [f"  - {url}: {err}" for url, err in self.attempts]
        return "\n".join(lines)


def _fetch(url: str, dest: Path, timeout: float = TIMEOUT_S) -> None:
    """Write the body at ``url`` (http/https only) to ``dest``, showing a progress bar.

    Tests replace this function to serve files without a network.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"refusing non-HTTP URL {url}")
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        progress = Progress(
            TextColumn("{task.description}", markup=False),  # a file name, not markup
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        written = 0
        with progress:
            task = progress.add_task(url.rsplit("/", 1)[-1], total=total)
            while chunk := resp.read(_CHUNK):
                written += len(chunk)
                if written > MAX_DOWNLOAD:
                    raise OSError(f"the server sent more than {MAX_DOWNLOAD:,} bytes")
                out.write(chunk)
                progress.update(task, advance=len(chunk))
    if total is not None and written != total:
        raise OSError(f"connection closed after {written} of {total} bytes")


def download_file(spec: FileSpec, mirrors: Sequence[str], dest_dir: Path) -> Path:
    """Fetch ``spec`` into ``dest_dir`` from the first mirror that serves a copy whose
    checksum matches. The file appears only once complete and verified (temp file in the same
    folder, then ``os.replace``); nothing is left behind on failure."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / spec.filename
    attempts: list[tuple[str, str]] = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + spec.filename
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{spec.filename}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _fetch(url, tmp)
            raw = read_bytes(tmp, spec.max_size or MAX_DOWNLOAD)
            verify_file(tmp, spec, raw, strict=True)
            os.replace(tmp, final)
            mark_verified(final, spec)
            return final
        except Exception as exc:  # any failure (network, HTTP, checksum): try the next mirror
            attempts.append((url, f"{type(exc).__name__}: {exc}"))
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError(attempts)


def download_files(specs: Sequence[FileSpec], mirrors: Sequence[str], dest_dir: Path) -> None:
    """Download each of ``specs`` not already in ``dest_dir``.

    On failure, the folders this call created are removed again if they are still empty.
    """
    created = [d for d in (dest_dir, *dest_dir.parents) if not d.exists()]
    try:
        for spec in specs:
            if (dest_dir / spec.filename).is_file():
                continue
            download_file(spec, mirrors, dest_dir)
    except DownloadError:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty: keep the verified files
                break
        raise
