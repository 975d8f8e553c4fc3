/* fastclr CPU kernels: the encoders' 2x2 max-pool + ReLU, the tutorial net's first block (3x3 conv with one
 * input channel -> 2x2 max-pool -> ReLU) and the cnn's training-mode BatchNorm -> pool -> ReLU (bn_act), forward
 * and backward, the cnn's first stage whole (stem: conv of a few input channels -> BN -> pool -> ReLU), and its other
 * 3x3 convs' weight gradient (conv3x3_wgrad, and in f32 the whole conv by Winograd's algorithm); and, for the fused
 * augmentation, the warp's grid + frame weight + bilinear sampling in one pass
 * (warp_sample), the stroke-thickness max filter on the chosen samples only (thickness), the 3-tap blur
 * (blur3) and the colour jitter + random greyscale in two passes per image (color_jitter).
 *
 * Built by fastclr/kernels.py on first use: cc -O3 -march=native -fopenmp -shared -fPIC.
 * Tensors are channels-last (N, H, W, C); C a multiple of 16, so whole vectors (GCC vector extension) hold
 * channels of one pixel: 16 (v16), or the CPU's own width (vf: 16 with AVX-512, else 8; see VL). bf16 is read and
 * written as the upper 16 bits of an f32 (round to nearest even on the way out); all arithmetic is f32.
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
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));
typedef uint8_t b16v __attribute__((vector_size(16)));

/* The native vector: one register of VL floats. The memory-bound kernels (bn_act, pool_relu), which run in every CPU
 * training step, the colour jitter and the tutorial net's first block use it. Why not 16 lanes everywhere: without
 * AVX-512, GCC lowers a 16-lane vector's arithmetic to two registers but each of its comparisons to 16 scalar
 * compares and branches (bn_act's forward ran at ~3 GB/s on a Zen 3, a tenth of its memory bandwidth). The stem and
 * the weight-gradient kernels, whose data layouts are built around 16 lanes, run fast only with AVX512-BF16 and keep
 * the 16-lane type. */
#ifdef __AVX512F__
#define VL 16
typedef v16 vf; typedef i16v vi; typedef u16v vu; typedef h16v vh; typedef b16v vb;
#else
#define VL 8
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));
typedef uint8_t vb __attribute__((vector_size(8)));
#endif

#define MAX_HW 64      /* conv kernel: largest image side (its padded copy lives on the stack) */
#define MAX_C 64       /* conv kernel: most output channels (its gradient accumulators live on the stack) */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* The element-wise helpers, written once for a vector type V of floats (I, U: as many int32 and uint32 lanes; H:
 * uint16; B: uint8), their names prefixed with P: instantiated for v16 (no prefix) and for the native vf (prefix n).
 * bf16 is read and written as the upper 16 bits of an f32 (round to nearest even on the way out). */
#define VECTOR_OPS(P, V, I, U, H, B)                                                                              \
static inline V P##ld_f32(const float* p) { V v; memcpy(&v, p, sizeof v); return v; }                           \
static inline void P##st_f32(float* p, V v) { memcpy(p, &v, sizeof v); }                                          \
static inline V P##ld_bf16(const uint16_t* p) {                                                                   \
    H h; memcpy(&h, p, sizeof h);                                                                                 \
    U u = __builtin_convertvector(h, U) << 16;                                                                    \
    V f; memcpy(&f, &u, sizeof f); return f;                                                                      \
}                                                                                                                 \
static inline void P##st_bf16(uint16_t* p, V f) {                                                                 \
    U u; memcpy(&u, &f, sizeof u);                                                                                \
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;          /* round to nearest even (finite values) */              \
    H h = __builtin_convertvector(u, H); memcpy(p, &h, sizeof h);                                                 \
}                                                                                                                 \
/* f rounded to bf16 and widened back (integer ops) */                                                            \
static inline V P##round_bf16_int(V f) {                                                                          \
    U u; memcpy(&u, &f, sizeof u);                                                                                \
    u = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16;                                                           \
    V r; memcpy(&r, &u, sizeof r); return r;                                                                      \
}                                                                                                                 \
static inline V P##ld(const void* p, long off, int bf) {                                                          \
    return bf ? P##ld_bf16((const uint16_t*)p + off) : P##ld_f32((const float*)p + off);                          \
}                                                                                                                 \
static inline void P##st(void* p, long off, V v, int bf) {                                                        \
    if (bf) P##st_bf16((uint16_t*)p + off, v); else P##st_f32((float*)p + off, v);                                \
}                                                                                                                 \
static inline V P##sel(I m, V a, V b) { return (V)(((I)a & m) | ((I)b & ~m)); }                                  \
static inline I P##seli(I m, I a, I b) { return (a & m) | (b & ~m); }                                             \
static inline void P##st_idx(uint8_t* p, I k) { B b = __builtin_convertvector(k, B); memcpy(p, &b, sizeof b); }   \
static inline I P##ld_idx(const uint8_t* p) { B b; memcpy(&b, p, sizeof b); return __builtin_convertvector(b, I); } \
static inline V P##relu(V v) { V zero = {0}; return P##sel(v > zero, v, zero); }                                  \
/* The first maximum of a 2x2 window in raster order (strict >), as PyTorch's max_pool2d picks it. */            \
static inline V P##argmax4(V a0, V a1, V a2, V a3, I* k) {                                                        \
    I zero = {0}, id = zero;                                                                                      \
    V m = a0;                                                                                                     \
    I g = a1 > m; m = P##sel(g, a1, m); id = P##seli(g, zero + 1, id);                                            \
    g = a2 > m;   m = P##sel(g, a2, m); id = P##seli(g, zero + 2, id);                                            \
    g = a3 > m;   m = P##sel(g, a3, m); id = P##seli(g, zero + 3, id);                                            \
    *k = id;                                                                                                      \
    return m;                                                                                                     \
}                                                                                                                 \
/* ReLU's gradient mask and the pool's routing: the gradient of window position p (0..3) */                      \
static inline V P##route(V g, I k, int p) { V zero = {0}; I z = {0}; return P##sel(k == z + p, g, zero); }        \
/* bn_act's mode-1 window (see there): relu(max z) out; into idx the choice (0..3, or 4 where the ReLU gives 0),   \
 * into ymax the chosen element's y */                                                                            \
ALWAYS_INLINE V P##maxpool_relu_window(V y0, V y1, V y2, V y3, V z0, V z1, V z2, V z3, uint8_t* idx, V* ymax) {   \
    I k, four = {0}; four += 4;                                                                                   \
    V m = P##argmax4(z0, z1, z2, z3, &k), zero = {0};                                                             \
    P##st_idx(idx, P##seli(m > zero, k, four));                                                                   \
    V yk = P##sel(k == four - 3, y1, y0);                                                                         \
    yk = P##sel(k == four - 2, y2, yk);                                                                           \
    *ymax = P##sel(k == four - 1, y3, yk);                                                                        \
    return P##relu(m);                                                                                            \
}

VECTOR_OPS(, v16, i16v, u16v, h16v, b16v)
VECTOR_OPS(n, vf, vi, vu, vh, vb)

/* v rounded to bf16 and widened back */
static inline v16 round_bf16(v16 f) {
#ifdef __AVX512BF16__
    /* one instruction (round to nearest even) instead of five integer ones */
    __m256i h = (__m256i)_mm512_cvtneps_pbh((__m512)f);
    return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#else
    return round_bf16_int(f);
#endif
}
static inline vf nround_bf16(vf f) {
#if VL == 16
    return round_bf16(f);
#else
    return nround_bf16_int(f);
#endif
}
static inline vf nrnd(vf v, int bf) { return bf ? nround_bf16(v) : v; }

/* (x - mean) * inv_std with a one-pixel zero border: (H + 2) x (W + 2), row stride W + 2 */
static void pad_normalised(const float* x, int H, int W, float mean, float inv_std, float* xp) {
    int WP = W + 2;
    for (int q = 0; q < (H + 2) * WP; q++) xp[q] = 0.f;
    for (int y = 0; y < H; y++)
        for (int q = 0; q < W; q++) xp[(y + 1) * WP + q + 1] = (x[y * W + q] - mean) * inv_std;
}

/* 2x2 max-pool then ReLU. x (N, H, W, C) -> out (N, H/2, W/2, C), idx (N, H/2, W/2, C) window positions. */
/* Every 2x2 window of an (N, H, W, C) tensor, VL channels at a time, in parallel over pooled rows: the body sees
 * i00 / i10, the window's top-left and bottom-left elements, and o, the pooled element. */
#define FOR_EACH_POOL_WINDOW(...)                                                                              \
    int H2 = H / 2, W2 = W / 2;                                                                                \
    _Pragma("omp parallel for schedule(static)")                                                               \
    for (long r = 0; r < (long)N * H2; r++) {                                                                  \
        long n = r / H2, i = r % H2;                                                                           \
        for (int j = 0; j < W2; j++)                                                                           \
            for (int cb = 0; cb < C; cb += VL) {                                                               \
                long i00 = ((n * H + 2 * i) * W + 2 * j) * C + cb, i10 = i00 + (long)W * C;                   \
                long o = (r * W2 + j) * C + cb;                                                                \
                __VA_ARGS__                                                                                    \
            }                                                                                                  \
    }

void pool_relu_fwd(const void* x, int x_bf, int N, int H, int W, int C, void* out, int out_bf, uint8_t* idx) {
    FOR_EACH_POOL_WINDOW(
        vi k;
        vf m = nargmax4(nld(x, i00, x_bf), nld(x, i00 + C, x_bf), nld(x, i10, x_bf), nld(x, i10 + C, x_bf), &k);
        nst(out, o, nrelu(m), out_bf);
        nst_idx(idx + o, k);
    )
}

/* Gradient of pool_relu_fwd: g, out, idx (N, H/2, W/2, C) -> gx (N, H, W, C), every element written. */
void pool_relu_bwd(const void* g, int g_bf, const void* out, int out_bf, const uint8_t* idx,
                   int N, int H, int W, int C, void* gx, int gx_bf) {
    FOR_EACH_POOL_WINDOW(
        vf zero = {0}, gv = nld(g, o, g_bf);
        gv = nsel(nld(out, o, out_bf) > zero, gv, zero);
        vi k = nld_idx(idx + o);
        nst(gx, i00, nroute(gv, k, 0), gx_bf);
        nst(gx, i00 + C, nroute(gv, k, 1), gx_bf);
        nst(gx, i10, nroute(gv, k, 2), gx_bf);
        nst(gx, i10 + C, nroute(gv, k, 3), gx_bf);
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
        vf zero = {0};
        for (int cb = 0; cb < C; cb += VL) {
            vf w[9];
            for (int t = 0; t < 9; t++) w[t] = nld_f32(taps + t * C + cb);
            vf b = nld_f32(bias + cb);
            for (int i = 0; i < H2; i++)
                for (int j = 0; j < W2; j++) {
                    const float* p = xp + 2 * i * WP + 2 * j;   /* top-left of the 4x4 patch */
                    vf a0 = zero, a1 = zero, a2 = zero, a3 = zero;   /* the window's four conv outputs */
                    for (int ty = 0; ty < 3; ty++)
                        for (int tx = 0; tx < 3; tx++) {
                            vf wv = w[ty * 3 + tx];
                            const float* q = p + ty * WP + tx;
                            a0 += wv * q[0]; a1 += wv * q[1]; a2 += wv * q[WP]; a3 += wv * q[WP + 1];
                        }
                    vi k;
                    vf m = nargmax4(a0, a1, a2, a3, &k) + b;
                    long o = (((long)n * H2 + i) * W2 + j) * C + cb;
                    nst(out, o, nrelu(m), out_bf);
                    nst_idx(idx + o, k);
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
    int H2 = H / 2, W2 = W / 2, WP = W + 2, CB = C / VL;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        int n0 = (int)((long)N * t / T), n1 = (int)((long)N * (t + 1) / T);
        float xp[(MAX_HW + 2) * (MAX_HW + 2)];
        vf zero = {0}, acc[MAX_C / VL][9], accb[MAX_C / VL];
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
                        long o = (((long)n * H2 + i) * W2 + j) * C + cb * VL;
                        vf gv = nld(g, o, g_bf);
                        gv = nsel(nld(out, o, out_bf) > zero, gv, zero);
                        accb[cb] += gv;
                        vi k = nld_idx(idx + o);
                        vf g0 = nroute(gv, k, 0), g1 = nroute(gv, k, 1), g2 = nroute(gv, k, 2), g3 = nroute(gv, k, 3);
                        for (int ty = 0; ty < 3; ty++)
                            for (int tx = 0; tx < 3; tx++) {
                                const float* q = p + ty * WP + tx;
                                acc[cb][ty * 3 + tx] += g0 * q[0] + g1 * q[1] + g2 * q[WP] + g3 * q[WP + 1];
                            }
                    }
                }
        }
        for (int cb = 0; cb < CB; cb++) {
            for (int q = 0; q < 9; q++) nst_f32(gtaps + ((long)t * 9 + q) * C + cb * VL, acc[cb][q]);
            nst_f32(gbias + (long)t * C + cb * VL, accb[cb]);
        }
    }
    return 0;
}

/* FusedWarp's resampling (fastclr/warp.py): the sampling grid from its low-rank form, the frame weight, and
 * bilinear sampling (align_corners=True), in one pass per output row; the row's grid, weight and gather indices
 * serve all C channels (building the grid costs more than sampling one channel).
 *   grid_k[h, w] = sum_ij ybasis[h, i] core[b, k, i, j] xbasis[w, j]          k = 0 (x), 1 (y); grid units
 *   frame f point t = F[b, f, :, :2] @ grid + F[b, f, :, 2];   weight = prod over f and axes of
 *                     clamp(c + 1 - |t - c|, 0, 1), c = (n - 1) / 2 (cx for x, cy for y)
 *   out[b, c, h, w] = bilinear(x[b, c], grid) * weight     (border: coordinates clipped to the image; else zeros)
 * x (B, C, Hin, Win); core (B, 2, R, R); ybasis (H, R); xbasis_t (R, WP) transposed, zero-padded to WP = W
 * rounded up to a multiple of 16 (whole vectors: no scalar remainder loops); frames (B, NF, 2, 3);
 * out (B, C, H, W). */
#define MAX_R 32
#define MAX_W 256
void warp_sample(const float* x, int B, int C, int Hin, int Win, int H, int W, const float* core, int R,
                 const float* ybasis, const float* xbasis_t, const float* frames, int NF, float cx, float cy,
                 int border, float* out) {
    #pragma omp parallel for schedule(static)
    for (long bh = 0; bh < (long)B * H; bh++) {
        long b = bh / H; int h = (int)(bh % H);
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
        float lox = border ? 0.f : -2.f, hix = border ? (float)(Win - 1) : (float)Win + 1.f;   /* clip: border */
        float loy = border ? 0.f : -2.f, hiy = border ? (float)(Hin - 1) : (float)Hin + 1.f;   /* or far outside */
        int w = 0;
#ifdef __AVX512F__
        if (border && Win >= 2 && Hin >= 2) {
            /* Clipped to the image, every stencil lies inside it once its corner is kept at least one pixel from
             * the last row and column (x0 = min(floor(ix), Win - 2), ex = ix - x0: 1 at the last column, the same
             * value). Then each row's two neighbours are one 64-bit element: two 8-lane gathers of pairs per row
             * and 16 pixels, which take about half the time of 16-lane gathers of single values, and no masks. */
            const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
            const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
            for (; w < W; w += 16) {
                __mmask16 live = W - w >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (W - w)) - 1);
                __m512 one = _mm512_set1_ps(1.f);
                __m512 ix = _mm512_mul_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(live, gx + w), one), _mm512_set1_ps(0.5f * (float)(Win - 1)));
                __m512 iy = _mm512_mul_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(live, gy + w), one), _mm512_set1_ps(0.5f * (float)(Hin - 1)));
                ix = _mm512_min_ps(_mm512_max_ps(ix, _mm512_setzero_ps()), _mm512_set1_ps((float)(Win - 1)));
                iy = _mm512_min_ps(_mm512_max_ps(iy, _mm512_setzero_ps()), _mm512_set1_ps((float)(Hin - 1)));
                __m512 fx = _mm512_min_ps(_mm512_roundscale_ps(ix, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), _mm512_set1_ps((float)(Win - 2)));
                __m512 fy = _mm512_min_ps(_mm512_roundscale_ps(iy, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), _mm512_set1_ps((float)(Hin - 2)));
                __m512 ex = _mm512_sub_ps(ix, fx), ey = _mm512_sub_ps(iy, fy);
                __m512i a = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_cvttps_epi32(fy), _mm512_set1_epi32(Win)), _mm512_cvttps_epi32(fx));
                a = _mm512_maskz_mov_epi32(live, a);                  /* the dead lanes read pixel 0 */
                __m256i alo = _mm512_castsi512_si256(a), ahi = _mm512_extracti64x4_epi64(a, 1);
                __m512 wv = _mm512_maskz_loadu_ps(live, wt + w);
                for (int c = 0; c < C; c++) {
                    const float* img = x + (b * C + c) * (long)Hin * Win;
                    __m512 t0 = _mm512_castpd_ps(_mm512_i32gather_pd(alo, img, 4));
                    __m512 t1 = _mm512_castpd_ps(_mm512_i32gather_pd(ahi, img, 4));
                    __m512 u0 = _mm512_castpd_ps(_mm512_i32gather_pd(alo, img + Win, 4));
                    __m512 u1 = _mm512_castpd_ps(_mm512_i32gather_pd(ahi, img + Win, 4));
                    __m512 p00 = _mm512_permutex2var_ps(t0, even, t1), p01 = _mm512_permutex2var_ps(t0, odd, t1);
                    __m512 p10 = _mm512_permutex2var_ps(u0, even, u1), p11 = _mm512_permutex2var_ps(u0, odd, u1);
                    __m512 top = _mm512_fmadd_ps(ex, _mm512_sub_ps(p01, p00), p00);
                    __m512 bot = _mm512_fmadd_ps(ex, _mm512_sub_ps(p11, p10), p10);
                    __m512 v = _mm512_fmadd_ps(ey, _mm512_sub_ps(bot, top), top);
                    _mm512_mask_storeu_ps(out + ((b * C + c) * (long)H + h) * W + w, live, _mm512_mul_ps(v, wv));
                }
            }
        }
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
            __m512i a00 = _mm512_add_epi32(r0, x0), a01 = _mm512_add_epi32(r0, x1);
            __m512i a10 = _mm512_add_epi32(r1, x0), a11 = _mm512_add_epi32(r1, x1);
            __m512 wv = _mm512_maskz_loadu_ps(live, wt + w);
            for (int c = 0; c < C; c++) {
                const float* img = x + (b * C + c) * (long)Hin * Win;
                __m512 p00 = _mm512_mask_i32gather_ps(zero, live & vy0 & vx0, a00, img, 4);
                __m512 p01 = _mm512_mask_i32gather_ps(zero, live & vy0 & vx1, a01, img, 4);
                __m512 p10 = _mm512_mask_i32gather_ps(zero, live & vy1 & vx0, a10, img, 4);
                __m512 p11 = _mm512_mask_i32gather_ps(zero, live & vy1 & vx1, a11, img, 4);
                __m512 top = _mm512_fmadd_ps(ex, _mm512_sub_ps(p01, p00), p00);     /* (1 - ex) p00 + ex p01 */
                __m512 bot = _mm512_fmadd_ps(ex, _mm512_sub_ps(p11, p10), p10);
                __m512 v = _mm512_fmadd_ps(ey, _mm512_sub_ps(bot, top), top);
                _mm512_mask_storeu_ps(out + ((b * C + c) * (long)H + h) * W + w, live, _mm512_mul_ps(v, wv));
            }
        }
#elif defined(__AVX2__)
        /* the same 8 pixels at a time (AVX2 has gathers, not mask registers: the masks are lanes of all ones) */
        for (; w + 8 <= W; w += 8) {
            __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f);
            __m256 ix = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(gx + w), one), _mm256_set1_ps(0.5f * (float)(Win - 1)));
            __m256 iy = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(gy + w), one), _mm256_set1_ps(0.5f * (float)(Hin - 1)));
            ix = _mm256_min_ps(_mm256_max_ps(ix, _mm256_set1_ps(lox)), _mm256_set1_ps(hix));
            iy = _mm256_min_ps(_mm256_max_ps(iy, _mm256_set1_ps(loy)), _mm256_set1_ps(hiy));
            __m256 fx = _mm256_floor_ps(ix), fy = _mm256_floor_ps(iy);
            __m256 ex = _mm256_sub_ps(ix, fx), ey = _mm256_sub_ps(iy, fy);
            __m256i x0 = _mm256_cvttps_epi32(fx), y0 = _mm256_cvttps_epi32(fy);
            __m256i i1 = _mm256_set1_epi32(1), x1 = _mm256_add_epi32(x0, i1), y1 = _mm256_add_epi32(y0, i1);
            __m256i lo = _mm256_set1_epi32(-1), wend = _mm256_set1_epi32(Win), hend = _mm256_set1_epi32(Hin);
            /* in range: -1 < i < n */
            __m256i vx0 = _mm256_and_si256(_mm256_cmpgt_epi32(x0, lo), _mm256_cmpgt_epi32(wend, x0));
            __m256i vx1 = _mm256_and_si256(_mm256_cmpgt_epi32(x1, lo), _mm256_cmpgt_epi32(wend, x1));
            __m256i vy0 = _mm256_and_si256(_mm256_cmpgt_epi32(y0, lo), _mm256_cmpgt_epi32(hend, y0));
            __m256i vy1 = _mm256_and_si256(_mm256_cmpgt_epi32(y1, lo), _mm256_cmpgt_epi32(hend, y1));
            __m256 m00 = _mm256_castsi256_ps(_mm256_and_si256(vy0, vx0));
            __m256 m01 = _mm256_castsi256_ps(_mm256_and_si256(vy0, vx1));
            __m256 m10 = _mm256_castsi256_ps(_mm256_and_si256(vy1, vx0));
            __m256 m11 = _mm256_castsi256_ps(_mm256_and_si256(vy1, vx1));
            __m256i r0 = _mm256_mullo_epi32(y0, wend), r1 = _mm256_mullo_epi32(y1, wend);
            __m256i a00 = _mm256_add_epi32(r0, x0), a01 = _mm256_add_epi32(r0, x1);
            __m256i a10 = _mm256_add_epi32(r1, x0), a11 = _mm256_add_epi32(r1, x1);
            __m256 wv = _mm256_loadu_ps(wt + w);
            for (int c = 0; c < C; c++) {
                const float* img = x + (b * C + c) * (long)Hin * Win;
                __m256 p00 = _mm256_mask_i32gather_ps(zero, img, a00, m00, 4);
                __m256 p01 = _mm256_mask_i32gather_ps(zero, img, a01, m01, 4);
                __m256 p10 = _mm256_mask_i32gather_ps(zero, img, a10, m10, 4);
                __m256 p11 = _mm256_mask_i32gather_ps(zero, img, a11, m11, 4);
                __m256 top = _mm256_fmadd_ps(ex, _mm256_sub_ps(p01, p00), p00);     /* (1 - ex) p00 + ex p01 */
                __m256 bot = _mm256_fmadd_ps(ex, _mm256_sub_ps(p11, p10), p10);
                __m256 v = _mm256_fmadd_ps(ey, _mm256_sub_ps(bot, top), top);
                _mm256_storeu_ps(out + ((b * C + c) * (long)H + h) * W + w, _mm256_mul_ps(v, wv));
            }
        }
#endif
        for (; w < W; w++) {
            float ix = fminf(fmaxf((gx[w] + 1.f) * 0.5f * (float)(Win - 1), lox), hix);
            float iy = fminf(fmaxf((gy[w] + 1.f) * 0.5f * (float)(Hin - 1), loy), hiy);
            float fx = floorf(ix), fy = floorf(iy);
            int x0 = (int)fx, y0 = (int)fy, x1 = x0 + 1, y1 = y0 + 1;
            float ex = ix - fx, ey = iy - fy;
            for (int c = 0; c < C; c++) {
                const float* img = x + (b * C + c) * (long)Hin * Win;
                float p00 = (y0 >= 0 && y0 < Hin && x0 >= 0 && x0 < Win) ? img[y0 * Win + x0] : 0.f;
                float p01 = (y0 >= 0 && y0 < Hin && x1 >= 0 && x1 < Win) ? img[y0 * Win + x1] : 0.f;
                float p10 = (y1 >= 0 && y1 < Hin && x0 >= 0 && x0 < Win) ? img[y1 * Win + x0] : 0.f;
                float p11 = (y1 >= 0 && y1 < Hin && x1 >= 0 && x1 < Win) ? img[y1 * Win + x1] : 0.f;
                float top = p00 + ex * (p01 - p00), bot = p10 + ex * (p11 - p10);
                out[((b * C + c) * (long)H + h) * W + w] = (top + ey * (bot - top)) * wt[w];
            }
        }
    }
}

/* a select, not fmaxf: GCC vectorises it (fmaxf's NaN rules keep it scalar; 4x slower on 3-channel 32 px views) */
static inline float max_sel(float a, float b) { return a > b ? a : b; }

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
            for (int w = 0; w < W; w++) r[w] = max_sel(r[w], sg * img[y * W + w]);
        /* horizontal max: the two edge pixels apart, so the inner loop has no branch and vectorises */
        if (W < 2) { o[0] = sg * r[0]; continue; }
        o[0] = sg * max_sel(r[0], r[1]);
        for (int w = 1; w < W - 1; w++) o[w] = sg * max_sel(max_sel(r[w - 1], r[w]), r[w + 1]);
        o[W - 1] = sg * max_sel(r[W - 2], r[W - 1]);
    }
}

/* The encoders' input normalisation, (x - mean) / std per channel, written channels-last in f32 or bf16 (round
 * to nearest even, as autocast's cast before the first conv rounds it): one pass where ATen makes three (the
 * subtraction, the division, autocast's copy). x channels-last (P pixels x C), out the same layout. */
void normalize_nhwc(const float* x, long P, int C, const float* mean, const float* std, void* out, int out_bf) {
    #pragma omp parallel for schedule(static)
    for (long p = 0; p < P; p++)
        for (int c = 0; c < C; c++) {
            float v = (x[p * C + c] - mean[c]) / std[c];
            if (out_bf) {
                uint32_t u; memcpy(&u, &v, 4);
                ((uint16_t*)out)[p * C + c] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            } else ((float*)out)[p * C + c] = v;
        }
}

/* RandomBlur (fastclr/augment.py): per plane p, the 3-tap Gaussian [k, 1 - 2k, k] along each axis, written as
 * y = x + k (left + right - 2 x), reflected at the edges, horizontally then vertically; k = 0 copies. x, out
 * (P, H, W), k (P,), H and W >= 2. One pass per plane instead of a dozen over the batch: the horizontal result is
 * written to out and blurred vertically in place, with two saved rows (a plane of 32 x 32 is 4 KB, in cache). */
static inline void blur_row(const float* x, int W, float k, float* o) {
    o[0] = (2.f * x[1] - 2.f * x[0]) * k + x[0];
    for (int w = 1; w < W - 1; w++) o[w] = ((x[w - 1] + x[w + 1]) - 2.f * x[w]) * k + x[w];
    o[W - 1] = (2.f * x[W - 2] - 2.f * x[W - 1]) * k + x[W - 1];
}

void blur3(const float* x, long P, int H, int W, const float* k, float* out) {
    #pragma omp parallel for schedule(static)
    for (long p = 0; p < P; p++) {
        const float* a = x + p * H * W;
        float* o = out + p * H * W;
        float kk = k[p], up[MAX_W], cur[MAX_W];
        if (kk == 0.f) { memcpy(o, a, sizeof(float) * H * W); continue; }
        for (int h = 0; h < H; h++) blur_row(a + h * W, W, kk, o + h * W);
        memcpy(cur, o, sizeof(float) * W);
        memcpy(up, o + W, sizeof(float) * W);                    /* above row 0: row 1 (reflected) */
        for (int h = 0; h < H; h++) {
            const float* down = h + 1 < H ? o + (h + 1) * W : up;  /* below the last row: the one above it */
            float* r = o + h * W;
            for (int w = 0; w < W; w++) r[w] = ((up[w] + down[w]) - 2.f * cur[w]) * kk + cur[w];
            memcpy(up, cur, sizeof(float) * W);
            if (h + 1 < H) memcpy(cur, o + (h + 1) * W, sizeof(float) * W);
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
/* Every step is written once, on the native vector with explicit selects (nsel; NaN passes through, as in
 * torch.clamp). GCC had vectorised a scalar loop of the same steps under `omp simd` only where AVX-512's mask
 * registers could carry its branches: on AVX2 it gave up ("control flow in loop") and ran pixel by pixel, 24.8 ms
 * for 1,024 colour views of 32 x 32 on a 2-core Zen 3 against 2.4 ms in this form. The pixels after the last
 * whole vector go through the same code as zero-padded lanes (nld_upto / nst_upto). */
static inline vf nclamp01(vf v) { vf z = {0}; v = nsel(v < z, z, v); return nsel(v > z + 1.f, z + 1.f, v); }
static inline vf nmax2(vf a, vf b) { return nsel(a > b, a, b); }
static inline vf nmin2(vf a, vf b) { return nsel(a < b, a, b); }
/* n <= VL floats from p, zeros after them; and back */
static inline vf nld_upto(const float* p, int n) {
    if (n == VL) return nld_f32(p);
    float t[VL] = {0};
    memcpy(t, p, sizeof(float) * n);
    return nld_f32(t);
}
static inline void nst_upto(float* p, vf v, int n) {
    if (n == VL) { nst_f32(p, v); return; }
    float t[VL];
    nst_f32(t, v);
    memcpy(p, t, sizeof(float) * n);
}
static inline vf nhue_channel(float n, vf six, vf v, vf vs) {
    vf k = six + n;
    k = nsel(k >= 6.f + (vf){0}, k - 6.f, k);
    return v - vs * nclamp01(nmin2(k, 4.f - k));
}

/* VL pixels' r, g, b through every step, in registers */
static inline void color_vector(vf* pr, vf* pg, vf* pb, float fb, float fc, float m, float fs, float fh, int hue,
                                int grey) {
    vf z = {0}, one = z + 1.f;
    vf r = nclamp01(nclamp01(*pr * fb) * fc + m);
    vf g = nclamp01(nclamp01(*pg * fb) * fc + m);
    vf bl = nclamp01(nclamp01(*pb * fb) * fc + m);
    vf l = (1.f - fs) * LUMA(r, g, bl);
    r = nclamp01(l + fs * r); g = nclamp01(l + fs * g); bl = nclamp01(l + fs * bl);
    if (hue) {
        vf v = nmax2(r, nmax2(g, bl)), d = v - nmin2(r, nmin2(g, bl));
        vf s = nsel(v == z, z, d / (v + 1e-8f)), dd = nsel(d == z, one, d);
        vf h = nsel((r >= g) & (r >= bl), g - bl, nsel(g >= bl, (bl - r) + 2.f * dd, (r - g) + 4.f * dd));
        vf turns = h / dd * (1.f / 6.f) + fh;          /* the shifted hue, in turns */
        turns += nsel(turns < z, one, z);           /* in [-2/3, 4/3): mod 1 by two selects */
        turns -= nsel(turns >= one, one, z);
        vf six = turns * 6.f, vs = v * s;
        r = nhue_channel(5.f, six, v, vs); g = nhue_channel(3.f, six, v, vs); bl = nhue_channel(1.f, six, v, vs);
    }
    if (grey) r = g = bl = LUMA(r, g, bl);
    *pr = r; *pg = g; *pb = bl;
}

/* One image's pixels */
static void color_pixels(const float* R, const float* G, const float* Bc, float* oR, float* oG, float* oB, int HW,
                         float fb, float fc, float m, float fs, float fh, int hue, int grey) {
    for (int i = 0; i < HW; i += VL) {
        int n = HW - i < VL ? HW - i : VL;
        vf r = nld_upto(R + i, n), g = nld_upto(G + i, n), bl = nld_upto(Bc + i, n);
        color_vector(&r, &g, &bl, fb, fc, m, fs, fh, hue, grey);
        nst_upto(oR + i, r, n); nst_upto(oG + i, g, n); nst_upto(oB + i, bl, n);
    }
}

/* The brightened image's luma summed over its pixels (C = 1: its values), in VL partial sums (padded lanes add
 * 0) */
static float brightened_sum(const float* R, const float* G, const float* Bc, int HW, float fb, int C) {
    vf acc = {0};
    for (int i = 0; i < HW; i += VL) {
        int n = HW - i < VL ? HW - i : VL;
        vf r = nclamp01(nld_upto(R + i, n) * fb);
        acc += C == 1 ? r : LUMA(r, nclamp01(nld_upto(G + i, n) * fb), nclamp01(nld_upto(Bc + i, n) * fb));
    }
    float sum = 0.f;
    for (int k = 0; k < VL; k++) sum += acc[k];
    return sum;
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
            float m = brightened_sum(xi, xi, xi, HW, fb, 1) / HW * (1.f - fc);
            for (int i = 0; i < HW; i += VL) {
                int n = HW - i < VL ? HW - i : VL;
                nst_upto(o + i, nclamp01(nclamp01(nld_upto(xi + i, n) * fb) * fc + m), n);
            }
            continue;
        }
        const float *R = xi, *G = xi + HW, *Bc = xi + 2 * HW;
        if (!on) {                                /* greyscale only: the jitter's neutral factors */
            color_pixels(R, G, Bc, o, o + HW, o + 2 * HW, HW, 1.f, 1.f, 0.f, 1.f, 0.f, 0, 1);
            continue;
        }
        float m = brightened_sum(R, G, Bc, HW, fb, 3) / HW * (1.f - fc);
        color_pixels(R, G, Bc, o, o + HW, o + 2 * HW, HW, fb, fc, m, fs, fh, fh != 0.f, grey);
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * Training-mode BatchNorm fused with what follows it in the cnn encoder (bn_act_*): z = BN(y) with the batch's
 * statistics, then by mode
 *   0: relu(z)                        (N, H, W, C)
 *   1: relu(2x2 max-pool of z)        (N, H/2, W/2, C)   (stages 1 and 2)
 *   2: 2x2 average-pool of relu(z)    (N, H/2, W/2, C)   (stage 3 at 32 px)
 * ATen runs BN, the pool and the ReLU as separate passes over the full-resolution map, each forward and backward
 * (about 14 map-sized reads and writes, plus the pool's int64 indices and the zero-filled input gradient).
 * Here the forward reads y twice (statistics, then z and the pool in registers) and writes only the pooled map
 * (and mode 1's window choice and chosen y); the backward reads y at most twice (the two per-channel sums BN's
 * gradient needs: mode 1 from the pooled choice instead, then the gradient itself) and writes dy once. z is
 * rounded to the output dtype before the max and the ReLU, as ATen's BN output is, so both pick the same window
 * element. y, out, g, dy channels-last, one dtype; C a multiple of 16, at most MAX_BN_C; H, W even for modes 1
 * and 2: the two exported entry points, bn_act_forward and bn_act_backward, check these once. */
#define MAX_BN_C 512

/* Per-channel sums of y - K and (y - K)^2 over P pixels (K: pixel 0's value, a shift that keeps E[y^2] - E[y]^2
 * from cancelling), as T partial rows in double: part (T, 3, C) = (sum, sum of squares, K). */
static void bn_stats(const void* y, int bf, long P, int C, double* part, int T) {
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        long p0 = P * t / T, p1 = P * (t + 1) / T;
        double* s = part + (long)t * 3 * C; double* q = s + C; double* k = q + C;
        for (int c = 0; c < C; c++) s[c] = q[c] = 0.0;
        for (int cb = 0; cb < C; cb += VL) {
            vf kv = nld(y, cb, bf);
            for (int l = 0; l < VL; l++) k[cb + l] = kv[l];
        }
        for (long p = p0; p < p1; p += VL) {
            long pe = p + VL < p1 ? p + VL : p1;
            for (int cb = 0; cb < C; cb += VL) {
                vf kv = nld(y, cb, bf), a = {0}, b = {0};
                for (long m = p; m < pe; m++) { vf v = nld(y, m * C + cb, bf) - kv; a += v; b += v * v; }
                for (int l = 0; l < VL; l++) { s[cb + l] += a[l]; q[cb + l] += b[l]; }
            }
        }
    }
}

/* What every bn_act pass shares: the geometry of one output row r, and per window (mode 1, 2: 2x2; mode 0: one
 * pixel) at column j, channels cb..cb+15, its y values, and z rounded as the output is. The passes are written
 * once as row functions with bf and mode constant, and each parallel loop calls the variant it needs: one body
 * testing them per vector runs slower. */
typedef struct {
    const void* y; int H, W, C; const float *scale, *shift, *mean, *b, *c;
    void* out; uint8_t* idx; void* ymax; const void* g; void* dy;
} BnArgs;

#define BN_GEOMETRY const int s = mode ? 2 : 1; const int Ho = A->H / s, Wo = A->W / s, W = A->W, C = A->C;     \
    const long row0 = ((r / Ho) * A->H + s * (r % Ho)) * (long)W * C;
#define BN_WINDOW_Y                                                                                            \
    long i00 = row0 + (long)s * j * C + cb, i10 = i00 + (long)W * C, o = (r * Wo + j) * C + cb;               \
    vf y0 = nld(A->y, i00, bf), y1 = y0, y2 = y0, y3 = y0;                                                     \
    if (mode) { y1 = nld(A->y, i00 + C, bf); y2 = nld(A->y, i10, bf); y3 = nld(A->y, i10 + C, bf); }
#define BN_WINDOW_Z                                                                                            \
    vf sc = nld_f32(A->scale + cb), sh = nld_f32(A->shift + cb);                                                \
    vf z0 = nrnd(y0 * sc + sh, bf), z1 = z0, z2 = z0, z3 = z0;                                                 \
    if (mode) { z1 = nrnd(y1 * sc + sh, bf); z2 = nrnd(y2 * sc + sh, bf); z3 = nrnd(y3 * sc + sh, bf); }
/* gz0..gz3: the gradient at each window element's z, from the output's gradient (mode 1: routed by the window
 * choice the forward stored, which is 4, routing nowhere, where the ReLU gave 0) */
#define BN_WINDOW_GZ                                                                                           \
    vf gv = nld(A->g, o, bf), zero = {0}, gz0, gz1 = zero, gz2 = zero, gz3 = zero;                             \
    if (mode == 1) {                                                                                           \
        vi k = nld_idx(A->idx + o);                                                                           \
        gz0 = nroute(gv, k, 0); gz1 = nroute(gv, k, 1); gz2 = nroute(gv, k, 2); gz3 = nroute(gv, k, 3);            \
    } else {                                                                                                   \
        BN_WINDOW_Z                                                                                            \
        if (mode == 2) gv = gv * 0.25f;                                                                        \
        gz0 = nsel(z0 > zero, gv, zero);                                                                        \
        if (mode == 2) { gz1 = nsel(z1 > zero, gv, zero); gz2 = nsel(z2 > zero, gv, zero);                       \
                         gz3 = nsel(z3 > zero, gv, zero); }                                                     \
    }
#define BN_CALL(f, ...)                                                                                        \
    switch (bf * 3 + mode) {                                                                                   \
        case 0: f(__VA_ARGS__, 0, 0); break; case 1: f(__VA_ARGS__, 0, 1); break; case 2: f(__VA_ARGS__, 0, 2); break; \
        case 3: f(__VA_ARGS__, 1, 0); break; case 4: f(__VA_ARGS__, 1, 1); break; default: f(__VA_ARGS__, 1, 2); }

static int bn_unsupported(int H, int W, int C, int mode) { return C % 16 || C > MAX_BN_C || (mode && (H % 2 || W % 2)); }

/* out = the mode's pool and ReLU of z = y * scale + shift (scale = gamma / sigma, shift = beta - mean * scale);
 * mode 1 also stores each window's choice in idx (0..3, or 4 where the ReLU gives 0) and the chosen y in ymax,
 * all the backward's sums need there (so they read a quarter of what they would from y) */
ALWAYS_INLINE void bn_fwd_row(const BnArgs* A, long r, const int bf, const int mode) {
    BN_GEOMETRY
    for (int j = 0; j < Wo; j++)
        for (int cb = 0; cb < C; cb += VL) {
            BN_WINDOW_Y
            BN_WINDOW_Z
            vf v;
            if (mode == 0) v = nrelu(z0);
            else if (mode == 1) {
                vf ym;
                v = nmaxpool_relu_window(y0, y1, y2, y3, z0, z1, z2, z3, A->idx + o, &ym);
                nst(A->ymax, o, ym, bf);
            }
            else v = (((nrelu(z0) + nrelu(z1)) + nrelu(z2)) + nrelu(z3)) * 0.25f;   /* ATen's order */
            nst(A->out, o, v, bf);
        }
}

static void bn_act_fwd(const void* y, int bf, int N, int H, int W, int C, const float* scale, const float* shift,
                       int mode, void* out, uint8_t* idx, void* ymax) {
    BnArgs a = {.y = y, .H = H, .W = W, .C = C, .scale = scale, .shift = shift, .out = out, .idx = idx,
                .ymax = ymax};
    long R = (long)N * (mode ? H / 2 : H);
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) { BN_CALL(bn_fwd_row, &a, r) }
}

/* BN's backward needs two per-channel sums of gz: sum gz and sum gz * (y - mean). One output row's, in f32,
 * added to a1, a2 (C / VL vectors each). */
ALWAYS_INLINE void bn_sums_row(const BnArgs* A, long r, vf* a1, vf* a2, const int bf, const int mode) {
    BN_GEOMETRY
    if (mode == 1) {                                      /* one element per window: the stored choice */
        for (int j = 0; j < Wo; j++)
            for (int cb = 0; cb < C; cb += VL) {
                long o = (r * Wo + j) * C + cb;
                vi k = nld_idx(A->idx + o), four = {0}; four += 4;
                vf zero = {0}, gm = nsel(k != four, nld(A->g, o, bf), zero), mu = nld_f32(A->mean + cb);
                a1[cb / VL] += gm;
                a2[cb / VL] += gm * (nld(A->ymax, o, bf) - mu);
            }
        (void)row0;
        return;
    }
    for (int j = 0; j < Wo; j++)
        for (int cb = 0; cb < C; cb += VL) {
            BN_WINDOW_Y
            BN_WINDOW_GZ
            vf mu = nld_f32(A->mean + cb);
            a1[cb / VL] += ((gz0 + gz1) + gz2) + gz3;
            a2[cb / VL] += gz0 * (y0 - mu) + gz1 * (y1 - mu) + gz2 * (y2 - mu) + gz3 * (y3 - mu);
        }
}

/* The two sums as T partial rows in double, part (T, 2, C): each thread adds its rows' f32 sums in, every 64
 * windows or more (per row, 7-pixel rows spent most of their time in these adds). */
static void bn_act_bwd_sums(const void* y, int bf, int N, int H, int W, int C, const float* scale,
                            const float* shift, const float* mean, int mode, const uint8_t* idx, const void* ymax,
                            const void* g, double* part, int T) {
    BnArgs a = {.y = y, .H = H, .W = W, .C = C, .scale = scale, .shift = shift, .mean = mean,
                .idx = (uint8_t*)idx, .ymax = (void*)ymax, .g = g};
    long R = (long)N * (mode ? H / 2 : H);
    int CB = C / VL;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        double* s1 = part + (long)t * 2 * C; double* s2 = s1 + C;
        for (int q = 0; q < C; q++) s1[q] = s2[q] = 0.0;
        vf a1[MAX_BN_C / VL], a2[MAX_BN_C / VL];
        int Wo = mode ? W / 2 : W, held = 0;              /* windows summed in f32 since the last flush */
        long r1 = R * (t + 1) / T;
        for (long r = R * t / T; r < r1; r++) {
            if (held == 0)
                for (int q = 0; q < CB; q++) { vf zero = {0}; a1[q] = a2[q] = zero; }
            BN_CALL(bn_sums_row, &a, r, a1, a2)
            held += Wo;
            if (held >= 64 || r == r1 - 1) {              /* into double every 64 windows or more: f32 holds */
                for (int q = 0; q < CB; q++)
                    for (int l = 0; l < VL; l++) { s1[q * VL + l] += a1[q][l]; s2[q * VL + l] += a2[q][l]; }
                held = 0;
            }
        }
    }
}

/* dy = scale * gz + b * (y - mean) + c per element (b, c per channel: BN's gradient through the batch
 * statistics, from the sums above); every element of dy written. */
ALWAYS_INLINE void bn_dx_row(const BnArgs* A, long r, const int bf, const int mode) {
    BN_GEOMETRY
    for (int j = 0; j < Wo; j++)
        for (int cb = 0; cb < C; cb += VL) {
            BN_WINDOW_Y
            BN_WINDOW_GZ
            vf sc = nld_f32(A->scale + cb), mu = nld_f32(A->mean + cb), bv = nld_f32(A->b + cb), cv = nld_f32(A->c + cb);
            nst(A->dy, i00, sc * gz0 + bv * (y0 - mu) + cv, bf);
            if (mode) {
                nst(A->dy, i00 + C, sc * gz1 + bv * (y1 - mu) + cv, bf);
                nst(A->dy, i10, sc * gz2 + bv * (y2 - mu) + cv, bf);
                nst(A->dy, i10 + C, sc * gz3 + bv * (y3 - mu) + cv, bf);
            }
        }
}

static void bn_act_bwd_dx(const void* y, int bf, int N, int H, int W, int C, const float* scale,
                          const float* shift, const float* mean, int mode, const uint8_t* idx, const void* g,
                          const float* b, const float* c, void* dy) {
    BnArgs a = {.y = y, .H = H, .W = W, .C = C, .scale = scale, .shift = shift, .mean = mean, .b = b, .c = c,
                .idx = (uint8_t*)idx, .g = g, .dy = dy};
    long R = (long)N * (mode ? H / 2 : H);
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) { BN_CALL(bn_dx_row, &a, r) }
}

/* The batch mean and biased variance (f32) from T threads' partial sums about the shift K (double, per channel):
 * sums at part[t * stride + c], sums of squares at part[t * stride + C + c], over P values. */
static void bn_moments(const double* part, int T, long stride, int C, double P, const double* K, float* mean,
                       float* var) {
    for (int c = 0; c < C; c++) {
        double sum = 0.0, sq = 0.0;
        for (int t = 0; t < T; t++) { sum += part[t * stride + c]; sq += part[t * stride + C + c]; }
        double shifted = sum / P, v = sq / P - shifted * shifted;
        var[c] = (float)(v > 0.0 ? v : 0.0);
        mean[c] = (float)(shifted + K[c]);
    }
}

/* BN as z = y * scale + shift from the batch's f32 mean and variance (the forward and the backward both call this
 * on the same mean and var, so the backward's recomputed z, and the pool choices read from it, are the
 * forward's bit for bit); invstd = 1 / sqrt(var + eps). */
static void bn_affine(const float* weight, const float* bias, const float* mean, const float* var, float eps, int C,
                      double* invstd, float* scale, float* shift) {
    for (int c = 0; c < C; c++) {
        invstd[c] = 1.0 / sqrt((double)var[c] + (double)eps);
        double sc = (double)weight[c] * invstd[c];
        scale[c] = (float)sc;
        shift[c] = (float)((double)bias[c] - (double)mean[c] * sc);
    }
}

/* The forward, whole: statistics (mean and biased variance out, f32), the affine form, the apply pass. part is
 * (T, 3, C) double scratch. The per-channel steps between the passes run here, not as a dozen small torch ops
 * (they cost more than the stage-3 passes). */
int bn_act_forward(const void* y, int bf, int N, int H, int W, int C, const float* weight, const float* bias,
                   float eps, int mode, void* out, uint8_t* idx, void* ymax, float* mean, float* var, double* part,
                   int T) {
    if (bn_unsupported(H, W, C, mode)) return -1;
    long P = (long)N * H * W;
    bn_stats(y, bf, P, C, part, T);
    double inv[MAX_BN_C];
    float scale[MAX_BN_C], shift[MAX_BN_C];
    bn_moments(part, T, 3L * C, C, (double)P, part + 2 * C, mean, var);   /* K: thread 0's row holds it */
    bn_affine(weight, bias, mean, var, eps, C, inv, scale, shift);
    bn_act_fwd(y, bf, N, H, W, C, scale, shift, mode, out, idx, ymax);
    return 0;
}

/* From the threads' two partial sums, part (T, 2, C) over P values: dweight = sum gz xhat, dbias = sum gz (f32),
 * and dy's per-channel terms b, c (dy = scale * gz + b * (y - mean) + c) */
static void bn_grad_terms(const double* part, int T, int C, double P, const double* inv, const float* scale,
                          float* dweight, float* dbias, float* b, float* c) {
    for (int q = 0; q < C; q++) {
        double s1 = 0.0, sy = 0.0;
        for (int t = 0; t < T; t++) { s1 += part[(long)t * 2 * C + q]; sy += part[(long)t * 2 * C + C + q]; }
        double dw = inv[q] * sy;                                   /* sum gz xhat */
        dweight[q] = (float)dw;
        dbias[q] = (float)s1;
        b[q] = (float)(-(double)scale[q] * inv[q] * dw / P);
        c[q] = (float)(-(double)scale[q] * s1 / P);
    }
}

/* The backward, whole: the two sums, then dweight = sum gz xhat, dbias = sum gz (f32 out), and dy. part is
 * (T, 2, C) double scratch. */
int bn_act_backward(const void* y, int bf, int N, int H, int W, int C, const float* weight, const float* bias,
                    float eps, int mode, const uint8_t* idx, const void* ymax, const void* g, const float* mean,
                    const float* var, void* dy, float* dweight, float* dbias, double* part, int T) {
    if (bn_unsupported(H, W, C, mode)) return -1;
    double inv[MAX_BN_C];
    float scale[MAX_BN_C], shift[MAX_BN_C], b[MAX_BN_C], cc[MAX_BN_C];
    bn_affine(weight, bias, mean, var, eps, C, inv, scale, shift);
    bn_act_bwd_sums(y, bf, N, H, W, C, scale, shift, mean, mode, idx, ymax, g, part, T);
    bn_grad_terms(part, T, C, (double)N * H * W, inv, scale, dweight, dbias, b, cc);
    bn_act_bwd_dx(y, bf, N, H, W, C, scale, shift, mean, mode, idx, g, b, cc, dy);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
 * The cnn's first stage at once (stem): a 3x3 conv with few input channels (Cin <= 4, no bias, zero padding 1)
 * -> training-mode BatchNorm -> 2x2 max-pool -> ReLU, bf16 in and out.
 *
 * Why: at 3 x 32 x 32 the conv output is the largest map of the step (B x 32 x 32 x 32, 16.8 MB in bf16 at 256
 * views). Unfused, it is written by the conv, read twice by bn_act's forward, read again by its backward, which
 * writes its gradient (as large), which the conv's weight gradient reads back; and oneDNN runs a 3-channel conv at
 * half the speed it runs the later stages (K = 27 is short for its blocking). Here the conv output is never
 * stored. The conv is linear in its 3x3 input patches p (Q = 9 Cin values), y = w . p, so BN's statistics follow
 * from the patches' sum S and second moments G = sum p p^T: sum y = w . S, sum y^2 = w^T G w. G (Q x Q) comes
 * from the padded input's autocorrelation at the 5 x 5 offsets (stem_gram: a few hundred FLOPs a pixel, from
 * an L2-sized input). So, with AVX512-BF16 dot products from the padded input:
 *   forward:  G and S -> the batch mean and variance; then one pass: per 2x2 window its four conv outputs in
 *             registers, BN, the max-pool and the ReLU -> out, idx, ymax (bn_act's mode-1 outputs);
 *   backward: bn_act's two sums from the pooled tensors -> dy = scale gz + b (y - mean) + c per pixel, and
 *             dW = sum dy p^T = scale (sum gz p^T) + b (w^T G - mean S^T) + c S^T: the one term that needs a
 *             pass is the routed output gradient times the patches, as dot products over pairs of
 *             neighbouring pixels; y and dy are never formed.
 * The conv is ATen's under bf16 autocast: bf16 input and weight (the weight rounded to nearest even), f32
 * accumulation, the output rounded to bf16 before BN. BN's statistics here are those of the unrounded conv
 * output, from G in double (ATen's are of the rounded output: a difference of the order of bf16 rounding noise
 * over the batch, and the float64 reference is closer to these).
 *
 * Layouts. xp: the input with a one-pixel zero border, (N, H + 2, W + 2, Cin) bf16, plus STEM_SLACK zeros.
 * A kernel row of output pixel (h, w) is the 3 * Cin contiguous values xp[h + r, w .. w + 2, :], read as
 * NP = ceil(3 Cin / 2) bf16 pairs (the last pair's odd partner belongs to the next pixel and meets a zero
 * weight). wpk: (Cout / 16, 3, NP, 16) pairs of weights, the dot product's other operand. xi, the backward's:
 * (N, H + 2, W + 2, Cin) pairs (xp[h, w, c], xp[h, w + 1, c]), the input under two horizontal neighbours.
 * A patch index q = (3 r + s) Cin + c (kernel row r, column s, channel c); gram: G (Q x Q) then S (Q), doubles.
 * ------------------------------------------------------------------------------------------------------------ */
#define STEM_MAX_CIN 4
#define STEM_MAX_COUT 64
#define STEM_SLACK 16
#define STEM_NP(cin) ((3 * (cin) + 1) / 2)

typedef struct {            /* the forward's pass reads xp, wpk, scale, shift; the backward's rows xi, idx, g */
    const uint16_t* xp; const uint32_t* xi; int H, W, Cout; const uint32_t* wpk;
    const float *scale, *shift;
    uint16_t *out, *ymax; uint8_t* idx; const uint16_t* g;
} StemArgs;

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); }
static inline u16v ld_u32(const uint32_t* p) { u16v v; memcpy(&v, p, 64); return v; }
static inline u16v bits(v16 f) { u16v u; memcpy(&u, &f, 64); return u; }

/* pairs of neighbouring elements a C-strided row apart: o[e] = (s[e], s[e + C]) for e < n, as 16 at a time */
static inline void pair_rows(const uint16_t* s, long C, long n, uint32_t* o) {
    long e = 0;
    for (; e + 16 <= n; e += 16) {
        h16v a, b; memcpy(&a, s + e, 32); memcpy(&b, s + e + C, 32);
        u16v v = __builtin_convertvector(a, u16v) | (__builtin_convertvector(b, u16v) << 16);
        memcpy(o + e, &v, 64);
    }
    for (; e < n; e++) o[e] = s[e] | (uint32_t)s[e + C] << 16;
}

/* acc + w.lo * x[0] + w.hi * x[1] per lane: w 16 pairs of bf16, x one pair broadcast to every lane */
ALWAYS_INLINE v16 dp2(v16 acc, u16v w, const uint16_t* x) {
#ifdef __AVX512BF16__
    int32_t v; memcpy(&v, x, 4);
    return (v16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)(__m512i)w, (__m512bh)_mm512_set1_epi32(v));
#else
    u16v lo = w << 16, hi = w & 0xFFFF0000u;
    v16 a, b; memcpy(&a, &lo, 64); memcpy(&b, &hi, 64);
    return acc + a * bf2f(x[0]) + b * bf2f(x[1]);
#endif
}

/* The conv's outputs for G neighbouring pooled windows (n, i, j .. j + G - 1), channels 16 cb .. 16 cb + 15,
 * rounded to bf16: y[4 g + e] is window j + g's element e (raster order). Two windows at a time give 8
 * independent accumulators: with 4, the dot product's latency bounds the loop. */
ALWAYS_INLINE void stem_windows(const StemArgs* A, long n, int i, int j, int cb, v16* y, const int Cin, const int G) {
    const int NP = STEM_NP(Cin);
    const long WP = A->W + 2, row = WP * Cin;
    const uint16_t* x0 = A->xp + ((n * (A->H + 2) + 2 * i) * WP + 2 * j) * Cin;
    const uint32_t* w = A->wpk + (long)cb * 3 * NP * 16;
    v16 a[4 * G];
    for (int e = 0; e < 4 * G; e++) { v16 zero = {0}; a[e] = zero; }
    for (int r = 0; r < 3; r++)
        for (int p = 0; p < NP; p++) {
            u16v wv = ld_u32(w + (r * NP + p) * 16);
            for (int g = 0; g < G; g++) {
                const uint16_t* x = x0 + r * row + 2 * p + 2 * g * Cin;
                a[4 * g] = dp2(a[4 * g], wv, x);
                a[4 * g + 1] = dp2(a[4 * g + 1], wv, x + Cin);
                a[4 * g + 2] = dp2(a[4 * g + 2], wv, x + row);
                a[4 * g + 3] = dp2(a[4 * g + 3], wv, x + row + Cin);
            }
        }
    for (int e = 0; e < 4 * G; e++) y[e] = round_bf16(a[e]);
}

/* One pooled row r, all channels: per window its conv outputs, z = y scale + shift rounded to bf16 (as ATen's BN
 * output is), the max-pool and the ReLU -> out, idx, ymax; two windows' convs at a time where two are left. */
ALWAYS_INLINE void stem_fwd_row(const StemArgs* A, long r, const int Cin) {
    const int H2 = A->H / 2, W2 = A->W / 2, C = A->Cout;
    for (int cb = 0; cb < C / 16; cb++) {
        v16 sc = ld_f32(A->scale + 16 * cb), sh = ld_f32(A->shift + 16 * cb);
        for (int j2 = 0; j2 < W2; j2 += 2) {
            v16 y[8];
            int G = j2 + 1 < W2 ? 2 : 1;
            if (G == 2) stem_windows(A, r / H2, r % H2, j2, cb, y, Cin, 2);
            else stem_windows(A, r / H2, r % H2, j2, cb, y, Cin, 1);
            for (int g = 0; g < G; g++) {
                const v16* v = y + 4 * g;
                long o = (r * W2 + j2 + g) * C + 16 * cb;
                v16 ym, out = maxpool_relu_window(v[0], v[1], v[2], v[3], round_bf16(v[0] * sc + sh),
                                                  round_bf16(v[1] * sc + sh), round_bf16(v[2] * sc + sh),
                                                  round_bf16(v[3] * sc + sh), A->idx + o, &ym);
                st_bf16(A->out + o, out);
                st_bf16(A->ymax + o, ym);
            }
        }
    }
}

/* One pooled row's sum of gz p^T, added to dw (Cout / 16, 3, 3 Cin, 16 doubles): per window the output gradient
 * routed to its chosen element (exact: g is bf16), paired left with right; then for each pair and each of the
 * 9 Cin patch values, one dot product with xi. */
ALWAYS_INLINE void stem_wgrad_row(const StemArgs* A, long r, double* dw, const int Cin) {
    const int H2 = A->H / 2, W2 = A->W / 2, C = A->Cout, Q = 3 * Cin;
    const long n = r / H2, i = r % H2, WP = A->W + 2;
    u16v pairs[2 * (MAX_HW / 2)];                       /* per window: the top row's pair, the bottom row's */
    for (int cb = 0; cb < C / 16; cb++) {
        for (int j = 0; j < W2; j++) {
            long o = (r * W2 + j) * C + 16 * cb;
            v16 gv = ld_bf16(A->g + o);
            i16v k = ld_idx(A->idx + o);
            pairs[2 * j] = (bits(route(gv, k, 0)) >> 16) | bits(route(gv, k, 1));
            pairs[2 * j + 1] = (bits(route(gv, k, 2)) >> 16) | bits(route(gv, k, 3));
        }
        v16 acc[3 * 3 * STEM_MAX_CIN];
        for (int t = 0; t < 3 * Q; t++) { v16 zero = {0}; acc[t] = zero; }
        for (int j = 0; j < W2; j++)
            for (int e = 0; e < 2; e++) {
                const uint16_t* x = (const uint16_t*)(A->xi + ((n * (A->H + 2) + 2 * i + e) * WP + 2 * j) * Cin);
                for (int rr = 0; rr < 3; rr++)
                    for (int t = 0; t < Q; t++)
                        acc[rr * Q + t] = dp2(acc[rr * Q + t], pairs[2 * j + e], x + 2 * (rr * WP * Cin + t));
            }
        double* o = dw + (long)cb * 3 * Q * 16;
        for (int t = 0; t < 3 * Q; t++)
            for (int l = 0; l < 16; l++) o[t * 16 + l] += acc[t][l];
    }
}

#define STEM_CALL(f, ...)                                                                                      \
    switch (Cin) { case 1: f(__VA_ARGS__, 1); break; case 2: f(__VA_ARGS__, 2); break;                         \
                   case 3: f(__VA_ARGS__, 3); break; default: f(__VA_ARGS__, 4); }

static int stem_unsupported(int H, int W, int Cin, int Cout) {
    return Cin < 1 || Cin > STEM_MAX_CIN || Cout % 16 || Cout > STEM_MAX_COUT || H % 2 || W % 2 || W > MAX_HW
           || H > MAX_HW;
}

/* wpk from the f32 conv weight (Cout, Cin, 3, 3), rounded to bf16 as autocast rounds it */
static void stem_pack(const float* cw, int Cin, int Cout, uint32_t* wpk) {
    const int NP = STEM_NP(Cin);
    for (int co = 0; co < Cout; co++)
        for (int r = 0; r < 3; r++)
            for (int p = 0; p < NP; p++) {
                uint32_t pair = 0;
                for (int e = 0; e < 2; e++) {
                    int q = 2 * p + e, s = q / Cin, ci = q % Cin;
                    uint16_t h = q < 3 * Cin ? f2bf(cw[((co * Cin + ci) * 3 + r) * 3 + s]) : 0;
                    pair |= (uint32_t)h << (16 * e);
                }
                wpk[(((co / 16) * 3 + r) * NP + p) * 16 + co % 16] = pair;
            }
}

/* gw = G wc (Q): G the patches' second moments (Q x Q, symmetric), wc one output channel's patch weights */
static void gram_times(const double* gram, const double* wc, int Q, double* gw) {
    for (int q = 0; q < Q; q++) {
        double v = 0.0;
        for (int q2 = 0; q2 < Q; q2++) v += gram[q * Q + q2] * wc[q2];
        gw[q] = v;
    }
}

/* w (Cout, Q) in patch order q = (3 r + s) Cin + c, the bf16-rounded conv weight in double */
static void stem_patch_weights(const float* cw, int Cin, int Cout, double* w) {
    const int Q = 9 * Cin;
    for (int co = 0; co < Cout; co++)
        for (int q = 0; q < Q; q++) {
            int rs = q / Cin, c = q % Cin;
            w[co * Q + q] = bf2f(f2bf(cw[((co * Cin + c) * 3 + rs / 3) * 3 + rs % 3]));
        }
}

/* xp from the images, with the zero border, then STEM_SLACK zeros. mean == NULL: x is (N, H, W, Cin) bf16, already
 * normalised; else x is the raw (N, Cin, H, W) f32 images and xp their (x - mean[c]) / std[c] rounded to bf16, as
 * normalize_nhwc writes it (one pass instead of a channels-last copy, the normalisation, then this one). */
static void stem_pad(const void* x, const float* mean, const float* std, int N, int H, int W, int Cin,
                     uint16_t* xp) {
    const long WP = W + 2, row = WP * Cin;
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < (long)N * (H + 2); t++) {
        long n = t / (H + 2), h = t % (H + 2);
        uint16_t* o = xp + t * row;
        if (h == 0 || h == H + 1) { memset(o, 0, row * 2); continue; }
        memset(o, 0, Cin * 2); memset(o + (W + 1) * Cin, 0, Cin * 2);
        if (mean == NULL) { memcpy(o + Cin, (const uint16_t*)x + ((n * H + h - 1) * W) * Cin, (long)W * Cin * 2); continue; }
        for (int c = 0; c < Cin; c++) {
            const float* xr = (const float*)x + ((n * Cin + c) * H + h - 1) * (long)W;
            for (int w = 0; w < W; w++) o[(w + 1) * Cin + c] = f2bf((xr[w] - mean[c]) / std[c]);
        }
    }
    memset(xp + (long)N * (H + 2) * row, 0, STEM_SLACK * 2);
}

/* ---- the patches' moments (stem_gram) ----
 * A padded row is L = (W + 2) Cin values. A product of patch values x[h + r1, w + s1, c1] x[h + r2, w + s2, c2]
 * pairs element e of padded row i with element e + o of row i + dr, o = (s2 - s1) Cin + c2 - c1 (|o| <= OM), and
 * c1 = e % Cin fixes (s2 - s1, c2) from o. Summed over every row and element, these autocorrelations give G up to
 * the patch window's edges: patch row r1 = 0 never reaches padded row H, r1 = 2 never row 1 (and the same for the
 * columns), so those rows' and columns' sums are taken off again (and their corner put back). Accumulated:
 *   full[dr][o][e]   = sum over rows i of row_i[e] row_{i+dr}[e + o], dr = 0..2 (dr < 0 by symmetry);
 *   edge[k][dr][o][e] = row_i[e] row_{i+dr}[e + o] for i = 1 (k = 0) and i = H (k = 1), dr = -2..2;
 *   lin[e], edge_lin[k][e]: the sums of the values, for S. */
#define GRAM_MARGIN 16                        /* >= the largest |o| (3 Cin - 1), zeros either side of a row */
#define GRAM_ROW (MAX_HW * STEM_MAX_CIN + 2 * STEM_MAX_CIN + 16 + 2 * GRAM_MARGIN)
#define GRAM_FA (3 * (6 * STEM_MAX_CIN - 1) * ((MAX_HW + 2) * STEM_MAX_CIN + 16))   /* 3 x NO x L16 at the most */

typedef struct { int Cin, L, L16, OM, NO; long full, edge, lin, edge_lin, scratch, size; } GramLayout;

/* A thread's doubles: full, edge, lin, edge_lin, then f32 scratch for its edge and edge_lin sums over its images
 * (single products of bf16 values, exact, added in f32: one flush into double per thread; a flush per image cost
 * more than the image's other sums). */
static GramLayout gram_layout(int W, int Cin) {
    GramLayout g = {.Cin = Cin, .L = (W + 2) * Cin, .OM = 3 * Cin - 1};
    g.L16 = (g.L + 15) & ~15; g.NO = 2 * g.OM + 1;
    g.full = 0; g.edge = 3L * g.NO * g.L16; g.lin = g.edge + 2L * 5 * g.NO * g.L16;
    g.edge_lin = g.lin + g.L16; g.scratch = g.edge_lin + 2L * g.L16;
    g.size = g.scratch + (g.scratch - g.edge) / 2 + 1;           /* (edge .. lin, edge_lin) as floats */
    return g;
}

/* One image's contributions, added to acc (a GramLayout's doubles; the edges' to its f32 scratch fe). rows:
 * (H + 2) x GRAM_ROW f32 scratch, zero outside the L values of rows 1..H this writes (so zeroed once per thread);
 * fa: 3 x NO x L16 f32 scratch. */
ALWAYS_INLINE void gram_image(const uint16_t* xp, int H, const GramLayout* g, float* rows, float* fa, double* acc,
                              float* fe, const int Cin) {
    const int L = g->L, L16 = g->L16, OM = 3 * Cin - 1, NO = 2 * OM + 1;
    #define ROW(i) (rows + (long)(i) * GRAM_ROW + GRAM_MARGIN)
    for (int i = 1; i <= H; i++) for (int e = 0; e < L; e++) ROW(i)[e] = bf2f(xp[(long)i * L + e]);
    /* the full sums, 16 elements of e at a time: one row's 16 values times its partner row at every offset, NO
     * independent accumulators in registers (one accumulator's chain of adds ran at the add's latency) */
    for (int dr = 0; dr < 3; dr++)
        for (int e = 0; e < L16; e += 16) {
            v16 a[NO];
            #pragma GCC unroll 32
            for (int oi = 0; oi < NO; oi++) { v16 zero = {0}; a[oi] = zero; }
            for (int i = 1; i + dr <= H; i++) {
                v16 u; memcpy(&u, ROW(i) + e, 64);
                const float* v = ROW(i + dr) + e - OM;
                #pragma GCC unroll 32
                for (int oi = 0; oi < NO; oi++) { v16 w; memcpy(&w, v + oi, 64); a[oi] += u * w; }
            }
            #pragma GCC unroll 32
            for (int oi = 0; oi < NO; oi++) memcpy(fa + ((long)dr * NO + oi) * L16 + e, &a[oi], 64);
        }
    for (long t = 0; t < 3L * NO * L16; t++) acc[g->full + t] += fa[t];
    for (int k = 0; k < 2; k++) {
        int i = k ? H : 1;
        for (int dr = -2; dr <= 2; dr++) {
            if (i + dr < 1 || i + dr > H) continue;
            for (int oi = 0; oi < NO; oi++) {
                float* o = fe + (((long)k * 5 + dr + 2) * NO + oi) * L16;
                const float *u = ROW(i), *v = ROW(i + dr) + oi - OM;
                for (int e = 0; e < L; e++) o[e] += u[e] * v[e];
            }
        }
        for (int e = 0; e < L; e++) fe[(g->edge_lin - g->edge) + (long)k * L16 + e] += ROW(i)[e];
    }
    for (int i = 1; i <= H; i++) for (int e = 0; e < L; e++) acc[g->lin + e] += ROW(i)[e];
    #undef ROW
}

/* G and S (gram: Q x Q then Q doubles) from the accumulated sums */
static void gram_reduce(const double* acc, int W, const GramLayout* g, double* gram) {
    const int Cin = g->Cin, Q = 9 * Cin, L = g->L, L16 = g->L16, OM = g->OM, NO = g->NO;
    #define FULL(dr, o, e) acc[g->full + ((long)(dr) * NO + (o) + OM) * L16 + (e)]
    #define EDGE(k, dr, o, e) acc[g->edge + (((long)(k) * 5 + (dr) + 2) * NO + (o) + OM) * L16 + (e)]
    for (int q1 = 0; q1 < Q; q1++) {
        int r1 = q1 / (3 * Cin), s1 = q1 / Cin % 3, c1 = q1 % Cin;
        int k = r1 == 0 ? 1 : r1 == 2 ? 0 : -1;           /* the padded row this patch row never reaches */
        int j = s1 == 0 ? W : s1 == 2 ? 1 : -1;           /* the padded column */
        for (int q2 = 0; q2 < Q; q2++) {
            int r2 = q2 / (3 * Cin), s2 = q2 / Cin % 3, c2 = q2 % Cin;
            int dr = r2 - r1, ds = s2 - s1, o = ds * Cin + c2 - c1;
            double v = 0.0;
            if (dr >= 0) for (int e = c1; e < L; e += Cin) v += FULL(dr, o, e);
            else for (int e = c2; e < L; e += Cin) v += FULL(-dr, -o, e);             /* the pairs swapped */
            if (k >= 0) for (int e = c1; e < L; e += Cin) v -= EDGE(k, dr, o, e);
            if (j >= 0) {
                if (dr >= 0) v -= FULL(dr, o, j * Cin + c1);
                else if (j + ds >= 0 && j + ds <= W + 1) v -= FULL(-dr, -o, (j + ds) * Cin + c2);
                if (k >= 0) v += EDGE(k, dr, o, j * Cin + c1);
            }
            gram[q1 * Q + q2] = v;
        }
        double s = 0.0;
        for (int e = c1; e < L; e += Cin) s += acc[g->lin + e] - (k >= 0 ? acc[g->edge_lin + (long)k * L16 + e] : 0.0);
        if (j >= 0) s -= acc[g->lin + j * Cin + c1] - (k >= 0 ? acc[g->edge_lin + (long)k * L16 + j * Cin + c1] : 0.0);
        gram[Q * Q + q1] = s;
    }
    #undef FULL
    #undef EDGE
}

/* G and S of the padded input xp (N images) into gram; part: T x gram_layout(W, Cin).size double scratch */
static void stem_gram(const uint16_t* xp, int N, int H, int W, int Cin, double* gram, double* part, int T) {
    GramLayout g = gram_layout(W, Cin);
    const long img = (long)(H + 2) * g.L;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float rows[(MAX_HW + 2) * GRAM_ROW], fa[GRAM_FA];
        memset(rows, 0, (size_t)(H + 2) * GRAM_ROW * sizeof(float));
        double* acc = part + (long)t * g.size;
        float* fe = (float*)(acc + g.scratch);
        for (long e = 0; e < g.scratch; e++) acc[e] = 0.0;
        for (long e = 0; e < g.scratch - g.edge; e++) fe[e] = 0.f;
        for (long n = (long)N * t / T; n < (long)N * (t + 1) / T; n++) { STEM_CALL(gram_image, xp + n * img, H, &g, rows, fa, acc, fe) }
        for (long e = 0; e < g.scratch - g.edge; e++) acc[g.edge + e] += fe[e];
    }
    for (int t = 1; t < T; t++) for (long e = 0; e < g.scratch; e++) part[e] += part[(long)t * g.size + e];
    gram_reduce(part, W, &g, gram);
}

long stem_gram_scratch(int W, int Cin) { return gram_layout(W, Cin).size; }

/* x (N, H, W, Cin) bf16, or raw f32 images with xmean, xstd (see stem_pad) -> out, idx, ymax (N, H / 2, W / 2,
 * Cout) as bn_act's mode 1; the batch mean and biased variance of the conv output (f32); and for the backward xp
 * and gram. part: T x stem_gram_scratch(W, Cin) double scratch. */
int stem_forward(const void* x, const float* xmean, const float* xstd, int N, int H, int W, int Cin, const float* cw,
                 int Cout, const float* weight, const float* bias, float eps, uint16_t* xp, double* gram,
                 uint16_t* out, uint8_t* idx, uint16_t* ymax, float* mean, float* var, double* part, int T) {
    if (stem_unsupported(H, W, Cin, Cout)) return -1;
    const int Q = 9 * Cin;
    uint32_t wpk[STEM_MAX_COUT / 16 * 3 * STEM_NP(STEM_MAX_CIN) * 16];
    double w[STEM_MAX_COUT * 9 * STEM_MAX_CIN];
    stem_pack(cw, Cin, Cout, wpk);
    stem_patch_weights(cw, Cin, Cout, w);
    stem_pad(x, xmean, xstd, N, H, W, Cin, xp);
    stem_gram(xp, N, H, W, Cin, gram, part, T);
    const double P = (double)N * H * W;
    for (int co = 0; co < Cout; co++) {                 /* mean = w . S / P, var = w^T G w / P - mean^2 */
        const double* wc = w + co * Q;
        double gw[9 * STEM_MAX_CIN], s = 0.0, s2 = 0.0;
        gram_times(gram, wc, Q, gw);
        for (int q = 0; q < Q; q++) { s += wc[q] * gram[Q * Q + q]; s2 += wc[q] * gw[q]; }
        double m = s / P, v = s2 / P - m * m;
        mean[co] = (float)m;
        var[co] = (float)(v > 0.0 ? v : 0.0);
    }
    double inv[STEM_MAX_COUT];
    float scale[STEM_MAX_COUT], shift[STEM_MAX_COUT];
    bn_affine(weight, bias, mean, var, eps, Cout, inv, scale, shift);
    StemArgs a = {.xp = xp, .H = H, .W = W, .Cout = Cout, .wpk = wpk, .scale = scale, .shift = shift, .out = out,
                  .ymax = ymax, .idx = idx};
    long R = (long)N * (H / 2);
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) { STEM_CALL(stem_fwd_row, &a, r) }
    return 0;
}

/* The backward: g (N, H / 2, W / 2, Cout) bf16 and the forward's outputs -> dcw (Cout, Cin, 3, 3), dweight, dbias
 * (f32). xi: (N, H + 2, W + 2, Cin) uint32 scratch; part: (T, max(2, 9 Cin), Cout) double scratch. */
int stem_backward(const uint16_t* xp, const double* gram, const float* cw, int N, int H, int W, int Cin, int Cout,
                  const float* weight, const float* bias, float eps, const uint8_t* idx, const uint16_t* ymax,
                  const uint16_t* g, const float* mean, const float* var, uint32_t* xi, float* dcw, float* dweight,
                  float* dbias, double* part, int T) {
    if (stem_unsupported(H, W, Cin, Cout)) return -1;
    double inv[STEM_MAX_COUT], w[STEM_MAX_COUT * 9 * STEM_MAX_CIN];
    float scale[STEM_MAX_COUT], shift[STEM_MAX_COUT], b[STEM_MAX_COUT], cc[STEM_MAX_COUT];
    bn_affine(weight, bias, mean, var, eps, Cout, inv, scale, shift);
    bn_act_bwd_sums(NULL, 1, N, H, W, Cout, scale, shift, mean, 1, idx, ymax, g, part, T);
    bn_grad_terms(part, T, Cout, (double)N * H * W, inv, scale, dweight, dbias, b, cc);
    const long WP = W + 2, rows = (long)N * (H + 2);
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < rows; t++) {
        uint32_t* o = xi + t * WP * Cin;
        pair_rows(xp + t * WP * Cin, Cin, (WP - 1) * Cin, o);
        memset(o + (WP - 1) * Cin, 0, (size_t)Cin * 4);
    }
    StemArgs a = {.xi = xi, .H = H, .W = W, .Cout = Cout, .idx = (uint8_t*)idx, .g = g};
    const int D = 9 * Cin * Cout, Q = 9 * Cin;
    long R = (long)N * (H / 2);
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        double* dw = part + (long)t * D;
        for (int e = 0; e < D; e++) dw[e] = 0.0;
        for (long r = R * t / T; r < R * (t + 1) / T; r++) { STEM_CALL(stem_wgrad_row, &a, r, dw) }
    }
    /* dW = scale (sum gz p^T) + b (w^T G - mean S^T) + c S^T: the pass above gave the first sum, G and S the rest */
    stem_patch_weights(cw, Cin, Cout, w);
    const double* S = gram + Q * Q;
    for (int co = 0; co < Cout; co++) {
        double wg[9 * STEM_MAX_CIN];                    /* w^T G = G w: G is symmetric */
        gram_times(gram, w + co * Q, Q, wg);
        for (int q = 0; q < Q; q++) {
            double v = 0.0;
            for (int t = 0; t < T; t++) v += part[(long)t * D + ((co / 16) * Q + q) * 16 + co % 16];
            v = scale[co] * v + b[co] * (wg[q] - (double)mean[co] * S[q]) + cc[co] * S[q];
            int rs = q / Cin, ci = q % Cin;
            dcw[((co * Cin + ci) * 3 + rs / 3) * 3 + rs % 3] = (float)v;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
 * The weight gradient of a 3x3 conv (stride 1, zero padding 1), bf16 in, f32 out: dW[co, ci, r, s] =
 * sum over pixels p of dy[p, co] x[p + (r - 1, s - 1), ci].
 *
 * Why: oneDNN runs this at ~270 GFLOP/s on the cnn's stages 2 and 3 where its forward runs at ~440 (2-core Zen 4),
 * and it is a third of the colour step's convolution time. Here it is one register-tiled loop of AVX512-BF16 dot
 * products, each summing two horizontally neighbouring pixels: per image, dy is rewritten as pairs dyi[h][w/2][co]
 * = (dy[h][w][co], dy[h][w + 1][co]) and the padded input as xi[h][w][ci] = (x[h][w][ci], x[h][w + 1][ci]) (both
 * a few tens of KB: L1/L2; the next image's inputs are prefetched meanwhile), then a tile of 4 x 16 output
 * channels x 4 input channels at one (r, s) lives in 16 accumulators while it sweeps the image's pixel pairs: per pair 4 loads of dyi, 4 broadcasts of xi, 16 dot
 * products. Each thread sums its images into its own f32 dW; the threads' are added at the end.
 * Takes Ci % 4 == 0, Co % 16 == 0 (conv3x3_wgrad checks); in an odd row the last pixel pairs with a zero.
 * ------------------------------------------------------------------------------------------------------------ */
#define WG_KT 4                                           /* input channels per tile */

/* One image's pairs: xi (H + 2, W + 2, Ci) = (xpad[h][w][c], xpad[h][w + 1][c]) for x (H, W, Ci) zero-padded
 * (written straight from x: no padded copy), and dyi (H, (W + 1) / 2, Co) from dy (H, W, Co) */
static void wg_pairs(const uint16_t* x, const uint16_t* dy, int H, int W, int Ci, int Co, uint32_t* xi,
                     uint32_t* dyi) {
    const long WP = W + 2, row = WP * Ci;
    memset(xi, 0, (size_t)row * 4);
    memset(xi + (H + 1) * row, 0, (size_t)row * 4);
    h16v zero = {0};
    for (int h = 0; h < H; h++) {
        const uint16_t* xr = x + (long)h * W * Ci;
        uint32_t* o = xi + (h + 1) * row;
        for (int wp = 0; wp < WP; wp++) {                /* xpad column wp is x column wp - 1 */
            const uint16_t* left = wp >= 1 && wp <= W ? xr + (long)(wp - 1) * Ci : NULL;
            const uint16_t* right = wp + 1 <= W ? xr + (long)wp * Ci : NULL;
            int c = 0;
            for (; c + 16 <= Ci; c += 16) {
                h16v a = zero, b = zero;
                if (left) memcpy(&a, left + c, 32);
                if (right) memcpy(&b, right + c, 32);
                u16v v = __builtin_convertvector(a, u16v) | (__builtin_convertvector(b, u16v) << 16);
                memcpy(o + (long)wp * Ci + c, &v, 64);
            }
            for (; c < Ci; c++)
                o[(long)wp * Ci + c] = (left ? left[c] : 0u) | (uint32_t)(right ? right[c] : 0u) << 16;
        }
    }
    const int W2 = (W + 1) / 2;
    for (int h = 0; h < H; h++) {
        for (int w2 = 0; w2 < W / 2; w2++)
            pair_rows(dy + ((long)h * W + 2 * w2) * Co, Co, Co, dyi + ((long)h * W2 + w2) * Co);
        if (W % 2)                                    /* an odd row's last pixel pairs with a zero gradient */
            for (int c = 0; c < Co; c++) dyi[((long)h * W2 + W2 - 1) * Co + c] = dy[((long)h * W + W - 1) * Co + c];
    }
}

/* the next image's x and dy, fetched into cache a slice per tile while this one computes: read only when its
 * pairs are built, they stall on memory (that took ~15% of the kernel's time) */
typedef struct { const char *x, *dy; long x_bytes, dy_bytes; } Prefetch;

static inline void prefetch_slice(const char* p, long bytes, long slice, long slices) {
    long per = (bytes + 64 * slices - 1) / (64 * slices);
    for (long q = slice * per; q < (slice + 1) * per && 64 * q < bytes; q++) __builtin_prefetch(p + 64 * q);
}

/* acc (9, Ci, Co) f32 += this image's dW, tile by tile; CT: 16-channel output blocks per tile */
ALWAYS_INLINE void wg_image(const uint32_t* xi, const uint32_t* dyi, int H, int W, int Ci, int Co, float* acc,
                            const Prefetch* next, const int CT) {
    const long WP = W + 2, W2 = (W + 1) / 2;
    const long tiles = 9L * (Ci / WG_KT) * (Co / (16 * CT));
    long tile = 0;
    for (int rs = 0; rs < 9; rs++) {
        const int r = rs / 3, s = rs % 3;
        for (int c0 = 0; c0 < Ci; c0 += WG_KT)
            for (int o0 = 0; o0 < Co; o0 += 16 * CT, tile++) {
                prefetch_slice(next->x, next->x_bytes, tile, tiles);
                prefetch_slice(next->dy, next->dy_bytes, tile, tiles);
                v16 a[WG_KT][4];                        /* fixed sizes: a VLA would live in memory */
                float* t = acc + ((long)rs * Ci + c0) * Co + o0;
                for (int k = 0; k < WG_KT; k++)
                    for (int c = 0; c < CT; c++) a[k][c] = ld_f32(t + (long)k * Co + 16 * c);
                for (int h = 0; h < H; h++) {
                    const uint32_t* xr = xi + ((long)(h + r) * WP + s) * Ci + c0;
                    const uint32_t* dr = dyi + (long)h * W2 * Co + o0;
                    for (int w2 = 0; w2 < W2; w2++) {
                        u16v d[4];
                        for (int c = 0; c < CT; c++) d[c] = ld_u32(dr + w2 * Co + 16 * c);
                        const uint16_t* xv = (const uint16_t*)(xr + 2 * w2 * Ci);
                        for (int k = 0; k < WG_KT; k++)
                            for (int c = 0; c < CT; c++) a[k][c] = dp2(a[k][c], d[c], xv + 2 * k);
                    }
                }
                for (int k = 0; k < WG_KT; k++)
                    for (int c = 0; c < CT; c++) st_f32(t + (long)k * Co + 16 * c, a[k][c]);
            }
    }
}

/* dw (Co, Ci, 3, 3) = the sum, in double, of T threads' f32 partial sums (9, Ci, Co), per floats apart */
static void wgrad_sum_threads(const float* scratch, long per, int T, int Ci, int Co, float* dw) {
    #pragma omp parallel for schedule(static)
    for (int co = 0; co < Co; co++)
        for (int ci = 0; ci < Ci; ci++)
            for (int rs = 0; rs < 9; rs++) {
                double v = 0.0;
                for (int t = 0; t < T; t++) v += scratch[t * per + ((long)rs * Ci + ci) * Co + co];
                dw[((long)co * Ci + ci) * 9 + rs] = (float)v;
            }
}

/* x (N, H, W, Ci), dy (N, H, W, Co) bf16 -> dw (Co, Ci, 3, 3) f32. scratch: T x conv3x3_wgrad_scratch(...) floats. */
long conv3x3_wgrad_scratch(int H, int W, int Ci, int Co) {
    long xi = (long)(H + 2) * (W + 2) * Ci, dyi = (long)H * ((W + 1) / 2) * Co, acc = 9L * Ci * Co;
    return ((xi + dyi + acc + 15) / 16) * 16;
}

int conv3x3_wgrad(const uint16_t* x, const uint16_t* dy, int N, int H, int W, int Ci, int Co, float* dw,
                  float* scratch, int T) {
    if (Ci % WG_KT || Co % 16 || W > 256) return -1;
    const long per = conv3x3_wgrad_scratch(H, W, Ci, Co), D = 9L * Ci * Co;
    const int CB = Co / 16;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float* acc = scratch + t * per;
        uint32_t* xi = (uint32_t*)(acc + D);
        uint32_t* dyi = xi + (long)(H + 2) * (W + 2) * Ci;
        memset(acc, 0, D * 4);
        long n1 = (long)N * (t + 1) / T;
        for (long n = (long)N * t / T; n < n1; n++) {
            wg_pairs(x + n * H * W * Ci, dy + n * H * W * Co, H, W, Ci, Co, xi, dyi);
            const Prefetch next = {(const char*)(x + (n + 1) * H * W * Ci), (const char*)(dy + (n + 1) * H * W * Co),
                                   n + 1 < n1 ? (long)H * W * Ci * 2 : 0, n + 1 < n1 ? (long)H * W * Co * 2 : 0};
            if (CB % 4 == 0) wg_image(xi, dyi, H, W, Ci, Co, acc, &next, 4);
            else if (CB % 2 == 0) wg_image(xi, dyi, H, W, Ci, Co, acc, &next, 2);
            else wg_image(xi, dyi, H, W, Ci, Co, acc, &next, 1);
        }
    }
    wgrad_sum_threads(scratch, per, T, Ci, Co, dw);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
 * The same weight gradient in f32, on the native vector: dW[co, ci, r, s] = sum over pixels p of
 * dy[p, co] x[p + (r - 1, s - 1), ci], x (N, H, W, Ci) and dy (N, H, W, Co) f32 -> dw (Co, Ci, 3, 3) f32.
 *
 * Why: on a CPU without native bf16 the encoders train in f32, and there oneDNN runs this at ~120 GFLOP/s where its
 * forward and input gradient run at ~190 (stages 2 and 3 of the cnn at 32 px, 2-core Zen 3): the weight gradient was
 * the step's slowest convolution pass. Here a tile of KT input channels x CT vectors of output channels at one
 * tap (r, s) lives in registers while it sweeps one image's pixels (a few tens of KB: L1/L2): per pixel CT loads
 * of dy, KT broadcasts of x, KT x CT FMAs (wf_image says which KT and CT). The tap's zero padding is the sweep's bounds (the rows and columns
 * whose neighbour lies outside contribute nothing), so no padded copy is built. Each thread sums its images into
 * its own f32 dW; the threads' are added in double at the end. Takes Ci % 4 == 0 and Co % VL == 0.
 * ------------------------------------------------------------------------------------------------------------ */
/* acc (9, Ci, Co) += one image's dW at tap rs for input channels c0 .. c0 + KT - 1 and output channels o0 ..
 * o0 + VL CT - 1: KT x CT accumulators (KT, CT constants where inlined) */
ALWAYS_INLINE void wf_tile(const float* x, const float* dy, int H, int W, int Ci, int Co, float* acc, int rs, int c0,
                           int o0, const int KT, const int CT) {
    const int r = rs / 3 - 1, s = rs % 3 - 1;                /* output pixel (h, w) meets input pixel (h + r, w + s) */
    const int h0 = r < 0, h1 = H - (r > 0), w0 = s < 0, w1 = W - (s > 0);
    vf a[6][4];                                             /* fixed sizes: a VLA would live in memory */
    float* t = acc + ((long)rs * Ci + c0) * Co + o0;
    for (int k = 0; k < KT; k++)
        for (int c = 0; c < CT; c++) a[k][c] = nld_f32(t + (long)k * Co + VL * c);
    for (int h = h0; h < h1; h++) {
        const float* dr = dy + (long)h * W * Co + o0;
        const float* xr = x + ((long)(h + r) * W + s) * Ci + c0;
        for (int w = w0; w < w1; w++) {
            vf d[4];
            for (int c = 0; c < CT; c++) d[c] = nld_f32(dr + (long)w * Co + VL * c);
            const float* xv = xr + (long)w * Ci;
            for (int k = 0; k < KT; k++)                    /* vector x scalar: one broadcast from memory */
                for (int c = 0; c < CT; c++) a[k][c] += d[c] * xv[k];
        }
    }
    for (int k = 0; k < KT; k++)
        for (int c = 0; c < CT; c++) nst_f32(t + (long)k * Co + VL * c, a[k][c]);
}

/* acc (9, Ci, Co) += one image's dW. Tiles of 6 input channels (the last 2 or 4 where 6 does not divide Ci): with
 * CT = 2 that is 12 accumulators, 2 loads and 6 broadcasts per pixel, BLIS's 6 x 16 shape for AVX2's 16 registers;
 * the FMAs (4 cycles' latency, 2 a cycle) then never wait for one another. A block of output channels stays in L1
 * while every tap and input channel sweeps it. */
ALWAYS_INLINE void wf_image(const float* x, const float* dy, int H, int W, int Ci, int Co, float* acc, const int CT) {
    for (int o0 = 0; o0 < Co; o0 += VL * CT)
        for (int rs = 0; rs < 9; rs++) {
            int c0 = 0;
            for (; c0 + 6 <= Ci; c0 += 6) wf_tile(x, dy, H, W, Ci, Co, acc, rs, c0, o0, 6, CT);
            if (Ci - c0 == 4) wf_tile(x, dy, H, W, Ci, Co, acc, rs, c0, o0, 4, CT);
            else if (Ci - c0 == 2) wf_tile(x, dy, H, W, Ci, Co, acc, rs, c0, o0, 2, CT);
        }
}

long conv3x3_wgrad_f32_scratch(int Ci, int Co) { return ((9L * Ci * Co + 15) / 16) * 16; }

/* scratch: T x conv3x3_wgrad_f32_scratch(Ci, Co) floats */
int conv3x3_wgrad_f32(const float* x, const float* dy, int N, int H, int W, int Ci, int Co, float* dw,
                      float* scratch, int T) {
    if (Ci % 4 || Co % VL) return -1;
    const long per = conv3x3_wgrad_f32_scratch(Ci, Co), D = 9L * Ci * Co;
    /* output vectors per tile: as many as the registers hold beside the tile's dy and broadcast (16 on AVX2, 32 on
     * AVX-512) and Co / VL divides */
    const int CB = Co / VL, CT = VL == 16 && CB % 4 == 0 ? 4 : CB % 2 == 0 ? 2 : 1;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float* acc = scratch + t * per;
        memset(acc, 0, D * 4);
        for (long n = (long)N * t / T; n < (long)N * (t + 1) / T; n++) {
            const float* xn = x + n * H * W * Ci;
            const float* dn = dy + n * H * W * Co;
            if (CT == 4) wf_image(xn, dn, H, W, Ci, Co, acc, 4);
            else if (CT == 2) wf_image(xn, dn, H, W, Ci, Co, acc, 2);
            else wf_image(xn, dn, H, W, Ci, Co, acc, 1);
        }
    }
    wgrad_sum_threads(scratch, per, T, Ci, Co, dw);
    return 0;
}

/* ---------------------------------------------------------------- a 3x3 conv in f32 by Winograd's algorithm
 *
 * oneDNN's direct f32 conv runs at this CPU's peak, so only less arithmetic makes it faster. Winograd's F(m x m, 3x3)
 * computes an m x m output tile as y_tile = A^T [ U (.) (B^T d B) ] A, d the tile's (m + 2)^2 input patch, U = G w G^T
 * the transformed weight (winograd_weight_f32). Summed over Ci, (.) is one GEMM per transformed position p: (m + 2)^2
 * multiply-adds per tile and channel pair where the direct conv needs 9 m^2, and the transforms are a few additions
 * per value.
 *  - The conv (forward, and the input gradient: the same conv of dy with the filters flipped and transposed) uses
 *    F(4x4, 3x3): 36 for 144, 4x fewer. Its constants (up to 5 in B, 8 in A, 1/24 in G) cost accuracy: about 1e-5
 *    of the output's scale from float64 where the direct f32 sum is within 1e-6 (tests/test_kernels.py).
 *  - The weight gradient uses F(2x2, 3x3): 16 for 36, 2.25x fewer, as exact as the direct sum (B and A hold only
 *    +-1). F(4x4)'s 36 x Ci x Co accumulator would not stay in L2 (1.2 MB at 64 -> 128 channels).
 * Blocks of tiles are transformed into a per-thread V (P, tiles, Ci), P = (m + 2)^2, that stays in L2 while every
 * block of 16 output channels sweeps it, so the transformed data never goes to memory. U is packed (Co / 16, P, Ci,
 * 16): one channel block's P GEMMs read one contiguous run. */
#define WN (16 / VL)        /* native vectors per block of 16 output channels */
#define F4_TILES 12         /* tiles per block of the conv: measured best of 12, 18, 24 on a Zen 3 (V: 221 KB at
                               Ci = 128) */
#define F2_TILES 30         /* of the weight gradient: best of 18, 30, 48, 72 */

/* the 6-point transforms of F(4x4, 3x3) along one axis: B^T d (6 -> 6) and A^T m (6 -> 4) */
ALWAYS_INLINE void bt6(const vf* d, vf* o) {
    o[0] = 4.f * d[0] - 5.f * d[2] + d[4];
    o[1] = d[3] + d[4] - 4.f * (d[1] + d[2]);
    o[2] = d[4] - d[3] + 4.f * (d[1] - d[2]);
    o[3] = d[4] - d[2] + 2.f * (d[3] - d[1]);
    o[4] = d[4] - d[2] + 2.f * (d[1] - d[3]);
    o[5] = 4.f * d[1] - 5.f * d[3] + d[5];
}

ALWAYS_INLINE void at6(const vf* m, vf* o) {
    const vf s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    o[0] = m[0] + s12 + s34; o[1] = d12 + 2.f * d34; o[2] = s12 + 4.f * s34; o[3] = d12 + 8.f * d34 + m[5];
}

/* Tile g (numbered image by image, row by row, TW a row) of an m x m tiling: its image and first output pixel */
ALWAYS_INLINE long tile_at(long g, long per, int TW, int m, int* h0, int* w0) {
    const int r = g % per;
    *h0 = m * (r / TW); *w0 = m * (r % TW);
    return g / per;
}

/* The input pixel (h, w) of image xn, 0 outside it (the conv's zero padding) */
ALWAYS_INLINE vf pixel_or_zero(const float* xn, int h, int w, int H, int W, int Ci) {
    vf z = {0};
    return h >= 0 && h < H && w >= 0 && w < W ? nld_f32(xn + ((long)h * W + w) * Ci) : z;
}

/* V (36, F4_TILES, Ci) <- B^T d B for tiles g0 .. g0 + nt of the 4x4 tiling */
static void f4_input(const float* x, int H, int W, int Ci, long g0, int nt, int TH, int TW, float* V) {
    for (int t = 0; t < nt; t++) {
        int h0, w0;
        const long n = tile_at(g0 + t, (long)TH * TW, TW, 4, &h0, &w0);
        const float* xn = x + n * H * W * Ci;
        for (int c = 0; c < Ci; c += VL) {
            vf d[6][6], u[6][6];                            /* d[j][i]: column j, row i */
            for (int i = 0; i < 6; i++)
                for (int j = 0; j < 6; j++) d[j][i] = pixel_or_zero(xn + c, h0 - 1 + i, w0 - 1 + j, H, W, Ci);
            for (int j = 0; j < 6; j++) bt6(d[j], u[j]);    /* B^T d, a column at a time */
            for (int i = 0; i < 6; i++) {                   /* (B^T d) B, a row at a time */
                vf row[6], o[6];
                for (int j = 0; j < 6; j++) row[j] = u[j][i];
                bt6(row, o);
                for (int j = 0; j < 6; j++) nst_f32(V + ((long)(6 * i + j) * F4_TILES + t) * Ci + c, o[j]);
            }
        }
    }
}

/* a[k] += e[k * es] b for k < KT, b the 16 floats at b16 (WN native vectors): one step of a KT x 16 register tile
 * (6 x 16 on AVX2: BLIS's shape, 12 accumulators beside 2 loads and a broadcast, as in wf_tile) */
ALWAYS_INLINE void rank1_6x16(vf a[6][WN], const float* b16, const float* e, long es, const int KT) {
    vf b[WN];
    for (int c = 0; c < WN; c++) b[c] = nld_f32(b16 + VL * c);
    for (int k = 0; k < KT; k++) {
        const float ek = e[k * es];
        for (int c = 0; c < WN; c++) a[k][c] += b[c] * ek;
    }
}

/* M (36, F4_TILES, 16) <- V_p U_p for tiles t0 .. t0 + KT of the block, one 16-channel block u of U: a KT x 16
 * register tile swept over the input channels */
ALWAYS_INLINE void wino_gemm(const float* V, const float* u, int Ci, int t0, float* M, const int KT) {
    for (int p = 0; p < 36; p++) {
        vf a[6][WN], z = {0};
        for (int k = 0; k < KT; k++)
            for (int c = 0; c < WN; c++) a[k][c] = z;
        const float* v = V + ((long)p * F4_TILES + t0) * Ci;
        const float* up = u + (long)p * Ci * 16;
        for (int ci = 0; ci < Ci; ci++) rank1_6x16(a, up + ci * 16, v + ci, Ci, KT);
        float* m = M + ((long)p * F4_TILES + t0) * 16;
        for (int k = 0; k < KT; k++)
            for (int c = 0; c < WN; c++) nst_f32(m + k * 16 + VL * c, a[k][c]);
    }
}

/* y's channels o0 .. o0 + 16 of tiles g0 .. g0 + nt <- A^T M A (the outputs inside the image) */
static void f4_output(const float* M, int H, int W, int Co, int o0, long g0, int nt, int TH, int TW, float* y) {
    for (int t = 0; t < nt; t++) {
        int h0, w0;
        const long n = tile_at(g0 + t, (long)TH * TW, TW, 4, &h0, &w0);
        for (int c = 0; c < 16; c += VL) {
            vf q[4][6];                                     /* A^T M, a column at a time */
            for (int j = 0; j < 6; j++) {
                vf col[6], o[4];
                for (int i = 0; i < 6; i++) col[i] = nld_f32(M + ((long)(6 * i + j) * F4_TILES + t) * 16 + c);
                at6(col, o);
                for (int i = 0; i < 4; i++) q[i][j] = o[i];
            }
            for (int i = 0; i < 4 && h0 + i < H; i++) {     /* (A^T M) A, a row at a time */
                vf o[4];
                at6(q[i], o);
                float* yo = y + ((n * H + h0 + i) * W + w0) * Co + o0 + c;
                for (int j = 0; j < 4 && w0 + j < W; j++) nst_f32(yo + (long)j * Co, o[j]);
            }
        }
    }
}

/* U (Co / 16, 36, Ci, 16) <- G w G^T of F(4x4, 3x3) for w (Co, Ci, 3, 3), summed in double and rounded once, written
 * straight into the packed layout */
void winograd_weight_f32(const float* w, int Co, int Ci, float* U) {
    static const double G[6][3] = {{1 / 4., 0, 0}, {-1 / 6., -1 / 6., -1 / 6.}, {-1 / 6., 1 / 6., -1 / 6.},
                                   {1 / 24., 1 / 12., 1 / 6.}, {1 / 24., -1 / 12., 1 / 6.}, {0, 0, 1}};
    #pragma omp parallel for collapse(2) schedule(static)
    for (int ob = 0; ob < Co / 16; ob++)
        for (int i = 0; i < Ci; i++) {
            float u[36][16];                                 /* 16 output channels' 36 positions, then 16-float runs */
            for (int k = 0; k < 16; k++) {
                const float* f = w + ((long)(16 * ob + k) * Ci + i) * 9;
                double gf[6][3];
                for (int a = 0; a < 6; a++)
                    for (int c = 0; c < 3; c++) gf[a][c] = G[a][0] * f[c] + G[a][1] * f[3 + c] + G[a][2] * f[6 + c];
                for (int a = 0; a < 6; a++)
                    for (int b = 0; b < 6; b++)
                        u[6 * a + b][k] = (float)(gf[a][0] * G[b][0] + gf[a][1] * G[b][1] + gf[a][2] * G[b][2]);
            }
            for (int p = 0; p < 36; p++) memcpy(U + (((long)ob * 36 + p) * Ci + i) * 16, u[p], sizeof u[p]);
        }
}

long conv3x3_winograd_f32_scratch(int Ci) { return 36L * F4_TILES * (Ci + 16); }

/* x (N, H, W, Ci), U (Co / 16, 36, Ci, 16) -> y (N, H, W, Co), all f32, by F(4x4, 3x3); Ci % VL == 0 and
 * Co % 16 == 0. scratch: T x conv3x3_winograd_f32_scratch(Ci) floats */
int conv3x3_winograd_f32(const float* x, const float* U, int N, int H, int W, int Ci, int Co, float* y,
                         float* scratch, int T) {
    if (Ci % VL || Co % 16) return -1;
    const int TH = (H + 3) / 4, TW = (W + 3) / 4;
    const long tiles = (long)N * TH * TW, blocks = (tiles + F4_TILES - 1) / F4_TILES;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float* V = scratch + t * conv3x3_winograd_f32_scratch(Ci);
        float* M = V + 36L * F4_TILES * Ci;
        for (long b = blocks * t / T; b < blocks * (t + 1) / T; b++) {
            const long g0 = b * F4_TILES;
            const int nt = tiles - g0 < F4_TILES ? (int)(tiles - g0) : F4_TILES;
            f4_input(x, H, W, Ci, g0, nt, TH, TW, V);
            for (int o0 = 0; o0 < Co; o0 += 16) {
                const float* u = U + (long)o0 * 36 * Ci;
                int t0 = 0;
                for (; t0 + 6 <= nt; t0 += 6) wino_gemm(V, u, Ci, t0, M, 6);
                switch (nt - t0) {                           /* the last block's remainder */
                    case 5: wino_gemm(V, u, Ci, t0, M, 5); break;
                    case 4: wino_gemm(V, u, Ci, t0, M, 4); break;
                    case 3: wino_gemm(V, u, Ci, t0, M, 3); break;
                    case 2: wino_gemm(V, u, Ci, t0, M, 2); break;
                    case 1: wino_gemm(V, u, Ci, t0, M, 1); break;
                }
                f4_output(M, H, W, Co, o0, g0, nt, TH, TW, y);
            }
        }
    }
    return 0;
}

/* The weight gradient by F(2x2, 3x3): the forward is linear in U, so dU_p (Ci, Co) = the sum over tiles of
 * V_p^T dM_p, where dM = A dy A^T carries a tile's 2x2 output gradient back to its 16 positions (zero where the tile
 * runs past the image), and dW = G^T dU G (f2_wgrad_finish): 16 GEMMs of K = the tiles. */

/* V (16, F2_TILES, Ci) <- B^T d B for tiles g0 .. g0 + nt of the 2x2 tiling */
static void f2_input(const float* x, int H, int W, int Ci, long g0, int nt, int TH, int TW, float* V) {
    const long s = (long)F2_TILES * Ci;
    for (int t = 0; t < nt; t++) {
        int h0, w0;
        const long n = tile_at(g0 + t, (long)TH * TW, TW, 2, &h0, &w0);
        const float* xn = x + n * H * W * Ci;
        for (int c = 0; c < Ci; c += VL) {
            vf d[4][4], u[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) d[i][j] = pixel_or_zero(xn + c, h0 - 1 + i, w0 - 1 + j, H, W, Ci);
            for (int j = 0; j < 4; j++) {                    /* B^T d: rows */
                u[0][j] = d[0][j] - d[2][j]; u[1][j] = d[1][j] + d[2][j];
                u[2][j] = d[2][j] - d[1][j]; u[3][j] = d[1][j] - d[3][j];
            }
            for (int i = 0; i < 4; i++) {                    /* (B^T d) B: columns */
                float* o = V + ((long)4 * i * F2_TILES + t) * Ci + c;
                nst_f32(o, u[i][0] - u[i][2]); nst_f32(o + s, u[i][1] + u[i][2]);
                nst_f32(o + 2 * s, u[i][2] - u[i][1]); nst_f32(o + 3 * s, u[i][1] - u[i][3]);
            }
        }
    }
}

/* dM (16, F2_TILES, 16) <- A dy A^T for channels o0 .. o0 + 16 of tiles g0 .. g0 + nt */
static void f2_dy(const float* dy, int H, int W, int Co, int o0, long g0, int nt, int TH, int TW, float* dM) {
    const long s = (long)F2_TILES * 16;
    for (int t = 0; t < nt; t++) {
        int h0, w0;
        const long n = tile_at(g0 + t, (long)TH * TW, TW, 2, &h0, &w0);
        const float* dn = dy + n * H * W * Co + o0;
        for (int c = 0; c < 16; c += VL) {
            vf d[2][2], q[4][2];
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++) d[i][j] = pixel_or_zero(dn + c, h0 + i, w0 + j, H, W, Co);
            for (int j = 0; j < 2; j++) {                    /* A dy: rows */
                q[0][j] = d[0][j]; q[1][j] = d[0][j] + d[1][j]; q[2][j] = d[0][j] - d[1][j]; q[3][j] = -d[1][j];
            }
            for (int i = 0; i < 4; i++) {                    /* (A dy) A^T: columns */
                float* o = dM + ((long)4 * i * F2_TILES + t) * 16 + c;
                nst_f32(o, q[i][0]); nst_f32(o + s, q[i][0] + q[i][1]);
                nst_f32(o + 2 * s, q[i][0] - q[i][1]); nst_f32(o + 3 * s, -q[i][1]);
            }
        }
    }
}

/* du (16, Ci, 16), one 16-channel block of dU, += V_p^T dM_p for input channels c0 .. c0 + KT over nt tiles: a
 * KT x 16 register tile swept over the tiles */
ALWAYS_INLINE void f2_wgrad_tile(const float* V, const float* dM, int Ci, int nt, int c0, float* du, const int KT) {
    for (int p = 0; p < 16; p++) {
        vf a[6][WN];
        float* o = du + ((long)p * Ci + c0) * 16;
        for (int k = 0; k < KT; k++)
            for (int c = 0; c < WN; c++) a[k][c] = nld_f32(o + k * 16 + VL * c);
        const float* v = V + (long)p * F2_TILES * Ci + c0;
        const float* m = dM + (long)p * F2_TILES * 16;
        for (int t = 0; t < nt; t++) rank1_6x16(a, m + t * 16, v + (long)t * Ci, 1, KT);
        for (int k = 0; k < KT; k++)
            for (int c = 0; c < WN; c++) nst_f32(o + k * 16 + VL * c, a[k][c]);
    }
}

/* dw (Co, Ci, 3, 3) <- G^T dU G of F(2x2, 3x3), dU the sum, in double, of T threads' (Co / 16, 16, Ci, 16) partial
 * sums, per floats apart */
static void f2_wgrad_finish(const float* scratch, long per, int T, int Ci, int Co, float* dw) {
    static const double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
    #pragma omp parallel for collapse(2) schedule(static)
    for (int ob = 0; ob < Co / 16; ob++)
        for (int i = 0; i < Ci; i++) {
            double du[16][16] = {{0}};                       /* [position][output channel k of the block] */
            for (int t = 0; t < T; t++)
                for (int p = 0; p < 16; p++) {
                    const float* run = scratch + t * per + (((long)ob * 16 + p) * Ci + i) * 16;
                    for (int k = 0; k < 16; k++) du[p][k] += run[k];
                }
            for (int k = 0; k < 16; k++) {
                double gd[3][4];                             /* G^T dU, then (G^T dU) G */
                for (int r = 0; r < 3; r++)
                    for (int b = 0; b < 4; b++)
                        gd[r][b] = G[0][r] * du[b][k] + G[1][r] * du[4 + b][k] + G[2][r] * du[8 + b][k]
                                   + G[3][r] * du[12 + b][k];
                float* o = dw + ((long)(16 * ob + k) * Ci + i) * 9;
                for (int r = 0; r < 3; r++)
                    for (int c = 0; c < 3; c++)
                        o[3 * r + c] = (float)(gd[r][0] * G[0][c] + gd[r][1] * G[1][c] + gd[r][2] * G[2][c]
                                               + gd[r][3] * G[3][c]);
            }
        }
}

long conv3x3_winograd_wgrad_f32_scratch(int Ci, int Co) { return 16L * (F2_TILES * (Ci + 16) + (long)Ci * Co); }

/* x (N, H, W, Ci) and dy (N, H, W, Co) f32 -> dw (Co, Ci, 3, 3) f32 by F(2x2, 3x3); Ci % VL == 0, Ci % 2 == 0 and
 * Co % 16 == 0. scratch: T x conv3x3_winograd_wgrad_f32_scratch(Ci, Co) floats (each thread's dU first) */
int conv3x3_winograd_wgrad_f32(const float* x, const float* dy, int N, int H, int W, int Ci, int Co, float* dw,
                               float* scratch, int T) {
    if (Ci % VL || Ci % 2 || Co % 16) return -1;
    const int TH = (H + 1) / 2, TW = (W + 1) / 2;
    const long tiles = (long)N * TH * TW, blocks = (tiles + F2_TILES - 1) / F2_TILES;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float* du = scratch + t * conv3x3_winograd_wgrad_f32_scratch(Ci, Co);
        float* V = du + 16L * Ci * Co;
        float* dM = V + 16L * F2_TILES * Ci;
        memset(du, 0, 16L * Ci * Co * 4);
        for (long b = blocks * t / T; b < blocks * (t + 1) / T; b++) {
            const long g0 = b * F2_TILES;
            const int nt = tiles - g0 < F2_TILES ? (int)(tiles - g0) : F2_TILES;
            f2_input(x, H, W, Ci, g0, nt, TH, TW, V);
            for (int o0 = 0; o0 < Co; o0 += 16) {
                float* dub = du + (long)o0 * 16 * Ci;
                f2_dy(dy, H, W, Co, o0, g0, nt, TH, TW, dM);
                int c0 = 0;
                for (; c0 + 6 <= Ci; c0 += 6) f2_wgrad_tile(V, dM, Ci, nt, c0, dub, 6);
                if (Ci - c0 == 4) f2_wgrad_tile(V, dM, Ci, nt, c0, dub, 4);
                else if (Ci - c0 == 2) f2_wgrad_tile(V, dM, Ci, nt, c0, dub, 2);
            }
        }
    }
    f2_wgrad_finish(scratch, conv3x3_winograd_wgrad_f32_scratch(Ci, Co), T, Ci, Co, dw);
    return 0;
}

/* VL: the native vector's floats (fastclr/kernels.py picks the f32 weight gradient by it) */
int native_lanes(void) { return VL; }

/* 1 where dp2 is one AVX512-BF16 instruction (fastclr uses the stem and the weight gradient only there) */
int has_bf16_dot(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
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
