"""What training reads: slices (in memory or across memmapped shards), their seeded batches, cached
embeddings and class labels, each checked on the way in so a bad input stops training with a
message that names it.

High-level entry points (``train_two_stage``, ``fit_embedding_head``) take labels as class names
and turn them into integer indices into ``model.class_names`` here (``encode_labels``); the loops
(``train_head_on_embeddings``, ``train_one_epoch``, ``ImageBatches``) take those indices.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mri_assets.core.training.errors import TrainingError


def checked_images(images: Any, what: str) -> Any:
    """``images`` (a torch tensor as numpy), refused unless uint8 (N, H, W) or (N, 1, H, W)."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or dtype is None:
        raise TrainingError(
            f"{what} must be a uint8 array (N, H, W) or (N, 1, H, W); got {type(images)}"
        )
    if np.dtype(dtype) != np.uint8:
        raise TrainingError(f"{what} must be uint8 slices (0-255), got dtype {dtype}")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[1] != 1):
        raise TrainingError(f"{what} must have shape (N, H, W) or (N, 1, H, W), got {tuple(shape)}")
    return images


def checked_embeddings(embeddings: Any, dim: int) -> torch.Tensor:
    """Cached embeddings as a float32 tensor (N, dim); NaN/inf rows are refused by row number."""
    array = torch.as_tensor(np.asarray(embeddings))
    if array.ndim != 2 or array.shape[1] != dim:
        raise TrainingError(f"embeddings must have shape (N, {dim}), got {tuple(array.shape)}")
    if not array.dtype.is_floating_point:
        raise TrainingError(f"embeddings must be float (float16 from the cache), got {array.dtype}")
    array = array.float()
    bad = torch.nonzero(~torch.isfinite(array).all(dim=1)).flatten()
    if len(bad):
        raise TrainingError(
            f"{len(bad)} embedding row(s) are NaN/inf (first rows: {bad[:5].tolist()}); "
            "re-embed those slices (float16 overflow or a corrupt shard)"
        )
    return array


class SliceRows:
    """Rows of several slices shards (``numpy.load(..., mmap_mode="r")`` arrays) seen as one
    indexable array: ``rows[index_array]`` -> uint8 (B, H, W). Only the requested rows are read."""

    def __init__(self, shards: Sequence[np.ndarray], shard: np.ndarray, row: np.ndarray):
        self.shards = list(shards)
        self.shard = np.asarray(shard, dtype=np.int64)
        self.row = np.asarray(row, dtype=np.int64)
        if self.shard.shape != self.row.shape or self.shard.ndim != 1:
            raise TrainingError("SliceRows: shard and row must be 1-D arrays of the same length")
        if len(self.shards) == 0:
            raise TrainingError("SliceRows: no shards given")
        sizes = {tuple(a.shape[1:]) for a in self.shards}
        if len(sizes) != 1:
            raise TrainingError(f"SliceRows: shards have different slice sizes {sorted(sizes)}")
        if len(self.shard) and (self.shard.min() < 0 or self.shard.max() >= len(self.shards)):
            raise TrainingError(f"SliceRows: shard index outside 0..{len(self.shards) - 1}")
        for s, array in enumerate(self.shards):
            checked_images(array, f"slices shard {s}")
            rows = self.row[self.shard == s]
            if len(rows) and (rows.min() < 0 or rows.max() >= len(array)):
                raise TrainingError(f"SliceRows: row outside shard {s} (it has {len(array)} rows)")
        self.dtype = np.dtype(np.uint8)
        self.shape = (len(self.row), *self.shards[0].shape[1:])

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), *self.shape[1:]), dtype=np.uint8)
        shard, row = self.shard[index], self.row[index]
        for s in np.unique(shard):
            mine = np.flatnonzero(shard == s)
            out[mine] = self.shards[int(s)][row[mine]]
        return out


def take_rows(values: Any, index: np.ndarray) -> Any:
    """Rows ``index`` of an array; of a ``SliceRows``, a narrower view that reads no pixels yet."""
    if isinstance(values, SliceRows):
        return SliceRows(values.shards, values.shard[index], values.row[index])
    return values[index]


class ImageBatches:
    """Seeded, re-iterable batches of ``(uint8 (B, 1, H, W), int64 labels)``.

    ``images`` is anything indexable by an integer array giving uint8 (B, H, W) or (B, 1, H, W):
    an in-memory array, a memmap, or ``SliceRows``. With ``shuffle`` the order depends only on
    ``(seed, epoch)``; call ``set_epoch`` before each epoch. A trailing batch of one joins the
    previous batch (BatchNorm in train mode needs more than one value per channel).
    """

    def __init__(
        self, images: Any, labels: np.ndarray, batch_size: int, seed: int = 0, shuffle: bool = True
    ):
        self.images = checked_images(images, "images")
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(images):
            raise TrainingError(f"{len(images)} images but {len(self.labels)} labels")
        if batch_size < 1:
            raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.labels)
        full, rest = divmod(n, self.batch_size)
        return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)

    def _order(self) -> np.ndarray:
        n = len(self.labels)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        starts = list(range(0, len(order), self.batch_size))
        if len(starts) > 1 and len(order) - starts[-1] == 1:
            starts.pop()
        bounds = starts[1:] + [len(order)]
        for start, stop in zip(starts, bounds, strict=True):
            index = np.sort(order[start:stop])
            batch = np.asarray(self.images[index])
            if batch.ndim == 3:
                batch = batch[:, None]
            yield (
                torch.from_numpy(np.ascontiguousarray(batch)),
                torch.from_numpy(self.labels[index]),
            )


def encode_labels(
    labels: Iterable[Any], class_names: Sequence[str], what: str = "labels"
) -> np.ndarray:
    """Class names -> int64 indices into ``class_names``. A label outside the model's class set is
    a ``TrainingError`` that names both sets."""
    values = np.asarray([str(label) for label in labels], dtype=object)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(values.tolist()) - set(index))
    if unknown:
        raise TrainingError(
            f"{what} contain classes {unknown} that the model does not have; "
            f"model classes: {sorted(class_names)}, label classes: {sorted(set(values.tolist()))}. "
            "Build the model with the labels' class set."
        )
    return np.fromiter((index[v] for v in values), dtype=np.int64, count=len(values))


def check_training_labels(
    y: np.ndarray, class_names: Sequence[str], what: str = "training labels"
) -> None:
    """Refuse training labels that are empty or miss a class of the model."""
    if len(y) == 0:
        raise TrainingError(
            f"no {what}: the wave has no expert labels (and no promoted pseudo-labels); "
            "label some slices in the triage app first"
        )
    counts = np.bincount(y, minlength=len(class_names))
    missing = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if missing:
        raise TrainingError(
            f"{what} have no examples of class(es) {missing} "
            f"(counts: {dict(zip(class_names, counts.tolist(), strict=True))}); "
            "label at least one slice of each class or drop the class from the model"
        )
