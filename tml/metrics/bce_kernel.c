/* Weighted binary cross-entropy of logits laid out positives first, then negatives that
 * all carry label 0 and one weight: the loss and its gradient, each one pass
 * (`tml.metrics.losses.positives_then_negatives_bce`).
 *
 * Why C: torch's weighted BCE makes about six passes over the logits forward and four
 * backward, and the same loss in a few torch ops still two each plus their dispatch; here
 * each logit is read once forward and once backward. The exp and log1p are vectorised
 * polynomials (GCC's vector extension; -march=native picks the registers) accurate to a
 * few float ulps, so the loss and gradient agree with torch's to float rounding; sums are
 * kept per 256 logits in float and across those in double.
 *
 *   loss     = (sum_{k<P} w_k (softplus(x_k) - y_k x_k) + w_neg sum_{k>=P} softplus(x_k)) / N
 *   d loss_k = scale * w_k (sigmoid(x_k) - y_k)        (positives; scale = dL/dloss / N)
 *            = scale * w_neg sigmoid(x_k)              (negatives)
 *
 * softplus(x) = max(x, 0) + log1p(exp(-|x|)); sigmoid(x) = 1 / (1 + e) for x >= 0 and
 * e / (1 + e) below, e = exp(-|x|): neither overflows.
 */
#include <stdint.h>
#include <string.h>

#define W 16
#define BLOCK 256

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vi as_int(vf v) { vi i; memcpy(&i, &v, sizeof i); return i; }
static inline vf as_float(vi i) { vf v; memcpy(&v, &i, sizeof v); return v; }
static inline vf vabs(vf x) { return as_float(as_int(x) & 0x7fffffff); }
static inline vf vmax0(vf x) { return as_float(as_int(x) & ~(as_int(x) >> 31)); }
static inline vf select(vi mask, vf a, vf b) { return as_float((as_int(a) & mask) | (as_int(b) & ~mask)); }

/* exp(a) for a <= 0: a = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial to
 * r^7 (truncation below 3e-9), 2^n from the exponent bits; below -87 it is 0. */
static inline vf exp_nonpositive(vf a) {
    const vi tiny = a < -87.0f;
    a = select(tiny, splat(-87.0f), a);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf n = (a * 1.44269504088896341f + magic) - magic;
    const vf r = (a - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
    vf p = splat(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return as_float(as_int(p * as_float(bits)) & ~tiny);
}

/* log1p(e) for 0 <= e <= 1: 2 atanh(s), s = e / (2 + e) <= 1/3, to s^15. */
static inline vf log1p_unit(vf e) {
    const vf s = e / (2.0f + e), s2 = s * s;
    vf p = splat(1.0f / 15.0f);
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

static inline vf softplus(vf x) { return vmax0(x) + log1p_unit(exp_nonpositive(-vabs(x))); }

static inline vf sigmoid(vf x) {
    const vf e = exp_nonpositive(-vabs(x)), inv = 1.0f / (1.0f + e);
    return select(x >= 0.0f, inv, e * inv);
}

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int k = 0; k < W; ++k) s += v[k];
    return s;
}

/* Loads n <= W floats, the rest `fill`. */
static inline vf ld_part(const float *p, int64_t n, float fill) {
    vf v = splat(fill);
    memcpy(&v, p, sizeof(float) * (size_t)n);
    return v;
}

/* sum_k w_k (softplus(x_k) - y_k x_k) over count logits (weights == NULL: all `weight`;
 * labels == NULL: all 0), in double across blocks. */
static double weighted_sum(const float *x, const float *labels, const float *weights,
                           float weight, int64_t count) {
    double total = 0.0;
    for (int64_t start = 0; start < count; start += BLOCK) {
        const int64_t end = start + BLOCK < count ? start + BLOCK : count;
        vf acc = {0};
        for (int64_t k = start; k < end; k += W) {
            const int64_t m = end - k < W ? end - k : W;
            /* Padding: x = -100 (softplus 0 to float precision), weight 0. */
            const vf xv = m == W ? ld(x + k) : ld_part(x + k, m, -100.0f);
            vf term = softplus(xv);
            if (labels) term -= (m == W ? ld(labels + k) : ld_part(labels + k, m, 0.0f)) * xv;
            if (weights) term *= m == W ? ld(weights + k) : ld_part(weights + k, m, 0.0f);
            acc += term;
        }
        total += hsum(acc) * (double)(weights ? 1.0f : weight);
    }
    return total;
}

/* The mean loss into *loss. Returns 0. */
int64_t tml_bce_loss(const float *logits, int64_t num, const float *labels, const float *weights,
                 int64_t num_positives, float negative_weight, float *loss) {
    if (num_positives < 0 || num_positives > num) return 1;
    double total = weighted_sum(logits, labels, weights, 1.0f, num_positives);
    total += weighted_sum(logits + num_positives, NULL, NULL, negative_weight,
                          num - num_positives);
    *loss = num ? (float)(total / (double)num) : 0.0f;
    return 0;
}

/* d_logits (num) = the gradient of the mean loss times `upstream` (dL/dloss). */
int64_t tml_bce_grad(const float *logits, int64_t num, const float *labels, const float *weights,
                 int64_t num_positives, float negative_weight, float upstream,
                 float *d_logits) {
    if (num_positives < 0 || num_positives > num) return 1;
    const float scale = num ? upstream / (float)num : 0.0f;
    int64_t k = 0;
    for (; k + W <= num_positives; k += W)
        st(d_logits + k, (sigmoid(ld(logits + k)) - ld(labels + k)) * ld(weights + k) * scale);
    for (; k < num_positives; ++k) {
        const vf s = sigmoid(splat(logits[k]));
        d_logits[k] = (s[0] - labels[k]) * weights[k] * scale;
    }
    const float negative_scale = scale * negative_weight;
    for (; k + W <= num; k += W) st(d_logits + k, sigmoid(ld(logits + k)) * negative_scale);
    for (; k < num; ++k) d_logits[k] = sigmoid(splat(logits[k]))[0] * negative_scale;
    return 0;
}
