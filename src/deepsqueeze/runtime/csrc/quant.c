/* int8 layers: the uint8 input of an integer convolution / matrix product, in one pass.

   The int8 executors (deepsqueeze/runtime/executors/quantized.py, "int8-onednn") hand oneDNN's
   u8 x s8 kernels an NHWC uint8 tensor. Made with torch ops it took four passes over the
   activations (divide, round, clamp, cast) plus a layout copy, which cost more than the integer
   convolution saved; this does it in one pass, in the rounding the model computes with:

     q = clamp(nearbyint(x / scale) + zp, 0, qmax)

   (float32 division, round half to even, as torch.round(x / scale) in
   deepsqueeze.models.quantized.fake_quantize_input; NaN becomes 0, as the clamp in torch.)

   x is [n, c, hw] (NCHW, layout 0) or [n, hw, c] (NHWC, layout 1); out is [n, hw, c].

   Safety contract: counts non-negative and overflow-free, buffer lengths equal to n * c * hw,
   pointers non-NULL, 0 <= zp <= qmax <= 255, scale finite and positive; else a DSQ_E* code
   (the numbering of dsqkernel.c) before any memory is touched. */
#include <math.h>
#include <stdint.h>

enum { Q_OK = 0, Q_EINVAL = 1, Q_ESIZE = 4 };

static inline uint8_t q_one(float v, float scale, float zp, float qmax) {
    float r = nearbyintf(v / scale) + zp;
    if (!(r > 0.0f)) return 0; /* also NaN */
    if (r > qmax) r = qmax;
    return (uint8_t)r;
}

int dsq_quant_u8_nhwc(const float *x, int64_t x_len, int64_t n, int64_t c, int64_t hw,
                      int64_t layout, float scale, int64_t zp, int64_t qmax, uint8_t *out,
                      int64_t out_len) {
    int64_t plane, total;
    if (!x || !out || n < 0 || c < 1 || hw < 1 || (layout != 0 && layout != 1)) return Q_EINVAL;
    if (!(scale > 0.0f) || !isfinite(scale) || qmax < 1 || qmax > 255 || zp < 0 || zp > qmax)
        return Q_EINVAL;
    if (__builtin_mul_overflow(c, hw, &plane) || __builtin_mul_overflow(plane, n, &total))
        return Q_ESIZE;
    if (x_len != total || out_len != total) return Q_ESIZE;
    const float fz = (float)zp, fq = (float)qmax;
    if (layout == 1 || hw == 1 || c == 1) { /* same order in and out */
        for (int64_t i = 0; i < total; i++) out[i] = q_one(x[i], scale, fz, fq);
        return Q_OK;
    }
    for (int64_t b = 0; b < n; b++) { /* NCHW -> NHWC, blocks of 8 positions for locality */
        const float *xb = x + b * plane;
        uint8_t *ob = out + b * plane;
        for (int64_t p0 = 0; p0 < hw; p0 += 8) {
            int64_t p1 = p0 + 8 < hw ? p0 + 8 : hw;
            for (int64_t ch = 0; ch < c; ch++) {
                const float *src = xb + ch * hw;
                for (int64_t p = p0; p < p1; p++) ob[p * c + ch] = q_one(src[p], scale, fz, fq);
            }
        }
    }
    return Q_OK;
}
