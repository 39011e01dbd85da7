"""The embedding loop: a slices shard on disk -> float16 embeddings in an Arrow IPC file.

The loader ships the stored uint8 pixels (one byte per pixel, pinned on CUDA) in whole batches;
the backbone scales, normalises and (optionally) resizes them on the device; the network runs in
inference mode, channels_last, under autocast (the inference policy of `core/precision.py`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mri_assets.core.compute_choices import DEVICES
from mri_assets.core.precision import autocast_for
from mri_assets.core.progress import ProgressHook
from mri_assets.core.slice_shards import payload_crc32

INDEX_COLUMNS = ("image_id", "row", "payload_crc32")
SLICE_SIDE = 256


class CorruptSliceError(ValueError):
    """A slice's bytes do not match the crc32 its shard index recorded."""

    def __init__(self, message: str, image_id: str | None = None):
        super().__init__(message)
        self.image_id = image_id


class DeviceUnavailableError(RuntimeError):
    """The requested device is not present on this machine."""


class SliceShard(Dataset):
    """One slices shard: the `.npy` (uint8 (N, 256, 256), memory-mapped) and its index Parquet.

    Items come in index order; each is a (1, H, W) uint8 tensor whose crc32 was checked against
    the index's `payload_crc32`. `__getitems__` reads a whole batch at once.
    """

    def __init__(self, npy_path: str | Path, index_path: str | Path):
        self.npy_path = Path(npy_path)
        self.index_path = Path(index_path)
        self.pixels = np.load(self.npy_path, mmap_mode="r", allow_pickle=False)
        if self.pixels.dtype != np.uint8 or self.pixels.ndim != 3:
            raise ValueError(
                f"{self.npy_path}: slices must be uint8 (N, H, W), got {self.pixels.dtype} {self.pixels.shape}"
            )
        index = pq.read_table(self.index_path)
        missing = [c for c in INDEX_COLUMNS if c not in index.column_names]
        if missing:
            raise ValueError(
                f"{self.index_path}: index lacks columns {missing} (needs {list(INDEX_COLUMNS)})"
            )
        self.image_ids: list[str] = index.column("image_id").to_pylist()
        self.rows = index.column("row").to_numpy().astype(np.int64)
        self.crc32 = index.column("payload_crc32").to_numpy().astype(np.int64)
        out_of_range = np.flatnonzero((self.rows < 0) | (self.rows >= len(self.pixels)))
        if out_of_range.size:
            first = int(out_of_range[0])
            raise ValueError(
                f"{self.index_path}: row {int(self.rows[first])} of image_id {self.image_ids[first]} is outside "
                f"the {len(self.pixels)} slices in {self.npy_path}"
            )

    def __len__(self) -> int:
        return len(self.rows)

    def _checked(self, positions: list[int], block: np.ndarray) -> np.ndarray:
        for position, pixels in zip(positions, block):
            actual = payload_crc32(pixels)
            if actual != self.crc32[position]:
                image_id = self.image_ids[position]
                raise CorruptSliceError(
                    f"corrupt slice image_id={image_id} (row {int(self.rows[position])} of {self.npy_path}): "
                    f"payload crc32 {actual} != {int(self.crc32[position])} in {self.index_path}; "
                    f"re-materialize this slices shard",
                    image_id=image_id,
                )
        return block

    def __getitems__(self, positions: list[int]) -> torch.Tensor:
        block = np.ascontiguousarray(self.pixels[self.rows[positions]])
        return torch.from_numpy(self._checked(list(positions), block)).unsqueeze(1)

    def __getitem__(self, position: int) -> torch.Tensor:
        return self.__getitems__([position])[0]


def _batch_as_is(batch: torch.Tensor) -> torch.Tensor:
    return batch


def make_loader(
    dataset: SliceShard, batch_size: int, num_workers: int, pin_memory: bool
) -> DataLoader:
    """Sequential batches of uint8 (B, 1, H, W) pixels; `num_workers` processes read and check them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
    extra = {"prefetch_factor": 4, "persistent_workers": False} if num_workers > 0 else {}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=_batch_as_is,
        **extra,
    )


def resolve_device(requested: str) -> tuple[torch.device, str]:
    """`auto` -> CUDA when present, else CPU with a note saying so; `cuda` without CUDA is an error."""
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r}: allowed values are {list(DEVICES)}")
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise DeviceUnavailableError(
            "device='cuda' was requested but torch sees no CUDA device here; "
            "run on a GPU node or set device to 'cpu' (or 'auto' to fall back)"
        )
    if requested == "cpu":
        return torch.device("cpu"), "cpu requested"
    if has_cuda:
        return torch.device("cuda"), f"{requested}: CUDA device {torch.cuda.get_device_name(0)}"
    return torch.device("cpu"), "auto: no CUDA device, fell back to CPU"


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode, on `device`, channels_last weights (in place; returns the model)."""
    return model.eval().to(device=device, memory_format=torch.channels_last)


def embed_loader(
    model: nn.Module, loader: DataLoader, device: torch.device, precision: str,
    progress: ProgressHook | None = None,
) -> np.ndarray:
    """Run every batch through the model; float16 (N, dim) embeddings in loader order.
    `progress` is called after each batch with the images embedded so far."""
    prepare_model(model, device)
    non_blocking = device.type == "cuda"
    outputs = []
    done = 0
    total = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
    if progress is not None:
        progress(0, total)
    with torch.inference_mode(), autocast_for(device, precision):
        for pixels in loader:
            features = model(pixels.to(device, non_blocking=non_blocking))
            outputs.append(features.to(torch.float16))
            done += len(pixels)
            if progress is not None:
                progress(done, total)
    if not outputs:
        return np.zeros((0, model.dim), dtype=np.float16)
    return torch.cat(outputs).cpu().numpy()


@dataclass(frozen=True)
class EmbeddingResult:
    image_ids: list[str]
    embeddings: np.ndarray
    seconds: float
    images: int

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(self.images, 1)


def embed_shard(
    npy_path: str | Path,
    index_path: str | Path,
    model: nn.Module,
    device: torch.device,
    precision: str,
    batch_size: int,
    num_workers: int,
    progress: ProgressHook | None = None,
) -> EmbeddingResult:
    """Embed one slices shard; `seconds` covers opening the shard to the last embedding on the host.
    `progress` is called after each batch with the images embedded so far and the shard's count."""
    start = time.perf_counter()
    dataset = SliceShard(npy_path, index_path)
    loader = make_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda")
    embeddings = embed_loader(model, loader, device, precision, progress)
    return EmbeddingResult(dataset.image_ids, embeddings, time.perf_counter() - start, len(dataset))


def embeddings_table(image_ids: list[str], embeddings: np.ndarray, model_id: str) -> pa.Table:
    if embeddings.dtype != np.float16 or embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be float16 (N, dim), got {embeddings.dtype} {embeddings.shape}"
        )
    if len(image_ids) != len(embeddings):
        raise ValueError(f"{len(image_ids)} image_ids for {len(embeddings)} embeddings")
    dim = embeddings.shape[1]
    values = pa.array(np.ascontiguousarray(embeddings).reshape(-1), type=pa.float16())
    schema = pa.schema(
        [("image_id", pa.string()), ("embedding", pa.list_(pa.float16(), dim))],
        metadata={"model_id": model_id, "dim": str(dim)},
    )
    columns = [
        pa.array(image_ids, type=pa.string()),
        pa.FixedSizeListArray.from_arrays(values, dim),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def write_embeddings(
    path: str | Path, image_ids: list[str], embeddings: np.ndarray, model_id: str
) -> Path:
    """Write the Arrow IPC file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    table = embeddings_table(image_ids, embeddings, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_embedding_ids(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """(image_ids, schema metadata) of an embeddings file, without converting the vectors."""
    with pa.memory_map(str(path), "r") as source:
        table = pa.ipc.open_file(source).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        return table.column("image_id").to_pylist(), meta


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(image_ids, float16 (N, dim) array, schema metadata with `model_id` and `dim`)."""
    with pa.memory_map(str(path), "r") as source:
        table = pa.ipc.open_file(source).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    dim = int(meta["dim"])
    column = table.column("embedding").combine_chunks()
    embeddings = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim).copy()
    return table.column("image_id").to_pylist(), embeddings, meta
