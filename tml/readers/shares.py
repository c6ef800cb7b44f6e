"""Which reader serves which batches: disjoint shares, computed the same way on both sides.

Trainer rank r of W reads, in-process, the batches of `dataset(r, W)` in order; its global
batch index g = epoch * batches_per_epoch + batch. With R readers:

* R >= W: rank r gets readers r, r + W, r + 2W, ... (k of them, in that order). The batches
  of rank r are cut into blocks of `block` consecutive batches; block b is served by the
  rank's reader number b % k. Taking `block` batches from each reader in turn (round robin)
  gives the batches back in their in-process order, and each reader builds only its blocks.
* R < W: reader j serves the whole data of ranks j, j + R, ...; each rank has one reader.

Blocks (rather than single batches) let a reader jump to its next block by seeking the
dataset (`load_state_dict`), which costs one re-open of a file per block instead of reading
the batches that another reader serves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Share:
    """Part `part` of `parts` of trainer `rank`'s batches (blocks b with b % parts == part)."""

    rank: int
    part: int
    parts: int


def readers_of_rank(rank: int, world_size: int, num_readers: int) -> list[int]:
    """The reader indices trainer `rank` pulls from, in round-robin order."""
    if num_readers >= world_size:
        return list(range(rank, num_readers, world_size))
    return [rank % num_readers]


def shares_of_reader(reader: int, world_size: int, num_readers: int) -> list[Share]:
    """The shares reader `reader` serves (one per trainer rank it serves)."""
    if num_readers >= world_size:
        rank = reader % world_size
        readers = readers_of_rank(rank, world_size, num_readers)
        return [Share(rank, readers.index(reader), len(readers))]
    return [Share(rank, 0, 1) for rank in range(reader, world_size, num_readers)]


def owner_part(index: int, parts: int, block: int) -> int:
    """Which part (of `parts`) serves global batch `index`."""
    return (index // block) % parts


def served_ranges(start: int, total: int, share: Share, block: int) -> Iterator[tuple[int, int]]:
    """The [lo, hi) global batch index ranges `share` serves from `start` up to `total`."""
    if share.parts == 1:
        if start < total:
            yield start, total
        return
    b = start // block
    while b * block < total:
        if b % share.parts == share.part:
            yield max(start, b * block), min((b + 1) * block, total)
        b += 1
