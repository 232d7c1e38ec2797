/* Native kernels for a decoding step of Tunery's decoding engine (tunery/models/decode.py), bf16 on CPUs
 * with AVX-512 BF16: attention over the cache, RMS norm (with the residual add before it) and SwiGLU's
 * silu(gate) * up. Each computes in fp32 and rounds to bf16 once.
 *
 * Attention. Each row of the batch has one new query per head; the queries that share a key/value head (its group)
 * read that head's cached keys and values together. Per (row, key/value head), on one thread:
 *   1. scores: every key's dot product with each of the group's queries (bf16 pairs multiplied and
 *      summed in fp32 by `vdpbf16ps`), plus the row's additive mask (0, or -inf for padding);
 *   2. softmax in fp32 (the exponential below: a degree-6 polynomial, relative error ~2e-7);
 *   3. the output: the values weighted by the fp32 probabilities, summed in fp32, rounded to bf16 once.
 * Keys and values are each read once, in cache order. The (row, head) items are shared out over the
 * OpenMP threads; linked against the libgomp torch has already loaded, these are torch's own threads.
 *
 * The query scale is folded into the weights (scores are plain dot products). Built by
 * tunery/models/native.py, which checks the CPU and the shapes before calling it. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_GROUP 16

/* 16 bf16 -> 16 fp32 (bf16 is the top half of an fp32) */
static inline __m512 load_bf16(const uint16_t *p) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

static inline void store_bf16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __mmask16 first_lanes(int64_t count) {
    return count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1);
}

static inline __m512 load_bf16_masked(const uint16_t *p, __mmask16 lanes) {
    __m256i raw = _mm256_maskz_loadu_epi16(lanes, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

static inline void store_bf16_masked(uint16_t *p, __m512 v, __mmask16 lanes) {
    _mm256_mask_storeu_epi16(p, lanes, (__m256i)_mm512_cvtneps_pbh(v));
}

/* e^x for x in [-87, 88] (clamped there), by a degree-6 polynomial (Cephes' expf) */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* e^x for x <= 0; 0 below -87 (the mask's -inf included) */
static inline __m512 exp_nonpositive(__m512 x) {
    __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(kept, exp_ps(x));
}

/* The 16 lanes of each of v[0..15] summed: lane j of the result is the sum of v[j]. */
static inline __m512 sum_lanes16(__m512 v[16]) {
    __m512 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; i++)
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                                 _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* each 128-bit lane: partial sums of v[4i..4i+3] */
        quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                                 _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                         _mm512_shuffle_f32x4(halves[0], halves[1], 0xDD));
}

/* scores[g][j] = queries[g] . keys[j] + bias[j], 16 keys at a time per query (the keys' rows stay in L1
 * for the group's next query), each key's products summed in one register and 16 registers' sums taken
 * together. */
static void group_scores(const uint16_t *queries, const uint16_t *keys, const float *bias, int64_t n,
                         int64_t dim, int64_t group, float *scores) {
    for (int64_t start = 0; start < n; start += 16) {
        int64_t count = n - start >= 16 ? 16 : n - start;
        __mmask16 lanes = count == 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1);
        __m512 row_bias = _mm512_maskz_loadu_ps(lanes, bias + start);
        for (int64_t g = 0; g < group; g++) {
            const uint16_t *query = queries + g * dim;
            __m512 sums[16];
            for (int64_t j = 0; j < 16; j++) {
                sums[j] = _mm512_setzero_ps();
                if (j >= count) continue;
                const uint16_t *key = keys + (start + j) * dim;
                for (int64_t c = 0; c < dim; c += 32)
                    sums[j] = _mm512_dpbf16_ps(sums[j], (__m512bh)_mm512_loadu_si512((const void *)(query + c)),
                                               (__m512bh)_mm512_loadu_si512((const void *)(key + c)));
            }
            _mm512_mask_storeu_ps(scores + g * n + start, lanes, _mm512_add_ps(sum_lanes16(sums), row_bias));
        }
    }
}

/* scores -> unnormalised probabilities in place; returns their sum */
static float softmax_row(float *scores, int64_t n) {
    __m512 top = _mm512_set1_ps(-__builtin_inff());
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(scores + j));
    float m = _mm512_reduce_max_ps(top);
    for (; j < n; j++) m = scores[j] > m ? scores[j] : m;
    __m512 shift = _mm512_set1_ps(m), total = _mm512_setzero_ps();
    for (j = 0; j < n; j += 16) {
        __mmask16 lanes = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, scores + j), shift));
        e = _mm512_maskz_mov_ps(lanes, e);
        _mm512_mask_storeu_ps(scores + j, lanes, e);
        total = _mm512_add_ps(total, e);
    }
    return _mm512_reduce_add_ps(total);
}

/* out[g] = sum_j p[g][j] values[j] / total[g] over 16 * parts columns starting at `column`; inlined
 * with constant group and parts below, so that the sums stay in registers */
static inline __attribute__((always_inline)) void weighted_values_of(
    const float *probs, const float *totals, const uint16_t *values, int64_t n, int64_t dim, int64_t column,
    uint16_t *out, const int group, const int parts) {
    __m512 acc[MAX_GROUP][4];
    for (int g = 0; g < group; g++)
        for (int i = 0; i < parts; i++) acc[g][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *row = values + j * dim + column;
        __m512 v[4];
        for (int i = 0; i < parts; i++) v[i] = load_bf16(row + 16 * i);
        for (int g = 0; g < group; g++) {
            __m512 p = _mm512_set1_ps(probs[g * n + j]);
            for (int i = 0; i < parts; i++) acc[g][i] = _mm512_fmadd_ps(p, v[i], acc[g][i]);
        }
    }
    for (int g = 0; g < group; g++) {
        __m512 inverse = _mm512_set1_ps(1.0f / totals[g]);
        for (int i = 0; i < parts; i++) {
            __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][i], inverse));
            _mm256_storeu_si256((__m256i *)(out + g * dim + column + 16 * i), (__m256i)rounded);
        }
    }
}

#define FIXED(G, P)                                                                              \
    case (G) * 8 + (P):                                                                          \
        weighted_values_of(probs, totals, values, n, dim, column, out, G, P);                    \
        return;

static void weighted_values(const float *probs, const float *totals, const uint16_t *values, int64_t n,
                            int64_t dim, int64_t group, int64_t column, int parts, uint16_t *out) {
    switch (group * 8 + parts) {
        FIXED(1, 2) FIXED(2, 2) FIXED(3, 2) FIXED(4, 2) FIXED(5, 2) FIXED(6, 2) FIXED(7, 2) FIXED(8, 2)
        FIXED(1, 4) FIXED(2, 4) FIXED(3, 4) FIXED(4, 4) FIXED(5, 4) FIXED(6, 4)
    default:
        weighted_values_of(probs, totals, values, n, dim, column, out, (int)group, parts);
    }
}

/* q[b, h, g, :] at q + b * q_batch_stride + (h * group + g) * dim; keys[b, h, j, :] at
 * keys + b * kv_batch_stride + h * kv_head_stride + j * dim (values alike); bias[b, j] at
 * bias + b * bias_batch_stride + j; out[b, h, g, :] contiguous. Returns 0, or 1 for shapes it does not
 * take (dim not a multiple of 32, a group over MAX_GROUP, no keys), 2 when out of memory. */
int tunery_decode_attention(const uint16_t *q, int64_t q_batch_stride, const uint16_t *keys,
                            const uint16_t *values, int64_t kv_batch_stride, int64_t kv_head_stride,
                            const float *bias, int64_t bias_batch_stride, uint16_t *out, int64_t batch,
                            int64_t kv_heads, int64_t group, int64_t dim, int64_t n) {
    if (dim % 32 != 0 || dim <= 0 || group < 1 || group > MAX_GROUP || n < 1) return 1;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (size_t)(group * n + group));
#pragma omp for schedule(static)
        for (int64_t item = 0; item < batch * kv_heads; item++) {
            if (scores == NULL) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            int64_t b = item / kv_heads, h = item % kv_heads;
            const uint16_t *queries = q + b * q_batch_stride + h * group * dim;
            int64_t offset = b * kv_batch_stride + h * kv_head_stride;
            float *totals = scores + group * n;
            group_scores(queries, keys + offset, bias + b * bias_batch_stride, n, dim, group, scores);
            for (int64_t g = 0; g < group; g++) totals[g] = softmax_row(scores + g * n, n);
            uint16_t *target = out + (b * kv_heads + h) * group * dim;
            /* 64 columns at a time (4 registers a query) where the group's sums fit in registers */
            int64_t step = group <= 6 ? 64 : 32;
            for (int64_t column = 0; column < dim; column += step) {
                int parts = (int)((dim - column >= step ? step : dim - column) / 16);
                weighted_values(scores, totals, values + offset, n, dim, group, column, parts, target);
            }
        }
        free(scores);
    }
    return failed ? 2 : 0;
}

/* RMS norm of each of `rows` rows of `width`: out = x / sqrt(mean(x^2) + eps) * weight. With `delta`, first
 * x += delta in place (the residual stream, rounded to bf16 as a bf16 add would). */
void tunery_add_rms_norm(uint16_t *x, const uint16_t *delta, const uint16_t *weight, uint16_t *out,
                         int64_t rows, int64_t width, float eps) {
#pragma omp parallel for schedule(static) if (rows * width >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *row = x + r * width;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t c = 0; c < width; c += 16) {
            __mmask16 lanes = first_lanes(width - c);
            __m512 v = load_bf16_masked(row + c, lanes);
            if (delta != NULL) {
                v = _mm512_add_ps(v, load_bf16_masked(delta + r * width + c, lanes));
                store_bf16_masked(row + c, v, lanes);
                v = load_bf16_masked(row + c, lanes); /* the rounded sum is what the next layers see */
            }
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        __m512 scale = _mm512_set1_ps(1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(squares) / (float)width + eps));
        for (int64_t c = 0; c < width; c += 16) {
            __mmask16 lanes = first_lanes(width - c);
            __m512 v = _mm512_mul_ps(load_bf16_masked(row + c, lanes), scale);
            store_bf16_masked(out + r * width + c, _mm512_mul_ps(v, load_bf16_masked(weight + c, lanes)), lanes);
        }
    }
}

/* SwiGLU's product: out[r] = silu(gate_up[r, :width]) * gate_up[r, width:] */
void tunery_silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t width) {
#pragma omp parallel for schedule(static) if (rows * width >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * width, *up = gate + width;
        for (int64_t c = 0; c < width; c += 16) {
            __mmask16 lanes = first_lanes(width - c);
            __m512 g = load_bf16_masked(gate + c, lanes);
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            store_bf16_masked(out + r * width + c, _mm512_mul_ps(silu, load_bf16_masked(up + c, lanes)), lanes);
        }
    }
}

/* Rotary embedding of a step's queries and keys, and the new keys and values into the cache.
 * qkv (batch, heads + 2 kv_heads, dim) contiguous: queries, keys, values. cos and sin (batch, dim) are
 * the rows' tables, sin signed (-sin on the first half, +sin on the second), so that each rotated x is
 * x * cos + roll(x, dim / 2) * sin. Rotated queries go to `queries` (batch, heads, dim) contiguous;
 * rotated keys and the values to slot + b * slot_batch_stride + h * slot_head_stride (h < kv_heads:
 * keys, then values). */
void tunery_rope_store(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, uint16_t *queries,
                       uint16_t *slot, int64_t slot_batch_stride, int64_t slot_head_stride, int64_t batch,
                       int64_t heads, int64_t kv_heads, int64_t dim) {
    int64_t half = dim / 2, width = heads + 2 * kv_heads;
    for (int64_t b = 0; b < batch; b++) {
        const uint16_t *c = cos + b * dim, *s = sin + b * dim;
        for (int64_t h = 0; h < width; h++) {
            const uint16_t *x = qkv + (b * width + h) * dim;
            uint16_t *target = h < heads ? queries + (b * heads + h) * dim
                                         : slot + b * slot_batch_stride + (h - heads) * slot_head_stride;
            for (int64_t part = 0; part < 2; part++) { /* roll(x, half) swaps the halves */
                int64_t at = part * half, other = (1 - part) * half;
                for (int64_t d = 0; d < half; d += 16) {
                    __mmask16 lanes = first_lanes(half - d);
                    __m512 v = load_bf16_masked(x + at + d, lanes);
                    if (h < heads + kv_heads) /* values are stored as they are */
                        v = _mm512_fmadd_ps(v, load_bf16_masked(c + at + d, lanes),
                                            _mm512_mul_ps(load_bf16_masked(x + other + d, lanes),
                                                          load_bf16_masked(s + at + d, lanes)));
                    store_bf16_masked(target + at + d, v, lanes);
                }
            }
        }
    }
}

/* --- for training (the model's own forward under autograd) --------------------------------------------- */

/* The gradient of x for out = x / sqrt(mean(x^2) + eps) * weight (weight frozen): per row, with r that
 * reciprocal root, grad = r * (g * weight - x * r^2 * sum(g * weight * x) / width). */
void tunery_rms_norm_backward(const uint16_t *x, const uint16_t *weight, const uint16_t *grad_out, uint16_t *grad_in,
                              int64_t rows, int64_t width, float eps) {
#pragma omp parallel for schedule(static) if (rows * width >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * width, *g = grad_out + r * width;
        __m512 squares = _mm512_setzero_ps(), dots = _mm512_setzero_ps();
        for (int64_t c = 0; c < width; c += 16) {
            __mmask16 lanes = first_lanes(width - c);
            __m512 v = load_bf16_masked(row + c, lanes);
            __m512 gw = _mm512_mul_ps(load_bf16_masked(g + c, lanes), load_bf16_masked(weight + c, lanes));
            squares = _mm512_fmadd_ps(v, v, squares);
            dots = _mm512_fmadd_ps(gw, v, dots);
        }
        float inverse = 1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(squares) / (float)width + eps);
        __m512 scale = _mm512_set1_ps(inverse);
        __m512 along = _mm512_set1_ps(inverse * inverse * _mm512_reduce_add_ps(dots) / (float)width);
        for (int64_t c = 0; c < width; c += 16) {
            __mmask16 lanes = first_lanes(width - c);
            __m512 gw = _mm512_mul_ps(load_bf16_masked(g + c, lanes), load_bf16_masked(weight + c, lanes));
            __m512 v = load_bf16_masked(row + c, lanes);
            store_bf16_masked(grad_in + r * width + c, _mm512_mul_ps(scale, _mm512_fnmadd_ps(v, along, gw)), lanes);
        }
    }
}

/* out = silu(gate) * up over n elements (separate tensors) */
void tunery_silu_mul_apart(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lanes = first_lanes(n - i);
        __m512 g = load_bf16_masked(gate + i, lanes);
        __m512 sigmoid = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        store_bf16_masked(out + i, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), load_bf16_masked(up + i, lanes)), lanes);
    }
}

/* Its gradients: grad_gate = g * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate), grad_up = g * silu(gate) */
void tunery_silu_mul_backward(const uint16_t *gate, const uint16_t *up, const uint16_t *grad_out, uint16_t *grad_gate,
                              uint16_t *grad_up, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lanes = first_lanes(n - i);
        __m512 g = load_bf16_masked(gate + i, lanes), u = load_bf16_masked(up + i, lanes);
        __m512 d = load_bf16_masked(grad_out + i, lanes), one = _mm512_set1_ps(1.0f);
        __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        __m512 slope = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
        store_bf16_masked(grad_gate + i, _mm512_mul_ps(_mm512_mul_ps(d, u), slope), lanes);
        store_bf16_masked(grad_up + i, _mm512_mul_ps(d, _mm512_mul_ps(g, s)), lanes);
    }
}
