/* The translation scores of `translation_scores.TranslationScores`, forward and backward, as
 * two loops over a grouped batch's rows.
 *
 * Why C: the same scores in torch are about a hundred small ops a step (per relation block,
 * a bias product, two `addmm`s forward and seven products backward), each a pass over its
 * rows and ~10 us of dispatch; here each edge's rows are read once forward and once
 * backward while its candidates sit in L1. Compiled and loaded by `tml.common.native`
 * (plain C, no Python or torch headers; `#pragma omp simd` asks for vectorised reductions
 * without OpenMP's runtime).
 *
 * Layout (as `TranslationScores`): `pair` is (B, 2, D) contiguous, row i's lhs at
 * pair + 2Di and its rhs at pair + 2Di + D; the grouped batch's relation blocks are
 * consecutive rows, block b holding counts[b] rows of relation relations[b]; block b's n
 * tail candidates are rhs rows rhs_rows[bn .. bn + n) and its n head candidates lhs rows
 * lhs_rows[bn .. bn + n) (row indices into the batch). Output: B positives, B x n tail
 * logits, B x n head logits.
 *
 *   positive_i = <l_i, h_i> + <l_i, r>
 *   tail_ij    = <l_i, t_j> + <l_i, r>
 *   head_ij    = <h_i, s_j> + <s_j, r>
 *
 * Each function checks every index it follows and returns nonzero, touching nothing
 * outside its arrays, if one is out of range. `dim` must be a multiple of 16 (the caller
 * keeps torch's path otherwise): rows are handled as 16-float vectors (GCC's vector
 * extension: one AVX-512 register, two AVX2 ones, four NEON ones), and the common dims get
 * their own copy of each loop so that a row's vectors stay in registers.
 */
#include <stdint.h>
#include <string.h>

#define W 16

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
typedef float v4 __attribute__((vector_size(4 * sizeof(float))));

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){0} + x; }

static inline float hsum(vf v) {
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float dot(const float *a, const float *b, int64_t dim) {
    vf acc = ld(a) * ld(b);
    for (int64_t c = W; c < dim; c += W) acc += ld(a + c) * ld(b + c);
    return hsum(acc);
}

/* 0 when the blocks cover the batch and every candidate and relation is in range. */
static int check(int64_t num_edges, int64_t dim, int64_t num_vectors, int64_t num_blocks,
                 const int64_t *relations, const int64_t *counts, const int64_t *lhs_rows,
                 const int64_t *rhs_rows, int64_t n) {
    if (dim <= 0 || dim % W || n < 0) return 4;
    int64_t start = 0;
    for (int64_t b = 0; b < num_blocks; ++b) {
        if (relations[b] < 0 || relations[b] >= num_vectors || counts[b] < 0) return 1;
        int64_t end = start + counts[b];
        if (end > num_edges) return 2;
        for (int64_t j = b * n; j < (b + 1) * n; ++j) {
            if (lhs_rows[j] < start || lhs_rows[j] >= end) return 3;
            if (rhs_rows[j] < start || rhs_rows[j] >= end) return 3;
        }
        start = end;
    }
    return start == num_edges ? 0 : 2;
}

#define MAXC 8 /* vectors of a row kept in registers: dims up to 128 */

static inline __attribute__((always_inline)) void
forward_rows(const float *pair, int64_t num_edges, const int64_t dim, const float *vectors,
             int64_t num_blocks, const int64_t *relations, const int64_t *counts,
             const int64_t *lhs_rows, const int64_t *rhs_rows, int64_t n, float *head_bias,
             float *out) {
    const int64_t row = 2 * dim;
    float *positives = out, *tail = out + num_edges, *head = out + num_edges + num_edges * n;
    int64_t start = 0;
    for (int64_t b = 0; b < num_blocks; ++b) {
        const float *r = vectors + relations[b] * dim;
        const int64_t *tails = rhs_rows + b * n, *heads = lhs_rows + b * n;
        for (int64_t j = 0; j < n; ++j) head_bias[j] = dot(pair + heads[j] * row, r, dim);
        for (int64_t i = start; i < start + counts[b]; ++i) {
            const float *l = pair + i * row, *h = l + dim;
            float *tail_i = tail + i * n, *head_i = head + i * n;
            if (dim <= MAXC * W) {
                vf lv[MAXC], hv[MAXC], b_acc = {0}, p_acc = {0};
                for (int64_t c = 0; c < dim / W; ++c) {
                    lv[c] = ld(l + c * W);
                    hv[c] = ld(h + c * W);
                    b_acc += lv[c] * ld(r + c * W);
                    p_acc += lv[c] * hv[c];
                }
                const float bias = hsum(b_acc);
                positives[i] = hsum(p_acc) + bias;
                for (int64_t j = 0; j < n; ++j) {
                    const float *t = pair + tails[j] * row + dim;
                    vf acc = lv[0] * ld(t);
                    for (int64_t c = 1; c < dim / W; ++c) acc += lv[c] * ld(t + c * W);
                    tail_i[j] = hsum(acc) + bias;
                }
                for (int64_t j = 0; j < n; ++j) {
                    const float *s = pair + heads[j] * row;
                    vf acc = hv[0] * ld(s);
                    for (int64_t c = 1; c < dim / W; ++c) acc += hv[c] * ld(s + c * W);
                    head_i[j] = hsum(acc) + head_bias[j];
                }
            } else {
                const float bias = dot(l, r, dim);
                positives[i] = dot(l, h, dim) + bias;
                for (int64_t j = 0; j < n; ++j)
                    tail_i[j] = dot(l, pair + tails[j] * row + dim, dim) + bias;
                for (int64_t j = 0; j < n; ++j)
                    head_i[j] = dot(h, pair + heads[j] * row, dim) + head_bias[j];
            }
        }
        start += counts[b];
    }
}

int64_t tml_translation_forward(const float *pair, int64_t num_edges, int64_t dim,
                            const float *vectors, int64_t num_vectors, int64_t num_blocks,
                            const int64_t *relations, const int64_t *counts,
                            const int64_t *lhs_rows, const int64_t *rhs_rows, int64_t n,
                            float *scratch, float *out) {
    int status = check(num_edges, dim, num_vectors, num_blocks, relations, counts, lhs_rows,
                       rhs_rows, n);
    if (status) return status;
#define FORWARD(d) forward_rows(pair, num_edges, d, vectors, num_blocks, relations, counts, \
                                lhs_rows, rhs_rows, n, scratch, out)
    switch (dim) {
    case 16: FORWARD(16); break;
    case 32: FORWARD(32); break;
    case 64: FORWARD(64); break;
    case 128: FORWARD(128); break;
    default: FORWARD(dim);
    }
#undef FORWARD
    return 0;
}

static inline __attribute__((always_inline)) void
backward_rows(const float *pair, int64_t num_edges, const int64_t dim, const float *vectors,
              int64_t num_blocks, const int64_t *relations, const int64_t *counts,
              const int64_t *lhs_rows, const int64_t *rhs_rows, int64_t n, const float *grad,
              float *scratch, float *d_pair, float *d_vectors) {
    const int64_t row = 2 * dim, chunks = dim / W;
    const float *g_pos = grad, *g_tail = grad + num_edges, *g_head = grad + num_edges + num_edges * n;
    /* Per block: the tail and head candidates' gradients (n x dim each), the head
     * candidates' summed gradients (n). */
    float *d_tails = scratch, *d_heads = scratch + n * dim, *head_weight = scratch + 2 * n * dim;
    int64_t start = 0;
    for (int64_t b = 0; b < num_blocks; ++b) {
        const float *r = vectors + relations[b] * dim;
        float *d_r = d_vectors + relations[b] * dim;
        const int64_t *tails = rhs_rows + b * n, *heads = lhs_rows + b * n;
        memset(scratch, 0, sizeof(float) * (2 * n * dim + n));
        for (int64_t c0 = 0; c0 < chunks; c0 += MAXC) {
            /* Columns [c0 W, c1 W) of every row: all of them when dim <= MAXC W. */
            const int64_t c1 = c0 + MAXC < chunks ? c0 + MAXC : chunks;
            vf rv[MAXC], dr[MAXC];
            for (int64_t c = c0; c < c1; ++c) {
                rv[c - c0] = ld(r + c * W);
                dr[c - c0] = ld(d_r + c * W);
            }
            for (int64_t i = start; i < start + counts[b]; ++i) {
                const float *l = pair + i * row, *h = l + dim;
                float *d_l = d_pair + i * row, *d_h = d_l + dim;
                const float g = g_pos[i], *gt = g_tail + i * n, *gh = g_head + i * n;
                float r_weight = g; /* r's coefficient in d_l: positive's and tails' grads */
                for (int64_t j = 0; j < n; ++j) r_weight += gt[j];
                vf lv[MAXC], hv[MAXC], dl[MAXC], dh[MAXC];
                for (int64_t c = c0; c < c1; ++c) {
                    lv[c - c0] = ld(l + c * W);
                    hv[c - c0] = ld(h + c * W);
                    dl[c - c0] = g * hv[c - c0] + r_weight * rv[c - c0];
                    dh[c - c0] = g * lv[c - c0];
                    dr[c - c0] += r_weight * lv[c - c0];
                }
                for (int64_t j = 0; j < n; ++j) {
                    const float *t = pair + tails[j] * row + dim, *s = pair + heads[j] * row;
                    float *dt = d_tails + j * dim, *ds = d_heads + j * dim;
                    const vf gtj = splat(gt[j]), ghj = splat(gh[j]);
                    for (int64_t c = c0; c < c1; ++c) {
                        dl[c - c0] += gtj * ld(t + c * W);
                        dh[c - c0] += ghj * ld(s + c * W);
                        st(dt + c * W, ld(dt + c * W) + gtj * lv[c - c0]);
                        st(ds + c * W, ld(ds + c * W) + ghj * hv[c - c0]);
                    }
                }
                for (int64_t c = c0; c < c1; ++c) {
                    st(d_l + c * W, dl[c - c0]);
                    st(d_h + c * W, dh[c - c0]);
                }
            }
            for (int64_t c = c0; c < c1; ++c) st(d_r + c * W, dr[c - c0]);
        }
        for (int64_t i = start; i < start + counts[b]; ++i) {
            const float *gh = g_head + i * n;
            for (int64_t j = 0; j < n; ++j) head_weight[j] += gh[j];
        }
        for (int64_t j = 0; j < n; ++j) {
            const float *s = pair + heads[j] * row;
            float *ds = d_heads + j * dim;
            const vf w = splat(head_weight[j]);
            for (int64_t c = 0; c < chunks; ++c) {
                st(ds + c * W, ld(ds + c * W) + w * ld(r + c * W));
                st(d_r + c * W, ld(d_r + c * W) + w * ld(s + c * W));
            }
        }
        /* The candidates are rows of this block, all written above. */
        for (int64_t j = 0; j < n; ++j) {
            float *dt = d_pair + tails[j] * row + dim, *dh = d_pair + heads[j] * row;
            for (int64_t c = 0; c < chunks; ++c) {
                st(dt + c * W, ld(dt + c * W) + ld(d_tails + j * dim + c * W));
                st(dh + c * W, ld(dh + c * W) + ld(d_heads + j * dim + c * W));
            }
        }
        start += counts[b];
    }
}

/* d_pair (B, 2, D) is written whole; d_vectors (R, D) must come zeroed; scratch holds
 * 2 n D + n floats. */
int64_t tml_translation_backward(const float *pair, int64_t num_edges, int64_t dim,
                             const float *vectors, int64_t num_vectors, int64_t num_blocks,
                             const int64_t *relations, const int64_t *counts,
                             const int64_t *lhs_rows, const int64_t *rhs_rows, int64_t n,
                             const float *grad, float *scratch, float *d_pair,
                             float *d_vectors) {
    int status = check(num_edges, dim, num_vectors, num_blocks, relations, counts, lhs_rows,
                       rhs_rows, n);
    if (status) return status;
#define BACKWARD(d) backward_rows(pair, num_edges, d, vectors, num_blocks, relations, counts, \
                                  lhs_rows, rhs_rows, n, grad, scratch, d_pair, d_vectors)
    switch (dim) {
    case 16: BACKWARD(16); break;
    case 32: BACKWARD(32); break;
    case 64: BACKWARD(64); break;
    case 128: BACKWARD(128); break;
    default: BACKWARD(dim);
    }
#undef BACKWARD
    return 0;
}
