/* Binary layers (BinaryConnect / BNN / XNOR-Net): matrix products with +-1 weights packed 64 to
   a word. Compiled into deepsqueeze's kernel library by deepsqueeze/runtime/kernel.py and called
   through ctypes by deepsqueeze/runtime/executors/binary.py; see docs/runtime.md.

   Layout. A rows x cols weight matrix of +-1 is held as rows * ceil(cols / 64) uint64 words,
   row r in words [r * nw, (r + 1) * nw); bit j of word w of a row is column 64 w + j, set for
   -1 and clear for +1; the padding bits past cols are clear (and masked off anyway). An input
   row is packed the same way: bit set where !(x >= 0), so sign(0) = +1 and NaN packs as -1, as
   torch.where(x >= 0, 1, -1) binarizes it.

   Two products, both followed by y = scale[r] * dot + bias[r] (each optional):
   - dsq_binary_xnor_linear: binary inputs (BNN): dot = cols - 2 popcount(xbits ^ wbits),
     exact integers;
   - dsq_binary_select_linear: real inputs (BinaryConnect): dot = sum_c (+-x_c), computed from a
     table per 8 input columns of all 256 signed sums, indexed by the weight bytes (one load
     per 8 weights instead of 8 multiply-adds).

   Safety contract: every entry point checks its counts (non-negative, overflow-free), buffer
   lengths (weights, scale, bias, input, output against rows, cols and n) and pointers before
   touching memory and returns 0 or a DSQ_E* code (the numbering of dsqkernel.c). */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { BIN_OK = 0, BIN_EINVAL = 1, BIN_ENOMEM = 2, BIN_ESIZE = 4 };

#define BIN_MAX_THREADS 64
#define BIN_TABLE_GROUPS 64 /* 8-column groups per table block: 64 * 256 floats = 64 KiB */
#define BIN_ROW_BLOCK 64    /* weight rows per tile of the batched XNOR product */
#define BIN_MIN_WORK (1 << 15) /* word operations below which one thread does it all */

static int bin_mul(int64_t a, int64_t b, int64_t *out) {
    return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out);
}

static int64_t bin_words(int64_t cols) { return cols / 64 + (cols % 64 != 0); }

/* bits of 64 floats (fewer at a row's end): bit j set where !(x[j] >= 0) */
static uint64_t bin_pack64(const float *x, int64_t m) {
    uint64_t word = 0;
    int64_t j = 0;
#ifdef __AVX2__
    const __m256 zero = _mm256_setzero_ps();
    for (; j + 8 <= m; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        const int bits = _mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NGE_UQ));
        word |= (uint64_t)(unsigned)bits << j;
    }
#endif
    for (; j < m; j++) word |= (uint64_t)(!(x[j] >= 0.0f)) << j;
    return word;
}

static void bin_pack_rows(const float *x, int64_t n, int64_t cols, uint64_t *out) {
    const int64_t nw = bin_words(cols);
    for (int64_t i = 0; i < n; i++) {
        const float *xr = x + i * cols;
        uint64_t *o = out + i * nw;
        for (int64_t w = 0; w < nw; w++) {
            const int64_t left = cols - 64 * w;
            o[w] = bin_pack64(xr + 64 * w, left < 64 ? left : 64);
        }
    }
}

/* Pack the signs of an n x cols float matrix into n * ceil(cols / 64) words. */
int dsq_binary_pack(const float *x, int64_t x_floats, int64_t n, int64_t cols, uint64_t *out,
                    int64_t out_words) {
    int64_t total, words;
    if (n < 0 || cols < 1) return BIN_EINVAL;
    if (!bin_mul(n, cols, &total) || !bin_mul(n, bin_words(cols), &words)) return BIN_ESIZE;
    if (x_floats != total || out_words != words) return BIN_ESIZE;
    if (total == 0) return BIN_OK;
    if (!x || !out) return BIN_EINVAL;
    bin_pack_rows(x, n, cols, out);
    return BIN_OK;
}

/* One product: the checked arguments, shared by the worker threads. */
typedef struct {
    const uint64_t *w;
    const float *scale, *bias, *x;
    const uint64_t *xbits; /* packed inputs (XNOR) */
    float *y;
    int64_t rows, cols, nw, n;
    int64_t r0, r1; /* this worker's rows */
    int select;     /* 0: XNOR, 1: sign-select */
    int status;
} bin_job;

static inline float bin_out(const bin_job *J, int64_t r, float dot) {
    float v = J->scale ? J->scale[r] * dot : dot;
    return J->bias ? v + J->bias[r] : v;
}

/* popcount of (a ^ b) over nw words, masking the padding of the last word */
static inline int64_t bin_mismatch(const uint64_t *restrict a, const uint64_t *restrict b,
                                   int64_t nw, uint64_t last) {
    int64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, k = 0;
    for (; k + 4 <= nw - 1; k += 4) {
        c0 += __builtin_popcountll(a[k] ^ b[k]);
        c1 += __builtin_popcountll(a[k + 1] ^ b[k + 1]);
        c2 += __builtin_popcountll(a[k + 2] ^ b[k + 2]);
        c3 += __builtin_popcountll(a[k + 3] ^ b[k + 3]);
    }
    for (; k < nw - 1; k++) c0 += __builtin_popcountll(a[k] ^ b[k]);
    c1 += __builtin_popcountll((a[nw - 1] ^ b[nw - 1]) & last);
    return (c0 + c1) + (c2 + c3);
}

static void bin_xnor_rows(bin_job *J) {
    const int64_t nw = J->nw, cols = J->cols, rows = J->rows;
    const uint64_t last = cols % 64 ? (~0ULL >> (64 - cols % 64)) : ~0ULL;
    for (int64_t rb = J->r0; rb < J->r1; rb += BIN_ROW_BLOCK) {
        const int64_t re = rb + BIN_ROW_BLOCK < J->r1 ? rb + BIN_ROW_BLOCK : J->r1;
        for (int64_t i = 0; i < J->n; i++) {
            const uint64_t *xb = J->xbits + i * nw;
            float *yi = J->y + i * rows;
            for (int64_t r = rb; r < re; r++) {
                const int64_t miss = bin_mismatch(J->w + r * nw, xb, nw, last);
                yi[r] = bin_out(J, r, (float)(cols - 2 * miss));
            }
        }
    }
}

/* Table of the 256 signed sums of each 8-column group g in [g0, g1) of input row x:
   t[(g - g0) * 256 + b] = sum_j (bit j of b ? -x[8g + j] : x[8g + j]), columns past cols as 0. */
static void bin_tables(const float *x, int64_t cols, int64_t g0, int64_t g1, float *t) {
    for (int64_t g = g0; g < g1; g++) {
        float *tg = t + (g - g0) * 256;
        float v[8], sum = 0.0f;
        for (int j = 0; j < 8; j++) {
            const int64_t c = 8 * g + j;
            v[j] = c < cols ? x[c] : 0.0f;
            sum += v[j];
        }
        tg[0] = sum;
        for (int j = 0; j < 8; j++) {
            const int64_t half = (int64_t)1 << j;
            const float d = 2.0f * v[j];
            for (int64_t b = 0; b < half; b++) tg[half + b] = tg[b] - d;
        }
    }
}

static void bin_select_rows(bin_job *J, float *table) {
    const int64_t nw = J->nw, cols = J->cols, rows = J->rows;
    const int64_t groups = (cols + 7) / 8;
    for (int64_t i = 0; i < J->n; i++) {
        const float *xi = J->x + i * cols;
        float *yi = J->y + i * rows;
        for (int64_t r = J->r0; r < J->r1; r++) yi[r] = 0.0f;
        for (int64_t g0 = 0; g0 < groups; g0 += BIN_TABLE_GROUPS) {
            const int64_t g1 = g0 + BIN_TABLE_GROUPS < groups ? g0 + BIN_TABLE_GROUPS : groups;
            const int64_t ng = g1 - g0;
            bin_tables(xi, cols, g0, g1, table);
            for (int64_t r = J->r0; r < J->r1; r++) {
                const uint8_t *wb = (const uint8_t *)(J->w + r * nw) + g0;
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
                int64_t g = 0;
                for (; g + 4 <= ng; g += 4) {
                    a0 += table[g * 256 + wb[g]];
                    a1 += table[(g + 1) * 256 + wb[g + 1]];
                    a2 += table[(g + 2) * 256 + wb[g + 2]];
                    a3 += table[(g + 3) * 256 + wb[g + 3]];
                }
                for (; g < ng; g++) a0 += table[g * 256 + wb[g]];
                yi[r] += (a0 + a1) + (a2 + a3);
            }
        }
        for (int64_t r = J->r0; r < J->r1; r++) yi[r] = bin_out(J, r, yi[r]);
    }
}

static void *bin_worker(void *arg) {
    bin_job *J = (bin_job *)arg;
    if (J->select) {
        float *table = (float *)malloc(sizeof(float) * 256 * BIN_TABLE_GROUPS);
        if (!table) {
            J->status = BIN_ENOMEM;
            return NULL;
        }
        bin_select_rows(J, table);
        free(table);
    } else {
        bin_xnor_rows(J);
    }
    J->status = BIN_OK;
    return NULL;
}

/* Rows split over up to `threads` workers (the caller's thread is one of them). */
static int bin_run(bin_job *base, int64_t threads) {
    int64_t work;
    if (!bin_mul(base->rows, base->nw, &work) || !bin_mul(work, base->n, &work)) work = INT64_MAX;
    int64_t t = threads;
    if (work < BIN_MIN_WORK) t = 1;
    if (t > base->rows) t = base->rows;
    bin_job jobs[BIN_MAX_THREADS];
    pthread_t tid[BIN_MAX_THREADS];
    int started[BIN_MAX_THREADS];
    const int64_t per = base->rows / t, extra = base->rows % t;
    int64_t r = 0;
    for (int64_t k = 0; k < t; k++) {
        jobs[k] = *base;
        jobs[k].r0 = r;
        r += per + (k < extra);
        jobs[k].r1 = r;
        jobs[k].status = BIN_EINVAL;
        started[k] = 0;
    }
    for (int64_t k = 1; k < t; k++)
        started[k] = pthread_create(&tid[k], NULL, bin_worker, &jobs[k]) == 0;
    bin_worker(&jobs[0]);
    for (int64_t k = 1; k < t; k++) {
        if (started[k])
            pthread_join(tid[k], NULL);
        else
            bin_worker(&jobs[k]); /* no thread: do its rows here */
    }
    int status = BIN_OK;
    for (int64_t k = 0; k < t; k++)
        if (jobs[k].status != BIN_OK) status = jobs[k].status;
    return status;
}

static int bin_product(const uint64_t *w, int64_t w_words, int64_t rows, int64_t cols,
                       const float *scale, int64_t nscale, const float *bias, int64_t nbias,
                       const float *x, int64_t x_floats, float *y, int64_t y_floats, int64_t n,
                       int64_t threads, int select) {
    int64_t words, xin, yout, xwords;
    if (rows < 1 || cols < 1 || n < 0 || threads < 1 || threads > BIN_MAX_THREADS)
        return BIN_EINVAL;
    const int64_t nw = bin_words(cols);
    if (!bin_mul(rows, nw, &words) || !bin_mul(n, cols, &xin) || !bin_mul(n, rows, &yout) ||
        !bin_mul(n, nw, &xwords))
        return BIN_ESIZE;
    if (w_words != words || x_floats != xin || y_floats != yout) return BIN_ESIZE;
    if ((scale && nscale != rows) || (!scale && nscale != 0)) return BIN_ESIZE;
    if ((bias && nbias != rows) || (!bias && nbias != 0)) return BIN_ESIZE;
    if (!w) return BIN_EINVAL;
    if (n == 0) return BIN_OK;
    if (!x || !y) return BIN_EINVAL;
    bin_job job = {w, scale, bias, x, NULL, y, rows, cols, nw, n, 0, rows, select, BIN_OK};
    uint64_t *xbits = NULL;
    if (!select) {
        if (xwords > (int64_t)(SIZE_MAX / sizeof(uint64_t))) return BIN_ESIZE;
        xbits = (uint64_t *)malloc((size_t)xwords * sizeof(uint64_t));
        if (!xbits) return BIN_ENOMEM;
        bin_pack_rows(x, n, cols, xbits);
        job.xbits = xbits;
    }
    const int status = bin_run(&job, threads);
    free(xbits);
    return status;
}

/* y[i, r] = scale[r] * (cols - 2 popcount(sign bits of x[i] ^ w[r])) + bias[r]: a binary
   layer on binarized inputs. w: rows * ceil(cols / 64) words; scale, bias: rows floats or
   NULL (with a count of 0); x: n * cols floats; y: n * rows floats; threads: 1..64. */
int dsq_binary_xnor_linear(const uint64_t *w, int64_t w_words, int64_t rows, int64_t cols,
                           const float *scale, int64_t nscale, const float *bias,
                           int64_t nbias, const float *x, int64_t x_floats, float *y,
                           int64_t y_floats, int64_t n, int64_t threads) {
    return bin_product(w, w_words, rows, cols, scale, nscale, bias, nbias, x, x_floats, y,
                       y_floats, n, threads, 0);
}

/* y[i, r] = scale[r] * sum_c (w[r, c] = -1 ? -x[i, c] : x[i, c]) + bias[r]: a binary layer on
   real inputs; arguments as dsq_binary_xnor_linear. */
int dsq_binary_select_linear(const uint64_t *w, int64_t w_words, int64_t rows, int64_t cols,
                             const float *scale, int64_t nscale, const float *bias,
                             int64_t nbias, const float *x, int64_t x_floats, float *y,
                             int64_t y_floats, int64_t n, int64_t threads) {
    return bin_product(w, w_words, rows, cols, scale, nscale, bias, nbias, x, x_floats, y,
                       y_floats, n, threads, 1);
}
