/* Sum-pooled lookups from fbgemm's CPU table storage, and the plain SGD update of the rows
 * they read, for one worker (`tml.common.native_sgd_lookup`).
 *
 * Why C: fbgemm's CPU TBE is built for every optimizer and pooling: its Python forward
 * prepares offsets, VBE metadata and a bounds check, and its exact-SGD backward sorts the
 * ids to sum each row's gradients before updating it: ~36% of a 4000-edge TwHIN step, for
 * 8000 row reads and 8000 row updates. For sum pooling and plain SGD the update is linear,
 * so each lookup's gradient can be applied to its row as it comes (the same update in exact
 * arithmetic; float rounding apart when a row repeats in a batch).
 *
 * Layout (fbgemm's `SplitTableBatchedEmbeddingBagsCodegen`): `weights` is the flat host
 * storage; feature f's table starts at weights + weight_offsets[f], `rows[f]` rows of
 * dim = cols[f + 1] - cols[f] floats; its pooled output goes to columns [cols[f], cols[f + 1])
 * of the (batch, total_dim) output. Bag (f, b) holds indices[offsets[f batch + b] ..
 * offsets[f batch + b + 1]).
 *
 * Both functions check every offset and index before touching memory and return 0, or 1 +
 * the position in `indices` of an id outside its table, or -1 for malformed offsets.
 */
#include <stdint.h>
#include <string.h>

static int64_t check(int64_t num_features, const int64_t *rows, const int64_t *cols,
                     int64_t total_dim, int64_t batch, int64_t num_indices,
                     const int64_t *indices, const int64_t *offsets) {
    if (num_features < 0 || batch < 0 || offsets[0] != 0) return -1;
    if (cols[0] < 0 || cols[num_features] > total_dim) return -1;
    for (int64_t f = 0; f < num_features; ++f) {
        if (cols[f + 1] < cols[f]) return -1;
        for (int64_t b = 0; b < batch; ++b) {
            const int64_t bag = f * batch + b, start = offsets[bag], end = offsets[bag + 1];
            if (start < 0 || end < start || end > num_indices) return -1;
            for (int64_t k = start; k < end; ++k)
                if (indices[k] < 0 || indices[k] >= rows[f]) return 1 + k;
        }
    }
    return offsets[num_features * batch] == num_indices ? 0 : -1;
}

int64_t tml_pooled_lookup(const float *weights, int64_t num_features,
                          const int64_t *weight_offsets, const int64_t *rows,
                          const int64_t *cols, int64_t total_dim, int64_t batch,
                          int64_t num_indices, const int64_t *indices, const int64_t *offsets,
                          float *out) {
    const int64_t status = check(num_features, rows, cols, total_dim, batch, num_indices,
                                 indices, offsets);
    if (status) return status;
    for (int64_t f = 0; f < num_features; ++f) {
        const int64_t dim = cols[f + 1] - cols[f];
        const float *table = weights + weight_offsets[f];
        for (int64_t b = 0; b < batch; ++b) {
            const int64_t bag = f * batch + b, start = offsets[bag], end = offsets[bag + 1];
            float *o = out + b * total_dim + cols[f];
            if (end - start == 1) {
                memcpy(o, table + indices[start] * dim, sizeof(float) * (size_t)dim);
                continue;
            }
            memset(o, 0, sizeof(float) * (size_t)dim);
            for (int64_t k = start; k < end; ++k) {
                const float *row = table + indices[k] * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) o[d] += row[d];
            }
        }
    }
    return 0;
}

/* Every looked-up row -= lr * its bag's output gradient (grad: (batch, total_dim)). */
int64_t tml_pooled_sgd(float *weights, int64_t num_features, const int64_t *weight_offsets,
                       const int64_t *rows, const int64_t *cols, int64_t total_dim,
                       int64_t batch, int64_t num_indices, const int64_t *indices,
                       const int64_t *offsets, const float *grad, float lr) {
    const int64_t status = check(num_features, rows, cols, total_dim, batch, num_indices,
                                 indices, offsets);
    if (status) return status;
    for (int64_t f = 0; f < num_features; ++f) {
        const int64_t dim = cols[f + 1] - cols[f];
        float *table = weights + weight_offsets[f];
        for (int64_t b = 0; b < batch; ++b) {
            const int64_t bag = f * batch + b, start = offsets[bag], end = offsets[bag + 1];
            const float *g = grad + b * total_dim + cols[f];
            for (int64_t k = start; k < end; ++k) {
                if (k + 8 < num_indices && indices[k + 8] < rows[f])
                    __builtin_prefetch(table + indices[k + 8] * dim, 1);
                float *row = table + indices[k] * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) row[d] -= lr * g[d];
            }
        }
    }
    return 0;
}
