"""Where datasets are looked for, and how a folder is recognised as holding one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from deepsqueeze.errors import DatasetNotFoundError

from .registry import SPLITS, DatasetInfo, FileSpec, check_split, get_info

ENV_VAR = "DEEPSQUEEZE_DATA"
# System-wide dataset folders (Debian's dataset-* packages install under /usr/share/datasets).
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/deepsqueeze``, else ``~/.cache/deepsqueeze``; downloads go here."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "deepsqueeze"


def search_roots(data_dir: str | Path | None = None) -> list[Path]:
    """The roots, in priority order: ``data_dir``, ``$DEEPSQUEEZE_DATA`` (``os.pathsep``
    separated), the user cache, the system folders."""
    roots = [Path(data_dir).expanduser()] if data_dir is not None else []
    roots += [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [*roots, user_cache_dir(), *SYSTEM_DIRS]


def search_path(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Every folder that is checked for ``name``, in order: for each root, ``<root>/<name>``
    (and the dataset's other usual folder names) then ``<root>`` itself."""
    info = get_info(name)
    seen: dict[Path, None] = {}
    for root in search_roots(data_dir):
        for d in (*(root / n for n in info.dir_names), root):
            seen.setdefault(d, None)
    return list(seen)


@dataclass(frozen=True)
class Located:
    """Where one split of a dataset lies: ``files`` pairs each needed spec with its path.

    ``archive`` is True when the files are a CIFAR ``.tar.gz`` to be read in place.
    """

    directory: Path
    files: tuple[tuple[FileSpec, Path], ...]
    archive: bool = False


def _either(directory: Path, spec: FileSpec) -> Path | None:
    for fname in dict.fromkeys((spec.filename, spec.stem)):
        if (directory / fname).is_file():
            return directory / fname
    return None


def locate(info: DatasetInfo, directory: Path, split: str) -> Located | str:
    """The files of ``split`` in ``directory``, or a short reason why they are not there."""
    if not directory.is_dir():
        return "does not exist" if not directory.exists() else "is not a folder"
    if info.kind == "cifar":
        members = info.members(split)
        for sub in (directory / info.extracted_dir, directory):
            paths = [sub / m.filename for m in members]
            if all(p.is_file() for p in paths):
                return Located(directory, tuple(zip(members, paths, strict=True)))
        (spec,) = info.files(split)
        if (directory / spec.filename).is_file():
            return Located(directory, ((spec, directory / spec.filename),), archive=True)
        return f"no {spec.filename}, {info.extracted_dir}/ or {members[0].filename}"
    found, missing = [], []
    for spec in info.files(split):
        path = _either(directory, spec)
        if path is None:
            missing.append(f"{spec.stem}[.gz]")
        else:
            found.append((spec, path))
    if missing:
        return "missing " + ", ".join(missing)
    return Located(directory, tuple(found))


def find_split(
    info: DatasetInfo, split: str, data_dir: str | Path | None = None
) -> tuple[Located | None, list[tuple[Path, str]]]:
    """The first folder on the search path holding ``split``, and (folder, reason) for each
    folder that was looked at before it."""
    looked: list[tuple[Path, str]] = []
    for directory in search_path(info.name, data_dir):
        where = locate(info, directory, split)
        if isinstance(where, Located):
            return where, looked
        looked.append((directory, where))
    return None, looked


def not_found_message(
    info: DatasetInfo, splits: tuple[str, ...], looked: list[tuple[Path, str]], download_note: str
) -> str:
    """A DatasetNotFoundError message: every place looked, the download outcome, the fixes."""
    needed = ", ".join(dict.fromkeys(f.filename for s in splits for f in info.files(s)))
    if info.kind == "cifar":
        needed += f" (or the extracted {info.extracted_dir}/ folder)"
    which = " and ".join(splits)
    lines = [f"dataset {info.name!r} ({which} split) not found. Looked in:"]
    lines += [f"  - {d}: {why}" for d, why in looked]
    if not os.environ.get(ENV_VAR):
        lines.append(f"  ({ENV_VAR} is not set)")
    lines.append(download_note)
    lines.append(
        f"To fix: pass --data-dir DIR (data_dir=DIR) for a folder holding {needed}, "
        f"or set {ENV_VAR}=DIR, or copy the files into {user_cache_dir() / info.name}/."
    )
    return "\n".join(lines)


def find_dataset_dir(
    name: str, data_dir: str | Path | None = None, split: str | None = None
) -> Path:
    """The first folder on ``search_path(name, data_dir)`` holding the dataset: both splits,
    or only ``split`` if given. Raises DatasetNotFoundError naming every place looked."""
    info = get_info(name)
    splits = SPLITS if split is None else (split,)
    for s in splits:
        check_split(s)
    looked: list[tuple[Path, str]] = []
    for directory in search_path(name, data_dir):
        reasons = [r for s in splits if isinstance(r := locate(info, directory, s), str)]
        if not reasons:
            return directory
        looked.append((directory, "; ".join(dict.fromkeys(reasons))))
    raise DatasetNotFoundError(not_found_message(info, splits, looked, "(no download attempted)"))
