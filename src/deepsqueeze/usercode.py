"""A user's own model code, explicitly chosen by the user: ``--model-code FILE.py:Class``.

This is the one place deepsqueeze runs code that is not its own, and only code the user names
on the command line or in a call: a Python file and an attribute in it
(``path/to/my_models.py:FashionCNN``), an importable module (``my_package.nets:build``), or the
name of a model a package registered under the entry-point group ``deepsqueeze.models``
(``[project.entry-points."deepsqueeze.models"] fashion-cnn = "my_package.nets:FashionCNN"``).
Nothing a file (``.dsq``, ``model.pt``) names is ever imported: files only *describe* a user's
class (see ``deepsqueeze.dsq``).

The object named must be an ``nn.Module`` subclass or a function returning an ``nn.Module``
(called with the JSON keyword arguments of ``--model-args``), or a module instance. Every
mistake is a :class:`ModelError` that names the file or module and says what to change.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from deepsqueeze.errors import ModelError
from deepsqueeze.options import short_repr

__all__ = [
    "ENTRY_POINT_GROUP",
    "RegisteredModel",
    "build_model",
    "load_object",
    "parse_model_args",
    "registered_models",
]

ENTRY_POINT_GROUP = "deepsqueeze.models"
MAX_MODEL_ARGS_CHARS = 100_000
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_QUALNAME = _MODULE
_USAGE = ("give FILE.py:Name, module.path:Name, or the name of a registered model "
          "(`deepsqueeze models` lists them)")


@dataclass(frozen=True)
class RegisteredModel:
    """A model a package registered under the ``deepsqueeze.models`` entry-point group."""

    name: str
    value: str
    """``module:attribute``, as the package declared it (not imported until used)."""
    package: str


def registered_models() -> dict[str, RegisteredModel]:
    """Models registered by installed packages (entry-point group ``deepsqueeze.models``), by
    name; reading the list imports nothing."""
    found: dict[str, RegisteredModel] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        package = f"{dist.name} {dist.version}" if dist is not None else ""
        found.setdefault(ep.name, RegisteredModel(ep.name, ep.value, package))
    return dict(sorted(found.items()))


def _where(exc: BaseException, path: Path | None) -> str:
    """``file:line`` of the innermost frame of ``exc`` in the user's file (or anywhere)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if path is not None:
        mine = [f for f in frames if Path(f.filename).resolve() == path.resolve()]
        frames = mine or frames
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def _failure(what: str, exc: BaseException, path: Path | None = None) -> ModelError:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return ModelError(
        f"{what} failed at {_where(exc, path)}: {type(exc).__name__}"
        f"{': ' + detail if detail else ''} (an error in that code, not in deepsqueeze; run it "
        "with python to see the whole traceback)"
    )


@contextlib.contextmanager
def _path_first(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` while the user's module is imported (so it can import
    the files beside it, as ``python file.py`` could)."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _import_file(path: Path) -> Any:
    """Run the Python file ``path`` as a module (named after the file, so that a class in it
    is recorded as ``my_models:FashionCNN``) and return it."""
    if not path.exists():
        raise ModelError(f"model code {path}: no such file; {_USAGE}")
    if not path.is_file():
        raise ModelError(f"model code {path}: not a regular file")
    if path.suffix != ".py":
        raise ModelError(f"model code {path}: not a Python file (.py); {_USAGE}")
    name = path.stem if _MODULE.match(path.stem) else "user_model_code"
    loaded = sys.modules.get(name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        if origin is not None and Path(origin).resolve() == path.resolve():
            return loaded  # the same file, already run in this process
        name = f"deepsqueeze_user.{name}"  # a module of that name exists: do not shadow it
        loaded = sys.modules.get(name)
        if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == \
                path.resolve():
            return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
        raise ModelError(f"model code {path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _path_first(path.parent.resolve()):
            spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise _failure(f"running {path}", exc, path) from exc
    return module


def _import_module(name: str) -> Any:
    """Import the module ``name`` from ``sys.path`` and the current folder."""
    try:
        with _path_first(Path.cwd()):
            return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise ModelError(
                f"model code {name}: no module named {exc.name!r} (looked on the Python path and "
                f"in the current folder); for a file give its path: path/to/{name.split('.')[-1]}"
                f".py:Name"
            ) from None
        raise _failure(f"importing {name}", exc) from exc
    except Exception as exc:
        raise _failure(f"importing {name}", exc) from exc


def _resolve(module: Any, qualname: str, where: str) -> Any:
    obj = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            public = sorted(
                n for n, v in vars(module).items()
                if not n.startswith("_") and (
                    (inspect.isclass(v) and issubclass(v, nn.Module)) or inspect.isfunction(v))
                and getattr(v, "__module__", None) == module.__name__
            )
            hint = f"; it defines {', '.join(public[:20])}" if public else ""
            raise ModelError(f"model code {where}: no attribute {qualname!r}{hint}") from None
        except Exception as exc:  # a module __getattr__ of the user's
            raise _failure(f"looking up {qualname} in {where}", exc) from exc
    return obj


def _split_ref(ref: str) -> tuple[str, str]:
    head, sep, attr = ref.rpartition(":")
    if not sep or not head or not attr:
        raise ModelError(f"model code {short_repr(ref)}: {_USAGE}")
    if not _QUALNAME.match(attr):
        raise ModelError(f"model code {short_repr(ref)}: {attr!r} is not a Python name; {_USAGE}")
    return head, attr


def load_object(ref: str) -> Any:
    """The object ``ref`` names: ``path/to/file.py:Name`` (runs the file), ``module.sub:Name``
    (imports the module from the Python path or the current folder), or the name of a model
    registered under ``deepsqueeze.models``. ``Name`` may be dotted (``Outer.Inner``).

    Runs the user's code: call it only with a reference the user gave.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelError(f"model code {short_repr(ref)}: {_USAGE}")
    ref = ref.strip()
    if ":" not in ref:
        registered = registered_models()
        if ref in registered:
            return load_object(registered[ref].value)
        if ref.endswith(".py"):
            raise ModelError(f"model code {short_repr(ref)}: name the class or function in "
                             f"the file: {ref}:ClassName")
        names = ", ".join(registered) or "none are installed"
        raise ModelError(f"model code {short_repr(ref)}: not a registered model ({names}); "
                         f"{_USAGE}")
    head, attr = _split_ref(ref)
    is_file = head.endswith(".py") or "/" in head or "\\" in head
    if is_file:
        return _resolve(_import_file(Path(head)), attr, head)
    if not _MODULE.match(head):
        raise ModelError(f"model code {short_repr(ref)}: {head!r} is neither a .py file nor a "
                         f"module name; {_USAGE}")
    return _resolve(_import_module(head), attr, head)


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``--model-args``: a JSON object of keyword arguments (``'{"width": 32}'``)."""
    if text is None or not text.strip():
        return {}
    if len(text) > MAX_MODEL_ARGS_CHARS:
        raise ModelError(f"--model-args is {len(text):,} characters, more than "
                         f"{MAX_MODEL_ARGS_CHARS:,}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelError(
            f"--model-args must be a JSON object such as '{{\"width\": 32}}', got "
            f"{short_repr(text)} ({str(exc).splitlines()[0] if str(exc) else 'invalid'})"
        ) from None
    if not isinstance(value, dict):
        raise ModelError(f"--model-args must be a JSON object of keyword arguments, got "
                         f"{short_repr(value)}")
    return value


def _label(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def build_model(ref: str | Any, args: dict[str, Any] | None = None) -> nn.Module:
    """A model from the user's code: ``ref`` as :func:`load_object` takes it (or the object
    itself), called with ``args`` as keyword arguments when it is a class or a function."""
    obj = load_object(ref) if isinstance(ref, str) else ref
    where = ref if isinstance(ref, str) else _label(obj)
    args = dict(args or {})
    if isinstance(obj, nn.Module):
        if args:
            raise ModelError(f"model code {where} is a module instance: it takes no "
                             "--model-args; name its class instead")
        return obj
    is_class = inspect.isclass(obj)
    if is_class and not issubclass(obj, nn.Module):
        raise ModelError(f"model code {where}: {obj.__qualname__} is a class but not a "
                         "torch.nn.Module subclass")
    if not callable(obj):
        raise ModelError(f"model code {where}: a {type(obj).__name__}, not an nn.Module class "
                         "or a function returning one")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(**args)
        except TypeError as exc:
            required = [
                n for n, p in signature.parameters.items()
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
            example = json.dumps({n: "..." for n in required}) if required else "{}"
            raise ModelError(
                f"model code {where}: cannot call it with --model-args {json.dumps(args)}: "
                f"{exc}; its parameters: {signature}; pass them as JSON, e.g. --model-args "
                f"'{example}'"
            ) from None
    try:
        model = obj(**args)
    except Exception as exc:
        path = Path(where.rpartition(":")[0]) if isinstance(ref, str) and ".py:" in ref else None
        raise _failure(f"creating the model {where}", exc, path) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model code {where}: returned an object of type "
                         f"{type(model).__name__}, not a torch.nn.Module")
    return model
