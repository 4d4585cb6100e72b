/* One decode step's attention for the rollout engine (thinkling/models/cpu_kernels.py builds and
 * loads this file; hf_attention.explicit_attention is the same computation in PyTorch).
 *
 * For each row b and key head g, the `rep` query heads that share g each take
 *   softmax(q . k_s * scale over the allowed slots s < S), rounded to bf16,
 * and return sum_s p_s v_s rounded to bf16 — with float32 values nothing is rounded and the output
 * is float32. Keys are float32, values bf16 or float32 (`value_bytes` 2 or 4), both cached as
 * [rows, key heads, capacity, d]; queries float32 [rows, heads, d]; `allowed` (or NULL: every
 * slot) uint8 [rows, mask_stride]. A row with no slot allowed gets equal weights, as in PyTorch.
 *
 * Why C: PyTorch runs this as one tiny GEMM per (row, key head) twice over, with copies and casts
 * between; here each key and value row is read once, straight from the cache. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MAX_REP 16
#define MAX_D 256

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; the inputs are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* scores[r][s] = q_r . k_s */
static void scores_plain(const float *q, const float *k, float *scores, int64_t rep, int64_t S, int64_t d) {
    for (int64_t r = 0; r < rep; r++)
        for (int64_t s = 0; s < S; s++) {
            float acc = 0.f;
            for (int64_t i = 0; i < d; i++) acc += q[r * d + i] * k[s * d + i];
            scores[r * S + s] = acc;
        }
}

/* out[r][i] = sum_s p[r][s] v[s][i], for each value type */
#define WEIGHTED_PLAIN(NAME, T, LOAD)                                                                        \
    static void NAME(const float *p, const T *v, float *out, int64_t rep, int64_t S, int64_t d) {            \
        float row[MAX_D];                                                                                    \
        memset(out, 0, sizeof(float) * rep * d);                                                             \
        for (int64_t s = 0; s < S; s++) {                                                                    \
            for (int64_t i = 0; i < d; i++) row[i] = LOAD(v[s * d + i]);                                     \
            for (int64_t r = 0; r < rep; r++)                                                                \
                for (int64_t i = 0; i < d; i++) out[r * d + i] += p[r * S + s] * row[i];                     \
        }                                                                                                    \
    }
#define AS_FLOAT(x) (x)
WEIGHTED_PLAIN(weighted_plain_bf16, uint16_t, bf16_to_f32)
WEIGHTED_PLAIN(weighted_plain_f32, float, AS_FLOAT)

#if defined(__AVX512F__)
/* The same two products for d a multiple of 64, four independent accumulators each. */
static inline __m512 load_bf16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* Key by key, every query head at once; the key DIST rows ahead and this key's value row are
 * prefetched, since the cache streams from memory (1.2-1.4x faster than without). */
#define DIST 16
static void scores_avx512(const float *q, const float *k, const char *v, int64_t v_row, float *scores, int64_t rep,
                          int64_t S, int64_t d) {
    for (int64_t s = 0; s < S; s++) {
        const float *ks = k + s * d;
        for (int64_t o = 0; o < d; o += 16) _mm_prefetch((const char *)(ks + DIST * d + o), _MM_HINT_T0);
        for (int64_t o = 0; o < v_row; o += 64) _mm_prefetch(v + s * v_row + o, _MM_HINT_T0);
        for (int64_t r = 0; r < rep; r++) {
            const float *qr = q + r * d;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t j = 0; j < d; j += 64) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + j), _mm512_loadu_ps(ks + j), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + j + 16), _mm512_loadu_ps(ks + j + 16), a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + j + 32), _mm512_loadu_ps(ks + j + 32), a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + j + 48), _mm512_loadu_ps(ks + j + 48), a3);
            }
            scores[r * S + s] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        }
    }
}

#define WEIGHTED_AVX512(NAME, T, LOAD)                                                                       \
    static void NAME(const float *p, const T *v, float *out, int64_t rep, int64_t S, int64_t d) {            \
        for (int64_t r = 0; r < rep; r++)                                                                    \
            for (int64_t j = 0; j < d; j += 64) {                                                            \
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                  \
                for (int64_t s = 0; s < S; s++) {                                                            \
                    const T *vs = v + s * d + j;                                                             \
                    __m512 ps = _mm512_set1_ps(p[r * S + s]);                                                \
                    a0 = _mm512_fmadd_ps(ps, LOAD(vs), a0);                                                  \
                    a1 = _mm512_fmadd_ps(ps, LOAD(vs + 16), a1);                                             \
                    a2 = _mm512_fmadd_ps(ps, LOAD(vs + 32), a2);                                             \
                    a3 = _mm512_fmadd_ps(ps, LOAD(vs + 48), a3);                                             \
                }                                                                                            \
                float *o = out + r * d + j;                                                                  \
                _mm512_storeu_ps(o, a0);                                                                     \
                _mm512_storeu_ps(o + 16, a1);                                                                \
                _mm512_storeu_ps(o + 32, a2);                                                                \
                _mm512_storeu_ps(o + 48, a3);                                                                \
            }                                                                                                \
    }
WEIGHTED_AVX512(weighted_avx512_bf16, uint16_t, load_bf16)
WEIGHTED_AVX512(weighted_avx512_f32, float, _mm512_loadu_ps)
#endif

/* Rows [row_begin, row_end) of the batch; 0 on success. */
int decode_attention(const float *q, const float *keys, const void *values, int64_t value_bytes, const uint8_t *allowed,
                     int64_t mask_stride, void *out, int64_t H, int64_t KV, int64_t cap, int64_t S, int64_t d,
                     float scale, int64_t row_begin, int64_t row_end) {
    int64_t rep = H / KV;
    int bf16 = value_bytes == 2;
    if (rep > MAX_REP || d > MAX_D || S < 1 || S > cap || (value_bytes != 2 && value_bytes != 4)) return 1;
    float *p = malloc(sizeof(float) * rep * S);
    float acc[MAX_REP * MAX_D];
    if (!p) return 2;
    int wide = 0;
#if defined(__AVX512F__)
    wide = d % 64 == 0;
#endif
    for (int64_t b = row_begin; b < row_end; b++) {
        const uint8_t *ok = allowed ? allowed + b * mask_stride : NULL;
        for (int64_t g = 0; g < KV; g++) {
            const float *qg = q + (b * H + g * rep) * d;
            const float *k = keys + (b * KV + g) * cap * d;
            const char *v = (const char *)values + (b * KV + g) * cap * d * value_bytes;
#if defined(__AVX512F__)
            if (wide) scores_avx512(qg, k, v, d * value_bytes, p, rep, S, d); else
#endif
            scores_plain(qg, k, p, rep, S, d);
            for (int64_t r = 0; r < rep; r++) {
                float *pr = p + r * S, top = -FLT_MAX, sum = 0.f;
                for (int64_t s = 0; s < S; s++) {
                    pr[s] = (ok && !ok[s]) ? -FLT_MAX : pr[s] * scale;
                    top = pr[s] > top ? pr[s] : top;
                }
                for (int64_t s = 0; s < S; s++) {
                    pr[s] = expf(pr[s] - top);
                    sum += pr[s];
                }
                float inv = 1.f / sum;
                if (bf16)
                    for (int64_t s = 0; s < S; s++) pr[s] = bf16_to_f32(f32_to_bf16(pr[s] * inv));
                else
                    for (int64_t s = 0; s < S; s++) pr[s] *= inv;
            }
#if defined(__AVX512F__)
            if (wide && bf16) weighted_avx512_bf16(p, (const uint16_t *)v, acc, rep, S, d); else
            if (wide) weighted_avx512_f32(p, (const float *)v, acc, rep, S, d); else
#endif
            if (bf16) weighted_plain_bf16(p, (const uint16_t *)v, acc, rep, S, d);
            else weighted_plain_f32(p, (const float *)v, acc, rep, S, d);
            int64_t first = (b * H + g * rep) * d;
            if (bf16)
                for (int64_t i = 0; i < rep * d; i++) ((uint16_t *)out)[first + i] = f32_to_bf16(acc[i]);
            else
                memcpy((float *)out + first, acc, sizeof(float) * rep * d);
        }
    }
    free(p);
    return 0;
}
