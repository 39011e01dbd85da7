"""The crc32 check of a shard's rows: read once, in order, a block at a time."""

import numpy as np
import polars as pl

from mri_assets.core.slice_shards import corrupt_rows, payload_crc32


def test_corrupt_rows_names_exactly_the_rows_whose_bytes_changed():
    size, n_rows = 8, 50
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n_rows, size, size), dtype=np.uint8)
    rows = rng.permutation(n_rows)[:40]  # unindexed rows exist too
    index = pl.DataFrame({"image_id": [f"id-{r:05d}" for r in rows], "row": rows,
                          "payload_crc32": [payload_crc32(pixels[r]) for r in rows]})
    damaged = pixels.copy()
    damaged[rows[3], 2, 2] ^= 0x01
    damaged[rows[17], 7, 7] ^= 0x80
    spare = next(r for r in range(n_rows) if r not in set(rows))
    damaged[spare, 0, 0] ^= 0xFF  # never indexed: not reported
    blob = damaged.tobytes()
    reads = []

    def read_rows(first, count):
        reads.append((first, count))
        return blob[first * size * size:(first + count) * size * size]

    bad = corrupt_rows(read_rows, index, size, block_rows=7)
    assert sorted(bad["image_id"]) == sorted([f"id-{rows[3]:05d}", f"id-{rows[17]:05d}"])
    assert all(count <= 7 for _, count in reads)
    assert [first for first, _ in reads] == sorted(first for first, _ in reads)
    assert corrupt_rows(lambda f, c: pixels.tobytes()[f * 64:(f + c) * 64], index, size).height == 0
