/* The first block of a grey-scale conv net (a 3 x 3 convolution with one input channel and zero
 * padding 1, then a ReLU) as one pass over the image, in either of two forms:
 *
 *   P = 4:  conv (stride 1), 2 x 2 max-pool, ReLU       (the max-pool net, conv4_pool)
 *   P = 1:  conv (stride 2), ReLU                       (the strided net, conv4_stride)
 *
 * so that the full-size convolution output is never written, read, zeroed or scattered into.
 * metatl/nn/native.py compiles this file with the system's C compiler and calls it through
 * ctypes; metatl/nn/fast.py (first_block) states what it computes and tests it against PyTorch's
 * layers.
 *
 * Output position (i, j) sees the P windows q = 0..P-1 (row-major in the pool's 2 x 2 window) whose
 * centres are the input pixels (2i + q / 2, 2j + q % 2); p_q[k] is window q's k-th value (zero
 * outside the image). Layouts (all contiguous): x (N, H, W); weights wt (9, C), the transposed
 * (C, 1, 3, 3) kernel, so that the loops over the C output channels are unit-stride and vectorise;
 * outputs and gradients (N, Ho, Wo, C), channels-last, with Ho = H / 2 (P = 4) or (H + 1) / 2
 * (P = 1); idx (N, Ho, Wo, C) the window each output comes from, or DEAD where the ReLU gave 0.
 *
 *   block:     v = max_q (b[c] + sum_k wt[k,c] p_q[k]), idx = the first q attaining it (NaN counts
 *              as the maximum, as in PyTorch's max-pool);  y = v, or 0 and idx = DEAD where v <= 0
 *   conv_at:   y[n,i,j,c] = b[c] + sum_k wt[k,c] p_idx[k], and 0 where idx = DEAD
 *   wgrad_at:  gw[k,c] += sum_{n,i,j} g[n,i,j,c] p_idx[k],  gb[c] += sum_{n,i,j} g[n,i,j,c],
 *              both over the positions whose idx is not DEAD: the adjoint of conv_at in (wt, b)
 *              (accumulated per image, added over images in double precision)
 *
 *   moments:   the sums of the 9 patch values and of their pairwise products over every output
 *              position of the 3 x 3 convolution (stride 1 or 2), which fold the first BatchNorm
 *              into the convolution (fast.py, fold_batch_stats_norm)
 *
 * With idx fixed, block is conv_at: y is linear in (wt, b) where idx does not change, so the
 * derivatives of block are those of conv_at, whose adjoint is wgrad_at and the other way round.
 * Each function computes the images [n0, n1), so that the caller can split a batch across threads.
 * The images may belong to several tasks of `per` images each, with weights of their own: image n
 * uses wt + (n / per) 9 C and b + (n / per) C, and wgrad_at adds its sums into gw + (n / per) 9 C
 * and gb + (n / per) C (the caller zeroes them), so that one call serves a vmap over tasks.
 * C must be a multiple of CHANNELS (16 floats or 8 doubles for P = 4, 64 or 32 for P = 1).
 */
#include <stdint.h>
#include <string.h>

#define DEAD 4

/* 32-byte vectors (GCC/Clang vector extensions: AVX on x86, two NEON registers on ARM); the
 * channels are taken 8 / P vectors at a time in the forward kernels and one in the weight
 * gradient, so that the accumulators stay in registers. */
typedef float vfloat __attribute__((vector_size(32)));
typedef int ifloat __attribute__((vector_size(32)));
typedef unsigned char ufloat __attribute__((vector_size(8)));
typedef double vdouble __attribute__((vector_size(32)));
typedef long long idouble __attribute__((vector_size(32)));
typedef unsigned char udouble __attribute__((vector_size(4)));

/* idx bytes to the lanes of an integer vector: built element by element from a 16-byte vector,
 * which compilers turn into one widening load (vpmovzxbd); __builtin_convertvector of an 8-byte
 * vector gave scalar code */
typedef unsigned char u8x16 __attribute__((vector_size(16)));
static inline ifloat widen_float(const unsigned char *p) {
    u8x16 v = {0};
    memcpy(&v, p, 8);
    return (ifloat){v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
}
static inline idouble widen_double(const unsigned char *p) {
    u8x16 v = {0};
    memcpy(&v, p, 4);
    return (idouble){v[0], v[1], v[2], v[3]};
}

#define LOAD(V, ptr) ({ V v_; memcpy(&v_, (ptr), sizeof v_); v_; })
#define STORE(ptr, v) do { __typeof__(v) v_ = (v); memcpy((ptr), &v_, sizeof v_); } while (0)
#define SELECT(V, I, mask, a, b) ((V)(((I)(a) & (mask)) | ((I)(b) & ~(mask))))

/* the channels the forward kernels take at once: 8 / P vectors */
#define CHANNELS(T, P) ((8 / (P)) * (int64_t)(32 / sizeof(T)))

static int64_t out_size(int64_t n, int P) { return P == 4 ? n / 2 : (n + 1) / 2; }

#define DEFINE_KERNELS(T)                                                                              \
    enum { L_##T = sizeof(v##T) / sizeof(T) };                                                         \
                                                                                                       \
    /* one image (H, W) into pad, (H + 3) x (W + 3), at offset (1, 1) in a border of zeros */          \
    static inline void padded_##T(const T *x, int64_t H, int64_t W, T *pad) {                          \
        memset(pad, 0, sizeof(T) * (H + 3) * (W + 3));                                                 \
        for (int64_t r = 0; r < H; r++) memcpy(pad + (r + 1) * (W + 3) + 1, x + r * W, sizeof(T) * W); \
    }                                                                                                  \
                                                                                                       \
    /* Each output position's P windows of one image, as rows of 9 P values:                           \
     * p[(i * Wo + j) * 9 P + q * 9 + k]; pad is scratch for the image with its border of zeros. */    \
    static inline __attribute__((always_inline)) void patches_##T(const T *x, int64_t H, int64_t W, int P, T *pad, T *p) { \
        int64_t Wp = W + 3;                                                                            \
        padded_##T(x, H, W, pad);                                                                      \
        for (int64_t i = 0; i < out_size(H, P); i++)                                                   \
            for (int64_t j = 0; j < out_size(W, P); j++)                                               \
                for (int q = 0; q < P; q++) {                                                          \
                    const T *corner = pad + (2 * i + q / 2) * Wp + 2 * j + q % 2;                      \
                    for (int k = 0; k < 9; k++) *p++ = corner[(k / 3) * Wp + k % 3];                   \
                }                                                                                      \
    }                                                                                                  \
                                                                                                       \
    /* the P windows' convolutions for channels [c0, c0 + V L) at one output position, V = 8 / P       \
     * vectors: eight independent chains of products, enough to hide the latency of each */            \
    static inline __attribute__((always_inline)) void windows_##T(const T *pp, const T *wt, const T *b, \
                                                                   int64_t C, int64_t c0, const int P, \
                                                                   v##T a[4][8]) {                     \
        const int V = 8 / P;                                                                           \
        for (int v = 0; v < V; v++) a[0][v] = LOAD(v##T, b + c0 + v * L_##T);                          \
        for (int q = 1; q < P; q++)                                                                    \
            for (int v = 0; v < V; v++) a[q][v] = a[0][v];                                             \
        for (int k = 0; k < 9; k++)                                                                    \
            for (int v = 0; v < V; v++) {                                                              \
                v##T w = LOAD(v##T, wt + k * C + c0 + v * L_##T);                                      \
                for (int q = 0; q < P; q++) a[q][v] += pp[q * 9 + k] * w;                              \
            }                                                                                          \
    }                                                                                                  \
                                                                                                       \
    /* block (pick = 0: choose each output's window, write y and idx) and conv_at (pick = 1: the       \
     * window idx names, write y) share their loops; pick is a constant in each caller */              \
    static inline __attribute__((always_inline)) void forward_impl_##T(const T *x, const T *wt, const T *b, T *y, \
                                                                         unsigned char *idx, int64_t n0, int64_t n1, \
                                                                         int64_t H, int64_t W, int64_t C, const int P, \
                                                                         const int pick, int64_t per) { \
        int64_t npix = out_size(H, P) * out_size(W, P);                                                \
        T p[npix * 9 * P], pad[(H + 3) * (W + 3)];                                                     \
        for (int64_t n = n0; n < n1; n++) {                                                            \
            patches_##T(x + n * H * W, H, W, P, pad, p);                                               \
            const T *wtn = wt + n / per * 9 * C, *bn = b + n / per * C;                                \
            for (int64_t pix = 0; pix < npix; pix++) {                                                 \
                T *yo = y + (n * npix + pix) * C;                                                      \
                unsigned char *io = idx + (n * npix + pix) * C;                                        \
                for (int64_t c0 = 0; c0 < C; c0 += 8 / P * L_##T) {                                    \
                    v##T a[4][8];                                                                      \
                    windows_##T(p + pix * 9 * P, wtn, bn, C, c0, P, a);                                \
                    for (int h = 0; h < 8 / P; h++) {                                                  \
                        if (pick) {                                                                    \
                            i##T at = widen_##T(io + c0 + h * L_##T);                                  \
                            v##T out = {0};                                                            \
                            for (int q = 0; q < P; q++) out = SELECT(v##T, i##T, at == q, a[q][h], out); \
                            STORE(yo + c0 + h * L_##T, out);                                           \
                            continue;                                                                  \
                        }                                                                              \
                        v##T best = a[0][h];                                                           \
                        i##T at = {0};                                                                 \
                        for (int q = 1; q < P; q++) {                                                  \
                            i##T take = (a[q][h] > best) | (a[q][h] != a[q][h]);                       \
                            best = SELECT(v##T, i##T, take, a[q][h], best);                            \
                            at = (take & q) | (at & ~take);                                            \
                        }                                                                              \
                        i##T dead = best <= 0; /* false for NaN, which the ReLU passes on */           \
                        best = (v##T)((i##T)best & ~dead);                                             \
                        at = (dead & DEAD) | (at & ~dead);                                             \
                        STORE(yo + c0 + h * L_##T, best);                                              \
                        STORE(io + c0 + h * L_##T, __builtin_convertvector(at, u##T));                 \
                    }                                                                                  \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    static inline __attribute__((always_inline)) void wgrad_at_impl_##T(const T *x, const T *g, const unsigned char *idx, double *gw, double *gb, int64_t n0, \
                      int64_t n1, int64_t H, int64_t W, int64_t C, const int P, int64_t per) {         \
        int64_t npix = out_size(H, P) * out_size(W, P);                                                \
        T p[npix * 9 * P], pad[(H + 3) * (W + 3)];                                                     \
        for (int64_t n = n0; n < n1; n++) {                                                            \
            patches_##T(x + n * H * W, H, W, P, pad, p);                                               \
            double *gwn = gw + n / per * 9 * C, *gbn = gb + n / per * C;                               \
            for (int64_t c0 = 0; c0 < C; c0 += L_##T) {                                                \
                v##T lw[9], lb;                                                                        \
                memset(lw, 0, sizeof lw);                                                              \
                memset(&lb, 0, sizeof lb);                                                             \
                for (int64_t pix = 0; pix < npix; pix++) {                                             \
                    const T *pp = p + pix * 9 * P;                                                     \
                    v##T go = LOAD(v##T, g + (n * npix + pix) * C + c0);                               \
                    i##T at = widen_##T(idx + (n * npix + pix) * C + c0);                              \
                    lb += (v##T)((i##T)go & (at != DEAD));                                             \
                    for (int q = 0; q < P; q++) {                                                      \
                        v##T gq = (v##T)((i##T)go & (at == q));                                        \
                        for (int k = 0; k < 9; k++) lw[k] += pp[q * 9 + k] * gq;                       \
                    }                                                                                  \
                }                                                                                      \
                for (int k = 0; k < 9; k++)                                                            \
                    for (int c = 0; c < L_##T; c++) gwn[k * C + c0 + c] += lw[k][c];                   \
                for (int c = 0; c < L_##T; c++) gbn[c0 + c] += lb[c];                                  \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    /* moments: over the images [n0, n1) and every output position of a 3 x 3 convolution with         \
     * zero padding 1 and stride S (1 or 2), the sums of the patch values and of their products:       \
     * s[k] = sum p[k], g[9 k + l] = sum p[k] p[l] (double; per image in T, in vectors of positions) */ \
    int moments_##T(const T *x, double *s, double *g, int64_t n0, int64_t n1, int64_t H, int64_t W,    \
                    int64_t S) {                                                                       \
        if (S != 1 && S != 2) return -1;                                                               \
        int64_t Ho = (H - 1) / S + 1, Wo = (W - 1) / S + 1, npos = Ho * Wo, Wp = W + 3;                \
        T pad[(H + 3) * Wp], planes[9 * npos];                                                         \
        memset(s, 0, sizeof(double) * 9);                                                              \
        memset(g, 0, sizeof(double) * 81);                                                             \
        for (int64_t n = n0; n < n1; n++) {                                                            \
            padded_##T(x + n * H * W, H, W, pad);                                                      \
            for (int k = 0; k < 9; k++) /* plane k: tap k of every output position */                  \
                for (int64_t i = 0; i < Ho; i++)                                                       \
                    for (int64_t j = 0; j < Wo; j++)                                                   \
                        planes[k * npos + i * Wo + j] = pad[(S * i + k / 3) * Wp + S * j + k % 3];     \
            for (int k = 0; k < 9; k++) {                                                              \
                const T *pk = planes + k * npos;                                                       \
                v##T acc[10] = {{0}};                                                                  \
                int64_t t = 0;                                                                         \
                for (; t + L_##T <= npos; t += L_##T) {                                                \
                    v##T a = LOAD(v##T, pk + t);                                                       \
                    acc[9] += a;                                                                       \
                    for (int l = 0; l <= k; l++) acc[l] += a * LOAD(v##T, planes + l * npos + t);      \
                }                                                                                      \
                T tail[10] = {0};                                                                      \
                for (; t < npos; t++) {                                                                \
                    tail[9] += pk[t];                                                                  \
                    for (int l = 0; l <= k; l++) tail[l] += pk[t] * planes[l * npos + t];              \
                }                                                                                      \
                for (int c = 0; c < L_##T; c++) s[k] += acc[9][c];                                     \
                s[k] += tail[9];                                                                       \
                for (int l = 0; l <= k; l++) {                                                         \
                    double sum = tail[l];                                                              \
                    for (int c = 0; c < L_##T; c++) sum += acc[l][c];                                  \
                    g[9 * k + l] += sum;                                                               \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        for (int k = 0; k < 9; k++)                                                                    \
            for (int l = k + 1; l < 9; l++) g[9 * k + l] = g[9 * l + k];                               \
        return 0;                                                                                      \
    }                                                                                                  \
                                                                                                       \
    /* the exported functions: P is a constant in each branch, so that the loops over the windows      \
     * unroll and the accumulators stay in registers; they return -1, doing nothing, where C is not    \
     * a multiple of the channels the forward kernels take at once (CHANNELS) */                       \
    int block_##T(const T *x, const T *wt, const T *b, T *y, unsigned char *idx, int64_t n0, int64_t n1, \
                  int64_t H, int64_t W, int64_t C, int64_t P, int64_t per) {                           \
        if (C % CHANNELS(T, P) || (P != 1 && P != 4) || per < 1) return -1;                            \
        if (P == 4) forward_impl_##T(x, wt, b, y, idx, n0, n1, H, W, C, 4, 0, per);                    \
        else forward_impl_##T(x, wt, b, y, idx, n0, n1, H, W, C, 1, 0, per);                           \
        return 0;                                                                                      \
    }                                                                                                  \
    int conv_at_##T(const T *x, const T *wt, const T *b, const unsigned char *idx, T *y, int64_t n0,   \
                    int64_t n1, int64_t H, int64_t W, int64_t C, int64_t P, int64_t per) {             \
        if (C % CHANNELS(T, P) || (P != 1 && P != 4) || per < 1) return -1;                            \
        if (P == 4) forward_impl_##T(x, wt, b, y, (unsigned char *)idx, n0, n1, H, W, C, 4, 1, per);   \
        else forward_impl_##T(x, wt, b, y, (unsigned char *)idx, n0, n1, H, W, C, 1, 1, per);          \
        return 0;                                                                                      \
    }                                                                                                  \
    int wgrad_at_##T(const T *x, const T *g, const unsigned char *idx, double *gw, double *gb, int64_t n0, \
                     int64_t n1, int64_t H, int64_t W, int64_t C, int64_t P, int64_t per) {            \
        if (C % CHANNELS(T, P) || (P != 1 && P != 4) || per < 1) return -1;                            \
        if (P == 4) wgrad_at_impl_##T(x, g, idx, gw, gb, n0, n1, H, W, C, 4, per);                     \
        else wgrad_at_impl_##T(x, g, idx, gw, gb, n0, n1, H, W, C, 1, per);                            \
        return 0;                                                                                      \
    }                                                                                                  \
    /* CHANNELS for Python's check */                                                                  \
    int64_t channels_##T(int64_t P) { return CHANNELS(T, P); }

DEFINE_KERNELS(float)
DEFINE_KERNELS(double)
