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
   - dsq_binary_select_linear: real inputs (BinaryConnect): dot = sum_c (+-x_c): 8 inputs at a
     time get their sign bits flipped by a mask looked up from the weight byte (AVX2 xor + add,
     no multiplication); a scalar loop without AVX2 and for the last columns.

   Safety contract: every entry point checks its counts (non-negative, overflow-free), buffer
   lengths (weights, scale, bias, input, output against rows, cols and n) and pointers before
   touching memory and returns 0 or a DSQ_E* code (the numbering of dsqkernel.c). */
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { BIN_OK = 0, BIN_EINVAL = 1, BIN_ENOMEM = 2, BIN_ESIZE = 4 };

#define BIN_MAX_THREADS 64
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
    const uint64_t *xbits; /* packed inputs (XNOR) or packed input rows (conv) */
    float *y;
    int64_t rows, cols, nw, n;
    int64_t r0, r1; /* this worker's units: rows (Linear) or (sample, output row) pairs (conv) */
    int mode;       /* BIN_XNOR, BIN_SELECT, BIN_CONV */
    int status;
    int64_t units, work;
    const int64_t *g; /* conv geometry: C H W O KH KW SH SW DH DW OH OW */
    int64_t pw;       /* conv: words per packed input row */
} bin_job;

enum { BIN_XNOR = 0, BIN_SELECT = 1, BIN_CONV = 2 };

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

#ifdef __AVX2__
/* sign masks of a weight byte: lane j is the float sign bit when bit j is set (-1) */
static uint32_t bin_masks[256][8] __attribute__((aligned(32)));
static pthread_once_t bin_masks_once = PTHREAD_ONCE_INIT;

static void bin_init_masks(void) {
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 8; j++) bin_masks[b][j] = ((b >> j) & 1) ? 0x80000000u : 0u;
}

static inline __m256 bin_flip8(const float *x, uint8_t byte) {
    return _mm256_xor_ps(_mm256_loadu_ps(x), _mm256_load_ps((const float *)bin_masks[byte]));
}
#endif

/* sum_c (bit c of the row ? -x[c] : x[c]) over one row of packed signs */
static inline float bin_select_dot(const uint8_t *restrict wb, const float *restrict x,
                                   int64_t cols) {
    int64_t c = 0;
    float acc = 0.0f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; c + 32 <= cols; c += 32) {
        const int64_t g = c / 8;
        a0 = _mm256_add_ps(a0, bin_flip8(x + c, wb[g]));
        a1 = _mm256_add_ps(a1, bin_flip8(x + c + 8, wb[g + 1]));
        a2 = _mm256_add_ps(a2, bin_flip8(x + c + 16, wb[g + 2]));
        a3 = _mm256_add_ps(a3, bin_flip8(x + c + 24, wb[g + 3]));
    }
    for (; c + 8 <= cols; c += 8) a0 = _mm256_add_ps(a0, bin_flip8(x + c, wb[c / 8]));
    const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    acc = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
#endif
    for (; c < cols; c++) acc += ((wb[c / 8] >> (c % 8)) & 1) ? -x[c] : x[c];
    return acc;
}

static void bin_select_rows(bin_job *J) {
    const int64_t nw = J->nw, cols = J->cols, rows = J->rows;
    for (int64_t rb = J->r0; rb < J->r1; rb += BIN_ROW_BLOCK) {
        const int64_t re = rb + BIN_ROW_BLOCK < J->r1 ? rb + BIN_ROW_BLOCK : J->r1;
        for (int64_t i = 0; i < J->n; i++) {
            const float *xi = J->x + i * cols;
            float *yi = J->y + i * rows;
            for (int64_t r = rb; r < re; r++)
                yi[r] = bin_out(J, r, bin_select_dot((const uint8_t *)(J->w + r * nw), xi, cols));
        }
    }
}

/* XNOR convolution, zero padding 0, groups 1: for each (sample, output row) unit, each
   output position's patch (c, kh, kw order, as F.unfold) is gathered as bits from the packed
   input rows, then cols - 2 popcount(patch ^ w[o]) for every output channel o. */
static void bin_conv_rows(bin_job *J, uint64_t *patch) {
    const int64_t *g = J->g;
    const int64_t C = g[0], H = g[1], O = g[3], KH = g[4], KW = g[5], SH = g[6], SW = g[7];
    const int64_t DH = g[8], DW = g[9], OH = g[10], OW = g[11];
    const int64_t nw = J->nw, cols = J->cols, pw = J->pw;
    const uint64_t last = cols % 64 ? (~0ULL >> (64 - cols % 64)) : ~0ULL;
    const uint64_t kmask = KW >= 64 ? ~0ULL : ((1ULL << KW) - 1);
    for (int64_t u = J->r0; u < J->r1; u++) {
        const int64_t i = u / OH, oh = u % OH;
        const uint64_t *planes = J->xbits + i * C * H * pw;
        for (int64_t ow = 0; ow < OW; ow++) {
            memset(patch, 0, (size_t)nw * sizeof(uint64_t));
            int64_t k = 0;
            for (int64_t c = 0; c < C; c++) {
                for (int64_t kh = 0; kh < KH; kh++, k += KW) {
                    const uint64_t *row = planes + (c * H + oh * SH + kh * DH) * pw;
                    const int64_t w0 = ow * SW;
                    if (DW == 1 && KW <= 64) {
                        const int64_t q = w0 / 64, sh = w0 % 64;
                        uint64_t bits = row[q] >> sh;
                        if (sh && sh + KW > 64) bits |= row[q + 1] << (64 - sh);
                        bits &= kmask;
                        patch[k / 64] |= bits << (k % 64);
                        if (k % 64 && k % 64 + KW > 64) patch[k / 64 + 1] |= bits >> (64 - k % 64);
                    } else {
                        for (int64_t kw = 0; kw < KW; kw++) {
                            const int64_t col = w0 + kw * DW, kk = k + kw;
                            patch[kk / 64] |= ((row[col / 64] >> (col % 64)) & 1ULL) << (kk % 64);
                        }
                    }
                }
            }
            float *yo = J->y + (i * O * OH + oh) * OW + ow;
            for (int64_t o = 0; o < O; o++) {
                const int64_t miss = bin_mismatch(J->w + o * nw, patch, nw, last);
                yo[o * OH * OW] = bin_out(J, o, (float)(cols - 2 * miss));
            }
        }
    }
}

static void *bin_worker(void *arg) {
    bin_job *J = (bin_job *)arg;
    if (J->mode == BIN_SELECT) {
        bin_select_rows(J);
    } else if (J->mode == BIN_XNOR) {
        bin_xnor_rows(J);
    } else {
        uint64_t *patch = (uint64_t *)malloc((size_t)J->nw * sizeof(uint64_t));
        if (!patch) {
            J->status = BIN_ENOMEM;
            return NULL;
        }
        bin_conv_rows(J, patch);
        free(patch);
    }
    J->status = BIN_OK;
    return NULL;
}

/* Units split over up to `threads` workers (the caller's thread is one of them). */
static int bin_run(bin_job *base, int64_t threads) {
    int64_t t = threads;
    if (base->work < BIN_MIN_WORK) t = 1;
    if (t > base->units) t = base->units;
    if (t < 1) return BIN_OK;
    bin_job jobs[BIN_MAX_THREADS];
    const int64_t per = base->units / t, extra = base->units % t;
    int64_t r = 0;
    for (int64_t k = 0; k < t; k++) {
        jobs[k] = *base;
        jobs[k].r0 = r;
        r += per + (k < extra);
        jobs[k].r1 = r;
        jobs[k].status = BIN_EINVAL;
    }
#ifdef _OPENMP
    /* torch's own pool (conv.c says why); a team smaller than asked runs the rest in turn */
#pragma omp parallel num_threads((int)t)
    {
        const int64_t size = omp_get_num_threads();
        for (int64_t k = omp_get_thread_num(); k < t; k += size) bin_worker(&jobs[k]);
    }
#else
    pthread_t tid[BIN_MAX_THREADS];
    int started[BIN_MAX_THREADS];
    for (int64_t k = 0; k < t; k++) started[k] = 0;
    for (int64_t k = 1; k < t; k++)
        started[k] = pthread_create(&tid[k], NULL, bin_worker, &jobs[k]) == 0;
    bin_worker(&jobs[0]);
    for (int64_t k = 1; k < t; k++) {
        if (started[k])
            pthread_join(tid[k], NULL);
        else
            bin_worker(&jobs[k]); /* no thread: do its rows here */
    }
#endif
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
    bin_job job = {w, scale, bias, x, NULL, y, rows, cols, nw, n, 0, rows,
                   select ? BIN_SELECT : BIN_XNOR, BIN_OK, rows, 0, NULL, 0};
    if (!bin_mul(words, n, &job.work)) job.work = INT64_MAX;
    uint64_t *xbits = NULL;
    if (!select) {
        if (xwords > (int64_t)(SIZE_MAX / sizeof(uint64_t))) return BIN_ESIZE;
        xbits = (uint64_t *)malloc((size_t)xwords * sizeof(uint64_t));
        if (!xbits) return BIN_ENOMEM;
        bin_pack_rows(x, n, cols, xbits);
        job.xbits = xbits;
    }
#ifdef __AVX2__
    if (select && pthread_once(&bin_masks_once, bin_init_masks) != 0) {
        free(xbits);
        return BIN_EINVAL;
    }
#endif
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

/* XNOR convolution of binary inputs (zero padding 0, groups 1), y = scale * dot + bias per
   output channel. geom: 12 int64 C H W O KH KW SH SW DH DW OH OW (OH, OW as torch computes them
   without padding); w: O * ceil(C KH KW / 64) words; x: n * C * H * W floats (NCHW);
   y: n * O * OH * OW floats (NCHW); scale, bias: O floats or NULL (count 0). */
int dsq_binary_xnor_conv2d(const uint64_t *w, int64_t w_words, const int64_t *geom,
                           int64_t ngeom, const float *scale, int64_t nscale, const float *bias,
                           int64_t nbias, const float *x, int64_t x_floats, float *y,
                           int64_t y_floats, int64_t n, int64_t threads) {
    if (!geom || ngeom != 12 || n < 0 || threads < 1 || threads > BIN_MAX_THREADS)
        return BIN_EINVAL;
    int64_t g[12];
    for (int k = 0; k < 12; k++) {
        g[k] = geom[k];
        if (g[k] < 1) return BIN_EINVAL;
    }
    const int64_t C = g[0], H = g[1], W = g[2], O = g[3], KH = g[4], KW = g[5];
    int64_t span_h, span_w, cols, t, words, xin, yout, planes, units;
    if (!bin_mul(g[8], KH - 1, &span_h) || !bin_mul(g[9], KW - 1, &span_w)) return BIN_ESIZE;
    if (span_h >= H || span_w >= W) return BIN_EINVAL;
    if (g[10] != (H - span_h - 1) / g[6] + 1 || g[11] != (W - span_w - 1) / g[7] + 1)
        return BIN_EINVAL;
    const int64_t pw = bin_words(W);
    if (!bin_mul(C, KH, &t) || !bin_mul(t, KW, &cols)) return BIN_ESIZE;
    const int64_t nw = bin_words(cols);
    if (!bin_mul(O, nw, &words) || !bin_mul(n, C, &t) || !bin_mul(t, H, &t) ||
        !bin_mul(t, W, &xin) || !bin_mul(n, O, &t) || !bin_mul(t, g[10], &t) ||
        !bin_mul(t, g[11], &yout) || !bin_mul(n, C, &t) || !bin_mul(t, H, &t) ||
        !bin_mul(t, pw, &planes) || !bin_mul(n, g[10], &units))
        return BIN_ESIZE;
    if (w_words != words || x_floats != xin || y_floats != yout) return BIN_ESIZE;
    if ((scale && nscale != O) || (!scale && nscale != 0)) return BIN_ESIZE;
    if ((bias && nbias != O) || (!bias && nbias != 0)) return BIN_ESIZE;
    if (!w) return BIN_EINVAL;
    if (n == 0) return BIN_OK;
    if (!x || !y) return BIN_EINVAL;
    if (planes > (int64_t)(SIZE_MAX / sizeof(uint64_t))) return BIN_ESIZE;
    uint64_t *xbits = (uint64_t *)malloc((size_t)planes * sizeof(uint64_t));
    if (!xbits) return BIN_ENOMEM;
    bin_pack_rows(x, n * C * H, W, xbits);
    bin_job job = {w, scale, bias, x, xbits, y, O, cols, nw, n, 0, units, BIN_CONV, BIN_OK,
                   units, 0, g, pw};
    if (!bin_mul(yout, nw, &job.work)) job.work = INT64_MAX;
    const int status = bin_run(&job, threads);
    free(xbits);
    return status;
}
