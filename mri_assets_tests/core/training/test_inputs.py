from __future__ import annotations

import numpy as np
import pytest

from mri_assets.core.training.errors import TrainingError
from mri_assets.core.training.inputs import ImageBatches, SliceRows


def test_slice_rows_read_the_requested_rows_across_shards():
    shards = [np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2) + 100 * s for s in range(2)]
    rows = SliceRows(shards, shard=np.array([1, 0, 1]), row=np.array([4, 2, 0]))
    got = rows[np.array([0, 2, 1])]
    np.testing.assert_array_equal(got, np.stack([shards[1][4], shards[1][0], shards[0][2]]))
    with pytest.raises(TrainingError, match="row outside shard 0"):
        SliceRows(shards, shard=np.array([0]), row=np.array([5]))


def test_image_batches_cover_every_row_once_and_keep_a_trailing_single_row():
    def batches(seed: int, epoch: int) -> list[list[int]]:
        loader = ImageBatches(np.zeros((9, 4, 4), np.uint8), np.arange(9), batch_size=4, seed=seed)
        loader.set_epoch(epoch)
        return [labels.tolist() for _, labels in loader]

    seen = batches(1, 0)
    assert [len(b) for b in seen] == [4, 5]
    assert sorted(label for batch in seen for label in batch) == list(range(9))
    assert batches(1, 0) == seen
    assert batches(1, 1) != seen
    assert batches(2, 0) != seen
