"""Our sparse kernel: matrix products straight from the compact (gap + codebook symbol) form.

Why a hand-written kernel: the memory target (weights in memory within 2x of the file) rules out
int32 column indices + fp32 values (8 bytes per kept weight, 3-4x a Deep-Compressed file), and
decoding that form on every call with torch ops costs more than the whole dense layer at batch 1
(each torch op is several microseconds of dispatch). This kernel reads 1-byte relative column
gaps and 1- or 2-byte codebook symbols (or raw fp32 values for unshared layers) directly, in one
call with no allocation: at batch 1 it beats ``torch.sparse.mm`` (int32 CSR) and scipy CSR on the
layers of the Deep-Compressed LeNets (see docs/runtime.md for the measured table).

The C source below is compiled once per machine with the system C compiler into the user cache
(``$XDG_CACHE_HOME/deepsqueeze/kernels``) and loaded with ctypes. Without a compiler (or with
``DEEPSQUEEZE_KERNEL=0``) :func:`get_kernel` returns None and the runtime uses its torch/scipy
candidates only.

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

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

ENV_KERNEL = "DEEPSQUEEZE_KERNEL"
"""Set to ``0`` to never build or use the C kernel (the torch/scipy candidates remain)."""

MODE_CB4, MODE_CB8, MODE_CB16, MODE_F32 = 0, 1, 2, 3
MODE_BITS = 8
"""Modes ``MODE_BITS + b`` (b in 1..7 except 4): codebook symbols packed at b bits."""

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t rows, cols, mode, relu;
    const int32_t *rowptr, *symptr;
    const uint8_t *gaps;
    const void *vals;
    const float *cb, *bias;
} dsq_layer;

#define FILL 255
#define BLOCK 64 /* batch columns per tile: a tile of X rows stays in L1/L2 */
#define CHUNK 32 /* columns accumulated in registers (4 AVX2 / 2 AVX-512 vectors) */

/* One routine per weight encoding, so the inner loops carry no mode test. WEIGHT(j) is the
   weight of real entry j. Y[r, b] = bias[r] + sum_k w_k X[pos_k, b] for r < rows, b < ncol,
   with X[c, b] at x[c*xrs + b] and Y[r, b] at y[r*yrs + b]; then ReLU when asked. */
#define DEFINE_ROWS(NAME, WEIGHT)                                                              \
static void NAME(const dsq_layer *L, const float *restrict x, int64_t xrs, int64_t ncol,      \
                 float *restrict y, int64_t yrs) {                                            \
    const uint8_t *s8 = (const uint8_t *)L->vals;                                            \
    const uint16_t *s16 = (const uint16_t *)L->vals;                                         \
    const float *vf = (const float *)L->vals;                                                \
    const float *cb = L->cb;                                                                 \
    const uint8_t *gaps = L->gaps;                                                           \
    const int64_t nb = L->mode > 8 ? L->mode - 8 : 0;                                        \
    const uint32_t bmask = (1u << nb) - 1u;                                                  \
    (void)s8; (void)s16; (void)vf; (void)cb; (void)nb; (void)bmask;                          \
    for (int64_t r = 0; r < L->rows; r++) {                                                  \
        const int64_t k0 = L->rowptr[r], k1 = L->rowptr[r + 1];                              \
        int64_t j = L->symptr[r];                                                            \
        const int fillers = gaps && (k1 - k0) != (L->symptr[r + 1] - j);                     \
        const float b0 = L->bias ? L->bias[r] : 0.0f;                                        \
        float *restrict yr = y + r * yrs;                                                    \
        int64_t p = -1;                                                                      \
        if (ncol == 1) {                                                                     \
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;                                \
            int64_t k = k0;                                                                  \
            if (!gaps) {                                                                     \
                for (; k + 4 <= k1; k += 4, j += 4) {                                        \
                    const int64_t c = k - k0;                                                \
                    a0 += WEIGHT(j) * x[c * xrs];                                            \
                    a1 += WEIGHT(j + 1) * x[(c + 1) * xrs];                                  \
                    a2 += WEIGHT(j + 2) * x[(c + 2) * xrs];                                  \
                    a3 += WEIGHT(j + 3) * x[(c + 3) * xrs];                                  \
                }                                                                            \
                for (; k < k1; k++, j++) a0 += WEIGHT(j) * x[(k - k0) * xrs];                \
            } else if (!fillers) {                                                           \
                for (; k + 4 <= k1; k += 4, j += 4) {                                        \
                    const int64_t p0 = p + gaps[k] + 1, p1 = p0 + gaps[k + 1] + 1;           \
                    const int64_t p2 = p1 + gaps[k + 2] + 1, p3 = p2 + gaps[k + 3] + 1;      \
                    a0 += WEIGHT(j) * x[p0 * xrs];                                           \
                    a1 += WEIGHT(j + 1) * x[p1 * xrs];                                       \
                    a2 += WEIGHT(j + 2) * x[p2 * xrs];                                       \
                    a3 += WEIGHT(j + 3) * x[p3 * xrs];                                       \
                    p = p3;                                                                  \
                }                                                                            \
                for (; k < k1; k++, j++) { p += gaps[k] + 1; a0 += WEIGHT(j) * x[p * xrs]; } \
            } else {                                                                         \
                for (; k < k1; k++) {                                                        \
                    if (gaps[k] == FILL) { p += FILL; continue; }                            \
                    p += gaps[k] + 1;                                                        \
                    a0 += WEIGHT(j) * x[p * xrs];                                            \
                    j++;                                                                     \
                }                                                                            \
            }                                                                                \
            float v = b0 + ((a0 + a1) + (a2 + a3));                                          \
            yr[0] = (L->relu && v < 0.0f) ? 0.0f : v;                                        \
        } else {                                                                             \
            /* CHUNK columns at a time, accumulated in registers over the row's entries */  \
            const int64_t j0 = j;                                                            \
            for (int64_t c0 = 0; c0 < ncol; c0 += CHUNK) {                                   \
                const int64_t nc = ncol - c0 < CHUNK ? ncol - c0 : CHUNK;                    \
                float acc[CHUNK];                                                            \
                for (int64_t b = 0; b < CHUNK; b++) acc[b] = b0;                             \
                p = -1;                                                                      \
                j = j0;                                                                      \
                const float *xc = x + c0;                                                    \
                for (int64_t k = k0; k < k1; k++) {                                          \
                    if (!gaps) p = k - k0;                                                   \
                    else if (gaps[k] == FILL) { p += FILL; continue; }                       \
                    else p += gaps[k] + 1;                                                   \
                    const float w = WEIGHT(j);                                               \
                    j++;                                                                     \
                    const float *restrict xr = xc + p * xrs;                                 \
                    if (nc == CHUNK)                                                         \
                        for (int64_t b = 0; b < CHUNK; b++) acc[b] += w * xr[b];             \
                    else                                                                     \
                        for (int64_t b = 0; b < nc; b++) acc[b] += w * xr[b];                \
                }                                                                            \
                for (int64_t b = 0; b < nc; b++)                                             \
                    yr[c0 + b] = (L->relu && acc[b] < 0.0f) ? 0.0f : acc[b];                 \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}

#define W_CB4(j) cb[(s8[(j) >> 1] >> (((j) & 1) << 2)) & 15]
#define W_CB8(j) cb[s8[j]]
#define W_CB16(j) cb[s16[j]]
#define W_F32(j) vf[j]
/* nb-bit symbols (nb < 8), little-endian bit stream; the array has one byte of padding */
#define W_BITS(j)                                                                            \
    cb[(((uint32_t)s8[((j) * nb) >> 3] | ((uint32_t)s8[(((j) * nb) >> 3) + 1] << 8)) >>       \
        (((j) * nb) & 7)) & bmask]
DEFINE_ROWS(rows_cb4, W_CB4)
DEFINE_ROWS(rows_cb8, W_CB8)
DEFINE_ROWS(rows_cb16, W_CB16)
DEFINE_ROWS(rows_f32, W_F32)
DEFINE_ROWS(rows_bits, W_BITS)

static void layer_rows(const dsq_layer *L, const float *x, int64_t xrs, int64_t ncol, float *y,
                       int64_t yrs) {
    switch (L->mode) {
    case 0: rows_cb4(L, x, xrs, ncol, y, yrs); break;
    case 1: rows_cb8(L, x, xrs, ncol, y, yrs); break;
    case 2: rows_cb16(L, x, xrs, ncol, y, yrs); break;
    case 3: rows_f32(L, x, xrs, ncol, y, yrs); break;
    default: rows_bits(L, x, xrs, ncol, y, yrs); break;
    }
}

/* Y_T = W X_T for X_T [cols, n] with row stride ld (and Y_T likewise), in column tiles. */
static void layer_cols(const dsq_layer *L, const float *xt, int64_t n, int64_t ld, float *yt) {
    for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
        const int64_t nb = n - b0 < BLOCK ? n - b0 : BLOCK;
        layer_rows(L, xt + b0, ld, nb, yt + b0, ld);
    }
}

/* a [r, c] (row stride lda) -> out [c, r] (row stride ldo), in 32 x 32 blocks. */
static void transpose(const float *a, int64_t r, int64_t c, int64_t lda, float *out,
                      int64_t ldo) {
    for (int64_t i0 = 0; i0 < r; i0 += 32)
        for (int64_t j0 = 0; j0 < c; j0 += 32)
            for (int64_t i = i0; i < r && i < i0 + 32; i++)
                for (int64_t j = j0; j < c && j < j0 + 32; j++) out[j * ldo + i] = a[i * lda + j];
}

/* Per-thread scratch for activations, grown on demand and kept: a fresh malloc per call can
   cost a page fault per 4 KiB for large batches. */
static __thread float *scratch_buf = NULL;
static __thread int64_t scratch_cap = 0;

static float *scratch(int64_t floats) {
    if (floats > scratch_cap) {
        float *p = realloc(scratch_buf, sizeof(float) * floats);
        if (!p) return NULL;
        scratch_buf = p;
        scratch_cap = floats;
    }
    return scratch_buf;
}

/* y [n, rows_last] = layers applied in turn to x [n, cols_0] (row-major, contiguous).
   Returns 0, or -1 when scratch memory cannot be allocated. */
int dsq_chain(int64_t nl, const dsq_layer *L, const float *x, float *y, int64_t n) {
    if (n == 1) {
        int64_t widest = 1;
        for (int64_t i = 0; i + 1 < nl; i++) widest = L[i].rows > widest ? L[i].rows : widest;
        float *buf = scratch(widest * 2);
        if (!buf) return -1;
        const float *a = x;
        for (int64_t i = 0; i < nl; i++) {
            float *out = i + 1 == nl ? y : buf + (i % 2) * widest;
            layer_rows(&L[i], a, 1, 1, out, 1);
            a = out;
        }
        return 0;
    }
    int64_t widest = L[0].cols;
    for (int64_t i = 0; i < nl; i++) widest = L[i].rows > widest ? L[i].rows : widest;
    /* row stride of the [features, n] activations: padded off multiples of 256 bytes, whose
       rows would all fall into the same few cache sets */
    int64_t ld = (n + 7) / 8 * 8;
    if (ld % 64 == 0) ld += 8;
    float *buf = scratch(widest * ld * 2 + 16);
    if (!buf) return -1;
    float *a = buf, *b = buf + widest * ld + 16;
    transpose(x, n, L[0].cols, L[0].cols, a, ld);
    for (int64_t i = 0; i < nl; i++) {
        layer_cols(&L[i], a, n, ld, b);
        float *t = a; a = b; b = t;
    }
    transpose(a, L[nl - 1].rows, n, ld, y, L[nl - 1].rows);
    return 0;
}

/* Direct convolution from the compact form, no im2col: each kept weight (o, c, kh, kw) adds
   w * (a shifted window of input plane c) into output plane o. g = {C, H, W, KH, KW, sh, sw,
   ph, pw, dh, dw, OH, OW}; x [n, C, H, W], y [n, rows, OH, OW], contiguous; groups = 1. */
#define DEFINE_CONV(NAME, WEIGHT)                                                              \
static void NAME(const dsq_layer *L, const int64_t *g, const float *x, float *y, int64_t n) {  \
    const uint8_t *s8 = (const uint8_t *)L->vals;                                            \
    const uint16_t *s16 = (const uint16_t *)L->vals;                                         \
    const float *vf = (const float *)L->vals;                                                \
    const float *cb = L->cb;                                                                 \
    const int64_t nb = L->mode > 8 ? L->mode - 8 : 0;                                        \
    const uint32_t bmask = (1u << nb) - 1u;                                                  \
    (void)s8; (void)s16; (void)vf; (void)cb; (void)nb; (void)bmask;                          \
    const int64_t C = g[0], H = g[1], W = g[2], KH = g[3], KW = g[4], sh = g[5], sw = g[6];  \
    const int64_t ph = g[7], pw = g[8], dh = g[9], dw = g[10], OH = g[11], OW = g[12];       \
    const int64_t plane = OH * OW;                                                           \
    for (int64_t m = 0; m < n; m++) {                                                        \
        const float *xm = x + m * C * H * W;                                                 \
        for (int64_t o = 0; o < L->rows; o++) {                                              \
            float *restrict yo = y + (m * L->rows + o) * plane;                              \
            const float b0 = L->bias ? L->bias[o] : 0.0f;                                    \
            for (int64_t i = 0; i < plane; i++) yo[i] = b0;                                  \
            int64_t j = L->symptr[o], c = 0, kh = 0, kw = -1; /* tap cursor, no division */  \
            for (int64_t k = L->rowptr[o]; k < L->rowptr[o + 1]; k++) {                      \
                int64_t step = !L->gaps ? 1 : L->gaps[k] == FILL ? FILL : L->gaps[k] + 1;    \
                kw += step;                                                                  \
                while (kw >= KW) {                                                           \
                    kw -= KW;                                                                \
                    if (++kh == KH) { kh = 0; c++; }                                         \
                }                                                                            \
                if (L->gaps && L->gaps[k] == FILL) continue;                                 \
                const float w = WEIGHT(j);                                                   \
                j++;                                                                         \
                if (w == 0.0f) continue; /* zeros of a dense-rows (codebook) layer */        \
                const int64_t offy = kh * dh - ph, offx = kw * dw - pw;                      \
                /* output rows/cols whose input index is inside the plane */                 \
                int64_t y0, y1, x0, x1;                                                      \
                if (sh == 1 && sw == 1) { /* the common case: no integer division */          \
                    y0 = offy >= 0 ? 0 : -offy;                                              \
                    y1 = H - offy;                                                           \
                    x0 = offx >= 0 ? 0 : -offx;                                              \
                    x1 = W - offx;                                                           \
                } else {                                                                     \
                    y0 = offy >= 0 ? 0 : (-offy + sh - 1) / sh;                              \
                    y1 = (H - 1 - offy) >= 0 ? (H - 1 - offy) / sh + 1 : 0;                  \
                    x0 = offx >= 0 ? 0 : (-offx + sw - 1) / sw;                              \
                    x1 = (W - 1 - offx) >= 0 ? (W - 1 - offx) / sw + 1 : 0;                  \
                }                                                                            \
                if (y1 > OH) y1 = OH;                                                        \
                if (x1 > OW) x1 = OW;                                                        \
                const float *xc = xm + c * H * W;                                            \
                for (int64_t oy = y0; oy < y1; oy++) {                                       \
                    const float *restrict xr = xc + (oy * sh + offy) * W + offx;             \
                    float *restrict yr = yo + oy * OW;                                       \
                    if (sw == 1)                                                             \
                        for (int64_t ox = x0; ox < x1; ox++) yr[ox] += w * xr[ox];           \
                    else                                                                     \
                        for (int64_t ox = x0; ox < x1; ox++) yr[ox] += w * xr[ox * sw];      \
                }                                                                            \
            }                                                                                \
            if (L->relu)                                                                     \
                for (int64_t i = 0; i < plane; i++) yo[i] = yo[i] < 0.0f ? 0.0f : yo[i];     \
        }                                                                                    \
    }                                                                                        \
}
DEFINE_CONV(conv_cb4, W_CB4)
DEFINE_CONV(conv_cb8, W_CB8)
DEFINE_CONV(conv_cb16, W_CB16)
DEFINE_CONV(conv_f32, W_F32)
DEFINE_CONV(conv_bits, W_BITS)

int dsq_conv_direct(const dsq_layer *L, const int64_t *g, const float *x, float *y, int64_t n) {
    switch (L->mode) {
    case 0: conv_cb4(L, g, x, y, n); break;
    case 1: conv_cb8(L, g, x, y, n); break;
    case 2: conv_cb16(L, g, x, y, n); break;
    case 3: conv_f32(L, g, x, y, n); break;
    default: conv_bits(L, g, x, y, n); break;
    }
    return 0;
}

/* Write the dense rows x cols matrix into out (already zeroed). */
int dsq_densify(const dsq_layer *L, float *out) {
    const uint8_t *s8 = (const uint8_t *)L->vals;
    const uint16_t *s16 = (const uint16_t *)L->vals;
    const float *vf = (const float *)L->vals;
    const float *cb = L->cb;
    const int64_t nb = L->mode > 8 ? L->mode - 8 : 0;
    const uint32_t bmask = (1u << nb) - 1u;
    for (int64_t r = 0; r < L->rows; r++) {
        int64_t p = -1, j = L->symptr[r];
        for (int64_t k = L->rowptr[r]; k < L->rowptr[r + 1]; k++) {
            if (!L->gaps) p = k - L->rowptr[r];
            else if (L->gaps[k] == FILL) { p += FILL; continue; }
            else p += L->gaps[k] + 1;
            out[r * L->cols + p] = L->mode == 0 ? W_CB4(j) : L->mode == 1 ? W_CB8(j)
                                 : L->mode == 2 ? W_CB16(j) : L->mode == 3 ? W_F32(j)
                                 : W_BITS(j);
            j++;
        }
    }
    return 0;
}
"""


class DsqLayer(ctypes.Structure):
    """The C ``dsq_layer``: one compressed matrix, its bias and a fused-ReLU flag."""

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
    ]


_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"],
    ["-O3", "-fno-math-errno", "-fPIC", "-shared"],
)

_lock = threading.Lock()
_kernel: Kernel | None = None
_tried = False


def kernel_enabled() -> bool:
    """False when ``DEEPSQUEEZE_KERNEL=0`` (or ``false``/``off``) is set."""
    return os.environ.get(ENV_KERNEL, "1").strip().lower() not in ("0", "false", "off", "no")


def kernel_dir() -> Path:
    """Where the compiled kernel is kept: ``<user cache>/kernels``."""
    from deepsqueeze.data.search import user_cache_dir

    return user_cache_dir() / "kernels"


class Kernel:
    """The loaded shared library with typed entry points."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.lib = lib
        self.path = path
        i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.dsq_chain.argtypes = [i64, vp, vp, vp, i64]
        lib.dsq_densify.argtypes = [vp, vp]
        lib.dsq_conv_direct.argtypes = [vp, vp, vp, vp, i64]
        for fn in (lib.dsq_chain, lib.dsq_densify, lib.dsq_conv_direct):
            fn.restype = i32
        self.chain = lib.dsq_chain
        self.conv_direct = lib.dsq_conv_direct
        self.densify = lib.dsq_densify


def _compile(target: Path) -> bool:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "dsqkernel.c"
        src.write_text(C_SOURCE)
        out = Path(tmp) / target.name
        for flags in _FLAG_SETS:
            try:
                proc = subprocess.run(
                    [cc, *flags, "-o", str(out), str(src)], capture_output=True, timeout=120
                )
            except (OSError, subprocess.SubprocessError):
                return False
            if proc.returncode == 0 and out.exists():
                os.replace(out, target)  # atomic: a concurrent builder sees all or nothing
                return True
    return False


def _machine_tag() -> str:
    from deepsqueeze.runtime.autotune import cpu_model

    raw = f"{C_SOURCE}|{cpu_model()}|{_FLAG_SETS}".encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def get_kernel() -> Kernel | None:
    """The compiled kernel (built on first use), or None when disabled or no compiler works."""
    global _kernel, _tried
    if not kernel_enabled():
        return None
    with _lock:
        if _tried:
            return _kernel
        _tried = True
        target = kernel_dir() / f"dsqkernel-{_machine_tag()}.so"
        try:
            if not target.exists() and not _compile(target):
                return None
            _kernel = Kernel(ctypes.CDLL(str(target)), target)
        except OSError:
            _kernel = None
        return _kernel


def ptr(t: torch.Tensor | None) -> int | None:
    """Data pointer of a tensor (None for None), for the ctypes calls."""
    return None if t is None else t.data_ptr()
