/* deepsqueeze's sparse kernel: matrix products straight from the compact (gap + codebook
   symbol) form. Compiled on first use by deepsqueeze/runtime/kernel.py (which documents the
   layout) and called through ctypes; see docs/runtime.md.

   Safety contract. Python describes each compressed matrix in a dsq_layer whose buffer
   lengths (ngaps, nvals, ncb) it fills from the tensors it holds; dsq_validate walks the form
   once (pointers monotone, every column inside the matrix, every symbol inside the codebook,
   the packed symbols inside vals) and stamps the struct as checked. The entry points refuse
   unchecked structs and check their own arguments (sizes of the input and output buffers
   against n and the layer shapes, conv geometry, chain shapes) in O(layers) before touching
   memory, so a wrong call returns an error code instead of reading or writing out of bounds. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DSQ_ABI 2 /* bump with any change of dsq_layer or of an entry point's signature */
#define DSQ_CHECKED 0x314b48434b515344LL /* "DSQKCHK1": set by dsq_validate */

enum {
    DSQ_OK = 0,
    DSQ_EINVAL = 1,    /* a NULL pointer, a negative count, an unknown mode */
    DSQ_ENOMEM = 2,    /* scratch memory could not be allocated */
    DSQ_EUNCHECKED = 3, /* a layer that dsq_validate did not accept */
    DSQ_ESIZE = 4,     /* buffer lengths that do not match n and the shapes, or overflow */
    DSQ_EGEOMETRY = 5, /* convolution geometry that is not positive or not consistent */
    DSQ_EFORM = 6      /* dsq_validate: a malformed compact form */
};

typedef struct {
    int64_t rows, cols, mode, relu;
    const int32_t *rowptr, *symptr; /* rows + 1 entries each */
    const uint8_t *gaps;            /* ngaps bytes; NULL: rows are dense (no gaps) */
    const void *vals;               /* nvals bytes: packed symbols or fp32 values */
    const float *cb, *bias;         /* ncb codebook entries; rows biases (or NULL) */
    int64_t ngaps, nvals, ncb, checked;
} dsq_layer;

int dsq_abi_version(void) { return DSQ_ABI; }
int64_t dsq_layer_size(void) { return (int64_t)sizeof(dsq_layer); }

static int mul_ok(int64_t a, int64_t b, int64_t *out) {
    return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out);
}

static int mode_ok(int64_t mode) { return (mode >= 0 && mode <= 3) || (mode >= 9 && mode <= 15); }

/* cheap per-call check: validated, and the fields the loops rely on still sane */
static int layer_ok(const dsq_layer *L) {
    return L->checked == DSQ_CHECKED && L->rows >= 1 && L->cols >= 1 && mode_ok(L->mode) &&
           L->rowptr && L->symptr;
}

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


/* bytes of vals that nnz packed weights of this mode read (the bit stream reads one byte past
   the last symbol's first byte) */
static int64_t vals_needed(int64_t mode, int64_t nnz) {
    if (nnz == 0) return 0;
    switch (mode) {
    case 0: return (nnz + 1) / 2;
    case 1: return nnz;
    case 2: return 2 * nnz;
    case 3: return 4 * nnz;
    default: return (((nnz - 1) * (mode - 8)) >> 3) + 2;
    }
}

static int64_t symbol_at(const dsq_layer *L, int64_t j) {
    const uint8_t *s8 = (const uint8_t *)L->vals;
    switch (L->mode) {
    case 0: return (s8[j >> 1] >> ((j & 1) << 2)) & 15;
    case 1: return s8[j];
    case 2: return ((const uint16_t *)L->vals)[j];
    default: {
        const int64_t nb = L->mode - 8;
        const uint32_t w = (uint32_t)s8[(j * nb) >> 3] | ((uint32_t)s8[((j * nb) >> 3) + 1] << 8);
        return (w >> ((j * nb) & 7)) & ((1u << nb) - 1u);
    }
    }
}

/* Check the whole compact form once (O(entries)); on success stamp L as checked. */
int dsq_validate(dsq_layer *L) {
    if (!L) return DSQ_EINVAL;
    L->checked = 0;
    if (L->rows < 1 || L->cols < 1 || !mode_ok(L->mode) || !L->rowptr || !L->symptr ||
        L->ngaps < 0 || L->nvals < 0 || L->ncb < 0 || L->rows >= INT32_MAX)
        return DSQ_EFORM;
    if (((uintptr_t)L->rowptr | (uintptr_t)L->symptr | (uintptr_t)L->cb | (uintptr_t)L->bias) & 3)
        return DSQ_EFORM;
    if ((L->mode == 2 && ((uintptr_t)L->vals & 1)) || (L->mode == 3 && ((uintptr_t)L->vals & 3)))
        return DSQ_EFORM;
    if (L->rowptr[0] != 0 || L->symptr[0] != 0) return DSQ_EFORM;
    const int64_t nnz = L->symptr[L->rows];
    if (nnz < 0 || vals_needed(L->mode, nnz) > L->nvals || (nnz > 0 && !L->vals)) return DSQ_EFORM;
    if (L->gaps ? L->rowptr[L->rows] != L->ngaps : L->rowptr[L->rows] != nnz) return DSQ_EFORM;
    if (L->mode != 3 && nnz > 0 && (!L->cb || L->ncb < 1)) return DSQ_EFORM;
    for (int64_t r = 0; r < L->rows; r++) {
        const int64_t k0 = L->rowptr[r], k1 = L->rowptr[r + 1];
        const int64_t j0 = L->symptr[r], j1 = L->symptr[r + 1];
        if (k1 < k0 || j1 < j0) return DSQ_EFORM;
        if (!L->gaps) {
            if (k0 != j0 || k1 - k0 > L->cols) return DSQ_EFORM;
            continue;
        }
        int64_t p = -1, real = 0;
        for (int64_t k = k0; k < k1; k++) {
            if (L->gaps[k] == FILL) { p += FILL; continue; }
            p += L->gaps[k] + 1;
            if (p >= L->cols) return DSQ_EFORM;
            real++;
        }
        if (real != j1 - j0) return DSQ_EFORM;
    }
    if (L->mode != 3)
        for (int64_t j = 0; j < nnz; j++)
            if (symbol_at(L, j) >= L->ncb) return DSQ_EFORM;
    L->checked = DSQ_CHECKED;
    return DSQ_OK;
}

/* y [n, rows_last] = layers applied in turn to x [n, cols_0] (row-major, contiguous; xlen and
   ylen floats). Returns DSQ_OK or an error code (nothing written on argument errors). */
int dsq_chain(int64_t nl, const dsq_layer *L, const float *x, int64_t xlen, float *y,
              int64_t ylen, int64_t n) {
    if (nl < 1 || !L || n < 0) return DSQ_EINVAL;
    for (int64_t i = 0; i < nl; i++) {
        if (!layer_ok(&L[i])) return DSQ_EUNCHECKED;
        if (i && L[i].cols != L[i - 1].rows) return DSQ_ESIZE;
    }
    int64_t need_x, need_y;
    if (!mul_ok(n, L[0].cols, &need_x) || !mul_ok(n, L[nl - 1].rows, &need_y) ||
        need_x != xlen || need_y != ylen)
        return DSQ_ESIZE;
    if (n == 0) return DSQ_OK;
    if (!x || !y) return DSQ_EINVAL;
    if (n == 1) {
        int64_t widest = 1, floats;
        for (int64_t i = 0; i + 1 < nl; i++) widest = L[i].rows > widest ? L[i].rows : widest;
        if (!mul_ok(widest, 2, &floats)) return DSQ_ESIZE;
        float *buf = scratch(floats);
        if (!buf) return DSQ_ENOMEM;
        const float *a = x;
        for (int64_t i = 0; i < nl; i++) {
            float *out = i + 1 == nl ? y : buf + (i % 2) * widest;
            layer_rows(&L[i], a, 1, 1, out, 1);
            a = out;
        }
        return DSQ_OK;
    }
    int64_t widest = L[0].cols;
    for (int64_t i = 0; i < nl; i++) widest = L[i].rows > widest ? L[i].rows : widest;
    /* row stride of the [features, n] activations: padded off multiples of 256 bytes, whose
       rows would all fall into the same few cache sets */
    if (n > INT64_MAX / 2) return DSQ_ESIZE;
    int64_t ld = (n + 7) / 8 * 8;
    if (ld % 64 == 0) ld += 8;
    int64_t plane, floats;
    if (!mul_ok(widest, ld, &plane) || plane > (INT64_MAX - 16) / 2 / (int64_t)sizeof(float))
        return DSQ_ESIZE;
    floats = plane * 2 + 16;
    float *buf = scratch(floats);
    if (!buf) return DSQ_ENOMEM;
    float *a = buf, *b = buf + plane + 16;
    transpose(x, n, L[0].cols, L[0].cols, a, ld);
    for (int64_t i = 0; i < nl; i++) {
        layer_cols(&L[i], a, n, ld, b);
        float *t = a; a = b; b = t;
    }
    transpose(a, L[nl - 1].rows, n, ld, y, L[nl - 1].rows);
    return DSQ_OK;
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


/* g = {C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW} (ng = 13 entries), x [n, C, H, W] (xlen
   floats), y [n, rows, OH, OW] (ylen floats). Returns DSQ_OK or an error code. */
int dsq_conv_direct(const dsq_layer *L, const int64_t *g, int64_t ng, const float *x,
                    int64_t xlen, float *y, int64_t ylen, int64_t n) {
    if (!L || !g || ng != 13 || n < 0) return DSQ_EINVAL;
    if (!layer_ok(L)) return DSQ_EUNCHECKED;
    const int64_t C = g[0], H = g[1], W = g[2], KH = g[3], KW = g[4], sh = g[5], sw = g[6];
    const int64_t ph = g[7], pw = g[8], dh = g[9], dw = g[10], OH = g[11], OW = g[12];
    if (C < 1 || H < 1 || W < 1 || KH < 1 || KW < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 ||
        dh < 1 || dw < 1 || OH < 1 || OW < 1)
        return DSQ_EGEOMETRY;
    int64_t taps, span_h, span_w, need_x, need_y, t;
    if (!mul_ok(C, KH, &t) || !mul_ok(t, KW, &taps) || taps != L->cols) return DSQ_EGEOMETRY;
    /* output size as torch computes it: (H + 2 ph - dh (KH - 1) - 1) / sh + 1 */
    if (!mul_ok(dh, KH - 1, &span_h) || !mul_ok(dw, KW - 1, &span_w) ||
        ph > (INT64_MAX - H) / 2 || pw > (INT64_MAX - W) / 2)
        return DSQ_EGEOMETRY;
    const int64_t eh = H + 2 * ph - span_h - 1, ew = W + 2 * pw - span_w - 1;
    if (eh < 0 || ew < 0 || eh / sh + 1 != OH || ew / sw + 1 != OW) return DSQ_EGEOMETRY;
    if (!mul_ok(n, C, &t) || !mul_ok(t, H, &t) || !mul_ok(t, W, &need_x) || need_x != xlen)
        return DSQ_ESIZE;
    if (!mul_ok(n, L->rows, &t) || !mul_ok(t, OH, &t) || !mul_ok(t, OW, &need_y) ||
        need_y != ylen)
        return DSQ_ESIZE;
    if (n == 0) return DSQ_OK;
    if (!x || !y) return DSQ_EINVAL;
    switch (L->mode) {
    case 0: conv_cb4(L, g, x, y, n); break;
    case 1: conv_cb8(L, g, x, y, n); break;
    case 2: conv_cb16(L, g, x, y, n); break;
    case 3: conv_f32(L, g, x, y, n); break;
    default: conv_bits(L, g, x, y, n); break;
    }
    return DSQ_OK;
}

/* Write the dense rows x cols matrix into out (outlen floats, already zeroed). */
int dsq_densify(const dsq_layer *L, float *out, int64_t outlen) {
    if (!L || !out) return DSQ_EINVAL;
    if (!layer_ok(L)) return DSQ_EUNCHECKED;
    int64_t need;
    if (!mul_ok(L->rows, L->cols, &need) || need != outlen) return DSQ_ESIZE;
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
    return DSQ_OK;
}
