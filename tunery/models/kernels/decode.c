/* Native kernels for a decoding step of Tunery's decoding engine (tunery/models/decode.py), bf16 on CPUs
 * with AVX-512 BF16: attention over the cache, RMS norm (with the residual add before it) and SwiGLU's
 * silu(gate) * up; on CPUs with AMX tiles, the linear layers and a whole step's decoder layers in one
 * call (below). Each computes in fp32 and rounds to bf16 once.
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
#include <omp.h>
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

/* Qwen3's per-head RMS norms of a step's queries and keys, in place: qkv (batch, heads + 2 kv_heads, dim)
 * contiguous, the queries' heads by q_norm, the keys' by k_norm, the values left alone */
void tunery_head_norms(uint16_t *qkv, const uint16_t *q_norm, const uint16_t *k_norm, int64_t batch, int64_t heads,
                       int64_t kv_heads, int64_t dim, float eps) {
    for (int64_t b = 0; b < batch; b++) {
        uint16_t *queries = qkv + b * (heads + 2 * kv_heads) * dim, *keys = queries + heads * dim;
        tunery_add_rms_norm(queries, NULL, q_norm, queries, heads, dim, eps); /* each row read before written */
        tunery_add_rms_norm(keys, NULL, k_norm, keys, kv_heads, dim, eps);
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

/* Its gradients for up to 16 elements: grad_gate = g * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate),
 * grad_up = g * silu(gate) */
static inline void silu_mul_grads(const uint16_t *gate, const uint16_t *up, const uint16_t *grad_out,
                                  uint16_t *grad_gate, uint16_t *grad_up, __mmask16 lanes) {
    __m512 g = load_bf16_masked(gate, lanes), u = load_bf16_masked(up, lanes);
    __m512 d = load_bf16_masked(grad_out, lanes), one = _mm512_set1_ps(1.0f);
    __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    __m512 slope = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
    store_bf16_masked(grad_gate, _mm512_mul_ps(_mm512_mul_ps(d, u), slope), lanes);
    store_bf16_masked(grad_up, _mm512_mul_ps(d, _mm512_mul_ps(g, s)), lanes);
}

/* The gradients of silu_mul_apart over n elements */
void tunery_silu_mul_backward(const uint16_t *gate, const uint16_t *up, const uint16_t *grad_out, uint16_t *grad_gate,
                              uint16_t *grad_up, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < n; i += 16)
        silu_mul_grads(gate + i, up + i, grad_out + i, grad_gate + i, grad_up + i, first_lanes(n - i));
}

/* The same for silu_mul's joined layout: gate_up and grad_gate_up (rows, 2 width), gate first */
void tunery_silu_mul_joined_backward(const uint16_t *gate_up, const uint16_t *grad_out, uint16_t *grad_gate_up,
                                     int64_t rows, int64_t width) {
#pragma omp parallel for schedule(static) if (rows * width >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * width, *d_out = grad_out + r * width;
        uint16_t *d_gate = grad_gate_up + r * 2 * width;
        for (int64_t c = 0; c < width; c += 16)
            silu_mul_grads(gate + c, gate + width + c, d_out + c, d_gate + c, d_gate + width + c, first_lanes(width - c));
    }
}

/* Linear layers on AMX tiles (Sapphire Rapids and later): out (m, n) = x (m, k) @ w^T, all bf16, summed in
 * fp32 and rounded once.
 *
 * The weight is stored as AMX multiplies it (`tunery_tile_weight`'s layout): blocks of 16 output columns,
 * each block's k/2 rows of 16 column pairs (w[col][2p], w[col][2p + 1]), so a 32-wide slice of k is one
 * contiguous 1 KB tile and a block is one contiguous run of memory. The matrix streams once per call for up
 * to 16 rows of x (a decoding step: oneDNN's packed calls read SmolLM2's weights at ~15-16 GB/s there, these
 * at ~27); longer inputs go 32 rows at a time under each pair of blocks, whose tiles stay in L2.
 *
 * Tiles: 0-3 the sums (2 row chunks x 2 column blocks), 4-5 the chunks of x, 6-7 the blocks' slices. A
 * thread configures its tiles, works through its share of the column blocks and releases them. */

#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16")))

/* AMX state is off until the process asks the kernel for it (Linux 5.16+); 0 when granted */
int tunery_amx_enable(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 0 : -1;
}

/* weight (n, k) row-major -> tiled (n / 16, k / 2, 16, 2): tiled[b][p][c] = the pair w[16 b + c][2p, 2p + 1] */
void tunery_tile_weight(const uint16_t *weight, uint16_t *tiled, int64_t n, int64_t k) {
    const int64_t pairs = k / 2;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n / 16; b++) {
        const uint16_t *rows = weight + b * 16 * k;
        uint16_t *block = tiled + b * 16 * k;
        for (int64_t p = 0; p < pairs; p++)
            for (int64_t c = 0; c < 16; c++) memcpy(block + (p * 16 + c) * 2, rows + c * k + 2 * p, 4);
    }
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

AMX static void configure_tiles(int rows) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) { /* every tile 16 rows of 64 bytes */
        config.bytes_per_row[t] = 64;
        config.rows[t] = rows;
    }
    _tile_loadconfig(&config);
}

/* out's rows of x0 (rows0 of them) and x1 (rows1, 0: none), columns of blocks `block` and, if two_blocks,
 * block + 1; each chunk of x is read as 16 rows (the caller pads a short one) */
AMX static void tile_product(const uint16_t *x0, const uint16_t *x1, int rows0, int rows1, const uint16_t *w,
                             uint16_t *out0, uint16_t *out1, int64_t n, int64_t k, int64_t block, int two_blocks) {
    const uint16_t *w0 = w + block * 16 * k, *w1 = w0 + 16 * k;
    const int64_t x_bytes = k * 2;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < k; c += 32) {
        _tile_loadd(4, x0 + c, x_bytes);
        _tile_loadd(6, w0 + c * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two_blocks) {
            _tile_loadd(7, w1 + c * 16, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (rows1) {
            _tile_loadd(5, x1 + c, x_bytes);
            _tile_dpbf16ps(2, 5, 6);
            if (two_blocks) _tile_dpbf16ps(3, 5, 7);
        }
    }
    float sums[4][16 * 16];
    _tile_stored(0, sums[0], 64);
    if (two_blocks) _tile_stored(1, sums[1], 64);
    if (rows1) _tile_stored(2, sums[2], 64);
    if (rows1 && two_blocks) _tile_stored(3, sums[3], 64);
    for (int t = 0; t < 4; t++) {
        int chunk = t >> 1, column = t & 1;
        if ((chunk && !rows1) || (column && !two_blocks)) continue;
        uint16_t *o = (chunk ? out1 : out0) + (block + column) * 16;
        for (int r = 0; r < (chunk ? rows1 : rows0); r++) store_bf16(o + r * n, _mm512_loadu_ps(sums[t] + r * 16));
    }
}

/* 0, or -1 if the padding for a short last chunk of x could not be allocated */
AMX int tunery_tile_linear(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t m, int64_t n, int64_t k) {
    const int64_t blocks = n / 16, pairs = (blocks + 1) / 2, chunks = (m + 15) / 16, tail = m % 16;
    uint16_t *padded = NULL; /* the last chunk's rows, then zeros: every chunk is read as 16 rows */
    if (tail) {
        padded = aligned_alloc(64, (size_t)(16 * k * 2));
        if (padded == NULL) return -1;
        memset(padded, 0, (size_t)(16 * k * 2));
        memcpy(padded, x + (m - tail) * k, (size_t)(tail * k * 2));
    }
#pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t first = pairs * id / threads, last = pairs * (id + 1) / threads;
        if (first < last) {
            configure_tiles(16);
            for (int64_t p = first; p < last; p++) {
                for (int64_t chunk = 0; chunk < chunks; chunk += 2) {
                    const uint16_t *x0 = (tail && chunk == chunks - 1) ? padded : x + chunk * 16 * k;
                    const uint16_t *x1 = (tail && chunk + 1 == chunks - 1) ? padded : x + (chunk + 1) * 16 * k;
                    int rows0 = (tail && chunk == chunks - 1) ? (int)tail : 16;
                    int rows1 = chunk + 1 >= chunks ? 0 : ((tail && chunk + 1 == chunks - 1) ? (int)tail : 16);
                    tile_product(x0, x1, rows0, rows1, w, out + chunk * 16 * n, out + (chunk + 1) * 16 * n, n, k,
                                 2 * p, 2 * p + 1 < blocks);
                }
            }
            _tile_release();
        }
    }
    free(padded);
    return 0;
}

/* --- a whole decoding step's decoder layers in one call ------------------------------------------------ *
 * At batch 1 the step is the weights' read (~10 ms for SmolLM2's 268 MB on AMX) plus, through Python, ~8
 * calls a layer at 3-10 us each; here the layers run back to back from C. Each layer: h's q|k|v
 * projection (+ bias), the rotary embedding with the new key and value into the cache, attention over the
 * layer's visible slots, the output projection, the residual add and post-attention norm, gate|up, SwiGLU,
 * down, the residual add and the next layer's input norm (Qwen3's per-head norms after q|k|v, an adapter's
 * updates after each projection). The same kernels as the per-operator path, so the same numbers; only
 * an adapter's fp32 updates are summed in another order than torch's products there. */

typedef struct {
    const uint16_t *qkv, *o, *gate_up, *down; /* tiled weights (`tunery_tile_linear`) */
    const uint16_t *qkv_bias;                  /* ((heads + 2 kv_heads) * dim), or NULL */
    const uint16_t *norm1, *norm2;             /* input and post-attention norms' weights (hidden) */
    const uint16_t *q_norm, *k_norm;           /* Qwen3's per-head query and key norms (dim), or NULL */
    int64_t window;                            /* keys visible: the last `window` slots, or all if 0 */
    /* an adapter served beside the weights, per projection (q|k|v, o, gate|up, down): out += x @ a @ b,
     * a (in, rank) and b (rank, out) fp32; rank 0 where it leaves the projection alone */
    const float *lora_a[4], *lora_b[4];
    int64_t lora_rank[4];
} decode_layer;

/* An adapter's update for N rows (1, 2, 4, 8 or 16: the sums stay in registers): xf (N, k) fp32 @ a (k, r)
 * into t (N, r), then out (N, n) bf16 += t @ b (r, n), each of a's and b's rows read once for the N rows.
 * x @ a is summed in K_SLICES slices of k, shared out over the threads, then the slices in order (the same
 * sums whatever the number of threads); `partial` holds K_SLICES x N x r. */
#define K_SLICES 4
#define LORA_ROWS(N)                                                                                       \
    static void lora_rows_##N(const float *xf, int64_t k, uint16_t *out, int64_t n, const float *a,       \
                              const float *b, int64_t r, float *t, float *partial) {                      \
        const int64_t chunks = (r + 15) / 16;                                                              \
        _Pragma("omp parallel for schedule(static) collapse(2) if (k * r >= 4096)")                        \
        for (int64_t slice = 0; slice < K_SLICES; slice++)                                                 \
            for (int64_t chunk = 0; chunk < chunks; chunk++) {                                             \
                const int64_t c = chunk * 16, from = k * slice / K_SLICES, to = k * (slice + 1) / K_SLICES; \
                __mmask16 lanes = first_lanes(r - c);                                                      \
                __m512 sums[N];                                                                            \
                for (int row = 0; row < N; row++) sums[row] = _mm512_setzero_ps();                         \
                for (int64_t i = from; i < to; i++) {                                                      \
                    __m512 column = _mm512_maskz_loadu_ps(lanes, a + i * r + c);                           \
                    for (int row = 0; row < N; row++)                                                      \
                        sums[row] = _mm512_fmadd_ps(_mm512_set1_ps(xf[row * k + i]), column, sums[row]);   \
                }                                                                                          \
                for (int row = 0; row < N; row++)                                                          \
                    _mm512_mask_storeu_ps(partial + (slice * N + row) * r + c, lanes, sums[row]);          \
            }                                                                                              \
        for (int64_t j = 0; j < N * r; j++) {                                                              \
            float sum = partial[j];                                                                        \
            for (int64_t slice = 1; slice < K_SLICES; slice++) sum += partial[slice * N * r + j];          \
            t[j] = sum;                                                                                    \
        }                                                                                                  \
        _Pragma("omp parallel for schedule(static) if (n * r >= 2048)")                               \
        for (int64_t c = 0; c < n; c += 16) {                                                              \
            __mmask16 lanes = first_lanes(n - c);                                                          \
            __m512 sums[N];                                                                                \
            for (int row = 0; row < N; row++) sums[row] = _mm512_setzero_ps();                             \
            for (int64_t j = 0; j < r; j++) {                                                              \
                __m512 row_of_b = _mm512_maskz_loadu_ps(lanes, b + j * n + c);                             \
                for (int row = 0; row < N; row++)                                                          \
                    sums[row] = _mm512_fmadd_ps(_mm512_set1_ps(t[row * r + j]), row_of_b, sums[row]);      \
            }                                                                                              \
            for (int row = 0; row < N; row++) {                                                            \
                uint16_t *at = out + row * n + c;                                                          \
                store_bf16_masked(at, _mm512_add_ps(load_bf16_masked(at, lanes), sums[row]), lanes);       \
            }                                                                                              \
        }                                                                                                  \
    }
LORA_ROWS(1)
LORA_ROWS(2)
LORA_ROWS(4)
LORA_ROWS(8)
LORA_ROWS(16)

/* out (m, n) bf16 += (x (m, k) bf16 @ a (k, r)) @ b (r, n), in fp32, rounded once into out; 0, or 4 when
 * out of memory */
static int lora_update(const uint16_t *x, int64_t m, int64_t k, uint16_t *out, int64_t n, const float *a,
                       const float *b, int64_t r) {
    if (r == 0) return 0;
    float *xf = malloc(sizeof(float) * (size_t)(m * k)), *t = malloc(sizeof(float) * (size_t)(16 * r));
    float *partial = malloc(sizeof(float) * (size_t)(K_SLICES * 16 * r));
    if (xf == NULL || t == NULL || partial == NULL) {
        free(xf);
        free(t);
        free(partial);
        return 4;
    }
    for (int64_t i = 0; i < m * k; i += 16) {
        __mmask16 lanes = first_lanes(m * k - i);
        _mm512_mask_storeu_ps(xf + i, lanes, load_bf16_masked(x + i, lanes));
    }
    for (int64_t row = 0; row < m;) {
        int64_t left = m - row;
        const float *rows = xf + row * k;
        uint16_t *target = out + row * n;
        int64_t step = left >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        if (step == 16) lora_rows_16(rows, k, target, n, a, b, r, t, partial);
        else if (step == 8) lora_rows_8(rows, k, target, n, a, b, r, t, partial);
        else if (step == 4) lora_rows_4(rows, k, target, n, a, b, r, t, partial);
        else if (step == 2) lora_rows_2(rows, k, target, n, a, b, r, t, partial);
        else lora_rows_1(rows, k, target, n, a, b, r, t, partial);
        row += step;
    }
    free(xf);
    free(t);
    free(partial);
    return 0;
}

typedef struct {
    uint16_t *x;                                    /* (batch, hidden) the residual stream, in place */
    uint16_t *h, *qkv, *queries, *attended, *delta, *gate_up, *act; /* scratch, each (batch, its width) */
    const uint16_t *cos, *sin;                      /* (batch, dim) */
    uint16_t *cache;                                /* (layers, batch, 2 kv_heads, length, dim) contiguous */
    const float *bias;                              /* (batch, >= index + 1) rows `bias_stride` apart */
    int64_t bias_stride, index, length, batch, hidden, heads, kv_heads, dim, inner;
    double eps;
} decode_step;

/* x[0, count) += delta, rounded as a bf16 add */
static void add_bf16(uint16_t *x, const uint16_t *delta, int64_t count) {
    for (int64_t c = 0; c < count; c += 16) {
        __mmask16 lanes = first_lanes(count - c);
        store_bf16_masked(x + c, _mm512_add_ps(load_bf16_masked(x + c, lanes), load_bf16_masked(delta + c, lanes)), lanes);
    }
}

/* 0, or the failing kernel's status: 1-2 attention (shapes, memory), 3 a linear layer (memory), 4 an
 * adapter's update (memory) */
AMX int tunery_decode_layers(const decode_step *s, const decode_layer *layers, int64_t count) {
    const int64_t batch = s->batch, hidden = s->hidden, dim = s->dim, kv = s->kv_heads;
    const int64_t width = (s->heads + 2 * kv) * dim, head_stride = s->length * dim;
    const int64_t batch_stride = 2 * kv * head_stride, layer_stride = batch * batch_stride;
    const float eps = (float)s->eps;
    if (count < 1) return 1;
    tunery_add_rms_norm(s->x, NULL, layers[0].norm1, s->h, batch, hidden, eps);
    for (int64_t i = 0; i < count; i++) {
        const decode_layer *layer = layers + i;
        uint16_t *cache = s->cache + i * layer_stride;
        if (tunery_tile_linear(s->h, layer->qkv, s->qkv, batch, width, hidden)) return 3;
        if (lora_update(s->h, batch, hidden, s->qkv, width, layer->lora_a[0], layer->lora_b[0], layer->lora_rank[0])) return 4;
        if (layer->qkv_bias != NULL)
            for (int64_t b = 0; b < batch; b++) add_bf16(s->qkv + b * width, layer->qkv_bias, width);
        if (layer->q_norm != NULL) tunery_head_norms(s->qkv, layer->q_norm, layer->k_norm, batch, s->heads, kv, dim, eps);
        tunery_rope_store(s->qkv, s->cos, s->sin, s->queries, cache + s->index * dim, batch_stride, head_stride,
                          batch, s->heads, kv, dim);
        int64_t first = layer->window > 0 && s->index + 1 > layer->window ? s->index + 1 - layer->window : 0;
        int status = tunery_decode_attention(s->queries, s->heads * dim, cache + first * dim, cache + kv * head_stride + first * dim,
                                             batch_stride, head_stride, s->bias + first, s->bias_stride, s->attended, batch,
                                             kv, s->heads / kv, dim, s->index + 1 - first);
        if (status) return status;
        if (tunery_tile_linear(s->attended, layer->o, s->delta, batch, hidden, s->heads * dim)) return 3;
        if (lora_update(s->attended, batch, s->heads * dim, s->delta, hidden, layer->lora_a[1], layer->lora_b[1], layer->lora_rank[1])) return 4;
        tunery_add_rms_norm(s->x, s->delta, layer->norm2, s->h, batch, hidden, eps);
        if (tunery_tile_linear(s->h, layer->gate_up, s->gate_up, batch, 2 * s->inner, hidden)) return 3;
        if (lora_update(s->h, batch, hidden, s->gate_up, 2 * s->inner, layer->lora_a[2], layer->lora_b[2], layer->lora_rank[2])) return 4;
        tunery_silu_mul(s->gate_up, s->act, batch, s->inner);
        if (tunery_tile_linear(s->act, layer->down, s->delta, batch, hidden, s->inner)) return 3;
        if (lora_update(s->act, batch, s->inner, s->delta, hidden, layer->lora_a[3], layer->lora_b[3], layer->lora_rank[3])) return 4;
        if (i + 1 < count) {
            tunery_add_rms_norm(s->x, s->delta, layers[i + 1].norm1, s->h, batch, hidden, eps);
        } else {
            add_bf16(s->x, s->delta, batch * hidden);
        }
    }
    return 0;
}
