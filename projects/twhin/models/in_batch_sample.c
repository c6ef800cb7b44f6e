/* The bookkeeping around `models._in_batch_sample`'s draws, for a batch grouped by relation.
 *
 * Why C: the draws themselves stay torch's (`torch.randperm` per relation and side, in the
 * same order, so the same seed gives the same candidates as before and as the ungrouped
 * path), but finding the relation blocks (a sortedness check, `unique_consecutive`) and
 * assembling the candidate rows (a slice, repeat, `cat` and offset per block) were about
 * twenty small torch ops a step; here they are two calls.
 */
#include <stdint.h>

/* The relation blocks of `rels` (B ids): their relations into `present` and sizes into
 * `counts` (room for B each); returns how many, or -1 if `rels` is not non-decreasing
 * (not grouped) or holds a negative id. */
int64_t tml_relation_blocks(const int64_t *rels, int64_t num_edges, int64_t *present,
                            int64_t *counts) {
    int64_t blocks = 0;
    for (int64_t i = 0; i < num_edges; ++i) {
        if (rels[i] < 0) return -1;
        if (blocks && rels[i] == present[blocks - 1]) {
            ++counts[blocks - 1];
            continue;
        }
        if (blocks && rels[i] < present[blocks - 1]) return -1;
        present[blocks] = rels[i];
        counts[blocks] = 1;
        ++blocks;
    }
    return blocks;
}

/* Block k's n lhs and n rhs candidate rows, from its two permutations picks[2k] (lhs) and
 * picks[2k + 1] (rhs) of its counts[k] rows: the permutation's first n entries, repeated
 * when the block has fewer than n rows, plus the block's first row. Returns nonzero, having
 * written nothing past its arrays, if a permutation entry is outside its block. */
int64_t tml_block_candidates(int64_t num_blocks, int64_t n, const int64_t *const *picks,
                         const int64_t *counts, int64_t *lhs_rows, int64_t *rhs_rows) {
    int64_t start = 0;
    for (int64_t k = 0; k < num_blocks; ++k) {
        const int64_t count = counts[k];
        if (count <= 0) return 1;
        for (int side = 0; side < 2; ++side) {
            const int64_t *pick = picks[2 * k + side];
            int64_t *out = (side ? rhs_rows : lhs_rows) + k * n;
            for (int64_t j = 0; j < n; ++j) {
                const int64_t row = pick[j % count];
                if (row < 0 || row >= count) return 2;
                out[j] = start + row;
            }
        }
        start += count;
    }
    return 0;
}
