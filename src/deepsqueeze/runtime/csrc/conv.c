/* deepsqueeze's convolution kernels over the compact (gap + codebook symbol) form: an
   output-stationary sparse direct convolution and its codebook (shared-weight) variant.
   Compiled with dsqkernel.c into the one library (runtime/kernel.py); called through ctypes
   from runtime/executors/conv.py; see docs/runtime.md.

   Layout. The input x [n, C, H, W] is copied once, zero-padded and split into its sh x sw
   stride phases, into X [C, sh, sw, Hq, Wq, ld] (Hq = ceil(Hp / sh), Wq = ceil(Wp / sw), the
   batch innermost with row stride ld >= n). Output pixel (oy, ox) of sample b then reads, for
   the weight at tap (c, kh, kw), X[c, (kh dh) % sh, (kw dw) % sw, oy + kh dh / sh,
   ox + kw dw / sw, b]: that is X[q + off] with q = (oy Wq + ox) ld + b and one offset per kept
   weight, whatever the stride and dilation. A block of consecutive q (samples, then pixels of a
   row, then the next rows; the Wq - OW columns past the row's end are computed and dropped) is
   a contiguous vector: each block of Q outputs is accumulated in registers over all the kept
   weights of an output channel (output-stationary), then gets bias and ReLU and is written once
   into Y [rows, OH, Wq, ld]. A final pass writes y [n, rows, OH / pool, OW / pool], taking the
   max over pool x pool windows when a max-pool is fused. Blocks are split between threads
   (OpenMP when compiled with it: the library then shares torch's own libgomp thread pool, so
   its threads are the ones torch keeps spinning between ops instead of rivals for the same
   cores; pthreads otherwise); the blocks of all output channels at one q run together, so the
   input window they read stays in cache.

   The codebook variant groups each output channel's kept weights by centroid: the input values
   of all weights sharing centroid k are summed, then multiplied by it once.

   Safety contract: as dsqkernel.c. The struct must have been stamped by dsq_validate; the entry
   point checks every argument (geometry consistent with the layer, buffer lengths against the
   batch and the shapes, all products overflow-checked) before touching memory. */
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DSQ_CONV_CHECKED 0x314b48434b515344LL /* dsq_validate's stamp (dsqkernel.c) */

enum {
    DSQ_CONV_OK = 0,
    DSQ_CONV_EINVAL = 1,
    DSQ_CONV_ENOMEM = 2,
    DSQ_CONV_EUNCHECKED = 3,
    DSQ_CONV_ESIZE = 4,
    DSQ_CONV_EGEOMETRY = 5
};

/* the layout of dsqkernel.c's dsq_layer (ABI 2; kernel.py checks its size at load) */
typedef struct {
    int64_t rows, cols, mode, relu;
    const int32_t *rowptr, *symptr;
    const uint8_t *gaps;
    const void *vals;
    const float *cb, *bias;
    int64_t ngaps, nvals, ncb, checked;
} dsq_conv_layer;

#define FILL 255
#define NGEOM 18
#define QW 64 /* outputs per block, weights variant: 8 vectors of accumulators */
#define QC 32 /* outputs per block, codebook variant: 4 of sums, 4 of accumulators */
#define QMAX 64
#define MAX_THREADS 64
#define MAX_GROUP_CB 256 /* the codebook variant: at most 256 centroids */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES (256 << 10) /* packed input + output of a chunk of samples: in L2 */
#endif

static int mul_ok(int64_t a, int64_t b, int64_t *out) {
    return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out);
}

static int add_ok(int64_t a, int64_t b, int64_t *out) {
    return a >= 0 && b >= 0 && !__builtin_add_overflow(a, b, out);
}

static int layer_ok(const dsq_conv_layer *L) {
    return L->checked == DSQ_CONV_CHECKED && L->rows >= 1 && L->cols >= 1 && L->rowptr &&
           L->symptr && ((L->mode >= 0 && L->mode <= 3) || (L->mode >= 9 && L->mode <= 15));
}

/* symbol of stored weight j (codebook modes) */
static inline __attribute__((always_inline)) int64_t symbol_of(const dsq_conv_layer *L,
                                                              int64_t j) {
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

static inline __attribute__((always_inline)) float weight_of(const dsq_conv_layer *L,
                                                             int64_t j) {
    return L->mode == 3 ? ((const float *)L->vals)[j] : L->cb[symbol_of(L, j)];
}

/* Per-thread scratch, grown on demand and kept (large batches would page-fault a fresh
   allocation on every call). Slot 0: X, 1: Y, 2: offsets, 3: weights / segments. */
static __thread void *conv_scratch_buf[4];
static __thread int64_t conv_scratch_cap[4];

/* 64-byte aligned (vector loads at offsets that are multiples of 8 floats stay in one line) */
static void *conv_scratch(int slot, int64_t bytes) {
    if (bytes < 1) bytes = 1;
    if (bytes > INT64_MAX - 64) return NULL;
    if (bytes + 64 > conv_scratch_cap[slot]) {
        free(conv_scratch_buf[slot]);
        conv_scratch_buf[slot] = malloc((size_t)(bytes + 64));
        conv_scratch_cap[slot] = conv_scratch_buf[slot] ? bytes + 64 : 0;
        if (!conv_scratch_buf[slot]) return NULL;
    }
    return (void *)(((uintptr_t)conv_scratch_buf[slot] + 63) & ~(uintptr_t)63);
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));
#define LD(p) (*(const v8u *)(p))
#define ST(p, v) (*(v8u *)(p) = (v))

typedef struct {
    int64_t n, C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, groups, pool, relu, algo;
    int64_t Hq, Wq, ld, chan, rows, plane, blocks, q, chunk, nchunks;
    const float *x, *bias;
    float *y;
    const int64_t *rowptr; /* rows + 1 into off (and w) */
    const int64_t *off;    /* input offset of each kept weight, row by row */
    const float *w;        /* its weight (weights variant) */
    const int64_t *colofs; /* cols: input offset of each column within its group */
    const int64_t *segptr; /* codebook variant: rows + 1 into the segments */
    const int64_t *segend; /* end (into off) of each segment: the weights of one centroid */
    const float *segval;   /* the centroid of each segment */
} conv_job;

/* what one thread works on: the job, its own X and Y (or shared ones), the samples
   m0 .. m0 + cnt of the current chunk */
typedef struct {
    const conv_job *J;
    float *X, *Y;
    int64_t m0, cnt;
} conv_part;

typedef void (*range_fn)(conv_part *P, int64_t lo, int64_t hi);

typedef struct {
    conv_part *P;
    range_fn fn;
    int64_t count, grain;
    int64_t *next; /* shared: the next unclaimed index */
} conv_task;

/* claim ranges of `grain` indices until none is left (dynamic: a thread the OS does not run
   for a while leaves its share to the others instead of holding up the join) */
static void *conv_task_run(void *arg) {
    conv_task *t = (conv_task *)arg;
    for (;;) {
        const int64_t lo = __atomic_fetch_add(t->next, t->grain, __ATOMIC_RELAXED);
        if (lo >= t->count) break;
        t->fn(t->P, lo, lo + t->grain < t->count ? lo + t->grain : t->count);
    }
    return NULL;
}

/* fn over [0, count) by up to `threads` threads (the caller is one), in ranges of `grain`,
   thread i working on parts[i] (parts[0] for all when `shared`). A thread that cannot be
   started leaves its share to the others (same result). */
static void parallel_for(conv_part *parts, int shared, range_fn fn, int64_t count,
                         int64_t threads, int64_t grain) {
    if (threads > count) threads = count;
    if (threads <= 1) {
        if (count > 0) fn(parts, 0, count);
        return;
    }
    if (grain < 1) grain = 1;
    int64_t next = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads)
    {
        const int i = omp_get_thread_num();
        conv_task task = {shared ? parts : parts + i, fn, count, grain, &next};
        conv_task_run(&task);
    }
#else
    pthread_t tid[MAX_THREADS];
    conv_task task[MAX_THREADS];
    int started[MAX_THREADS];
    for (int64_t i = 0; i < threads; i++) {
        task[i].P = shared ? parts : parts + i;
        task[i].fn = fn;
        task[i].count = count;
        task[i].grain = grain;
        task[i].next = &next;
        started[i] = 0;
    }
    for (int64_t i = 1; i < threads; i++)
        started[i] = pthread_create(&tid[i], NULL, conv_task_run, &task[i]) == 0;
    conv_task_run(&task[0]);
    for (int64_t i = 1; i < threads; i++)
        if (started[i]) pthread_join(tid[i], NULL);
#endif
}

/* samples m0 .. m0 + cnt of x [n, C, H, W] -> X [C, sh, sw, Hq, Wq, ld] (zeroed first),
   channels lo..hi; 8 samples at a time (8 contiguous reads, one contiguous write of 8). The
   divisions by the stride are done once per row; stride-1 rows are written without any, and
   a single sample's rows (ld 1) are plain copies. */
static void pack_input(conv_part *P, int64_t lo, int64_t hi) {
    const conv_job *J = P->J;
    const int64_t n = P->cnt, H = J->H, W = J->W, C = J->C, ld = J->ld, sw = J->sw;
    const int64_t phase = J->Hq * J->Wq * ld; /* X distance between consecutive w phases */
    const float *x = J->x + P->m0 * C * H * W;
    for (int64_t c = lo; c < hi; c++) {
        float *Xc = P->X + c * J->chan;
        memset(Xc, 0, sizeof(float) * (size_t)J->chan);
        for (int64_t h = 0; h < H; h++) {
            const int64_t hp = h + J->ph;
            float *row = Xc + ((hp % J->sh) * sw * J->Hq + hp / J->sh) * J->Wq * ld;
            const float *src_row = x + c * H * W + h * W;
            if (sw == 1 && ld == 1) { /* one sample (n = 1) */
                memcpy(row + J->pw, src_row, sizeof(float) * (size_t)W);
                continue;
            }
            for (int64_t m0 = 0; m0 < n; m0 += 8) {
                const int64_t mc = n - m0 < 8 ? n - m0 : 8;
                const float *src = src_row + m0 * C * H * W;
                if (sw == 1) {
                    float *dst = row + J->pw * ld + m0;
                    for (int64_t w = 0; w < W; w++, dst += ld)
                        for (int64_t k = 0; k < mc; k++) dst[k] = src[k * C * H * W + w];
                    continue;
                }
                for (int64_t w = 0; w < W; w++) {
                    const int64_t wp = w + J->pw;
                    float *dst = row + (wp % sw) * phase + (wp / sw) * ld + m0;
                    for (int64_t k = 0; k < mc; k++) dst[k] = src[k * C * H * W + w];
                }
            }
        }
    }
}

/* bias, then ReLU when asked (a macro: no vector passed by value across a call) */
#define finish8(acc, b0, relu) \
    ((relu) ? (v8)((v8i)((acc) + (b0)) & ((acc) + (b0) > (v8){0})) : (acc) + (b0))

/* weights variant: blocks lo..hi of QW outputs, every output channel */
static void compute_weights(conv_part *P, int64_t lo, int64_t hi) {
    const conv_job *J = P->J;
    for (int64_t blk = lo; blk < hi; blk++) {
        const float *xb = P->X + blk * QW;
        for (int64_t o = 0; o < J->rows; o++) {
            const int64_t e1 = J->rowptr[o + 1];
            v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
            for (int64_t e = J->rowptr[o]; e < e1; e++) {
                const float w = J->w[e];
                const float *xr = xb + J->off[e];
                a0 += w * LD(xr);
                a1 += w * LD(xr + 8);
                a2 += w * LD(xr + 16);
                a3 += w * LD(xr + 24);
                a4 += w * LD(xr + 32);
                a5 += w * LD(xr + 40);
                a6 += w * LD(xr + 48);
                a7 += w * LD(xr + 56);
            }
            const float b0 = J->bias ? J->bias[o] : 0.0f;
            float *yo = P->Y + o * J->plane + blk * QW;
            ST(yo, finish8(a0, b0, J->relu));
            ST(yo + 8, finish8(a1, b0, J->relu));
            ST(yo + 16, finish8(a2, b0, J->relu));
            ST(yo + 24, finish8(a3, b0, J->relu));
            ST(yo + 32, finish8(a4, b0, J->relu));
            ST(yo + 40, finish8(a5, b0, J->relu));
            ST(yo + 48, finish8(a6, b0, J->relu));
            ST(yo + 56, finish8(a7, b0, J->relu));
        }
    }
}

/* codebook variant: per centroid, sum the inputs of its weights, then one multiply */
static void compute_codebook(conv_part *P, int64_t lo, int64_t hi) {
    const conv_job *J = P->J;
    for (int64_t blk = lo; blk < hi; blk++) {
        const float *xb = P->X + blk * QC;
        for (int64_t o = 0; o < J->rows; o++) {
            v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            int64_t e = J->rowptr[o];
            for (int64_t s = J->segptr[o]; s < J->segptr[o + 1]; s++) {
                v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
                for (const int64_t e1 = J->segend[s]; e < e1; e++) {
                    const float *xr = xb + J->off[e];
                    s0 += LD(xr);
                    s1 += LD(xr + 8);
                    s2 += LD(xr + 16);
                    s3 += LD(xr + 24);
                }
                const float cv = J->segval[s];
                a0 += cv * s0;
                a1 += cv * s1;
                a2 += cv * s2;
                a3 += cv * s3;
            }
            const float b0 = J->bias ? J->bias[o] : 0.0f;
            float *yo = P->Y + o * J->plane + blk * QC;
            ST(yo, finish8(a0, b0, J->relu));
            ST(yo + 8, finish8(a1, b0, J->relu));
            ST(yo + 16, finish8(a2, b0, J->relu));
            ST(yo + 24, finish8(a3, b0, J->relu));
        }
    }
}

/* Y [rows, OH, Wq, ld] -> samples m0 .. m0 + cnt of y [n, rows, OH / pool, OW / pool]
   (max over pool windows), output channels lo..hi. Per output row, sample by sample: the
   strided reads stay within the row (in L1), the writes are contiguous. */
static void unpack_output(conv_part *P, int64_t lo, int64_t hi) {
    const conv_job *J = P->J;
    const int64_t n = P->cnt, p = J->pool, PH = J->OH / p, PW = J->OW / p, ld = J->ld;
    const int64_t ystep = J->rows * PH * PW, rs = J->Wq * ld;
    float *y = J->y + P->m0 * ystep;
    for (int64_t o = lo; o < hi; o++) {
        const float *Yo = P->Y + o * J->plane;
        float *yo = y + o * PH * PW;
        for (int64_t py = 0; py < PH; py++) {
            const float *row = Yo + py * p * rs;
            if (ld == 1 && p == 1) {
                memcpy(yo + py * PW, row, sizeof(float) * (size_t)PW);
                continue;
            }
            for (int64_t m = 0; m < n; m++) {
                float *restrict dst = yo + m * ystep + py * PW;
                const float *src = row + m;
                if (p == 1) {
                    for (int64_t px = 0; px < PW; px++) dst[px] = src[px * ld];
                    continue;
                }
                for (int64_t px = 0; px < PW; px++) {
                    const float *s = src + px * p * ld;
                    float v = s[0];
                    for (int64_t dy = 0; dy < p; dy++)
                        for (int64_t dx = 0; dx < p; dx++) {
                            const float u = s[dy * rs + dx * ld];
                            v = u > v ? u : v;
                        }
                    dst[px] = v;
                }
            }
        }
    }
}

/* chunks lo..hi, each packed, computed and unpacked by this thread in its own X and Y */
static void run_chunks(conv_part *P, int64_t lo, int64_t hi) {
    const conv_job *J = P->J;
    for (int64_t i = lo; i < hi; i++) {
        P->m0 = i * J->chunk;
        P->cnt = J->n - P->m0 < J->chunk ? J->n - P->m0 : J->chunk;
        pack_input(P, 0, J->C);
        (J->algo ? compute_codebook : compute_weights)(P, 0, J->blocks);
        unpack_output(P, 0, J->rows);
    }
}

/* Input offset of every column (channel within the group c, tap t) of a row, relative to the
   group's first channel: one table per call, so that decoding a kept weight is a lookup (a
   running column index instead of a channel/tap cursor: no division, no data-dependent loop).
   The first channel's KH x KW taps are where the divisions are; each next channel is the
   previous one's offsets plus a channel of packed input. */
static void column_table(const conv_job *J, int64_t cols, int64_t *colofs) {
    const int64_t taps = J->KH * J->KW;
    for (int64_t t = 0; t < taps; t++) {
        const int64_t a = (t / J->KW) * J->dh, b = (t % J->KW) * J->dw;
        colofs[t] =
            ((((a % J->sh) * J->sw + b % J->sw) * J->Hq + a / J->sh) * J->Wq + b / J->sw) * J->ld;
    }
    for (int64_t col = taps; col < cols; col++) colofs[col] = colofs[col - taps] + J->chan;
}

/* base offset of row o's group of input channels */
static int64_t group_base(const conv_job *J, int64_t o) {
    return (o / (J->rows / J->groups)) * (J->C / J->groups) * J->chan;
}

/* Row o's kept weights: offsets and scaled weights (zero weights of dense-rows layers
   skipped, branch-free: the slot is written and kept only when non-zero); returns how many. */
static int64_t decode_row(const dsq_conv_layer *L, const conv_job *J, int64_t o, float scale,
                          int64_t *off, float *w) {
    const int64_t base = group_base(J, o);
    const int64_t *colofs = J->colofs;
    int64_t j = L->symptr[o], count = 0, col = -1;
    for (int64_t k = L->rowptr[o]; k < L->rowptr[o + 1]; k++) {
        if (L->gaps && L->gaps[k] == FILL) { col += FILL; continue; }
        col += L->gaps ? L->gaps[k] + 1 : 1;
        const float v = weight_of(L, j);
        j++;
        off[count] = base + colofs[col];
        w[count] = v * scale;
        count += v != 0.0f;
    }
    return count;
}

/* Row o's kept weights ordered by centroid (counting sort): offsets, and one segment per
   centroid used (its end, its scaled value) appended at segend/segval + *nseg. */
static int64_t decode_row_codebook(const dsq_conv_layer *L, const conv_job *J, int64_t o,
                                   float scale, int64_t e0, int64_t *off, int64_t *segend,
                                   float *segval, int64_t *nseg) {
    int64_t cnt[MAX_GROUP_CB + 1], fill[MAX_GROUP_CB];
    memset(cnt, 0, sizeof cnt);
    int64_t j = L->symptr[o], count = 0;
    for (int64_t k = L->rowptr[o]; k < L->rowptr[o + 1]; k++) {
        if (L->gaps && L->gaps[k] == FILL) continue;
        const int64_t s = symbol_of(L, j++);
        if (L->cb[s] != 0.0f) { cnt[s + 1]++; count++; }
    }
    for (int64_t s = 0; s < L->ncb; s++) {
        fill[s] = cnt[s];
        cnt[s + 1] += cnt[s];
    }
    const int64_t base = group_base(J, o);
    const int64_t *colofs = J->colofs;
    int64_t col = -1;
    j = L->symptr[o];
    for (int64_t k = L->rowptr[o]; k < L->rowptr[o + 1]; k++) {
        if (L->gaps && L->gaps[k] == FILL) { col += FILL; continue; }
        col += L->gaps ? L->gaps[k] + 1 : 1;
        const int64_t s = symbol_of(L, j++);
        if (L->cb[s] != 0.0f) off[fill[s]++] = base + colofs[col];
    }
    for (int64_t s = 0; s < L->ncb; s++)
        if (cnt[s + 1] > cnt[s]) {
            segend[*nseg] = e0 + cnt[s + 1];
            segval[*nseg] = L->cb[s] * scale;
            (*nseg)++;
        }
    return count;
}

/* The OpenMP version the library was compiled with (yyyymm), 0 when its threads are pthreads */
int dsq_conv_openmp(void) {
#ifdef _OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}

/* g = {C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, groups, pool, relu, threads, algo}
   (ng = 18); scale: NULL (nscale 0) or rows per-channel factors (a folded BatchNorm); x
   [n, C, H, W] (xlen floats), y [n, rows, OH / pool, OW / pool] (ylen floats). algo 0: weights,
   1: codebook (a codebook mode of at most 256 centroids). Returns 0 or a DSQ_E* code. */
int dsq_conv_sparse(const dsq_conv_layer *L, const int64_t *g, int64_t ng, const float *scale,
                    int64_t nscale, const float *x, int64_t xlen, float *y, int64_t ylen,
                    int64_t n) {
    if (!L || !g || ng != NGEOM || n < 0 || nscale < 0 || (nscale && !scale))
        return DSQ_CONV_EINVAL;
    if (!layer_ok(L)) return DSQ_CONV_EUNCHECKED;
    conv_job J;
    memset(&J, 0, sizeof J);
    J.C = g[0]; J.H = g[1]; J.W = g[2]; J.KH = g[3]; J.KW = g[4]; J.sh = g[5]; J.sw = g[6];
    J.ph = g[7]; J.pw = g[8]; J.dh = g[9]; J.dw = g[10]; J.OH = g[11]; J.OW = g[12];
    J.groups = g[13]; J.pool = g[14]; J.relu = g[15];
    const int64_t threads = g[16];
    J.algo = g[17];
    J.rows = L->rows;
    J.n = n;
    if (J.C < 1 || J.H < 1 || J.W < 1 || J.KH < 1 || J.KW < 1 || J.sh < 1 || J.sw < 1 ||
        J.ph < 0 || J.pw < 0 || J.dh < 1 || J.dw < 1 || J.OH < 1 || J.OW < 1 || J.groups < 1 ||
        J.pool < 1 || J.relu < 0 || J.relu > 1)
        return DSQ_CONV_EGEOMETRY;
    if (threads < 1 || threads > MAX_THREADS || J.algo < 0 || J.algo > 1) return DSQ_CONV_EINVAL;
    if (J.algo == 1 && (L->mode == 3 || L->ncb < 0 || L->ncb > MAX_GROUP_CB))
        return DSQ_CONV_EINVAL;
    if (J.C % J.groups || L->rows % J.groups) return DSQ_CONV_EGEOMETRY;
    int64_t t, taps, span_h, span_w, hp, wp, need_x, need_y;
    if (!mul_ok(J.C / J.groups, J.KH, &t) || !mul_ok(t, J.KW, &taps) || taps != L->cols)
        return DSQ_CONV_EGEOMETRY;
    if (!mul_ok(J.dh, J.KH - 1, &span_h) || !mul_ok(J.dw, J.KW - 1, &span_w) ||
        !mul_ok(J.ph, 2, &t) || !add_ok(J.H, t, &hp) || !mul_ok(J.pw, 2, &t) ||
        !add_ok(J.W, t, &wp))
        return DSQ_CONV_EGEOMETRY;
    const int64_t eh = hp - span_h - 1, ew = wp - span_w - 1;
    if (eh < 0 || ew < 0 || eh / J.sh + 1 != J.OH || ew / J.sw + 1 != J.OW)
        return DSQ_CONV_EGEOMETRY;
    const int64_t PH = J.OH / J.pool, PW = J.OW / J.pool;
    if (PH < 1 || PW < 1) return DSQ_CONV_EGEOMETRY;
    if (nscale && nscale != L->rows) return DSQ_CONV_ESIZE;
    if (!mul_ok(n, J.C, &t) || !mul_ok(t, J.H, &t) || !mul_ok(t, J.W, &need_x) || need_x != xlen)
        return DSQ_CONV_ESIZE;
    if (!mul_ok(n, L->rows, &t) || !mul_ok(t, PH, &t) || !mul_ok(t, PW, &need_y) ||
        need_y != ylen)
        return DSQ_CONV_ESIZE;
    if (n == 0) return DSQ_CONV_OK;
    if (!x || !y) return DSQ_CONV_EINVAL;

    /* layout: samples in chunks whose packed input stays in L2 (CHUNK_BYTES) */
    J.Hq = (hp - 1) / J.sh + 1;
    J.Wq = (wp - 1) / J.sw + 1;
    int64_t per_sample, run, xfl, yfl, nnz = L->symptr[L->rows], b_x, b_y, b_int, b_fl;
    if (!mul_ok(J.sh, J.sw, &t) || !mul_ok(t, J.Hq, &t) || !mul_ok(t, J.Wq, &t) ||
        !mul_ok(t, J.C, &per_sample) || per_sample > INT64_MAX / 8)
        return DSQ_CONV_ESIZE;
    {   /* bytes per sample of the packed input and of the output block, both in L2 */
        int64_t out_row, per;
        if (!mul_ok(L->rows, J.OH, &t) || !mul_ok(t, J.Wq, &out_row) ||
            !add_ok(per_sample, out_row, &per) || per > INT64_MAX / 8)
            return DSQ_CONV_ESIZE;
        J.chunk = CHUNK_BYTES / (4 * per);
        if (J.chunk >= 8) J.chunk = J.chunk / 8 * 8;
        if (J.chunk < 1) J.chunk = 1;
        if (J.chunk >= n) J.chunk = n;
    }
    J.nchunks = (n + J.chunk - 1) / J.chunk;
    J.ld = J.chunk < 8 ? J.chunk : (J.chunk + 7) / 8 * 8;
    if (J.ld >= 64 && J.ld % 64 == 0) J.ld += 8; /* rows 256 bytes apart share cache sets */
    J.q = J.algo ? QC : QW;
    if (!mul_ok(per_sample / J.C, J.ld, &J.chan) || !mul_ok(J.chan, J.C, &xfl) ||
        !add_ok(xfl, QMAX + 15, &xfl))
        return DSQ_CONV_ESIZE;
    xfl = xfl / 16 * 16; /* per-thread copies stay 64-byte aligned */
    /* q of the last output + 1: ((OH - 1) Wq + OW) ld, within X */
    if (!mul_ok(J.OH - 1, J.Wq, &t) || !add_ok(t, J.OW, &t) || !mul_ok(t, J.ld, &run))
        return DSQ_CONV_ESIZE;
    J.blocks = (run + J.q - 1) / J.q;
    if (!mul_ok(J.blocks, J.q, &J.plane) || !mul_ok(J.plane, L->rows, &yfl)) return DSQ_CONV_ESIZE;
    /* threads: one chunk each when there are enough chunks, else they share each chunk's
       blocks; one thread where the work does not pay for starting more (tens of us each) */
    int64_t work = INT64_MAX, nt = threads;
    if (mul_ok(nnz + L->rows, J.plane, &t) && mul_ok(t, J.nchunks, &t)) work = t;
    if (work < 400000) nt = 1;
    const int per_thread = nt > 1 && J.nchunks >= nt;
    const int64_t copies = per_thread ? nt : 1;
    if (!mul_ok(xfl, 4 * copies, &b_x) || !mul_ok(yfl, 4 * copies, &b_y) ||
        !add_ok(nnz, L->rows + 1, &t) || !mul_ok(t, (int64_t)sizeof(float), &b_fl) ||
        !mul_ok(t, 3, &t) || !add_ok(t, taps, &t) ||
        !mul_ok(t, (int64_t)sizeof(int64_t), &b_int))
        return DSQ_CONV_ESIZE;
    float *X = conv_scratch(0, b_x), *Y = conv_scratch(1, b_y);
    int64_t *ints = conv_scratch(2, b_int);
    float *floats = conv_scratch(3, b_fl);
    if (!X || !Y || !ints || !floats) return DSQ_CONV_ENOMEM;

    /* kept weights -> (offset, weight) row by row; codebook: by centroid, in segments */
    int64_t *rowptr = ints, *off = ints + L->rows + 1, *segptr = off + nnz;
    int64_t *segend = segptr + L->rows + 1, nseg = 0;
    int64_t *colofs = segend + nnz; /* cols (= taps) entries after the nnz segment ends */
    column_table(&J, taps, colofs);
    J.colofs = colofs;
    rowptr[0] = 0;
    segptr[0] = 0;
    for (int64_t o = 0; o < L->rows; o++) {
        const float sc = nscale ? scale[o] : 1.0f;
        const int64_t e0 = rowptr[o];
        rowptr[o + 1] = e0 + (J.algo ? decode_row_codebook(L, &J, o, sc, e0, off + e0, segend,
                                                           floats, &nseg)
                                     : decode_row(L, &J, o, sc, off + e0, floats + e0));
        segptr[o + 1] = nseg;
    }
    J.rowptr = rowptr;
    J.off = off;
    J.w = floats;
    J.segptr = segptr;
    J.segend = segend;
    J.segval = floats;
    J.x = x;
    J.y = y;
    J.bias = L->bias;

    conv_part parts[MAX_THREADS];
    for (int64_t i = 0; i < copies; i++) {
        parts[i].J = &J;
        parts[i].X = X + i * xfl;
        parts[i].Y = Y + i * yfl;
        parts[i].m0 = 0;
        parts[i].cnt = 0;
        /* the last block reads up to QMAX floats past the packed input */
        memset(parts[i].X + J.chan * J.C, 0, sizeof(float) * QMAX);
    }
    if (per_thread || nt == 1) {
        parallel_for(parts, 0, run_chunks, J.nchunks, nt, 1);
        return DSQ_CONV_OK;
    }
    for (int64_t i = 0; i < J.nchunks; i++) { /* few chunks: threads share each one */
        parts[0].m0 = i * J.chunk;
        parts[0].cnt = n - parts[0].m0 < J.chunk ? n - parts[0].m0 : J.chunk;
        parallel_for(parts, 1, pack_input, J.C, nt, J.C / (4 * nt));
        parallel_for(parts, 1, J.algo ? compute_codebook : compute_weights, J.blocks, nt,
                     J.blocks / (8 * nt));
        parallel_for(parts, 1, unpack_output, L->rows, nt, L->rows / (4 * nt));
    }
    return DSQ_CONV_OK;
}
