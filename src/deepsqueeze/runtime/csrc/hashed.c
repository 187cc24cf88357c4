/* HashedNets kernels: a hashed layer run from its buckets alone, the index regenerated on the fly.

   The virtual weight is V[i, j] = sign(i, j) * buckets[bucket(i, j)] with
     bucket(i, j) = (xxh32(pack('<II', i, j), seed) * nbuckets) >> 32
     sign(i, j)   = top bit of xxh32(pack('<II', i, j), seed ^ SIGN_SALT) ? -1 : +1
   exactly as deepsqueeze/models/hashed.py defines it (checked against the xxhash package in
   tests/test_hashing.py). No index array and no dense matrix is ever held: each call hashes a
   tile of RB rows x TC columns into a small stack buffer and applies it to the whole batch.

   Every entry point checks its arguments (NULLs, counts, overflow-safe sizes against the buffer
   lengths it is given) before touching memory and returns 0 or a DSQ_E* code (kernel.py). */
#include <stdint.h>
#include <string.h>

enum { DSQ_HASHED_OK = 0, DSQ_HASHED_EINVAL = 1, DSQ_HASHED_ESIZE = 4 };

#define P2 2246822519u
#define P3 3266489917u
#define P4 668265263u
#define P5 374761393u
#define SIGN_SALT 0x5BD1E995u
#define MAX_BUCKETS 2147483647LL
#define MAX_INDEX 4294967295LL
#define RB 8   /* rows per tile */
#define TC 256 /* columns per tile */

static inline uint32_t rotl17(uint32_t a) { return (a << 17) | (a >> 15); }

/* state after the first lane (the row): shared by a whole row */
static inline uint32_t lane0(uint32_t seed, uint32_t i) {
    return rotl17(seed + P5 + 8u + i * P3) * P4;
}

static inline uint32_t finish(uint32_t acc, uint32_t j) {
    uint32_t h = rotl17(acc + j * P3) * P4;
    h ^= h >> 15;
    h *= P2;
    h ^= h >> 13;
    h *= P3;
    return h ^ (h >> 16);
}

static int mul_ok(int64_t a, int64_t b, int64_t *out) {
    return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out);
}

static int layer_args_ok(int64_t rows, int64_t cols, const float *buckets, int64_t nbuckets,
                         int64_t seed) {
    return rows >= 1 && cols >= 1 && rows <= MAX_INDEX && cols <= MAX_INDEX && buckets &&
           nbuckets >= 1 && nbuckets <= MAX_BUCKETS && seed >= 0 && seed <= MAX_INDEX;
}

/* out[k] = xxh32(pack('<II', pairs[2k], pairs[2k+1]), seed) for k < n */
int dsq_hashed_xxh32(const uint32_t *pairs, int64_t n, int64_t seed, uint32_t *out,
                     int64_t out_len) {
    if (!pairs || !out || n < 0 || seed < 0 || seed > MAX_INDEX) return DSQ_HASHED_EINVAL;
    if (out_len != n) return DSQ_HASHED_ESIZE;
    for (int64_t k = 0; k < n; k++)
        out[k] = finish(lane0((uint32_t)seed, pairs[2 * k]), pairs[2 * k + 1]);
    return DSQ_HASHED_OK;
}

/* the virtual weights V[i, c0 .. c0+nc-1] of row i into w[0 .. nc-1]: the two hashes in a
   branch-free loop over plain uint32 arrays (vectorized by the compiler), then the gather; the
   sign flips the float's sign bit */
static void row_weights(uint32_t seed, uint32_t i, int64_t c0, int nc, const float *buckets,
                        uint64_t nb, float *w) {
    uint32_t hb[TC], hs[TC];
    uint32_t ab = lane0(seed, i), as = lane0(seed ^ SIGN_SALT, i);
    uint32_t j0 = (uint32_t)c0;
    for (int c = 0; c < nc; c++) {
        hb[c] = finish(ab, j0 + (uint32_t)c);
        hs[c] = finish(as, j0 + (uint32_t)c) & 0x80000000u;
    }
    for (int c = 0; c < nc; c++) {
        uint32_t bits;
        float v = buckets[((uint64_t)hb[c] * nb) >> 32];
        memcpy(&bits, &v, sizeof bits);
        bits ^= hs[c];
        memcpy(&w[c], &bits, sizeof bits);
    }
}

/* sum_c a[c] * b[c] with 8 independent partial sums (vectorizable without reassociation) */
static inline float dot(const float *a, const float *b, int n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int c = 0;
    for (; c + 8 <= n; c += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[c + k] * b[c + k];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; c < n; c++) s += a[c] * b[c];
    return s;
}

/* y[r] += sum_c w[r * TC + c] * x[c] for the RB rows of a tile: each 8 inputs loaded once for
   all RB rows, RB x 8 partial sums (kept in vector registers) */
static inline void block_dot(const float *w, const float *x, int n, float *y) {
    float acc[RB][8];
    memset(acc, 0, sizeof acc);
    int c = 0;
    for (; c + 8 <= n; c += 8)
        for (int r = 0; r < RB; r++)
            for (int k = 0; k < 8; k++) acc[r][k] += w[r * TC + c + k] * x[c + k];
    for (int r = 0; r < RB; r++) {
        const float *a = acc[r];
        float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        for (int t = c; t < n; t++) s += w[r * TC + t] * x[t];
        y[r] += s;
    }
}

/* y[b, i] = bias[i] + sum_j V[i, j] x[b, j] for b < n; x is [n, cols], y is [n, rows] */
int dsq_hashed_linear(int64_t rows, int64_t cols, const float *buckets, int64_t nbuckets,
                      int64_t seed, const float *bias, const float *x, int64_t x_floats,
                      float *y, int64_t y_floats, int64_t n) {
    int64_t xs, ys;
    if (!layer_args_ok(rows, cols, buckets, nbuckets, seed) || n < 0) return DSQ_HASHED_EINVAL;
    if (!mul_ok(n, cols, &xs) || !mul_ok(n, rows, &ys) || xs != x_floats || ys != y_floats)
        return DSQ_HASHED_ESIZE;
    if (n == 0) return DSQ_HASHED_OK;
    if (!x || !y) return DSQ_HASHED_EINVAL;
    float w[RB * TC];
    for (int64_t b = 0; b < n; b++)
        for (int64_t i = 0; i < rows; i++) y[b * rows + i] = bias ? bias[i] : 0.0f;
    for (int64_t r0 = 0; r0 < rows; r0 += RB) {
        int nr = (int)(rows - r0 < RB ? rows - r0 : RB);
        for (int64_t c0 = 0; c0 < cols; c0 += TC) {
            int nc = (int)(cols - c0 < TC ? cols - c0 : TC);
            for (int r = 0; r < nr; r++)
                row_weights((uint32_t)seed, (uint32_t)(r0 + r), c0, nc, buckets,
                            (uint64_t)nbuckets, w + (int64_t)r * TC);
            for (int64_t b = 0; b < n; b++) {
                const float *xb = x + b * cols + c0;
                float *yb = y + b * rows + r0;
                if (nr == RB)
                    block_dot(w, xb, nc, yb);
                else
                    for (int r = 0; r < nr; r++) yb[r] += dot(w + (int64_t)r * TC, xb, nc);
            }
        }
    }
    return DSQ_HASHED_OK;
}

/* out[i * cols + j] = V[i, j]: the dense [rows, cols] virtual matrix */
int dsq_hashed_densify(int64_t rows, int64_t cols, const float *buckets, int64_t nbuckets,
                       int64_t seed, float *out, int64_t out_floats) {
    int64_t size;
    if (!layer_args_ok(rows, cols, buckets, nbuckets, seed) || !out) return DSQ_HASHED_EINVAL;
    if (!mul_ok(rows, cols, &size) || size != out_floats) return DSQ_HASHED_ESIZE;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t c0 = 0; c0 < cols; c0 += TC)
            row_weights((uint32_t)seed, (uint32_t)i, c0, (int)(cols - c0 < TC ? cols - c0 : TC),
                        buckets, (uint64_t)nbuckets, out + i * cols + c0);
    return DSQ_HASHED_OK;
}
