"""MD5 verification of dataset files, done once per (file, size, mtime) per process."""

from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path

from deepsqueeze.errors import DataError, DatasetCorruptError
from deepsqueeze.inputs import NotReadable, open_input

from .idx import MAX_PAYLOAD, gunzip, is_gzip
from .registry import DATASETS, FileSpec

_VERIFIED: set[tuple[str, int, int, str, str | None]] = set()
_LOCK = threading.Lock()


def md5_hex(data: bytes) -> str:
    """MD5 of ``data`` as lowercase hex."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    """MD5 of a regular file's bytes, read in chunks (a FIFO or a device is a DataError)."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open_input(path) as f:
            while block := f.read(chunk):
                digest.update(block)
    except NotReadable as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    return digest.hexdigest()


def _key(path: Path, spec: FileSpec) -> tuple[str, int, int, str, str | None]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, spec.md5, spec.payload_md5)


def is_verified(path: Path, spec: FileSpec) -> bool:
    """Whether ``path`` (unchanged since) already passed its check in this process."""
    with _LOCK:
        return _key(path, spec) in _VERIFIED


def mark_verified(path: Path, spec: FileSpec) -> None:
    with _LOCK:
        _VERIFIED.add(_key(path, spec))


def forget_verified() -> None:
    """Drop the memo of verified files (tests)."""
    with _LOCK:
        _VERIFIED.clear()


def _known_as(md5: str) -> str | None:
    """Which known dataset file has this MD5, to explain a mix-up of folders."""
    for info in DATASETS.values():
        for spec in (*info.train, *info.test, *info.train_members, *info.test_members):
            if md5 in (spec.md5, spec.payload_md5):
                return f"{info.name}/{spec.stem}"
    return None


def verify(
    path: Path, spec: FileSpec, raw: bytes, payload: bytes | None = None, strict: bool = False
) -> None:
    """Check ``raw`` (the bytes of ``path``) against ``spec``.

    Accepted: ``md5(raw) == spec.md5`` (the file as the mirrors serve it), or
    ``md5(payload) == spec.payload_md5`` where ``payload`` is the decompressed contents (pass
    ``payload=raw`` for a file stored decompressed). Raises DatasetCorruptError on a mismatch.
    A decompressed file whose payload checksum is unknown cannot be verified: it is accepted
    with a warning, unless ``strict`` (downloads), where it is a mismatch.
    """
    if is_verified(path, spec):
        return
    got = md5_hex(raw)
    got_payload = None if payload is None else got if payload is raw else md5_hex(payload)
    _decide(path, spec, got, got_payload, plain=payload is raw, strict=strict)


def verify_file(path: Path, spec: FileSpec, raw: bytes, *, strict: bool = False) -> None:
    """Check ``raw`` (the bytes of ``path``, gzipped or not) against ``spec``, in bounded time
    and memory whatever the file holds.

    The file's own MD5 is checked first: a file as the mirrors serve it is accepted without
    decompressing anything. Only a re-compressed file (gzip data of another MD5) is
    decompressed, to check its contents' MD5, and then as a stream whose output is hashed and
    dropped, capped at the size of the real contents: a gzip bomb is refused after that many
    bytes, in a few MiB of memory. Otherwise as :func:`verify`.
    """
    if is_verified(path, spec):
        return
    got = md5_hex(raw)
    if got == spec.md5 or not is_gzip(raw):
        _decide(path, spec, got, None if got == spec.md5 else got, plain=True, strict=strict)
        return
    got_payload = None
    if spec.payload_md5 is not None:
        digest = hashlib.md5(usedforsecurity=False)
        limit = spec.payload_size or MAX_PAYLOAD
        gunzip(raw, path, limit, idx=True, keep=False, update=digest.update)
        got_payload = digest.hexdigest()
    _decide(path, spec, got, got_payload, plain=False, strict=strict)


def _decide(
    path: Path, spec: FileSpec, got: str, got_payload: str | None, *, plain: bool, strict: bool
) -> None:
    """Accept (and remember) or refuse ``path``, from the MD5 of its bytes (``got``) and of its
    decompressed contents (``got_payload``; the same as ``got`` for a ``plain`` file)."""
    if got == spec.md5:
        mark_verified(path, spec)
        return
    if spec.payload_md5 is not None and got_payload == spec.payload_md5:
        mark_verified(path, spec)
        return
    if spec.payload_md5 is None and plain and got_payload is not None and not strict:
        warnings.warn(
            f"{path}: no known checksum for the decompressed file {spec.stem}; "
            f"it was not verified (keep the original {spec.filename} to have it checked)",
            stacklevel=4,
        )
        mark_verified(path, spec)
        return
    expected = f"{spec.md5} (file as downloaded)"
    if spec.payload_md5 is not None:
        expected += f" or {spec.payload_md5} (decompressed contents)"
    got_text = got if got_payload is None or plain else f"{got} (decompressed: {got_payload})"
    other = _known_as(got) or (_known_as(got_payload) if got_payload else None)
    hint = f" It looks like {other}, not {spec.stem}: is this the right folder?" if other else ""
    raise DatasetCorruptError(
        f"checksum mismatch for {path}: expected MD5 {expected}, got {got_text}.{hint} "
        f"The file is corrupt or not the expected one; delete it and download it again "
        f"(or copy a good {spec.filename} in its place)."
    )
