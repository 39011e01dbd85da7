"""Benchmark: end-to-end embedding of a slices shard (shard on disk -> float16 embeddings on disk).

Builds `--slices` real 256 px slices (the MNI152 T1 template, nibabel's anatomical scan and its
EPI series, each through `sample_data`'s random affine / gamma / bias-field / Rician-noise
augmentation, sliced along all three axes) into a shard `.npy` + index Parquet in a temporary
folder. Then, in this process:

- ours: `embed_shard` (batched uint8 loading with crc32 checks, on-device normalisation,
  one-channel conv1, channels_last, autocast where the device has fast low precision) followed by
  `write_embeddings` (Arrow IPC, float16);
- naive: torchvision ResNet-18, fp32, NCHW, 3-channel 224 px input normalised on the host,
  batch 32, `num_workers=0`, default collate, then the same float16 Arrow write.

`ratio_vs_naive` = naive ms/image / ours ms/image. `cosine_vs_fp32` = mean cosine similarity of the
device's low-precision embeddings (bf16 on CPU, fp16 on CUDA) against fp32 ones of the same
model on the same real slices. Model construction and one warm-up batch are outside the timings.

    .venv/bin/python benchmarks/embed.py                       # CPU, 2,000 slices
    python3 benchmarks/embed.py --device cuda --slices 100000  # a GPU node
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from mri_assets.core.backbone import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from mri_assets.core.cpu_peak import cpu_peak
from mri_assets.core.embed import (
    SliceShard,
    embed_loader,
    embed_shard,
    make_loader,
    resolve_device,
    write_embeddings,
)
from mri_assets.core.precision import PRECISIONS, resolve_precision

SIDE = 256
NAIVE_SIDE = 224
NAIVE_BATCH = 32
AXES = ("sagittal", "coronal", "axial")


def augmented_volume_slices(volume: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Every usable slice of one augmented copy of `volume`, along all three axes, as 256 px uint8."""
    from mri_assets.core.imaging import resize_to_square
    from mri_assets.core.sample_data import augment_volume, usable_slice_positions

    augmented, foreground = augment_volume(volume, rng)
    display = np.clip(augmented * (255.0 / 1.2), 0, 255).astype(np.uint8)
    slices = []
    for axis, orientation in enumerate(AXES):
        for position in usable_slice_positions(foreground, orientation):
            plane = np.rot90(np.take(display, int(position), axis=axis))
            slices.append(resize_to_square(np.ascontiguousarray(plane), SIDE))
    return slices


def build_real_slices(n: int, seed: int) -> np.ndarray:
    from mri_assets.core.sample_data import load_source_volumes, source_paths

    volumes = [v.voxels for kind in load_source_volumes(source_paths()).values() for v in kind]
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    while len(out) < n:
        volume = volumes[int(rng.integers(len(volumes)))]
        out.extend(augmented_volume_slices(volume, rng))
        print(f"  built {min(len(out), n)}/{n} real slices", flush=True)
    return np.stack(out[:n])


def tiled(slices: np.ndarray, n: int) -> np.ndarray:
    return slices[np.arange(n) % len(slices)]


def write_shard(folder: Path, pixels: np.ndarray) -> tuple[Path, Path]:
    npy, index = folder / "shard-00.npy", folder / "shard-00.parquet"
    np.save(npy, pixels)
    ids = [hashlib.sha256(f"bench:{i}".encode()).hexdigest()[:24] for i in range(len(pixels))]
    crc = np.array([zlib.crc32(p) for p in pixels], dtype=np.int64)
    pq.write_table(
        pa.table(
            {"image_id": ids, "row": np.arange(len(pixels), dtype=np.int64), "payload_crc32": crc}
        ),
        index,
    )
    return npy, index


class NaiveSlices(Dataset):
    """What a first version does: per-item float tensors, resized and normalised on the host."""

    def __init__(self, npy: Path, limit: int):
        self.pixels = np.load(npy, mmap_mode="r")
        self.limit = min(limit, len(self.pixels))
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.limit

    def __getitem__(self, i: int) -> torch.Tensor:
        gray = torch.from_numpy(np.array(self.pixels[i], dtype=np.float32) / 255.0)[None, None]
        resized = F.interpolate(
            gray, size=(NAIVE_SIDE, NAIVE_SIDE), mode="bilinear", antialias=True
        )[0]
        return (resized.repeat(3, 1, 1) - self.mean) / self.std


def naive_run(npy: Path, limit: int, device: torch.device, out: Path) -> tuple[float, int]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(device)
    loader = DataLoader(NaiveSlices(npy, limit), batch_size=NAIVE_BATCH, num_workers=0)
    with torch.no_grad():
        model(next(iter(loader)).to(device))
        start = time.perf_counter()
        chunks = [model(batch.to(device)).cpu().numpy() for batch in loader]
        embeddings = np.concatenate(chunks).astype(np.float16)
    write_embeddings(out, [str(i) for i in range(len(embeddings))], embeddings, "naive")
    return time.perf_counter() - start, len(embeddings)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(
        np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    )


def low_precision_cosine(
    model, npy: Path, index: Path, device: torch.device, n: int, batch_size: int
) -> tuple[str, float]:
    low = "fp16" if device.type == "cuda" else "bf16"
    subset = Subset(SliceShard(npy, index), range(n))
    loader = make_loader(subset, min(batch_size, n), 0, pin_memory=False)
    return low, mean_cosine(
        embed_loader(model, loader, device, "fp32"), embed_loader(model, loader, device, low)
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--slices", type=int, default=2000, help="images in the shard")
    parser.add_argument(
        "--distinct",
        type=int,
        default=2000,
        help="distinct real slices built (tiled up to --slices)",
    )
    parser.add_argument(
        "--source-npz",
        type=Path,
        help="read distinct slices from this .npz instead of building them",
    )
    parser.add_argument(
        "--save-source", type=Path, help="also save the distinct slices to this .npz"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=0,
        help="resize on device to this side; 0: CPU 128, CUDA 256",
    )
    parser.add_argument("--batch-size", type=int, default=0, help="0: CPU 64, CUDA 1024")
    parser.add_argument("--num-workers", type=int, default=-1, help="-1: CPU 0, CUDA 8")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument(
        "--naive-slices", type=int, default=0, help="naive baseline subset; 0: CPU 256, CUDA 8192"
    )
    parser.add_argument(
        "--cosine-slices", type=int, default=0, help="cosine subset; 0: CPU 32, CUDA 2048"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs of ours; the best counts"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def forward_flops_per_image(model, input_size: int) -> float:
    """FLOPs of one image through the backbone, forward (torch's FLOP counter; the resize to the
    input side and the normalisation are left out: they are a few MFLOP)."""
    from torch.utils.flop_counter import FlopCounterMode

    body = model.body if hasattr(model, "body") else model
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        body(torch.zeros(1, 1, input_size, input_size))
    return float(counter.get_total_flops())


def main() -> None:
    args = parse_args()
    device, note = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    input_size = args.input_size or (SIDE if on_cuda else 128)
    batch_size = args.batch_size or (1024 if on_cuda else 64)
    num_workers = args.num_workers if args.num_workers >= 0 else (8 if on_cuda else 0)
    precision = resolve_precision(device, args.precision, purpose="inference")
    print(
        f"device {device} ({note}); threads {torch.get_num_threads()}; precision {precision}; "
        f"input {input_size} px; batch {batch_size}; workers {num_workers}",
        flush=True,
    )

    if args.source_npz:
        distinct = np.load(args.source_npz)["slices"]
    else:
        distinct = build_real_slices(min(args.distinct, args.slices), args.seed)
    if args.save_source:
        np.savez_compressed(args.save_source, slices=distinct)
    pixels = tiled(distinct, args.slices)

    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        folder = Path(tmp)
        npy, index = write_shard(folder, pixels)
        print(
            f"shard: {len(pixels)} slices ({len(distinct)} distinct), {npy.stat().st_size / 1e6:.0f} MB",
            flush=True,
        )

        model = build_backbone(
            "resnet18",
            "none",
            seed=args.seed,
            input_size=None if input_size == SIDE else input_size,
        )
        warm = Subset(SliceShard(npy, index), range(min(batch_size, len(pixels))))
        embed_loader(model, make_loader(warm, batch_size, 0, pin_memory=False), device, precision)

        best = None
        for attempt in range(args.repeats):
            if on_cuda:
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            result = embed_shard(npy, index, model, device, precision, batch_size, num_workers)
            write_embeddings(
                folder / "ours.arrow", result.image_ids, result.embeddings, model.model_id
            )
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            print(
                f"ours run {attempt + 1}: {1000 * seconds / len(pixels):.2f} ms/image, "
                f"{len(pixels) / seconds:.0f} img/s, this process's CPU time {1000 * cpu_seconds / len(pixels):.2f} "
                f"ms/image over {torch.get_num_threads()} threads (model {model.model_id})",
                flush=True,
            )
            best = seconds if best is None else min(best, seconds)
        ours_ms = 1000 * best / len(pixels)

        naive_limit = args.naive_slices or (8192 if on_cuda else 256)
        naive_seconds, naive_images = naive_run(npy, naive_limit, device, folder / "naive.arrow")
        naive_ms = 1000 * naive_seconds / naive_images
        print(f"naive: {naive_ms:.2f} ms/image on {naive_images} slices", flush=True)

        cosine_n = min(args.cosine_slices or (2048 if on_cuda else 32), len(pixels))
        low, cosine = low_precision_cosine(model, npy, index, device, cosine_n, batch_size)
        print(f"cosine {low} vs fp32 on {cosine_n} real slices: {cosine:.5f}", flush=True)

    flops = forward_flops_per_image(model, input_size)
    achieved = flops * 1000 / ours_ms / 1e9
    machine = None if on_cuda else cpu_peak(os.environ.get("ONEDNN_MAX_CPU_ISA"))
    peak = machine.gflops(precision) if machine else None
    print(f"{flops / 1e9:.3f} GFLOP per image forward: {achieved:.0f} GFLOP/s achieved"
          + (f", peak {peak:.0f} ({machine.detail(precision)}): {achieved / peak:.2f} of it"
             if machine else ""), flush=True)
    print(
        json.dumps(
            {
                "ms_per_image": round(ours_ms, 4),
                "achieved_gflops": round(achieved, 1),
                "peak_gflops": round(peak, 1) if peak else None,
                "share_of_peak": round(achieved / peak, 3) if peak else None,
                "precision": precision,
                "img_per_s": round(1000 / ours_ms, 1),
                "ratio_vs_naive": round(naive_ms / ours_ms, 2),
                "cosine_vs_fp32": round(cosine, 5),
                "device": torch.cuda.get_device_name(0)
                if on_cuda
                else f"cpu x{torch.get_num_threads()}",
            }
        )
    )


if __name__ == "__main__":
    main()
