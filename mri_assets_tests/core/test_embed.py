from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mri_assets.core.backbone import build_backbone
from mri_assets.core.embed import (
    CorruptSliceError,
    DeviceUnavailableError,
    SliceShard,
    embed_loader,
    embed_shard,
    make_loader,
    read_embeddings,
    resolve_device,
    write_embeddings,
)
from mri_assets.core.imaging import resize_to_square
from mri_assets.core.sample_data import source_paths

CPU = torch.device("cpu")
N_SLICES = 6


def _mni_slices(n: int) -> np.ndarray:
    """`n` real 256 px slices of the MNI152 T1 template, spread over its three axes."""
    volume = np.asarray(nib.load(str(source_paths()["mni_t1"])).dataobj, dtype=np.float32)
    volume = np.clip(volume / np.percentile(volume, 99.5), 0, 1) * 255
    picks = []
    for i in range(n):
        axis = i % 3
        position = int(volume.shape[axis] * (0.3 + 0.4 * (i // 3) / max(1, (n - 1) // 3)))
        picks.append(resize_to_square(np.take(volume, position, axis=axis).astype(np.uint8), 256))
    return np.stack(picks)


def _write_shard(folder: Path, pixels: np.ndarray, order: np.ndarray) -> tuple[Path, Path]:
    """Slices `pixels` on disk; the index lists them in `order` (row = position in the .npy)."""
    folder.mkdir(parents=True, exist_ok=True)
    npy, index = folder / "shard-00.npy", folder / "shard-00.parquet"
    np.save(npy, pixels)
    table = pa.table(
        {
            "image_id": [f"img-{row:03d}" for row in order],
            "row": order.astype(np.int64),
            "payload_crc32": np.array(
                [zlib.crc32(pixels[row].tobytes()) for row in order], dtype=np.int64
            ),
        }
    )
    pq.write_table(table, index)
    return npy, index


@pytest.fixture(scope="module")
def slices() -> np.ndarray:
    return _mni_slices(N_SLICES)


@pytest.fixture(scope="module")
def backbone():
    """Resizes to 64 px on the device so the loop's tests stay quick on a small CPU."""
    return build_backbone(seed=0, input_size=64)


def _reference(backbone, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return backbone(torch.from_numpy(pixels).unsqueeze(1)).numpy()


def test_embed_shard_gives_float16_embeddings_in_index_order(tmp_path, slices, backbone):
    order = np.array([4, 0, 5, 2, 1, 3])
    npy, index = _write_shard(tmp_path, slices, order)
    result = embed_shard(npy, index, backbone, CPU, "fp32", batch_size=4, num_workers=0)
    assert result.images == N_SLICES
    assert result.image_ids == [f"img-{row:03d}" for row in order]
    assert result.embeddings.dtype == np.float16
    assert result.embeddings.shape == (N_SLICES, 512)
    expected = _reference(backbone, slices[order])
    np.testing.assert_allclose(result.embeddings.astype(np.float32), expected, rtol=2e-2, atol=2e-2)


def test_worker_processes_give_the_same_bytes_as_in_process_loading(tmp_path, slices, backbone):
    npy, index = _write_shard(tmp_path, slices, np.arange(N_SLICES))
    in_process = embed_shard(npy, index, backbone, CPU, "fp32", batch_size=4, num_workers=0)
    with_workers = embed_shard(npy, index, backbone, CPU, "fp32", batch_size=4, num_workers=2)
    assert in_process.embeddings.tobytes() == with_workers.embeddings.tobytes()


def test_corrupt_slice_fails_naming_its_image_id(tmp_path, slices, backbone):
    npy, index = _write_shard(tmp_path, slices, np.arange(N_SLICES))
    pixels = np.load(npy, mmap_mode="r+")
    pixels[3, 100, 100] ^= 0xFF
    pixels.flush()
    del pixels
    with pytest.raises(CorruptSliceError, match="img-003") as error:
        embed_shard(npy, index, backbone, CPU, "fp32", batch_size=4, num_workers=0)
    assert error.value.image_id == "img-003"


def test_corrupt_slice_found_in_a_loader_worker_still_names_its_image_id(tmp_path, slices):
    npy, index = _write_shard(tmp_path, slices, np.arange(N_SLICES))
    pixels = np.load(npy, mmap_mode="r+")
    pixels[5, 0, 0] ^= 0x01
    pixels.flush()
    del pixels
    loader = make_loader(SliceShard(npy, index), batch_size=2, num_workers=1, pin_memory=False)
    with pytest.raises(CorruptSliceError, match="img-005"):
        list(loader)


def test_index_without_crc32_column_is_rejected_naming_the_missing_column(tmp_path, slices):
    npy, index = _write_shard(tmp_path, slices, np.arange(N_SLICES))
    pq.write_table(pq.read_table(index).drop(["payload_crc32"]), index)
    with pytest.raises(ValueError, match="payload_crc32"):
        SliceShard(npy, index)


def test_index_row_outside_the_npy_is_rejected_naming_the_image_id(tmp_path, slices):
    npy, index = _write_shard(tmp_path, slices, np.arange(N_SLICES))
    table = pq.read_table(index)
    rows = table.column("row").to_numpy().copy()
    rows[2] = 99
    pq.write_table(table.set_column(1, "row", pa.array(rows)), index)
    with pytest.raises(ValueError, match="img-002"):
        SliceShard(npy, index)


def test_written_embeddings_read_back_with_ids_values_and_model_id(tmp_path):
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((5, 8)).astype(np.float16)
    ids = [f"id-{i}" for i in range(5)]
    path = write_embeddings(
        tmp_path / "emb" / "shard-00.arrow", ids, embeddings, "resnet18:none:abc"
    )
    read_ids, read_values, meta = read_embeddings(path)
    assert read_ids == ids
    assert read_values.dtype == np.float16
    assert read_values.tobytes() == embeddings.tobytes()
    assert meta == {"model_id": "resnet18:none:abc", "dim": "8"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["shard-00.arrow"]


def test_failed_write_leaves_no_file_behind(tmp_path):
    with pytest.raises(ValueError, match="image_ids for"):
        write_embeddings(tmp_path / "shard-00.arrow", ["a"], np.zeros((2, 4), np.float16), "m")
    assert list(tmp_path.iterdir()) == []


def test_embedding_twice_in_one_process_writes_identical_bytes(tmp_path, slices, backbone):
    npy, index = _write_shard(tmp_path / "shard", slices, np.arange(N_SLICES))
    paths = []
    for attempt in range(2):
        result = embed_shard(npy, index, backbone, CPU, "fp32", batch_size=4, num_workers=0)
        paths.append(
            write_embeddings(
                tmp_path / f"run{attempt}.arrow",
                result.image_ids,
                result.embeddings,
                backbone.model_id,
            )
        )
    assert paths[0].read_bytes() == paths[1].read_bytes()


KERNEL_CHOICE = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "NPY_DISABLE_CPU_FEATURES",
                 "OPENBLAS_CORETYPE", "MKL_ENABLE_INSTRUCTIONS")

_EMBED_IN_A_FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    from mri_assets.core.backbone import build_backbone
    from mri_assets.core.embed import embed_shard, write_embeddings
    npy, index, out = sys.argv[1:4]
    model = build_backbone(seed=0, input_size=64)
    result = embed_shard(npy, index, model, torch.device("cpu"), "fp32", batch_size=4, num_workers=0)
    write_embeddings(out, result.image_ids, result.embeddings, model.model_id)
    """
)


def test_embedding_in_another_process_writes_identical_bytes(tmp_path, slices, backbone):
    npy, index = _write_shard(tmp_path / "shard", slices, np.arange(N_SLICES))
    result = embed_shard(npy, index, backbone, CPU, "fp32", batch_size=4, num_workers=0)
    here = write_embeddings(
        tmp_path / "here.arrow", result.image_ids, result.embeddings, backbone.model_id
    )
    there = tmp_path / "there.arrow"
    subprocess.run(
        [sys.executable, "-c", _EMBED_IN_A_FRESH_PROCESS, str(npy), str(index), str(there)],
        check=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(torch.get_num_threads()),
             # The same kernels as this process (a machine is one CPU kind): without these a run
             # that caps torch/oneDNN at AVX2 on an AVX-512 CPU would compare two kinds.
             **{name: os.environ[name] for name in KERNEL_CHOICE if name in os.environ}},
    )
    assert here.read_bytes() == there.read_bytes()


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(
        np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    )


def test_bf16_embeddings_agree_with_fp32_on_real_slices(tmp_path, slices):
    backbone = build_backbone(seed=0)
    npy, index = _write_shard(tmp_path, slices[:3], np.arange(3))
    loader = make_loader(SliceShard(npy, index), batch_size=3, num_workers=0, pin_memory=False)
    fp32 = embed_loader(backbone, loader, CPU, "fp32")
    bf16 = embed_loader(backbone, loader, CPU, "bf16")
    assert not np.array_equal(fp32, bf16)
    assert _mean_cosine(fp32, bf16) >= 0.995


def test_cuda_requested_without_cuda_is_an_error_not_a_cpu_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="device='cuda'"):
        resolve_device("cuda")


def test_auto_device_falls_back_to_cpu_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, note = resolve_device("auto")
    assert device.type == "cpu"
    assert "fell back to CPU" in note


def test_unknown_device_names_the_allowed_values():
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda'"):
        resolve_device("tpu")
