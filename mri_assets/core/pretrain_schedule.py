"""The pretraining schedule and its budget per device kind, without importing torch: the
`backbone` asset's settings are built from these when the code location is imported (every Dagster
run worker does, before its first step); `pretrain` trains by them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


# The default schedule's optimiser steps per device kind (`budget_kind`): a fixed budget, whatever
# the wave's size. Chosen from `benchmarks/pretrain.py` (ARI at k = 4 against the budget). The two
# CPU kinds train the same steps: at 120 fp32 steps the pilot ARI of one seed ranged 0.29-0.40
# with the thread count, too close to the 0.3 goal; 160 gave 0.38 in bf16 on each seed tried.
STEP_BUDGETS = {"gpu": 1000, "cpu-bf16": 160, "cpu-fp32": 160}
# What the CPU budgets buy, said before training starts (benchmarks/pretrain.py on the demo pilot,
# standardized PCA, seeds 0-2: fp32 0.395/0.431/0.263, bf16 0.286/0.386/0.303).
BUDGET_BUYS = "pilot ARI at k=4 0.26-0.43 over seeds (benchmarks/pretrain.py)"
# The share of the CPU's peak (`core.cpu_peak`) a pretraining step reaches; it turns a budget into
# the time estimate logged before training. Measured on 2 cores: fp32 0.50 of an AVX-512 peak
# (Xeon, Sapphire Rapids class); on a real AVX2 CPU (AMD EPYC, 2.45 GHz) benchmarks/pretrain.py
# gave 0.40 and the demo's backbone 0.47 (47.5 TFLOP in 647 s), where oneDNN capped at AVX2 on the
# Xeon had given 0.79: that emulation overstated the AVX2 kind, whose backward-weights kernels
# (jit:avx2, and a gemm fallback on 2 x 2 maps) run at a third of its peak. bf16 on AMX reaches a
# small share of a very large peak (0.06).
EXPECTED_SHARE_OF_PEAK = {"fp32": 0.5, "fp32-avx2": 0.45, "bf16": 0.06}


def expected_share_of_peak(precision: str, isa: str) -> float:
    """`EXPECTED_SHARE_OF_PEAK` for a precision on a CPU whose widest vector unit is `isa`
    (`CpuPeak.isa`)."""
    if precision == "fp32" and not isa.startswith("AVX-512"):
        return EXPECTED_SHARE_OF_PEAK["fp32-avx2"]
    return EXPECTED_SHARE_OF_PEAK[precision]


def budget_kind(device: torch.device | str, precision: str) -> str:
    """`gpu`, `cpu-bf16` or `cpu-fp32`: which row of `STEP_BUDGETS` a device runs."""
    if str(device).split(":")[0] == "cuda":
        return "gpu"
    return "cpu-bf16" if precision == "bf16" else "cpu-fp32"


class PretrainError(ValueError):
    """Pretraining cannot start or had to stop; the message says what to change."""


@dataclass(frozen=True)
class PretrainConfig:
    """The schedule. `batch_size` counts slices per step (each gives two views)."""

    seed: int = 0
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    temperature: float = 0.2
    projection_dim: int = 128
    view_fraction: float = 0.75
    crop_scale: tuple[float, float] = (0.2, 1.0)
    max_rotation_deg: float = 10.0
    max_steps: int | None = None
    steps: int = 0
    bn_recalibration_slices: int = 4096
    precision: str = "auto"
    rotation_weight: float = 0.0
    rotation_view_fraction: float = 0.5
    contrastive_weight: float = 1.0
    drop_nearest_negatives: int = 0

    def __post_init__(self) -> None:
        checks = (
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (negatives), got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.projection_dim >= 1, f"projection_dim must be >= 1, got {self.projection_dim}"),
            (0.25 <= self.view_fraction <= 1, f"view_fraction must be in [0.25, 1], got {self.view_fraction}"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 4,
             f"crop_scale must satisfy 0 < low <= high <= 4, got {self.crop_scale}"),
            (0 <= self.max_rotation_deg <= 30,
             f"max_rotation_deg must be in [0, 30] (orientations must stay apart), got {self.max_rotation_deg}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be None or >= 1, got {self.max_steps}"),
            (self.steps >= 0, f"steps must be >= 0 (0: epochs decide), got {self.steps}"),
            (self.rotation_weight >= 0, f"rotation_weight must be >= 0, got {self.rotation_weight}"),
            (self.contrastive_weight >= 0, f"contrastive_weight must be >= 0, got {self.contrastive_weight}"),
            (self.drop_nearest_negatives >= 0,
             f"drop_nearest_negatives must be >= 0, got {self.drop_nearest_negatives}"),
            (self.contrastive_weight > 0 or self.rotation_weight > 0,
             "contrastive_weight and rotation_weight are both 0: nothing to learn"),
            (0.25 <= self.rotation_view_fraction <= 1,
             f"rotation_view_fraction must be in [0.25, 1], got {self.rotation_view_fraction}"),
            (self.bn_recalibration_slices >= 0,
             f"bn_recalibration_slices must be >= 0, got {self.bn_recalibration_slices}"),
        )
        for ok, message in checks:
            if not ok:
                raise PretrainError(f"PretrainConfig: {message}")

    def view_size(self, input_size: int) -> int:
        """Side of the training views: `view_fraction` of the input side, a multiple of 8."""
        return max(32, round(input_size * self.view_fraction / 8) * 8)

    def rotation_view_size(self, input_size: int) -> int:
        """Side of the quarter-turn views (`rotation_view_fraction` of the input side)."""
        return max(32, round(input_size * self.rotation_view_fraction / 8) * 8)
