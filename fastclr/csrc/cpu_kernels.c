/* fastclr CPU kernels: the encoders' 2x2 max-pool + ReLU, and the tutorial net's first block
 * (3x3 conv with one input channel -> 2x2 max-pool -> ReLU), forward and backward.
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
void pool_relu_fwd(const void* x, int x_bf, int N, int H, int W, int C, void* out, int out_bf, uint8_t* idx) {
    int H2 = H / 2, W2 = W / 2;
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < (long)N * H2; r++) {
        long n = r / H2, i = r % H2;
        v16 zero = {0};
        for (int j = 0; j < W2; j++)
            for (int cb = 0; cb < C; cb += 16) {
                long i00 = ((n * H + 2 * i) * W + 2 * j) * C + cb, i10 = i00 + (long)W * C, o = (r * W2 + j) * C + cb;
                i16v k;
                v16 m = argmax4(ld(x, i00, x_bf), ld(x, i00 + C, x_bf), ld(x, i10, x_bf), ld(x, i10 + C, x_bf), &k);
                st(out, o, sel(m > zero, m, zero), out_bf);
                st_idx(idx + o, k);
            }
    }
}

/* Gradient of pool_relu_fwd: g, out, idx (N, H/2, W/2, C) -> gx (N, H, W, C), every element written. */
void pool_relu_bwd(const void* g, int g_bf, const void* out, int out_bf, const uint8_t* idx,
                   int N, int H, int W, int C, void* gx, int gx_bf) {
    int H2 = H / 2, W2 = W / 2;
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < (long)N * H2; r++) {
        long n = r / H2, i = r % H2;
        v16 zero = {0};
        for (int j = 0; j < W2; j++)
            for (int cb = 0; cb < C; cb += 16) {
                long i00 = ((n * H + 2 * i) * W + 2 * j) * C + cb, i10 = i00 + (long)W * C, o = (r * W2 + j) * C + cb;
                v16 gv = ld(g, o, g_bf);
                gv = sel(ld(out, o, out_bf) > zero, gv, zero);
                i16v k = ld_idx(idx + o);
                st(gx, i00, route(gv, k, 0), gx_bf);
                st(gx, i00 + C, route(gv, k, 1), gx_bf);
                st(gx, i10, route(gv, k, 2), gx_bf);
                st(gx, i10 + C, route(gv, k, 3), gx_bf);
            }
    }
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
