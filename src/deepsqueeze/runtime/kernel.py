"""Our sparse kernel: matrix products straight from the compact (gap + codebook symbol) form.

Why a hand-written kernel: the memory target (weights in memory within 2x of the file) rules out
int32 column indices + fp32 values (8 bytes per kept weight, 3-4x a Deep-Compressed file), and
decoding that form on every call with torch ops costs more than the whole dense layer at batch 1
(each torch op is several microseconds of dispatch). This kernel reads 1-byte relative column
gaps and 1- or 2-byte codebook symbols (or raw fp32 values for unshared layers) directly, in one
call with no allocation: at batch 1 it beats ``torch.sparse.mm`` (int32 CSR) and scipy CSR on the
layers of the Deep-Compressed LeNets (see docs/runtime.md for the measured table).

The C source (``runtime/csrc/dsqkernel.c``, package data) is compiled once per machine with the
system C compiler into the user cache (``$XDG_CACHE_HOME/deepsqueeze/kernels``) and loaded with
ctypes. Without a compiler (or with ``DEEPSQUEEZE_KERNEL=0``) :func:`get_kernel` returns None
and the runtime uses its torch/scipy candidates only.

The cache is not trusted blindly (a library's constructor runs as soon as it is loaded): the
folder must be ours and not group/world-writable (it is created 0700), the library and its
SHA-256 sidecar (written at build time, 0600) must be regular files we own, and the library's
bytes must match the digest. The verified *bytes* are what gets loaded (from an anonymous
memory file, else a fresh private temp file), so nothing can swap the file between check and
load. Anything else is warned about once and rebuilt; an unusable folder means a private build
that is not cached. After loading, the entry points, ABI version and struct size are checked
and a small self-test runs.

``DEEPSQUEEZE_KERNEL_SANITIZE=1`` builds the kernel with AddressSanitizer + UBSan instead
(separate cache file); the sanitizer runtimes must be preloaded into the process: run it with
the environment :func:`sanitizer_env` returns.

Layout of one compressed ``rows`` x ``cols`` matrix (:class:`~deepsqueeze.runtime.forms.
CompressedMatrix`): row ``r`` owns gap bytes ``rowptr[r]..rowptr[r+1]`` and weights
``symptr[r]..symptr[r+1]``. A column cursor starts at -1 for each row; gap byte ``g < 255``
advances it by ``g + 1`` and places the row's next weight there; ``g == 255`` is a filler that
only advances it by 255 (runs of more than 255 zeros are rare, so the hot loop takes a
branch-free path for rows without fillers). Without gaps (``gaps == NULL``) rows are dense. A
weight is ``codebook[symbol]`` with symbols packed at the bits the codebook needs (1-7 bits as a
little-endian bit stream, 4 bits as nibbles, 8 or 16 bits whole), or a raw fp32 value.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from deepsqueeze.errors import DeepSqueezeError, RuntimeInputError

ENV_KERNEL = "DEEPSQUEEZE_KERNEL"
"""Set to ``0`` to never build or use the C kernel (the torch/scipy candidates remain)."""
ENV_SANITIZE = "DEEPSQUEEZE_KERNEL_SANITIZE"
"""Set to ``1`` to build and load the kernel with ``-fsanitize=address,undefined`` (tests and
fuzzing; the process needs the sanitizer runtimes preloaded, see :func:`sanitizer_env`)."""

MODE_CB4, MODE_CB8, MODE_CB16, MODE_F32 = 0, 1, 2, 3
MODE_BITS = 8
"""Modes ``MODE_BITS + b`` (b in 1..7 except 4): codebook symbols packed at b bits."""
MAX_CODEBOOK = 1 << 16
"""Most codebook entries the kernel's symbol modes hold (16-bit symbols); larger codebooks run
as fp32 values (:func:`deepsqueeze.runtime.forms.from_coords`)."""

ABI_VERSION = 2
"""``DSQ_ABI`` of the C source this module's ctypes declarations match."""

DSQ_OK, DSQ_EINVAL, DSQ_ENOMEM, DSQ_EUNCHECKED, DSQ_ESIZE, DSQ_EGEOMETRY, DSQ_EFORM = range(7)
_RC_TEXT = {
    DSQ_EINVAL: "a NULL pointer, negative count or unknown mode",
    DSQ_ENOMEM: "scratch memory could not be allocated",
    DSQ_EUNCHECKED: "a layer the kernel has not validated",
    DSQ_ESIZE: "buffer sizes that do not match the batch and the layer shapes",
    DSQ_EGEOMETRY: "a convolution geometry that is not positive or not consistent",
    DSQ_EFORM: "a malformed compact form",
}

_SOURCE = ("csrc", "dsqkernel.c")
_SYMBOLS = ("dsq_abi_version", "dsq_layer_size", "dsq_validate", "dsq_chain", "dsq_conv_direct",
            "dsq_densify")
_MAX_LIBRARY_BYTES = 64 << 20


class KernelUnavailable(DeepSqueezeError):
    """The C kernel cannot be built or loaded (the runtime then runs without it)."""


class NoCompilerError(KernelUnavailable):
    """No C compiler was found (the documented, silent fallback)."""


class DsqLayer(ctypes.Structure):
    """The C ``dsq_layer``: one compressed matrix, its bias, a fused-ReLU flag, the lengths of
    its buffers (``ngaps`` and ``nvals`` in bytes, ``ncb`` entries) and the validation stamp."""

    _fields_ = [
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("mode", ctypes.c_int64),
        ("relu", ctypes.c_int64),
        ("rowptr", ctypes.c_void_p),
        ("symptr", ctypes.c_void_p),
        ("gaps", ctypes.c_void_p),
        ("vals", ctypes.c_void_p),
        ("cb", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("ngaps", ctypes.c_int64),
        ("nvals", ctypes.c_int64),
        ("ncb", ctypes.c_int64),
        ("checked", ctypes.c_int64),
    ]


# -fopenmp first: the threaded kernels then run on libgomp, the same pool torch's CPU build
# uses (its libgomp.so.1 is already loaded, so the library links to that one); without it
# they start their own pthreads, which fight torch's spinning workers for the cores.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"),
    ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"),
    ("-O3", "-fno-math-errno", "-fPIC", "-shared"),
)
_SANITIZE_BASE = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=all", "-fno-math-errno", "-fPIC", "-shared")
_SANITIZE_FLAGS = ((*_SANITIZE_BASE, "-fopenmp"), _SANITIZE_BASE)

_lock = threading.Lock()
_kernel: Kernel | None = None
_tried = False
_warned: set[str] = set()
_open_fds: list[int] = []  # memory files of loaded libraries: kept open, their names unique


def kernel_enabled() -> bool:
    """False when ``DEEPSQUEEZE_KERNEL=0`` (or ``false``/``off``) is set."""
    return os.environ.get(ENV_KERNEL, "1").strip().lower() not in ("0", "false", "off", "no")


def sanitize_enabled() -> bool:
    """True when ``DEEPSQUEEZE_KERNEL_SANITIZE`` asks for the sanitizer build."""
    return os.environ.get(ENV_SANITIZE, "").strip().lower() in ("1", "true", "on", "yes")


def kernel_dir() -> Path:
    """Where the compiled kernel is kept: ``<user cache>/kernels``."""
    from deepsqueeze.data.search import user_cache_dir

    return user_cache_dir() / "kernels"


def kernel_source() -> bytes:
    """The core kernel's C source, read from the package (``runtime/csrc/dsqkernel.c``)."""
    return resources.files("deepsqueeze.runtime").joinpath(*_SOURCE).read_bytes()


def kernel_sources() -> dict[str, bytes]:
    """Every C source of the library (``runtime/csrc/*.c``), the core first, then by name.

    Each method family keeps its kernels in a file of its own (``binary.c``, ``conv.c``, ...);
    all are compiled and linked into the one library, verified and loaded together.
    """
    folder = resources.files("deepsqueeze.runtime").joinpath(_SOURCE[0])
    names = sorted(e.name for e in folder.iterdir() if e.name.endswith(".c"))
    names.sort(key=lambda n: n != _SOURCE[1])
    return {n: folder.joinpath(n).read_bytes() for n in names}


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_rc(rc: int, who: str) -> None:
    """Turn a nonzero return code of a kernel entry point into an error naming ``who``."""
    if rc == DSQ_OK:
        return
    if rc == DSQ_ENOMEM:
        raise MemoryError(f"{who}: the C kernel could not allocate its scratch memory")
    raise RuntimeInputError(
        f"{who}: the C kernel refused the call ({_RC_TEXT.get(rc, 'unknown error')}, code {rc})"
    )


class Kernel:
    """The loaded shared library with typed entry points (symbols, ABI and struct size checked).

    ``path`` is the library file (the cache entry, or a private build); ``sanitized``: built
    with AddressSanitizer + UBSan; ``sha256``: digest of the loaded bytes.
    """

    def __init__(self, lib: ctypes.CDLL, path: Path, *, sanitized: bool = False,
                 sha256: str = "") -> None:
        missing = [name for name in _SYMBOLS if not hasattr(lib, name)]
        if missing:
            raise KernelUnavailable(f"{path.name} lacks the entry points {missing}")
        i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.dsq_abi_version.argtypes, lib.dsq_abi_version.restype = [], i32
        lib.dsq_layer_size.argtypes, lib.dsq_layer_size.restype = [], i64
        abi, size = lib.dsq_abi_version(), lib.dsq_layer_size()
        if abi != ABI_VERSION or size != ctypes.sizeof(DsqLayer):
            raise KernelUnavailable(
                f"{path.name} has ABI {abi} with a {size}-byte layer struct; expected ABI "
                f"{ABI_VERSION}, {ctypes.sizeof(DsqLayer)} bytes"
            )
        lib.dsq_validate.argtypes = [vp]
        lib.dsq_chain.argtypes = [i64, vp, vp, i64, vp, i64, i64]
        lib.dsq_conv_direct.argtypes = [vp, vp, i64, vp, i64, vp, i64, i64]
        lib.dsq_densify.argtypes = [vp, vp, i64]
        for fn in (lib.dsq_validate, lib.dsq_chain, lib.dsq_conv_direct, lib.dsq_densify):
            fn.restype = i32
        self.lib = lib
        self.path = path
        self.sanitized = sanitized
        self.sha256 = sha256
        self.validate = lib.dsq_validate
        """``validate(struct_address)``: check a layer's compact form, stamp it usable."""
        self.chain = lib.dsq_chain
        """``chain(n_layers, structs, x, x_floats, y, y_floats, n)``: layers in turn on x."""
        self.conv_direct = lib.dsq_conv_direct
        """``conv_direct(struct, geometry[13], 13, x, x_floats, y, y_floats, n)``."""
        self.densify = lib.dsq_densify
        """``densify(struct, out, out_floats)``: write the dense matrix into zeroed ``out``."""

    def function(self, name: str, argtypes: list[Any]) -> Any:
        """Entry point ``name`` of a family's C file (``csrc/<family>.c``), typed: arguments
        ``argtypes``, an ``int`` return code (``DSQ_OK`` or a ``DSQ_E*`` code, see
        :func:`check_rc`). Raises :class:`KernelUnavailable` when the library lacks it."""
        fn = getattr(self.lib, name, None)
        if fn is None:
            raise KernelUnavailable(f"{self.path.name} lacks the entry point {name!r}")
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        return fn


# ------------------------------------------------------------------------------ sanitizers


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which(
        "clang")


def sanitizer_runtime() -> list[str] | None:
    """Paths of the compiler's ``libasan.so`` and ``libubsan.so``, or None when it has none."""
    cc = _compiler()
    if not cc:
        return None
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        try:
            out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True,
                                 text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        if not os.path.isabs(out) or not os.path.isfile(out):
            return None
        libs.append(out)
    return libs


def sanitizer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a subprocess that runs the runtime on the sanitizer build.

    ``base`` (default ``os.environ``) plus: the ASan and UBSan runtimes in ``LD_PRELOAD`` (an
    instrumented library can only be loaded into a process that starts with them),
    ``ASAN_OPTIONS`` (no leak check: the interpreter's own allocations would all be reported;
    abort on the first error), ``UBSAN_OPTIONS`` (stack traces, abort) and
    ``DEEPSQUEEZE_KERNEL_SANITIZE=1``. Raises :class:`KernelUnavailable` without libasan.
    """
    libs = sanitizer_runtime()
    if libs is None:
        raise KernelUnavailable(
            f"the C compiler ({_compiler() or 'none found'}) has no AddressSanitizer runtime "
            "(libasan.so / libubsan.so); install gcc's libasan and libubsan"
        )
    env = dict(os.environ if base is None else base)
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p not in libs]
    env["LD_PRELOAD"] = ":".join([*libs, *preload])
    env["ASAN_OPTIONS"] = ":".join(filter(None, [
        "detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1",
        env.get("ASAN_OPTIONS", "")]))
    env["UBSAN_OPTIONS"] = ":".join(filter(None, [
        "print_stacktrace=1:halt_on_error=1:abort_on_error=1", env.get("UBSAN_OPTIONS", "")]))
    env[ENV_SANITIZE] = "1"
    return env


def _sanitizer_loaded() -> bool:
    """Whether this process runs with the ASan runtime (loading an ASan library otherwise
    kills the process from inside the library's initialiser)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            return "libasan" in fh.read()
    except OSError:
        return "libasan" in os.environ.get("LD_PRELOAD", "")


# --------------------------------------------------------------------------- private cache


class _Untrusted(Exception):
    """A cache entry that must not be loaded (the message says why)."""


def _why_untrusted(st: os.stat_result, *, directory: bool) -> str | None:
    if directory and not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _dir_fd_supported() -> bool:
    return os.open in os.supports_dir_fd and os.rename in os.supports_dir_fd


def _open_private_dir(path: Path) -> int | None:
    """A descriptor of the cache folder ``path`` (created 0700) if we own it and nobody else
    can write it, else None (with a warning): the caller then builds privately."""
    if not _dir_fd_supported():
        return None
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        _warn_once(f"dir:{path}", f"kernel cache {path} is unusable ({exc.strerror or exc}); "
                   "building the C kernel privately, not cached")
        return None
    st = os.fstat(fd)
    reason = _why_untrusted(st, directory=True)
    if reason:
        os.close(fd)
        _warn_once(f"dir:{path}", f"kernel cache {path} {reason}: not used; building the C "
                   f"kernel privately, not cached (fix: chown to yourself, chmod 700 {path})")
        return None
    if stat.S_IMODE(st.st_mode) & 0o077:
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o700)
    return fd


def _read_private(dfd: int, name: str, limit: int) -> bytes | None:
    """Bytes of ``name`` in folder ``dfd`` (None if absent); _Untrusted unless it is a regular
    file of ours that nobody else can write (a symlink is refused)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags | getattr(os, "O_NONBLOCK", 0), dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Untrusted(f"cannot be opened safely ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        reason = _why_untrusted(st, directory=False)
        if reason:
            raise _Untrusted(reason)
        if st.st_size > limit:
            raise _Untrusted(f"is {st.st_size} bytes, over the {limit}-byte limit")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise _Untrusted(f"grew over the {limit}-byte limit while read")
        return data
    finally:
        os.close(fd)


def _digest_name(name: str) -> str:
    return name + ".sha256"


def _read_verified(dfd: int, name: str) -> bytes | None:
    """The cached library's bytes if present and matching its recorded digest; None if absent;
    _Untrusted otherwise."""
    data = _read_private(dfd, name, _MAX_LIBRARY_BYTES)
    if data is None:
        return None
    record = _read_private(dfd, _digest_name(name), 4096)
    if record is None:
        raise _Untrusted("has no recorded digest")
    parts = record.decode("ascii", "replace").split()
    if len(parts) != 2 or parts[0] != "sha256":
        raise _Untrusted("has a malformed digest record")
    if not secrets.compare_digest(hashlib.sha256(data).hexdigest(), parts[1]):
        raise _Untrusted("does not match its recorded SHA-256 digest")
    return data


def _write_private(dfd: int, name: str, data: bytes) -> None:
    """Atomically replace ``name`` in folder ``dfd`` by a 0600 file holding ``data``."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0))
    fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def _store(dfd: int, name: str, data: bytes, where: Path) -> bool:
    """Cache a freshly built library and its digest (library first: a reader between the two
    sees a mismatch and rebuilds). False (with a warning) when the folder refuses."""
    try:
        _write_private(dfd, name, data)
        _write_private(dfd, _digest_name(name),
                       f"sha256 {hashlib.sha256(data).hexdigest()}\n".encode())
        return True
    except OSError as exc:
        _warn_once(f"store:{where}", f"could not cache the C kernel in {where} "
                   f"({exc.strerror or exc}); it is rebuilt in every process")
        return False


# ------------------------------------------------------------------------ build and load


def _tag(sources: dict[str, bytes], flag_sets: tuple[tuple[str, ...], ...]) -> str:
    from deepsqueeze.runtime.autotune import cpu_model

    raw = b"".join(n.encode() + b"\0" + src + b"\0" for n, src in sources.items())
    raw += f"|{cpu_model()}|{flag_sets}|{ABI_VERSION}".encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def library_name(*, sanitize: bool = False) -> str:
    """File name of the cached library: source, CPU, flags and ABI hashed into it (the
    sanitizer build has its own name, so the two never mix)."""
    flag_sets = _SANITIZE_FLAGS if sanitize else _FLAG_SETS
    return f"dsqkernel-{'asan-' if sanitize else ''}{_tag(kernel_sources(), flag_sets)}.so"


def _rmtree_at_exit(path: str) -> None:
    atexit.register(shutil.rmtree, path, True)


def _compile(sources: bytes | dict[str, bytes], flag_sets: tuple[tuple[str, ...], ...]) -> bytes:
    """Compile ``sources`` (file name → C source; bytes: one file) into one library in a private
    temp folder (removed after); the library's bytes."""
    if isinstance(sources, bytes):
        sources = {_SOURCE[1]: sources}
    cc = _compiler()
    if not cc:
        raise NoCompilerError("no C compiler (cc, gcc, clang or $CC) found")
    tmp = tempfile.mkdtemp(prefix="dsqkernel-build-")  # 0700, ours
    try:
        files = []
        for file_name, source in sources.items():
            files.append(str(Path(tmp) / Path(file_name).name))
            Path(files[-1]).write_bytes(source)
        out = Path(tmp) / "dsqkernel.so"
        errors = []
        for flags in flag_sets:
            try:
                proc = subprocess.run([cc, *flags, "-o", str(out), *files],
                                      capture_output=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as exc:
                raise KernelUnavailable(f"running the C compiler {cc} failed: {exc}") from exc
            if proc.returncode == 0 and out.is_file():
                return out.read_bytes()
            errors.append(proc.stderr.decode("utf-8", "replace").strip()[-500:])
        raise KernelUnavailable(f"compiling the C kernel with {cc} failed: {errors[-1]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _private_file(data: bytes, name: str) -> Path:
    """``data`` as a 0600 file ``name`` in a fresh private (0700) temp folder removed at exit."""
    tmp = tempfile.mkdtemp(prefix="dsqkernel-")
    _rmtree_at_exit(tmp)
    path = Path(tmp) / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return path


def _dlopen(data: bytes, name: str, keep_file: bool) -> ctypes.CDLL:
    """Load exactly ``data`` as a shared library: from an anonymous memory file (Linux) when
    possible, else from a fresh 0600 file in a private 0700 temp folder. Either way the bytes
    mapped are the bytes the caller verified; nothing on a shared path can swap them."""
    if not keep_file and hasattr(os, "memfd_create"):
        fd = -1
        try:
            fd = os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 0))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
            _open_fds.append(fd)  # kept open: the loader knows the library by this path name
            return lib
        except OSError:
            if fd >= 0:
                os.close(fd)
    path = _private_file(data, name)  # sanitizer reports symbolise from it: kept until exit
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(f"loading the C kernel failed: {exc}") from exc
    finally:
        if not keep_file:
            shutil.rmtree(path.parent, ignore_errors=True)


def _self_test(kernel: Kernel) -> None:
    """A 2 x 3 layer with gaps through validate, chain (n = 1, 2) and densify; and a malformed
    one that validate must refuse."""
    i32x3, f32 = ctypes.c_int32 * 3, ctypes.c_float
    rowptr, gaps = i32x3(0, 2, 3), (ctypes.c_uint8 * 3)(0, 1, 1)  # (0,0) (0,2) (1,1)
    vals, bias = (f32 * 3)(1.0, 2.0, 3.0), (f32 * 2)(0.5, -0.5)
    layer = DsqLayer(2, 3, MODE_F32, 0, ctypes.addressof(rowptr), ctypes.addressof(rowptr),
                     ctypes.addressof(gaps), ctypes.addressof(vals), None,
                     ctypes.addressof(bias), 3, 12, 0, 0)
    x, y, dense = (f32 * 6)(1, 2, 3, 1, 1, 1), (f32 * 4)(), (f32 * 6)()
    ok = (kernel.validate(ctypes.byref(layer)) == DSQ_OK
          and kernel.chain(1, ctypes.byref(layer), x, 3, y, 2, 1) == DSQ_OK
          and list(y)[:2] == [7.5, 5.5]
          and kernel.chain(1, ctypes.byref(layer), x, 6, y, 4, 2) == DSQ_OK
          and list(y) == [7.5, 5.5, 3.5, 2.5]
          and kernel.densify(ctypes.byref(layer), dense, 6) == DSQ_OK
          and list(dense) == [1, 0, 2, 0, 3, 0]
          and kernel.chain(1, ctypes.byref(layer), x, 3, y, 2, 2) == DSQ_ESIZE)
    gaps[2] = 3  # column 3 of a 3-column matrix
    if not ok or kernel.validate(ctypes.byref(layer)) != DSQ_EFORM:
        raise KernelUnavailable(f"{kernel.path.name} fails its self-test")


def _open(data: bytes, path: Path, sanitized: bool) -> Kernel:
    lib = _dlopen(data, path.name, keep_file=sanitized)
    kernel = Kernel(lib, path, sanitized=sanitized, sha256=hashlib.sha256(data).hexdigest())
    _self_test(kernel)
    return kernel


def load_kernel(cache: Path | None, *, sanitize: bool = False) -> Kernel:
    """Load the kernel from the verified cache in folder ``cache``, else build it (and cache
    it there when the folder is private). ``cache=None``: build privately, cache nothing.

    Raises :class:`KernelUnavailable` (:class:`NoCompilerError` without a compiler).
    """
    if sanitize and not _sanitizer_loaded():
        raise KernelUnavailable(
            f"{ENV_SANITIZE}=1 needs the AddressSanitizer runtime preloaded into the process: "
            "run it with deepsqueeze.runtime.kernel.sanitizer_env() (LD_PRELOAD of libasan and "
            "libubsan, ASAN_OPTIONS=detect_leaks=0); the kernel is not used"
        )
    sources = kernel_sources()
    flag_sets = _SANITIZE_FLAGS if sanitize else _FLAG_SETS
    name = library_name(sanitize=sanitize)
    dfd = _open_private_dir(cache) if cache is not None else None
    try:
        if dfd is not None:
            assert cache is not None
            try:
                data = _read_verified(dfd, name)
                if data is not None:
                    return _open(data, cache / name, sanitize)
            except (_Untrusted, KernelUnavailable) as exc:
                _warn_once(f"entry:{cache / name}", f"cached C kernel {cache / name} {exc}: "
                           "not used; rebuilding it")
        data = _compile(sources, flag_sets)
        if dfd is not None and cache is not None and _store(dfd, name, data, cache):
            path = cache / name
        else:  # not cached: a private copy, so that Kernel.path is still the library's file
            path = _private_file(data, name)
        return _open(data, path, sanitize)
    finally:
        if dfd is not None:
            os.close(dfd)


def get_kernel() -> Kernel | None:
    """The compiled kernel (built on first use), or None when disabled or unavailable."""
    global _kernel, _tried
    if not kernel_enabled():
        return None
    with _lock:
        if _tried:
            return _kernel
        _tried = True
        try:
            _kernel = load_kernel(kernel_dir(), sanitize=sanitize_enabled())
        except NoCompilerError:
            _kernel = None
        except KernelUnavailable as exc:
            _warn_once("unavailable", f"the C kernel is not used: {exc}")
            _kernel = None
        return _kernel


def ptr(t: torch.Tensor | None) -> int | None:
    """Data pointer of a tensor (None for None), for the ctypes calls."""
    return None if t is None else t.data_ptr()
