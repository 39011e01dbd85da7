"""Self-supervised pretraining of the embedding backbone on a wave's unlabelled slices.

A seeded ResNet knows nothing about anatomy: on the pilot its clusters barely follow the four
classes (ARI ≈ 0.03 at k = 4). This module teaches it from the slices alone, with a contrastive
objective in the manner of SimCLR: two random views of each slice in a batch must be each other's
nearest neighbour among all 2B views (normalised-temperature cross-entropy on a small projection
head), so the backbone keeps what survives the augmentations — where the anatomy is and how it is
cut — and drops what they vary.

The augmentations run on the device, batched, on the slices resized once to the backbone's
input side (the side it embeds at):

- a random resized crop (`crop_scale`: 40–100 % of the area by the `backbone` asset's default,
  aspect 3:4–4:3) with a small rotation (±10°),
  rendered at `view_fraction` of the input side (96 px for the local 128 px input);
- a left/right flip, half the time. Never an up/down flip or a quarter turn: those would turn
  one orientation class into the look of another (a coronal slice upside down, a sagittal slice
  on its back), and the network must keep axial, coronal and sagittal apart;
- intensity jitter (gamma, contrast, brightness), a Gaussian blur half the time, a little noise.

Views that must match teach the network to ignore what differs between them, and nothing in the
contrastive task asks it to keep which way up a slice is. A second, predictive task does
(`rotation_weight`, after RotNet): each slice also gives one smaller view
(`rotation_view_fraction` of the input side) turned by a random number of quarter turns, and a
linear head on the backbone's features must say how many. Measured on the demo's 2,000-slice T1
pilot (seed 0, AVX-512 CPU, ARI at k = 4 against every slice's ground truth, as
`benchmarks/active_learning.py` scores it): 0.017 with the seeded weights; 0.266 with both tasks
at weight 1 for 8 epochs of 128-slice steps (205 s), 0.332 at weight 2 (246 s), 0.428 at weight 1
for 12 epochs (294 s, bf16). The default is now weight 2 with a step budget (below).

Every other view in the step is a negative, and in a wave of many patients some of them are
not: the same anatomy cut the same way in another patient. `drop_nearest_negatives` leaves out
of each view's negatives the few views most similar to it (false-negative elimination, ranked on
the detached similarities; the partner is never one of them). It is off by default because it is
a trade, not a gain. On the demo's pilot (seeds 0-2, `benchmarks/pretrain.py`) dropping 8 of the
126 raised the pilot ARI at k = 4, the coarse layout, from 0.286 / 0.386 / 0.303 to 0.429 /
0.415 / 0.341 in bf16 and from 0.395 / 0.431 / 0.263 to 0.387 / 0.419 / 0.388 in fp32 (4 gave
0.341 / 0.396 / 0.345 and 0.285 / 0.458 / 0.380; 2 gave 0.403 / 0.376 / 0.241 in bf16). On the
bf16 seed-0 backbone, model entropy's lead on the 25-level task (`benchmarks/active_learning.py`)
fell: 258 labels matched random selection's macro-F1 at 500 before, 291 with 2, 492 with 8.
Similar-looking neighbours are also the neighbouring levels, and without them as negatives the
features lose the fine detail the classifier learns from.

After training the BatchNorm running statistics are measured again on clean slices at the input
side (no augmentation), the way the backbone will see them when it embeds; the augmented views'
statistics would otherwise shift every embedding.

Everything random comes from the seed (`torch.Generator`s and numpy generators built from it),
so one seed gives the same weights on the same device type and thread count. The result is a
`mri_assets.backbone/1` checkpoint (`core.backbone.backbone_checkpoint_bytes`, origin `ssl`)
that `build_backbone(checkpoint=...)` loads; its model id reads `resnet18:ssl:<sha12>@128`.

Cost: one step embeds 2B views forward and backward, about 3x the forward FLOPs of a view
(`view_training_flops` counts them with torch's FLOP counter), plus B quarter-turn views. The
schedule is a number of optimiser steps, `STEP_BUDGETS` per device kind (GPU, CPU with native
bf16, CPU in fp32), not a number of passes: its cost does not grow with the wave, and a wave
larger than one pass of the budget trains on a seeded sample spread over its patients
(`patient_spread_sample`). At a fixed cost, smaller batches and more steps teach more: on the
demo's 2,000-slice pilot (ARI at k = 4 against every slice, `benchmarks/pretrain.py`), 36 TFLOP
gave 0.115 as 60 steps of 128 slices, 0.110 with the quarter-turn task alone (140 steps) and
0.318 as 120 steps of 64 slices (fp32; 0.379 in bf16); 22 TFLOP as 150 steps of 32 slices gave
0.127. `PretrainResult` records the measured seconds, CPU seconds and FLOPs so the same figure
can be projected to a GPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mri_assets.core.backbone import (
    GRAY_MEAN,
    GRAY_STD,
    Backbone,
    backbone_checkpoint_bytes,
    build_backbone,
)
from mri_assets.core.precision import autocast_for, resolve_precision

# The schedule and its budgets (STEP_BUDGETS, budget_kind) live in pretrain_schedule, without torch.
from mri_assets.core.pretrain_schedule import PretrainConfig, PretrainError

ORIGIN = "ssl"
PROJECTION_HIDDEN = 512
BN_STREAM = 2**31  # the seed stream of the BatchNorm recalibration sample (epochs use 0, 1, ...)


# --------------------------------------------------------------------------- augmentations


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


@dataclass(frozen=True)
class ViewParams:
    """One batch's augmentation draws (CPU, float64, from the seeded generator)."""

    theta: torch.Tensor  # (n, 2, 3) affine of the crop, rotation and flip
    gamma: torch.Tensor
    contrast: torch.Tensor
    brightness: torch.Tensor
    blur_sigma: torch.Tensor  # 0 = no blur
    noise: torch.Tensor


def draw_view_params(n: int, config: PretrainConfig, generator: torch.Generator) -> ViewParams:
    """Crop area, aspect, position, rotation, flip and the intensity draws for `n` views."""
    low, high = config.crop_scale
    area = _uniform(n, low, high, generator)
    aspect = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), generator))
    limit = max(1.0, math.sqrt(high))
    half_w = torch.sqrt(area * aspect).clamp(max=limit)
    half_h = torch.sqrt(area / aspect).clamp(max=limit)
    # A box inside the slice (zoom in) stays inside it; a box larger than the slice (zoom out,
    # area > 1) keeps the slice inside the box.
    shift_x = _uniform(n, -1, 1, generator) * (1 - half_w).abs()
    shift_y = _uniform(n, -1, 1, generator) * (1 - half_h).abs()
    angle = _uniform(n, -1, 1, generator) * math.radians(config.max_rotation_deg)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output (x, y) in [-1, 1] samples the input at R(angle) @ diag(flip * w, h) @ (x, y) + shift:
    # the flip mirrors left/right only (x), never up/down.
    theta = torch.stack(
        [
            torch.stack([cos * half_w * flip, -sin * half_h, shift_x], dim=1),
            torch.stack([sin * half_w * flip, cos * half_h, shift_y], dim=1),
        ],
        dim=1,
    )
    blurred = torch.rand(n, generator=generator) < 0.5
    return ViewParams(
        theta=theta,
        gamma=torch.exp(_uniform(n, math.log(0.7), math.log(1.5), generator)),
        contrast=_uniform(n, 0.6, 1.4, generator),
        brightness=_uniform(n, -0.15, 0.15, generator),
        blur_sigma=torch.where(blurred, _uniform(n, 0.3, 1.5, generator), torch.zeros(n, dtype=torch.float64)),
        noise=_uniform(n, 0.0, 0.03, generator),
    )


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (sigma 0 leaves the image as it is)."""
    radius = 3
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    s = sigma.to(device=x.device, dtype=torch.float32).clamp(min=1e-3)[:, None]
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * s**2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    n = x.shape[0]
    planes = x.transpose(0, 1)  # (1, n, H, W): one group per image
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="reflect"),
                      kernel[:, None, None, :], groups=n)
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="reflect"),
                      kernel[:, None, :, None], groups=n)
    return planes.transpose(0, 1)


def render_views(
    base: torch.Tensor, params: ViewParams, view_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Views (n, 1, V, V), normalised like `Backbone.normalise`, from `base` (n, 1, S, S) in [0, 1]."""
    n = base.shape[0]
    device = base.device
    theta = params.theta.to(device=device, dtype=torch.float32)
    grid = F.affine_grid(theta, [n, 1, view_size, view_size], align_corners=False)
    views = F.grid_sample(base, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=device, dtype=torch.float32).view(n, 1, 1, 1)

    views = views.clamp(0.0, 1.0) ** per_image(params.gamma)
    views = views * per_image(params.contrast) + per_image(params.brightness)
    if bool((params.blur_sigma > 0).any()):
        blurred = _gaussian_blur(views, params.blur_sigma)
        views = torch.where(per_image(params.blur_sigma) > 0, blurred, views)
    noise = torch.randn(views.shape, generator=generator, dtype=torch.float32).to(device)
    views = views + noise * per_image(params.noise)
    return ((views - GRAY_MEAN) / GRAY_STD).contiguous(memory_format=torch.channels_last)


def resized_base(pixels_u8: torch.Tensor, input_size: int | None) -> torch.Tensor:
    """uint8 (n, 1, H, W) -> float (n, 1, S, S) in [0, 1], resized as `Backbone.normalise` does."""
    x = pixels_u8.to(torch.float32) / 255.0
    if input_size is not None and tuple(x.shape[-2:]) != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True)
    return x


# --------------------------------------------------------------------------- objective


class ProjectionHead(nn.Sequential):
    """The small MLP the contrastive loss sees (thrown away after training)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__(
            nn.Linear(dim, PROJECTION_HIDDEN),
            nn.BatchNorm1d(PROJECTION_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Linear(PROJECTION_HIDDEN, out_dim),
        )


def quarter_turns(views: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each view turned by `turns[i]` quarter turns (counter-clockwise)."""
    out = views.clone()
    for k in (1, 2, 3):
        chosen = (turns == k).nonzero().flatten().to(views.device)
        if len(chosen):
            out[chosen] = torch.rot90(views[chosen], k, dims=(-2, -1))
    return out.contiguous(memory_format=torch.channels_last)


def contrastive_loss(z_first: torch.Tensor, z_second: torch.Tensor, temperature: float,
                     drop_nearest: int = 0) -> torch.Tensor:
    """Normalised-temperature cross-entropy over 2B views: row i's positive is the other view of
    the same slice, every other view in the batch is a negative, a view is never its own.

    `drop_nearest` leaves out of each row's negatives the views most similar to it (ranked on
    the detached similarities, the partner never among them): the likely false negatives, the
    same anatomy in another patient. At most 2B - 3 go, so that one negative always remains.
    """
    n = z_first.shape[0]
    z = F.normalize(torch.cat([z_first, z_second]).float(), dim=1)
    logits = z @ z.T / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, -1e4)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    drop = min(drop_nearest, 2 * n - 3)
    if drop > 0:
        with torch.no_grad():
            ranked = logits.detach().clone()
            ranked[torch.arange(2 * n, device=z.device), partner] = -1e4
            nearest = ranked.topk(drop, dim=1).indices
        logits = logits.scatter(1, nearest, -1e4)
    return F.cross_entropy(logits, partner)


def _parameter_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only; BatchNorm parameters and biases go without."""
    decay, plain = [], []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim > 1 else plain).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def learning_rate(step: int, total: int, config: PretrainConfig) -> float:
    """Linear warm-up over `warmup_fraction` of the steps, then a cosine decay to 0."""
    warmup = max(1, round(total * config.warmup_fraction)) if config.warmup_fraction else 0
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# --------------------------------------------------------------------------- data


class IndexedSlices:
    """Slices seen as one array: `slices[index_array]` -> uint8 (B, H, W) or (B, 1, H, W).

    Wraps anything that reads rows by an integer array (an in-memory array, a memmap,
    `core.training.inputs.SliceRows`) or a list of `core.embed.SliceShard`s (crc32-checked
    reads) with the positions of each shard to use.
    """

    def __init__(self, source: Any, positions: Sequence[np.ndarray] | None = None):
        if positions is None:
            self._shards = None
            self._source = source
            self._length = len(source)
            return
        if len(positions) != len(source):
            raise PretrainError(f"{len(source)} shards but {len(positions)} position lists")
        self._source = None
        self._shards = list(source)
        self._shard = np.concatenate(
            [np.full(len(p), s, dtype=np.int64) for s, p in enumerate(positions)] or [np.zeros(0, np.int64)])
        self._position = np.concatenate(
            [np.asarray(p, dtype=np.int64) for p in positions] or [np.zeros(0, np.int64)])
        self._length = len(self._shard)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if self._shards is None:
            return np.asarray(self._source[index])
        shard, position = self._shard[index], self._position[index]
        parts: list[np.ndarray | None] = [None] * len(index)
        for s in np.unique(shard):
            mine = np.flatnonzero(shard == s)
            block = self._shards[int(s)].__getitems__(position[mine].tolist()).numpy()
            for row, pixels in zip(mine, block, strict=True):
                parts[int(row)] = pixels
        return np.stack(parts)


def patient_spread_sample(patients: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted positions of at most `limit` slices, spread over patients as evenly as they allow.

    Patients take turns, in a seeded order, each giving its next slice (its own slices in a
    seeded order) until `limit` are chosen: a wave larger than the pretraining budget trains on
    every patient it can, rather than on the patients that happen to hold most slices.
    """
    patients = np.asarray(patients)
    if limit >= len(patients):
        return np.arange(len(patients))
    rng = np.random.default_rng([seed, 11])
    order = rng.permutation(len(patients))
    _, group = np.unique(patients[order], return_inverse=True)
    by_group = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[by_group], group[by_group])
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_group] = np.arange(len(order)) - starts
    turn = rng.permutation(group.max() + 1)[group]
    chosen = order[np.lexsort((turn, rank))[:limit]]
    return np.sort(chosen)


def _as_pixels(batch: np.ndarray) -> torch.Tensor:
    batch = np.asarray(batch)
    if batch.dtype != np.uint8 or batch.ndim not in (3, 4):
        raise PretrainError(f"slices must be uint8 (N, H, W) or (N, 1, H, W), got {batch.dtype} {batch.shape}")
    if batch.ndim == 3:
        batch = batch[:, None]
    return torch.from_numpy(np.ascontiguousarray(batch))


# --------------------------------------------------------------------------- cost


def view_training_flops(arch: str, view_size: int, projection_dim: int = 128) -> int:
    """FLOPs of one view through backbone + projection head, forward and backward (counted by
    torch's FLOP counter on a throw-away copy; per view, independent of the batch size)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.random.fork_rng(devices=[]):
        backbone = build_backbone(arch, "none", seed=0)
    head = ProjectionHead(backbone.dim, projection_dim)
    backbone.body.train()
    head.train()
    views = torch.zeros(2, 1, view_size, view_size)
    with FlopCounterMode(display=False) as counter:
        head(backbone.body(views)).float().pow(2).mean().backward()
    return int(counter.get_total_flops() // 2)


@dataclass(frozen=True)
class PretrainPlan:
    """How much work a schedule is for `n_slices`: steps, views, FLOPs."""

    n_slices: int
    batch_size: int
    steps_per_epoch: int
    steps: int
    views: int
    view_size: int
    flops_per_view: int
    rotation_views: int = 0
    rotation_view_size: int = 0
    rotation_flops_per_view: int = 0

    @property
    def total_flops(self) -> float:
        return float(self.flops_per_view) * self.views + float(
            self.rotation_flops_per_view) * self.rotation_views

    def seconds_at(self, flops_per_second: float) -> float:
        return self.total_flops / flops_per_second


def plan_pretraining(n_slices: int, config: PretrainConfig, arch: str = "resnet18",
                     input_size: int | None = 128, flops_per_view: int | None = None) -> PretrainPlan:
    """Steps and FLOPs of `config` on `n_slices` slices (no training)."""
    if n_slices < 2:
        raise PretrainError(f"pretraining needs at least 2 slices, got {n_slices}")
    batch = min(config.batch_size, n_slices)
    steps_per_epoch = n_slices // batch
    steps = config.steps or steps_per_epoch * config.epochs
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    view_size = config.view_size(input_size or 256)
    if flops_per_view is None:
        flops_per_view = view_training_flops(arch, view_size, config.projection_dim)
    rotation_size = config.rotation_view_size(input_size or 256) if config.rotation_weight else 0
    rotation_flops = 0
    if rotation_size:
        rotation_flops = (flops_per_view * rotation_size**2 // view_size**2 if flops_per_view
                          else view_training_flops(arch, rotation_size, config.projection_dim))
    contrastive_views = 2 * batch * steps if config.contrastive_weight else 0
    return PretrainPlan(n_slices, batch, steps_per_epoch, steps, contrastive_views, view_size,
                        flops_per_view, batch * steps if rotation_size else 0, rotation_size,
                        rotation_flops)


# --------------------------------------------------------------------------- training


@dataclass
class PretrainResult:
    checkpoint: bytes
    model_id: str
    arch: str
    input_size: int | None
    config: PretrainConfig
    device: str
    precision: str
    n_slices: int
    steps: int
    views: int
    view_size: int
    flops_per_view: int
    seconds: float
    cpu_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    rotation_views: int = 0
    rotation_flops_per_view: int = 0

    @property
    def total_flops(self) -> float:
        return float(self.flops_per_view) * self.views + float(
            self.rotation_flops_per_view) * self.rotation_views

    def as_metadata(self) -> dict[str, Any]:
        """Flat figures for asset metadata, MLflow params/metrics and the checkpoint's meta."""
        return {
            "model_id": self.model_id,
            "objective": "contrastive (normalised-temperature cross-entropy, two views per slice)",
            "arch": self.arch,
            "input_size": self.input_size,
            "view_size": self.view_size,
            "device": self.device,
            "precision": self.precision,
            "n_slices": self.n_slices,
            "steps": self.steps,
            "views": self.views,
            "seconds": round(self.seconds, 2),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "flops_per_view": self.flops_per_view,
            "total_tflops": round(self.total_flops / 1e12, 3),
            "achieved_gflops_per_s": round(self.total_flops / max(self.seconds, 1e-9) / 1e9, 1),
            "final_loss": round(self.history[-1]["loss"], 4) if self.history else None,
            **{f"config_{k}": v for k, v in asdict(self.config).items()},
        }


@contextlib.contextmanager
def _deterministic(device: torch.device):
    """Seeded global RNGs restored afterwards; deterministic cuDNN kernels while training."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if device.type != "cuda":
            yield
            return
        saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@torch.no_grad()
def recalibrate_batchnorm(backbone: Backbone, slices: Any, order: np.ndarray, device: torch.device,
                          precision: str, batch_size: int = 256) -> int:
    """Measure every BatchNorm's running mean/variance again, as the exact average over clean
    slices at the backbone's input side (no augmentation): the statistics it embeds with."""
    norms = [m for m in backbone.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(order) == 0:
        return 0
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the batches below
    backbone.train()
    seen = 0
    for start in range(0, len(order), batch_size):
        index = np.sort(order[start : start + batch_size])
        if len(index) < 2:
            break
        pixels = _as_pixels(slices[index]).to(device)
        with autocast_for(device, precision):
            backbone(pixels)
        seen += len(index)
    for module, momentum in zip(norms, momenta, strict=True):
        module.momentum = momentum
    backbone.eval()
    return seen


def step_loss(base: torch.Tensor, modules: tuple[nn.Module, nn.Module, nn.Module],
              config: PretrainConfig, plan: PretrainPlan, generator: torch.Generator,
              device: torch.device, precision: str) -> torch.Tensor:
    """One step's objective on `base` (n, 1, S, S): the contrastive loss of two views per slice
    plus the weighted quarter-turn loss, with `modules` = (body, projection head, turn head).
    Every draw comes from `generator`, in a fixed order."""
    body, head, turn_head = modules
    n = base.shape[0]
    loss = torch.zeros((), device=device)
    if config.contrastive_weight:
        views = torch.cat([render_views(base, draw_view_params(n, config, generator),
                                        plan.view_size, generator) for _ in range(2)])
        with autocast_for(device, precision):
            features = body(views)
        projected = head(features.float())
        loss = config.contrastive_weight * contrastive_loss(
            projected[:n], projected[n:], config.temperature, config.drop_nearest_negatives)
    if plan.rotation_view_size:
        turns = torch.randint(0, 4, (n,), generator=generator)
        turned = quarter_turns(render_views(base, draw_view_params(n, config, generator),
                                            plan.rotation_view_size, generator), turns)
        with autocast_for(device, precision):
            turn_features = body(turned)
        loss = loss + config.rotation_weight * F.cross_entropy(
            turn_head(turn_features.float()), turns.to(device))
    return loss


def pretrain_backbone(
    slices: Any,
    config: PretrainConfig = PretrainConfig(),  # noqa: B008 - a frozen dataclass
    device: torch.device | str = "cpu",
    arch: str = "resnet18",
    input_size: int | None = 128,
    init_weights: str = "none",
    progress: Callable[[dict[str, float]], None] | None = None,
) -> PretrainResult:
    """Train a backbone on unlabelled `slices` (uint8 rows by index array, e.g. `IndexedSlices`)
    with the contrastive objective; return its `mri_assets.backbone/1` checkpoint and figures.

    The backbone starts from `init_weights` (`none`: seeded by `config.seed`). `input_size` is the
    side it will embed at: views are cut from the slices resized to it, and the BatchNorm
    statistics are measured again at it. `progress` is called after every step with `step`
    (steps done), `steps` (the plan's), `loss`, `epoch` and `seconds`.
    """
    n = len(slices)
    device = torch.device(device)
    precision = resolve_precision(device, config.precision, purpose="training")
    plan = plan_pretraining(n, config, arch, input_size)
    started, cpu_started = time.perf_counter(), time.process_time()
    history: list[dict[str, float]] = []
    with _deterministic(device):
        torch.manual_seed(config.seed)
        backbone = build_backbone(arch, init_weights, seed=config.seed, input_size=input_size)
        head = ProjectionHead(backbone.dim, config.projection_dim)
        turn_head = nn.Linear(backbone.dim, 4)
        body = backbone.body.to(device=device, memory_format=torch.channels_last).train()
        backbone.to(device)
        head.to(device).train()
        turn_head.to(device).train()
        optimizer = torch.optim.AdamW(
            _parameter_groups([body, head, turn_head], config.weight_decay), lr=config.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        generator = torch.Generator().manual_seed(config.seed)
        step = 0
        for epoch in range(math.ceil(plan.steps / plan.steps_per_epoch)):
            order = np.random.default_rng([config.seed, epoch]).permutation(n)
            loss_sum, batches = 0.0, 0
            for start in range(0, plan.steps_per_epoch * plan.batch_size, plan.batch_size):
                if step >= plan.steps:
                    break
                index = np.sort(order[start : start + plan.batch_size])
                pixels = _as_pixels(slices[index]).to(device, non_blocking=True)
                base = resized_base(pixels, input_size)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, plan.steps, config)
                loss = step_loss(base, (body, head, turn_head), config, plan, generator, device,
                                 precision)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise PretrainError(
                        f"non-finite contrastive loss {value} at epoch {epoch}, step {step}; "
                        "lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += value
                batches += 1
                step += 1
                if progress is not None:
                    progress({"step": step, "steps": plan.steps, "loss": value, "epoch": epoch,
                              "seconds": time.perf_counter() - started})
            entry = {"epoch": epoch, "loss": loss_sum / max(batches, 1), "steps": step,
                     "seconds": time.perf_counter() - started}
            history.append(entry)
        bn_order = np.random.default_rng([config.seed, BN_STREAM]).permutation(n)[
            : config.bn_recalibration_slices]
        recalibrate_batchnorm(backbone, slices, bn_order, device, precision)
    backbone.to("cpu").to(memory_format=torch.contiguous_format).eval()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    result = PretrainResult(
        checkpoint=b"", model_id="", arch=arch, input_size=input_size, config=config,
        device=str(device), precision=precision, n_slices=n, steps=step,
        views=2 * plan.batch_size * step if config.contrastive_weight else 0,
        view_size=plan.view_size,
        rotation_views=plan.batch_size * step if plan.rotation_view_size else 0,
        rotation_flops_per_view=plan.rotation_flops_per_view,
        flops_per_view=plan.flops_per_view, seconds=seconds, cpu_seconds=cpu_seconds,
        history=history,
    )
    meta = {k: v for k, v in result.as_metadata().items() if k != "model_id"}
    result.checkpoint = backbone_checkpoint_bytes(backbone.state_dict(), ORIGIN, meta)
    result.model_id = build_backbone(arch, checkpoint=result.checkpoint,
                                     input_size=input_size).model_id
    return result
