/* Paged attention for the CPU: each query row attends over its sequence's cached K/V, read in place
 * through the block table (no gather copy). Per (row, head): scores, their softmax, the weighted sum of V.
 * Parallel over (row, kv-head group) with OpenMP. Same math as softmax(q k^T * scale) v; the kernel layout
 * follows vLLM's paged attention (Kwon et al., "Efficient Memory Management for Large Language Model Serving
 * with PagedAttention", SOSP 2023).
 *
 * k_cache, v_cache: [num_blocks, block_size, KVH, D] float32; block tables: [S, max_blocks] int64.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static void exp_chunk(const float *x, float *y, int64_t n);
#define EXP_CHUNK 256

/* One work item: query row s, kv heads [g0, g1). Three passes: scores [nh, ctx] (each cached K row read once,
 * as one contiguous slice covering all the item's heads), then per head the max, e^(score - max) (vectorized,
 * exp_chunk) and their sum, then the weighted sum of V rows. */
static inline __attribute__((always_inline)) void attend(const float *q, const float *k_cache,
                   const float *v_cache, const int64_t *table, int64_t ctx, float *out, int64_t g0, int64_t g1, int64_t group, int64_t head_dim, int64_t token_stride,
                   int64_t block_size, float scale) {
    const int64_t nh = (g1 - g0) * group;   /* query heads in this item */
    const float *qs = q + g0 * group * head_dim;
    float *os = out + g0 * group * head_dim;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(ctx * nh));  /* [nh, ctx] */
    float *sum = (float *)malloc(sizeof(float) * (size_t)nh);
    int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)ctx);  /* each token's row in the cache */
    for (int64_t t = 0; t < ctx; t++) off[t] = (table[t / block_size] * block_size + t % block_size) * token_stride;
    for (int64_t t = 0; t < ctx; t++) {
        const float *row = k_cache + off[t] + g0 * head_dim;
        for (int64_t h = 0; h < nh; h++) {
            const float *restrict kp = row + (h / group) * head_dim, *restrict qh = qs + h * head_dim;
            float dot = 0.0f;
            for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * kp[d];
            scores[h * ctx + t] = dot * scale;
        }
    }
    for (int64_t h = 0; h < nh; h++) {
        float *restrict sh = scores + h * ctx;
        float mx = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < ctx; t++) mx = sh[t] > mx ? sh[t] : mx;
        for (int64_t t = 0; t < ctx; t++) sh[t] -= mx;
        for (int64_t t0 = 0; t0 < ctx; t0 += EXP_CHUNK) {
            const int64_t n = ctx - t0 < EXP_CHUNK ? ctx - t0 : EXP_CHUNK;
            exp_chunk(sh + t0, sh + t0, n);
        }
        for (int64_t t = 0; t < ctx; t++) total += sh[t];
        sum[h] = total;
    }
    for (int64_t i = 0; i < nh * head_dim; i++) os[i] = 0.0f;
    for (int64_t t = 0; t < ctx; t++) {
        const float *row = v_cache + off[t] + g0 * head_dim;
        for (int64_t h = 0; h < nh; h++) {
            const float p = scores[h * ctx + t];
            const float *restrict vp = row + (h / group) * head_dim;
            float *restrict o = os + h * head_dim;
            for (int64_t d = 0; d < head_dim; d++) o[d] += p * vp[d];
        }
    }
    for (int64_t h = 0; h < nh; h++) {
        const float inv = 1.0f / sum[h];
        for (int64_t d = 0; d < head_dim; d++) os[h * head_dim + d] *= inv;
    }
    free(scores); free(sum); free(off);
}

/* Causal attention of N query rows over the paged cache: row r attends over the first row_ctx[r] tokens of
 * the sequence whose block table is block_tables[row_table[r]] (its own K/V already written there). A decode
 * row has row_ctx = context length; the rows of a prefill chunk have row_ctx = position + 1 each, so one call
 * covers a whole mixed batch. q: [N, H, D]; out: [N, H, D]; row_table, row_ctx: [N] int64. */
void paged_attention_rows(const float *q, const float *k_cache, const float *v_cache, const int64_t *block_tables,
                          const int64_t *row_table, const int64_t *row_ctx, float *out, int64_t num_rows,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                          int64_t max_blocks, float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    /* Enough items to keep every thread busy: whole rows when there are many, else split heads. */
    int64_t splits = num_rows >= 2 * num_threads ? 1 : (2 * num_threads + num_rows - 1) / num_rows;
    if (splits > num_kv_heads) splits = num_kv_heads;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
    for (int64_t s = 0; s < num_rows; s++) {
        for (int64_t i = 0; i < splits; i++) {
            const int64_t g0 = num_kv_heads * i / splits, g1 = num_kv_heads * (i + 1) / splits;
            const float *qs = q + s * num_heads * head_dim;
            const int64_t *table = block_tables + row_table[s] * max_blocks;
            float *os = out + s * num_heads * head_dim;
            /* A constant head size lets the compiler unroll the per-token dot and axpy loops fully. */
            switch (head_dim) {
            case 32: attend(qs, k_cache, v_cache, table, row_ctx[s], os, g0, g1, group, 32,
                            num_kv_heads * 32, block_size, scale); break;
            case 64: attend(qs, k_cache, v_cache, table, row_ctx[s], os, g0, g1, group, 64,
                            num_kv_heads * 64, block_size, scale); break;
            case 128: attend(qs, k_cache, v_cache, table, row_ctx[s], os, g0, g1, group, 128,
                             num_kv_heads * 128, block_size, scale); break;
            default: attend(qs, k_cache, v_cache, table, row_ctx[s], os, g0, g1, group, head_dim,
                            num_kv_heads * head_dim, block_size, scale);
            }
        }
    }
}

/* y[M, N] = x[M, K] W[N, K]^T (+ bias[N]) for small M (decode batches): one pass over W, whose rows are
 * reused from L1 for all M inputs, so the product runs at memory bandwidth where BLAS sgemm with a few
 * rows does not (measured 1.5-2x slower at M = 4 on a 2-core EPYC). Parallel over output features. */
void linear_small_m(const float *x, const float *w, const float *bias, float *y, int64_t m, int64_t k, int64_t n,
                    int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t j = 0; j < n; j++) {
        const float *wj = w + j * k;
        const float b = bias ? bias[j] : 0.0f;
        int64_t i = 0;
        for (; i + 4 <= m; i += 4) {  /* four independent dot products: four FMA chains in flight */
            const float *x0 = x + i * k, *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            for (int64_t d = 0; d < k; d++) {
                const float wd = wj[d];
                a0 += x0[d] * wd; a1 += x1[d] * wd; a2 += x2[d] * wd; a3 += x3[d] * wd;
            }
            y[i * n + j] = a0 + b; y[(i + 1) * n + j] = a1 + b; y[(i + 2) * n + j] = a2 + b; y[(i + 3) * n + j] = a3 + b;
        }
        for (; i < m; i++) {
            const float *xi = x + i * k;
            float acc = 0.0f;
            for (int64_t d = 0; d < k; d++) acc += xi[d] * wj[d];
            y[i * n + j] = acc + b;
        }
    }
}

/* ---- Fused elementwise steps of a Llama layer (the kernel's forward pass, float32 CPU) ----------------------
 * Each replaces several PyTorch operator calls (and their temporaries) by one pass over the rows. */

/* x[m, n] (+)= h (when h is not NULL), then out = x * rsqrt(mean(x^2) + eps) * w: RMSNorm (Zhang & Sennrich
 * 2019) after the residual add, as transformers' LlamaRMSNorm computes it in float32. */
void add_rms_norm(float *x, const float *h, const float *w, float *out, int64_t m, int64_t n, float eps,
                  int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (m * n >= 32768)
    for (int64_t i = 0; i < m; i++) {
        float *xi = x + i * n, *oi = out + i * n;
        float ss = 0.0f;
        if (h) {
            const float *hi = h + i * n;
            for (int64_t j = 0; j < n; j++) { xi[j] += hi[j]; ss += xi[j] * xi[j]; }
        } else {
            for (int64_t j = 0; j < n; j++) ss += xi[j] * xi[j];
        }
        const float r = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t j = 0; j < n; j++) oi[j] = (xi[j] * r) * w[j];
    }
}

/* Rotary embedding (Su et al. 2021, half-split layout as in transformers' rotate_half) of the fused q/k/v
 * projection, and the K/V write into the paged cache.
 * qkv: [n, (h + 2 kvh) d] rows (q heads, then k heads, then v heads); cos, sin: [n, d / 2] (angles of each
 * row's position); slots: [n] (block * block_size + offset); q_out [n, h, d], k_out, v_out [n, kvh, d];
 * k_cache, v_cache: [slots, kvh, d] contiguous. */
void rope_write_kv(const float *qkv, const float *cos_t, const float *sin_t, const int64_t *slots, float *q_out,
                   float *k_out, float *v_out, float *k_cache, float *v_cache, int64_t n, int64_t h, int64_t kvh,
                   int64_t d, int num_threads) {
    const int64_t half = d / 2, width = (h + 2 * kvh) * d;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (n * width >= 65536)
    for (int64_t i = 0; i < n; i++) {
        const float *row = qkv + i * width, *c = cos_t + i * half, *s = sin_t + i * half;
        for (int64_t head = 0; head < h + kvh; head++) {
            const float *x = row + head * d;
            float *o = head < h ? q_out + (i * h + head) * d : k_out + (i * kvh + head - h) * d;
            for (int64_t j = 0; j < half; j++) {
                o[j] = x[j] * c[j] - x[j + half] * s[j];
                o[j + half] = x[j + half] * c[j] + x[j] * s[j];
            }
        }
        const float *v = row + (h + kvh) * d;
        float *ko = k_out + i * kvh * d, *vo = v_out + i * kvh * d;
        float *kc = k_cache + slots[i] * kvh * d, *vc = v_cache + slots[i] * kvh * d;
        for (int64_t j = 0; j < kvh * d; j++) { vo[j] = v[j]; kc[j] = ko[j]; vc[j] = v[j]; }
    }
}

/* e^x for a chunk of n <= EXP_CHUNK floats (y may be x), written for the vectorizer: Cody-Waite range reduction
 * x = k ln2 + r with |r| <= ln2 / 2, Cephes' degree-6 polynomial for e^r (relative error about 1e-7), and 2^k
 * built from its exponent bits; inputs clamped to [-87.3, 88.7]. The bits pass through an int array and one
 * memcpy, which every loop here vectorizes (a per-element type pun does not). */
static void exp_chunk(const float *x, float *y, int64_t n) {
    int32_t bits[EXP_CHUNK];
    float scale[EXP_CHUNK];
    for (int64_t j = 0; j < n; j++) {
        float v = x[j] < -87.3f ? -87.3f : x[j];
        v = v > 88.7f ? 88.7f : v;
        const float k = rintf(v * 1.44269504088896341f);
        float r = fmaf(k, -0.693359375f, v);  /* fmaf: two steps the compiler's reassociation leaves alone */
        r = fmaf(k, 2.12194440e-4f, r);
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        y[j] = p * (r * r) + r + 1.0f;
        bits[j] = ((int32_t)k + 127) << 23;
    }
    memcpy(scale, bits, sizeof(float) * (size_t)n);
    for (int64_t j = 0; j < n; j++) y[j] *= scale[j];
}

/* SwiGLU's gate (Shazeer 2020): out[m, inter] = silu(gu[:, :inter]) * gu[:, inter:], silu(x) = x / (1 + e^-x),
 * for the fused gate/up projection gu [m, 2 inter]. */
void silu_mul(const float *gu, float *out, int64_t m, int64_t inter, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (m * inter >= 32768)
    for (int64_t i = 0; i < m; i++) {
        const float *restrict g = gu + i * 2 * inter, *restrict u = g + inter;
        float *restrict o = out + i * inter;
        float neg[EXP_CHUNK], e[EXP_CHUNK];
        for (int64_t j0 = 0; j0 < inter; j0 += EXP_CHUNK) {
            const int64_t n = inter - j0 < EXP_CHUNK ? inter - j0 : EXP_CHUNK;
            for (int64_t j = 0; j < n; j++) neg[j] = -g[j0 + j];
            exp_chunk(neg, e, n);
            for (int64_t j = 0; j < n; j++) o[j0 + j] = g[j0 + j] / (1.0f + e[j]) * u[j0 + j];
        }
    }
}

/* The largest non-NaN value of r[0:n] (-inf when there is none) and whether r holds a NaN. */
static inline float row_max(const float *r, int64_t n, int *has_nan) {
    int64_t j = 0;
    float mx = -INFINITY;
    int nan = 0;
#if defined(__AVX512F__)
    __m512 m = _mm512_set1_ps(-INFINITY);
    __mmask16 un = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 v = _mm512_loadu_ps(r + j);
        un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_max_ps(v, m);  /* a NaN in v yields m: NaNs are reported through `un` instead */
    }
    mx = _mm512_reduce_max_ps(m);
    nan = un != 0;
#endif
    for (; j < n; j++) {
        mx = r[j] > mx ? r[j] : mx;
        nan |= r[j] != r[j];
    }
    *has_nan = nan;
    return mx;
}

/* out[i] = the index of the first maximum of row i of x [m, n] (row stride `stride`), or of its first NaN if
 * it has one: what torch.argmax returns. Greedy sampling of a decode batch. */
void argmax_rows(const float *x, int64_t m, int64_t n, int64_t stride, int64_t *out, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (m * n >= 131072)
    for (int64_t i = 0; i < m; i++) {
        const float *r = x + i * stride;
        int nan;
        const float mx = row_max(r, n, &nan);
        int64_t j = 0;
        if (nan) {
            while (r[j] == r[j]) j++;
        } else {
#if defined(__AVX512F__)
            const __m512 target = _mm512_set1_ps(mx);
            for (; j + 16 <= n; j += 16) {
                const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + j), target, _CMP_EQ_OQ);
                if (hit) { j += __builtin_ctz(hit); break; }
            }
#endif
            while (j < n - 1 && r[j] != mx) j++;
        }
        out[i] = j;
    }
}

/* ---- Small-M matrix multiply on prepacked weight panels (AVX-512) -------------------------------------------
 * y[M, N] = x[M, K] W[N, K]^T (+ bias) for decode-sized M. W is packed once into panels of 32 output features,
 * [ceil(N / 32)][K][32], so the kernel streams each panel once and reuses it from L1 for every block of 8 rows:
 * 16 accumulators (8 rows x 32 features), per k two panel loads, eight broadcasts and sixteen FMAs (the
 * register-blocked micro-kernel of Goto & van de Geijn, "Anatomy of High-Performance Matrix Multiplication",
 * ACM TOMS 2008). Measured on the 2-core EPYC at 4-64 rows: 1.2-2x oneDNN's matmul with prepacked weights.
 * Built only where the compiler targets AVX-512 (gemm_panels_available() says so). */
#define PANEL 32

int gemm_panels_available(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

void pack_panels(const float *w, float *p, int64_t n, int64_t k) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    for (int64_t pi = 0; pi < panels; pi++)
        for (int64_t kk = 0; kk < k; kk++)
            for (int64_t j = 0; j < PANEL; j++) {
                const int64_t row = pi * PANEL + j;
                p[(pi * k + kk) * PANEL + j] = row < n ? w[row * k + kk] : 0.0f;
            }
}

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void panel_block(const float *x, int64_t k, const float *p, float *y,
                                                             int64_t ldy, int mr, const float *bias, int64_t ncols) {
    __m512 acc[8][2];
    for (int r = 0; r < 8; r++) { acc[r][0] = _mm512_setzero_ps(); acc[r][1] = _mm512_setzero_ps(); }
    for (int64_t kk = 0; kk < k; kk++) {
        const __m512 w0 = _mm512_loadu_ps(p + kk * PANEL), w1 = _mm512_loadu_ps(p + kk * PANEL + 16);
        for (int r = 0; r < mr; r++) {  /* mr is a constant at every call site: unrolled, no branches */
            const __m512 xb = _mm512_set1_ps(x[r * k + kk]);
            acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
        }
    }
    const __mmask16 m0 = ncols >= 16 ? 0xFFFF : (__mmask16)((1u << ncols) - 1);
    const __mmask16 m1 = ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : (__mmask16)((1u << (ncols - 16)) - 1);
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (int r = 0; r < mr; r++) {
        _mm512_mask_storeu_ps(y + r * ldy, m0, _mm512_add_ps(acc[r][0], b0));
        _mm512_mask_storeu_ps(y + r * ldy + 16, m1, _mm512_add_ps(acc[r][1], b1));
    }
}
#endif

void gemm_panels(const float *x, const float *p, const float *bias, float *y, int64_t m, int64_t k, int64_t n,
                 int num_threads) {
#if defined(__AVX512F__)
    const int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t pi = 0; pi < panels; pi++) {
        const float *pp = p + pi * k * PANEL;
        const int64_t n0 = pi * PANEL, ncols = n - n0 < PANEL ? n - n0 : PANEL;
        const float *b = bias ? bias + n0 : 0;
        for (int64_t r0 = 0; r0 < m; r0 += 8) {
            const float *xr = x + r0 * k;
            float *yr = y + r0 * n + n0;
            switch (m - r0 < 8 ? m - r0 : 8) {
            case 8: panel_block(xr, k, pp, yr, n, 8, b, ncols); break;
            case 7: panel_block(xr, k, pp, yr, n, 7, b, ncols); break;
            case 6: panel_block(xr, k, pp, yr, n, 6, b, ncols); break;
            case 5: panel_block(xr, k, pp, yr, n, 5, b, ncols); break;
            case 4: panel_block(xr, k, pp, yr, n, 4, b, ncols); break;
            case 3: panel_block(xr, k, pp, yr, n, 3, b, ncols); break;
            case 2: panel_block(xr, k, pp, yr, n, 2, b, ncols); break;
            default: panel_block(xr, k, pp, yr, n, 1, b, ncols); break;
            }
        }
    }
#else
    (void)x; (void)p; (void)bias; (void)y; (void)m; (void)k; (void)n; (void)num_threads;
#endif
}
