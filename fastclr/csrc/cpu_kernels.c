/* fastclr CPU kernels, five of them: the encoders' 2x2 max-pool + ReLU and the tutorial net's first block
 * (3x3 conv with one input channel -> 2x2 max-pool -> ReLU), forward and backward; and, for the fused
 * augmentation, the warp's grid + frame weight + bilinear sampling in one pass (warp_sample) and the
 * stroke-thickness max filter on the chosen samples only (thickness); and the colour jitter + random greyscale
 * in two passes per image (color_jitter).
 *
 * Built by fastclr/kernels.py on first use: cc -O3 -march=native -fopenmp -shared -fPIC.
 * Tensors are channels-last (N, H, W, C); C a multiple of 16, so one 16-float vector (GCC vector
 * extension: AVX-512 where the CPU has it) holds 16 channels of one pixel. bf16 is read and written as
 * the upper 16 bits of an f32 (round to nearest even on the way out); all arithmetic is f32.
 *
 * Why these are faster than ATen on a CPU (tests/test_kernels.py checks values and gradients against it):
 *  - the pool keeps the winning position as a uint8 (0..3) instead of an int64 index, and its backward
 *    writes every input gradient once (the 4 positions of each window) instead of zero-filling the
 *    input-sized gradient and scattering into it;
 *  - ReLU is folded into both passes (one read of the pooled values instead of three extra passes);
 *  - the first block never materialises the full-resolution conv output: each pooled pixel computes its
 *    four conv outputs from a 4x4 input patch in registers, keeps the maximum, and the backward
 *    accumulates the weight gradient from the same patch. oneDNN's kernels are poorly suited to a
 *    single input channel.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));
typedef uint8_t b16v __attribute__((vector_size(16)));

#define MAX_HW 64      /* conv kernel: largest image side (its padded copy lives on the stack) */
#define MAX_C 64       /* conv kernel: most output channels (its gradient accumulators live on the stack) */

static inline v16 ld_f32(const float* p) { v16 v; memcpy(&v, p, 64); return v; }
static inline void st_f32(float* p, v16 v) { memcpy(p, &v, 64); }
static inline v16 ld_bf16(const uint16_t* p) {
    h16v h; memcpy(&h, p, 32);
    u16v u = __builtin_convertvector(h, u16v) << 16;
    v16 f; memcpy(&f, &u, 64); return f;
}
static inline void st_bf16(uint16_t* p, v16 f) {
    u16v u; memcpy(&u, &f, 64);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;          /* round to nearest even (finite values) */
    h16v h = __builtin_convertvector(u, h16v); memcpy(p, &h, 32);
}
static inline v16 ld(const void* p, long off, int bf) { return bf ? ld_bf16((const uint16_t*)p + off) : ld_f32((const float*)p + off); }
static inline void st(void* p, long off, v16 v, int bf) { if (bf) st_bf16((uint16_t*)p + off, v); else st_f32((float*)p + off, v); }
static inline v16 sel(i16v m, v16 a, v16 b) { return (v16)(((i16v)a & m) | ((i16v)b & ~m)); }
static inline i16v seli(i16v m, i16v a, i16v b) { return (a & m) | (b & ~m); }
static inline void st_idx(uint8_t* p, i16v k) { b16v b = __builtin_convertvector(k, b16v); memcpy(p, &b, 16); }
static inline i16v ld_idx(const uint8_t* p) { b16v b; memcpy(&b, p, 16); return __builtin_convertvector(b, i16v); }

/* The first maximum of a 2x2 window in raster order (strict >), as PyTorch's max_pool2d picks it. */
static inline v16 argmax4(v16 a0, v16 a1, v16 a2, v16 a3, i16v* k) {
    i16v zero = {0}, id = zero;
    v16 m = a0;
    i16v g = a1 > m; m = sel(g, a1, m); id = seli(g, zero + 1, id);
    g = a2 > m;      m = sel(g, a2, m); id = seli(g, zero + 2, id);
    g = a3 > m;      m = sel(g, a3, m); id = seli(g, zero + 3, id);
    *k = id;
    return m;
}

/* ReLU's gradient mask and the pool's routing: the gradient of window position p (0..3) */
static inline v16 route(v16 g, i16v k, int p) { v16 zero = {0}; i16v z = {0}; return sel(k == z + p, g, zero); }

/* (x - mean) * inv_std with a one-pixel zero border: (H + 2) x (W + 2), row stride W + 2 */
static void pad_normalised(const float* x, int H, int W, float mean, float inv_std, float* xp) {
    int WP = W + 2;
    for (int q = 0; q < (H + 2) * WP; q++) xp[q] = 0.f;
    for (int y = 0; y < H; y++)
        for (int q = 0; q < W; q++) xp[(y + 1) * WP + q + 1] = (x[y * W + q] - mean) * inv_std;
}

/* 2x2 max-pool then ReLU. x (N, H, W, C) -> out (N, H/2, W/2, C), idx (N, H/2, W/2, C) window positions. */
/* Every 2x2 window of an (N, H, W, C) tensor, 16 channels at a time, in parallel over pooled rows: the body sees
 * i00 / i10, the window's top-left and bottom-left elements, o, the pooled element, and zero. */
#define FOR_EACH_POOL_WINDOW(...)                                                                              \
    int H2 = H / 2, W2 = W / 2;                                                                                \
    _Pragma("omp parallel for schedule(static)")                                                               \
    for (long r = 0; r < (long)N * H2; r++) {                                                                  \
        long n = r / H2, i = r % H2;                                                                           \
        v16 zero = {0};                                                                                        \
        for (int j = 0; j < W2; j++)                                                                           \
            for (int cb = 0; cb < C; cb += 16) {                                                               \
                long i00 = ((n * H + 2 * i) * W + 2 * j) * C + cb, i10 = i00 + (long)W * C;                   \
                long o = (r * W2 + j) * C + cb;                                                                \
                __VA_ARGS__                                                                                    \
            }                                                                                                  \
    }

void pool_relu_fwd(const void* x, int x_bf, int N, int H, int W, int C, void* out, int out_bf, uint8_t* idx) {
    FOR_EACH_POOL_WINDOW(
        i16v k;
        v16 m = argmax4(ld(x, i00, x_bf), ld(x, i00 + C, x_bf), ld(x, i10, x_bf), ld(x, i10 + C, x_bf), &k);
        st(out, o, sel(m > zero, m, zero), out_bf);
        st_idx(idx + o, k);
    )
}

/* Gradient of pool_relu_fwd: g, out, idx (N, H/2, W/2, C) -> gx (N, H, W, C), every element written. */
void pool_relu_bwd(const void* g, int g_bf, const void* out, int out_bf, const uint8_t* idx,
                   int N, int H, int W, int C, void* gx, int gx_bf) {
    FOR_EACH_POOL_WINDOW(
        v16 gv = ld(g, o, g_bf);
        gv = sel(ld(out, o, out_bf) > zero, gv, zero);
        i16v k = ld_idx(idx + o);
        st(gx, i00, route(gv, k, 0), gx_bf);
        st(gx, i00 + C, route(gv, k, 1), gx_bf);
        st(gx, i10, route(gv, k, 2), gx_bf);
        st(gx, i10 + C, route(gv, k, 3), gx_bf);
    )
}

/* conv 3x3 (one input channel, zero padding 1) of (x - mean) * inv_std, + bias, 2x2 max-pool, ReLU.
 * x (N, H, W) f32; taps (9, C) f32 (tap-major: row t holds every channel's weight for tap t); bias (C);
 * out (N, H/2, W/2, C); idx the same shape. */
int conv1_pool_relu_fwd(const float* x, int N, int H, int W, const float* taps, const float* bias, int C,
                        float mean, float inv_std, void* out, int out_bf, uint8_t* idx) {
    if (H > MAX_HW || W > MAX_HW || C % 16) return -1;
    int H2 = H / 2, W2 = W / 2, WP = W + 2;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float xp[(MAX_HW + 2) * (MAX_HW + 2)];
        pad_normalised(x + (long)n * H * W, H, W, mean, inv_std, xp);
        v16 zero = {0};
        for (int cb = 0; cb < C; cb += 16) {
            v16 w[9];
            for (int t = 0; t < 9; t++) w[t] = ld_f32(taps + t * C + cb);
            v16 b = ld_f32(bias + cb);
            for (int i = 0; i < H2; i++)
                for (int j = 0; j < W2; j++) {
                    const float* p = xp + 2 * i * WP + 2 * j;   /* top-left of the 4x4 patch */
                    v16 a0 = zero, a1 = zero, a2 = zero, a3 = zero;   /* the window's four conv outputs */
                    for (int ty = 0; ty < 3; ty++)
                        for (int tx = 0; tx < 3; tx++) {
                            v16 wv = w[ty * 3 + tx];
                            const float* q = p + ty * WP + tx;
                            a0 += wv * q[0]; a1 += wv * q[1]; a2 += wv * q[WP]; a3 += wv * q[WP + 1];
                        }
                    i16v k;
                    v16 m = argmax4(a0, a1, a2, a3, &k) + b;
                    long o = (((long)n * H2 + i) * W2 + j) * C + cb;
                    st(out, o, sel(m > zero, m, zero), out_bf);
                    st_idx(idx + o, k);
                }
        }
    }
    return 0;
}

/* Gradients of conv1_pool_relu_fwd w.r.t. taps and bias, as T partial sums (one per thread chunk of the
 * batch; the caller adds them): gtaps (T, 9, C), gbias (T, C). */
int conv1_pool_relu_bwd(const float* x, int N, int H, int W, int C, float mean, float inv_std,
                        const void* g, int g_bf, const void* out, int out_bf, const uint8_t* idx,
                        float* gtaps, float* gbias, int T) {
    if (H > MAX_HW || W > MAX_HW || C % 16 || C > MAX_C) return -1;
    int H2 = H / 2, W2 = W / 2, WP = W + 2, CB = C / 16;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        int n0 = (int)((long)N * t / T), n1 = (int)((long)N * (t + 1) / T);
        float xp[(MAX_HW + 2) * (MAX_HW + 2)];
        v16 zero = {0}, acc[MAX_C / 16][9], accb[MAX_C / 16];
        for (int cb = 0; cb < CB; cb++) {
            accb[cb] = zero;
            for (int q = 0; q < 9; q++) acc[cb][q] = zero;
        }
        for (int n = n0; n < n1; n++) {
            pad_normalised(x + (long)n * H * W, H, W, mean, inv_std, xp);
            for (int i = 0; i < H2; i++)
                for (int j = 0; j < W2; j++) {
                    const float* p = xp + 2 * i * WP + 2 * j;
                    for (int cb = 0; cb < CB; cb++) {
                        long o = (((long)n * H2 + i) * W2 + j) * C + cb * 16;
                        v16 gv = ld(g, o, g_bf);
                        gv = sel(ld(out, o, out_bf) > zero, gv, zero);
                        accb[cb] += gv;
                        i16v k = ld_idx(idx + o);
                        v16 g0 = route(gv, k, 0), g1 = route(gv, k, 1), g2 = route(gv, k, 2), g3 = route(gv, k, 3);
                        for (int ty = 0; ty < 3; ty++)
                            for (int tx = 0; tx < 3; tx++) {
                                const float* q = p + ty * WP + tx;
                                acc[cb][ty * 3 + tx] += g0 * q[0] + g1 * q[1] + g2 * q[WP] + g3 * q[WP + 1];
                            }
                    }
                }
        }
        for (int cb = 0; cb < CB; cb++) {
            for (int q = 0; q < 9; q++) st_f32(gtaps + ((long)t * 9 + q) * C + cb * 16, acc[cb][q]);
            st_f32(gbias + (long)t * C + cb * 16, accb[cb]);
        }
    }
    return 0;
}

/* FusedWarp's resampling (fastclr/warp.py) for 1-channel images: the sampling grid from its low-rank
 * form, the frame weight, and bilinear sampling (align_corners=True), in one pass per output row.
 *   grid_k[h, w] = sum_ij ybasis[h, i] core[b, k, i, j] xbasis[w, j]          k = 0 (x), 1 (y); grid units
 *   frame f point t = F[b, f, :, :2] @ grid + F[b, f, :, 2];   weight = prod over f and axes of
 *                     clamp(c + 1 - |t - c|, 0, 1), c = (n - 1) / 2 (cx for x, cy for y)
 *   out[b, h, w] = bilinear(x[b], grid) * weight     (border: coordinates clipped to the image; else zeros)
 * x (B, Hin, Win); core (B, 2, R, R); ybasis (H, R); xbasis_t (R, WP) transposed, zero-padded to WP = W rounded
 * up to a multiple of 16 (whole vectors: no scalar remainder loops); frames (B, NF, 2, 3); out (B, H, W). */
#define MAX_R 32
#define MAX_W 256
void warp_sample(const float* x, int B, int Hin, int Win, int H, int W, const float* core, int R,
                 const float* ybasis, const float* xbasis_t, const float* frames, int NF, float cx, float cy,
                 int border, float* out) {
    #pragma omp parallel for schedule(static)
    for (long bh = 0; bh < (long)B * H; bh++) {
        long b = bh / H; int h = (int)(bh % H);
        const float* img = x + b * Hin * Win;
        const float* cb = core + b * 2 * R * R;
        int WP = (W + 15) & ~15;
        float row[2][MAX_R], gx[MAX_W], gy[MAX_W], wt[MAX_W];
        for (int k = 0; k < 2; k++) {                    /* row_k[j] = sum_i ybasis[h, i] core[k, i, j] */
            for (int j = 0; j < R; j++) row[k][j] = 0.f;
            for (int i = 0; i < R; i++) {
                float yv = ybasis[h * R + i];
                const float* c = cb + (k * R + i) * R;
                for (int j = 0; j < R; j++) row[k][j] += yv * c[j];
            }
        }
        for (int w = 0; w < WP; w++) { gx[w] = 0.f; gy[w] = 0.f; wt[w] = 1.f; }
        for (int j = 0; j < R; j++) {                    /* w innermost: contiguous, vectorised */
            const float* xt = xbasis_t + j * WP;
            float r0 = row[0][j], r1 = row[1][j];
            for (int w = 0; w < WP; w++) { gx[w] += r0 * xt[w]; gy[w] += r1 * xt[w]; }
        }
        for (int f = 0; f < NF; f++) {
            const float* F = frames + (b * NF + f) * 6;
            for (int w = 0; w < WP; w++) {
                float tx = F[0] * gx[w] + F[1] * gy[w] + F[2], ty = F[3] * gx[w] + F[4] * gy[w] + F[5];
                float ax = cx + 1.f - __builtin_fabsf(tx - cx), ay = cy + 1.f - __builtin_fabsf(ty - cy);
                ax = ax < 0.f ? 0.f : (ax > 1.f ? 1.f : ax);
                ay = ay < 0.f ? 0.f : (ay > 1.f ? 1.f : ay);
                wt[w] *= ax * ay;
            }
        }
        float* o = out + bh * W;
        float lox = border ? 0.f : -2.f, hix = border ? (float)(Win - 1) : (float)Win + 1.f;   /* clip: border */
        float loy = border ? 0.f : -2.f, hiy = border ? (float)(Hin - 1) : (float)Hin + 1.f;   /* or far outside */
        int w = 0;
#ifdef __AVX512F__
        /* 16 pixels at a time: four gathers per vector (the auto-vectoriser leaves this loop scalar) */
        for (; w < W; w += 16) {
            __mmask16 live = W - w >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (W - w)) - 1);
            __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
            __m512 ix = _mm512_mul_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(live, gx + w), one), _mm512_set1_ps(0.5f * (float)(Win - 1)));
            __m512 iy = _mm512_mul_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(live, gy + w), one), _mm512_set1_ps(0.5f * (float)(Hin - 1)));
            ix = _mm512_min_ps(_mm512_max_ps(ix, _mm512_set1_ps(lox)), _mm512_set1_ps(hix));
            iy = _mm512_min_ps(_mm512_max_ps(iy, _mm512_set1_ps(loy)), _mm512_set1_ps(hiy));
            __m512 fx = _mm512_roundscale_ps(ix, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            __m512 fy = _mm512_roundscale_ps(iy, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            __m512 ex = _mm512_sub_ps(ix, fx), ey = _mm512_sub_ps(iy, fy);
            __m512i x0 = _mm512_cvttps_epi32(fx), y0 = _mm512_cvttps_epi32(fy);
            __m512i i1 = _mm512_set1_epi32(1), x1 = _mm512_add_epi32(x0, i1), y1 = _mm512_add_epi32(y0, i1);
            __m512i zi = _mm512_setzero_si512(), wmax = _mm512_set1_epi32(Win - 1), hmax = _mm512_set1_epi32(Hin - 1);
            __mmask16 vx0 = _mm512_cmpge_epi32_mask(x0, zi) & _mm512_cmple_epi32_mask(x0, wmax);
            __mmask16 vx1 = _mm512_cmpge_epi32_mask(x1, zi) & _mm512_cmple_epi32_mask(x1, wmax);
            __mmask16 vy0 = _mm512_cmpge_epi32_mask(y0, zi) & _mm512_cmple_epi32_mask(y0, hmax);
            __mmask16 vy1 = _mm512_cmpge_epi32_mask(y1, zi) & _mm512_cmple_epi32_mask(y1, hmax);
            __m512i win = _mm512_set1_epi32(Win);
            __m512i r0 = _mm512_mullo_epi32(y0, win), r1 = _mm512_mullo_epi32(y1, win);
            __m512 p00 = _mm512_mask_i32gather_ps(zero, live & vy0 & vx0, _mm512_add_epi32(r0, x0), img, 4);
            __m512 p01 = _mm512_mask_i32gather_ps(zero, live & vy0 & vx1, _mm512_add_epi32(r0, x1), img, 4);
            __m512 p10 = _mm512_mask_i32gather_ps(zero, live & vy1 & vx0, _mm512_add_epi32(r1, x0), img, 4);
            __m512 p11 = _mm512_mask_i32gather_ps(zero, live & vy1 & vx1, _mm512_add_epi32(r1, x1), img, 4);
            __m512 top = _mm512_fmadd_ps(ex, _mm512_sub_ps(p01, p00), p00);     /* (1 - ex) p00 + ex p01 */
            __m512 bot = _mm512_fmadd_ps(ex, _mm512_sub_ps(p11, p10), p10);
            __m512 v = _mm512_fmadd_ps(ey, _mm512_sub_ps(bot, top), top);
            _mm512_mask_storeu_ps(o + w, live, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(live, wt + w)));
        }
#endif
        for (; w < W; w++) {
            float ix = fminf(fmaxf((gx[w] + 1.f) * 0.5f * (float)(Win - 1), lox), hix);
            float iy = fminf(fmaxf((gy[w] + 1.f) * 0.5f * (float)(Hin - 1), loy), hiy);
            float fx = floorf(ix), fy = floorf(iy);
            int x0 = (int)fx, y0 = (int)fy, x1 = x0 + 1, y1 = y0 + 1;
            float ex = ix - fx, ey = iy - fy;
            float p00 = (y0 >= 0 && y0 < Hin && x0 >= 0 && x0 < Win) ? img[y0 * Win + x0] : 0.f;
            float p01 = (y0 >= 0 && y0 < Hin && x1 >= 0 && x1 < Win) ? img[y0 * Win + x1] : 0.f;
            float p10 = (y1 >= 0 && y1 < Hin && x0 >= 0 && x0 < Win) ? img[y1 * Win + x0] : 0.f;
            float p11 = (y1 >= 0 && y1 < Hin && x1 >= 0 && x1 < Win) ? img[y1 * Win + x1] : 0.f;
            float top = p00 + ex * (p01 - p00), bot = p10 + ex * (p11 - p10);
            o[w] = (top + ey * (bot - top)) * wt[w];
        }
    }
}

/* RandomThickness (fastclr/augment.py): per sample, s = +1 dilates (3x3 max filter), s = -1 erodes
 * (-max(-x)), s = 0 copies; edges replicate (a max over the in-bounds neighbours). x, out (B, H, W). */
void thickness(const float* x, int B, int H, int W, const float* s, float* out) {
    #pragma omp parallel for schedule(static)
    for (long bh = 0; bh < (long)B * H; bh++) {
        long b = bh / H; int h = (int)(bh % H);
        const float* img = x + b * H * W;
        float* o = out + bh * W;
        float sg = s[b], r[MAX_W];
        if (sg == 0.f) { memcpy(o, img + h * W, sizeof(float) * W); continue; }
        int h0 = h > 0 ? h - 1 : 0, h1 = h < H - 1 ? h + 1 : H - 1;
        for (int w = 0; w < W; w++) r[w] = sg * img[h0 * W + w];           /* vertical max of s * x */
        for (int y = h0 + 1; y <= h1; y++)
            for (int w = 0; w < W; w++) r[w] = fmaxf(r[w], sg * img[y * W + w]);
        for (int w = 0; w < W; w++) {                                       /* horizontal max */
            float m = r[w];
            if (w > 0) m = fmaxf(m, r[w - 1]);
            if (w < W - 1) m = fmaxf(m, r[w + 1]);
            o[w] = sg * m;
        }
    }
}

/* RandomColor (fastclr/color.py): Kornia's ColorJitter (brightness, contrast, saturation, hue, in that order,
 * each clamped to [0, 1]) then RandomGrayscale, per sample. x, out (B, C, H, W) float, C 1 or 3; prm (B, 6):
 * jittered (0/1), brightness, contrast, saturation, hue shift in turns, greyscale (0/1).
 * Two passes over each image instead of a dozen over the batch: the first only sums the brightened image's luma
 * (the contrast blends with its mean), the second does every step on each pixel in registers. One image is a
 * few KB, so the second pass reads it from cache. Hue: the pixel's hue is shifted in sextant units and the RGB
 * rebuilt as v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6 for n = 5, 3, 1, which is the
 * hsv -> rgb table row by row without a branch per sextant. */
#define LUMA(r, g, b) (0.299f * (r) + 0.587f * (g) + 0.114f * (b))
/* selects, not fminf / fmaxf: GCC vectorises these (fminf's NaN rules keep it scalar); NaN passes through, as
 * in torch.clamp */
static inline float clamp01(float v) { v = v < 0.f ? 0.f : v; return v > 1.f ? 1.f : v; }
static inline float max2(float a, float b) { return a > b ? a : b; }
static inline float min2(float a, float b) { return a < b ? a : b; }

static inline float hue_channel(float n, float six, float v, float vs) {
    float k = n + six;
    k = k >= 6.f ? k - 6.f : k;
    return v - vs * clamp01(min2(k, 4.f - k));
}

/* One image's pixels, every step in registers; `omp simd` lets GCC vectorise the loop across pixels, the
 * selects becoming masks. */
static void color_pixels(const float* restrict R, const float* restrict G, const float* restrict Bc, float* restrict oR,
                         float* restrict oG, float* restrict oB, int HW,
                         float fb, float fc, float m, float fs, float fh, int hue, int grey) {
    #pragma omp simd
    for (int i = 0; i < HW; i++) {
        float r = clamp01(clamp01(R[i] * fb) * fc + m);
        float g = clamp01(clamp01(G[i] * fb) * fc + m);
        float bl = clamp01(clamp01(Bc[i] * fb) * fc + m);
        float l = (1.f - fs) * LUMA(r, g, bl);
        r = clamp01(l + fs * r); g = clamp01(l + fs * g); bl = clamp01(l + fs * bl);
        if (hue) {
            float v = max2(r, max2(g, bl)), d = v - min2(r, min2(g, bl));
            float s = v == 0.f ? 0.f : d / (v + 1e-8f), dd = d == 0.f ? 1.f : d;
            float h = (r >= g && r >= bl) ? (g - bl) : (g >= bl ? (bl - r) + 2.f * dd : (r - g) + 4.f * dd);
            float turns = h / dd * (1.f / 6.f) + fh;          /* the shifted hue, in turns */
            turns += turns < 0.f ? 1.f : 0.f;             /* in [-2/3, 4/3): mod 1 by two selects */
            turns -= turns >= 1.f ? 1.f : 0.f;
            float six = turns * 6.f, vs = v * s;
            r = hue_channel(5.f, six, v, vs); g = hue_channel(3.f, six, v, vs); bl = hue_channel(1.f, six, v, vs);
        }
        if (grey) r = g = bl = LUMA(r, g, bl);
        oR[i] = r; oG[i] = g; oB[i] = bl;
    }
}

void color_jitter(const float* x, int B, int C, int HW, const float* prm, float* out) {
    #pragma omp parallel for schedule(static)
    for (long b = 0; b < B; b++) {
        const float* p = prm + 6 * b;
        const float* xi = x + b * C * HW;
        float* o = out + b * C * HW;
        int on = p[0] > 0.5f, grey = p[5] > 0.5f && C == 3;
        float fb = p[1], fc = p[2], fs = p[3], fh = p[4];
        if (!on && !grey) { memcpy(o, xi, sizeof(float) * C * HW); continue; }
        if (C == 1) {                             /* brightness and contrast only (saturation, hue refused) */
            float sum = 0.f;
            #pragma omp simd reduction(+:sum)
            for (int i = 0; i < HW; i++) sum += clamp01(xi[i] * fb);
            float m = sum / HW * (1.f - fc);
            #pragma omp simd
            for (int i = 0; i < HW; i++) o[i] = clamp01(clamp01(xi[i] * fb) * fc + m);
            continue;
        }
        const float *R = xi, *G = xi + HW, *Bc = xi + 2 * HW;
        if (!on) {                                /* greyscale only: the jitter's neutral factors */
            color_pixels(R, G, Bc, o, o + HW, o + 2 * HW, HW, 1.f, 1.f, 0.f, 1.f, 0.f, 0, 1);
            continue;
        }
        float sum = 0.f;
        #pragma omp simd reduction(+:sum)
        for (int i = 0; i < HW; i++) sum += LUMA(clamp01(R[i] * fb), clamp01(G[i] * fb), clamp01(Bc[i] * fb));
        float m = sum / HW * (1.f - fc);
        color_pixels(R, G, Bc, o, o + HW, o + 2 * HW, HW, fb, fc, m, fs, fh, fh != 0.f, grey);
    }
}

/* The OpenMP team every kernel's parallel loop uses: fastclr/kernels.py sets it to torch.get_num_threads()
 * before each call, so the kernels follow torch.set_num_threads whichever libgomp this library bound to. */
void set_threads(int n) { if (n > 0) omp_set_num_threads(n); }

int team_size(void) {
    int t = 0;
    #pragma omp parallel
    {
        #pragma omp single
        t = omp_get_num_threads();
    }
    return t;
}
